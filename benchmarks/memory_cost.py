"""DALE's host time on the training loop's critical path at nnU-Net's real batch shapes (issue 15).

Calls the trainer's own ``update_memory`` and ``rset_maps`` on synthetic batches of the real shapes
(coordinate maps of a rotated and scaled crop, so that source voxels repeat as under nnU-Net's
spatial augmentation) over memory-mapped buffers of real case sizes, and reports per iteration,
before (everything in the training process, as up to nnunetv2-dale 0.2) and after (background
writer, buffer reads in the loader's workers):
- ``before_update_ms`` / ``before_gather_ms``: the update, and the buffer gathers of ``rset_maps``,
  in the training process; ``before_host_ms`` their sum;
- ``host_ms`` (after): what the training process waits for the deferred update (the hand-over,
  and back pressure when the writer cannot keep up), with ``--step-ms`` of simulated
  forward/backward between iterations; the gathers are gone from the training process;
- ``writer_ms``: the writer thread's own time per batch, overlapping the step;
- ``worker_read_ms``: the reads the loader's workers add per batch (``PatchReader``);
- ``device_ms``: ``rset_maps`` with the worker's values (transfers + per-voxel math on
  ``--device``; on a CPU device that is host time too).

    python benchmarks/memory_cost.py [--iters 8] [--step-ms 150] [--json benchmarks/memory_cost.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from nnunetv2_dale.method.sampling import SAMPLING_FILE, PatchReader

SHAPES = {  # name: (case shape, batch size, patch, classes)
    "3d_fullres 2x128^3 binary": ((160, 256, 256), 2, (128, 128, 128), 2),
    "3d_fullres 2x128^3 4 classes": ((160, 256, 256), 2, (128, 128, 128), 4),
    "2d 12x512^2 binary": ((24, 640, 640), 12, (1, 512, 512), 2),
    "tiny 3d (smoke test)": ((16, 40, 40), 2, (8, 16, 16), 2),
}


def patch_spec(case: tuple[int, ...], patch: tuple[int, ...], seed: int):
    """The geometry of a crop rotated by ~0.3 rad in-plane and zoomed by 1.1, centred in the case
    (a random slice in 2D), as nnU-Net's training loader now delivers it (``geometry.PatchSpec``)."""
    from nnunetv2_dale.method.geometry import CropSpec, PatchSpec

    g = torch.Generator().manual_seed(seed)
    a = 0.3 * (2 * torch.rand((), generator=g).item() - 1)
    rot = [[1.0, 0.0, 0.0], [0.0, math.cos(a) / 1.1, -math.sin(a) / 1.1], [0.0, math.sin(a) / 1.1, math.cos(a) / 1.1]]
    centre = [(c - 1) / 2 for c in case]
    if patch[0] == 1:  # 2D: a random slice
        plane = CropSpec(((0, case[1]), (0, case[2])), tuple(case[1:]))
        return PatchSpec(plane, tuple(patch[1:]), tuple(tuple(r[1:]) for r in rot[1:]), tuple(centre[1:]),
                         slice_index=float(torch.randint(case[0], (), generator=g)))
    rot[0][0] = 1 / 1.1
    return PatchSpec(CropSpec(tuple((0, n) for n in case), tuple(case)), tuple(patch), tuple(map(tuple, rot)),
                     tuple(centre))


def make_trainer(folder: Path, case: tuple[int, ...], batch: int, classes: int, background: bool,
                 device: torch.device):
    """The DALE trainer's memory methods on a bare instance (no network, plans or data loaders)."""
    from nnunetv2_dale.method.memory import ConfidenceMemory
    from nnunetv2_dale.method.rsets import Mixture
    from nnunetv2_dale.method.trainer import nnUNetTrainerDALE

    t = object.__new__(nnUNetTrainerDALE)
    t.device = device
    t.label_manager = SimpleNamespace(all_labels=list(range(classes)), ignore_label=None)
    t.memory = ConfidenceMemory(folder, {f"case{i}": case for i in range(batch)}, classes, {"bench": 1},
                                background=background)
    t.memory.reset()
    t.mixtures = [Mixture(weights=(0.9, 0.1), means=(0.1, 2.0), stds=(0.3, 0.3), fitted=True)] * classes
    t.set_dale_hyperparameters()  # the defaults of nnUNetTrainerDALE
    t.current_epoch, t.num_epochs, t.dale_memory_horizon, t._curve_horizon = 0, 1000, 1.0, None
    t.dale_horizon_from_curve, t.dale_min_visits = False, 1
    return t


def make_batch(case, batch, patch, classes, seed) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coords = [patch_spec(case, patch, seed * 100 + b) for b in range(batch)]
    shape = patch[1:] if patch[0] == 1 else patch
    target = torch.randint(0, classes, (batch, 1, *shape), generator=g).float()
    logits = torch.randn((batch, classes, *shape), generator=g)
    return {"keys": [f"case{b}" for b in range(batch)], "regression_target": coords,
            "case_shapes": [case] * batch, "target": [target]}, logits


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, iters: int, step_ms: float, workdir: Path, device: torch.device) -> dict:
    case, batch, patch, classes = SHAPES[name]
    out = {}
    for after in (False, True):  # before: everything in the training process; after: writer + worker reads
        folder = workdir / f"{name.replace(' ', '_')}_{after}"
        trainer = make_trainer(folder, case, batch, classes, after, device)
        reader = None
        if after:
            (folder / SAMPLING_FILE).write_text(json.dumps({"phase": "stable", "channels": trainer.memory.channels}))
            reader = PatchReader(folder)
        wait, maps, writer, gathers, worker, applied = [], [], [], [], [], []
        defer, read = trainer.memory.defer, trainer.memory.read
        memory = trainer.memory
        if hasattr(memory, "apply_batch"):  # the writer's host part, the part a GPU run keeps on the host
            def timed_apply_batch(patches, _apply=memory.apply_batch):
                t0 = time.perf_counter()
                _apply(patches)
                applied.append(time.perf_counter() - t0)
            memory.apply_batch = timed_apply_batch
        else:  # code before apply_batch: one apply per patch, in sequence (summed per batch below)
            def timed_apply(key, patch, _apply=memory.apply):
                t0 = time.perf_counter()
                _apply(key, patch)
                applied.append(time.perf_counter() - t0)
            memory.apply = timed_apply

        def timed_defer(job, _defer=defer):  # the writer's own time per batch (in the thread when deferred)
            def run():
                t0 = time.perf_counter()
                job()
                writer.append(time.perf_counter() - t0)
            _defer(run)

        def timed_read(*args, _read=read):  # the host's buffer gathers inside rset_maps
            t0 = time.perf_counter()
            out = _read(*args)
            gathers.append(time.perf_counter() - t0)
            return out
        trainer.memory.defer, trainer.memory.read = timed_defer, timed_read
        for i in range(iters + 1):
            b, logits = make_batch(case, batch, patch, classes, i)
            logits = logits.to(device)
            if reader is not None:  # what the loader's workers add to the batch (off the critical path)
                t0 = time.perf_counter()
                q_arr, v_arr = reader.batch_arrays(len(b["keys"]), math.prod(patch))
                for j, k in enumerate(b["keys"]):
                    if not reader.read(k, b["regression_target"][j], case, q_arr[j].numpy(), v_arr[j].numpy()):
                        raise RuntimeError(f"the worker read of {k} failed")
                b["dale_q"], b["dale_visits"] = q_arr, v_arr
                if i:
                    worker.append(time.perf_counter() - t0)
            sync(device)
            t0 = time.perf_counter()
            trainer.rset_maps(b)
            sync(device)
            t1 = time.perf_counter()
            trainer.update_memory(b, logits)
            sync(device)
            t2 = time.perf_counter()
            time.sleep(step_ms / 1000)  # the forward/backward of the next step (waits on the GPU)
            if i:  # the first iteration opens files and warms caches
                maps.append(t1 - t0)
                wait.append(t2 - t1)
        trainer.memory.close()
        if not after:
            out["before_update_ms"] = 1000 * statistics.median(wait)
            out["before_gather_ms"] = 1000 * sum(gathers[batch:]) / iters
            out["before_rset_maps_ms"] = 1000 * statistics.median(maps)
        else:
            out["update_wait_ms"] = 1000 * statistics.median(wait)
            out["writer_ms"] = 1000 * statistics.median(writer[1:])
            per_batch = len(applied) // (iters + 1)  # 1 (apply_batch) or one per patch
            sums = [sum(applied[i:i + per_batch]) for i in range(0, len(applied), per_batch)]
            out["apply_ms"] = 1000 * statistics.median(sums[1:])
            out["worker_read_ms"] = 1000 * statistics.median(worker)
            out["device_ms"] = 1000 * statistics.median(maps)  # rset_maps: transfers + math on --device
    out["before_host_ms"] = out["before_update_ms"] + out["before_gather_ms"]
    out["host_ms"] = out["update_wait_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--step-ms", type=float, default=150.0, help="simulated GPU forward/backward per iteration")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES)[:3], choices=list(SHAPES))
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the network's outputs and DALE's math live")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            results[name] = measure(name, args.iters, args.step_ms, Path(tmp), torch.device(args.device))
            r = results[name]
            print(f"{name:30s} before: update {r['before_update_ms']:6.0f} ms + gathers {r['before_gather_ms']:4.0f} ms"
                  f" = host {r['before_host_ms']:6.0f} ms | after: host {r['host_ms']:5.1f} ms (writer "
                  f"{r['writer_ms']:5.0f} ms, of which host apply {r['apply_ms']:5.0f} ms, worker reads {r['worker_read_ms']:4.0f} ms) | device math "
                  f"{r['device_ms']:5.0f} ms (before {r['before_rset_maps_ms'] - r['before_gather_ms']:5.0f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps({"step_ms": args.step_ms, "iters": args.iters, "torch_threads": 1,
                                               "device": args.device,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
