"""DALE's per-iteration work beside the network at nnU-Net's real 3d batch shape (issue 28's
split): the loss forward and backward of nnU-Net (Dice+CE with deep supervision) against DALE's
stable and fuzzy steps with the noise gate open (R-set maps from the workers' buffer values,
weighted loss, alignment moments and their gradient), on fixed network outputs and decoder
features, so the network's own step is left out. ``rset_maps`` is also timed alone, with every map
(``rset_maps_ms``) and with a stable phase's (``rset_maps_stable_ms``). Two floors put the figures
in scale: ``pass_ms``, one element-wise pass over a (B, 1, *patch) float map (DALE's per-voxel maps
are this size; on a CPU it fits the last-level cache, so it is a lower bound), and
``feature_grad_ms``, writing one new tensor the size of the decoder features (the alignment's
gradient must be one; on a CPU each such allocation pays its page faults, as every activation of
the network does). On a CPU all of it is host time; with ``--device cuda`` the
outputs and features are float16 and the steps run under autocast, timed with synchronisation.

    python benchmarks/step_cost.py [--shape 3d] [--iters 3] [--threads 2] [--device cpu] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
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


def measure(name: str, iters: int, workdir: Path, device: torch.device) -> dict:
    from nnunetv2_dale.method.alignment import FeatureAlignment
    from nnunetv2_dale.method.loss import DALELoss
    from nnunetv2_dale.method.sampling import SAMPLING_FILE, PatchReader
    from nnunetv2_dale.method.schedule import FUZZY, STABLE

    case, batch, patch, classes = memory_cost.SHAPES[name]
    t = memory_cost.make_trainer(workdir, case, batch, classes, True, device)
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
    b["target"] = targets  # on the host, as the loader gives them (train_step moves them)
    targets = [x.to(device) for x in targets]
    g = torch.Generator().manual_seed(1)
    half = torch.float16 if device.type == "cuda" else torch.float32  # nnU-Net's autocast on a GPU
    outputs = [torch.randn(batch, classes, *s, generator=g).to(device, half).requires_grad_() for s in shapes]
    features = torch.randn(batch, FEATURES, *patch, generator=g).to(device, half).requires_grad_()
    t.alignment.update_reliable(features.detach(), torch.rand(batch, classes, *patch, generator=g).to(device))
    autocast = torch.autocast("cuda") if device.type == "cuda" else contextlib.nullcontext()

    def nnunet() -> None:
        with autocast:
            loss = t.loss(outputs, targets)
        loss.backward()

    def dale(phase: str) -> None:
        t.alignment.features = features
        with autocast:
            loss = t.dale_loss(b, outputs, targets, phase)[0]
        loss.backward()

    def timed(fn) -> float:
        times = []
        for _ in range(iters + 1):
            for x in outputs + [features]:
                x.grad = None
            memory_cost.sync(device)
            t0 = time.perf_counter()
            fn()
            memory_cost.sync(device)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times[1:])  # the first call allocates

    one = torch.rand(batch, 1, *patch, generator=g).to(device)
    into = torch.empty_like(one)
    out = {"nnunet_loss_ms": timed(nnunet), "rset_maps_ms": timed(lambda: t.rset_maps(b)),
           "rset_maps_stable_ms": timed(lambda: t.rset_maps(b, STABLE)),
           "dale_stable_ms": timed(lambda: dale(STABLE)), "dale_fuzzy_ms": timed(lambda: dale(FUZZY)),
           "pass_ms": timed(lambda: torch.mul(one, 2, out=into)),
           "feature_grad_ms": timed(lambda: torch.empty_like(features).fill_(1))}
    out["extra_stable_ms"] = out["dale_stable_ms"] - out["nnunet_loss_ms"]
    out["extra_fuzzy_ms"] = out["dale_fuzzy_ms"] - out["nnunet_loss_ms"]
    t.memory.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="3d")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(SHAPES[args.shape], args.iters, Path(tmp), torch.device(args.device))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"{SHAPES[args.shape]}, {where}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": r}, indent=1))


if __name__ == "__main__":
    main()
