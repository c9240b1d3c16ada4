"""Every voxel of an augmented training patch maps back to its source voxel in the preprocessed
case, through nnU-Net's own transforms (rotation, scaling, mirroring, dummy-2D)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import inprocess_trainer
from nnunetv2_dale.method.coords import crop_coordinates, source_indices
from nnunetv2_dale.method.geometry import CropSpec, PatchSpec, coordinate_map, describe_coordinates

pytestmark = pytest.mark.slow


def test_crop_coordinates_match_a_meshgrid_reference():
    bbox, shape = [[-3, 6], [2, 11], [-1, 4]], (4, 8, 3)
    grids = np.meshgrid(*[np.arange(lo, hi) for lo, hi in bbox], indexing="ij")
    valid = np.prod([(g >= 0) & (g <= n - 1) for g, n in zip(grids, shape)], axis=0)
    np.testing.assert_array_equal(crop_coordinates(bbox, shape).numpy(), np.stack([g * valid for g in grids] + [valid]))


def test_crop_coordinates_mark_padding():
    coords = crop_coordinates([[-2, 3], [0, 2], [4, 7]], (2, 5, 5))
    assert coords.shape == (4, 5, 2, 3)
    valid = coords[3].bool()
    assert valid[2:4, :, :1].all() and not valid[:2].any() and not valid[4].any() and not valid[..., 1:].any()
    idx, ok = source_indices(coords, (2, 5, 5))
    np.testing.assert_array_equal(ok.reshape(5, 2, 3), valid)
    assert idx.reshape(5, 2, 3)[3, 1, 0] == 1 * 25 + 1 * 5 + 4


def _check_mapping(trainer, batches: int = 12) -> tuple[float, float, bool, bool]:
    """(label agreement on valid voxels, mean image correlation, saw a geometric augmentation,
    the batches carried PatchSpecs instead of maps)."""
    trainer.initialize()
    dl_tr, _ = trainer.get_dataloaders()
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    agree = total = 0
    correlations = []
    saw_geometry = False
    described = set()
    for _ in range(batches):
        batch = next(dl_tr)
        described.add(isinstance(batch["regression_target"], list))
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        for b, key in enumerate(batch["keys"]):
            data, seg, _, _ = dataset_tr.load_case(key)
            shape = tuple(data.shape[1:])
            assert tuple(batch["case_shapes"][b]) == shape
            idx, valid = source_indices(batch["regression_target"][b], shape)
            assert valid.float().mean() > 0.3
            src_label = torch.from_numpy(np.asarray(seg[0]).reshape(-1).astype(np.int64))[idx]
            aug_label = target[b, 0].reshape(-1).long()
            agree += int((src_label[valid] == aug_label[valid]).sum())
            total += int(valid.sum())
            src_img = torch.from_numpy(np.asarray(data[0]).reshape(-1).astype(np.float32))[idx][valid]
            aug_img = batch["data"][b, 0].reshape(-1)[valid]
            correlations.append(float(torch.corrcoef(torch.stack([src_img, aug_img]))[0, 1]))
            # a rotated/scaled patch has non-integer source coordinates somewhere
            coords = batch["regression_target"][b]
            coords = coordinate_map(coords) if isinstance(coords, PatchSpec) else coords
            frac = (coords[:3] - coords[:3].round()).abs()
            saw_geometry |= bool(frac.max() > 0.05)
    assert len(described) == 1
    return agree / total, float(np.mean(correlations)), saw_geometry, described.pop()


@pytest.mark.parametrize("which", ["2d", "3d_fullres", "dummy2d", "2d_slices"])
def test_augmented_patches_map_to_source_voxels(which, request, monkeypatch):
    """``2d_slices``: the 2d configuration of a 3D dataset, where the slice index (not sent
    through the transforms) must come back right."""
    fixture, configuration = {"2d": ("tiny2d", "2d"), "3d_fullres": ("tiny3d", "3d_fullres"),
                              "dummy2d": ("aniso3d", "3d_fullres"), "2d_slices": ("aniso3d", "2d")}[which]
    tree, did, _ = request.getfixturevalue(fixture)
    trainer = inprocess_trainer(tree, did, configuration, monkeypatch)
    if which == "dummy2d":
        assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[1], "expected dummy-2D DA"
    agreement, correlation, saw_geometry, described = _check_mapping(trainer)
    # the loader describes the coordinates (geometry.PatchSpec), except with dummy-2D augmentation,
    # whose first transform reshapes the map: the map is built and transformed as an image then
    assert described == (which != "dummy2d")
    print(f"{which}: label agreement {agreement:.4f}, image correlation {correlation:.3f}")
    assert agreement >= 0.99, agreement
    assert correlation > 0.8, correlation  # intensity augmentation changes values, not where they come from
    assert saw_geometry, "no rotation/scaling sampled: the test would not exercise interpolation"


def test_mismatched_mapping_is_detected(tiny2d, monkeypatch):
    """Control: the same statistics with shuffled source indices are far from passing."""
    tree, did, _ = tiny2d
    trainer = inprocess_trainer(tree, did, "2d", monkeypatch)
    trainer.initialize()
    dl_tr, _ = trainer.get_dataloaders()
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    batch = next(dl_tr)
    key = batch["keys"][0]
    data, seg, _, _ = dataset_tr.load_case(key)
    idx, valid = source_indices(batch["regression_target"][0], tuple(data.shape[1:]))
    shuffled = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(0))]
    src_img = torch.from_numpy(np.asarray(data[0]).reshape(-1).astype(np.float32))[shuffled][valid]
    aug_img = batch["data"][0, 0].reshape(-1)[valid]
    assert abs(float(torch.corrcoef(torch.stack([src_img, aug_img]))[0, 1])) < 0.3


def test_patch_confidence_is_aligned_with_augmented_target(tiny2d, monkeypatch):
    """Fill the memory with each case's own label (q = p(foreground) = label): read back through
    the coordinate maps, the confidence q[y] of the augmented target must be 1 almost everywhere,
    at every deep-supervision resolution."""
    tree, did, _ = tiny2d
    trainer = inprocess_trainer(tree, did, "2d", monkeypatch, nnUNet_DALE_iters="1")
    trainer.on_train_start()
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    for key, shape in trainer.memory.case_shapes.items():
        seg = torch.from_numpy(np.asarray(dataset_tr.load_case(key)[1][0]).reshape(-1).astype(np.float32))
        everything = torch.arange(seg.numel())
        trainer.memory.update(key, everything, torch.stack([1 - seg, seg], 1), seg.long())
    for _ in range(4):
        batch = next(trainer.dataloader_train)
        maps = trainer.patch_confidence(batch)
        assert [m.shape for m in maps] == [t.shape for t in batch["target"]]
        known = ~torch.isnan(maps[0])
        assert known.float().mean() > 0.3
        assert (maps[0][known] > 0.99).float().mean() >= 0.99
        low = torch.nn.functional.interpolate(maps[0], batch["target"][1].shape[2:], mode="nearest-exact")
        torch.testing.assert_close(maps[1], low, equal_nan=True)


def test_fuzzy_phase_centres_patches_on_fuzzy_voxels(tiny2d, monkeypatch, tmp_path):
    """With a memory whose only disagreeing voxels lie in one corner, fuzzy-biased patches are
    centred there; outside fuzzy phases the sampler proposes nothing."""
    import json

    from nnunetv2_dale.method.rsets import Mixture
    from nnunetv2_dale.method.sampling import SAMPLING_FILE, FuzzySampler

    tree, did, _ = tiny2d
    trainer = inprocess_trainer(tree, did, "2d", monkeypatch, nnUNet_DALE_iters="1")
    trainer.on_train_start()
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    key = sorted(trainer.memory.case_shapes)[0]
    seg = np.asarray(dataset_tr.load_case(key)[1])
    q = seg[0].astype(np.float32).copy()
    q[:, :6, :6] = 1 - q[:, :6, :6]  # the model disagrees with the label only in this corner
    flat = torch.from_numpy(q.reshape(-1))
    for _ in range(3):
        trainer.memory.update(key, torch.arange(flat.numel()), torch.stack([1 - flat, flat], 1),
                              torch.from_numpy(seg[0].reshape(-1).astype(np.int64)))
    mixture = Mixture((0.9, 0.1), (0.0, 5.0), (0.5, 1.0), True).to_dict()
    settings = {"phase": "fuzzy", "share": 1.0, "min_visits": 3, "channels": 1, "mixtures": [mixture, mixture]}
    (trainer.memory_folder / SAMPLING_FILE).write_text(json.dumps(settings))
    sampler = FuzzySampler(trainer.memory_folder)
    rng = np.random.default_rng(0)
    centres = [sampler.propose(key, seg, rng) for _ in range(20)]
    assert all(c is not None and c[1] < 6 and c[2] < 6 for c in centres), centres
    (trainer.memory_folder / SAMPLING_FILE).write_text(json.dumps({**settings, "phase": "stable"}))
    import os
    os.utime(trainer.memory_folder / SAMPLING_FILE, ns=(1, 1))  # new mtime even within one clock tick
    assert sampler.propose(key, seg, rng) is None


@pytest.mark.parametrize("dims", [2, 3])
def test_described_coordinates_equal_the_transformed_map(dims):
    """nnU-Net's training transforms, same random draws: the map built from the PatchSpec (crop,
    spatial transform, mirroring) equals the crop's map sent through the transforms, on the
    voxels with a source voxel, and the valid voxels are the same."""
    import copy

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    patch = (40, 48, 36) if dims == 3 else (64, 72)
    crop = [[-6, 46], [10, 70], [-3, 40]] if dims == 3 else [[-10, 80], [5, 90]]
    shape = (50, 64, 38) if dims == 3 else (70, 96)
    rotation = (-0.52, 0.52) if dims == 3 else (-np.pi, np.pi)
    stock = nnUNetTrainer.get_training_transforms(patch, rotation, None, tuple(range(dims)), False, [False],
                                                  False, [1], None, None)
    described = copy.deepcopy(stock)
    assert describe_coordinates(described)
    image = torch.randn(1, *[b - a for a, b in crop])
    seg = (torch.rand(image.shape) > 0.5).to(torch.int16)
    kinds = set()
    for seed in range(24):
        out = {}
        for name, pipeline, coords in (("map", stock, crop_coordinates(crop, shape)),
                                       ("spec", described, CropSpec(tuple(map(tuple, crop)), shape))):
            torch.manual_seed(seed)
            np.random.seed(seed)
            out[name] = pipeline(image=image.clone(), segmentation=seg.clone(), regression_target=coords)["regression_target"]
        spec = out["spec"]
        assert isinstance(spec, PatchSpec)
        kinds.add((spec.matrix != tuple(tuple(float(a == b) for b in range(dims)) for a in range(dims)), bool(spec.flips)))
        built = coordinate_map(spec)
        valid_map, valid_spec = out["map"][-1] > 0.999, built[-1] > 0.999
        assert valid_map.float().mean() > 0.2
        assert (valid_map == valid_spec).float().mean() > 0.9999
        both = valid_map & valid_spec
        assert float((built[:-1] - out["map"][:-1])[:, both].abs().max()) < 0.01
    assert {k[0] for k in kinds} == {False, True} and {k[1] for k in kinds} == {False, True}  # crops and resamplings, mirrored and not


@pytest.mark.parametrize("matrix", ["aligned", "yz-rotated", "rotated"])
@pytest.mark.parametrize("dims", [2, 3])
def test_described_source_indices_equal_those_of_the_built_map(dims, matrix):
    """The source indices read straight from a PatchSpec (one-axis shapes where the matrix does
    not mix axes) are those of its built coordinate map, flipped, scaled, rotated, partly outside
    the case, and for a 2d patch of a 3D case."""
    c, s = np.cos(0.4), np.sin(0.4)
    patch = (20, 24, 18)[-dims:]
    case = (9, 30, 26) if dims == 2 else (25, 30, 26)  # a 2d patch lies in a slice of the 3D case
    bbox = ((-3, 27), (4, 30), (-2, 22))[-dims:]
    matrices = {"aligned": np.diag([1.1, 0.9, 1.2][-dims:]),
                "yz-rotated": np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])[-dims:, -dims:],
                "rotated": np.array([[c, -s, 0], [s * c, c * c, -s], [s * s, c * s, c]])[-dims:, -dims:]}
    spec = PatchSpec(CropSpec(bbox, case[-dims:]), patch, tuple(map(tuple, matrices[matrix])),
                     tuple((e - b - 1) / 2 + 0.37 for b, e in bbox), flips=(0,),
                     slice_index=4.0 if dims == 2 else None)
    idx, valid = source_indices(spec, case)
    ref_idx, ref_valid = source_indices(coordinate_map(spec), case)
    assert 0.3 < valid.float().mean() < 1  # partly outside the case, as asked
    assert torch.equal(valid, ref_valid)
    assert torch.equal(idx[valid], ref_idx[valid])


def _random_spec(rng, case, patch, rotated: bool, trial: int) -> PatchSpec:
    """A patch as nnU-Net's spatial transform and mirroring describe it: plain crops (positions on
    integers or halves), scaled (offsets off the grid), rotated and scaled, flipped, partly outside
    the case; a 2d patch lies in a slice of the 3D case."""
    dims = len(patch)
    if rotated:
        a = rng.uniform(-np.pi, np.pi, 3)
        rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
        rz = np.array([[np.cos(a[1]), -np.sin(a[1]), 0], [np.sin(a[1]), np.cos(a[1]), 0], [0, 0, 1]])
        matrix = (rx @ rz)[-dims:, -dims:] * rng.uniform(0.7, 1.4)
    else:
        matrix = np.diag([1.0] * dims if trial % 2 == 0 else rng.uniform(0.7, 1.4, dims))
    start = [int(rng.integers(-6, s - p + 6)) for s, p in zip(case[-dims:], patch)]
    bbox = tuple((b, b + p + 2 * int(rng.integers(0, 3))) for b, p in zip(start, patch))
    off_grid = rotated or trial % 4 == 1
    return PatchSpec(CropSpec(bbox, case[-dims:]), patch, tuple(map(tuple, matrix.tolist())),
                     tuple((e - b - 1) / 2 + (rng.uniform(-0.5, 0.5) if off_grid else 0) for b, e in bbox),
                     flips=tuple(a for a in range(dims) if rng.random() < 0.5),
                     slice_index=float(rng.integers(0, case[0])) if dims == 2 else None)


@pytest.mark.parametrize("dims", [2, 3])
def test_worker_reads_equal_the_flat_gather(dims, tmp_path):
    """What the workers read per patch (``PatchReader.read``: slices for unrotated patches,
    ``read_box``; numpy scratch-array indices for rotated ones, ``rotated_source_indices``) equals
    the flat gather at ``described_source_indices`` (the trainer's own path): q at every valid
    voxel, visits everywhere (0 where invalid), for 1 and 3 channels; a built map (elastic
    deformation) takes the flat path. The output arrays start as garbage: nothing is left
    unwritten."""
    from nnunetv2_dale.method.geometry import axis_sources
    from nnunetv2_dale.method.memory import write_json_atomic
    from nnunetv2_dale.method.sampling import SAMPLING_FILE, PatchReader

    rng = np.random.default_rng(dims)
    case = (7, 40, 36) if dims == 2 else (30, 40, 36)
    patch = (24, 20) if dims == 2 else (16, 24, 20)
    n = int(np.prod(case))
    (tmp_path / "live").mkdir()
    kinds = {"crop": 0, "scaled": 0, "rotated": 0, "outside": 0}
    for trial in range(90):
        channels = 1 if trial % 3 else 3
        q = rng.random(n * channels).astype(np.float16)
        visits = rng.integers(0, 255, n).astype(np.uint8)
        key = f"case{trial}"
        q.tofile(tmp_path / "live" / f"{key}.q.f16")
        visits.tofile(tmp_path / "live" / f"{key}.n.u8")
        write_json_atomic(tmp_path / SAMPLING_FILE, {"phase": "stable", "channels": channels})
        reader = PatchReader(tmp_path)
        kind = "rotated" if trial % 3 == 2 else ("scaled" if trial % 2 else "crop")
        spec = _random_spec(rng, case, patch, kind == "rotated", trial)
        assert (axis_sources(spec) is None) == (kind == "rotated")
        coords = coordinate_map(spec) if trial % 10 == 9 else spec
        index, valid = source_indices(coords, case)
        if not valid.any():
            continue
        out_q, out_v = np.full((valid.numel(), channels), 7, np.float16), np.full(valid.numel(), 7, np.uint8)
        assert reader.read(key, coords, case, out_q, out_v)
        v = valid.numpy()
        np.testing.assert_array_equal(out_v, visits[index.numpy()] * v, err_msg=f"trial {trial}: {spec}")
        np.testing.assert_array_equal(out_q[v], q.reshape(n, channels)[index.numpy()][v], err_msg=f"trial {trial}: {spec}")
        kinds[kind] += 1
        kinds["outside"] += int(not v.all())
    assert min(kinds.values()) >= 5, kinds  # every kind of patch was exercised
