"""Could another flag rule on DALE's frozen memory find more of the injected noise without flagging
more correct labels? Offline, on the buffers of finished ddti-fast folds (2D, binary).

Per rule: recall (flagged share of the injected-noise voxels), false-flag rate (flagged share of
the untouched voxels) and precision (noise share of the flagged mass), over the known training
voxels. Rules: DALE's own 1 - omega; the ensemble disagreeing with the label (q[y] < 0.5, 0.3);
spatial erosion / opening of 1 - omega (are false flags thin boundary strips?); a class-prior shift
of q's logits so its mean foreground equals the labels' (is the early ensemble biased to a class?);
and a per-case gate that keeps the flags of the cases with the most flagged mass (are false flags
spread over the cases that have no noise?).

    python benchmarks/ddti_fast/flag_rules.py BENCH_DIR DATASET:TRAINER [DATASET:TRAINER ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from flag_analysis import fold_cases, use_bench  # the sibling script (run from this folder's path)


def cases(bench: Path, dataset: str, trainer: str):
    """Per training case: annotated foreground, clean foreground, q (foreground), omega, known."""
    for fc, _, omega, _, label, clean, q, n in fold_cases(bench, dataset, trainer):
        q = q.reshape(label.shape).astype(np.float32) if q.shape[-1] == 1 else q[..., 1].reshape(label.shape)
        yield label > 0, clean > 0, q, np.nan_to_num(omega, nan=1.0), n >= fc.min_visits


def rules(y: np.ndarray, q: np.ndarray, omega: np.ndarray, shift: float) -> dict[str, np.ndarray]:
    qy = np.where(y, q, 1 - q)
    flagged = 1 - omega
    shifted = 1 / (1 + np.exp(-(np.log(q + 1e-6) - np.log(1 - q + 1e-6) + shift)))
    return {"1 - omega (DALE)": flagged,
            "q[y] < 0.5": (qy < 0.5).astype(float),
            "q[y] < 0.3": (qy < 0.3).astype(float),
            "q[y] < 0.3, prior-shifted q": (np.where(y, shifted, 1 - shifted) < 0.3).astype(float),
            "1 - omega eroded 3x3": ndimage.minimum_filter(flagged, size=3, mode="nearest"),
            "1 - omega opened 3x3": ndimage.maximum_filter(ndimage.minimum_filter(flagged, size=3, mode="nearest"),
                                                           size=3, mode="nearest")}


def prior_shift(data: list) -> float:
    """The logit shift that makes the mean of q over the known voxels equal the labels' foreground share."""
    y = np.concatenate([c[0][c[4]] for c in data])
    q = np.concatenate([c[2][c[4]] for c in data])
    logit = np.log(q + 1e-6) - np.log(1 - q + 1e-6)
    lo, hi = -5.0, 5.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 / (1 + np.exp(-(logit + mid)))).mean() < y.mean() else (lo, mid)
    return (lo + hi) / 2


def report(data: list) -> None:
    shift = prior_shift(data)
    sums: dict[str, np.ndarray] = {}
    per_case = []
    for y, clean, q, omega, known in data:
        noise = (y != clean) & known
        untouched = ~noise & known
        for name, f in rules(y, q, omega, shift).items():
            sums[name] = sums.get(name, 0) + np.array([(f * noise).sum(), noise.sum(), (f * untouched).sum(),
                                                      untouched.sum()])
        f = (1 - omega) * known
        per_case.append(((f.sum() / max(y.sum(), 1)), (f * noise).sum(), (f * untouched).sum(), noise.any()))
    print(f"  prior shift of q's logits: {shift:+.2f}")
    print("  | rule | recall | false-flag rate | precision |\n  |---|---|---|---|")
    for name, (tp, n, fp, m) in sums.items():
        recall = f"{tp / n:.3f}" if n else "-"
        print(f"  | {name} | {recall} | {fp / m:.4f} | {tp / max(tp + fp, 1e-9):.2f} |")
    c = np.array(per_case, dtype=float)
    noise_total = sums["1 - omega (DALE)"][1]
    for flag in (0, 1):
        sel = c[:, 3] == flag
        if sel.any():
            print(f"  cases {'with' if flag else 'without'} injected noise: {int(sel.sum())}, flagged mass / lesion area "
                  f"quartiles {np.percentile(c[sel, 0], [25, 50, 75]).round(3).tolist()}, false-flag mass "
                  f"{c[sel, 2].sum():.0f}")
    for share in (50, 33):
        keep = c[:, 0] > np.percentile(c[:, 0], share)
        recall = f"{c[keep, 1].sum() / noise_total:.3f}" if noise_total else "-"
        print(f"  gate: flags of the cases above the {share}th percentile of flagged mass: recall {recall}, "
              f"false-flag mass {c[keep, 2].sum():.0f} (all cases {c[:, 2].sum():.0f}), precision "
              f"{c[keep, 1].sum() / max(c[keep, 1].sum() + c[keep, 2].sum(), 1e-9):.2f}")


def main() -> None:
    bench = Path(sys.argv[1]).resolve()
    use_bench(bench)
    for spec in sys.argv[2:]:
        dataset, trainer = spec.split(":")
        print(f"\n{dataset} {trainer}")
        report(list(cases(bench, dataset, trainer)))


if __name__ == "__main__":
    main()
