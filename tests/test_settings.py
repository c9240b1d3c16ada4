"""nnU-Net settings beyond one-channel binary 2d/3d_fullres, each trained and predicted through
the real CLI on tiny generated data: two input channels + three foreground classes + an
``ignore`` label (default and ResEnc plans), and the 3d_lowres -> 3d_cascade_fullres cascade."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NNUNetTree, inprocess_trainer, run, tool
from nnunetv2_dale.data.noise import NoiseSpec
from nnunetv2_dale.data.phantoms import make_phantom_dataset, phantom_case

pytestmark = pytest.mark.slow
IGNORE = 4
BUDGET = {"nnUNet_DALE_epochs": "3", "nnUNet_DALE_iters": "4", "nnUNet_DALE_val_iters": "1"}


def _multilabel_2d(folder: Path, n_train: int = 8, n_test: int = 2, size: int = 32, seed: int = 987) -> Path:
    """PNG cases with 2 channels (the phantom, and its inverted, re-speckled copy); labels 1/2/3 =
    the lesion's left/middle/right thirds; label 4 = ignore: the top 4 rows and a 5x5 square."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    for i in range(n_train + n_test):
        image, lesion = phantom_case(rng, (size, size))
        second = np.clip((1 - image) * rng.uniform(0.8, 1.2, image.shape), 0, 1)
        cols = np.nonzero(lesion.any(0))[0]
        thirds = np.digitize(np.arange(size), np.linspace(cols.min(), cols.max() + 1, 4)[1:3])
        label = np.where(lesion > 0, 1 + thirds[None, :], 0).astype(np.uint8)
        split = "Tr" if i < n_train else "Ts"
        if split == "Tr":
            label[:4] = IGNORE
            y, x = rng.integers(4, size - 5, 2)
            label[y:y + 5, x:x + 5] = IGNORE
        case = f"ml_{i:03d}"
        for c, channel in enumerate((image, second)):
            Image.fromarray(np.round(channel * 255).astype(np.uint8)).save(folder / f"images{split}" / f"{case}_{c:04d}.png")
        Image.fromarray(label).save(folder / f"labels{split}" / f"{case}.png")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "phantom", "1": "inverted"}, "file_ending": ".png", "numTraining": n_train,
        "labels": {"background": 0, "left": 1, "middle": 2, "right": 3, "ignore": IGNORE}}))
    return folder


@pytest.fixture(scope="session")  # session: tests run longest first, not module by module
def multilabel2d(tmp_path_factory):
    """The 2-channel, 3-class, ignore-label dataset, planned with nnU-Net's default and ResEnc-M planners."""
    tree = NNUNetTree(tmp_path_factory.mktemp("multilabel"))
    raw = _multilabel_2d(tree.raw / "Dataset987_MultiLabel")
    run([tool("nnUNetv2_plan_and_preprocess"), "-d", "987", "-c", "2d", "-np", "1", "--verify_dataset_integrity"],
        tree.env())
    run([tool("nnUNetv2_plan_and_preprocess"), "-d", "987", "-c", "2d", "-np", "1", "-pl", "nnUNetPlannerResEncM"],
        tree.env())
    return tree, raw


# the gate acts fully whatever the estimate: on this small random-label dataset the default's gate may
# shut and its frozen-memory steps be nnU-Net's, and this test is about DALE's terms with four classes
TRAINER = "nnUNetTrainerDALE_ungated"


def _train_predict(tree: NNUNetTree, raw: Path, plans: str, tmp_path: Path) -> tuple[Path, str]:
    env = tree.env(**BUDGET)
    out = run([tool("nnUNetv2_train"), "987", "2d", "0", "-tr", TRAINER, "-p", plans, "-device", "cpu"],
              env).stdout
    pred = tmp_path / plans
    run([tool("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "987", "-c", "2d", "-f", "0",
         "-tr", TRAINER, "-p", plans, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env)
    for label in sorted((raw / "labelsTs").glob("*.png")):
        seg = np.array(Image.open(pred / label.name))
        assert seg.shape == np.array(Image.open(label)).shape and set(np.unique(seg)) <= {0, 1, 2, 3}
    return next(tree.results.glob(f"*/{TRAINER}__{plans}__2d/fold_0")), out


@pytest.mark.parametrize("plans", ["nnUNetPlans", "nnUNetResEncUNetMPlans"])
def test_multichannel_multiclass_ignore_label(multilabel2d, plans, tmp_path, monkeypatch):
    tree, raw = multilabel2d
    fold, out = _train_predict(tree, raw, plans, tmp_path)
    log = next(fold.glob("training_log_*.txt")).read_text()
    # every phase ran, with all four classes in the memory and the alignment term on
    for phase in ("warmup", "stable", "fuzzy"):
        assert f"DALE phase {phase}" in log, log[-3000:]
    assert "align_loss" in log and "4 float16 channel(s)" in log
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert all(len(c) == 4 for c in final["logging"]["dale_mean_confidence"])
    # ignored voxels were never visited; labelled ones were
    trainer = inprocess_trainer(tree, 987, "2d", monkeypatch)
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    snapshot = max((fold / "dale_memory").glob("snapshot_epoch_*"))
    seen_ignored = seen_labelled = 0
    for key in sorted(dataset_tr.identifiers):
        seg = np.asarray(dataset_tr.load_case(key)[1][0])
        n = np.fromfile(snapshot / f"{key}.n.u8", dtype=np.uint8).reshape(seg.shape)
        seen_ignored += int((n[seg == IGNORE] > 0).sum())
        seen_labelled += int((n[(seg >= 0) & (seg != IGNORE)] > 0).sum())
    assert seen_ignored == 0 and seen_labelled > 0


def _trainer_with_filled_memory(multilabel2d, monkeypatch, seed: int, visits):
    """An in-process DALE trainer on the multi-label dataset whose memory holds random 4-class
    ensembles for every voxel (ignored ones included) and ``visits(rng, size)`` visit counts."""
    tree, _ = multilabel2d
    trainer = inprocess_trainer(tree, 987, "2d", monkeypatch)
    trainer.dale_noise_gate = False  # the objective's own mechanics (the gate: test_noise_gate.py)
    trainer.on_train_start()
    rng = np.random.default_rng(seed)
    for key in trainer.memory.case_shapes:
        q, n = trainer.memory._open(key)
        q[:] = rng.dirichlet(np.ones(4), size=q.shape[0]).astype(np.float16)
        n[:] = visits(rng, n.shape[0])
        del q, n
    return trainer


def test_ignored_voxels_count_in_no_dale_term(multilabel2d, monkeypatch):
    """With every voxel (ignored ones included) in the memory as if visited 10 times, the loss
    gradient at ignored voxels is zero in every phase, and they are in neither set (so neither in
    the reliable feature statistics nor in the alignment loss)."""
    from nnunetv2_dale.method.rsets import Mixture
    from nnunetv2_dale.method.schedule import FUZZY, JOINT, STABLE

    trainer = _trainer_with_filled_memory(multilabel2d, monkeypatch, seed=0, visits=lambda rng, size: 10)
    trainer.mixtures = [Mixture((0.7, 0.3), (0.3, 2.0), (0.3, 1.0), True) for _ in range(4)]
    batch = next(trainer.dataloader_train)
    targets = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
    ignored = targets[0] == IGNORE
    assert ignored.any() and (~ignored).any()
    maps = trainer.rset_maps(batch)
    reliable, fuzzy = maps.reliable, maps.fuzzy
    assert (reliable[ignored] == 0).all() and (fuzzy[ignored] == 0).all()
    assert fuzzy[~ignored].max() > 0.1 and reliable[~ignored].max() > 0.1  # the sets are not trivially empty
    for phase in (STABLE, FUZZY, JOINT):
        output = [torch.randn(t.shape[0], 4, *t.shape[2:], requires_grad=True) for t in targets]
        loss, _ = trainer.dale_loss(batch, output if len(output) > 1 else output[0], batch["target"], phase)
        loss.backward()
        assert output[0].grad is not None
        for o, t in zip(output, targets):
            if o.grad is None:  # nnU-Net gives the lowest deep-supervision output weight 0
                continue
            grad = o.grad.abs().sum(1, keepdim=True)
            assert (grad[t == IGNORE] == 0).all() and (grad[t != IGNORE] > 0).any(), phase


def _reference_rset_maps(trainer, batch):
    """The per-sample host implementation of ``rset_maps`` before it ran batched on the device
    (nnunetv2-dale 0.2), kept as the reference the new path must match."""
    from nnunetv2_dale.method.loss import collaborative_target
    from nnunetv2_dale.method.rsets import agreement_with_label, entropy_signal, loss_signal

    labels_full = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    k = len(trainer.label_manager.all_labels)
    shape = labels_full.shape
    omega, entropy = torch.ones(shape), torch.zeros(shape)
    known_full = torch.zeros(shape, dtype=torch.bool)
    q_full = torch.zeros((shape[0], k, *shape[2:]))
    for b, key, index, valid, labels in trainer._patch_voxels(batch):
        q, visits = trainer.memory.read(key, index)
        known = valid & (visits >= trainer.dale_min_visits)
        lab = labels.clamp(0, k - 1)
        losses = loss_signal(agreement_with_label(q, lab, k))  # omega: each class mixture's density ratio
        om = torch.ones(len(lab))
        for c, mixture in enumerate(trainer.mixtures):
            om = torch.where(known & (lab == c), mixture.clean_posterior(losses), om)
        er = torch.where(known, entropy_signal(q), torch.zeros(()))
        qk = torch.cat([1 - q, q], 1) if q.shape[1] == 1 else q
        qk = torch.where(known[:, None], qk, torch.nn.functional.one_hot(lab, k).float())
        omega[b], entropy[b], known_full[b] = om.reshape(shape[1:]), er.reshape(shape[1:]), known.reshape(shape[1:])
        q_full[b] = qk.T.reshape(k, *shape[2:])
    reliable, fuzzy = omega * (1 - entropy) if trainer.dale_reliable_certain else omega, 1 - omega
    onehot = torch.zeros(q_full.shape).scatter_(1, labels_full.long().clamp(0, k - 1), 1)
    if trainer.dale_agreement_weights:  # (0.4.0) the loss weight also scales with the ensemble's agreement, 2 q[y] up to 1
        omega = omega * (2 * (q_full * onehot).sum(1, keepdim=True)).clamp(max=1) ** trainer.dale_agreement_power
    soft = collaborative_target(onehot, q_full, omega, entropy, trainer.dale_sharpen_temperature,
                                trainer.dale_certain_correction)
    counted = (labels_full != trainer.label_manager.ignore_label).float()
    return omega, reliable * counted, fuzzy * counted, soft, onehot, q_full, known_full


def test_batched_rset_maps_match_the_per_sample_reference(multilabel2d, monkeypatch):
    """The batched device-side R-set maps equal the per-sample host computation they replaced
    (4 classes, ignore label, voxels below and above the visit threshold, with and without the
    0.4.0 agreement weights, to the first and second power), whether the buffer values come with
    the batch from the loader (workers) or are read by the trainer."""
    from nnunetv2_dale.method.rsets import Mixture
    from nnunetv2_dale.method.schedule import STABLE

    trainer = _trainer_with_filled_memory(multilabel2d, monkeypatch, seed=1,
                                          visits=lambda rng, size: rng.integers(0, 6, size=size))
    trainer.mixtures = [Mixture((0.7, 0.3), (0.3, 2.0), (0.3, 1.0), True), Mixture(),
                        Mixture((0.6, 0.4), (0.2, 1.5), (0.5, 0.8), True), Mixture((0.9, 0.1), (0.1, 3.0), (0.2, 1.0), True)]
    batch = next(trainer.dataloader_train)
    assert "dale_q" not in batch  # before the first stable epoch the workers read nothing
    # from a stable epoch on, the loader (the workers) reads the buffer values with the batch
    trainer.current_epoch = next(e for e in range(trainer.num_epochs) if trainer.phase(e) == "stable")
    trainer.on_train_epoch_start()
    worker_batch = next(trainer.dataloader_train)
    assert worker_batch["dale_q"].dtype == torch.float16 and worker_batch["dale_visits"].dtype == torch.uint8
    host_batch = {k: v for k, v in worker_batch.items() if not k.startswith("dale_")}
    # a float target (its dtype is the augmentation's choice) with the ignore label: left as it is
    targets = worker_batch["target"] if isinstance(worker_batch["target"], list) else [worker_batch["target"]]
    float_batch = {**worker_batch, "target": [t.float() for t in targets]}
    float_targets = [t.clone() for t in float_batch["target"]]
    assert (float_targets[0] == IGNORE).any()
    for b, certain, agree in [(b, c, a) for b in (batch, worker_batch, host_batch, float_batch) for c in (False, True)
                              for a in (0.0, 1.0, 2.0)]:
        trainer.dale_reliable_certain = certain  # the reliable membership: omega, or omega (1 - ER)
        # the loss weights: omega, or omega times the ensemble's agreement (to a power: _sharpAgree)
        trainer.dale_agreement_weights, trainer.dale_agreement_power = agree > 0, agree
        got, want = trainer.rset_maps(b), _reference_rset_maps(trainer, b)
        assert 0 < float(want[6].float().mean()) < 1  # some voxels known, some not
        for name, g, w in zip(("omega", "reliable", "fuzzy", "soft", "onehot", "ensemble", "known"), got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)
        # a stable phase's maps: the same, without the fuzzy phase's target and ensemble
        stable = trainer.rset_maps(b, STABLE)
        assert stable.soft is None and stable.ensemble is None
        for name in ("omega", "reliable", "fuzzy", "onehot", "known"):
            torch.testing.assert_close(getattr(stable, name), getattr(got, name), atol=0, rtol=0, msg=name)
    assert all(torch.equal(t, u) for t, u in zip(float_batch["target"], float_targets))


def test_3d_lowres_and_cascade(tmp_path):
    """nnU-Net itself plans 3d_lowres + 3d_cascade_fullres for 40^3 phantoms under a tiny memory
    target; DALE trains both stages (fold ``all``: the low-res validation predicts every case for
    the cascade) and the stock predictor runs the cascade."""
    tree = NNUNetTree(tmp_path / "tree")
    raw = make_phantom_dataset(tree.raw / "Dataset988_Cascade", dim=3, size=40, num_train=2, num_test=1,
                               noise=NoiseSpec(markov_steps=40), seed=988)
    env = tree.env(nnUNet_DALE_epochs="1", nnUNet_DALE_iters="2", nnUNet_DALE_val_iters="1")
    run([tool("nnUNetv2_plan_and_preprocess"), "-d", "988", "-c", "3d_lowres", "3d_fullres", "-np", "1",
         "-gpu_memory_target", "0.015"], env)
    plans = json.loads((tree.preprocessed / "Dataset988_Cascade" / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
    shapes = {}
    for configuration in ("3d_lowres", "3d_cascade_fullres"):
        run([tool("nnUNetv2_train"), "988", configuration, "all", "-tr", "nnUNetTrainerDALE", "-device", "cpu"], env)
        fold = tree.results / "Dataset988_Cascade" / f"nnUNetTrainerDALE__nnUNetPlans__{configuration}" / "fold_all"
        manifest = json.loads((max((fold / "dale_memory").glob("snapshot_epoch_*")) / "manifest.json").read_text())
        assert manifest["identity"]["configuration"] == configuration
        shapes[configuration] = np.prod(next(iter(manifest["cases"].values())))
    assert shapes["3d_lowres"] < shapes["3d_cascade_fullres"] / 2  # buffers in each stage's own geometry
    low, full = tmp_path / "low", tmp_path / "full"
    common = ["-i", str(raw / "imagesTs"), "-d", "988", "-f", "all", "-tr", "nnUNetTrainerDALE", "-device", "cpu",
              "-npp", "1", "-nps", "1", "--disable_tta"]
    run([tool("nnUNetv2_predict"), *common, "-o", str(low), "-c", "3d_lowres"], env)
    run([tool("nnUNetv2_predict"), *common, "-o", str(full), "-c", "3d_cascade_fullres",
         "-prev_stage_predictions", str(low)], env)
    import SimpleITK as sitk

    for label in sorted((raw / "labelsTs").glob("*.nii.gz")):
        seg = sitk.ReadImage(str(full / label.name))
        assert seg.GetSize() == sitk.ReadImage(str(label)).GetSize()
