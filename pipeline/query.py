"""Query an output root with DuckDB, the way a user would (``python -m pipeline.query OUT``).

Prints each SQL statement and its result: recordings with their manifest columns (the
demo's site, calls and time) and status, window
counts per layer, and each recording's nearest neighbour by cosine similarity of the
pooled embeddings. Those read one namespace (model and variant): by default the one the
latest job wrote, since embeddings of two variants (another window, hop or checkpoint) do
not compare; ``python -m pipeline.query OUT VARIANT`` picks another.
"""

from __future__ import annotations

import sys
from typing import Any

import duckdb

from pipeline import storage
from pipeline.layout import namespace_dir, partitions, read_json
from pipeline.sink import recordings_schema

QUERIES = {
    "recordings and their metadata": """
        SELECT regexp_extract(source_uri, '[^/]+$') AS file, {extras}channel, layer,
               round(duration_s, 1) AS duration_s, source_sample_rate_hz AS rate_hz,
               num_windows, status, len(embedding) AS dim
        FROM read_parquet('{root}/recordings/{ns}/*.parquet')
        WHERE layer = (SELECT max(layer) FROM read_parquet('{root}/recordings/{ns}/*.parquet'))
        ORDER BY file, channel""",
    "window rows per layer, every namespace": """
        SELECT model, variant, layer, count(*) AS windows, count(DISTINCT recording_id) AS recordings,
               round(avg(valid_s), 2) AS mean_valid_s
        FROM read_parquet('{root}/windows/**/*.parquet', hive_partitioning = true,
                          hive_types_autocast = false)
        GROUP BY ALL ORDER BY model, variant, layer""",
    "nearest neighbour of each recording (cosine, last layer)": """
        WITH r AS (
            SELECT regexp_extract(source_uri, '[^/]+$') || '#' || channel AS name, embedding
            FROM read_parquet('{root}/recordings/{ns}/*.parquet')
            WHERE layer = (SELECT max(layer) FROM read_parquet('{root}/recordings/{ns}/*.parquet')))
        SELECT a.name, arg_max(b.name, list_cosine_similarity(a.embedding, b.embedding)) AS nearest,
               round(max(list_cosine_similarity(a.embedding, b.embedding)), 4) AS cosine
        FROM r a JOIN r b ON a.name <> b.name
        GROUP BY a.name ORDER BY a.name""",
}


def latest_namespace(root: str, variant: str | None = None) -> tuple[str, str] | None:
    """``(model, variant)`` of the run that started last (its record in ``_jobs/``) among
    those whose namespace has recordings (of ``variant`` if given); None if there is none.
    Job ids do not sort by time: a user may name runs ``nightly`` or ``baseline``."""
    fs, path = storage.url_to_fs(root)
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


def _has_parquet(fs: Any, folder: str) -> bool:
    return storage.exists(fs, folder) and any(p.endswith(".parquet")
                                              for p in storage.list_files(fs, folder))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = (args[0] if args else "outputs/demo").rstrip("/")
    con = duckdb.connect()
    found = latest_namespace(root, args[1] if len(args) > 1 else None)
    newest = [found] if found else []
    if not newest:
        print(f"no recordings under {root}" + (f" for variant {args[1]}" if len(args) > 1 else ""),
              file=sys.stderr)
        return 1
    model, variant = newest[0]
    ns = partitions(model, variant)  # the model's name made path-safe, as the job writes it
    fs, path = storage.url_to_fs(root)
    windows = _has_parquet(fs, storage.join(path, "windows"))
    print(f"-- namespace {ns} (the variant asked for)" if len(args) > 1 else
          f"-- namespace {ns} (of the run started last; `python -m pipeline.query {root} VARIANT` "
          "for another)")
    # The manifest's columns, whatever they are: what a recordings file has beyond the job's.
    columns = con.sql(f"DESCRIBE SELECT * FROM read_parquet('{root}/recordings/{ns}/*.parquet')"
                      ).fetchall()
    ours = set(recordings_schema(None).names) | {"model", "variant"}  # and the hive keys
    extras = "".join(f'"{name}", ' for name, *_ in columns if name not in ours)
    for title, sql in QUERIES.items():
        if "/windows/" in sql and not windows:
            print(f"\n-- {title}: no windows table here (the jobs ran with output.windows: false)")
            continue
        sql = sql.format(root=root, ns=ns, extras=extras)
        print(f"\n-- {title}\n{sql.strip()};")
        sys.stdout.flush()
        con.sql(sql).show(max_width=200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
