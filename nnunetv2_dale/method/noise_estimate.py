"""How noisy the training labels look, per case and per dataset, and the gate that follows it.

The signal is the frozen memory's: a known voxel (visited at least ``min_visits`` times) whose
temporal ensemble gives its annotated class less than ``CONTRADICTED`` (the ensemble prefers
another class) is *contradicted*. Near the annotated boundary every early network disagrees with
clean labels too, so only contradicted voxels beyond a rim count: at least ``margin`` voxels from
the nearest label change (the network's own blur, in voxels) and at least ``depth_share`` times the
labelled lesion's mean depth (its voxels' mean distance to the label change; a disc of radius r is
r/3 deep). The second term makes the estimate independent of the resolution: a boundary drawn a
share of the lesion's size off is the same error at 64x64 and at 128x128, while a fixed rim of 2.5
voxels read clean 128x128 DDTI labels (0.13) as noisier than 64x64 labels with a third of the lesion
area wrong (0.13-0.16). A case's estimate is that count over its labelled foreground (the share of
the annotated lesion area the early network confidently contradicts away from the rim); the
benchmark's "changed share of foreground" is the injected counterpart.

The gate follows the dataset's median case estimate: 0 up to ``low``, 1 from ``high``, linear in
between. DALE's objective is scaled by it (label confidence omega -> 1 - g (1 - omega), the
alignment weight and the fuzzy sampling share times g), so on labels that look clean DALE trains as
stock nnU-Net does. docs/method.md 7.13 has the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from nnunetv2_dale.method.rsets import agreement_with_label

CONTRADICTED = 0.5  # q[y] below this: the temporal ensemble prefers another class than the label
ESTIMATE_FILE = "dale_noise_estimate.json"


def case_counts(q: np.ndarray, visits: np.ndarray, labels: np.ndarray, min_visits: int,
                margin: float, depth_share: float = 0.0) -> tuple[int, int, int]:
    """(contradicted voxels beyond the rim, labelled-foreground voxels, known voxels) of one case;
    the rim: closer than ``margin`` voxels or ``depth_share`` times the labelled foreground's mean
    depth to a label change. Arrays shaped like the case (``q`` with a trailing channel axis:
    p(foreground) for one channel, else one per class)."""
    lab = labels.astype(np.int64)
    flat_q = torch.from_numpy(q.reshape(-1, q.shape[-1]).astype(np.float32))
    agreement = agreement_with_label(flat_q, torch.from_numpy(lab.reshape(-1)), max(q.shape[-1], 2))
    agreement = agreement.numpy().reshape(lab.shape)
    known = (visits >= min_visits) & (lab >= 0) & (lab < max(q.shape[-1], 2))
    change = ndimage.maximum_filter(lab, size=3, mode="nearest") != ndimage.minimum_filter(lab, size=3, mode="nearest")
    if change.any():
        dist = ndimage.distance_transform_edt(~change)
        depth = float(dist[lab > 0].mean()) if (lab > 0).any() else 0.0
        far = dist >= max(margin, depth_share * depth)
    else:
        far = np.ones(lab.shape, bool)
    contradicted = known & far & (agreement < CONTRADICTED)
    return int(contradicted.sum()), int((known & (lab > 0)).sum()), int(known.sum())


def ramp(value: float, low: float, high: float) -> float:
    """0 up to ``low``, 1 from ``high``, linear in between (0 for NaN)."""
    if not np.isfinite(value):
        return 0.0
    if high <= low:
        return float(value >= low)
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


@dataclass
class NoiseEstimate:
    """Per-case counts from the memory, and what follows from them."""

    keys: list[str]
    contradicted: np.ndarray  # (C,) contradicted voxels away from the rim
    foreground: np.ndarray  # (C,) known voxels labelled foreground
    known: np.ndarray  # (C,) known voxels
    low: float
    high: float
    margin: float
    epoch: int = -1
    depth_share: float = 0.0

    def case_estimates(self) -> np.ndarray:
        """Contradicted / labelled foreground per case (NaN where no labelled foreground is known)."""
        fg = self.foreground.astype(np.float64)
        return np.where(fg > 0, self.contradicted / np.maximum(fg, 1), np.nan)

    def lesion_share(self) -> float:
        """Contradicted voxels over labelled-foreground voxels, pooled over the cases."""
        fg = float(self.foreground.sum())
        return float(self.contradicted.sum()) / fg if fg > 0 else float("nan")

    def median_case(self) -> float:
        est = self.case_estimates()
        return float(np.nanmedian(est)) if np.isfinite(est).any() else float("nan")

    def gate(self) -> float:
        """The dataset's gate: how far DALE's objective acts (0 stock nnU-Net, 1 fully)."""
        return ramp(self.median_case(), self.low, self.high)

    def case_gates(self, low: float, high: float) -> dict[str, float]:
        """Per case, the ramp of its own estimate from ``low`` to ``high`` (1 where the case has no
        known labelled foreground: nothing to read, so the dataset's gate alone decides)."""
        return {k: ramp(e, low, high) if np.isfinite(e) else 1.0 for k, e in zip(self.keys, self.case_estimates())}

    def to_dict(self) -> dict:
        est = self.case_estimates()
        return {"epoch": self.epoch, "contradicted_below": CONTRADICTED, "margin": self.margin,
                "depth_share": self.depth_share, "gate_low": self.low, "gate_high": self.high,
                "dataset": {"lesion_share": self.lesion_share(), "median_case_share": self.median_case(),
                            "gate": self.gate(), "cases": len(self.keys)},
                "cases": {k: {"lesion_share": float(e) if np.isfinite(e) else None, "contradicted": int(c),
                              "foreground": int(f), "known": int(n)}
                          for k, e, c, f, n in zip(self.keys, est, self.contradicted, self.foreground, self.known)}}

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseEstimate":
        keys = sorted(d["cases"])
        col = lambda name: np.array([d["cases"][k][name] for k in keys], dtype=np.int64)  # noqa: E731
        return cls(keys, col("contradicted"), col("foreground"), col("known"), d["gate_low"], d["gate_high"],
                   d["margin"], d.get("epoch", -1), d.get("depth_share", 0.0))

    def summary(self, top: int = 5) -> str:
        """In words: how wrong the labels look, which cases most, and what DALE does about it."""
        est = self.case_estimates()
        order = [i for i in np.argsort(-np.nan_to_num(est, nan=-1)) if np.isfinite(est[i])][:top]
        worst = ", ".join(f"{self.keys[i]} ({est[i]:.0%})" for i in order)
        g = self.gate()
        action = ("DALE acts fully" if g >= 1 else "DALE trains as stock nnU-Net" if g <= 0
                  else f"DALE acts at {g:.0%} strength")
        rim = f"{self.margin:g} voxels" + (f" and {self.depth_share:g} x the lesion's mean depth" if self.depth_share else "")
        return (f"the early network confidently contradicts {self.lesion_share():.0%} of the labelled lesion area "
                f"beyond {rim} from a label boundary (median case {self.median_case():.0%}; DDTI clean labels "
                f"gave 3 %, labels with a third of the lesion area wrong 11-12 %): {action} "
                f"(gate {self.low:.2f}-{self.high:.2f} on the median case); most contradicted cases: {worst}")
