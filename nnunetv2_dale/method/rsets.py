"""Data-driven reliable/fuzzy R-sets: a per-class two-component mixture on the loss-consistency
signal, giving a soft label confidence omega per voxel with no hand-set cut (DESIGN.md 1.2).

Signals of a voxel v with temporal ensemble q_v and annotated label y_v:
- AE (agreement) q_v[y_v]; its loss form l_v = -log q_v[y_v] is the loss-consistency signal;
- ER (entropy) H(q_v) / log K, how undecided the model stays about v.

Per class, the distribution of l over the voxels updated during an epoch is collected in a fixed
histogram (all-reduced under DDP) and a two-component 1D Gaussian mixture is fitted to it by EM
once per epoch. omega_v = posterior of the low-loss component at l_v. Voxels visited fewer than
``min_visits`` times keep omega = 1. Reliable membership: omega * (1 - ER); fuzzy: 1 - omega.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

EPS = 1e-4
L_MAX = -math.log(EPS)  # losses are clipped to [0, L_MAX]
N_BINS = 64
UNFITTED = 100.0  # the log-odds of an unfitted mixture: sigmoid(100) is 1 in float32 and float64 (finite, so lerps hold)


def loss_signal(agreement: torch.Tensor) -> torch.Tensor:
    """l = -log q[y], clipped to [0, L_MAX]."""
    return -torch.log(agreement.clamp(EPS, 1.0))


def agreement_with_label(q: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """AE = q[y]: the smoothed probability the model gives the annotated label; ``q`` (..., C) with
    the classes last (binary: one channel, p(foreground)), ``labels`` shaped like ``q[..., 0]``."""
    if q.shape[-1] == 1:
        fg = q[..., 0]
        return torch.lerp(1 - fg, fg, as_float(labels > 0, fg.dtype))  # where(labels > 0, fg, 1 - fg), exactly
    return q.gather(-1, labels.clamp(0, num_classes - 1).long()[..., None])[..., 0]


def entropy_signal(q: torch.Tensor) -> torch.Tensor:
    """ER = H(q) / log K over dim 1, in [0, 1]; ``q`` is (N, 1) p(foreground) for binary tasks, or
    (N, K, ...) class probabilities."""
    p = torch.cat([1 - q, q], 1) if q.shape[1] == 1 else q
    p = p.clamp_min(EPS)
    p = p / p.sum(1, keepdim=True)
    return -(p * p.log()).sum(1) / math.log(p.shape[1])


@dataclass
class Mixture:
    """Two 1D Gaussians on l: (weights, means, stds), component 0 is the low-loss (clean) one."""

    weights: tuple[float, float] = (0.5, 0.5)
    means: tuple[float, float] = (0.1, 3.0)
    stds: tuple[float, float] = (0.3, 1.5)
    fitted: bool = False

    def clean_posterior(self, losses: torch.Tensor) -> torch.Tensor:
        """omega = p(low-loss component | l)."""
        if not self.fitted:
            return torch.ones_like(losses)
        dens = []
        for w, m, s in zip(self.weights, self.means, self.stds):
            dens.append(w / s * torch.exp(-0.5 * ((losses - m) / s) ** 2))
        return dens[0] / (dens[0] + dens[1]).clamp_min(1e-12)

    def log_odds(self) -> tuple[float, float, float]:
        """(a, b, c) with log(p(l | clean) w_0 / p(l | noisy) w_1) = a l^2 + b l + c, so that
        omega = sigmoid(a l^2 + b l + c) (a = 0 when the variances are tied); (0, 0, UNFITTED) when
        not fitted (omega = 1). One expression per voxel, and no density underflows to 0 / 0."""
        if not self.fitted:
            return 0.0, 0.0, UNFITTED
        (w0, w1), (m0, m1), (s0, s1) = self.weights, self.means, self.stds
        p0, p1 = 1 / s0 ** 2, 1 / s1 ** 2  # precisions
        return (-0.5 * (p0 - p1), m0 * p0 - m1 * p1,
                math.log(w0 / s0) - math.log(w1 / s1) - 0.5 * (m0 ** 2 * p0 - m1 ** 2 * p1))

    def to_dict(self) -> dict:
        return {"weights": list(self.weights), "means": list(self.means), "stds": list(self.stds),
                "fitted": self.fitted}

    @classmethod
    def from_dict(cls, d: dict) -> "Mixture":
        return cls(tuple(d["weights"]), tuple(d["means"]), tuple(d["stds"]), bool(d["fitted"]))


def bin_centres() -> np.ndarray:
    edges = np.linspace(0, L_MAX, N_BINS + 1)
    return (edges[:-1] + edges[1:]) / 2


def histogram(losses: torch.Tensor, weights: torch.Tensor | None = None) -> np.ndarray:
    """Counts (or summed ``weights``) of ``losses`` in the fixed bins (the running histogram adds these up)."""
    idx = (losses.clamp(0, L_MAX) / L_MAX * N_BINS).long().clamp(0, N_BINS - 1)
    return torch.bincount(idx, weights=weights, minlength=N_BINS).double().numpy()


def fit_mixture(counts: np.ndarray, iterations: int = 100, min_count: int = 50, tied: bool = False) -> Mixture:
    """EM for a two-component Gaussian mixture on a histogram of l (weights = bin counts).

    ``tied``: both components share one variance, so omega is a logistic, monotone function of l
    (untied, a narrow clean component makes omega drop to 0 for moderately confident voxels).

    Returns an unfitted mixture (omega = 1 everywhere) when there are too few samples or the two
    components collapse onto each other, i.e. when the data give no evidence of two populations.
    """
    total = counts.sum()
    if total < min_count:
        return Mixture()
    x = bin_centres()
    lo, hi = np.quantile(np.repeat(x, np.maximum(counts, 0).astype(np.int64)), [0.25, 0.9]) \
        if total < 1e7 else (x[np.argmax(counts)], x[-1] / 2)
    w, m, s = np.array([0.5, 0.5]), np.array([lo, max(hi, lo + 0.5)]), np.array([0.5, 1.0])
    for _ in range(iterations):
        dens = w[:, None] / s[:, None] * np.exp(-0.5 * ((x[None] - m[:, None]) / s[:, None]) ** 2) + 1e-300
        resp = dens / dens.sum(0, keepdims=True) * counts[None]
        nk = resp.sum(1) + 1e-12
        w = nk / nk.sum()
        m = (resp * x[None]).sum(1) / nk
        s = np.sqrt((resp * (x[None] - m[:, None]) ** 2).sum(1) / nk).clip(L_MAX / N_BINS / 2, None)
        if tied:
            s = np.full(2, np.sqrt((w * s ** 2).sum()))
    order = np.argsort(m)
    w, m, s = w[order], m[order], s[order]
    if m[1] - m[0] < 0.5 * (s[0] + s[1]) / 2 or min(w) < 1e-3:
        return Mixture()
    return Mixture((float(w[0]), float(w[1])), (float(m[0]), float(m[1])), (float(s[0]), float(s[1])), True)


def omega_per_voxel(losses: torch.Tensor, labels: torch.Tensor, known: torch.Tensor, mixtures: list[Mixture],
                    unknown_value: float = 1.0) -> torch.Tensor:
    """omega from each voxel's class mixture (``Mixture.log_odds``: the clean posterior as a
    sigmoid); ``unknown_value`` where ``known`` is False. ``labels``: each voxel's class in
    [0, K), integer or float. Every voxel's coefficients are taken by its label, so the work is a
    few element-wise operations on the tensors' device, whatever the number of classes."""
    coefficients = [m.log_odds() for m in mixtures]
    table = torch.tensor(coefficients, dtype=losses.dtype).to(losses.device, non_blocking=True)
    logit = torch.addcmul(per_label(table[:, 2], labels), per_label(table[:, 1], labels), losses)
    if any(a != 0 for a, _, _ in coefficients):  # untied variances: the quadratic term
        logit = logit + per_label(table[:, 0], labels) * losses * losses
    fill = torch.full((), unknown_value, dtype=losses.dtype, device=losses.device)
    if math.isnan(unknown_value):
        return torch.where(known, torch.sigmoid(logit), fill)
    return torch.lerp(fill, torch.sigmoid(logit), as_float(known, losses.dtype))


def per_label(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``values[label]`` for every voxel: a lerp between two classes (exact at 0 and 1), else an index."""
    if len(values) == 2:
        return torch.lerp(values[0], values[1], labels.to(values.dtype))
    return values[labels.long()]


def as_float(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean mask as 0/1 floats, through uint8 (on a CPU a direct bool -> float copy is ~10x
    slower); with it, ``torch.lerp(a, b, mask)`` is ``torch.where(mask, b, a)`` at a fraction of a
    CPU's cost."""
    return mask.to(torch.uint8).to(dtype)


def case_confidence(q: np.ndarray, visits: np.ndarray, labels: np.ndarray, mixtures: list[Mixture],
                    min_visits: int) -> np.ndarray:
    """omega for every voxel of one case (arrays shaped like the case; ``q`` has a trailing channel
    axis). Voxels visited fewer than ``min_visits`` times are NaN (unknown), not confident."""
    k = len(mixtures)
    flat_q = torch.from_numpy(q.reshape(-1, q.shape[-1]).astype(np.float32))
    lab = torch.from_numpy(labels.reshape(-1).astype(np.int64)).clamp(0, k - 1)
    losses = loss_signal(agreement_with_label(flat_q, lab, k))
    known = torch.from_numpy(visits.reshape(-1).astype(np.int64)) >= min_visits
    return omega_per_voxel(losses, lab, known, mixtures, float("nan")).numpy().reshape(labels.shape)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (Mann-Whitney U, ties
    counted half)."""
    scores, positives = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(positives, dtype=bool).ravel()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def boundary_band(onehot: torch.Tensor, margin: int) -> torch.Tensor:
    """(B, 1, *S) bool: voxels within ``margin`` voxels (Chebyshev distance, in the patch) of a
    change of the annotated label, from the (B, K, *S) one-hot label: there some class is present
    in the voxel's (2 margin + 1) window and absent elsewhere in it. An annotator's boundary is
    uncertain by a voxel or two on clean labels too."""
    pool = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d,
            3: torch.nn.functional.max_pool3d}[onehot.dim() - 2]
    size = 2 * margin + 1
    present = pool(onehot, size, stride=1, padding=margin)
    everywhere = -pool(-onehot, size, stride=1, padding=margin)
    return (present - everywhere).amax(1, keepdim=True) > 0
