"""nnU-Net's stock trainer lookup finds our trainers with zero configuration, in a fresh
environment built by ``pip install .`` and ``pip install -e .``, next to a user's own trainers."""
from __future__ import annotations

import inspect
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

from conftest import clean_env, run

REPO = Path(__file__).resolve().parents[1]

LOOKUP = textwrap.dedent("""
    import inspect, os, sys
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    for name in sys.argv[1:]:
        cls = recursive_find_trainer_class_by_name(name)
        assert issubclass(cls, nnUNetTrainer)
        try:
            where = inspect.getfile(cls)
        except TypeError:  # nnU-Net drops ext-folder modules from sys.modules after the lookup
            where = "-"
        print("FOUND", name, where)
    print("EXT", os.environ.get("nnUNet_extTrainer"))
""")


def lookup(python: str, names: list[str], env: dict[str, str]) -> dict[str, str]:
    """Run nnU-Net's trainer lookup in a child process (outside the checkout, so that
    ``python -c`` cannot import the package from the current directory)."""
    out = run([python, "-c", LOOKUP, *names], env, cwd=Path(env.get("TMPDIR", "/tmp"))).stdout
    found = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("FOUND")}
    found["EXT"] = next(line[4:] for line in out.splitlines() if line.startswith("EXT"))
    for line in out.splitlines():  # nnU-Net says which ext folder served a trainer
        if line.startswith("Using trainer '"):
            name, folder = line[len("Using trainer '"):].split("' from: ")
            found[f"folder:{name}"] = folder
    return found


def test_constructor_signature_matches_nnunet():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_dale.method.trainer import nnUNetTrainerDALE
    from nnunetv2_dale.method.variants import nnUNetTrainerDALE_5epochs

    assert issubclass(nnUNetTrainerDALE_5epochs, nnUNetTrainerDALE) and issubclass(nnUNetTrainerDALE, nnUNetTrainer)
    assert inspect.signature(nnUNetTrainerDALE.__init__) == inspect.signature(nnUNetTrainer.__init__)
    assert nnUNetTrainerDALE_5epochs.epochs == 5


def test_found_in_new_shell_without_configuration(tmp_path):
    found = lookup(sys.executable, ["nnUNetTrainerDALE", "nnUNetTrainerDALE_5epochs", "nnUNetTrainer"],
                   clean_env(nnUNet_results=tmp_path))
    assert "nnUNetTrainerDALE" in found and "nnUNetTrainerDALE_5epochs" in found
    assert found["nnUNetTrainer"].endswith("nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py")


def test_users_own_ext_trainers_keep_working(tmp_path):
    mine = tmp_path / "my_trainers"
    mine.mkdir()
    (mine / "nnUNetTrainerMine.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class nnUNetTrainerMine(nnUNetTrainer):\n    pass\n")
    found = lookup(sys.executable, ["nnUNetTrainerMine", "nnUNetTrainerDALE"],
                   clean_env(nnUNet_extTrainer=mine))
    assert found["folder:nnUNetTrainerMine"] == str(mine)
    assert found["folder:nnUNetTrainerDALE"] != str(mine)
    assert found["EXT"].split(":")[0] == str(mine), "the user's folder must stay first"


def _fresh_venv(where: Path) -> str:
    """A venv without system site-packages whose only link to the heavy, already installed
    dependencies (torch, nnunetv2, hatchling) is a plain path entry: .pth files there (including
    this checkout's own registration hook) are NOT executed in the venv."""
    venv.EnvBuilder(with_pip=True, symlinks=True).create(where)
    python = str(where / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], clean_env()).stdout.strip()
    Path(site, "heavy_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_pip_install_in_fresh_environment(tmp_path, editable):
    python = _fresh_venv(tmp_path / "venv")
    env = clean_env()
    before = lookup(python, [], env)
    assert before["EXT"] == "None", "registration must come from our install, not from the outside"
    target = ["-e", str(REPO)] if editable else [str(REPO)]
    run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", *target], env,
        timeout=300)
    found = lookup(python, ["nnUNetTrainerDALE", "nnUNetTrainerDALE_10epochs"], env)
    venv_root = str(tmp_path / "venv")
    if editable:
        assert found["EXT"] == str(REPO / "trainers")
        assert found["folder:nnUNetTrainerDALE"] == str(REPO / "trainers")
        assert found["nnUNetTrainerDALE"] == str(REPO / "nnunetv2_dale" / "method" / "trainer.py")
    else:
        assert found["EXT"].startswith(venv_root) and found["EXT"].endswith("nnunetv2_dale_trainers")
        assert found["folder:nnUNetTrainerDALE"] == found["EXT"]
        assert found["nnUNetTrainerDALE"].startswith(venv_root), "class must come from the install, not the checkout"
    script = Path(venv_root, "bin", "nnUNetv2_dale_check")
    assert script.exists()
    proc = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "nnUNet_raw" in proc.stderr and "Traceback" not in proc.stderr
