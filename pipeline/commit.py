"""Committing shards, the driver's side of exactly-once: which shards are complete, the
threads that commit them, and what one shard's commit writes.

The write tasks return what they wrote of each shard (:class:`~pipeline.sink.WriteReturn`:
files, recording reports, partial pools); the driver folds each into its
:class:`ShardBook` (:func:`take_write_return`), and a shard whose every recording has its
rows written and its report in is complete: it goes to the :class:`Committer`, whose
threads commit it while the driver reads on. A commit (:meth:`ShardCommit.commit`)
settles each recording's outcome and builds the shard's recordings and errors rows
(:func:`shard_rows`), stages their files beside the windows files the write tasks staged,
publishes them all, and writes the shard's marker last (:mod:`pipeline.layout`): what a
commit that stops before its marker leaves, the next run's recovery removes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa

from pipeline import layout as layout_mod
from pipeline import storage
from pipeline.config import JobConfig
from pipeline.errors import LIMIT_ERRORS, JobAborted, LeaseLostError
from pipeline.faults import fault_point
from pipeline.layout import OutputLayout
from pipeline.lease import NamespaceLease
from pipeline.provenance import JobProvenance, Variant, utc_now
from pipeline.sink import (
    DuplicateRows,
    RecordingReport,
    ShardProgress,
    WriteReturn,
    errors_schema,
    merge_timing,
    recordings_schema,
    reduce_partials,
    rows_to_table,
    windows_kept,
    write_parquet,
)
from pipeline.sources import Listing, SourceItem
from pipeline.summary import ShardOutcome, Written

log = logging.getLogger(__name__)

# Shards the driver commits at once (see Committer).
COMMIT_THREADS = 8


@dataclasses.dataclass
class ShardBook:
    """The driver's shards while the pipeline runs: ``pending`` (waiting for rows or
    reports), ``complete`` (handed to the committer) and ``refused`` (rows that reached the
    driver twice, with why: never committed)."""

    pending: dict[str, ShardProgress]
    complete: set[str] = dataclasses.field(default_factory=set)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)

    def uncommitted(self) -> str:
        """What left shards uncommitted when the pipeline ended, in words; empty if none."""
        said = []
        if self.pending:
            waiting = sorted(r for p in self.pending.values() for r in p.waiting)
            said.append(f"{len(self.pending)} shard(s) incomplete (no rows or report for "
                        f"{len(waiting)} recordings, e.g. {waiting[:3]})")
        if self.refused:
            said.append(f"{len(self.refused)} shard(s) refused for rows that reached the "
                        f"driver twice (e.g. {next(iter(self.refused.values()))})")
        return " and ".join(said)


def take_write_return(ret: WriteReturn, book: ShardBook, written: Written,
                      per_actor: dict[str, dict[str, float]]) -> ShardProgress | None:
    """Fold what one write task returned into its actors' timing, its shard's progress and
    the counts of what is written; the shard, moved from ``book.pending`` to
    ``book.complete``, once it is complete (every recording's rows written, every report in).

    Rows that reach the driver twice (a retried decode task whose second attempt cut its
    blocks otherwise than the first) cost their shard, never the job: a shard whose counts
    overshoot (:class:`DuplicateRows`) is refused, never committed, and its later rows
    dropped; rows for a shard already complete are extras by count and are dropped (its
    staged copies are never published)."""
    for actor, timing in ret.timing.items():
        merge_timing(per_actor, {"actor": actor, **timing})
    if not ret.shard or ret.shard in book.refused:
        return None
    if ret.shard in book.complete:
        log.error("rows for shard %s after it was complete, so rows that reached the driver "
                  "twice: dropped (the shard is committed with each row once)", ret.shard)
        return None
    progress = book.pending.get(ret.shard)
    if progress is None:
        raise RuntimeError(f"rows for shard {ret.shard}, of no shard of this run; stopping")
    try:
        settled = progress.add(ret)
    except DuplicateRows as err:
        log.error("%s: nothing of the shard is committed, the other shards go on, and the "
                  "next run redoes it", err)
        book.refused[ret.shard] = str(err)
        del book.pending[ret.shard]
        return None
    for rid in settled:
        report = progress.reports[rid]
        written.recordings += 1
        written.audio_s += float(report.get("duration_s", 0.0))
        written.bytes_read += int(report.get("bytes_read", 0))
    if not progress.complete:
        return None
    del book.pending[ret.shard]
    book.complete.add(ret.shard)
    return progress


class CommitStopped(Exception):
    """A commit left unfinished because the job is stopping."""


class Committer:
    """Commits complete shards on threads while the driver reads on.

    On a bucket a commit is a dozen requests or more (files, copies, deletes, the marker,
    lease reads): one at a time, at 50 ms a request, they capped a job at a shard or two a
    second. Up to ``COMMIT_THREADS`` run at once and ``2 * COMMIT_THREADS`` wait, beyond
    which the driver waits too. ``record`` (the summary and its log line) runs the moment a
    commit ends, on its thread, so a pipeline stalled waiting for a lost node still says
    what it committed; ``check`` (the failure budget) and a commit's error reach the driver's
    thread at its next :meth:`collect`.

    How a run that stops leaves them (:meth:`close`): after an error of the pipeline, every
    complete shard is still committed, as it would have been one at a time; after an
    interrupt, a lost lease, the failure budget or a failed commit, none is started and
    those under way stop before publishing or before their marker (the next run's recovery
    removes what they left), unless already past it. Either way the summary counts every
    shard that committed.
    """

    def __init__(self, commit: Callable[[ShardProgress, threading.Event], ShardOutcome],
                 record: Callable[[ShardOutcome], None], check: Callable[[], None]) -> None:
        self._commit, self._record, self._check = commit, record, check
        self._pool = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="commit")
        self._futures: dict[Future[ShardOutcome], str] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def submit(self, progress: ShardProgress) -> None:
        while len(self._futures) >= 3 * COMMIT_THREADS:
            self.collect(wait="first")
        future = self._pool.submit(self._commit_and_record, progress)
        self._futures[future] = progress.shard_id

    def _commit_and_record(self, progress: ShardProgress) -> ShardOutcome:
        """On a commit thread: commit, then record it, before anyone can see it done."""
        outcome = self._commit(progress, self.stopping)
        with self._lock:
            self._record(outcome)
        return outcome

    def collect(self, wait: Literal["first", "all"] | None = None) -> None:
        """Take the commits finished by now (``wait``: until at least one has, or all
        have); raises a commit's error, or the failure budget's."""
        if not self._futures:
            return
        done, _ = futures_wait(self._futures, timeout=0 if wait is None else None,
                               return_when=FIRST_COMPLETED if wait == "first" else ALL_COMPLETED)
        for future in done:
            del self._futures[future]
            if future.exception() is not None:
                self.stopping.set()
                future.result()  # raises it
        if done:
            with self._lock:
                self._check()

    def close(self, err: BaseException | None) -> None:
        """Finish as the class says, for a run ending with ``err`` (None: all collected)."""
        if err is not None and (not isinstance(err, Exception)
                                or isinstance(err, JobAborted | LeaseLostError)):
            self.stopping.set()
        try:
            self._pool.shutdown(wait=True, cancel_futures=self.stopping.is_set())
        except BaseException:  # interrupted while waiting: stop the rest, as for an interrupt
            self.stopping.set()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._record_finished()
            raise
        self._record_finished()

    def _record_finished(self) -> None:
        """Log the commits that failed after the driver stopped collecting (those that
        succeeded recorded themselves)."""
        for future, shard in self._futures.items():
            if future.cancelled():
                continue
            failure = future.exception()
            if failure is not None and not isinstance(failure, CommitStopped):
                log.error("shard %s was not committed: %s: %s", shard,
                          type(failure).__name__, failure)
        self._futures.clear()


@dataclasses.dataclass(frozen=True)
class ShardCommit:
    """Commits a complete shard (:meth:`commit`), with what that needs of its run, all
    settled by ``EmbeddingJob.prepare()``."""

    cfg: JobConfig
    job_id: str
    variant: Variant
    layout: OutputLayout
    lease: NamespaceLease  # checked before publishing and before the marker
    listing: Listing  # its manifest's columns (extras) reach every row
    provenance: JobProvenance
    parquet_metadata: dict[bytes, bytes]
    tables: list[str]  # the tables this run writes, which the marker lists
    row_group_rows: int
    layers: tuple[int, ...]
    attempts: Mapping[str, int]  # recording id -> runs that met an error not its own on it
    sources_table: Callable[[Sequence[SourceItem]], pa.Table]  # recordings' source columns

    def commit(self, progress: ShardProgress, items: Sequence[SourceItem], started: float,
               stopping: threading.Event) -> ShardOutcome:
        """Write a complete shard's recordings and errors tables, publish, mark committed
        (on a commit thread: see :class:`Committer`; ``stopping`` set, it stops before
        publishing or before the marker, as a killed driver would, for the next run's
        recovery)."""
        shard_id = progress.shard_id
        pooled = reduce_partials(progress.partials, self.cfg.output.recording_pooling)
        rec_rows, err_rows, outcome, settled = shard_rows(
            shard_id, items, progress.reports, progress.dropped, pooled, cfg=self.cfg,
            layers=self.layers, attempts=self.attempts)
        staged: dict[str, list[str]] = {"windows": [p for p, _ in progress.files]}
        file_rows = dict(progress.files)
        for table_name, path, rows in self._stage_tables(shard_id, items, rec_rows, err_rows):
            staged[table_name] = [path]
            file_rows[path] = rows
        o = self.cfg.output
        self._check_may_commit(stopping)
        fault_point("before_publish")
        staged_paths = {t: [storage.url_to_fs(p, o.storage_options)[1] for p in ps]
                        for t, ps in staged.items()}
        rows_by_path = {storage.url_to_fs(p, o.storage_options)[1]: n for p, n in file_rows.items()}
        moved = layout_mod.publish(self.layout, shard_id, staged_paths)
        fault_point("before_commit")
        final_rows = {table: [{"path": self.layout.uri(dst), "rows": rows_by_path[src]}
                              for src, dst in pairs]
                      for table, pairs in moved.items()}
        outcome.committed_after_s = round(time.perf_counter() - started, 3)
        # Publishing can be many copies on an object store: the lease may have been taken
        # over meanwhile, and the new holder's recovery deletes unmarked files.
        self._check_may_commit(stopping)
        layout_mod.commit(self.layout, {
            "shard": shard_id,
            "job_id": self.job_id,
            "variant": self.variant.id,
            "committed_at": utc_now(),
            "recordings": [{"recording_id": i.recording_id, "source_uri": i.uri,
                            **settled[i.recording_id]} for i in items],
            "tables": self.tables,
            "files": final_rows,
            "counts": {k: v for k, v in outcome.__dict__.items() if k != "shard_id"},
        })
        fault_point("committed")
        return outcome

    def _stage_tables(self, shard_id: str, items: Sequence[SourceItem],
                      rec_rows: list[dict[str, Any]], err_rows: list[dict[str, Any]]
                      ) -> list[tuple[str, str, int]]:
        """Write a shard's recordings and errors files into its staging folder (the write
        tasks staged its windows files): (table, path, rows) of each written."""
        extras = self.listing.extras.schema if self.listing.extras else None
        meta, o = self.parquet_metadata, self.cfg.output
        staging = self.layout.uri(self.layout.staging_dir(shard_id))
        sources = self.sources_table(items)
        written = []
        for table_name, rows, schema in (("recordings", rec_rows, recordings_schema(extras, meta)),
                                         ("errors", err_rows, errors_schema(extras, meta))):
            if not rows or (table_name == "recordings" and not o.recordings):
                continue
            table = rows_to_table(rows, schema, sources, self.provenance.row_columns())
            path = storage.join(staging, table_name, "part-000000.parquet")
            write_parquet(table, path, o.storage_options, self.row_group_rows, o.compression)
            written.append((table_name, path, table.num_rows))
        return written

    def _check_may_commit(self, stopping: threading.Event) -> None:
        if stopping.is_set():
            raise CommitStopped("the job is stopping")
        self.lease.check()


class ShardRows(NamedTuple):
    """A complete shard's rows for the tables the driver writes, and what its marker records."""

    recordings: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    outcome: ShardOutcome
    settled: dict[str, dict[str, Any]]  # recording id -> its outcome (and error) in the marker


def _dropped_note(windows: int) -> str:
    return f"{windows} windows dropped: non-finite embedding"


def shard_rows(shard_id: str, items: Sequence[SourceItem], reports: Mapping[str, RecordingReport],
               dropped: Mapping[str, set[tuple[int, int]]],
               pooled: Mapping[tuple[str, int, int], tuple[int, np.ndarray]], *,
               cfg: JobConfig, layers: Sequence[int], attempts: Mapping[str, int]) -> ShardRows:
    """Turn reports + recording vectors (``reduce_partials``: mean or max over the kept
    windows) into recording and error rows, checking every count.

    Also returns what the commit marker records of each recording: its final
    ``outcome`` (``ok``, ``partial`` or ``error``), which can differ from its decode
    report's status (windows dropped as non-finite make it partial, all of them dropped
    an error), and for a failed or cut-short one the ``error_type`` that stopped it and,
    when that was not the recording's fault, ``retry`` (see ``layout.recordings_to_retry``).

    ``layers``: the layers each recording gets a row of; ``attempts``: recording id -> runs
    before this one that met an error not its own on it (``run.max_attempts``).
    """
    outcome = ShardOutcome(shard_id=shard_id, recordings=len(items))
    rec_rows: list[dict[str, Any]] = []
    err_rows: list[dict[str, Any]] = []
    settled: dict[str, dict[str, Any]] = {}
    for item in items:
        rid = item.recording_id
        report = reports.get(rid)
        if report is None:
            raise RuntimeError(f"shard {shard_id}: no report for {item.uri}; rows were lost")
        outcome.bytes_read += int(report.get("bytes_read", 0))
        if report["status"] == "error":
            err_rows.append({"recording_id": rid, "error_type": report["error_type"],
                             "message": report["message"]})
            outcome.failed += 1
            outcome.error_types[report["error_type"]] += 1
            settled[rid] = _failure_mark(item, report, attempts)
            continue
        lost = dropped.get(rid, set())
        windows = windows_kept(report, lost)
        recording_rows = _recording_rows(shard_id, item, report, lost, windows, pooled, layers)
        if not recording_rows:
            err_rows.append({"recording_id": rid, "error_type": "NonFiniteEmbedding",
                             "message": "every window's embedding was non-finite"})
            outcome.failed += 1
            outcome.error_types["NonFiniteEmbedding"] += 1
            settled[rid] = {"outcome": "error", "error_type": "NonFiniteEmbedding"}
            continue
        problems = list(report.get("problems", []))
        if lost:
            problems.append(_dropped_note(len(lost)))
        rec_rows.extend(recording_rows)
        outcome.windows += sum(windows.values())
        outcome.audio_s += float(report["duration_s"])
        outcome.partial += bool(problems)
        outcome.embedded += not problems
        settled[rid] = {"outcome": "partial" if problems else "ok"}
        if report.get("stopped_by"):
            settled[rid].update(error_type=report["stopped_by"],
                                **_retry_mark(item, report, attempts))
    # What a rerun with these settings tries again (resume.Resumption.reopen_shards): the
    # summary promises no retry of an EmptyAudio, nor of one met in max_attempts runs.
    run = cfg.run
    if run.retry_transient_errors:
        outcome.retried = sum(layout_mod.to_retry(mark, run.max_attempts)
                              for mark in settled.values())
    return ShardRows(rec_rows, err_rows, outcome, settled)


def _failure_mark(item: SourceItem, report: RecordingReport, attempts: Mapping[str, int]
                  ) -> dict[str, Any]:
    """What a marker records of a recording that failed: its error type, whether a
    later run may try again, and for a refusal by the job's limits what was refused
    (see ``resume.Resumption.reopen_shards``)."""
    mark = {"outcome": "error", "error_type": report["error_type"],
            **_retry_mark(item, report, attempts)}
    if report["error_type"] in LIMIT_ERRORS:
        mark["refused"] = {"sample_rate_hz": int(report.get("source_sample_rate_hz") or 0),
                           "channels": int(report.get("source_channels") or 0)}
    return mark


def _recording_rows(shard_id: str, item: SourceItem, report: RecordingReport,
                    lost: set[tuple[int, int]], windows: Mapping[int, int],
                    pooled: Mapping[tuple[str, int, int], tuple[int, np.ndarray]],
                    layers: Sequence[int]) -> list[dict[str, Any]]:
    """One row per channel and layer of a recording that embedded (none for a channel
    that lost every window), each pooled over exactly the windows kept, or the commit is
    refused. A channel's status is its own: the recording's problems, its windows
    dropped, and which other channels have no rows (they would vanish without a word)."""
    lost_on = collections.Counter(ch for ch, _ in lost)
    emptied = [ch for ch, kept in sorted(windows.items()) if not kept and lost_on[ch]]
    rows = []
    for ch, kept in sorted(windows.items()):
        detail = list(report.get("problems", []))
        if lost_on[ch]:
            detail.append(_dropped_note(lost_on[ch]))
        if others := [c for c in emptied if c != ch]:
            detail.append(f"channel {', '.join(map(str, others))}: every window's "
                          "embedding was non-finite (no rows)")
        for layer in layers:
            count, vector = pooled.get((item.recording_id, ch, layer), (0, None))
            if count != kept:
                raise RuntimeError(
                    f"shard {shard_id}: {item.uri} channel {ch} layer {layer} has "
                    f"{count} window rows, expected {kept}; refusing to commit")
            if kept == 0:
                continue
            rows.append({
                "recording_id": item.recording_id, "channel": ch, "layer": layer,
                "duration_s": report["duration_s"],
                "source_sample_rate_hz": report["source_sample_rate_hz"],
                "source_channels": report["source_channels"], "num_windows": kept,
                "embedding": vector, "status": "partial" if detail else "ok",
                "status_detail": "; ".join(detail),
            })
    return rows


def _retry_mark(item: SourceItem, report: RecordingReport, attempts: Mapping[str, int]
                ) -> dict[str, Any]:
    """What a marker records of a failure that was not the recording's own (a storage
    error, an unexpected exception): a rerun reopens its shard while ``attempts``, the
    runs in a row that met one, is below ``run.max_attempts`` (``layout.recordings_to_retry``)."""
    if not report.get("transient"):
        return {}
    return {"retry": True, "attempts": attempts.get(item.recording_id, 0) + 1}
