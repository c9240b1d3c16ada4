"""Every committed benchmark script runs in its smallest mode, so none can rot unnoticed (issue 28).

The scripts that read a benchmark folder (``noise_estimate_table.py``, ``area_analysis.py``, ``ddti_fast/flag_analysis.py``,
``ddti_fast/flag_rules.py``, ``audit_vs_cleanlab.py``) run on the folder of the benchmark's
end-to-end test (``test_bench.py``). ``ddti_fast/ensemble_flags.py`` needs snapshot trainings of its
own (``nnUNetTrainerBudgetSnap``) and is not run by the suite. ``merge_results.py`` runs on two small
results files written here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str, *args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_memory_cost_smallest(tmp_path):
    out = tmp_path / "memory_cost.json"
    script("memory_cost.py", "--iters", "2", "--step-ms", "1", "--shapes", "tiny 3d (smoke test)", "--json", str(out))
    r = json.loads(out.read_text())["results"]["tiny 3d (smoke test)"]
    assert r["host_ms"] >= 0 and r["worker_read_ms"] > 0 and r["device_ms"] > 0 and r["before_update_ms"] > 0


def test_step_cost_smallest(tmp_path):
    out = tmp_path / "step_cost.json"
    script("step_cost.py", "--shape", "tiny", "--iters", "1", "--json", str(out))
    r = json.loads(out.read_text())["results"]
    assert all(r[k] > 0 for k in ("nnunet_loss_ms", "rset_maps_ms", "rset_maps_stable_ms", "dale_stable_ms",
                                  "dale_fuzzy_ms", "pass_ms", "feature_grad_ms"))


def test_snapshot_progress_and_cost_summary_smallest(tmp_path):
    proc = script("snapshot_cost.py", "--gib", "0.002", "--cases", "2", "--folder", str(tmp_path / "snap"))
    assert proc.stdout.count("| 0.002 | 2 |") == 1
    proc = script("progress_plot_cost.py")
    assert "DALELocalLogger" in proc.stdout
    out = tmp_path / "cost_summary.json"
    script("cost_summary.py", "--extras-from", str(BENCH / "cost_summary.json"), "--epochs", "20",
           "--freeze-epochs", "5", "--json", str(out))
    summary = json.loads(out.read_text())
    assert summary["epoch_extras_by_freeze_epoch"]["5"]["copies"] == 5 and len(summary["results"]) == 3


@pytest.mark.slow
def test_loader_and_epoch_cost_smallest(tmp_path):
    out = tmp_path / "loader_cost.json"
    script("loader_cost.py", "--shapes", "2d tiny (smoke test)", "--batches", "2", "--warmup", "1", "--rounds", "1",
           "--same-draws", "--json", str(out), "--workdir", str(tmp_path / "loader"))
    ratios = json.loads(out.read_text())["results"]["2d tiny (smoke test)"]["loader_ratio"]
    assert ratios["DALE (stable)"] > 0 and ratios["DALE (warm-up)"] > 0
    out = tmp_path / "epoch_cost.json"
    script("epoch_cost.py", "--device", "cpu", "--shape", "32", "32", "32", "--cases", "2", "--epochs", "3",
           "--iters", "1", "--skip", "1", "--processes", "1", "--workdir", str(tmp_path / "epoch"), "--json", str(out),
           "--trainers", "nnUNetTrainerBudget", "nnUNetTrainerDALE", "nnUNetTrainerDALE_ungated")
    result = json.loads(out.read_text())
    trainers = ("nnUNetTrainerBudget", "nnUNetTrainerDALE", "nnUNetTrainerDALE_ungated")
    for trainer in trainers:
        split = result["summary"][trainer]
        assert split["epochs_counted"] >= 1 and split["iteration_ms"]["forward"] > 0 and split["validation_s"] > 0
    # DALE's own work is seen where its gate is open (the phantoms' labels are clean: the default's may shut)
    assert result["summary"]["nnUNetTrainerDALE_ungated"]["iteration_ms"]["dale"] > 0
    assert result["summary"]["nnUNetTrainerBudget"]["iteration_ms"]["dale"] == 0
    assert set(result["ratios"]) == set(trainers[1:]) and all(r > 0 for r in result["ratios"].values())
    assert result["ratio"] == result["ratios"]["nnUNetTrainerDALE"] and "| nnUNetTrainerDALE_ungated |" in result["table"]


def bench_folder_scripts(out: Path, noisy_dataset: str) -> None:
    """The scripts that read a benchmark folder, on one with a DALE run on noisy labels (called by
    ``test_bench.py``'s end-to-end test)."""
    proc = script("noise_estimate_table.py", str(out), "--json", str(out / "estimates.json"))
    estimates = json.loads((out / "estimates.json").read_text())
    noisy = next(e for e in estimates if e["noise"] != "clean")
    assert len(estimates) == 2 and noisy["truth"]["lesion_share"] > 0.1  # alpha=1: every case corrupted
    assert next(e for e in estimates if e["noise"] == "clean")["truth"]["lesion_share"] == 0
    proc = script("area_analysis.py", str(out))
    assert f"| {noisy_dataset} | nnUNetTrainerDALE |" in proc.stdout
    for name, shown in (("ddti_fast/flag_analysis.py", "AUROC 1-omega"), ("ddti_fast/flag_rules.py", "| 1 - omega (DALE) |")):
        proc = script(name, str(out), f"{noisy_dataset}:nnUNetTrainerDALE")
        assert noisy_dataset in proc.stdout and shown in proc.stdout, proc.stdout[-1500:]
    cmd = [sys.executable, str(BENCH / "audit_vs_cleanlab.py"), "--bench", str(out), "--dataset", noisy_dataset,
           "--out", str(out / "audit_vs_cleanlab.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=clean_env())
    try:
        import cleanlab  # noqa: F401
    except ImportError:  # optional: the script says how to get it
        assert proc.returncode != 0 and "pip install cleanlab" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "audit_vs_cleanlab.json").read_text())


def test_merge_results_maps_datasets_by_name_and_refuses_duplicates(tmp_path):
    """``merge_results.py`` adds a folder's runs under the committed dataset of the same name, with
    its folder and today's hash, and refuses a run that is already committed (writing nothing)."""
    def run(dice: float, hp: dict | None = None) -> dict:
        return {"metrics": {"dice": dice}, **({"hyperparameters": hp, "hyperparameter_hash": "stale"} if hp else {})}

    committed = tmp_path / "results.json"
    committed.write_text(json.dumps({"runs": {"Dataset801_Xaba07b05s0/nnUNetTrainer": run(0.78)}, "invocations": []}))
    folder = tmp_path / "rerun_a"
    folder.mkdir()
    hp = {"dale_agreement_power": "1.0", "dale_noise_gate": "True"}
    (folder / "results.json").write_text(json.dumps({"runs": {"Dataset920_Xaba07b05s0/nnUNetTrainerDALE": run(0.79, hp),
                                                              "Dataset921_Xcleans0/nnUNetTrainerDALE": run(0.83, hp)},
                                                     "invocations": [{"seeds": [0]}]}))
    script("merge_results.py", str(committed), str(folder))
    runs = json.loads(committed.read_text())["runs"]
    added = runs["Dataset801_Xaba07b05s0/nnUNetTrainerDALE"]
    from nnunetv2_dale.bench.provenance import hyperparameter_hash

    assert added["bench_folder"] == "rerun_a" and added["hyperparameter_hash"] == hyperparameter_hash(hp) != "stale"
    assert "Dataset921_Xcleans0/nnUNetTrainerDALE" in runs  # no committed dataset of that name: kept as is
    before = committed.read_text()
    proc = subprocess.run([sys.executable, str(BENCH / "merge_results.py"), str(committed), str(folder)],
                          capture_output=True, text=True, env=clean_env())
    assert proc.returncode != 0 and "already committed" in proc.stderr and committed.read_text() == before
