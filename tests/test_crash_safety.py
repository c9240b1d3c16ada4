"""SIGKILL at chosen moments of every checkpoint/buffer write, half-way through a memory update in
the background writer, and at a random moment; each time the fold on disk stays consistent (every
checkpoint loads and has a complete, checksummed snapshot of its epoch) and ``--c`` goes on; a
damaged buffer file is refused with a message, never used."""
from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from conftest import NNUNetTree, run, tool
from nnunetv2_dale.data.noise import NoiseSpec
from nnunetv2_dale.data.phantoms import make_phantom_dataset

pytestmark = pytest.mark.slow
KILLPOINT = Path(__file__).with_name("killpoint.py")
TRAINER = "nnUNetTrainerDALE_5epochs"
# (kind, n-th event, path pattern): what each run of the chain is killed at (see killpoint.py)
CHAIN = [
    ("copy", 1, r"snapshot_epoch_\d+\.tmp/"),  # half-way through copying a buffer into a snapshot
    ("save", 1, r"checkpoint_latest\.pth\.tmp$"),  # half-way through torch.save of the checkpoint
    ("replace", 1, r"\.pth\.tmp$"),  # checkpoint written, not yet renamed
    ("replace", 2, r"checkpoint_epochs\.json\.tmp$"),  # checkpoint renamed, its epoch not yet recorded
    ("replace", 1, r"live\.tmp$"),  # --c: restored buffers copied, not yet swapped in
    ("replace", 1, r"snapshot_epoch_\d+\.tmp$"),  # snapshot complete, not yet renamed into place
]


def killed_run(args: list[str], env: dict[str, str], kill: tuple[str, int, str] | None, delay: float | None = None,
               timeout: float = 300) -> str:
    """One training process (its own process group), SIGKILLed at a write event or after ``delay`` s."""
    env = {**env, "PYTHONUNBUFFERED": "1"}
    if kill is not None:
        env["DALE_TEST_KILL"] = f"{kill[0]}:{kill[1]}:{kill[2]}"
    cmd = [sys.executable, str(KILLPOINT), *args] if kill else [tool("nnUNetv2_train"), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if delay is not None:
        try:
            out, _ = proc.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=timeout)
    else:
        out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != -signal.SIGKILL and not (delay is not None and proc.returncode == 0):
        raise AssertionError(f"expected a SIGKILL ({kill or delay}), got {proc.returncode}:\n{out[-3000:]}")
    return out


def assert_consistent(fold: Path, note: str) -> dict[str, int]:
    """Every checkpoint file loads and has a complete snapshot of its epoch whose bytes match the
    manifest's checksums, and the epoch record lists every checkpoint's epoch; except a
    checkpoint_best recorded without buffers, allowed only beside a checkpoint_latest or
    checkpoint_final (which ``--c`` loads first). Returns name -> epoch."""
    memory = fold / "dale_memory"
    found = {}
    checkpoints = sorted(fold.glob("checkpoint_*.pth"))
    record_file = memory / "checkpoint_epochs.json"
    record = json.loads(record_file.read_text()) if checkpoints and record_file.is_file() else {}
    for checkpoint in checkpoints:
        epoch = torch.load(checkpoint, map_location="cpu", weights_only=False)["current_epoch"]
        found[checkpoint.name] = epoch
        if checkpoint.name == "checkpoint_best.pth" and record.get(checkpoint.name) == []:
            assert {"checkpoint_latest.pth", "checkpoint_final.pth"} & {c.name for c in checkpoints}, \
                (note, "checkpoint_best without buffers and no checkpoint that has them")
            continue
        snapshot = memory / f"snapshot_epoch_{epoch:04d}"
        assert (snapshot / "manifest.json").is_file(), (note, checkpoint.name, epoch, record, sorted(os.listdir(memory)))
        manifest = json.loads((snapshot / "manifest.json").read_text())
        assert manifest["epoch"] == epoch and len(manifest["crc32"]) == 2 * len(manifest["cases"]), note
        for name, crc in manifest["crc32"].items():
            assert zlib.crc32((snapshot / name).read_bytes()) == crc, (note, name)
        assert epoch in record.get(checkpoint.name, []), (note, checkpoint.name, epoch, record)
    return found


@pytest.fixture(scope="session")  # session: tests run longest first, not module by module
def crash_tree(tmp_path_factory):
    tree = NNUNetTree(tmp_path_factory.mktemp("crash"))
    make_phantom_dataset(tree.raw / "Dataset989_Crash", dim=2, size=32, num_train=6, num_test=1,
                         noise=NoiseSpec(markov_steps=40), seed=989)
    run([tool("nnUNetv2_plan_and_preprocess"), "-d", "989", "-c", "2d", "-np", "1"], tree.env())
    return tree


def test_kills_at_every_write_leave_a_resumable_fold(crash_tree):
    tree = crash_tree
    env = tree.env(nnUNet_DALE_iters="2", nnUNet_DALE_val_iters="1", nnUNet_DALE_save_every="1")
    args = ["989", "2d", "0", "-tr", TRAINER, "-device", "cpu"]
    fold = tree.results / "Dataset989_Crash" / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"

    history = []
    # first: a kill in the background writer half-way through an update of the first iteration (of
    # 2 samples, so before any checkpoint; later iterations may land after the first checkpoint)
    apply_seed = random.randrange(10**6)
    chain = [("apply", random.Random(apply_seed).randint(1, 2), r".")] + CHAIN
    for i, kill in enumerate(chain):
        out = killed_run(args + (["--c"] if i else []), env, kill)
        history.append(assert_consistent(fold, f"killed at {kill} (seed {apply_seed})"))
        if kill[2] == r"live\.tmp$":  # the kill hit the restore of a resumed run
            assert "DALE memory" not in out
    assert history[0] == {}, history  # killed in the first epoch: nothing to resume, --c starts afresh
    assert history[3] == {} and history[4] == {"checkpoint_latest.pth": 1}, history  # the first checkpoint survived
    assert history[-1].get("checkpoint_latest.pth") == 1, history  # later kills were before its replacement

    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(2.0, 25.0)
    killed_run(args + ["--c"], env, None, delay=delay)  # a random moment (or it finished first)
    assert_consistent(fold, f"random kill after {delay:.1f} s (seed {seed})")

    out = run([tool("nnUNetv2_train"), *args, "--c"], env, timeout=600).stdout
    assert "DALE memory (restored from epoch" in out or "Training done" in out
    final = assert_consistent(fold, "finished")
    assert final["checkpoint_final.pth"] == 5
    logged = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    assert len(logged["dale_visited_fraction"]) == len(logged["train_losses"]) == 5  # one entry per epoch, no gaps
    assert not [p for p in fold.rglob("*") if re.search(r"\.(tmp|stale|old)$", p.name)], "temporaries left behind"
    kept = {int(p.name[-4:]) for p in (fold / "dale_memory").glob("snapshot_epoch_*")}
    record = json.loads((fold / "dale_memory" / "checkpoint_epochs.json").read_text())
    assert kept == {e for listed in record.values() for e in listed} == {final["checkpoint_final.pth"]}, record

    # a damaged buffer file (disk, copy, hand edit) is refused with a message and never used
    victim = next((fold / "dale_memory" / "snapshot_epoch_0005").glob("*.q.f16"))
    data = bytearray(victim.read_bytes())
    data[0] ^= 0x01
    victim.write_bytes(bytes(data))
    live = {p.name: p.read_bytes() for p in (fold / "dale_memory" / "live").iterdir()}
    proc = run([tool("nnUNetv2_train"), *args, "--c"], env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{victim.name} is damaged" in proc.stderr and "without --c" in proc.stderr
    assert {p.name: p.read_bytes() for p in (fold / "dale_memory" / "live").iterdir()} == live
    data[0] ^= 0x01
    victim.write_bytes(bytes(data))

    # the training cases changed since the buffers were written (here: one case left the fold)
    splits_file = tree.preprocessed / "Dataset989_Crash" / "splits_final.json"
    splits = json.loads(splits_file.read_text())
    changed = [dict(s) for s in splits]
    changed[0]["train"] = changed[0]["train"][1:]
    splits_file.write_text(json.dumps(changed))
    try:
        proc = run([tool("nnUNetv2_train"), *args, "--c"], env, check=False)
    finally:
        splits_file.write_text(json.dumps(splits))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "the training cases or their shapes changed" in proc.stderr

    # buffers of another fold, moved in with their checkpoint
    other = fold.parent / "fold_1"
    other.mkdir()
    shutil.copy(fold / "checkpoint_final.pth", other)
    shutil.copytree(fold / "dale_memory", other / "dale_memory")
    proc = run([tool("nnUNetv2_train"), "989", "2d", "1", "-tr", TRAINER, "-device", "cpu", "--c"], env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "'fold': 0" in proc.stderr and "'fold': 1" in proc.stderr and "without --c" in proc.stderr


RANDOM_KILLS = 12  # with the 7 chosen moments and the random delay above: 20 kills across the chain


def test_random_kills_while_the_writer_is_busy_leave_a_resumable_fold(crash_tree):
    """SIGKILLs at seeded random memory updates, half-way through the background writer's apply,
    one run after another with ``--c``; the memory is never frozen (``_noHorizon``) so that every
    epoch updates it and checkpoints are written while updates are pending. Each kill leaves a
    consistent fold, each next run resumes from its checkpoint, and the last run finishes."""
    tree = crash_tree
    trainer = "nnUNetTrainerDALE_noHorizon"
    env = tree.env(nnUNet_DALE_iters="2", nnUNet_DALE_val_iters="1", nnUNet_DALE_save_every="1",
                   nnUNet_DALE_epochs="100")
    args = ["989", "2d", "0", "-tr", trainer, "-device", "cpu"]
    fold = tree.results / "Dataset989_Crash" / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    found: dict[str, int] = {}
    epochs_seen = []
    for i in range(RANDOM_KILLS):
        kill = ("apply", rng.randint(1, 8), r".")
        note = f"kill {i + 1}/{RANDOM_KILLS} at {kill} (seed {seed})"
        out = killed_run(args + (["--c"] if i else []), env, kill)
        if found.get("checkpoint_latest.pth") is not None:  # the previous kill left a checkpoint: resumed from it
            assert f"DALE memory (restored from epoch {found['checkpoint_latest.pth']})" in out, (note, out[-2000:])
        found = assert_consistent(fold, note)
        epochs_seen.append(found.get("checkpoint_latest.pth"))
    assert epochs_seen[-1] is not None and epochs_seen[-1] >= 1, (seed, epochs_seen)  # checkpoints were written

    last = found["checkpoint_latest.pth"] + 2
    out = run([tool("nnUNetv2_train"), *args, "--c"], {**env, "nnUNet_DALE_epochs": str(last)}, timeout=600).stdout
    assert f"DALE memory (restored from epoch {found['checkpoint_latest.pth']})" in out, (seed, out[-2000:])
    assert assert_consistent(fold, f"finished (seed {seed})")["checkpoint_final.pth"] == last


def test_full_disk_during_checkpoint_is_refused_clearly_and_resumable(crash_tree):
    """The file-size limit of the running trainer is lowered under its checkpoint size after its
    first checkpoint (prlimit: the kernel then fails the write as on a full disk)."""
    tree = crash_tree
    trainer = "nnUNetTrainerDALE_3epochs"
    env = tree.env(nnUNet_DALE_iters="2", nnUNet_DALE_val_iters="1", nnUNet_DALE_save_every="1",
                   PYTHONUNBUFFERED="1")
    args = [tool("nnUNetv2_train"), "989", "2d", "0", "-tr", trainer, "-device", "cpu"]
    fold = tree.results / "Dataset989_Crash" / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "Epoch 1" in line:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (100_000, 100_000))
    proc.wait(timeout=300)
    out = "".join(lines)
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert "could not write checkpoint_latest.pth" in out and "consistent" in out and "--c" in out
    assert assert_consistent(fold, "after the failed write")["checkpoint_latest.pth"] == 1
    assert not list(fold.glob("*.tmp"))
    out = run(args + ["--c"], env).stdout
    assert "DALE memory (restored from epoch 1)" in out
    assert assert_consistent(fold, "resumed")["checkpoint_final.pth"] == 3
