"""Pure pieces of the worker: config validation, slicing, key encoding, interval bookkeeping."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from vlm_hpc.cluster.array_spec import format_indices, parse_array, split_for_max_array_size
from vlm_hpc.config import RunConfig, load_config
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.internvl.prompt import CAPTION_QUESTION
from vlm_hpc.run.checkpoint import SliceCheckpoint, add_interval
from vlm_hpc.run.layout import OutputLayout, key_to_relpath, relpath_to_key
from vlm_hpc.run.slicing import slice_bounds

ROOT = Path(__file__).parent.parent


def test_default_config_is_the_seeds() -> None:
    config = load_config(ROOT / "configs" / "default.yaml")
    assert (config.generation.batch_size, config.tiling.max_num, config.generation.temperature,
            config.generation.top_p, config.generation.max_new_tokens) == (6, 9, 0.6, 0.7, 168)
    assert config.generation.do_sample and config.prompt.question == CAPTION_QUESTION
    assert config.output.dir == "./outputs/out_laion_0/" and config.output.max_sample_images == 1000
    assert config.model.path == "./InternVL-Chat-V1-5"


def test_default_yaml_lists_every_key_at_its_default_with_a_comment() -> None:
    """configs/default.yaml is the reference users copy: every field of every section, at the dataclass default, so
    that it cannot drift from the code; each key has a comment on its line or the line above."""
    text = (ROOT / "configs" / "default.yaml").read_text()
    listed = yaml.safe_load(text)
    for section in dataclasses.fields(RunConfig):
        defaults = section.default_factory()
        if section.name == "vars":  # names, not settings: the seed's source and partition
            assert set(listed["vars"]) == set(defaults), "vars"
            continue
        assert listed[section.name] == dataclasses.asdict(defaults), f"section {section.name}"
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if re.match(r"  \w+:", line):
            assert "#" in line or lines[number - 1].lstrip().startswith("#"), f"no comment: {line}"


def test_overrides_and_interpolation() -> None:
    config = load_config(ROOT / "configs" / "default.yaml",
                         ["generation.batch_size=8", "vars.partition=7", "data.limit=100", "prompt.system_message=Hi"])
    assert config.generation.batch_size == 8 and config.data.limit == 100
    assert config.output.dir == "./outputs/out_laion_7/" and config.prompt.system_message == "Hi"


@pytest.mark.parametrize(("overrides", "message"), [
    (["generation.batchsize=8"], "did you mean 'batch_size'"),
    (["genration.batch_size=8"], "did you mean 'generation'"),
    (["generation.batch_size=eight"], "must be an integer"),
    (["generation.batch_size=0"], "must be positive"),
    (["output.format=csv"], "choose one of json, jsonl"),
    (["generation.do_sample=maybe"], "true or false"),
    (["nodot=1"], "section.key"),
    (["justtext"], "key=value"),
    (["output.dir=/x/${nowhere}"], "vars.nowhere is not set"),
    # Out of range: each names the key, the range and the value.
    (["generation.temperature=-1"], r"generation.temperature must be positive while generation.do_sample is true "
                                    r"\(or set generation.do_sample=false\), got -1.0"),
    (["generation.temperature=0"], "generation.temperature must be positive"),
    (["generation.top_p=1.5"], "generation.top_p must be above 0 and at most 1, got 1.5"),
    (["generation.top_p=0"], "generation.top_p must be above 0 and at most 1, got 0.0"),
    (["generation.top_p=-0.1"], "generation.top_p must be above 0"),
    (["generation.max_new_tokens=0"], "generation.max_new_tokens must be positive, got 0"),
    (["generation.num_beams=-2"], "generation.num_beams must be positive, got -2"),
    (["generation.vision_batch=0"], "generation.vision_batch must be positive"),
    (["tiling.max_num=0"], "tiling.max_num must be from 1 to 40, got 0"),
    (["tiling.max_num=41"], "tiling.max_num must be from 1 to 40, got 41"),
    (["worker.grace_seconds=0"], "worker.grace_seconds must be positive"),
    (["worker.heartbeat_seconds=-1"], "worker.heartbeat_seconds must be positive"),
    (["worker.heartbeat_failure_seconds=0"], "worker.heartbeat_failure_seconds must be positive"),
    (["worker.loader_workers=-1"], "worker.loader_workers must be at least 0, got -1"),
    (["worker.commit_seconds=-1"], "worker.commit_seconds must be at least 0"),
    (["data.limit=0"], "data.limit must be positive, got 0"),
    (["slurm.mem_gb=-8"], "slurm.mem_gb must be at least 0"),
    # Odd types and values: not numbers, or numbers no setting means.
    (["generation.temperature=.nan"], "generation.temperature must be a finite number, got nan"),
    (["worker.grace_seconds=.inf"], "worker.grace_seconds must be a finite number, got inf"),
    (["generation.top_p=true"], "generation.top_p must be a number, got True"),
    (["generation.top_p=[0.5]"], "generation.top_p must be a number"),
    (["tiling.max_num=4.5"], "tiling.max_num must be an integer, got 4.5"),
    (["worker.heartbeat_failure_seconds=soon"], "worker.heartbeat_failure_seconds must be a number, got 'soon'"),
])
def test_bad_config_is_one_clear_line(overrides: list[str], message: str) -> None:
    with pytest.raises(VlmHpcError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_values_at_the_edges_of_their_ranges_are_accepted() -> None:
    config = load_config(None, ["generation.top_p=1", "tiling.max_num=40", "tiling.max_num=1",
                                "worker.loader_workers=0", "generation.do_sample=false", "generation.temperature=0",
                                "slurm.mem_gb=0",                                 "worker.heartbeat_failure_seconds=5"])
    assert (config.generation.top_p, config.tiling.max_num, config.generation.temperature) == (1.0, 1, 0.0)
    # An optional number is a number, not the text "5" (the lease compares it with seconds).
    assert config.worker.heartbeat_failure_seconds == 5.0 and isinstance(config.worker.heartbeat_failure_seconds, float)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(VlmHpcError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(VlmHpcError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(("rows", "count"), [(15, 1), (15, 4), (15, 15), (3, 7), (1_000_003, 64), (0, 3)])
def test_slices_are_contiguous_and_balanced(rows: int, count: int) -> None:
    bounds = [slice_bounds(rows, i, count) for i in range(count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(VlmHpcError):
        slice_bounds(rows, count, count)


@pytest.mark.parametrize("key", ["plain_key-1.png", "../x", "/etc/passwd", "a\x00b", "x" * 300, ".", "..",
                                 ".hidden", "%41", "héllo wörld", "a/b/../../c", "~", "", " ", "CON", "日本語" * 50])
def test_keys_map_reversibly_inside_the_output(key: str, tmp_path: Path) -> None:
    relpath = key_to_relpath(key) if key else "%"
    if key:
        assert relpath_to_key(relpath) == key
    parts = relpath.split("/")
    assert all(part not in ("", ".", "..") and len(part.encode()) <= 201 for part in parts)
    layout = OutputLayout(tmp_path)
    if key:
        resolved = layout.caption_json(key).resolve()
        assert resolved.is_relative_to(tmp_path.resolve() / "captions")


def test_distinct_keys_get_distinct_paths() -> None:
    keys = ["a", "%a", "a.json", "A", "a b", "a%20b", "x" * 300, "x" * 299 + "y"]
    assert len({key_to_relpath(k) for k in keys}) == len(keys)


def test_run_files_keep_their_names(tmp_path: Path) -> None:
    """Names that scripts, people and older runs rely on; layout is the one place that spells them."""
    layout = OutputLayout(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in (
        layout.submissions_file, layout.submitit_dir, layout.write_probe, layout.manifest_temporary(7),
        layout.manifest_lock, *layout.run_bookkeeping())] == [
        "submissions.jsonl", "logs/submitit", "state/.write_probe", ".manifest.7.tmp", "manifest.lock", "state",
        "failures", "manifest.json", "inputs"]
    cache = layout.input_cache
    assert [p.relative_to(tmp_path).as_posix() for p in (cache.shard_list, cache.tar_index("00000.tar"),
                                                         cache.tar_index("a/b.tar"), cache.file_list)] == [
        "inputs/shards.json", "inputs/tar_index/00000.tar.parquet", "inputs/tar_index/%a%2Fb%2Etar.parquet",
        "inputs/files.parquet"]
    assert layout.set_aside(layout.manifest_file, "20260101-000000").name == "manifest.json.previous-20260101-000000"


def test_intervals_merge_and_pending_rows() -> None:
    intervals: list[list[int]] = []
    for start, stop in [(5, 6), (0, 2), (2, 4), (7, 9), (4, 5)]:
        intervals = add_interval(intervals, start, stop)
    assert intervals == [[0, 6], [7, 9]]
    checkpoint = SliceCheckpoint(slice=0, num_slices=1, start=0, stop=10, done=intervals)
    assert checkpoint.pending_rows() == [6, 9] and checkpoint.finished_rows == 8 and not checkpoint.complete


@pytest.mark.parametrize(("spec", "indices", "throttle"), [
    ("0-63", tuple(range(64)), None), ("0-63%16", tuple(range(64)), 16), ("3,7,10-12", (3, 7, 10, 11, 12), None),
    ("5", (5,), None), ("0-10:5", (0, 5, 10), None), ("7,3,3", (3, 7), None),
])
def test_array_specs_parse_as_slurm_writes_them(spec: str, indices: tuple, throttle: int | None) -> None:
    parsed = parse_array(spec)
    assert parsed.indices == indices and parsed.throttle == throttle
    assert parse_array(str(parsed)).indices == indices


@pytest.mark.parametrize("spec", ["", "a-b", "5-3", "1,,2", "0-3%0", "0-3%x", "-1"])
def test_bad_array_specs_are_refused(spec: str) -> None:
    with pytest.raises(VlmHpcError, match="--array"):
        parse_array(spec)


def test_array_splits_by_max_array_size_with_offsets() -> None:
    assert format_indices([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    groups = split_for_max_array_size((0, 5, 999, 1000, 1001, 2500), 1000)
    assert groups == [(0, (0, 5, 999)), (1000, (0, 1)), (2000, (500,))]
    assert all(task < 1000 for _, tasks in groups for task in tasks)
