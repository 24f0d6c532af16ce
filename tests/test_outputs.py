"""The output-format seam (`vlm_hpc.run.outputs`): both built-in formats round-trip a batch through the writer and
cut an uncommitted tail on recovery, and a format defined here, registered through the public registry, carries
a whole run on the tiny golden model that verify then proves."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from builders import write_config
from conftest import GOLDEN, load_golden
from vlm_hpc.cluster.environment import JobEnvironment
from vlm_hpc.config import load_config
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.checkpoint import SliceCheckpoint
from vlm_hpc.run.durable import write_many_atomic
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.lease import SliceLease
from vlm_hpc.run.outputs import OUTPUT_FORMATS, output_format, register
from vlm_hpc.run.outputs.base import (
    CaptionRecord,
    CommittedCaptions,
    Damage,
    OutputFormat,
    SliceKeys,
    StagedBatch,
)
from vlm_hpc.run.readers import open_reader
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.run.writer import RowOutcome, SliceWriter
from vlm_hpc.verify import verify

KEYS = ["a", "b", "c", "d", "e", "f"]
ROWS = SliceKeys(0, KEYS, {})


def outcome(row: int) -> RowOutcome:
    return RowOutcome(row, KEYS[row], f"web {row}", vlm_caption=f"vlm {row} \u00e9\n\"quoted\"")


def record(row: int) -> CaptionRecord:
    return CaptionRecord(row, KEYS[row], f"web {row}", f"vlm {row} \u00e9\n\"quoted\"")


@pytest.fixture
def slice_writer(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SliceWriter]:
    """A writer of slice 0 holding a real lease, in the format the test is parametrized with."""
    layout = OutputLayout(tmp_path / "out")
    layout.state_dir.mkdir(parents=True)
    lease = SliceLease(layout.lease_file(0), JobEnvironment.current(), stale_seconds=120)
    lease.acquire()
    try:
        yield SliceWriter(layout, 0, output_format(request.param, layout, 0), lease)
    finally:
        lease.release()


@pytest.mark.parametrize("slice_writer", ["json", "jsonl"], indirect=True)
def test_a_committed_batch_reads_back_and_an_uncommitted_one_is_cut_on_recovery(slice_writer: SliceWriter) -> None:
    layout, output = slice_writer.layout, slice_writer.output
    checkpoint = SliceCheckpoint(slice=0, num_slices=1, start=0, stop=len(KEYS))
    slice_writer.recover(checkpoint)
    failed = RowOutcome(2, "c", "web 2", failure="undecodable", detail="not an image")
    slice_writer.commit_batch([outcome(0), outcome(1), failed], checkpoint, seconds=1.0)
    committed = SliceCheckpoint.load(layout.checkpoint_file(0))
    assert committed.done == [[0, 3]] and committed.captions == 2 and committed.failures == 1
    assert list(output.committed_captions(ROWS, committed)) == [record(0), record(1)]

    # A batch made durable by the format, then a crash before the index commit.
    staged = output.stage([record(3), record(4)], committed)
    if staged.files:
        write_many_atomic(staged.files, slice_writer.temp_dir)
    resumed = SliceCheckpoint.load(layout.checkpoint_file(0))
    slice_writer.recover(resumed)
    assert list(output.committed_captions(ROWS, resumed)) == [record(0), record(1)]
    assert output.read(ROWS, resumed).damage == []
    if output.append_only_files():  # jsonl: the appended tail is cut back to the committed size
        assert [path.stat().st_size for path in output.append_only_files()] == [resumed.captions_offset]

    slice_writer.commit_batch([outcome(3), outcome(4), outcome(5)], resumed, seconds=1.0)
    final = SliceCheckpoint.load(layout.checkpoint_file(0))
    assert final.complete and final.captions == 5
    assert list(output.committed_captions(ROWS, final)) == [record(row) for row in (0, 1, 3, 4, 5)]
    assert output.has_outputs(ROWS)


def test_only_jsonl_records_captions_offset(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path)
    checkpoint = SliceCheckpoint(slice=0, num_slices=1, start=0, stop=len(KEYS))
    assert output_format("json", layout, 0).stage([record(0)], checkpoint).checkpoint_state == {}
    staged = output_format("jsonl", layout, 0).stage([record(0)], checkpoint)
    assert staged.files == [] and staged.checkpoint_state == {"captions_offset": layout.caption_jsonl(0).stat().st_size}


def test_an_unknown_format_is_refused_in_one_line_naming_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(VlmHpcError) as refused:
        output_format("xml", OutputLayout(tmp_path), 0)
    assert "'xml'" in str(refused.value) and "json, jsonl" in str(refused.value) and "\n" not in str(refused.value)


class CsvFile(OutputFormat):
    """A test format: captions/slice_{I}.csv, rewritten whole (renamed into place) at every commit."""

    name = "csv-test"
    COLUMNS = ["row", "key", "web_caption", "vlm_caption"]

    @property
    def path(self) -> Path:
        return self.layout.captions_dir / f"{self.layout.slice_name(self.slice_id)}.csv"

    def _records(self) -> list[CaptionRecord]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [CaptionRecord(int(line["row"]), line["key"], line["web_caption"], line["vlm_caption"])
                for line in csv.DictReader(io.StringIO(text, newline=""))]

    def recover(self, checkpoint: SliceCheckpoint) -> None:
        pass  # the file is whole; rows of an uncommitted rewrite are dropped at the next one

    def stage(self, records: Sequence[CaptionRecord], checkpoint: SliceCheckpoint) -> StagedBatch:
        kept = [r for r in self._records() if checkpoint.is_done(r.row)] + list(records)
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, self.COLUMNS)
        writer.writeheader()
        writer.writerows({"row": r.row, "key": r.key, "web_caption": r.web_caption, "vlm_caption": r.vlm_caption}
                         for r in kept)
        return StagedBatch(files=[(self.path, buffer.getvalue().encode())])

    def read(self, rows: SliceKeys, checkpoint: SliceCheckpoint | None) -> CommittedCaptions:
        captions = CommittedCaptions(records={})
        try:
            records = self._records()
        except (ValueError, KeyError) as exc:
            return CommittedCaptions(records={}, damage=[Damage(self.path, f"not this format's CSV ({exc})", True)])
        for caption in records:
            if rows.key(caption.row) != caption.key:
                captions.foreign.append(f"{self.path.name}: key {caption.key!r} is not row {caption.row}")
            elif caption.row in captions.records:
                captions.repeated.append(f"{self.path.name}: row {caption.row} again")
            else:
                captions.records[caption.row] = caption
        return captions

    def has_outputs(self, rows: SliceKeys) -> bool:
        return self.path.exists()


@pytest.fixture
def csv_format() -> Iterator[type[OutputFormat]]:
    register(CsvFile)
    try:
        yield CsvFile
    finally:
        del OUTPUT_FORMATS[CsvFile.name]


def test_a_format_registered_through_the_registry_carries_a_run(csv_format: type[OutputFormat],
                                                                golden_model_dir: Path, tmp_path: Path,
                                                                shared_engine) -> None:
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, GOLDEN / "dataset", output,
                                      output={"format": csv_format.name}, worker={"loader_workers": 0}))
    assert run_slice(config, 0, 1, engine_factory=shared_engine).status == "done"
    report = verify(output)
    assert report.ok and report.captioned == 15, report
    index = json.loads((GOLDEN / "images" / "index.json").read_text())["images"]
    layout = OutputLayout(output)
    state = SliceCheckpoint.load(layout.checkpoint_file(0))
    rows = open_reader(config.data)
    captions = {r.key: r for r in csv_format(layout, 0).committed_captions(
        SliceKeys(0, rows.keys(0, rows.num_rows), {}), state)}
    e2e = load_golden("e2e_golden.json")
    assert {key: captions[key].vlm_caption for key in e2e["batch"]["keys"]} == \
        dict(zip(e2e["batch"]["keys"], e2e["batch"]["responses"]))
    assert all(captions[item["key"]].web_caption == item["caption"] for item in index)
    assert not list(layout.captions_dir.glob("*.json*"))  # nothing written in the built-in formats


def test_the_config_takes_the_format_names_from_the_registry(csv_format: type[OutputFormat], tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tmp_path, tmp_path, tmp_path / "out", output={"format": "xml"})
    with pytest.raises(VlmHpcError, match=f"output.format is 'xml'; choose one of json, jsonl, {csv_format.name}"):
        load_config(path)
