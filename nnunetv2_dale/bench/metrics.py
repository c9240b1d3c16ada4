"""Segmentation metrics of the noisy-label benchmark (DESIGN.md section 4), per case, spacing-aware.

- Dice of one class;
- boundary-band Dice: Dice restricted to the voxels within ``band_mm`` of the true (clean) boundary,
  the fuzzy region where label noise lives and where a noisy-label method should win;
- HD95: the 95th percentile of the symmetric surface distances, in mm (NaN when either mask is
  empty, counted separately in reports).

Arrays are label maps as nnU-Net's readers return them, (1, X, Y, Z) or any shape; singleton axes
(a 2D image read as 1 x H x W) are dropped with their spacing before distances are computed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _squeeze(mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, tuple[float, ...]]:
    if len(spacing) != mask.ndim:
        spacing = tuple(spacing[-mask.ndim:]) if len(spacing) > mask.ndim else (1.0,) * (mask.ndim - len(spacing)) + tuple(spacing)
    keep = [i for i, s in enumerate(mask.shape) if s > 1]
    return mask.reshape([mask.shape[i] for i in keep]), tuple(float(spacing[i]) for i in keep)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P & R| / (|P| + |R|) of two boolean masks; NaN when both are empty."""
    denom = int(pred.sum()) + int(ref.sum())
    return float("nan") if denom == 0 else 2.0 * float(np.logical_and(pred, ref).sum()) / denom


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 4/6-connected neighbour outside it (image border counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def boundary_band(ref: np.ndarray, spacing: tuple[float, ...], band_mm: float) -> np.ndarray:
    """Voxels whose distance to the boundary of ``ref`` is at most ``band_mm`` (both sides)."""
    edge = surface(ref)
    if not edge.any():
        return np.zeros(ref.shape, dtype=bool)
    return ndimage.distance_transform_edt(~edge, sampling=spacing) <= band_mm


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th percentile of the symmetric surface distances in mm; NaN if either mask is empty."""
    if not pred.any() or not ref.any():
        return float("nan")
    sp, sr = surface(pred), surface(ref)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], labels: list[int],
                 band_mm: float) -> dict[str, dict[str, float]]:
    """{class: {"dice", "band_dice", "hd95"}} for every foreground class in ``labels``."""
    out: dict[str, dict[str, float]] = {}
    pred, sp = _squeeze(np.asarray(pred), spacing)
    ref, _ = _squeeze(np.asarray(ref), spacing)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    for c in labels:
        p, r = pred == c, ref == c
        band = boundary_band(r, sp, band_mm)
        out[str(c)] = {"dice": dice(p, r), "band_dice": dice(p & band, r & band), "hd95": hd95(p, r, sp)}
    return out
