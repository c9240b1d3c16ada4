"""CPU budgets and start-up checks shared by our trainers, and a stock-loss baseline that honours
the same budget, so that DALE and nnU-Net can be compared at identical epochs x iterations.

``nnUNet_DALE_iters`` and ``nnUNet_DALE_val_iters`` override ``num_iterations_per_epoch`` (default
250) and ``num_val_iterations_per_epoch`` (default 50); ``nnUNet_DALE_save_every`` overrides
``save_every`` (epochs between ``checkpoint_latest.pth`` writes, default 50), so that short CPU runs
can be resumed with ``--c``. Epoch counts come from the class attribute ``epochs`` (length variants)
or, for any of our trainers, from ``nnUNet_DALE_epochs`` (what the benchmark uses, so that every
trainer it compares runs the same length without a length variant per trainer).
"""
import os
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dale.utilities.preflight import SetupError, check_path_variables, check_preprocessed, check_writable

ITERS_ENV = "nnUNet_DALE_iters"
VAL_ITERS_ENV = "nnUNet_DALE_val_iters"
SAVE_EVERY_ENV = "nnUNet_DALE_save_every"
EPOCHS_ENV = "nnUNet_DALE_epochs"


def _positive_int_from_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SetupError(f"{name}={raw!r} must be a positive integer, or unset.")
    return value


class nnUNetTrainerBudget(nnUNetTrainer):
    """nnU-Net's trainer, unchanged, plus our start-up checks and the budget variables above.
    Used as the baseline in benchmarks (``-tr nnUNetTrainerBudget_40epochs``)."""

    epochs: int = 1000  # nnU-Net's default; copied to ``self.num_epochs``

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_path_variables(("nnUNet_preprocessed", "nnUNet_results"))
        dataset_name = plans["dataset_name"]
        check_preprocessed(dataset_name, configuration, plans["plans_name"])
        check_writable(Path(os.environ["nnUNet_results"]) / dataset_name, "the output folder")
        overrides = {attr: _positive_int_from_env(env) for attr, env in (
            ("num_iterations_per_epoch", ITERS_ENV), ("num_val_iterations_per_epoch", VAL_ITERS_ENV),
            ("save_every", SAVE_EVERY_ENV), ("num_epochs", EPOCHS_ENV))}
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs
        for attr, value in overrides.items():
            if value is not None:
                setattr(self, attr, value)
        self.print_to_log_file(f"Budget: {self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations "
                               f"(+{self.num_val_iterations_per_epoch} validation), checkpoint every {self.save_every}.")

    def deep_supervision_weights(self) -> list[float] | None:
        """nnU-Net 2.8.1's output weights (1/2^i, lowest output 0, normalised), for our own losses."""
        if not self.enable_deep_supervision:
            return None
        weights = np.array([1 / (2 ** i) for i in range(len(self._get_deep_supervision_scales()))])
        weights[-1] = 1e-6 if self.is_ddp and not self._do_i_compile() else 0  # as nnU-Net does
        return list(weights / weights.sum())
