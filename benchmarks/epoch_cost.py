"""Seconds per epoch and per iteration, DALE vs nnU-Net, at nnU-Net's own plans for real-sized
cases (issue 15's GPU goal: DALE <= 1.05x nnU-Net's seconds per epoch). Prepared for a GPU machine:

    python benchmarks/epoch_cost.py --device cuda --json $OUT/epoch_cost.json   # not yet run on a GPU
    python benchmarks/epoch_cost.py --device cpu --shape 48 48 48 --cases 4 --epochs 3 --iters 2   # a smoke run

Generates phantom cases of ``--shape`` (default 160 x 256 x 256), lets nnU-Net plan and preprocess
``--configuration`` (3d_fullres: on a GPU nnU-Net's planner picks its real patch and batch, e.g.
2 x 128^3), then trains ``nnUNetTrainerBudget`` (stock nnU-Net, ``--epochs`` x ``--iters``) and
``nnUNetTrainerDALE`` (same budget), each in its own process, in that order and again reversed
(``--rounds``). The phantoms' labels are clean, so DALE's noise gate shuts and, once its memory is
frozen, its steps are nnU-Net's; ``--trainers nnUNetTrainerBudget nnUNetTrainerDALE_ungated`` (or
both DALE trainers) measures the steps of an open gate, i.e. on labels that look noisy. nnU-Net's
defaults otherwise: mixed precision and torch.compile on a GPU, its augmentation workers
(``nnUNet_n_proc_DA``), checkpoints. An epoch's seconds are the wall time
from its start to the next epoch's start, so they include the validation iterations, the
checkpoints, DALE's buffer snapshots and progress.png (nnU-Net's logged "epoch time" stops
before those). The first epoch (compilation, cudnn autotuning, memory allocation) is reported
apart. DALE's epochs are labelled with their phase; its memory is written until it freezes.
Fold "all" (any case count), no final validation (``run_training`` only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TRAINERS = ("nnUNetTrainerBudget", "nnUNetTrainerDALE")
BASELINE = TRAINERS[0]
DATASET_ID = 990


def prepare(workdir: Path, args: argparse.Namespace) -> dict[str, str]:
    """Phantom dataset, planned and preprocessed; the nnU-Net environment for it."""
    from nnunetv2_dale.data.noise import NoiseSpec
    from nnunetv2_dale.data.phantoms import make_phantom_dataset

    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(workdir / name)
    raw = workdir / "nnUNet_raw" / f"Dataset{DATASET_ID}_EpochCost"
    if not (workdir / "nnUNet_preprocessed" / raw.name).is_dir():
        make_phantom_dataset(raw, len(args.shape), max(args.shape), args.cases, 1, NoiseSpec(), seed=0,
                             shape=tuple(args.shape))
        prep_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
        subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
                        "-c", args.configuration, "-np", str(args.processes)], env=prep_env, check=True,
                       capture_output=True)
    return env


def child(trainer_name: str, args: argparse.Namespace) -> dict:
    """Train one trainer in this process (no final validation) through nnU-Net's training loop,
    timed stage by stage (``nnunetv2_dale.bench.split``)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_dale.bench.split import run_training_split

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trainer = get_trainer_from_args(str(DATASET_ID), args.configuration, "all", trainer_name, "nnUNetPlans",
                                    device=device)
    epochs = run_training_split(trainer)
    walls = [e["epoch_s"] for e in epochs]
    phases = [trainer.phase(e) for e in range(len(walls))] if hasattr(trainer, "phase") else ["-"] * len(walls)
    frozen = [trainer.memory_frozen(e) for e in range(len(walls))] if hasattr(trainer, "memory_frozen") else None
    cm = trainer.configuration_manager
    return {"epoch_s": walls, "phases": phases, "iters": trainer.num_iterations_per_epoch,
            "val_iters": trainer.num_val_iterations_per_epoch, "patch_size": list(cm.patch_size),
            "batch_size": cm.batch_size, "memory_frozen": frozen, "compiled": bool(getattr(trainer, "_do_i_compile", lambda: False)()),
            "split": epochs}


def steady(run: dict, skip: int) -> list[dict]:
    """The epochs that count: from ``skip`` on (compilation, cudnn autotuning and DALE's phase
    change before), and for DALE only those with the memory frozen."""
    frozen = run["memory_frozen"] or [True] * len(run["split"])
    return [e for i, e in enumerate(run["split"]) if i >= skip and frozen[i]]


def summarise(runs: dict[str, list[dict]], skip: int) -> dict:
    """Per trainer: medians over the steady epochs of all rounds (seconds per stage, ms per part)."""
    from nnunetv2_dale.bench.split import PARTS

    out = {}
    for trainer, rs in runs.items():
        eps = [e for run in rs for e in steady(run, skip)]
        if not eps:
            continue
        med = lambda key: statistics.median(e[key] for e in eps)  # noqa: E731
        out[trainer] = {"epochs_counted": len(eps), "first_epoch_s": statistics.median(run["epoch_s"][0] for run in rs),
                        **{k: med(k) for k in ("epoch_s", "start_s", "train_loop_s", "train_epoch_end_s",
                                               "validation_s", "epoch_end_s")},
                        "iteration_ms": {p: statistics.median(e["iteration_ms"][p] for e in eps) for p in PARTS},
                        "s_per_iter": med("epoch_s") / rs[0]["iters"]}
    return out


def table(summary: dict) -> str:
    """Markdown: one row per trainer, seconds per epoch stage and milliseconds per iteration part."""
    from nnunetv2_dale.bench.split import PARTS

    head = ("| trainer | epochs | s/epoch | train loop | epoch end (train) | validation | on_epoch_end | "
            + " | ".join(f"{p} ms" for p in PARTS) + " |")
    rows = [head, "|" + "---|" * (7 + len(PARTS))]
    for trainer, s in summary.items():
        rows.append(f"| {trainer} | {s['epochs_counted']} | {s['epoch_s']:.2f} | {s['train_loop_s']:.2f} | "
                    f"{s['train_epoch_end_s']:.2f} | {s['validation_s']:.2f} | {s['epoch_end_s']:.2f} | "
                    + " | ".join(f"{s['iteration_ms'][p]:.1f}" for p in PARTS) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--shape", type=int, nargs="+", default=[160, 256, 256])
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--iters", type=int, default=50, help="training iterations per epoch (nnU-Net: 250)")
    p.add_argument("--rounds", type=int, default=1, help="each round trains both trainers, order alternating")
    p.add_argument("--processes", type=int, default=8, help="preprocessing processes")
    p.add_argument("--skip", type=int, default=2, help="epochs left out of the medians (compilation, warm-up)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--trainers", nargs="+", default=list(TRAINERS),
                   help=f"{BASELINE} first, then the DALE trainers to compare with it")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("EPOCH_COST " + json.dumps(child(args.child, args)), flush=True)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dale_epoch_cost_"))
    env = prepare(workdir, args)
    env.update(nnUNet_DALE_epochs=str(args.epochs), nnUNet_DALE_iters=str(args.iters),
               nnUNet_DALE_val_iters=str(max(1, args.iters // 5)))
    runs: dict[str, list[dict]] = {t: [] for t in args.trainers}
    for r in range(args.rounds):
        for trainer in (args.trainers if r % 2 == 0 else args.trainers[::-1]):
            cmd = [sys.executable, __file__, "--child", trainer] + [a for a in sys.argv[1:] if a != "--child"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{trainer} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            out = proc.stdout
            runs[trainer].append(json.loads(out.split("EPOCH_COST ", 1)[1].splitlines()[0]))
            last = runs[trainer][-1]
            print(f"round {r}: {trainer} epochs (s): {[round(s, 1) for s in last['epoch_s']]} phases {last['phases']} "
                  f"frozen {last['memory_frozen']}", flush=True)
            for i, e in enumerate(last["split"]):
                print(f"  epoch {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in e.items() if k.endswith("_s"))
                      + " | ms/iter " + ", ".join(f"{k} {v:.1f}" for k, v in e["iteration_ms"].items()), flush=True)
            write(args, runs)
    summary = write(args, runs)
    first = runs[args.trainers[0]][0]
    print(f"\n{args.configuration} on {args.device}, patch {first['patch_size']} x batch {first['batch_size']}, "
          f"{args.epochs} epochs x {args.iters} iterations, {args.rounds} round(s); medians of epochs {args.skip}+ "
          "(DALE: memory frozen):")
    print(table(summary["summary"]))
    for trainer, ratio in summary["ratios"].items():
        print(f"  {trainer} / nnU-Net seconds per epoch: {ratio:.3f}")


def write(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict:
    """The summary so far, also written to ``--json`` (after every training, so a run cut short by
    a time limit still leaves its figures)."""
    summary = summarise(runs, args.skip)
    ratios = ({t: s["epoch_s"] / summary[BASELINE]["epoch_s"] for t, s in summary.items() if t != BASELINE}
              if BASELINE in summary else {})
    result = {"settings": vars(args), "runs": runs, "summary": summary, "ratio": ratios.get("nnUNetTrainerDALE"),
              "ratios": ratios, "table": table(summary)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result

if __name__ == "__main__":
    main()
