"""Per-voxel label confidence of a DALE fold, back in the ORIGINAL geometry of ``nnUNet_raw``.

The memory lives in nnU-Net's preprocessed geometry (transposed, cropped to the non-zero region,
resampled to the plans' spacing). ``FoldConfidence`` opens a fold's buffers read-only (the newest
consistent snapshot, i.e. the one of ``checkpoint_final.pth`` or of the latest checkpoint of a fold
still training; the live buffers only when no snapshot exists yet), computes omega per voxel with
the mixtures stored beside the buffers, and undoes preprocessing the way nnU-Net exports
predictions (``convert_predicted_logits_to_segmentation_with_correct_shape``): resampling with the
configuration's probability resampler, insertion into the uncropped shape, inverse transpose.

Unknown is never confident: voxels visited fewer than ``min_visits`` times, and voxels outside
nnU-Net's crop, are NaN.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_dale.method.memory import MANIFEST, ConfidenceMemory
from nnunetv2_dale.method.rsets import N_BINS, Mixture, agreement_with_label, case_confidence, fit_mixture, histogram, loss_signal


class FoldConfidence:
    """Read-only view of one fold's DALE buffers with everything needed to map them to raw geometry."""

    def __init__(self, fold_dir: str | Path, preprocessed_root: str | Path, min_visits: int = 3) -> None:
        self.fold_dir = Path(fold_dir)
        memory_root = self.fold_dir / "dale_memory"
        if not memory_root.is_dir():
            raise FileNotFoundError(f"{self.fold_dir} has no dale_memory folder: it was not trained with a DALE "
                                    "trainer (nnUNetTrainerDALE or a variant), or training has not started yet.")
        snapshots = sorted(memory_root.glob("snapshot_epoch_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
        snapshots = [s for s in snapshots if (s / MANIFEST).is_file()]
        self.buffers = snapshots[-1] if snapshots else memory_root / "live"
        manifest = json.loads((self.buffers / MANIFEST).read_text())
        self.epoch = manifest.get("epoch")
        self.source = f"snapshot of epoch {self.epoch}" if snapshots else "live buffers (no checkpoint yet)"
        plans = json.loads((self.fold_dir.parent / "plans.json").read_text())
        self.dataset_json = json.loads((self.fold_dir.parent / "dataset.json").read_text())
        self.plans_manager = PlansManager(plans)
        identity = manifest["identity"]
        self.configuration_manager = self.plans_manager.get_configuration(identity["configuration"])
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        num_classes = len(self.label_manager.all_labels)
        self.memory = ConfidenceMemory(memory_root, {k: tuple(v) for k, v in manifest["cases"].items()},
                                       num_classes, identity)
        self.memory.live = self.buffers  # read from the chosen folder; nothing is ever written
        self.min_visits = min_visits
        folder = Path(preprocessed_root) / self.plans_manager.dataset_name / self.configuration_manager.data_identifier
        self.dataset = infer_dataset_class(str(folder))(str(folder), sorted(self.memory.case_shapes))
        stored = manifest.get("extra", {}).get("mixtures")
        self.mixtures = [Mixture.from_dict(m) for m in stored] if stored else self._fit_from_buffers(num_classes)

    @property
    def keys(self) -> list[str]:
        return sorted(self.memory.case_shapes)

    def _fit_from_buffers(self, num_classes: int) -> list[Mixture]:
        """Mixtures fitted to the buffers themselves (only when no snapshot stored them)."""
        import torch


        hist = np.zeros((num_classes, N_BINS))
        for key in self.keys:
            q, n = self.memory.case_arrays(key)
            seg = np.asarray(self.dataset.load_case(key)[1][0]).astype(np.int64).clip(0, num_classes - 1)
            known = n >= self.min_visits
            qt = torch.from_numpy(q[known].astype(np.float32))
            lab = torch.from_numpy(seg[known])
            losses = loss_signal(agreement_with_label(qt, lab, num_classes))
            for c in range(num_classes):
                hist[c] += histogram(losses[lab == c])
        return [fit_mixture(h) for h in hist]

    def preprocessed(self, key: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """(omega, preprocessed label, properties) of one case in preprocessed geometry; omega NaN
        where unknown. Ignored-label voxels are unknown too."""
        _, seg, _, properties = self.dataset.load_case(key)
        seg = np.asarray(seg[0])
        q, n = self.memory.case_arrays(key)
        labels = np.where(seg < 0, 0, seg)  # -1 (outside the non-zero mask) is trained as background
        omega = case_confidence(q, n, labels, self.mixtures, self.min_visits)
        ignore = self.label_manager.ignore_label
        if ignore is not None:
            omega[seg == ignore] = np.nan
        return omega, seg, properties

    def to_raw(self, volume: np.ndarray, properties: dict) -> np.ndarray:
        """A float map in preprocessed geometry (NaN = unknown) -> original raw geometry, NaN outside
        nnU-Net's crop and where unknown."""
        known = np.isfinite(volume)
        stacked = np.stack([np.where(known, volume, 0.0), known.astype(np.float32)]).astype(np.float32)
        pm, cm = self.plans_manager, self.configuration_manager
        spacing_transposed = [properties["spacing"][i] for i in pm.transpose_forward]
        before = properties["shape_after_cropping_and_before_resampling"]
        current = cm.spacing if len(cm.spacing) == len(before) else [spacing_transposed[0], *cm.spacing]
        resampled = np.asarray(cm.resampling_fn_probabilities(stacked, before, current, spacing_transposed))
        value = np.where(resampled[1] > 0.5, resampled[0] / np.maximum(resampled[1], 1e-6), np.nan).clip(0, 1)
        full = np.full(properties["shape_before_cropping"], np.nan, dtype=np.float32)
        full = insert_crop_into_image(full, value.astype(np.float32), properties["bbox_used_for_cropping"])
        return np.asarray(full).transpose(pm.transpose_backward)
