"""The slice worker on the tiny golden model: exact captions, bad rows, stops, leases, crashes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest

from builders import (
    committed_rows,
    make_dataset,
    noise_dataset,
    png,
    read_captions,
    slice_state,
    slow_dataset,
    start_worker,
    stop,
    wait_for,
    write_config,
)
from golden import GOLDEN, load_golden
from vlm_hpc.config import load_config
from vlm_hpc.engines.base import Engine, EngineOutOfMemory
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.verify import verify

E2E = load_golden("e2e_golden.json")
GOLDEN_CAPTIONS = dict(zip(E2E["batch"]["keys"], E2E["batch"]["responses"]))


@pytest.mark.parametrize(("num_slices", "output_format"), [(1, "json"), (2, "json"), (4, "jsonl"), (15, "json")])
def test_golden_dataset_gives_the_golden_captions_for_any_slicing(
        num_slices: int, output_format: str, golden_model_dir: Path, tmp_path: Path, shared_engine) -> None:
    output = tmp_path / "out"
    config_path = write_config(tmp_path / "c.yaml", golden_model_dir, GOLDEN / "dataset", output,
                               output={"format": output_format}, worker={"loader_workers": 0 if num_slices > 2 else 1})
    config = load_config(config_path)
    for slice_id in range(num_slices):
        assert run_slice(config, slice_id, num_slices, engine_factory=shared_engine).status == "done"
    captions = read_captions(output)
    slice_id = json.loads((GOLDEN / "images" / "index.json").read_text())["images"]
    assert set(captions) == {item["key"] for item in slice_id}
    assert {key: captions[key]["vlm_caption"] for key in GOLDEN_CAPTIONS} == GOLDEN_CAPTIONS
    assert all(captions[item["key"]]["web_caption"] == item["caption"] for item in slice_id)
    report = verify(output)
    assert report.ok and report.captioned == 15, report
    assert all((output / f"end{i}.txt").exists() for i in range(num_slices))
    assert (output / "queries" / "query.txt").read_text() == config.prompt.question
    ledger = [json.loads(line) for path in sorted((output / "failures").glob("*.jsonl"))
              for line in path.read_text().splitlines()]
    assert [(entry["key"], entry["reason"], entry["captioned"]) for entry in ledger] == \
        [("v15_truncated_800x600", "truncated", True)]
    stamp = json.loads((output / "stamps" / "slice_00000.json").read_text())[0]
    assert stamp["model_fingerprint"] and stamp["prompt_sha256"] and stamp["generation"]["do_sample"] is False


def logged_batches(output: Path, num_slices: int) -> list[list[int]]:
    text = "".join((output / "logs" / f"slice_{i:05d}.log").read_text() for i in range(num_slices))
    return [[int(r) for r in rows.split(",")] for rows in re.findall(r"computed rows=([\d,]+)", text)]


@pytest.mark.parametrize(("num_slices", "generation"), [
    (1, {"tile_budget": 12, "sort_window": 5, "batch_size": 64, "vision_batch": 4}),
    (2, {"tile_budget": 40, "sort_window": 15, "batch_size": 8}),
    (1, {"tile_budget": "auto", "sort_window": 4, "batch_size": 3, "vision_batch": 7}),
])
def test_tile_budget_batches_sort_by_tiles_and_give_the_golden_captions(
        num_slices: int, generation: dict, golden_model_dir: Path, tmp_path: Path, shared_engine) -> None:
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, GOLDEN / "dataset", output,
                                      generation=generation, worker={"loader_workers": 1}))
    for slice_id in range(num_slices):
        assert run_slice(config, slice_id, num_slices, engine_factory=shared_engine).status == "done"
    captions = read_captions(output)
    assert {key: captions[key]["vlm_caption"] for key in GOLDEN_CAPTIONS} == GOLDEN_CAPTIONS
    assert verify(output).ok and verify(output).captioned == 15
    from vlm_hpc.preprocess.decode import decode_image
    from vlm_hpc.preprocess.tiling import tile_count
    from vlm_hpc.run.readers import open_reader
    tiles = {}
    for row in open_reader(config.data).read(0, 15):
        try:
            image = decode_image(row.image).image
            tiles[row.row] = tile_count(image.width, image.height, config.tiling.max_num)
        except Exception:
            pass
    budget = generation["tile_budget"] if generation["tile_budget"] != "auto" else 3 * (config.tiling.max_num + 1)
    batches = logged_batches(output, num_slices)
    assert sorted(r for b in batches for r in b) == list(range(15))
    for batch in batches:
        counts = [tiles[r] for r in batch if r in tiles]
        assert len(batch) <= generation["batch_size"] and (sum(counts) <= budget or len(batch) == 1)
        assert counts == sorted(counts)


def bomb_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def bad_rows() -> list[tuple[str | None, bytes | None, str | None]]:
    """Every kind of bad row among good ones: 9 captioned (the truncated one with a warning), 6 failed."""
    good = png(1)
    truncated = png(2, (300, 200))
    return [
        ("ok_first", good, "fine"),
        ("zero_bytes", b"", "x"),
        ("not_an_image", b"hello world, I am text", "x"),
        ("truncated", truncated[: len(truncated) * 6 // 10], "x"),
        ("one_pixel", png(3, (1, 1)), "x"),
        ("very_wide", png(4, (100000, 10)), "x"),
        ("bomb", bomb_png(), "x"),
        ("no_image", None, "x"),
        ("ok_first", png(5), "duplicate key"),
        ("../escape", good, "x"),
        ("/abs/path", good, "x"),
        ("nul\x00key", good, "x"),
        ("k" * 300, good, "x"),
        (None, good, "no key"),
        ("no_caption", good, None),
    ]


def test_bad_rows_are_recorded_and_the_slice_completes(golden_model_dir: Path, tmp_path: Path, shared_engine) -> None:
    data = make_dataset(tmp_path / "data", bad_rows())
    output = tmp_path / "work" / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, data, output))
    assert run_slice(config, 0, 1, engine_factory=shared_engine).status == "done"
    report = verify(output)
    assert report.ok, report
    ledger = {(e["row"], e["reason"], e["captioned"])
              for e in map(json.loads, (output / "failures" / "slice_00000.jsonl").read_text().splitlines())}
    assert ledger == {(1, "empty", False), (2, "undecodable", False), (3, "truncated", True),
                      (6, "too_many_pixels", False), (7, "missing", False), (8, "duplicate_key", False),
                      (13, "missing_key", False)}
    captions = read_captions(output)
    assert {"one_pixel", "very_wide", "truncated", "ok_first", "no_caption"} <= set(captions)
    assert captions["no_caption"]["web_caption"] is None
    assert report.captioned == 9 and report.failed == 6
    everything = [p.resolve() for p in (tmp_path / "work").rglob("*")]
    assert all(p.is_relative_to(output.resolve()) for p in everything)
    assert not (tmp_path / "escape").exists() and not Path("/abs/path.json").exists()


def test_submit_status_verify_the_index_and_the_ledger_count_outcomes_alike(golden_model_dir: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    """One vocabulary: captioned (a truncated image among them, with a warning) and failed, by reason; the
    truncated row is in the ledger and counted as captioned everywhere, never as 0 failures beside it."""
    from vlm_hpc import status, submit
    from vlm_hpc import verify as verify_command

    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, make_dataset(tmp_path / "data", bad_rows()), output)
    assert submit.main(["--config", str(config), "--array", "0-1", "--cluster", "debug", "--wait"]) == 0
    submitted = capsys.readouterr().out.splitlines()
    first = "4 captioned (1 with a warning: truncated), 4 failed (1 empty, 1 missing, 1 too_many_pixels, 1 undecodable)"
    second = "5 captioned, 2 failed (1 duplicate_key, 1 missing_key)"
    total = ("9 captioned (1 with a warning: truncated), 6 failed (1 duplicate_key, 1 empty, 1 missing, 1 missing_key, "
             "1 too_many_pixels, 1 undecodable)")
    assert submitted[-5:-3] == [f"slice 0: done: {first}", f"slice 1: done: {second}"], submitted
    assert re.fullmatch(rf"finished in \d\d:\d\d:\d\d: 15/15 rows \(100\.0%\): {re.escape(total)}; slices: 2 done",
                        submitted[-3]), submitted
    for slice_id, line in enumerate((first, second)):
        assert f"| done: {line}\n" in (output / "logs" / f"slice_{slice_id:05d}.log").read_text()
        assert slice_state(output, slice_id)["warned_by_reason"] == ({"truncated": 1} if slice_id == 0 else {})
    ledger = [json.loads(line) for path in sorted((output / "failures").glob("*.jsonl"))
              for line in path.read_text().splitlines()]
    assert {(e["key"], e["outcome"]) for e in ledger if e["captioned"]} == {("truncated", "warned")}
    assert {e["outcome"] for e in ledger if not e["captioned"]} == {"failed"} and len(ledger) == 7
    assert verify_command.main([str(output)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{output}: 15 rows: {total}, 0 pending; 0 lost, 0 duplicate, " \
                                                      "0 orphan, 0 corrupt"
    assert status.main([str(output)]) == 0
    assert f"total: 15/15 rows (100.0%): {total}; slices: 2 done" in capsys.readouterr().out
    # A lost index rebuilt from the outputs counts the same.
    (output / "state" / "slice_00000.json").unlink()
    assert verify_command.main([str(output), "--repair"]) == 0
    assert f"8/8 rows done, {first}" in capsys.readouterr().err
    assert slice_state(output, 0)["warned_by_reason"] == {"truncated": 1} and verify(output).describe() == total


def test_missing_model_column_or_bad_config_is_one_line_before_any_model_load(golden_model_dir: Path,
                                                                               tmp_path: Path) -> None:
    data = noise_dataset(tmp_path / "data", 3)
    cases = [
        (write_config(tmp_path / "a.yaml", tmp_path / "no_model", data, tmp_path / "o1"), [], "model:"),
        (write_config(tmp_path / "b.yaml", golden_model_dir, data, tmp_path / "o2", data={"image_column": "jpg"}),
         [], "column 'jpg'"),
        # Text as the image column would fail every row as missing and verify OK with no caption: refused.
        (write_config(tmp_path / "e.yaml", golden_model_dir, data, tmp_path / "o5", data={"image_column": "caption"}),
         [], "column 'caption' (data.image_column) of"),
        (write_config(tmp_path / "c.yaml", golden_model_dir, data, tmp_path / "o3"), ["generation.batchsize=3"],
         "did you mean 'batch_size'"),
        (write_config(tmp_path / "d.yaml", golden_model_dir, tmp_path / "nodata", tmp_path / "o4"), [], "data:"),
    ]
    for config, overrides, message in cases:
        began = time.monotonic()
        process = start_worker(config, 0, 1, *overrides)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
        assert time.monotonic() - began < 30
    assert not (tmp_path / "o1" / "logs").exists()


def test_sigterm_stops_within_grace_and_a_restart_finishes(golden_model_dir: Path, tmp_path: Path) -> None:
    data = slow_dataset(tmp_path / "data", 40)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output,
                          generation={"batch_size": 2}, worker={"grace_seconds": 5})
    process = start_worker(config)
    wait_for(lambda: committed_rows(output) >= 4, 120, "a few committed batches")
    sent = time.monotonic()
    # Like Slurm: every process of the task (the DataLoader workers too) gets SIGCONT and SIGTERM, and a time
    # limit sends SIGTERM twice; the workers must neither die from it nor swallow it, the handler must not mind.
    for number in (signal.SIGCONT, signal.SIGTERM, signal.SIGTERM):
        os.killpg(process.pid, number)
    process.wait(timeout=30)
    assert time.monotonic() - sent < 5 + 5
    assert process.returncode == 0, process.stderr.read()
    assert "DataLoader worker" not in process.stderr.read()
    state = slice_state(output)
    assert state["status"] == "stopped" and state["stop_reason"] == "sigterm"
    kept = committed_rows(output)
    assert 4 <= kept < 40
    assert not (output / "end0.txt").exists()
    rerun = start_worker(config)
    assert rerun.wait(timeout=300) == 0
    assert slice_state(output)["status"] == "done" and committed_rows(output) == 40
    assert verify(output).ok


def test_kill_file_stops_the_slice(golden_model_dir: Path, tmp_path: Path) -> None:
    data = slow_dataset(tmp_path / "data", 60)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output, generation={"batch_size": 2})
    process = start_worker(config)
    wait_for(lambda: committed_rows(output) >= 2, 120, "a committed batch")
    (output / "kill0.txt").touch()
    assert process.wait(timeout=60) == 0
    assert slice_state(output)["stop_reason"] == "kill_file"
    # Obeyed once: renamed with the time, so the same command resumes instead of stopping again at once.
    assert not (output / "kill0.txt").exists() and "obeyed " in (output / "kill0.done").read_text()
    log = (output / "logs" / "slice_00000.log").read_text()
    assert "stop requested (kill_file)" in log and "kill file obeyed: kill0.txt renamed to kill0.done" in log
    rerun = start_worker(config)
    assert rerun.wait(timeout=300) == 0 and slice_state(output)["status"] == "done"


def test_second_worker_on_the_same_slice_refuses(golden_model_dir: Path, tmp_path: Path) -> None:
    data = slow_dataset(tmp_path / "data", 300)  # minutes of work
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output, generation={"batch_size": 2})
    first = start_worker(config)
    try:
        wait_for(lambda: committed_rows(output) > 0, 120, "the first worker's first commit")
        second = start_worker(config)
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 2
        assert f"pid {first.pid}" in stderr and "being worked on" in stderr and stderr.count("\n") == 1
    finally:
        stop(first)
    # the lease of the killed worker is recovered by the next one
    rerun = start_worker(config)
    wait_for(lambda: "took over the slice lease" in (output / "logs" / "slice_00000.log").read_text(), 120,
             "the next worker to take over the lease")
    stop(rerun, signal.SIGTERM)
    assert slice_state(output)["status"] == "stopped" and verify(output).lost == []


@pytest.mark.slow
def test_sigkill_at_random_instants_loses_and_duplicates_nothing(golden_model_dir: Path, tmp_path: Path) -> None:
    rows, kills = 400, 22
    data = noise_dataset(tmp_path / "data", rows)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output,
                          generation={"batch_size": 2, "max_new_tokens": 6}, worker={"commit_seconds": 0})
    rng = random.Random(1234)
    log = output / "logs" / "slice_00000.log"
    committed_before_attempt: list[set[int]] = []
    killed = 0

    def count(text: str) -> int:
        return log.read_text().count(text) if log.exists() else 0

    while killed < kills and committed_rows(output) < rows:
        before, starts = set(_done_rows(output)), count(" start: ")
        computed = count("computed rows=")
        process = start_worker(config)
        if rng.random() < 0.3:  # during start-up: model load, lease, recovery
            time.sleep(rng.uniform(0.5, 4.0))
        else:  # mid-slice: at a random instant after this attempt's first computed batch
            wait_for(lambda: count("computed rows=") > computed or process.poll() is not None, 120, "a batch")
            time.sleep(rng.uniform(0.0, 0.8))
        if process.poll() is None:
            stop(process, signal.SIGKILL)
            killed += 1
        if count(" start: ") > starts:  # killed after it logged its start: an attempt to check below
            committed_before_attempt.append(before)
    committed_before_attempt.append(set(_done_rows(output)))
    final = start_worker(config)
    _, stderr = final.communicate(timeout=600)
    assert final.returncode == 0, stderr
    assert killed >= 20
    report = verify(output)
    assert report.ok and report.captioned == rows, report
    assert not report.lost and not report.duplicate and not report.corrupt
    # No batch committed by an earlier attempt was computed again by a later one.
    attempts = (output / "logs" / "slice_00000.log").read_text().split(" start: ")[1:]
    assert len(attempts) == len(committed_before_attempt)
    for attempt, already in zip(attempts, committed_before_attempt):
        computed = {int(r) for line in re.findall(r"computed rows=([\d,]+)", attempt) for r in line.split(",")}
        assert not computed & already


def _done_rows(output: Path) -> list[int]:
    try:
        state = slice_state(output)
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [row for a, b in state["done"] for row in range(a, b)]


def test_resume_skips_committed_rows_without_listing_outputs(golden_model_dir: Path, tmp_path: Path,
                                                             shared_engine, monkeypatch) -> None:
    data = noise_dataset(tmp_path / "data", 10)
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, data, output,
                                      worker={"loader_workers": 0}))
    assert run_slice(config, 0, 1, engine_factory=shared_engine).status == "done"
    calls: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if "captions" in str(path):
            calls.append(str(path))
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(os, "stat", counting_stat)
    assert run_slice(config, 0, 1, engine_factory=shared_engine).status == "done"
    assert calls == []


def test_parquet_and_image_feature_inputs_give_the_same_captions(golden_model_dir: Path, tmp_path: Path,
                                                                 shared_engine) -> None:
    import datasets
    source = datasets.load_from_disk(str(GOLDEN / "dataset"))
    parquet = tmp_path / "golden.parquet"
    source.to_parquet(str(parquet), batch_size=4)  # several row groups
    with_image_feature = source.map(lambda row: {"image": {"bytes": row["png"], "path": None}},
                                    remove_columns=["png"], keep_in_memory=True).cast_column("image", datasets.Image())
    with_image_feature.save_to_disk(str(tmp_path / "image_feature"))
    results = []
    for name, data, overrides in [("parquet", parquet, {}), ("feature", tmp_path / "image_feature",
                                                            {"data": {"image_column": "image"}})]:
        output = tmp_path / name
        config = load_config(write_config(tmp_path / f"{name}.yaml", golden_model_dir, data, output,
                                          worker={"loader_workers": 0}, **overrides))
        for slice_id in range(3):
            assert run_slice(config, slice_id, 3, engine_factory=shared_engine).status == "done"
        assert verify(output).ok
        results.append(read_captions(output))
    assert results[0] == results[1]
    assert {key: results[0][key]["vlm_caption"] for key in GOLDEN_CAPTIONS} == GOLDEN_CAPTIONS


class MemoryLimitedEngine:
    """The real engine behind a tile budget that raises the engines' out-of-memory error: a stand-in for a GPU's
    memory limit, which a CPU test cannot reach."""

    def __init__(self, engine: Engine, budget: int) -> None:
        self.engine = engine
        self.budget = budget
        self.calls: list[int] = []

    def caption(self, tiles, settings=None, poll=None):
        self.calls.append(sum(t.shape[0] for t in tiles))
        if self.calls[-1] > self.budget:
            raise EngineOutOfMemory("out of memory (test budget)")
        return self.engine.caption(tiles, settings, poll=poll)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def test_out_of_memory_splits_batches_then_retries_with_fewer_tiles(golden_model_dir: Path, tmp_path: Path,
                                                                    shared_engine) -> None:
    rows = [(f"wide_{i}", png(i, (64, 48)), "w") for i in range(4)]
    rows += [(f"square_{i}", png(10 + i), "s") for i in range(4)]
    data = make_dataset(tmp_path / "data", rows)  # 7 tiles each for wide_*, 1 for square_*
    captions = {}
    for budget in (100, 8, 5, 0):
        output = tmp_path / f"budget_{budget}"
        config = load_config(write_config(tmp_path / f"{budget}.yaml", golden_model_dir, data, output,
                                          worker={"loader_workers": 0}))
        engine: dict = {}

        def factory(config, budget=budget):
            engine["limited"] = MemoryLimitedEngine(shared_engine(config), budget)
            return engine["limited"]
        assert run_slice(config, 0, 1, engine_factory=factory).status == "done"
        assert verify(output).ok
        captions[budget] = read_captions(output)
        ledger_path = output / "failures" / "slice_00000.jsonl"
        ledger = [json.loads(line) for line in ledger_path.read_text().splitlines()] if ledger_path.exists() else []
        if budget == 100:
            assert ledger == [] and max(engine["limited"].calls) > 8
        if budget == 8:  # batches split until they fit; same captions (greedy ids do not depend on batching)
            assert captions[8] == captions[100] and max(c for c in engine["limited"].calls if c <= 8) <= 8
        if budget == 5:  # a 7-tile image alone does not fit: retried at max_num 3, the others unchanged
            assert set(captions[5]) == set(captions[100]) and ledger == []
            assert all(captions[5][k] == captions[100][k] for k in captions[100] if k.startswith("square"))
        if budget == 0:
            assert captions[0] == {} and {e["reason"] for e in ledger} == {"out_of_memory"} and len(ledger) == 8


def test_out_of_memory_on_an_ordinary_row_alone_retries_it_with_fewer_tiles(golden_model_dir: Path, tmp_path: Path,
                                                                           shared_engine) -> None:
    """A row that is not a sample keeps no bytes through the loader (memory stays flat however deep its windows);
    when it alone does not fit, its bytes are read again and it is tiled at half the max_num, and its caption is
    committed, not the ledger."""
    from vlm_hpc.preprocess.decode import decode_image
    from vlm_hpc.preprocess.tiling import tile_image
    from vlm_hpc.run.prefetch import prepare_row
    from vlm_hpc.run.readers.base import Row
    wide = png(21, (64, 48))  # 7 tiles at max_num 6
    assert prepare_row(Row(1, "wide", wide, "w"), 6, False, None, is_sample=False).image_bytes is None
    assert prepare_row(Row(0, "square", png(20), "s"), 6, False, None, is_sample=True).image_bytes == png(20)
    rows = [("square_0", png(20), "s"), ("wide", wide, "w"), ("square_1", png(22), "s"), ("square_2", png(23), "s")]
    data = make_dataset(tmp_path / "data", rows)
    output = tmp_path / "out"
    # One sample image for four rows: only row 0 is a sample.
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, data, output,
                                      worker={"loader_workers": 0}, output={"max_sample_images": 1}))
    limited: dict = {}

    def factory(config):
        limited["engine"] = MemoryLimitedEngine(shared_engine(config), 5)
        return limited["engine"]
    assert run_slice(config, 0, 1, engine_factory=factory).status == "done"
    log = (output / "logs" / "slice_00000.log").read_text()
    assert "out of memory on row 1 alone; retrying with max_num 3" in log
    assert [path.name for path in (output / "images").iterdir()] == ["square_0.png"]  # row 1 is no sample
    assert not (output / "failures" / "slice_00000.jsonl").exists()
    captions = read_captions(output)
    assert set(captions) == {"square_0", "wide", "square_1", "square_2"} and verify(output).ok
    retiled = tile_image(decode_image(wide).image, 3)
    assert retiled.shape[0] <= 5 and limited["engine"].calls[-2:] == [retiled.shape[0], 2]  # then rows 2, 3
    expected = shared_engine(config).caption([retiled], config.generation.settings())[0].text
    assert captions["wide"]["vlm_caption"] == expected


def test_out_of_memory_shrinks_the_tile_budget_for_later_batches(golden_model_dir: Path, tmp_path: Path,
                                                                shared_engine) -> None:
    rows = [(f"wide_{i:02d}", png(i, (64, 48)), "w") for i in range(12)]  # 7 tiles each
    data = make_dataset(tmp_path / "data", rows)
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, data, output, worker={"loader_workers": 0},
                                      generation={"tile_budget": 28, "batch_size": 16, "sort_window": 4}))
    limited: dict = {}

    def factory(config):
        limited["engine"] = MemoryLimitedEngine(shared_engine(config), 14)
        return limited["engine"]
    assert run_slice(config, 0, 1, engine_factory=factory).status == "done"
    calls = limited["engine"].calls
    assert calls[0] == 28 and max(calls[1:]) <= 14  # one failure, then batches sized to the shrunk budget
    assert calls.count(28) == 1 and sum(c for c in calls[1:]) == 12 * 7
    log = (output / "logs" / "slice_00000.log").read_text()
    assert "out of memory on 28 tiles; tile budget now 14" in log
    assert verify(output).ok and len(read_captions(output)) == 12
