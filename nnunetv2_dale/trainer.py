"""``nnUNetTrainerDALE``: the nnU-Net trainer that DALE builds on.

Status: this release provides the packaging, registration, budgets and start-up checks. The
trainer still optimises nnU-Net's stock Dice+CE loss; the label-confidence memory and the DALE
objective are separate, not yet implemented steps (see README, "Status").
"""

import os
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dale import __version__
from nnunetv2_dale.preflight import SetupError, check_path_variables, check_preprocessed, check_writable

ITERS_ENV = "nnUNet_DALE_iters"
VAL_ITERS_ENV = "nnUNet_DALE_val_iters"
SAVE_EVERY_ENV = "nnUNet_DALE_save_every"


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


class nnUNetTrainerDALE(nnUNetTrainer):
    """nnU-Net trainer for noisy labels (DALE). Currently trains with nnU-Net's stock loss.

    CPU budgets: ``nnUNet_DALE_iters`` and ``nnUNet_DALE_val_iters`` override
    ``num_iterations_per_epoch`` (default 250) and ``num_val_iterations_per_epoch`` (default 50);
    ``nnUNet_DALE_save_every`` overrides ``save_every`` (epochs between ``checkpoint_latest.pth``
    writes, default 50), so that short CPU runs can be resumed with ``--c``.
    Epoch counts come from the length variants (``nnUNetTrainerDALE_5epochs`` ...), which only set
    the class attribute ``epochs``.
    """

    epochs: int = 1000  # nnU-Net's default; copied to ``self.num_epochs``

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_path_variables(("nnUNet_preprocessed", "nnUNet_results"))
        dataset_name = plans["dataset_name"]
        check_preprocessed(dataset_name, configuration, plans["plans_name"])
        check_writable(Path(os.environ["nnUNet_results"]) / dataset_name, "the output folder")
        overrides = {attr: _positive_int_from_env(env) for attr, env in (
            ("num_iterations_per_epoch", ITERS_ENV), ("num_val_iterations_per_epoch", VAL_ITERS_ENV),
            ("save_every", SAVE_EVERY_ENV))}
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs
        for attr, value in overrides.items():
            if value is not None:
                setattr(self, attr, value)
        self.print_to_log_file(
            f"{self.__class__.__name__} (nnunetv2-dale {__version__}): loss = nnU-Net's stock Dice+CE "
            f"(the DALE objective is not implemented in this version). Budget: {self.num_epochs} epochs x "
            f"{self.num_iterations_per_epoch} iterations (+{self.num_val_iterations_per_epoch} validation).",
            also_print_to_console=True,
        )
