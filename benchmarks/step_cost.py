"""DALE's per-iteration work beside the network at nnU-Net's real 3d batch shape (issue 28's CPU
split): the loss forward and backward of nnU-Net (Dice+CE with deep supervision) against DALE's
stable and fuzzy steps (R-set maps from the workers' buffer values, weighted loss, alignment moments
and their gradient), on fixed network outputs and decoder features, so the network's own step is
left out. ``rset_maps`` is also timed alone. On a CPU all of it is host time.

    python benchmarks/step_cost.py [--shape 3d] [--iters 3] [--threads 2] [--json benchmarks/step_cost.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import memory_cost  # noqa: E402  (the trainer on bare buffers and the batches of the real shapes)

SHAPES = {"3d": "3d_fullres 2x128^3 binary", "tiny": "tiny 3d (smoke test)"}
FEATURES = 32  # channels of nnU-Net's last decoder stage (3d_fullres)


def measure(name: str, iters: int, workdir: Path) -> dict:
    from nnunetv2_dale.method.alignment import FeatureAlignment
    from nnunetv2_dale.method.loss import DALELoss
    from nnunetv2_dale.method.sampling import SAMPLING_FILE, PatchReader
    from nnunetv2_dale.method.schedule import FUZZY, STABLE

    case, batch, patch, classes = memory_cost.SHAPES[name]
    t = memory_cost.make_trainer(workdir, case, batch, classes, True, torch.device("cpu"))
    shapes = [tuple(max(n // 2 ** i, 1) for n in patch) for i in range(5)]  # nnU-Net's deep supervision
    ds = [1 / 2 ** i for i in range(len(shapes))]
    ds[-1] = 0
    t.loss = DALELoss(False, None, False, [w / sum(ds) for w in ds])
    t.alignment = FeatureAlignment(classes, standardise=True)
    t.dale_noise_gate, t.is_ddp, t.current_epoch, t.num_epochs = False, False, 5, 10
    t.warmup_end = lambda: 1
    (workdir / SAMPLING_FILE).write_text(json.dumps({"phase": "stable", "channels": t.memory.channels}))
    reader = PatchReader(workdir)
    b, _ = memory_cost.make_batch(case, batch, patch, classes, 0)
    q, visits = reader.batch_arrays(batch, math.prod(patch))
    for j, key in enumerate(b["keys"]):
        reader.read(key, b["regression_target"][j], case, q[j].numpy(), visits[j].numpy())
    visits.fill_(5)  # every voxel known: the whole map is computed
    b["dale_q"], b["dale_visits"] = q, visits
    full = b["target"][0]
    targets = [full] + [torch.nn.functional.interpolate(full, s, mode="nearest-exact") for s in shapes[1:]]
    b["target"] = targets
    g = torch.Generator().manual_seed(1)
    outputs = [torch.randn(batch, classes, *s, generator=g).requires_grad_() for s in shapes]
    features = torch.randn(batch, FEATURES, *patch, generator=g).requires_grad_()
    t.alignment.update_reliable(features.detach(), torch.rand(batch, classes, *patch, generator=g))

    def nnunet() -> None:
        t.loss(outputs, targets).backward()

    def dale(phase: str) -> None:
        t.alignment.features = features
        t.dale_loss(b, outputs, targets, phase)[0].backward()

    def timed(fn) -> float:
        times = []
        for _ in range(iters + 1):
            for x in outputs + [features]:
                x.grad = None
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times[1:])  # the first call allocates

    out = {"nnunet_loss_ms": timed(nnunet), "rset_maps_ms": timed(lambda: t.rset_maps(b)),
           "dale_stable_ms": timed(lambda: dale(STABLE)), "dale_fuzzy_ms": timed(lambda: dale(FUZZY))}
    out["extra_stable_ms"] = out["dale_stable_ms"] - out["nnunet_loss_ms"]
    out["extra_fuzzy_ms"] = out["dale_fuzzy_ms"] - out["nnunet_loss_ms"]
    t.memory.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="3d")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(SHAPES[args.shape], args.iters, Path(tmp))
    print(f"{SHAPES[args.shape]}, {args.threads} threads: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": r}, indent=1))


if __name__ == "__main__":
    main()
