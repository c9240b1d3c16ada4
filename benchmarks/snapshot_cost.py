"""Cost of DALE's buffer snapshots (written with every checkpoint): full copy vs the hard-linked
snapshot used once the memory is frozen (after ``dale_memory_horizon``).

    python benchmarks/snapshot_cost.py [--gib 0.5 2 4] [--cases 200] [--folder /tmp/dale_snapshot_cost]

For each total buffer size: seconds for a copying snapshot and for a linked one (same buffers),
and the extra disk blocks each takes (``st_blocks`` of the new snapshot's files that no other
name shares). Files are real ConfidenceMemory buffers filled with random bytes (the copy reads and
checksums every byte, so content does not matter). Caches are not dropped: a cold cache makes
the copy slower, never the link.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np


def own_blocks(snapshot: Path) -> int:
    """Bytes of disk blocks held by files of ``snapshot`` that no other name shares."""
    return sum(os.stat(f).st_blocks * 512 for f in snapshot.iterdir() if os.stat(f).st_nlink == 1)


def measure(gib: float, cases: int, folder: Path) -> tuple[float, float, int, int]:
    """(copy seconds, linked seconds, extra disk bytes of the copy, of the linked snapshot) for
    ``gib`` of binary buffers in ``cases`` cases, built in ``folder`` and removed afterwards."""
    from nnunetv2_dale.method.memory import ConfidenceMemory

    shutil.rmtree(folder, ignore_errors=True)
    try:
        voxels = int(gib * 2 ** 30 / 3 / cases)  # binary task: 3 bytes per voxel
        shapes = {f"case_{i:04d}": (1, voxels) for i in range(cases)}
        mem = ConfidenceMemory(folder, shapes, 2, {"dataset": "bench"})
        mem.reset()
        rng = np.random.default_rng(0)
        for key in shapes:
            for path, size in mem._buffer_files(mem.live, key):
                path.write_bytes(rng.integers(0, 255, size, dtype=np.uint8).tobytes())
        t0 = time.perf_counter()
        mem.snapshot(1)
        copy_s = time.perf_counter() - t0
        copy_disk = own_blocks(mem.snapshot_dir(1))  # before the link shares its files
        t0 = time.perf_counter()
        mem.snapshot(2, same_as=1)
        link_s = time.perf_counter() - t0
        assert mem.snapshot_linked == 2 * cases
        return copy_s, link_s, copy_disk, own_blocks(mem.snapshot_dir(2))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.0, 4.0])
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--folder", default="/tmp/dale_snapshot_cost")
    args = p.parse_args()
    print("| buffers (GiB) | cases | copy snapshot (s) | linked snapshot (s) | extra disk copy (GiB) | extra disk linked (MiB) |")
    print("|---|---|---|---|---|---|")
    for gib in args.gib:
        copy_s, link_s, copy_disk, link_disk = measure(gib, args.cases, Path(args.folder))
        print(f"| {gib:g} | {args.cases} | {copy_s:.2f} | {link_s:.3f} | {copy_disk / 2 ** 30:.2f} "
              f"| {link_disk / 2 ** 20:.2f} |", flush=True)


if __name__ == "__main__":
    main()
