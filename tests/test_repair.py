"""Damaged outputs: append-only files repaired on resume, corrupt or lost indexes rebuilt by `verify --repair`,
and `verify` naming every corrupt file without a traceback. Each case starts from a copy of a finished run and
must end with the captions of that uninterrupted greedy run."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from builders import make_dataset, png, read_captions, write_config
from vlm_hpc.config import DataSection, load_config
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.checkpoint import SliceCheckpoint
from vlm_hpc.run.durable import append_durable
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.manifest import load_manifest
from vlm_hpc.run.outputs.jsonl_file import JsonlFile
from vlm_hpc.run.readers import open_reader
from vlm_hpc.run.repair import repair_on_resume
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.verify import verify

JSONL = Path("captions/slice_00000.jsonl")
LEDGER = Path("failures/slice_00000.jsonl")
INDEX = Path("state/slice_00000.json")


def rows_with_failures() -> list[tuple[str | None, bytes | None, str | None]]:
    """Good images with bad rows among them, so that both the captions and the ledger have several lines."""
    truncated = png(2, (300, 200))
    good = [(f"img_{i:02d}", png(10 + i), f"web {i}") for i in range(8)]
    cut = truncated[: len(truncated) * 6 // 10]
    return good[:2] + [("zero_bytes", b"", "x")] + good[2:4] + [("truncated", cut, "t")] \
        + good[4:6] + [("no_image", None, "x"), ("not_an_image", b"text, not pixels", "x")] + good[6:]


@pytest.fixture(scope="module")
def finished_runs(golden_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, shared_engine) -> dict:
    """One uninterrupted run per output format: the reference every repaired run must equal."""
    base = tmp_path_factory.mktemp("reference")
    data = make_dataset(base / "data", rows_with_failures())
    runs = {}
    for output_format in ("json", "jsonl"):
        output = base / output_format
        config = write_config(base / f"{output_format}.yaml", golden_model_dir, data, output,
                              output={"format": output_format}, worker={"loader_workers": 0, "commit_rows": 4})
        assert run_slice(load_config(config), 0, 1, engine_factory=shared_engine).status == "done"
        assert verify(output).ok
        runs[output_format] = {"output": output, "data": data, "captions": read_captions(output),
                               "ledger": ledger_rows(output)}
    return runs


def ledger_rows(output: Path) -> set[tuple[int, str, bool]]:
    lines = (output / LEDGER).read_text().splitlines()
    return {(e["row"], e["reason"], e["captioned"]) for e in map(json.loads, lines)}


def copy_run(run: dict, golden_model_dir: Path, tmp_path: Path, output_format: str) -> tuple[Path, object]:
    output = tmp_path / "out"
    shutil.copytree(run["output"], output)
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, run["data"], output,
                                      output={"format": output_format}, worker={"loader_workers": 0}))
    return output, config


def computed_rows(output: Path) -> list[str]:
    """Log lines of rows done again: by the model, or recorded in the ledger without it."""
    return [line for line in (output / "logs" / "slice_00000.log").read_text().splitlines()
            if "computed rows=" in line or "ledger rows=" in line]


def assert_like_reference(output: Path, run: dict) -> None:
    report = verify(output)
    assert report.ok, report
    assert read_captions(output) == run["captions"]
    ledger = ledger_rows(output)
    # Every failure is there; a note on a captioned row (truncated) whose ledger line was destroyed cannot be
    # told apart from the rows that had none, and stays lost.
    assert {e for e in ledger if not e[2]} == {e for e in run["ledger"] if not e[2]} and ledger <= run["ledger"]


def cut(path: Path, count: int) -> None:
    path.write_bytes(path.read_bytes()[:-count])


def nul_fill_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 40: middle + 40] = b"\0" * 80
    path.write_bytes(bytes(data))


DAMAGE = [("jsonl", JSONL, lambda p: cut(p, 5)), ("jsonl", LEDGER, lambda p: cut(p, 3)),
          ("json", LEDGER, lambda p: cut(p, 3)), ("jsonl", JSONL, nul_fill_middle), ("json", LEDGER, nul_fill_middle)]


@pytest.mark.parametrize(("output_format", "damaged", "damage"), DAMAGE,
                         ids=["jsonl-cut", "ledger-cut-jsonl", "ledger-cut-json", "jsonl-nul-middle",
                              "ledger-nul-json"])
def test_damaged_append_only_file_is_repaired_on_resume(output_format: str, damaged: Path, damage, finished_runs: dict,
                                                        golden_model_dir: Path, tmp_path: Path, shared_engine) -> None:
    run = finished_runs[output_format]
    output, config = copy_run(run, golden_model_dir, tmp_path, output_format)
    damage(output / damaged)
    assert not verify(output).ok
    before = len(computed_rows(output))
    assert run_slice(config, 0, 1, engine_factory=shared_engine).status == "done"
    assert_like_reference(output, run)
    state = SliceCheckpoint.load(output / INDEX)
    assert [r["file"] for r in state.repairs if r["rows_pending"]] == [str(damaged)]
    log = (output / "logs" / "slice_00000.log").read_text()
    assert f"repaired {damaged}: " in log and "rows back to pending: " in log
    assert len(computed_rows(output)) > before  # the lost rows were done again
    assert (output / "end0.txt").exists()


def test_repair_is_the_same_after_a_crash_before_the_index_is_saved(finished_runs: dict, tmp_path: Path) -> None:
    run = finished_runs["jsonl"]
    output = tmp_path / "out"
    shutil.copytree(run["output"], output)
    nul_fill_middle(output / JSONL)
    layout = OutputLayout(output)
    manifest = load_manifest(layout.manifest_file)
    rows = open_reader(DataSection(**manifest.data))
    old_index = (output / INDEX).read_bytes()
    results = []
    for _ in range(2):  # the second time the jsonl is already rewritten, but the index is the old one
        state = SliceCheckpoint.load(output / INDEX)
        repair_on_resume(JsonlFile(layout, 0), state, lambda: rows.keys(0, rows.num_rows), manifest.duplicate_rows,
                         logging.getLogger("test"))
        saved = SliceCheckpoint.load(output / INDEX)
        pending = {row for repair in saved.repairs for a, b in repair["rows_pending"] for row in range(a, b)}
        results.append((saved.done, saved.captions, saved.failures, saved.captions_offset, saved.failures_offset,
                        pending, (output / JSONL).read_bytes(), (output / LEDGER).read_bytes()))
        (output / INDEX).write_bytes(old_index)  # as if it crashed before saving the index
    assert results[0] == results[1] and results[0][5]


@pytest.mark.parametrize("output_format", ["json", "jsonl"])
@pytest.mark.parametrize("index_damage", ["garbage", "deleted"])
def test_lost_or_garbage_index_is_refused_then_rebuilt_by_verify_repair(
        output_format: str, index_damage: str, finished_runs: dict, golden_model_dir: Path, tmp_path: Path,
        shared_engine) -> None:
    run = finished_runs[output_format]
    output, config = copy_run(run, golden_model_dir, tmp_path, output_format)
    if index_damage == "garbage":
        (output / INDEX).write_bytes(b'{"slice": 0, "done": [[0, \xff\x00garbage')
    else:
        (output / INDEX).unlink()
    with pytest.raises(VlmHpcError) as refused:
        run_slice(config, 0, 1, engine_factory=shared_engine)
    message = str(refused.value)
    assert str(output / INDEX) in message and f"python -m vlm_hpc.verify {output} --repair" in message
    assert "\n" not in message
    assert json.loads((output / "state" / "slice_00000.lease").read_text())["released"]  # the refusal released it
    checked = subprocess.run([sys.executable, "-m", "vlm_hpc.verify", str(output)], capture_output=True, text=True)
    assert checked.returncode != 0 and str(INDEX) in checked.stdout and "Traceback" not in checked.stderr
    before = len(computed_rows(output))
    repaired = subprocess.run([sys.executable, "-m", "vlm_hpc.verify", str(output), "--repair"], capture_output=True,
                              text=True)
    assert "Traceback" not in repaired.stderr and f"rebuilt {output / INDEX}" in repaired.stderr, repaired.stderr
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr  # every row was recovered from the outputs
    assert json.loads((output / INDEX).read_text())["status"] == "done" and (output / "end0.txt").exists()
    assert run_slice(config, 0, 1, engine_factory=shared_engine).status == "done"
    assert len(computed_rows(output)) == before  # a scan, not a recomputation
    assert_like_reference(output, run)


CONTENTS = {
    "truncated": lambda original: original[: max(1, len(original) * 2 // 3)],
    "garbage": lambda original: b"\x8f#*garbage{{[" * 5,
    "invalid_utf8": lambda original: original[:10] + b"\xff\xfe\xc3" + original[10:],
    "wrong_types": lambda original: json.dumps({"done": "all", "start": "zero", "row": [], "vlm_caption": 7,
                                                "heartbeat": "soon", "num_rows": "many"}).encode(),
    "json_list": lambda original: b"[1, 2, 3]",
    "nuls": lambda original: b"\0" * len(original),
}
LEASE_RECORD = json.dumps({"host": "node1", "pid": 1, "heartbeat": 0.0, "token": "abc"}).encode()


@pytest.mark.parametrize("output_format", ["json", "jsonl"])
def test_verify_names_every_corrupt_file_without_a_traceback(output_format: str, finished_runs: dict,
                                                            tmp_path: Path) -> None:
    output = tmp_path / "out"
    shutil.copytree(finished_runs[output_format]["output"], output)
    targets = [INDEX, LEDGER, Path("state/slice_00000.lease"), Path("manifest.json")]
    targets.append(JSONL if output_format == "jsonl" else Path("captions/img_03.json"))
    for target in targets:
        path = output / target
        original = path.read_bytes() if path.exists() else LEASE_RECORD
        for name, make in CONTENTS.items():
            content = make(original)
            if name == "wrong_types" and target in (LEDGER, JSONL):
                content = original + content + b"\n"  # a whole line of the wrong types, committed
                if target == LEDGER:
                    _commit_size(output, "failures_offset", len(content))
                else:
                    _commit_size(output, "captions_offset", len(content))
            path.write_bytes(content)
            result = subprocess.run([sys.executable, "-m", "vlm_hpc.verify", str(output)], capture_output=True,
                                    text=True)
            where = f"{target} with {name} content"
            assert result.returncode != 0, where
            assert "Traceback" not in result.stderr, f"{where}: {result.stderr}"
            assert str(target) in result.stdout + result.stderr, f"{where}: {result.stdout}{result.stderr}"
            shutil.rmtree(output)
            shutil.copytree(finished_runs[output_format]["output"], output)
    assert verify(output).ok


def _commit_size(output: Path, name: str, size: int) -> None:
    raw = json.loads((output / INDEX).read_text())
    raw[name] = size
    (output / INDEX).write_text(json.dumps(raw))


def test_append_durable_refuses_to_pad_a_short_file_and_still_cuts_an_uncommitted_tail(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b"')
    assert append_durable(path, b'{"c": 3}\n', 9) == 18
    assert path.read_bytes() == b'{"a": 1}\n{"c": 3}\n'
    with pytest.raises(VlmHpcError, match=str(path)):
        append_durable(path, b'{"d": 4}\n', 30)
    assert path.read_bytes() == b'{"a": 1}\n{"c": 3}\n'


def test_old_indexes_without_repairs_load_and_every_field_has_a_type_check(tmp_path: Path) -> None:
    from vlm_hpc.run.checkpoint import _FIELD_TYPES
    assert set(_FIELD_TYPES) == {f.name for f in fields(SliceCheckpoint)}
    path = tmp_path / "slice_00000.json"
    path.write_text(json.dumps({"slice": 0, "num_slices": 1, "start": 0, "stop": 4, "done": [[0, 2]], "captions": 2}))
    assert SliceCheckpoint.load(path).repairs == [] and SliceCheckpoint.load(path).finished_rows == 2
