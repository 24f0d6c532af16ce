"""`python -m vlm_hpc.report`: the run's page, opened in a real headless Chromium (Debian's `chromium`, installed
by scripts/setup.sh when it runs as root). Without it the browser test skips on a laptop and fails in CI
(CI=true), where it must run. A run of the tiny model with an undecodable and an empty image, a key and a web
caption full of HTML, then damaged files: the page shows them as damaged and is still written."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from builders import make_dataset, png, write_config
from vlm_hpc import report, status
from vlm_hpc.config import load_config
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.slice_run import run_slice
from vlm_hpc.verify import PROBLEMS, verify

HOSTILE_KEY = 'k<b>&"1\''
# Would add an element, run a script or set an attribute if any of it reached the page unescaped.
HOSTILE_CAPTION = ('<script>document.body.dataset.injected = "yes"</script>"><img src=x '
                   'onerror="document.body.dataset.injected = 1"> & \'quoted\'')


@pytest.fixture(scope="module")
def run(golden_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, shared_engine) -> Path:
    """A finished 2-slice run of 6 rows: row 2 undecodable, row 4 empty, every captioned row a sample image."""
    folder = tmp_path_factory.mktemp("report")
    rows = [("k0", png(0), "plain web"), (HOSTILE_KEY, png(1, (64, 48)), HOSTILE_CAPTION),
            ("k2", b"not an image", "broken"), ("k3", png(3), "web 3"), ("k4", b"", "empty"), ("k5", png(5), "web 5")]
    output = folder / "out"
    config = load_config(write_config(folder / "c.yaml", golden_model_dir, make_dataset(folder / "data", rows),
                                      output, worker={"loader_workers": 0}))
    for slice_id in range(2):
        assert run_slice(config, slice_id, 2, engine_factory=shared_engine).status == "done"
    return output


class Dom(HTMLParser):
    """Every element of a page, in order: its tag, its attributes and the text right inside it (up to the next
    tag: a table cell's number, a caption)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None], list[str]]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs), []))

    def handle_data(self, data: str) -> None:
        if self.elements:
            self.elements[-1][2].append(data)

    def find(self, tag: str, **wanted: str) -> list[tuple[dict[str, str | None], str]]:
        """(attributes, text) of each `tag` whose attributes have the `wanted` values (data_key: data-key)."""
        return [(attrs, "".join(text)) for name, attrs, text in self.elements
                if name == tag and all(attrs.get(k.replace("_", "-")) == v for k, v in wanted.items())]

    def numbers(self, attribute: str) -> dict[str, int]:
        """{value of `attribute`: the cell's number} for each table cell that has the attribute."""
        return {attrs[attribute]: int(text) for attrs, text in self.find("td") if attribute in attrs}

    def values(self, tag: str, attribute: str) -> list[str]:
        return [attrs[attribute] for attrs, _ in self.find(tag) if attribute in attrs]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "Chromium is not installed; run scripts/setup.sh as root, or: apt-get install chromium"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def browse(browser: str, page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    """Open `page` in headless Chromium; the virtual time budget lets its load event and script run first."""
    # --no-sandbox: CI runs as root, where Chromium refuses its sandbox; the page is our own local file.
    command = [browser, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
               "--hide-scrollbars", "--window-size=1200,1600", "--virtual-time-budget=5000", *mode, page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_page_opens_in_a_browser_with_decoded_images_verify_numbers_and_text_left_as_text(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    browser = chromium()
    assert report.main([str(run)]) == 0
    page = run / "report.html"
    assert capsys.readouterr().out == f"{page}\n"
    source = page.read_text()
    assert "<script>document" not in source and "http://" not in source.replace('"http://www.w3.org/2000/svg"', "")
    dom = Dom(browse(browser, page, tmp_path / "profile", "--dump-dom").stdout)
    ((body, _),) = dom.find("body")
    assert body.get("data-loaded") == "true" and "data-injected" not in body  # the page's script ran, no other
    # Every captioned row's image is shown, and the browser decoded it (the script wrote its width).
    samples = [attrs for attrs, _ in dom.find("img")]
    assert len(samples) == 4 == len(list((run / "images").iterdir()))
    assert all(img["class"] == "sample" and int(img.get("data-natural-width") or 0) > 0 for img in samples), samples
    assert {img["data-key"] for img in samples} == {"k0", HOSTILE_KEY, "k3", "k5"}
    # The hostile text is text: one script element (the page's), no attribute an injection would add.
    assert [tag for tag, _, _ in dom.elements].count("script") == 1
    assert not [(tag, name) for tag, attrs, _ in dom.elements for name in attrs if name.startswith("on")]
    assert dom.find("figure", data_key=HOSTILE_KEY) and HOSTILE_CAPTION in [text for _, text in dom.find("dd")]
    # The numbers are verify's, and the ledger's reasons add up to its failures.
    verified = verify(run)
    assert dom.numbers("data-count") == {"rows": verified.rows, "captioned": verified.captioned,
                                         "failed": verified.failed, "pending": verified.pending,
                                         **{name: len(getattr(verified, name)) for name in PROBLEMS}}
    assert (verified.rows, verified.captioned, verified.failed) == (6, 4, 2)
    assert dom.numbers("data-state-count") == {"done": 2}
    assert dom.values("tr", "data-reason") == ["empty", "undecodable"]
    assert sum(int(text) for attrs, text in dom.find("td", **{"class": "n not-captioned"})) == verified.failed
    assert len(dom.find("tr", **{"class": "failure"})) == 2
    assert dom.find("svg", id="rate-chart") and dom.find("rect")
    # A screenshot of the page as rendered: a PNG with more than one colour in it.
    browse(browser, page, tmp_path / "profile", f"--screenshot={tmp_path / 'page.png'}")
    with Image.open(tmp_path / "page.png") as shot:
        assert shot.format == "PNG" and shot.width > 0 and shot.height > 0
        assert len(shot.convert("L").getcolors(256) or []) > 1


def test_damaged_files_are_shown_as_damaged_and_the_page_is_bounded(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "out"
    shutil.copytree(run, output)
    (output / "state" / "slice_00001.json").write_text("{not json")
    ledger = output / "failures" / "slice_00000.jsonl"
    ledger.write_bytes(b"X" + ledger.read_bytes()[1:])  # the committed line, same size, no longer JSON
    (output / "logs" / "slice_00000.log").write_bytes(b"\xff\x00 torn line without a stamp\n")
    assert report.main([str(output), "--max-images", "1", "--max-failures", "0"]) == 0
    capsys.readouterr()
    text = (output / "report.html").read_text()
    dom = Dom(text)
    assert '<tr data-slice="1"><td class="n">1</td><td class="bad">corrupt</td>' in text
    assert "slice_00000.jsonl line 1 (bytes 0-" in text and "slice_00001.json: not JSON" in text
    assert "its whole ledger is shown" in text
    # Slice 1's ledger is read whole (its index is damaged): its line is counted, not listed (--max-failures 0).
    assert dom.values("tr", "data-reason") == ["empty"] and not dom.find("tr", **{"class": "failure"})
    assert "and 1 more in the ledgers" in text
    assert len(dom.find("img")) == 1 and "3 more sample images" in text
    assert dom.numbers("data-count")["corrupt"] == len(verify(output).corrupt) >= 2
    # status names the page, once, after its usual lines.
    assert status.main([str(output)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {output / 'report.html'}"


def test_a_folder_without_a_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: report: {tmp_path}/manifest.json is missing; no run has started in " \
                                      f"{tmp_path}\n"
    assert not (tmp_path / "report.html").exists()


def test_images_per_second_come_from_the_logs_progress_lines(tmp_path: Path) -> None:
    """Rows between two log lines are spread over the time between them, summed over slices; a new attempt counts
    from the rows it found done, and a torn or foreign line is skipped."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "slice_00000.log").write_text(
        "2026-01-01 00:00:00,000 slice 0 | start: rows [0, 40) of 80, 0 already done, attempt 1, ...\n"
        "2026-01-01 00:00:10,000 slice 0 | rows 10/40 (25.0%) | 1.00 img/s | ETA 00:00:30\n"
        "garbage \xff without a stamp\n"
        "2026-01-01 00:00:15,000 slice 0 | start: rows [0, 40) of 80, 10 already done, attempt 2, ...\n"
        "2026-01-01 00:00:20,000 slice 0 | rows 20/40 (50.0%) | 2.00 img/s | ETA 00:00:10\n")
    (logs / "slice_00001.log").write_text(  # cut short: its first progress line only sets the baseline
        "0 slice 1 | rows 5/40\n2026-01-01 00:00:00,000 slice 1 | rows 5/40 (12.5%) | 1.00 img/s | ETA 00:00:35\n"
        "2026-01-01 00:00:10,000 slice 1 | rows 25/40 (62.5%) | 2.00 img/s | ETA 00:00:07\n")
    throughput = report.read_throughput(OutputLayout(tmp_path), 2, bins=4)
    assert throughput.rows == 40 and throughput.bin_seconds == 5.0
    # 0-10 s: 10 rows of slice 0 and 20 of slice 1 (3/s); 10-15 s: nothing; 15-20 s: 10 rows of slice 0 (2/s).
    assert throughput.rates == [3.0, 3.0, 0.0, 2.0]
