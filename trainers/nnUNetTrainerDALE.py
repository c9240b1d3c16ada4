"""Thin module found by nnU-Net through ``nnUNet_extTrainer``; the class lives in nnunetv2_dale."""
from nnunetv2_dale.method.trainer import nnUNetTrainerDALE  # noqa: F401
