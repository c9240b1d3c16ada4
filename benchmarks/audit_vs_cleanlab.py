"""Label audit vs cleanlab on the same injected noise: who ranks the corrupted training cases first?

Uses a benchmark folder written by ``nnUNetv2_dale_bench`` (its noisy dataset copy, plans and the
DALE fold 0). cleanlab's ``segmentation.rank.get_label_quality_scores`` gets what its
documentation asks for: out-of-fold softmax of every training case, here from
``nnUNetv2_train ... --npz`` of the stock trainer (``nnUNetTrainerBudget``, the benchmark's
baseline, same budget) over the five folds. ``nnUNetv2_dale_audit`` ranks the training cases of the
DALE fold 0. Both are scored on the cases both rank (fold 0's training cases): precision of the
top-k, k = the number of corrupted cases among them (chance = their share), and top-10.

cleanlab is a benchmark-only dependency: ``pip install cleanlab``.

    python benchmarks/audit_vs_cleanlab.py --bench OUT --dataset Dataset802_Phantom2Daba07b07s0
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np

def precision_at(ranked: list[str], corrupted: set[str], k: int) -> float:
    return len(set(ranked[:k]) & corrupted) / k if k else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", required=True, help="benchmark folder (nnUNetv2_dale_bench -o)")
    p.add_argument("--dataset", required=True, help="the noisy dataset's folder name in <bench>/nnUNet_raw")
    p.add_argument("--dale-trainer", default="nnUNetTrainerDALE")
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args()
    try:
        from cleanlab.segmentation.rank import get_label_quality_scores
    except ImportError:
        raise SystemExit("audit_vs_cleanlab.py compares against cleanlab, which is not installed: pip install cleanlab")

    from nnunetv2_dale.utilities.preflight import tool
    from nnunetv2_dale.data.io import reader_writer

    bench = Path(args.bench).resolve()
    results = json.loads((bench / "results.json").read_text())
    run = next(r for k, r in results["runs"].items() if k.startswith(args.dataset + "/"))
    budget = run.get("budget") or {k: results["settings"][k] for k in ("epochs", "iters")}
    env = {**os.environ, **{n: str(bench / n) for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")},
           "nnUNet_DALE_epochs": str(budget["epochs"]), "nnUNet_DALE_iters": str(budget["iters"]),
           "nnUNet_DALE_val_iters": str(max(1, budget["iters"] // 5))}
    env.setdefault("nnUNet_n_proc_DA", "2")
    env.setdefault("nnUNet_def_n_proc", "2")
    did, conf = args.dataset[7:10], run["configuration"]
    base = "nnUNetTrainerBudget"
    results_dir = bench / "nnUNet_results" / args.dataset / f"{base}__nnUNetPlans_cpu__{conf}"
    for fold in range(5):
        if not (results_dir / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            print(f"training {base} fold {fold} --npz", flush=True)
            subprocess.run([tool("nnUNetv2_train"), did, conf, str(fold), "-tr", base, "-p", "nnUNetPlans_cpu",
                            "-device", "cpu", "--npz"], env=env, check=True, capture_output=True)
        elif not list((results_dir / f"fold_{fold}" / "validation").glob("*.npz")):
            print(f"re-running validation of {base} fold {fold} with --npz", flush=True)
            subprocess.run([tool("nnUNetv2_train"), did, conf, str(fold), "-tr", base, "-p", "nnUNetPlans_cpu",
                            "-device", "cpu", "--val", "--npz"], env=env, check=True, capture_output=True)
    raw = bench / "nnUNet_raw" / args.dataset
    ds = json.loads((raw / "dataset.json").read_text())
    ending = ds["file_ending"]
    rw = reader_writer(ds, next((raw / "labelsTr").glob(f"*{ending}")))
    cases = sorted(f.name[: -len(ending)] for f in (raw / "labelsTr").glob(f"*{ending}"))
    corrupted = {c for c in cases if rw.read_seg(str(raw / "noiseTr" / f"{c}{ending}"))[0].any()}
    labels, probs = [], []
    for c in cases:
        npz = next(results_dir.glob(f"fold_*/validation/{c}.npz"))
        probs.append(np.load(npz)["probabilities"].reshape(len(ds["labels"]), -1))
        labels.append(rw.read_seg(str(raw / "labelsTr" / f"{c}{ending}"))[0].reshape(-1))
    # cleanlab wants (N, K, H, W): cases are flattened to one row each (all the same size here)
    lab = np.stack(labels)[:, None, :].astype(np.int64)
    prob = np.stack(probs)[:, :, None, :].astype(np.float32)
    scores, _ = get_label_quality_scores(lab, prob, verbose=False)
    cleanlab_rank = [cases[i] for i in np.argsort(scores, kind="stable")]  # low score = likely wrong
    fold = bench / "nnUNet_results" / args.dataset / f"{args.dale_trainer}__nnUNetPlans_cpu__{conf}" / "fold_0"
    audit_dir = bench / "audit" / args.dataset
    subprocess.run([tool("nnUNetv2_dale_audit"), "-d", did, "-c", conf, "-f", "0", "-tr", args.dale_trainer, "-p",
                    "nnUNetPlans_cpu", "-o", str(audit_dir)], env=env, check=True, capture_output=True)
    with open(audit_dir / "label_audit.csv") as f:
        audit_rank = [r["case"] for r in csv.DictReader(f)]
    common = set(audit_rank)
    cleanlab_rank = [c for c in cleanlab_rank if c in common]
    corrupted_common = corrupted & common
    k = len(corrupted_common)
    out = {"dataset": args.dataset, "cases_compared": len(common), "corrupted": k,
           "chance_precision": k / max(len(common), 1),
           "dale_audit": {f"precision@{k}": precision_at(audit_rank, corrupted_common, k),
                          "precision@10": precision_at(audit_rank, corrupted_common, min(10, len(common)))},
           "cleanlab_oof_5fold": {f"precision@{k}": precision_at(cleanlab_rank, corrupted_common, k),
                                  "precision@10": precision_at(cleanlab_rank, corrupted_common, min(10, len(common)))},
           "overlay_example": str(audit_dir / "overlays" / f"{audit_rank[0]}.png"), "budget": budget,
           "dale_fold": str(fold)}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
