"""Thin module found by nnU-Net through ``nnUNet_extTrainer``: the stock-loss baseline with budgets."""
from nnunetv2_dale.utilities.budget import nnUNetTrainerBudget  # noqa: F401
from nnunetv2_dale.method.variants import nnUNetTrainerBudget_20epochs, nnUNetTrainerBudget_40epochs  # noqa: F401
