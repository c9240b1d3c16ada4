"""End to end through nnU-Net's own command line on tiny generated data, with -device cpu:
train, kill, --c continue, --val --npz, predict, find_best_configuration, and our demo."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from conftest import run, tool, train_until_killed

pytestmark = pytest.mark.slow
BUDGET = {"nnUNet_DALE_iters": "2", "nnUNet_DALE_val_iters": "1", "nnUNet_DALE_save_every": "1"}


def test_2d_train_kill_continue_val_predict_find_best(tiny2d, tmp_path):
    tree, did, raw = tiny2d
    env = tree.env(**{**BUDGET, "nnUNet_DALE_iters": "10"})  # epoch 1 must outlast the kill
    trainer = "nnUNetTrainerDALE_2epochs"
    train = [tool("nnUNetv2_train"), str(did), "2d", "0", "-tr", trainer, "-device", "cpu"]
    assert not list(tree.results.glob(f"*/{trainer}__*")), "this trainer must start from scratch"

    # 1. killed during epoch 1, after epoch 0 wrote checkpoint_latest.pth
    out = train_until_killed(train, env, marker="Epoch 1")
    assert "nnUNetTrainerDALE_2epochs (nnunetv2-dale" in out and "Budget: 2 epochs x 10 iterations" in out
    fold = next(tree.results.glob(f"*/{trainer}__nnUNetPlans__2d/fold_0"))
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1 and latest["trainer_name"] == trainer
    assert not (fold / "checkpoint_final.pth").exists()

    # 2. --c picks up at epoch 1 and finishes
    out = run(train + ["--c"], env).stdout
    assert "Epoch 1" in out and "Epoch 0\n" not in out
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2
    # the saved network is nnU-Net's plain architecture (no extra state for inference to trip on)
    plain = {k for k in final["network_weights"]}
    assert plain and all(k.startswith(("encoder.", "decoder.")) for k in plain)

    # 3. --val --npz re-runs validation and keeps the softmax
    run(train + ["--val", "--npz"], env)
    assert list((fold / "validation").glob("*.npz")) and (fold / "validation" / "summary.json").exists()

    # 4. stock predictor, stock CLI
    pred = tmp_path / "pred"
    run([tool("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(did), "-c", "2d",
         "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    for image in sorted((raw / "imagesTs").glob("*_0000.png")):
        out_file = pred / image.name.replace("_0000.png", ".png")
        assert out_file.exists()
        seg = np.array(Image.open(out_file))
        assert seg.shape == np.array(Image.open(image)).shape and set(np.unique(seg)) <= {0, 1}

    # 5. find_best_configuration with our trainer
    run([tool("nnUNetv2_find_best_configuration"), str(did), "-tr", trainer, "-c", "2d", "-f", "0", "-np", "1"], env)
    info = json.loads(next(tree.results.glob("*/inference_information.json")).read_text())
    assert info["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] == trainer


@pytest.mark.parametrize("dataset", ["tiny3d", "aniso3d"])
def test_3d_fullres_train_and_predict_geometry(dataset, request, tmp_path):
    """Isotropic, and anisotropic (4 x 1 x 1 mm: nnU-Net trains it with dummy-2D augmentation)."""
    tree, did, raw = request.getfixturevalue(dataset)
    env = tree.env(**BUDGET)
    trainer = "nnUNetTrainerDALE_1epoch"
    out = run([tool("nnUNetv2_train"), str(did), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env).stdout
    assert f"do_dummy_2d_data_aug: {dataset == 'aniso3d'}" in out
    fold = next(tree.results.glob(f"*/{trainer}__nnUNetPlans__3d_fullres/fold_0"))
    visited = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    assert visited["dale_visited_fraction"][-1] > 0  # the coordinate maps followed the augmentation
    pred = tmp_path / "pred"
    run([tool("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(did), "-c",
         "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env)
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    assert images
    for image in images:
        ref = sitk.ReadImage(str(image))
        seg = sitk.ReadImage(str(pred / image.name.replace("_0000.nii.gz", ".nii.gz")))
        assert seg.GetSize() == ref.GetSize()
        assert np.allclose(seg.GetSpacing(), ref.GetSpacing()) and np.allclose(seg.GetOrigin(), ref.GetOrigin())
        assert np.allclose(seg.GetDirection(), ref.GetDirection())


def test_demo_command_small(tmp_path):
    """The demo trains stock nnU-Net and DALE on the same noisy phantoms and prints both clean-label
    Dice figures, each the one nnUNetv2_evaluate_simple wrote for that trainer's predictions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    out = run([tool("nnUNetv2_dale_demo"), "--workdir", str(tmp_path / "demo"), "--num-train", "8", "--num-test",
               "2", "--size", "32", "--epochs", "1", "--iters", "2"], env).stdout
    assert "[6/6]" in out
    table = out.split("Test Dice against the CLEAN test labels (2 cases)")[1]
    for name, trainer in (("nnU-Net", "nnUNetTrainerBudget"), ("DALE", "nnUNetTrainerDALE")):
        dice = float(re.search(rf"^  {re.escape(name)} +{trainer} +([0-9.]+)", table, re.M).group(1))
        summary = json.loads((tmp_path / "demo" / f"predictions_test_{trainer}" / "summary.json").read_text())
        assert dice == pytest.approx(summary["foreground_mean"]["Dice"], abs=1e-4)
        assert len(summary["metric_per_case"]) == 2
        assert (tmp_path / "demo" / "nnUNet_results" / "Dataset990_DemoPhantom2D" / f"{trainer}__nnUNetPlans__2d"
                / "fold_0" / "checkpoint_final.pth").is_file()
