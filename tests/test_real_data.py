"""The trainer on real data: a slice of ../shared/data/Dataset601_DDTI (thyroid ultrasound, PNG).

Skipped, with the reason, where the shared data folder is absent (e.g. a user's checkout)."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import SHARED_DDTI, NNUNetTree, run, tool

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED_DDTI / "dataset.json").is_file(),
                                 reason=f"real dataset not present at {SHARED_DDTI} (only in the project workspace)")]


def test_ddti_subset_trains_and_validates(tmp_path):
    tree = NNUNetTree(tmp_path)
    target = tree.raw / "Dataset601_DDTI"
    cases = sorted(p.name for p in (SHARED_DDTI / "labelsTr").glob("*.png"))[:10]
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True)
    for case in cases:  # copy, never link: the shared folder must stay untouched
        shutil.copy(SHARED_DDTI / "labelsTr" / case, target / "labelsTr" / case)
        shutil.copy(SHARED_DDTI / "imagesTr" / case.replace(".png", "_0000.png"), target / "imagesTr")
    ds = json.loads((SHARED_DDTI / "dataset.json").read_text())
    ds["numTraining"] = len(cases)
    (target / "dataset.json").write_text(json.dumps(ds))

    env = tree.env(nnUNet_DALE_iters="2", nnUNet_DALE_val_iters="1")
    run([tool("nnUNetv2_plan_and_preprocess"), "-d", "601", "-c", "2d", "-np", "1"], env)
    run([tool("nnUNetv2_train"), "601", "2d", "0", "-tr", "nnUNetTrainerDALE_1epoch", "-device", "cpu"], env)
    fold = tree.results / "Dataset601_DDTI" / "nnUNetTrainerDALE_1epoch__nnUNetPlans__2d" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert (fold / "checkpoint_final.pth").exists() and len(summary["metric_per_case"]) == 2
