"""Reading raw nnU-Net datasets: case identifiers, the reader/writer nnU-Net picks, real voxel
spacings, 2D views."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def case_ids(folder: Path, ending: str) -> list[str]:
    """Sorted case identifiers of the ``*ending`` files in ``folder`` (none if it does not exist)."""
    return sorted(p.name[: -len(ending)] for p in folder.glob(f"*{ending}")) if folder.is_dir() else []


def reader_writer(dataset_json: dict, example: str | Path):
    """nnU-Net's image reader/writer for a raw dataset, chosen from its dataset.json and one file."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    return determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)()


def physical_spacing(spacing) -> list[float]:
    """The real voxel spacing: without the 999 nnU-Net's 2D readers put on the dummy axis."""
    return [float(s) for s in spacing if s < 999] or [1.0]


def view_slice(volume: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """A 2D view: the image itself for 2D data, else the slice (first axis) with most foreground."""
    v, r = np.asarray(volume), np.asarray(ref)
    while v.ndim > 3:
        v, r = v[0], r[0] if r.ndim > 3 else r
    if v.shape[0] == 1:
        return v[0]
    return v[int(np.argmax((r > 0).reshape(r.shape[0], -1).sum(1)))]
