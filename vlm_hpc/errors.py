"""The one exception type users see: a single line naming what was wrong, where, and what to do."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

USER_ERROR_STATUS = 2  # what every command exits with when it refuses the user's input


class VlmHpcError(Exception):
    """A problem with the user's input (files, config, data); printed as one line, never a traceback."""


def print_error(exc: VlmHpcError) -> int:
    """How every command reports a VlmHpcError: `error: ...` on stderr; returns the exit status to end with."""
    print(f"error: {exc}", file=sys.stderr)
    return USER_ERROR_STATUS


class ImageRejected(VlmHpcError):
    """An image that cannot be captioned; `reason` is a short machine-readable tag for the failure ledger."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_IO_PROBLEMS = {"ENOSPC": "disk full", "EDQUOT": "disk quota exceeded", "EACCES": "permission denied",
                "EPERM": "operation not permitted", "EROFS": "read-only file system", "EIO": "I/O error",
                "ESTALE": "stale NFS file handle"}


def io_problem(exc: OSError) -> str:
    """A short name for what went wrong ("disk full"), for a slice's status."""
    code = errno.errorcode.get(exc.errno or 0, "")
    return f"{_IO_PROBLEMS.get(code, exc.strerror or 'I/O error')} ({code or exc.errno})"


def io_error_line(exc: OSError, root: Path) -> str:
    """One line for an I/O error on the output folder: the path, the operation's problem, and what to do."""
    named = exc.filename2 or exc.filename  # a rename names its destination second: usually the folder at fault
    path = Path(named) if named else root
    folder = path.parent if path != root else root
    code = errno.errorcode.get(exc.errno or 0, "")
    if code in ("ENOSPC", "EDQUOT"):
        hint = f"free space there (see: df -h {folder}) or set output.dir elsewhere"
    elif code in ("EACCES", "EPERM", "EROFS"):
        hint = f"make it writable for this user (see: ls -ld {folder}) or set output.dir elsewhere"
    else:
        hint = "check that file system, or set output.dir elsewhere"
    return f"output: {io_problem(exc)} on {path}: {exc.strerror}; {hint}, then run the same command again"
