"""Query an output root with DuckDB, the way a user would (``python -m pipeline.query OUT``).

Prints each SQL statement and its result: recordings with their manifest columns (the
demo's site, calls and time) and status, window counts per layer, and the nearest
neighbour of some recordings by cosine similarity of the pooled embeddings. Those read one
namespace (model and variant): by default the one the latest job wrote, since embeddings of
two variants (another window, hop or checkpoint) do not compare; ``python -m pipeline.query
OUT VARIANT`` picks another. Without job records (a copy of the tables alone, its ``_jobs/``
left behind) the namespace is the one the recordings table holds, or must be named.

Recordings are told apart by ``recording_id`` (and ``channel``), never by file name: field
recorders reuse names (``20240101_000000.WAV``) in every site folder; rows show the
``source_uri``. The neighbour search compares ``--limit`` recordings (the first by URI, or
those ``--recording`` names) with every other one: ``limit × n`` similarities, not ``n²``.
A bucket root (``gs://``, ``s3://``…) is read through the fsspec filesystem the job uses,
registered with DuckDB, with ``--storage-option KEY=VALUE`` as for ``embed-archive inspect``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from typing import Any

import duckdb

from pipeline import storage
from pipeline.catalog import partition_folders
from pipeline.errors import ConfigError
from pipeline.layout import namespace_dir, partitions, read_json
from pipeline.sink import recordings_schema

LAST_LAYER = "WHERE layer = (SELECT max(layer) FROM read_parquet('{root}/recordings/{ns}/*.parquet'))"

QUERIES = {
    "recordings and their metadata": """
        SELECT source_uri, {extras}channel, layer,
               round(duration_s, 1) AS duration_s, source_sample_rate_hz AS rate_hz,
               num_windows, status, len(embedding) AS dim, recording_id
        FROM read_parquet('{root}/recordings/{ns}/*.parquet')
        """ + LAST_LAYER + """
        ORDER BY source_uri, recording_id, channel""",
    "window rows per layer, every namespace": """
        SELECT model, variant, layer, count(*) AS windows, count(DISTINCT recording_id) AS recordings,
               round(avg(valid_s), 2) AS mean_valid_s
        FROM read_parquet('{root}/windows/**/*.parquet', hive_partitioning = true,
                          hive_types_autocast = false)
        GROUP BY ALL ORDER BY model, variant, layer""",
    # The pairs' cosines are reduced as they stream by, to the least of one small struct per
    # recording asked about: ranked by a window instead, DuckDB held every pair with both
    # embeddings (limit x n rows: 10 x 50,000 64-dim rows took 590 MiB, at 768 dimensions
    # and a million recordings some 60 GB).
    "nearest neighbour of {which} (cosine, last layer, another recording)": """
        WITH r AS (
            SELECT recording_id, channel, source_uri, embedding
            FROM read_parquet('{root}/recordings/{ns}/*.parquet')
            """ + LAST_LAYER + """ AND embedding IS NOT NULL),
        q AS (SELECT * FROM r {pick}),
        pairs AS (
            SELECT q.recording_id, q.channel, q.source_uri, r.recording_id AS near_id,
                   r.channel AS near_channel, r.source_uri AS near_uri,
                   list_cosine_similarity(q.embedding, r.embedding) AS cos
            FROM q JOIN r ON q.recording_id <> r.recording_id),
        best AS (  -- structs compare field by field: NaN (an all-zero embedding) last,
                   -- then the highest cosine, then the least id and channel
            SELECT recording_id, channel, source_uri,
                   min({{'nan': isnan(cos), 'cos': -cos, 'id': near_id,
                        'channel': near_channel, 'uri': near_uri}}) AS b
            FROM pairs GROUP BY ALL)
        SELECT source_uri, channel, b.uri AS nearest, b.channel AS nearest_channel,
               round(-b.cos, 4) AS cosine, recording_id, b.id AS nearest_id
        FROM best
        ORDER BY source_uri, recording_id, channel""",
}


def latest_namespace(root: str, variant: str | None = None,
                     storage_options: Mapping[str, Any] | None = None) -> tuple[str, str] | None:
    """``(model, variant)`` of the run that started last (its record in ``_jobs/``) among
    those whose namespace has recordings (of ``variant`` if given); None if there is none.
    Job ids do not sort by time: a user may name runs ``nightly`` or ``baseline``."""
    fs, path = storage.url_to_fs(root, storage_options)
    jobs = [read_json(fs, p) for p in storage.list_files(fs, storage.join(path, "_jobs"))
            if p.endswith(".json")]
    jobs.sort(key=lambda j: j.get("started_at") or "", reverse=True)
    for job in jobs:
        summary = job.get("summary") or {}
        model, found = summary.get("model"), summary.get("variant")
        if not model or not found or (variant is not None and found != variant):
            continue
        if _has_parquet(fs, storage.join(path, namespace_dir("recordings", model, found))):
            return model, found
    return None


_NAMESPACE = re.compile(r"model=([^/]+)/variant=([^/]+)$")


def recorded_namespaces(root: str, storage_options: Mapping[str, Any] | None = None
                        ) -> list[tuple[str, str]]:
    """``(model, variant)`` of every namespace whose recordings table holds Parquet files,
    found from its folders whether or not a job record names it: a copy of the tables
    alone (its ``_jobs/`` left behind) still has rows to read."""
    fs, path = storage.url_to_fs(root, storage_options)
    held = []
    for folder in partition_folders(fs, storage.join(path, "recordings")):
        match = _NAMESPACE.search(folder)
        if match and _has_parquet(fs, folder):
            held.append((match[1], match[2]))
    return sorted(held)


def _has_parquet(fs: Any, folder: str) -> bool:
    return storage.exists(fs, folder) and any(p.endswith(".parquet")
                                              for p in storage.list_files(fs, folder))


def connect(root: str, storage_options: Mapping[str, Any] | None = None
            ) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that reads ``root``: a bucket URL through the same fsspec
    filesystem the job writes with (``storage.url_to_fs``, with these options), registered
    with DuckDB (its httpfs extension needs a download, and knows nothing of fsspec options)."""
    con = duckdb.connect()
    if not storage.is_local(root):
        con.register_filesystem(storage.url_to_fs(root, storage_options)[0])
    return con


def _sql_text(value: str) -> str:
    return value.replace("'", "''")


def _sql_name(name: str) -> str:
    """A column's name quoted for SQL: a manifest column may be named anything (the job
    warns of names that are not plain, and writes them), and one with a ``"`` in it
    (``say "hi"``) ended the quoted name early, failing every query on a parser error."""
    return '"' + name.replace('"', '""') + '"'


def _glob_literal(path: str) -> str:
    """``path`` as a glob that matches itself alone: DuckDB expands ``*``, ``?`` and ``[``
    in every path it reads, so a root named ``runs[2]`` found no file (``[2]`` is a set
    of one character) and one named ``runs*`` read every output beside it too."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.query",
                                description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("root", nargs="?", default="outputs/demo",
                   help="output root: a folder or a bucket URL (default outputs/demo)")
    p.add_argument("variant", nargs="?", default=None,
                   help="variant id to read (default: that of the run started last)")
    p.add_argument("--limit", type=int, default=10, metavar="N",
                   help="recordings (rows of a recording and channel) whose nearest neighbour "
                        "is searched, each against every other (default 10)")
    p.add_argument("--recording", dest="recordings", action="append", default=[],
                   metavar="RECORDING_ID", help="search the neighbours of this recording "
                   "(repeatable) instead of the first --limit by URI")
    p.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                   metavar="KEY=VALUE", help="fsspec option for the output filesystem, as "
                   "embed-archive inspect takes them")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import parse_storage_options

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    root = args.root.rstrip("/")
    if args.limit < 1:
        print("pipeline.query: error: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        options = parse_storage_options(args.storage_options)
    except ConfigError as err:
        print(f"pipeline.query: error: {err}", file=sys.stderr)
        return 2
    found, how = latest_namespace(root, args.variant, options), "of the run started last"
    if not found:  # no job record names one: the recordings table's own, if it holds one
        held = recorded_namespaces(root, options)
        asked = [ns for ns in held if args.variant in (None, ns[1])]
        found, how = (asked[0] if len(asked) == 1 else None), "the only one with recordings here"
        if not found:
            print(_none_found(root, args.variant, held), file=sys.stderr)
            return 1
    model, variant = found
    con = connect(root, options)
    ns = partitions(model, variant)  # the model's name made path-safe, as the job writes it
    fs, path = storage.url_to_fs(root, options)
    windows = _has_parquet(fs, storage.join(path, "windows"))
    print(f"-- namespace {ns} (the variant asked for)" if args.variant else
          f"-- namespace {ns} ({how}; `python -m pipeline.query {root} VARIANT` for another)")
    sql_root = _sql_text(_glob_literal(root))
    # The manifest's columns, whatever they are: what a recordings file has beyond the job's.
    columns = con.sql(f"DESCRIBE SELECT * FROM read_parquet('{sql_root}/recordings/{ns}/*.parquet')"
                      ).fetchall()
    ours = set(recordings_schema(None).names) | {"model", "variant"}  # and the hive keys
    extras = "".join(f"{_sql_name(name)}, " for name, *_ in columns if name not in ours)
    if args.recordings:
        ids = ", ".join(f"'{_sql_text(i)}'" for i in args.recordings)
        pick, which = f"WHERE recording_id IN ({ids})", "the recordings asked for"
    else:
        pick = f"ORDER BY source_uri, recording_id, channel LIMIT {args.limit}"
        which = f"the first {args.limit} recordings by URI (--limit N, or --recording ID)"
    for title, sql in QUERIES.items():
        title = title.format(which=which)
        if "/windows/" in sql and not windows:
            print(f"\n-- {title}: no windows table here (the jobs ran with output.windows: false)")
            continue
        sql = sql.format(root=sql_root, ns=ns, extras=extras, pick=pick)
        print(f"\n-- {title}\n{sql.strip()};")
        sys.stdout.flush()
        con.sql(sql).show(max_width=200)
    return 0


def _none_found(root: str, variant: str | None, held: list[tuple[str, str]]) -> str:
    """Why there is nothing to query, naming the variants there are where there are some."""
    variants = ", ".join(v for _, v in held)
    if variant is not None:
        return f"no recordings under {root} for variant {variant}" + (
            f" (variants with recordings there: {variants})" if held else "")
    if held:  # several, and no job record says which was written last
        return (f"{root}: no job record in _jobs/ names the run written last, and its "
                f"recordings hold {len(held)} variants ({variants}): name one, "
                f"python -m pipeline.query {root} VARIANT")
    return f"no recordings under {root}"


if __name__ == "__main__":
    sys.exit(main())
