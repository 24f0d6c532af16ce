"""Sharded inputs end to end on the tiny model: data.path as a file, a folder or a pattern of Parquet, Arrow and
webdataset shards (written by pyarrow, datasets, img2dataset itself, and tarfile in img2dataset's layout) and
image folders; slices across shard boundaries give the captions of the same images in a save_to_disk dataset;
the shard list and tar indexes are made once and kept in OUTPUT/inputs/; img2dataset's failed downloads are in
the ledger; and a broken or changed input gets one line naming it."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from builders import committed_rows, make_dataset, png, read_captions, slice_state, start_worker, wait_for, write_config
from vlm_hpc.config import DataSection, load_config
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.readers import open_reader
from vlm_hpc.run.readers.shards import expand_braces
from vlm_hpc.run.readers.webdataset import WebDatasetReader
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.verify import verify

IMG2DATASET_OUTPUT = Path(__file__).parent / "fixtures" / "img2dataset"  # made by its make.py


def encoded(seed: int, size: tuple[int, int], file_format: str) -> bytes:
    """A small deterministic noise image in `file_format` (PNG, JPEG, WEBP, GIF, TIFF, BMP)."""
    if file_format == "PNG":
        return png(seed, size)
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=file_format)
    return buffer.getvalue()


FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"]
# key, image, web caption: twelve images of six formats and a few sizes, one without a caption.
ROWS = [(f"img_{i:02d}", encoded(i, (24 + 4 * (i % 4), 24), FORMATS[i % 6]), None if i == 5 else f"web {i}")
        for i in range(12)]
SHARD_SIZES = [5, 0, 4, 3]  # an empty shard, and slices of 4 rows that cross every boundary


def shards_of(rows: list[tuple]) -> list[list[tuple]]:
    bounds = np.cumsum([0, *SHARD_SIZES])
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def table(rows: list[tuple]) -> pa.Table:
    return pa.table({"new_key": pa.array([r[0] for r in rows], pa.string()),
                     "png": pa.array([r[1] for r in rows], pa.binary()),
                     "caption": pa.array([r[2] for r in rows], pa.string())})


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar in img2dataset's layout: each sample's members in name order, read-only, as its TarWriter writes."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension in sorted(members):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mode, info.mtime, info.uname, info.gname = len(members[extension]), 0o444, 0, "x", "x"
                tar.addfile(info, io.BytesIO(members[extension]))
    return path


def webdataset_sample(key: str, image: bytes, caption: str | None, extension: str = "jpg") -> tuple[str, dict]:
    members = {extension: image, "json": json.dumps({"key": key, "status": "success", "caption": caption}).encode()}
    if caption is not None:
        members["txt"] = caption.encode()
    return key, members


def caption_run(tmp_path: Path, name: str, data: dict, model: Path, engine, slices: int = 3,
                output_format: str = "jsonl", loader_workers: int = 0) -> Path:
    """Caption `data` in `slices` slices in process, check it with verify, and return the output folder."""
    output = tmp_path / f"out_{name}"
    config = load_config(write_config(tmp_path / f"{name}.yaml", model, Path(data["path"]), output, data=data,
                                      output={"format": output_format}, worker={"loader_workers": loader_workers}))
    for slice_id in range(slices):
        assert run_slice(config, slice_id, slices, engine_factory=engine).status == "done"
    report = verify(output)
    assert report.ok, report
    return output


def ledger(output: Path) -> dict[str, tuple[str, str]]:
    """key -> (reason, detail) of every row in the failure ledger."""
    entries = [json.loads(line) for path in sorted((output / "failures").glob("*.jsonl"))
               for line in path.read_text().splitlines()]
    return {entry["key"]: (entry["reason"], entry["detail"]) for entry in entries}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, golden_model_dir: Path, shared_engine) -> dict[str, dict]:
    """The captions of ROWS read from one save_to_disk file, in one slice: what every sharded form must give."""
    folder = tmp_path_factory.mktemp("reference")
    data = make_dataset(folder / "data", ROWS)
    return read_captions(caption_run(folder, "reference", {"path": str(data)}, golden_model_dir, shared_engine, 1))


def test_patterns_expand_braces_and_globs_in_name_order(tmp_path: Path) -> None:
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.parquet") == ["a/1.parquet", "a/2.parquet", "b/1.parquet", "b/2.parquet"]
    assert expand_braces("x{y}") == ["x{y}"]
    folder = tmp_path / "shards"
    folder.mkdir()
    names = ["c", "a", "d", "b"]  # written in this order, so that neither row nor listing order is name order
    for name, rows in zip(names, shards_of(ROWS)):
        pq.write_table(table(rows), str(folder / f"{name}.parquet"))
    (folder / "notes.txt").write_text("not a shard")
    expected = [row for _, rows in sorted(zip(names, shards_of(ROWS))) for row in rows]
    for path in (folder, f"{folder}/*.parquet", f"{folder}/{{a,b,c,d}}.parquet", f"{tmp_path}/sh*/*"):
        reader = open_reader(DataSection(path=str(path), format="parquet"))
        assert reader.keys(0, 12) == [r[0] for r in expected], path  # a, b, c, d: by name, not by listing
    cases = [(DataSection(path=f"{tmp_path}/none/*.tar"), r"data.path .*/none/\*.tar matches no webdataset .tar"),
             (DataSection(path=f"{folder}/{{a,b,x}}.parquet"), r"names 1 files that do not exist \(the first: .*x"),
             (DataSection(path=f"{tmp_path}/none/*"), "auto cannot tell the format")]
    for section, message in cases:
        with pytest.raises(VlmHpcError, match=message) as error:
            open_reader(section)
        assert "\n" not in str(error.value)


def test_parquet_shards_count_rows_from_footers_and_a_shard_without_the_columns_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "parquet"
    folder.mkdir()
    for number, rows in enumerate(shards_of(ROWS)):
        pq.write_table(table(rows), str(folder / f"part-{number:02d}.parquet"), row_group_size=2)
    reader = open_reader(DataSection(path=str(folder)), cache_dir=tmp_path / "cache")
    assert reader.num_rows == 12 and reader.read(3, 10) == open_reader(
        DataSection(path=str(make_dataset(tmp_path / "same", ROWS)))).read(3, 10)
    recorded = json.loads((tmp_path / "cache" / "shards.json").read_text())
    assert [(s["name"], s["rows"]) for s in recorded["shards"]] == [
        (f"part-{n:02d}.parquet", rows) for n, rows in enumerate(SHARD_SIZES)]
    assert reader.columns(4, 6, ["new_key", "caption"]).to_pylist() == [
        {"new_key": "img_04", "caption": "web 4"}, {"new_key": "img_05", "caption": None}]
    # Rows 4 and 5 are in row group 2 of part-00 (first row 4) and group 0 of part-02 (first row 5, globally).
    assert reader.image_sizes(4, 6).tolist()[0::3] == [4, 5]
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(table(ROWS[:3]), str(other / "a.parquet"))
    pq.write_table(table(ROWS[3:]).rename_columns(["key", "png", "caption"]), str(other / "b.parquet"))
    pq.write_table(table([]).rename_columns(["key", "png", "caption"]), str(other / "c.parquet"))  # empty: no matter
    with pytest.raises(VlmHpcError, match=r"column 'new_key' \(data.key_column\) is not in shard .*/b.parquet; its "
                                          r"columns are key, png, caption.*every shard must have") as error:
        open_reader(DataSection(path=f"{other}/*.parquet"))
    assert "\n" not in str(error.value)


def test_sharded_inputs_caption_like_one_save_to_disk_file(tmp_path: Path, golden_model_dir: Path, shared_engine,
                                                            reference: dict) -> None:
    """Parquet, Arrow and webdataset shards, a save_to_disk dataset of three files and an image folder: three
    slices across their shard boundaries give the reference captions, and verify proves every row."""
    inputs: dict[str, dict] = {}
    for kind in ("parquet", "arrow", "tar"):
        folder = tmp_path / kind
        folder.mkdir()
        for number, rows in enumerate(shards_of(ROWS)):
            path = folder / f"{number:05d}.{kind}"
            if kind == "parquet":
                pq.write_table(table(rows), str(path))
            elif kind == "arrow":
                with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table(rows).schema) as out:
                    out.write_table(table(rows))
            else:
                write_tar(path, [webdataset_sample(*row) for row in rows])
        inputs[kind] = {"path": f"{folder}/{{00000..00003}}.{kind}"}
    datasets.Dataset.from_dict(table(ROWS).to_pydict()).save_to_disk(str(tmp_path / "saved"), num_shards=3)
    inputs["datasets"] = {"path": str(tmp_path / "saved")}
    images = tmp_path / "images"
    for key, image, web_caption in ROWS:  # nested folders, each file in its own format
        number = int(key[-2:])
        path = images / f"group_{number % 3}" / ("deep" if number % 2 else "") / f"{key}.{FORMATS[number % 6].lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
        if web_caption is not None:
            path.with_suffix(".txt").write_text(web_caption)
    inputs["images"] = {"path": str(images)}
    for name, data in inputs.items():
        output = caption_run(tmp_path, name, data, golden_model_dir, shared_engine)
        captions = read_captions(output)
        if name == "images":  # keys are relative paths: group_1/deep/img_01
            assert "group_1/deep/img_01" in captions
            captions = {key.rpartition("/")[2]: value for key, value in captions.items()}
        assert captions == reference, name
        assert ledger(output) == {}, name
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["input_shards"], name  # the shard list's digest: a changed list is another dataset


def test_img2dataset_webdataset_and_parquet_outputs_caption_end_to_end(
        tmp_path: Path, golden_model_dir: Path, shared_engine) -> None:
    """img2dataset's own output (tests/fixtures/img2dataset, written by img2dataset 1.47 from a loopback server:
    some URLs 404, one is not an image), webdataset tars and parquet shards: each is captioned across shard
    boundaries, its failed downloads are in the ledger with img2dataset's error, and its captions are those of
    the same images in a save_to_disk file."""
    made = {name: IMG2DATASET_OUTPUT / name for name in ("webdataset", "parquet")}
    for output_format, folder in made.items():  # a copy: the inputs' mtimes are the run's, not the checkout's
        shutil.copytree(folder, tmp_path / f"i2d_{output_format}")
    tars = sorted((tmp_path / "i2d_webdataset").glob("*.tar"))
    assert [p.name for p in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    assert (tmp_path / "i2d_webdataset" / "00000.parquet").exists()
    assert (tmp_path / "i2d_webdataset" / "00000_stats.json").exists()
    # The same images, read with tarfile alone, in a save_to_disk file.
    downloaded = {}
    for path in tars:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                downloaded.setdefault(key, {})[extension] = tar.extractfile(member).read()
    assert len(downloaded) == 8
    same = make_dataset(tmp_path / "same", [(k, v["jpg"], v["txt"].decode()) for k, v in sorted(downloaded.items())])
    expected = read_captions(caption_run(tmp_path, "same", {"path": str(same)}, golden_model_dir, shared_engine, 1))
    for output_format in ("webdataset", "parquet"):
        folder = tmp_path / f"i2d_{output_format}"
        output = caption_run(tmp_path, output_format, {"path": str(folder)}, golden_model_dir, shared_engine,
                             slices=2, loader_workers=1)  # slices [0, 6) and [6, 11) of shards of 4, 4 and 3
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["num_rows"] == 11, output_format  # every attempted URL is a row
        assert read_captions(output) == expected, output_format
        failed = ledger(output)
        assert sorted(reason for reason, _ in failed.values()) == ["not_downloaded"] * 3, failed
        details = sorted(detail for _, detail in failed.values())
        assert sum("failed_to_download: HTTP Error 404" in d for d in details) == 2, details
        assert sum("failed_to_resize" in d for d in details) == 1, details
    shards = json.loads((tmp_path / "out_webdataset" / "inputs" / "shards.json").read_text())["shards"]
    assert [(s["name"], s["sidecar"], s["rows"]) for s in shards] == [
        ("00000.tar", "00000.parquet", 4), ("00001.tar", "00001.parquet", 4), ("00002.tar", "00002.parquet", 3)]
    assert all((tmp_path / "out_webdataset" / "inputs" / "tar_index" / f"{p.name}.parquet").exists() for p in tars)


def test_a_tar_is_indexed_once_from_its_headers_and_later_starts_read_the_index(tmp_path: Path, golden_model_dir: Path,
                                                                                shared_engine) -> None:
    folder = tmp_path / "tars"
    folder.mkdir()
    for number, rows in enumerate(shards_of(ROWS)):
        write_tar(folder / f"{number:05d}.tar", [webdataset_sample(*row) for row in rows])
    write_tar(folder / "00002.tar", [webdataset_sample(*ROWS[5]), ("img_06", {"jpg": b"not an image"}),
                                     webdataset_sample(*ROWS[7]), ("dir/img_08", {"png": ROWS[8][1], "txt": b"w"})])
    cache = OutputLayout(tmp_path / "out").input_cache
    first = open_reader(DataSection(path=str(folder)), cache_dir=cache.root)
    assert isinstance(first, WebDatasetReader) and first.num_rows == 12
    index = pq.read_table(str(cache.tar_index("00002.tar")))
    assert index.column("key").to_pylist() == ["img_05", "img_05", "img_06", "img_07", "img_07", "img_07",
                                               "dir/img_08", "dir/img_08"]
    rows = first.read(5, 9)
    assert [(r.key, r.image, r.web_caption) for r in rows] == [
        ("img_05", ROWS[5][1], None), ("img_06", b"not an image", None), ("img_07", ROWS[7][1], "web 7"),
        ("dir/img_08", ROWS[8][1], "w")]
    # Captioned, the sample whose image is no image is in the ledger and the task goes on; the key with a slash
    # is a caption file under its encoded name.
    output = caption_run(tmp_path, "tars", {"path": str(folder)}, golden_model_dir, shared_engine,
                         output_format="json")
    assert [(key, reason) for key, (reason, _) in ledger(output).items()] == [("img_06", "undecodable")]
    assert (output / "captions" / "%dir%2Fimg_08.json").exists() and verify(output).captioned == 11
    # The index is all a later start needs of a tar: with the first header of tar 2 overwritten (same size and
    # mtime, so the shard is as listed), its rows are still found.
    status = (folder / "00002.tar").stat()
    with open(folder / "00002.tar", "r+b") as handle:
        handle.write(b"\xff" * 512)
    os.utime(folder / "00002.tar", ns=(status.st_atime_ns, status.st_mtime_ns))
    later = open_reader(DataSection(path=str(folder)), cache_dir=cache.root)
    assert later.read(7, 9) == rows[2:] and later.keys(0, 12) == first.keys(0, 12)
    with pytest.raises(VlmHpcError, match="is not an uncompressed tar"):
        open_reader(DataSection(path=str(folder)))  # without the index the headers are read, and are gone


def test_truncated_tars_are_named_in_one_line(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar", [webdataset_sample(*row) for row in ROWS[:4]]).read_bytes()
    last = 0
    with tarfile.open(tmp_path / "whole.tar") as tar:
        for member in tar.getmembers():
            last = member.offset_data + -(-member.size // 512) * 512  # the end of the member's padded data
    for name, cut in (("mid_member", len(whole) // 2), ("at_member_boundary", last)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "00000.tar").write_bytes(whole[:cut])
        with pytest.raises(VlmHpcError, match=rf"{name}/00000.tar is truncated .*copy or write it again") as error:
            open_reader(DataSection(path=str(tmp_path / name)))
        assert "\n" not in str(error.value), name


def test_a_shard_gone_or_recounted_after_the_first_start_is_named(tmp_path: Path, golden_model_dir: Path,
                                                                   shared_engine) -> None:
    folder = tmp_path / "parquet"
    folder.mkdir()
    for number, rows in enumerate(shards_of(ROWS)):
        pq.write_table(table(rows), str(folder / f"{number:05d}.parquet"))
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, folder, output,
                                      worker={"loader_workers": 0}))
    assert run_slice(config, 0, 3, engine_factory=shared_engine).status == "done"
    pq.write_table(table(ROWS[9:11]), str(folder / "00003.parquet"))  # 3 rows then, 2 now
    with pytest.raises(VlmHpcError, match=r"shard .*00003.parquet changed since the run's first start listed it .*"
                                          r"3 rows then, 2 now.*--force") as error:
        run_slice(config, 2, 3, engine_factory=shared_engine)
    assert "\n" not in str(error.value)
    (folder / "00003.parquet").unlink()
    for attempt in (lambda: run_slice(config, 1, 3, engine_factory=shared_engine), lambda: verify(output)):
        with pytest.raises(VlmHpcError, match=r"shard .*00003.parquet is gone since the run's first start listed it "
                                              r"in .*inputs/shards.json.*restore it") as error:
            attempt()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["parquet", "tar"])
def test_a_later_start_opens_only_its_slices_shards_and_the_first_and_last(
        kind: str, tmp_path: Path, golden_model_dir: Path, shared_engine) -> None:
    """Ten shards of four rows in five slices: once the first start made the shard list (and the tar indexes),
    slice 2 (rows 16..23: shards 4 and 5) reads no other shard but the first and the last (the dataset
    fingerprint's first and last rows: shards 0, 1, 8, 9). Shards 2, 3, 6 and 7 are overwritten with garbage of
    the same size and mtime (and their tar indexes removed): slice 2 still runs, and a slice that reads one fails."""
    folder = tmp_path / kind
    folder.mkdir()
    rows = [(f"row_{i:02d}", png(i, (24, 24)), f"web {i}") for i in range(40)]
    for shard in range(10):
        path, part = folder / f"{shard:05d}.{kind}", rows[4 * shard:4 * shard + 4]
        if kind == "parquet":
            pq.write_table(table(part), str(path))
        else:
            write_tar(path, [webdataset_sample(*row) for row in part])
    output = tmp_path / "out"
    config = load_config(write_config(tmp_path / "c.yaml", golden_model_dir, folder, output,
                                      worker={"loader_workers": 0}))
    assert run_slice(config, 0, 5, engine_factory=shared_engine).status == "done"
    for shard in (2, 3, 6, 7):
        path = folder / f"{shard:05d}.{kind}"
        status = path.stat()
        path.write_bytes(b"\xff" * status.st_size)
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
        (output / "inputs" / "tar_index" / f"{path.name}.parquet").unlink(missing_ok=True)
    assert run_slice(config, 2, 5, engine_factory=shared_engine).status == "done"
    assert json.loads((output / "manifest.json").read_text())["num_rows"] == 40
    with pytest.raises(VlmHpcError, match=r"00002\.(parquet|tar)"):
        run_slice(config, 1, 5, engine_factory=shared_engine)


def test_a_sigkilled_worker_on_tar_shards_resumes_to_a_verified_run(tmp_path: Path, golden_model_dir: Path) -> None:
    folder = tmp_path / "tars"
    folder.mkdir()
    for shard in range(5):  # 7 tiles an image: slow enough to be killed midway
        write_tar(folder / f"{shard:05d}.tar", [webdataset_sample(f"{shard}{i:03d}", png(8 * shard + i, (64, 48)),
                                                                  f"web {shard} {i}", "png") for i in range(8)])
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", golden_model_dir, folder, output, generation={"batch_size": 2})
    process = start_worker(config)
    wait_for(lambda: committed_rows(output) >= 4, 120, "a few committed batches")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert 4 <= committed_rows(output) < 40
    assert (output / "inputs" / "shards.json").exists()
    rerun = start_worker(config)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert slice_state(output)["status"] == "done" and committed_rows(output) == 40
    report = verify(output)
    assert report.ok and report.captioned == 40, report
