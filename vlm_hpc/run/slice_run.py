"""The life of one slice: check inputs (before any model is loaded), take the slice's lease, skip every
committed row, caption the batches that `prefetch` decodes and tiles ahead of the model, commit them, and on a
stop signal finish or abandon the batch in flight, commit, record why, and return.

`python -m vlm_hpc.worker` (the command) and `vlm_hpc.submit` (submitit's array tasks) both call `run_slice`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import transformers

from vlm_hpc import __version__
from vlm_hpc.run.batching import BatchLimits, BatchPlanner, memory_tile_budget, split_windows
from vlm_hpc.run.checkpoint import SliceIndex
from vlm_hpc.config import RunConfig
from vlm_hpc.run.dataset import RowSource, open_rows, slice_bounds
from vlm_hpc.run.durable import remove_stale_temporaries, write_atomic
from vlm_hpc.engines.transformers import Caption, CaptionEngine, GenerationSettings
from vlm_hpc.errors import VlmHpcError, io_error_line, io_problem
from vlm_hpc.preprocess.decode import decode_image
from vlm_hpc.cluster.environment import JobEnvironment
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.lease import LeaseLost, SliceLease
from vlm_hpc.run.manifest import ensure_manifest
from vlm_hpc.run.outputs import output_format
from vlm_hpc.internvl.loading import inspect_model_folder, model_fingerprint
from vlm_hpc.run.pins import PinnedSettings, pinned_settings
from vlm_hpc.run.prefetch import PreparedRow, SliceBatches, batch_loader
from vlm_hpc.run.repair import repair_on_resume, resume_index
from vlm_hpc.preprocess.resampling import resampler
from vlm_hpc.run.stop import BatchAbandoned, StopRequest
from vlm_hpc.preprocess.tiling import tile_image
from vlm_hpc.run.writer import RowOutcome, SliceWriter


def engine_from_config(config: RunConfig) -> CaptionEngine:
    """Load the model the config names, on the GPU when there is one."""
    device = config.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.model.dtype if device != "cpu" else "float32"
    # The config's generation section holds the engine's settings (plus batch_size, which is the worker's).
    settings = GenerationSettings(**{f.name: getattr(config.generation, f.name) for f in fields(GenerationSettings)})
    return CaptionEngine.from_folder(config.model.path, dtype=dtype, device=device, question=config.prompt.question,
                                     system_message=config.prompt.system_message, settings=settings,
                                     attn_implementation=config.model.attn_implementation,
                                     vision_batch=config.generation.vision_batch)


def batch_limits(config: RunConfig, engine: CaptionEngine) -> BatchLimits:
    """generation.batch_size and tile_budget as limits; "auto" sizes the budget to the GPU's free memory."""
    budget = config.generation.tile_budget
    smallest = config.tiling.max_num + 1  # one image at max_num, thumbnail included
    if budget == "auto":
        free = engine.free_memory()
        if free is None:  # no accelerator: memory is not what limits a batch
            budget = config.generation.batch_size * smallest
        else:
            costs = engine.memory_costs()
            budget = memory_tile_budget(free, costs.tile_bytes, costs.image_bytes, costs.vision_workspace_bytes,
                                        config.generation.batch_size, smallest)
    return BatchLimits(config.generation.batch_size, budget)


CRASH_RESERVE_BYTES = 64 * 1024  # on a full disk: room for the crash record, the log line and the lease release


class _SliceLogFile(logging.FileHandler):
    """The slice's log file; a write it cannot make (disk full) is dropped, the stderr copy still shows it."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _setup_logging(layout: OutputLayout, index: int) -> logging.Logger:
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"vlm_hpc.slice{index}")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s slice %(slice)s | %(message)s".replace("%(slice)s", str(index)))
    for handler in (_SliceLogFile(layout.log_file(index), mode="a"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


class Progress:
    """Rates and ETA for the log's progress lines."""

    def __init__(self, done: int, total: int) -> None:
        self.start_time = time.monotonic()
        self.start_done = done
        self.done = done
        self.total = total
        self.tiles = 0
        self.tokens = 0

    def add(self, rows: int, tiles: int, tokens: int) -> None:
        self.done += rows
        self.tiles += tiles
        self.tokens += tokens

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start_time, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        remaining = self.total - self.done
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining / rate)) if rate > 0 else "?"
        return (f"rows {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.1f}%) | {rate:.2f} img/s | "
                f"{self.tiles / elapsed:.1f} tiles/s | {self.tokens / elapsed:.1f} tok/s | ETA {eta}")


def _caption_with_backoff(engine: CaptionEngine, batch: list[PreparedRow], max_num: int, poll: Callable[[], None],
                          log: logging.Logger,
                          out_of_memory: Callable[[int], None] = lambda tiles: None) -> dict[int, Caption | None]:
    """Captions by row; on CUDA out-of-memory tell `out_of_memory` the batch's tiles, split the batch, then
    retry a single image with fewer tiles."""
    # Sampling seed per batch from its lowest row: a resumed slice with the same batches draws the same.
    settings = replace(engine.settings, seed=engine.settings.seed + min(p.row for p in batch))
    try:
        return dict(zip([p.row for p in batch], engine.caption([p.tiles for p in batch], settings, poll=poll)))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
    out_of_memory(sum(p.tiles.shape[0] for p in batch))
    if len(batch) > 1:
        half = len(batch) // 2
        log.info(f"out of memory on {len(batch)} images; splitting the batch")
        return {**_caption_with_backoff(engine, batch[:half], max_num, poll, log),
                **_caption_with_backoff(engine, batch[half:], max_num, poll, log)}
    only = batch[0]
    budget = max_num // 2
    while budget >= 1 and only.image_bytes is not None:
        log.info(f"out of memory on row {only.row} alone; retrying with max_num {budget}")
        retry = PreparedRow(only.row, only.key, only.web_caption,
                            tiles=tile_image(decode_image(only.image_bytes).image, budget))
        try:
            return {only.row: engine.caption([retry.tiles], settings, poll=poll)[0]}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            budget //= 2
    return {only.row: None}


def _outcomes(batch: list[PreparedRow], captions: dict[int, Caption | None]) -> list[RowOutcome]:
    outcomes = []
    for p in batch:
        sample = (p.image_bytes, p.sample_extension) if p.sample_extension and p.image_bytes else None
        if p.tiles is None:
            outcomes.append(RowOutcome(p.row, p.key, p.web_caption, failure=p.failure, detail=p.detail))
            continue
        caption = captions.get(p.row)
        text = caption.text if caption is not None else None
        if text is None:
            outcomes.append(RowOutcome(p.row, p.key, p.web_caption, failure="out_of_memory",
                                       detail="out of GPU memory even alone at max_num 1"))
        elif text == "":
            outcomes.append(RowOutcome(p.row, p.key, p.web_caption, failure="empty_caption",
                                       detail="the model produced no text"))
        else:
            outcomes.append(RowOutcome(p.row, p.key, p.web_caption, caption=text, failure=p.failure,
                                       detail=p.detail, sample=sample))
    return outcomes


@dataclass(frozen=True)
class SliceOutcome:
    status: str  # done | stopped | requeue
    reason: str | None
    index: SliceIndex


def _write_stamp(writer: SliceWriter, config: RunConfig, engine: CaptionEngine, environment: JobEnvironment,
                 accepted_changes: list[str], log: logging.Logger) -> None:
    folder = Path(config.model.path)
    prompt = engine.prompt(1)
    stamp_path = writer.layout.stamp_file(writer.slice)
    try:
        attempts = json.loads(stamp_path.read_bytes()) if stamp_path.exists() else []
    except ValueError:  # not JSON, or not UTF-8: the stamps are a record, not state; start a new one
        attempts = None
    if not isinstance(attempts, list):
        log.info(f"{stamp_path} is damaged; it is kept as {stamp_path.name}.damaged and a new one is started")
        stamp_path.replace(stamp_path.with_name(stamp_path.name + ".damaged"))
        attempts = []
    attempts.append({
        "time": time.time(), "environment": environment.to_dict(), "vlm_hpc": __version__,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "model_fingerprint": model_fingerprint(folder), "model_path": str(folder.resolve()),
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16], "system_message": engine.system_message,
        "generation": config.to_dict()["generation"], "max_num": config.tiling.max_num,
        "device": str(engine.device), "dtype": str(engine.dtype), "accepted_changes": accepted_changes,
    })
    writer.write_fenced(stamp_path, json.dumps(attempts, ensure_ascii=False, indent=1).encode())


def check_inputs(config: RunConfig, index: int, count: int) -> tuple[RowSource, OutputLayout, PinnedSettings]:
    """Everything that can be checked without the model: model folder, dataset and columns, output folder;
    returns the rows, the output folder and the settings this run pins."""
    folder = inspect_model_folder(config.model.path)
    rows = open_rows(config.data)
    slice_bounds(rows.num_rows, index, count)
    layout = OutputLayout(Path(config.output.dir))
    try:
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        probe = layout.write_probe
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise VlmHpcError(f"output: cannot write to {layout.root} ({exc}); set output.dir to a writable folder") from None
    return rows, layout, pinned_settings(config, folder)


def run_slice(config: RunConfig, index: int, count: int,
              engine_factory: Callable[[RunConfig], CaptionEngine] = engine_from_config,
              stop: StopRequest | None = None, accept_changes: bool = False) -> SliceOutcome:
    """Caption slice `index` of `count` to completion or until asked to stop; resumable at any point.
    A resume with other pinned settings (vlm_hpc.run.pins) is refused unless `accept_changes`. An I/O error on the
    output folder is raised as one VlmHpcError line, recorded as the slice's crash."""
    try:
        return _run_slice(config, index, count, engine_factory, stop, accept_changes)
    except OSError as exc:
        raise VlmHpcError(io_error_line(exc, Path(config.output.dir))) from None


def _run_slice(config: RunConfig, index: int, count: int, engine_factory: Callable[[RunConfig], CaptionEngine],
               stop: StopRequest | None, accept_changes: bool) -> SliceOutcome:
    rows, layout, pins = check_inputs(config, index, count)
    check = ensure_manifest(layout, rows, config, count, pins, slice_index=index, accept_changes=accept_changes)
    manifest = check.manifest
    start, stop_row = slice_bounds(rows.num_rows, index, count)
    log = _setup_logging(layout, index)
    for note in check.notes:
        log.info(f"manifest: {note}")
    environment = JobEnvironment.current()
    lease = SliceLease(layout.lease_file(index), environment, config.worker.stale_lease_seconds,
                       heartbeat_seconds=config.worker.heartbeat_seconds,
                       failing_seconds=config.worker.heartbeat_failure_seconds, log=log.info)
    recovered = lease.acquire()
    if recovered:
        log.info(f"took over the slice lease: {recovered}")
    lease.start_heartbeat()
    stop = stop or StopRequest(layout.kill_file(index), config.worker.grace_seconds)
    writer = SliceWriter(layout, index, output_format(config.output.format, layout, index), lease)
    state: SliceIndex | None = None
    try:  # from here on the lease is released whatever happens, a corrupt index included
        for folder, pattern in layout.slice_temporaries(index):
            if removed := remove_stale_temporaries(folder, pattern):
                log.info(f"removed {removed} temporary files an interrupted write left in {folder}")
        state = resume_index(layout, index, count, start, stop_row, writer.output)
        with lease.fenced():
            repair_on_resume(writer.output, state, lambda: rows.keys(start, stop_row),
                             manifest.duplicate_rows, log)
            writer.recover(state)
            write_atomic(layout.reserve_file(index), bytes(CRASH_RESERVE_BYTES))
        state.attempts += 1
        state.status, state.stop_reason, state.started_at = "running", None, time.time()
        state.rows_at_start = state.finished_rows
        writer.save_index(state)
        log.info(f"start: rows [{start}, {stop_row}) of {rows.num_rows}, {state.finished_rows} already done, "
                 f"attempt {state.attempts}, bicubic resize by {resampler()}, {environment.describe()}")
        if state.complete:
            return _finish(writer, state, "done", None, log)
        stop.install()
        engine = None if stop.requested else engine_factory(config)
        if stop.requested:  # before or while the model loaded: stop signals count from the command's first instant
            return _finish(writer, state, "requeued" if stop.requeue else "stopped", stop.reason, log)
        if not layout.query_file.exists():
            write_atomic(layout.query_file, config.prompt.question.encode())
        _write_stamp(writer, config, engine, environment, check.accepted, log)
        limits = batch_limits(config, engine)
        if limits.max_tiles is not None:
            log.info(f"batches: up to {limits.max_tiles} tiles and {limits.max_images} images, "
                     f"sorted by tile count in windows of {config.generation.sort_window} rows")
        planner = BatchPlanner(limits)
        pending = state.pending_rows()
        windows = split_windows(pending, limits, config.generation.sort_window)
        stride = max(1, math.ceil(rows.num_rows / config.output.max_sample_images))
        loader = batch_loader(SliceBatches(rows, windows, config, manifest, stride), config.worker,
                              pin_memory=engine.device.type == "cuda")
        progress = Progress(state.finished_rows, state.total)

        def poll() -> None:
            stop.check_deadline()
            if lease.lost.is_set():
                raise BatchAbandoned(lease.lost_reason or "the slice lease was lost")

        def out_of_memory(tiles: int) -> None:
            if planner.shrink(tiles, config.tiling.max_num + 1):
                log.info(f"out of memory on {tiles} tiles; tile budget now {planner.limits.max_tiles}")

        finished: list[RowOutcome] = []  # computed, not yet committed
        finished_seconds = 0.0
        last_commit = time.monotonic()

        def commit() -> None:
            nonlocal finished, finished_seconds, last_commit
            if finished and not lease.lost.is_set():
                writer.commit_batch(finished, state, finished_seconds)
                log.info(progress.line())
            finished, finished_seconds, last_commit = [], 0.0, time.monotonic()

        def run_batch(batch: list[PreparedRow]) -> bool:
            """Caption one batch into `finished`; False when it was abandoned."""
            nonlocal finished_seconds
            began = time.monotonic()
            ready = [p for p in batch if p.tiles is not None]
            try:
                captions = _caption_with_backoff(engine, ready, config.tiling.max_num, poll, log, out_of_memory) \
                    if ready else {}
            except BatchAbandoned as exc:
                log.info(f"abandoned rows {','.join(str(p.row) for p in batch)}: {exc}")
                return False
            finished_seconds += time.monotonic() - began
            log.info(f"computed rows={','.join(str(p.row) for p in batch)}")
            finished.extend(_outcomes(batch, captions))
            progress.add(len(batch), sum(p.tiles.shape[0] for p in ready),
                         sum(len(c.token_ids) for c in captions.values() if c is not None))
            if (len(finished) >= config.worker.commit_rows
                    or time.monotonic() - last_commit >= config.worker.commit_seconds):
                commit()
            return True

        def run_batches(batches: list[list[PreparedRow]]) -> bool:
            """Run batches until a stop; False when stopped."""
            for batch in batches:
                if stop.requested or lease.lost.is_set() or not run_batch(batch):
                    return False
            return True

        held: dict[int, PreparedRow] = {}  # prepared rows the planner holds back for a fuller batch
        running = True
        for packed in loader:
            prepared = packed.unpack()
            if limits.max_tiles is None:  # the seed's batches: the window as it is
                batches = [prepared]
            else:
                ready = [p for p in prepared if p.tiles is not None]
                held.update((p.row, p) for p in ready)
                planned = planner.add([(p.row, p.tiles.shape[0]) for p in ready])
                failed = [p for p in prepared if p.tiles is None]  # they need no model: recorded at once
                batches = ([failed] if failed else []) + [[held.pop(row) for row in rows] for rows in planned]
            running = run_batches(batches)
            if not running:
                break
        if running:
            run_batches([[held.pop(row) for row in rows] for rows in planner.flush()])
        commit()
        if lease.lost.is_set():
            raise LeaseLost(lease.lost_reason or "the slice lease was lost")
        if state.complete:
            return _finish(writer, state, "done", None, log)
        status = "requeued" if stop.requeue else "stopped"
        return _finish(writer, state, status, stop.reason or "unknown", log)
    except LeaseLost as exc:
        log.info(f"stopping: {exc}; nothing more is written by this worker")
        return SliceOutcome("stopped", "lease_lost", state)
    except BaseException as exc:
        if state is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            _record_crash(writer, state, exc, log)
        raise
    finally:
        stop.uninstall()
        lease.release()


def _record_crash(writer: SliceWriter, state: SliceIndex, exc: BaseException, log: logging.Logger) -> None:
    """Mark the slice crashed with a short reason ("disk full (ENOSPC) on PATH") where the index can still be
    written; the log line stays the record where it cannot."""
    if isinstance(exc, OSError):
        reason = f"{io_problem(exc)} on {exc.filename2 or exc.filename or writer.layout.root}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    state.status, state.stop_reason = "crashed", reason[:500]
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        writer.layout.reserve_file(state.slice).unlink(missing_ok=True)  # the room to write what follows
    log.info(f"crashed: {state.stop_reason}")
    try:
        writer.save_index(state)
    except (OSError, LeaseLost) as save_error:
        log.info(f"could not record the crash in {writer.layout.index_file(state.slice)} ({save_error})")


def _finish(writer: SliceWriter, state: SliceIndex, status: str, reason: str | None,
            log: logging.Logger) -> SliceOutcome:
    state.status, state.stop_reason = status, reason
    writer.save_index(state)
    if status == "done":
        writer.write_fenced(writer.layout.end_marker(state.slice), f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        log.info(f"done: {state.captions} captions, {state.failures} failures")
    else:
        log.info(f"{status} ({reason}) with {state.finished_rows}/{state.total} rows done")
    return SliceOutcome("requeue" if status == "requeued" else status, reason, state)
