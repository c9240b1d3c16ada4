"""``nnUNetv2_dale_audit``: which training labels look wrong, and where, in the raw image geometry.

Reads a DALE fold (finished or still training; see ``export.FoldConfidence`` for which buffers)
and writes to ``-o`` (default ``<fold>/label_audit``):

- ``confidence/<case><ending>``: omega per voxel in the case's ORIGINAL geometry. NIfTI and other
  SimpleITK formats: float32 in [0, 1], -1 = unknown (not visited enough, or outside nnU-Net's
  crop; not NaN, which ITK's NIfTI reader turns into 0). PNG (2D datasets): 8-bit, 0 = unknown,
  1..255 = omega (value - 1) / 254.
- ``suspect/<case><ending>``: 1 where omega < ``--threshold`` (default 0.5), written with
  nnU-Net's own segmentation writer, so it opens next to the raw label in any viewer.
- ``label_audit.csv``: one row per case, worst first (by suspect volume relative to the labelled
  foreground volume, which counts labels that are too large AND too small): suspect voxels and
  mm^3, the share of the labelled foreground that is suspect, mean omega per class, unknown share.
- ``label_audit.md``: a summary with the top cases; ``overlays/``: PNG pictures (image, label,
  suspect region) for every case of 2D data and the ``--pictures`` worst cases of 3D data.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np

from nnunetv2_dale.audit.export import FoldConfidence


def _fold_dir(dataset: str, configuration: str, fold: str, trainer: str, plans: str) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise SystemExit(f"nnunetv2-dale: {e}") from None
    folder = Path(get_output_folder(name, trainer, plans, configuration, fold))
    if not folder.is_dir():
        raise SystemExit(f"nnunetv2-dale: no trained fold at {folder}. Train it first: nnUNetv2_train {dataset} "
                         f"{configuration} {fold} -tr {trainer}" + (f" -p {plans}" if plans != "nnUNetPlans" else ""))
    return folder


def write_confidence(omega: np.ndarray, path: Path, properties: dict, ending: str) -> None:
    """omega (raw geometry, NaN unknown) as float NIfTI/MHA/... (-1 unknown) or encoded 8-bit PNG."""
    if ending.lower() == ".png":
        from PIL import Image

        encoded = np.where(np.isfinite(omega), np.round(np.nan_to_num(omega) * 254) + 1, 0).astype(np.uint8)
        Image.fromarray(encoded.reshape(encoded.shape[-2:])).save(path)
        return
    import SimpleITK as sitk

    stuff = properties["sitk_stuff"]
    array = np.where(np.isfinite(omega), omega, -1.0).astype(np.float32)
    if len(stuff["spacing"]) == 2:
        array = array[0]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(stuff["spacing"])
    image.SetOrigin(stuff["origin"])
    image.SetDirection(stuff["direction"])
    sitk.WriteImage(image, str(path), True)


def audit(fc: FoldConfidence, raw: Path, out: Path, threshold: float, pictures: int) -> list[dict]:
    """Write maps, CSV, summary and overlays; return the CSV rows, worst first."""
    from nnunetv2_dale.data.io import reader_writer
    from nnunetv2_dale.data.io import physical_spacing

    ending = fc.dataset_json["file_ending"]
    first = raw / "labelsTr" / f"{fc.keys[0]}{ending}"
    if not first.is_file():
        raise SystemExit(f"nnunetv2-dale: {first} not found. The audit writes maps in the geometry of the raw labels: "
                         "set nnUNet_raw to the folder this fold was preprocessed from.")
    rw = reader_writer(fc.dataset_json, first)
    for sub in ("confidence", "suspect", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    classes = sorted(fc.label_manager.all_labels)
    ignore = fc.label_manager.ignore_label
    rows = []
    for key in fc.keys:
        omega_pre, _, props = fc.preprocessed(key)
        omega = fc.to_raw(omega_pre, props)
        label, label_props = rw.read_seg(str(raw / "labelsTr" / f"{key}{ending}"))
        label = label[0]
        if label.shape != omega.shape:
            raise RuntimeError(f"{key}: confidence map {omega.shape} does not match the raw label {label.shape}")
        if ignore is not None:
            omega[label == ignore] = np.nan
        suspect = np.isfinite(omega) & (omega < threshold)
        write_confidence(omega, out / "confidence" / f"{key}{ending}", label_props, ending)
        rw.write_seg(suspect.astype(np.uint8), str(out / "suspect" / f"{key}{ending}"), label_props)
        voxel_mm3 = float(np.prod(physical_spacing(label_props["spacing"])))
        fg = (label > 0) & (label != ignore if ignore is not None else True)
        row = {"case": key, "suspect_voxels": int(suspect.sum()), "suspect_mm3": round(float(suspect.sum()) * voxel_mm3, 3),
               "suspect_share_of_foreground": round(float((suspect & fg).sum() / fg.sum()), 4) if fg.any() else 0.0,
               "suspect_relative_to_foreground": round(float(suspect.sum() / max(int(fg.sum()), 1)), 4),
               "unknown_share": round(float((~np.isfinite(omega)).mean()), 4)}
        for c in classes:
            sel = (label == c) & np.isfinite(omega)
            row[f"mean_confidence_class_{c}"] = round(float(omega[sel].mean()), 4) if sel.any() else ""
        rows.append(row)
    rows.sort(key=lambda r: (-r["suspect_relative_to_foreground"], -r["suspect_voxels"], r["case"]))
    with open(out / "label_audit.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    is_2d = omega.shape[0] == 1
    drawn = [r["case"] for r in (rows if is_2d else rows[:pictures])]
    for key in drawn:
        _overlay(rw, raw, out, key, ending)
    _summary(fc, out, rows, threshold, drawn)
    return rows


def _overlay(rw, raw: Path, out: Path, key: str, ending: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunetv2_dale.data.io import view_slice

    images = sorted((raw / "imagesTr").glob(f"{key}_[0-9][0-9][0-9][0-9]{ending}"))
    image, _ = rw.read_images([str(images[0])])
    label, _ = rw.read_seg(str(raw / "labelsTr" / f"{key}{ending}"))
    suspect, _ = rw.read_seg(str(out / "suspect" / f"{key}{ending}"))
    img, lab, sus = view_slice(image[0], suspect[0]), view_slice(label[0], suspect[0]), view_slice(suspect[0], suspect[0])
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    axes[0].imshow(img, cmap="gray")
    axes[0].set_title(f"{key}", fontsize=8)
    axes[1].imshow(img, cmap="gray")
    axes[1].contour(lab > 0, levels=[0.5], colors="lime", linewidths=0.8)
    axes[1].set_title("label (green)", fontsize=8)
    axes[2].imshow(img, cmap="gray")
    axes[2].contour(lab > 0, levels=[0.5], colors="lime", linewidths=0.8)
    axes[2].imshow(np.ma.masked_where(sus == 0, sus), cmap=matplotlib.colors.ListedColormap(["red"]), alpha=0.55)
    axes[2].set_title("suspect region (red)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "overlays" / f"{key}.png", dpi=100)
    plt.close(fig)


def noise_estimate_text(fold: Path) -> str:
    """The trainer's label-noise estimate (``dale_noise_estimate.json``) in words."""
    from nnunetv2_dale.method.noise_estimate import ESTIMATE_FILE, NoiseEstimate

    path = Path(fold) / ESTIMATE_FILE
    if not path.is_file():
        return ("No label-noise estimate in this fold: the trainer writes it once its warm-up ends "
                "(nnunetv2-dale 0.2 and later).")
    estimate = NoiseEstimate.from_dict(json.loads(path.read_text()))
    return (f"Label-noise estimate (epoch {estimate.epoch}): {estimate.summary()}. It counts only what the early "
            "network contradicts with confidence away from the boundary rim, so it is a lower bound on boundary "
            "noise and includes the network's own errors on hard cases; README, 'How noisy are my labels'.")


def _summary(fc: FoldConfidence, out: Path, rows: list[dict], threshold: float, drawn: list[str]) -> None:
    top = rows[: min(20, len(rows))]
    lines = [f"# Label audit of {fc.fold_dir}", "", noise_estimate_text(fc.fold_dir), "",
             f"Buffers: {fc.source}. Suspect: omega < {threshold} (omega = DALE's label confidence; unknown "
             f"voxels, visited fewer than {fc.min_visits} times or outside nnU-Net's crop, are never counted as "
             "confident or suspect).", "",
             f"{len(rows)} training cases; {sum(r['suspect_voxels'] > 0 for r in rows)} with a suspect region. "
             "Re-check these first:", "",
             "| rank | case | suspect volume / foreground volume | suspect share of foreground | suspect mm^3 | "
             "unknown share |", "|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['case']} | {r['suspect_relative_to_foreground']:.3f} | "
              f"{r['suspect_share_of_foreground']:.3f} | {r['suspect_mm3']:g} | "
              f"{r['unknown_share']:.3f} |" for i, r in enumerate(top)]
    lines += ["", f"Full list: `label_audit.csv`. Maps: `confidence/`, `suspect/`. Overlays ({len(drawn)}): `overlays/`."]
    (out / "label_audit.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nnUNetv2_dale_audit", description=__doc__.split("\n")[0])
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id")
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-f", "--fold", required=True)
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerDALE")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-o", "--output", help="output folder (default <fold>/label_audit)")
    p.add_argument("--threshold", type=float, default=0.5, help="suspect where omega is below this")
    p.add_argument("--min-visits", type=int, default=3, help="fewer visits = unknown")
    p.add_argument("--pictures", type=int, default=10, help="overlays of the worst N cases (3D data)")
    args = p.parse_args(argv)
    from nnunetv2_dale.utilities.preflight import check_path_variables

    check_path_variables(("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    fold = _fold_dir(args.dataset, args.configuration, args.fold, args.trainer, args.plans)
    try:
        fc = FoldConfidence(fold, os.environ["nnUNet_preprocessed"], args.min_visits)
    except FileNotFoundError as e:
        raise SystemExit(f"nnunetv2-dale: {e}") from None
    out = Path(args.output) if args.output else fold / "label_audit"
    raw = Path(os.environ["nnUNet_raw"]) / fc.plans_manager.dataset_name
    rows = audit(fc, raw, out, args.threshold, args.pictures)
    print(f"nnunetv2-dale: audited {len(rows)} training cases ({fc.source}); worst: "
          + ", ".join(f"{r['case']} (suspect volume {r['suspect_relative_to_foreground']:.0%} of its foreground)"
                     for r in rows[:3]))
    print("nnunetv2-dale: " + noise_estimate_text(fold))
    print(f"nnunetv2-dale: wrote {out / 'label_audit.csv'}, {out / 'label_audit.md'}, maps and overlays in {out}")
    print(json.dumps({"output": str(out), "cases": len(rows)}))


if __name__ == "__main__":
    main()
