"""Run ``nnUNetv2_train`` (nnU-Net's own entry point) and SIGKILL the whole process group at one
chosen moment of a file write, to test crash safety where a timed kill from outside rarely lands.

``DALE_TEST_KILL=<kind>:<n>:<regex>`` kills at the n-th event whose path matches ``regex``:
- ``replace``: just before ``os.replace(src, ...)``, matched on ``src``;
- ``copy``: half-way through a buffer copy (``memory.copy_with_crc``), matched on its target;
- ``save``: half-way through ``torch.save`` (half the bytes written), matched on the file name;
- ``apply``: half-way through a memory update in the background writer thread (half the patch's
  source voxels folded in), matched on the case key.

Usage: ``python killpoint.py DATASET CONFIG FOLD -tr TRAINER ...`` (nnUNetv2_train's arguments).
"""
from __future__ import annotations

import io
import os
import re
import signal
import sys

import torch

import nnunetv2_dale.method.memory as memory

kind, count, pattern = os.environ["DALE_TEST_KILL"].split(":", 2)
remaining = int(count)


def _hit(path: object) -> bool:
    global remaining
    if re.search(pattern, str(path)):
        remaining -= 1
    return remaining == 0


def _kill() -> None:
    sys.stdout.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _half_write(target: object, content: bytes) -> None:
    with open(target, "wb") as f:
        f.write(content[: len(content) // 2])
        f.flush()
        os.fsync(f.fileno())
    _kill()


if kind == "replace":
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if _hit(src):
            _kill()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
elif kind == "copy":
    real_copy = memory.copy_with_crc

    def copy_with_crc(source, target, *args, **kwargs):
        if _hit(target):
            with open(source, "rb") as f:
                _half_write(target, f.read())
        return real_copy(source, target, *args, **kwargs)

    memory.copy_with_crc = copy_with_crc
elif kind == "save":
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if _hit(f):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            _half_write(f, buffer.getvalue())
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
elif kind == "apply":
    real_apply = memory.ConfidenceMemory.apply

    def apply(self, key, patch):
        if _hit(key):
            real_apply(self, key, patch.select(torch.arange(patch.index.numel()) < patch.index.numel() // 2))
            _kill()
        return real_apply(self, key, patch)

    memory.ConfidenceMemory.apply = apply
else:
    raise SystemExit(f"unknown kill kind {kind!r}")

if __name__ == "__main__":
    from nnunetv2.run.run_training import run_training_entry

    sys.argv = ["nnUNetv2_train", *sys.argv[1:]]
    run_training_entry()
