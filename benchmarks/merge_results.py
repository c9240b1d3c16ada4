"""Add the runs of a benchmark folder to a committed ``results.json``, so that runs made in separate
folders (two trainings sharing a machine, a rerun of one seed) are reported together.

Each run's dataset is mapped by name to the committed dataset of that name (a folder's own
nnU-Net ids differ: ``Dataset920_DDTIn100s64aba07b05s0`` -> ``Dataset801_DDTIn100s64aba07b05s0``);
a run whose dataset and trainer are already committed is refused, nothing is written then. The
run's ``bench_folder`` names where it came from, its hyperparameter hash is recomputed as today's
code computes it (``provenance.NEUTRAL``), and the folder's invocation is appended.

    python benchmarks/merge_results.py benchmarks/ddti_fast/results.json /work/bench/FOLDER
    python -m nnunetv2_dale.bench --report-only -o benchmarks/ddti_fast
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nnunetv2_dale.bench.provenance import hyperparameter_hash


def merge(committed: dict, new: dict, folder_name: str) -> list[str]:
    """Add ``new``'s runs to ``committed`` in place; returns the keys added (raises on a duplicate)."""
    names = {key.split("/")[0].split("_", 1)[1]: key.split("/")[0] for key in committed["runs"]}
    added: dict[str, dict] = {}
    for key, run in new["runs"].items():
        dataset, trainer = key.split("/")
        target = f"{names.get(dataset.split('_', 1)[1], dataset)}/{trainer}"
        if target in committed["runs"] or target in added:
            raise SystemExit(f"merge_results: {target} is already committed; nothing written. Remove it first "
                             "to replace it.")
        run = {**run, "bench_folder": folder_name}
        if "hyperparameters" in run:
            run["hyperparameter_hash"] = hyperparameter_hash(run["hyperparameters"])
        added[target] = run
    committed["runs"].update(added)
    committed.setdefault("invocations", []).extend(new.get("invocations") or [new.get("settings")])
    return list(added)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("committed", type=Path, help="the committed results.json to add to")
    p.add_argument("folder", type=Path, help="a benchmark output folder (holds results.json)")
    args = p.parse_args()
    committed = json.loads(args.committed.read_text())
    added = merge(committed, json.loads((args.folder / "results.json").read_text()), args.folder.name)
    args.committed.write_text(json.dumps(committed, indent=1) + "\n")
    for key in added:
        print(f"added {key}: Dice {committed['runs'][key]['metrics']['dice']:.4f}")


if __name__ == "__main__":
    main()
