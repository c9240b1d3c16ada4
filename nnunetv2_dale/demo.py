"""``nnUNetv2_dale_demo``: the whole workflow on generated phantoms, through nnU-Net's own CLI.

Steps: generate a 2D phantom dataset with noisy training labels and clean test labels,
``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train ... -device cpu`` twice on the same noisy labels and
split (stock nnU-Net as ``nnUNetTrainerBudget``, then ``nnUNetTrainerDALE``, both at the same budget
via ``nnUNet_DALE_epochs`` / ``nnUNet_DALE_iters``), ``nnUNetv2_predict`` on the test images,
``nnUNetv2_evaluate_simple`` against the clean test labels; then print both Dice figures side by side
and where everything is. ``--no-baseline`` trains DALE only. Everything lives under ``--workdir``, which
gets its own nnUNet_raw / nnUNet_preprocessed / nnUNet_results, so a user's own trees are never
touched. Full tool output goes to ``<workdir>/logs``; the console shows progress lines.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from nnunetv2_dale.utilities.preflight import SetupError, check_torch, check_writable, tool

EPOCHS, ITERS = 20, 25
BASELINE, DALE = "nnUNetTrainerBudget", "nnUNetTrainerDALE"
PROGRESS_MARKERS = ("Epoch ", "train_loss", "Pseudo dice", "Epoch time", "Mean Validation Dice", "Preprocessing",
                    "Configuration:", "Predicting", "Training done", "Error", "error", "Traceback")


def run_step(cmd: list[str], env: dict[str, str], log: Path, quiet: bool = False) -> None:
    """Run one nnU-Net command, log all its output, echo progress lines; stop with a message on failure."""
    print("  $", " ".join(cmd), flush=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if not quiet and any(m in line for m in PROGRESS_MARKERS):
                print("    " + line.rstrip()[-110:], flush=True)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SetupError(f"`{' '.join(cmd)}` failed (exit {code}). Last lines of {log}:\n{tail}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="nnunetv2_dale_demo", help="folder for data, models and logs")
    p.add_argument("--dataset-id", type=int, default=990)
    p.add_argument("--num-train", type=int, default=60)
    p.add_argument("--num-test", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="phantom edge length in pixels")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs of each trainer (nnUNet_DALE_epochs)")
    p.add_argument("--iters", type=int, default=ITERS, help="training iterations per epoch (nnUNet_DALE_iters)")
    p.add_argument("--no-baseline", action="store_true", help="train DALE only, not stock nnU-Net beside it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete --workdir first")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.iters < 1:
        p.error("--epochs and --iters must be positive integers")

    started = time.time()
    print("nnunetv2-dale demo:", check_torch(), flush=True)
    work = Path(args.workdir).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    check_writable(work, "the demo folder")
    paths = {n: work / n for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    logs = work / "logs"
    for d in [*paths.values(), logs]:
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in paths.items()}}
    env.setdefault("nnUNet_n_proc_DA", str(min(os.cpu_count() or 2, 4)))
    env.setdefault("nnUNet_def_n_proc", "2")
    env["nnUNet_DALE_iters"] = str(args.iters)
    env.setdefault("nnUNet_DALE_val_iters", str(max(1, args.iters // 5)))
    # Make sure child processes find our trainers even when run from an uninstalled checkout.
    from nnunetv2_dale.utilities.registration import ensure_registered

    ensure_registered()
    env["nnUNet_extTrainer"] = os.environ["nnUNet_extTrainer"]

    from nnunetv2_dale.data.noise import NoiseSpec
    from nnunetv2_dale.data.phantoms import make_phantom_dataset

    did = args.dataset_id
    env["nnUNet_DALE_epochs"] = str(args.epochs)
    trainers = [DALE] if args.no_baseline else [BASELINE, DALE]
    steps = 2 + 2 * len(trainers)
    raw = paths["nnUNet_raw"] / f"Dataset{did:03d}_DemoPhantom2D"
    print(f"[1/{steps}] Generating {args.num_train} noisy training + {args.num_test} clean test phantoms in {raw}",
          flush=True)
    if raw.exists():
        shutil.rmtree(raw)
    make_phantom_dataset(raw, 2, args.size, args.num_train, args.num_test, NoiseSpec(), args.seed)
    meta = json.loads((raw / "phantoms.json").read_text())
    print(f"      {len(meta['corrupted_cases'])} of {args.num_train} training labels corrupted "
          f"(alpha/beta noise, alpha=0.7, beta=0.5)", flush=True)

    print(f"[2/{steps}] nnU-Net planning and preprocessing (2d)", flush=True)
    run_step([tool("nnUNetv2_plan_and_preprocess"), "-d", str(did), "-c", "2d", "-np", "2",
              "--verify_dataset_integrity"], env, logs / "plan_and_preprocess.log")

    step = 3
    for trainer in trainers:
        print(f"[{step}/{steps}] Training {trainer} on the noisy labels: {args.epochs} epochs x {args.iters} "
              "iterations on the CPU", flush=True)
        run_step([tool("nnUNetv2_train"), str(did), "2d", "0", "-tr", trainer, "-device", "cpu"], env,
                 logs / f"train_{trainer}.log")
        step += 1

    scores: dict[str, float] = {}
    for trainer in trainers:
        pred = work / f"predictions_test_{trainer}"
        print(f"[{step}/{steps}] Predicting the {args.num_test} test cases with {trainer}, scoring them against "
              "the clean labels", flush=True)
        run_step([tool("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(did), "-c",
                  "2d", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env,
                 logs / f"predict_{trainer}.log")
        run_step([tool("nnUNetv2_evaluate_simple"), str(raw / "labelsTs"), str(pred), "-l", "1", "-o",
                  str(pred / "summary.json"), "-np", "2"], env, logs / f"evaluate_{trainer}.log", quiet=True)
        scores[trainer] = json.loads((pred / "summary.json").read_text())["foreground_mean"]["Dice"]
        step += 1

    trained = "both trained on the same noisy labels" if len(scores) > 1 else "trained on the noisy labels"
    print(f"\nTest Dice against the CLEAN test labels ({args.num_test} cases), {trained}, fold 0, "
          f"{args.epochs} x {args.iters}:")
    for trainer, dice in scores.items():
        name = "DALE" if trainer == DALE else "nnU-Net"
        delta = f"  ({100 * (dice - scores[BASELINE]):+.1f} points)" if trainer == DALE and BASELINE in scores else ""
        print(f"  {name:8s} {trainer:22s} {dice:.4f}{delta}")
    print("(one seed of one small dataset: the benchmark, nnUNetv2_dale_bench, measures over seeds)")
    print(f"Trained models:  {paths['nnUNet_results'] / raw.name}")
    print(f"Predictions:     {work}/predictions_test_<trainer> (summary.json holds the metrics)")
    print(f"Logs:            {logs}")
    print(f"Done in {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
