"""What the data-augmentation workers do with the memory: fuzzy-biased patch sampling for fuzzy
phases (DESIGN.md 1.3) and reading each patch's buffer values with the batch (issue 15).

The workers are forked processes: they cannot see the trainer's state, but they can read files. At
every epoch start the trainer writes ``dale_memory/sampling.json`` (phase, share of fuzzy-biased
samples, the per-class mixtures); the training loader reads it (cached by modification time). In a
fuzzy phase, that share of a batch's samples is centred on a voxel drawn from ``candidates`` random
voxels of the case with probability proportional to its fuzzy membership 1 - omega (omega from the
memory buffers, which are files the workers can read); the rest, and every sample in other phases,
use nnU-Net's own sampling. After the warm-up, :class:`PatchReader` reads the q and visit counts
of every augmented patch's source voxels in the worker, so the training process does not.
"""
from __future__ import annotations

import json
from collections import OrderedDict
import os
from pathlib import Path

import numpy as np
import torch

from nnunetv2_dale.method.coords import source_indices
from nnunetv2_dale.method.rsets import Mixture, loss_signal, omega_per_voxel

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


def read_live_buffers(live: Path, key: str, n: int, channels: int, where: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """(q float16 (len, channels), visits uint8) of case ``key`` at flat indices ``where``, read
    from the live buffer files; None while they are missing or being replaced."""
    try:
        q = _mapped(live / f"{key}.q.f16", np.float16, n * channels)
        # one channel: gathered from the flat file (2-3x faster than rows of an (n, 1) array)
        q = np.take(q, where).reshape(-1, 1) if channels == 1 else q.reshape(n, channels)[where]
        visits = np.take(_mapped(live / f"{key}.n.u8", np.uint8, n), where)
    except (FileNotFoundError, ValueError):
        return None
    return q, visits


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

    def read(self, key: str, coords: torch.Tensor, case_shape: tuple[int, ...]
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q (N, channels) float16, visit counts (N,) uint8, 0 where the patch voxel has no valid
        source voxel) for one sample's transformed coordinate map, or None before the first
        stable or fuzzy epoch, or while the buffers are being replaced (the trainer reads then)."""
        s = self.settings()
        if s.get("phase", "warmup") == "warmup" or "channels" not in s:
            return None
        index, valid = source_indices(coords, case_shape)
        n, where = int(np.prod(case_shape)), index.numpy()
        live = self.folder / "live"
        got = read_live_buffers(live, key, n, s["channels"], where)
        if got is None:
            return None
        q, visits = got
        visits *= valid.numpy()  # 0 where no valid source voxel
        return torch.from_numpy(q), torch.from_numpy(visits)


class FuzzySampler(SettingsFile):
    """Reads the trainer's sampling settings and proposes fuzzy patch centres."""

    def __init__(self, memory_folder: str | os.PathLike, candidates: int = 256) -> None:
        super().__init__(memory_folder)
        self.candidates = candidates

    def propose(self, key: str, seg: np.ndarray, rng: np.random.Generator) -> tuple[int, ...] | None:
        """A (z, y, x) centre for a fuzzy-biased patch of case ``key``, or None (use nnU-Net's)."""
        s = self.settings()
        if s.get("phase") != "fuzzy" or rng.random() >= s.get("share", 0.0) or not self._mixtures:
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
        qk = np.concatenate([1 - q, q], 1) if channels == 1 else q
        losses = loss_signal(torch.from_numpy(qk[np.arange(len(idx)), labels]))
        known = torch.from_numpy(visits >= s.get("min_visits", 3))
        omega = omega_per_voxel(losses, torch.from_numpy(labels), known, self._mixtures).double().numpy()
        weight = 1 - omega
        if weight.sum() <= 1e-8:
            return None
        pick = idx[rng.choice(len(idx), p=weight / weight.sum())]
        return tuple(int(c) for c in np.unravel_index(pick, shape))
