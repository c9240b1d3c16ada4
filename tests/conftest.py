"""Shared fixtures: tiny generated datasets, planned and preprocessed once per test session
through nnU-Net's real command line, and a clean environment for child processes."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from nnunetv2_dale.data.noise import NoiseSpec
from nnunetv2_dale.data.phantoms import make_phantom_dataset
from nnunetv2_dale.utilities.preflight import tool  # noqa: F401 - the tests import it from here

SHARED_DDTI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Dataset601_DDTI"


# Seconds the slowest tests took on 2 cores (two xdist workers, nothing else running; --durations;
# the pip installs were under the 25 s of the last listed): only the order in which pytest-xdist
# hands tests to its workers, longest first, so that no long test starts last.
SLOWEST = {
    "test_bench.py::test_bench_command_end_to_end_rerun_and_oracle_masks": 311,
    "test_settings.py::test_3d_lowres_and_cascade": 225,
    "test_e2e_cli.py::test_demo_command_small": 122,
    "test_crash_safety.py::test_random_kills_while_the_writer_is_busy_leave_a_resumable_fold": 110,
    "test_benchmark_scripts.py::test_loader_and_epoch_cost_smallest": 107,
    "test_crash_safety.py::test_kills_at_every_write_leave_a_resumable_fold": 100,
    "test_audit.py::test_audit_ranks_corrupted_cases_first_2d": 88,
    "test_e2e_cli.py::test_3d_fullres_train_and_predict_geometry": 82,
    "test_e2e_cli.py::test_2d_train_kill_continue_val_predict_find_best": 75,
    "test_real_data.py::test_ddti_subset_trains_and_validates": 45,
    "test_audit.py::test_audit_multiclass_3d_running_fold_exact_geometry": 37,
    "test_settings.py::test_multichannel_multiclass_ignore_label": 36,
    "test_crash_safety.py::test_full_disk_during_checkpoint_is_refused_clearly_and_resumable": 32,
    "test_peers.py::test_peer_trains_through_cli_and_predicts_with_stock_nnunet": 30,
    "test_registration.py::test_pip_install_in_fresh_environment": 25,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest tests first (stable: the rest keep pytest's order)."""
    items.sort(key=lambda item: -SLOWEST.get(item.nodeid.split("[")[0].removeprefix("tests/"), 0))


def clean_env(**paths: os.PathLike | str) -> dict[str, str]:
    """A NEW-shell-like environment: PATH/HOME/locale only, plus the given variables.

    ``nnUNet_extTrainer`` is deliberately absent: finding our trainers must not depend on it.
    """
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
            "PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_DISABLE_PIP_VERSION_CHECK")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"})
    env.update({k: str(v) for k, v in paths.items()})
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 600, check: bool = True,
        cwd: os.PathLike | str | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion; by default fail with its output when it fails."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_until_killed(cmd: list[str], env: dict[str, str], marker: str, occurrence: int = 1,
                       timeout: float = 300) -> str:
    """Start training, SIGKILL its whole process group when ``marker`` is printed for the
    ``occurrence``-th time; return the output."""
    env = {**env, "PYTHONUNBUFFERED": "1"}  # see the marker when it is printed, not at exit
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if marker in line and sum(marker in s for s in seen) == occurrence:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    return "".join(seen)


class NNUNetTree:
    """nnUNet_raw / nnUNet_preprocessed / nnUNet_results under one temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.raw, self.preprocessed, self.results = (root / n for n in ("raw", "preprocessed", "results"))
        for d in (self.raw, self.preprocessed, self.results):
            d.mkdir(parents=True, exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(nnUNet_raw=self.raw, nnUNet_preprocessed=self.preprocessed, nnUNet_results=self.results,
                         **extra)


def _planned(tmp_path_factory: pytest.TempPathFactory, dim: int, dataset_id: int, size: int, n_train: int,
             configuration: str) -> tuple[NNUNetTree, int, Path]:
    tree = NNUNetTree(tmp_path_factory.mktemp(f"nnunet{dim}d"))
    raw = make_phantom_dataset(tree.raw / f"Dataset{dataset_id}_Tiny{dim}D", dim=dim, size=size, num_train=n_train,
                               num_test=2, noise=NoiseSpec(markov_steps=40), seed=dataset_id)
    run([tool("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", configuration, "-np", "1",
         "--verify_dataset_integrity"], tree.env())
    return tree, dataset_id, raw


@pytest.fixture(scope="session")
def tiny2d(tmp_path_factory):
    """8 noisy 2D phantoms of 32x32 (PNG), planned and preprocessed for 2d."""
    return _planned(tmp_path_factory, 2, 981, 32, 8, "2d")


@pytest.fixture(scope="session")
def tiny3d(tmp_path_factory):
    """6 noisy 3D phantoms of 20^3 (NIfTI), planned and preprocessed for 3d_fullres."""
    return _planned(tmp_path_factory, 3, 982, 20, 6, "3d_fullres")


@pytest.fixture(scope="session")
def aniso3d(tmp_path_factory):
    """6 noisy anisotropic 3D phantoms (8 x 40 x 40 voxels, spacing 4 x 1 x 1): nnU-Net plans
    dummy-2D augmentation for them. Also planned for 2d (slices of a 3D case)."""
    tree = NNUNetTree(tmp_path_factory.mktemp("nnunet_aniso"))
    raw = make_phantom_dataset(tree.raw / "Dataset983_Aniso3D", dim=3, num_train=6, num_test=1,
                               noise=NoiseSpec(markov_steps=40), seed=983, shape=(8, 40, 40), spacing=(4.0, 1.0, 1.0))
    run([tool("nnUNetv2_plan_and_preprocess"), "-d", "983", "-c", "3d_fullres", "2d", "-np", "1"], tree.env())
    return tree, 983, raw


def inprocess_trainer(tree: NNUNetTree, dataset_id: int, configuration: str, monkeypatch: pytest.MonkeyPatch,
                      trainer_name: str = "nnUNetTrainerDALE_20epochs", **extra_env: str):
    """A real trainer in this process (no augmentation workers), set up like nnUNetv2_train does.
    The default trainer name is used by no CLI test, so their output folders stay separate."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    for key, value in tree.env(nnUNet_n_proc_DA="0", **extra_env).items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    return get_trainer_from_args(str(dataset_id), configuration, 0, trainer_name, device=torch.device("cpu"))
