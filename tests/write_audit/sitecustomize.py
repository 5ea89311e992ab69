"""Loaded by every Python process of a test that puts this folder on PYTHONPATH (spawned
workers included): an audit hook (PEP 578) logs, per process, each file opened for
writing or moved (os.replace) under $WRITE_AUDIT_DIR, and each read of the MNIST data,
to $WRITE_AUDIT_LOG/<pid>.log. tests/test_devices.py reads the logs to learn which
processes wrote a run's files."""

import os
import sys

_WATCHED = os.environ.get("WRITE_AUDIT_DIR")
_LOG_DIR = os.environ.get("WRITE_AUDIT_LOG")

if _WATCHED and _LOG_DIR:
    _descriptor = os.open(os.path.join(_LOG_DIR, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    _busy = []

    def _audit(event, args):
        if _busy or event not in ("open", "os.rename", "os.replace"):
            return
        _busy.append(1)
        try:
            # os.replace(src, dst): the file written is dst.
            target = args[0] if event == "open" else args[1]
            path = os.fsdecode(target) if isinstance(target, (str, bytes, os.PathLike)) else ""
            if event == "open":
                mode, flags = args[1], args[2]
                writing = bool(flags & _WRITE_FLAGS) if isinstance(flags, int) and flags >= 0 else False
                writing = writing or (isinstance(mode, str) and any(c in mode for c in "wax+"))
                kind = "write" if writing else "read"
            else:
                kind = "write"
            if kind == "write" and os.path.abspath(path).startswith(_WATCHED):
                os.write(_descriptor, f"write {path}\n".encode())
            elif kind == "read" and os.path.basename(path).startswith("mnist") and not path.endswith((".py", ".pyc")):
                os.write(_descriptor, f"data {path}\n".encode())
        finally:
            _busy.pop()

    sys.addaudithook(_audit)
