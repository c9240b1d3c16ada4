"""The confidence memory: scatter-mean + EMA semantics, saturation, non-finite outputs, snapshots
stamped by epoch, refusal of foreign buffers, disk and RAM footprint, and DDP on gloo."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunetv2_dale.method.memory import ConfidenceMemory, MemoryMismatchError, scatter_patch
from nnunetv2_dale.method.rsets import agreement_with_label

IDENTITY = {"dataset": "Dataset900_X", "plans": "nnUNetPlans", "configuration": "2d", "fold": 0}
SHAPES = {"case_a": (1, 4, 5), "case_b": (2, 3, 3)}


def make_memory(folder, num_classes=2, shapes=SHAPES, identity=IDENTITY) -> ConfidenceMemory:
    mem = ConfidenceMemory(folder, shapes, num_classes, identity, ema_min_weight=0.2)
    return mem


def probs_fg(values) -> torch.Tensor:
    v = torch.tensor(values, dtype=torch.float32)
    return torch.stack([1 - v, v], 1)


def test_scatter_mean_then_ema(tmp_path):
    mem = make_memory(tmp_path)
    mem.reset()
    # two patch voxels map to source voxel 3 (0.2 and 0.6), one to voxel 7 (0.9)
    mem.update("case_a", torch.tensor([3, 3, 7]), probs_fg([0.2, 0.6, 0.9]), torch.tensor([1, 1, 0]))
    q, n = mem.read("case_a", torch.tensor([3, 7, 0]))
    np.testing.assert_allclose(q[:, 0].numpy(), [0.4, 0.9, 0.0], atol=1e-3)
    np.testing.assert_array_equal(n.numpy(), [1, 1, 0])
    mem.update("case_a", torch.tensor([3]), probs_fg([1.0]), torch.tensor([1]))
    q, n = mem.read("case_a", torch.tensor([3]))
    assert q[0, 0] == pytest.approx(0.5 * 0.4 + 0.5 * 1.0, abs=1e-3) and n[0] == 2  # weight 1/(n+1) = 0.5
    for _ in range(10):
        mem.update("case_a", torch.tensor([3]), probs_fg([0.0]), torch.tensor([1]))
    q, n = mem.read("case_a", torch.tensor([3]))
    # weights 1/3, 1/4, then the floor 0.2 for the remaining 8 visits: q follows the recent softmax
    assert q[0, 0] == pytest.approx(0.7 * (2 / 3) * (3 / 4) * 0.8 ** 8, abs=2e-3) and n[0] == 12
    visited, confidence, skipped, _ = mem.finish_epoch()
    assert visited == pytest.approx(2 / (20 + 18)) and skipped == 0
    assert confidence[0] == pytest.approx(1 - 0.9, abs=1e-3)  # voxel 7, label 0: q(bg) = 0.1


def test_visit_count_saturates_and_nonfinite_is_skipped(tmp_path):
    mem = make_memory(tmp_path)
    mem.reset()
    for _ in range(300):
        mem.update("case_b", torch.tensor([0]), probs_fg([0.5]), torch.tensor([0]))
    _, n = mem.read("case_b", torch.tensor([0]))
    assert n[0] == 255
    before = mem.case_arrays("case_b")
    mem.update("case_b", torch.tensor([1, 2]), probs_fg([float("nan"), 0.3]), torch.tensor([0, 0]))
    after = mem.case_arrays("case_b")
    np.testing.assert_array_equal(before[0], after[0])
    assert mem.finish_epoch()[2] == 1


def test_excluded_source_voxels_are_never_updated(tmp_path):
    """Ignore-label source voxels (packed bitmask) stay unvisited whatever the patch label says."""
    shapes = {"big": (3, 7, 11), "plain": (1, 4, 5)}
    mem = make_memory(tmp_path, shapes=shapes)
    mem.reset()
    mask = np.random.default_rng(1).random(shapes["big"]) < 0.3
    mem.exclude("big", mask)
    mem.exclude("plain", np.zeros(shapes["plain"], bool))  # nothing ignored: no file, no lookup
    assert (tmp_path / "excluded" / "big.bits").stat().st_size == -(-mask.size // 8)
    assert not (tmp_path / "excluded" / "plain.bits").exists()
    everything = torch.arange(mask.size)
    np.testing.assert_array_equal(mem.is_excluded("big", everything).numpy(), mask.reshape(-1))
    mem.update("big", everything, probs_fg(np.full(mask.size, 0.7)), torch.ones(mask.size, dtype=torch.long))
    mem.update("plain", torch.arange(20), probs_fg(np.full(20, 0.7)), torch.ones(20, dtype=torch.long))
    _, n = mem.case_arrays("big")
    assert (n[mask] == 0).all() and (n[~mask] == 1).all()
    assert (mem.case_arrays("plain")[1] == 1).all()
    assert mem.finish_epoch()[1][1] == pytest.approx(0.7, abs=1e-3)
    assert mem.visited_voxels == mem.total_voxels == int((~mask).sum()) + 20  # all countable voxels visited


def test_multiclass_channels_and_agreement(tmp_path):
    mem = make_memory(tmp_path, num_classes=3)
    mem.reset()
    p = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])
    mem.update("case_a", torch.tensor([0, 1]), p, torch.tensor([1, 2]))
    q, _ = mem.read("case_a", torch.tensor([0, 1]))
    assert q.shape == (2, 3)
    np.testing.assert_allclose(agreement_with_label(q, torch.tensor([1, 2]), 3).numpy(), [0.7, 0.1], atol=1e-3)


def test_disk_footprint_and_no_resident_mappings(tmp_path):
    for k in (2, 4):
        mem = make_memory(tmp_path / f"k{k}", num_classes=k)
        mem.reset()
        voxels = sum(int(np.prod(s)) for s in SHAPES.values())
        size = sum(f.stat().st_size for f in mem.live.iterdir() if f.suffix in (".f16", ".u8"))
        channels = 1 if k == 2 else k
        assert size == (2 * channels + 1) * voxels
        mem.update("case_a", torch.tensor([1]), torch.full((1, k), 1 / k), torch.tensor([0]))
        with open("/proc/self/maps") as f:
            assert str(mem.live) not in f.read(), "buffers must not stay mapped between updates"


def test_snapshot_restore_and_refusals(tmp_path):
    mem = make_memory(tmp_path)
    mem.reset()
    mem.update("case_a", torch.tensor([0, 1]), probs_fg([0.9, 0.8]), torch.tensor([1, 1]))
    mem.finish_epoch()
    mem.snapshot(3)
    at_checkpoint = mem.case_arrays("case_a")
    mem.update("case_a", torch.tensor([0, 5]), probs_fg([0.1, 0.1]), torch.tensor([1, 1]))  # after the checkpoint
    assert not np.array_equal(mem.case_arrays("case_a")[1], at_checkpoint[1])

    fresh = make_memory(tmp_path)
    fresh.restore(3, "checkpoint_latest.pth")
    for got, want in zip(fresh.case_arrays("case_a"), at_checkpoint):
        np.testing.assert_array_equal(got, want)
    assert fresh.visited_voxels == 2

    with pytest.raises(MemoryMismatchError, match="epoch 4"):
        fresh.restore(4, "checkpoint_latest.pth")
    with pytest.raises(MemoryMismatchError, match="belong to"):
        make_memory(tmp_path, identity={**IDENTITY, "fold": 1}).restore(3, "checkpoint_latest.pth")
    with pytest.raises(MemoryMismatchError, match="training cases"):
        make_memory(tmp_path, shapes={"case_a": (1, 4, 5)}).restore(3, "checkpoint_latest.pth")
    manifest = mem.snapshot_dir(3) / "manifest.json"
    content = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**content, "epoch": 2}))
    with pytest.raises(MemoryMismatchError, match="epoch stamp 2"):
        fresh.restore(3, "checkpoint_latest.pth")
    manifest.write_text(json.dumps(content))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_snapshot_is_refused_and_live_buffers_kept(tmp_path, damage):
    mem = make_memory(tmp_path)
    mem.reset()
    mem.update("case_b", torch.tensor([0, 4]), probs_fg([0.9, 0.2]), torch.tensor([1, 0]))
    mem.snapshot(2)
    victim = mem.snapshot_dir(2) / "case_b.q.f16"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[1] ^= 0x40
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-2]))
    else:
        victim.unlink()
    live_before = mem.case_arrays("case_b")
    with pytest.raises(MemoryMismatchError, match="case_b.q.f16 is damaged"):
        make_memory(tmp_path).restore(2, "checkpoint_latest.pth")
    for got, want in zip(mem.case_arrays("case_b"), live_before):  # nothing was swapped in
        np.testing.assert_array_equal(got, want)
    assert not (tmp_path / "live.tmp").exists()


def test_snapshot_replaces_stale_copy_and_prune(tmp_path):
    old = make_memory(tmp_path)
    old.reset()
    old.update("case_a", torch.tensor([0]), probs_fg([0.9]), torch.tensor([1]))
    old.snapshot(5)  # written by a run that later crashed, then was resumed from an older checkpoint
    new = make_memory(tmp_path)
    new.reset()
    new.snapshot(5)
    assert new.case_arrays("case_a", new.snapshot_dir(5))[1].max() == 0, "a stale snapshot must be replaced"
    new.snapshot(7)
    new.prune({7})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("snap")) == ["snapshot_epoch_0007"]


def test_snapshot_same_as_shares_files_and_survives_pruning(tmp_path):
    """After the memory horizon a snapshot hard-links the files of one known to hold the same bytes
    (no copy, no extra disk); its checksums stay right, pruning the older one leaves it intact, and
    where that snapshot is gone or belongs to another run the files are copied."""
    import zlib

    mem = make_memory(tmp_path)
    mem.reset()
    mem.update("case_a", torch.tensor([0, 1]), probs_fg([0.9, 0.8]), torch.tensor([1, 1]))
    mem.snapshot(3)
    mem.snapshot(5, same_as=3)
    for name in ("case_a.q.f16", "case_a.n.u8", "case_b.q.f16", "case_b.n.u8"):
        assert os.stat(mem.snapshot_dir(5) / name).st_ino == os.stat(mem.snapshot_dir(3) / name).st_ino
    mem.prune({5})
    assert not mem.snapshot_dir(3).exists()
    manifest = json.loads((mem.snapshot_dir(5) / "manifest.json").read_text())
    for name, crc in manifest["crc32"].items():
        assert zlib.crc32((mem.snapshot_dir(5) / name).read_bytes()) == crc
    fresh = make_memory(tmp_path)
    fresh.restore(5, "checkpoint_best.pth")
    assert fresh.read("case_a", torch.tensor([0]))[1].item() == 1
    fresh.snapshot(7, same_as=3)  # 3 was pruned: copied
    assert os.stat(fresh.snapshot_dir(7) / "case_a.q.f16").st_nlink == 1
    (fresh.snapshot_dir(5) / "manifest.json").write_text(json.dumps({**manifest, "identity": {"fold": 9}}))
    fresh.snapshot(9, same_as=5)  # not this run's snapshot: copied, never linked
    assert os.stat(fresh.snapshot_dir(9) / "case_a.q.f16").st_nlink == 1


# ----------------------------------------------------------------------------- DDP (gloo, CPU)
UPDATES = {  # rank -> (case, indices, p_fg, labels); ranks touch disjoint voxels of a shared case
    0: [("case_a", [0, 1, 2], [0.9, 0.8, 0.1], [1, 1, 0]), ("case_b", [0, 1], [0.2, 0.3], [0, 0])],
    1: [("case_a", [3, 4, 4], [0.6, 0.2, 0.4], [1, 0, 0]), ("case_b", [5], [0.7], [1])],
}


def _apply(mem: ConfidenceMemory, updates) -> None:
    for case, idx, p, lab in updates:
        mem.update(case, torch.tensor(idx), probs_fg(p), torch.tensor(lab))


def _ddp_worker(rank: int, world: int, folder: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mem = make_memory(folder)
        if rank == 0:
            mem.reset()
        dist.barrier()
        _apply(mem, UPDATES[rank])
        dist.barrier()
        visited, confidence, skipped, hist = mem.finish_epoch(ddp=True)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump([visited, confidence, skipped, hist.tolist()], f)
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    ref = make_memory(tmp_path / "single")
    ref.reset()
    _apply(ref, UPDATES[0] + UPDATES[1])
    expected = ref.finish_epoch()

    folder, out = tmp_path / "ddp", tmp_path / "out"
    out.mkdir()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, str(folder), port, str(out)), nprocs=2, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1], "every rank must report the same all-reduced statistics"
    assert results[0][0] == pytest.approx(expected[0]) and results[0][2] == expected[2]
    np.testing.assert_allclose(results[0][1], expected[1], atol=1e-6)
    np.testing.assert_array_equal(np.array(results[0][3]), expected[3])  # the R-set histograms too
    assert expected[3].sum() == 9
    ddp_mem = make_memory(folder)
    for case in SHAPES:
        for got, want in zip(ddp_mem.case_arrays(case), ref.case_arrays(case)):
            np.testing.assert_array_equal(got, want)


def _update_sequence(seed: int = 0, steps: int = 40):
    """A deterministic sequence of patch updates over both cases, with repeated source voxels."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        key = ("case_a", "case_b")[int(rng.integers(2))]
        n = int(np.prod(SHAPES[key]))
        index = torch.from_numpy(rng.integers(0, n, size=3 * n))  # ~3 patch voxels per source voxel
        yield key, index, probs_fg(rng.random(index.numel())), torch.from_numpy(rng.integers(0, 2, index.numel()))


def test_background_writes_give_the_same_buffers_and_statistics(tmp_path):
    """Batches of three patches over two cases (so a case twice in every batch) applied by the writer, cases
    side by side on its pool, give the buffers of one-by-one updates and the same statistics."""
    sync, deferred = make_memory(tmp_path / "sync"), ConfidenceMemory(tmp_path / "bg", SHAPES, 2, IDENTITY, 0.2,
                                                                      background=True)
    sync.reset()
    deferred.reset()
    batch = []
    for step, (key, index, probs, labels) in enumerate(_update_sequence(steps=42)):
        sync.update(key, index, probs, labels)
        batch.append((key, scatter_patch(index, probs, labels, 1)))
        if len(batch) == 3:
            deferred.defer(lambda b=batch: deferred.apply_batch(b))
            batch = []
        if step == 20:  # a snapshot holds every update submitted before it
            sync.snapshot(1)
            deferred.snapshot(1)
    for case in SHAPES:
        for got, want in zip(deferred.case_arrays(case), sync.case_arrays(case)):
            np.testing.assert_array_equal(got, want)
        for name in (f"{case}.q.f16", f"{case}.n.u8"):
            assert (tmp_path / "bg/snapshot_epoch_0001" / name).read_bytes() == \
                   (tmp_path / "sync/snapshot_epoch_0001" / name).read_bytes()
    a, b = deferred.finish_epoch(), sync.finish_epoch()
    assert a[0] == b[0] and a[2] == b[2]
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12)  # sums added in another order
    np.testing.assert_array_equal(a[3], b[3])
    deferred.close()


def test_background_write_failure_is_raised_not_lost(tmp_path):
    mem = ConfidenceMemory(tmp_path, SHAPES, 2, IDENTITY, 0.2, background=True)
    mem.reset()
    mem.defer(lambda: mem.update("no_such_case", torch.tensor([0]), probs_fg([0.5]), torch.tensor([0])))
    with pytest.raises(RuntimeError, match="DALE memory update failed in the background writer"):
        mem.flush()
    mem.defer(lambda: mem.update("case_a", torch.tensor([0]), probs_fg([0.5]), torch.tensor([1])))
    mem.close()
    assert mem.read("case_a", torch.tensor([0]))[1][0] == 1  # the writer keeps working after a reported failure


def test_update_matches_the_per_voxel_reference(tmp_path):
    """The scatter-on-device + host-apply update gives the buffers and statistics of the original
    per-patch-voxel implementation (reference below, numpy), repeated source voxels included (their
    labels agree, as the labels of one source voxel do)."""
    from nnunetv2_dale.method.rsets import N_BINS, histogram, loss_signal

    mem = make_memory(tmp_path)
    mem.reset()
    ref = {k: (np.zeros(int(np.prod(s)), np.float16), np.zeros(int(np.prod(s)), np.uint8)) for k, s in SHAPES.items()}
    source_labels = {k: np.random.default_rng(5).integers(0, 2, int(np.prod(s))) for k, s in SHAPES.items()}
    hist, conf_sum, conf_cnt = np.zeros((2, N_BINS)), np.zeros(2), np.zeros(2)
    for key, index, probs, _ in _update_sequence(seed=3):
        labels = torch.from_numpy(source_labels[key][index.numpy()])
        mem.update(key, index, probs, labels)
        q, n = ref[key]  # reference: torch.unique scatter-mean, then the EMA, statistics per patch voxel
        uniq, inverse = torch.unique(index, return_inverse=True)
        mean = torch.zeros((uniq.numel(), 1)).index_add_(0, inverse, probs[:, 1:]) / torch.bincount(inverse)[:, None]
        where = uniq.numpy()
        weight = np.maximum(1.0 / (n[where] + 1.0), 0.2)
        new_q = (1 - weight) * q[where].astype(np.float32) + weight * mean[:, 0].numpy()
        q[where], n[where] = new_q.astype(np.float16), np.minimum(n[where].astype(int) + 1, 255)
        agreement = agreement_with_label(torch.from_numpy(new_q)[inverse][:, None], labels, 2)
        for k in range(2):
            hist[k] += histogram(loss_signal(agreement)[labels == k])
        conf_sum += np.bincount(labels.numpy(), weights=agreement.numpy(), minlength=2)
        conf_cnt += np.bincount(labels.numpy(), minlength=2)
    for key, (q, n) in ref.items():
        got_q, got_n = mem.case_arrays(key)
        np.testing.assert_array_equal(got_n.reshape(-1), n)
        np.testing.assert_allclose(got_q.reshape(-1).astype(np.float32), q.astype(np.float32), atol=1e-3)
    _, confidence, _, got_hist = mem.finish_epoch()
    np.testing.assert_array_equal(got_hist, hist)
    np.testing.assert_allclose(confidence, conf_sum / conf_cnt, rtol=1e-6)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_worker_reads_equal_the_memorys_own(tmp_path, num_classes):
    """The augmentation workers' reads (``read_live_buffers``: one channel from a flat view, several
    as rows) return the buffer values ``ConfidenceMemory.read`` returns, at repeated and unordered
    indices."""
    from nnunetv2_dale.method.sampling import read_live_buffers

    mem = make_memory(tmp_path, num_classes)
    mem.reset()
    rng = np.random.default_rng(0)
    n = int(np.prod(SHAPES["case_a"]))
    for _ in range(3):
        index = torch.from_numpy(rng.integers(0, n, 15))
        probs = torch.softmax(torch.from_numpy(rng.normal(size=(15, num_classes))).float(), 1)
        mem.update("case_a", index, probs, torch.from_numpy(rng.integers(0, num_classes, 15)))
    mem.flush()
    where = rng.integers(0, n, 40)
    q, visits = read_live_buffers(mem.live, "case_a", n, mem.channels, where)
    want_q, want_visits = mem.read("case_a", torch.from_numpy(where))
    assert q.shape == (40, mem.channels) and q.dtype == np.float16 and visits.dtype == np.uint8
    np.testing.assert_array_equal(q.astype(np.float32), want_q.numpy())
    np.testing.assert_array_equal(visits.astype(np.int64), want_visits.numpy())
    assert visits.max() > 0 and (visits == 0).any()  # some voxels visited, some not
    # the worker keeps the files mapped: later in-place updates are seen, and a reset (new files
    # swapped in) is not read through the old mapping
    mem.update("case_a", torch.from_numpy(where[:5]), torch.full((5, num_classes), 1 / num_classes),
               torch.zeros(5, dtype=torch.int64))
    mem.flush()
    np.testing.assert_array_equal(read_live_buffers(mem.live, "case_a", n, mem.channels, where)[1].astype(np.int64),
                                  mem.read("case_a", torch.from_numpy(where))[1].numpy())
    mem.reset()
    q, visits = read_live_buffers(mem.live, "case_a", n, mem.channels, where)
    assert (visits == 0).all()
