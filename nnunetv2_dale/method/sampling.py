"""What the data-augmentation workers do with the memory: fuzzy-biased patch sampling for fuzzy
phases (DESIGN.md 1.3) and reading each patch's buffer values with the batch (issue 15).

The workers are forked processes: they cannot see the trainer's state, but they can read files. At
every epoch start the trainer writes ``dale_memory/sampling.json`` (phase, share of fuzzy-biased
samples, the per-class mixtures); the training loader reads it (cached by modification time). In a
fuzzy phase, that share of a batch's samples is centred on a voxel drawn from ``candidates`` random
voxels of the case with probability proportional to its fuzzy membership 1 - omega (omega from the
memory buffers, which are files the workers can read); the rest, and every sample in other phases,
use nnU-Net's own sampling. After the warm-up, :class:`PatchReader` reads the q and visit counts
of every augmented patch's source voxels in the worker, so the training process does not: an
unrotated patch (most of nnU-Net's samples) is a box of the case, read with slices
(:func:`read_box`); a rotated one through flat indices computed in reused scratch arrays
(``geometry.rotated_source_indices``); both straight into the batch's arrays.
"""
from __future__ import annotations

import json
from collections import OrderedDict
import os
from pathlib import Path

import numpy as np
import torch

from nnunetv2_dale.method.coords import VALID_THRESHOLD, source_indices
from nnunetv2_dale.method.geometry import PatchSpec, axis_sources, rotated_source_indices
from nnunetv2_dale.method.rsets import Mixture, agreement_with_label, loss_signal, omega_per_voxel

SAMPLING_FILE = "sampling.json"


_MAPS: OrderedDict[Path, tuple[tuple[int, int], np.ndarray]] = OrderedDict()
_MAPS_KEPT = 64  # cases whose files stay mapped in this process (each mapping holds a file descriptor)


def _mapped(path: Path, dtype: type, size: int) -> np.ndarray:
    """``path`` memory-mapped read-only as a flat ``dtype`` array of ``size`` items, kept mapped
    while the file is the same (inode and size; the trainer writes it in place through its own
    shared mapping, which this one sees) so that repeated reads do not map and fault it again; a
    file replaced by a restore or reset has a new inode and is mapped afresh."""
    st = os.stat(path)
    ident = (st.st_ino, st.st_size)
    hit = _MAPS.get(path)
    if hit is not None and hit[0] == ident:
        _MAPS.move_to_end(path)
        return hit[1]
    array = np.memmap(path, dtype=dtype, mode="r", shape=(size,)).view(np.ndarray)
    _MAPS[path] = (ident, array)
    _MAPS.move_to_end(path)
    while len(_MAPS) > _MAPS_KEPT:
        _MAPS.popitem(last=False)
    return array


def live_arrays(live: Path, key: str, n: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Case ``key``'s live q (float16, flat: ``n * channels`` values) and visit counts (uint8,
    ``n``), mapped read-only; FileNotFoundError or ValueError while they are missing or being
    replaced."""
    return (_mapped(live / f"{key}.q.f16", np.float16, n * channels),
            _mapped(live / f"{key}.n.u8", np.uint8, n))


def read_live_buffers(live: Path, key: str, n: int, channels: int, where: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """(q float16 (len, channels), visits uint8) of case ``key`` at flat indices ``where``, read
    from the live buffer files; None while they are missing or being replaced."""
    try:
        q, visits = live_arrays(live, key, n, channels)
        # one channel: gathered from the flat file (2-3x faster than rows of an (n, 1) array)
        q = np.take(q, where).reshape(-1, 1) if channels == 1 else q.reshape(n, channels)[where]
        visits = np.take(visits, where)
    except (FileNotFoundError, ValueError):
        return None
    return q, visits


def _run(valid: np.ndarray) -> slice | None:
    """The patch indices where a one-axis validity holds, as a slice (they form one run: the
    positions along an unmixed axis are monotonic); None if empty or not one run."""
    hits = np.flatnonzero(valid)
    if hits.size == 0 or hits[-1] - hits[0] + 1 != hits.size:
        return None
    return slice(int(hits[0]), int(hits[-1]) + 1)


def read_box(q: np.ndarray, visits: np.ndarray, case_shape: tuple[int, ...], channels: int, spec: PatchSpec,
             axes: list[tuple[np.ndarray, np.ndarray]], threshold: float, out_q: np.ndarray, out_v: np.ndarray
             ) -> bool:
    """:func:`read_live_buffers` of a patch whose axes are unmixed (``geometry.axis_sources``),
    from the case-shaped arrays instead of a flat index, into ``out_q`` (N, channels) and
    ``out_v`` (N,): the valid voxels form a box (a voxel is valid only if every axis's weight
    exceeds ``threshold``), gathered with slices along the axes that are plain crops (most of
    nnU-Net's samples) and one ``np.take`` per scaled axis. The same q and visits as the flat
    gather at valid voxels; invalid voxels get visits 0 and q 0. False (nothing written) where
    the shortcut does not apply (no valid voxel)."""
    dims = len(spec.patch_size)
    q = q.reshape(*case_shape, channels)
    visits = visits.reshape(case_shape)
    for _ in range(len(case_shape) - dims):  # a 2d patch of a 3D case: its slice
        q, visits = q[int(spec.slice_index or 0)], visits[int(spec.slice_index or 0)]
    runs = [_run(w > threshold) for _, w in axes]
    if any(r is None for r in runs):
        return False
    view, takes = [], []
    for a, ((source, _), run) in enumerate(zip(axes, runs)):
        part = source[run]
        lo, hi = int(part.min()), int(part.max())
        step = np.arange(part.size)
        if hi - lo + 1 == part.size and (part - lo == step).all():
            view.append(slice(lo, hi + 1))
        elif hi - lo + 1 == part.size and (hi - part == step).all():
            view.append(slice(hi, lo - 1 if lo > 0 else None, -1))
        else:
            view.append(slice(lo, hi + 1))
            takes.append((a, part - lo))
    box_q, box_v = q[tuple(view)], visits[tuple(view)]
    for a, local in takes:
        box_q, box_v = np.take(box_q, local, axis=a), np.take(box_v, local, axis=a)
    out_q, out_v = out_q.reshape(*spec.patch_size, channels), out_v.reshape(spec.patch_size)
    if any(r.stop - r.start < size for r, size in zip(runs, spec.patch_size)):  # padding around the box
        out_q[...] = 0
        out_v[...] = 0
    out_q[tuple(runs)] = box_q
    out_v[tuple(runs)] = box_v
    weights = [w[run] for (_, w), run in zip(axes, runs)]
    if any((w < 1).any() for w in weights):  # fractional edge weights: the product decides, as in the flat path
        product = None
        for a in reversed(range(dims)):
            w = weights[a].reshape([-1 if d == a else 1 for d in range(dims)])
            product = w if product is None else product * w
        out_v[tuple(runs)] *= np.broadcast_to(product > threshold, box_v.shape)
    return True


class SettingsFile:
    """The trainer's ``sampling.json``, as the workers see it (re-read when it changes)."""

    def __init__(self, memory_folder: str | os.PathLike) -> None:
        self.folder = Path(memory_folder)
        self._mtime = None
        self._settings: dict = {}
        self._mixtures: list[Mixture] = []

    def settings(self) -> dict:
        path = self.folder / SAMPLING_FILE
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        if mtime != self._mtime:
            try:
                self._settings = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):  # being replaced right now: keep the last settings
                return self._settings
            self._mixtures = [Mixture.from_dict(m) for m in self._settings.get("mixtures", [])]
            self._mtime = mtime
        return self._settings


class PatchReader(SettingsFile):
    """Reads, in the worker, the buffer values of an augmented patch's source voxels."""

    def batch_arrays(self, batch_size: int, voxels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Empty (q (B, N, channels) float16, visits (B, N) uint8) for one batch's reads, or None
        before the first stable or fuzzy epoch and where the trainer's steps do not use the memory
        (``reads``: frozen under a shut gate); the workers read nothing then."""
        s = self.settings()
        if s.get("phase", "warmup") == "warmup" or not s.get("reads", True) or "channels" not in s:
            return None
        return (torch.empty((batch_size, voxels, s["channels"]), dtype=torch.float16),
                torch.empty((batch_size, voxels), dtype=torch.uint8))

    def read(self, key: str, coords: torch.Tensor | PatchSpec, case_shape: tuple[int, ...],
             out_q: np.ndarray, out_v: np.ndarray) -> bool:
        """Writes q (N, channels) and the visit counts (N,), 0 where the patch voxel has no valid
        source voxel, of one sample's transformed coordinates (a :class:`PatchSpec` or a built
        map) into ``out_q`` and ``out_v``; False while the buffers are being replaced or the phase
        changed (the trainer reads the batch then)."""
        s = self.settings()
        if s.get("phase", "warmup") == "warmup" or s.get("channels") != out_q.shape[-1]:
            return False
        n, live, channels = int(np.prod(case_shape)), self.folder / "live", s["channels"]
        axes = axis_sources(coords) if isinstance(coords, PatchSpec) else None
        try:
            q, visits = live_arrays(live, key, n, channels)
            if axes is not None and read_box(q, visits, case_shape, channels, coords, axes, VALID_THRESHOLD,
                                             out_q, out_v):
                return True  # no rotation: a box of the case, read with slices
            if isinstance(coords, PatchSpec):
                index, valid = rotated_source_indices(coords, case_shape, VALID_THRESHOLD)
            else:  # a built map (elastic deformation)
                index, valid = (t.numpy() for t in source_indices(coords, case_shape))
            if channels == 1:  # gathered from the flat file (2-3x faster than rows of an (n, 1) array)
                np.take(q, index, out=out_q.reshape(-1), mode="clip")
            else:
                np.take(q.reshape(n, channels), index, axis=0, out=out_q, mode="clip")
            np.take(visits, index, out=out_v, mode="clip")
        except (FileNotFoundError, ValueError):
            return False
        out_v *= valid  # 0 where no valid source voxel
        return True


class FuzzySampler(SettingsFile):
    """Reads the trainer's sampling settings and proposes fuzzy patch centres."""

    def __init__(self, memory_folder: str | os.PathLike, candidates: int = 256) -> None:
        super().__init__(memory_folder)
        self.candidates = candidates

    def propose(self, key: str, seg: np.ndarray, rng: np.random.Generator) -> tuple[int, ...] | None:
        """A (z, y, x) centre for a fuzzy-biased patch of case ``key``, or None (use nnU-Net's)."""
        s = self.settings()
        gate = s.get("gate", 1.0)  # the trainer's noise gate (absent: fully)
        if s.get("phase") != "fuzzy" or rng.random() >= s.get("share", 0.0) * gate or not self._mixtures:
            return None
        shape = seg.shape[1:]
        n = int(np.prod(shape))
        channels = s["channels"]
        live = self.folder / "live"
        idx = np.sort(rng.integers(0, n, size=self.candidates))
        got = read_live_buffers(live, key, n, channels, idx)
        if got is None:
            return None
        q, visits = got[0].astype(np.float32), got[1]
        labels = np.asarray(seg[0]).reshape(-1)[idx].astype(np.int64).clip(0, len(self._mixtures) - 1)
        losses = loss_signal(agreement_with_label(torch.from_numpy(q), torch.from_numpy(labels), len(self._mixtures)))
        known = torch.from_numpy(visits >= s.get("min_visits", 3))
        omega = omega_per_voxel(losses, torch.from_numpy(labels), known, self._mixtures).double().numpy()
        weight = 1 - omega
        if weight.sum() <= 1e-8:
            return None
        pick = idx[rng.choice(len(idx), p=weight / weight.sum())]
        return tuple(int(c) for c in np.unravel_index(pick, shape))
