"""Issue 15's cost figures per batch shape in one JSON file: ``host_ms``, ``device_ms``,
``loader_ratio`` and ``epoch_extras_s``.

    python benchmarks/cost_summary.py --json benchmarks/cost_summary.json

``host_ms`` / ``device_ms`` come from ``memory_cost.json`` (``benchmarks/memory_cost.py``: the
training process's own wait per iteration, and the per-voxel math of the memory on the training
device) and ``loader_ratio`` from ``loader_cost.json`` (``benchmarks/loader_cost.py``: DALE's
training loader in the epochs where the workers read the buffers, batches per second against
nnU-Net's, same workers). Both are read, not re-measured: run those scripts first.

``epoch_extras_s`` is measured here: the progress picture (DALE's minus nnU-Net's, each drawn
with ``--epochs`` of logged values, interleaved, median of 3) plus the buffer snapshots averaged
over a run of ``--epochs`` epochs at nnU-Net's checkpoint cadence, for ``--buffers-gib`` of
buffers. A snapshot copies every buffer until the memory freezes and hard-links the frozen files
afterwards; before the first checkpoint_latest (epoch 50) nnU-Net may write checkpoint_best every
epoch, later checkpoint_best gets no snapshot (docs/method.md 1). So a run whose memory freezes at
epoch h copies at most min(h, 50) + (number of checkpoint_latest epochs before h) times and links
at every other checkpoint (at most one per epoch, counted as one per epoch). The seconds per copied
GiB are measured with a real ``ConfidenceMemory`` snapshot of ``--measure-gib`` (disk-bound: the
copy reads, checksums and writes every byte; scaled linearly, as benchmarks/snapshot_cost.md
measured from 2 to 4 GiB).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from progress_plot_cost import time_plots  # this folder's scripts (run as python benchmarks/...)
from snapshot_cost import measure

HERE = Path(__file__).parent
SHAPES = {  # this file's shape -> (memory_cost.json key, loader_cost.json key)
    "3d_fullres 2x128^3 binary": ("3d_fullres 2x128^3 binary", "3d_fullres 2x128^3"),
    "3d_fullres 2x128^3 4 classes": ("3d_fullres 2x128^3 4 classes", "3d_fullres 2x128^3"),
    "2d 12x512^2 binary": ("2d 12x512^2 binary", "2d 12x512^2"),
}
LATEST_EVERY = 50  # nnU-Net's save_every


def copies_before_freeze(freeze_epoch: int, epochs: int) -> int:
    """Copying snapshots in a run whose memory freezes at ``freeze_epoch`` (see the docstring)."""
    h = min(freeze_epoch, epochs)
    return min(h, LATEST_EVERY) + sum(1 for e in range(LATEST_EVERY, h, LATEST_EVERY))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--epochs", type=int, default=1000, help="epochs of the run (nnU-Net: 1000)")
    p.add_argument("--buffers-gib", type=float, default=10.0)
    p.add_argument("--measure-gib", type=float, default=1.0, help="buffer size of the snapshot measurement")
    p.add_argument("--freeze-epochs", type=int, nargs="+", default=[10, 50, 300],
                   help="memory freeze epochs to report: the first is the summary's (the curve horizon "
                        "fired at epochs 4-8 on ddti-fast), 300 is the fixed 30 %% bound")
    p.add_argument("--extras-from", help="take the picture and snapshot timings from this earlier summary "
                                          "instead of measuring them (re-tabulates new memory/loader figures)")
    args = p.parse_args()

    memory = json.loads((HERE / "memory_cost.json").read_text())
    loader = json.loads((HERE / "loader_cost.json").read_text())["results"]
    if args.extras_from:
        earlier = json.loads(Path(args.extras_from).read_text())
        nnunet_png, dale_png = earlier["progress_png_s"]["nnU-Net"], earlier["progress_png_s"]["DALE"]
        copy_per_gib, link = earlier["snapshot_s"]["copy_per_gib"], earlier["snapshot_s"]["linked"]
        args.measure_gib = earlier["settings"]["measure_gib"]
    else:
        nnunet_png, dale_png = (statistics.median(t) for t in time_plots(min(args.epochs, 1000), repeats=3).values())
        copy, link, _, _ = measure(args.measure_gib, 100, Path(tempfile.mkdtemp(prefix="dale_cost_summary_")))
        copy_per_gib = copy / args.measure_gib
    extras = {}
    for h in args.freeze_epochs:
        n_copy = copies_before_freeze(h, args.epochs)
        snap = (n_copy * copy_per_gib * args.buffers_gib + (args.epochs - n_copy) * link) / args.epochs
        extras[h] = {"copies": n_copy, "snapshot_s_per_epoch": snap, "epoch_extras_s": snap + dale_png - nnunet_png}
    typical = extras[args.freeze_epochs[0]]["epoch_extras_s"]
    rows = {}
    for shape, (mem_key, loader_key) in SHAPES.items():
        m = memory["results"][mem_key]
        rows[shape] = {"host_ms": m["host_ms"], "device_ms": m["device_ms"], "device": memory["device"],
                       "loader_ratio": loader[loader_key]["loader_ratio"]["DALE (stable)"],
                       "loader_ratio_warmup": loader[loader_key]["loader_ratio"]["DALE (warm-up)"],
                       "epoch_extras_s": typical}
    summary = {"settings": vars(args), "progress_png_s": {"nnU-Net": nnunet_png, "DALE": dale_png},
               "snapshot_s": {"copy_per_gib": copy_per_gib, "linked": link}, "epoch_extras_by_freeze_epoch": extras,
               "results": rows}
    print(f"progress.png: nnU-Net {nnunet_png:.2f} s, DALE {dale_png:.2f} s ({min(args.epochs, 1000)} epochs logged); "
          f"snapshot: copy {copy_per_gib:.1f} s/GiB, linked {link:.3f} s")
    for h, e in extras.items():
        print(f"memory frozen at epoch {h}: {e['copies']} copied snapshots of {args.buffers_gib:g} GiB, "
              f"{e['snapshot_s_per_epoch']:.2f} s/epoch of snapshots, extras {e['epoch_extras_s']:.2f} s/epoch")
    print(f"\n| batch | host_ms | device_ms ({memory['device']}) | loader_ratio (reads; warm-up) | "
          f"epoch_extras_s ({args.buffers_gib:g} GiB, frozen at epoch {args.freeze_epochs[0]}) |")
    print("|---|---|---|---|---|")
    for shape, r in rows.items():
        print(f"| {shape} | {r['host_ms']:.1f} | {r['device_ms']:.0f} | {r['loader_ratio']:.2f} "
              f"({r['loader_ratio_warmup']:.2f}) | {r['epoch_extras_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
