"""Where a benchmark's predictions go wrong: predicted vs true foreground area per run.

    python benchmarks/area_analysis.py BENCH_OUTPUT_FOLDER

For every (dataset, trainer) in ``predictions/``, over the test cases with a non-empty clean
label: median and mean of predicted/true area, false-positive area / true area (all, and only
farther than 3 voxels from the lesion), false-negative area / true area (means of per-case ratios,
and the far-FP and FN areas pooled over the cases / the pooled true area), and the mean test Dice
as predicted and with the prediction eroded or dilated by one pixel (is a difference between
trainers a size bias?). Binary 2D PNG datasets.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from nnunetv2_dale.bench.metrics import dice


def main(out: Path) -> None:
    print("| dataset | trainer | pred/true median | pred/true mean | FP/true | FP >3 px away/true | FN/true "
          "| pooled: FP >3 px / FN | Dice | eroded 1 px | dilated 1 px |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dataset in sorted((out / "predictions").iterdir()):
        labels = sorted((out / "nnUNet_raw" / dataset.name / "labelsTs").glob("*.png"))
        for trainer in sorted(dataset.iterdir()):
            rows, scores, pooled = [], [], np.zeros(3)
            for label in labels:
                gt = np.array(Image.open(label)) > 0
                pred = np.array(Image.open(trainer / label.name)) > 0
                scores.append((dice(pred, gt), dice(ndimage.binary_erosion(pred), gt),
                               dice(ndimage.binary_dilation(pred), gt)))
                far = pred & ~ndimage.binary_dilation(gt, iterations=3)
                pooled += (far.sum(), (gt & ~pred).sum(), gt.sum())
                if not gt.any():
                    continue
                fp = pred & ~gt
                rows.append((pred.sum() / gt.sum(), fp.sum() / gt.sum(),
                             (fp & ~ndimage.binary_dilation(gt, iterations=3)).sum() / gt.sum(),
                             (gt & ~pred).sum() / gt.sum()))
            r, d = np.array(rows), np.array(scores).mean(0)
            print(f"| {dataset.name} | {trainer.name} | {np.median(r[:, 0]):.2f} | {r[:, 0].mean():.2f} | "
                  f"{r[:, 1].mean():.2f} | {r[:, 2].mean():.2f} | {r[:, 3].mean():.2f} | "
                  f"{pooled[0] / pooled[2]:.3f} / {pooled[1] / pooled[2]:.3f} | {d[0]:.4f} | {d[1]:.4f} | {d[2]:.4f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
