"""The life of one slice: check inputs (before any model is loaded), take the slice's lease, skip every
committed row, caption the batches that `prefetch` decodes and tiles ahead of the model, commit them, and on a
stop signal finish or abandon the batch in flight, commit, record why, and return.

`python -m vlm_hpc.worker` (the command) and `vlm_hpc.submit` (submitit's array tasks) both call `run_slice`.
`SliceRun` is one attempt's lifecycle (start, resume, caption what is pending, finish or record a crash);
`BatchLoop` is its captioning once the engine is loaded (plan, caption with out-of-memory backoff, commit).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from vlm_hpc import __version__
from vlm_hpc.cluster.environment import JobEnvironment
from vlm_hpc.config import RunConfig
from vlm_hpc.engines import engine_class, load_engine
from vlm_hpc.engines.base import Caption, Engine, EngineOutOfMemory, GenerationSettings
from vlm_hpc.errors import VlmHpcError, io_error_line, io_problem
from vlm_hpc.internvl.loading import inspect_model_folder, model_fingerprint
from vlm_hpc.preprocess.resampling import resampler
from vlm_hpc.run.batching import BatchLimits, BatchPlanner, memory_tile_budget, split_windows
from vlm_hpc.run.checkpoint import WILL_CRASH_AGAIN, SliceCheckpoint
from vlm_hpc.run.durable import remove_stale_temporaries, write_atomic
from vlm_hpc.run.layout import OutputLayout
from vlm_hpc.run.lease import LeaseLost, SliceLease
from vlm_hpc.run.manifest import ManifestCheck, ensure_manifest
from vlm_hpc.run.outputs import output_format
from vlm_hpc.run.pins import PinnedSettings, pinned_settings
from vlm_hpc.run.prefetch import PreparedBatch, PreparedRow, SliceBatches, batch_loader
from vlm_hpc.run.readers import RowReader, open_reader
from vlm_hpc.run.repair import repair_on_resume, resume_checkpoint
from vlm_hpc.run.slicing import slice_bounds
from vlm_hpc.run.stop import BatchAbandoned, StopRequest
from vlm_hpc.run.submissions import record_template_task
from vlm_hpc.run.writer import RowOutcome, SliceWriter

EngineFactory = Callable[[RunConfig], Engine]


def batch_limits(config: RunConfig, engine: Engine) -> BatchLimits:
    """generation.batch_size and tile_budget as limits; "auto" sizes the budget to the accelerator's free memory."""
    budget = config.generation.tile_budget
    smallest = config.tiling.max_num + 1  # one image at max_num, thumbnail included
    if budget == "auto":
        free = engine.free_memory()
        costs = engine.memory_costs() if free is not None else None
        if free is None or costs is None:  # no accelerator: memory is not what limits a batch
            budget = config.generation.batch_size * smallest
        else:
            budget = memory_tile_budget(free, costs.tile_bytes, costs.image_bytes, costs.vision_workspace_bytes,
                                        config.generation.batch_size, smallest)
    return BatchLimits(config.generation.batch_size, budget)


CRASH_RESERVE_BYTES = 64 * 1024  # on a full disk: room for the crash record, the log line and the lease release


class _SliceLogFile(logging.FileHandler):
    """The slice's log file; a write it cannot make (disk full) is dropped, the stderr copy still shows it."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


# `extra` of a log record for the slice's log file alone: the command prints that error (or traceback) itself.
FILE_ONLY = {"file_only": True}


def _setup_logging(layout: OutputLayout, slice_id: int) -> logging.Logger:
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"vlm_hpc.slice{slice_id}")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s slice %(slice)s | %(message)s".replace("%(slice)s", str(slice_id)))
    stderr = logging.StreamHandler(sys.stderr)
    stderr.addFilter(lambda record: not getattr(record, "file_only", False))
    for handler in (_SliceLogFile(layout.log_file(slice_id), mode="a"), stderr):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def exception_line(exc: BaseException) -> str:
    """The line that says what went wrong, "Type: message"; for an error that carries a traceback in its message
    (a DataLoader worker's, re-raised in the main process), that traceback's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if any("Traceback (most recent call last)" in line for line in lines):
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def crash_reason(exc: BaseException, root: Path) -> tuple[str, bool]:
    """A crash's reason for the index, the log and status, and whether resubmitting as it is would crash again:
    a VlmHpcError is the user's input (config, model folder, data, device, a corrupt index) and stays until fixed;
    an I/O error names its path ("disk full (ENOSPC) on PATH"); anything else is its exception line."""
    if isinstance(exc, OSError):
        return f"{io_problem(exc)} on {exc.filename2 or exc.filename or root}"[:500], False
    if isinstance(exc, VlmHpcError):
        return f"{WILL_CRASH_AGAIN}: {exc}"[:500], True
    return exception_line(exc)[:500], False


def log_crash(log: logging.Logger, reason: str, exc: BaseException) -> None:
    """The slice log's record of a crash, the "crashed: " line status reads, with the traceback below it unless
    the error is a VlmHpcError (its one line says it all); to the log file only, as the command reports it."""
    log.info(f"crashed: {reason}", exc_info=None if isinstance(exc, VlmHpcError) else exc, extra=FILE_ONLY)


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


def row_outcomes(batch: list[PreparedRow], captions: dict[int, Caption | None]) -> list[RowOutcome]:
    """What each row of a captioned batch records: its caption, or why it has none."""
    outcomes = []
    for p in batch:
        sample = (p.image_bytes, p.sample_extension) if p.sample_extension and p.image_bytes else None
        if not p.ready:
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
            outcomes.append(RowOutcome(p.row, p.key, p.web_caption, vlm_caption=text, failure=p.failure,
                                       detail=p.detail, sample=sample))
    return outcomes


@dataclass(frozen=True)
class SliceOutcome:
    status: Literal["done", "stopped", "requeued"]  # the slice's status words, one meaning each
    reason: str | None
    checkpoint: SliceCheckpoint


@dataclass(frozen=True)
class Batch:
    """Rows captioned and committed together, in the order the log names them; `ready` are those the engine
    captions (the others carry their failure and need no model)."""

    rows: list[PreparedRow]
    ready: list[PreparedRow]


def check_inputs(config: RunConfig, slice_id: int, count: int) -> tuple[RowReader, OutputLayout, PinnedSettings]:
    """Everything that can be checked without the model: model folder, dataset and columns, output folder;
    returns the rows, the output folder and the settings this run pins."""
    folder = inspect_model_folder(config.model.path)
    layout = OutputLayout(Path(config.output.dir))
    rows = open_reader(config.data, cache_dir=layout.inputs_dir)  # the shard list is made once, kept there
    slice_bounds(rows.num_rows, slice_id, count)
    try:
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        probe = layout.write_probe
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise VlmHpcError(f"output: cannot write to {layout.root} ({exc}); set output.dir to a writable "
                          "folder") from None
    return rows, layout, pinned_settings(config, folder)


def run_slice(config: RunConfig, slice_id: int, count: int, engine_factory: EngineFactory = load_engine,
              stop_request: StopRequest | None = None, accept_changes: bool = False) -> SliceOutcome:
    """Caption slice `slice_id` of `count` to completion or until asked to stop; resumable at any point.
    A resume with other pinned settings (vlm_hpc.run.pins) is refused unless `accept_changes`. An I/O error on the
    output folder is raised as one VlmHpcError line, recorded as the slice's crash."""
    try:
        return SliceRun.start(config, slice_id, count, engine_factory, stop_request, accept_changes).run()
    except OSError as exc:
        raise VlmHpcError(io_error_line(exc, Path(config.output.dir))) from None


class SliceRun:
    """One attempt at one slice, from its lease taken to its outcome recorded. Every write it makes of the
    slice's outputs, index, stamp and markers is fenced by the lease (`SliceWriter`)."""

    def __init__(self, config: RunConfig, slice_id: int, count: int, rows: RowReader, layout: OutputLayout,
                 check: ManifestCheck, log: logging.Logger, environment: JobEnvironment, lease: SliceLease,
                 stop_request: StopRequest, engine_factory: EngineFactory) -> None:
        self.config = config
        self.slice_id = slice_id
        self.count = count
        self.rows = rows
        self.layout = layout
        self.check = check
        self.log = log
        self.environment = environment
        self.lease = lease
        self.stop_request = stop_request
        self.engine_factory = engine_factory
        self.first_row, self.end_row = slice_bounds(rows.num_rows, slice_id, count)
        self.writer = SliceWriter(layout, slice_id, output_format(config.output.format, layout, slice_id), lease)
        self.state: SliceCheckpoint | None = None  # read by `resume`; before that a crash has no index to record

    @classmethod
    def start(cls, config: RunConfig, slice_id: int, count: int, engine_factory: EngineFactory,
              stop_request: StopRequest | None, accept_changes: bool) -> SliceRun:
        """Check the inputs, the manifest and the device (before any model is loaded), open the slice's log, take
        its lease and start the heartbeat. A refusal is logged as the slice's crash in a run's folder (one with a
        manifest: an array task of a submitted run); a first start refused before that writes nothing there."""
        layout = OutputLayout(Path(config.output.dir))
        log = _setup_logging(layout, slice_id) if layout.manifest_file.exists() else None
        try:
            rows, layout, pins = check_inputs(config, slice_id, count)
            check = ensure_manifest(layout, rows, config, count, pins, slice_id=slice_id,
                                    accept_changes=accept_changes)
            log = log or _setup_logging(layout, slice_id)
            engine_class(config.model.engine).check_device(config)
        except Exception as exc:
            if log is not None:
                log_crash(log, crash_reason(exc, layout.root)[0], exc)
            raise
        for note in check.notes:
            log.info(f"manifest: {note}")
        environment = JobEnvironment.current()
        # A task that no submit recorded (the sbatch template): status must see it and its queued siblings.
        record_template_task(layout, slice_id, environment.slurm_task,
                             environment.array_job_id if environment.array_task_id == str(slice_id) else None)
        lease = SliceLease(layout.lease_file(slice_id), environment, config.worker.stale_lease_seconds,
                           heartbeat_seconds=config.worker.heartbeat_seconds,
                           failing_seconds=config.worker.heartbeat_failure_seconds, log=log.info)
        recovered = lease.acquire()
        try:  # until `run` owns it, a failure here must not leave the lease held
            if recovered:
                log.info(f"took over the slice lease: {recovered}")
            lease.start_heartbeat()
            stop_request = stop_request or StopRequest(layout.kill_file(slice_id), config.worker.grace_seconds)
            stop_request.on_request = log.info  # the moment a stop arrives is in the log, whatever follows
            return cls(config, slice_id, count, rows, layout, check, log, environment, lease, stop_request,
                       engine_factory)
        except BaseException:
            lease.release()
            raise

    def run(self) -> SliceOutcome:
        """Resume, caption what is pending, record the outcome; the lease is released whatever happens, a
        corrupt index included. A lost lease ends the attempt without another write."""
        try:
            state = self.resume()
            if state.complete:
                return self.finish("done", None)
            return self.caption_pending(state)
        except LeaseLost as exc:
            self.log.info(f"stopping: {exc}; nothing more is written by this worker")
            return SliceOutcome("stopped", "lease_lost", self.state)
        except BaseException as exc:
            if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self.record_crash(exc)
            raise
        finally:
            self.stop_request.uninstall()
            self.lease.release()

    def resume(self) -> SliceCheckpoint:
        """The slice's index with everything an interrupted attempt left cleaned up: stale temporaries removed,
        outputs repaired and recovered to what the index committed (under the fence), the crash reserve
        written, and this attempt recorded as running."""
        for folder, pattern in self.layout.slice_temporaries(self.slice_id):
            if removed := remove_stale_temporaries(folder, pattern):
                self.log.info(f"removed {removed} temporary files an interrupted write left in {folder}")
        state = self.state = resume_checkpoint(self.layout, self.slice_id, self.count, self.first_row, self.end_row,
                                          self.writer.output)
        with self.lease.fenced():
            repair_on_resume(self.writer.output, state,
                             lambda: self.rows.keys(self.first_row, self.end_row),
                             self.check.manifest.duplicate_rows, self.log)
            self.writer.recover(state)
            write_atomic(self.layout.reserve_file(self.slice_id), bytes(CRASH_RESERVE_BYTES))
        state.attempts += 1
        state.status, state.stop_reason, state.will_crash_again, state.started_at = "running", None, False, time.time()
        state.rows_at_start = state.finished_rows
        self.writer.save_checkpoint(state)
        self.log.info(f"start: rows [{self.first_row}, {self.end_row}) of {self.rows.num_rows}, "
                      f"{state.finished_rows} already done, attempt {state.attempts}, bicubic resize by "
                      f"{resampler()}, {self.environment.describe()}")
        return state

    def caption_pending(self, state: SliceCheckpoint) -> SliceOutcome:
        """Load the engine, unless a stop came first, and caption the pending rows until done or stopped."""
        self.stop_request.install()
        engine = None if self.stop_request.requested else self.engine_factory(self.config)
        if engine is None or self.stop_request.requested:  # stop signals count from the command's first instant
            return self.finish("requeued" if self.stop_request.requeue else "stopped", self.stop_request.reason)
        if not self.layout.query_file.exists():
            write_atomic(self.layout.query_file, self.config.prompt.question.encode())
        described = self.write_stamp(engine)
        # Said once the engine is up, as the stamp says it: which of config.json, conversation.py, our default
        # or prompt.system_message decided the prompt.
        source = described.get("system_message_source", "not reported by this engine")
        self.log.info(f"engine {self.config.model.engine} loaded on {described.get('device')}; "
                      f"system message: {source}")
        limits = batch_limits(self.config, engine)
        if limits.max_tiles is not None:
            self.log.info(f"batches: up to {limits.max_tiles} tiles and {limits.max_images} images, "
                          f"sorted by tile count in windows of {self.config.generation.sort_window} rows")
        windows = split_windows(state.pending_rows(), limits, self.config.generation.sort_window)
        stride = max(1, math.ceil(self.rows.num_rows / self.config.output.max_sample_images))
        loader = batch_loader(SliceBatches(self.rows, windows, self.config, self.check.manifest, stride),
                              self.config.worker, pin_memory=engine.pins_tiles)
        batches = BatchLoop(self, engine, BatchPlanner(limits, _tile_count), Progress(state.finished_rows, state.total))
        try:
            batches.run(loader)
        except BaseException as exc:
            # The loader's iterator lives on in the traceback's frames, and with it its processes, which ignore the
            # SIGTERM that multiprocessing sends them at exit, where this process would wait for them forever.
            traceback.clear_frames(exc.__traceback__)
            raise
        batches.commit()
        if self.lease.lost.is_set():
            raise LeaseLost(self.lease.lost_reason or "the slice lease was lost")
        if state.complete:
            return self.finish("done", None)
        stop = self.stop_request
        return self.finish("requeued" if stop.requeue else "stopped", stop.reason or "unknown")

    def write_stamp(self, engine: Engine) -> dict[str, str]:
        """Add this attempt to the slice's reproducibility stamps (a record, not state: a damaged file is set
        aside and a new one started); returns what the engine described of itself there."""
        folder = Path(self.config.model.path)
        stamp_path = self.layout.stamp_file(self.slice_id)
        try:
            attempts = json.loads(stamp_path.read_bytes()) if stamp_path.exists() else []
        except ValueError:  # not JSON, or not UTF-8
            attempts = None
        if not isinstance(attempts, list):
            self.log.info(f"{stamp_path} is damaged; it is kept as {stamp_path.name}.damaged and a new one is started")
            stamp_path.replace(stamp_path.with_name(stamp_path.name + ".damaged"))
            attempts = []
        described = engine.describe()
        attempts.append({
            "time": time.time(), "environment": self.environment.to_dict(), "vlm_hpc": __version__,
            "engine": self.config.model.engine, **described,
            "model_fingerprint": model_fingerprint(folder), "model_path": str(folder.resolve()),
            "prompt_sha256": hashlib.sha256(engine.prompt(1).encode()).hexdigest()[:16],
            "generation": self.config.to_dict()["generation"], "max_num": self.config.tiling.max_num,
            "accepted_changes": self.check.accepted,
        })
        self.writer.write_fenced(stamp_path, json.dumps(attempts, ensure_ascii=False, indent=1).encode())
        return described

    def finish(self, status: str, reason: str | None) -> SliceOutcome:
        """Record how this attempt ended (done: with the end marker)."""
        state = self.state
        state.status, state.stop_reason = status, reason
        self.writer.save_checkpoint(state)
        if status == "done":
            self.writer.write_fenced(self.layout.end_marker(self.slice_id),
                                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            self.log.info(f"done: {state.outcomes().describe()}")
        else:
            self.log.info(f"{status} ({reason}) with {state.finished_rows}/{state.total} rows done")
        if reason == "kill_file":
            self.consume_kill_file()
        return SliceOutcome(status, reason, state)

    def consume_kill_file(self) -> None:
        """A kill file stops one attempt, not every later one: once its stop is recorded it becomes
        kill{I}.done (with the time), so the same submit command resumes the slice."""
        kill, obeyed = self.layout.kill_file(self.slice_id), self.layout.obeyed_kill_file(self.slice_id)
        try:
            kill.replace(obeyed)
            with open(obeyed, "a") as handle:
                handle.write(f"obeyed {time.strftime('%Y-%m-%d %H:%M:%S')} by {self.environment.describe()}\n")
        except FileNotFoundError:
            return  # removed by hand meanwhile
        self.log.info(f"kill file obeyed: {kill.name} renamed to {obeyed.name}; submit again to resume")

    def record_crash(self, exc: BaseException) -> None:
        """Log the crash with its reason (crash_reason) and traceback, and mark the slice crashed in its index
        where that can still be written (it is read by `resume`, which a corrupt index stops before); the log
        line stays the record where it cannot."""
        reason, again = crash_reason(exc, self.layout.root)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.layout.reserve_file(self.slice_id).unlink(missing_ok=True)  # the room to write what follows
        log_crash(self.log, reason, exc)
        state = self.state
        if state is None:
            return
        state.status, state.stop_reason, state.will_crash_again = "crashed", reason, again
        try:
            self.writer.save_checkpoint(state)
        except (OSError, LeaseLost) as save_error:
            self.log.info(f"could not record the crash in {self.layout.checkpoint_file(state.slice)} ({save_error})")


def _tile_count(prepared: PreparedRow) -> int:
    return prepared.tiles.shape[0]


@dataclass
class BatchLoop:
    """The batches of one attempt once its engine is loaded: windows of prepared rows planned into batches,
    captioned (backing off on out-of-memory), and committed every `worker.commit_rows` rows or
    `worker.commit_seconds`."""

    slice: SliceRun
    engine: Engine
    planner: BatchPlanner[PreparedRow]
    progress: Progress
    uncommitted: list[RowOutcome] = field(default_factory=list)  # computed, not yet committed
    uncommitted_seconds: float = 0.0
    last_commit: float = field(default_factory=time.monotonic)
    settings: GenerationSettings = field(init=False)  # the config's; each batch's seed is offset from them
    max_num: int = field(init=False)

    def __post_init__(self) -> None:
        self.settings = self.slice.config.generation.settings()
        self.max_num = self.slice.config.tiling.max_num

    def run(self, windows: Iterable[PreparedBatch]) -> None:
        """Caption every window the loader prepares, until the last, a stop, or a lost lease."""
        for packed in windows:
            if not self.run_batches(self.plan(packed.unpack())):
                return
        self.run_batches([Batch(rows, rows) for rows in self.planner.flush()])

    def plan(self, prepared: list[PreparedRow]) -> list[Batch]:
        """The batches ready to run from one window; with a tile budget the planner may hold some rows back."""
        ready = [p for p in prepared if p.ready]
        if self.planner.limits.max_tiles is None:  # the seed's batches: the window as it is
            return [Batch(prepared, ready)]
        failed = [p for p in prepared if not p.ready]  # they need no model: recorded at once
        return ([Batch(failed, [])] if failed else []) + [Batch(rows, rows) for rows in self.planner.add(ready)]

    def run_batches(self, batches: list[Batch]) -> bool:
        """Caption batches until a stop; False when stopped."""
        for batch in batches:
            if self.slice.stop_request.requested or self.slice.lease.lost.is_set() or not self.caption_batch(batch):
                return False
        return True

    def caption_batch(self, batch: Batch) -> bool:
        """Caption one batch into the uncommitted outcomes, committing when it is time; False when abandoned."""
        log = self.slice.log
        began = time.monotonic()
        try:
            captions = self.caption_with_backoff(batch.ready, shrink_budget=True) if batch.ready else {}
        except BatchAbandoned as exc:
            log.info(f"abandoned rows {','.join(str(p.row) for p in batch.rows)}: {exc}")
            return False
        self.uncommitted_seconds += time.monotonic() - began
        # Rows the model saw, apart from rows recorded without it (ledger: undecodable, duplicate key, ...).
        if batch.ready:
            log.info(f"computed rows={','.join(str(p.row) for p in batch.ready)}")
        if len(batch.ready) < len(batch.rows):
            log.info(f"ledger rows={','.join(str(p.row) for p in batch.rows if not p.ready)}")
        self.uncommitted.extend(row_outcomes(batch.rows, captions))
        self.progress.add(len(batch.rows), sum(map(_tile_count, batch.ready)),
                          sum(len(c.token_ids) for c in captions.values() if c is not None))
        worker = self.slice.config.worker
        if len(self.uncommitted) >= worker.commit_rows or time.monotonic() - self.last_commit >= worker.commit_seconds:
            self.commit()
        return True

    def caption_with_backoff(self, batch: list[PreparedRow], shrink_budget: bool) -> dict[int, Caption | None]:
        """Captions by row. Out of memory: shrink the tile budget (for the batch as planned, `shrink_budget`),
        split the batch in halves, and retry a single image with fewer tiles; None where even one tile fails."""
        # Sampling seed per batch from its lowest row: a resumed slice with the same batches draws the same.
        settings = replace(self.settings, seed=self.settings.seed + min(p.row for p in batch))
        try:
            return dict(zip([p.row for p in batch], self.engine.caption([p.tiles for p in batch], settings,
                                                                        poll=self.poll)))
        except EngineOutOfMemory:
            pass
        tiles = sum(map(_tile_count, batch))
        if shrink_budget and self.planner.shrink(tiles, self.max_num + 1):
            self.slice.log.info(f"out of memory on {tiles} tiles; tile budget now {self.planner.limits.max_tiles}")
        if len(batch) > 1:
            half = len(batch) // 2
            self.slice.log.info(f"out of memory on {len(batch)} images; splitting the batch")
            return {**self.caption_with_backoff(batch[:half], shrink_budget=False),
                    **self.caption_with_backoff(batch[half:], shrink_budget=False)}
        return {batch[0].row: self.caption_with_fewer_tiles(batch[0], settings)}

    def caption_with_fewer_tiles(self, alone: PreparedRow, settings: GenerationSettings) -> Caption | None:
        """One image the engine cannot caption at max_num, tiled again at half the max_num until it fits."""
        max_num = self.max_num // 2
        # Only sample rows keep their bytes (see PreparedRow): read this one again, once.
        image = alone.image_bytes or self.slice.rows.read(alone.row, alone.row + 1)[0].image
        while max_num >= 1:
            self.slice.log.info(f"out of memory on row {alone.row} alone; retrying with max_num {max_num}")
            try:
                return self.engine.caption([alone.retile(max_num, image).tiles], settings, poll=self.poll)[0]
            except EngineOutOfMemory:
                max_num //= 2
        return None

    def poll(self) -> None:
        """Between decoding steps: abandon the batch past the stop deadline, or once the lease is lost."""
        self.slice.stop_request.check_deadline()
        if self.slice.lease.lost.is_set():
            raise BatchAbandoned(self.slice.lease.lost_reason or "the slice lease was lost")

    def commit(self) -> None:
        """Make the uncommitted outcomes durable and advance the index (nothing once the lease is lost)."""
        if self.uncommitted and not self.slice.lease.lost.is_set():
            self.slice.writer.commit_batch(self.uncommitted, self.slice.state, self.uncommitted_seconds)
            self.slice.log.info(self.progress.line())
        self.uncommitted, self.uncommitted_seconds, self.last_commit = [], 0.0, time.monotonic()
