"""How nnU-Net finds our trainers: the ``nnUNet_extTrainer`` folder list.

The installed ``nnunetv2_dale.pth`` (see ``hatch_build.py``) appends our trainer folder to
``nnUNet_extTrainer`` at every interpreter start. This module answers, at run time, which folder
that is and whether the current process can see it, so that our commands can say what is wrong.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "nnUNet_extTrainer"
INSTALLED_FOLDER_NAME = "nnunetv2_dale_trainers"
MARKER_MODULE = "nnUNetTrainerDALE.py"


def candidate_trainer_folders() -> list[Path]:
    """Folders that hold our thin trainer modules: the installed copy and the source checkout."""
    found = [Path(p) / INSTALLED_FOLDER_NAME for p in sys.path if p]
    found.append(Path(__file__).resolve().parent.parent / "trainers")
    return [f for f in found if (f / MARKER_MODULE).is_file()]


def registered_folders() -> list[Path]:
    """Folders in ``nnUNet_extTrainer`` that contain our trainers."""
    value = os.environ.get(ENV_VAR, "")
    return [Path(p) for p in value.split(os.pathsep) if p.strip() and (Path(p) / MARKER_MODULE).is_file()]


def ensure_registered() -> Path:
    """Make sure this process (and its children) can find our trainers; return the folder used.

    Normally a no-op, because the ``.pth`` hook already did it. Raises ``LookupError`` when the
    package is neither installed nor run from a checkout.
    """
    present = registered_folders()
    if present:
        return present[0]
    candidates = candidate_trainer_folders()
    if not candidates:
        raise LookupError(
            "Cannot find the nnunetv2-dale trainer folder. Reinstall the package with "
            "`pip install -c constraints.txt .` from the project checkout."
        )
    folder = candidates[0]
    current = os.environ.get(ENV_VAR, "")
    os.environ[ENV_VAR] = f"{current}{os.pathsep}{folder}" if current else str(folder)
    return folder
