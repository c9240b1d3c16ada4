"""Thin module found by nnU-Net through ``nnUNet_extTrainer``: ablation variants of nnUNetTrainerDALE."""
from nnunetv2_dale.method.variants import (nnUNetTrainerDALE_balanced, nnUNetTrainerDALE_noAlign, nnUNetTrainerDALE_noAlternation,  # noqa: F401
                                    nnUNetTrainerDALE_noConfidence, nnUNetTrainerDALE_noFuzzySampling,
                                    nnUNetTrainerDALE_v01)
