"""Which voxels DALE's frozen memory flags (1 - omega), on clean and on noisy training labels.

For each given DALE fold of a ddti-fast benchmark (``<bench>/nnUNet_results/<dataset>/<trainer>...``),
reads the buffers and stored mixtures through the audit's ``FoldConfidence``, and prints
- the share of known training voxels flagged, the recall (mean 1 - omega over the injected-noise
  voxels) and the false-flag rate (over the untouched voxels), with the AUROC of 1 - omega and of
  the raw loss signal l = -log q[y] for the noise mask;
- the same by signed distance to the annotated boundary (> 0 inside the annotated lesion).

    python benchmarks/ddti_fast/flag_analysis.py BENCH_DIR DATASET:TRAINER [DATASET:TRAINER ...]
(nnU-Net's path variables are set from BENCH_DIR; 2D datasets only.)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage


def use_bench(bench: Path) -> None:
    """Point nnU-Net's path variables at the benchmark folder ``bench``."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(bench / name)


def raw_labels(bench: Path, dataset: str, key: str, ending: str, shape: tuple[int, ...]
               ) -> tuple[np.ndarray, np.ndarray]:
    """The annotated (noisy) and clean training label of ``key`` from the benchmark's raw copy, in
    ``shape``; the clean one is the annotated one where the copy keeps none (clean data)."""
    raw = bench / "nnUNet_raw" / dataset
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{key}{ending}"))).reshape(shape)
    clean_file = raw / "labelsTr_clean" / f"{key}{ending}"
    clean = sitk.GetArrayFromImage(sitk.ReadImage(str(clean_file))).reshape(shape) if clean_file.exists() else label
    return label, clean


def fold_cases(bench: Path, dataset: str, trainer: str):
    """Per training case of the fold: (fold's ``FoldConfidence``, key, omega, preprocessed label,
    annotated label, clean label, q, visits); the 2D arrays in the case's (y, x) shape."""
    from nnunetv2_dale.audit.export import FoldConfidence

    fc = FoldConfidence(bench / "nnUNet_results" / dataset / f"{trainer}__nnUNetPlans_cpu__2d" / "fold_0",
                        bench / "nnUNet_preprocessed")
    ending = fc.dataset_json["file_ending"]
    for key in fc.keys:
        omega, seg, _ = fc.preprocessed(key)
        seg2 = seg.reshape(-1, *seg.shape[-2:])[0]
        label, clean = raw_labels(bench, dataset, key, ending, seg2.shape)
        if not ((seg2 > 0) == (label > 0)).all():
            raise RuntimeError(f"{key}: preprocessed and raw labels differ; this script needs identity preprocessing")
        q, n = fc.memory.case_arrays(key)
        yield fc, key, omega.reshape(seg2.shape), seg2, label, clean, q, n.reshape(seg2.shape)


def gather(bench: Path, dataset: str, trainer: str) -> dict[str, np.ndarray]:
    from nnunetv2_dale.method.rsets import agreement_with_label, loss_signal

    out: dict[str, list[np.ndarray]] = {"l": [], "noise": [], "omega": [], "dist": []}
    for fc, _, omega, seg2, label, clean, q, n in fold_cases(bench, dataset, trainer):
        labels = np.where(seg2 < 0, 0, seg2).reshape(-1).astype(np.int64)
        known = n.reshape(-1) >= fc.min_visits
        qt = torch.from_numpy(q.reshape(-1, q.shape[-1]).astype(np.float32))
        loss = loss_signal(agreement_with_label(qt, torch.from_numpy(labels), len(fc.mixtures))).numpy()
        fg = seg2 > 0
        dist = np.where(fg, ndimage.distance_transform_edt(fg), -ndimage.distance_transform_edt(~fg)).reshape(-1)
        for name, value in (("l", loss), ("noise", (label != clean).reshape(-1)), ("omega", omega.reshape(-1)),
                            ("dist", dist)):
            out[name].append(value[known])
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    from nnunetv2_dale.method.rsets import auroc

    bench = Path(sys.argv[1]).resolve()
    use_bench(bench)
    for spec in sys.argv[2:]:
        dataset, trainer = spec.split(":")
        d = gather(bench, dataset, trainer)
        flagged, noise = 1 - d["omega"], d["noise"]
        recall = f"{flagged[noise].mean():.3f}" if noise.any() else "-"
        print(f"\n{dataset} {trainer}: {len(flagged)} known voxels, noise {noise.mean():.3f}, flagged "
              f"{flagged.mean():.4f}, recall {recall}, false-flag {flagged[~noise].mean():.4f}, "
              f"AUROC 1-omega {auroc(flagged, noise):.3f}, AUROC l {auroc(d['l'], noise):.3f}")
        print("  signed distance  voxels  noise  flagged  l(untouched)  l(noise)")
        dist = np.clip(np.round(d["dist"]), -8, 8)
        for v in range(-8, 9):
            sel = dist == v
            if sel.any():
                ln = f"{d['l'][sel & noise].mean():.2f}" if (sel & noise).any() else "-"
                print(f"  {v:+3.0f}{' (or beyond)' if abs(v) == 8 else '           '} {sel.sum():7d}  "
                      f"{noise[sel].mean():.3f}  {flagged[sel].mean():.3f}    {d['l'][sel & ~noise].mean():.2f}        {ln}")


if __name__ == "__main__":
    main()
