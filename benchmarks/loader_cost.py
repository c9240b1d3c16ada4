"""Training-loader throughput: DALE's loader vs nnU-Net's, same workers, at real batch shapes (issue 15).

nnU-Net's GPU training is often bound by its augmentation workers, so what DALE adds there costs
time directly. DALE's training loader carries a coordinate map through nnU-Net's augmentation
(``CoordinateDataLoader``) and, from the first stable epoch, reads each augmented patch's buffer
values in the workers (``PatchReader``). This script builds phantom datasets with cases of the
memory benchmark's sizes, plans and preprocesses them with nnU-Net, sets nnU-Net's plans to the
real batch shapes, and times batches from each trainer's own ``get_dataloaders`` (the same
``nnUNet_n_proc_DA`` workers):

- ``nnUNetTrainer``: stock;
- ``DALE (warm-up)``: coordinate maps only;
- ``DALE (stable)``: coordinate maps + the workers' buffer reads;
- ``DALE (frozen, clean)``: the memory frozen under a shut gate (labels that look clean): the
  workers build nnU-Net's own batches.

Loaders run one at a time (each started, warmed up, timed, stopped), in rounds that alternate the
order; ``loader_ratio`` = DALE's batches per second / nnU-Net's, the median over rounds.

``--same-draws`` measures the work per batch instead of the throughput of the workers: every loader
runs in this process (``nnUNet_n_proc_DA=0``) and each timed batch starts from the same random
seeds, so all loaders crop the same cases with the same augmentations (checked: identical images)
and only DALE's own work differs. nnU-Net's augmentations are random and some are expensive
(blur, rotation), so with workers a 10-batch rate swings by tens of percent between rounds; here
the ratio is of the summed times. (DALE's fuzzy sampler is left out in this mode: with the share 0
written here it never proposes a centre, but its random draw would shift the augmentations.)

    nnUNet_n_proc_DA=2 python benchmarks/loader_cost.py [--batches 10] [--rounds 2] [--json benchmarks/loader_cost.json]
    python benchmarks/loader_cost.py --same-draws [--batches 20] [--json ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # name: (dim, case shape, configuration, patch, batch)
    "3d_fullres 2x128^3": (3, (160, 256, 256), "3d_fullres", [128, 128, 128], 2),
    "2d 12x512^2": (2, (640, 640), "2d", [512, 512], 12),
    "2d tiny (smoke test)": (2, (48, 48), "2d", [32, 32], 2),
}
LOADERS = {"nnUNetTrainer": ("nnUNetTrainer", ""), "DALE (warm-up)": ("nnUNetTrainerDALE", "warm-up"),
           "DALE (stable)": ("nnUNetTrainerDALE", "stable"),
           "DALE (frozen, clean)": ("nnUNetTrainerDALE", "frozen")}  # row: (trainer, DALE phase the workers see)


def prepare(root: Path, name: str, dataset_id: int) -> None:
    from nnunetv2_dale.data.noise import NoiseSpec
    from nnunetv2_dale.data.phantoms import make_phantom_dataset

    dim, case, configuration, _, _ = SHAPES[name]
    raw = root / "nnUNet_raw" / f"Dataset{dataset_id}_Loader{dim}d"
    make_phantom_dataset(raw, dim, max(case), 4, 1, NoiseSpec(), seed=dataset_id, shape=case)
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                    "-c", configuration, "-np", "2"], env=env, check=True, capture_output=True)


DRAWN: list[list[float]] = []  # --same-draws: per timed loader, the sum of each batch's images


def loader_rate(trainer_name: str, stage: str, dataset_id: int, name: str, batches: int, warmup: int,
                same_draws: bool = False) -> float:
    """Batches per second of one trainer's training loader (started, warmed up, timed, stopped);
    with ``same_draws`` every timed batch starts from seeds 0, 1, ... (see the module docstring)."""
    import random

    import numpy as np
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_dale.method.memory import write_json_atomic
    from nnunetv2_dale.method.sampling import SAMPLING_FILE

    _, _, configuration, patch, batch = SHAPES[name]
    trainer = get_trainer_from_args(str(dataset_id), configuration, "all", trainer_name, "nnUNetPlans",
                                    device=torch.device("cpu"))
    trainer.configuration_manager.configuration.update(patch_size=patch, batch_size=batch)
    trainer.initialize()
    if hasattr(trainer, "memory_folder"):
        trainer.memory = trainer._build_memory()
        trainer.memory.reset()
        write_json_atomic(trainer.memory_folder / SAMPLING_FILE, {
            "phase": "warmup" if stage == "warm-up" else "stable", "share": 0.0, "min_visits": 3,
            "channels": trainer.memory.channels, "mixtures": [], "reads": stage == "stable",
            "coordinates": stage != "frozen"})
    train, val = trainer.get_dataloaders()
    if same_draws and hasattr(getattr(train, "data_loader", None), "sampler"):
        train.data_loader.sampler = None
    try:
        for _ in range(warmup):
            first = next(train)
        assert tuple(first["data"].shape[2:]) == tuple(patch) and first["data"].shape[0] == batch, first["data"].shape
        assert (stage == "stable") == ("dale_q" in first), f"{trainer_name} {stage}: worker reads {'dale_q' in first}"
        assert (stage in ("warm-up", "stable")) == ("regression_target" in first), f"{trainer_name} {stage}: coordinates"
        if not same_draws:
            t0 = time.perf_counter()
            for _ in range(batches):
                next(train)
            return batches / (time.perf_counter() - t0)
        spent, sums = 0.0, []
        for i in range(batches):
            np.random.seed(i), torch.manual_seed(i), random.seed(i)
            t0 = time.perf_counter()
            got = next(train)
            spent += time.perf_counter() - t0
            sums.append(float(got["data"].double().sum()))
        DRAWN.append(sums)
        return batches / spent
    finally:
        for loader in (train, val):
            if hasattr(loader, "_finish"):
                loader._finish()
        if getattr(trainer, "memory", None) is not None:
            trainer.memory.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=10, help="timed batches per loader and round")
    p.add_argument("--warmup", type=int, default=8,
                   help="batches drawn before timing: more than the 6 that nnU-Net's training loader caches")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES)[:2], choices=list(SHAPES))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--workdir", help="keep the phantom datasets here (default: a temporary folder)")
    p.add_argument("--same-draws", action="store_true",
                   help="work per batch in this process, every loader on the same random draws")
    args = p.parse_args()
    if args.same_draws:
        os.environ["nnUNet_n_proc_DA"] = "0"  # before nnunetv2 is imported
    workers = os.environ.get("nnUNet_n_proc_DA", "default")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # before nnunetv2 is imported
            os.environ[var] = str(root / var)
            (root / var).mkdir(parents=True, exist_ok=True)
        for name in args.shapes:
            dataset_id = 970 + list(SHAPES).index(name)
            if not (root / "nnUNet_preprocessed" / f"Dataset{dataset_id}_Loader{SHAPES[name][0]}d").is_dir():
                prepare(root, name, dataset_id)
            rates: dict[str, list[float]] = {k: [] for k in LOADERS}
            for r in range(args.rounds):
                for loader in (list(LOADERS) if r % 2 == 0 else list(LOADERS)[::-1]):
                    trainer_name, stage = LOADERS[loader]
                    rates[loader].append(loader_rate(trainer_name, stage, dataset_id, name, args.batches, args.warmup,
                                                     args.same_draws))
                if args.same_draws and any(d != DRAWN[0] for d in DRAWN):  # within a round
                    raise RuntimeError("--same-draws: the loaders of one round drew different images "
                                       f"(first batch sums {[d[0] for d in DRAWN]}); the comparison is void")
                DRAWN.clear()
            base = statistics.median(rates["nnUNetTrainer"])
            results[name] = {
                "batches_per_s": {k: statistics.median(v) for k, v in rates.items()},
                "rounds": rates,
                "loader_ratio": {k: statistics.median(v) / base for k, v in rates.items() if k != "nnUNetTrainer"},
            }
            row = results[name]
            print(f"{name:20s} batches/s: " + ", ".join(f"{k} {v:.3f}" for k, v in row["batches_per_s"].items())
                  + " | loader_ratio: " + ", ".join(f"{k} {v:.2f}" for k, v in row["loader_ratio"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"nnUNet_n_proc_DA": workers, "same_draws": args.same_draws,
                                               "batches": args.batches,
                                               "rounds": args.rounds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
