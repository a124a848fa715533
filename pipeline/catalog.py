"""What an output root holds: namespaces, committed shards, row counts, jobs and errors.

Reads only commit markers, job records and the (small) errors tables, so it is cheap on a
bucket with terabytes of embeddings. Backs ``embed-archive inspect``.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline import lease as lease_mod
from pipeline import redact, storage
from pipeline.errors import NoInputsError
from pipeline.layout import (
    TABLES,
    OutputLayout,
    attempts,
    committed_shards,
    namespace_dir,
    noted,
    read_json,
    to_retry,
)
from pipeline.sink import read_parquet_bytes

_NS = re.compile(r"model=([^/]+)/variant=([^/]+)")
ERROR_EXAMPLES = 5


@dataclass
class Namespace:
    model: str
    variant: str
    spec: dict[str, Any] = field(default_factory=dict)
    shards: int = 0
    recordings: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    error_types: dict[str, int] = field(default_factory=dict)
    error_examples: list[dict[str, str]] = field(default_factory=list)
    partial_examples: list[dict[str, str]] = field(default_factory=list)  # and why (status_detail)
    to_retry: int = 0  # recordings stopped by errors not their own (`attempts`: how many runs
    # met each; the next run redoes those fewer than run.max_attempts met)
    attempts: collections.Counter[int] = field(default_factory=collections.Counter)  # runs -> recordings
    uncommitted_files: int = 0
    missing_files: int = 0
    lease: dict[str, Any] | None = None  # the run writing this namespace now, if any
    lease_stale: str = ""  # why that lease's holder surely no longer runs, if it does not


@dataclass
class Catalog:
    root: str
    namespaces: list[Namespace]
    jobs: list[dict[str, Any]]


# Job records read at once (one request each on a bucket; an output that many runs wrote,
# one per prefix of an archive, holds hundreds).
_JOB_READS_AT_ONCE = 16
# Jobs render() lists by default: the latest (every one is in --json).
SHOWN_JOBS = 20

# Folders only a job writes: a root holding none of them is some other folder.
_MARKS = ("_commits", "_jobs", "_variants", "_leases", "_staging")


def load_catalog(root: str, storage_options: Mapping[str, Any] | None = None) -> Catalog:
    """Scan an output root (local or bucket).

    Raises:
        NoInputsError: there is nothing at ``root``, or nothing a job writes (a mistyped
            path must not read as an output with nothing committed yet).
    """
    fs, root_path = storage.url_to_fs(root, storage_options)
    root_path = root_path.rstrip("/")
    if not storage.exists(fs, root_path):
        raise NoInputsError(f"{redact.uri(root)}: no such output root")
    if storage.is_file(fs, root_path):
        raise NoInputsError(f"{redact.uri(root)} is a file, not an output root: give the "
                            "folder or prefix a job's output.uri names")
    # A namespace is wherever a run left a trace: commit markers, a lease (a first run
    # still going, or killed before its first commit) or files (published, never committed).
    found: set[tuple[str, str]] = set()
    for path in [*storage.list_files(fs, storage.join(root_path, "_commits")),
                 *storage.list_files(fs, storage.join(root_path, "_leases")),
                 *(ns for table in TABLES
                   for ns in partition_folders(fs, storage.join(root_path, table)))]:
        match = _NS.search(path)
        if match:
            found.add((match.group(1), match.group(2).removesuffix(".json")))
    namespaces = [_namespace(fs, root, model, variant, storage_options)
                  for model, variant in sorted(found)]
    paths = [p for p in storage.list_files(fs, storage.join(root_path, "_jobs"))
             if p.endswith(".json")]
    with ThreadPoolExecutor(_JOB_READS_AT_ONCE) as pool:  # a request each, on a bucket
        jobs = list(pool.map(lambda path: read_json(fs, path), paths))
    jobs.sort(key=lambda j: j.get("started_at") or "")
    if not namespaces and not jobs and not any(
            storage.exists(fs, storage.join(root_path, name)) for name in _MARKS):
        raise NoInputsError(f"{redact.uri(root)} is not an embed-archive output root "
                            f"(it holds none of {', '.join(n + '/' for n in _MARKS)}): give "
                            "the folder or prefix a job's output.uri names")
    return Catalog(root=redact.uri(root), namespaces=namespaces, jobs=jobs)


def partition_folders(fs: Any, table_path: str) -> list[str]:
    """The ``model=M/variant=V`` folders of one table: two levels listed, not every file."""
    out = []
    for model_dir in _folders(fs, table_path):
        out.extend(_folders(fs, model_dir))
    return out


def _folders(fs: Any, path: str) -> list[str]:
    try:
        entries = storage.retry(lambda: fs.ls(path, detail=True), what=f"list {path}")
    except FileNotFoundError:
        return []
    return [e["name"].rstrip("/") for e in entries if e.get("type") == "directory"]


def _namespace(fs: Any, root: str, model: str, variant: str,
               storage_options: Mapping[str, Any] | None) -> Namespace:
    layout = OutputLayout(root, model, variant, dict(storage_options or {}))
    markers = committed_shards(layout)
    ns = Namespace(model=model, variant=variant, shards=len(markers))
    spec_path = layout.variant_path()
    if storage.exists(fs, spec_path):
        ns.spec = read_json(fs, spec_path)
    committed_paths: set[str] = set()
    outcomes: collections.Counter[str] = collections.Counter()
    for marker in markers.values():
        ns.recordings += len(marker["recordings"])
        outcomes.update(marker["recordings"].outcomes)
        tried = [attempts(rec) for rec in noted(marker) if to_retry(rec)]
        ns.to_retry += len(tried)
        ns.attempts.update(tried)
        for table, files in marker.get("files", {}).items():
            ns.rows[table] = ns.rows.get(table, 0) + sum(f["rows"] for f in files)
            ns.files[table] = ns.files.get(table, 0) + len(files)
            committed_paths.update(layout.committed_file(table, f["path"]) for f in files)
    ns.outcomes = dict(outcomes)
    present: set[str] = set()
    for table in TABLES:
        for path in storage.list_files(fs, layout.table_dir(table)):
            if path.endswith(".parquet"):
                present.add(path)
                if path not in committed_paths:
                    ns.uncommitted_files += 1
    ns.missing_files = len(committed_paths - present)
    ns.error_types, ns.error_examples = _errors(fs, layout, markers, present)
    ns.partial_examples = _partials(fs, layout, markers, present)
    if storage.exists(fs, layout.lease_path()):
        ns.lease = read_json(fs, layout.lease_path())
        age = time.time() - float(ns.lease.get("heartbeat", 0.0))
        # This process is alive, whatever it did with the lease (a notebook prepared a job).
        mine = ns.lease.get("pid") == os.getpid() and all(
            ns.lease.get(k) == v for k, v in lease_mod.machine().items())
        ns.lease_stale = "" if mine else lease_mod.NamespaceLease.holder_gone(ns.lease) or (
            f"no heartbeat for {age:.0f} s" if age > lease_mod.STALE_S else "")
    return ns


def _errors(fs: Any, layout: OutputLayout, markers: Mapping[str, Mapping[str, Any]],
            present: set[str]) -> tuple[dict[str, int], list[dict[str, str]]]:
    """Failed recordings by error type, and the first few (by URI) with their messages.

    The markers name each failed recording's error type, so only the errors files holding
    the examples are read (a marker too old to name it has its file read too): thousands of
    shards with errors are not thousands of reads.
    """
    failed = sorted([(str(rec.get("source_uri", "")), shard, rec)
                     for shard, marker in markers.items() if "error" in marker["recordings"].outcomes
                     for rec in marker["recordings"] if rec.get("outcome") == "error"],
                    key=lambda failure: failure[:2])
    legacy = {shard for _, shard, rec in failed if "error_type" not in rec}
    types = collections.Counter(str(rec["error_type"]) for _, shard, rec in failed
                                if shard not in legacy)
    rows: list[dict[str, str]] = []
    for shard in sorted(legacy | {shard for _, shard, _ in failed[:ERROR_EXAMPLES]}):
        for cols in _committed_columns(fs, layout, markers[shard], "errors", present,
                                       ["source_uri", "error_type", "message"]):
            found = [{"source_uri": str(u), "error_type": str(t), "message": str(m)}
                     for u, t, m in zip(cols["source_uri"], cols["error_type"], cols["message"],
                                        strict=True)]
            rows.extend(found)
            if shard in legacy:
                types.update(row["error_type"] for row in found)
    # Every failed recording is a row of the files read or has a larger URI than the first
    # few, so the first few rows read are the first few of all.
    examples = sorted(rows, key=lambda row: row["source_uri"])[:ERROR_EXAMPLES]
    return dict(types.most_common()), examples


def _partials(fs: Any, layout: OutputLayout, markers: Mapping[str, Mapping[str, Any]],
              present: set[str]) -> list[dict[str, str]]:
    """The first few (by URI) partial recordings with their ``status_detail``: the markers
    name them, so only the recordings files of the shards holding those are read, and of
    those only three columns."""
    partial = sorted((str(rec.get("source_uri", "")), shard)
                     for shard, marker in markers.items()
                     if "partial" in marker["recordings"].outcomes
                     for rec in marker["recordings"] if rec.get("outcome") == "partial")
    wanted = {uri for uri, _ in partial[:ERROR_EXAMPLES]}
    found: dict[str, str] = {}
    for shard in sorted({shard for _, shard in partial[:ERROR_EXAMPLES]}):
        for cols in _committed_columns(fs, layout, markers[shard], "recordings", present,
                                       ["source_uri", "status", "status_detail"]):
            # A row per channel and layer: the first partial one says why (a channel's rows
            # may be ok while another lost windows).
            for uri, status, detail in zip(cols["source_uri"], cols["status"],
                                           cols["status_detail"], strict=True):
                if uri in wanted and status == "partial":
                    found.setdefault(str(uri), str(detail or ""))
    return [{"source_uri": uri, "status_detail": found[uri]} for uri in sorted(found)]


def _committed_columns(fs: Any, layout: OutputLayout, marker: Mapping[str, Any], table: str,
                       present: set[str], columns: list[str]) -> Iterator[dict[str, list[Any]]]:
    """``columns`` of each ``table`` file a shard's marker lists, as lists; a file that is
    not there is skipped (counted in ``missing_files``)."""
    for f in marker.get("files", {}).get(table, ()):
        path = layout.committed_file(table, f["path"])
        if path in present:
            yield read_parquet_bytes(storage.read_bytes(fs, path), columns=columns).to_pydict()


def render(catalog: Catalog, jobs: int | None = SHOWN_JOBS) -> str:
    """Human-readable report, listing the latest ``jobs`` runs (None: all)."""
    lines = [f"output: {catalog.root}"]
    if not catalog.namespaces:
        lines.append("  no committed shards" + ("" if catalog.jobs else
                                                 " and no job records: no run has started here"))
    for ns in catalog.namespaces:
        spec = ns.spec
        lines.append(f"\nmodel={ns.model} variant={ns.variant}")
        if spec:
            lines.append(
                f"  window {spec.get('window_s')} s, hop {spec.get('hop_s')} s, tail "
                f"{spec.get('tail')}, layers {spec.get('layers')}, pooling {spec.get('pooling')}, "
                f"precision {spec.get('precision')}, channels {spec.get('channels')}, "
                f"weights sha256 {str(spec.get('weights_sha256'))[:16]}"
            )
        outcomes = sorted((str(k or "no outcome"), v) for k, v in ns.outcomes.items())
        lines.append(f"  committed shards {ns.shards}, recordings {ns.recordings}"
                     + (f" ({', '.join(f'{k} {v}' for k, v in outcomes)})" if outcomes else ""))
        for table in TABLES:
            lines.append(f"  {table:<11} {ns.rows.get(table, 0):>10} rows in "
                         f"{ns.files.get(table, 0)} files   "
                         f"{namespace_dir(table, ns.model, ns.variant)}/")
        if ns.error_types:
            lines.append("  errors by type: " + ", ".join(f"{k} {v}" for k, v in ns.error_types.items()))
            for example in ns.error_examples:
                lines.append(f"    {example['error_type']:<22} {example['source_uri']}: "
                             f"{_clip(example['message'], 100)}")
            shown = len(ns.error_examples)
            if shown < sum(ns.error_types.values()):
                lines.append(f"    ... ({sum(ns.error_types.values()) - shown} more in "
                             f"{namespace_dir('errors', ns.model, ns.variant)}/)")
        partial = ns.outcomes.get("partial", 0)
        if partial:
            lines.append(f"  partial recordings {partial}: status 'partial' in "
                         f"{namespace_dir('recordings', ns.model, ns.variant)}/, why in "
                         "status_detail")
            for example in ns.partial_examples:
                lines.append(f"    {'partial':<22} {example['source_uri']}: "
                             f"{_clip(example['status_detail'], 100)}")
            if len(ns.partial_examples) < partial:
                lines.append(f"    ... ({partial - len(ns.partial_examples)} more)")
        if ns.to_retry:
            runs = ", ".join(f"{n} of them in {k} run{'s' * (k > 1)}"
                             for k, n in sorted(ns.attempts.items()))
            lines.append(f"  {ns.to_retry} recordings failed or stopped on errors not their own "
                         f"(storage, memory, a worker's environment; {runs}): the next run "
                         "embeds them again while fewer than run.max_attempts runs met them "
                         "(run.retry_transient_errors)")
        if ns.missing_files:
            lines.append(f"  WARNING: {ns.missing_files} committed files are missing (deleted "
                         "after their shard was committed?)")
        live = ns.lease is not None and not ns.lease_stale
        if ns.lease:
            age = time.time() - float(ns.lease.get("heartbeat", 0.0))
            holder = (f"job {ns.lease.get('job_id')} (host {ns.lease.get('host')}, pid "
                      f"{ns.lease.get('pid')}), heartbeat {age:.0f} s ago")
            lines.append(f"  running: {holder}" if live else
                         f"  stopped: {holder}, holds a stale lease ({ns.lease_stale}); the next "
                         "run takes it over")
        if ns.uncommitted_files:
            why = ("being published by the running job" if live else
                   "a run was interrupted while publishing; the next run removes them")
            lines.append(f"  WARNING: {ns.uncommitted_files} files without a commit marker ({why})")
    running = {ns.lease.get("job_id") for ns in catalog.namespaces
               if ns.lease is not None and not ns.lease_stale}
    if catalog.jobs:
        shown = catalog.jobs if jobs is None else catalog.jobs[-jobs:] if jobs else []
        earlier = len(catalog.jobs) - len(shown)
        lines.append("\njobs:" + ("" if not earlier else
                                   f" {earlier} not shown (--jobs all)" if not shown else
                                   f" the latest {len(shown)}; {earlier} earlier not shown "
                                   "(--jobs all)"))
        for job in shown:
            s = job.get("summary", {})
            status = s.get("status", "?")
            if not job.get("ended_at") and job.get("job_id") not in running:
                status = "interrupted"  # its record was never finished, and no lease is live
            lines.append(
                f"  {job.get('job_id')}  {status:<22} started {job.get('started_at')} "
                f"ended {job.get('ended_at') or '-'}  model {job.get('model_name')} "
                f"variant {job.get('variant')}  code {job.get('code_version')}  "
                f"recordings {s.get('embedded', 0) + s.get('partial', 0) + s.get('failed', 0)}"
                f" of {s.get('recordings_listed', 0) - s.get('recordings_already_done', 0)} "
                f"(failed {s.get('failed', 0)})"
                + (f", as of {job['updated_at']}" if not job.get("ended_at")
                   and job.get("updated_at") else "")
                + f"  config sha256 {str(job.get('config_sha256'))[:12]}"
            )
            config = job.get("config") or {}
            source = (config.get("input") or {})
            lines.append(
                f"      input {source.get('manifest') or source.get('uri')}  weights "
                f"{job.get('weights_uri')} (sha256 {str(job.get('weights_sha256'))[:12]})  git "
                f"{str(job.get('git_commit'))[:12]}  "
                + " ".join(f"{k} {v}" for k, v in sorted((job.get("libraries") or {}).items())
                           if k in ("ray", "torch", "pyarrow"))
            )
            if s.get("message"):  # why it failed or stopped
                lines.append(f"      {status}: {_clip(str(s['message']).splitlines()[0], 160)}")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
