"""Writing: the write stage for window rows, and the schemas of every output table.

Embedder rows stream into :func:`write_stage`, a Ray task that gathers up to one file's
worth of rows. For each commit shard present in its rows it adds the source and provenance
columns, writes one Parquet file to the shard's staging directory under a name derived from
the rows (a retried task overwrites, never duplicates), and returns a small
:class:`WriteReturn`: the file, partial sums per (recording, channel, layer) and the
recordings' decode reports. The driver folds those per shard, builds the recordings table
from the partial sums (no second pass over the window files) and commits each shard as
soon as every one of its windows is accounted for.

Schemas are declared here and written explicitly: the embedding column is a plain
``list<float32>``, never a Ray extension type, so DuckDB, BigQuery, Spark and pandas read it.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.layout import staging_name

PROVENANCE_KEY = b"embed_archive.provenance"

_PROVENANCE_FIELDS = [
    pa.field("job_id", pa.string()),
    pa.field("model_name", pa.string()),
    pa.field("weights_sha256", pa.string()),
    pa.field("config_sha256", pa.string()),
    pa.field("code_version", pa.string()),
]
_SOURCE_FIELDS = [
    pa.field("recording_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string()),
    pa.field("source_version", pa.string()),
]

# What the embedding stage hands to the sink (one row per window x layer, plus report rows).
STAGE_SCHEMA = pa.schema([
    pa.field("shard", pa.string()),
    pa.field("recording_id", pa.string()),
    pa.field("channel", pa.int16()),
    pa.field("window_index", pa.int32()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("valid_s", pa.float32()),
    pa.field("layer", pa.int16()),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("meta", pa.string()),
])


class RecordingReport(TypedDict, total=False):
    """A recording's report, the ``meta`` (JSON) of the row the decode stage sends after its
    last window (``pipeline.stages``), as the sink gathers it and the driver commits it."""

    type: Literal["report"]
    recording_id: str
    status: Literal["ok", "partial", "error"]
    error_type: str  # status error: what stopped it
    message: str  # status error: what happened, secrets redacted
    stopped_by: str  # status partial: the error that cut it short, its windows before kept
    transient: bool  # not the recording's own failure: a later run tries it again
    problems: list[str]  # status partial: why, each
    duration_s: float  # audio decoded
    source_sample_rate_hz: int
    source_channels: int
    format: str  # container/codec, e.g. FLAC/PCM_24
    windows: dict[str, int]  # windows sent, by channel (-1: mixed), keys as JSON keeps them
    bytes_read: int
    decode_s: float


def windows_schema(extras: pa.Schema | None, metadata: Mapping[bytes, bytes] | None = None) -> pa.Schema:
    fields = [
        *_SOURCE_FIELDS,
        pa.field("channel", pa.int16()),
        pa.field("window_index", pa.int32()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("valid_s", pa.float32()),
        pa.field("layer", pa.int16()),
        pa.field("embedding", pa.list_(pa.float32())),
        *_PROVENANCE_FIELDS,
        *(list(extras) if extras is not None else []),
    ]
    return pa.schema(fields, metadata=metadata)


def recordings_schema(extras: pa.Schema | None, metadata: Mapping[bytes, bytes] | None = None) -> pa.Schema:
    fields = [
        *_SOURCE_FIELDS,
        pa.field("source_bytes", pa.int64()),
        pa.field("channel", pa.int16()),
        pa.field("layer", pa.int16()),
        pa.field("duration_s", pa.float64()),
        pa.field("source_sample_rate_hz", pa.int32()),
        pa.field("source_channels", pa.int16()),
        pa.field("num_windows", pa.int32()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("status", pa.string()),
        pa.field("status_detail", pa.string()),
        *_PROVENANCE_FIELDS,
        *(list(extras) if extras is not None else []),
    ]
    return pa.schema(fields, metadata=metadata)


def errors_schema(extras: pa.Schema | None, metadata: Mapping[bytes, bytes] | None = None) -> pa.Schema:
    fields = [
        *_SOURCE_FIELDS,
        pa.field("source_bytes", pa.int64()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        *_PROVENANCE_FIELDS,
        *(list(extras) if extras is not None else []),
    ]
    return pa.schema(fields, metadata=metadata)


@dataclass(frozen=True)
class SinkSpec:
    """Everything a write task needs; plain data, so it pickles to any node.

    Attributes:
        staging_uri: the job's staging directory (URL); a shard's files go under
            ``shard=<id>/windows/`` inside it.
        storage_options: fsspec options for the output filesystem.
        sources: per-recording columns: ``recording_id``, ``source_uri``, ``source_version``,
            ``source_bytes`` plus manifest extras, one row per recording of the job, by
            shard: :class:`ShardSources`, or a Ray object reference to them (fetched once
            per worker process).
        extras_schema: schema of the manifest extras (``None`` without a manifest).
        provenance: constant provenance columns (``job_id``...).
        file_metadata: key-value metadata for every Parquet file.
        write_windows: write window rows (the partial sums are computed either way).
        rows_per_file: rows gathered per write task, the most in one window file.
        row_group_rows: rows per Parquet row group.
        compression: Parquet codec.
    """

    staging_uri: str
    storage_options: dict[str, Any]
    sources: Any
    extras_schema: pa.Schema | None
    provenance: dict[str, str]
    file_metadata: dict[bytes, bytes]
    write_windows: bool = True
    rows_per_file: int = 100_000
    row_group_rows: int = 20_000
    compression: str = "zstd"


@dataclass
class WriteReturn:
    """What one write task reports to the driver about one shard: the files it staged, its
    recordings' decode reports and, per (recording, channel, layer), a partial pool (count,
    float64 sum, float32 max: one vector each, the window embeddings stay in the files).

    ``shard`` is empty for the return that carries only embedder timings.
    """

    shard: str = ""
    files: list[tuple[str, int]] = field(default_factory=list)
    partials: pa.Table | None = None
    reports: list[str] = field(default_factory=list)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        partials = b""
        if self.partials is not None:
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, self.partials.schema) as writer:
                writer.write_table(self.partials)
            partials = sink.getvalue()
        return {"shard": self.shard, "files": json.dumps(self.files), "partials": partials,
                "reports": self.reports, "timing": json.dumps(self.timing)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WriteReturn:
        partials = None
        if row["partials"]:
            partials = pa.ipc.open_stream(pa.BufferReader(row["partials"])).read_all()
        return cls(shard=row["shard"], files=[(p, int(n)) for p, n in json.loads(row["files"])],
                   partials=partials, reports=list(row["reports"] or ()),
                   timing=json.loads(row["timing"]))


RETURN_SCHEMA = pa.schema([
    pa.field("shard", pa.string()),
    pa.field("files", pa.string()),
    pa.field("partials", pa.binary()),
    pa.field("reports", pa.list_(pa.string())),
    pa.field("timing", pa.string()),
])


def write_stage(batch: pa.Table, spec: SinkSpec) -> pa.Table:
    """Ray ``map_batches`` task: stage a batch of embedder rows, one file per shard in it.

    Returns one :class:`WriteReturn` row per shard present (staged files, partial pools,
    decode reports) plus one with the embedder timings. A file's name is a digest of the
    rows it holds, so a retried task overwrites its own files instead of adding copies;
    files of a task that died before returning are never reported, hence never published.
    """
    table = batch.cast(STAGE_SCHEMA) if batch.schema != STAGE_SCHEMA else batch
    returns: dict[str, WriteReturn] = {}
    timing = WriteReturn()
    is_meta = pa.compute.not_equal(table.column("meta"), "")
    metas = table.filter(is_meta)
    for shard, text in zip(metas.column("shard").to_pylist(), metas.column("meta").to_pylist(),
                           strict=True):
        meta = json.loads(text)
        if meta["type"] == "timing":
            merge_timing(timing.timing, meta)
        else:
            returns.setdefault(shard, WriteReturn(shard)).reports.append(text)
    rows = table.filter(pa.compute.invert(is_meta))
    if rows.num_rows:
        shards = rows.column("shard")
        for shard in pa.compute.unique(shards).to_pylist():
            part = rows.filter(pa.compute.equal(shards, shard))
            out = returns.setdefault(shard, WriteReturn(shard))
            out.partials = partial_pools(part)
            if spec.write_windows:
                final = enrich_windows(part, spec)
                path = storage.join(spec.staging_uri, staging_name(shard), "windows",
                                    f"part-{_rows_digest(final)}.parquet")
                write_parquet(final, path, spec.storage_options, spec.row_group_rows,
                              spec.compression)
                out.files.append((path, final.num_rows))
    if timing.timing:
        returns[""] = timing
    return pa.Table.from_pylist([r.to_row() for r in returns.values()], schema=RETURN_SCHEMA)


def _rows_digest(rows: pa.Table) -> str:
    """Name for a staged file: the same rows always give the same name."""
    digest = hashlib.sha256("\n".join(rows.column("recording_id").to_pylist()).encode())
    for name in ("channel", "window_index", "layer"):
        digest.update(rows.column(name).to_numpy().tobytes())
    return digest.hexdigest()[:20]


class DuplicateRows(RuntimeError):
    """A shard received more window rows for a recording than its decode promised: some
    rows reached the driver twice, so nothing of the shard may be committed."""


class ShardProgress:
    """The driver's view of one shard while its write returns arrive, in any order.

    A recording is settled once its decode report is in and, for every channel it
    reported and every layer, the window rows written plus the windows dropped as
    non-finite equal the windows decoded. The shard is complete when every recording is
    settled; a count that overshoots means a duplicated row: :class:`DuplicateRows`.
    """

    def __init__(self, shard_id: str, recording_ids: Iterable[str], layers: Sequence[int]) -> None:
        self.shard_id = shard_id
        self.layers = tuple(layers)
        self.members = set(recording_ids)
        self.waiting = set(self.members)
        self.partials: list[pa.Table] = []
        self.files: list[tuple[str, int]] = []
        self.reports: dict[str, RecordingReport] = {}
        self.dropped: dict[str, set[tuple[int, int]]] = {}
        self._counts: dict[tuple[str, int, int], int] = {}

    @property
    def complete(self) -> bool:
        return not self.waiting

    def add(self, ret: WriteReturn) -> set[str]:
        """Take a write task's return for this shard; returns the recordings it settled
        (every row of theirs now written)."""
        touched: set[str] = set()
        for text in ret.reports:
            meta = json.loads(text)
            rid = meta["recording_id"]
            if meta["type"] == "report":
                self.reports[rid] = meta
            elif meta["type"] == "dropped":
                self.dropped.setdefault(rid, set()).update((c, w) for c, w in meta["windows"])
            touched.add(rid)
        if ret.partials is not None:
            self.partials.append(ret.partials)
            p = ret.partials
            for rid, ch, layer, n in zip(p.column("recording_id").to_pylist(),
                                         p.column("channel").to_pylist(),
                                         p.column("layer").to_pylist(),
                                         p.column("count").to_pylist(), strict=True):
                key = (rid, ch, layer)
                self._counts[key] = self._counts.get(key, 0) + n
                touched.add(rid)
        self.files.extend(ret.files)
        strangers = touched - self.members
        if strangers:
            raise RuntimeError(f"shard {self.shard_id}: rows for recordings of another shard "
                               f"({sorted(strangers)[:3]})")
        # Rows for a recording settled by an earlier return can only overshoot: check them
        # too, or a duplicate arriving after its recording settled would be committed.
        for rid in (touched & self.members) - self.waiting:
            self._settled(rid)
        settled = {rid for rid in touched & self.waiting if self._settled(rid)}
        self.waiting -= settled
        return settled

    def _settled(self, rid: str) -> bool:
        report = self.reports.get(rid)
        if report is None:
            return False
        for ch, expected in windows_kept(report, self.dropped.get(rid, ())).items():
            for layer in self.layers:
                got = self._counts.get((rid, ch, layer), 0)
                if got > expected:
                    raise DuplicateRows(
                        f"shard {self.shard_id}: {rid} channel {ch} layer {layer} has {got} "
                        f"window rows, {expected} expected; refusing to commit duplicates")
                if got < expected:
                    return False
        return True


def windows_kept(report: RecordingReport, dropped: Iterable[tuple[int, int]]) -> dict[int, int]:
    """``channel -> window rows`` per layer that a recording's decode report promises: the
    windows decoded on that channel, less those ``dropped`` (``(channel, window)``) for a
    non-finite embedding."""
    lost = collections.Counter(c for c, _ in dropped)
    return {int(ch): int(n) - lost[int(ch)] for ch, n in report["windows"].items()}


TIMING_FIELDS = ("start", "end", "busy_s", "model_s", "windows", "batches")


def merge_timing(into: dict[str, dict[str, float]], timing: Mapping[str, Any]) -> None:
    """Fold one embedder timing record (one batch, or a sum of them) into per-actor totals.

    Per actor: first ``start`` and last ``end`` (wall clock), and sums of ``busy_s`` (time
    inside the embedding call), ``model_s`` (the forward passes alone), ``windows`` and
    ``batches``.
    """
    actor = str(timing["actor"])
    mine = into.get(actor)
    if mine is None:
        into[actor] = {k: float(timing[k]) for k in TIMING_FIELDS}
        return
    mine["start"] = min(mine["start"], float(timing["start"]))
    mine["end"] = max(mine["end"], float(timing["end"]))
    for key in ("busy_s", "model_s", "windows", "batches"):
        mine[key] += float(timing[key])


def enrich_windows(rows: pa.Table, spec: SinkSpec) -> pa.Table:
    """Stage rows -> output rows: add source, provenance and manifest columns; sort for scans."""
    shards = pa.compute.unique(rows.column("shard")).to_pylist()
    rows = rows.drop_columns(["meta", "shard"])
    order = pa.compute.sort_indices(rows, sort_keys=[
        ("layer", "ascending"), ("recording_id", "ascending"),
        ("channel", "ascending"), ("window_index", "ascending"),
    ])
    rows = rows.take(order)
    sources = _sources(spec.sources)
    source = lookup(pa.concat_tables([sources.of(shard) for shard in shards]),
                    rows.column("recording_id"))
    schema = windows_schema(spec.extras_schema, spec.file_metadata)
    own = {name: rows.column(name) for name in rows.column_names}
    return _assemble(schema, own, source, spec.provenance, rows.num_rows)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema, sources: pa.Table,
                   provenance: Mapping[str, str]) -> pa.Table:
    """Rows the driver built (a shard's recordings or errors) -> output rows: add source,
    provenance and manifest columns, as :func:`enrich_windows` does for window rows."""
    rows = sorted(rows, key=lambda r: (r.get("layer", 0), r["recording_id"], r.get("channel", 0)))
    source = lookup(sources, pa.array([r["recording_id"] for r in rows], pa.string()))
    own = {f.name: pa.array([np.asarray(r[f.name], np.float32) if f.name == "embedding"
                             else r[f.name] for r in rows], f.type)
           for f in schema if f.name in rows[0]}
    return _assemble(schema, own, source, provenance, len(rows))


def _assemble(schema: pa.Schema, own: Mapping[str, Any], source: pa.Table,
              provenance: Mapping[str, str], num_rows: int) -> pa.Table:
    """Output rows in ``schema``: each column the rows' own, else the job's provenance (one
    value for every row), else the recording's source and manifest columns (``source``,
    looked up row by row)."""
    columns: dict[str, Any] = {}
    for f in schema:
        if f.name in own:
            columns[f.name] = own[f.name]
        elif f.name in provenance:
            columns[f.name] = pa.array([provenance[f.name]] * num_rows, pa.string())
        else:
            columns[f.name] = source.column(f.name)
    return pa.table(columns, schema=schema)


@dataclass(frozen=True)
class ShardSources:
    """The job's per-recording source columns, shard after shard, and where each shard's
    rows are: shard ``s`` holds rows ``rows[s] = (start, stop)`` of ``table``.

    A write task looks a shard's recordings up in that shard's rows alone (a few hundred),
    so a worker process keeps the table (zero-copy from the object store) and one dict
    entry per shard. It kept a dict of every recording id before: ~200 MiB of private memory
    in every worker process that ran a write task, per million recordings (README, At scale).
    """

    table: pa.Table
    rows: dict[str, tuple[int, int]]

    def of(self, shard: str) -> pa.Table:
        """The source rows of ``shard``'s recordings."""
        try:
            start, stop = self.rows[shard]
        except KeyError:
            raise RuntimeError(f"rows of shard {shard!r}, which this job did not plan") from None
        return self.table.slice(start, stop - start)


_SOURCE_CACHE: dict[str, ShardSources] = {}


def _sources(sources: Any) -> ShardSources:
    """Resolve sources or an object reference to them; a reference is fetched once per process."""
    if isinstance(sources, ShardSources):
        return sources
    key = sources.hex()
    if key not in _SOURCE_CACHE:
        import ray

        _SOURCE_CACHE.clear()  # one job at a time per worker process
        _SOURCE_CACHE[key] = ray.get(sources)
    return _SOURCE_CACHE[key]


def lookup(sources: pa.Table, recording_ids: pa.ChunkedArray | pa.Array) -> pa.Table:
    """Rows of ``sources`` matching each id, by hash (every id must be present)."""
    at = pa.compute.index_in(recording_ids, value_set=sources.column("recording_id"))
    if at.null_count:
        missing = recording_ids.filter(at.is_null())[0]
        raise RuntimeError(f"row for recording {missing} that this job did not list")
    return sources.take(at)


def _embedding_matrix(col: pa.ChunkedArray | pa.Array, dtype: type = np.float32) -> np.ndarray:
    """A list column of one length as an ``(rows, length)`` matrix of ``dtype``."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    dims = pa.compute.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(dims) and (dims != dims[0]).any():
        raise ValueError("embeddings of one layer must share a dimension")
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return flat.reshape(len(arr), int(dims[0]) if len(dims) else 0)


def partial_pools(rows: pa.Table) -> pa.Table:
    """Sum, max and count of window embeddings per (recording, channel, layer)."""
    out = []
    layers = rows.column("layer").to_numpy()
    for layer in np.unique(layers):
        part = rows.filter(pa.compute.equal(rows.column("layer"), int(layer)))
        emb = _embedding_matrix(part.column("embedding"))
        keys = np.char.add(
            np.asarray(part.column("recording_id").to_pylist(), dtype=str),
            np.char.add("|", part.column("channel").to_numpy().astype(str)),
        )
        uniq, inverse = np.unique(keys, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1]
        sums = np.add.reduceat(emb[order].astype(np.float64), bounds, axis=0)
        maxs = np.maximum.reduceat(emb[order], bounds, axis=0)
        counts = np.bincount(inverse, minlength=len(uniq))
        rid, _, ch = np.char.partition(uniq, "|").T
        out.append(pa.table({
            "recording_id": pa.array(rid.tolist(), pa.string()),
            "channel": pa.array(ch.astype(np.int16)),
            "layer": pa.array(np.full(len(uniq), layer, dtype=np.int16)),
            "count": pa.array(counts.astype(np.int64)),
            "sum": _list_array(sums, pa.float64()),
            "max": _list_array(maxs, pa.float32()),
        }))
    return pa.concat_tables(out)


def _list_array(matrix: np.ndarray, value_type: pa.DataType) -> pa.Array:
    n, d = matrix.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * d)
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), value_type))


def reduce_partials(partials: Sequence[pa.Table], pooling: str) -> dict[tuple[str, int, int], tuple[int, np.ndarray]]:
    """Combine partial pools from every write task: ``(rid, channel, layer) -> (count, pooled)``.

    Vectorised per layer (the layers of a model may differ in width): the vectors never
    become Python lists, as this runs on the driver for every shard it commits."""
    if pooling not in ("mean", "max"):  # a new one needs its own partial column in partial_pools
        raise ValueError(f"unknown recording pooling {pooling!r}")
    pooled: dict[tuple[str, int, int], tuple[int, np.ndarray]] = {}
    if not partials:
        return pooled
    table = pa.concat_tables(partials)
    layers = table.column("layer").to_numpy()
    for layer in np.unique(layers):
        part = table.filter(pa.compute.equal(table.column("layer"), int(layer)))
        groups: dict[tuple[str, int], int] = {}
        group = np.fromiter(
            (groups.setdefault(key, len(groups)) for key in zip(
                part.column("recording_id").to_pylist(), part.column("channel").to_pylist(),
                strict=True)),
            dtype=np.intp, count=part.num_rows)
        order = np.argsort(group, kind="stable")  # group g's rows start at bounds[g]
        bounds = np.r_[0, np.flatnonzero(np.diff(group[order])) + 1]
        counts = np.add.reduceat(part.column("count").to_numpy()[order], bounds)
        if pooling == "mean":
            sums = np.add.reduceat(_embedding_matrix(part.column("sum"), np.float64)[order],
                                   bounds, axis=0)
            vectors = (sums / counts[:, None]).astype(np.float32)
        else:
            vectors = np.maximum.reduceat(_embedding_matrix(part.column("max"))[order], bounds,
                                          axis=0)
        for (rid, channel), g in groups.items():
            pooled[(rid, channel, int(layer))] = (int(counts[g]), vectors[g])
    return pooled


def write_parquet(table: pa.Table, uri: str, storage_options: Mapping[str, Any],
                  row_group_rows: int, compression: str) -> None:
    """Write ``table`` as one Parquet object at ``uri`` (whole or not at all; retried)."""
    fs, path = storage.url_to_fs(uri, storage_options)
    storage.write_bytes(fs, path, parquet_bytes(table, row_group_rows, compression))


def read_parquet_bytes(data: bytes | io.RawIOBase, columns: list[str] | None = None) -> pa.Table:
    """The table in one Parquet file's bytes, read on this thread and starting none. Also
    takes a seekable file object (a ``storage.RangeReader``), so that ``columns`` fetches
    only the footer and those columns' chunks.

    A thread pyarrow starts can abort a short-lived process at exit ("terminate called
    without an active exception", exit 134, apache/arrow#34314): ``inspect`` and a driver
    that read a Parquet manifest exited 134 after succeeding. ``pq.read_table`` starts a pool
    thread even with ``use_threads=False`` (its dataset scanner; that still failed 1 run in
    6 in CI), ``ParquetFile.read`` starts none. These files are small: one thread loses
    nothing."""
    source = pa.BufferReader(data) if isinstance(data, bytes | bytearray | memoryview) else data
    return pq.ParquetFile(source).read(columns=columns, use_threads=False)


def parquet_bytes(table: pa.Table, row_group_rows: int, compression: str) -> bytes:
    """``table`` as the bytes of one Parquet file, as every output file is written: row
    groups of at most ``row_group_rows``, and a new one wherever ``layer`` changes.

    Rows are sorted by layer, but a file is one row group by default (``output.file_mb`` =
    ``row_group_mb``), whose statistics then span every layer: ``WHERE layer = 12`` on an
    output of ``layers: all`` read all thirteen. A row group per layer lets readers skip
    the others (DuckDB, pyarrow, Spark and BigQuery prune on row-group statistics)."""
    buffer = io.BytesIO()
    with pq.ParquetWriter(
        buffer,
        table.schema,
        compression=None if compression == "none" else compression,
        use_dictionary=[f.name for f in table.schema if pa.types.is_string(f.type)],
        write_statistics=True,
    ) as writer:
        for part in _layer_runs(table):
            writer.write_table(part, row_group_size=max(1, row_group_rows))
    return buffer.getvalue()


def _layer_runs(table: pa.Table) -> list[pa.Table]:
    """``table`` cut wherever its ``layer`` column changes value (whole, without one)."""
    if "layer" not in table.column_names or table.num_rows == 0:
        return [table]
    layers = table.column("layer").to_numpy()
    bounds = [0, *(np.flatnonzero(np.diff(layers)) + 1).tolist(), table.num_rows]
    return [table.slice(start, stop - start) for start, stop in itertools.pairwise(bounds)]


def as_stored(schema: pa.Schema) -> pa.Schema:
    """``schema`` as :func:`write_parquet` stores it and readers get it back (Parquet has no
    seconds unit: a ``timestamp[s]`` column comes back ``timestamp[ms]``)."""
    buffer = io.BytesIO()
    pq.write_table(schema.empty_table(), buffer)
    return pq.read_schema(io.BytesIO(buffer.getvalue())).remove_metadata()


def file_metadata(record: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {PROVENANCE_KEY: json.dumps(record, sort_keys=True, default=str).encode()}
