"""When the memory stops learning: the memory horizon read from the training curve.

A fixed share of the epochs (``dale_memory_horizon``) does not carry over between budgets: 30 % of
a 50-epoch run is 15 epochs, of nnU-Net's 1000-epoch default 300, long after the network has begun
to memorise noisy labels. ADELE (Liu et al., CVPR 2022) detects the start of memorisation from the
per-class training curve instead: fit f(t) = a (1 - exp(-b t^c)) to the curve of the first t
epochs and call the class fitted once the fitted slope has fallen by a share r (ADELE: 0.9) of its
slope at the first epoch, |f'(1) - f'(t)| / |f'(1)| > r. Here the curve is the memory's own mean
label confidence per class (q[y] over the voxels updated in an epoch, identical on every DDP rank),
and the memory freezes when every class is fitted. A pure function of the logged curve, so ``--c``
replays it.

The curve is read per epoch, but the ensemble matures per visit: on 64x64 DDTI (a patch covers the
image, ~5 visits per voxel per epoch) it had ~20 visits per voxel when the curve saturated, on
128x128 DDTI (~1 visit per epoch) 3, so the first, barely trained predictions still weighed a
third of it. The memory therefore also waits until its voxels were visited ``min_visits`` times on
average (:func:`mature_from`).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

MIN_EPOCHS = 3  # a three-parameter curve needs at least this many points


def _saturation(t: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * (1.0 - np.exp(-b * t ** c))


def _slope(t: float, a: float, b: float, c: float) -> float:
    return float(a * b * c * t ** (c - 1.0) * np.exp(-b * t ** c))


def slope_drop(curve: Sequence[float]) -> float | None:
    """|f'(1) - f'(t)| / |f'(1)| of the curve fitted to ``curve`` (epochs 1..t); None when it
    cannot be fitted (fewer than ``MIN_EPOCHS`` finite points, a failed or flat fit)."""
    from scipy.optimize import curve_fit

    y = np.asarray(curve, dtype=float)
    t = np.arange(1, len(y) + 1, dtype=float)
    finite = np.isfinite(y)
    if finite.sum() < MIN_EPOCHS:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "covariance could not be estimated": only the fit is used
            params, _ = curve_fit(_saturation, t[finite], y[finite], p0=(1.0, 1.0, 1.0),
                                  bounds=([0.0, 0.0, 0.0], [1.0, np.inf, 1.0]), maxfev=10000)
    except (RuntimeError, ValueError):
        return None
    first = _slope(1.0, *params)
    if not np.isfinite(first) or first <= 0:
        return None
    return abs(first - _slope(float(len(y)), *params)) / first


def update_saturation(saturated: list[int | None], curves: Sequence[Sequence[float]],
                      drop: float = 0.9) -> list[int | None]:
    """``curves``: per epoch so far, the mean label confidence of every class; ``saturated``: per
    class, the epoch count at which its curve was found saturated (None: not yet). Tests the
    classes not yet saturated on the whole curve and returns the updated list (once saturated, a
    class stays so, as in ADELE)."""
    per_class = np.asarray(curves, dtype=float).reshape(len(curves), -1)
    result = list(saturated) if saturated else [None] * per_class.shape[1]
    for c, done in enumerate(result):
        if done is None:
            d = slope_drop(per_class[:, c])
            if d is not None and d > drop:
                result[c] = len(per_class)
    return result


def replay_saturation(curves: Sequence[Sequence[float]], drop: float = 0.9) -> list[int | None]:
    """:func:`update_saturation` epoch by epoch over ``curves``, as a training would have called it
    (how ``--c`` recovers the state), stopping once every class has saturated."""
    saturated: list[int | None] = []
    for t in range(1, len(curves) + 1):
        saturated = update_saturation(saturated, curves[:t], drop)
        if all(s is not None for s in saturated):
            break
    return saturated


def mature_from(visits: Sequence[float], min_visits: float) -> int | None:
    """The epoch count after which the memory's voxels were visited ``min_visits`` times on average
    (``visits``: per epoch so far, the patch-voxel updates per voxel since the start); None: not yet."""
    reached = np.flatnonzero(np.asarray(visits, dtype=float) >= min_visits)
    return int(reached[0]) + 1 if reached.size else None


def frozen_from(saturated: list[int | None], mature: int | None = 0) -> int | None:
    """The epoch from which the memory is frozen: when the last class saturated and the memory was
    mature (:func:`mature_from`; None: not yet)."""
    if not saturated or any(s is None for s in saturated) or mature is None:
        return None
    return max(max(saturated), mature)  # type: ignore[type-var]
