"""A smaller, deterministic derivative of a raw nnU-Net dataset for fast benchmark regimes.

``derive_subset(source, target, num_train, size)`` keeps a fixed random subset of ``num_train``
training cases (the same for every call: ``SUBSET_SEED``), all test cases, and, for 2D PNG data,
resizes images (bilinear, anti-aliased) and labels (each class's mask resized as a float and
assigned by the largest value, i.e. a smoothed nearest) to ``size`` x ``size``. The source is only
read. Used by the ``ddti-fast`` preset of ``nnUNetv2_dale_bench``, where each training case is seen
about ten times as often as at full size, so that label noise has begun to be memorised.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from skimage import io
from skimage.transform import resize

from nnunetv2_dale.data.io import case_ids

SUBSET_SEED = 601


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    out = resize(image.astype(np.float32), (size, size) + image.shape[2:], order=1, anti_aliasing=True,
                 preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _resize_label(label: np.ndarray, size: int) -> np.ndarray:
    classes = np.unique(label)
    scores = np.stack([resize((label == c).astype(np.float32), (size, size), order=1, anti_aliasing=False)
                       for c in classes])
    return classes[np.argmax(scores, 0)].astype(np.uint8)


def derive_subset(source: Path, target: Path, num_train: int | None, size: int | None) -> Path:
    """Write the derived raw dataset into ``target`` (skipped if it is complete already)."""
    if (target / "dataset.json").is_file():
        return target
    ds = json.loads((source / "dataset.json").read_text())
    ending = ds["file_ending"]
    if size is not None and ending != ".png":
        raise SystemExit(f"nnunetv2-dale: --resize works on 2D PNG datasets only ({source} has {ending} files); "
                         "benchmark it at its own size, or with --subset alone.")
    train = case_ids(source / "labelsTr", ending)
    if num_train is not None and num_train < len(train):
        pick = np.random.default_rng(SUBSET_SEED).permutation(len(train))[:num_train]
        train = sorted(train[i] for i in pick)
    test = case_ids(source / "labelsTs", ending)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, cases in (("Tr", train), ("Ts", test)):
        (tmp / f"images{split}").mkdir(parents=True, exist_ok=True)
        (tmp / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for case in cases:
            images = sorted((source / f"images{split}").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))
            files = [(image, tmp / f"images{split}" / image.name, False) for image in images]
            files.append((source / f"labels{split}" / f"{case}{ending}", tmp / f"labels{split}" / f"{case}{ending}", True))
            for src, dst, is_label in files:
                if size is None:
                    os.symlink(src.resolve(), dst)
                    continue
                array = io.imread(src)
                io.imsave(dst, _resize_label(array, size) if is_label else _resize_image(array, size),
                          check_contrast=False)
    ds.update(numTraining=len(train),
              description=f"{ds.get('description', '')} | nnunetv2-dale subset: {len(train)} training cases "
                          f"(seed {SUBSET_SEED}), resized to {size or 'original size'}")
    (tmp / "dataset.json").write_text(json.dumps(ds, indent=2))
    os.replace(tmp, target)
    return target
