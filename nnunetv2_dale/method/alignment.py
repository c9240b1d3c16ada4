"""Distribution alignment of fuzzy-region features to reliable-region features (DESIGN.md 1.4).

Features: the output of the last decoder stage (full resolution, the input of the segmentation
head), captured with a forward hook that is active only inside DALE's ``train_step`` (no cost or
effect in validation, final validation or inference). Reliable statistics: per class a running
mean and diagonal variance over reliable voxels, updated without gradient (all-reduced under DDP).
Fuzzy statistics: the same moments over the batch's fuzzy voxels. Loss: the closed-form
2-Wasserstein distance between diagonal Gaussians, summed over classes and divided by the number
of channels: sum_k ||mu_f - mu_r||^2 + ||sigma_f - sigma_r||^2, / C. With ``standardise`` every
channel is first divided by the reliable standard deviation of its class, so the term is
scale-free and the network cannot grow it by growing its feature magnitudes.
"""
from __future__ import annotations

import torch
from torch import nn


def last_decoder_stage(network: nn.Module) -> nn.Module:
    """``decoder.stages[-1]``, unwrapping DDP (``.module``) and torch.compile (``._orig_mod``)."""
    net = network
    while True:
        if hasattr(net, "module") and isinstance(net.module, nn.Module):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            break
    return net.decoder.stages[-1]


def full_precision(device: torch.device):
    """Autocast off: under nnU-Net's mixed precision a matmul would run in float16, whose sums of
    squared features over a 3d batch (millions of voxels) overflow to inf; the alignment's
    statistics then turn NaN and every later optimizer step is skipped by the grad scaler."""
    return torch.autocast(device.type, enabled=False)


class MomentSums(torch.autograd.Function):
    """Per-class weighted sums of features and of their squares, (K, C) each, from (B, C, N)
    features and (B, K, N) weights, in float32 whatever the features' dtype; differentiable in the
    features. The backward is written out, dF = G1^T W + 2 F (G2^T W), one pass over the features:
    autograd's would keep F^2, the transposed copies and the float copy, and pass over each of them
    (on a CPU the alignment then cost more than all of the rest of DALE's step)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, c = weights.shape[1], features.shape[1]
        s1 = torch.zeros((k, c), dtype=torch.float32, device=features.device)
        s2 = torch.zeros_like(s1)
        for b, part in _pieces(features):
            f, w = features[b, :, part].float(), weights[b, :, part]
            s1.addmm_(w, f.T)
            s2.addmm_(w, (f * f).T)
        ctx.save_for_backward(features, weights)
        return s1, s2

    @staticmethod
    def backward(ctx, g1: torch.Tensor, g2: torch.Tensor):
        features, weights = ctx.saved_tensors
        grad = torch.empty_like(features)
        g1t, g2t = g1.float().T.contiguous(), (2 * g2.float()).T.contiguous()
        for b, part in _pieces(features):
            w = weights[b, :, part]
            d = g1t @ w
            d.addcmul_(features[b, :, part].float(), g2t @ w)
            grad[b, :, part] = d
        return grad, None


def _pieces(features: torch.Tensor):
    """(sample, voxel slice) of (B, C, N) features, piece by piece: 32 channels of a piece stay in
    cache (32 K voxels for a CPU's 4 MiB, 256 K for a GPU's 32 MiB of L2), so the squares and float
    copies are never written out over the batch."""
    step = 1 << 18 if features.device.type == "cuda" else 1 << 15
    for b in range(features.shape[0]):
        for start in range(0, features.shape[2], step):
            yield b, slice(start, start + step)


def moment_sums(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class total weight (K,), weighted feature sums and squared-feature sums (K, C) of
    (B, C, *S) features and (B, K, *S) weights (the features' gradient flows through the sums)."""
    with full_precision(features.device):  # sums over millions of voxels: float16 would overflow
        f = features.flatten(2)
        w = weights.to(f.device).flatten(2).float()
        s1, s2 = MomentSums.apply(f, w)
        return w.sum((0, 2)), s1, s2


def weighted_moments(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class weighted mean and variance of (B, C, *S) features with (B, K, *S) weights.
    Returns mean (K, C), var (K, C), total weight (K,)."""
    total, s1, s2 = moment_sums(features, weights)
    mean = s1 / total.clamp_min(1e-6)[:, None]
    var = s2 / total.clamp_min(1e-6)[:, None] - mean ** 2
    return mean, var.clamp_min(0), total


def w2_diagonal(mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor,
                valid: torch.Tensor, standardise: bool = False) -> torch.Tensor:
    """Sum over classes (rows where ``valid``, a 0/1 or per-class weight) of the squared
    2-Wasserstein distance between diagonal Gaussians, divided by the channel count;
    ``standardise`` measures every channel in units of the standard deviation of ``b`` (the
    reference)."""
    scale = var_b.clamp_min(1e-4) if standardise else torch.ones_like(var_b)
    d = (((mean_a - mean_b) ** 2 + (var_a.clamp_min(1e-8).sqrt() - var_b.clamp_min(1e-8).sqrt()) ** 2) / scale).sum(1)
    return (d * valid).sum() / mean_a.shape[1]


def mass_share(fuzzy_mass: torch.Tensor, reliable_mass: torch.Tensor) -> torch.Tensor:
    """Per class, the share of the batch's mass that is fuzzy: fuzzy / (fuzzy + reliable), 0 where
    a class has no mass. A constant (no gradient): it sets how much the class's distance counts."""
    fuzzy_mass, reliable_mass = fuzzy_mass.detach().float(), reliable_mass.detach().float()
    return fuzzy_mass / (fuzzy_mass + reliable_mass).clamp_min(1e-6)


class FeatureAlignment:
    """Forward hook + running reliable moments + W2 loss."""

    def __init__(self, num_classes: int, momentum: float = 0.1, standardise: bool = False) -> None:
        self.num_classes = num_classes
        self.standardise = standardise
        self.momentum = momentum
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.seen = torch.zeros(num_classes, dtype=torch.bool)
        self.active = False
        self.features: torch.Tensor | None = None
        self._handle = None

    def attach(self, network: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = last_decoder_stage(network).register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if self.active:
            self.features = output

    @torch.no_grad()
    def update_reliable(self, features: torch.Tensor, weights: torch.Tensor, ddp: bool = False) -> None:
        """Fold the batch's reliable moments (weights: (B, K, *S) reliable membership per class)."""
        f = features.detach()
        total, s1, s2 = moment_sums(f, weights)
        sums = torch.cat([total[:, None], s1, s2], 1)  # (K, 1 + 2C)
        if ddp:
            torch.distributed.all_reduce(sums)
        c = f.shape[1]
        total = sums[:, 0]
        mean = sums[:, 1:1 + c] / total.clamp_min(1e-6)[:, None]
        var = (sums[:, 1 + c:] / total.clamp_min(1e-6)[:, None] - mean ** 2).clamp_min(0)
        has = total > 1  # no host round trip: the update is masked on the device
        if self.mean is None:
            self.mean, self.var = torch.zeros_like(mean), torch.ones_like(var)
        self.mean, self.var = self.mean.to(f.device), self.var.to(f.device)
        seen = self.seen.to(f.device)
        m = (1 - seen.float() * (1 - self.momentum))[:, None]  # 1 for a class's first statistics
        update = has[:, None]
        self.mean = torch.where(update, (1 - m) * self.mean + m * mean, self.mean)
        self.var = torch.where(update, (1 - m) * self.var + m * var, self.var)
        self.seen = seen | has

    def loss(self, features: torch.Tensor, weights: torch.Tensor,
             class_weight: torch.Tensor | None = None) -> torch.Tensor:
        """W2 between the batch's fuzzy moments (weights: (B, K, *S) fuzzy membership per class) and
        the stored reliable moments (constants: no gradient reaches them); with ``class_weight``
        (K,) each class's distance is weighted by it (e.g. ``mass_share``)."""
        if self.mean is None:  # classes not seen yet count 0 below (no host check of ``seen``)
            return features.sum() * 0
        mean_f, var_f, total = weighted_moments(features, weights)
        valid = (self.seen.to(features.device) & (total > 1)).float()
        if class_weight is not None:
            valid = valid * class_weight.to(valid.device)
        return w2_diagonal(mean_f, var_f, self.mean.detach(), self.var.detach(), valid, self.standardise)

    def state(self) -> dict:
        return {"mean": None if self.mean is None else self.mean.cpu().tolist(),
                "var": None if self.var is None else self.var.cpu().tolist(), "seen": self.seen.cpu().tolist()}

    def load_state(self, state: dict) -> None:
        self.mean = None if state.get("mean") is None else torch.tensor(state["mean"])
        self.var = None if state.get("var") is None else torch.tensor(state["var"])
        self.seen = torch.tensor(state.get("seen", [False] * self.num_classes), dtype=torch.bool)
