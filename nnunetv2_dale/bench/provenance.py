"""Which code produced a benchmark run: the trainer's DALE hyperparameters as it trained (from the
``debug.json`` nnU-Net writes in the fold folder), their hash, the package version, and the noise
estimate the trainer wrote; and the hash of today's defaults, so a report can mark which rows are
today's ``nnUNetTrainerDALE``."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nnunetv2_dale import __version__

# attributes that change how a run is executed, not what it computes
NOT_RESULTS = {"dale_picture_every", "dale_background_writes", "dale_worker_reads", "dale_estimate_every",
               "dale_overrides"}


def dale_hyperparameters(attributes: dict) -> dict:
    """The ``dale_*`` attributes that change what a run computes."""
    return {k: v for k, v in attributes.items() if k.startswith("dale_") and k not in NOT_RESULTS}


# knobs added after runs were recorded, at the value (as str) that computes what the code did before
# them: left out of the hash, so that adding a knob does not unmark the records of today's defaults
NEUTRAL = {"dale_agreement_power": "1.0"}


def hyperparameter_hash(hp: dict) -> str:
    kept = {k: v for k, v in hp.items() if NEUTRAL.get(k) != str(v)}
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def hyperparameters_of(trainer_class: type) -> dict:
    """A DALE trainer class's hyperparameters now (set on a bare instance, no nnU-Net set-up), as
    nnU-Net writes them to debug.json: every value as str()."""
    bare = trainer_class.__new__(trainer_class)
    bare.set_dale_hyperparameters()
    return {k: str(v) for k, v in dale_hyperparameters(vars(bare)).items()}


def defaults() -> dict:
    """``nnUNetTrainerDALE``'s hyperparameters now."""
    from nnunetv2_dale.method.trainer import nnUNetTrainerDALE

    return hyperparameters_of(nnUNetTrainerDALE)


def run_provenance(fold: Path) -> dict:
    """What to store with a run record (DALE trainers only carry hyperparameters and an estimate)."""
    out: dict = {"package_version": __version__}
    debug = fold / "debug.json"
    if debug.is_file():
        hp = dale_hyperparameters(json.loads(debug.read_text()))
        if hp:
            out.update(hyperparameters=hp, hyperparameter_hash=hyperparameter_hash(hp))
    estimate = fold / "dale_noise_estimate.json"
    if estimate.is_file():
        out["noise_estimate"] = json.loads(estimate.read_text())["dataset"]
    return out
