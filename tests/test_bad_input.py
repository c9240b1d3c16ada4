"""Bad set-ups give one clear message (what is wrong, what to run) and no traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import NNUNetTree, clean_env, run, tool
from nnunetv2_dale.data.noise import NoiseSpec
from nnunetv2_dale.data.phantoms import make_phantom_dataset


def assert_clear_failure(proc, *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "nnunetv2-dale:" in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_check_reports_missing_path_variables(tmp_path):
    proc = run([tool("nnUNetv2_dale_check")], clean_env(nnUNet_raw=tmp_path), check=False)
    assert_clear_failure(proc, "nnUNet_preprocessed", "nnUNet_results", "export nnUNet_results=")


def test_check_reports_unknown_dataset(tmp_path):
    tree = NNUNetTree(tmp_path)
    proc = run([tool("nnUNetv2_dale_check"), "-d", "977"], tree.env(), check=False)
    assert_clear_failure(proc, "dataset 977", "nnUNetv2_plan_and_preprocess -d 977")


def test_check_reports_unwritable_results(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = clean_env(nnUNet_raw=tmp_path, nnUNet_preprocessed=tmp_path, nnUNet_results=blocker / "results")
    proc = run([tool("nnUNetv2_dale_check")], env, check=False)
    assert_clear_failure(proc, "cannot be written", str(blocker / "results"))


def test_check_reports_broken_torchvision(tmp_path):
    # The real failure (PyPI torchvision next to CPU torch 2.13.0) cannot be installed in a test;
    # a torchvision that raises the same error on import stands in for it.
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = NNUNetTree(tmp_path / "tree").env(PYTHONPATH=str(tmp_path / "fake"))
    proc = run([tool("nnUNetv2_dale_check")], env, check=False)
    assert_clear_failure(proc, "torchvision::nms", "torch==2.14.1", "pip install -c constraints.txt")


def test_make_phantoms_refuses_to_overwrite(tmp_path):
    env = clean_env(nnUNet_raw=tmp_path)
    run([tool("nnUNetv2_dale_make_phantoms"), "-d", "970", "--num-train", "2", "--num-test", "1", "--size", "16"], env)
    proc = run([tool("nnUNetv2_dale_make_phantoms"), "-d", "970"], env, check=False)
    assert_clear_failure(proc, "already exists")


def test_make_phantoms_needs_an_output(tmp_path):
    proc = run([tool("nnUNetv2_dale_make_phantoms")], clean_env(), check=False)
    assert_clear_failure(proc, "nnUNet_raw")


@pytest.mark.slow
def test_trainer_startup_errors_through_nnunet_cli(tiny2d, tmp_path):
    tree, did, _ = tiny2d
    train = [tool("nnUNetv2_train"), str(did), "2d", "0", "-tr", "nnUNetTrainerDALE_1epoch", "-device", "cpu"]

    # output folder that cannot be written
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    env = tree.env()
    env["nnUNet_results"] = str(blocker / "results")
    assert_clear_failure(run(train, env, check=False), "cannot be written")

    # a budget override that is not a number
    assert_clear_failure(run(train, tree.env(nnUNet_DALE_iters="ten"), check=False), "nnUNet_DALE_iters='ten'")

    # a configuration that was planned but not preprocessed
    copy = NNUNetTree(tmp_path / "copy")
    shutil.copytree(tree.preprocessed, copy.preprocessed, dirs_exist_ok=True)
    name = next(p.name for p in copy.preprocessed.iterdir())
    shutil.rmtree(copy.preprocessed / name / "nnUNetPlans_2d")
    assert_clear_failure(run(train, copy.env(), check=False), "no preprocessed data for '2d'",
                         f"nnUNetv2_preprocess -d {did} -c 2d")
    assert not any(Path(copy.results).rglob("*.pth"))


@pytest.mark.slow
def test_region_based_dataset_is_refused_with_the_alternative(tmp_path):
    """BraTS-style regions (regions_class_order): DALE's confidence is per class, so it refuses
    at start and names the stock trainer."""
    tree = NNUNetTree(tmp_path)
    raw = make_phantom_dataset(tree.raw / "Dataset986_Regions", 2, 32, 5, 1, NoiseSpec("none", alpha=0), seed=986)
    ds = json.loads((raw / "dataset.json").read_text())
    ds.update(labels={"background": 0, "whole": [1, 2], "core": [2]}, regions_class_order=[1, 2])
    (raw / "dataset.json").write_text(json.dumps(ds))
    run([tool("nnUNetv2_plan_and_preprocess"), "-d", "986", "-c", "2d", "-np", "1"], tree.env())
    proc = run([tool("nnUNetv2_train"), "986", "2d", "0", "-tr", "nnUNetTrainerDALE_1epoch", "-device", "cpu"],
               tree.env(), check=False)
    assert_clear_failure(proc, "region-based training", "-tr nnUNetTrainer")
    assert not any(tree.results.rglob("*.pth"))


def test_nonfinite_network_output_skips_memory_and_step_and_is_logged(tiny2d, monkeypatch):
    """A real trainer whose network returns NaN for one of three training steps (a forward hook
    stands in for a diverging model or corrupt input): that step updates neither the memory nor
    the weights, the others do, and the epoch's log line says what was skipped."""
    import numpy as np
    import torch

    from conftest import inprocess_trainer

    tree, did, _ = tiny2d
    trainer = inprocess_trainer(tree, did, "2d", monkeypatch)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        if len(calls) == 2:
            return [o * float("nan") for o in output] if isinstance(output, (list, tuple)) else output * float("nan")

    trainer.network.register_forward_hook(poison)
    visited, weights = [], []
    outputs = []
    for _ in range(3):
        batch = next(trainer.dataloader_train)
        outputs.append(trainer.train_step(batch))
        visited.append(sum(int((trainer.memory.case_arrays(k)[1] > 0).sum()) for k in trainer.memory.case_shapes))
        weights.append([p.detach().clone() for p in trainer.network.parameters()])
    assert visited[0] > 0 and visited[1] == visited[0] and visited[2] > visited[1]  # step 2 left the memory alone
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # ... and the weights
    assert all(torch.isfinite(p).all() for p in weights[2]) and not all(
        torch.equal(a, b) for a, b in zip(weights[1], weights[2]))
    for key in trainer.memory.case_shapes:
        assert np.isfinite(trainer.memory.case_arrays(key)[0].astype(np.float32)).all()
    trainer.on_train_epoch_end(outputs)
    log = Path(trainer.log_file).read_text()
    batch_size = trainer.configuration_manager.batch_size
    assert f"{batch_size} patches with non-finite network output skipped (memory not updated)" in log
    assert "1 optimizer steps skipped (non-finite gradients)" in log
