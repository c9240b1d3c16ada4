"""``report.md`` and figures of a benchmark folder, from its ``results.json`` alone.

Table: dataset x noise x trainer, mean +- standard deviation over seeds of clean-test Dice,
boundary-band Dice and HD95, the difference to the baseline (paired by seed), the share of the
clean-vs-noisy baseline gap a trainer recovers, DALE's noise-detection AUROC and training time.
Figures: Dice vs noise level per trainer (x = measured share of the training foreground the noise
changed), and example cases (test: image, clean label, each trainer's prediction; training: image,
clean label, noisy label, DALE's 1 - omega in raw geometry).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nnunetv2_dale.bench.cli import BASELINE_ALIAS
from nnunetv2_dale.data.io import view_slice

BASELINE = "nnUNetTrainer"
BASELINES = (BASELINE, BASELINE_ALIAS[BASELINE])  # `-tr nnUNetTrainer` runs the alias; runs record either name


def _baseline(by_trainer: dict) -> dict:
    """{seed: record} of the stock nnU-Net runs, under whichever name they were asked for."""
    return next((by_trainer[t] for t in BASELINES if t in by_trainer), {})


def _stats(values: list[float]) -> tuple[float, float, int]:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan"), 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan"), int(arr.size)


def _fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def _groups(runs: dict) -> dict:
    """{dataset: {noise: {trainer: {seed: record}}}} in insertion order."""
    out: dict = {}
    for record in runs.values():
        out.setdefault(record["dataset"], {}).setdefault(record["noise"], {}).setdefault(
            record["trainer"], {})[record["seed"]] = record
    return out


def _label(trainer: str, recs: list[dict], today: str | None) -> str:
    """The trainer's name, marked where its records carry hyperparameters: "today's defaults" when
    every seed ran with today's ``nnUNetTrainerDALE`` hyperparameters."""
    hashes = {r.get("hyperparameter_hash") for r in recs}
    if today is not None and hashes == {today}:
        return f"{trainer} (today's defaults)"
    return trainer


def _today() -> str | None:
    try:
        from nnunetv2_dale.bench.provenance import defaults, hyperparameter_hash
        return hyperparameter_hash(defaults())
    except ImportError:
        return None


def table(results: dict) -> str:
    groups = _groups(results.get("runs", {}))
    today = _today()
    lines = ["| dataset | noise (changed share of fg) | trainer | Dice | band Dice | HD95 (mm) | Δ Dice vs "
             "baseline | gap recovered | noise AUROC | train min |", "|" + "---|" * 10]
    for dataset, by_noise in groups.items():
        clean_base = _stats([r["metrics"]["dice"] for r in _baseline(by_noise.get("clean", {})).values()])[0]
        for noise, by_trainer in by_noise.items():
            base = _baseline(by_trainer)
            for trainer, by_seed in by_trainer.items():
                recs = list(by_seed.values())
                changed = np.mean([r["noise_info"]["mean_changed_fraction"] for r in recs])
                dice = _stats([r["metrics"]["dice"] for r in recs])
                band = _stats([r["metrics"]["band_dice"] for r in recs])
                hd = _stats([r["metrics"]["hd95"] for r in recs])
                paired = [r["metrics"]["dice"] - base[s]["metrics"]["dice"] for s, r in by_seed.items() if s in base]
                delta = _stats(paired) if trainer not in BASELINES else (float("nan"), float("nan"), 0)
                base_dice = _stats([r["metrics"]["dice"] for r in base.values()])[0]
                gap = clean_base - base_dice
                recovered = (f"{(dice[0] - base_dice) / gap:+.0%}" if trainer not in BASELINES and noise != "clean"
                             and np.isfinite(gap) and gap > 0.005 else "-")
                auc = _stats([r.get("noise_detection", {}).get("auroc") for r in recs])
                minutes = _stats([r["train_seconds"] / 60 for r in recs if "train_seconds" in r])
                lines.append(f"| {dataset} | {noise} ({changed:.2f}) | {_label(trainer, recs, today)} | {_fmt(*dice)} | {_fmt(*band)} | "
                             f"{_fmt(*hd, digits=2)} | {_fmt(*delta)} | {recovered} | {_fmt(*auc, digits=3)} | "
                             f"{_fmt(*minutes, digits=1)} |")
    return "\n".join(lines)


def cost_section(cost: dict | None) -> str:
    if not cost:
        return "Not measured (run with `--cost`)."
    t = cost["timing"]
    lines = [f"On `{cost['dataset']}` (patch {t['patch_size']}, batch {t['batch_size']}, {t['iters']} iterations "
             "interleaved in one process on the same batches):", "",
             "| train_step | median ms/iteration | ratio to nnUNetTrainer |", "|---|---|---|"]
    for name, sec in t["median_s"].items():
        lines.append(f"| {name} | {sec * 1000:.1f} | {t['ratio'][name]:.3f} |")
    lines += ["", f"DALE buffer: {t['bytes_per_voxel']:.2f} bytes per voxel on disk.", "",
              "| process | peak RSS whole process (MiB) | peak RSS during training steps (MiB) |", "|---|---|---|"]
    for name, v in cost["peak_rss_mib"].items():
        lines.append(f"| {name} | {v['process']:.0f} | {v['training']:.0f} |")
    return "\n".join(lines)


def figure_dice_vs_noise(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset, by_noise in _groups(results.get("runs", {})).items():
        fig, ax = plt.subplots(figsize=(5, 3.6))
        trainers = list(dict.fromkeys(t for by_trainer in by_noise.values() for t in by_trainer))
        for trainer in trainers:
            xs, ys, es = [], [], []
            for by_trainer in by_noise.values():
                recs = list(by_trainer.get(trainer, {}).values())
                if recs:
                    xs.append(np.mean([r["noise_info"]["mean_changed_fraction"] for r in recs]))
                    m, s, _ = _stats([r["metrics"]["dice"] for r in recs])
                    ys.append(m)
                    es.append(0 if not np.isfinite(s) else s)
            order = np.argsort(xs)
            ax.errorbar(np.asarray(xs)[order], np.asarray(ys)[order], yerr=np.asarray(es)[order], marker="o",
                        capsize=3, label=trainer)
        ax.set_xlabel("share of training foreground changed by the noise")
        ax.set_ylabel("test Dice (clean labels)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"dice_vs_noise_{dataset}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def figure_examples(results: dict, out: Path, n_cases: int = 3) -> list[str]:
    """Test and training examples of the strongest noise level of each dataset (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunetv2_dale.data.io import reader_writer

    written = []
    for dataset, by_noise in _groups(results.get("runs", {})).items():
        noise = max(by_noise, key=lambda k: np.mean([r["noise_info"]["mean_changed_fraction"]
                                                     for t in by_noise[k].values() for r in t.values()]))
        by_trainer = by_noise[noise]
        seed = sorted(next(iter(by_trainer.values())))[0]
        recs = {t: s[seed] for t, s in by_trainer.items() if seed in s}
        any_rec = next(iter(recs.values()))
        raw = out / "nnUNet_raw" / Path(any_rec["predictions"]).parts[1]
        ds = json.loads((raw / "dataset.json").read_text())
        ending = ds["file_ending"]
        first = next((raw / "labelsTs").glob(f"*{ending}"))
        rw = reader_writer(ds, first)
        trainers = list(recs)
        # test cases where the trainers disagree most
        cases = sorted(any_rec["per_case"])
        spread = {c: np.nanmax([recs[t]["per_case"][c]["1"]["dice"] for t in trainers])
                  - np.nanmin([recs[t]["per_case"][c]["1"]["dice"] for t in trainers]) for c in cases}
        chosen = sorted(cases, key=lambda c: -np.nan_to_num(spread[c]))[:n_cases]
        fig, axes = plt.subplots(len(chosen), 2 + len(trainers), figsize=(2.2 * (2 + len(trainers)), 2.3 * len(chosen)),
                                 squeeze=False)
        for row, case in zip(axes, chosen):
            image, _ = rw.read_images([str(p) for p in sorted((raw / "imagesTs").glob(f"{case}_*{ending}"))][:1])
            ref, _ = rw.read_seg(str(raw / "labelsTs" / f"{case}{ending}"))
            panels = [("image", view_slice(image[0], ref[0]), "gray"), ("clean label", view_slice(ref[0], ref[0]), "gray")]
            for t in trainers:
                pred, _ = rw.read_seg(str(out / recs[t]["predictions"] / f"{case}{ending}"))
                panels.append((f"{t}\nDice {recs[t]['per_case'][case]['1']['dice']:.3f}", view_slice(pred[0], ref[0]), "gray"))
            for ax, (title, img, cmap) in zip(row, panels):
                ax.imshow(img, cmap=cmap)
                ax.set_title(f"{case}: {title}" if title == "image" else title, fontsize=7)
                ax.axis("off")
        fig.suptitle(f"{dataset}, noise {noise}, seed {seed}: test cases (clean reference)", fontsize=8)
        fig.tight_layout()
        name = f"examples_test_{dataset}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
        written += _train_examples(recs, raw, rw, ending, out, dataset, noise, seed, n_cases)
    return written


def _train_examples(recs: dict, raw: Path, rw, ending: str, out: Path, dataset: str, noise: str, seed: int,
                    n_cases: int) -> list[str]:
    import matplotlib.pyplot as plt

    from nnunetv2_dale.audit.export import FoldConfidence

    dale = next((r for r in recs.values() if "noise_detection" in r), None)
    if dale is None:
        return []
    pre_root = out / "nnUNet_preprocessed"
    fold = out / "nnUNet_results" / raw.name / f"{dale['trainer_class']}__nnUNetPlans_cpu__{dale['configuration']}" / "fold_0"
    fc = FoldConfidence(fold, pre_root)
    noisy_cases = [k for k in fc.keys if rw.read_seg(str(raw / "noiseTr" / f"{k}{ending}"))[0].any()][:n_cases]
    if not noisy_cases:
        return []
    fig, axes = plt.subplots(len(noisy_cases), 4, figsize=(9, 2.3 * len(noisy_cases)), squeeze=False)
    for row, key in zip(axes, noisy_cases):
        image, _ = rw.read_images([str(p) for p in sorted((raw / "imagesTr").glob(f"{key}_*{ending}"))][:1])
        clean, _ = rw.read_seg(str(raw / "labelsTr_clean" / f"{key}{ending}"))
        noisy, _ = rw.read_seg(str(raw / "labelsTr" / f"{key}{ending}"))
        omega, _, props = fc.preprocessed(key)
        suspicion = 1 - fc.to_raw(omega, props)
        panels = [("image", view_slice(image[0], clean[0]), "gray", None), ("clean label", view_slice(clean[0], clean[0]), "gray", None),
                  ("noisy training label", view_slice(noisy[0], clean[0]), "gray", None),
                  ("DALE 1 - omega (white: unknown)", view_slice(suspicion.reshape(clean[0].shape), clean[0]), "magma", (0, 1))]
        for ax, (title, img, cmap, lim) in zip(row, panels):
            shown = ax.imshow(np.ma.masked_invalid(img), cmap=cmap, vmin=None if lim is None else lim[0],
                              vmax=None if lim is None else lim[1])
            ax.set_title(f"{key}: {title}" if title == "image" else title, fontsize=7)
            ax.axis("off")
        fig.colorbar(shown, ax=row[-1], fraction=0.046)
    fig.suptitle(f"{dataset}, noise {noise}, seed {seed}: corrupted training cases and DALE's label confidence "
                 f"({fc.source})", fontsize=8)
    fig.tight_layout()
    name = f"examples_train_{dataset}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


def write_report(out: Path) -> Path:
    results = json.loads((out / "results.json").read_text())
    s = results["settings"]
    figures = figure_dice_vs_noise(results, out)
    try:
        figures += figure_examples(results, out)
    except (FileNotFoundError, StopIteration, KeyError) as e:  # e.g. a report from a copied results.json
        print(f"nnunetv2-dale: example figures skipped ({e.__class__.__name__}: {e})")
    text = [
        "# Noisy-label benchmark", "",
        f"Source `{s['source']}`; {_budgets(results)}; fold 0. Test labels are clean; noise is injected into "
        "training labels only. "
        f"`{BASELINE}` runs as `nnUNetTrainerBudget` (stock nnU-Net with the same budget).", "",
        "Dice, band Dice (within ±" + f"{s['band']:g} voxels of the true boundary) and HD95 are means over test cases "
        "of the foreground classes; ± is the standard deviation over seeds (shown when there are several). "
        "Δ Dice is paired by seed. Gap recovered = (trainer − baseline) / (baseline on clean − baseline on this "
        "noise). Noise AUROC: 1 − omega against the injected-noise mask on the fold's training voxels that DALE "
        "visited enough, in raw geometry.", "",
        table(results), "",
        "Per run (test Dice; same seed = same noisy training labels):", "", per_seed_table(results), "",
        "## Cost", "", cost_section(results.get("cost")), "",
        "## Figures", "", *[f"![{f}]({f})" for f in figures], "",
        "## Versions", "", "```", json.dumps(results.get("versions", {}), indent=1), "```", "",
        "Reproduce (every invocation that wrote into this folder, in order):", "",
        *[f"    nnUNetv2_dale_bench {_command(inv)}" for inv in results.get("invocations", [s])],
    ]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    print(f"nnunetv2-dale: wrote {path} and {len(figures)} figure(s)")
    return path


def _budgets(results: dict) -> str:
    s = results["settings"]
    default = {k: s[k] for k in ("epochs", "iters", "batch_size", "feature_scale")}  # results of older versions
    budgets = {json.dumps(r.get("budget", default), sort_keys=True) for r in results.get("runs", {}).values()}
    if len(budgets) != 1:
        return "budgets differ between runs (see each run's `budget` in results.json)"
    b = json.loads(budgets.pop())
    return (f"every run {b['epochs']} epochs x {b['iters']} iterations, CPU plans: batch {b['batch_size']}, "
            f"feature widths x {b['feature_scale']}")


def per_seed_table(results: dict) -> str:
    """Test Dice of every run, one column per seed, so that differences can be read paired."""
    groups = _groups(results.get("runs", {}))
    today = _today()
    seeds = sorted({r["seed"] for r in results.get("runs", {}).values()})
    lines = ["| dataset | noise | trainer | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|" + "---|" * (3 + len(seeds))]
    for dataset, by_noise in groups.items():
        for noise, by_trainer in by_noise.items():
            for trainer, by_seed in by_trainer.items():
                cells = [f"{by_seed[s]['metrics']['dice']:.4f}" if s in by_seed else "-" for s in seeds]
                label = _label(trainer, list(by_seed.values()), today)
                lines.append(f"| {dataset} | {noise} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _command(s: dict) -> str:
    if s.get("preset"):
        from nnunetv2_dale.bench.cli import PRESETS

        preset = PRESETS.get(s["preset"], {})
        flags = {"trainers": "-tr", "noise": "--noise", "seeds": "--seeds", "epochs": "--epochs", "iters": "--iters"}
        extra = [f"{flag} " + (" ".join(map(str, s[key])) if isinstance(s[key], list) else str(s[key]))
                 for key, flag in flags.items() if key in s and s[key] != preset.get(key)]
        return " ".join([f"--preset {s['preset']}", *extra] + (["--cost"] if s.get("cost") else []) + ["-o OUT"])
    parts = [f"-s {s['source']}", "--noise " + " ".join(s["noise"]), "-tr " + " ".join(s["trainers"]),
             f"--epochs {s['epochs']} --iters {s['iters']} --batch-size {s['batch_size']} "
             f"--feature-scale {s['feature_scale']}", "--seeds " + " ".join(map(str, s["seeds"])), "-o OUT"]
    return " ".join(parts)
