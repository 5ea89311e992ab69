"""Checkpoints a user can trust: written atomically, loaded only in safe mode.

A checkpoint is written to a temporary file in the same folder (keeping the `.keras`
suffix Keras requires) and moved over the old one with `os.replace`, so a process
killed at any moment leaves either the old file or the new one, never a torn one.
A resume checkpoint carries the trainer's state as one more entry of the same zip
(`trainer_state.json`), so the weights, the optimizer and the epoch counter they
belong to are published by one `os.replace`, and can never disagree.
A process killed mid-write leaves a hidden `.NAME.*.tmp.keras` file beside the target;
the next run in that folder removes it (under its lock, see model/rundir.py).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

from backends import saving_without_tensorflow


class CheckpointError(Exception):
    """A checkpoint could not be written or loaded; the message says why."""


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(temp_path) and then move temp_path over path atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix + ".tmp" + path.suffix)
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        write(temp)
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete temp files that a process killed mid-write left in `folder`. Call it only
    while holding the folder's run lock (model.rundir.RunDirectory), so that no other
    process is writing there."""
    removed = []
    for temp in Path(folder).glob(".*.tmp.*"):
        if temp.is_file():
            temp.unlink(missing_ok=True)
            removed.append(temp.name)
    return removed


TRAINER_STATE_ENTRY = "trainer_state.json"


def save_model(model, path: str | os.PathLike, trainer_state: dict | None = None) -> Path:
    """model.save() to `path` atomically; with `trainer_state`, that dict is stored in the
    same archive (read it back with read_trainer_state)."""

    def write(temp: Path) -> None:
        with saving_without_tensorflow():
            model.save(temp)
        if trainer_state is not None:
            text = json.dumps(trainer_state, indent=2, default=float)
            with zipfile.ZipFile(temp, "a", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(TRAINER_STATE_ENTRY, text)

    return atomic_write(path, write)


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer state stored inside a resume checkpoint, or a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: no checkpoint at {path}; run without --resume to start a new run")
    try:
        with zipfile.ZipFile(path) as archive:
            if TRAINER_STATE_ENTRY not in archive.namelist():
                raise CheckpointError(
                    f"{path} holds no trainer state (a model file, or a checkpoint from an older version of this "
                    "project), so it cannot be resumed; start a new run")
            state = json.loads(archive.read(TRAINER_STATE_ENTRY))
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged or not a .keras zip archive ({error})") from None
    except ValueError as error:
        raise CheckpointError(f"the trainer state in {path} is not valid JSON ({error}); it cannot be resumed") from None
    required = {"format": str, "epochs_completed": int, "history": list, "run": dict}
    if not isinstance(state, dict) or any(not isinstance(state.get(key), kind) for key, kind in required.items()):
        raise CheckpointError(f"the trainer state in {path} is not one this project wrote (expected an object with "
                              f"{', '.join(required)}); it cannot be resumed")
    if state["format"] != TRAINER_STATE_FORMAT:
        raise CheckpointError(f"the trainer state in {path} has format {state['format']!r}, expected "
                              f"{TRAINER_STATE_FORMAT!r}; it cannot be resumed")
    return state


TRAINER_STATE_FORMAT = "mnist-cnn-trainer-state/1"


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=False, default=float) + "\n"
    return atomic_write(path, lambda temp: temp.write_text(text))


def load_model(path: str | os.PathLike):
    """Load a .keras file with safe_mode=True, turning every failure into one clear line."""
    import keras

    import model.module  # noqa: F401  (registers CNNModule and TiledMaxPooling2D)

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not a .keras zip archive (truncated, or not a Keras model)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged ({error})") from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is damaged (bad CRC in {damaged})")
    try:
        with saving_without_tensorflow():
            return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:
        message = " ".join(str(error).split())
        if "Lambda" in message or "safe_mode" in message:
            raise CheckpointError(
                f"refused to load {path}: it contains a Lambda layer (arbitrary code), which safe mode does not run"
            ) from None
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(error).__name__}: {message[:300]})") from None
