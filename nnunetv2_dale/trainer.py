"""Compatibility: ``nnUNetTrainerDALE`` lives in :mod:`nnunetv2_dale.method.trainer`; this path
(used by 0.1.0 user code that subclasses it) keeps working."""
from nnunetv2_dale.method.trainer import nnUNetTrainerDALE  # noqa: F401
