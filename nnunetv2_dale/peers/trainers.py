"""Peer trainers for the benchmark: nnU-Net with a published noisy-label loss (``peers.py``) in
place of its own, everything else stock, with the same budget variables as our other trainers.

- ``nnUNetTrainerSVLS``: nnU-Net's Dice + CE against the SVLS-smoothed target (Islam & Glocker 2021).
- ``nnUNetTrainerGCE``: nnU-Net's Dice + generalized cross-entropy, q = ``gce_q`` (0.7)
  (Zhang & Sabuncu 2018).
- ``nnUNetTrainerTLoss``: T-Loss alone (Gonzalez-Jimenez et al. 2023) with its learned nu in the
  optimizer (no weight decay); nu is stored in the checkpoint under ``tloss_nu`` (an extra key that
  ``nnUNetv2_predict`` ignores), so ``--c`` resumes it.
"""
import os

import torch

from nnunetv2_dale.utilities.budget import nnUNetTrainerBudget
from nnunetv2_dale.peers.losses import DeepSupervised, DiceAnd, GeneralizedCrossEntropy, SVLSCrossEntropy, TLoss


def dice_and(trainer: nnUNetTrainerBudget, ce) -> DeepSupervised:
    """nnU-Net's Dice + ``ce`` at every deep-supervision output, with nnU-Net's weights."""
    return DeepSupervised(DiceAnd(ce, trainer.configuration_manager.batch_dice, trainer.label_manager.ignore_label,
                                  trainer.is_ddp), trainer.deep_supervision_weights())


class nnUNetTrainerSVLS(nnUNetTrainerBudget):
    """nnU-Net with spatially varying label smoothing in the CE term (3x3(x3) kernel, sigma 1)."""

    def _build_loss(self):
        return dice_and(self, SVLSCrossEntropy(self.label_manager.ignore_label, sigma=1.0))


class nnUNetTrainerGCE(nnUNetTrainerBudget):
    """nnU-Net with generalized cross-entropy (q = 0.7) in place of CE."""

    gce_q: float = 0.7

    def _build_loss(self):
        return dice_and(self, GeneralizedCrossEntropy(self.gce_q, self.label_manager.ignore_label))


class nnUNetTrainerTLoss(nnUNetTrainerBudget):
    """nnU-Net trained with the robust T-Loss (learned nu)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.tloss = TLoss(self.label_manager.ignore_label, nu=1.0).to(self.device)

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        optimizer.add_param_group({"params": [self.tloss.nu], "weight_decay": 0.0})
        return optimizer, scheduler

    def _build_loss(self):
        return DeepSupervised(self.tloss, self.deep_supervision_weights())

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        self.print_to_log_file(f"T-Loss nu {float(self.tloss.nu):.4f} (degrees of freedom "
                               f"{float(torch.exp(self.tloss.nu)):.3f})")

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing and os.path.isfile(filename):
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint["tloss_nu"] = float(self.tloss.nu)
            torch.save(checkpoint, filename + ".tmp")
            os.replace(filename + ".tmp", filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
        if "tloss_nu" in checkpoint:
            with torch.no_grad():
                self.tloss.nu.fill_(checkpoint["tloss_nu"])
