"""Demo data without downloads: 2D/3D lesion phantoms with fuzzy boundaries and noisy labels.

Each case is a low-contrast, hypo-intense lesion with an irregular shape (an ellipsoid whose
signed distance is perturbed by a smooth random field), a blurred boundary and multiplicative
speckle, like a nodule in ultrasound. The dataset is written in nnU-Net raw format:

- ``imagesTr``/``labelsTr``: training cases with NOISY labels (``nnunetv2_dale.data.noise``);
- ``labelsTr_clean``: the clean training labels, ``noiseTr``: the voxels the noise changed;
- ``imagesTs``/``labelsTs``: test cases with CLEAN labels, the reference for evaluation;
- ``phantoms.json``: seed, sizes, noise settings and the list of corrupted cases.

2D datasets are PNG (read by nnU-Net's NaturalImage2DIO), 3D datasets NIfTI (SimpleITKIO).
The same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunetv2_dale.data.noise import NoiseSpec, corrupt_label


def phantom_case(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One (image in [0, 1], clean binary label) pair of the given 2D or 3D shape."""
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    while True:
        radii = rng.uniform(0.12, 0.28, size=len(shape))
        centre = rng.uniform(radii + 0.05, 1 - radii - 0.05)
        offset = grid - centre.reshape((-1,) + (1,) * len(shape)).astype(np.float32)
        if len(shape) >= 2:  # random in-plane rotation of the ellipsoid
            a = rng.uniform(0, np.pi)
            y, x = offset[-2], offset[-1]
            offset[-2], offset[-1] = np.cos(a) * y - np.sin(a) * x, np.sin(a) * y + np.cos(a) * x
        dist = np.sqrt(sum((o / r) ** 2 for o, r in zip(offset, radii))) - 1.0
        field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=[s / 10 for s in shape])
        field /= field.std() + 1e-8
        signed = dist + 0.3 * field.astype(np.float32)
        label = signed < 0
        if label.sum() >= 0.01 * label.size:
            break
    background = 0.55 + 0.1 * ndimage.gaussian_filter(rng.normal(size=shape), sigma=[s / 16 for s in shape]) * 4
    contrast = rng.uniform(0.18, 0.3)
    edge_width = rng.uniform(0.06, 0.14)
    image = background - contrast / (1 + np.exp(signed / edge_width))
    shape_k = 4.0  # gamma-distributed multiplicative speckle with mean 1
    image = image * rng.gamma(shape_k, 1 / shape_k, size=shape)
    image = ndimage.gaussian_filter(image, 0.8)
    return np.clip(image, 0, 1).astype(np.float32), label.astype(np.uint8)


def _write(array: np.ndarray, path: Path, is_label: bool, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> None:
    if array.ndim == 2:
        from PIL import Image

        data = array.astype(np.uint8) if is_label else np.round(array * 255).astype(np.uint8)
        Image.fromarray(data).save(path)
    else:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(array.astype(np.uint8 if is_label else np.float32))
        img.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # numpy (z, y, x) -> ITK (x, y, z)
        sitk.WriteImage(img, str(path), useCompression=True)


def make_phantom_dataset(out_dir: str | os.PathLike, dim: int = 2, size: int = 64, num_train: int = 40,
                         num_test: int = 20, noise: NoiseSpec = NoiseSpec(), seed: int = 0,
                         shape: tuple[int, ...] | None = None, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
    """Write a phantom dataset into ``out_dir`` (a DatasetXXX_Name folder); return that folder.

    ``shape`` (default ``(size,) * dim``) and ``spacing`` (3D only, numpy axis order) allow
    anisotropic volumes, e.g. ``shape=(8, 40, 40), spacing=(4, 1, 1)``.
    """
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    if num_train < 2 or num_test < 1:
        raise ValueError("need at least 2 training cases and 1 test case")
    out = Path(out_dir)
    ending = ".png" if dim == 2 else ".nii.gz"
    folders = {k: out / k for k in ("imagesTr", "labelsTr", "labelsTr_clean", "noiseTr", "imagesTs", "labelsTs")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = tuple(shape) if shape is not None else (size,) * dim
    if len(shape) != dim:
        raise ValueError(f"shape {shape} does not have {dim} dimensions")
    corrupted: list[str] = []
    changed_fractions: dict[str, float] = {}
    for i in range(num_train + num_test):
        image, label = phantom_case(rng, shape)
        train = i < num_train
        case = f"phantom_{i:04d}"
        _write(image, folders["imagesTr" if train else "imagesTs"] / f"{case}_0000{ending}", False, spacing)
        if not train:
            _write(label, folders["labelsTs"] / f"{case}{ending}", True, spacing)
            continue
        noisy, changed = corrupt_label(label, noise, rng)
        if changed.any():
            corrupted.append(case)
            changed_fractions[case] = float(changed.sum() / max(label.sum(), 1))
        _write(noisy, folders["labelsTr"] / f"{case}{ending}", True, spacing)
        _write(label, folders["labelsTr_clean"] / f"{case}{ending}", True, spacing)
        _write(changed.astype(np.uint8), folders["noiseTr"] / f"{case}{ending}", True, spacing)
    dataset_json = {
        "channel_names": {"0": "ultrasound-like" if dim == 2 else "phantom"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": num_train,
        "file_ending": ending,
        "description": f"nnunetv2-dale {dim}D lesion phantoms; NOISY labelsTr, clean labelsTs (seed {seed})",
    }
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    meta = {"seed": seed, "dim": dim, "shape": list(shape), "spacing": list(spacing), "num_train": num_train, "num_test": num_test,
            "noise": asdict(noise), "corrupted_cases": corrupted, "changed_fraction": changed_fractions}
    (out / "phantoms.json").write_text(json.dumps(meta, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    """``nnUNetv2_dale_make_phantoms``: write a phantom dataset into $nnUNet_raw (or -o)."""
    p = argparse.ArgumentParser(description="Generate an nnU-Net raw dataset of lesion phantoms with noisy "
                                            "training labels and clean test labels.")
    p.add_argument("-d", "--dataset-id", type=int, default=990, help="nnU-Net dataset id (default 990)")
    p.add_argument("-n", "--name", default=None, help="dataset name (default Phantom2D / Phantom3D)")
    p.add_argument("-o", "--output", default=None, help="raw folder to write into (default $nnUNet_raw)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=2)
    p.add_argument("--size", type=int, default=64, help="edge length in pixels/voxels (default 64)")
    p.add_argument("--num-train", type=int, default=40)
    p.add_argument("--num-test", type=int, default=20)
    p.add_argument("--noise", default="alphabeta", choices=("none", "alphabeta", "markov", "missed_spurious"))
    p.add_argument("--alpha", type=float, default=0.7, help="fraction of training cases corrupted (default 0.7)")
    p.add_argument("--beta", type=float, default=0.5, help="alpha/beta: area change of a corrupted mask (0.5)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from nnunetv2_dale.utilities.preflight import SetupError, check_writable

    raw = args.output or os.environ.get("nnUNet_raw")
    if not raw:
        raise SetupError("give an output folder with -o, or set nnUNet_raw (export nnUNet_raw=/path/to/raw).")
    if not 1 <= args.dataset_id <= 999:
        raise SetupError(f"dataset id must be between 1 and 999, got {args.dataset_id}.")
    name = args.name or f"Phantom{args.dim}D"
    target = check_writable(Path(raw), "the output folder") / f"Dataset{args.dataset_id:03d}_{name}"
    if target.exists() and any(target.iterdir()):
        raise SetupError(f"{target} already exists and is not empty. Remove it or pick another id with -d.")
    spec = NoiseSpec(model=args.noise, alpha=args.alpha, beta=args.beta,
                     markov_steps=200 if args.dim == 2 else 80)
    out = make_phantom_dataset(target, args.dim, args.size, args.num_train, args.num_test, spec, args.seed)
    meta = json.loads((out / "phantoms.json").read_text())
    print(f"Wrote {out}: {args.num_train} training cases ({len(meta['corrupted_cases'])} with corrupted labels), "
          f"{args.num_test} test cases with clean labels.")


if __name__ == "__main__":
    main()
