"""One run per folder: ``run_lock(out)`` holds an exclusive ``flock`` on ``out/.lock`` while a run
trains there, so a second run on the same ``--out`` stops at once (``RunBusyError``) instead of
interleaving its metrics and checkpoints with the first. The kernel releases the lock when the
holder exits, however it exits; the file itself stays (removing it would race with a newcomer).
Without ``fcntl`` (Windows) there is no lock.

The lock file is never opened through a link: a symbolic or hard link planted at ``out/.lock``
raises ``files.PlantedLinkError`` (an ``OSError`` naming it), as does any other ``OSError`` about
the folder (``--out`` names a file, a read-only file system): ``gossipgrad train`` says it in
one line (``files.describe``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from gossipgrad.train.files import open_no_link

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunBusyError(RuntimeError):
    """Another run holds the run folder."""


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold the run folder ``folder`` (created if missing) for this process; raise
    ``RunBusyError`` naming the folder and the holder's pid if another process holds it, an
    ``OSError`` naming the path if the folder or its lock file cannot be used."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = open_no_link(root / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunBusyError(
                f"{root} is in use by another run (pid {holder}): wait for it to finish, or "
                "choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
