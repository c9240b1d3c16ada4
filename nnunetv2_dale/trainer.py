"""``nnUNetTrainerDALE``: nnU-Net's trainer plus DALE's per-voxel label-confidence memory.

Status: the memory (temporal ensemble of the softmax per training voxel, following nnU-Net's
augmentation through coordinate maps, persisted with every checkpoint) is in place and logged.
The loss is still nnU-Net's stock Dice+CE: the DALE objective that will use the memory
(reliable/fuzzy sets, alternation, distribution alignment) is not implemented yet.

DDP design: every rank updates the buffers of the cases in its own batches (the buffers are files
in the fold folder, shared by all ranks of a node); the per-epoch statistics (newly visited voxels,
confidence sums and counts) are all-reduced before they are logged; snapshots are written by rank 0
between barriers, so no rank updates buffers while they are copied.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_dale import __version__
from nnunetv2_dale.coords import source_indices, training_loader_with_coordinates
from nnunetv2_dale.memory import ConfidenceMemory, MemoryMismatchError, agreement_with_label, write_json_atomic
from nnunetv2_dale.preflight import SetupError, check_path_variables, check_preprocessed, check_writable
from nnunetv2_dale.progress import DALELocalLogger, save_buffer_picture

ITERS_ENV = "nnUNet_DALE_iters"
VAL_ITERS_ENV = "nnUNet_DALE_val_iters"
SAVE_EVERY_ENV = "nnUNet_DALE_save_every"
MEMORY_FOLDER = "dale_memory"
CHECKPOINT_EPOCHS = "checkpoint_epochs.json"


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
    """nnU-Net trainer for noisy labels (DALE). Loss: nnU-Net's stock Dice+CE (for now).

    Hyperparameters (instance attributes, set in ``__init__``):

    - ``dale_ema_min_weight`` (0.2): floor of the weight of a new visit in the temporal ensemble;
      the first visits are averaged (weight 1/(n+1)), later ones weighted at least this much, so q
      follows roughly the last 1/0.2 = 5 visits of a voxel.
    - ``dale_picture_every`` (10): epochs between pictures of one case's buffers
      (``<fold>/dale_memory_pictures``).

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
        if self.label_manager.has_regions:
            raise SetupError(
                "region-based training (regions_class_order in dataset.json) is not supported by "
                "nnUNetTrainerDALE: its label confidence is defined per class. Train this dataset with "
                "-tr nnUNetTrainer, or convert it to plain labels.")
        self.dale_ema_min_weight = 0.2
        self.dale_picture_every = 10
        self.memory: ConfidenceMemory | None = None
        self._dale_restore: tuple[int, str] | None = None
        self.logger.local_logger = DALELocalLogger()
        self.print_to_log_file(
            f"{self.__class__.__name__} (nnunetv2-dale {__version__}): per-voxel label-confidence memory ON; "
            f"loss = nnU-Net's stock Dice+CE (the DALE objective is not implemented in this version). Budget: "
            f"{self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations "
            f"(+{self.num_val_iterations_per_epoch} validation).",
            also_print_to_console=True,
        )

    # ------------------------------------------------------------------ set-up
    @property
    def memory_folder(self) -> Path:
        return Path(self.output_folder) / MEMORY_FOLDER

    def get_dataloaders(self):
        with training_loader_with_coordinates():
            return super().get_dataloaders()

    def _build_memory(self) -> ConfidenceMemory:
        dataset_tr, _ = self.get_tr_and_val_datasets()
        shapes = {k: tuple(dataset_tr.load_case(k)[0].shape[1:]) for k in sorted(dataset_tr.identifiers)}
        identity = {"dataset": self.plans_manager.dataset_name, "plans": self.plans_manager.plans_name,
                    "configuration": self.configuration_name, "fold": self.fold}
        return ConfidenceMemory(self.memory_folder, shapes, len(self.label_manager.all_labels), identity,
                                self.dale_ema_min_weight)

    def _barrier(self) -> None:
        if self.is_ddp:
            dist.barrier()

    def on_train_start(self):
        super().on_train_start()
        self.memory = self._build_memory()
        if self.local_rank == 0:
            if self._dale_restore is None:
                self.memory.reset()
            else:
                epoch, name = self._dale_restore
                try:
                    self.memory.restore(epoch, name)
                except MemoryMismatchError as e:
                    raise SetupError(str(e)) from None
        self._barrier()
        if self._dale_restore is not None and self.local_rank != 0:
            self.memory.visited_voxels = json.loads((self.memory.live / "manifest.json").read_text())["visited_voxels"]
        where = "restored from epoch %d" % self._dale_restore[0] if self._dale_restore else "new"
        self.print_to_log_file(
            f"DALE memory ({where}): {len(self.memory.case_shapes)} cases, {self.memory.total_voxels} voxels, "
            f"{self.memory.channels} float16 channel(s) + uint8 visit count = {2 * self.memory.channels + 1} "
            f"bytes/voxel, in {self.memory.live}")

    # ---------------------------------------------------------------- training
    def train_step(self, batch: dict) -> dict:
        """nnU-Net 2.8.1's ``train_step`` plus the memory update from the same forward pass."""
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        if isinstance(target, list):
            target = [i.to(self.device, non_blocking=True) for i in target]
        else:
            target = target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
            output = self.network(data)
            loss = self.loss(output, target)

        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        self.update_memory(batch, output)
        return {'loss': loss.detach().cpu().numpy()}

    @torch.no_grad()
    def update_memory(self, batch: dict, output) -> None:
        """Scatter the batch's full-resolution softmax into the buffers of its cases."""
        if self.memory is None or "regression_target" not in batch:
            return
        logits = output[0] if isinstance(output, (list, tuple)) else output
        probs = torch.softmax(logits.detach().float(), 1).cpu()
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        ignore = self.label_manager.ignore_label
        for b, key in enumerate(batch["keys"]):
            index, valid = source_indices(batch["regression_target"][b], batch["case_shapes"][b])
            labels = target[b].reshape(-1).long()
            if ignore is not None:
                valid &= labels != ignore
            p = probs[b].reshape(probs.shape[1], -1).T
            self.memory.update(key, index[valid], p[valid], labels[valid])

    @torch.no_grad()
    def patch_confidence(self, batch: dict) -> list[torch.Tensor]:
        """Per-voxel label confidence q[y] for the batch's augmented patches, one tensor per deep
        supervision output (full resolution first), each shaped like its target; NaN where the
        voxel is padding or was never visited. Lower resolutions are downsampled like nnU-Net
        downsamples targets (nearest-exact)."""
        targets = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
        full = targets[0]
        conf = torch.full(full.shape, float("nan"), dtype=torch.float32)
        for b, key in enumerate(batch["keys"]):
            index, valid = source_indices(batch["regression_target"][b], batch["case_shapes"][b])
            q, visits = self.memory.read(key, index)
            agreement = agreement_with_label(q, full[b].reshape(-1).long(), self.memory.num_classes)
            agreement[~valid | (visits == 0)] = float("nan")
            conf[b] = agreement.reshape(full.shape[1:])
        return [conf if t.shape == conf.shape else
                torch.nn.functional.interpolate(conf, t.shape[2:], mode="nearest-exact") for t in targets]

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.memory is None:
            return
        visited, confidence, skipped = self.memory.finish_epoch(self.is_ddp)
        self.logger.log("dale_visited_fraction", visited, self.current_epoch)
        self.logger.log("dale_mean_confidence", confidence, self.current_epoch)
        self.print_to_log_file(
            f"DALE memory: {visited:.1%} of voxels visited; mean label confidence per class (voxels seen this "
            f"epoch): {', '.join(f'{c:.3f}' for c in confidence)}"
            + (f"; {skipped} patches with non-finite network output skipped (memory not updated)" if skipped else ""))
        if self.local_rank == 0 and (self.current_epoch % self.dale_picture_every == 0
                                     or self.current_epoch == self.num_epochs - 1):
            self._save_picture()

    def _save_picture(self) -> None:
        dataset_tr, _ = self.get_tr_and_val_datasets()
        key = sorted(self.memory.case_shapes)[0]
        seg = np.asarray(dataset_tr.load_case(key)[1][0])
        q, n = self.memory.case_arrays(key)
        save_buffer_picture(Path(self.output_folder) / "dale_memory_pictures" / f"epoch_{self.current_epoch:04d}_{key}.png",
                            seg, q, n, f"{key}, epoch {self.current_epoch}")

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """Buffers first (snapshot stamped with the checkpoint's epoch), then the checkpoint, written
        to a temporary file and renamed, so that a kill at any moment leaves every checkpoint on disk
        with a complete snapshot of its epoch."""
        epoch = self.current_epoch + 1  # what nnU-Net stores as checkpoint['current_epoch']
        write_memory = self.memory is not None and not self.disable_checkpointing
        self._barrier()
        if write_memory and self.local_rank == 0:
            self.memory.snapshot(epoch)
        tmp = filename + ".tmp"
        super().save_checkpoint(tmp)
        if self.local_rank == 0 and os.path.isfile(tmp):
            os.replace(tmp, filename)
            if write_memory:
                self._record_checkpoint_epoch(os.path.basename(filename), epoch)
        self._barrier()

    def _record_checkpoint_epoch(self, name: str, epoch: int) -> None:
        path = self.memory_folder / CHECKPOINT_EPOCHS
        epochs = json.loads(path.read_text()) if path.is_file() else {}
        epochs[name] = epoch
        epochs = {n: e for n, e in epochs.items() if os.path.isfile(os.path.join(self.output_folder, n))}
        write_json_atomic(path, epochs)
        self.memory.prune(set(epochs.values()))

    def on_train_end(self):
        super().on_train_end()  # writes checkpoint_final.pth, then deletes checkpoint_latest.pth
        if self.memory is not None and self.local_rank == 0 and not self.disable_checkpointing:
            self._record_checkpoint_epoch("checkpoint_final.pth", self.current_epoch)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        name = os.path.basename(filename_or_checkpoint) if isinstance(filename_or_checkpoint, str) else "checkpoint"
        self._dale_restore = (self.current_epoch, name)  # applied in on_train_start; --val never touches buffers
