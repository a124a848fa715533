"""The two Ray stages: decode-and-window (CPU tasks) and embed (one backbone per actor).

Row protocol between them. Every row has ``shard``, ``recording_id`` and ``meta``:

* window rows (``window_index`` >= 0): ``channel``, ``window_index``, ``start_s``,
  ``end_s``, ``valid_samples`` and ``audio`` (float32, one window, zero-padded past
  ``valid_samples``), ``meta`` empty but on a recording's last window;
* the report (``meta`` = JSON), one per recording: the decode report (status, duration,
  rate, windows per channel) or the error that stopped it (``sink.RecordingReport``). It
  rides on the recording's last window row; a recording that gave no window sends it in a
  row of its own (``window_index`` -1, its audio zeros). A row of its own for every
  recording took a model batch's slot and a window's bytes in the object store for each:
  in an archive of 5-s clips (a window each), half of every batch.

The embed stage turns window rows into one row per window x layer with the pooled
embedding and passes report rows through; raw audio goes no further than the embed stage.
It adds one timing row (``meta`` = JSON with ``type: "timing"``) per batch: when the call
started and ended, and how long the model itself ran. The sink sums them per actor, so the
job can say how busy its models were (``JobSummary.embed``). Windows whose embeddings are
not finite are not written: one ``type: "dropped"`` row per recording among them names them
(channel, window index), so the sink does not wait for them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import crashes, quarantine, redact, storage
from pipeline.audio import DecodeReport, DecodeSettings, decode_stream
from pipeline.crashes import LedgerClient, ledger_of
from pipeline.errors import RETRYABLE_ERRORS, AudioDecodeError, CheckpointMismatchError
from pipeline.faults import fault_point
from pipeline.sink import STAGE_SCHEMA
from pipeline.windows import StreamingWindower, WindowBatch

log = logging.getLogger(__name__)


def configure_worker_logging(level: str) -> None:
    """Give the package's loggers a handler at the job's level inside a Ray worker.

    Ray workers only show warnings from libraries by default; this makes ``run.log_level``
    apply to decode tasks and embedding actors as it does to the driver (their output
    reaches the driver's console and Ray's worker logs).
    """
    logger = logging.getLogger("pipeline")
    logger.setLevel(level)
    if not any(getattr(h, "_embed_archive", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._embed_archive = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False

# --------------------------------------------------------------------------- decode


# A block handed to the embed stage holds at least this much window audio.
MIN_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class DecodeSpec:
    """Plain settings for the decode stage (pickled to every task)."""

    settings: DecodeSettings
    window_samples: int
    hop_samples: int
    tail: str
    min_tail_samples: int
    batch_windows: int | None
    storage_options: dict[str, Any] = field(default_factory=dict)
    log_level: str = "INFO"
    model_batch: int = 1
    # The run's pipeline.crashes.CrashLedger actors (Ray actor handles), told which
    # recording each task is on; none: nothing told (tests, a stage run by itself).
    crash_ledgers: tuple[Any, ...] = ()

    @property
    def block_rows(self) -> int:
        """Rows per block handed to the embed stage: ``batch_windows``, else one model batch
        (more for windows so short that a block would be under 1 MiB of audio), rounded up to
        a whole number of model batches, so no batch straddles two blocks (Ray would join it
        into a copy)."""
        rows = max(self.batch_windows or self.model_batch,
                   -(-MIN_BLOCK_BYTES // self.window_bytes))
        return -(-rows // self.model_batch) * self.model_batch

    @property
    def window_bytes(self) -> int:
        return self.window_samples * np.dtype(np.float32).itemsize



def decode_batch(batch: dict[str, np.ndarray], spec: DecodeSpec) -> Iterator[dict[str, np.ndarray]]:
    """Ray ``map_batches`` generator: a few recordings in, blocks of window and report rows out.

    Rows leave in blocks of exactly ``spec.block_rows`` (the task's last block may be
    shorter), gathered across the recordings of the task in order; see :class:`RowBlocks`.
    """
    configure_worker_logging(spec.log_level)
    blocks = RowBlocks(spec.block_rows)
    ids = batch["recording_id"]
    ledger = LedgerClient(ledger_of(spec.crash_ledgers, str(ids[0]) if len(ids) else ""))
    for shard, rid, uri, path, size, problem in zip(
            batch["shard"], batch["recording_id"], batch["uri"], batch["path"],
            batch["size_bytes"], batch["problem"], strict=True):
        # One with a known problem is not decoded: nothing to kill a worker.
        deaths = ledger.starting(str(rid)) if not problem else 0
        for rows in decode_recording(str(rid), str(uri), str(path), int(size), str(problem),
                                     spec, deaths, on_crash=ledger.crashed):
            rows["shard"] = np.full(len(rows["recording_id"]), str(shard), dtype=object)
            yield from blocks.add(rows)
        ledger.done()
        if not blocks.pending:  # this recording's report is out
            fault_point("decoded")
    ledger.close()
    if blocks.pending:
        yield from blocks.flush()
        fault_point("decoded")


class RowBlocks:
    """Regroups a stream of row batches into blocks of exactly ``rows`` rows, in order.

    Ray Data packs what a generator yields into output blocks of up to
    ``target_max_block_size``; smaller yields end up as chunks of one block. An actor batch
    sliced out of a multi-chunk block makes Ray combine the chunks first: a private copy of
    the whole block in the embedding actor, for every block. A recording's windows arrive a
    few per decoded chunk, so without this every block would be copied once more on the way
    to the model. With ``target_max_block_size`` at one block's audio, each yield of exactly
    ``rows`` rows becomes one single-chunk block, and the actor's batches are zero-copy views
    on the object store. Holds fewer than ``rows`` rows between calls (what Ray's own output
    buffer held before passing a block on).
    """

    def __init__(self, rows: int) -> None:
        if rows <= 0:
            raise ValueError(f"rows must be positive, got {rows}")
        self.rows = rows
        self._parts: list[dict[str, np.ndarray]] = []
        self.pending = 0

    def add(self, part: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Take one batch of rows; yield every block now complete."""
        n = len(part["recording_id"])
        if not n:
            return
        self._parts.append(part)
        self.pending += n
        if self.pending < self.rows:
            return
        whole = self._take()
        full = len(whole["recording_id"]) // self.rows * self.rows
        for start in range(0, full, self.rows):
            yield {k: v[start : start + self.rows] for k, v in whole.items()}
        if full < len(whole["recording_id"]):  # a copy, so the yielded block can be freed
            self._parts = [{k: v[full:].copy() for k, v in whole.items()}]
            self.pending = len(self._parts[0]["recording_id"])

    def flush(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield the rows still held (fewer than ``rows``), if any."""
        if self.pending:
            yield self._take()

    def _take(self) -> dict[str, np.ndarray]:
        parts, self._parts, self.pending = self._parts, [], 0
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def decode_recording(rid: str, uri: str, path: str, size: int, problem: str,
                     spec: DecodeSpec, deaths: int = 0,
                     on_crash: Callable[[], None] = lambda: None) -> Iterator[dict[str, np.ndarray]]:
    """Stream one recording into window batches; never raises for a bad recording.

    ``deaths``: how many times decode workers died on it in this run (the crash ledger's
    answer). Once, and it is decoded in a process of its own (:mod:`pipeline.quarantine`),
    whose death makes it an error row (``on_crash`` told); twice, and it is an error row
    without a decode.
    """
    report = DecodeReport()
    started = time.perf_counter()
    counts: dict[int, int] = {}  # windows sent, by channel
    last: list[dict[str, np.ndarray]] = []  # the last window row, held back for the report
    try:
        if problem:  # the listing's: the object could not be had
            error_type, _, message = problem.partition(": ")
            raise AudioDecodeError(error_type or "SourceError", message or problem)
        if deaths >= crashes.SUSPECT_DEATHS:
            raise AudioDecodeError(crashes.ERROR_TYPE, crashes.died_again(deaths))
        read = quarantine.read_windows if deaths else read_windows
        try:
            for rows in read(rid, uri, path, size, spec, report, counts):
                yield from _holding_the_last_row(rows, last)
        except quarantine.QuarantineDied as died:
            log.error("decoding %s apart killed its process (%s), after its decode worker had "
                      "died on it: an error row (%s)", uri, died.how, crashes.ERROR_TYPE)
            on_crash()
            raise
        if not counts:
            raise AudioDecodeError(
                "TooShort",
                f"{report.output_samples / spec.settings.target_sample_rate_hz:.4f} s of audio "
                f"gives no window (window {spec.window_samples} samples, tail "
                f"'{spec.tail}', minimum tail {spec.min_tail_samples} samples)",
            )
        meta = {"status": report.status, "problems": report.problems}
    except Exception as err:  # noqa: BLE001 - any failure becomes the recording's error row
        meta = _failure_meta(err, uri)
    # Messages name the object; a signed URL's signature must not reach the errors table.
    meta["message"] = redact.text(str(meta.get("message", "")))
    if meta["status"] == "error" and counts:
        # Windows already went downstream: keep them, and say the rest was lost.
        meta = {"status": "partial", "stopped_by": meta["error_type"],
                "transient": meta.get("transient", False),
                "problems": report.problems + [f"{meta['error_type']}: {meta['message']}"]}
    if meta["status"] == "partial":
        # Here, not where the decoder met each problem: only here is the recording's name
        # known (``uri``, the listing's, already redacted), and it is one line per recording
        # whatever its problems (a short WAV's truncation is noted after its last block).
        log.warning("partial decode of %s: %s", uri, redact.text("; ".join(meta["problems"])))
    meta.update(
        type="report",
        duration_s=report.duration_s,
        source_sample_rate_hz=report.source_sample_rate_hz,
        source_channels=report.source_channels,
        format=report.format,
        windows=counts,
        bytes_read=report.bytes_read,
        decode_s=round(time.perf_counter() - started, 4),
    )
    text = json.dumps({"recording_id": rid, **meta}, default=str)
    if last:
        row = last.pop()
        row["meta"] = np.array([text], dtype=object)
        yield row
    else:
        yield _report_row(rid, text, spec.window_samples)


def _holding_the_last_row(rows: dict[str, np.ndarray], last: list[dict[str, np.ndarray]]
                          ) -> Iterator[dict[str, np.ndarray]]:
    """``rows`` passed on but for their last row, which replaces the one held in ``last``
    (passed on now): the recording's last window waits there for its report."""
    n = len(rows["recording_id"])
    if not n:
        return
    if last:
        yield last.pop()
    if n > 1:
        yield {k: v[:-1] for k, v in rows.items()}
    last.append({k: v[-1:].copy() for k, v in rows.items()})  # not a view pinning the chunk


def read_windows(rid: str, uri: str, path: str, size: int, spec: DecodeSpec,
                 report: DecodeReport, counts: dict[int, int]) -> Iterator[dict[str, np.ndarray]]:
    """The recording's window batches, read by byte range; ``counts`` the windows sent by
    channel, ``report.bytes_read`` what was fetched (failed or not).

    Raises:
        Exception: a read that failed (``reader.error``) rather than the truncation or the
            end of file libsndfile made of it inside its C callback (see RangeReader).
    """
    fault_point("decode", uri)
    fs, _ = storage.url_to_fs(uri, spec.storage_options)
    reader = storage.RangeReader(fs, path, size=size if size >= 0 else None)
    try:
        try:
            for out in _windows(rid, reader, report, spec):
                count_windows(out, counts)
                yield out
        except AudioDecodeError:
            if reader.error is None:
                raise
        if reader.error is not None:
            raise reader.error
    finally:
        report.bytes_read = reader.bytes_fetched
        reader.close()


def count_windows(rows: dict[str, np.ndarray], counts: dict[int, int]) -> None:
    """Add a window batch's rows to ``counts``, by channel."""
    channels, n = np.unique(rows["channel"], return_counts=True)
    for ch, k in zip(channels.tolist(), n.tolist(), strict=True):
        counts[int(ch)] = counts.get(int(ch), 0) + int(k)


def _failure_meta(err: Exception, uri: str) -> dict[str, Any]:
    """The report of a recording that ``err`` stopped; ``transient`` marks a failure that was
    not the recording's own, which a rerun retries (``run.retry_transient_errors``)."""
    if isinstance(err, AudioDecodeError):
        # Includes a listing's problem (raised above as the error it was): a stat whose
        # retries ran out is a StorageError, as transient as a read's.
        return {"status": "error", "error_type": err.error_type, "message": str(err),
                "transient": err.error_type in RETRYABLE_ERRORS}
    if isinstance(err, storage.StorageError):
        return {"status": "error", "error_type": "StorageError", "message": str(err),
                "transient": True}
    if storage.archived(err):  # settled until restored: a rerun checks (resume.py)
        return {"status": "error", "error_type": "ArchivedObject",
                "message": storage.archived_message(err, uri)}
    if storage.access_refused(err):  # the credentials', not the recording's: expired, revoked
        return {"status": "error", "error_type": "PermissionError", "message": storage.why(err, "input.storage_options"),
                "transient": True}
    if isinstance(err, FileNotFoundError | IsADirectoryError):
        return {"status": "error", "error_type": type(err).__name__, "message": str(err)}
    # Not log.exception: the traceback would quote the URL unredacted.
    log.error("unexpected error decoding %s: %s", uri,
              redact.text(f"{type(err).__name__}: {err}"))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("traceback of that error:\n%s",
                  redact.text("".join(traceback.format_exception(err))))
    # Not the recording's fault (memory, a worker's environment, a bug): worth a retry.
    return {"status": "error", "error_type": type(err).__name__,
            "message": f"unexpected: {err}", "transient": True}


def _windows(rid: str, reader: Any, report: DecodeReport,
             spec: DecodeSpec) -> Iterator[dict[str, np.ndarray]]:
    windower: StreamingWindower | None = None
    rate = spec.settings.target_sample_rate_hz
    try:
        for chunk in decode_stream(reader, spec.settings, report):
            if windower is None:
                # With channels: each a window is one row per channel: batches of
                # block_rows // channels windows keep one batch at one block's rows.
                rows_per_window = 1 if spec.settings.channels == "mix" else chunk.shape[1]
                windower = StreamingWindower(spec.window_samples, spec.hop_samples, spec.tail,
                                             max_batch=max(1, spec.block_rows // rows_per_window))
            for batch in windower.push(chunk):
                yield _window_rows(rid, batch, rate, spec)
    except Exception:
        # The complete windows in the batch being filled were decoded before the failure:
        # they go on (and into the report's count) before the error ends the recording.
        if windower is not None:
            for batch in windower.flush():
                yield _window_rows(rid, batch, rate, spec)
        raise
    if windower is None:
        return
    for batch in windower.finish():
        # A tail window with less real audio than min_tail_s is dropped (see WindowsConfig).
        if (batch.valid >= spec.min_tail_samples).all():
            yield _window_rows(rid, batch, rate, spec)


def _window_rows(rid: str, batch: WindowBatch, rate: int, spec: DecodeSpec) -> dict[str, np.ndarray]:
    """Window batch -> rows; with ``channels: each`` every window becomes one row per channel."""
    n, channels, size = batch.audio.shape
    mixed = spec.settings.channels == "mix"
    rep = 1 if mixed else channels
    rows = n * rep
    start = np.repeat(batch.start, rep)
    valid = np.repeat(batch.valid, rep)
    end = start + (valid if spec.tail == "keep" else size)
    return {
        "recording_id": np.full(rows, rid, dtype=object),
        "channel": (np.full(rows, -1, np.int16) if mixed
                    else np.tile(np.arange(channels, dtype=np.int16), n)),
        "window_index": np.repeat(batch.index, rep).astype(np.int32),
        "start_s": start / rate,
        "end_s": end / rate,
        "valid_samples": valid.astype(np.int32),
        "audio": batch.audio.reshape(rows, size),
        "meta": np.full(rows, "", dtype=object),
    }


def _report_row(rid: str, text: str, window_samples: int) -> dict[str, np.ndarray]:
    """The report of a recording that gave no window, in a row of its own."""
    return {
        "recording_id": np.array([rid], dtype=object),
        "channel": np.array([-1], np.int16),
        "window_index": np.array([-1], np.int32),
        "start_s": np.array([0.0]),
        "end_s": np.array([0.0]),
        "valid_samples": np.array([0], np.int32),
        "audio": np.zeros((1, window_samples), np.float32),
        "meta": np.array([text], dtype=object),
    }
# --------------------------------------------------------------------------- embed


@dataclass(frozen=True)
class EmbedSpec:
    """Plain settings for an embedding actor (pickled; the actor loads the model itself).

    Attributes:
        model_name: registry name or ``module:Class``.
        weights: checkpoint URI, ``default`` or ``random``.
        options: architecture / plugin options.
        storage_options: fsspec options for the weights.
        layers: resolved, non-negative layer indices.
        pooling: ``mean``, ``max`` or ``cls``.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``int8``, as the driver settled it for the job
            (``auto`` is accepted and resolved on the actor's device, for direct use).
        sample_rate_hz: the model's rate (for ``valid_s``).
        tail: the tail policy (``keep`` runs short windows at their own length).
        min_input_samples: shortest input the model accepts.
        use_gpu: place the model on the GPU Ray assigned.
        torch_threads: intra-op threads (``None``: leave torch's default).
        log_level: the job's ``run.log_level``.
        weights_sha256: the checkpoint hash the driver planned the output variant with; the
            actor refuses a checkpoint that hashes otherwise (``None``: no check).
        on_cluster: the job joins a Ray cluster (weights that cannot be had are advised
            for, as :func:`pipeline.models.weights.advice_for_cluster` says).
        plugin_code: a plugin's code as the driver found it (``ModelInfo.preprocessing``'s
            ``code``, part of the variant); the actor refuses other code (``None``: no check).
        warmup_shape: ``(batch_size, window_samples)`` of one full batch, run on silence
            before any data arrives (``None``: no warm-up).
        gpu_share: the share of its GPU the actor was given (``compute.gpus_per_actor``);
            below 1 the actor's memory is capped at that share of the GPU's.
    """

    model_name: str
    weights: str
    options: dict[str, Any]
    storage_options: dict[str, Any]
    layers: tuple[int, ...]
    pooling: str
    precision: str
    sample_rate_hz: int
    tail: str
    min_input_samples: int
    use_gpu: bool
    torch_threads: int | None
    log_level: str = "INFO"
    gpu_share: float = 1.0
    warmup_shape: tuple[int, int] | None = None
    weights_sha256: str | None = None
    on_cluster: bool = False
    plugin_code: dict[str, str] | None = None


# What a process's CUDA context holds on its GPU, outside torch's allocator (kernels,
# cuBLAS and cuDNN workspaces): some 300-600 MiB with CUDA 12's lazy loading.
CUDA_CONTEXT_BYTES = 512 * 2**20


def gpu_memory_fraction(share: float, total_bytes: int) -> float:
    """The fraction of its GPU's memory an actor's allocator may take when ``share`` of the
    GPU is its: the share less one CUDA context, which every process sharing the GPU holds
    beside its allocator (5 % of the share, as this was, is 0.2 GiB of a quarter of a
    16-GiB card: four actors' contexts did not fit); never below half the share."""
    return max(share - CUDA_CONTEXT_BYTES / total_bytes, share / 2)


class Embedder:
    """Ray actor: holds one loaded backbone and embeds window batches mixed across recordings."""

    def __init__(self, spec: EmbedSpec) -> None:
        import torch

        from pipeline.models import (
            AUTOCAST_PRECISIONS,
            create_backbone,
            exact_float32_on_gpus,
            resolve_precision,
        )
        from pipeline.models.weights import advice_for_cluster

        configure_worker_logging(spec.log_level)
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        if spec.use_gpu and not torch.cuda.is_available():
            # Ray reserved a GPU for this actor; running on its CPU would hold the GPU idle
            # and go many times slower without a word.
            raise RuntimeError(f"this actor was given a GPU but torch {torch.__version__} sees "
                               "no CUDA device: install torch's CUDA build on the GPU nodes "
                               "(infra/docker/Dockerfile does), or set compute.gpus_per_actor: 0")
        self.device = "cuda" if spec.use_gpu else "cpu"
        if spec.use_gpu:
            exact_float32_on_gpus()  # fp32 is the same numbers on every GPU generation
            if spec.gpu_share < 1:
                # Actors sharing a GPU: each holds to its share, so that a batch too large
                # for it fails at this actor's warm-up, not another's batch mid-run.
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction(spec.gpu_share,
                                                                               total))
        self.precision = resolve_precision(spec.precision, self.device)
        # Overflow under autocast gets the same windows again in float32; an int8 network
        # has no float32 weights left to retry with, so its non-finite rows drop as fp32's do.
        self._retry_in_fp32 = self.precision in AUTOCAST_PRECISIONS
        started = time.perf_counter()
        with advice_for_cluster(spec.on_cluster):  # this node's cache is its own
            self.backbone = create_backbone(spec.model_name, weights=spec.weights,
                                            device=self.device, options=spec.options,
                                            storage_options=spec.storage_options,
                                            precision=self.precision)
        loaded_sha = self.backbone.weights.sha256
        if spec.weights_sha256 is not None and loaded_sha != spec.weights_sha256:
            # The object changed under the URI while the job ran, or this node's weights
            # cache is stale: its embeddings would land in a variant that names another
            # checkpoint. Failing the actor fails the job; nothing of it gets committed.
            raise CheckpointMismatchError(
                f"{redact.text(self.backbone.weights.uri)} now has sha256 {loaded_sha}, "
                f"but the job was planned (and its output variant named) with "
                f"{spec.weights_sha256}; rerun to embed with the checkpoint as it is now")
        code = self.backbone.info.preprocessing.get("code")
        if spec.plugin_code is not None and code != spec.plugin_code:
            # Another version of the plugin on this node than on the driver: its rows would
            # land in a variant that names the driver's code.
            raise RuntimeError(f"plugin {spec.model_name} here is {code}, but the job was "
                               f"planned (and its output variant named) with "
                               f"{spec.plugin_code}: install the same plugin on every node")
        self.actor_id = f"{socket.gethostname()}:{os.getpid()}"
        self._staging: Any = None  # see _staged
        loaded, self._model_s = time.perf_counter(), 0.0
        if spec.warmup_shape is not None:
            self._warm_up(*spec.warmup_shape)
        self._model_s = 0.0
        warm = (f", warmed up in {time.perf_counter() - loaded:.1f}s"
                if spec.warmup_shape is not None else "")
        log.info("embedder pid %d: %s on %s (%s, %d torch threads) loaded in %.1fs%s",
                 os.getpid(), spec.model_name, self.device, self.precision,
                 torch.get_num_threads(), loaded - started, warm)

    def _warm_up(self, batch_size: int, window_samples: int) -> None:
        """One full batch of silence through the model before any data arrives.

        A batch that does not fit (GPU out of memory) fails here, at start-up, instead of
        after decoding began, and first-call costs (CUDA context, kernel selection) are paid
        before the first real batch. With ``tail: pad`` its last window is half padding, as
        a recording's last window is: the masked path allocates more (BEATs adds the mask
        to its attention bias) and selects its own kernels. Not worth it on CPU (see
        ``ComputeConfig.warmup``).
        """
        silence = np.zeros((batch_size, window_samples), np.float32)
        valid = np.full(batch_size, window_samples)
        if self.spec.tail == "pad":
            valid[-1] = max(window_samples // 2, self.spec.min_input_samples)
        self._pool_all(silence, valid, self.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        fault_point("embed")
        wall_start, started = time.time(), time.perf_counter()
        self._model_s = 0.0
        is_window = batch["window_index"] >= 0
        parts = [self._report_rows(batch)]
        if is_window.any():  # the report rows' audio (zeros) is left where it lies
            parts.extend(self._embed_rows(batch, None if is_window.all()
                                          else np.flatnonzero(is_window)))
        busy = time.perf_counter() - started
        timing = {"type": "timing", "actor": self.actor_id, "start": wall_start,
                  "end": wall_start + busy, "busy_s": busy, "model_s": self._model_s,
                  "windows": int(is_window.sum()), "batches": 1}
        parts.append(_meta_row(json.dumps(timing)))
        out = pa.concat_tables(parts)
        log.debug("embedded %d windows (+%d reports) in %.3fs (model %.3fs)",
                  int(is_window.sum()), int((~is_window).sum()), busy, self._model_s)
        return out

    def _report_rows(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The decode reports among ``batch``'s rows (on its own rows or on windows), passed
        on to the write stage as rows of their own."""
        has = np.array([bool(m) for m in batch["meta"]], dtype=bool)
        return _meta_row(*batch["meta"][has].tolist(), shards=batch["shard"][has].tolist(),
                         recording_ids=batch["recording_id"][has].tolist())

    def _embed_rows(self, batch: dict[str, np.ndarray], take: np.ndarray | None) -> list[pa.Table]:
        """Embedding rows for ``batch``'s windows (its rows ``take``, all where None). Their
        audio is selected where it is copied into the staging buffer (:meth:`_staged`): a
        batch holding a recording's report row, as most do in an archive of short clips,
        is not copied once more first (on a GPU, a batch of 256 windows is 82 MB)."""
        audio = batch["audio"]
        rows = batch if take is None else {k: v[take] for k, v in batch.items() if k != "audio"}
        picked = np.arange(len(audio)) if take is None else take
        pooled = self._pool_all(audio, rows["valid_samples"], self.precision, take)
        finite = _finite_rows(pooled)
        if not finite.all() and self._retry_in_fp32:
            retry = self._pool_all(audio, rows["valid_samples"][~finite], "fp32", picked[~finite])
            for layer, vectors in retry.items():
                pooled[layer][~finite] = vectors
            finite = _finite_rows(pooled)
        out = [self._layer_rows(rows, finite, layer, vectors[finite])
               for layer, vectors in pooled.items()]
        if not finite.all():
            out.append(self._dropped_rows(rows, ~finite))
        return out

    def _pool_all(self, audio: np.ndarray, valid: np.ndarray, precision: str,
                  take: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """Pooled float32 ``[n, D_layer]`` per layer for the windows ``audio[take]`` (all of
        ``audio``'s rows where None), whose valid samples are ``valid``."""
        size = audio.shape[1]
        results: dict[int, list[np.ndarray]] = {layer: [] for layer in self.spec.layers}
        order: list[np.ndarray] = []
        if self.spec.tail == "keep":
            lengths = np.maximum(valid, self.spec.min_input_samples).clip(max=size)
        else:
            lengths = np.full(len(valid), size)
        for length in np.unique(lengths):
            idx = np.flatnonzero(lengths == length)
            order.append(idx)
            if len(idx) == len(audio) and take is None:
                rows = None  # every row, as it lies
            else:
                rows = idx if take is None else take[idx]
            chunk = self._forward(audio, rows, valid[idx], int(length), precision)
            for layer, vectors in chunk.items():
                results[layer].append(vectors)
        inverse = np.argsort(np.concatenate(order), kind="stable")
        return {layer: np.concatenate(parts)[inverse] for layer, parts in results.items()}

    def _forward(self, audio: np.ndarray, rows: np.ndarray | None, valid: np.ndarray,
                 length: int, precision: str) -> dict[int, np.ndarray]:
        """The pooled layers of the first ``length`` samples of ``audio``'s rows ``rows``
        (every row where None)."""
        import torch

        from pipeline.models import pool

        x = self._staged(audio, rows, length)
        # Looked up on the host: read from the device, it would wait for the copies just
        # queued, so the model's first kernels could not be queued while the batch is copied.
        padded = bool((valid < length).any())
        v = torch.from_numpy(np.minimum(valid, length).astype(np.int64))
        if self.device != "cpu":
            x = x.to(self.device, non_blocking=True)
            v = v.to(self.device, non_blocking=True)
        started = time.perf_counter()
        with torch.inference_mode(), self.backbone.autocast(precision):
            feats = self.backbone.extract(x, v if padded else None, self.spec.layers)
            out = {layer: pool(f.tokens, f.mask, self.spec.pooling).float().cpu().numpy()
                   for layer, f in feats.items()}
        self._model_s += time.perf_counter() - started
        return out

    def _staged(self, audio: np.ndarray, rows: np.ndarray | None, length: int) -> Any:
        """The first ``length`` samples of ``audio``'s rows ``rows`` (all where None), copied
        into this actor's one reusable host buffer (pinned on a GPU).

        The batch Ray hands over is a read-only view on the object store; this is its only
        copy on the way to the model, the rows picked as they are copied (report rows left
        out, a window length's group of a ``tail: keep`` batch): contiguous, writable (models
        may work in place), and on a GPU ready for an asynchronous copy to the device.
        Reusing it is safe because :meth:`_forward` waits for its results (``.cpu()``), so
        the device has read the buffer before the next batch overwrites it.
        """
        import torch

        n = len(audio) if rows is None else len(rows)
        if self._staging is None or self._staging.numel() < n * length:
            self._staging = torch.empty(n * length, dtype=torch.float32,
                                        pin_memory=self.device != "cpu")
        x = self._staging[: n * length].view(n, length)
        if rows is None:
            np.copyto(x.numpy(), audio[:, :length], casting="same_kind")
        elif audio.dtype == np.float32:  # gathered straight into the buffer ("clip": unbuffered)
            np.take(audio[:, :length], rows, axis=0, out=x.numpy(), mode="clip")
        else:
            np.copyto(x.numpy(), audio[rows, :length], casting="same_kind")
        return x

    def _layer_rows(self, rows: dict[str, np.ndarray], keep: np.ndarray, layer: int,
                    vectors: np.ndarray) -> pa.Table:
        n, dim = vectors.shape
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
        return _stage_rows(
            rows, keep, meta=[""] * n,
            valid_s=pa.array(rows["valid_samples"][keep] / self.spec.sample_rate_hz, pa.float32()),
            layer=pa.array(np.full(n, layer, np.int16)),
            embedding=pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32()),
                                               type=STAGE_SCHEMA.field("embedding").type))

    def _dropped_rows(self, rows: dict[str, np.ndarray], dropped: np.ndarray) -> pa.Table:
        """Report rows for windows whose embedding was not finite (after the fp32 retry, where
        there is one: bf16 and fp16)."""
        by_recording: dict[tuple[str, str], list[list[int]]] = {}
        for shard, rid, ch, wi in zip(rows["shard"][dropped], rows["recording_id"][dropped],
                                      rows["channel"][dropped], rows["window_index"][dropped],
                                      strict=True):
            by_recording.setdefault((str(shard), str(rid)), []).append([int(ch), int(wi)])
        log.warning("dropping %d windows with non-finite embeddings", int(dropped.sum()))
        metas = [json.dumps({"type": "dropped", "recording_id": rid, "windows": wins,
                             "reason": "non-finite embedding"})
                 for (_, rid), wins in by_recording.items()]
        return _meta_row(*metas, shards=[s for s, _ in by_recording],
                         recording_ids=[r for _, r in by_recording])


def _finite_rows(pooled: dict[int, np.ndarray]) -> np.ndarray:
    """Which windows have a finite embedding in every layer."""
    return np.logical_and.reduce([np.isfinite(v).all(axis=1) for v in pooled.values()])


def _stage_rows(rows: dict[str, np.ndarray], keep: np.ndarray, *, meta: list[str],
                valid_s: pa.Array | None = None, layer: pa.Array | None = None,
                embedding: pa.Array | None = None) -> pa.Table:
    """``rows[keep]`` as the rows the embed stage passes to the write stage
    (``sink.STAGE_SCHEMA``): an embedding per layer, or, without one, a report for the
    driver in ``meta``."""
    n = len(meta)
    return pa.table({
        "shard": pa.array(rows["shard"][keep].tolist(), pa.string()),
        "recording_id": pa.array(rows["recording_id"][keep].tolist(), pa.string()),
        "channel": pa.array(rows["channel"][keep], pa.int16()),
        "window_index": pa.array(rows["window_index"][keep], pa.int32()),
        "start_s": pa.array(rows["start_s"][keep], pa.float64()),
        "end_s": pa.array(rows["end_s"][keep], pa.float64()),
        "valid_s": valid_s if valid_s is not None else pa.nulls(n, pa.float32()),
        "layer": layer if layer is not None else pa.nulls(n, pa.int16()),
        "embedding": (embedding if embedding is not None
                      else pa.nulls(n, STAGE_SCHEMA.field("embedding").type)),
        "meta": pa.array(meta, pa.string()),
    }, schema=STAGE_SCHEMA)


def _meta_row(*metas: str, shards: list[str] | None = None,
              recording_ids: list[str] | None = None) -> pa.Table:
    """Stage rows that carry only ``meta`` (a report for the driver, not an embedding).

    Timing rows belong to no shard and no recording (both empty).
    """
    n = len(metas)
    return _stage_rows({"shard": np.array(shards or [""] * n, dtype=object),
                        "recording_id": np.array(recording_ids or [""] * n, dtype=object),
                        "channel": np.full(n, -1, np.int16),
                        "window_index": np.full(n, -1, np.int32),
                        "start_s": np.zeros(n), "end_s": np.zeros(n)},
                       np.ones(n, dtype=bool), meta=list(metas))
