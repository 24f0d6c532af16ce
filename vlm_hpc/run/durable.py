"""Crash-safe file writes: a reader sees the old content or the new, never half of it, even after power loss."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from pathlib import Path

from vlm_hpc.errors import VlmHpcError

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path, data: bytes, *, sync_dir: bool = True, temp_dir: Path | None = None) -> None:
    """Write to a temporary file, fsync, rename over `path`. Callers batching many renames into one folder
    pass sync_dir=False and call fsync_dir once; `temp_dir` (same file system) keeps leftovers of a crash
    out of the output folder, where the writer can clear them without listing the outputs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = (temp_dir or path.parent) / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)  # a failed write (disk full) leaves no temporary file behind
        raise
    if sync_dir:
        fsync_dir(path.parent)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def remove_stale_temporaries(folder: Path, pattern: str) -> int:
    """Delete temporary files left by an interrupted write_atomic (`.NAME.PID.tmp`); returns how many."""
    removed = 0
    for path in folder.glob(pattern) if folder.is_dir() else []:
        _remove_quietly(path)
        removed += 1
    return removed


def _syncfs(folder: Path) -> bool:
    """Flush the whole file system holding `folder` (one call instead of an fsync per file); False where
    the platform lacks syncfs."""
    if not hasattr(_LIBC, "syncfs"):
        return False
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        return _LIBC.syncfs(descriptor) == 0
    finally:
        os.close(descriptor)


def write_many_atomic(items: list[tuple[Path, bytes]], temp_dir: Path) -> None:
    """Write several files so that each is either complete or absent after a crash, and all are durable
    on return: temporary files, one flush of their file system, renames, one fsync per folder."""
    temporaries = []
    try:
        for number, (path, data) in enumerate(items):
            temporary = temp_dir / f".{number}.{path.name}.tmp"
            temporaries.append(temporary)
            with open(temporary, "wb") as handle:
                handle.write(data)
        if not _syncfs(temp_dir):
            for temporary in temporaries:
                with open(temporary, "rb+") as handle:
                    os.fsync(handle.fileno())
        folders = set()
        for temporary, (path, _) in zip(temporaries, items):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temporary, path)
            folders.add(path.parent)
    except BaseException:
        for temporary in temporaries:  # those not renamed yet (a renamed one is gone from temp_dir)
            _remove_quietly(temporary)
        raise
    for folder in folders:
        fsync_dir(folder)


def write_json_atomic(path: Path, value: object) -> None:
    write_atomic(path, json.dumps(value, ensure_ascii=False, indent=1).encode())


def append_durable(path: Path, data: bytes, expected_size: int) -> int:
    """Append at `expected_size` (cutting any uncommitted tail first), fsync; return the new size. A file
    shorter than `expected_size` lost committed bytes: an error, never padded (padding glues the next line
    onto a torn one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with open(path, "ab") as handle:
        if handle.tell() < expected_size:
            raise VlmHpcError(f"{path} is {handle.tell()} bytes, shorter than the {expected_size} committed: it "
                              f"lost committed lines; run this slice's worker again, its resume repairs the file")
        if handle.tell() != expected_size:
            handle.truncate(expected_size)
            handle.seek(expected_size)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        size = handle.tell()
    if created:
        fsync_dir(path.parent)
    return size


def truncate_to(path: Path, size: int) -> None:
    """Drop whatever an interrupted append left beyond the committed size."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as handle:
            handle.truncate(size)
            os.fsync(handle.fileno())
