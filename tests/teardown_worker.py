"""A data-parallel worker for test_devices: importable by name, as torch's spawn needs."""

from __future__ import annotations

import atexit
import os
from pathlib import Path


def finish_then_abort_at_teardown(local_rank: int, folder: str) -> int:
    """Do the work (write a file), then make the interpreter's teardown abort the process,
    as a C++ thread of torch's left joinable can (pytorch/pytorch#190489)."""
    Path(folder, f"rank{local_rank}.done").write_text("done")
    atexit.register(os.abort)
    return 0
