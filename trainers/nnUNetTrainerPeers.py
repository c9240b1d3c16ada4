"""Thin module found by nnU-Net through ``nnUNet_extTrainer``: peer noisy-label trainers."""
from nnunetv2_dale.peers.trainers import nnUNetTrainerGCE, nnUNetTrainerSVLS, nnUNetTrainerTLoss  # noqa: F401
