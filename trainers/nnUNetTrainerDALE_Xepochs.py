"""Thin module found by nnU-Net through ``nnUNet_extTrainer``: length variants of nnUNetTrainerDALE."""
from nnunetv2_dale.method.variants import *  # noqa: F401,F403
