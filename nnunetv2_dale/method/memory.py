"""Per-voxel label-confidence memory: memory-mapped temporal ensembles of the softmax.

For every training case the memory holds, per voxel of the preprocessed case,
- ``q``: an exponential moving average of the network's softmax over the visits of that voxel
  (float16; one channel, p(foreground), for binary tasks, K channels otherwise), and
- ``n``: a visit count saturating at 255 (uint8),
so disk costs 2K+1 bytes per voxel (3 for binary) and RAM holds only the current batch: files are
opened per update and closed again, so mapped pages do not accumulate in the process.

Source voxels with nnU-Net's ignore label are excluded: ``exclude(key, mask)`` writes a packed
bitmask (1/8 byte per voxel, only for cases that have ignored voxels) to
``<fold>/dale_memory/excluded``, and updates skip those voxels, whatever label the augmented patch
interpolated there.

Files live in ``<fold>/dale_memory/live``. ``snapshot(epoch)`` copies them atomically (temporary
folder + rename) to ``snapshot_epoch_XXXX``, stamped with the epoch of the checkpoint written next
to it, with a CRC-32 of every file in its manifest; ``restore(epoch)`` copies a snapshot back
and verifies sizes and checksums on the way. A snapshot whose stamp, case list or bytes do not
match is refused with a message, never used.

With ``background=True`` the trainer's updates run in a background writer thread (``defer``;
``writer.py``), off the training loop's critical path; everything that must see all of them
(epoch statistics, snapshots, restore, reset, whole-case reads) flushes it first.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nnunetv2_dale.method.rsets import EPS, L_MAX, N_BINS
from nnunetv2_dale.method.writer import BackgroundWriter

MANIFEST = "manifest.json"
MAX_COUNT = 255


class MemoryMismatchError(RuntimeError):
    """Buffers that do not belong to this run or checkpoint."""


@dataclass
class EpochStats:
    """Per-epoch running sums (all-reduced under DDP before they are reported)."""

    num_classes: int
    newly_visited: int = 0
    conf_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    conf_cnt: np.ndarray = field(default=None)  # type: ignore[assignment]
    skipped_nonfinite: int = 0
    loss_hist: np.ndarray = field(default=None)  # type: ignore[assignment]  # (K, N_BINS) of l = -log q[y]

    def __post_init__(self) -> None:
        self.conf_sum = np.zeros(self.num_classes, dtype=np.float64)
        self.conf_cnt = np.zeros(self.num_classes, dtype=np.float64)
        self.loss_hist = np.zeros((self.num_classes, N_BINS), dtype=np.float64)

    def merge(self, other: "EpochStats") -> None:
        self.newly_visited += other.newly_visited
        self.skipped_nonfinite += other.skipped_nonfinite
        self.conf_sum += other.conf_sum
        self.conf_cnt += other.conf_cnt
        self.loss_hist += other.loss_hist

    def add(self, q: np.ndarray, labels: np.ndarray, hits: np.ndarray) -> None:
        """Fold updated source voxels in: q (M, channels) after the update, their labels (M,) and
        how many patch voxels mapped to each (M,, the weights). One bincount per statistic: the
        per-class selections this replaces were most of the host time of an update."""
        k = self.num_classes
        lab = labels.astype(np.intp)
        inside = None
        if lab.size and (lab.min() < 0 or lab.max() >= k):  # counted as the nearest class, kept out of the histogram
            inside = (lab >= 0) & (lab < k)
            lab = np.minimum(np.maximum(lab, 0), k - 1)
        if q.shape[1] == 1:  # q[y] = q if y == 1 else 1 - q, without a select
            agreement = (1 - lab).astype(np.float32) + (2 * lab - 1).astype(np.float32) * q[:, 0]
        else:
            agreement = np.take_along_axis(q, lab[:, None], 1)[:, 0]
        weights = hits.astype(np.float64)
        self.conf_sum += np.bincount(lab, weights=agreement * weights, minlength=k)
        self.conf_cnt += np.bincount(lab, weights=weights, minlength=k)
        losses = -np.log(np.minimum(np.maximum(agreement, np.float32(EPS)), np.float32(1)))
        cell = lab * N_BINS + np.minimum((losses * np.float32(N_BINS / L_MAX)).astype(np.intp), N_BINS - 1)
        if inside is not None:
            cell, weights = cell[inside], weights[inside]
        self.loss_hist += np.bincount(cell, weights=weights, minlength=k * N_BINS).reshape(k, N_BINS)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reserve(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: stay sparse
            raise


def copy_with_crc(source: Path, target: Path, chunk: int = 1 << 20) -> int:
    """Copy a file, fsync it, and return the CRC-32 of its bytes (one read for both)."""
    crc = 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        while block := src.read(chunk):
            crc = zlib.crc32(block, crc)
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    return crc


def _hard_link(source: Path, target: Path) -> bool:
    """Hard-link ``target`` to ``source``; False where that is impossible (gone, no link support)."""
    try:
        os.link(source, target)
        return True
    except OSError:
        return False


@dataclass
class PatchUpdate:
    """One patch reduced to its distinct source voxels: sorted flat indices (M,), mean softmax
    (M, channels), the label of each (that of a patch voxel mapping to it) and how many patch
    voxels mapped to it. Made on the training device, folded in on the host (``apply``)."""

    index: torch.Tensor
    mean: torch.Tensor
    labels: torch.Tensor
    hits: torch.Tensor

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "PatchUpdate":
        pin = non_blocking and self.index.device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if not pin:
                return t.to(device)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        return PatchUpdate(move(self.index), move(self.mean), move(self.labels), move(self.hits))

    def select(self, keep: torch.Tensor) -> "PatchUpdate":
        return PatchUpdate(self.index[keep], self.mean[keep], self.labels[keep], self.hits[keep])


def scatter_patch(index: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, channels: int) -> PatchUpdate:
    """Scatter-mean of a patch's softmax (N, K) over its source voxels ``index`` (N,), on the
    tensors' device (``channels`` 1: p(foreground) of a binary task)."""
    values = probs[:, 1:] if channels == 1 else probs
    uniq, inverse = torch.unique(index, return_inverse=True)
    hits = torch.bincount(inverse, minlength=uniq.numel())
    sums = torch.zeros((uniq.numel(), channels), dtype=torch.float32, device=index.device)
    mean = sums.index_add_(0, inverse, values.float()) / hits[:, None]
    lab = torch.zeros(uniq.numel(), dtype=torch.int16, device=index.device).scatter_(0, inverse, labels.to(torch.int16))
    return PatchUpdate(uniq, mean, lab, hits.to(torch.int32))


def write_json_atomic(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ConfidenceMemory:
    """Temporal-ensemble buffers for the training cases of one fold."""

    def __init__(self, folder: str | os.PathLike, case_shapes: dict[str, tuple[int, ...]], num_classes: int,
                 identity: dict, ema_min_weight: float = 0.2, background: bool = False) -> None:
        self.root = Path(folder)
        self.live = self.root / "live"
        self.case_shapes = {k: tuple(int(s) for s in v) for k, v in case_shapes.items()}
        self.num_classes = num_classes
        self.channels = 1 if num_classes == 2 else num_classes
        self.identity = identity  # dataset, plans, configuration, fold: refuse buffers of another run
        self.ema_min_weight = ema_min_weight
        self.total_voxels = int(sum(np.prod(s) for s in self.case_shapes.values()))
        self.visited_voxels = 0
        self.epoch_visits = 0.0  # patch-voxel updates of the last finished epoch, per countable voxel
        self.stats = EpochStats(num_classes)
        self._snapshot_written: int | None = None
        self.snapshot_linked = 0
        self.excluded_dir = self.root / "excluded"
        self._excluded_counts: dict[str, int] = {}  # case -> ignore-label voxels (a bitmask file when > 0)
        self._writer = BackgroundWriter() if background else None
        self._pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), "dale-memory-apply") if background else None
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------ background writes
    def defer(self, job: Callable[[], None]) -> None:
        """Run ``job`` (updates of this memory) in the background writer, in submission order, or
        now when the memory has none. Results become visible to ``read`` at the latest on ``flush``."""
        if self._writer is None:
            job()
        else:
            self._writer.submit(job)

    def flush(self) -> None:
        """Wait for every deferred update (raises the failure of any of them)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and stop the background writer (the memory then applies updates synchronously)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown()

    # ----------------------------------------------------------------- files
    def _q_path(self, folder: Path, key: str) -> Path:
        return folder / f"{key}.q.f16"

    def _n_path(self, folder: Path, key: str) -> Path:
        return folder / f"{key}.n.u8"

    def _buffer_files(self, folder: Path, key: str) -> list[tuple[Path, int]]:
        """(path, size in bytes) of the case's q and n buffers in ``folder``."""
        n = int(np.prod(self.case_shapes[key]))
        return [(self._q_path(folder, key), n * self.channels * 2), (self._n_path(folder, key), n)]

    def exclude(self, key: str, mask: np.ndarray | None, write: bool = True) -> None:
        """Never update the voxels of case ``key`` where ``mask`` is true (ignore label).
        ``write=False`` (other DDP ranks): only remember that rank 0 wrote the mask."""
        self.flush()
        path = self.excluded_dir / f"{key}.bits"
        count = 0 if mask is None else int(mask.sum())
        self.total_voxels -= count - self._excluded_counts.get(key, 0)  # visited fraction: of the countable voxels
        self._excluded_counts[key] = count
        if not write:
            return
        if not count:
            path.unlink(missing_ok=True)
            return
        self.excluded_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        np.packbits(mask.reshape(-1).astype(bool)).tofile(tmp)
        os.replace(tmp, path)

    def is_excluded(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Boolean (N,): which of the flat source indices are excluded."""
        if not self._excluded_counts.get(key):
            return torch.zeros(index.shape, dtype=torch.bool)
        bits = np.memmap(self.excluded_dir / f"{key}.bits", dtype=np.uint8, mode="r")
        where = index.numpy()
        hit = (bits[where >> 3] >> (7 - (where & 7))) & 1
        del bits
        return torch.from_numpy(hit.astype(bool))

    def manifest(self, epoch: int | None, extra: dict | None = None) -> dict:
        return {"epoch": epoch, "identity": self.identity, "channels": self.channels,
                "cases": {k: list(v) for k, v in self.case_shapes.items()}, "visited_voxels": self.visited_voxels,
                "extra": extra or {}}

    def reset(self) -> None:
        """Fresh, empty buffers (zeros; their disk blocks reserved up front)."""
        self.flush()
        tmp = self.root / "live.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for key in self.case_shapes:
            for path, size in self._buffer_files(tmp, key):
                with open(path, "wb") as f:
                    f.truncate(size)
                    if size:  # reserve the blocks now: a full disk fails here, not as SIGBUS in a mapped write
                        _reserve(f.fileno(), size)
        self.visited_voxels = 0
        write_json_atomic(tmp / MANIFEST, self.manifest(None))
        self._swap_in(tmp)

    def _swap_in(self, folder: Path) -> None:
        old = self.root / "live.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.live.exists():
            os.replace(self.live, old)
        os.replace(folder, self.live)
        _fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def _open(self, key: str) -> tuple[np.memmap, np.memmap]:
        n = int(np.prod(self.case_shapes[key]))
        q = np.memmap(self._q_path(self.live, key), dtype=np.float16, mode="r+", shape=(n, self.channels))
        c = np.memmap(self._n_path(self.live, key), dtype=np.uint8, mode="r+", shape=(n,))
        return q, c

    # ---------------------------------------------------------- update / read
    def update(self, key: str, index: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold one patch's softmax into the case's buffers.

        ``index``: flat source-voxel index of each valid patch voxel (N,); ``probs``: (N, K)
        softmax; ``labels``: (N,) annotated label of those patch voxels (for the statistics).
        Patch voxels mapping to the same source voxel are averaged first (scatter-mean).
        """
        if index.numel():
            self.apply(key, scatter_patch(index, probs, labels, self.channels).to("cpu"))

    def apply(self, key: str, patch: "PatchUpdate") -> None:
        """Fold a scattered patch (host tensors) into the case's buffers: q <- (1 - w) q + w mean,
        w = max(1 / (n + 1), ema_min_weight), n <- min(n + 1, 255), and add its statistics (each
        source voxel counted once per patch voxel that mapped to it, with its label)."""
        if self._excluded_counts.get(key):
            patch = patch.select(~self.is_excluded(key, patch.index))
        if patch.index.numel() == 0:
            return
        if not torch.isfinite(patch.mean).all():  # a non-finite softmax makes its source voxel's mean non-finite
            with self._stats_lock:
                self.stats.skipped_nonfinite += 1
            return
        where, mean = patch.index.numpy(), patch.mean.float().numpy()
        q, c = self._open(key)
        try:
            old_q = q[where].astype(np.float32)
            old_n = c[where]
            weight = np.maximum(np.float32(1) / (old_n.astype(np.float32) + 1), np.float32(self.ema_min_weight))[:, None]
            new_q = old_q + weight * (mean - old_q)
            q[where] = new_q.astype(np.float16)
            c[where] = np.minimum(old_n.astype(np.int16) + 1, MAX_COUNT).astype(np.uint8)
        finally:
            del q, c
        part = EpochStats(self.num_classes, newly_visited=int((old_n == 0).sum()))
        part.add(new_q, patch.labels.numpy(), patch.hits.numpy())
        with self._stats_lock:
            self.stats.merge(part)

    def apply_batch(self, patches: list[tuple[str, "PatchUpdate"]]) -> None:
        """``apply`` for a batch's patches: in order within a case, cases side by side on the
        writer's thread pool (numpy's buffer gathers and scatters release the GIL), so a batch of
        B cases costs about one case's time where cores are free."""
        groups: dict[str, list[PatchUpdate]] = {}
        for key, patch in patches:
            groups.setdefault(key, []).append(patch)

        def run(key: str) -> None:
            for patch in groups[key]:
                self.apply(key, patch)

        if self._pool is None or len(groups) < 2:
            for key in groups:
                run(key)
            return
        for future in [self._pool.submit(run, key) for key in groups]:
            future.result()  # raises the first failure: the writer hands it to the training process

    def read(self, key: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q as (N, channels) float32, visit counts (N,)) at the given flat source indices."""
        q, c = self._open(key)
        try:
            where = index.numpy()
            return torch.from_numpy(q[where].astype(np.float32)), torch.from_numpy(c[where].astype(np.int64))
        finally:
            del q, c

    def case_arrays(self, key: str, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Whole-case (q, n) as in-RAM arrays shaped like the case (for pictures, audits, tests)."""
        self.flush()
        folder = folder or self.live
        shape = self.case_shapes[key]
        q = np.fromfile(self._q_path(folder, key), dtype=np.float16).reshape(*shape, self.channels)
        n = np.fromfile(self._n_path(folder, key), dtype=np.uint8).reshape(shape)
        return q, n

    def finish_epoch(self, ddp: bool = False) -> tuple[float, list[float], int, np.ndarray]:
        """Close the epoch's statistics: (fraction of voxels visited so far, mean label confidence
        per class over this epoch's updated voxels, patches skipped for non-finite output,
        per-class histogram of the loss signal l = -log q[y] of those voxels, shape (K, bins)).

        Under DDP the sums are all-reduced first, so every rank reports the same global figures.
        """
        self.flush()
        stats, self.stats = self.stats, EpochStats(self.num_classes)
        k = self.num_classes
        packed = torch.tensor(np.concatenate([[stats.newly_visited, stats.skipped_nonfinite], stats.conf_sum,
                                              stats.conf_cnt, stats.loss_hist.ravel()]), dtype=torch.float64)
        if ddp:
            torch.distributed.all_reduce(packed)
        sums, counts = packed[2:2 + k], packed[2 + k:2 + 2 * k]
        self.visited_voxels += int(packed[0])
        self.epoch_visits = float(counts.sum()) / max(self.total_voxels, 1)
        confidence = [float(s / c) if c > 0 else float("nan") for s, c in zip(sums, counts)]
        hist = packed[2 + 2 * k:].numpy().reshape(k, N_BINS)
        return self.visited_voxels / max(self.total_voxels, 1), confidence, int(packed[1]), hist

    # ----------------------------------------------------------- persistence
    def snapshot_dir(self, epoch: int) -> Path:
        return self.root / f"snapshot_epoch_{epoch:04d}"

    def snapshot(self, epoch: int, extra: dict | None = None, same_as: int | None = None) -> Path:
        """Copy the live buffers to the snapshot for ``epoch`` (atomic: tmp folder + rename).

        Within one process, a second call for the same epoch (nnU-Net may write checkpoint_best
        and checkpoint_latest in one epoch) reuses the copy. A snapshot left by an earlier process
        with the same stamp (a run resumed from an older checkpoint) is replaced.

        ``same_as``: the epoch of a snapshot whose buffer bytes the caller KNOWS equal the live ones
        (the memory has not been updated since it was taken or restored, e.g. after the memory
        horizon). Its files are hard-linked instead of copied, with their recorded checksums: no
        copy, no extra disk. Snapshot files are never written after creation, so sharing them is
        safe, and deleting (pruning) either name leaves the other intact. Files that snapshot no
        longer has are copied.
        """
        self.flush()  # a snapshot holds every update submitted before it
        target = self.snapshot_dir(epoch)
        self.snapshot_linked = 0  # files of this snapshot that are hard links (the rest were copied)
        if self._snapshot_written == epoch and target.exists():
            return target
        tmp = self.root / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        linked = self._linkable(same_as) if same_as is not None and same_as != epoch else {}
        checksums = {}
        for key in self.case_shapes:
            for path, _ in self._buffer_files(self.live, key):
                if path.name in linked and _hard_link(self.snapshot_dir(same_as) / path.name, tmp / path.name):
                    checksums[path.name] = linked[path.name]
                    self.snapshot_linked += 1
                else:
                    checksums[path.name] = copy_with_crc(path, tmp / path.name)
        write_json_atomic(tmp / MANIFEST, {**self.manifest(epoch, extra), "crc32": checksums})
        _fsync_dir(tmp)
        stale = self.root / f".{target.name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            os.replace(target, stale)
        os.replace(tmp, target)
        _fsync_dir(self.root)
        shutil.rmtree(stale, ignore_errors=True)
        self._snapshot_written = epoch
        return target

    def _linkable(self, epoch: int) -> dict[str, int]:
        """File name -> CRC-32 of the complete snapshot ``epoch`` with the right sizes; {} if none."""
        folder = self.snapshot_dir(epoch)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
        if manifest.get("epoch") != epoch or manifest.get("identity") != self.identity or "crc32" not in manifest:
            return {}
        sizes = {path.name: size for key in self.case_shapes for path, size in self._buffer_files(folder, key)}
        return {name: crc for name, crc in manifest["crc32"].items()
                if name in sizes and (folder / name).is_file() and (folder / name).stat().st_size == sizes[name]}

    def restore(self, epoch: int, checkpoint_name: str) -> dict:
        """Make the snapshot stamped ``epoch`` the live buffers; refuse anything that does not match.
        Returns the ``extra`` state stored with the snapshot (mixtures, feature statistics)."""
        self.flush()
        source = self.snapshot_dir(epoch)
        manifest_file = source / MANIFEST
        if not manifest_file.is_file():
            found = sorted(p.name for p in self.root.glob("snapshot_epoch_*")) if self.root.exists() else []
            raise MemoryMismatchError(
                f"{checkpoint_name} is from epoch {epoch}, but {self.root} has no DALE buffers stamped with that "
                f"epoch (found: {', '.join(found) or 'none'}). The checkpoint and the buffers do not belong together: "
                "restore the fold folder as a whole, or start this fold again without --c.")
        manifest = json.loads(manifest_file.read_text())
        problems = []
        if manifest.get("epoch") != epoch:
            problems.append(f"epoch stamp {manifest.get('epoch')} != checkpoint epoch {epoch}")
        if manifest.get("identity") != self.identity:
            problems.append(f"buffers belong to {manifest.get('identity')}, this run is {self.identity}")
        if manifest.get("cases") != {k: list(v) for k, v in self.case_shapes.items()}:
            problems.append("the training cases or their shapes changed since the buffers were written")
        if manifest.get("channels") != self.channels:
            problems.append(f"{manifest.get('channels')} buffer channels, this run needs {self.channels}")
        if problems:
            raise MemoryMismatchError(f"refusing the DALE buffers in {source} for {checkpoint_name}: "
                                      + "; ".join(problems) + ". Start this fold again without --c, or use the "
                                      "dataset/plans/fold the buffers were made for.")
        tmp = self.root / "live.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if "crc32" not in manifest:  # written by nnunetv2-dale 0.1.0: no checksums to verify
            shutil.copytree(source, tmp)
        else:
            tmp.mkdir(parents=True)
            for key in self.case_shapes:
                for path, size in self._buffer_files(source, key):
                    crc = manifest["crc32"].get(path.name)
                    if crc is None or not path.is_file() or path.stat().st_size != size \
                            or copy_with_crc(path, tmp / path.name) != crc:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise MemoryMismatchError(
                            f"the DALE buffer file {path} is damaged (missing, wrong size or checksum mismatch); it "
                            "is not used. Restore the fold folder from a backup, or start this fold again without --c.")
            shutil.copyfile(manifest_file, tmp / MANIFEST)
        self._swap_in(tmp)
        self.visited_voxels = int(manifest.get("visited_voxels", 0))
        return manifest.get("extra", {})

    def prune(self, keep_epochs: set[int]) -> None:
        """Delete snapshots whose epoch no existing checkpoint refers to (and stale temporaries)."""
        for path in self.root.glob("snapshot_epoch_*"):
            if int(path.name.rsplit("_", 1)[1]) not in keep_epochs:
                shutil.rmtree(path, ignore_errors=True)
        for path in [*self.root.glob(".snapshot_epoch_*.tmp"), *self.root.glob(".snapshot_epoch_*.stale")]:
            shutil.rmtree(path, ignore_errors=True)
