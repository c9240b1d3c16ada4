"""Loss-consistency collaborative objective (DESIGN.md 1.3), at every deep-supervision output.

``DALELoss(output, target)`` with two arguments is exactly nnU-Net's Dice+CE (deep supervision
weights included); ``validation_step`` relies on that. With per-voxel weights ``omega`` it is the
stable-phase loss: CE and soft Dice with every voxel weighted by omega (CE normalised by the number
of labelled voxels, so low-confidence voxels genuinely lose influence). With a soft target it is
the fuzzy-phase loss: soft CE + soft Dice against y~ = omega * onehot(y) + (1 - omega) * sharpen(q).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn


class WeightedDCandCE(nn.Module):
    """Dice + CE at one resolution, optionally weighted per voxel or against a soft target."""

    def __init__(self, batch_dice: bool, ignore_label: int | None, ddp: bool) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        self.dc = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice,
                                              do_bg=False, smooth=1e-5, ddp=ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                soft: torch.Tensor | None = None) -> torch.Tensor:
        labels = target[:, 0].long()
        mask = None
        if self.ignore_label is not None:
            mask = (labels != self.ignore_label)[:, None]
            labels = torch.where(mask[:, 0], labels, 0)
        loss_mask = mask if weight is None else (weight if mask is None else weight * mask)
        dice_target = labels[:, None] if soft is None else soft
        dc = self.dc(logits, dice_target, loss_mask=loss_mask)
        if soft is None:
            ce = F.cross_entropy(logits, labels, reduction="none")
        else:
            ce = -(soft * F.log_softmax(logits, 1)).sum(1)
        if weight is not None:
            ce = ce * weight[:, 0]
        if mask is not None:
            n = mask.sum()
            ce = (ce * mask[:, 0]).sum() / n.clamp_min(1) if n > 0 else ce.sum() * 0
        else:
            ce = ce.mean()
        return dc + ce


class DALELoss(nn.Module):
    """Deep-supervision sum of :class:`WeightedDCandCE` with nnU-Net's output weights."""

    def __init__(self, batch_dice: bool, ignore_label: int | None, ddp: bool, ds_weights: list[float] | None):
        super().__init__()
        self.single = WeightedDCandCE(batch_dice, ignore_label, ddp)
        self.ds_weights = ds_weights

    def forward(self, output, target, weights=None, soft=None) -> torch.Tensor:
        if self.ds_weights is None:
            return self.single(output, target, weights, soft)
        total = 0
        for i, w in enumerate(self.ds_weights):
            if w != 0:
                total = total + w * self.single(output[i], target[i], None if weights is None else weights[i],
                                                None if soft is None else soft[i])
        return total


def sharpen(q: torch.Tensor, temperature: float) -> torch.Tensor:
    """q^(1/T) renormalised over classes (dim 1)."""
    p = q.clamp_min(1e-6).pow_(1.0 / temperature)
    return p.div_(p.sum(1, keepdim=True))


def collaborative_target(onehot: torch.Tensor, q: torch.Tensor, omega: torch.Tensor, entropy: torch.Tensor,
                         temperature: float, certain: bool = False) -> torch.Tensor:
    """The fuzzy phase's target y~ = (1 - s) onehot(y) + s sharpen(q) (class axis 1), with the shift
    s = 1 - omega, or s = (1 - omega)(1 - ER) when ``certain``: then a low-confidence voxel moves
    toward the ensemble only as far as the ensemble is decided (ER = ``entropy``, in [0, 1])."""
    shift = (1 - omega) * (1 - entropy) if certain else 1 - omega
    return torch.lerp(onehot, sharpen(q, temperature), shift)  # one pass: onehot + s (sharpen(q) - onehot)


def class_balanced(omega: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int | None) -> torch.Tensor:
    """omega rescaled per class so that its mean over the batch's voxels of that class is 1."""
    labels = target[:, :1].long().to(omega.device)
    out = omega.clone()
    for c in range(num_classes):
        where = labels == c
        total = omega[where].sum()
        if total > 0:
            out[where] = omega[where] * (where.sum() / total)
    if ignore is not None:
        out[labels == ignore] = 0
    return out


def ensemble_consistency(logits: torch.Tensor, ensemble: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean over ``known`` voxels of log(1 - <p, q>): p the softmax of ``logits`` (B,K,*S), q the
    temporal ensemble (B,K,*S, no gradient), ``known`` (B,1,*S). Minimising it keeps p close to
    q (early-learning regularisation); p is clipped to [1e-4, 1 - 1e-4] and renormalised."""
    p = torch.softmax(logits.float(), 1).clamp(1e-4, 1 - 1e-4)
    p = p / p.sum(1, keepdim=True)
    inner = (p * ensemble.detach()).sum(1, keepdim=True).clamp(max=1 - 1e-4)
    weight = known.float()
    return (torch.log(1 - inner) * weight).sum() / weight.sum().clamp_min(1)
