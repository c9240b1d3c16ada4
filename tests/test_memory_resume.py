"""Killed and resumed through nnU-Net's CLI: ``--c`` continues with the buffers of the checkpoint
(not those of the crash), checkpoints stay stock, and buffers that do not match are refused."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import inprocess_trainer, run, tool, train_until_killed

pytestmark = pytest.mark.slow
# the memory must change in every epoch for the crash state to differ from the checkpoint's: the
# default horizon would freeze it after epoch 0 of 3, so this test runs the never-frozen variant
TRAINER = "nnUNetTrainerDALE_noHorizon"
STOCK_CHECKPOINT_KEYS = {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema",
                         "current_epoch", "init_args", "trainer_name", "inference_allowed_mirroring_axes"}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix in (".f16", ".u8")}


def test_kill_resume_restores_checkpoint_buffers(tiny2d, monkeypatch):
    tree, did, _ = tiny2d
    budget = {"nnUNet_DALE_epochs": "3", "nnUNet_DALE_iters": "10", "nnUNet_DALE_val_iters": "1",
              "nnUNet_DALE_save_every": "1"}
    env = tree.env(**budget)
    train = [tool("nnUNetv2_train"), str(did), "2d", "0", "-tr", TRAINER, "-device", "cpu"]

    # kill at the end of epoch 2's training iterations: checkpoint_latest (epoch stamp 2) is from
    # the end of epoch 1, the live buffers already hold epoch 2's updates
    out = train_until_killed(train, env, marker="DALE memory: ", occurrence=3)
    assert "DALE memory (new)" in out
    fold = next(tree.results.glob(f"*/{TRAINER}__nnUNetPlans__2d/fold_0"))
    memory = fold / "dale_memory"
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 2
    snapshot = digest(memory / "snapshot_epoch_0002")
    assert snapshot and digest(memory / "live") != snapshot, "the crash state must differ from the checkpoint"

    # in-process: what --c does up to the first epoch
    trainer = inprocess_trainer(tree, did, "2d", monkeypatch, TRAINER, **budget)
    trainer.load_checkpoint(str(fold / "checkpoint_latest.pth"))
    settings = memory / "sampling.json"  # what the killed run left for the workers (here marked stale)
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "phase": "stale"}))
    trainer.on_train_start()
    assert digest(memory / "live") == snapshot
    # the workers, which start prefetching in nnU-Net's on_train_start, read the resumed epoch's settings
    assert json.loads(settings.read_text())["phase"] == trainer.phase() != "stale"
    assert trainer.memory.visited_voxels > 0

    # through the CLI: resume and finish
    out = run(train + ["--c"], env).stdout
    assert "DALE memory (restored from epoch 2)" in out and "Epoch 2" in out and "Epoch 1\n" not in out
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    assert set(final) == STOCK_CHECKPOINT_KEYS, "checkpoints carry no buffers (inference loads them)"
    visited = final["logging"]["dale_visited_fraction"]
    confidence = final["logging"]["dale_mean_confidence"]
    assert len(visited) == len(confidence) == 3 and visited == sorted(visited) and visited[-1] > 0.5
    assert all(len(c) == 2 and all(0 <= v <= 1 for v in c) for c in confidence)
    assert (memory / "snapshot_epoch_0003" / "manifest.json").exists()
    assert not (fold / "checkpoint_latest.pth").exists()
    referenced = {p.name for p in memory.glob("snapshot_epoch_*")}
    assert "snapshot_epoch_0002" not in referenced or (fold / "checkpoint_best.pth").exists()
    assert list((fold / "dale_memory_pictures").glob("epoch_*.png"))

    # buffers that do not belong to the checkpoint are refused with a message, not a traceback
    shutil.rmtree(memory / "snapshot_epoch_0003")
    proc = run(train + ["--c"], env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "checkpoint_final.pth is from epoch 3" in proc.stderr and "no DALE buffers" in proc.stderr


def test_checkpoint_best_skips_buffers_once_latest_has_them(tiny2d):
    """nnU-Net writes checkpoint_best whenever its EMA pseudo Dice improves; once checkpoint_latest
    has a snapshot, --c never loads checkpoint_best, so checkpoint_best gets no copy of the buffers.
    Resuming from it alone is refused with a message that says why."""
    tree, did, _ = tiny2d
    env = tree.env(nnUNet_DALE_epochs="3", nnUNet_DALE_iters="4", nnUNet_DALE_val_iters="1", nnUNet_DALE_save_every="1")
    train = [tool("nnUNetv2_train"), str(did), "2d", "1", "-tr", TRAINER, "-device", "cpu"]
    out = run(train, env).stdout
    fold = next(tree.results.glob(f"*/{TRAINER}__nnUNetPlans__2d/fold_1"))
    assert (fold / "checkpoint_best.pth").exists() and (fold / "checkpoint_final.pth").exists()
    assert "checkpoint_best.pth is now written without a buffer snapshot" in out
    recorded = json.loads((fold / "dale_memory" / "checkpoint_epochs.json").read_text())
    assert recorded["checkpoint_best.pth"] == [] and recorded["checkpoint_final.pth"] == [3], recorded
    assert sorted(p.name for p in (fold / "dale_memory").glob("snapshot_epoch_*")) == ["snapshot_epoch_0003"]

    # --c now falls back to checkpoint_best; the snapshot of checkpoint_final's epoch goes with it
    # (checkpoint_best may be of that same epoch, and would then find buffers of its epoch)
    (fold / "checkpoint_final.pth").unlink()
    shutil.rmtree(fold / "dale_memory" / "snapshot_epoch_0003")
    proc = run(train + ["--c"], env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "checkpoint_best.pth is written without DALE buffers" in proc.stderr
