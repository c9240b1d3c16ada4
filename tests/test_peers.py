"""Peer noisy-label losses: formula fidelity on toy tensors, the limits the papers state, and real
training + stock prediction through nnU-Net's command line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import gammaln

from conftest import run, tool
from nnunetv2_dale.peers.losses import GeneralizedCrossEntropy, SVLSCrossEntropy, TLoss, svls_kernel, svls_target


def test_svls_kernel_and_target_match_hand_computation():
    g = np.exp(-np.array([[2, 1, 2], [1, 0, 1], [2, 1, 2]]) / 2.0)
    g /= g.sum()
    neighbours = 1 - g[1, 1]
    expected = g.copy()
    expected[1, 1] = neighbours
    expected /= 2 * neighbours  # authors: centre = neighbour sum, then normalised
    assert torch.allclose(svls_kernel(2), torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert svls_kernel(2)[1, 1] == pytest.approx(0.5) and svls_kernel(3).sum() == pytest.approx(1.0)
    labels = torch.zeros((1, 5, 5), dtype=torch.long)
    labels[0, 2, 2] = 1
    soft = svls_target(labels, 2)
    assert soft[0, 1, 2, 2] == pytest.approx(0.5) and soft[0, 1, 2, 3] == pytest.approx(expected[1, 2], abs=1e-6)
    assert torch.allclose(soft.sum(1), torch.ones((1, 5, 5)))


def test_svls_equals_ce_inside_uniform_regions():
    logits = torch.randn(2, 3, 6, 6, 6)
    target = torch.full((2, 1, 6, 6, 6), 2.0)
    assert SVLSCrossEntropy()(logits, target) == pytest.approx(float(F.cross_entropy(logits, target[:, 0].long())),
                                                               rel=1e-5)


def test_gce_hand_value_and_ce_limit():
    logits = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)
    target = torch.ones((1, 1, 1, 1))
    assert GeneralizedCrossEntropy(0.7)(logits, target) == pytest.approx((1 - 0.75 ** 0.7) / 0.7, rel=1e-6)
    assert GeneralizedCrossEntropy(1.0)(logits, target) == pytest.approx(0.25, rel=1e-6)  # MAE
    logits = torch.randn(3, 4, 5, 5)
    target = torch.randint(0, 4, (3, 1, 5, 5)).float()
    ce = float(F.cross_entropy(logits, target[:, 0].long()))
    assert GeneralizedCrossEntropy(1e-4)(logits, target) == pytest.approx(ce, rel=1e-3)
    ignored = target.clone()
    ignored[:, :, 0] = 9  # ignore label: those voxels do not count
    keep = GeneralizedCrossEntropy(0.7, ignore_label=9)(logits, ignored)
    assert keep == pytest.approx(float(GeneralizedCrossEntropy(0.7)(logits[:, :, 1:], target[:, :, 1:])), rel=1e-5)


def _tloss_reference(p: np.ndarray, y: np.ndarray, nu: float, lam: float = 1.0, eps: float = 1e-8) -> float:
    """The authors' formula written out in numpy for one sample (residual over all entries), / D."""
    d = p.size
    t = math.exp(nu) + eps
    num = float(((p - y) ** 2 * math.exp(lam + eps)).sum())
    total = (-gammaln((t + d) / 2) + gammaln(t / 2) - 0.5 * d * (lam + eps) + d / 2 * math.log(math.pi)
             + d / 2 * (nu + eps) + (t + d) / 2 * math.log(1 + num / t))
    return total / d


def test_tloss_matches_the_published_formula_and_tends_to_mse():
    logits = torch.tensor([[[[2.0, -1.0, 0.5]], [[-2.0, 1.0, 0.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[[0.0, 1.0, 1.0]]]])
    p = torch.softmax(logits, 1).numpy()[0]
    y = np.stack([1 - target.numpy()[0, 0], target.numpy()[0, 0]])
    loss = TLoss(nu=1.0)
    assert float(loss(logits, target).detach()) == pytest.approx(_tloss_reference(p, y, 1.0), rel=1e-5)
    loss(logits, target).backward()
    assert loss.nu.grad is not None and loss.nu.grad != 0  # nu is learned
    # many degrees of freedom: Student-t -> Gaussian, the loss difference -> exp(lambda) ||r||^2 / (2 D)
    big = TLoss(nu=25.0)
    perfect = torch.tensor([[[[30.0, -30.0, -30.0]], [[-30.0, 30.0, 30.0]]]])  # residual 0
    r2 = float(((p - y) ** 2).sum())
    diff = float((big(logits, target) - big(perfect, target)).detach())
    assert diff == pytest.approx(math.exp(1.0) * r2 / (2 * p.size), rel=1e-3)


@pytest.mark.parametrize("trainer", ["nnUNetTrainerSVLS", "nnUNetTrainerGCE", "nnUNetTrainerTLoss"])
def test_peer_trains_through_cli_and_predicts_with_stock_nnunet(tiny2d, tmp_path, trainer):
    tree, did, raw = tiny2d
    env = tree.env(nnUNet_DALE_epochs="1", nnUNet_DALE_iters="2", nnUNet_DALE_val_iters="1")
    run([tool("nnUNetv2_train"), str(did), "2d", "0", "-tr", trainer, "-device", "cpu"], env)
    fold = next(tree.results.glob(f"*/{trainer}__nnUNetPlans__2d/fold_0"))
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer and ("tloss_nu" in checkpoint) == (trainer == "nnUNetTrainerTLoss")
    out = tmp_path / "pred"
    run([tool("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(did), "-c", "2d", "-f", "0",
         "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    assert len(list(out.glob("*.png"))) == len(list((raw / "imagesTs").glob("*.png")))
