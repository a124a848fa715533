"""The demo's DuckDB queries read one namespace: rows of two variants never mix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import query
from pipeline.layout import namespace_dir


def write_namespace(root: Path, variant: str, job_id: str, files: list[str],
                    started_at: str, model: str = "beats", windows: bool = True) -> None:
    n = len(files)
    rec = pa.table({
        "recording_id": [f"{variant}-{f}" for f in files], "source_uri": [f"/a/{f}" for f in files],
        "site": ["s"] * n, "channel": pa.array([-1] * n, pa.int16()),
        "layer": pa.array([3] * n, pa.int16()), "duration_s": [1.0] * n,
        "source_sample_rate_hz": pa.array([16_000] * n, pa.int32()),
        "num_windows": pa.array([1] * n, pa.int32()), "status": ["ok"] * n,
        "embedding": pa.array([[1.0, float(i)] for i in range(n)], pa.list_(pa.float32())),
        "job_id": [job_id] * n})
    win = rec.select(["recording_id", "layer"]).append_column("valid_s", pa.array([1.0] * n))
    for table, data in (("recordings", rec), ("windows", win))[: 2 if windows else 1]:
        folder = root / namespace_dir(table, model, variant)  # as the job names it
        folder.mkdir(parents=True)
        pq.write_table(data, folder / "part-0.parquet")
    (root / "_jobs").mkdir(exist_ok=True)
    (root / "_jobs" / f"{job_id}.json").write_text(json.dumps(
        {"job_id": job_id, "started_at": started_at,
         "summary": {"model": model, "variant": variant}}))


def test_the_newest_namespace_by_default_another_by_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Named runs: the later one's id sorts first, its start time decides.
    write_namespace(tmp_path, "0123", "nightly", ["old.wav", "both.wav"], "2026-11-22T10:00:00Z")
    write_namespace(tmp_path, "4567", "baseline", ["new.wav", "both.wav"], "2026-11-22T11:00:00Z")
    # A later run that wrote nothing (failed before its first commit) is passed over.
    (tmp_path / "_jobs" / "failed.json").write_text(json.dumps(
        {"job_id": "failed", "started_at": "2026-11-22T12:00:00Z",
         "summary": {"model": "beats", "variant": "9999"}}))
    assert query.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "namespace model=beats/variant=4567 (of the run started last" in out
    assert "new.wav" in out and "old.wav" not in out
    assert query.main([str(tmp_path), "0123"]) == 0  # a zero-led id stays a string
    out = capsys.readouterr().out
    assert "variant=0123" in out and "new.wav" not in out and "old.wav" in out
    assert "variant=0123 (the variant asked for)" in out  # not "of the run started last"
    assert query.main([str(tmp_path), "89"]) == 1


def test_outputs_without_a_manifest_are_queried_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_namespace(tmp_path, "0123", "j", ["a.wav"], "2026-11-22T10:00:00Z")
    folder = tmp_path / "recordings" / "model=beats" / "variant=0123"
    path = folder / "part-0.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["site"]), path)
    assert query.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "a.wav" in out and "site" not in out


def test_a_manifest_column_with_a_quote_in_its_name_is_queried(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The job writes a manifest column named ``say "hi"`` (warning that it is no plain
    name); the queries name it quoted as SQL quotes it, not ending the name at its ``"``."""
    write_namespace(tmp_path, "0123", "run", ["a.wav"], "2026-11-22T10:00:00Z")
    folder = tmp_path / namespace_dir("recordings", "beats", "0123")
    rec = pq.read_table(folder / "part-0.parquet")
    pq.write_table(rec.append_column('say "hi"', pa.array(["hello"])), folder / "part-0.parquet")
    assert query.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"site", "say ""hi"""' in out and "hello" in out


def test_a_plugin_namespace_and_an_output_without_windows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A plugin's ``module:Class`` name is made path-safe in the folder name (the query
    found nothing before); with output.windows off the windows query is skipped, said so."""
    write_namespace(tmp_path, "0123", "j", ["a.wav"], "2026-11-22T10:00:00Z",
                    model="plugmod:TinyPlugin", windows=False)
    assert query.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "namespace model=plugmod_TinyPlugin/variant=0123" in out and "a.wav" in out
    assert "no windows table here" in out
    assert "nearest neighbour" in out


def test_a_copy_of_the_tables_without_job_records_is_queried(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of the tables alone (``_jobs/`` left behind, as a copy of what Hive readers
    read leaves every ``_`` folder) was "no recordings", even with its variant named: the
    namespace is found from the recordings' folders, and where there are several, the
    message names them."""
    write_namespace(tmp_path, "0123", "j", ["a.wav"], "2026-11-22T10:00:00Z")
    shutil.rmtree(tmp_path / "_jobs")
    assert query.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "namespace model=beats/variant=0123 (the only one with recordings here" in out
    assert "a.wav" in out
    assert query.main([str(tmp_path), "0123"]) == 0
    assert "a.wav" in capsys.readouterr().out

    write_namespace(tmp_path, "4567", "k", ["b.wav"], "2026-11-22T11:00:00Z")
    shutil.rmtree(tmp_path / "_jobs")
    assert query.main([str(tmp_path)]) == 1  # which one is meant, nothing says
    err = capsys.readouterr().err
    assert "recordings hold 2 variants (0123, 4567): name one" in err
    assert query.main([str(tmp_path), "4567"]) == 0
    out = capsys.readouterr().out
    assert "b.wav" in out and "a.wav" not in out
    assert query.main([str(tmp_path), "89"]) == 1
    assert "for variant 89 (variants with recordings there: 0123, 4567)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["runs[2]", "runs*", "runs?"])
def test_a_root_named_with_glob_characters_is_read_as_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    """DuckDB expands ``*``, ``?`` and ``[`` in the paths it reads: ``runs[2]`` read the
    output beside it named ``runs2`` (or found nothing), ``runs*`` and ``runs?`` every
    output whose name they match, with the root's own rows among the others."""
    write_namespace(tmp_path / name, "0123", "j", ["mine.wav"], "2026-11-22T10:00:00Z")
    write_namespace(tmp_path / "runs2", "0123", "j", ["other.wav"], "2026-11-22T10:00:00Z")
    assert query.main([str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    assert "mine.wav" in out and "other.wav" not in out
    assert "│ beats   │ 0123    │     3 │       1 │          1 │" in out  # its windows alone


def neighbours(out: str) -> list[str]:
    """The table rows the nearest-neighbour query printed (after its SQL)."""
    section = out[out.index("-- nearest neighbour"):]
    return [line for line in section.splitlines() if line.startswith("│ /")]


def test_recordings_of_one_file_name_in_two_folders_stay_apart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Field recorders name files by time in every site folder: recordings are told apart by
    their id, never by file name, in the listing and in the neighbour search."""
    files = ["site_a/20240101_000000.WAV", "site_b/20240101_000000.WAV", "site_c/other.WAV"]
    write_namespace(tmp_path, "0123", "j", files, "2026-11-22T10:00:00Z")  # [1,0] [1,1] [1,2]
    assert query.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    listing = out[out.index("-- recordings and their metadata"):out.index("-- window rows")]
    assert "/a/site_a/20240101_000000.WAV" in listing and "/a/site_b/20240101_000000.WAV" in listing
    rows = neighbours(out)
    assert len(rows) == 3, out  # one per recording: the two of one name are not merged
    # each one's nearest is another recording, the other one of its name included
    a, b, c = rows
    assert a.index("site_a/20240101_000000.WAV") < a.index("site_b/20240101_000000.WAV")
    assert b.index("site_b/20240101_000000.WAV") < b.index("site_c/other.WAV")
    assert c.index("site_c/other.WAV") < c.index("site_b/20240101_000000.WAV")

    # the search is bounded: --limit recordings, or those --recording names
    assert query.main([str(tmp_path), "--limit", "1"]) == 0
    rows = neighbours(capsys.readouterr().out)
    assert len(rows) == 1 and "site_a" in rows[0].split("│")[1]
    assert query.main([str(tmp_path), "--recording", "0123-site_b/20240101_000000.WAV"]) == 0
    rows = neighbours(capsys.readouterr().out)
    assert len(rows) == 1 and "site_b" in rows[0].split("│")[1]
    assert query.main([str(tmp_path), "--limit", "0"]) == 2


def test_a_bucket_root_is_read_through_the_jobs_fsspec_filesystem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A root that is no local folder is read through ``storage.url_to_fs`` (with the
    ``--storage-option`` flags) registered with DuckDB. ``memory://`` stands in for a bucket:
    fsspec's in-process store, which DuckDB cannot read by itself either."""
    import fsspec

    from pipeline import storage

    write_namespace(tmp_path, "0123", "j", ["x/a.wav", "y/a.wav"], "2026-11-22T10:00:00Z")
    memory = fsspec.filesystem("memory")
    memory.put(str(tmp_path), "/query-test-root", recursive=True)
    seen: list[object] = []
    url_to_fs = storage.url_to_fs

    def recording(uri: str, options: object = None) -> object:
        seen.append(options)
        return url_to_fs(uri, options)

    monkeypatch.setattr(storage, "url_to_fs", recording)
    try:
        assert query.main(["memory://query-test-root/", "--storage-option",
                           "use_listings_cache=false"]) == 0
    finally:
        memory.rm("/query-test-root", recursive=True)
    out = capsys.readouterr().out
    assert "namespace model=beats/variant=0123" in out
    assert "memory://query-test-root/recordings/model=beats/variant=0123/*.parquet" in out
    assert "memory://query-test-root/windows/**/*.parquet" in out
    assert "│ beats   │ 0123    │     3 │       2 │          2 │" in out  # the windows read
    rows = neighbours(out)
    assert len(rows) == 2 and "/a/x/a.wav" in rows[0] and "/a/y/a.wav" in rows[1]
    assert seen and all(o == {"use_listings_cache": False} for o in seen)


def namespace_with_an_all_zero_embedding(root: Path, variant: str) -> None:
    """Three recordings: ``a`` and ``b`` near each other, ``z``'s embedding all zeros."""
    write_namespace(root, variant, "j", ["a.wav", "b.wav", "z.wav"], "2026-11-22T10:00:00Z")
    path = root / namespace_dir("recordings", "beats", variant) / "part-0.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding", pa.array(
        [[1.0, 0.0], [1.0, 0.1], [0.0, 0.0]], pa.list_(pa.float32())))
    pq.write_table(table, path)


def test_an_all_zero_embedding_is_nobodys_nearest_neighbour(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its cosine to anything is NaN, which DuckDB sorts above every number."""
    namespace_with_an_all_zero_embedding(tmp_path, "0123")
    assert query.main([str(tmp_path)]) == 0
    a, b, _ = neighbours(capsys.readouterr().out)
    assert "/a/b.wav" in a.split("│")[3] and "/a/a.wav" in b.split("│")[3]


def readme_nearest_neighbour_sql() -> str:
    """The nearest-neighbour statement of the README's DuckDB example, as a user copies it."""
    import re

    text = (Path(__file__).parents[2] / "README.md").read_text()
    [statement] = [s for block in re.findall(r"```sql\n(.*?)```", text, re.DOTALL)
                   if "outputs/demo" in block and "`" not in block
                   for s in block.split(";") if "nearest" in s and "SELECT" in s]
    return statement


def test_the_readmes_nearest_neighbour_query_passes_over_an_all_zero_embedding(
        tmp_path: Path) -> None:
    """What ``python -m pipeline.query`` does, the README's copy of it does too: an all-zero
    embedding's cosine to anything is NaN, which DuckDB sorts above every number, so it
    was every recording's nearest neighbour there."""
    namespace_with_an_all_zero_embedding(tmp_path, "v0123")
    sql = readme_nearest_neighbour_sql().replace("outputs/demo", str(tmp_path)).replace(
        "a.layer = 12", "a.layer = 3")
    nearest = {uri: near for _, _, uri, _, near, *_ in duckdb.sql(sql).fetchall()}
    assert nearest["/a/a.wav"] == "/a/b.wav" and nearest["/a/b.wav"] == "/a/a.wav"


def test_the_nearest_neighbour_search_holds_no_pair_of_embeddings(tmp_path: Path) -> None:
    """``--limit`` recordings against every other one are ``limit × n`` pairs: ranked by a
    window, DuckDB held each pair with both its embeddings (10 × 50,000 64-dim rows, 590
    MiB), so on a large output the search ran out of memory. Reduced as they stream by, the
    pairs need no more than the recordings themselves: it runs within a memory limit the
    pairs alone would exceed (200,000 pairs of 128-dim rows, about 200 MB), and finds what
    a brute-force search finds."""
    import numpy as np

    n, dim = 20_000, 128
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    folder = tmp_path / namespace_dir("recordings", "beats", "v1")
    folder.mkdir(parents=True)
    pq.write_table(pa.table({
        "recording_id": [f"r{i:05d}" for i in range(n)],
        "source_uri": [f"/a/{i:05d}.wav" for i in range(n)],
        "channel": pa.array([-1] * n, pa.int16()), "layer": pa.array([3] * n, pa.int16()),
        "embedding": pa.FixedSizeListArray.from_arrays(vectors.ravel(), dim).cast(
            pa.list_(pa.float32()))}), folder / "part-0.parquet")
    [sql] = [sql for title, sql in query.QUERIES.items() if title.startswith("nearest")]
    con = duckdb.connect()
    con.sql("SET memory_limit = '100MB'")
    con.sql("SET temp_directory = ''")  # no spilling to disk: what is held must fit
    found = con.sql(sql.format(root=tmp_path, ns="model=beats/variant=v1", extras="",
                               pick="ORDER BY source_uri, recording_id, channel LIMIT 10")
                    ).fetchall()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = unit[:10] @ unit.T
    np.fill_diagonal(cosines[:, :10], -np.inf)
    assert [row[6] for row in found] == [f"r{i:05d}" for i in cosines.argmax(axis=1)]
    assert [row[4] for row in found] == pytest.approx(cosines.max(axis=1), abs=1e-4)
