"""Thin module found by nnU-Net through ``nnUNet_extTrainer``: benchmark oracles (read noiseTr)."""
from nnunetv2_dale.bench.oracles import nnUNetTrainerDALE_oracleOmega, nnUNetTrainerOracleIgnore  # noqa: F401
