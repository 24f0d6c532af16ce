"""Settings and rows pinned in OUTPUT/manifest.json: a resume that would mix captions made differently is
refused with one line naming each difference, unless --accept-changes records the boundary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders import make_dataset, png, slow_dataset, start_worker, stop, wait_for, write_config
from vlm_hpc.config import DataSection, load_config
from vlm_hpc.engines import ENGINES, register_engine
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.manifest import ensure_manifest, scan_dataset
from vlm_hpc.run.pins import PinnedSettings
from vlm_hpc.run.readers import open_reader, slice_fingerprint
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.tiny_model import write_tiny_model

ROWS = 20  # two slices of 10; rows 8..11 are neither among the first nor the last 8 keys

# Another engine name for the same implementation: a different engine is a different caption, whatever it runs.
register_engine("transformers_again", ENGINES["transformers"])


def dataset_rows(changed_row: int | None = None, changed: str = "") -> list[tuple[str, bytes, str]]:
    rows = [(f"row_{i:04d}", png(i), f"web {i}") for i in range(ROWS)]
    if changed == "image":  # another image of another byte length under the same key
        rows[changed_row] = (rows[changed_row][0], png(1000 + changed_row, (56, 56)), rows[changed_row][2])
        assert len(rows[changed_row][1]) != len(png(changed_row))
    elif changed == "key":
        rows[changed_row] = ("renamed", rows[changed_row][1], rows[changed_row][2])
    return rows


@pytest.fixture(scope="module")
def first_run(golden_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, shared_engine) -> dict[str, Path]:
    """A run of two slices whose slice 0 is done and slice 1 not started: the folder a resume finds."""
    work = tmp_path_factory.mktemp("first_run")
    data = make_dataset(work / "data", dataset_rows())
    output = work / "out"
    config = write_config(work / "c.yaml", golden_model_dir, data, output, worker={"loader_workers": 0})
    assert run_slice(load_config(config), 0, 2, engine_factory=shared_engine).status == "done"
    return {"data": data, "output": output, "model": golden_model_dir}


@pytest.fixture
def resumed(first_run: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A copy of the first run's output folder, with a config pointing at it."""
    output = tmp_path / "out"
    shutil.copytree(first_run["output"], output)
    config = write_config(tmp_path / "c.yaml", first_run["model"], first_run["data"], output,
                          worker={"loader_workers": 0})
    return {**first_run, "output": output, "config": config}


def manifest(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())


def one_error_line(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("other_model"), seed=7)


@pytest.mark.parametrize(("override", "difference"), [
    ("tiling.max_num=4", "tiling.max_num: 6 then, 4 now"),
    ("prompt.question=Name the colours.", "prompt.question: changed ("),
    ("generation.max_new_tokens=8", "generation.max_new_tokens: 12 then, 8 now"),
    ("generation.do_sample=true", "generation.do_sample: False then, True now"),
    ("model.dtype=bfloat16", "model.dtype: 'float32' then, 'bfloat16' now"),
    ("prompt.system_message=Be brief.", "prompt.system_message: changed ("),
    ("model.path=OTHER", "model: "),
    ("model.engine=transformers_again", "model.engine: 'transformers' then, 'transformers_again' now"),
])
def test_a_resume_with_a_changed_setting_is_refused_naming_it(override: str, difference: str, resumed: dict,
                                                              other_model: Path, shared_engine) -> None:
    config = load_config(resumed["config"], [override.replace("OTHER", str(other_model))])
    for slice_id in (0, 1):  # the finished slice and the one not started yet
        with pytest.raises(VlmHpcError) as refusal:
            run_slice(config, slice_id, 2, engine_factory=shared_engine)
        message = str(refusal.value)
        assert "\n" not in message and difference in message, message
        assert "new output.dir" in message and "--accept-changes" in message, message
    assert not (resumed["output"] / "state" / "slice_00001.json").exists()


def test_the_worker_command_refuses_with_exit_code_2_and_one_line_listing_every_difference(
        resumed: dict, other_model: Path) -> None:
    line = one_error_line(start_worker(resumed["config"], 1, 2, "tiling.max_num=4", "generation.max_new_tokens=8",
                                       "generation.do_sample=true", "prompt.question=Name the colours.",
                                       f"model.path={other_model}"))
    for difference in ("tiling.max_num: 6 then, 4 now", "generation.max_new_tokens: 12 then, 8 now",
                       "generation.do_sample: False then, True now", "prompt.question: changed", "model: "):
        assert difference in line, line


@pytest.mark.parametrize("changed", ["image", "key"])
def test_a_dataset_whose_middle_rows_changed_is_refused_for_the_slice_holding_them(
        changed: str, resumed: dict, tmp_path: Path, shared_engine) -> None:
    # Elsewhere on disk (nodes may mount the data anywhere): only its content identifies it.
    data = make_dataset(tmp_path / "changed_data", dataset_rows(10, changed))
    config = write_config(tmp_path / "changed.yaml", resumed["model"], data, resumed["output"],
                          worker={"loader_workers": 0})
    line = one_error_line(start_worker(config, 1, 2))
    assert "the rows of slice 1 [10, 20) changed" in line, line
    # Slice 0 checks only its own rows, which are unchanged.
    assert run_slice(load_config(config), 0, 2, engine_factory=shared_engine).status == "done"


def test_settings_that_change_no_caption_change_freely(resumed: dict, shared_engine) -> None:
    config = load_config(resumed["config"], [
        "generation.batch_size=3", "generation.tile_budget=20", "generation.sort_window=5",
        "generation.vision_batch=2", "worker.commit_rows=2", "worker.heartbeat_seconds=2",
        "worker.grace_seconds=5", "slurm.partition=gpu", "slurm.time_min=30", "model.device=cpu",
        "model.attn_implementation=eager"])
    assert run_slice(config, 1, 2, engine_factory=shared_engine).status == "done"
    assert manifest(resumed["output"])["accepted_changes"] == []


def test_accept_changes_goes_on_records_the_boundary_and_the_new_settings_need_no_flag_after(
        resumed: dict, shared_engine) -> None:
    output = resumed["output"]
    process = start_worker(resumed["config"], 1, 2, "tiling.max_num=4", "--accept-changes")
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    record = manifest(output)
    assert record["pinned"]["max_num"] == 4
    [boundary] = record["accepted_changes"]
    assert boundary["differences"] == ["tiling.max_num: 6 then, 4 now"] and boundary["slice"] == 1
    assert boundary["finished_rows"] == {"0": 10}  # slice 1 had not started
    stamp = json.loads((output / "stamps" / "slice_00001.json").read_text())[-1]
    assert stamp["accepted_changes"] == ["tiling.max_num: 6 then, 4 now"] and stamp["max_num"] == 4
    assert "accepted changed settings" in (output / "logs" / "slice_00001.log").read_text()
    # The next resume with the new settings needs no flag; the old settings are now the change.
    assert run_slice(load_config(resumed["config"], ["tiling.max_num=4"]), 0, 2,
                     engine_factory=shared_engine).status == "done"
    with pytest.raises(VlmHpcError, match="tiling.max_num: 4 then, 6 now"):
        run_slice(load_config(resumed["config"]), 0, 2, engine_factory=shared_engine)
    assert len(manifest(output)["accepted_changes"]) == 1


def test_a_manifest_without_pins_loads_and_records_them_now(resumed: dict, shared_engine) -> None:
    output = resumed["output"]
    old = manifest(output)
    for name in ("pinned", "slice_fingerprints", "accepted_changes"):
        del old[name]
    (output / "manifest.json").write_text(json.dumps(old))
    assert run_slice(load_config(resumed["config"]), 0, 2, engine_factory=shared_engine).status == "done"
    record = manifest(output)
    assert record["pinned"]["max_num"] == 6 and set(record["slice_fingerprints"]) == {"0"}
    log = (output / "logs" / "slice_00000.log").read_text()
    assert "did not pin" in log and "no content fingerprint of slice 0" in log


# One slice's start, as far as the manifest goes (no torch: eight of them start at once).
SLICE_START = """
import json, sys
from pathlib import Path
from vlm_hpc.config import load_config
from vlm_hpc.config import DataSection
from vlm_hpc.run.readers import open_reader, slice_fingerprint
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.manifest import ensure_manifest
from vlm_hpc.run.pins import PinnedSettings
config = load_config(sys.argv[1])
pins = PinnedSettings(**json.loads(sys.argv[2]))
ensure_manifest(OutputLayout(Path(config.output.dir)), open_reader(config.data), config, 8, pins,
                slice_id=int(sys.argv[3]), accept_changes=True)
"""


def test_slices_updating_the_manifest_at_once_keep_each_others_records(resumed: dict, tmp_path: Path) -> None:
    output = tmp_path / "eight"
    config = load_config(write_config(tmp_path / "eight.yaml", resumed["model"], resumed["data"], output))
    rows = open_reader(config.data)
    pins = PinnedSettings(**manifest(resumed["output"])["pinned"])
    ensure_manifest(OutputLayout(output), rows, config, 8, pins)
    old = manifest(output)
    old["slice_fingerprints"] = {}  # as an older manifest: every slice records its own at its start
    (output / "manifest.json").write_text(json.dumps(old))
    changed = json.dumps({**pins.to_dict(), "max_num": 5})
    starts = [subprocess.Popen([sys.executable, "-c", SLICE_START, str(tmp_path / "eight.yaml"), changed,
                                str(slice_id)], stderr=subprocess.PIPE, text=True) for slice_id in range(8)]
    for process in starts:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    record = manifest(output)
    assert record["slice_fingerprints"] == scan_dataset(rows, 8)[1]
    assert [change["differences"] for change in record["accepted_changes"]] == [["tiling.max_num: 6 then, 5 now"]]


def test_row_fingerprints_see_a_changed_middle_image_in_arrow_image_feature_and_parquet(tmp_path: Path) -> None:
    import datasets
    fingerprints = {}
    for name, rows in (("same", dataset_rows()), ("changed", dataset_rows(10, "image"))):
        source = datasets.Dataset.from_list([{"new_key": k, "png": b, "caption": c} for k, b, c in rows])
        source.to_parquet(str(tmp_path / f"{name}.parquet"), batch_size=4)  # row groups of 4 rows
        source.map(lambda row: {"image": {"bytes": row["png"], "path": None}}, remove_columns=["png"]).cast_column(
            "image", datasets.Image()).save_to_disk(str(tmp_path / f"{name}_feature"))
        make_dataset(tmp_path / name, rows)
        for kind, section in (("arrow", DataSection(path=str(tmp_path / name))),
                              ("feature", DataSection(path=str(tmp_path / f"{name}_feature"), image_column="image")),
                              ("parquet", DataSection(path=str(tmp_path / f"{name}.parquet")))):
            source_rows = open_reader(section)
            # Parquet sees row 10 through its row group [8, 12): rows 0..7 are a range it leaves unchanged.
            fingerprints[name, kind] = [slice_fingerprint(source_rows, a, b) for a, b in ((0, 8), (8, 20))]
    for kind in ("arrow", "feature", "parquet"):
        assert fingerprints["same", kind][0] == fingerprints["changed", kind][0], kind
        assert fingerprints["same", kind][1] != fingerprints["changed", kind][1], kind
    assert fingerprints["same", "arrow"] == fingerprints["same", "feature"]  # the same keys and image lengths


def test_submit_refuses_to_accept_changes_while_a_slice_runs_with_the_pinned_settings(golden_model_dir: Path,
                                                                                      tmp_path: Path) -> None:
    from vlm_hpc.cluster.array_spec import parse_array
    from vlm_hpc.submit import submit
    data = slow_dataset(tmp_path / "data", 200)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, data, output, generation={"batch_size": 2})
    running = start_worker(config, 0, 2)
    try:
        wait_for(lambda: (output / "logs" / "slice_00000.log").exists() and "computed rows="
                 in (output / "logs" / "slice_00000.log").read_text(), 120, "slice 0 at work")
        with pytest.raises(VlmHpcError, match=r"slices 0 of .* are running with the settings pinned now"):
            submit(load_config(config, ["tiling.max_num=4"]), parse_array("1"), None, "debug", accept_changes=True)
        assert manifest(output)["accepted_changes"] == [] and manifest(output)["pinned"]["max_num"] == 6
    finally:
        stop(running)
