"""The DALE objective: it reduces to nnU-Net's loss when every omega = 1, the alignment term
behaves like a distance with gradient only to the network, the mixture finds two populations,
the schedule is a function of the epoch, and on labels with known injected noise a short CPU
training makes 1 - omega rank corrupted voxels above correct ones."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from PIL import Image

from conftest import run, tool
from nnunetv2_dale.method.alignment import FeatureAlignment, mass_share, moment_sums, w2_diagonal
from nnunetv2_dale.method.loss import DALELoss, collaborative_target, sharpen
from nnunetv2_dale.method.rsets import Mixture, auroc, case_confidence, entropy_signal, fit_mixture, histogram, loss_signal, \
    omega_per_voxel
from nnunetv2_dale.method.schedule import FUZZY, JOINT, STABLE, WARMUP, alignment_weight, phase_of_epoch


def stock_loss(ignore_label=None, ds_weights=None):
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, ds_weights) if ds_weights is not None else loss


@pytest.mark.parametrize("ignore_label", [None, 3])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_loss_equals_nnunet_dc_and_ce_when_omega_is_one(ignore_label, deep_supervision):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 16, 16), (2, 3, 8, 8), (2, 3, 4, 4)] if deep_supervision else [(2, 3, 16, 16)]
    outputs = [torch.randn(s, generator=g) for s in shapes]
    n_labels = 4 if ignore_label is not None else 3
    targets = [torch.randint(0, n_labels, (s[0], 1, *s[2:]), generator=g).float() for s in shapes]
    ds = [4 / 7, 2 / 7, 1 / 7] if deep_supervision else None
    ours = DALELoss(True, ignore_label, False, ds)
    out = outputs if deep_supervision else outputs[0]
    tgt = targets if deep_supervision else targets[0]
    reference = stock_loss(ignore_label, ds)(out, tgt)
    ones = [torch.ones_like(t) for t in targets]
    torch.testing.assert_close(ours(out, tgt), reference)
    torch.testing.assert_close(ours(out, tgt, weights=ones if deep_supervision else ones[0]), reference)
    # omega < 1 on some voxels changes the loss
    half = [w * 0.5 for w in ones]
    assert not torch.allclose(ours(out, tgt, weights=half if deep_supervision else half[0]), reference)


def test_soft_target_equal_to_onehot_gives_stock_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn((2, 2, 12, 12), generator=g)
    target = torch.randint(0, 2, (2, 1, 12, 12), generator=g).float()
    onehot = torch.zeros_like(logits).scatter_(1, target.long(), 1)
    torch.testing.assert_close(DALELoss(True, None, False, None)(logits, target, soft=onehot),
                               stock_loss()(logits, target))


def test_alignment_zero_for_identical_moments_positive_otherwise_gradient_to_features_only():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn((2, 4, 8, 8), generator=g)
    weights = torch.rand((2, 2, 8, 8), generator=g)
    align = FeatureAlignment(num_classes=2, momentum=1.0)
    align.update_reliable(feats, weights)
    assert float(align.loss(feats, weights)) == pytest.approx(0.0, abs=1e-6)
    shifted = (feats + 0.5).requires_grad_(True)
    value = align.loss(shifted, weights)
    assert float(value) > 0.1
    value.backward()
    assert shifted.grad is not None and shifted.grad.abs().sum() > 0
    assert not align.mean.requires_grad and align.mean.grad is None
    # closed form: a pure mean shift of 0.5 in every channel gives 0.25 per class
    assert float(value) == pytest.approx(2 * 0.25, rel=1e-3)
    m = torch.zeros((1, 3))
    assert float(w2_diagonal(m, torch.ones((1, 3)), m, 4 * torch.ones((1, 3)), torch.ones(1))) == pytest.approx(1.0)


def test_moment_sums_and_their_gradient_equal_autograd_over_plain_matmuls():
    """The alignment's moment sums have a hand-written backward (one pass over the features instead
    of autograd's passes over F^2 and its copies): sums and feature gradients equal autograd's
    through the plain formulas, over more voxels than one piece (several pieces per sample)."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 9, 100, 80, generator=gen, dtype=torch.float64)  # 72,000 voxels per sample
    weights = torch.rand(2, 3, 9, 100, 80, generator=gen, dtype=torch.float64)
    g1, g2 = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64)
    f = features.clone().requires_grad_()
    flat_f, flat_w = f.transpose(0, 1).flatten(1), weights.transpose(0, 1).flatten(1)
    want = (flat_w.sum(1), flat_w @ flat_f.T, flat_w @ (flat_f.T ** 2))
    want_grad, = torch.autograd.grad((want[1] * g1).sum() + (want[2] * g2).sum(), f)
    f32 = features.float().requires_grad_()
    got = moment_sums(f32, weights.float())
    got_grad, = torch.autograd.grad((got[1] * g1.float()).sum() + (got[2] * g2.float()).sum(), f32)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-5)


def test_alignment_statistics_stay_in_full_precision_under_autocast():
    """Under nnU-Net's mixed precision a matmul runs in half precision: the sums of squared
    features over a 3d batch overflowed float16 on a GPU (the reliable statistics turned NaN and the
    grad scaler then skipped every optimizer step). On this CPU, bfloat16 autocast rounds the same
    matmuls to ~3 significant digits: the statistics must equal the float32 ones regardless."""
    gen = torch.Generator().manual_seed(0)
    features = 3 + torch.randn(2, 8, 16, 16, 16, generator=gen)
    weights = torch.rand(2, 2, 16, 16, 16, generator=gen)
    plain = FeatureAlignment(2, standardise=True)
    plain.update_reliable(features, weights)
    want = plain.loss(features * 1.1, weights.flip(1))
    mixed = FeatureAlignment(2, standardise=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed.update_reliable(features, weights)
        got = mixed.loss(features * 1.1, weights.flip(1))
    assert mixed.mean.dtype == torch.float32 and got.dtype == torch.float32
    torch.testing.assert_close(mixed.mean, plain.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed.var, plain.var, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert bool(mixed.seen.all()) and want > 0


def test_mass_weighted_alignment_pulls_a_flagged_voxel_no_harder_when_fewer_are_flagged():
    """Plain: the fuzzy mean of n flagged voxels is pulled, so each voxel's gradient grows as 1/n.
    Mass-weighted: each class's distance counts fuzzy / (fuzzy + reliable) of its batch mass, so a
    flagged voxel's gradient is about the same for 2 or 16 flagged voxels, and the term is share x plain."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn((1, 16, 8, 8), generator=g)
    align = FeatureAlignment(num_classes=1, momentum=1.0)
    align.update_reliable(feats, torch.ones((1, 1, 8, 8)))
    grads = {}
    for n in (2, 16):
        fuzzy = torch.zeros((1, 1, 8, 8))
        fuzzy.view(-1)[:n] = 1.0
        reliable_mass = torch.tensor([64.0 - n])
        for weighted in (False, True):
            x = (feats + 1.0).requires_grad_(True)
            value = align.loss(x, fuzzy, mass_share(torch.tensor([float(n)]), reliable_mass) if weighted else None)
            value.backward()
            grads[n, weighted] = float(x.grad.flatten(2)[0, :, :n].norm(dim=0).mean())  # per flagged voxel
            if weighted:
                plain = align.loss(feats + 1.0, fuzzy)
                assert float(value) == pytest.approx(float(plain) * n / 64, rel=1e-5)
    assert grads[2, False] > 4 * grads[16, False]
    assert grads[2, True] == pytest.approx(grads[16, True], rel=0.5)
    assert float(mass_share(torch.tensor([0.0]), torch.tensor([0.0]))) == 0.0


def test_alignment_gradient_reaches_the_decoder(tiny2d, monkeypatch):
    from conftest import inprocess_trainer

    tree, did, _ = tiny2d
    trainer = inprocess_trainer(tree, did, "2d", monkeypatch)
    trainer.initialize()
    trainer.alignment.active = True
    x = torch.randn((2, 1, *trainer.configuration_manager.patch_size))
    trainer.network(x)
    features = trainer.alignment.features
    trainer.alignment.active = False
    assert features is not None and features.shape[2:] == x.shape[2:]
    w = torch.rand((2, 2, *x.shape[2:]))
    trainer.alignment.update_reliable(features, w)
    loss = trainer.alignment.loss(features * 1.5, w)
    loss.backward()
    decoder_grad = sum(p.grad.abs().sum() for p in trainer.network.decoder.stages[-1].parameters() if p.grad is not None)
    assert float(decoder_grad) > 0
    # the hook is gated: an inference-style forward pass captures nothing
    trainer.alignment.features = None
    with torch.no_grad():
        trainer.network(x)
    assert trainer.alignment.features is None


def test_mixture_finds_two_populations_and_omega_ranks_them():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(5000, generator=g) * 0.1 + 0.88  # agreement near 0.9
    noisy = torch.rand(1500, generator=g) * 0.3 + 0.02  # agreement low
    losses = loss_signal(torch.cat([clean, noisy]))
    mixture = fit_mixture(histogram(losses))
    assert mixture.fitted and mixture.means[0] < 0.3 < 1.0 < mixture.means[1]
    omega = mixture.clean_posterior(losses)
    truth = np.r_[np.zeros(5000, bool), np.ones(1500, bool)]
    assert auroc(1 - omega.numpy(), truth) > 0.99
    single = fit_mixture(histogram(loss_signal(clean)))
    assert not single.fitted and float(single.clean_posterior(losses).min()) == 1.0


def test_omega_per_voxel_is_each_class_mixtures_posterior():
    """The per-voxel omega (a sigmoid of the mixture's log-odds) equals the density ratio of
    ``Mixture.clean_posterior`` for tied, untied and unfitted mixtures, gathered by label, and is
    ``unknown_value`` where not known."""
    mixtures = [Mixture((0.7, 0.3), (0.3, 2.0), (0.3, 1.0), True), Mixture(),
                Mixture((0.6, 0.4), (0.2, 1.5), (0.5, 0.5), True)]
    losses = torch.linspace(0, 6, 601, dtype=torch.float64).repeat(3)
    labels = torch.arange(3).repeat_interleave(601)
    known = torch.rand(len(labels), generator=torch.Generator().manual_seed(0)) > 0.2
    got = omega_per_voxel(losses, labels, known, mixtures, float("nan"))
    want = torch.cat([m.clean_posterior(losses[:601]) for m in mixtures])
    torch.testing.assert_close(got[known], want[known], atol=1e-9, rtol=0)  # the density ratio clamps its tail
    assert got[~known].isnan().all() and 0 < float(got[known & (labels == 0)].min()) < 0.5 < float(got[known].max())


def test_auroc_reference_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auroc([1, 1, 1], [True, False, False]) == pytest.approx(0.5)


def test_schedule_is_a_function_of_the_epoch():
    phases = [phase_of_epoch(e, 2, 1) for e in range(20)]
    assert phases[:2] == [WARMUP, WARMUP] and phases[2:6] == [STABLE, FUZZY, STABLE, FUZZY]
    assert [phase_of_epoch(e, 2, 2) for e in range(2, 8)] == [STABLE, STABLE, FUZZY, FUZZY, STABLE, STABLE]
    assert phase_of_epoch(10, 2, 1, alternate=False) == JOINT
    assert alignment_weight(1, 20, 2, 0.1) == 0 and alignment_weight(19, 20, 2, 0.1) == pytest.approx(0.1)
    assert 0 < alignment_weight(2, 20, 2, 0.1) < 0.1
    # the cool-down: full weight until the last quarter, then linearly down to 1/5 of it in the last epoch
    assert alignment_weight(15, 20, 2, 0.1, cooldown_fraction=0.25) == pytest.approx(0.1)
    assert alignment_weight(19, 20, 2, 0.1, cooldown_fraction=0.25) == pytest.approx(0.02)


@pytest.mark.slow
def test_omega_separates_injected_noise_after_short_training(tiny2d):
    """AUROC of (1 - omega) against the injected-noise mask, on the training cases, after a short
    CPU training through nnUNetv2_train."""
    tree, did, raw = tiny2d
    trainer = "nnUNetTrainerDALE_10epochs"
    env = tree.env(nnUNet_DALE_iters="12", nnUNet_DALE_val_iters="1")
    run([tool("nnUNetv2_train"), str(did), "2d", "0", "-tr", trainer, "-device", "cpu"], env)
    fold = next(tree.results.glob(f"*/{trainer}__nnUNetPlans__2d/fold_0"))
    snapshot = fold / "dale_memory" / "snapshot_epoch_0010"
    manifest = json.loads((snapshot / "manifest.json").read_text())
    mixtures = [Mixture.from_dict(m) for m in manifest["extra"]["mixtures"]]
    scores, truth = [], []
    for key, shape in manifest["cases"].items():
        q = np.fromfile(snapshot / f"{key}.q.f16", dtype=np.float16).reshape(*shape, -1)
        n = np.fromfile(snapshot / f"{key}.n.u8", dtype=np.uint8).reshape(shape)
        noisy = np.array(Image.open(raw / "labelsTr" / f"{key}.png"))
        changed = np.array(Image.open(raw / "noiseTr" / f"{key}.png")).astype(bool)
        assert noisy.shape == tuple(shape[1:]), "2D phantoms are not cropped or resampled by nnU-Net"
        omega = case_confidence(q, n, noisy[None], mixtures, min_visits=3)
        known = ~np.isnan(omega)
        scores.append(1 - omega[known])
        truth.append(changed[None][known])
    value = auroc(np.concatenate(scores), np.concatenate(truth))
    print(f"AUROC of 1 - omega vs injected noise: {value:.3f}")
    assert value > 0.65, value


def test_class_balanced_weights_keep_each_class_total():
    from nnunetv2_dale.method.loss import class_balanced

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 1, 6, 7), generator=g)  # 3 = ignore
    omega = torch.rand((2, 1, 6, 7), generator=g)
    out = class_balanced(omega, target, 3, ignore=3)
    for c in range(3):
        assert float(out[target == c].mean()) == pytest.approx(1.0, abs=1e-5)
        ratio = out[target == c] / omega[target == c]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # within a class only rescaled
    assert (out[target == 3] == 0).all()


def test_ensemble_consistency_pulls_toward_the_ensemble_only_where_known():
    from nnunetv2_dale.method.loss import ensemble_consistency

    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)  # p = (0.5, 0.5) everywhere
    q = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone()
    known = torch.tensor([[True, True], [False, False]]).view(1, 1, 2, 2)
    value = ensemble_consistency(logits, q, known)
    assert float(value) == pytest.approx(np.log(0.5), rel=1e-4)  # <p, q> = 0.5 on the known voxels
    value.backward()
    g = logits.grad[0]
    assert (g[0, 0] < 0).all() and (g[1, 0] > 0).all()  # descent raises the logit of the ensemble's class
    assert (g[:, 1] == 0).all()  # unknown voxels get no gradient


def test_memory_horizon_freezes_buffers_and_mixtures(tiny2d):
    """nnUNetTrainerDALE_horizon (memory updated during the first 30 % of the epochs): after epoch
    round(0.3 * 4) = 1 the visited share and the fitted mixtures stop changing, and the final
    buffers hold no more visits than epoch 0's patches."""
    import re

    tree, did, _ = tiny2d
    env = tree.env(nnUNet_DALE_epochs="4", nnUNet_DALE_iters="3", nnUNet_DALE_val_iters="1",
                   nnUNet_DALE_save_every="1")
    run([tool("nnUNetv2_train"), str(did), "2d", "0", "-tr", "nnUNetTrainerDALE_horizon", "-device", "cpu"], env,
        timeout=900)
    fold = next(tree.results.glob("*/nnUNetTrainerDALE_horizon__nnUNetPlans__2d/fold_0"))
    log = next(fold.glob("training_log_*.txt")).read_text()
    visited = re.findall(r"DALE memory: ([0-9.]+)% of voxels visited", log)
    mixtures = re.findall(r"Mixtures for the next epoch: (.*)", log)
    assert len(visited) == 4 and float(visited[0]) > 0 and len(set(visited)) == 1  # only epoch 0 updated
    assert len(mixtures) == 4 and len(set(mixtures)) == 1  # fitted once, after epoch 0, then kept
    # every visit after epoch 0 would add to the counts: they hold at most epoch 0's patch voxels
    plan = json.loads((fold.parent / "plans.json").read_text())["configurations"]["2d"]
    visits_files = list((fold / "dale_memory" / "snapshot_epoch_0004").glob("*.n.u8"))
    visits = sum(int(np.fromfile(n, dtype=np.uint8).astype(np.int64).sum()) for n in visits_files)
    assert 0 < visits <= 3 * plan["batch_size"] * int(np.prod(plan["patch_size"]))
    # frozen buffers are not copied again: every snapshot after the first one links its files
    linked = re.findall(r"DALE buffers for epoch (\d+): (\d+) files hard-linked from the snapshot of epoch (\d+)", log)
    assert [int(e) for e, _, _ in linked] == [2, 3, 4] and {int(n) for _, n, _ in linked} == {2 * len(visits_files)}
    assert all(int(s) == int(e) - 1 for e, _, s in linked)


def test_collaborative_target_certain_correction_moves_only_as_far_as_the_ensemble_is_decided():
    q = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.5, 0.5], [0.3, 0.7]])[:, :, None]  # (N, K, 1)
    onehot = torch.tensor([[1.0, 0.0]] * 4)[:, :, None]
    omega = torch.tensor([1.0, 0.0, 0.0, 0.5])[:, None, None]
    entropy = entropy_signal(q[:, 1])[:, None, None]  # binary ER from p(foreground)
    plain = collaborative_target(onehot, q, omega, entropy, 0.5)
    certain = collaborative_target(onehot, q, omega, entropy, 0.5, certain=True)
    for target in (plain, certain):
        torch.testing.assert_close(target.sum(1), torch.ones(4, 1))
        torch.testing.assert_close(target[0], onehot[0])  # confident label: kept
    torch.testing.assert_close(plain[1], sharpen(q, 0.5)[1])  # omega 0: all the way to sharpen(q)
    torch.testing.assert_close(certain[2], onehot[2])  # undecided ensemble (ER 1): label kept
    # a decided ensemble moves the target, by (1 - omega)(1 - ER) < 1 - omega
    assert plain[1, 1] > certain[1, 1] > 0.5 and plain[3, 1] > certain[3, 1] > 0


@pytest.mark.parametrize("dim", [2, 3])
def test_boundary_band_marks_voxels_within_the_margin_of_a_label_change(dim):
    from scipy import ndimage

    from nnunetv2_dale.method.rsets import boundary_band

    rng = np.random.default_rng(dim)
    seeds = np.stack([rng.random([12] * dim) > 1 - 0.03 ** (dim - 1) for _ in range(2)])  # a few blobs per sample
    labels = torch.from_numpy(np.stack([ndimage.binary_dilation(s, iterations=2) for s in seeds])).long()
    labels[1, (0,) * dim] = 2  # a third class in one corner
    onehot = torch.zeros(2, 3, *[12] * dim).scatter_(1, labels[:, None], 1)
    for margin in (1, 2):
        band = boundary_band(onehot, margin)[:, 0].numpy()
        lab = labels.numpy()
        # reference: some voxel within the Chebyshev distance has another label
        expected = np.zeros_like(band)
        for b in range(2):
            footprint = np.ones([2 * margin + 1] * dim, bool)
            for c in range(3):
                has = lab[b] == c
                expected[b] |= ndimage.binary_dilation(has, footprint) & ~has  # another class's voxel near
        assert band.any() and not band.all()
        np.testing.assert_array_equal(band, expected)
