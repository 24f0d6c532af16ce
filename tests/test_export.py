"""`python -m vlm_hpc.export`: real runs of the tiny golden model (two slices, broken and truncated images, a
duplicate key) exported to a datasets folder and to Parquet, one row per input row; interrupted exports resume,
partial ones are brought up to date, and wrong inputs are refused with one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders import png, read_captions, write_config
from vlm_hpc import export
from vlm_hpc.config import DataSection, load_config
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers.base import Row, RowReader
from vlm_hpc.run.slice_run import run_slice

TRUNCATED = png(2, (300, 200))
# (key, image, web caption, url, width): 8 rows, cut into two slices of four.
ROWS = [
    ("a", png(1), "web a", "http://x/a", 48),
    ("b", b"", "web b", "http://x/b", 0),
    ("c", b"not an image at all", "web c", "http://x/c", 1),
    ("d", TRUNCATED[: len(TRUNCATED) * 6 // 10], "web d", "http://x/d", 300),
    ("e", png(4), "web e", "http://x/e", 48),
    ("a", png(5), "a repeated key", "http://x/a2", 48),
    ("f", png(6), None, None, 48),
    ("g", png(7), "web g", "http://x/g", 48),
]
KEYS = [r[0] for r in ROWS]
EXPECTED = {1: ("failed", "empty"), 2: ("failed", "undecodable"), 3: ("captioned", "truncated"),
            5: ("failed", "duplicate_key")}


def make_input(folder: Path) -> Path:
    """The rows as a datasets.save_to_disk folder with two extra columns, url and width."""
    features = datasets.Features({"new_key": datasets.Value("string"), "png": datasets.Value("binary"),
                                  "caption": datasets.Value("string"), "url": datasets.Value("string"),
                                  "width": datasets.Value("int64")})
    names = list(features)
    table = {name: [row[i] for row in ROWS] for i, name in enumerate(names)}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(folder))
    return folder


def caption_run(tmp_path: Path, model_dir: Path, engine_factory, output_format: str, slices: tuple[int, ...]):
    """A run of the 8 rows in two slices, of which `slices` are run to the end; its output folder and config."""
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", model_dir, make_input(tmp_path / "data"), output,
                                      output={"format": output_format}, worker={"loader_workers": 0}))
    for slice_id in slices:
        assert run_slice(config, slice_id, 2, engine_factory=engine_factory).status == "done"
    return output, config


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, golden_model_dir: Path, shared_engine) -> dict[str, Path]:
    """A finished run per output format (json, jsonl), by format: its output folder."""
    return {name: caption_run(tmp_path_factory.mktemp(name), golden_model_dir, shared_engine, name, (0, 1))[0]
            for name in ("json", "jsonl")}


def run_export(*args: object) -> int:
    return export.main([str(a) for a in args])


def ledger(output: Path) -> dict[int, str]:
    return {e["row"]: e["reason"] for path in sorted((output / "failures").glob("*.jsonl"))
            for e in map(json.loads, path.read_text().splitlines())}


def exported_rows(dest: Path, to: str) -> list[dict]:
    if to == "datasets":
        return datasets.load_from_disk(str(dest)).to_list()
    return pq.read_table(dest).to_pylist()


@pytest.mark.parametrize("output_format", ["json", "jsonl"])
def test_a_datasets_export_has_one_row_per_input_row_in_order(
        output_format: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output, dest = runs[output_format], tmp_path / "dest"
    assert run_export(output, "--to", "datasets", dest, "--columns", "url,width") == 0
    assert capsys.readouterr().out == f"exported 8 rows of {output} to {dest} (datasets, 2 shards): 5 captioned, " \
                                      "3 failed, 0 pending; ledger reasons: 1 duplicate_key, 1 empty, 1 truncated, " \
                                      "1 undecodable\n"
    dataset = datasets.load_from_disk(str(dest))
    assert dataset.column_names == ["row", "key", "status", "web_caption", "vlm_caption", "failure",
                                    "failure_detail", "url", "width"]
    rows = dataset.to_list()
    assert [r["row"] for r in rows] == list(range(8)) and [r["key"] for r in rows] == KEYS
    assert [r["web_caption"] for r in rows] == [r[2] for r in ROWS]
    assert [(r["url"], r["width"]) for r in rows] == [(r[3], r[4]) for r in ROWS]
    captions = read_captions(output)
    captioned = {r["key"]: r for r in rows if r["status"] == "captioned"}
    assert set(captioned) == set(captions) == {"a", "d", "e", "f", "g"}
    assert all(r["vlm_caption"] == captions[key]["vlm_caption"] and r["web_caption"] == captions[key]["web_caption"]
               for key, r in captioned.items())
    assert {r["row"]: r["failure"] for r in rows if r["failure"]} == ledger(output) == \
        {row: reason for row, (_, reason) in EXPECTED.items()}
    for row, (status, _) in EXPECTED.items():
        assert rows[row]["status"] == status and (rows[row]["vlm_caption"] is None) == (status == "failed")
        assert rows[row]["failure_detail"]
    assert rows[0]["vlm_caption"] and rows[0]["failure"] is None and rows[0]["failure_detail"] is None
    record = json.loads((dest / "_export.json").read_text())
    assert record["complete"] and record["pending"] == 0 and record["columns"] == ["url", "width"]
    assert not (dest / ".parts").exists() and not (dest / ".building").exists()


def test_a_parquet_export_reads_with_pyarrow_and_holds_what_the_datasets_one_holds(
        runs: dict[str, Path], tmp_path: Path) -> None:
    output = runs["json"]
    assert run_export(output, "--to", "parquet", tmp_path / "pq", "--batch-rows", 3, "--columns", "width") == 0
    assert run_export(output, "--to", "datasets", tmp_path / "ds", "--columns", "width") == 0
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == \
        ["_export.json", "_export.lock", "part-00000.parquet", "part-00001.parquet"]
    assert [pq.ParquetFile(tmp_path / "pq" / f"part-0000{i}.parquet").metadata.num_row_groups for i in (0, 1)] == [2, 2]
    table = pq.read_table(tmp_path / "pq")  # the folder as one dataset: bookkeeping files are skipped
    assert table.schema.field("width").type == pa.int64()
    assert table.to_pylist() == exported_rows(tmp_path / "ds", "datasets")
    assert table.column("key").to_pylist() == KEYS


@pytest.mark.parametrize("to", ["parquet", "datasets"])
def test_an_interrupted_export_resumes_keeping_finished_shards_and_gives_the_same_result(
        to: str, runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    output = runs["jsonl"]
    assert run_export(output, "--to", to, tmp_path / "whole", "--batch-rows", 2) == 0
    dest = tmp_path / "dest"
    write_shard, calls = export.write_shard, []

    def interrupted_in_the_second_shard(path, target, schema, batches):
        calls.append(path)
        def first_batch_then_interrupt(whole):
            yield next(whole)
            raise KeyboardInterrupt
        return write_shard(path, target, schema, first_batch_then_interrupt(batches) if len(calls) == 2 else batches)

    monkeypatch.setattr(export, "write_shard", interrupted_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_export(output, "--to", to, dest, "--batch-rows", 2)
    monkeypatch.undo()
    record = json.loads((dest / "_export.json").read_text())
    assert not record["complete"] and list(record["shards"]) == ["0"]
    assert not (dest / "state.json").exists() and not (dest / "part-00001.parquet").exists()
    first = calls[0].stat()
    stale = calls[1].with_name(f".{calls[1].name}.tmp")
    stale.write_bytes(b"what a killed export left")
    capsys.readouterr()

    assert run_export(output, "--to", to, dest, "--batch-rows", 2) == 0
    progress = capsys.readouterr().err
    assert f"slice 0: {calls[0].name} kept" in progress and f"slice 1: wrote {calls[1].name}" in progress
    assert not stale.exists()
    assert exported_rows(dest, to) == exported_rows(tmp_path / "whole", to)
    if to == "parquet":
        assert (calls[0].stat().st_ino, calls[0].stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert run_export(output, "--to", to, dest, "--batch-rows", 2) == 0
    assert "is up to date" in capsys.readouterr().err


def test_a_partial_export_marks_pending_rows_and_is_brought_up_to_date(
        runs: dict[str, Path], tmp_path: Path, golden_model_dir: Path, shared_engine,
        capsys: pytest.CaptureFixture) -> None:
    output, config = caption_run(tmp_path, golden_model_dir, shared_engine, "json", (0,))
    dest = tmp_path / "dest"
    capsys.readouterr()  # the worker's log
    assert run_export(output, "--to", "parquet", dest) == 2
    assert capsys.readouterr().err == f"error: export: 1 of 2 slices of {output} are not done (slices 1; 4 rows " \
                                      f"pending); wait until they are (python -m vlm_hpc.status {output}), or pass " \
                                      "--partial to export those rows as pending\n"
    assert not dest.exists()
    assert run_export(output, "--to", "parquet", dest, "--partial") == 0
    assert "4 pending" in capsys.readouterr().out
    rows = exported_rows(dest, "parquet")
    assert [r["status"] for r in rows[4:]] == ["pending"] * 4
    assert all(r["vlm_caption"] is None and r["failure"] is None for r in rows[4:])
    assert [r["web_caption"] for r in rows[4:]] == [r[2] for r in ROWS[4:]]  # read from the input

    assert run_slice(config, 1, 2, engine_factory=shared_engine).status == "done"
    capsys.readouterr()
    assert run_export(output, "--to", "parquet", dest) == 0
    progress = capsys.readouterr().err
    assert "slice 0: part-00000.parquet kept" in progress and "slice 1: wrote part-00001.parquet" in progress
    assert run_export(runs["json"], "--to", "parquet", tmp_path / "whole") == 0
    assert exported_rows(dest, "parquet") == exported_rows(tmp_path / "whole", "parquet")


def refused(capsys: pytest.CaptureFixture, *args: object) -> str:
    """The one error line of an export that is refused."""
    assert run_export(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: export: ") and err.count("\n") == 1, err
    return err


def test_wrong_inputs_are_refused_with_one_line(runs: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    output, dest = runs["json"], tmp_path / "dest"
    err = refused(capsys, output, "--to", "parquet", dest, "--columns", "url,nope")
    assert "column 'nope' is not in" in err and "its columns are new_key, png, caption, url, width" in err
    assert not dest.exists()  # checked before anything is written
    assert "'key', a column the export writes itself" in refused(capsys, output, "--to", "parquet", dest,
                                                                 "--columns", "key")
    assert "'url' twice" in refused(capsys, output, "--to", "parquet", dest, "--columns", "url,url")
    assert "--batch-rows is 0" in refused(capsys, output, "--to", "parquet", dest, "--batch-rows", 0)

    assert run_export(output, "--to", "parquet", dest) == 0
    capsys.readouterr()
    err = refused(capsys, runs["jsonl"], "--to", "parquet", dest)
    assert f"{dest} holds another export (of run " in err and f"in {output}, --to parquet), not of run " in err
    assert "choose another DEST" in err
    assert "holds another export" in refused(capsys, output, "--to", "parquet", dest, "--columns", "url")
    assert "holds another export" in refused(capsys, output, "--to", "datasets", dest)

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert "busy is not empty (notes.txt) and holds no export" in refused(capsys, output, "--to", "parquet",
                                                                          tmp_path / "busy")
    assert "lies inside the run's folder" in refused(capsys, output, "--to", "parquet", output / "export")
    assert "manifest.json is missing" in refused(capsys, tmp_path / "busy", "--to", "parquet", tmp_path / "d2")
    (dest / "_export.json").write_text('{"version": 1, "shards"')
    assert "_export.json is damaged" in refused(capsys, output, "--to", "parquet", dest)
    os.remove(dest / "_export.json")
    assert "is not empty (part-00000.parquet, part-00001.parquet) and holds no export" in refused(
        capsys, output, "--to", "parquet", dest)


class CaptionsOnly(RowReader):
    """A reader that gives rows but no Arrow columns: it keeps RowReader's defaults."""

    format = "captions_only"

    def __init__(self) -> None:
        super().__init__(DataSection(path="nowhere"), 3)

    def describe(self) -> str:
        return "three made-up rows"

    def _read(self, start: int, stop: int) -> list[Row]:
        return [Row(i, f"k{i}", None, f"web {i}") for i in range(start, stop)]

    def _key_array(self, start: int, stop: int) -> pa.Array:
        return pa.array([f"k{i}" for i in range(start, stop)])

    def _image_sizes(self, start: int, stop: int) -> np.ndarray:
        return np.full(stop - start, -1, np.int64)


def test_a_reader_without_columns_refuses_extra_columns_and_still_gives_web_captions() -> None:
    reader = CaptionsOnly()
    with pytest.raises(VlmHpcError, match="three made-up rows is read by the 'captions_only' reader, which cannot "
                                          "export extra input columns; export without --columns"):
        reader.columns(0, 3, ["url"])
    assert reader.web_captions(1, 9) == ["web 1", "web 2"]


def test_a_run_with_lost_or_corrupt_outputs_is_refused_naming_what_to_run(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "out"
    shutil.copytree(runs["json"], output)
    (output / "captions" / "e.json").unlink()  # row 4, committed
    assert run_export(output, "--to", "parquet", tmp_path / "dest") == 2
    # Slice 0 is whole and its shard kept for the next try; the error is the last line.
    assert capsys.readouterr().err.splitlines() == [
        "slice 0: wrote part-00000.parquet (4 rows: 2 captioned, 2 failed, 0 pending)",
        f"error: export: slice 1 of {output} has 1 committed rows whose caption or ledger line is lost or damaged (row "
        f"4 key 'e'); see what python -m vlm_hpc.verify {output} reports and mend it before exporting"]
    assert not json.loads((tmp_path / "dest" / "_export.json").read_text())["complete"]
    (output / "state" / "slice_00000.json").write_text("{")
    err = refused(capsys, output, "--to", "parquet", tmp_path / "dest")
    assert "slice_00000.json is corrupt" in err
    assert err.endswith(f"; rebuild it with: python -m vlm_hpc.verify {output} --repair\n")
