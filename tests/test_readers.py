"""The row-reader seam: each built-in reader reads back what `datasets` and pyarrow wrote, a reader defined
here registers through the public registry and captions end to end, and data.format chooses among them."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders import make_dataset, png, read_captions, write_config
from vlm_hpc.config import DataSection, load_config
from vlm_hpc.errors import VlmHpcError
from vlm_hpc.run.readers import READERS, Row, RowReader, open_reader, register_reader, slice_fingerprint
from vlm_hpc.run.readers.arrow_file import ArrowFileReader
from vlm_hpc.run.readers.datasets_folder import DatasetsFolderReader
from vlm_hpc.run.readers.parquet_file import ParquetFileReader
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.verify import verify

# key, image, web caption: with an empty key, image and caption among them, as web data has.
ROWS = [(f"k{i:02d}", png(i, (8 + i, 8)), f"web {i}") for i in range(7)] + [
    (None, png(7), "no key"), ("k08", None, "no image"), ("k09", png(9), None), ("k10", png(10), "last")]


def columns(rows: list[tuple]) -> dict[str, list]:
    return {"new_key": [r[0] for r in rows], "png": [r[1] for r in rows], "caption": [r[2] for r in rows]}


def arrow_table(rows: list[tuple]) -> pa.Table:
    return pa.table({name: pa.array(values, pa.binary() if name == "png" else pa.string())
                     for name, values in columns(rows).items()})


def expected_rows(first: int, last: int) -> list[Row]:
    return [Row(i, *ROWS[i]) for i in range(first, last)]


def image_lengths(first: int, last: int) -> list[int]:
    return [-1 if image is None else len(image) for _, image, _ in ROWS[first:last]]


def test_a_save_to_disk_folder_of_several_files_reads_back_in_order(tmp_path: Path) -> None:
    datasets.Dataset.from_dict(columns(ROWS)).save_to_disk(str(tmp_path / "data"), num_shards=3)
    assert len(list((tmp_path / "data").glob("*.arrow"))) == 3
    reader = open_reader(DataSection(path=str(tmp_path / "data")))
    assert isinstance(reader, DatasetsFolderReader) and reader.num_rows == len(ROWS)
    assert reader.read(0, 100) == expected_rows(0, len(ROWS))
    assert reader.read(5, 9) == expected_rows(5, 9)
    assert reader.keys(6, 9) == ["k06", None, "k08"]
    assert reader.image_sizes(0, len(ROWS)).tolist() == image_lengths(0, len(ROWS))
    limited = open_reader(DataSection(path=str(tmp_path / "data"), limit=4))
    assert limited.num_rows == 4 and limited.read(2, 10) == expected_rows(2, 4) and limited.read(4, 10) == []


def test_a_datasets_image_feature_gives_its_bytes(tmp_path: Path) -> None:
    images = [{"bytes": image, "path": None} if image else None for _, image, _ in ROWS]
    features = datasets.Features({"new_key": datasets.Value("string"), "png": datasets.Image(),
                                  "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({**columns(ROWS), "png": images}, features=features).save_to_disk(str(tmp_path / "d"))
    reader = open_reader(DataSection(path=str(tmp_path / "d"), format="datasets"))
    assert pa.types.is_struct(reader.columns(0, len(ROWS), ["png"]).column("png").type)
    assert reader.read(0, len(ROWS)) == expected_rows(0, len(ROWS))
    assert reader.image_sizes(0, len(ROWS)).tolist() == image_lengths(0, len(ROWS))


@pytest.mark.parametrize("writer", ["file", "stream"])
def test_an_arrow_file_in_either_ipc_format_reads_back(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "rows.arrow"
    table = arrow_table(ROWS)
    new = pa.ipc.new_file if writer == "file" else pa.ipc.new_stream
    with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as out:
        out.write_table(table, max_chunksize=4)
    reader = open_reader(DataSection(path=str(path)))
    assert isinstance(reader, ArrowFileReader) and reader.num_rows == len(ROWS)
    assert reader.read(3, 11) == expected_rows(3, 11)
    assert reader.keys(0, 3) == ["k00", "k01", "k02"]
    assert reader.image_sizes(2, 10).tolist() == image_lengths(2, 10)


def test_a_parquet_file_reads_across_row_groups_and_counts_rows_from_its_footer(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(arrow_table(ROWS), str(path), row_group_size=3)
    reader = open_reader(DataSection(path=str(path)))
    assert isinstance(reader, ParquetFileReader) and reader.num_rows == pq.ParquetFile(str(path)).metadata.num_rows
    assert reader.read(2, 8) == expected_rows(2, 8)
    assert reader.read(0, len(ROWS)) == expected_rows(0, len(ROWS))
    assert reader.keys(5, 7) == ["k05", "k06"]
    # Rows 2..7 overlap row groups 0, 1 and 2: each is described by (first row, rows, image-column bytes).
    metadata = pq.ParquetFile(str(path)).metadata
    sizes = [metadata.row_group(g).column(1).total_uncompressed_size for g in range(3)]
    assert reader.image_sizes(2, 8).tolist() == [0, 3, sizes[0], 3, 3, sizes[1], 6, 3, sizes[2]]


def test_data_format_overrides_the_path_and_wrong_inputs_get_one_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.bin"  # a name auto cannot place
    pq.write_table(arrow_table(ROWS), str(path))
    assert open_reader(DataSection(path=str(path), format="parquet")).read(0, 2) == expected_rows(0, 2)
    cases = [(DataSection(path=str(path)), "auto cannot tell the format of .*; set data.format"),
             (DataSection(path=str(path), format="csv"), "data.format is 'csv'; choose one of auto, datasets"),
             (DataSection(path=str(tmp_path / "absent.parquet"), format="parquet"), "does not exist"),
             (DataSection(path=str(tmp_path / "absent")), "does not exist"),
             (DataSection(path=str(tmp_path), format="datasets"), "is not a datasets.save_to_disk folder"),
             (DataSection(path=str(path), format="parquet", key_column="key"), r"'key' \(data.key_column\)")]
    for section, message in cases:
        with pytest.raises(VlmHpcError, match=message) as error:
            open_reader(section)
        assert "\n" not in str(error.value)


# Image columns that hold no image bytes, as a hostile or mistaken config names them: text (the web caption), a
# number, a struct without "bytes", a struct whose "bytes" is text, a list of byte strings.
NOT_IMAGES = {
    "caption": pa.array([r[2] for r in ROWS], pa.string()),
    "size": pa.array(range(len(ROWS)), pa.int64()),
    "meta": pa.array([{"path": "x.png"}] * len(ROWS), pa.struct([("path", pa.string())])),
    "text_bytes": pa.array([{"bytes": "x"}] * len(ROWS), pa.struct([("bytes", pa.string())])),
    "pieces": pa.array([[b"ab"]] * len(ROWS), pa.list_(pa.binary())),
}


@pytest.mark.parametrize("kind", ["datasets", "arrow", "parquet"])
@pytest.mark.parametrize("column", sorted(NOT_IMAGES))
def test_an_image_column_without_image_bytes_is_refused_naming_its_type(tmp_path: Path, kind: str,
                                                                        column: str) -> None:
    table = arrow_table(ROWS)
    for name, values in NOT_IMAGES.items():
        if name not in table.column_names:
            table = table.append_column(name, values)
    path = tmp_path / ("data" if kind == "datasets" else f"rows.{kind}")
    if kind == "datasets":
        datasets.Dataset(table).save_to_disk(str(path))
    elif kind == "arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
            out.write_table(table)
    else:
        pq.write_table(table, str(path))
    with pytest.raises(VlmHpcError) as error:
        open_reader(DataSection(path=str(path), image_column=column))
    message = str(error.value)
    stored = (pq.read_schema(str(path)) if kind == "parquet" else table.schema).field(column).type  # list names differ
    assert "\n" not in message and message.startswith(f"data: column {column!r} (data.image_column) of {path} holds "
                                                      f"Arrow type {stored}, not image bytes"), message
    assert message.endswith("set data.image_column to a binary column or a datasets Image feature (its binary "
                            "columns: png)"), message
    assert open_reader(DataSection(path=str(path))).read(0, 1) == expected_rows(0, 1)  # png is fine


class PngFolderReader(RowReader):
    """A folder of PNG files, sorted by name: key = file stem, web caption = the `.txt` beside it, if any.
    Written against the public protocol only, as a new input format would be."""

    format = "png_folder"

    def __init__(self, config: DataSection) -> None:
        self.files = sorted(Path(config.path).glob("*.png"))
        super().__init__(config, len(self.files))

    def describe(self) -> str:
        return f"PNG folder {self.config.path}"

    def _read(self, start: int, stop: int) -> list[Row]:
        def caption(path: Path) -> str | None:
            text = path.with_suffix(".txt")
            return text.read_text() if text.exists() else None
        return [Row(start + i, path.stem, path.read_bytes(), caption(path))
                for i, path in enumerate(self.files[start:stop])]

    def _key_array(self, start: int, stop: int) -> pa.Array:
        return pa.array([path.stem for path in self.files[start:stop]], pa.string())

    def _image_sizes(self, start: int, stop: int) -> np.ndarray:
        return np.array([path.stat().st_size for path in self.files[start:stop]], np.int64)


@pytest.fixture()
def png_folder_format():
    register_reader(PngFolderReader)
    yield PngFolderReader.format
    READERS.pop(PngFolderReader.format)


def test_a_reader_registered_through_the_seam_captions_end_to_end(tmp_path: Path, golden_model_dir: Path,
                                                                   shared_engine, png_folder_format: str) -> None:
    rows = [(f"photo_{i}", png(100 + i, (40 + 8 * i, 32)), f"a web caption {i}" if i % 2 else None) for i in range(5)]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for key, image, web_caption in rows:
        (folder / f"{key}.png").write_bytes(image)
        if web_caption is not None:
            (folder / f"{key}.txt").write_text(web_caption)
    reader = open_reader(DataSection(path=str(folder), format=png_folder_format))
    assert reader.read(0, 5) == [Row(i, *row) for i, row in enumerate(rows)]
    assert slice_fingerprint(reader, 0, 5) != slice_fingerprint(reader, 0, 4)

    captions = {}
    for name, data in (("folder", {"path": str(folder), "format": png_folder_format}),
                       ("datasets", {"path": str(make_dataset(tmp_path / "same_images", rows))})):
        output = tmp_path / f"out_{name}"
        config = load_config(write_config(tmp_path / f"{name}.yaml", golden_model_dir, Path(data["path"]), output,
                                          data=data))
        for slice_id in range(2):
            assert run_slice(config, slice_id, 2, engine_factory=shared_engine).status == "done"
        report = verify(output)  # verify opens the input again, through the registry
        assert report.ok and report.captioned == 5, report
        captions[name] = read_captions(output)
    assert captions["folder"] == captions["datasets"]
    assert {key: value["web_caption"] for key, value in captions["folder"].items()} == {r[0]: r[2] for r in rows}


def test_a_format_word_is_registered_once(png_folder_format: str) -> None:
    class Impostor(PngFolderReader):
        pass

    for reader in (Impostor, type("Auto", (PngFolderReader,), {"format": "auto"})):
        with pytest.raises(VlmHpcError, match="is taken"):
            register_reader(reader)
    assert READERS[png_folder_format] is PngFolderReader
