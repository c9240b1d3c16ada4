"""Would a better ensemble than DALE's early EMA memory flag the injected noise more precisely?
Offline, on a ddti-fast noisy dataset (2D, binary, identity preprocessing).

Two sources of per-voxel predictions p on the 80 training cases of fold 0 (sliding window with
mirroring, nnU-Net's predictor), compared with DALE's frozen memory q of a finished fold:
- in-sample: snapshots (``checkpoint_ep<N>.pth``) of stock nnU-Net trained on fold 0, i.e. the
  network at epoch N on cases it trains on (alone and averaged over a few epochs);
- cross-fitted: two networks, each trained on one half of fold 0's training cases (folds 5 and 6
  that this script adds to ``splits_final.json``: 5 trains on the even-ranked cases, 6 on the odd),
  each predicting the half it never saw: predictions on which a case's own (noisy) label had no
  influence (confident learning's out-of-fold estimate).
Per rule (p[y] < 0.5, p[y] < 0.3): recall of the injected-noise voxels, false-flag rate of the
untouched ones and precision, over all voxels of the training cases.

    # 1. snapshots (nnUNet_* pointing into BENCH, the benchmark's environment; this folder's
    #    trainers/ added to nnUNet_extTrainer; nnUNet_DALE_epochs/iters/val_iters as the preset):
    SNAP_EPOCHS=3,5,7,10,14,20,30 nnUNetv2_train ID 2d 0 -tr nnUNetTrainerBudgetSnap -p nnUNetPlans_cpu -device cpu
    python benchmarks/ddti_fast/ensemble_flags.py BENCH DATASET --splits   # adds folds 5 and 6
    nnUNet_DALE_epochs=20 SNAP_EPOCHS=3,5,7,10,14,20 nnUNetv2_train ID 2d 5 ... ; the same with fold 6
    # 2. the comparison:
    python benchmarks/ddti_fast/ensemble_flags.py BENCH DATASET [DALE_TRAINER]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from flag_analysis import fold_cases, raw_labels, use_bench  # the sibling script (run from this folder's path)

FOLDER = "nnUNetTrainerBudgetSnap__nnUNetPlans_cpu__2d"


def add_half_splits(splits_file: Path) -> None:
    """Folds 5 and 6: the halves of fold 0's training cases, each validated on the other half."""
    splits = json.loads(splits_file.read_text())
    if len(splits) == 5:
        train = sorted(splits[0]["train"])
        splits += [{"train": train[0::2], "val": train[1::2]}, {"train": train[1::2], "val": train[0::2]}]
        splits_file.write_text(json.dumps(splits, indent=1))


def predict(model: Path, fold: int, checkpoint: str, data: dict[str, torch.Tensor], keys: list[str]) -> dict:
    """Foreground probability per case of ``keys`` from one checkpoint of one fold."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(fold,), checkpoint_name=checkpoint)
    return {k: torch.softmax(predictor.predict_sliding_window_return_logits(data[k]).float(), 0)[1].numpy()[0]
            for k in keys}


def rates(flags: dict, labels: dict, cleans: dict) -> str:
    f, y, c = (np.concatenate([d[k].ravel() for k in labels]) for d in (flags, labels, cleans))
    noise = y != c
    return (f"recall {f[noise].mean():.3f}, false-flag rate {f[~noise].mean():.4f}, "
            f"precision {(f * noise).sum() / max(f.sum(), 1e-9):.2f}")


def show(name: str, fg: dict, labels: dict, cleans: dict) -> None:
    for cut in (0.5, 0.3):
        flags = {k: (np.where(labels[k], fg[k], 1 - fg[k]) < cut).astype(float) for k in labels}
        print(f"| {name} | p[y] < {cut} | {rates(flags, labels, cleans)} |")


def main() -> None:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    bench, dataset = Path(sys.argv[1]).resolve(), sys.argv[2]
    use_bench(bench)
    pre = bench / "nnUNet_preprocessed" / dataset
    if "--splits" in sys.argv:
        add_half_splits(pre / "splits_final.json")
        return
    torch.set_num_threads(2)
    splits = json.loads((pre / "splits_final.json").read_text())
    keys = sorted(splits[0]["train"])
    cases = infer_dataset_class(str(pre / "nnUNetPlans_2d"))(str(pre / "nnUNetPlans_2d"), keys)
    data = {k: torch.from_numpy(np.asarray(cases.load_case(k)[0])).float() for k in keys}
    ending = json.loads((bench / "nnUNet_raw" / dataset / "dataset.json").read_text())["file_ending"]
    both = {k: raw_labels(bench, dataset, k, ending, data[k].shape[-2:]) for k in keys}
    labels = {k: label > 0 for k, (label, _) in both.items()}
    cleans = {k: clean > 0 for k, (_, clean) in both.items()}
    model = bench / "nnUNet_results" / dataset / FOLDER
    print(f"{dataset}: {sum(v.size for v in labels.values())} voxels, injected noise "
          f"{np.mean(np.concatenate([(labels[k] != cleans[k]).ravel() for k in keys])):.3f}")
    print("| predictions | rule | result |\n|---|---|---|")
    for source, folds in (("in-sample", ((0, keys),)), ("cross-fitted", ((5, splits[5]["val"]), (6, splits[6]["val"])))):
        if not all((model / f"fold_{fold}").is_dir() for fold, _ in folds):
            continue
        epochs = sorted(int(p.stem.removeprefix("checkpoint_ep")) for p in (model / f"fold_{folds[0][0]}").glob("checkpoint_ep*.pth"))
        fg = {e: {k: v for fold, part in folds for k, v in predict(model, fold, f"checkpoint_ep{e}.pth", data, part).items()}
              for e in epochs}
        for e in epochs:
            show(f"{source}, epoch {e}", fg[e], labels, cleans)
        for window in (epochs[:3], epochs[1:4], epochs[2:5], epochs):
            show(f"{source}, mean of epochs {window}", {k: np.mean([fg[e][k] for e in window], 0) for k in keys},
                 labels, cleans)
    if len(sys.argv) > 3:
        q, omega = {}, {}
        for _, key, om, _, label, _, qk, _ in fold_cases(bench, dataset, sys.argv[3]):
            q[key] = qk.reshape(label.shape) if qk.shape[-1] == 1 else qk[..., 1].reshape(label.shape)
            omega[key] = np.nan_to_num(om, nan=1.0)
        show(f"DALE's frozen memory q ({sys.argv[3]})", q, labels, cleans)
        print(f"| DALE's frozen memory | 1 - omega | {rates({k: 1 - omega[k] for k in keys}, labels, cleans)} |")


if __name__ == "__main__":
    main()
