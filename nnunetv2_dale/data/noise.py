"""Label-noise models from the noisy-label segmentation literature (DESIGN.md section 4).

All functions take a binary mask (2D or 3D bool array) and a ``numpy.random.Generator`` and
return the noisy mask; they never modify their input. ``corrupt_label`` applies one model to a
label map (foreground = label > 0, binary datasets) and returns the noisy map and the mask of
voxels whose label changed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def changed_fraction(clean: np.ndarray, noisy: np.ndarray) -> float:
    """|clean XOR noisy| / |clean|: the share of the true foreground area that the noise changed."""
    area = max(int(clean.sum()), 1)
    return float(np.logical_xor(clean, noisy).sum()) / area


def _rotate_shift(mask: np.ndarray, angle: float, shift: np.ndarray) -> np.ndarray:
    rotated = ndimage.rotate(mask.astype(np.float32), angle, axes=(-2, -1), reshape=False, order=1)
    return ndimage.shift(rotated, shift, order=1) > 0.5


def alpha_beta_mask(mask: np.ndarray, beta: float, rng: np.random.Generator, max_steps: int = 64) -> np.ndarray:
    """Dilate, erode, or rotate (up to 30 degrees) and shift ``mask`` until it changes by ~``beta``.

    The change is measured by :func:`changed_fraction`. Erosion stops before the mask vanishes.
    """
    mask = mask.astype(bool)
    if not mask.any():
        return mask.copy()
    op = rng.choice(["dilate", "erode", "rotate_shift"])
    angle = float(rng.uniform(-30, 30))
    direction = rng.normal(size=mask.ndim)
    direction[: mask.ndim - 2] = 0  # shift in-plane only for 3D, like the in-plane rotation
    direction /= max(np.linalg.norm(direction), 1e-8)
    noisy = mask
    for step in range(1, max_steps + 1):
        if op == "dilate":
            candidate = ndimage.binary_dilation(mask, iterations=step)
        elif op == "erode":
            candidate = ndimage.binary_erosion(mask, iterations=step)
            if not candidate.any():
                break
        else:
            candidate = _rotate_shift(mask, angle, direction * (step - 1) * 0.5)
        noisy = candidate
        if changed_fraction(mask, noisy) >= beta:
            break
    return noisy


def markov_boundary_mask(mask: np.ndarray, rng: np.random.Generator, steps: int = 200, theta1: float = 0.8,
                         theta2: float = 0.05, theta3: float = 0.2, sigma: float = 2.0) -> np.ndarray:
    """Markov boundary noise: ``steps`` times grow (prob. ``theta1``) or shrink the mask, flipping
    each boundary voxel with probability ``theta2``; then flip every voxel with probability
    ``theta3``, blur (Gaussian ``sigma``) and threshold at 0.5."""
    noisy = mask.astype(bool).copy()
    for _ in range(steps):
        if rng.random() < theta1:
            boundary = ndimage.binary_dilation(noisy) & ~noisy
        else:
            boundary = noisy & ~ndimage.binary_erosion(noisy)
        noisy ^= boundary & (rng.random(noisy.shape) < theta2)
    noisy ^= rng.random(noisy.shape) < theta3
    return ndimage.gaussian_filter(noisy.astype(np.float32), sigma) > 0.5


def missed_spurious_mask(mask: np.ndarray, rng: np.random.Generator, p_drop: float = 0.3,
                         n_spurious: int = 1, radius: float = 4.0) -> np.ndarray:
    """Drop each connected component with probability ``p_drop`` and add ``n_spurious`` round blobs."""
    components, n = ndimage.label(mask)
    keep = np.concatenate([[False], rng.random(n) >= p_drop])
    noisy = keep[components]
    grid = np.indices(mask.shape, dtype=np.float32)
    for _ in range(n_spurious):
        centre = [rng.uniform(radius, s - radius) for s in mask.shape]
        dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
        noisy |= dist2 <= radius ** 2
    return noisy


@dataclass(frozen=True)
class NoiseSpec:
    """Which noise model to apply and with what parameters.

    ``model``: "none", "alphabeta", "markov" or "missed_spurious". ``alpha`` is the fraction of
    cases corrupted (every model); the other fields are the model's parameters.
    """

    model: str = "alphabeta"
    alpha: float = 0.7
    beta: float = 0.5
    markov_steps: int = 200
    theta1: float = 0.8
    theta2: float = 0.05
    theta3: float = 0.2
    p_drop: float = 0.3

    def corrupt(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.model == "alphabeta":
            return alpha_beta_mask(mask, self.beta, rng)
        if self.model == "markov":
            return markov_boundary_mask(mask, rng, self.markov_steps, self.theta1, self.theta2, self.theta3)
        if self.model == "missed_spurious":
            return missed_spurious_mask(mask, rng, self.p_drop)
        if self.model == "none":
            return mask.copy()
        raise ValueError(f"unknown noise model {self.model!r}; use none, alphabeta, markov or missed_spurious")


def corrupt_label(label: np.ndarray, spec: NoiseSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt a binary label map with probability ``spec.alpha``; return (noisy label, changed mask)."""
    if label.max() > 1:
        raise ValueError("corrupt_label handles binary labels (0/1) only")
    clean = label > 0
    if spec.model == "none" or rng.random() >= spec.alpha:
        return label.copy(), np.zeros(label.shape, dtype=bool)
    noisy = spec.corrupt(clean, rng)
    return noisy.astype(label.dtype), noisy ^ clean
