"""The label-noise estimate and the gate that scales DALE's objective by it (issue 27)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_dale.method.noise_estimate import NoiseEstimate, case_counts, ramp


def _disc(radius: float, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius ** 2)[None]


def _ensemble_of(truth: np.ndarray) -> np.ndarray:
    """A blurred early-network ensemble p(foreground) of the true mask: undecided at its rim."""
    return ndimage.gaussian_filter(truth.astype(np.float32), (0, 1.5, 1.5))[..., None].astype(np.float16)


def test_the_rim_does_not_count_a_dilated_label_does():
    truth = _disc(10)
    q, visits = _ensemble_of(truth), np.full(truth.shape, 5, np.uint8)
    clean = case_counts(q, visits, truth.astype(np.int64), 3, 2.5)
    assert clean[0] == 0 and clean[1] == truth.sum() and clean[2] == truth.size
    dilated = ndimage.binary_dilation(truth, ndimage.generate_binary_structure(3, 1)[1:2], iterations=5)
    noisy = case_counts(q, visits, dilated.astype(np.int64), 3, 2.5)
    band = dilated & ~truth  # labelled foreground the ensemble calls background
    assert 0.1 * band.sum() < noisy[0] <= band.sum()
    # rarely visited voxels are not known: they never count
    assert case_counts(q, np.full(truth.shape, 2, np.uint8), dilated.astype(np.int64), 3, 2.5) == (0, 0, 0)
    # several classes: q holds one channel per class
    q3 = np.concatenate([1 - q.astype(np.float32), q.astype(np.float32), np.zeros_like(q, np.float32)], -1)
    assert case_counts(q3, visits, dilated.astype(np.int64), 3, 2.5) == noisy


def test_the_rim_grows_with_the_lesion_so_the_estimate_does_not_depend_on_the_resolution():
    """One geometry at two resolutions (a lesion of radius R, its label drawn at 1.4 R, an ensemble
    blurred by 1.5 voxels at both): with the rim a share of the lesion's mean depth both read the
    same share; with a fixed rim of 2.5 voxels the finer one reads much noisier (128x128 DDTI)."""
    shares = {}
    for radius, size in ((16, 64), (32, 128)):
        truth = _disc(radius, size)
        label = _disc(1.4 * radius, size).astype(np.int64)
        q, visits = _ensemble_of(truth), np.full(truth.shape, 5, np.uint8)
        for depth_share in (0.0, 0.6):
            contradicted, fg, _ = case_counts(q, visits, label, 3, 2.5, depth_share)
            shares[radius, depth_share] = contradicted / fg
            assert case_counts(q, visits, truth.astype(np.int64), 3, 2.5, depth_share)[0] == 0  # clean: nothing
    assert shares[16, 0.6] == pytest.approx(shares[32, 0.6], abs=0.01) and shares[32, 0.6] > 0.05
    assert shares[32, 0.0] - shares[16, 0.0] > 0.1


def test_gate_follows_the_median_case_and_survives_a_round_trip():
    assert ramp(0.05, 0.08, 0.14) == 0 and ramp(0.2, 0.08, 0.14) == 1 and ramp(0.11, 0.08, 0.14) == pytest.approx(0.5)
    assert ramp(float("nan"), 0.08, 0.14) == 0
    keys = [f"case{i}" for i in range(5)]
    fg = np.array([100, 100, 100, 100, 0])
    quiet = NoiseEstimate(keys, np.array([2, 4, 5, 90, 0]), fg, fg * 4, 0.08, 0.14, 2.5, epoch=3)
    assert quiet.median_case() == pytest.approx(0.045) and quiet.gate() == 0  # one bad case does not switch it on
    loud = NoiseEstimate(keys, np.array([20, 30, 40, 90, 0]), fg, fg * 4, 0.08, 0.14, 2.5)
    assert loud.gate() == 1 and loud.lesion_share() == pytest.approx(0.45)
    again = NoiseEstimate.from_dict(quiet.to_dict())
    assert again.to_dict() == quiet.to_dict()
    text = quiet.summary()
    assert "case3 (90%)" in text and "stock nnU-Net" in text


def test_dale_trains_as_stock_nnunet_when_the_gate_is_closed(tiny2d, monkeypatch):
    """With a filled memory that doubts many labels, a closed gate (labels that look clean) gives
    nnU-Net's own loss in the stable and the fuzzy phase, alignment included; an open gate does not."""
    from conftest import inprocess_trainer

    from nnunetv2_dale.method.rsets import Mixture
    from nnunetv2_dale.method.schedule import FUZZY, STABLE

    tree, did, _ = tiny2d
    trainer = inprocess_trainer(tree, did, "2d", monkeypatch)
    trainer.on_train_start()
    rng = np.random.default_rng(0)
    for key in trainer.memory.case_shapes:
        q, n = trainer.memory._open(key)
        q[:] = rng.random(q.shape).astype(np.float16)
        n[:] = 10
        del q, n
    trainer.mixtures = [Mixture((0.6, 0.4), (0.2, 1.5), (0.3, 0.3), True) for _ in range(2)]
    keys = sorted(trainer.memory.case_shapes)
    ones = np.ones(len(keys), np.int64) * 100
    closed = NoiseEstimate(keys, ones * 0, ones, ones, 0.08, 0.14, 2.5)
    open_ = NoiseEstimate(keys, ones * 50, ones, ones, 0.08, 0.14, 2.5)
    batch = next(trainer.dataloader_train)
    data = batch["data"]
    losses = {}
    for name, estimate in (("open", open_), ("closed", closed)):  # the open stable phase fills the reference
        trainer.noise_estimate = estimate
        assert trainer.noise_gate() == estimate.gate()
        for phase in (STABLE, FUZZY):
            trainer.current_epoch = trainer.num_epochs - 1  # alignment weight at its maximum
            trainer.alignment.active = True
            output = trainer.network(data)
            trainer.alignment.active = False
            loss, _ = trainer.dale_loss(batch, output, batch["target"], phase)
            trainer.alignment.features = None
            losses[name, phase] = (float(loss.detach()), float(trainer.loss(output, batch["target"]).detach()))
    # dale_correction_in_loss False (_discount): under the open gate the fuzzy phase's loss is the
    # stable phase's confidence-weighted one instead of the pull toward the collaborative target
    trainer.noise_estimate, trainer.dale_use_alignment = open_, False
    output = trainer.network(data)
    phases = {}
    for name, in_loss, phase in (("stable", True, STABLE), ("corrected", True, FUZZY), ("discounted", False, FUZZY)):
        trainer.dale_correction_in_loss = in_loss
        phases[name] = float(trainer.dale_loss(batch, output, batch["target"], phase)[0].detach())
    assert phases["discounted"] == pytest.approx(phases["stable"], rel=1e-6)
    assert abs(phases["corrected"] - phases["stable"]) > 1e-3
    trainer.dale_use_alignment, trainer.dale_case_gate = True, False  # first without the per-case gate
    # the per-case gate (dale_case_gate): the dataset looks noisy (gate 1, from cases outside this
    # batch), the batch's own cases read clean, so their labels keep their weight
    ghosts = [f"ghost{i}" for i in range(2 * len(keys))]
    mixed = NoiseEstimate(keys + ghosts, np.r_[ones * 0, np.full(len(ghosts), 50)], np.r_[ones, np.full(len(ghosts), 100)],
                          np.r_[ones, np.full(len(ghosts), 100)], 0.08, 0.14, 2.5)
    trainer.noise_estimate = mixed
    assert trainer.noise_gate() == 1 and trainer.sample_gates(keys + ghosts[:1]).tolist() == [1.0] * (len(keys) + 1)
    trainer.dale_case_gate = True
    assert trainer.sample_gates(keys + ghosts[:1]).tolist() == [0.0] * len(keys) + [1.0]
    trainer.dale_agreement_weights = True  # its discount follows the gate too
    for phase in (STABLE, FUZZY):
        trainer.alignment.active = True
        output = trainer.network(data)
        trainer.alignment.active = False
        loss, _ = trainer.dale_loss(batch, output, batch["target"], phase)
        trainer.alignment.features = None
        losses["cases", phase] = (float(loss.detach()), float(trainer.loss(output, batch["target"]).detach()))
    for phase in (STABLE, FUZZY):
        for name in ("closed", "cases"):
            dale, stock = losses[name, phase]
            assert dale == pytest.approx(stock, rel=1e-5), (name, phase)
        dale, stock = losses["open", phase]
        assert abs(dale - stock) > 1e-3
    assert bool(trainer.alignment.seen.any())
    trainer.memory.close()


def test_a_frozen_memory_under_a_shut_gate_leaves_nnunets_own_steps(tiny2d, monkeypatch):
    """Once the memory is frozen and the labels look clean, the estimate is final and DALE's
    objective is nnU-Net's: the steps skip DALE's per-voxel work and the workers build nnU-Net's
    own batches, without coordinate maps or buffer reads (the cost a GPU user would otherwise pay
    for nothing); an open gate uses both."""
    from conftest import inprocess_trainer

    tree, did, _ = tiny2d
    trainer = inprocess_trainer(tree, did, "2d", monkeypatch)
    trainer.on_train_start()
    keys = sorted(trainer.memory.case_shapes)
    ones = np.ones(len(keys), np.int64) * 100
    trainer._curve_horizon = 0  # frozen from epoch 0 on, so DALE's objective runs from epoch 0
    trainer.current_epoch = 0
    calls = []
    real_maps = trainer.rset_maps
    monkeypatch.setattr(trainer, "rset_maps", lambda batch, *phase: calls.append(1) or real_maps(batch, *phase))
    seen = {}
    for name, contradicted in (("closed", 0), ("open", 50)):
        trainer.noise_estimate = NoiseEstimate(keys, ones * contradicted, ones, ones, 0.08, 0.14, 2.5)
        trainer.on_train_epoch_start()
        batch = next(trainer.dataloader_train)
        calls.clear()
        loss = trainer.train_step(batch)["loss"]
        assert np.isfinite(loss)
        seen[name] = (trainer.steps_read_memory(), "dale_q" in batch, "regression_target" in batch, len(calls))
    # closed: nnU-Net's own batches (no coordinate maps: nothing is written to a frozen memory)
    assert seen == {"closed": (False, False, False, 0), "open": (True, True, True, 1)}
    with open(trainer.log_file) as f:
        assert "the steps are nnU-Net's" in f.read()
    trainer.memory.close()
