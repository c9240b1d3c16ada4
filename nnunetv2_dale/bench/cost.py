"""Cost of DALE vs the nnU-Net baseline on the same batches (the cost part of the benchmark).

- median seconds per training iteration of ``nnUNetTrainer.train_step`` and
  ``nnUNetTrainerDALE.train_step`` in each DALE phase (warm-up: memory update only; stable;
  fuzzy), run interleaved in ONE process on the SAME batches, alternating the order, and ratios;
- peak RSS of a separate training process per trainer (whole process, and during training steps);
- buffer bytes per voxel on disk.

``nnUNetv2_dale_bench --cost`` runs it on the benchmark's dataset and plans; alone:
    python -m nnunetv2_dale.bench.cost --phantoms [--size 96] [--cases 40 160] [--iters 40]
    python -m nnunetv2_dale.bench.cost -d DATASET_ID [-c 2d] [-p PLANS]   (nnUNet_* variables set)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path



def prepare(workdir: Path, cases: int, size: int, dataset_id: int) -> dict[str, str]:
    from nnunetv2_dale.data.noise import NoiseSpec
    from nnunetv2_dale.data.phantoms import make_phantom_dataset

    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}  # 0 breaks preprocessing
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(workdir / name)
        (workdir / name).mkdir(parents=True, exist_ok=True)
    raw = workdir / "nnUNet_raw" / f"Dataset{dataset_id}_Bench{cases}"
    if not (workdir / "nnUNet_preprocessed" / raw.name / "nnUNetPlans_2d").is_dir():
        make_phantom_dataset(raw, 2, size, cases, 1, NoiseSpec(), seed=dataset_id)
        subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                        "-c", "2d", "-np", "2"], env=env, check=True, capture_output=True)
    return {**env, "nnUNet_n_proc_DA": "0"}


def make_trainer(name: str, dataset_id: int, configuration: str = "2d", plans: str = "nnUNetPlans"):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(dataset_id), configuration, 0, name, plans, device=torch.device("cpu"))
    trainer.on_train_start()  # initialize, data loaders (in-process), and for DALE the fresh memory
    return trainer


def timing(dataset_id: int, iters: int, warmup: int, configuration: str = "2d", plans: str = "nnUNetPlans") -> dict:
    """Interleaved train_step timings: the baseline vs DALE in each of its phases. DALE is put at
    the first epoch of each phase (warm-up = memory update only; stable; fuzzy), after one epoch of
    memory updates so that the buffers and mixtures are populated."""
    import torch

    torch.manual_seed(0)
    base = make_trainer("nnUNetTrainer", dataset_id, configuration, plans)
    torch.manual_seed(0)
    dale = make_trainer("nnUNetTrainerDALE", dataset_id, configuration, plans)
    for _ in range(iters):  # fill the memory, then fit the mixtures as at an epoch end
        dale.train_step(next(dale.dataloader_train))
    dale.on_train_epoch_end([{"loss": 0.0}])
    first = {p: next(e for e in range(dale.num_epochs) if dale.phase(e) == p) for p in ("warmup", "stable", "fuzzy")}
    times = {"nnUNetTrainer": [], **{f"nnUNetTrainerDALE ({p})": [] for p in first}}
    for i in range(warmup + iters):
        batch = next(dale.dataloader_train)  # has the coordinate maps; the baseline ignores them
        runs = [(base, "nnUNetTrainer", None)] + [(dale, f"nnUNetTrainerDALE ({p})", e) for p, e in first.items()]
        for trainer, name, epoch in (runs if i % 2 == 0 else runs[::-1]):
            if epoch is not None:
                trainer.current_epoch = epoch
            t0 = time.perf_counter()
            trainer.train_step(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    files = list(dale.memory.live.glob("*.f16")) + list(dale.memory.live.glob("*.n.u8"))
    bytes_per_voxel = sum(f.stat().st_size for f in files) / dale.memory.total_voxels
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "ratio": {k: v / med["nnUNetTrainer"] for k, v in med.items()},
            "bytes_per_voxel": bytes_per_voxel, "batch_size": dale.batch_size,
            "patch_size": list(dale.configuration_manager.patch_size), "iters": iters}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_rss(trainer_name: str, dataset_id: int, iters: int, configuration: str = "2d",
             plans: str = "nnUNetPlans") -> dict[str, float]:
    """Run ``iters`` training steps in a fresh process. Returns the process's peak RSS over its
    whole life (dominated by imports and set-up) and the peak during the training steps alone
    (Linux: VmHWM reset through /proc/self/clear_refs after set-up), in MiB."""
    trainer = make_trainer(trainer_name, dataset_id, configuration, plans)
    trainer.train_step(next(trainer.dataloader_train))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark
    for _ in range(iters):
        trainer.train_step(next(trainer.dataloader_train))
    return {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "training": _status_mib("VmHWM")}


def _child_env(env: dict[str, str]) -> dict[str, str]:
    # batches are made in the measuring process: the timing is train_step only
    return {**env, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}


def measure(dataset_id: int, configuration: str, plans: str, env: dict[str, str], iters: int = 30,
            warmup: int = 3) -> dict:
    """Timing and peak RSS in child processes (nnU-Net reads its path variables at import)."""
    def child(*extra: str) -> dict:
        cmd = [sys.executable, "-m", "nnunetv2_dale.bench.cost", "-d", str(dataset_id), "-c", configuration, "-p", plans,
               "--iters", str(iters), "--warmup", str(warmup), *extra]
        done = subprocess.run(cmd, env=_child_env(env), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cost benchmark failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    result = {"timing": child("--timing-child"), "peak_rss_mib": {}}
    for name in ("nnUNetTrainer", "nnUNetTrainerDALE"):
        result["peak_rss_mib"][name] = child("--rss-child", name)
    return result


def print_cost(result: dict, title: str) -> None:
    t = result["timing"]
    print(f"\n{title}, patch {t['patch_size']}, batch {t['batch_size']}, "
          f"{t['iters']} interleaved iterations on the same batches (CPU):")
    for name, sec in t["median_s"].items():
        print(f"  {name:32s} median {sec * 1000:8.1f} ms/iteration, ratio to baseline {t['ratio'][name]:.3f}")
    print(f"  buffer bytes per voxel on disk: {t['bytes_per_voxel']:.2f}")
    print("peak RSS (MiB): whole process | during the training steps")
    for k, v in result["peak_rss_mib"].items():
        print(f"  {k:40s} {v['process']:8.0f} | {v['training']:8.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-d", "--dataset-id", type=int, help="preprocessed dataset to measure on")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--phantoms", action="store_true", help="generate 2D phantom datasets of --cases sizes")
    p.add_argument("--workdir", default="bench_memory_work")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--cases", type=int, nargs="+", default=[40, 160])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rss-child", metavar="TRAINER", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.timing_child:
        print(json.dumps(timing(args.dataset_id, args.iters, args.warmup, args.configuration, args.plans)))
        return
    if args.rss_child:
        print(json.dumps(peak_rss(args.rss_child, args.dataset_id, args.iters, args.configuration, args.plans)))
        return
    if args.dataset_id is not None:
        result = measure(args.dataset_id, args.configuration, args.plans, dict(os.environ), args.iters, args.warmup)
        print_cost(result, f"dataset {args.dataset_id} {args.configuration} {args.plans}")
        print(json.dumps(result))
        return
    if not args.phantoms:
        raise SystemExit("nnunetv2-dale: give -d DATASET_ID (preprocessed) or --phantoms.")
    workdir = Path(args.workdir).resolve()
    results = {}
    for n in args.cases:
        env = prepare(workdir, n, args.size, 950 + args.cases.index(n))
        results[n] = measure(950 + args.cases.index(n), "2d", "nnUNetPlans", env, args.iters, args.warmup)
        print_cost(results[n], f"2D phantoms {args.size}x{args.size}, {n} cases")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
