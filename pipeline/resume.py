"""Resuming into an output namespace: what its committed shards already settle, which of
them this run must reopen, and whether this run's rows may join theirs.

A rerun lists its inputs again and embeds only the listed recordings no commit marker
settles (``layout.settled_among``). Before that, under the namespace's lease, it

- finishes what a crashed run left half done (``layout.finish_carves``, ``layout.recover``);
- refuses manifest columns that would give one table two schemas
  (:meth:`Resumption.check_manifest_columns`);
- reopens the committed shards holding a recording it must embed again (a transient error,
  a table turned on, a changed object, a limit relaxed), first carving the rows it keeps
  into a shard of their own (:meth:`Resumption.reopen_shards`).

So no recording is done twice, none is lost, and no row is duplicated.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout as layout_mod
from pipeline import redact, storage
from pipeline.config import JobConfig
from pipeline.errors import ARCHIVED_ERRORS, ConfigError
from pipeline.layout import OutputLayout
from pipeline.provenance import utc_now
from pipeline.sink import (
    as_stored,
    errors_schema,
    parquet_bytes,
    read_parquet_bytes,
    recordings_schema,
    windows_schema,
)
from pipeline.sources import Listing, SourceItem, portable_type, read_manifest_text

log = logging.getLogger(__name__)

# Reads at once when checking whether archived recordings were restored (run.recheck_archived).
_PROBE_THREADS = 32
# Reopened shards carved side by side (each a few requests per file, or a download where a
# file mixes rows kept and redone), as many as the driver commits shards at once
# (job.COMMIT_THREADS).
CARVE_THREADS = 8
# Range requests reading a committed file's recording ids: its footer, and that column's
# chunk in each row group (a few KB each, beside MBs of embeddings).
_ID_BLOCK_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class Remaining:
    """What a run has left to do once the namespace's committed shards are read."""

    listing: Listing  # its manifest columns cast to the types the namespace stores
    todo: list[SourceItem]  # listed recordings no committed shard holds
    already_done: int  # listed recordings a committed shard holds
    already_failed: int  # of those: committed as errors
    # The namespace's committed shards as the run found them, before any was reopened: a
    # variant in use though none of them holds a listed recording (another prefix's, or
    # every one reopened for a changed object).
    committed_before: int
    # recording id -> runs that met an error not its own on it, for the reopened shards'
    # recordings (carried into their new markers: run.max_attempts).
    attempts: dict[str, int]


def _kindred(stored: pa.DataType, given: pa.DataType) -> bool:
    """Types between which a checked cast carries every value over exactly or refuses:
    numbers (integers and floats of any width), and times of one zone in any unit."""
    if pa.types.is_timestamp(stored) or pa.types.is_timestamp(given):
        return (pa.types.is_timestamp(stored) and pa.types.is_timestamp(given)
                and stored.tz == given.tz)
    if pa.types.is_floating(stored) and pa.types.is_floating(given):
        return stored.bit_width >= given.bit_width  # a narrower float rounds, unchecked
    numeric = (pa.types.is_integer, pa.types.is_floating)
    return any(kind(stored) for kind in numeric) and any(kind(given) for kind in numeric)


def _recording_ids(fs: Any, path: str) -> pa.ChunkedArray:
    """The ``recording_id`` column of one committed file, fetched by range requests: the
    footer and that column's chunks, not the embeddings beside them. A read that failed
    raises its own error (``RangeReader.error``), not the truncated file pyarrow saw."""
    reader = storage.RangeReader(fs, path, block_bytes=_ID_BLOCK_BYTES)
    try:
        column = read_parquet_bytes(reader, columns=["recording_id"])["recording_id"]
    except Exception:
        if reader.error is not None:
            raise reader.error from None
        raise
    if reader.error is not None:
        raise reader.error
    return column


@dataclasses.dataclass
class Resumption:
    """One run's view of the namespace it writes into; :meth:`plan` does it all.

    Call it under the namespace's lease: it reads the markers, writes carved shards and
    uncommits reopened ones.
    """

    cfg: JobConfig
    layout: OutputLayout
    listing: Listing
    job_id: str
    model_name: str  # for messages
    variant_id: str
    tables: Sequence[str]  # the tables this run writes
    limits: Mapping[str, Any]  # the audio limits a recording can be refused by
    row_group_rows: int  # for the carved shards' files
    attempts: dict[str, int] = dataclasses.field(default_factory=dict)

    def plan(self) -> Remaining:
        """Read the markers, finish what a crashed run left, reopen the shards to redo, and
        return the listed recordings no marker settles."""
        markers = layout_mod.committed_shards(self.layout)
        before = dict(markers)  # finish_carves drops the markers of the shards it uncommits
        carved = layout_mod.finish_carves(self.layout, markers)
        self.check_manifest_columns(markers)
        self.record_columns()
        reopened = self.reopen_shards(markers)
        # A carve-out a crash interrupted: the crashed run had reopened the source shard for
        # the recordings it did not carve, which this run redoes; their counts of runs that
        # met an error (run.max_attempts) are in the source's marker alone.
        self._carry_attempts(before[shard] for shard in carved)
        layout_mod.recover(self.layout, markers, reopened, carved)
        items = self.listing.items
        ids = pa.array([i.recording_id for i in items], pa.string())
        done = layout_mod.settled_among(ids, markers)
        todo = [i for i, settled in zip(items, done, strict=True) if not settled]
        return Remaining(listing=self.listing, todo=todo, already_done=len(items) - len(todo),
                         already_failed=sum(layout_mod.settled_among(ids, markers, "error")),
                         committed_before=len(before), attempts=self.attempts)

    def _carry_attempts(self, markers: Iterable[Mapping[str, Any]]) -> None:
        """Note, for the run that redoes them, how many runs met an error not its own on
        each retried recording of ``markers`` (an id in two shards, as hand-made markers
        may have it: the higher count)."""
        for marker in markers:
            for rec in layout_mod.noted(marker):
                if layout_mod.to_retry(rec):
                    rid = rec["recording_id"]
                    self.attempts[rid] = max(self.attempts.get(rid, 0), layout_mod.attempts(rec))

    def check_manifest_columns(self, markers: Mapping[str, Mapping[str, Any]]) -> None:
        """Refuse a run whose manifest columns differ from those the namespace's rows carry.

        Every row carries the manifest's columns; files of one namespace with a column of
        two types (``site`` int64 in one run, ``A1`` in the next), or with different
        columns, break the readers the README gives (pyarrow.dataset fails to cast, DuckDB
        drops a column). So this run's columns take the namespace's types where that loses
        nothing: a column with no value in this run (left empty) takes any type, values
        join a column stored as text as the manifest spells them (:meth:`_spelled`; one
        empty in the first run is stored as text), a column an earlier version stored in
        a type it no longer writes (nanosecond times, unsigned integers:
        ``sources.portable_type``) keeps that type, and numbers
        and times of one zone take the stored width and unit when every value fits it
        exactly (a manifest DuckDB wrote has microsecond times where a CSV's were stored
        in milliseconds; 3.0 joins an integer column, 3.5 does not). The columns are
        then put in the stored order.

        Raises:
            ConfigError: the columns differ (field ``input.manifest``).
        """
        theirs = self._committed_extras(markers)
        if theirs is None:
            return
        extras = self.listing.extras
        mine = {f.name: f.type for f in as_stored(extras.schema)} if extras is not None else {}
        if extras is not None and theirs.keys() == mine.keys():
            spelled = self._spelled(extras, theirs, mine)
            for name, stored in theirs.items():
                column = extras.column(name)
                if mine[name] == stored or not (column.null_count == len(column)
                                                or pa.types.is_string(stored)
                                                or portable_type(stored) == mine[name]
                                                or _kindred(stored, mine[name])):
                    continue
                if name in spelled:  # text, as the manifest gives it
                    extras = extras.set_column(extras.schema.get_field_index(name), name,
                                               spelled[name])
                    continue
                try:  # checked: a value the stored type cannot hold exactly is refused below
                    cast = column.cast(stored)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    continue  # refused below, naming both
                extras = extras.set_column(extras.schema.get_field_index(name), name, cast)
            # In the stored order too: BigQuery loads files of one table only if their
            # columns come in one order (a manifest whose header was reordered).
            extras = extras.select(list(theirs))
            self.listing = dataclasses.replace(self.listing, extras=extras)
            mine = {f.name: f.type for f in as_stored(extras.schema)}
        if theirs == mine:
            return

        def shown(columns: Mapping[str, pa.DataType]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in columns.items()) or "none"

        raise ConfigError(
            f"the rows already in {redact.uri(self.layout.root)} (model "
            f"{self.model_name}, variant {self.variant_id}) carry the manifest columns "
            f"[{shown(theirs)}]; this run's would carry [{shown(mine)}]. One namespace needs "
            "one schema for its readers: give the manifest the same columns and types, or "
            "write to another output.uri", "input.manifest")

    def _spelled(self, extras: pa.Table, theirs: Mapping[str, pa.DataType],
                 mine: Mapping[str, pa.DataType]) -> dict[str, pa.ChunkedArray]:
        """The manifest's own text of the columns whose values join a column stored as text
        though this run inferred another type for them (a first manifest had ``unknown``
        among its times, this one has times alone): cast, ``2026-05-01T05:10:00Z`` would be
        stored as ``2026-05-01 05:10:00Z`` beside the first run's spelling, and the code
        ``1.10`` as ``1.1``. Read again from the manifest (:func:`sources.read_manifest_text`),
        only then, and only where its rows are still those listed (else: the cast)."""
        names = [name for name, stored in theirs.items()
                 if pa.types.is_string(stored) and mine[name] != stored
                 and extras.column(name).null_count < extras.num_rows]
        if not names or not self.cfg.input.manifest:
            return {}
        text = read_manifest_text(self.cfg.input.manifest, self.cfg.input.storage_options, names)
        return {name: column for name, column in text.items() if len(column) == extras.num_rows}

    def record_columns(self) -> None:
        """Keep ``_variants/<id>.columns.json`` (the manifest columns this namespace's rows
        carry, as stored: checked against them above), and warn of a column another
        namespace of the same output root stores in another type: each namespace reads
        alone, but the root read as one table does not (Spark's ``mergeSchema`` and Polars
        refuse it, DuckDB's ``union_by_name`` makes it text). Outputs written before this
        record existed have none, and are not compared."""
        extras = self.listing.extras
        mine = ({f.name: str(f.type) for f in as_stored(extras.schema)}
                if extras is not None else {})
        fs, path = self.layout.fs, self.layout.columns_path()
        ours = {"model": self.model_name, "variant": self.variant_id, "columns": mine}
        others = []
        for other in storage.list_files(fs, storage.join(self.layout.root_path, "_variants")):
            if not other.endswith(".columns.json") or other == path:
                continue
            try:
                record = layout_mod.read_json(fs, other)
            except (OSError, ValueError):
                continue  # written by hand, or half: a warning is not worth failing for
            if isinstance(record, dict) and isinstance(record.get("columns"), dict):
                others.append(record)
        try:
            stored = layout_mod.read_json(fs, path) if storage.exists(fs, path) else None
        except ValueError:
            stored = None
        if stored != ours:
            layout_mod.write_json(fs, path, ours)
        for name, kind in mine.items():
            clash = [o for o in others if o["columns"].get(name, kind) != kind]
            if clash:
                log.warning(
                    "manifest column %r is %s here (model %s, variant %s) but %s in %d other "
                    "namespace(s) of %s (first: model %s, variant %s): read each variant's "
                    "folder alone, or give the column one type in every manifest (Spark's "
                    "mergeSchema and Polars refuse the whole root, DuckDB's union_by_name "
                    "makes it text)", name, kind, self.model_name, self.variant_id,
                    clash[0]["columns"][name], len(clash), redact.uri(self.layout.root),
                    clash[0].get("model"), clash[0].get("variant"))

    def _committed_extras(self, markers: Mapping[str, Mapping[str, Any]]
                          ) -> dict[str, pa.DataType] | None:
        """The manifest columns of a committed file (its footer), or ``None`` if there is
        none (no shard yet) or the first three are unreadable (moved or deleted, which
        ``inspect`` reports): three reads at most, however many files are gone, and then the
        check is skipped, not failed."""
        committed = sorted((shard, table, f["path"]) for shard, marker in markers.items()
                           for table, files in marker.get("files", {}).items() for f in files)
        base = {"windows": windows_schema, "recordings": recordings_schema,
                "errors": errors_schema}
        for _, table, uri in committed[:3]:
            try:
                with self.layout.fs.open(self.layout.committed_file(table, uri), "rb") as fh:
                    schema = pq.read_schema(fh)
            except (OSError, ValueError):
                continue
            names = set(base[table](None).names)
            return {f.name: f.type for f in schema if f.name not in names}
        return None

    def reopen_shards(self, markers: dict[str, dict[str, Any]]) -> set[str]:
        """Uncommit the committed shards this run must embed again, those holding a listed
        recording that

        - failed, or stopped early, on an error that was not its own (storage, memory, a
          worker's environment), which a retry may get past: ``run.retry_transient_errors``,
          until ``run.max_attempts`` runs met it (one that keeps coming back is no outage);
        - lacks a table this run writes (``output.windows`` / ``output.recordings`` turned on
          since), which would otherwise never get its rows;
        - is an earlier version of an object listed now (``run.replace_changed_sources``),
          whose rows would otherwise sit beside the new version's;
        - was committed as ``ArchivedObject`` (an object in an archive storage class, not
          restored) and reads now, restored since: ``run.recheck_archived`` (one small read
          of each; those still archived stay settled, their shards untouched);
        - was refused by the job's own limits (sample rate, channels), which this run's
          admit: the limits decide whether it is embedded, not what it embeds to, so they
          are in no variant, and a run that admits it must not leave its error row standing.

        So no recording keeps an error row beside a later success, or two versions' rows.
        Only those recordings leave a reopened shard: its others keep their rows as written,
        moved to a shard of their own first (:meth:`_carve_out`), whatever this run's limits
        would say of them, except where a table was turned on (every listed recording of the
        shard is redone, for that table's rows; those no longer listed keep theirs). Returns
        the shards uncommitted."""
        run = self.cfg.run
        listed = {i.recording_id for i in self.listing.items}
        # Objects listed again, in another version; one listed as missing or unreadable
        # replaces nothing (its rows stay).
        listed_uris = ({i.uri for i in self.listing.items if not i.problem}
                       if run.replace_changed_sources else set())

        def stays(rec: Mapping[str, Any]) -> bool:  # this run cannot redo it: its rows stay
            return rec["recording_id"] not in listed and rec.get("source_uri") not in listed_uris

        # What each shard holds to redo (or, an earlier version, to drop): only those leave
        # it; its other recordings keep their rows, carved into a shard of their own first.
        retry = (layout_mod.recordings_to_retry(markers, run.max_attempts, listed)
                 if run.retry_transient_errors else {})
        wanted = set(self.tables)
        lacking = {shard: sorted(wanted - set(marker.get("tables", layout_mod.TABLES)))
                   for shard, marker in markers.items()}
        lacking = {shard: tables for shard, tables in lacking.items() if tables}

        def replaced(recordings: layout_mod.MarkerRecordings) -> set[str]:  # by a new version
            ids = recordings.ids.to_pylist()
            gone = [k for k, rid in enumerate(ids) if rid not in listed]
            uris = recordings.uris() if gone else []
            return {ids[k] for k in gone if uris[k] in listed_uris}

        changed = {shard: ids for shard, marker in markers.items()
                   if listed_uris and (ids := replaced(marker["recordings"]))}
        limits = self.limits
        restored = self._restored(markers) if run.recheck_archived else {}
        limited = {shard: ids for shard, marker in markers.items()
                   if (ids := {r["recording_id"] for r in layout_mod.noted(marker)
                               if r["recording_id"] in listed
                               and layout_mod.admitted_now(r, limits)})}
        named = {shard: ids for shard, marker in markers.items()
                 if (ids := {r["recording_id"] for r in layout_mod.noted(marker)
                             if r["recording_id"] in listed
                             and r.get("error_type") in run.retry_errors})}
        if named:
            log.warning("reopening %d committed shard(s) for %d recordings whose errors "
                        "run.retry_errors names (%s): unset it once they are done, or every "
                        "run redoes them", len(named), sum(map(len, named.values())),
                        ", ".join(run.retry_errors))
        self._say_unmatched(markers, listed)
        redo: dict[str, set[str]] = {}
        for reason in (retry, changed, limited, restored, named):
            for shard, ids in reason.items():
                redo.setdefault(shard, set()).update(ids)
        # A table turned on needs every listed recording's rows: those shards are redone whole.
        reopen = set(redo) | {shard for shard in lacking
                              if not all(stays(r) for r in markers[shard]["recordings"])}
        if run.retry_transient_errors:  # (a shard redone whole redoes those too)
            self._say_given_up(markers, reopen & set(lacking))
        self.attempts = {}
        self._carry_attempts(markers[shard] for shard in reopen)
        if not reopen:
            return reopen
        self._say_reopened(markers, reopen, {s: len(ids) for s, ids in retry.items()}, lacking,
                           {s: len(ids) for s, ids in changed.items()})
        if relimited := [s for s in reopen if s in limited]:
            log.warning("reopening %d committed shard(s) for %d recordings in them refused by "
                        "audio limits that this run's admit (%s)", len(relimited),
                        sum(len(limited[s]) for s in relimited),
                        ", ".join(f"{k}={v}" for k, v in limits.items()))
        plans: dict[str, tuple[set[str], str]] = {}
        for shard_id in sorted(reopen):
            recordings = markers[shard_id]["recordings"]
            if shard_id in lacking:
                keep, why = {r["recording_id"] for r in recordings if stays(r)}, "no longer listed"
            else:
                keep = {r["recording_id"] for r in recordings} - redo[shard_id]
                why = "not to be redone"
            plans[shard_id] = keep, why
        # Shards side by side (a 0.1% transient rate reopens most shards of a large run);
        # each carves, then uncommits its source, in that order, on a thread of the pool,
        # and only this thread changes ``markers``. The first failure fails the run, as one
        # carve after another did: the carves not started are dropped, those under way end.
        pool = ThreadPoolExecutor(CARVE_THREADS, thread_name_prefix="carve")
        try:
            futures = {shard_id: pool.submit(self._reopen, markers[shard_id], keep, why)
                       for shard_id, (keep, why) in plans.items()}
            for shard_id, future in futures.items():
                carved = future.result()
                if carved is not None:
                    markers[carved["shard"]] = layout_mod.compact(carved)
                del markers[shard_id]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return reopen

    def _restored(self, markers: Mapping[str, Mapping[str, Any]]) -> dict[str, set[str]]:
        """``shard -> ids`` of the listed recordings committed as ``ArchivedObject`` whose
        object reads now (restored, or copied to another storage class: the same ETag, so
        the same recording), found by reading its first byte, ``_PROBE_THREADS`` at a time.
        One still archived, or that cannot be read for another reason, stays settled: its
        shard is not reopened for it (a refusal or an outage would only swap one error row
        for another)."""
        items = {i.recording_id: i for i in self.listing.items if not i.problem}
        archived = [(shard, rec["recording_id"]) for shard, marker in markers.items()
                    for rec in layout_mod.noted(marker)
                    if rec.get("error_type") in ARCHIVED_ERRORS
                    and rec["recording_id"] in items]
        if not archived:
            return {}
        options = self.cfg.input.storage_options

        def reads(rid: str) -> BaseException | None:
            item = items[rid]
            try:
                fs, _ = storage.url_to_fs(item.uri, options)
                # An empty object takes no Range (S3 answers one with 416 InvalidRange);
                # an unknown size (-1) reads its first byte like any other.
                span = {"start": 0, "end": 1} if item.size_bytes else {}
                storage.retry(lambda: fs.cat_file(item.path, **span), what=f"read {item.uri}")
            except Exception as err:  # noqa: BLE001 - the reason it stays settled
                return err
            return None

        with ThreadPoolExecutor(_PROBE_THREADS) as pool:
            found = list(pool.map(reads, [rid for _, rid in archived]))
        out: dict[str, set[str]] = {}
        for (shard, rid), err in zip(archived, found, strict=True):
            if err is None:
                out.setdefault(shard, set()).add(rid)
        still = sum(err is not None and storage.archived(err) is not None for err in found)
        other = [err for err in found if err is not None and storage.archived(err) is None]
        back = sum(len(ids) for ids in out.values())
        log.info("%d recording(s) committed as ArchivedObject checked (run.recheck_archived): "
                 "%d read now and are embedded again, %d are still archived (restore them "
                 "first; their error rows stay)", len(archived), back, still)
        if other:
            log.warning("%d recording(s) committed as ArchivedObject could not be checked, "
                        "their error rows stay: %s", len(other),
                        storage.why(other[0], "input.storage_options"))
        return out

    def _reopen(self, marker: Mapping[str, Any], keep: set[str], why: str
                ) -> dict[str, Any] | None:
        """Carve ``keep``'s rows out of ``marker``'s shard (if any), then uncommit it.
        Returns the carved shard's marker, or ``None``."""
        carved = self._carve_out(marker, keep, why) if keep else None
        layout_mod.uncommit(self.layout, marker["shard"])
        return carved

    def _carve_out(self, marker: Mapping[str, Any], keep: set[str],
                   why: str = "no longer listed") -> dict[str, Any]:
        """Commit the rows of ``keep``'s recordings (not redone: not listed any more, or not
        what the shard is reopened for) as a shard of their own, before the shard holding
        them is uncommitted, so reopening a shard never drops the rows of objects that are
        gone, nor redoes more than it must. Their rows are
        copied as they are (provenance columns and file metadata included) into files named
        for the new shard, then its marker is written, recording ``carved_from``; a crash
        before that marker leaves files that ``recover`` deletes, one after it a second
        marker that ``layout.finish_carves`` resolves. Returns the new marker.

        What it costs: of each file, only the ``recording_id`` column is read first (the
        footer and that column's chunks, by range requests). A file whose rows are all kept
        (most of them, when a shard is reopened for a few retries) is copied whole to its
        new name, byte for byte, server-side on object stores (``storage.copy``); one with
        none kept is left to ``recover``; only one mixing kept and dropped rows is
        downloaded, filtered and written again."""
        import pyarrow.compute as pc

        lay, o = self.layout, self.cfg.output
        fs, source = lay.fs, marker["shard"]
        shard_id = layout_mod.carved_shard_id(source, keep)
        ids = pa.array(sorted(keep))
        files: dict[str, list[dict[str, Any]]] = {}
        counts = collections.Counter[str]()
        for table, entries in marker.get("files", {}).items():
            for entry in entries:
                src = lay.committed_file(table, entry["path"])
                held = _recording_ids(fs, src)
                kept_rows = pc.sum(pc.is_in(held, value_set=ids)).as_py() or 0
                if not kept_rows:
                    counts["dropped"] += 1
                    continue
                out = files.setdefault(table, [])
                path = lay.shard_file(table, shard_id, len(out))
                if kept_rows == len(held):
                    storage.copy(fs, src, path)
                    counts["copied"] += 1
                else:
                    rows = read_parquet_bytes(storage.read_bytes(fs, src))
                    rows = rows.filter(pc.is_in(rows["recording_id"], value_set=ids))
                    storage.write_bytes(fs, path, parquet_bytes(
                        rows, self.row_group_rows, o.compression))
                    counts["rewritten"] += 1
                out.append({"path": lay.uri(path), "rows": kept_rows})
        recordings = [r for r in marker["recordings"] if r["recording_id"] in keep]
        carved = {**marker, "shard": shard_id, "carved_from": source, "carved_by": self.job_id,
                  "carved_at": utc_now(), "recordings": recordings, "files": files,
                  "counts": {"recordings": len(recordings)}}
        layout_mod.commit(lay, carved)
        log.warning("kept the rows of %d recording(s) %s (shard %s, reopened) in shard %s",
                    len(recordings), why, source, shard_id)
        log.debug("carving shard %s: %d file(s) copied, %d filtered, %d left behind", source,
                  counts["copied"], counts["rewritten"], counts["dropped"])
        return carved

    def _say_reopened(self, markers: Mapping[str, Mapping[str, Any]], reopen: set[str],
                      retry: Mapping[str, int], lacking: Mapping[str, list[str]],
                      changed: Mapping[str, int]) -> None:
        """Warn, per reason, about the committed shards this run reopens."""
        replaced = [s for s in reopen if s in changed]
        if replaced:
            log.warning("reopening %d committed shard(s) holding %d recordings whose object "
                        "has changed since (new version: new recording id); their rows are "
                        "replaced by the new version's (run.replace_changed_sources)",
                        len(replaced), sum(changed[s] for s in replaced))
        retried = [s for s in reopen if s in retry]
        if retried:
            log.warning("reopening %d committed shard(s) of %d recordings: %d of them failed or "
                        "stopped on errors that were not the recording's own (storage, memory, "
                        "a worker's environment) and a retry may get past "
                        "(run.retry_transient_errors)", len(retried),
                        sum(len(markers[s].get("recordings", ())) for s in retried),
                        sum(retry[s] for s in retried))
        filled = sorted({t for s in reopen if s in lacking for t in lacking[s]})
        if filled:
            log.warning("reopening %d committed shard(s) written without the %s table(s), "
                        "which this run writes (output.%s turned on since)",
                        sum(s in lacking for s in reopen), ", ".join(filled),
                        " / output.".join(filled))

    def _say_unmatched(self, markers: Mapping[str, Mapping[str, Any]],
                       listed: set[str]) -> None:
        """Warn of the types ``run.retry_errors`` names that no listed recording was committed
        with: a name misspelt (``CorruptedAudio``, ``corruptaudio``), or one whose recordings
        are all redone by now, reopens nothing, and the run would otherwise say nothing of
        it (exit 0, everything already done)."""
        named = self.cfg.run.retry_errors
        if not named:
            return
        found = collections.Counter(
            str(rec["error_type"]) for marker in markers.values()
            for rec in layout_mod.noted(marker)
            if rec.get("error_type") and rec["recording_id"] in listed)
        unmatched = [name for name in named if name not in found]
        if unmatched:
            log.warning("run.retry_errors names %s, which no listed recording was committed "
                        "with: no shard is reopened for %s (the listed recordings' committed "
                        "error types: %s; names are the errors table's error_type, case "
                        "included)",
                        ", ".join(unmatched), "them" if len(unmatched) > 1 else "it",
                        ", ".join(f"{k} {v}" for k, v in sorted(found.items())) or "none")

    def _say_given_up(self, markers: Mapping[str, Mapping[str, Any]], whole: set[str]) -> None:
        """Warn about the recordings kept failed because they reached ``run.max_attempts``
        (but those of the shards in ``whole``, redone whole)."""
        limit = self.cfg.run.max_attempts
        given_up = [rec for shard, marker in markers.items() if shard not in whole
                    for rec in layout_mod.noted(marker)
                    if layout_mod.to_retry(rec) and not layout_mod.to_retry(rec, limit)]
        if given_up:
            log.warning("%d recording(s) met errors not their own (%s) in %d runs or more: not "
                        "retried again, their error rows stay (run.max_attempts: %d; raise it "
                        "to try them once more)", len(given_up),
                        ", ".join(sorted({str(rec.get("error_type")) for rec in given_up})),
                        limit, limit)
