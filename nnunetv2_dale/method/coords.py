"""Source-voxel mapping: every voxel of an augmented training patch knows the voxel of the
preprocessed case it came from, or that it came from padding.

The training loader adds a coordinate map of the crop to each sample as a ``regression_target``
(channels: z, y, x in the preprocessed case's voxel grid, then a validity channel that is 1 inside
the case and 0 in padding). nnU-Net's own transforms move it exactly like the image (spatial
transform with linear interpolation, mirroring, dummy-2D), intensity transforms leave it alone,
and linear interpolation of a linear coordinate field is exact. A patch voxel is valid where the
interpolated validity is 1, i.e. where all its interpolation neighbours lie inside the case.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from nnunetv2_dale.method.geometry import (CropSpec, PatchSpec, coordinate_map, describe_coordinates,
                                            described_source_indices)

COORD_CHANNELS = 4  # z, y, x, validity
VALID_THRESHOLD = 0.999


def crop_coordinates(bbox: list[list[int]], case_shape: tuple[int, ...]) -> torch.Tensor:
    """(4, *crop) float32 map of the voxel coordinates of ``bbox`` in a case of ``case_shape``,
    0 outside the case, with the validity channel last. Built by broadcasting per-axis vectors
    (one pass per channel: this runs for every sample in the augmentation workers)."""
    axes = [torch.arange(lo, hi, dtype=torch.float32) for lo, hi in bbox]
    inside = [((a >= 0) & (a <= n - 1)).float() for a, n in zip(axes, case_shape)]
    dims = len(axes)

    def along(vector: torch.Tensor, axis: int) -> torch.Tensor:
        return vector.reshape([-1 if d == axis else 1 for d in range(dims)])

    out = torch.empty((dims + 1, *(len(a) for a in axes)), dtype=torch.float32)
    valid = out[dims]
    valid.copy_(along(inside[0], 0).expand_as(valid))
    for axis in range(1, dims):
        valid.mul_(along(inside[axis], axis))
    for axis in range(dims):
        torch.mul(valid, along(axes[axis], axis), out=out[axis])
    return out


def source_indices(coords: torch.Tensor | PatchSpec, case_shape: tuple[int, ...],
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat source-voxel index per patch voxel and the validity mask, from one sample's
    transformed coordinate map ``(4, *patch)`` (or ``(4, 1, *patch)`` in 2D) or its
    :class:`PatchSpec`, computed on ``device`` (default: where the map is, the CPU for a spec)."""
    if isinstance(coords, PatchSpec):
        return described_source_indices(coords, case_shape, VALID_THRESHOLD, device)
    if device is not None:
        coords = coords.to(device, non_blocking=True)
    coords = coords.reshape(COORD_CHANNELS, -1)
    valid = coords[3] > VALID_THRESHOLD
    idx = torch.zeros(coords.shape[1], dtype=torch.int64, device=coords.device)
    stride = 1
    for axis in (2, 1, 0):
        c = torch.round(coords[axis]).to(torch.int64)
        valid &= (c >= 0) & (c < case_shape[axis])
        idx += c.clamp(0, case_shape[axis] - 1) * stride
        stride *= case_shape[axis]
    return idx, valid


class CoordinateDataLoader(nnUNetDataLoader):
    """nnU-Net's training loader plus ``regression_target`` (coordinate maps) and ``case_shapes``.

    Same sampling, cropping and transforms as ``nnUNetDataLoader.generate_train_batch`` in
    nnU-Net 2.8.1; the additions are the coordinate map, the shapes of the cases, when a
    ``sampler`` (:class:`nnunetv2_dale.method.sampling.FuzzySampler`) proposes a centre, a patch centred
    there (through nnU-Net's own ``get_bbox``), and, when a ``reader``
    (:class:`nnunetv2_dale.method.sampling.PatchReader`) has them for every sample, the buffer values
    of the augmented patches' source voxels: ``dale_q`` (B, N, channels) float16 and
    ``dale_visits`` (B, N) uint8, N voxels per patch.
    """

    sampler = None
    reader = None
    settings = None  # the trainer's sampling.json (``SettingsFile``): "coordinates": false gives stock batches
    described: bool | None = None  # coordinates carried as a PatchSpec (decided at the first batch)

    def generate_train_batch(self) -> dict:
        if self.settings is not None and self.settings.settings().get("coordinates", True) is False:
            return super().generate_train_batch()  # frozen memory, shut gate: the trainer uses neither
        selected_keys = self.get_indices()
        data_all = seg_all = None
        coords_all: list = []
        shapes, reads, reads_ok = [], None, self.reader is not None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(selected_keys):
                force_fg = self.get_do_oversample(j)
                data, seg, seg_prev, properties = self._data.load_case(key)
                shape = data.shape[1:]
                shapes.append(tuple(int(s) for s in shape))
                centre = None
                if self.sampler is not None:
                    centre = self.sampler.propose(key, seg, np.random.default_rng(np.random.randint(2 ** 31)))
                if centre is not None:  # a one-voxel "class" at the fuzzy centre: get_bbox centres on it
                    bbox_lbs, bbox_ubs = self.get_bbox(shape, True, {1: np.array([[0, *centre]])})
                else:
                    bbox_lbs, bbox_ubs = self.get_bbox(shape, force_fg, properties["class_locations"])
                bbox = [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)]
                data_cropped = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                seg_cropped = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                if seg_prev is not None:
                    seg_prev_cropped = torch.from_numpy(
                        crop_and_pad_nd(seg_prev, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                    seg_cropped = torch.cat((seg_cropped, seg_prev_cropped[None]), dim=0)
                if self.described is None:  # in the worker that runs this loader, once
                    self.described = self.transforms is not None and describe_coordinates(self.transforms)
                slice_index, box, case_shape = None, bbox, shapes[-1]
                if self.patch_size_was_2d:  # the slice's z is constant: it does not go through the transforms
                    data_cropped, seg_cropped = data_cropped[:, 0], seg_cropped[:, 0]
                    slice_index, box, case_shape = float(bbox[0][0]), bbox[1:], case_shape[1:]
                if self.described:  # a description; the map is built where it is used
                    coords = CropSpec(tuple((lo, hi) for lo, hi in box), tuple(case_shape))
                else:
                    coords = crop_coordinates(box, case_shape)
                sample = {"image": data_cropped, "segmentation": seg_cropped, "regression_target": coords}
                if self.transforms is not None:
                    sample = self.transforms(**sample)
                moved = sample["regression_target"]
                if slice_index is not None:  # z * validity, as if it had been transformed with the rest
                    moved = (replace(moved, slice_index=slice_index) if isinstance(moved, PatchSpec)
                             else torch.cat([moved[-1:] * slice_index, moved]))
                coords_all.append(moved)
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *sample["image"].shape), dtype=torch.float32)
                    seg = sample["segmentation"]
                    seg_all = ([torch.empty((self.batch_size, *s.shape), dtype=s.dtype) for s in seg]
                               if isinstance(seg, list) else torch.empty((self.batch_size, *seg.shape), dtype=seg.dtype))
                data_all[j] = sample["image"]
                if reads_ok:
                    if reads is None:
                        reads = self.reader.batch_arrays(self.batch_size, sample["image"][0].numel())
                    reads_ok = reads is not None and self.reader.read(key, moved, shapes[-1], reads[0][j].numpy(),
                                                                       reads[1][j].numpy())
                if isinstance(seg_all, list):
                    for s_idx, s in enumerate(sample["segmentation"]):
                        seg_all[s_idx][j] = s
                else:
                    seg_all[j] = sample["segmentation"]
        if not all(isinstance(c, PatchSpec) for c in coords_all):  # e.g. elastic deformation: some were resampled
            coords_all = torch.stack([coordinate_map(c) if isinstance(c, PatchSpec) else c for c in coords_all])
        batch = {"data": data_all, "target": seg_all, "keys": selected_keys, "regression_target": coords_all,
                 "case_shapes": shapes}
        if reads_ok:
            batch["dale_q"], batch["dale_visits"] = reads
        return batch


@contextlib.contextmanager
def training_loader_with_coordinates(sampler=None, reader=None, settings=None) -> Iterator[None]:
    """While active, nnU-Net's ``get_dataloaders`` builds :class:`CoordinateDataLoader` for training.

    ``nnUNetTrainer.get_dataloaders`` constructs ``nnUNetDataLoader`` by its module-level name; the
    first loader it builds is the training loader, the second the validation loader (kept stock).
    Swapping the name for the duration of that one call keeps all of nnU-Net's loader set-up
    (patch sizes, DA workers, oversampling) instead of copying it.
    """
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    original = trainer_module.nnUNetDataLoader
    built: list[str] = []

    def factory(*args, **kwargs):
        cls = CoordinateDataLoader if not built else original
        built.append(cls.__name__)
        loader = cls(*args, **kwargs)
        if cls is CoordinateDataLoader:
            loader.sampler, loader.reader, loader.settings = sampler, reader, settings
        return loader

    trainer_module.nnUNetDataLoader = factory
    try:
        yield
    finally:
        trainer_module.nnUNetDataLoader = original
