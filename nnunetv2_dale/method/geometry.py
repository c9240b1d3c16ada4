"""Coordinate maps described instead of built: where each voxel of an augmented patch came from,
as the few numbers of the crop, the spatial transform and the mirroring.

Carrying a 4-channel coordinate map through nnU-Net's augmentation costs the workers as much as
the image and the labels together in 3D (it is resampled like the image). But nnU-Net's spatial
transform is affine unless elastic deformation is on (nnU-Net: never), and its mirroring flips
axes, so a patch voxel x maps to crop position p = A (x' - (P - 1) / 2) + t, x' being x with the
mirrored axes reversed. The training loader hands a :class:`CropSpec` to the transforms; the
spatial transform turns it into a :class:`PatchSpec` (A, t) and the mirror transform records its
axes in it (both patched on the training pipeline's own instances only). The map itself
(:func:`coordinate_map`) is built only where it is used: on the training device for the memory,
in a worker for the buffer reads. It equals what interpolating the crop's map would give: the map
is separable (channel a is valid * coordinate_a, valid = prod_b inside_b, one-axis functions) and
multilinear interpolation of a product of one-axis functions is the product of their one-axis
interpolations; along an axis, inside is 1 on the crop's voxels [lo, hi] inside the case, so it
interpolates to w = clamp(min(p - lo + 1, hi + 1 - p), 0, 1) and inside * coordinate to
w * (c0 + clamp(p, lo, hi)).
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, replace

import numpy as np
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms


@dataclass(frozen=True)
class CropSpec:
    """A loader crop: its box in the case (per spatial axis [start, end)) and the case's shape."""
    bbox: tuple[tuple[int, int], ...]
    case_shape: tuple[int, ...]


@dataclass(frozen=True)
class PatchSpec:
    """An augmented patch: crop position p = matrix (x' - (patch - 1) / 2) + offset of patch voxel
    x (x' = x with the ``flips`` axes reversed); ``slice_index``: the case slice of a 2d patch."""
    crop: CropSpec
    patch_size: tuple[int, ...]
    matrix: tuple[tuple[float, ...], ...]
    offset: tuple[float, ...]
    flips: tuple[int, ...] = ()
    slice_index: float | None = None


def _fill(out: torch.Tensor, positions, crop: CropSpec) -> torch.Tensor:
    """``out`` (dims + 1, *patch): channels 0..dims-1 the coordinates, the last the validity, from
    each axis's crop positions (broadcastable to the patch)."""
    dims = len(crop.bbox)
    weight = out[dims]
    for axis, p in enumerate(positions):
        w, inside = _along_axis(p, crop, axis)
        out[axis].copy_(inside).add_(crop.bbox[axis][0])
        weight.copy_(w) if axis == 0 else weight.mul_(w)
    for axis in range(dims):
        out[axis].mul_(weight)
    return out


def _positions(spec: PatchSpec, device: torch.device | str | None) -> list[torch.Tensor]:
    """Per spatial axis, the crop position of every patch voxel (float32), broadcastable to the
    patch: an axis the matrix does not mix with others keeps its one-axis shape (nnU-Net's
    samples without rotation), so the per-voxel work below runs on a few hundred values."""
    dims = len(spec.patch_size)
    centred = []
    for b, size in enumerate(spec.patch_size):
        x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
        centred.append((x.flip(0) if b in spec.flips else x).reshape([-1 if d == b else 1 for d in range(dims)]))
    positions = []
    for a in range(dims):
        p = torch.full([1] * dims, spec.offset[a], dtype=torch.float32, device=device)
        for b in range(dims):
            if spec.matrix[a][b] != 0:
                p = p + centred[b] * spec.matrix[a][b]
        positions.append(p)
    return positions


def _crop_limits(crop: CropSpec, axis: int) -> tuple[float, float]:
    """The crop indices [lo, hi] along ``axis`` that lie inside the case."""
    (c0, end), n = crop.bbox[axis], crop.case_shape[axis]
    return float(max(0, -c0)), float(min(end - c0, n - c0) - 1)


def _along_axis(p: torch.Tensor, crop: CropSpec, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At crop positions ``p`` along ``axis``: the interpolated inside-the-case indicator w, and
    the position clamped to the crop indices [lo, hi] that lie inside the case (the module
    docstring's closed form)."""
    lo, hi = _crop_limits(crop, axis)
    return torch.minimum(p - (lo - 1), (hi + 1) - p).clamp_(0, 1), p.clamp(lo, hi)


def coordinate_map(spec: PatchSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """The patch's coordinate map (float32, on ``device``): the case's axes (a 2d patch's z first)
    then validity, as sending the crop's map through nnU-Net's transforms would give."""
    dims = len(spec.patch_size)
    out = _fill(torch.empty((dims + 1, *spec.patch_size), dtype=torch.float32, device=device),
                _positions(spec, device), spec.crop)
    if spec.slice_index is not None:
        out = torch.cat([out[-1:] * spec.slice_index, out])
    return out


def described_source_indices(spec: PatchSpec, case_shape: tuple[int, ...], threshold: float,
                             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``coords.source_indices`` of ``coordinate_map(spec)``, without building the map: the
    flat source index (int64) and validity (interpolated validity > ``threshold``) per voxel.
    Axes the matrix does not mix stay one-axis vectors until the last broadcast (one pass over the
    patch for the index, one for the validity); mixed axes are combined in place."""
    weight = idx = None
    stride = 1
    offset = len(case_shape) - len(spec.patch_size)  # a 2d patch of a 3D case: z is the slice
    for axis, p in reversed(list(enumerate(_positions(spec, device)))):
        w, inside = _along_axis(p, spec.crop, axis)
        source = inside.round_().to(torch.int64).add_(spec.crop.bbox[axis][0])
        if stride != 1:
            source.mul_(stride)
        weight = w if weight is None else _combine(weight, w, torch.Tensor.mul_, torch.mul)
        idx = source if idx is None else _combine(idx, source, torch.Tensor.add_, torch.add)
        stride *= case_shape[axis + offset]
    if spec.slice_index is not None:
        idx = idx.add_(int(spec.slice_index) * stride)  # idx is this function's own tensor
    return idx.expand(spec.patch_size).reshape(-1), (weight > threshold).expand(spec.patch_size).reshape(-1)


def _centred_host(size: int, flipped: bool) -> np.ndarray:
    """``_positions``' centred patch coordinates of one axis, in numpy (float32)."""
    x = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2)
    return x[::-1] if flipped else x


def _host_weight(p: np.ndarray, lo: float, hi: float, out: np.ndarray | None = None,
                 scratch: np.ndarray | None = None) -> np.ndarray:
    """``_along_axis``' weight w in numpy float32, the same operations in the same order; into
    ``out`` (``scratch`` for the second term) where given."""
    w = np.subtract(p, np.float32(lo - 1), out=out)
    np.minimum(w, np.subtract(np.float32(hi + 1), p, out=scratch), out=w)
    return np.clip(w, 0, 1, out=w)


def axis_sources(spec: PatchSpec) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Where the matrix mixes no axes (nnU-Net's samples without rotation): per patch axis, the
    source coordinate along that axis (int64, the case's voxels, clamped into it) and the
    interpolated inside-the-case weight w (float32): the one-axis terms that
    :func:`described_source_indices` combines, computed with numpy's float32 operations in the
    same order (the same values, tested; torch's per-call overhead on a few hundred values cost
    more than the arithmetic); None where an axis's position depends on another axis."""
    dims = len(spec.patch_size)
    if any(spec.matrix[a][b] != 0 for a in range(dims) for b in range(dims) if a != b):
        return None
    out = []
    for axis, size in enumerate(spec.patch_size):
        p = np.float32(spec.offset[axis]) + _centred_host(size, axis in spec.flips) * np.float32(spec.matrix[axis][axis])
        lo, hi = _crop_limits(spec.crop, axis)
        out.append((np.rint(p.clip(lo, hi)).astype(np.int64) + int(spec.crop.bbox[axis][0]), _host_weight(p, lo, hi)))
    return out


_WORKSPACE: dict[tuple[int, ...], dict[str, np.ndarray]] = {}


def _scratch(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Patch-sized scratch arrays kept per process and patch shape: the workers call
    :func:`rotated_source_indices` for every rotated sample, and fresh patch-sized allocations
    are page-faulted anew each time (as costly as the arithmetic here)."""
    if shape not in _WORKSPACE:
        _WORKSPACE.clear()  # one patch shape per loader
        _WORKSPACE[shape] = {name: np.empty(shape, dtype) for name, dtype in
                             (("p", np.float32), ("t1", np.float32), ("t2", np.float32), ("w", np.float32),
                              ("s", np.int64), ("idx", np.int64))}
    return _WORKSPACE[shape]


def rotated_source_indices(spec: PatchSpec, case_shape: tuple[int, ...], threshold: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`described_source_indices` on the host in numpy, for the workers' reads of patches
    whose axes are mixed (rotated): the same float32 operations in the same order (the same
    values, tested), in place in per-process scratch arrays. Returns the flat source index
    (int64, a view of the scratch memory: valid until the next call) and the validity."""
    shape = tuple(spec.patch_size)
    dims = len(shape)
    ws = _scratch(shape)
    p, t1, t2, weight, source, idx = (ws[k] for k in ("p", "t1", "t2", "w", "s", "idx"))
    centred = [_centred_host(size, b in spec.flips).reshape([-1 if d == b else 1 for d in range(dims)])
               for b, size in enumerate(shape)]
    stride, lead = 1, len(case_shape) - dims  # a 2d patch of a 3D case: z is the slice
    for axis in reversed(range(dims)):
        first = axis == dims - 1
        partial = np.full([1] * dims, spec.offset[axis], dtype=np.float32)
        for b in range(dims):
            if spec.matrix[axis][b] != 0:
                partial = partial + centred[b] * np.float32(spec.matrix[axis][b])
        np.copyto(p, partial)  # the crop positions along this axis, broadcast to the patch
        lo, hi = _crop_limits(spec.crop, axis)
        w = _host_weight(p, lo, hi, out=weight if first else t1, scratch=t2)
        if not first:
            np.multiply(weight, w, out=weight)
        np.clip(p, lo, hi, out=p)
        np.rint(p, out=p)
        target = idx if first else source
        np.copyto(target, p, casting="unsafe")  # whole numbers: exact
        target += int(spec.crop.bbox[axis][0])
        if not first:
            target *= stride
            idx += target
        stride *= case_shape[axis + lead]
    if spec.slice_index is not None:
        idx += int(spec.slice_index) * stride
    return idx.reshape(-1), (weight > threshold).reshape(-1)


def _combine(total: torch.Tensor, term: torch.Tensor, inplace, outplace) -> torch.Tensor:
    """``inplace(total, term)`` where ``total`` already has the broadcast shape (no new array),
    else ``outplace`` (one broadcast pass)."""
    if total.shape == torch.broadcast_shapes(total.shape, term.shape):
        return inplace(total, term)
    return outplace(total, term)


def resampled_coordinates(crop: CropSpec, grid: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """The map for an arbitrary sampling ``grid`` (batchgenerators': (*patch, dims), normalised,
    last axis x first), e.g. with elastic deformation: what ``grid_sample`` (linear, zero padding)
    of the crop's map returns."""
    dims = grid.shape[-1]
    positions = []
    for axis, (c0, end) in enumerate(crop.bbox):
        size = end - c0
        scale = (size - 1) / 2 if align_corners else size / 2  # grid_sample's unnormalisation
        positions.append(grid[..., dims - 1 - axis] * scale + (size - 1) / 2)
    return _fill(torch.empty((dims + 1, *grid.shape[:-1]), dtype=torch.float32), positions, crop)


def _spatial(transform: SpatialTransform, regression_target, **params):
    """``SpatialTransform._apply_to_regr_target`` for a :class:`CropSpec`; anything else goes to
    batchgenerators' own method."""
    if not isinstance(regression_target, CropSpec):
        return SpatialTransform._apply_to_regr_target(transform, regression_target, **params)
    crop, patch = regression_target, tuple(int(p) for p in transform.patch_size)
    dims = len(patch)
    centre = params["center_location_in_pixels"]
    if params["grid"] is None:  # crop_tensor: a patch starting at floor(centre) - patch // 2, no resampling
        identity = tuple(tuple(float(a == b) for b in range(dims)) for a in range(dims))
        offset = tuple(math.floor(c) - p // 2 + (p - 1) / 2 for c, p in zip(centre, patch))
        return PatchSpec(crop, patch, identity, offset)
    if params.get("elastic_offsets") is not None or params.get("affine") is None:
        return resampled_coordinates(crop, params["grid"], transform.align_corners)
    sizes = [end - start for start, end in crop.bbox]
    # batchgenerators: pixel = A (x - (P - 1) / 2) + centre - size / 2, normalised by size / 2, then
    # read by grid_sample at ((g + 1) size - 1) / 2 (align_corners: (g + 1) (size - 1) / 2)
    k = [(s - 1) / s if transform.align_corners else 1.0 for s in sizes]
    affine = params["affine"]
    matrix = tuple(tuple(float(k[a] * affine[a][b]) for b in range(dims)) for a in range(dims))
    offset = tuple(float(k[a] * (centre[a] - sizes[a] / 2) + (sizes[a] - 1) / 2) for a in range(dims))
    return PatchSpec(crop, patch, matrix, offset)


def _mirror(transform: MirrorTransform, regression_target, **params):
    """``MirrorTransform._apply_to_regr_target`` for a :class:`PatchSpec`: records the axes."""
    if not isinstance(regression_target, PatchSpec):
        return MirrorTransform._apply_to_regr_target(transform, regression_target, **params)
    flips = set(regression_target.flips) ^ set(int(a) for a in params["axes"])
    return replace(regression_target, flips=tuple(sorted(flips)))


def _leaves(transform):
    inner = getattr(transform, "transforms", None) or ([transform.transform] if hasattr(transform, "transform") else [])
    yield transform
    for t in inner:
        yield from _leaves(t)


def describe_coordinates(transforms) -> bool:
    """Patch the spatial and mirror transforms of nnU-Net's training pipeline ``transforms`` to
    carry a :class:`CropSpec` / :class:`PatchSpec` instead of a map, when the spatial transform
    comes first (with dummy-2D augmentation a reshaping transform precedes it: the loader then
    builds the map as before) and resamples the image linearly with zero padding. Returns whether
    it did."""
    first = transforms.transforms[0] if isinstance(transforms, ComposeTransforms) and transforms.transforms else None
    if type(first) is not SpatialTransform or first.mode_image not in ("bilinear", "linear") \
            or first.padding_mode_image != "zeros":
        return False
    for t in _leaves(transforms):
        if type(t) is SpatialTransform:
            t._apply_to_regr_target = types.MethodType(_spatial, t)
        elif type(t) is MirrorTransform:
            t._apply_to_regr_target = types.MethodType(_mirror, t)
    return True
