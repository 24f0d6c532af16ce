"""What the sharded readers share: data.path as shard files, and the shard list kept in the run's input cache.

data.path is one file, a folder (the shard files directly in it) or a pattern: brace alternatives and ranges
(`/data/laion/{00000..09999}.tar`, `{a,b}`) and globs (`shards/*.parquet`, `**`). Shards are ordered by their
name relative to the pattern's fixed leading folder, so the global row order is the same on every node,
wherever the folder is mounted.

The shard list (each shard's name, size, mtime and row count) is computed once, by the first start that opens
the input with an input cache (`vlm_hpc.run.layout.InputCache`, OUTPUT/inputs/), and read back by every later
start instead of opening every shard. A later start still lists the shard folder (one directory read), so a
shard deleted or added since is named at once. A shard is compared with its recorded size and mtime when a
process first reads it: one that differs (rewritten, or a copy elsewhere) is described again, and refused by
name when its row count changed, since every later row would move; with the same count it is read, and the
slices' content fingerprints (`vlm_hpc.run.manifest`) decide whether its rows are still the run's.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.durable import write_atomic
from vlm_hpc.run.layout import InputCache

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB = re.compile(r"[*?\[]")

START_OVER = "or start the run over: a new output.dir, or vlm_hpc.submit's --force"


class InputsChanged(VlmHpcError):
    """A shard the run's first start listed is gone or changed, or a new one matches data.path."""


def is_pattern(text: str) -> bool:
    """Whether data.path names several files by braces or glob characters."""
    return bool(_BRACE.search(text) or _GLOB.search(text))


def expand_braces(pattern: str) -> list[str]:
    """`{a,b}` alternatives and `{000..099}` ranges (zero-padded as written), left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    bounds = _RANGE.fullmatch(body)
    if bounds:
        first, last = int(bounds.group(1)), int(bounds.group(2))
        padded = any(b.lstrip("-").startswith("0") and len(b.lstrip("-")) > 1 for b in bounds.groups())
        width = max(len(b) for b in bounds.groups()) if padded else 0
        step = 1 if last >= first else -1
        choices = [f"{n:0{width}d}" for n in range(first, last + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # `{x}` alone is a literal name part
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def pattern_root(pattern: str) -> Path:
    """The folder of a pattern's leading parts that hold no pattern: shard names are relative to it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if is_pattern(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def expand_shards(path_text: str, suffixes: tuple[str, ...], kind: str) -> tuple[Path, list[Path]]:
    """The shard files data.path names, in name order, with the folder their names are relative to.

    A file is itself (whatever its suffix: data.format chose it); a folder gives the files directly in it with
    one of `suffixes`; a pattern gives the files it matches with one of `suffixes`. One error naming data.path
    when nothing matches or a brace name does not exist."""
    path = Path(path_text)
    if not is_pattern(path_text):
        if path.is_file():
            return path.parent, [path]
        if path.is_dir():
            files = [p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file()]
            if not files:
                raise VlmHpcError(f"data: the folder {path} holds no {kind} files ({', '.join(suffixes)}); "
                                  "set data.path to the folder of the shards, or to a glob of them")
            return path, sorted(files, key=lambda p: p.name)
        raise VlmHpcError(f"data: {path} does not exist; set data.path to a {kind} file, a folder of them or a "
                          "pattern (e.g. /data/{00000..00099}.tar or shards/*.parquet)")
    root = pattern_root(path_text)
    found: dict[str, Path] = {}
    missing: list[str] = []
    listings: dict[str, set[str]] = {}  # one directory read per folder, not one stat per brace name
    for choice in expand_braces(path_text):
        if _GLOB.search(choice):
            matches = [Path(m) for m in glob.glob(choice, recursive=True)]
            found.update((str(m), m) for m in matches if m.suffix.lower() in suffixes and m.is_file())
            continue
        folder, name = os.path.split(choice)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder or "."))
            except OSError:
                listings[folder] = set()
        if name in listings[folder]:
            found[choice] = Path(choice)
        else:
            missing.append(choice)
    if not found:
        raise VlmHpcError(f"data: data.path {path_text} matches no {kind} files; check the pattern "
                          "(brace ranges like {00000..00099}, globs like shards/*.tar)")
    if missing:
        raise VlmHpcError(f"data: data.path {path_text} names {len(missing)} files that do not exist (the first: "
                          f"{missing[0]}); narrow the brace range, or use a glob to take the shards that exist")
    files = list(found.values())
    return root, sorted(files, key=lambda p: relative_name(p, root))


def relative_name(path: Path, root: Path) -> str:
    """A shard's name: its path relative to `root`, with forward slashes."""
    return Path(os.path.relpath(path, root)).as_posix()


@dataclass(frozen=True)
class Shard:
    """One shard as the first start found it; `sidecar` is a file read with it (img2dataset's .parquet
    beside a tar), also compared on later starts."""

    name: str
    size: int
    mtime_ns: int
    rows: int
    sidecar: str | None = None
    sidecar_size: int = -1
    sidecar_mtime_ns: int = -1


def stat_shard(path: Path, root: Path, rows: int, sidecar: Path | None = None) -> Shard:
    """The record of shard `path` with `rows` rows (and its sidecar file), as it is now."""
    status = path.stat()
    extra = {}
    if sidecar is not None:
        side = sidecar.stat()
        extra = {"sidecar": relative_name(sidecar, root), "sidecar_size": side.st_size,
                 "sidecar_mtime_ns": side.st_mtime_ns}
    return Shard(relative_name(path, root), status.st_size, status.st_mtime_ns, rows, **extra)


@dataclass
class ShardList:
    """The shards in row order and where each one's rows start in the global row order; `describe` describes a
    shard again when it is not as recorded."""

    root: Path
    shards: list[Shard]
    describe: Callable[[Path], Shard]
    cache_file: Path | None = None  # where the list was recorded (named in errors)
    offsets: list[int] = field(init=False)  # first global row of each shard, then the total
    _checked: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.offsets = [0]
        for shard in self.shards:
            self.offsets.append(self.offsets[-1] + shard.rows)

    @property
    def total_rows(self) -> int:
        return self.offsets[-1]

    def path(self, index: int) -> Path:
        return self.root / self.shards[index].name

    def spans(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, first row in it, stop row in it) of every shard that rows [start, stop) touch, in order;
        empty shards are skipped."""
        index = bisect.bisect_right(self.offsets, start) - 1
        while index < len(self.shards) and self.offsets[index] < stop:
            first, end = max(start, self.offsets[index]), min(stop, self.offsets[index + 1])
            if first < end:
                yield index, first - self.offsets[index], end - self.offsets[index]
            index += 1

    def digest(self, kind: str) -> str:
        """What fixes the global row order wherever the shards are mounted: names and row counts (contents are
        the slices' fingerprints' business; sizes and mtimes only tell when to look again)."""
        described = [kind] + [[s.name, s.rows, s.sidecar] for s in self.shards]
        return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]

    def checked_path(self, index: int) -> Path:
        """Shard `index`'s path, once it is as recorded, or described again with the same row count; checked
        once per process."""
        path = self.path(index)
        if index in self._checked:
            return path
        shard = self.shards[index]
        files = [(path, shard.size, shard.mtime_ns)]
        if shard.sidecar is not None:
            files.append((self.root / shard.sidecar, shard.sidecar_size, shard.sidecar_mtime_ns))
        if any(self._differs(*file) for file in files):
            fresh = self.describe(path)
            if fresh.rows != shard.rows:
                raise InputsChanged(f"data: shard {path} changed since the run's first start listed it"
                                    f"{self._where()}: {shard.rows} rows then, {fresh.rows} now ({shard.size} bytes "
                                    f"then, {fresh.size} now), so every later row would move; restore it, "
                                    f"{START_OVER}")
            self.shards[index] = fresh
        self._checked.add(index)
        return path

    def _where(self) -> str:
        return f" (in {self.cache_file})" if self.cache_file else ""

    def _differs(self, path: Path, size: int, mtime_ns: int) -> bool:
        try:
            status = path.stat()
        except FileNotFoundError:
            raise InputsChanged(f"data: shard file {path} is gone since the run's first start listed it"
                                f"{self._where()}; restore it, {START_OVER}") from None
        return (status.st_size, status.st_mtime_ns) != (size, mtime_ns)


def shard_list(kind: str, root: Path, files: list[Path], cache: InputCache | None, depends_on: object,
               describe: Callable[[Path], Shard]) -> ShardList:
    """The shard list of `files`: read from `cache` when its record is of these files and settings
    (`depends_on`: what the row counts and checks depend on, e.g. the column names), else made by `describe`
    (which opens the shard: footers, tar headers) and recorded there. One InputsChanged error when the files
    differ from the recorded ones (a shard gone, or a new one)."""
    names = [relative_name(f, root) for f in files]
    recorded = _recorded(cache, kind, depends_on)
    if recorded is not None:
        _compare_names(recorded, names, root, cache.shard_list)
        return ShardList(root, recorded, describe, cache.shard_list)
    shards = [describe(f) for f in files]
    if cache is not None:
        record = {"format": kind, "depends_on": depends_on, "shards": [asdict(s) for s in shards]}
        try:
            write_atomic(cache.shard_list, json.dumps(record, indent=0).encode())
        except OSError as exc:
            raise VlmHpcError(f"output: cannot write the input's shard list {cache.shard_list} ({exc}); set "
                              "output.dir to a writable folder") from None
    return ShardList(root, shards, describe, cache.shard_list if cache else None)


def _recorded(cache: InputCache | None, kind: str, depends_on: object) -> list[Shard] | None:
    """The recorded shards, if the cache holds a readable record made with the same settings (a cache: a
    damaged or other record is made again, and the manifest's digest of it catches a changed input)."""
    if cache is None or not cache.shard_list.exists():
        return None
    try:
        record = json.loads(cache.shard_list.read_bytes())
        if record["format"] != kind or record["depends_on"] != json.loads(json.dumps(depends_on)):
            return None
        return [Shard(**item) for item in record["shards"]]
    except (ValueError, KeyError, TypeError):
        return None


def _compare_names(recorded: list[Shard], names: list[str], root: Path, cache_file: Path) -> None:
    then = [s.name for s in recorded]
    if then == names:
        return
    now_names, then_names = set(names), set(then)
    gone = [n for n in then if n not in now_names]
    if gone:
        raise InputsChanged(f"data: shard {root / gone[0]} is gone since the run's first start listed it in "
                            f"{cache_file} ({len(gone)} shards missing); restore it, {START_OVER}")
    new = [n for n in names if n not in then_names]
    if new:
        raise InputsChanged(f"data: {root / new[0]} matches data.path but was not there when the run's first start "
                            f"listed the shards in {cache_file} ({len(new)} new); the run's rows were fixed then: "
                            f"move it away, {START_OVER}")
    raise InputsChanged(f"data: the shards in {root} are in another order than {cache_file} recorded; {START_OVER}")
