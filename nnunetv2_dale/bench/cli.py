"""``nnUNetv2_dale_bench``: the noisy-label benchmark, DALE vs nnU-Net (and any other trainer).

For every noise level and seed: copy a raw nnU-Net dataset (images linked, never modified), inject
the noise into the TRAINING labels only (deterministic per seed; ``noiseTr`` keeps the mask of the
changed voxels), hold out a test split if the dataset has no ``labelsTs``, plan and preprocess
with nnU-Net, write a CPU plans preset (batch size and feature widths scaled, identical for every
trainer), then train every trainer through ``nnUNetv2_train`` at one budget (epochs x iterations,
via ``nnUNet_DALE_epochs`` / ``nnUNet_DALE_iters``), predict the test cases with
``nnUNetv2_predict`` and score them against the CLEAN test labels (Dice, boundary-band Dice,
HD95). DALE runs also get the AUROC of (1 - omega) against the injected-noise mask, in raw
geometry. ``--cost`` adds the interleaved per-iteration timing and peak RSS (``cost.py``).

Writes ``results.json`` (every number, the settings, versions) after every run, so an interrupted
benchmark can be rerun with the same command: finished trainings are not repeated. Then
``report.md`` and figures (``report.py``).

``nnUNetTrainer`` in ``--trainers`` runs as ``nnUNetTrainerBudget``: stock nnU-Net, with only the
epoch/iteration budget applied.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from nnunetv2_dale.data.io import case_ids, reader_writer
from nnunetv2_dale.data.noise import NoiseSpec, changed_fraction
from nnunetv2_dale.bench.provenance import run_provenance
from nnunetv2_dale.utilities.preflight import tool

BASELINE_ALIAS = {"nnUNetTrainer": "nnUNetTrainerBudget"}
SPLIT_SEED = 12345  # the held-out test split is the same for every noise level and seed

PRESETS = {
    "ddti": dict(source="../shared/data/Dataset601_DDTI", noise=["clean", "alphabeta:alpha=0.7,beta=0.5",
                                                                "alphabeta:alpha=0.7,beta=0.7"],
                 trainers=["nnUNetTrainer", "nnUNetTrainerDALE"], epochs=20, iters=50, batch_size=8,
                 feature_scale=0.5, seeds=[0]),
    "phantoms": dict(source="phantoms:2:48:40", noise=["clean", "alphabeta:alpha=0.7,beta=0.5",
                                                        "alphabeta:alpha=0.7,beta=0.7"],
                     trainers=["nnUNetTrainer", "nnUNetTrainerDALE", "nnUNetTrainerSVLS", "nnUNetTrainerGCE",
                               "nnUNetTrainerTLoss"], epochs=15, iters=20, batch_size=8,
                     feature_scale=0.5, seeds=[0]),
    # 100 training cases at 64x64: each case is seen ~200 times in 50 x 50 iterations of batch 8, where
    # stock nnU-Net has begun to memorise the noise (budget curve in benchmarks/ddti_fast/)
    "ddti-fast": dict(source="../shared/data/Dataset601_DDTI", subset=100, resize=64,
                      noise=["clean", "alphabeta:alpha=0.7,beta=0.5", "alphabeta:alpha=0.7,beta=0.7"],
                      trainers=["nnUNetTrainer", "nnUNetTrainerDALE"], epochs=50, iters=50, batch_size=8,
                      feature_scale=0.5, seeds=[0, 1, 2]),
}


# ------------------------------------------------------------------ noise specs
def parse_noise(text: str) -> NoiseSpec:
    """``clean`` | ``MODEL[:key=value,...]`` with MODEL alphabeta, markov or missed_spurious and
    keys among NoiseSpec's fields (``steps`` = ``markov_steps``)."""
    if text in ("clean", "none"):
        return NoiseSpec("none", alpha=0.0)
    model, _, params = text.partition(":")
    names = {f.name: f.type for f in fields(NoiseSpec)}
    kwargs: dict = {}
    for item in filter(None, params.split(",")):
        key, _, value = item.partition("=")
        key = {"steps": "markov_steps"}.get(key.strip(), key.strip())
        if key not in names or key == "model":
            raise SystemExit(f"nnunetv2-dale: unknown noise parameter {key!r} in {text!r}; "
                             f"use {', '.join(n for n in names if n != 'model')}.")
        kwargs[key] = int(value) if key == "markov_steps" else float(value)
    if model not in ("alphabeta", "markov", "missed_spurious"):
        raise SystemExit(f"nnunetv2-dale: unknown noise model {model!r} in {text!r}; use clean, alphabeta, markov "
                         "or missed_spurious (e.g. alphabeta:alpha=0.7,beta=0.5).")
    return NoiseSpec(model, **kwargs)


def noise_tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text.replace("alphabeta", "ab").replace("alpha=", "a").replace("beta=", "b"))


# --------------------------------------------------------------- dataset copy
def noisy_copy(source: Path, target: Path, spec: NoiseSpec, seed: int, test_fraction: float) -> dict:
    """Raw dataset ``target``: ``source`` with noisy labelsTr, their clean originals
    (labelsTr_clean), the changed-voxel masks (noiseTr) and clean labelsTs."""
    ds = json.loads((source / "dataset.json").read_text())
    if "regions_class_order" in ds:
        raise SystemExit("nnunetv2-dale: region-based datasets are not supported by the benchmark (DALE refuses them).")
    ending = ds["file_ending"]
    train = case_ids(source / "labelsTr", ending)
    test = [c for c in case_ids(source / "labelsTs", ending) if any((source / "imagesTs").glob(f"{c}_*{ending}"))]
    if not train:
        raise SystemExit(f"nnunetv2-dale: {source}/labelsTr has no *{ending} labels.")
    if not test:  # hold out a fixed share of the training cases
        order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
        n_test = max(1, int(round(test_fraction * len(train))))
        test = sorted(train[i] for i in order[:n_test])
        train = sorted(set(train) - set(test))
        test_dir = "Tr"
    else:
        test_dir = "Ts"
    if target.exists():
        shutil.rmtree(target)
    for sub in ("imagesTr", "labelsTr", "labelsTr_clean", "imagesTs", "labelsTs", "noiseTr"):
        (target / sub).mkdir(parents=True)
    rw = reader_writer(ds, source / "labelsTr" / f"{train[0]}{ending}")
    for split, cases, src_dir in (("Tr", train, "Tr"), ("Ts", test, test_dir)):
        for case in cases:
            for image in sorted((source / f"images{src_dir}").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
                os.symlink(image.resolve(), target / f"images{split}" / image.name)
    rng = np.random.default_rng(seed)
    changed_fractions, corrupted = [], 0
    for case in train:
        shutil.copyfile(source / "labelsTr" / f"{case}{ending}", target / "labelsTr_clean" / f"{case}{ending}")
        seg, props = rw.read_seg(str(source / "labelsTr" / f"{case}{ending}"))
        labels = seg.astype(np.int64)
        if labels.max() > 1 and spec.model != "none":
            raise SystemExit("nnunetv2-dale: the noise models handle binary labels (0/1) only; this dataset has "
                             f"label {labels.max()} in {case}. Benchmark it with --noise clean, or binarise it.")
        noisy, changed = _corrupt(labels, spec, rng)
        corrupted += bool(changed.any())
        if spec.model != "none":
            changed_fractions.append(changed_fraction(labels > 0, noisy > 0))
        rw.write_seg(noisy[0].astype(np.uint8), str(target / "labelsTr" / f"{case}{ending}"), props)
        rw.write_seg(changed[0].astype(np.uint8), str(target / "noiseTr" / f"{case}{ending}"), props)
    for case in test:
        shutil.copyfile(source / f"labels{test_dir}" / f"{case}{ending}", target / "labelsTs" / f"{case}{ending}")
    ds.update(numTraining=len(train), name=target.name.split("_", 1)[1],
              description=f"{ds.get('description', '')} | nnunetv2-dale benchmark copy, noise {asdict(spec)}, seed {seed}")
    (target / "dataset.json").write_text(json.dumps(ds, indent=2))
    return {"spec": asdict(spec), "seed": seed, "training_cases": len(train), "test_cases": len(test),
            "test_split": "imagesTs/labelsTs" if test_dir == "Ts" else f"held out {len(test)} of labelsTr",
            "corrupted_cases": corrupted,
            "mean_changed_fraction": float(np.mean(changed_fractions)) if changed_fractions else 0.0}


def _corrupt(seg: np.ndarray, spec: NoiseSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from nnunetv2_dale.data.noise import corrupt_label

    if spec.model == "none":
        return seg.copy(), np.zeros(seg.shape, dtype=bool)
    squeezed = seg[0] if seg.shape[0] == 1 else seg
    if squeezed.ndim == 3 and squeezed.shape[0] == 1:  # 2D image read as (1, 1, H, W)
        noisy, changed = corrupt_label(squeezed[0], spec, rng)
        return noisy[None, None], changed[None, None]
    noisy, changed = corrupt_label(squeezed, spec, rng)
    return noisy[None], changed[None]


def write_cpu_plans(preprocessed: Path, configuration: str, batch_size: int, feature_scale: float) -> str:
    """``nnUNetPlans_cpu.json``: nnU-Net's plan for ``configuration`` with another batch size and
    scaled feature widths, reading the same preprocessed data."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"][configuration]
    cfg["batch_size"] = batch_size
    kwargs = cfg["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(8, int(f * feature_scale)) for f in kwargs["features_per_stage"]]
    plans["plans_name"] = "nnUNetPlans_cpu"
    (preprocessed / "nnUNetPlans_cpu.json").write_text(json.dumps(plans, indent=2))
    return "nnUNetPlans_cpu"


# ------------------------------------------------------------------- running
def train_with_progress(cmd: list[str], env: dict, log: Path, label: str, epochs: int) -> float:
    """Run one training, printing its epoch and pseudo Dice every ~30 s."""
    t0 = time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        shown = -1
        while True:
            try:
                proc.wait(timeout=5)  # returns as soon as the training ends (a test waits for many)
                break
            except subprocess.TimeoutExpired:
                pass
            text = log.read_text(errors="replace")
            ep = re.findall(r"Epoch (\d+)\n", text)
            dice = re.findall(r"Pseudo dice \[(?:np\.float32\()?([0-9.]+)", text)
            if ep and int(ep[-1]) != shown and (time.time() - t0 > 30 or shown < 0):
                shown = int(ep[-1])
                print(f"  {label}: epoch {shown + 1}/{epochs}, {(time.time() - t0) / 60:.1f} min"
                      + (f", pseudo Dice {dice[-1]}" if dice else ""), flush=True)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"training failed ({label}), see {log}:\n{tail}")
    return time.time() - t0


def score(raw: Path, pred: Path, dataset_json: dict, band_voxels: float) -> dict:
    """Per-case metrics of ``pred`` against the clean ``raw/labelsTs``."""
    from nnunetv2_dale.bench.metrics import case_metrics
    from nnunetv2_dale.data.io import physical_spacing

    ending = dataset_json["file_ending"]
    cases = case_ids(raw / "labelsTs", ending)
    rw = reader_writer(dataset_json, raw / "labelsTs" / f"{cases[0]}{ending}")
    labels = sorted(v for v in dataset_json["labels"].values() if isinstance(v, int) and v > 0)
    per_case = {}
    for case in cases:
        ref, props = rw.read_seg(str(raw / "labelsTs" / f"{case}{ending}"))
        out, _ = rw.read_seg(str(pred / f"{case}{ending}"))
        per_case[case] = case_metrics(out[0], ref[0], tuple(props["spacing"]), labels,
                                      band_voxels * min(physical_spacing(props["spacing"])))
    return per_case


def aggregate(per_case: dict) -> dict:
    """Mean over cases and classes of each metric (NaN-aware), and the count of NaN HD95."""
    values: dict[str, list[float]] = {}
    for classes in per_case.values():
        for metrics in classes.values():
            for k, v in metrics.items():
                values.setdefault(k, []).append(v)
    out = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in values.items()}
    out["hd95_undefined_cases"] = int(sum(not np.isfinite(v) for v in values.get("hd95", [])))
    return out


def noise_auroc(fold_dir: Path, preprocessed_root: Path, raw: Path, dataset_json: dict) -> dict:
    """AUROC of 1 - omega (raw geometry, known voxels of the fold's training cases) vs noiseTr."""
    from nnunetv2_dale.audit.export import FoldConfidence
    from nnunetv2_dale.method.rsets import auroc

    fc = FoldConfidence(fold_dir, preprocessed_root)
    ending = dataset_json["file_ending"]
    rw = reader_writer(dataset_json, raw / "noiseTr" / f"{fc.keys[0]}{ending}")
    scores, positives, total = [], [], 0
    for key in fc.keys:
        omega, _, props = fc.preprocessed(key)
        raw_omega = fc.to_raw(omega, props)
        noise, _ = rw.read_seg(str(raw / "noiseTr" / f"{key}{ending}"))
        noise = noise[0] > 0
        if noise.shape != raw_omega.shape:
            raise RuntimeError(f"{key}: confidence map {raw_omega.shape} vs raw label {noise.shape}: geometry mismatch")
        known = np.isfinite(raw_omega)
        total += known.size
        scores.append(1 - raw_omega[known])
        positives.append(noise[known])
    s, p = np.concatenate(scores), np.concatenate(positives)
    return {"auroc": auroc(s, p), "known_fraction": float(len(s) / max(total, 1)),
            "noisy_voxel_fraction": float(p.mean()) if len(p) else float("nan"), "buffers": fc.source}


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("nnunetv2", "nnunetv2-dale", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def parse_phantom_source(source: str) -> tuple[int, int, int]:
    """``phantoms[:DIM[:SIZE[:NUM_TRAIN]]]`` -> (dim, size, num_train); defaults 2, 64, 60."""
    parts = source.split(":")[1:]
    try:
        dim, size, num = (int(v) for v in (parts + ["2", "64", "60"][len(parts):])[:3])
    except ValueError:
        raise SystemExit(f"nnunetv2-dale: cannot read {source!r}; write phantoms:DIM:SIZE:NUM_TRAIN, "
                         "e.g. phantoms:2:64:60") from None
    if dim not in (2, 3):
        raise SystemExit(f"nnunetv2-dale: phantoms must be 2D or 3D, got {dim} in {source!r}")
    return dim, size, num


def resolve_source(source: str, workdir: Path, subset: int | None = None, resize: int | None = None) -> tuple[Path, str]:
    """A raw dataset folder, or ``phantoms:DIM:SIZE:NUM_TRAIN`` (generated, clean labels); with
    ``subset``/``resize``, its deterministic smaller derivative (``subset.py``)."""
    if subset is not None or resize is not None:
        from nnunetv2_dale.bench.subset import derive_subset

        folder, short = resolve_source(source, workdir)
        short = f"{short}n{subset or 'all'}s{resize or 'orig'}"
        return derive_subset(folder, workdir / "sources" / f"Dataset000_{short}", subset, resize), short
    if source.startswith("phantoms"):
        from nnunetv2_dale.data.phantoms import make_phantom_dataset

        dim, size, num = parse_phantom_source(source)
        folder = workdir / "sources" / f"Dataset000_Phantom{dim}D"
        if not (folder / "dataset.json").is_file():
            make_phantom_dataset(folder, int(dim), int(size), int(num), max(4, int(num) // 3), NoiseSpec("none", alpha=0),
                                 seed=0)
            for extra in ("labelsTr_clean", "noiseTr"):  # labelsTr are clean already (noise none)
                shutil.rmtree(folder / extra, ignore_errors=True)
        return folder, f"Phantom{dim}D"
    folder = Path(source).resolve()
    if not (folder / "dataset.json").is_file():
        raise SystemExit(f"nnunetv2-dale: {folder} is not a raw nnU-Net dataset (no dataset.json). Pass the folder "
                         "that holds dataset.json, imagesTr and labelsTr.")
    return folder, folder.name.split("_", 1)[-1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nnUNetv2_dale_bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="fill every unset option from a preset")
    p.add_argument("-s", "--source", help="raw dataset folder with clean labels, or phantoms:DIM:SIZE:NUM_TRAIN")
    p.add_argument("-o", "--output", default="nnunetv2_dale_bench", help="benchmark folder")
    p.add_argument("--noise", nargs="+", help="noise levels, e.g. clean alphabeta:alpha=0.7,beta=0.5 "
                   "markov:alpha=1,steps=200,theta1=0.8 missed_spurious:alpha=0.5,p_drop=0.3")
    p.add_argument("-tr", "--trainers", nargs="+")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iters", type=int, help="training iterations per epoch")
    p.add_argument("--val-iters", type=int, help="validation iterations per epoch (default iters/5)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--feature-scale", type=float, help="multiplier of nnU-Net's feature widths")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--subset", type=int, help="keep a fixed random subset of this many training cases")
    p.add_argument("--resize", type=int, help="resize 2D PNG images and labels to SIZE x SIZE")
    p.add_argument("-c", "--configuration", default=None, help="2d or 3d_fullres (default: 2d for 2D data, "
                   "else 3d_fullres)")
    p.add_argument("--dataset-id", type=int, default=800, help="first nnU-Net id used for the noisy copies")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held out when the source has no labelsTs")
    p.add_argument("--band", type=float, default=3.0, help="boundary band half-width in voxels")
    p.add_argument("--cost", action="store_true", help="also measure s/iteration (interleaved) and peak RSS")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md and figures from results.json")
    args = p.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    defaults = dict(noise=["clean", "alphabeta:alpha=0.7,beta=0.5"], trainers=["nnUNetTrainer", "nnUNetTrainerDALE"],
                    epochs=20, iters=50, batch_size=8, feature_scale=0.5, seeds=[0])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.output).resolve()
    from nnunetv2_dale.bench.report import write_report

    if args.report_only:
        write_report(out)
        return
    if not args.source:
        raise SystemExit("nnunetv2-dale: give -s/--source (a raw dataset folder) or --preset.")
    run(args, out)
    write_report(out)


def run(args: argparse.Namespace, out: Path) -> None:
    specs = [(text, parse_noise(text)) for text in args.noise]
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    source, short = resolve_source(args.source, out, args.subset, args.resize)
    env = {**os.environ, **{n: str(out / n) for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    env.setdefault("nnUNet_n_proc_DA", "2")
    env.setdefault("nnUNet_def_n_proc", "2")
    env.update(nnUNet_DALE_epochs=str(args.epochs), nnUNet_DALE_iters=str(args.iters),
               nnUNet_DALE_val_iters=str(args.val_iters or max(1, args.iters // 5)))
    results_file = out / "results.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("report_only",)}
    results = {"settings": {**settings, "source": str(source)}, "versions": versions(), "runs": {}}
    save_results(results_file, results, [])  # one benchmark folder may be extended, also by commands running beside
    total = len(specs) * len(args.seeds) * len(args.trainers)
    done = 0
    t_start = time.time()
    for text, spec in specs:
        for seed in args.seeds:
            did, name = dataset_slot(out / "nnUNet_raw", f"{short}{noise_tag(text)}s{seed}", args.dataset_id)
            raw = out / "nnUNet_raw" / name
            pre = out / "nnUNet_preprocessed" / name
            noise_file = raw / "noise_info.json"
            if not noise_file.is_file() or not (pre / "nnUNetPlans_cpu.json").is_file():
                print(f"[{name}] injecting noise {text} (seed {seed}) into a copy of {source}", flush=True)
                info = noisy_copy(source, raw, spec, seed, args.test_fraction)
                noise_file.write_text(json.dumps(info, indent=1))
                configuration = args.configuration or ("2d" if _is_2d(raw) else "3d_fullres")
                print(f"[{name}] nnUNetv2_plan_and_preprocess -c {configuration}", flush=True)
                subprocess.run([tool("nnUNetv2_plan_and_preprocess"), "-d", str(did), "-c", configuration, "-np", "2"],
                               env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                write_cpu_plans(pre, configuration, args.batch_size, args.feature_scale)
            info = json.loads(noise_file.read_text())
            configuration = args.configuration or ("2d" if _is_2d(raw) else "3d_fullres")
            dataset_json = json.loads((raw / "dataset.json").read_text())
            if args.cost and "cost" not in results:
                from nnunetv2_dale.bench.cost import measure

                print(f"[{name}] cost benchmark (interleaved, same batches)", flush=True)
                results["cost"] = {"dataset": name, **measure(did, configuration, "nnUNetPlans_cpu", env)}
                save_results(results_file, results, [])
            for trainer in args.trainers:
                done += 1
                real = BASELINE_ALIAS.get(trainer, trainer)
                key = f"{name}/{trainer}"
                label = f"[{done}/{total}] {trainer} on {short} {text} seed {seed}"
                fold = out / "nnUNet_results" / name / f"{real}__nnUNetPlans_cpu__{configuration}" / "fold_0"
                log = out / "logs" / f"{name}__{real}.log"
                record = results["runs"].get(key, {})
                if not (fold / "checkpoint_final.pth").is_file():
                    print(f"{label}: training ({args.epochs} x {args.iters}), log {log}", flush=True)
                    shutil.rmtree(fold, ignore_errors=True)
                    record = {"train_seconds": train_with_progress(
                        [tool("nnUNetv2_train"), str(did), configuration, "0", "-tr", real, "-p", "nnUNetPlans_cpu",
                         "-device", "cpu"], env, log, label, args.epochs)}
                pred = out / "predictions" / name / real
                if "metrics" in record and pred.is_dir():
                    print(f"{label}: already scored (delete {pred} to score again)", flush=True)
                    continue
                shutil.rmtree(pred, ignore_errors=True)
                subprocess.run([tool("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(did),
                                "-c", configuration, "-f", "0", "-tr", real, "-p", "nnUNetPlans_cpu", "-device", "cpu",
                                "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                               env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                per_case = score(raw, pred, dataset_json, args.band)
                record.update(dataset=short, noise=text, noise_info=info, seed=seed, trainer=trainer,
                              budget={k: settings[k] for k in ("epochs", "iters", "batch_size", "feature_scale")},
                              trainer_class=real, configuration=configuration, metrics=aggregate(per_case),
                              per_case=per_case, log=str(log.relative_to(out)), predictions=str(pred.relative_to(out)))
                record.update(run_provenance(fold))
                if (fold / "dale_memory").is_dir() and spec.model != "none":
                    record["noise_detection"] = noise_auroc(fold, out / "nnUNet_preprocessed", raw, dataset_json)
                results["runs"][key] = record
                save_results(results_file, results, [key])
                m = record["metrics"]
                det = record.get("noise_detection", {}).get("auroc")
                print(f"{label}: Dice {m['dice']:.4f}, band Dice {m['band_dice']:.4f}, HD95 {m['hd95']:.2f}"
                      + (f", noise AUROC {det:.3f}" if det is not None else "")
                      + f" ({(time.time() - t_start) / 60:.1f} min so far)", flush=True)


def save_results(results_file: Path, results: dict, keys: list[str]) -> None:
    """Merge this command's ``results`` into ``results_file`` and back: the runs ``keys`` (and its
    settings, versions, cost and invocation) are this command's, every other run is kept as another
    command (e.g. one running beside it on the same folder) wrote it. Read and written under an
    exclusive lock, replaced atomically; ``results`` then holds the merged content."""
    import fcntl

    with open(results_file.with_name(".results.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = json.loads(results_file.read_text()) if results_file.is_file() else {}
        merged.setdefault("runs", {}).update({k: results["runs"][k] for k in keys})
        merged.update({k: v for k, v in results.items() if k not in ("runs", "invocations")})
        invocations = merged.setdefault("invocations", [])
        if results["settings"] not in invocations:
            invocations.append(results["settings"])
        tmp = results_file.with_name(results_file.name + ".tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        os.replace(tmp, results_file)
    results.clear()
    results.update(merged)


def dataset_slot(raw_root: Path, suffix: str, first_id: int) -> tuple[int, str]:
    """(id, DatasetXXX_suffix): the id this benchmark folder already uses for ``suffix``, else the
    first id >= ``first_id`` it does not use yet (later runs may add noise levels or trainers)."""
    used = {}
    for folder in raw_root.glob("Dataset[0-9][0-9][0-9]_*"):
        used[int(folder.name[7:10])] = folder.name[11:]
    for did, existing in used.items():
        if existing == suffix:
            return did, f"Dataset{did:03d}_{suffix}"
    did = first_id
    while did in used:
        did += 1
    return did, f"Dataset{did:03d}_{suffix}"


def _is_2d(raw: Path) -> bool:
    """2D data: nnU-Net's readers return labels shaped (1, 1, H, W)."""
    ds = json.loads((raw / "dataset.json").read_text())
    first = next((raw / "labelsTr").glob(f"*{ds['file_ending']}"))
    seg, _ = reader_writer(ds, first).read_seg(str(first))
    return seg.shape[1] == 1


if __name__ == "__main__":
    main()
