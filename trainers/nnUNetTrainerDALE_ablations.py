"""Thin module found by nnU-Net through ``nnUNet_extTrainer``: ablation and tuning variants of nnUNetTrainerDALE."""
from nnunetv2_dale.method.variants import (nnUNetTrainerDALE_agreeAlign, nnUNetTrainerDALE_agreeWeights, nnUNetTrainerDALE_alignCooldown,  # noqa: F401
                                           nnUNetTrainerDALE_balanced, nnUNetTrainerDALE_certain,
                                           nnUNetTrainerDALE_consistency, nnUNetTrainerDALE_correctOnly, nnUNetTrainerDALE_curveHorizon, nnUNetTrainerDALE_fixedHorizon,
                                           nnUNetTrainerDALE_floor, nnUNetTrainerDALE_halfAlign,
                                           nnUNetTrainerDALE_horizon, nnUNetTrainerDALE_lightAlign,
                                           nnUNetTrainerDALE_margin,
                                           nnUNetTrainerDALE_noAlign, nnUNetTrainerDALE_noAlternation,
                                           nnUNetTrainerDALE_noConfidence, nnUNetTrainerDALE_noCorrection,
                                           nnUNetTrainerDALE_noFuzzySampling, nnUNetTrainerDALE_noHorizon, nnUNetTrainerDALE_plainSampling,
                                           nnUNetTrainerDALE_slowEMA, nnUNetTrainerDALE_v01, nnUNetTrainerDALE_wideLightAlign,
                                           nnUNetTrainerDALE_wideReference, nnUNetTrainerDALE_ungated,
                                           nnUNetTrainerDALE_massAlign, nnUNetTrainerDALE_v02, nnUNetTrainerDALE_caseGate,
                                           nnUNetTrainerDALE_caseAgree, nnUNetTrainerDALE_discount,
                                           nnUNetTrainerDALE_caseDiscount, nnUNetTrainerDALE_v03, nnUNetTrainerDALE_sharpAgree)
