"""DALE vs the nnU-Net baseline on a dataset with injected label noise, at the same budget.

Copies a raw nnU-Net dataset (imagesTr/labelsTr/imagesTs/labelsTs, clean labels), injects
alpha/beta noise into the training labels only (deterministic per seed; the source is never
modified), writes a CPU plans preset (batch size and feature widths as given, identical for every
trainer) next to nnU-Net's plans, trains each trainer through ``nnUNetv2_train``, predicts the test
cases with ``nnUNetv2_predict`` and scores them against the CLEAN test labels with
``nnUNetv2_evaluate_simple``. Prints one line per trainer and writes ``results.json``.

Example (2 CPU cores; about 10 minutes per trainer at 40 x 50):
    python benchmarks/noisy_benchmark.py --source ../shared/data/Dataset601_DDTI --epochs 40 --iters 50
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name


def noisy_copy(source: Path, target: Path, alpha: float, beta: float, seed: int) -> dict:
    """Copy ``source`` to ``target`` with alpha/beta noise in labelsTr (PNG datasets)."""
    from nnunetv2_dale.noise import NoiseSpec, corrupt_label

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    rng = np.random.default_rng(seed)
    spec = NoiseSpec("alphabeta", alpha=alpha, beta=beta)
    corrupted = []
    for label_file in sorted((target / "labelsTr").iterdir()):
        label = np.array(Image.open(label_file))
        noisy, changed = corrupt_label(label, spec, rng)
        if changed.any():
            corrupted.append(label_file.name)
            Image.fromarray(noisy.astype(np.uint8)).save(label_file)
    return {"alpha": alpha, "beta": beta, "seed": seed, "corrupted_cases": len(corrupted),
            "training_cases": len(list((target / "labelsTr").iterdir()))}


def write_cpu_plans(preprocessed: Path, batch_size: int, feature_scale: float) -> str:
    """nnUNetPlans_cpu.json: nnU-Net's 2d plan with another batch size and scaled feature widths,
    reading the same preprocessed data."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["2d"]
    cfg["batch_size"] = batch_size
    kwargs = cfg["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(8, int(f * feature_scale)) for f in kwargs["features_per_stage"]]
    plans["plans_name"] = "nnUNetPlans_cpu"
    (preprocessed / "nnUNetPlans_cpu.json").write_text(json.dumps(plans, indent=2))
    return "nnUNetPlans_cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="raw dataset folder with clean labels")
    p.add_argument("--workdir", default="bench_noisy_work")
    p.add_argument("--dataset-id", type=int, default=801)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=40, choices=(20, 40))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--feature-scale", type=float, default=0.5)
    p.add_argument("--trainers", nargs="+", default=["nnUNetTrainerBudget", "nnUNetTrainerDALE"])
    args = p.parse_args()

    work = Path(args.workdir).resolve()
    env = {**os.environ, **{n: str(work / n) for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    env.setdefault("nnUNet_n_proc_DA", "2")
    env.setdefault("nnUNet_def_n_proc", "2")
    env.update(nnUNet_DALE_iters=str(args.iters), nnUNet_DALE_val_iters=str(max(1, args.iters // 5)))
    name = f"Dataset{args.dataset_id}_Noisy{Path(args.source).name.split('_', 1)[-1]}"
    raw = work / "nnUNet_raw" / name
    (work / "nnUNet_raw").mkdir(parents=True, exist_ok=True)
    noise = noisy_copy(Path(args.source), raw, args.alpha, args.beta, args.seed)
    print(f"noise: {noise}", flush=True)
    subprocess.run([tool("nnUNetv2_plan_and_preprocess"), "-d", str(args.dataset_id), "-c", "2d", "-np", "2"],
                   env=env, check=True, capture_output=True)
    plans = write_cpu_plans(work / "nnUNet_preprocessed" / name, args.batch_size, args.feature_scale)
    results = {"settings": {**vars(args), "noise": noise}, "trainers": {}}
    for base in args.trainers:
        trainer = f"{base}_{args.epochs}epochs"
        t0 = time.time()
        log = work / f"train_{trainer}.log"
        with log.open("w") as fh:
            subprocess.run([tool("nnUNetv2_train"), str(args.dataset_id), "2d", "0", "-tr", trainer, "-p", plans,
                            "-device", "cpu"], env=env, check=True, stdout=fh, stderr=subprocess.STDOUT)
        train_s = time.time() - t0
        pred = work / f"pred_{trainer}"
        subprocess.run([tool("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d",
                        str(args.dataset_id), "-c", "2d", "-f", "0", "-tr", trainer, "-p", plans, "-device", "cpu",
                        "-npp", "1", "-nps", "1"], env=env, check=True, capture_output=True)
        subprocess.run([tool("nnUNetv2_evaluate_simple"), str(raw / "labelsTs"), str(pred), "-l", "1", "-np", "2"],
                       env=env, check=True, capture_output=True)
        summary = json.loads((pred / "summary.json").read_text())
        dice = summary["foreground_mean"]["Dice"]
        results["trainers"][trainer] = {"test_dice_clean": dice, "train_seconds": train_s}
        print(f"{trainer:32s} test Dice (clean labels) {dice:.4f}   training {train_s / 60:.1f} min", flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
