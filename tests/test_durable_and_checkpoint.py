"""Crash-safe writes and the slice index on their own (real files; failures made by real permissions and paths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.checkpoint import CorruptCheckpoint, SliceCheckpoint, add_interval, intervals_of
from vlm_hpc.run.durable import append_durable, remove_stale_temporaries, truncate_to, write_atomic, write_many_atomic
from vlm_hpc.run.failures import OutcomeCounts


def test_write_atomic_replaces_whole_and_leaves_no_temporary_even_when_it_fails(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    (tmp_path / "dir_in_the_way").mkdir()
    (tmp_path / "dir_in_the_way" / "x").write_text("keeps it non-empty")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "dir_in_the_way", b"cannot replace a folder")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_write_many_atomic_cleans_its_temporaries_when_a_rename_fails(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    (tmp_path / "blocked").write_text("a file where a folder is needed")
    with pytest.raises(OSError):
        write_many_atomic([(tmp_path / "ok.json", b"1"), (tmp_path / "blocked" / "x.json", b"2")], temp)
    assert list(temp.iterdir()) == []


def test_remove_stale_temporaries_removes_only_the_pattern(tmp_path: Path) -> None:
    names = (".slice_00001.json.123.tmp", ".slice_00001.lease.9.tmp", "slice_00001.json", ".slice_00002.json.5.tmp")
    for name in names:
        (tmp_path / name).write_text("x")
    assert remove_stale_temporaries(tmp_path, ".slice_00001.*.tmp") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".slice_00002.json.5.tmp", "slice_00001.json"]
    assert remove_stale_temporaries(tmp_path / "absent", "*") == 0


def test_append_durable_cuts_an_uncommitted_tail_and_refuses_to_pad(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    size = append_durable(path, b'{"row": 0}\n', 0)
    with open(path, "ab") as handle:
        handle.write(b'{"row": 1, "torn')  # an append a crash interrupted
    size = append_durable(path, b'{"row": 2}\n', size)
    assert path.read_bytes() == b'{"row": 0}\n{"row": 2}\n' and size == path.stat().st_size
    truncate_to(path, 5)
    with pytest.raises(VlmHpcError, match="shorter than the 22 committed"):
        append_durable(path, b'{"row": 3}\n', size)
    assert path.read_bytes() == b'{"row"'[:5]  # nothing padded, nothing appended


def test_intervals_merge_and_pending_rows_follow_them() -> None:
    assert add_interval([[0, 2], [5, 7]], 2, 5) == [[0, 7]]
    assert add_interval([[3, 4]], 0, 1) == [[0, 1], [3, 4]]
    assert intervals_of({4, 1, 2, 7}) == [[1, 3], [4, 5], [7, 8]]
    checkpoint = SliceCheckpoint(slice=1, num_slices=2, start=10, stop=20, done=[[10, 12], [15, 16]])
    assert checkpoint.pending_rows() == [12, 13, 14, 16, 17, 18, 19]
    assert checkpoint.finished_rows == 3 and not checkpoint.complete


def test_commit_saves_atomically_and_load_reads_it_back(tmp_path: Path) -> None:
    path = tmp_path / "slice_00000.json"
    checkpoint = SliceCheckpoint(slice=0, num_slices=1, start=0, stop=4)
    checkpoint.commit(path, [0, 1], OutcomeCounts(2, 0, {"truncated": 1}, {}), output_state={"captions_offset": 40},
                      failures_offset=10, samples=1, seconds=0.5)
    checkpoint.commit(path, [3], OutcomeCounts(0, 1, {}, {"empty": 1}), output_state={"captions_offset": 40},
                      failures_offset=20, samples=0, seconds=0.5)
    loaded = SliceCheckpoint.load(path)
    assert loaded.done == [[0, 2], [3, 4]] and (loaded.captions, loaded.failures) == (2, 1)
    assert loaded.outcomes().describe() == "2 captioned (1 with a warning: truncated), 1 failed (1 empty)"
    assert (loaded.captions_offset, loaded.failures_offset, loaded.sample_images) == (40, 20, 1)
    assert SliceCheckpoint.load(tmp_path / "absent.json") is None


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[]", json.dumps({"slice": "zero"}).encode(),
                                     json.dumps({"slice": 0, "num_slices": 1, "start": 0, "stop": 4,
                                                 "done": [[3, 2]]}).encode(),
                                     json.dumps({"slice": 0, "num_slices": 1, "start": 0, "stop": 4,
                                                 "failed_by_reason": {"empty": -1}}).encode(),
                                     json.dumps({"slice": 0, "num_slices": 1, "start": 0, "stop": 4,
                                                 "warned_by_reason": ["truncated"]}).encode()])
def test_a_damaged_index_is_a_corrupt_index_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "slice_00000.json"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpoint) as raised:
        SliceCheckpoint.load(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
