"""`python -m vlm_hpc.report OUTPUT`: write OUTPUT/report.html, one standalone page about the run.

The page shows the run summary (slices by state and the whole-run line of `vlm_hpc.status`, the row, caption and
failure counts of `vlm_hpc.verify`, failures by reason, images/s over time from the slice logs' progress lines),
a gallery of the sample images beside their web and VLM captions, and the first rows of the failure ledger.
Everything is inline (CSS, an SVG chart, images as data: URIs, one small script), so it opens without a network;
every text read from the run (keys, captions, details) is HTML-escaped, and a damaged file is shown as damaged.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from vlm_hpc.config import DataSection, OutputSection
from vlm_hpc.errors import VlmHpcError, io_error_line, print_error
from vlm_hpc.run.checkpoint import CorruptCheckpoint, SliceCheckpoint
from vlm_hpc.run.committed import ledger_line_problem, scan_append_only
from vlm_hpc.run.durable import write_atomic
from vlm_hpc.run.layout import OutputLayout, relpath_to_key
from vlm_hpc.run.manifest import RunManifest, load_manifest
from vlm_hpc.run.outputs import output_format
from vlm_hpc.run.outputs.base import SliceKeys
from vlm_hpc.run.readers import RowReader, open_reader
from vlm_hpc.run.repair import load_checkpoint
from vlm_hpc.run.slicing import slice_bounds
from vlm_hpc.status import SliceStatus, collect, overall_line
from vlm_hpc.verify import PROBLEMS, Report, verify

MAX_FAILURES = 200  # ledger rows listed on the page; the rest are counted
MAX_PROBLEMS = 20  # items of each verify problem (lost, duplicate, ...) listed
MAX_EMBEDDED_BYTES = 64 * 1024 * 1024  # image bytes embedded in the page, over all samples
LOG_TAIL_BYTES = 16 * 1024 * 1024  # of each slice log read for the chart (about 3 days of progress lines)
CHART_BINS = 48
MIME_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif",
              "webp": "image/webp", "bmp": "image/bmp", "tiff": "image/tiff", "ico": "image/x-icon"}

_LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) slice \d+ \| (.*)")
_START = re.compile(r"start: rows \[\d+, \d+\) of \d+, (\d+) already done")
_PROGRESS = re.compile(r"rows (\d+)/\d+ \(")


@dataclass
class Sample:
    """One image of OUTPUT/images/ and what the run committed for its key."""

    path: Path
    key: str
    row: int | None = None
    web_caption: str | None = None
    vlm_caption: str | None = None
    note: str | None = None  # why a caption is not shown (not committed, damaged, the dataset unreadable)
    data_uri: str | None = None  # None: not embedded (unreadable, or over the page's byte budget)


@dataclass
class LedgerEntry:
    slice: int
    row: int
    key: str | None
    reason: str
    detail: str
    captioned: bool  # captioned anyway (a truncated image captioned like the original)


@dataclass
class Ledger:
    """The failure ledgers of all slices, as far as their indexes committed them."""

    entries: list[LedgerEntry] = field(default_factory=list)  # the first `limit` intact lines
    total: int = 0
    by_reason: dict[str, list[int]] = field(default_factory=dict)  # reason -> [not captioned, captioned anyway]
    damage: list[str] = field(default_factory=list)  # damaged lines and indexes, one item each


@dataclass
class Throughput:
    """Images/s of the whole run over time, from the slice logs: `rates[i]` over the i-th bin from `start`."""

    start: float = 0.0
    bin_seconds: float = 0.0
    rates: list[float] = field(default_factory=list)
    rows: int = 0  # rows the logged progress lines account for
    notes: list[str] = field(default_factory=list)


@dataclass
class RunPage:
    """Everything the page shows."""

    layout: OutputLayout
    manifest: RunManifest
    statuses: list[SliceStatus]
    num_rows: int
    report: Report | None
    verify_error: str | None
    throughput: Throughput
    samples: list[Sample]
    samples_found: int  # files in OUTPUT/images/, shown or not
    samples_note: str | None
    ledger: Ledger
    generated_at: float


def _sample_files(layout: OutputLayout) -> list[tuple[str, Path]]:
    """(key, path) of every sample image; names are key_to_relpath(key) + "." + extension."""
    found = []
    for folder, _dirs, files in os.walk(layout.images_dir):
        for name in files:
            if name.startswith("."):  # a temporary of an interrupted write
                continue
            path = Path(folder) / name
            relative = path.relative_to(layout.images_dir).as_posix()
            found.append((relpath_to_key(relative.rsplit(".", 1)[0] if "." in name else relative), path))
    return found


def _checkpoint(layout: OutputLayout, manifest: RunManifest, slice_id: int) -> tuple[SliceCheckpoint | None, str]:
    """A slice's index, or None with what is wrong ("" when it has none yet)."""
    start, stop = slice_bounds(manifest.num_rows, slice_id, manifest.num_slices)
    try:
        return load_checkpoint(layout, slice_id, manifest.num_slices, start, stop), ""
    except CorruptCheckpoint as exc:
        return None, f"{exc.path.name}: {exc.problem}"


def read_ledger(layout: OutputLayout, manifest: RunManifest, limit: int) -> Ledger:
    """Every slice's committed ledger lines (the whole file when its index is damaged), the first `limit` kept."""
    ledger = Ledger()
    for slice_id in range(manifest.num_slices):
        checkpoint, problem = _checkpoint(layout, manifest, slice_id)
        path = layout.failures_file(slice_id)
        if problem:
            ledger.damage.append(f"{problem} (its whole ledger is shown)")
        elif checkpoint is None:
            continue
        scan = scan_append_only(path, checkpoint.failures_offset if checkpoint else None, ledger_line_problem)
        ledger.damage += [f"{path.name} {item}" for item in scan.damage]
        for line in scan.lines:
            record = line.record
            counts = ledger.by_reason.setdefault(record["reason"], [0, 0])
            counts[bool(record["captioned"])] += 1
            ledger.total += 1
            if len(ledger.entries) < limit:
                ledger.entries.append(LedgerEntry(slice_id, record["row"], record.get("key"), record["reason"],
                                                  str(record.get("detail", "")), record["captioned"]))
    return ledger


def attach_captions(layout: OutputLayout, manifest: RunManifest, samples: list[Sample]) -> str | None:
    """Fill in each sample's row and committed captions through the run's output format; what went wrong, if any."""
    wanted = {s.key: s for s in samples}
    try:
        reader: RowReader = open_reader(DataSection(**manifest.data))
    except (VlmHpcError, OSError) as exc:
        _mark_unplaced(samples, "caption not read")
        return f"captions not shown: the dataset cannot be read ({exc})"
    for slice_id in range(manifest.num_slices):
        start, stop = slice_bounds(manifest.num_rows, slice_id, manifest.num_slices)
        try:
            keys = reader.keys(start, stop)
        except (VlmHpcError, OSError) as exc:
            _mark_unplaced(samples, "caption not read")
            return f"captions from slice {slice_id} on not shown: its keys cannot be read ({exc})"
        # Only the samples' keys: a json run then reads one caption file per sample, not the slice's every file.
        masked = [key if key in wanted else None for key in keys]
        if any(masked):
            _attach_slice(layout, manifest, slice_id, SliceKeys(start, masked, manifest.duplicate_rows), wanted)
    _mark_unplaced(samples, "no row of the dataset has this key")
    return None


def _attach_slice(layout: OutputLayout, manifest: RunManifest, slice_id: int, rows: SliceKeys,
                  wanted: dict[str, Sample]) -> None:
    """The committed captions of the samples among `rows` (one slice, the other keys masked out)."""
    checkpoint, damaged = _checkpoint(layout, manifest, slice_id)
    captions = output_format(manifest.output_format, layout, slice_id).read(rows, checkpoint)
    damage = {d.path: d.problem for d in captions.damage if d.whole_file}
    for offset, key in enumerate(rows.keys):
        if key is None or wanted[key].row is not None:  # a repeated key: its first row owns the caption
            continue
        sample, row = wanted[key], rows.start + offset
        sample.row = row
        record = captions.records.get(row)
        if record is not None and (checkpoint is None or checkpoint.is_done(row)):
            sample.web_caption, sample.vlm_caption = record.web_caption, record.vlm_caption
            sample.note = f"index damaged ({damaged}); caption read as found" if damaged else None
        elif layout.caption_json(key) in damage:
            sample.note = f"caption damaged: {damage[layout.caption_json(key)]}"
        else:
            sample.note = "no committed caption"


def _mark_unplaced(samples: list[Sample], note: str) -> None:
    """Say why the samples no row was found for show no caption."""
    for sample in samples:
        if sample.row is None:
            sample.note = note


def embed_samples(samples: list[Sample], budget: int) -> int:
    """Read each sample's bytes into a data: URI while the page's image budget lasts; how many were left out."""
    left_out = 0
    for sample in samples:
        try:
            data = sample.path.read_bytes()
        except OSError as exc:
            sample.note = f"image unreadable ({exc.strerror})"
            continue
        if len(data) > budget:
            left_out += 1
            continue
        budget -= len(data)
        mime = MIME_TYPES.get(sample.path.suffix.lower().lstrip("."), "application/octet-stream")
        sample.data_uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return left_out


def _read_tail(path: Path, size: int) -> tuple[str, bool]:
    """The last `size` bytes of `path` as text, and whether the file was longer."""
    with open(path, "rb") as handle:
        length = handle.seek(0, 2)
        handle.seek(max(0, length - size))
        return handle.read().decode(errors="replace"), length > size


def _stamp(text: str, millis: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp() + int(millis) / 1000


def read_throughput(layout: OutputLayout, num_slices: int, bins: int = CHART_BINS) -> Throughput:
    """Rows finished over time, from each slice log's start and progress lines, spread over `bins` time bins."""
    spans: list[tuple[float, float, int]] = []  # (from, to, rows finished in between)
    result = Throughput()
    for slice_id in range(num_slices):
        path = layout.log_file(slice_id)
        try:
            text, cut = _read_tail(path, LOG_TAIL_BYTES)
        except FileNotFoundError:
            continue
        except OSError as exc:
            result.notes.append(f"{path.name} unreadable ({exc.strerror})")
            continue
        if cut:
            result.notes.append(f"{path.name}: only its last {LOG_TAIL_BYTES >> 20} MiB are charted")
        last: tuple[float, int] | None = None
        for line in text.splitlines():
            match = _LOG_LINE.match(line)
            if not match:
                continue  # a torn or foreign line: the chart does without it
            try:
                moment = _stamp(match[1], match[2])
            except ValueError:
                continue
            started, progress = _START.match(match[3]), _PROGRESS.match(match[3])
            if started:  # a new attempt: rows count from what it found done
                last = (moment, int(started[1]))
            elif progress:  # the first one of a log cut short only sets where the next one counts from
                done = int(progress[1])
                if last is not None:
                    spans.append((last[0], moment, max(0, done - last[1])))
                last = (moment, done)
    if not spans:
        return result
    result.start = min(s[0] for s in spans)
    result.bin_seconds = max((max(s[1] for s in spans) - result.start) / bins, 1.0)

    def bin_of(moment: float) -> int:
        return min(int((moment - result.start) / result.bin_seconds), bins - 1)
    totals = [0.0] * bins
    for begin, finish, rows in spans:
        result.rows += rows
        if finish <= begin:  # an instant: all of it in its bin
            totals[bin_of(finish)] += rows
            continue
        for index in range(bin_of(begin), bin_of(finish) + 1):  # spread evenly over the time it took
            low = result.start + index * result.bin_seconds
            overlap = min(finish, low + result.bin_seconds) - max(begin, low)
            totals[index] += rows * max(overlap, 0.0) / (finish - begin)
    used = max((i + 1 for i, total in enumerate(totals) if total > 0), default=0)
    result.rates = [total / result.bin_seconds for total in totals[:used]]
    return result


def gather(output: str | Path, max_images: int, max_failures: int) -> RunPage:
    """Read everything the page shows from `output`; VlmHpcError when it is no run's folder."""
    layout = OutputLayout(Path(output))
    if not layout.manifest_file.exists():
        raise VlmHpcError(f"report: {layout.manifest_file} is missing; no run has started in {output}")
    statuses, num_rows = collect(output)  # raises the one-line error for a damaged manifest
    manifest = load_manifest(layout.manifest_file)
    try:
        report, verify_error = verify(output), None
    except VlmHpcError as exc:  # the dataset moved, say: the page still shows what the outputs say
        report, verify_error = None, str(exc)
    samples = [Sample(path, key) for key, path in _sample_files(layout)]
    note = attach_captions(layout, manifest, samples)
    samples.sort(key=lambda s: (s.row is None, s.row or 0, s.path.as_posix()))
    shown = samples[:max_images]
    left_out = embed_samples(shown, MAX_EMBEDDED_BYTES)
    notes = [note] if note else []
    if len(samples) > len(shown):
        notes.append(f"{len(samples) - len(shown)} more sample images in {layout.images_dir} are not shown "
                     f"(at most {max_images}: --max-images)")
    if left_out:
        notes.append(f"{left_out} images are not embedded: the page holds at most {MAX_EMBEDDED_BYTES >> 20} MiB "
                     "of images")
    return RunPage(layout, manifest, statuses, num_rows, report, verify_error,
                   read_throughput(layout, manifest.num_slices), shown, len(samples), "; ".join(notes) or None,
                   read_ledger(layout, manifest, max_failures), time.time())


# Rendering. `_e` escapes every text that comes from the run; nothing else reaches the page unescaped.

_e = html.escape
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
th { background: #f3f3f3; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.overall { font-weight: 600; } .note { color: #8a5a00; } .bad { color: #b00020; } .ok { color: #0a7a2f; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #ddd; padding: 8px; overflow-wrap: anywhere; }
figure img { width: 100%; height: 200px; object-fit: contain; display: block; margin: 0 0 6px; }
dt { font-weight: 600; font-size: .85em; color: #555; } dd { margin: 0 0 4px; white-space: pre-wrap; }
code { font-size: .9em; overflow-wrap: anywhere; }
""".strip()
# Runs once everything loaded: each sample's decoded width lands in the DOM, where a headless browser's dump
# (tests/test_report.py) proves the images are real.
_SCRIPT = """
window.addEventListener("load", function () {
  document.querySelectorAll("img.sample").forEach(function (img) {
    img.setAttribute("data-natural-width", String(img.naturalWidth));
  });
  document.body.setAttribute("data-loaded", "true");
});
""".strip()


def _clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def _count_row(label: str, name: str, value: int, css: str = "") -> str:
    cls = f' class="n {css}"' if css else ' class="n"'
    return f'<tr><th>{_e(label)}</th><td{cls} data-count="{name}">{value}</td></tr>'


def _bounded_list(items: list[str], limit: int, rest: str) -> str:
    shown = "".join(f"<li><code>{_e(item)}</code></li>" for item in items[:limit])
    more = f"<li>and {len(items) - limit} more {_e(rest)}</li>" if len(items) > limit else ""
    return f"<ul>{shown}{more}</ul>"


def _summary(page: RunPage) -> str:
    states = Counter(s.state for s in page.statuses)
    state_rows = "".join(f'<tr><th>{_e(state)}</th><td class="n" data-state-count="{_e(state)}">{n}</td></tr>'
                         for state, n in sorted(states.items()))
    parts = [f'<p class="overall" id="overall">{_e(overall_line(page.statuses, page.num_rows))}</p>',
             f"<table><tr><th>slices</th><td class=\"n\">{len(page.statuses)}</td></tr>{state_rows}</table>"]
    report = page.report
    if report is None:
        parts.append(f'<p class="bad">verify could not run: {_e(page.verify_error or "")}</p>')
    else:
        rows = [_count_row("rows", "rows", report.rows), _count_row("captioned", "captioned", report.captioned),
                _count_row("in the failure ledger", "failed", report.failed),
                _count_row("pending", "pending", report.pending)]
        rows += [_count_row(name, name, len(getattr(report, name)), "bad" if getattr(report, name) else "")
                 for name in PROBLEMS]
        verdict = '<span class="ok">OK</span>' if report.ok else '<span class="bad">NOT OK</span>'
        parts.append(f"<p>verify: {verdict}</p><table>{''.join(rows)}</table>")
        for name in PROBLEMS:
            items = getattr(report, name)
            if items:
                parts.append(f"<h3>{name}</h3>" + _bounded_list(items, MAX_PROBLEMS, "(python -m vlm_hpc.verify)"))
    return "\n".join(parts)


def _slices_table(statuses: list[SliceStatus]) -> str:
    head = "<tr><th>slice</th><th>state</th><th>rows</th><th>failed</th><th>rows/s</th><th>ETA</th><th>why</th></tr>"
    rows = []
    for s in statuses:
        rate = f"{s.rate:.2f}" if s.rate is not None else "-"
        eta = _duration(s.eta_s) if s.eta_s is not None else "-"
        css = ' class="bad"' if s.state in ("crashed", "killed", "corrupt", "stalled") else ""
        rows.append(f'<tr data-slice="{s.slice}"><td class="n">{s.slice}</td><td{css}>{_e(s.state)}</td>'
                    f'<td class="n">{s.rows_done}/{s.rows_total}</td><td class="n">{s.outcomes.failed}</td>'
                    f'<td class="n">{rate}</td><td class="n">{eta}</td><td>{_e(s.reason or "")}</td></tr>')
    return f"<table>{head}{''.join(rows)}</table>"


def _chart(throughput: Throughput) -> str:
    notes = "".join(f'<p class="note">{_e(note)}</p>' for note in throughput.notes)
    if not throughput.rates:
        return f"<p>No progress lines in the slice logs yet.</p>{notes}"
    width, height, left, bottom = 720, 180, 60, 24
    top = max(throughput.rates) or 1.0
    bar = (width - left) / len(throughput.rates)
    bars = []
    for index, rate in enumerate(throughput.rates):
        tall = (height - bottom - 10) * rate / top
        moment = _clock(throughput.start + index * throughput.bin_seconds)
        bars.append(f'<rect x="{left + index * bar:.1f}" y="{height - bottom - tall:.1f}" width="{max(bar - 1, 1):.1f}"'
                    f' height="{tall:.1f}" fill="#3b78c2"><title>{_e(moment)}: {rate:.2f} images/s</title></rect>')
    end = throughput.start + len(throughput.rates) * throughput.bin_seconds
    span = len(throughput.rates) * throughput.bin_seconds
    labels = (f'<text x="{left - 4}" y="16" text-anchor="end">{top:.2f}</text>'
              f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>'
              f'<text x="{left}" y="{height - 6}">{_e(_clock(throughput.start))}</text>'
              f'<text x="{width}" y="{height - 6}" text-anchor="end">{_e(_clock(end))}</text>')
    svg = (f'<svg id="rate-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-size="11" role="img" aria-label="images per second over time">'
           f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" stroke="#888"/>'
           f'{"".join(bars)}{labels}</svg>')
    return (f"{svg}<p>images/s of the whole run, {throughput.bin_seconds:.0f} s per bar; "
            f"{throughput.rows} rows over {span:.0f} s of logged progress "
            f"({throughput.rows / max(span, 1e-9):.2f} images/s on average).</p>{notes}")


def _gallery(page: RunPage) -> str:
    figures = []
    for sample in page.samples:
        key = _e(sample.key)
        image = (f'<img class="sample" src="{sample.data_uri}" alt="{key}" data-key="{key}">'
                 if sample.data_uri else '<p class="note">image not embedded</p>')
        texts = "".join(f'<dt>{label}</dt><dd class="{css}">{_e(text)}</dd>'
                        for label, css, text in (("web caption", "web", sample.web_caption),
                                                 ("VLM caption", "vlm", sample.vlm_caption)) if text is not None)
        note = f'<p class="note">{_e(sample.note)}</p>' if sample.note else ""
        row = f"row {sample.row}" if sample.row is not None else "row unknown"
        figures.append(f'<figure data-key="{key}">{image}<figcaption><code>{key}</code> ({row})'
                       f"<dl>{texts}</dl>{note}</figcaption></figure>")
    intro = f"<p>{len(page.samples)} of {page.samples_found} sample images from <code>images/</code>.</p>"
    extra = f'<p class="note" id="samples-note">{_e(page.samples_note)}</p>' if page.samples_note else ""
    return f'{intro}{extra}<div class="gallery">{"".join(figures)}</div>'


def _failures(ledger: Ledger) -> str:
    reasons = "".join(f'<tr data-reason="{_e(reason)}"><td>{_e(reason)}</td>'
                      f'<td class="n not-captioned">{counts[0]}</td><td class="n">{counts[1]}</td></tr>'
                      for reason, counts in sorted(ledger.by_reason.items()))
    parts = [f"<p>Failure-ledger lines (<code>failures/slice_NNNNN.jsonl</code>): {ledger.total}.</p>"]
    if reasons:
        parts.append("<table><tr><th>reason</th><th>not captioned</th><th>captioned anyway</th></tr>"
                     f"{reasons}</table>")
    if ledger.damage:
        parts.append('<p class="bad">damaged, shown as found:</p>' + _bounded_list(ledger.damage, MAX_PROBLEMS, ""))
    if ledger.entries:
        rows = "".join(f'<tr class="failure"><td class="n">{entry.slice}</td><td class="n">{entry.row}</td>'
                       f"<td><code>{_e(entry.key if entry.key is not None else '(no key)')}</code></td>"
                       f"<td>{_e(entry.reason)}</td><td>{_e(entry.detail)}</td>"
                       f"<td>{'yes' if entry.captioned else 'no'}</td></tr>" for entry in ledger.entries)
        parts.append("<table><tr><th>slice</th><th>row</th><th>key</th><th>reason</th><th>detail</th>"
                     f"<th>captioned</th></tr>{rows}</table>")
    if ledger.total > len(ledger.entries):
        parts.append(f'<p id="failures-more">and {ledger.total - len(ledger.entries)} more in the ledgers '
                     "(--max-failures)</p>")
    return "\n".join(parts)


def render(page: RunPage) -> str:
    """The page as one HTML document; its Content-Security-Policy allows nothing from outside it."""
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    policy = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    manifest = page.manifest
    root = _e(str(page.layout.root))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{policy}">
<title>vlm_hpc report: {root}</title>
<style>{_STYLE}</style></head>
<body>
<h1>vlm_hpc run report</h1>
<p><code>{root}</code>: {manifest.num_rows} rows of <code>{_e(manifest.data_path)}</code> in
{manifest.num_slices} slices, output format {_e(manifest.output_format)}; written {_e(_clock(page.generated_at))}.</p>
<h2 id="summary">Summary</h2>
{_summary(page)}
<h2 id="throughput">Images/s over time</h2>
{_chart(page.throughput)}
<h2 id="slices">Slices</h2>
{_slices_table(page.statuses)}
<h2 id="gallery">Samples</h2>
{_gallery(page)}
<h2 id="failures">Failures</h2>
{_failures(page.ledger)}
<script>{_SCRIPT}</script>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_hpc.report", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the run's output folder (output.dir)")
    parser.add_argument("--max-images", type=int, default=OutputSection.max_sample_images, metavar="N",
                        help="show at most N sample images (default: output.max_sample_images' default, 1000)")
    parser.add_argument("--max-failures", type=int, default=MAX_FAILURES, metavar="N",
                        help=f"list at most N failure-ledger rows, counting the rest (default {MAX_FAILURES})")
    args = parser.parse_args(argv)
    layout = OutputLayout(Path(args.output))
    try:
        page = gather(args.output, max(args.max_images, 0), max(args.max_failures, 0))
        write_atomic(layout.report_file, render(page).encode())
    except VlmHpcError as exc:
        return print_error(exc)
    except OSError as exc:
        return print_error(VlmHpcError(f"report: {io_error_line(exc, layout.root)}"))
    print(layout.report_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
