"""Writing a shard: the Ray Datasink for window rows, and the per-recording and error tables.

Window rows stream into :class:`ShardSink`. Each write task enriches its rows with the
source and provenance columns, writes one Parquet file to the shard's staging directory
under a name fixed by its task index (a retried task overwrites, never duplicates), and
returns small partial sums per (recording, channel, layer) plus the recordings' decode
reports. The driver reduces those into the recordings table (:func:`build_recordings`) —
no second pass over the window files.

Schemas are declared here and written explicitly: the embedding column is a plain
``list<float32>``, never a Ray extension type, so DuckDB, BigQuery, Spark and pandas read it.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pipeline import storage

log = logging.getLogger(__name__)

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
        staging_uri: the shard's staging directory (URL).
        storage_options: fsspec options for the output filesystem.
        sources: per-recording columns: ``recording_id``, ``source_uri``, ``source_version``,
            ``source_bytes`` plus manifest extras, one row per recording of the shard.
        extras_schema: schema of the manifest extras (``None`` without a manifest).
        provenance: constant provenance columns (``job_id``...).
        file_metadata: key-value metadata for every Parquet file.
        write_windows: write window rows (the partial sums are computed either way).
        rows_per_file: rows per write task, i.e. per window file.
        row_group_rows: rows per Parquet row group.
        compression: Parquet codec.
    """

    staging_uri: str
    storage_options: dict[str, Any]
    sources: pa.Table
    extras_schema: pa.Schema | None
    provenance: dict[str, str]
    file_metadata: dict[bytes, bytes]
    write_windows: bool = True
    rows_per_file: int = 100_000
    row_group_rows: int = 20_000
    compression: str = "zstd"


@dataclass
class WriteReturn:
    """What one write task reports to the driver (small: no window embeddings)."""

    files: list[tuple[str, int]] = field(default_factory=list)
    partials: pa.Table | None = None
    reports: list[str] = field(default_factory=list)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)


class ShardSink(Datasink[WriteReturn]):
    """Ray Datasink that stages one shard's window rows and collects what the driver needs."""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.returns: list[WriteReturn] = []

    @property
    def min_rows_per_write(self) -> int | None:
        return self.spec.rows_per_file

    def write(self, blocks: Iterable[Any], ctx: Any) -> WriteReturn:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        out = WriteReturn()
        if not tables:
            return out
        table = pa.concat_tables([t.cast(STAGE_SCHEMA) for t in tables])
        is_report = pa.compute.not_equal(table.column("meta"), "")
        for text in table.filter(is_report).column("meta").to_pylist():
            meta = json.loads(text)
            if meta["type"] == "timing":
                merge_timing(out.timing, meta)
            else:
                out.reports.append(text)
        rows = table.filter(pa.compute.invert(is_report))
        if rows.num_rows == 0:
            return out
        out.partials = partial_pools(rows)
        if self.spec.write_windows:
            path = storage.join(self.spec.staging_uri, "windows", f"part-{ctx.task_idx:06d}.parquet")
            final = enrich_windows(rows, self.spec)
            write_parquet(final, path, self.spec.storage_options, self.spec.row_group_rows,
                          self.spec.compression)
            out.files.append((path, final.num_rows))
        return out

    def on_write_complete(self, write_result: Any) -> None:
        self.returns = list(write_result.write_returns)


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
    rows = rows.drop_columns(["meta"])
    order = pa.compute.sort_indices(rows, sort_keys=[
        ("layer", "ascending"), ("recording_id", "ascending"),
        ("channel", "ascending"), ("window_index", "ascending"),
    ])
    rows = rows.take(order)
    source = lookup(spec.sources, rows.column("recording_id"))
    schema = windows_schema(spec.extras_schema, spec.file_metadata)
    columns: dict[str, pa.Array] = {}
    for f in schema:
        if f.name in rows.column_names:
            columns[f.name] = rows.column(f.name)
        elif f.name in spec.provenance:
            columns[f.name] = pa.array([spec.provenance[f.name]] * rows.num_rows, pa.string())
        else:
            columns[f.name] = source.column(f.name)
    return pa.table(columns, schema=schema)


def lookup(sources: pa.Table, recording_ids: pa.ChunkedArray | pa.Array) -> pa.Table:
    """Rows of ``sources`` matching each id (a gather; every id must be present)."""
    index = {rid: i for i, rid in enumerate(sources.column("recording_id").to_pylist())}
    try:
        take = np.fromiter((index[r] for r in recording_ids.to_pylist()), dtype=np.int64)
    except KeyError as err:
        raise RuntimeError(f"row for recording {err} that is not in this shard") from None
    return sources.take(pa.array(take))


def _embedding_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    dims = pa.compute.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(dims) and (dims != dims[0]).any():
        raise ValueError("embeddings of one layer must share a dimension")
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
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
    """Combine partial pools from every write task: ``(rid, channel, layer) -> (count, pooled)``."""
    acc: dict[tuple[str, int, int], list[Any]] = {}
    for table in partials:
        rids = table.column("recording_id").to_pylist()
        chans = table.column("channel").to_pylist()
        layers = table.column("layer").to_pylist()
        counts = table.column("count").to_pylist()
        sums = table.column("sum").to_pylist()
        maxs = table.column("max").to_pylist()
        for rid, ch, layer, n, s, m in zip(rids, chans, layers, counts, sums, maxs, strict=True):
            key = (rid, ch, layer)
            s_arr, m_arr = np.asarray(s, np.float64), np.asarray(m, np.float32)
            if key in acc:
                entry = acc[key]
                entry[0] += n
                entry[1] += s_arr
                np.maximum(entry[2], m_arr, out=entry[2])
            else:
                acc[key] = [n, s_arr, m_arr]
    pooled = {}
    for key, (n, s, m) in acc.items():
        vec = (s / n).astype(np.float32) if pooling == "mean" else m
        pooled[key] = (n, vec)
    return pooled


def write_parquet(table: pa.Table, uri: str, storage_options: Mapping[str, Any],
                  row_group_rows: int, compression: str) -> None:
    """Write ``table`` as one Parquet object at ``uri`` (whole or not at all; retried)."""
    fs, path = storage.url_to_fs(uri, storage_options)
    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        row_group_size=max(1, row_group_rows),
        compression=None if compression == "none" else compression,
        use_dictionary=[f.name for f in table.schema if pa.types.is_string(f.type)],
        write_statistics=True,
    )
    storage.write_bytes(fs, path, buffer.getvalue())


def file_metadata(record: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {PROVENANCE_KEY: json.dumps(record, sort_keys=True, default=str).encode()}
