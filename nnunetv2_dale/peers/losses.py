"""Published noisy-label losses as nnU-Net losses, for side-by-side benchmarks with DALE.

All three plug into nnU-Net's deep supervision exactly like its own Dice+CE (same output weights,
targets downsampled by nnU-Net's transforms) and honour the ignore label.

- :class:`SVLSCrossEntropy`: spatially varying label smoothing (Islam & Glocker, "Spatially
  Varying Label Smoothing: Capturing Uncertainty from Expert Annotations", IPMI 2021). The one-hot
  target is convolved with a 3x3 (2D) / 3x3x3 (3D) Gaussian kernel (sigma 1) whose centre weight
  is replaced by the sum of the neighbour weights, then normalised (as in the authors' code:
  centre 1/2, neighbours share 1/2), with replicate padding; CE against that soft target.
- :class:`GeneralizedCrossEntropy`: L_q = (1 - p_y^q) / q (Zhang & Sabuncu, NeurIPS 2018),
  q = 0.7; q -> 0 gives CE, q = 1 gives MAE.
- :class:`TLoss`: the robust T-Loss (Gonzalez-Jimenez et al., MICCAI 2023): the negative
  log-likelihood of the residual r = p - y under a multivariate Student-t with the authors' fixed
  diagonal log-precisions lambda = 1 and a learned nu (degrees of freedom exp(nu) + eps, nu
  initialised to 1.0 as in their code; nu is optimised with the network). Adaptations, all forced
  by nnU-Net: (1) the published code fixes the dimension D to the full image size (one H x W
  binary map); nnU-Net trains on patches with K classes at several deep-supervision resolutions,
  so r is the softmax minus the one-hot label over all K channels and D = K x (valid voxels of the
  patch), per sample and resolution; (2) the published loss is O(D) and trained with Adam, which is
  invariant to that scale; nnU-Net's SGD is not, so the loss is divided by D (the optimum and the
  relative weighting of samples are unchanged); (3) it replaces nnU-Net's Dice+CE entirely, as in
  the paper.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn


def _labels_and_mask(target: torch.Tensor, ignore_label: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    labels = target[:, 0].long()
    if ignore_label is None:
        return labels, None
    mask = labels != ignore_label
    return torch.where(mask, labels, 0), mask


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    n = mask.sum()
    return (values * mask).sum() / n.clamp_min(1) if n > 0 else values.sum() * 0


def svls_kernel(ndim: int, sigma: float = 1.0) -> torch.Tensor:
    """The authors' SVLS kernel (3 x ... x 3): Gaussian, centre weight = sum of the neighbours,
    normalised to sum 1."""
    ax = torch.arange(3, dtype=torch.float64) - 1
    grids = torch.meshgrid(*([ax] * ndim), indexing="ij")
    g = torch.exp(-sum(x ** 2 for x in grids) / (2 * sigma ** 2))
    g = g / g.sum()
    centre = (1,) * ndim
    g[centre] = 1 - g[centre]  # the neighbours' sum
    return (g / g.sum()).float()


def svls_target(labels: torch.Tensor, num_classes: int, sigma: float = 1.0) -> torch.Tensor:
    """(B, *S) integer labels -> (B, K, *S) spatially smoothed one-hot target."""
    ndim = labels.dim() - 1
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1).float()
    kernel = svls_kernel(ndim, sigma).to(onehot.device)
    weight = kernel.expand(num_classes, 1, *kernel.shape).contiguous()
    padded = F.pad(onehot, (1, 1) * ndim, mode="replicate")
    conv = F.conv2d if ndim == 2 else F.conv3d
    return conv(padded, weight, groups=num_classes)


class SVLSCrossEntropy(nn.Module):
    def __init__(self, ignore_label: int | None = None, sigma: float = 1.0) -> None:
        super().__init__()
        self.ignore_label, self.sigma = ignore_label, sigma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, mask = _labels_and_mask(target, self.ignore_label)
        soft = svls_target(labels, logits.shape[1], self.sigma)
        return _masked_mean(-(soft * F.log_softmax(logits.float(), 1)).sum(1), mask)


class GeneralizedCrossEntropy(nn.Module):
    def __init__(self, q: float = 0.7, ignore_label: int | None = None) -> None:
        super().__init__()
        if not 0 < q <= 1:
            raise ValueError(f"GCE needs 0 < q <= 1, got {q}")
        self.q, self.ignore_label = q, ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, mask = _labels_and_mask(target, self.ignore_label)
        p_y = torch.softmax(logits.float(), 1).gather(1, labels[:, None])[:, 0].clamp_min(1e-7)
        return _masked_mean((1 - p_y ** self.q) / self.q, mask)


class DiceAnd(nn.Module):
    """nnU-Net's soft Dice (no background, smooth 1e-5) + a robust replacement of its CE term."""

    def __init__(self, ce_replacement: nn.Module, batch_dice: bool, ignore_label: int | None, ddp: bool) -> None:
        super().__init__()
        self.ce = ce_replacement
        self.ignore_label = ignore_label
        self.dc = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice, do_bg=False,
                                              smooth=1e-5, ddp=ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, mask = _labels_and_mask(target, self.ignore_label)
        dc = self.dc(logits, labels[:, None], loss_mask=None if mask is None else mask[:, None])
        return dc + self.ce(logits, target)


class TLoss(nn.Module):
    """Student-t negative log-likelihood of the softmax residual, per sample, / D (see module doc)."""

    def __init__(self, ignore_label: int | None = None, nu: float = 1.0, epsilon: float = 1e-8,
                 lambdas: float = 1.0) -> None:
        super().__init__()
        self.ignore_label, self.epsilon, self.lambdas = ignore_label, epsilon, lambdas
        self.nu = nn.Parameter(torch.tensor(float(nu)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, mask = _labels_and_mask(target, self.ignore_label)
        k = logits.shape[1]
        residual = torch.softmax(logits.float(), 1) - F.one_hot(labels, k).movedim(-1, 1).float()
        valid = torch.ones_like(residual[:, 0]) if mask is None else mask.float()
        d = valid.flatten(1).sum(1) * k  # per-sample dimension D
        lam = self.lambdas + self.epsilon
        numerator = (residual.pow(2) * math.exp(lam) * valid[:, None]).flatten(1).sum(1)
        t = torch.exp(self.nu) + self.epsilon
        nll = (-torch.lgamma((t + d) / 2) + torch.lgamma(t / 2) - 0.5 * d * lam + d / 2 * math.log(math.pi)
               + d / 2 * (self.nu + self.epsilon) + (t + d) / 2 * torch.log1p(numerator / t))
        return (nll / d.clamp_min(1)).mean()


class DeepSupervised(nn.Module):
    """nnU-Net's deep-supervision weighting around any single-resolution loss."""

    def __init__(self, loss: nn.Module, weights: list[float] | None) -> None:
        super().__init__()
        self.loss, self.weights = loss, weights

    def forward(self, output, target) -> torch.Tensor:
        if self.weights is None:
            return self.loss(output, target)
        return sum(w * self.loss(o, t) for w, o, t in zip(self.weights, output, target) if w != 0)
