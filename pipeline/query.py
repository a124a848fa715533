"""Query an output root with DuckDB, the way a user would (``python -m pipeline.query OUT``).

Prints each SQL statement and its result: recordings per site with their status, window
counts per layer, and each recording's nearest neighbour by cosine similarity of the
pooled embeddings.
"""

from __future__ import annotations

import sys

import duckdb

QUERIES = {
    "recordings and their metadata": """
        SELECT regexp_extract(source_uri, '[^/]+$') AS file, site, channel, layer,
               round(duration_s, 1) AS duration_s, source_sample_rate_hz AS rate_hz,
               num_windows, status, len(embedding) AS dim
        FROM read_parquet('{root}/recordings/**/*.parquet', hive_partitioning = true)
        WHERE layer = (SELECT max(layer) FROM read_parquet('{root}/recordings/**/*.parquet'))
        ORDER BY file, channel""",
    "window rows per layer": """
        SELECT model, variant, layer, count(*) AS windows, count(DISTINCT recording_id) AS recordings,
               round(avg(valid_s), 2) AS mean_valid_s
        FROM read_parquet('{root}/windows/**/*.parquet', hive_partitioning = true)
        GROUP BY ALL ORDER BY layer""",
    "nearest neighbour of each recording (cosine, last layer)": """
        WITH r AS (
            SELECT regexp_extract(source_uri, '[^/]+$') || '#' || channel AS name, embedding
            FROM read_parquet('{root}/recordings/**/*.parquet')
            WHERE layer = (SELECT max(layer) FROM read_parquet('{root}/recordings/**/*.parquet')))
        SELECT a.name, arg_max(b.name, list_cosine_similarity(a.embedding, b.embedding)) AS nearest,
               round(max(list_cosine_similarity(a.embedding, b.embedding)), 4) AS cosine
        FROM r a JOIN r b ON a.name <> b.name
        GROUP BY a.name ORDER BY a.name""",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = (args[0] if args else "outputs/demo").rstrip("/")
    con = duckdb.connect()
    for title, sql in QUERIES.items():
        sql = sql.format(root=root)
        print(f"\n-- {title}\n{sql.strip()};")
        print(con.sql(sql))
    return 0


if __name__ == "__main__":
    sys.exit(main())
