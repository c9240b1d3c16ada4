"""The noisy-label benchmark: noise specs, the noisy dataset copy, metrics, and one real tiny run
of ``nnUNetv2_dale_bench`` (plan/preprocess, train two trainers, predict, score, report; a rerun
that skips finished runs; the oracle trainer added to the same folder)."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import clean_env, run, tool
from nnunetv2_dale.bench.cli import PRESETS, noisy_copy, parse_noise, parse_phantom_source, save_results
from nnunetv2_dale.bench.metrics import case_metrics, dice, hd95
from nnunetv2_dale.data.noise import NoiseSpec
from nnunetv2_dale.data.phantoms import make_phantom_dataset


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_parse_noise_specs_and_refusals():
    assert parse_noise("clean").model == "none"
    spec = parse_noise("alphabeta:alpha=0.3,beta=0.7")
    assert (spec.model, spec.alpha, spec.beta) == ("alphabeta", 0.3, 0.7)
    assert parse_noise("markov:alpha=1,steps=80,theta1=0.2").markov_steps == 80
    with pytest.raises(SystemExit, match="unknown noise parameter 'gamma'"):
        parse_noise("alphabeta:gamma=1")
    with pytest.raises(SystemExit, match="unknown noise model 'salt'"):
        parse_noise("salt:alpha=1")


def test_presets_and_phantom_sources_parse():
    for preset in PRESETS.values():
        [parse_noise(n) for n in preset["noise"]]
        if preset["source"].startswith("phantoms"):
            assert parse_phantom_source(preset["source"])[0] in (2, 3)
    assert parse_phantom_source("phantoms") == (2, 64, 60)
    assert parse_phantom_source("phantoms:3:32") == (3, 32, 60)
    with pytest.raises(SystemExit, match="phantoms:DIM:SIZE:NUM_TRAIN"):
        parse_phantom_source("phantoms:2d:64")


def test_metrics_against_hand_computed_values():
    ref = np.zeros((1, 10, 10), dtype=np.uint8)
    ref[0, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[0, 2:6, 3:7] = 1
    assert dice(pred > 0, ref > 0) == pytest.approx(2 * 12 / 32)
    a, b = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    a[5, 5], b[8, 5] = True, True
    assert hd95(a, b, (2.0, 1.0)) == pytest.approx(6.0)  # 3 voxels along an axis of 2 mm spacing
    m = case_metrics(pred, ref, (999.0, 1.0, 1.0), [1], band_mm=1.0)["1"]  # 2D read as 1 x H x W
    assert m["dice"] == pytest.approx(0.75) and m["hd95"] == pytest.approx(1.0)
    perfect = case_metrics(ref, ref, (999.0, 1.0, 1.0), [1], band_mm=1.0)["1"]
    assert perfect["band_dice"] == 1.0 and perfect["hd95"] == 0.0
    empty = case_metrics(np.zeros_like(ref), ref, (999.0, 1.0, 1.0), [1], band_mm=1.0)["1"]
    assert empty["dice"] == 0.0 and np.isnan(empty["hd95"])


def test_two_bench_commands_on_one_folder_keep_each_others_runs(tmp_path):
    """Two commands writing to the same benchmark folder side by side (each read results.json when
    it started): neither drops the other's runs, both invocations are listed."""
    file = tmp_path / "results.json"
    a = {"settings": {"seeds": [0]}, "versions": {}, "runs": {}}
    b = {"settings": {"seeds": [1]}, "versions": {}, "runs": {}}
    save_results(file, a, [])
    save_results(file, b, [])
    a["runs"]["ds0/t"] = {"metrics": {"dice": 0.8}}
    save_results(file, a, ["ds0/t"])
    b["runs"]["ds1/t"] = {"metrics": {"dice": 0.7}}
    save_results(file, b, ["ds1/t"])
    on_disk = json.loads(file.read_text())
    assert set(on_disk["runs"]) == {"ds0/t", "ds1/t"} and on_disk == b
    assert on_disk["invocations"] == [{"seeds": [0]}, {"seeds": [1]}]
    b["runs"]["ds0/t"] = {"metrics": {"dice": 0.0}}  # a run the command did not write is not overwritten
    save_results(file, b, [])
    assert json.loads(file.read_text())["runs"]["ds0/t"]["metrics"]["dice"] == 0.8
    assert not list(tmp_path.glob("*.tmp"))


def test_noisy_copy_png_is_deterministic_and_never_touches_the_source(tmp_path):
    src = tmp_path / "Dataset001_Src"
    make_phantom_dataset(src, 2, 32, 10, 1, NoiseSpec("none", alpha=0), seed=3)
    for sub in ("imagesTs", "labelsTs"):  # no test split: the benchmark holds one out itself
        shutil.rmtree(src / sub)
    before = _digest(src)
    spec = NoiseSpec("alphabeta", alpha=1.0, beta=0.5)
    a = noisy_copy(src, tmp_path / "Dataset002_A", spec, seed=7, test_fraction=0.2)
    noisy_copy(src, tmp_path / "Dataset003_B", spec, seed=7, test_fraction=0.2)
    noisy_copy(src, tmp_path / "Dataset004_C", spec, seed=8, test_fraction=0.2)
    assert _digest(src) == before
    assert (a["training_cases"], a["test_cases"]) == (8, 2) and a["corrupted_cases"] == 8
    assert _digest(tmp_path / "Dataset002_A" / "labelsTr") == _digest(tmp_path / "Dataset003_B" / "labelsTr")
    assert _digest(tmp_path / "Dataset002_A" / "labelsTr") != _digest(tmp_path / "Dataset004_C" / "labelsTr")
    out = tmp_path / "Dataset002_A"
    train = sorted(p.name for p in (out / "labelsTr").iterdir())
    test = sorted(p.name for p in (out / "labelsTs").iterdir())
    assert not set(train) & set(test) and len(list((out / "imagesTs").iterdir())) == 2
    assert all(p.is_symlink() for p in (out / "imagesTr").iterdir())
    for name in train:
        clean = np.array(Image.open(out / "labelsTr_clean" / name)) > 0
        noisy = np.array(Image.open(out / "labelsTr" / name)) > 0
        changed = np.array(Image.open(out / "noiseTr" / name)) > 0
        assert np.array_equal(changed, clean ^ noisy)
        assert changed.sum() >= 0.3 * clean.sum()  # alpha = 1: every case changed by about beta (0.5) or more
    for name in test:  # test labels stay clean
        assert np.array_equal(np.array(Image.open(out / "labelsTs" / name)),
                              np.array(Image.open(src / "labelsTr" / name)))
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 8


def test_noisy_copy_nifti_keeps_geometry(tmp_path):
    src = tmp_path / "Dataset001_Src3D"
    make_phantom_dataset(src, 3, 16, 4, 2, NoiseSpec("none", alpha=0), seed=1, spacing=(3.0, 1.0, 1.0))
    noisy_copy(src, tmp_path / "Dataset002_N", NoiseSpec("markov", alpha=1.0, markov_steps=10), seed=0,
               test_fraction=0.2)
    for f in sorted((src / "labelsTr").glob("*.nii.gz")):
        a, b = sitk.ReadImage(str(f)), sitk.ReadImage(str(tmp_path / "Dataset002_N" / "labelsTr" / f.name))
        assert (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == \
               (b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection())
        assert not np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_bench_command_end_to_end_rerun_and_oracle_masks(tmp_path):
    out = tmp_path / "bench"
    cmd = [tool("nnUNetv2_dale_bench"), "-s", "phantoms:2:32:10", "-o", str(out), "--noise", "clean",
           "alphabeta:alpha=1,beta=0.5", "-tr", "nnUNetTrainer", "nnUNetTrainerDALE", "--epochs", "2",
           "--iters", "4"]
    env = clean_env()
    proc = run(cmd, env, timeout=1200)
    assert "epoch" in proc.stdout and "wrote" in proc.stdout  # progress and report
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 4 and results["settings"]["epochs"] == 2 and results["versions"]["nnunetv2"]
    for record in runs.values():
        assert 0.0 <= record["metrics"]["dice"] <= 1.0 and len(record["per_case"]) == 4
        log = (out / record["log"]).read_text()
        assert "Budget: 2 epochs x 4 iterations" in log  # every trainer ran the same budget
    dale = next(r for r in runs.values() if r["trainer"] == "nnUNetTrainerDALE" and r["noise"] != "clean")
    assert 0.0 <= dale["noise_detection"]["auroc"] <= 1.0 and dale["noise_detection"]["known_fraction"] > 0.5
    assert next(r for r in runs.values() if r["trainer"] == "nnUNetTrainer")["trainer_class"] == "nnUNetTrainerBudget"
    # which code produced each run: DALE's hyperparameters, their hash, the version, the noise estimate
    from nnunetv2_dale import __version__
    from nnunetv2_dale.bench.provenance import defaults, hyperparameter_hash

    assert all(r["package_version"] == __version__ for r in runs.values())
    assert dale["hyperparameters"] == defaults() and dale["hyperparameter_hash"] == hyperparameter_hash(defaults())
    assert 0 <= dale["noise_estimate"]["median_case_share"] and 0 <= dale["noise_estimate"]["gate"] <= 1
    assert "hyperparameters" not in next(r for r in runs.values() if r["trainer"] == "nnUNetTrainer")
    report = (out / "report.md").read_text()
    assert "nnUNetTrainerDALE (today's defaults)" in report
    assert report.count("| Phantom2D |") == 8 and "Δ Dice" in report  # 4 runs: the summary and the per-seed table
    assert "| dataset | noise | trainer | seed 0 |" in report
    for fig in ("dice_vs_noise_Phantom2D.png", "examples_test_Phantom2D.png", "examples_train_Phantom2D.png"):
        assert (out / fig).stat().st_size > 1000
    from test_benchmark_scripts import bench_folder_scripts

    bench_folder_scripts(out, next(k.split("/")[0] for k, r in runs.items() if r is dale))
    # rerunning the same command neither retrains nor re-predicts finished runs
    logs = {p: p.stat().st_mtime for p in (out / "logs").iterdir()}
    preds = {p: p.stat().st_mtime for p in (out / "predictions").rglob("*.png")}
    again = run(cmd, env, timeout=600)
    assert again.stdout.count("already scored") == 4
    assert {p: p.stat().st_mtime for p in (out / "logs").iterdir()} == logs
    assert {p: p.stat().st_mtime for p in (out / "predictions").rglob("*.png")} == preds and preds
    # the oracle's noise masks, built in preprocessed geometry, cover as many voxels of the fold's
    # training cases as the benchmark's raw noiseTr masks do (same folder: its data are planned)
    oracle = run([*cmd[:cmd.index("--noise")], "--noise", "alphabeta:alpha=1,beta=0.5", "-tr",
                  "nnUNetTrainerOracleIgnore", *cmd[cmd.index("--epochs"):]], env, timeout=600)
    assert oracle.stdout.count("already scored") == 0
    raw = next((out / "nnUNet_raw").glob("Dataset*aba*"))
    train = json.loads((out / "nnUNet_preprocessed" / raw.name / "splits_final.json").read_text())[0]["train"]
    masks = [np.array(Image.open(raw / "noiseTr" / f"{k}.png")) > 0 for k in train]
    expected = sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)
    log = next((out / "nnUNet_results" / raw.name).glob("nnUNetTrainerOracleIgnore__*/fold_0/training_log_*.txt"))
    found = re.search(r"Oracle: noise masks of (\d+) cases, ([0-9.]+)% of voxels changed", log.read_text())
    assert found and int(found.group(1)) == len(train)
    assert expected > 0.02 and float(found.group(2)) / 100 == pytest.approx(expected, abs=6e-5)


def test_subset_is_deterministic_resized_and_never_touches_the_source(tmp_path):
    from nnunetv2_dale.bench.subset import derive_subset

    src = tmp_path / "Dataset001_Src"
    make_phantom_dataset(src, 2, 64, 10, 3, NoiseSpec("none", alpha=0), seed=5)
    before = _digest(src)
    a = derive_subset(src, tmp_path / "Dataset002_A", 6, 32)
    b = derive_subset(src, tmp_path / "Dataset003_B", 6, 32)
    assert _digest(src) == before and _digest(a) == _digest(b)
    assert len(list((a / "labelsTr").iterdir())) == 6 and len(list((a / "labelsTs").iterdir())) == 3
    assert json.loads((a / "dataset.json").read_text())["numTraining"] == 6
    for label in (a / "labelsTr").iterdir():
        small = np.array(Image.open(label))
        image = np.array(Image.open(a / "imagesTr" / label.name.replace(".png", "_0000.png")))
        assert small.shape == image.shape == (32, 32) and set(np.unique(small)) <= {0, 1}
        big = np.array(Image.open(src / "labelsTr" / label.name)) > 0
        assert dice(small > 0, big.reshape(32, 2, 32, 2).mean((1, 3)) >= 0.5) > 0.85  # the same lesion, halved
    unresized = derive_subset(src, tmp_path / "Dataset004_C", 4, None)
    assert all(p.is_symlink() for p in (unresized / "imagesTr").iterdir())
    with pytest.raises(SystemExit, match="2D PNG datasets only"):
        nifti = tmp_path / "Dataset005_N"
        make_phantom_dataset(nifti, 3, 8, 2, 1, NoiseSpec("none", alpha=0), seed=0)
        derive_subset(nifti, tmp_path / "Dataset006_M", None, 4)


def test_report_pairs_runs_with_the_baseline_under_either_name():
    """`-tr nnUNetTrainer` and `-tr nnUNetTrainerBudget` run the same stock trainer: either is the baseline."""
    from nnunetv2_dale.bench.report import table

    def rec(trainer, noise, dice):
        return {"dataset": "D", "noise": noise, "trainer": trainer, "seed": 0, "noise_info": {"mean_changed_fraction": 0.0},
                "metrics": {"dice": dice, "band_dice": dice, "hd95": 1.0}}

    for baseline in ("nnUNetTrainer", "nnUNetTrainerBudget"):
        runs = {f"{t}{n}": rec(t, n, d) for t, n, d in ((baseline, "clean", 0.9), (baseline, "noisy", 0.7),
                                                        ("nnUNetTrainerDALE", "noisy", 0.75))}
        row = next(line for line in table({"runs": runs}).splitlines() if "| noisy" in line and "DALE" in line)
        assert "| 0.0500 | +25% |" in row, row


def test_committed_records_are_reproducible_under_their_trainer_names():
    """Every committed benchmark record that carries its hyperparameters is what its trainer class
    trains with today (so changing a default must also pin it in the variants measured before).
    Knobs added after a record are absent from it; gate thresholds are inert where its gate was off.
    The records under today's name carry today's hash, so the report marks them (a knob added at
    its neutral value leaves the hash as it was)."""
    import nnunetv2_dale.bench.oracles as oracles
    import nnunetv2_dale.method.trainer as trainer
    import nnunetv2_dale.method.variants as variants
    from nnunetv2_dale.bench.provenance import defaults, hyperparameter_hash, hyperparameters_of

    files = sorted((Path(__file__).resolve().parents[1] / "benchmarks").rglob("results.json"))
    checked = 0
    for file in files:
        for key, record in json.loads(file.read_text())["runs"].items():
            if "hyperparameters" not in record:
                continue
            name = key.split("/")[1]
            cls = next(getattr(m, name) for m in (variants, trainer, oracles) if hasattr(m, name))
            now, then = hyperparameters_of(cls), record["hyperparameters"]
            inert = {"dale_gate_low", "dale_gate_high"} if then.get("dale_noise_gate") == "False" else set()
            differ = {k: (v, now.get(k)) for k, v in then.items() if k not in inert and now.get(k) != v}
            assert not differ, f"{file.parent.name} {key}: recorded vs now {differ}"
            if name == "nnUNetTrainerDALE":
                assert record["hyperparameter_hash"] == hyperparameter_hash(defaults()), f"{file.parent.name} {key}"
            checked += 1
    assert checked >= 40, f"only {checked} records with hyperparameters under benchmarks/"
