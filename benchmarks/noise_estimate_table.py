"""The label-noise estimate of every DALE run in benchmark folders against the injected truth
(issue 27): per noise level and seed, the trainer's estimate (``dale_noise_estimate.json``: the
median case's and the pooled share of labelled lesion area the early ensemble contradicts away
from the rim, and the gate) beside the truth over the same training cases (fold 0): the share of
the labelled foreground the noise changed, |clean XOR noisy| / |noisy foreground|, pooled, and the
median case's.

    python benchmarks/noise_estimate_table.py BENCH [BENCH ...] [--trainer nnUNetTrainerDALE] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from nnunetv2_dale.data.io import reader_writer


def truth(raw: Path, keys: list[str]) -> dict:
    """The injected noise over ``keys``: changed / labelled foreground, pooled and median case."""
    dj = json.loads((raw / "dataset.json").read_text())
    ending = dj["file_ending"]
    rw = reader_writer(dj, raw / "labelsTr" / f"{keys[0]}{ending}")
    changed, fg, per_case = 0, 0, []
    for k in keys:
        noisy = np.asarray(rw.read_seg(str(raw / "labelsTr" / f"{k}{ending}"))[0]) > 0
        clean_path = raw / "labelsTr_clean" / f"{k}{ending}"
        clean = np.asarray(rw.read_seg(str(clean_path))[0]) > 0 if clean_path.is_file() else noisy
        c, f = int(np.logical_xor(clean, noisy).sum()), int(noisy.sum())
        changed, fg = changed + c, fg + f
        if f:
            per_case.append(c / f)
    return {"lesion_share": changed / max(fg, 1), "median_case_share": float(np.median(per_case)) if per_case else 0.0}


def rows(bench: Path, trainer: str) -> list[dict]:
    results = json.loads((bench / "results.json").read_text())
    out = []
    for key, r in results["runs"].items():
        name, run_name = key.split("/")
        if run_name != trainer:
            continue
        fold = next((bench / "nnUNet_results" / name).glob(f"{trainer}__*/fold_0"), None)
        if fold is None or not (fold / "dale_noise_estimate.json").is_file():
            continue
        est = json.loads((fold / "dale_noise_estimate.json").read_text())
        cases = sorted(est["cases"])
        out.append({"dataset": r["dataset"], "noise": r["noise"], "seed": r["seed"], "epoch": est["epoch"],
                    "estimate": est["dataset"], "truth": truth(bench / "nnUNet_raw" / name, cases),
                    "dice": r["metrics"]["dice"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("benches", nargs="+")
    p.add_argument("--trainer", default="nnUNetTrainerDALE")
    p.add_argument("--json")
    args = p.parse_args()
    table = [row for b in args.benches for row in rows(Path(b), args.trainer)]
    table.sort(key=lambda r: (r["dataset"], r["truth"]["lesion_share"], r["seed"]))
    print("| dataset | noise | seed | estimate: median case | pooled | gate | truth: median case | pooled | "
          "error (pooled) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        e, t = r["estimate"], r["truth"]
        print(f"| {r['dataset']} | {r['noise']} | {r['seed']} | {e['median_case_share']:.3f} | {e['lesion_share']:.3f} | "
              f"{e['gate']:.2f} | {t['median_case_share']:.3f} | {t['lesion_share']:.3f} | "
              f"{e['lesion_share'] - t['lesion_share']:+.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
