"""Hatch build hook: make the installed package register its trainers with nnU-Net.

nnU-Net finds trainers outside its own package only through the environment variable
``nnUNet_extTrainer`` (a os.pathsep-separated list of folders). The wheel therefore ships:

- the top-level ``trainers/`` folder as ``site-packages/nnunetv2_dale_trainers/`` (regular
  install) or nothing (editable install: the repository's ``trainers/`` is used in place);
- a ``nnunetv2_dale.pth`` file whose single ``import`` line runs at interpreter start-up and
  appends that folder to ``nnUNet_extTrainer`` (keeping whatever the user already set there).

The line only touches ``os.environ``; it imports nothing heavy, so every Python start stays fast.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# Appends the folder held in `_d` to nnUNet_extTrainer unless it is already listed.
_REGISTER = (
    "_v = os.environ.get('nnUNet_extTrainer', ''); "
    "os.environ['nnUNet_extTrainer'] = _v if (not _d or _d in _v.split(os.pathsep)) "
    "else (_v + os.pathsep + _d if _v else _d); del _v, _d"
)
# Regular install: the folder sits next to this .pth file, i.e. on sys.path.
_FIND_INSTALLED = (
    "_d = next((os.path.join(p, 'nnunetv2_dale_trainers') for p in sys.path "
    "if os.path.isdir(os.path.join(p, 'nnunetv2_dale_trainers'))), '')"
)


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        trainers = os.path.join(self.root, "trainers")
        if version == "editable":
            locate = f"_d = {trainers!r} if os.path.isdir({trainers!r}) else ''"
        else:
            locate = _FIND_INSTALLED
        line = f"import os, sys; {locate}; {_REGISTER}\n"
        fd, pth = tempfile.mkstemp(suffix=".pth")
        with os.fdopen(fd, "w") as f:
            f.write(line)
        if version == "editable":
            build_data["force_include_editable"][pth] = "nnunetv2_dale.pth"
        else:
            build_data["force_include"][pth] = "nnunetv2_dale.pth"
            build_data["force_include"][trainers] = "nnunetv2_dale_trainers"
