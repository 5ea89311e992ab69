"""One run per output directory: checked, locked and cleaned before any training.

`RunDirectory.open(path, resume=..., overwrite=...)`:
- fails in one line if the folder cannot be written, or `checkpoints` is not a folder;
- takes an advisory `fcntl.flock` on `.train.lock`, held for the run's life: a second
  process on the same folder is refused; the kernel drops the lock when its holder dies,
  so a run killed with SIGKILL never blocks the next one;
- refuses a new run into a folder holding a previous run unless `overwrite` (which then
  removes the previous run's files, so no file of the old run is left to pass for the
  new one's), and refuses `resume` when there is nothing to resume;
- removes the hidden temp files that a killed process left mid-write (safe under the lock).
Stdlib only: it runs before keras is imported.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

from model.checkpoint import remove_stale_temp_files
from model.runtime import UsageError

LOCK_FILE = ".train.lock"
CHECKPOINTS = "checkpoints"
# What a run leaves behind; any of them means the folder holds a run.
RUN_FILES = ("model.keras", "run.json", "curves.png", f"{CHECKPOINTS}/last.keras", f"{CHECKPOINTS}/best.keras",
             f"{CHECKPOINTS}/trainer_state.json")


def check_writable(output_dir: str | os.PathLike) -> Path:
    """The folder, created if needed; a one-line UsageError if a file cannot be written in it."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write to output dir {str(path)!r} ({error.strerror or error}); "
                         "choose another with --output-dir") from None
    return path


class RunDirectory:
    def __init__(self, path: Path, lock_descriptor: int):
        self.path = path
        self.checkpoints = path / CHECKPOINTS
        self._lock = lock_descriptor

    @classmethod
    def open(cls, output_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> "RunDirectory":
        path = check_writable(output_dir)
        checkpoints = path / CHECKPOINTS
        if checkpoints.exists() and not checkpoints.is_dir():
            raise UsageError(f"{checkpoints} exists and is not a folder, but the run's checkpoints go there; "
                             "move it away or choose another --output-dir")
        descriptor = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise UsageError(f"another train.py (pid {holder}) is running in output dir {str(path)!r}; "
                             "wait for it to finish or choose another --output-dir") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        directory = cls(path, descriptor)
        try:
            directory._prepare(resume, overwrite)
        except BaseException:
            directory.close()
            raise
        return directory

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        previous = [name for name in RUN_FILES if (self.path / name).exists()]
        if resume and overwrite:
            raise UsageError("--resume continues the run in the output dir and --overwrite replaces it; choose one")
        if previous and not resume and not overwrite:
            raise UsageError(f"output dir {str(self.path)!r} holds a previous run ({', '.join(previous)}); continue it "
                             "with --resume, choose another --output-dir, or replace it with --overwrite")
        for folder in (self.path, self.checkpoints):
            if folder.is_dir():
                remove_stale_temp_files(folder)
        if overwrite:
            for name in previous:
                (self.path / name).unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
