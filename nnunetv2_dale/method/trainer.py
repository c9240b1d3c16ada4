"""``nnUNetTrainerDALE``: nnU-Net's trainer with DALE's label-confidence memory and objective.

- Memory: a temporal ensemble of the softmax per training voxel, following nnU-Net's augmentation
  through coordinate maps, persisted with every checkpoint (``memory.py``, ``coords.py``).
- Objective (``rsets.py``, ``loss.py``, ``alignment.py``, ``schedule.py``): warm-up with the stock
  loss; then stable phases (Dice+CE weighted per voxel by the label confidence omega from a
  per-class two-component mixture on the loss-consistency signal) alternate with fuzzy phases
  (collaborative soft target + distribution alignment of fuzzy-region decoder features to the
  reliable-region statistics). See docs/method.md.

DDP design: every rank updates the buffers of the cases in its own batches (the buffers are files
in the fold folder, shared by all ranks of a node); the per-epoch statistics (newly visited voxels,
confidence sums and counts) are all-reduced before they are logged; snapshots are written by rank 0
between barriers, so no rank updates buffers while they are copied.
"""
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from torch import distributed as dist
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_dale import __version__
from nnunetv2_dale.method.alignment import FeatureAlignment, mass_share
from nnunetv2_dale.method.coords import source_indices, training_loader_with_coordinates
from nnunetv2_dale.method.loss import DALELoss, class_balanced, collaborative_target, ensemble_consistency
from nnunetv2_dale.method.rsets import (Mixture, agreement_with_label, as_float, boundary_band, entropy_signal,
                                        fit_mixture, loss_signal, omega_per_voxel)
from nnunetv2_dale.method.noise_estimate import ESTIMATE_FILE, NoiseEstimate, case_counts
from nnunetv2_dale.method.sampling import SAMPLING_FILE, FuzzySampler, PatchReader, SettingsFile
from nnunetv2_dale.method.horizon import frozen_from, mature_from, replay_saturation, update_saturation
from nnunetv2_dale.method.schedule import (FUZZY, JOINT, PHASE_CODES, STABLE, WARMUP, alignment_weight,
                                           phase_of_epoch, warmup_epochs)
from nnunetv2_dale.method.memory import (MANIFEST, ConfidenceMemory, MemoryMismatchError, PatchUpdate, scatter_patch,
                                         write_json_atomic)
from nnunetv2_dale.utilities.budget import nnUNetTrainerBudget
from nnunetv2_dale.utilities.preflight import SetupError
from nnunetv2_dale.method.progress import DALELocalLogger, save_buffer_picture

MEMORY_FOLDER = "dale_memory"
CHECKPOINT_EPOCHS = "checkpoint_epochs.json"
BEST, LATEST = "checkpoint_best.pth", "checkpoint_latest.pth"
TORCH_WRITE_ERRORS = ("inline_container", "PytorchStreamWriter", "file write failed")  # torch.save's zip writer


@contextmanager
def write_failures_explained(folder: str | os.PathLike, what: str, partial: str | None = None):
    """Turn an OSError while writing (disk full, file too large, read-only, permissions) into one
    message that says the fold is intact and how to go on; remove the partial temporary file."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(s in str(e) for s in TORCH_WRITE_ERRORS):
            raise
        if partial is not None and os.path.isfile(partial):
            os.remove(partial)
        reason = f"{e.strerror} (errno {e.errno})" if isinstance(e, OSError) and e.strerror else \
            f"{str(e).strip().splitlines()[-1]} (is the disk full?)"
        raise SetupError(
            f"could not write {what} in {folder}: {reason}. The fold stays "
            "consistent: every checkpoint on disk still has its DALE buffers. Free disk space (or fix the folder's "
            "permissions / file-size limit), then continue with the same nnUNetv2_train command plus --c.") from None


class RSetMaps(NamedTuple):
    omega: torch.Tensor
    reliable: torch.Tensor
    fuzzy: torch.Tensor
    soft: torch.Tensor | None  # None where the phase does not use it (``rset_maps``)
    onehot: torch.Tensor
    ensemble: torch.Tensor | None
    known: torch.Tensor


class nnUNetTrainerDALE(nnUNetTrainerBudget):
    """nnU-Net trainer for noisy labels (DALE).

    Hyperparameters (instance attributes, set in ``__init__``; defaults are ours, see docs/method.md):

    - ``dale_warmup_fraction`` (0.1): share of epochs trained with the stock loss first (ends
      earlier where the curve horizon froze the memory earlier: ``warmup_end``).
    - ``dale_phase_period`` (1): epochs per stable/fuzzy block.
    - ``dale_min_visits`` (3): voxels visited fewer times keep omega = 1.
    - ``dale_mixture_tied`` (True): both mixture components share one variance (omega monotone in
      the loss; see ``rsets.fit_mixture``). False was the 0.1.0 default (``nnUNetTrainerDALE_v01``).
    - ``dale_sharpen_temperature`` (0.5): temperature of sharpen(q) in the collaborative target.
    - ``dale_align_weight`` (0.1): lambda, the maximum weight of the alignment term, reached after a
      linear ramp over ``dale_align_rampup_fraction`` (0.2) of the post-warm-up epochs.
    - ``dale_align_standardise`` (True): measure the alignment in reliable standard deviations
      (False, raw feature units, was the 0.1.0 default).
    - ``dale_fuzzy_sampling_share`` (0.5): in fuzzy phases, the share of patches centred on a voxel
      drawn with probability proportional to its fuzzy membership (0 turns the bias off).
    - ``dale_class_balanced_weights`` (False): rescale the stable-phase weights omega per class
      and batch to mean 1 over that class's labelled voxels, so confidence redistributes weight
      within a class instead of removing it from the class whose boundary is least certain.
    - ``dale_confidence_floor`` (0): omega is rescaled to [floor, 1] in the stable-phase weights,
      so no labelled voxel loses all its weight.
    - ``dale_fuzzy_correction`` (True): the fuzzy phase trains fuzzy voxels toward the collaborative
      target y~ (a correction toward the temporal ensemble) and aligns their features toward y~'s
      class; False trains them with weight omega against their label, as the stable phase does,
      and aligns them toward their label's class (so low confidence only removes weight).
    - ``dale_correction_in_loss`` (False): the fuzzy phase's loss is the stable phase's
      confidence-weighted one (flagged labels are discounted, never replaced), and the collaborative
      target only gives the alignment its classes; True: the fuzzy phase's loss trains toward the
      collaborative target (the default up to 0.3.0, ``nnUNetTrainerDALE_v03``). Why: at full-size
      DDTI the early ensemble is wrong on about half of the noise, so correcting toward it lost
      2-2.6 points where discounting lost none. docs/method.md 7.17.
    - ``dale_certain_correction`` (False): the fuzzy phase moves a voxel's target toward sharpen(q)
      by (1 - omega) * (1 - ER) instead of (1 - omega): only as far as the ensemble is certain, so
      hard voxels on which the early ensemble is merely undecided keep most of their label.
    - ``dale_consistency_weight`` (0): weight of the ensemble-consistency term (every post-warm-up
      epoch): mean over known voxels of log(1 - <p, q>), which pulls the prediction toward the
      voxel's temporal ensemble and so resists memorising labels the ensemble contradicts
      (early-learning regularisation, Liu et al. 2020).
    - ``dale_memory_horizon`` (0.3): share of the epochs during which the memory is updated;
      afterwards q, and the mixtures fitted to it, are frozen: an early-learning ensemble that
      cannot follow the network into memorising the noise (1.0, never frozen, was the default
      before; ``nnUNetTrainerDALE_noHorizon``). docs/method.md section 7 has the numbers.
    - ``dale_horizon_from_curve`` (True): the memory freezes earlier, once every class's
      label-confidence curve has saturated (ADELE's criterion, ``horizon.py``; slope drop
      ``dale_horizon_slope_drop`` 0.9), and DALE's objective starts then if the warm-up has not
      ended yet; the share above is then only the latest. False (the fixed share alone) was the
      default before; ``nnUNetTrainerDALE_fixedHorizon``. docs/method.md 7.4-7.5.
    - ``dale_horizon_min_visits`` (10): the curve freezes the memory only once its voxels were
      visited that many times on average (``dale_visits_per_voxel`` in the log), two time
      constants of the ensemble's 0.2 floor, so that its first, barely trained predictions no
      longer weigh much (0 was the default before; ``nnUNetTrainerDALE_v02``). docs/method.md 7.14.
    - ``dale_align_agreement`` (False): align a fuzzy voxel's features only where the network's
      current prediction already agrees with the collaborative target's class (a co-teaching-style
      agreement between the network and the early ensemble against the label): the alignment then
      consolidates what the network does, instead of pulling voxels it has learnt toward the early
      ensemble's errors.
    - ``dale_align_mass`` (False): weight each class's alignment distance by the share of the
      batch's mass of that class that is fuzzy (``alignment.mass_share``), so a fuzzy voxel's pull
      does not grow as fewer voxels are flagged (the plain distance between the fuzzy and reliable
      means pulls each of a batch's few flagged voxels harder than each of many); the total weight then
      follows how much of the data is flagged. docs/method.md 7.12.
    - ``dale_reliable_certain`` (False): the reliable membership is omega alone, so the alignment's
      reference keeps the trusted voxels the ensemble is unsure of (boundaries); True: omega (1 - ER),
      the default before (``nnUNetTrainerDALE_curveHorizon``). docs/method.md 7.5-7.6.
    - ``dale_noise_gate`` (True): DALE's objective acts as far as the labels look noisy
      (``noise_estimate.py``): omega -> 1 - g (1 - omega), the alignment weight and the fuzzy
      sampling share times g, where the gate g rises from 0 at ``dale_gate_low`` (0.06) to 1 at
      ``dale_gate_high`` (0.10) of the median case's share of labelled lesion area that the early
      ensemble contradicts at least ``dale_gate_margin`` (2.5) voxels and ``dale_gate_depth_share``
      (0.6) times the lesion's mean depth from a label change; on labels that look clean DALE trains
      as stock nnU-Net. False: the defaults before the gate (``nnUNetTrainerDALE_ungated``); 0.2.0's
      rim (2.5 voxels alone, gate 0.08-0.14): ``nnUNetTrainerDALE_v02``. docs/method.md 7.13-7.14.
    - ``dale_case_gate`` (True): each case's label confidence also follows the case's own estimate
      (omega -> 1 - g g_case (1 - omega), g_case rising from ``dale_case_gate_low`` (0.03) to
      ``dale_case_gate_high`` (0.06) of the case's contradicted lesion share; 1 where the case has
      no labelled foreground), so the cases that look clean inside a noisy dataset lose no weight
      to the early network's own errors. docs/method.md 7.15.
    - ``dale_agreement_weights`` (True): the loss weights also discount the voxels whose early
      ensemble prefers another class (omega x min(1, 2 q[y]), gated like omega): more of the noise
      flagged, at a precision the per-case gate keeps. docs/method.md 7.15.
    - ``dale_agreement_power`` (1): the agreement factor is min(1, 2 q[y]) to this power; above 1
      the voxels the ensemble contradicts are discounted harder (``nnUNetTrainerDALE_sharpAgree``).
    - ``dale_use_confidence`` / ``dale_use_alternation`` / ``dale_use_alignment`` (True): switched
      off by the ablation variants.

    - ``dale_ema_min_weight`` (0.2): floor of the weight of a new visit in the temporal ensemble;
      the first visits are averaged (weight 1/(n+1)), later ones weighted at least this much, so q
      follows roughly the last 1/0.2 = 5 visits of a voxel.
    - ``dale_picture_every`` (10): epochs between pictures of one case's buffers
      (``<fold>/dale_memory_pictures``).

    Budgets, start-up checks and length variants come from :class:`nnUNetTrainerBudget`.
    """

    use_confidence: bool = True  # class-level switches of the ablation variants, copied in __init__
    use_alternation: bool = True
    use_alignment: bool = True
    dale_overrides: dict[str, object] = {}  # a variant's hyperparameters, set over the defaults in __init__
    noise_estimate: NoiseEstimate | None = None  # how noisy the labels look (update_noise_estimate)
    _case_gates: tuple = (None, {})  # (the estimate they follow, per-case gate); sample_gates

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise SetupError(
                "region-based training (regions_class_order in dataset.json) is not supported by "
                "nnUNetTrainerDALE: its label confidence is defined per class. Train this dataset with "
                "-tr nnUNetTrainer, or convert it to plain labels.")
        self.set_dale_hyperparameters()
        self.mixtures: list[Mixture] = [Mixture() for _ in self.label_manager.all_labels]
        self.alignment = FeatureAlignment(len(self.label_manager.all_labels))
        self._epoch_terms: dict[str, list[torch.Tensor]] = {}
        self.memory: ConfidenceMemory | None = None
        self._dale_restore: tuple[int, str] | None = None
        self._curve_saturation: list[int | None] = []  # per class: epoch count at which its curve saturated
        self._curve_horizon: int | None = None  # epoch from which the curve froze the memory
        self._frozen_snapshot: int | None = None  # a snapshot (epoch) this process wrote or restored after the horizon
        self._best_without_buffers = False  # said in the log once
        self._stock_steps_said = False  # "the steps are nnU-Net's from here on", said in the log once
        self._skipped_steps = 0
        self.logger.local_logger = DALELocalLogger()
        self.print_to_log_file(
            f"{self.__class__.__name__} (nnunetv2-dale {__version__}): DALE objective (confidence "
            f"{'on' if self.dale_use_confidence else 'OFF'}, alternation {'on' if self.dale_use_alternation else 'OFF'}, "
            f"alignment {'on' if self.dale_use_alignment else 'OFF'}; set by the variant).",
            also_print_to_console=True,
        )

    def set_dale_hyperparameters(self) -> None:
        """DALE's hyperparameters (attributes, as nnU-Net's own), then the variant's ``dale_overrides``."""
        self.dale_ema_min_weight = 0.2
        self.dale_picture_every = 10
        self.dale_warmup_fraction = 0.1
        self.dale_phase_period = 1
        self.dale_min_visits = 3
        self.dale_mixture_tied = True
        self.dale_align_standardise = True
        self.dale_sharpen_temperature = 0.5
        self.dale_align_weight = 0.1
        self.dale_align_rampup_fraction = 0.2
        self.dale_fuzzy_sampling_share = 0.5
        self.dale_class_balanced_weights = False
        self.dale_confidence_floor = 0.0
        self.dale_consistency_weight = 0.0
        self.dale_fuzzy_correction = True
        self.dale_correction_in_loss = False
        self.dale_certain_correction = False
        self.dale_memory_horizon = 0.3
        self.dale_horizon_from_curve = True
        self.dale_horizon_slope_drop = 0.9
        self.dale_horizon_min_visits = 10.0
        self.dale_background_writes = True
        self.dale_worker_reads = True
        self.dale_boundary_margin = 0
        self.dale_align_agreement = False
        self.dale_reliable_certain = False
        self.dale_align_cooldown_fraction = 0.0
        self.dale_align_mass = False
        self.dale_agreement_weights = True
        self.dale_agreement_power = 1.0
        self.dale_noise_gate = True
        self.dale_gate_low = 0.06
        self.dale_gate_high = 0.10
        self.dale_gate_margin = 2.5
        self.dale_gate_depth_share = 0.6
        self.dale_case_gate = True
        self.dale_case_gate_low = 0.03
        self.dale_case_gate_high = 0.06
        self.dale_estimate_every = 10
        self.dale_use_confidence = self.use_confidence
        self.dale_use_alternation = self.use_alternation
        self.dale_use_alignment = self.use_alignment
        for name, value in self.dale_overrides.items():
            if not hasattr(self, name):
                raise AttributeError(f"{self.__class__.__name__}.dale_overrides: no hyperparameter {name!r}")
            setattr(self, name, value)

    # ------------------------------------------------------------------ set-up
    @property
    def memory_folder(self) -> Path:
        return Path(self.output_folder) / MEMORY_FOLDER

    def _build_loss(self):
        return DALELoss(self.configuration_manager.batch_dice, self.label_manager.ignore_label, self.is_ddp,
                        self.deep_supervision_weights())

    def initialize(self):
        super().initialize()
        self.alignment.standardise = self.dale_align_standardise
        if self.dale_use_alignment:
            self.alignment.attach(self.network)

    def phase(self, epoch: int | None = None) -> str:
        epoch = self.current_epoch if epoch is None else epoch
        return phase_of_epoch(epoch, self.warmup_end(), self.dale_phase_period, self.dale_use_alternation)

    def warmup_end(self) -> int:
        """The first epoch of DALE's objective: after ``dale_warmup_fraction`` of the epochs, or
        from the epoch the curve horizon froze the memory if that came first (the warm-up is there
        to fill the memory; at nnU-Net's 1000 epochs the fixed share alone is 100 epochs of the
        stock loss, long into memorisation)."""
        fixed = warmup_epochs(self.num_epochs, self.dale_warmup_fraction)
        return fixed if self._curve_horizon is None else min(fixed, self._curve_horizon)

    def get_dataloaders(self):
        sampler = FuzzySampler(self.memory_folder) if self.dale_fuzzy_sampling_share > 0 else None
        reader = PatchReader(self.memory_folder) if self.dale_worker_reads else None
        with training_loader_with_coordinates(sampler, reader, SettingsFile(self.memory_folder)):
            return super().get_dataloaders()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.memory is None:
            return
        if self.phase() != WARMUP and self.noise_estimate is None:
            self.update_noise_estimate()  # a run resumed from buffers saved without an estimate
        reads = self._write_sampling_settings()
        if not reads and self.phase() != WARMUP and not self._stock_steps_said:
            self._stock_steps_said = True
            self.print_to_log_file("DALE: the labels look clean (gate 0) and the memory is frozen, so DALE's objective "
                                   "is nnU-Net's for the rest of the training: the steps are nnU-Net's, and the "
                                   "workers build nnU-Net's own batches (no coordinate maps, no buffer reads)")

    def _write_sampling_settings(self) -> bool:
        """Write the current epoch's ``sampling.json`` for the augmentation workers (rank 0);
        returns whether this epoch's steps read the memory."""
        reads = self.steps_read_memory()
        if self.local_rank == 0:
            write_json_atomic(self.memory_folder / SAMPLING_FILE, {
                "phase": self.phase(), "share": self.dale_fuzzy_sampling_share, "min_visits": self.dale_min_visits,
                "channels": self.memory.channels, "mixtures": [m.to_dict() for m in self.mixtures],
                "gate": self.noise_gate(), "reads": reads, "coordinates": reads or not self.memory_frozen()})
        return reads

    def steps_read_memory(self, epoch: int | None = None) -> bool:
        """Whether the training steps of an epoch use the memory (DALE's objective, and the
        workers' buffer reads for it): after the warm-up, unless the memory is frozen under a shut
        gate. Then the estimate is final and gives nnU-Net's loss in every phase, so the step is
        nnU-Net's, at nnU-Net's cost (on a GPU DALE's per-voxel work was ~25 ms of a 55 ms 3d step)."""
        if self.memory is None or self.phase(epoch) == WARMUP:
            return False
        return not (self.memory_frozen(epoch) and self.noise_gate() <= 0)

    def _build_memory(self) -> ConfidenceMemory:
        dataset_tr, _ = self.get_tr_and_val_datasets()
        keys = sorted(dataset_tr.identifiers)
        shapes = {k: tuple(dataset_tr.load_case(k)[0].shape[1:]) for k in keys}
        identity = {"dataset": self.plans_manager.dataset_name, "plans": self.plans_manager.plans_name,
                    "configuration": self.configuration_name, "fold": self.fold}
        memory = ConfidenceMemory(self.memory_folder, shapes, len(self.label_manager.all_labels), identity,
                                  self.dale_ema_min_weight, background=self.dale_background_writes)
        ignore = self.label_manager.ignore_label
        if ignore is not None:  # source voxels with the ignore label never enter the memory
            for k in keys:
                memory.exclude(k, np.asarray(dataset_tr.load_case(k)[1][0]) == ignore, write=self.local_rank == 0)
        return memory

    def _barrier(self) -> None:
        if self.is_ddp:
            dist.barrier()

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        # the buffers first: a refused restore then exits before nnU-Net starts its loader workers
        # (stopping them after they have begun prefetching races with their result threads)
        self._start_memory()
        # the workers start prefetching in nnU-Net's on_train_start: they must not read the settings a
        # killed run left behind (another phase, older mixtures) for the first batches of a resumed one
        self._write_sampling_settings()
        self._barrier()
        super().on_train_start()

    def _start_memory(self) -> None:
        """Build the buffers, then reset them or restore the checkpoint's snapshot."""
        self.memory = self._build_memory()
        if self.local_rank == 0:
            with write_failures_explained(self.memory_folder, "the DALE buffers"):
                if self._dale_restore is None:
                    self.memory.reset()
                else:
                    epoch, name = self._dale_restore
                    try:
                        self.memory.restore(epoch, name)
                    except MemoryMismatchError as e:
                        hint = (" (checkpoint_best.pth is written without DALE buffers once checkpoint_latest.pth has "
                                "them: restore checkpoint_latest.pth to resume)") if name == BEST else ""
                        raise SetupError(str(e) + hint) from None
                    if self.memory_frozen(epoch):
                        self._frozen_snapshot = epoch
        self._barrier()
        if self._dale_restore is not None:
            manifest = json.loads((self.memory.live / "manifest.json").read_text())
            self.memory.visited_voxels = manifest["visited_voxels"]
            extra = manifest.get("extra", {})
            if "mixtures" in extra:
                self.mixtures = [Mixture.from_dict(m) for m in extra["mixtures"]]
            if "alignment" in extra:
                self.alignment.load_state(extra["alignment"])
            if "noise_estimate" in extra:
                self.noise_estimate = NoiseEstimate.from_dict(extra["noise_estimate"])
        where = "restored from epoch %d" % self._dale_restore[0] if self._dale_restore else "new"
        self.print_to_log_file(
            f"DALE memory ({where}): {len(self.memory.case_shapes)} cases, {self.memory.total_voxels} voxels, "
            f"{self.memory.channels} float16 channel(s) + uint8 visit count = {2 * self.memory.channels + 1} "
            f"bytes/voxel, in {self.memory.live}")

    # ---------------------------------------------------------------- training
    def train_step(self, batch: dict) -> dict:
        """nnU-Net 2.8.1's ``train_step`` with the DALE loss of the current phase, and the memory
        update from the same forward pass."""
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        if isinstance(target, list):
            target = [i.to(self.device, non_blocking=True) for i in target]
        else:
            target = target.to(self.device, non_blocking=True)
        phase = self.phase()
        use_memory = self.steps_read_memory() and "regression_target" in batch

        self.optimizer.zero_grad(set_to_none=True)
        self.alignment.active = use_memory and self.dale_use_alignment
        try:
            with torch.autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
                output = self.network(data)
                if use_memory:
                    loss, terms = self.dale_loss(batch, output, target, phase)
                else:
                    loss, terms = self.loss(output, target), {}
        finally:
            self.alignment.active = False
            features, self.alignment.features = self.alignment.features, None
        del features

        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            if torch.isfinite(norm):  # as the GPU grad scaler does: a non-finite step would ruin the weights
                self.optimizer.step()
            else:  # under DDP the gradients are all-reduced, so every rank skips the same step
                self._skipped_steps += 1
        self.update_memory(batch, output)
        for k, v in terms.items():
            self._epoch_terms.setdefault(k, []).append(v)
        return {'loss': loss.detach().cpu().numpy()}

    def dale_loss(self, batch: dict, output, target, phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a stable, fuzzy or joint phase, and its terms for the log."""
        targets = target if isinstance(target, list) else [target]
        omega, reliable, fuzzy, soft, onehot, ensemble, known = self.rset_maps(batch, phase)
        ds = len(targets) > 1
        if self.dale_confidence_floor > 0:
            omega = self.dale_confidence_floor + (1 - self.dale_confidence_floor) * omega
        omegas = self._to_scales(omega, targets)
        # terms stay on the device (a float() here would wait for the forward pass every step); the
        # epoch's means are taken once, in on_train_epoch_end
        terms: dict[str, torch.Tensor] = {"reliable_fraction": reliable.mean(), "fuzzy_fraction": fuzzy.mean()}
        loss = 0
        weights = None  # omegas on the device, built once per step where a phase weights its loss
        if phase in (STABLE, JOINT):
            if self.dale_class_balanced_weights:
                omegas = [class_balanced(o, t, len(self.label_manager.all_labels), self.label_manager.ignore_label)
                          for o, t in zip(omegas, targets)]
            weights = [o.to(self.device) for o in omegas]
            stable = self.loss(output, target, weights=weights if ds else weights[0])
            loss = loss + stable
            terms["stable_loss"] = stable.detach()
            if self.dale_use_alignment and self.alignment.features is not None:
                self.alignment.update_reliable(self.alignment.features, reliable * onehot, self.is_ddp)
        if phase in (FUZZY, JOINT):
            if self.dale_fuzzy_correction and self.dale_correction_in_loss:
                softs = [s.to(self.device) for s in self._to_scales(soft, targets)]
                collaborative = self.loss(output, target, soft=softs if ds else softs[0])
            else:  # low confidence only removes weight (the alignment keeps the collaborative class if corrected)
                soft = soft if self.dale_fuzzy_correction else onehot
                weights = weights or [o.to(self.device) for o in omegas]
                collaborative = self.loss(output, target, weights=weights if ds else weights[0])
            loss = loss + collaborative
            terms["fuzzy_loss"] = collaborative.detach()
            lam = alignment_weight(self.current_epoch, self.num_epochs, self.warmup_end(),
                                   self.dale_align_weight, self.dale_align_rampup_fraction,
                                   self.dale_align_cooldown_fraction)
            if self.dale_use_alignment and self.alignment.features is not None and lam > 0:
                members = (fuzzy * soft).to(self.device)
                if self.dale_align_agreement:
                    logits = output[0] if isinstance(output, (list, tuple)) else output
                    agree = logits.detach().argmax(1, keepdim=True) == members.argmax(1, keepdim=True)
                    terms["align_agreed"] = (members * agree).sum() / members.sum().clamp_min(1e-6)
                    members = members * agree
                shares = None
                if self.dale_align_mass:
                    per_class = [m.transpose(0, 1).flatten(1).sum(1) for m in (members, (reliable * onehot).to(self.device))]
                    shares = mass_share(*per_class)
                    terms.update({f"align_share_{k}": v for k, v in enumerate(shares)})
                align = self.alignment.loss(self.alignment.features, members, shares)
                # g on omega alone would not weaken the alignment: it compares weighted means
                loss = loss + lam * self.noise_gate() * align
                terms["align_loss"] = align.detach()
        if self.dale_consistency_weight > 0:
            logits = output[0] if isinstance(output, (list, tuple)) else output
            consistency = ensemble_consistency(logits, ensemble.to(self.device), known.to(self.device))
            loss = loss + self.dale_consistency_weight * consistency
            terms["consistency_loss"] = consistency.detach()
        return loss, terms

    @torch.no_grad()
    def rset_maps(self, batch: dict, phase: str | None = None) -> RSetMaps:
        """Per patch voxel (full resolution, on the training device): omega (B,1,*S), reliable and
        fuzzy membership (B,1,*S), the collaborative target y~ (B,K,*S), the one-hot label (B,K,*S),
        the temporal ensemble q (B,K,*S; the one-hot label where not known) and where it is known
        (B,1,*S). The augmentation workers read the patch's buffer values with the batch
        (``dale_q``, ``dale_visits``; ``dale_worker_reads``), or else the host gathers them here; the
        per-voxel math runs on the device, batched over the samples. Given the ``phase`` it is for,
        the maps that phase does not use (y~ and q in a stable phase, the entropy where no setting
        reads it) are not computed (None); without it, all are."""
        labels_full = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        k = len(self.label_manager.all_labels)
        shape = labels_full.shape
        dev = self.device
        channels = self.memory.channels
        keys, indices = list(batch["keys"]), [None] * shape[0]
        valid_host = None  # from the workers' reads: 0 visits where no valid source voxel (compared on the device)
        if "dale_q" in batch:  # read by the augmentation workers
            q_host, visits_host = batch["dale_q"], batch["dale_visits"]
        else:
            q_host = torch.empty((shape[0], int(np.prod(shape[1:])), channels))
            visits_host = torch.empty((shape[0], q_host.shape[1]), dtype=torch.int64)
            valid_host = torch.empty(visits_host.shape, dtype=torch.bool)
            for b, key, index, valid, _ in self._patch_voxels(batch):
                q_host[b], visits_host[b] = self.memory.read(key, index)
                valid_host[b] = valid
                indices[b] = index
        host = [t for t in (q_host, visits_host, valid_host) if t is not None]
        if dev.type == "cuda":  # already pinned where nnU-Net's loader pins the batch (then this returns it)
            host = [t.pin_memory() for t in host]
        q, visits, *rest = (t.to(dev, non_blocking=True) for t in host)
        valid = rest[0] if rest else visits > 0
        q = q.float()
        labels_dev = labels_full.to(dev, non_blocking=True)
        # each voxel's class as a float in [0, K): comparisons, lerps and one-hots cost a CPU less than on int64
        lab = labels_dev.reshape(shape[0], -1).float().clamp(0, k - 1)  # not in place: .float() may be the batch itself
        ignore = self.label_manager.ignore_label
        if ignore is not None:  # ignored voxels never count as known (the host path drops them from valid)
            valid = valid & (labels_dev.reshape(shape[0], -1) != ignore)
        known = valid & (visits >= self.dale_min_visits)
        known_f = as_float(known)  # 0/1: torch.lerp(a, b, known_f) is where(known, b, a) at a fraction of a CPU's cost
        one = torch.ones((), device=dev)
        q_label = agreement_with_label(q, lab, k)  # the ensemble's q[y] (B, N)
        if channels == 1:  # binary: the buffer holds p(foreground), the label is 0 or 1
            onehot = torch.stack([1 - lab, lab], 1)
        else:
            onehot = as_float(lab[:, None] == torch.arange(k, device=dev)[None, :, None])
        # omega from the loss-consistency signal -log q[y]
        omega = self.label_confidence(keys, indices, valid, known, lab, q_label).to(dev)
        # how far DALE acts on each sample's labels (1 without the gate; host values, no device sync)
        gates = self.sample_gates(keys) if self.dale_noise_gate else torch.ones(shape[0])
        gated = bool((gates < 1).any())
        if gated:  # labels that look clean keep their weight: omega -> 1 - g (1 - omega)
            gates = gates.to(dev)
            omega = 1 - gates.unsqueeze(1) * (1 - omega)
        need_soft = phase != STABLE  # y~: the fuzzy phase's alignment members (or target)
        need_q = need_soft or self.dale_consistency_weight > 0
        need_entropy = phase is None or not self.dale_use_confidence or self.dale_reliable_certain or \
            (need_soft and self.dale_certain_correction)
        # class-first (B, K, N) from here on: one pass per map, no transposed copies
        q_full = entropy = None
        if need_q or need_entropy:
            q_cls = torch.stack([1 - q[..., 0], q[..., 0]], 1) if channels == 1 else q.transpose(1, 2)
            if need_q:
                q_full = torch.lerp(onehot, q_cls, known_f[:, None]).reshape(shape[0], k, *shape[2:])
            if need_entropy:
                entropy = (entropy_signal(q_cls) * known_f).reshape(shape)
        onehot = onehot.reshape(shape[0], k, *shape[2:])
        omega, known = omega.reshape(shape), known.reshape(shape)
        if self.dale_boundary_margin > 0:  # the annotated boundary's own uncertainty: labels trusted there
            omega = torch.where(boundary_band(onehot, self.dale_boundary_margin), one, omega)
        if not self.dale_use_confidence:
            reliable, fuzzy, omega = 1 - entropy, entropy, torch.ones_like(omega)
        else:
            reliable = omega * (1 - entropy) if self.dale_reliable_certain else omega
            fuzzy = 1 - omega
            if self.dale_agreement_weights:  # loss weights and target also discount where the ensemble's class differs
                # 2 q[y] up to 1 (1 where not known: the label stands there)
                agree = torch.lerp(one, (2 * q_label).clamp_(max=1), known_f).reshape(shape)
                agree = agree if self.dale_agreement_power == 1 else agree ** self.dale_agreement_power
                if gated:
                    agree = 1 - gates.reshape(-1, *[1] * (len(shape) - 1)) * (1 - agree)
                omega = omega * agree
        soft = collaborative_target(onehot, q_full, omega, entropy, self.dale_sharpen_temperature,
                                    self.dale_certain_correction) if need_soft else None
        if ignore is not None:  # ignored voxels are in neither set: no alignment statistic, no alignment loss
            counted = (labels_dev != ignore).float()
            reliable, fuzzy = reliable * counted, fuzzy * counted
        return RSetMaps(omega, reliable, fuzzy, soft, onehot, q_full, known)

    def noise_gate(self) -> float:
        """How far DALE's objective acts: the estimate's gate (``noise_estimate``), 0 (stock nnU-Net)
        before the first estimate; 1 without the gate."""
        if not self.dale_noise_gate:
            return 1.0
        return self.noise_estimate.gate() if self.noise_estimate is not None else 0.0

    def sample_gates(self, keys: list[str]) -> torch.Tensor:
        """Per sample of a batch, how far DALE's objective acts on its labels: the dataset's gate,
        times the case's own (``dale_case_gate``)."""
        g = torch.full((len(keys),), self.noise_gate())
        if self.dale_case_gate and self.noise_estimate is not None:
            cases = self.case_gates()
            g = g * torch.tensor([cases.get(k, 1.0) for k in keys])
        return g

    def case_gates(self) -> dict[str, float]:
        """The current estimate's per-case gates (``dale_case_gate``), computed once per estimate."""
        if self._case_gates[0] is not self.noise_estimate:
            self._case_gates = (self.noise_estimate, self.noise_estimate.case_gates(
                self.dale_case_gate_low, self.dale_case_gate_high))
        return self._case_gates[1]

    def update_noise_estimate(self) -> None:
        """Estimate the label noise from the whole memory (one pass over the buffers and the
        labels), log it and write it as JSON in the fold folder."""
        self.memory.flush()
        dataset_tr, _ = self.get_tr_and_val_datasets()
        keys = sorted(self.memory.case_shapes)
        counts = np.zeros((len(keys), 3), dtype=np.int64)
        for i, key in enumerate(keys):
            q, n = self.memory.case_arrays(key)
            seg = np.asarray(dataset_tr.load_case(key)[1][0])
            counts[i] = case_counts(q, n, seg, self.dale_min_visits, self.dale_gate_margin, self.dale_gate_depth_share)
        self.noise_estimate = NoiseEstimate(keys, counts[:, 0], counts[:, 1], counts[:, 2], self.dale_gate_low,
                                            self.dale_gate_high, self.dale_gate_margin, self.current_epoch,
                                            self.dale_gate_depth_share)
        if self.local_rank == 0:
            write_json_atomic(Path(self.output_folder) / ESTIMATE_FILE, self.noise_estimate.to_dict())
        self.print_to_log_file("DALE noise estimate: " + self.noise_estimate.summary())
        if self.dale_case_gate:
            g = np.array(list(self.case_gates().values()))
            self.print_to_log_file(f"DALE per-case gate: {int((g >= 1).sum())} of {len(g)} cases acted on fully, "
                                   f"{int((g <= 0).sum())} kept at full label weight")

    def _estimate_due(self) -> bool:
        """At an epoch end where the memory was written and DALE's objective runs next: always
        when the memory freezes from the next epoch on (the estimate the rest of the training
        keeps), else every ``dale_estimate_every`` epochs (each estimate reads every buffer)."""
        nxt = self.current_epoch + 1
        if self.memory_frozen() or self.phase(nxt) == WARMUP or nxt >= self.num_epochs:
            return False
        return (self.memory_frozen(nxt) or self.noise_estimate is None
                or (nxt - self.warmup_end()) % max(self.dale_estimate_every, 1) == 0)

    def label_confidence(self, keys: list[str], indices: list[torch.Tensor | None], valid: torch.Tensor,
                         known: torch.Tensor, labels: torch.Tensor, agreement: torch.Tensor) -> torch.Tensor:
        """omega (B, N) of every patch voxel: the clean posterior of its class mixture at its loss
        signal -log q[y] (``agreement`` is q[y]); 1 where the voxel is not ``known`` (padding,
        ignored, or visited too rarely). ``indices``: each sample's source voxel indices where the
        trainer read the buffers itself (``dale_worker_reads`` off), else None."""
        return omega_per_voxel(loss_signal(agreement), labels, known, self.mixtures)

    def _patch_voxels(self, batch: dict):
        """Per sample: (b, case key, source index, valid mask, full-resolution label) of every patch
        voxel; ignored-label voxels are not valid (they never update or read the memory)."""
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        ignore = self.label_manager.ignore_label
        for b, key in enumerate(batch["keys"]):
            index, valid = source_indices(batch["regression_target"][b], batch["case_shapes"][b])
            labels = target[b].reshape(-1).long()
            if ignore is not None:
                valid &= labels != ignore
            yield b, key, index, valid, labels

    @staticmethod
    def _to_scales(full: torch.Tensor, targets: list[torch.Tensor]) -> list[torch.Tensor]:
        """Downsample a full-resolution map to every deep-supervision target, as nnU-Net does."""
        return [full if t.shape[2:] == full.shape[2:] else
                torch.nn.functional.interpolate(full, t.shape[2:], mode="nearest-exact") for t in targets]

    def memory_frozen(self, epoch: int | None = None) -> bool:
        """True from the epoch ``dale_memory_horizon`` of the training on: the buffers (and the
        mixtures fitted to them) then stay as they were, an early-learning ensemble."""
        epoch = self.current_epoch if epoch is None else epoch
        limit = self._fixed_horizon()
        if self._curve_horizon is not None:
            limit = min(limit, self._curve_horizon)
        return epoch >= limit

    def _update_curve_horizon(self) -> None:
        """``dale_horizon_from_curve``: freeze the memory from the next epoch on once every
        class's label-confidence curve has saturated (``horizon.update_saturation``)."""
        if not self.dale_horizon_from_curve or self._curve_horizon is not None or self.memory_frozen():
            return
        curves = self.logger.get_value("dale_mean_confidence", step=None)[:self.current_epoch + 1]
        self._curve_saturation = update_saturation(self._curve_saturation, curves, self.dale_horizon_slope_drop)
        self._curve_horizon = frozen_from(self._curve_saturation, self._mature_from(len(curves)))
        if self._curve_horizon is not None:
            self.print_to_log_file(
                f"DALE: every class's label-confidence curve has saturated (epochs {self._curve_saturation}) and "
                f"the memory's voxels were visited {self.dale_horizon_min_visits:g} times on average (after epoch "
                f"{self._mature_from(len(curves))}): the memory is frozen from epoch {self._curve_horizon} on "
                f"(fixed limit: {self._fixed_horizon()})")

    def _mature_from(self, epochs: int) -> int | None:
        """The epoch count after which the memory was visited ``dale_horizon_min_visits`` times per
        voxel on average, from the logged visits of the first ``epochs`` epochs (0 for a log
        written before the visits were logged: such a run froze on the curve alone)."""
        visits = self.logger.get_value("dale_visits_per_voxel", step=None)[:epochs]
        return mature_from(visits, self.dale_horizon_min_visits) if len(visits) == epochs else 0

    def _fixed_horizon(self) -> int:
        """The epoch ``dale_memory_horizon`` of the training: the latest the memory freezes."""
        return max(1, round(self.dale_memory_horizon * self.num_epochs))

    @torch.no_grad()
    def update_memory(self, batch: dict, output) -> None:
        """Scatter the batch's full-resolution softmax into the buffers of its cases.

        The per-voxel work (source indices, scatter-mean over repeated source voxels) runs where
        the softmax is: on a GPU in this process, batched on the device, and only each patch's
        distinct source voxels travel to the host, without blocking it; the host's part (buffer
        reads and writes, statistics) runs in the memory's background writer. On the CPU all of
        it, the softmax included, runs in the writer (the network's outputs are not modified in
        place after the step, so the writer may read them later)."""
        if self.memory is None or "regression_target" not in batch or self.memory_frozen():
            return
        logits = (output[0] if isinstance(output, (list, tuple)) else output).detach()
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        keys, shapes, coords = batch["keys"], batch["case_shapes"], batch["regression_target"]
        ignore, channels = self.label_manager.ignore_label, self.memory.channels

        def scatter() -> list[tuple[str, PatchUpdate]]:
            probs = torch.softmax(logits.float(), 1)
            dev = probs.device
            patches = []
            for b, key in enumerate(keys):
                index, valid = source_indices(coords[b], shapes[b], dev)
                labels = target[b].reshape(-1).to(dev, non_blocking=True).long()
                if ignore is not None:
                    valid &= labels != ignore
                p = probs[b].reshape(probs.shape[1], -1).T  # an empty selection gives an empty update
                patch = scatter_patch(index[valid], p[valid], labels[valid], channels)
                patches.append((key, patch.to("cpu", non_blocking=True)))
            return patches

        if logits.device.type == "cuda":
            patches = scatter()
            ready = torch.cuda.Event()
            ready.record()

            def job() -> None:
                ready.synchronize()  # the copies to pinned host memory have landed
                self.memory.apply_batch(patches)
        else:
            def job() -> None:
                self.memory.apply_batch(scatter())

        self.memory.defer(job)

    @torch.no_grad()
    def patch_confidence(self, batch: dict) -> list[torch.Tensor]:
        """Per-voxel label confidence q[y] for the batch's augmented patches, one tensor per deep
        supervision output (full resolution first), each shaped like its target; NaN where the
        voxel is padding or was never visited. Lower resolutions are downsampled like nnU-Net
        downsamples targets (nearest-exact)."""
        targets = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
        full = targets[0]
        conf = torch.full(full.shape, float("nan"), dtype=torch.float32)
        for b, key, index, valid, labels in self._patch_voxels(batch):
            q, visits = self.memory.read(key, index)
            agreement = agreement_with_label(q, labels, self.memory.num_classes)
            agreement[~valid | (visits == 0)] = float("nan")
            conf[b] = agreement.reshape(full.shape[1:])
        return self._to_scales(conf, targets)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.memory is None:
            return
        visited, confidence, skipped, hist = self.memory.finish_epoch(self.is_ddp)
        if not self.memory_frozen():
            self.mixtures = [fit_mixture(h, tied=self.dale_mixture_tied) for h in hist]
        terms = {k: float(torch.stack([t.float() for t in v]).mean()) for k, v in self._epoch_terms.items()}  # one sync
        self._epoch_terms = {}
        phase = self.phase()
        self.logger.log("dale_visited_fraction", visited, self.current_epoch)
        self.logger.log("dale_mean_confidence", confidence, self.current_epoch)
        before = self.logger.get_value("dale_visits_per_voxel", step=None)[:self.current_epoch]
        self.logger.log("dale_visits_per_voxel", (before[-1] if before else 0.0) + self.memory.epoch_visits,
                        self.current_epoch)
        self.logger.log("dale_phase", PHASE_CODES[phase], self.current_epoch)
        self.logger.log("dale_reliable_fraction", terms.get("reliable_fraction", float("nan")), self.current_epoch)
        self.logger.log("dale_fuzzy_fraction", terms.get("fuzzy_fraction", float("nan")), self.current_epoch)
        self.logger.log("dale_align_loss", terms.get("align_loss", float("nan")), self.current_epoch)
        self._update_curve_horizon()
        if self._estimate_due():
            self.update_noise_estimate()
        est = self.noise_estimate
        self.logger.log("dale_noise_estimate", est.median_case() if est else float("nan"), self.current_epoch)
        self.logger.log("dale_gate", self.noise_gate() if est else float("nan"), self.current_epoch)
        fitted = [f"class {c}: clean l~N({m.means[0]:.2f},{m.stds[0]:.2f}) w={m.weights[0]:.2f}, noisy "
                  f"l~N({m.means[1]:.2f},{m.stds[1]:.2f})" if m.fitted else f"class {c}: one population (omega=1)"
                  for c, m in enumerate(self.mixtures)]
        self.print_to_log_file(f"DALE phase {phase}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(terms.items()))
                               + f". Mixtures for the next epoch: {'; '.join(fitted)}")
        self.print_to_log_file(
            f"DALE memory: {visited:.1%} of voxels visited; mean label confidence per class (voxels seen this "
            f"epoch): {', '.join(f'{c:.3f}' for c in confidence)}"
            + (f"; {skipped} patches with non-finite network output skipped (memory not updated)" if skipped else "")
            + (f"; {self._skipped_steps} optimizer steps skipped (non-finite gradients)" if self._skipped_steps else ""))
        self._skipped_steps = 0
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
        with a complete snapshot of its epoch. A failed write stops the training with a message."""
        try:
            self._save_checkpoint(filename)
        except SetupError:
            self._stop_loaders()  # exit cleanly: the loaders' threads would otherwise die noisily at shutdown
            raise

    def _stop_loaders(self) -> None:
        """nnU-Net's loader shutdown of ``on_train_end``."""
        for loader in (self.dataloader_train, self.dataloader_val):
            if isinstance(loader, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                loader._finish()

    def _save_checkpoint(self, filename: str) -> None:
        epoch = self.current_epoch + 1  # what nnU-Net stores as checkpoint['current_epoch']
        write_memory = self.memory is not None and not self.disable_checkpointing
        # --c never loads checkpoint_best while checkpoint_latest exists
        best_without_buffers = write_memory and os.path.basename(filename) == BEST and self._latest_has_buffers()
        if best_without_buffers:
            write_memory = False
            if not self._best_without_buffers:
                self._best_without_buffers = True
                self.print_to_log_file("DALE: checkpoint_best.pth is now written without a buffer snapshot: "
                                       "checkpoint_latest.pth has one, and --c resumes from it")
        if self.memory is not None:
            self.memory.flush()  # every rank's updates are in the live files before rank 0 snapshots them
        self._barrier()
        tmp = filename + ".tmp"
        with write_failures_explained(os.path.dirname(filename), os.path.basename(filename), tmp):
            if write_memory and self.local_rank == 0:
                extra = {"mixtures": [m.to_dict() for m in self.mixtures], "alignment": self.alignment.state()}
                if self.noise_estimate is not None:
                    extra["noise_estimate"] = self.noise_estimate.to_dict()
                self.memory.snapshot(epoch, extra, same_as=self._frozen_snapshot)
                if self.memory.snapshot_linked:
                    self.print_to_log_file(f"DALE buffers for epoch {epoch}: {self.memory.snapshot_linked} files "
                                           f"hard-linked from the snapshot of epoch {self._frozen_snapshot} (frozen "
                                           "since the memory horizon), not copied")
                if self.memory_frozen(epoch):  # no update after this snapshot: later ones can share its files
                    self._frozen_snapshot = epoch
            super().save_checkpoint(tmp)
            if self.local_rank == 0 and os.path.isfile(tmp):
                name = os.path.basename(filename)
                if write_memory:  # a kill between rename and record must not let pruning drop either snapshot
                    self._record_checkpoint_epoch(name, epoch, pending=True)
                elif best_without_buffers:
                    self._record_checkpoint_epoch(name, None)  # before the rename; its former snapshot is pruned
                os.replace(tmp, filename)
                if write_memory:
                    self._record_checkpoint_epoch(name, epoch)
        self._barrier()

    def _latest_has_buffers(self) -> bool:
        """checkpoint_latest.pth exists and its snapshot is recorded and complete: ``--c`` resumes
        from it (or from checkpoint_final), never from checkpoint_best. Snapshots for
        checkpoint_best are then skipped: before the memory horizon each would copy every buffer,
        and nnU-Net writes checkpoint_best whenever the EMA pseudo Dice improves."""
        if self.local_rank != 0 or not os.path.isfile(os.path.join(self.output_folder, LATEST)):
            return False
        listed = self._checkpoint_epochs().get(LATEST, [])
        return len(listed) == 1 and (self.memory.snapshot_dir(listed[0]) / MANIFEST).is_file()

    def _checkpoint_epochs(self) -> dict[str, list[int]]:
        """``checkpoint_epochs.json`` as checkpoint file -> list of epochs (older records: one int)."""
        path = self.memory_folder / CHECKPOINT_EPOCHS
        epochs = json.loads(path.read_text()) if path.is_file() else {}
        return {n: [e] if isinstance(e, int) else list(e) for n, e in epochs.items()}

    def _record_checkpoint_epoch(self, name: str, epoch: int | None, pending: bool = False) -> None:
        """``checkpoint_epochs.json``: checkpoint file -> the epochs its file may hold (two while a
        rename is pending; none for a checkpoint_best written without buffers); snapshots of no
        listed epoch are pruned."""
        epochs = self._checkpoint_epochs()
        epochs[name] = sorted({*epochs.get(name, []), epoch}) if pending else ([] if epoch is None else [epoch])
        epochs = {n: e for n, e in epochs.items()
                  if os.path.isfile(os.path.join(self.output_folder, n)) or (n == name and (pending or epoch is None))}
        write_json_atomic(self.memory_folder / CHECKPOINT_EPOCHS, epochs)
        if not pending:
            self.memory.prune({e for listed in epochs.values() for e in listed})

    def on_train_end(self):
        if self.memory is not None:
            self.memory.close()
        super().on_train_end()  # writes checkpoint_final.pth, then deletes checkpoint_latest.pth
        if self.memory is not None and self.local_rank == 0 and not self.disable_checkpointing:
            self._record_checkpoint_epoch("checkpoint_final.pth", self.current_epoch)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        name = os.path.basename(filename_or_checkpoint) if isinstance(filename_or_checkpoint, str) else "checkpoint"
        self._dale_restore = (self.current_epoch, name)  # applied in on_train_start; --val never touches buffers
        self._replay_curve_horizon()

    def _replay_curve_horizon(self) -> None:
        """The curve horizon of a resumed run: replayed from the label-confidence curve that the
        checkpoint's log holds (the epochs before the checkpoint)."""
        if self.dale_horizon_from_curve:
            curves = self.logger.get_value("dale_mean_confidence", step=None)[:self.current_epoch]
            self._curve_saturation = replay_saturation(curves, self.dale_horizon_slope_drop)
            self._curve_horizon = frozen_from(self._curve_saturation, self._mature_from(len(curves)))
