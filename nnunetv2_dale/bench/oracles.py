"""Oracle trainers for the benchmark: they know which training voxels the injected noise changed
(the clean labels ``labelsTr_clean`` that ``nnUNetv2_dale_bench`` keeps beside each noisy training
set), so they tell how much of the noise gap is recoverable at all and whether DALE loses it in
detection (omega) or in how its objective uses omega. They are measuring instruments, never
defaults: a real dataset has no clean labels beside its noisy ones.

- ``nnUNetTrainerOracleIgnore``: nnU-Net's Dice+CE from the first epoch with every changed voxel
  given weight 0 (as if the annotator had marked it "ignore"); no alignment, stock sampling.
- ``nnUNetTrainerDALE_oracleOmega``: DALE's objective and schedule unchanged, with omega = 1 - the
  noise mask instead of the memory's estimate.

The noise mask of a case is where its clean label, preprocessed by the configuration's own
preprocessor (``run_case``), differs from the noisy training label nnU-Net trains on: exact in the
preprocessed geometry of the memory's source voxels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from nnunetv2_dale.utilities.preflight import SetupError
from nnunetv2_dale.method.schedule import STABLE
from nnunetv2_dale.method.trainer import nnUNetTrainerDALE
from nnunetv2_dale.method.variants import V03


class _NoiseOracle(nnUNetTrainerDALE):
    """omega = 1 - (the source voxel's label was changed by the injected noise)."""

    # label_confidence needs each patch voxel's source index; the defaults the ladder was measured with
    dale_overrides = {"dale_worker_reads": False, "dale_horizon_from_curve": False, "dale_reliable_certain": True,
                      "dale_noise_gate": False, **V03}

    def on_train_start(self):
        super().on_train_start()
        raw = Path(os.environ.get("nnUNet_raw", "")) / self.plans_manager.dataset_name
        ending = self.dataset_json["file_ending"]
        if not (raw / "labelsTr_clean").is_dir():
            raise SetupError(f"{self.__class__.__name__} needs the clean training labels {raw}/labelsTr_clean, which "
                             "only datasets made by nnUNetv2_dale_bench have. Use nnUNetTrainerDALE on real data.")
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        dataset_tr, _ = self.get_tr_and_val_datasets()
        self.noise_masks: dict[str, torch.Tensor] = {}
        for key, shape in self.memory.case_shapes.items():
            images = sorted(str(f) for f in (raw / "imagesTr").glob(f"{key}_[0-9][0-9][0-9][0-9]{ending}"))
            _, clean, _ = preprocessor.run_case(images, str(raw / "labelsTr_clean" / f"{key}{ending}"),
                                                self.plans_manager, self.configuration_manager, self.dataset_json)
            noisy = np.asarray(dataset_tr.load_case(key)[1])
            if clean.shape != noisy.shape or tuple(clean.shape[1:]) != tuple(shape):
                raise RuntimeError(f"{key}: clean label {clean.shape} vs training label {noisy.shape}")
            self.noise_masks[key] = torch.from_numpy((clean[0] != noisy[0]).reshape(-1))
        changed = sum(int(m.sum()) for m in self.noise_masks.values()) / max(self.memory.total_voxels, 1)
        self.print_to_log_file(f"Oracle: noise masks of {len(self.noise_masks)} cases, {changed:.2%} of voxels changed")

    def label_confidence(self, keys, indices, valid, known, labels, agreement):
        noisy = torch.stack([self.noise_masks[key][index.clamp(0, len(self.noise_masks[key]) - 1)]
                             for key, index in zip(keys, indices)]).to(valid.device)
        return torch.where(valid & noisy, torch.zeros((), device=valid.device), torch.ones((), device=valid.device))


class nnUNetTrainerDALE_oracleOmega(_NoiseOracle):
    """DALE with perfect detection: omega = 1 - noise mask."""


class nnUNetTrainerOracleIgnore(_NoiseOracle):
    """nnU-Net's loss from epoch 0 with the changed voxels ignored (weight 0)."""

    use_alignment = False
    dale_overrides = {**_NoiseOracle.dale_overrides, "dale_fuzzy_sampling_share": 0.0}

    def phase(self, epoch: int | None = None) -> str:
        return STABLE
