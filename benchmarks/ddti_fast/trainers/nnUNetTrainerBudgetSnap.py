"""Benchmark only (``ensemble_flags.py``): the stock-loss budget trainer, keeping a checkpoint
``checkpoint_ep<N>.pth`` after each epoch N listed in ``SNAP_EPOCHS`` (comma-separated)."""
import os

from nnunetv2_dale.utilities.budget import nnUNetTrainerBudget


class nnUNetTrainerBudgetSnap(nnUNetTrainerBudget):
    def on_epoch_end(self):
        done = self.current_epoch + 1
        super().on_epoch_end()
        if self.local_rank == 0 and str(done) in os.environ.get("SNAP_EPOCHS", "3,5,7,10,14,20,30").split(","):
            self.save_checkpoint(os.path.join(self.output_folder, f"checkpoint_ep{done}.pth"))
