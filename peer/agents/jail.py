"""The workspace jail: open a file beneath the workspace without following a link anywhere.

Theory of operation. Resolving a path and opening it later leaves a window in which a
component can be swapped for a symbolic link leading out. So nothing here resolves: every
open starts from a descriptor of the workspace and refuses links at every step, in one
system call where the kernel can (Linux `openat2` with `RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS`, through libc's `syscall` since the standard library has no binding),
else one component at a time (`O_NOFOLLOW | O_DIRECTORY` relative to the previous directory's
descriptor). Directories a write needs are created the second way, each opened as it is made.

Invariants:
- A path is relative, has no "..", no NUL, and names something other than the workspace
  itself; it is checked before any file system access (`relative_parts`).
- No symbolic link is followed, inside the workspace or out, so what is opened lies beneath
  the workspace whatever changes meanwhile; only regular files are read or written.
- No file that has another name is read or written: a hard link inside the workspace may
  name a file outside it (anyone who can write both directories can make one), so a regular
  file with more than one link is refused. The check is `fstat` on the descriptor already
  opened (a write's without `O_TRUNC`), before a byte is read or the file truncated, so no
  rename or link swap in between can change which file is checked.
- Every refusal is a `ValueError` whose text says what was refused and why (the agent's tool
  sees it), and is counted by operation and reason (`JAIL_REFUSALS`) per workspace:
  `refusals_in(workspace)`, exported by the peer's metrics.
- Where `openat2` is missing (older kernels, other systems, seccomp filters answering ENOSYS
  or EPERM), the component walk is used; both refuse the same paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import stat
import sys
import typing
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

OPENAT2_SYSCALLS = {"x86_64": 437, "aarch64": 437}
"""`openat2`'s number per machine (Linux >= 5.6; both use the generic table's number)."""
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_CLOSE = os.O_CLOEXEC
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOSE
_LINK_ERRORS = (errno.ELOOP, errno.EXDEV, errno.ENOTDIR)
"""What an open answers when it meets a link it may not follow, or leaves the tree."""
JAIL_REFUSALS = ("bad_path", "link", "not_regular", "hard_link", "too_large")
"""Why the jail refused a path: not a plain relative path, a symbolic link or a way out met,
not a regular file, a file with other hard links, a file over the read limit."""
_REFUSALS: dict[str, Counter[tuple[str, str]]] = {}
"""Refusals by workspace (its absolute path), then by (operation, reason)."""


def refusals_in(workspace: Path) -> Counter[tuple[str, str]]:
    """The jail's refusals in `workspace` since the process started, by (operation, reason):
    operation "read" or "write", reason one of `JAIL_REFUSALS`. Kept per workspace, so peers
    in one process with workspaces of their own count apart."""
    return _REFUSALS.setdefault(os.path.abspath(workspace), Counter())


class _Refused(ValueError):
    """A refusal inside the jail, with the reason it is counted under."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


@contextlib.contextmanager
def _counted(workspace: Path, operation: str) -> typing.Iterator[None]:
    """Count a refusal raised inside, and hand it on as a plain `ValueError`."""
    try:
        yield
    except _Refused as exc:
        refusals_in(workspace)[operation, exc.reason] += 1
        raise ValueError(str(exc)) from None


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class Openat2:
    """`openat2(2)` through libc's `syscall`, until the kernel says it has none.

    Args:
        number: the system call's number on this machine; None where it is unknown.
    """

    def __init__(self, number: int | None) -> None:
        self.number = number
        self.available = number is not None
        self._syscall: Callable[..., int] | None = None
        if number is not None:
            syscall = ctypes.CDLL(None, use_errno=True).syscall
            syscall.restype = ctypes.c_long
            self._syscall = syscall

    def open(self, dir_fd: int, path: str, flags: int, mode: int) -> int | None:
        """Open `path` beneath `dir_fd`, no link followed; None when `openat2` is missing.

        Raises:
            OSError: the open failed (ELOOP or EXDEV: a link, or a way out, was met).
        """
        if not self.available or self._syscall is None or self.number is None:
            return None
        how = _OpenHow(flags, mode, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        fd = self._syscall(
            ctypes.c_long(self.number),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EPERM):
            self.available = False
            return None
        raise OSError(code, os.strerror(code), path)


OPENAT2 = Openat2(OPENAT2_SYSCALLS.get(platform.machine()) if sys.platform == "linux" else None)
"""The one `openat2` of this process (tests turn it off to exercise the component walk)."""


def relative_parts(path: str) -> tuple[str, ...]:
    """The components of a workspace path, checked before anything is opened.

    Raises:
        ValueError: `path` is empty, contains NUL, is absolute, contains "..", or names the
            workspace itself.
    """
    if not path or "\x00" in path:
        raise _Refused("bad_path", "the path is empty")
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or Path(path).is_absolute():
        raise _Refused("bad_path", f"{path!r} is absolute; give a path relative to the workspace")
    if ".." in pure.parts:
        raise _Refused("bad_path", f"{path!r} contains '..'; the workspace is the limit")
    if not pure.parts:
        raise _Refused("bad_path", f"{path!r} leads outside the workspace")
    return pure.parts


def read_beneath(workspace: Path, path: str, limit: int) -> bytes:
    """The content of the regular file `path` beneath `workspace`.

    Raises:
        ValueError: a bad path, a link met on the way, not a regular file, a file with other
            hard links, or over `limit` bytes (counted in `refusals_in`). OSError: the file
            cannot be opened (FileNotFoundError: it does not exist).
    """
    with _counted(workspace, "read"):
        parts = relative_parts(path)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOSE
        root = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | _CLOSE)
        try:
            fd = _open_no_links(root, parts, flags, 0, path)
        finally:
            os.close(root)
        with _regular_file(fd, path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise _Refused(
                    "too_large", f"{path} is {size} bytes, more than the {limit // 1024} KiB limit"
                )
            return file.read(limit + 1)[:limit]


def write_beneath(workspace: Path, path: str, data: bytes) -> None:
    """Replace the content of the file `path` beneath `workspace`, creating it and its
    parent directories as needed.

    Raises:
        ValueError: a bad path, a link met on the way, not a regular file, or a file with
            other hard links (counted in `refusals_in`). OSError: it cannot be created or
            written.
    """
    with _counted(workspace, "write"):
        parts = relative_parts(path)
        workspace.mkdir(parents=True, exist_ok=True)  # the operator's: trusted, links and all
        directory = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | _CLOSE)
        try:
            for name in parts[:-1]:
                # An existing directory is fine; a link in its place fails the open below.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, dir_fd=directory)
                parent, directory = directory, -1
                directory = _step(parent, name, path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOSE
            fd = _open_no_links(directory, parts[-1:], flags, 0o644, path)
        finally:
            if directory >= 0:
                os.close(directory)
        with _regular_file(fd, path, "wb") as file:
            file.truncate(0)
            file.write(data)


def _regular_file(fd: int, path: str, mode: str) -> BinaryIO:
    """A file object over `fd` if it is a regular file (not a pipe, device or directory) with
    no other hard link; `fd` is closed otherwise."""
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise _Refused("not_regular", f"{path!r} is not a regular file")
        if status.st_nlink > 1 and mode == "wb":
            raise _Refused(
                "hard_link",
                f"{path!r} has {status.st_nlink} hard links: writing it would change the file "
                "under its other names too, maybe outside the workspace (hard-linked files are "
                "not written)",
            )
        if status.st_nlink > 1:
            raise _Refused(
                "hard_link",
                f"{path!r} has {status.st_nlink} hard links: another name may be a file outside "
                "the workspace (hard-linked files are not read); copy it into the workspace "
                "instead",
            )
        return typing.cast(BinaryIO, os.fdopen(fd, mode))
    except BaseException:
        os.close(fd)
        raise


def _open_no_links(root: int, parts: tuple[str, ...], flags: int, mode: int, path: str) -> int:
    """Open `parts` beneath the directory `root` with no link followed; a descriptor."""
    try:
        fd = OPENAT2.open(root, "/".join(parts), flags, mode)
    except OSError as exc:
        raise _refusal(exc, path) from None
    if fd is not None:
        return fd
    directory = os.dup(root)
    try:
        for name in parts[:-1]:
            parent, directory = directory, -1
            directory = _step(parent, name, path)
        try:
            return os.open(parts[-1], flags, mode, dir_fd=directory)
        except OSError as exc:
            raise _refusal(exc, path) from None
    finally:
        if directory >= 0:
            os.close(directory)


def _step(directory: int, name: str, path: str) -> int:
    """Open the subdirectory `name` of `directory` (not a link), closing `directory`."""
    try:
        return os.open(name, _DIRECTORY, dir_fd=directory)
    except OSError as exc:
        raise _refusal(exc, path) from None
    finally:
        os.close(directory)


def _refusal(exc: OSError, path: str) -> Exception:
    if exc.errno in _LINK_ERRORS:
        return _Refused(
            "link",
            f"{path!r} leads outside the workspace, or through a symbolic link or a file "
            "(links are not followed)",
        )
    return exc
