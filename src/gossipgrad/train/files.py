"""The run folder's files: written without following a planted link, read with damage named,
and every ``OSError`` about them said in one line.

    write_atomic(path, b"...")                       # a temporary file, then renamed over path
    write_atomic(path, lambda f: torch.save(obj, f))  # the same, for a writer of file objects
    f = open_replacing(path)                         # a new empty file in place of path
    fd = open_no_link(path, os.O_RDWR | os.O_CREAT)  # refuses a link planted at path
    data = read_json(path)                           # DamagedFile naming the file and why
    data = read_json(path, damaged="skip")           # None, and one warning line, if damaged
    records = read_json_lines(path)                  # damaged lines skipped, one warning line
    describe(error, out)                             # "'PATH': reason; what to do"

Writing: a temporary file is created next to the target with ``O_EXCL`` (which never follows a
link) and renamed over it, so a symbolic link planted at the target is replaced, never written
through, and a reader never sees half a file. A file that must stay in place (the lock) is opened
with ``O_NOFOLLOW`` and refused if it is a link or a hard link. Folders are followed: a run folder
may be a link to another disk.

Reading: every JSON and TOML file the job reads goes through ``parse_text``: a file that is not
UTF-8, not valid, too deeply nested or of the wrong shape raises ``DamagedFile`` with one line
naming it; the caller skips it with a one-line warning or refuses in one line.

This module imports neither torch nor the engines.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal, TextIO, TypeVar

T = TypeVar("T")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_LINK = "is a symbolic link, and the run folder's files are never written through links"
_SHARED = "is a hard link (shared with another file), and the run folder's files are never shared"


class DamagedFile(ValueError):
    """A file the job reads is damaged; the message is one line naming the file and why."""


class PlantedLinkError(OSError):
    """A file of the run folder is a symbolic or hard link; ``strerror`` says which."""


# --- writing ------------------------------------------------------------------------------------


def write_atomic(path: str | Path, data: bytes | str | Callable[[IO[bytes]], object]) -> None:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes into a binary file) to
    ``path`` through a temporary file renamed over it (module docstring)."""
    target = Path(path)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def open_replacing(path: str | Path) -> TextIO:
    """A new, empty text file at ``path``, open for writing: created under a temporary name and
    renamed over ``path``, so a link planted there is replaced, never written through."""
    target = Path(path)
    fd, tmp = _create_temp(target)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    return os.fdopen(fd, "w", encoding="utf-8")


def open_no_link(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags, mode)`` for a plain file of its own: ``PlantedLinkError`` if
    ``path`` is a symbolic link (never followed) or a hard link."""
    try:
        fd = os.open(path, flags | _NOFOLLOW, mode)
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise PlantedLinkError(errno.ELOOP, _LINK, str(path)) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        why = _SHARED if stat.S_ISREG(info.st_mode) else "is not a plain file"
        raise PlantedLinkError(errno.EEXIST, why, str(path))
    return fd


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new file beside ``target`` (``.NAME.RANDOM.tmp``), open for writing; ``O_EXCL`` never
    follows a link. Its mode is 0o666 less the umask, as for any new file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(target))


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# --- reading ------------------------------------------------------------------------------------

Damaged = Literal["refuse", "skip"]


def parse_text(path: str | Path, parse: Callable[[str], T], what: str) -> T:
    """``parse`` of the UTF-8 text of ``path``. ``DamagedFile`` (one line naming the file) if it
    is not UTF-8 or ``parse`` refuses it (``ValueError``, or too deeply nested); an ``OSError``
    (a missing or unreadable file) passes through."""
    name = repr(str(path))
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DamagedFile(
            f"{name} is not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start}): "
            f"save it as UTF-8"
        ) from None
    try:
        return parse(text)
    except RecursionError:
        raise DamagedFile(f"{name} is not valid {what}: nested too deeply") from None
    except ValueError as error:
        raise DamagedFile(f"{name} is not valid {what}: {first_line(error)}") from None


Check = Callable[[Any], "str | None"]


def read_json(path: str | Path, *, damaged: Damaged = "refuse", check: Check | None = None) -> Any:
    """The JSON value in ``path``. Damaged (``parse_text``, or ``check(value)`` returns what is
    wrong with it): ``refuse`` raises ``DamagedFile``; ``skip`` writes one warning line and
    returns None."""
    try:
        value = parse_text(path, json.loads, "JSON")
        problem = check(value) if check is not None else None
        if problem:
            raise DamagedFile(f"{str(path)!r} {problem}")
    except DamagedFile as error:
        if damaged == "refuse":
            raise
        warn(f"{error}; skipped")
        return None
    return value


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one a line; a damaged line (as a full disk or a
    crash leaves at the end) is skipped, with one warning line for the file."""
    bad: list[str] = []

    def parse(text: str) -> list[dict[str, Any]]:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:
                bad.append(f"line {number}: {first_line(error)}")
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(f"line {number}: not a JSON object")
        return records

    try:
        records = parse_text(path, parse, "JSON lines")
    except DamagedFile as error:
        warn(f"{error}; skipped")
        return []
    if bad:
        lines = "line" if len(bad) == 1 else "lines"
        warn(f"{str(path)!r} has {len(bad)} damaged {lines}, skipped ({bad[0]})")
    return records


def warn(message: str) -> None:
    """One line ``gossipgrad: warning: MESSAGE`` on stderr."""
    sys.stderr.write(f"gossipgrad: warning: {message}\n")
    sys.stderr.flush()


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


# --- errors -------------------------------------------------------------------------------------

_REASONS = {
    errno.ENOTDIR: "a part of it is a file, not a folder",
    errno.EROFS: "is on a read-only file system",
    errno.ELOOP: "too many levels of symbolic links",
}


def describe(error: OSError, out: str | Path | None = None) -> str:
    """One line for an ``OSError`` about a file: ``'PATH': reason``, and, for a path in (or
    above) the run folder ``out``, what to do."""
    path = error.filename
    if not isinstance(path, (str, bytes, os.PathLike)):  # none, or a file descriptor
        return first_line(error)
    if isinstance(error, PlantedLinkError):
        reason, fix = error.strerror, "remove it, or choose another --out"
    else:
        reason, fix = _reason(error), "choose another --out"
    name = os.fsdecode(path)
    if out is None or not _related(Path(name), Path(out)):
        return f"{name!r}: {reason}"
    return f"{name!r}: {reason}; {fix}"


def _reason(error: OSError) -> str:
    path = Path(os.fsdecode(error.filename))
    if error.errno == errno.ENAMETOOLONG:
        return _too_long(path)
    if error.errno == errno.EEXIST and (path.is_symlink() or path.exists()) and not path.is_dir():
        return "exists and is not a folder"
    return _REASONS.get(error.errno or 0) or error.strerror or first_line(error)


def _too_long(path: Path) -> str:
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    limit = _name_max(path)
    if longest > limit:
        return f"file name too long (a name of {longest} bytes; the file system allows {limit})"
    return f"file name too long (the path has {len(os.fsencode(str(path)))} bytes)"


def _name_max(path: Path) -> int:
    """The longest file name the file system of ``path`` (its nearest existing folder) allows."""
    for folder in (path, *path.parents):
        try:
            if folder.is_dir():
                return int(os.pathconf(folder, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):
            break
    return 255


def _related(path: Path, out: Path) -> bool:
    """Whether ``path`` is the run folder ``out``, in it, or one of the folders above it."""
    path, out = Path(os.path.abspath(path)), Path(os.path.abspath(out))
    return path == out or out in path.parents or path in out.parents
