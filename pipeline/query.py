"""Query an output root with DuckDB, the way a user would (``python -m pipeline.query OUT``).

Prints each SQL statement and its result: recordings per site with their status, window
counts per layer, and each recording's nearest neighbour by cosine similarity of the
pooled embeddings. Those read one namespace (model and variant): by default the one the
latest job wrote, since embeddings of two variants (another window, hop or checkpoint) do
not compare; ``python -m pipeline.query OUT VARIANT`` picks another.
"""

from __future__ import annotations

import sys

import duckdb

QUERIES = {
    "recordings and their metadata": """
        SELECT regexp_extract(source_uri, '[^/]+$') AS file, site, channel, layer,
               round(duration_s, 1) AS duration_s, source_sample_rate_hz AS rate_hz,
               num_windows, status, len(embedding) AS dim
        FROM read_parquet('{root}/recordings/{ns}/*.parquet')
        WHERE layer = (SELECT max(layer) FROM read_parquet('{root}/recordings/{ns}/*.parquet'))
        ORDER BY file, channel""",
    "window rows per layer, every namespace": """
        SELECT model, variant, layer, count(*) AS windows, count(DISTINCT recording_id) AS recordings,
               round(avg(valid_s), 2) AS mean_valid_s
        FROM read_parquet('{root}/windows/**/*.parquet', hive_partitioning = true)
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = (args[0] if args else "outputs/demo").rstrip("/")
    con = duckdb.connect()
    newest = con.sql(f"""
        SELECT model, variant
        FROM read_parquet('{root}/recordings/**/*.parquet', hive_partitioning = true,
                          hive_types_autocast = false)
        {"WHERE variant = $variant" if len(args) > 1 else ""}
        ORDER BY job_id DESC LIMIT 1""", params={"variant": args[1]} if len(args) > 1 else None
                     ).fetchall()
    if not newest:
        print(f"no recordings under {root}" + (f" for variant {args[1]}" if len(args) > 1 else ""),
              file=sys.stderr)
        return 1
    model, variant = newest[0]
    ns = f"model={model}/variant={variant}"
    print(f"-- namespace {ns} (written last; `python -m pipeline.query {root} VARIANT` for another)")
    for title, sql in QUERIES.items():
        sql = sql.format(root=root, ns=ns)
        print(f"\n-- {title}\n{sql.strip()};")
        print(con.sql(sql))
    return 0


if __name__ == "__main__":
    sys.exit(main())
