"""The output tree and the commit protocol that makes reruns exactly-once.

Layout under ``output.uri`` (``M`` = model, ``V`` = variant id, ``S`` = shard id)::

    windows/model=M/variant=V/shard-S-00000.parquet     one row per window x channel x layer
    recordings/model=M/variant=V/shard-S-00000.parquet  one row per recording x channel x layer
    errors/model=M/variant=V/shard-S-00000.parquet      one row per failed recording
    _commits/model=M/variant=V/S.json                   commit marker: the shard is visible
    _variants/V.json                                    what determines variant V
    _jobs/<job_id>.json                                 one record per run
    _leases/model=M/variant=V.json                      the run writing now (pipeline.lease)
    _staging/model=M/variant=V/shard=S/...              work in progress (never read)

The protocol, per shard: write every file to ``_staging``; move each into place under
its deterministic name; write the marker last (a single PUT, or rename locally). At the
start of every run, files of shards without a marker are deleted and ``_staging`` is
cleared, so a crash at any point leaves nothing that a rerun duplicates. Names beginning
with ``_`` are ignored by Hive-style readers (Spark, BigQuery, pyarrow datasets).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.faults import fault_point

log = logging.getLogger(__name__)

TABLES: tuple[str, ...] = ("windows", "recordings", "errors")
_SHARD_FILE = re.compile(r"shard-([0-9a-f]{16})-(\d{5})\.parquet$")


def namespace_dir(table: str, model: str, variant: str) -> str:
    """A table's folder for one model and variant, relative to the output root:
    ``windows/model=M/variant=V`` (Hive partitions; names made safe path components)."""
    return f"{table}/{_partitions(model, variant)}"


def _partitions(model: str, variant: str) -> str:
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
        return _partitions(self.model, self.variant)

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

    def lease_path(self) -> str:
        return storage.join(self.root_path, "_leases", f"{self._ns()}.json")

    def variant_path(self) -> str:
        return storage.join(self.root_path, "_variants", f"{storage.safe_component(self.variant)}.json")

    def job_path(self, job_id: str) -> str:
        return storage.join(self.root_path, "_jobs", f"{storage.safe_component(job_id)}.json")

    def uri(self, path: str) -> str:
        """Full URL of a path on the output filesystem (for messages and markers)."""
        return storage.redact_uri(storage.full_uri(self.fs, path))


def staging_name(shard_id: str) -> str:
    """A shard's directory under the staging root (the write stage stages files there)."""
    return f"shard={shard_id}"


def write_json(fs: Any, path: str, payload: Mapping[str, Any]) -> None:
    storage.write_bytes(fs, path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: Any, path: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(fs, path))


def committed_shards(layout: OutputLayout) -> dict[str, dict[str, Any]]:
    """Every commit marker of this namespace, keyed by shard id."""
    fs = layout.fs
    paths = [p for p in storage.list_files(fs, layout.commits_dir()) if p.endswith(".json")]
    with ThreadPoolExecutor(16) as pool:
        markers = list(pool.map(lambda p: read_json(fs, p), paths))
    return {m["shard"]: m for m in markers}


def committed_recordings(markers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``recording_id -> shard`` for every recording settled (embedded or failed) in a marker."""
    done: dict[str, str] = {}
    for shard_id, marker in markers.items():
        for rec in marker.get("recordings", ()):
            done[rec["recording_id"]] = shard_id
    return done


# Markers written before ``retry`` was recorded name only these as worth a retry.
RETRYABLE_ERRORS = frozenset({"StorageError"})


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


def shards_to_retry(markers: Mapping[str, Mapping[str, Any]], max_attempts: int | None = None,
                    listed: Collection[str] | None = None) -> dict[str, int]:
    """``shard -> recordings`` for committed shards holding a recording :func:`to_retry`
    (and, with ``listed``, whose id is in it: a rerun cannot redo an object that is gone)."""
    out: dict[str, int] = {}
    for shard_id, marker in markers.items():
        n = sum(1 for r in marker.get("recordings", ()) if to_retry(r, max_attempts)
                and (listed is None or r["recording_id"] in listed))
        if n:
            out[shard_id] = n
    return out


def carved_shard_id(shard_id: str, keep: Iterable[str]) -> str:
    """The id of the shard that takes ``keep``'s rows out of ``shard_id`` (see
    ``EmbeddingJob._carve_out``): the same for the same carve, so one a crash interrupted
    writes the same files again."""
    key = "\n".join([f"carved from {shard_id}", *sorted(keep)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def finish_carves(layout: OutputLayout, markers: dict[str, dict[str, Any]]) -> None:
    """Finish what a crash interrupted between committing a carved shard and uncommitting the
    shard it was carved from (both markers would name its recordings): uncommit that one,
    whose files :func:`recover` then deletes."""
    for marker in list(markers.values()):
        source = marker.get("carved_from")
        if source in markers:
            log.warning("finishing a carve-out a crash interrupted: shard %s's kept rows are in "
                        "shard %s; uncommitting %s", source, marker["shard"], source)
            uncommit(layout, source)
            del markers[source]


def uncommit(layout: OutputLayout, shard_id: str) -> None:
    """Delete a shard's marker: its files are then a crashed run's, which :func:`recover`
    deletes, and its recordings are to do again. Marker first, so a crash in between
    leaves files that the next run deletes, never a marker without its files."""
    storage.remove_file(layout.fs, layout.commit_path(shard_id))


def recover(layout: OutputLayout, committed: Iterable[str]) -> int:
    """Delete what a crashed run left behind: staging, and files of uncommitted shards.

    Returns:
        Number of files deleted from the visible tables.
    """
    fs = layout.fs
    committed = set(committed)
    storage.remove_tree(fs, layout.staging_dir())
    removed = 0
    for table in TABLES:
        for path in storage.list_files(fs, layout.table_dir(table)):
            match = _SHARD_FILE.search(path)
            if match and match.group(1) not in committed:
                storage.remove_file(fs, path)
                removed += 1
    if removed:
        log.warning("removed %d files of shards that were never committed (a previous run "
                    "stopped while publishing)", removed)
    return removed


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
