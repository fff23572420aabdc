"""Who runs a process and whether it still runs: the owner of a sweep trial or an MLflow run.

A process is named by (host, pid, the pid's start time): a pid alone may be reused by another
process after the first one died.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

HOST = socket.gethostname()


def proc_start(pid: int) -> str | None:
    """The process's start time (to tell a reused pid), or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def alive(pid, start) -> bool:
    """Whether process ``pid`` of this host, started at ``start`` (``proc_start``; None: unknown), runs."""
    if not isinstance(pid, int):
        return False
    if Path("/proc").is_dir():
        now = proc_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def owner() -> dict[str, str]:
    """This process as tags: host, pid, pid_start."""
    pid = os.getpid()
    return {"host": HOST, "pid": str(pid), "pid_start": proc_start(pid) or ""}
