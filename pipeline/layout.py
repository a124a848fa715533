"""The output tree and the commit protocol that makes reruns exactly-once.

Layout under ``output.uri`` (``M`` = model, ``V`` = variant id, ``S`` = shard id)::

    windows/model=M/variant=V/shard-S-00000.parquet     one row per window x channel x layer
    recordings/model=M/variant=V/shard-S-00000.parquet  one row per recording x channel x layer
    errors/model=M/variant=V/shard-S-00000.parquet      one row per failed recording
    _commits/model=M/variant=V/S.json                   commit marker: the shard is visible
    _variants/V.json                                    what determines variant V
    _variants/V.columns.json                            the manifest columns V's rows carry
    _jobs/<job_id>.json                                 one record per run
    _crashes/model=M/variant=V/<recording_id>.json      a recording that killed its decode
                                                        worker (pipeline.crashes)
    _leases/model=M/variant=V.json                      the run writing now (pipeline.lease)
    _leases/model=M/.variant=V.json.lock                its lock file, on a local disk
    _staging/model=M/variant=V/shard=S/...              work in progress (never read)

The protocol, per shard: write every file to ``_staging``; move each into place under
its deterministic name; write the marker last (a single PUT, or rename locally). At the
start of every run, files of shards without a marker are deleted and ``_staging`` is
cleared, so a crash at any point leaves nothing that a rerun duplicates. Names beginning
with ``_`` are ignored by Hive-style readers (Spark, BigQuery, pyarrow datasets).
"""

from __future__ import annotations

import collections
import gc
import hashlib
import json
import logging
import re
import sys
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import redact, storage
from pipeline.errors import LIMIT_ERRORS, RETRYABLE_ERRORS
from pipeline.faults import fault_point

log = logging.getLogger(__name__)

TABLES: tuple[str, ...] = ("windows", "recordings", "errors")
# Markers fetched ahead of the parsing (their bytes held at once: ~50 KB each at 256
# recordings).
_MARKERS_AT_ONCE = 512
# Marker reads in flight: a request each on a bucket, 20-80 ms. At 50 ms, 40,000 markers
# wait 125 s read 16 at a time, 31 s at 64 (parsing them is ~15 s of one core); 10,000 on
# moto behind 50 ms took 106 s (10 at once: see storage.S3_CONNECTIONS), now 39 s.
MARKER_READS = 64
_SHARD_FILE = re.compile(r"shard-([0-9a-f]{16})-(\d{5})\.parquet$")


def namespace_dir(table: str, model: str, variant: str) -> str:
    """A table's folder for one model and variant, relative to the output root:
    ``windows/model=M/variant=V`` (Hive partitions; names made safe path components)."""
    return f"{table}/{partitions(model, variant)}"


def partitions(model: str, variant: str) -> str:
    """``model=M/variant=V``: one namespace's Hive partitions, names made path-safe."""
    return f"model={storage.safe_component(model)}/variant={storage.safe_component(variant)}"


@dataclass(frozen=True)
class OutputLayout:
    """Paths of one (model, variant) namespace under an output root.

    Attributes:
        root: ``output.uri`` as given (local path or bucket URL).
        model: model name (made path-safe).
        variant: variant id.
        storage_options: fsspec options for the output filesystem.
    """

    root: str
    model: str
    variant: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def fs(self) -> Any:
        return storage.url_to_fs(self.root, self.storage_options)[0]

    @property
    def root_path(self) -> str:
        return storage.url_to_fs(self.root, self.storage_options)[1].rstrip("/")

    def _ns(self) -> str:
        return partitions(self.model, self.variant)

    def table_dir(self, table: str) -> str:
        return storage.join(self.root_path, namespace_dir(table, self.model, self.variant))

    def committed_file(self, table: str, recorded: str) -> str:
        """Where a file a marker records is under this root: markers keep the URL it was
        written to, which a copied or moved output root no longer has (a table's files are
        all in its namespace folder, so the name places it)."""
        return storage.join(self.table_dir(table), recorded.rsplit("/", 1)[-1])

    def shard_file(self, table: str, shard_id: str, part: int) -> str:
        return storage.join(self.table_dir(table), f"shard-{shard_id}-{part:05d}.parquet")

    def staging_dir(self, shard_id: str | None = None) -> str:
        base = storage.join(self.root_path, "_staging", self._ns())
        return base if shard_id is None else storage.join(base, staging_name(shard_id))

    def commits_dir(self) -> str:
        return storage.join(self.root_path, "_commits", self._ns())

    def commit_path(self, shard_id: str) -> str:
        return storage.join(self.commits_dir(), f"{shard_id}.json")

    def crashes_dir(self) -> str:
        return storage.join(self.root_path, "_crashes", self._ns())

    def crash_path(self, recording_id: str) -> str:
        return storage.join(self.crashes_dir(), f"{recording_id}.json")

    def lease_path(self) -> str:
        return storage.join(self.root_path, "_leases", f"{self._ns()}.json")

    def variant_path(self) -> str:
        return storage.join(self.root_path, "_variants", f"{storage.safe_component(self.variant)}.json")

    def columns_path(self) -> str:
        """``_variants/<id>.columns.json``: the manifest columns a namespace's rows carry, as
        stored (see ``resume.Resumption.record_columns``)."""
        name = storage.safe_component(self.variant)
        return storage.join(self.root_path, "_variants", f"{name}.columns.json")

    def job_path(self, job_id: str) -> str:
        return storage.join(self.root_path, "_jobs", f"{storage.safe_component(job_id)}.json")

    def uri(self, path: str) -> str:
        """Full URL of a path on the output filesystem (for messages and markers)."""
        return redact.uri(storage.full_uri(self.fs, path))


def staging_name(shard_id: str) -> str:
    """A shard's directory under the staging root (the write stage stages files there)."""
    return f"shard={shard_id}"


def json_bytes(payload: Mapping[str, Any]) -> bytes:
    """How every JSON record is written (markers, job records, the lease)."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str).encode()


def write_json(fs: Any, path: str, payload: Mapping[str, Any]) -> None:
    storage.write_bytes(fs, path, json_bytes(payload))


def read_json(fs: Any, path: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(fs, path))


class MarkerRecordings(Sequence[dict[str, Any]]):
    """A commit marker's ``recordings``, held compactly.

    A run reads every marker of its namespace and keeps them while it plans. Parsed, an
    entry (id, source URI, outcome) is a dict of three strings, ~500 bytes: 10M recordings
    held 4.7 GB. Here the ids are one Arrow string array (36 bytes each, and what
    :func:`settled_among` matches against a listing), the URIs one compressed JSON text,
    the outcomes interned; an entry that says more than those three (an error type, a
    retry) is kept as parsed: only those concern a retry (:meth:`noted`). Iterating yields
    every entry as it was written.
    """

    __slots__ = ("_noted", "_uris", "ids", "outcomes")

    def __init__(self, entries: Sequence[Mapping[str, Any]]) -> None:
        ids, uris = [], []
        self.outcomes: list[str | None] = []
        self._noted: dict[int, dict[str, Any]] = {}
        for i, entry in enumerate(entries):  # one pass: 39k markers make this a hot loop
            ids.append(entry["recording_id"])
            uris.append(entry.get("source_uri"))
            outcome = entry.get("outcome")
            self.outcomes.append(outcome if outcome is None else sys.intern(outcome))
            if len(entry) != 3 or "source_uri" not in entry or "outcome" not in entry:
                self._noted[i] = dict(entry)
        self.ids: pa.StringArray = pa.array(ids, pa.string())
        self._uris = zlib.compress(json.dumps(uris).encode(), 1)

    def __len__(self) -> int:
        return len(self.outcomes)

    def __getitem__(self, index):  # type: ignore[no-untyped-def,override]  # unused: O(n)
        return list(self)[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        uris = self.uris()
        for i, (rid, outcome) in enumerate(zip(self.ids.to_pylist(), self.outcomes,
                                               strict=True)):
            noted = self._noted.get(i)
            yield dict(noted) if noted is not None else {
                "recording_id": rid, "source_uri": uris[i], "outcome": outcome}

    def uris(self) -> list[str | None]:
        """Each entry's ``source_uri``, in order."""
        return json.loads(zlib.decompress(self._uris))

    def noted(self) -> list[dict[str, Any]]:
        """The entries that say more than id, URI and outcome (failures, retries)."""
        return [dict(e) for e in self._noted.values()]

    def with_outcome(self, outcome: str) -> list[str]:
        """Ids of the entries whose ``outcome`` is ``outcome``."""
        ids = self.ids.to_pylist()
        return [rid for rid, o in zip(ids, self.outcomes, strict=True) if o == outcome]


def compact(marker: dict[str, Any]) -> dict[str, Any]:
    """``marker`` with its ``recordings`` as :class:`MarkerRecordings` (in place)."""
    if not isinstance(marker.get("recordings"), MarkerRecordings):
        marker["recordings"] = MarkerRecordings(marker.get("recordings", ()))
    return marker


def committed_shards(layout: OutputLayout) -> dict[str, dict[str, Any]]:
    """Every commit marker of this namespace, keyed by shard id; ``recordings`` compacted
    as each is read (:class:`MarkerRecordings`)."""
    fs = layout.fs
    paths = [p for p in storage.list_files(fs, layout.commits_dir()) if p.endswith(".json")]
    markers: dict[str, dict[str, Any]] = {}
    # Threads fetch, this one parses: parsing in the threads made them contend for the GIL
    # (100,000 markers: 28 s, against 15 s). Parsing makes millions of short-lived objects
    # and no cycles; the collector's passes over them cost 15%.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with ThreadPoolExecutor(MARKER_READS) as pool:
            for start in range(0, len(paths), _MARKERS_AT_ONCE):
                chunk = paths[start:start + _MARKERS_AT_ONCE]
                for data in pool.map(lambda p: storage.read_bytes(fs, p), chunk):
                    marker = compact(json.loads(data))
                    markers[marker["shard"]] = marker
    finally:
        if collecting:
            gc.enable()
    return markers



def settled_among(ids: Sequence[str] | pa.Array, markers: Mapping[str, Mapping[str, Any]],
                  outcome: str | None = None) -> list[bool]:
    """For each of ``ids`` (a list, or the Arrow array of one, made once for several
    calls), whether a marker settles it (embedded or failed; with ``outcome``, only entries
    of that outcome): one hash lookup each (10M ids against 10M settled: ~5 s), not a set of
    every settled id.

    The hash table is made of the smaller side: a rerun of one prefix of an archive (a few
    thousand listed) into an output holding 10M recordings hashed those 10M ids, 4 s and
    1.2 GB for nothing; it now looks them up among the listed (0.2 s), then the listed
    among the few found."""
    settled = [m["recordings"].ids if outcome is None
               else pa.array(m["recordings"].with_outcome(outcome), pa.string())
               for m in markers.values()
               if outcome is None or outcome in m["recordings"].outcomes]
    if not len(ids) or not settled:
        return [False] * len(ids)
    listed = ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string())
    # Chunked: one string array holds 2 GiB, ~67M ids.
    committed = pa.chunked_array(settled, pa.string())
    if len(listed) < len(committed):
        committed = committed.filter(pc.is_in(committed, value_set=listed))
    return pc.is_in(listed, value_set=committed).to_pylist()


def admitted_now(recording: Mapping[str, Any], limits: Mapping[str, Any]) -> bool:
    """Whether a marker's recording failed on one of the job's limits that ``limits`` would
    let it past: its rate and channels (``refused``) are within them. A marker that did not
    record them: whether the limits were set otherwise then (none recorded: yes, once)."""
    if recording.get("error_type") not in LIMIT_ERRORS:
        return False
    seen = recording.get("refused")
    if seen is None:
        return recording.get("limits") != dict(limits)
    return (int(seen["channels"]) <= limits["max_channels"]
            and limits["min_sample_rate_hz"] <= int(seen["sample_rate_hz"])
            <= limits["max_sample_rate_hz"])


def to_retry(recording: Mapping[str, Any], max_attempts: int | None = None) -> bool:
    """Whether a marker's recording failed, or stopped early, on an error that was not its
    own (storage retries ran out, memory, an exception of a worker's environment or of a
    bug since fixed), which a later run may not meet; with ``max_attempts``, only while
    fewer runs than that have met such an error on it (see :func:`attempts`)."""
    transient = bool(recording.get("retry")) or recording.get("error_type") in RETRYABLE_ERRORS
    return transient and (max_attempts is None or attempts(recording) < max_attempts)


def attempts(recording: Mapping[str, Any]) -> int:
    """How many runs in a row have met an error not its own on a marker's recording (markers
    written before the count was kept say nothing: one)."""
    return int(recording.get("attempts", 1))


def noted(marker: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    """A marker's recordings that may say more than id, URI and outcome (every one, unless
    compacted: see :meth:`MarkerRecordings.noted`); a failure or a retry is among them."""
    recordings = marker.get("recordings", ())
    return recordings.noted() if isinstance(recordings, MarkerRecordings) else recordings


def recordings_to_retry(markers: Mapping[str, Mapping[str, Any]],
                        max_attempts: int | None = None,
                        listed: Collection[str] | None = None) -> dict[str, set[str]]:
    """``shard -> ids`` of the recordings :func:`to_retry` in committed shards (with
    ``listed``, only those listed now: a rerun cannot redo an object that is gone)."""
    out: dict[str, set[str]] = {}
    for shard_id, marker in markers.items():
        ids = {r["recording_id"] for r in noted(marker) if to_retry(r, max_attempts)
               and (listed is None or r["recording_id"] in listed)}
        if ids:
            out[shard_id] = ids
    return out


def carved_shard_id(shard_id: str, keep: Iterable[str]) -> str:
    """The id of the shard that takes ``keep``'s rows out of ``shard_id`` (see
    ``resume.Resumption._carve_out``): the same for the same carve, so one a crash interrupted
    writes the same files again."""
    key = "\n".join([f"carved from {shard_id}", *sorted(keep)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def finish_carves(layout: OutputLayout, markers: dict[str, dict[str, Any]]) -> set[str]:
    """Finish what a crash interrupted between committing a carved shard and uncommitting the
    shard it was carved from (both markers would name its recordings): uncommit that one,
    whose files :func:`recover` then deletes. Returns the shards uncommitted."""
    finished = set()
    for marker in list(markers.values()):
        source = marker.get("carved_from")
        if source in markers:
            log.warning("finishing a carve-out a crash interrupted: shard %s's kept rows are in "
                        "shard %s; uncommitting %s", source, marker["shard"], source)
            uncommit(layout, source)
            del markers[source]
            finished.add(source)
    return finished


def uncommit(layout: OutputLayout, shard_id: str) -> None:
    """Delete a shard's marker: its files are then a crashed run's, which :func:`recover`
    deletes, and its recordings are to do again. Marker first, so a crash in between
    leaves files that the next run deletes, never a marker without its files."""
    storage.remove_file(layout.fs, layout.commit_path(shard_id))


def recover(layout: OutputLayout, committed: Iterable[str], reopened: Iterable[str] = (),
            carved: Iterable[str] = ()) -> int:
    """Delete what a crashed run left behind: staging, and files of uncommitted shards
    (among them those of the shards this run ``reopened``, and those whose carve-out
    :func:`finish_carves` finished, ``carved``: each said apart in the log).

    Returns:
        Number of files deleted from the visible tables.
    """
    fs = layout.fs
    committed, reopened, carved = set(committed), set(reopened), set(carved)
    storage.remove_tree(fs, layout.staging_dir())
    # A marker killed between its write and its rename into place (local disks): whole, but
    # never a commit; only this namespace's lease holder writes markers here. A bucket gets
    # one PUT, no temporary object, so its markers are not listed again (40 LIST pages, one
    # after another, at 40,000 shards).
    temporary = storage.list_files(fs, layout.commits_dir()) if storage.is_local(layout.root) else []
    for path in temporary:
        if path.rsplit("/", 1)[-1].startswith(".tmp-"):
            storage.remove_file(fs, path)
    removed = collections.Counter[str]()
    for table in TABLES:
        for path in storage.list_files(fs, layout.table_dir(table)):
            match = _SHARD_FILE.search(path)
            if match and match.group(1) not in committed:
                storage.remove_file(fs, path)
                shard = match.group(1)
                removed["reopened" if shard in reopened else
                        "carved" if shard in carved else "crashed"] += 1
    if removed["reopened"]:
        log.info("removed %d files of the %d shard(s) this run reopened", removed["reopened"],
                 len(reopened))
    if removed["carved"]:
        log.info("removed %d files of the %d shard(s) whose carve-out this run finished (their "
                 "kept rows are in the carved shards)", removed["carved"], len(carved))
    if removed["crashed"]:
        log.warning("removed %d files of shards that were never committed (a previous run "
                    "stopped while publishing)", removed["crashed"])
    return removed.total()


def publish(layout: OutputLayout, shard_id: str, staged: Mapping[str, list[str]]
            ) -> dict[str, list[tuple[str, str]]]:
    """Move a shard's staged files to their final names (numbered in the order of their
    staged names); returns the ``(staged, final)`` paths per table."""
    fs = layout.fs
    moved: dict[str, list[tuple[str, str]]] = {}
    for table, paths in staged.items():
        moved[table] = []
        for part, src in enumerate(sorted(paths)):
            dst = layout.shard_file(table, shard_id, part)
            storage.move(fs, src, dst)
            moved[table].append((src, dst))
            fault_point("publishing")
    return moved


def commit(layout: OutputLayout, marker: Mapping[str, Any]) -> None:
    """Write the marker that makes a shard visible, then drop its staging directory."""
    fs = layout.fs
    write_json(fs, layout.commit_path(marker["shard"]), marker)
    storage.remove_tree(fs, layout.staging_dir(marker["shard"]))
