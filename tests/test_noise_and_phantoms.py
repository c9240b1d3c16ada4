"""The noise models deliver the statistic they promise; phantom datasets are valid and seedable."""
from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
from PIL import Image

from nnunetv2_dale.data.noise import (NoiseSpec, alpha_beta_mask, changed_fraction, corrupt_label,
                                 markov_boundary_mask, missed_spurious_mask)
from nnunetv2_dale.data.phantoms import make_phantom_dataset, phantom_case


def _disc(shape=(64, 64), radius=12) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 <= radius ** 2


@pytest.mark.parametrize("beta", [0.5, 0.7])
def test_alpha_beta_reaches_target_change(beta):
    rng = np.random.default_rng(1)
    clean = _disc()
    for _ in range(12):
        noisy = alpha_beta_mask(clean, beta, rng)
        frac = changed_fraction(clean, noisy)
        # one dilation/erosion step or half-voxel shift overshoots by at most ~0.35 at this size
        assert beta <= frac <= beta + 0.35, frac
    assert clean.sum() == _disc().sum(), "input must not be modified"


def test_corrupt_label_hits_alpha_fraction_of_cases():
    rng = np.random.default_rng(0)
    spec = NoiseSpec(model="alphabeta", alpha=0.3, beta=0.5)
    label = _disc().astype(np.uint8)
    corrupted = [corrupt_label(label, spec, rng)[1].any() for _ in range(300)]
    assert abs(np.mean(corrupted) - 0.3) < 0.07


def test_corrupt_label_changed_mask_is_exact():
    rng = np.random.default_rng(3)
    label = _disc().astype(np.uint8)
    noisy, changed = corrupt_label(label, NoiseSpec(alpha=1.0), rng)
    assert changed.any()
    np.testing.assert_array_equal(changed, noisy != label)


def test_markov_noise_perturbs_boundary_only_near_it():
    rng = np.random.default_rng(0)
    clean = _disc(radius=16)
    noisy = markov_boundary_mask(clean, rng, steps=100, theta1=0.8)
    frac = changed_fraction(clean, noisy)
    assert 0.02 < frac < 1.0
    assert noisy.sum() > clean.sum(), "theta1=0.8 mostly grows the mask"
    far = np.ones_like(clean)
    far[4:-4, 4:-4] = False  # a frame 6+ pixels beyond anything 100 growth steps reach
    assert not noisy[far & ~clean].any(), "the blur+threshold removes isolated flips"


def test_missed_and_spurious_components():
    rng = np.random.default_rng(0)
    clean = _disc(radius=6)
    dropped = missed_spurious_mask(clean, rng, p_drop=1.0, n_spurious=0)
    assert not dropped.any()
    added = missed_spurious_mask(clean, rng, p_drop=0.0, n_spurious=2, radius=3)
    assert added.sum() > clean.sum() and (added & clean).sum() == clean.sum()


@pytest.mark.parametrize("shape", [(48, 48), (24, 24, 24)])
def test_phantom_lesion_is_darker_with_fuzzy_boundary(shape):
    image, label = phantom_case(np.random.default_rng(5), shape)
    assert image.shape == label.shape == shape
    assert 0.01 < label.mean() < 0.5
    assert image[label == 1].mean() < image[label == 0].mean() - 0.05  # hypo-intense, low contrast


def test_phantom_dataset_layout_and_determinism(tmp_path):
    a = make_phantom_dataset(tmp_path / "a" / "Dataset900_X", dim=2, size=32, num_train=6, num_test=2, seed=4)
    b = make_phantom_dataset(tmp_path / "b" / "Dataset900_X", dim=2, size=32, num_train=6, num_test=2, seed=4)
    c = make_phantom_dataset(tmp_path / "c" / "Dataset900_X", dim=2, size=32, num_train=6, num_test=2, seed=5)
    for sub in ("imagesTr", "labelsTr", "labelsTs", "labelsTr_clean"):
        names = sorted(p.name for p in (a / sub).iterdir())
        assert names and filecmp.cmpfiles(a / sub, b / sub, names, shallow=False)[0] == names
    assert not filecmp.cmp(a / "imagesTr" / "phantom_0000_0000.png", c / "imagesTr" / "phantom_0000_0000.png",
                           shallow=False)
    meta = json.loads((a / "phantoms.json").read_text())
    ds = json.loads((a / "dataset.json").read_text())
    assert ds["numTraining"] == 6 and ds["file_ending"] == ".png"
    for i in range(6):
        case = f"phantom_{i:04d}"
        noisy = np.array(Image.open(a / "labelsTr" / f"{case}.png"))
        clean = np.array(Image.open(a / "labelsTr_clean" / f"{case}.png"))
        changed = np.array(Image.open(a / "noiseTr" / f"{case}.png")).astype(bool)
        np.testing.assert_array_equal(noisy != clean, changed)
        assert (case in meta["corrupted_cases"]) == changed.any()
    assert sorted(p.name for p in (a / "imagesTs").iterdir()) == ["phantom_0006_0000.png", "phantom_0007_0000.png"]
