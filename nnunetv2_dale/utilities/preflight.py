"""Start-up checks with one clear message each: what is wrong and what to run.

Used by the trainer's constructor and by our commands (``nnUNetv2_dale_check``,
``nnUNetv2_dale_demo``), so that bad set-ups fail before nnU-Net fails deep inside.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

NNUNET_PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
TORCH_FIX = "pip install -c constraints.txt torch torchvision   (torch==2.14.1, torchvision==0.29.1)"


class SetupError(SystemExit):
    """A set-up problem the user must fix. Exits with status 1 and prints only the message."""

    def __init__(self, message: str) -> None:
        super().__init__(f"nnunetv2-dale: {message}")


def tool(name: str) -> str:
    """Path of a console script (nnU-Net's or ours) next to this interpreter, else its bare name."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def check_path_variables(names: tuple[str, ...] = NNUNET_PATH_VARS) -> dict[str, Path]:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        exports = "\n".join(f"    export {n}=/path/to/{n}" for n in missing)
        raise SetupError(
            f"the nnU-Net path variable(s) {', '.join(missing)} are not set. Set them, e.g.\n{exports}\n"
            "(see nnU-Net's documentation/setting_up_paths.md)."
        )
    return {n: Path(os.environ[n]) for n in names}


def check_torch() -> str:
    """Import torch and torchvision the way nnU-Net's trainer lookup does; return the versions."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        raise SetupError(f"torch cannot be imported ({e}). Install a working pair:\n    {TORCH_FIX}") from None
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001
        raise SetupError(
            f"torchvision cannot be imported next to torch {torch.__version__} ({e}). nnU-Net's trainer "
            f"lookup imports it. Install a matching pair:\n    {TORCH_FIX}"
        ) from None
    return f"torch {torch.__version__}, torchvision {torchvision.__version__}"


def check_writable(folder: Path, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as e:
        raise SetupError(
            f"{what} {folder} cannot be written ({e.strerror or e}). Point it to a writable folder "
            f"or fix its permissions (chmod u+w), and make sure the disk is not full."
        ) from None
    return folder


def resolve_dataset_name(dataset: str | int) -> str:
    """Dataset id or name -> name, as nnU-Net does, with a message that says what to run."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise SetupError(
            f"dataset {dataset} exists in none of nnUNet_raw, nnUNet_preprocessed, nnUNet_results. "
            "Put it in $nnUNet_raw as DatasetXXX_Name (nnU-Net raw format) and run\n"
            f"    nnUNetv2_plan_and_preprocess -d {dataset} --verify_dataset_integrity"
        ) from None


def check_preprocessed(dataset_name: str, configuration: str, plans_identifier: str = "nnUNetPlans") -> Path:
    """The plans file and the configuration's preprocessed data exist; return the data folder."""
    import json

    base = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    plans_file = base / f"{plans_identifier}.json"
    dataset_id = dataset_name[7:10] if dataset_name.startswith("Dataset") else dataset_name
    if not plans_file.is_file():
        raise SetupError(
            f"{plans_file} does not exist: {dataset_name} was not planned with plans '{plans_identifier}'. Run\n"
            f"    nnUNetv2_plan_and_preprocess -d {dataset_id}"
        )
    plans = json.loads(plans_file.read_text())
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise SetupError(
            f"configuration '{configuration}' is not in {plans_file.name}; available: {', '.join(configs)}."
        )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    # resolved as nnU-Net does: 3d_cascade_fullres inherits 3d_fullres's data identifier
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    data_folder = base / data_identifier
    if not data_folder.is_dir() or not any(data_folder.iterdir()):
        raise SetupError(
            f"{dataset_name} has no preprocessed data for '{configuration}' ({data_folder} is missing or empty). Run\n"
            f"    nnUNetv2_preprocess -d {dataset_id} -c {configuration} -plans_name {plans_identifier}"
        )
    return data_folder


def main(argv: list[str] | None = None) -> None:
    """``nnUNetv2_dale_check``: report whether this machine is ready to train with DALE."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("-d", "--dataset", help="dataset id or name to check (optional)")
    parser.add_argument("-c", "--configuration", default="2d")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    args = parser.parse_args(argv)

    from nnunetv2_dale.utilities.registration import ensure_registered

    print("nnU-Net paths:", ", ".join(f"{k}={v}" for k, v in check_path_variables().items()))
    print("torch:", check_torch())
    print("trainer folder:", ensure_registered())
    check_writable(Path(os.environ["nnUNet_results"]), "nnUNet_results")
    print("nnUNet_results is writable")
    if args.dataset is not None:
        name = resolve_dataset_name(args.dataset)
        print(f"{name}: preprocessed data for {args.configuration} in", check_preprocessed(name, args.configuration, args.plans))
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name("nnUNetTrainerDALE")
    print(f"nnU-Net finds nnUNetTrainerDALE ({cls.__module__}). Ready.")


if __name__ == "__main__":
    main()
