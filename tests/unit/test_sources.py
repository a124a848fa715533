"""Listing a manifest: one item per object, whatever the spelling; refusals name the field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import redact, sources, storage
from pipeline.config import InputConfig
from pipeline.errors import ConfigError, NoInputsError
from pipeline.sources import MISSING, _size, list_sources


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, np.zeros(1600, np.float32), 16_000)
    return tmp_path


def write_manifest(folder: Path, rows: list[tuple[str, str]]) -> str:
    path = folder / "manifest.csv"
    path.write_text("uri,site\n" + "".join(f"{uri},{site}\n" for uri, site in rows))
    return str(path)


def test_spellings_of_one_file_are_one_recording_with_the_first_rows_metadata(
        folder: Path) -> None:
    manifest = write_manifest(folder, [
        ("./a.wav", "first"), ("b.wav", "b"), ("a.wav", "second"),
        (str(folder / "a.wav"), "third"), (f"file://{folder / 'a.wav'}", "fourth")])
    listing = list_sources(InputConfig(manifest=manifest))
    assert [i.uri for i in listing.items] == [str(folder / "a.wav"), str(folder / "b.wav")]
    assert len({i.recording_id for i in listing.items}) == 2
    assert listing.extras is not None
    sites = listing.extras.column("site").to_pylist()
    assert [sites[i.row] for i in listing.items] == ["first", "b"]


def test_of_two_identical_rows_the_first_keeps_its_metadata(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """And the warning counts every row dropped, the same spelling's too (it counted only
    other spellings of one object: one of three rows here)."""
    manifest = write_manifest(folder, [("a.wav", "first"), ("a.wav", "second"),
                                       ("./a.wav", "third")])
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        listing = list_sources(InputConfig(manifest=manifest))
    assert len(listing.items) == 1 and listing.extras is not None
    assert listing.extras.column("site")[listing.items[0].row].as_py() == "first"
    assert "manifest: 2 row(s) name a recording an earlier row already names" in caplog.text
    # Named, so the user can find which of their rows were dropped.
    a = str(folder / "a.wav")
    assert f"row 2 ({a}, as row 1); row 3 ({a}, as row 1)" in caplog.text


def test_the_warning_about_repeated_rows_names_the_first_few(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = write_manifest(folder, [("a.wav", str(i)) for i in range(9)])
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        list_sources(InputConfig(manifest=manifest))
    assert f"row 6 ({folder / 'a.wav'}, as row 1); and 3 more" in caplog.text


def test_a_row_without_a_uri_is_refused_with_its_row_number(folder: Path) -> None:
    manifest = write_manifest(folder, [("a.wav", "x"), ("", "y"), ("b.wav", "z"), ("  ", "w")])
    with pytest.raises(ConfigError, match=r"2 row\(s\) without a uri \(rows 2, 4;") as err:
        list_sources(InputConfig(manifest=manifest))
    assert err.value.field == "input.manifest"


def test_manifest_columns_keep_what_a_number_would_lose(folder: Path) -> None:
    """Zero-padded ids and integers past a float's precision stay text; plain numbers,
    dates and booleans get their types."""
    path = folder / "manifest.csv"
    path.write_text("uri,site_id,serial,depth_m,count,big,date,ok,note\n"
                    "a.wav,007,12345678901234567890,1.5,3,1234567890123456,2024-05-01,true,x\n"
                    "b.wav,010,98765432109876543210,,-4,-22,2024-05-02,false,y\n"
                    "c.wav,,1,2.5,5,6,2024-05-03,true,\n")
    extras = list_sources(InputConfig(manifest=str(path))).extras
    assert extras is not None
    rows = extras.to_pylist()[:2]
    # An empty cell is missing in a column kept as text, as in any column.
    last = extras.to_pylist()[2]
    assert (last["site_id"], last["note"]) == (None, None)
    assert [r["site_id"] for r in rows] == ["007", "010"]
    assert [r["serial"] for r in rows] == ["12345678901234567890", "98765432109876543210"]
    assert [r["depth_m"] for r in rows] == [1.5, None]
    assert [r["count"] for r in rows] == [3, -4]
    assert [r["big"] for r in rows] == [1234567890123456, -22]  # int64: exact
    assert str(extras.schema.field("date").type) == "date32[day]"
    assert [r["ok"] for r in rows] == [True, False]


def test_a_sixteen_digit_integer_among_decimals_stays_text(folder: Path) -> None:
    """A float holds 15 digits exactly, not 16: 9007199254740993 read as a number comes
    back as ...992, another tag than the one written."""
    path = folder / "manifest.csv"
    path.write_text("uri,tag\na.wav,0.5\nb.wav,9007199254740993\n")
    extras = list_sources(InputConfig(manifest=str(path))).extras
    assert extras is not None
    assert extras.column("tag").to_pylist() == ["0.5", "9007199254740993"]


def test_na_is_a_missing_number_and_text_among_words_even_alone(folder: Path) -> None:
    """pyarrow reads a column of NA alone as all nulls: continent=NA in a manifest of North
    American sites alone was an empty column, yet text beside EU. It is text in both; in a
    numeric column NA and NaN are missing numbers (as pyarrow, pandas and R's write.csv
    mean them); a column of empty cells stays empty."""
    alone, mixed = folder / "alone.csv", folder / "mixed.csv"
    alone.write_text("uri,continent,flag,site_id,empty\na.wav,NA,null,007,\nb.wav,NA,N/A,NA,\n")
    mixed.write_text("uri,continent,n,snr,depth\na.wav,NA,1,NaN,\nb.wav,EU,NA,2.5,3\n")
    one = list_sources(InputConfig(manifest=str(alone))).extras
    two = list_sources(InputConfig(manifest=str(mixed))).extras
    assert one is not None and two is not None
    assert one.select(["continent", "flag", "site_id"]).to_pydict() == {
        "continent": ["NA", "NA"], "flag": ["null", "N/A"], "site_id": ["007", "NA"]}
    assert one.column("empty").to_pylist() == [None, None]
    assert two.schema.field("continent").type == one.schema.field("continent").type == pa.string()
    assert two.column("continent").to_pylist() == ["NA", "EU"]
    assert two.schema.field("n").type == pa.int64() and two.column("n").to_pylist() == [1, None]
    assert two.column("snr").to_pylist() == [None, 2.5]
    assert two.column("depth").to_pylist() == [None, 3]


def test_manifest_columns_are_stored_in_types_bigquery_and_spark_read(folder: Path) -> None:
    """A pandas-written Parquet manifest brings unsigned, nanosecond, dictionary and large
    types; the rows get signed, microsecond, plain ones with the same values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ns = 1_714_550_400_123_456_789
    table = pa.table({
        "uri": ["a.wav", "b.wav"],
        "count": pa.array([1, 250], pa.uint8()),
        "serial": pa.array([2**63 - 1, 5], pa.uint64()),
        "at": pa.array([ns, ns + 1_000], pa.timestamp("ns", "UTC")),
        "local": pa.array([ns, None], pa.timestamp("ns")),
        "site": pa.array(["x", "y"]).dictionary_encode(),
        "note": pa.array(["n", "m"], pa.large_string()),
        "tags": pa.array([["a"], []], pa.large_list(pa.large_string())),
        "gain": pa.array([0.5, 1.5], pa.float16()),
    })
    pq.write_table(table, folder / "m.parquet")
    extras = list_sources(InputConfig(manifest=str(folder / "m.parquet"))).extras
    assert extras is not None
    assert {f.name: str(f.type) for f in extras.schema} == {
        "count": "int64", "serial": "int64", "at": "timestamp[us, tz=UTC]",
        "local": "timestamp[us]", "site": "string", "note": "string", "tags": "list<item: string>",
        "gain": "float"}
    rows = extras.to_pylist()
    assert [r["count"] for r in rows] == [1, 250] and rows[0]["serial"] == 2**63 - 1
    assert rows[0]["at"].microsecond == 123_456 and rows[1]["local"] is None  # below a µs: gone
    assert [r["tags"] for r in rows] == [["a"], []] and [r["gain"] for r in rows] == [0.5, 1.5]

    pq.write_table(table.set_column(2, "serial", pa.array([2**63, 5], pa.uint64())),
                   folder / "big.parquet")
    with pytest.raises(ConfigError, match="'serial' .*does not fit int64") as err:
        list_sources(InputConfig(manifest=str(folder / "big.parquet")))
    assert err.value.field == "input.manifest"


def test_a_duckdb_manifest_is_stored_in_types_spark_reads(folder: Path) -> None:
    """Spark (3.5 and 4.x) refuses a whole table for one Parquet UUID or TIME column, and
    any reader takes a Parquet INTERVAL, as pyarrow reads it, for 12 raw bytes. So a
    DuckDB-written manifest's UUIDs are stored as their text, JSON and times of day as text,
    empty lists and fields as text rather than Arrow's null type (which locks the namespace
    against a later run's values); an interval is refused, naming the column."""
    import duckdb

    con = duckdb.connect()
    path = folder / "m.parquet"
    con.sql(f"""COPY (SELECT * FROM (VALUES
        ('a.wav', '8c3f0e6e-6d1e-4f43-9d0a-0d4b7b1f6a01'::UUID, '{{"depth": 3}}'::JSON,
         TIME '05:10:00', TIME '05:10:00.25', []::VARCHAR[], {{'depth': NULL, 'n': 1}},
         ['41424344-4546-4748-4940-414243444546'::UUID, NULL],
         {{'id': '41424344-4546-4748-4940-414243444546'::UUID, 'at': [TIME '06:00:00.5']}}),
        ('b.wav', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL))
        t(uri, rec, info, tod, fine, tags, nested, ids, deep)) TO '{path}'""")
    extras = list_sources(InputConfig(manifest=str(path))).extras
    assert extras is not None
    assert {f.name: str(f.type) for f in extras.schema} == {
        "rec": "string", "info": "string", "tod": "string", "fine": "string",
        "tags": "list<element: string>", "nested": "struct<depth: string, n: int32>",
        "ids": "list<item: string>", "deep": "struct<id: string, at: list<item: string>>"}
    nested_id = "41424344-4546-4748-4940-414243444546"  # as bytes, "ABCDEFGHI@ABCDEF"
    assert extras.to_pylist() == [
        {"rec": "8c3f0e6e-6d1e-4f43-9d0a-0d4b7b1f6a01", "info": '{"depth": 3}',
         "tod": "05:10:00", "fine": "05:10:00.25", "tags": [],
         "nested": {"depth": None, "n": 1}, "ids": [nested_id, None],
         "deep": {"id": nested_id, "at": ["06:00:00.5"]}},
        dict.fromkeys(("rec", "info", "tod", "fine", "tags", "nested", "ids", "deep"))]
    csv_path = folder / "m.csv"
    csv_path.write_text("uri,tod\na.wav,05:10:00\nb.wav,\n")
    timed = list_sources(InputConfig(manifest=str(csv_path))).extras
    assert timed is not None and timed.to_pylist() == [{"tod": "05:10:00"}, {"tod": None}]
    # JSON's {} is a struct without fields, which Parquet cannot store at all
    jsonl = folder / "m.jsonl"
    jsonl.write_text('{"uri": "a.wav", "a": {}, "b": [{}], "c": {"d": {}}}\n'
                     '{"uri": "b.wav", "a": null, "b": null, "c": null}\n')
    empty = list_sources(InputConfig(manifest=str(jsonl))).extras
    assert empty is not None
    assert {f.name: str(f.type) for f in empty.schema} == {
        "a": "string", "b": "list<item: string>", "c": "struct<d: string>"}
    assert empty.to_pylist() == [{"a": "{}", "b": ["{}"], "c": {"d": "{}"}},
                                 {"a": None, "b": None, "c": None}]
    pq.write_table(empty, folder / "stored.parquet")  # and Parquet takes them

    con.sql(f"COPY (SELECT 'a.wav' AS uri, INTERVAL 3 DAY AS span) TO '{folder / 'i.parquet'}'")
    with pytest.raises(ConfigError, match="'span' is a Parquet INTERVAL") as err:
        list_sources(InputConfig(manifest=str(folder / "i.parquet")))
    assert err.value.field == "input.manifest"


def test_a_duration_is_refused_and_a_decimal_past_38_digits_is_its_text(folder: Path) -> None:
    """pandas writes a Timedelta column as a bare Parquet INT64 (pyarrow alone knows it for a
    duration): BigQuery, Spark and DuckDB would read nanoseconds, so it is refused, naming the
    column, at any depth, as an INTERVAL is. Spark and DuckDB have no decimal past 38
    digits: a DECIMAL(41, 2) is stored as its exact text, in fixed point."""
    from decimal import Decimal

    import pandas as pd

    pd.DataFrame({"uri": ["a.wav"], "offset": [pd.Timedelta(seconds=90)]}).to_parquet(
        folder / "d.parquet")
    with pytest.raises(ConfigError, match=r"'offset' \(duration\[us\]\) holds a duration") as err:
        list_sources(InputConfig(manifest=str(folder / "d.parquet")))
    assert err.value.field == "input.manifest"
    pq.write_table(pa.table({"uri": ["a.wav"], "spans": pa.array([[1]], pa.list_(
        pa.duration("s")))}), folder / "nested.parquet")
    with pytest.raises(ConfigError, match="'spans' .*holds a duration"):
        list_sources(InputConfig(manifest=str(folder / "nested.parquet")))

    wide, narrow = Decimal("1" * 39 + ".50"), Decimal("1.50")
    pq.write_table(pa.table({
        "uri": ["a.wav", "b.wav"],
        "wide": pa.array([wide, None], pa.decimal256(41, 2)),
        "tiny": pa.array([[Decimal("1E-42")], []], pa.list_(pa.decimal256(60, 42))),
        "narrow": pa.array([narrow, None], pa.decimal256(10, 2)),
    }), folder / "dec.parquet")
    extras = list_sources(InputConfig(manifest=str(folder / "dec.parquet"))).extras
    assert extras is not None
    assert {f.name: str(f.type) for f in extras.schema} == {
        "wide": "string", "tiny": "list<item: string>", "narrow": "decimal256(10, 2)"}
    assert extras.to_pydict() == {"wide": ["1" * 39 + ".50", None],
                                  "tiny": [["0." + "0" * 41 + "1"], []],
                                  "narrow": [narrow, None]}


@pytest.mark.parametrize("header, refused", [
    ("uri,Model\n", r"\['Model'\] clash with columns the job writes"),
    ("uri,LAYER,site\n", r"\['LAYER'\] clash"),
    ("uri,Site,site\n", r"\['Site', 'site'\] differ only by case"),
])
def test_manifest_columns_are_compared_ignoring_case(folder: Path, header: str,
                                                     refused: str) -> None:
    """BigQuery, Spark and DuckDB take ``Model`` for the ``model`` partition key, and
    ``Site`` and ``site`` for one column: refused before any work, naming the field."""
    path = folder / "m.csv"
    path.write_text(header + "a.wav" + ",x" * header.count(",") + "\n")
    with pytest.raises(ConfigError, match=refused) as err:
        list_sources(InputConfig(manifest=str(path)))
    assert err.value.field == "input.manifest"


def test_a_manifest_column_that_is_no_plain_name_is_warned_about(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = folder / "m.csv"
    path.write_text("uri,site id,ok\na.wav,x,1\n")
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        extras = list_sources(InputConfig(manifest=str(path))).extras
    assert extras is not None and extras.column_names == ["site id", "ok"]
    assert "['site id'] are not plain names" in caplog.text


def test_the_index_pandas_writes_beside_a_dataframe_is_no_manifest_column(
        folder: Path) -> None:
    """A DataFrame whose index is no plain range (filtered, deduplicated, concatenated) is
    written to Parquet with its index as a column ``__index_level_0__``, which pandas reads
    back as the index: it reached every output row, and a later run's manifest with a plain
    index was refused for lacking it. A named index is the user's column and stays. A CSV
    written with its index has a header cell without a name (``,uri,site``): refused, as
    no reader names that column alike (DuckDB: by its position, in each table another)."""
    import pandas as pd

    # the rows a filter of a larger frame leaves: an index that is no range
    kept = pd.DataFrame({"uri": ["a.wav", "b.wav"], "site": ["y", "z"]}, index=[3, 7])
    kept.to_parquet(folder / "m.parquet")
    assert "__index_level_0__" in pq.read_schema(folder / "m.parquet").names
    extras = list_sources(InputConfig(manifest=str(folder / "m.parquet"))).extras
    assert extras is not None and extras.column_names == ["site"]
    kept.set_index("site").to_parquet(folder / "named.parquet")
    extras = list_sources(InputConfig(manifest=str(folder / "named.parquet"))).extras
    assert extras is not None and extras.column("site").to_pylist() == ["y", "z"]

    kept.to_csv(folder / "m.csv")
    assert (folder / "m.csv").read_text().startswith(",uri,site\n")
    with pytest.raises(ConfigError, match=r"columns number 1 \(of 3\) have no name.*"
                                          r"index=False") as err:
        list_sources(InputConfig(manifest=str(folder / "m.csv")))
    assert err.value.field == "input.manifest"
    # lines that end in a comma: a column with neither name nor value, left out
    (folder / "trailing.csv").write_text("uri,site,\na.wav,x,\nb.wav,y,\n")
    extras = list_sources(InputConfig(manifest=str(folder / "trailing.csv"))).extras
    assert extras is not None and extras.column_names == ["site"]


def test_a_manifest_url_the_job_cannot_use_is_an_error_row(folder: Path) -> None:
    """A chained URL (and an unknown protocol) fails its own recording, not the listing; a
    filesystem cached for it never serves another URL (it used to take plain paths over)."""
    manifest = write_manifest(folder, [("simplecache::memory://rec/a.wav", "x"),
                                       ("nosuchprotocol://b/c.wav", "y"), ("a.wav", "z")])
    items = list_sources(InputConfig(manifest=manifest)).items
    problems = {i.uri: i.problem for i in items}
    assert "chained fsspec URLs" in problems["simplecache::memory://rec/a.wav"]
    assert "nosuchprotocol" in problems["nosuchprotocol://b/c.wav"]
    assert problems[str(folder / "a.wav")] == ""
    assert storage.chained_url_problem("http://[::1]:8080/a.wav") is None


def test_an_unknown_size_is_unknown_not_empty() -> None:
    assert _size({"size": None}) == -1
    assert _size({}) == -1
    assert _size({"size": 0}) == 0
    assert _size({"size": 1234}) == 1234


def tone(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(1600, np.float32), 16_000)
    return path


def test_hidden_files_and_folders_are_not_recordings(tmp_path: Path) -> None:
    """macOS resource forks (``._x.wav``) would each be an error row; an NFS ``.snapshot``
    folder would embed the archive twice."""
    keep = [tone(tmp_path / "site" / "a.wav"), tone(tmp_path / "b.flac")]
    for hidden in ("site/._a.wav", ".snapshot/hourly.0/site/a.wav", ".x.wav"):
        tone(tmp_path / hidden)
    listing = list_sources(InputConfig(uri=str(tmp_path)))
    assert sorted(i.uri for i in listing.items) == sorted(str(p) for p in keep)
    # A glob skips them too, below its first wildcard.
    listing = list_sources(InputConfig(uri=f"{tmp_path}/**/*.wav"))
    assert [i.uri for i in listing.items] == [str(keep[0])]
    # A folder the user names is theirs, dot or not; so is what a glob spells with a dot.
    hidden_root = tone(tmp_path / ".cache" / "c.wav").parent
    assert [i.uri for i in list_sources(InputConfig(uri=str(hidden_root))).items] == [
        str(hidden_root / "c.wav")]
    assert [i.uri for i in list_sources(InputConfig(uri=f"{hidden_root}/*.wav")).items] == [
        str(hidden_root / "c.wav")]
    listing = list_sources(InputConfig(uri=f"{tmp_path}/.snapshot/*/site/*.wav"))
    assert [i.uri for i in listing.items] == [str(tmp_path / ".snapshot/hourly.0/site/a.wav")]
    listing = list_sources(InputConfig(uri=f"{tmp_path}/*/.*.wav"))
    assert [i.uri for i in listing.items] == [str(tmp_path / "site/._a.wav")]


def test_a_folder_of_hidden_recordings_alone_says_so_not_that_it_holds_nothing(
        tmp_path: Path) -> None:
    """Its only recordings under ``.snapshot/`` or as ``._x.wav`` forks: the refusal said
    "it holds no files; check input.uri", below a log line counting them as skipped."""
    tone(tmp_path / ".snapshot" / "a.wav")
    tone(tmp_path / "._b.wav")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(NoInputsError, match=r"it holds only 2 hidden recordings \(a name or "
                                            r"folder starting with '\.', which listing skips"):
        list_sources(InputConfig(uri=str(tmp_path)))
    with pytest.raises(NoInputsError, match=r"the glob matches only 1 hidden recording \("):
        list_sources(InputConfig(uri=f"{tmp_path}/*.wav"))
    (tmp_path / ".snapshot" / "a.wav").unlink()
    (tmp_path / "._b.wav").unlink()
    with pytest.raises(NoInputsError, match=r"it holds no files; check input.uri"):
        list_sources(InputConfig(uri=str(tmp_path)))


def test_symlinks_are_followed_as_find_dash_l_does(tmp_path: Path) -> None:
    """fsspec's walk skipped a linked folder (its recordings silently not listed) and gave a
    linked file the link's mtime (a rewritten target was never embedded again)."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    archive = tmp_path / "archive"
    plain = tone(archive / "2023" / "a.wav")
    elsewhere = tone(tmp_path / "disk2" / "2024" / "b.wav").parent
    (archive / "2024").symlink_to(elsewhere, target_is_directory=True)
    target = tone(tmp_path / "store" / "c.wav").rename(tmp_path / "store" / "c.data")
    (archive / "c.wav").symlink_to(target)
    (archive / "2023" / "loop").symlink_to(archive, target_is_directory=True)
    (archive / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    expected = [str(archive / "2023/a.wav"), str(archive / "2024/b.wav"), str(archive / "c.wav"),
                str(archive / "gone.wav")]
    for uri in (str(archive), f"{archive}/**/*.wav"):
        listing = list_sources(InputConfig(uri=uri))
        assert [i.uri for i in listing.items] == expected, uri
    assert [i.uri for i in list_sources(InputConfig(uri=f"{archive}/*/*.wav")).items] == \
        expected[:2]
    by_uri = {i.uri: i for i in listing.items}
    assert by_uri[str(archive / "gone.wav")].size_bytes == -1
    # A regular file's id is the one fsspec's own listing gave it: outputs resume.
    info = LocalFileSystem().info(str(plain))
    assert by_uri[str(plain)].recording_id == sources.recording_id(str(plain),
                                                                   sources.source_version(info))
    # A linked file is versioned by its target, as a manifest naming it sees it.
    before = by_uri[str(archive / "c.wav")].recording_id
    os.utime(target, (1e9, 1e9))
    again = {i.uri: i for i in list_sources(InputConfig(uri=str(archive))).items}
    assert again[str(archive / "c.wav")].recording_id != before
    manifest = archive.parent / "m.csv"
    manifest.write_text(f"uri\n{archive / 'c.wav'}\n")
    listed = list_sources(InputConfig(manifest=str(manifest))).items[0]
    assert listed.recording_id == again[str(archive / "c.wav")].recording_id


def test_links_into_the_archive_never_rename_what_is_reached_without_one(
        tmp_path: Path) -> None:
    """Each real folder is listed once: under the path first reached, a link sorted before
    the folder it points to (``Latest``, a hidden ``.current``) renamed its recordings (new
    ids: embedded again) or hid them."""
    from fsspec.implementations.local import LocalFileSystem

    plain = [tone(tmp_path / "data" / "2024" / "r1.wav"), tone(tmp_path / "site" / "x" / "r2.wav")]
    (tmp_path / ".current").symlink_to(tmp_path / "data", target_is_directory=True)
    (tmp_path / "Latest").symlink_to(tmp_path / "site" / "x", target_is_directory=True)
    (tmp_path / "A").symlink_to(tmp_path / "site", target_is_directory=True)
    fs = LocalFileSystem()
    expected = [(str(p), sources.recording_id(str(p), sources.source_version(fs.info(str(p)))))
                for p in plain]
    for uri in (str(tmp_path), f"{tmp_path}/**/*.wav", f"{tmp_path}/*/*/*.wav"):
        listing = list_sources(InputConfig(uri=uri))
        assert [(i.uri, i.recording_id) for i in listing.items] == expected, uri
    assert [i.uri for i in list_sources(InputConfig(uri=f"{tmp_path}/s*/*/*.wav")).items] == [
        str(plain[1])]
    for missing in (f"{tmp_path}/nowhere/*.wav", f"{plain[0]}/*.wav"):  # as fsspec's glob
        with pytest.raises(NoInputsError):
            list_sources(InputConfig(uri=missing))


def test_which_path_a_folder_many_links_reach_is_listed_under(tmp_path: Path) -> None:
    """The first link in path order, whatever links come later; a visible link into a
    hidden folder, not the hidden path (its recordings were skipped as hidden); and at a
    limited depth, each path that the depth allows (a folder seen deeper lost its files)."""
    shared = tone(tmp_path / "out" / "o.wav").parent
    root = tmp_path / "root"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        (root / name / "l").symlink_to(shared, target_is_directory=True)
    assert [i.uri for i in list_sources(InputConfig(uri=str(root))).items] == [
        str(root / "a" / "l" / "o.wav")]
    versions = tone(tmp_path / "v" / ".versions" / "v3" / "x.wav").parent
    (tmp_path / "v" / "current").symlink_to(versions, target_is_directory=True)
    for uri in (str(tmp_path / "v"), f"{tmp_path / 'v'}/*/*.wav"):
        assert [i.uri for i in list_sources(InputConfig(uri=uri)).items] == [
            str(tmp_path / "v" / "current" / "x.wav")], uri
    m = tmp_path / "d"
    tone(m / "m" / "b" / "x.wav"), tone(m / "m" / "b" / "c" / "y.wav")
    (m / "a").symlink_to(m / "m" / "b", target_is_directory=True)
    assert [i.uri for i in list_sources(InputConfig(uri=f"{m}/*/*/*.wav")).items] == [
        str(m / "a" / "c" / "y.wav"), str(m / "m" / "b" / "x.wav")]
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(NoInputsError, match="does not exist"):
        list_sources(InputConfig(uri=str(tmp_path / "loop" / "x")))


def test_a_fifo_named_like_a_recording_is_said_not_skipped_silently(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A FIFO (or socket, or device) is no recording to open, and is not listed; it was
    left out without a word, so a listing of 13 of 14 ``.wav`` entries said nothing."""
    import os

    tone(tmp_path / "a.wav")
    os.mkfifo(tmp_path / "pipe.wav")
    with caplog.at_level("WARNING"):
        listing = list_sources(InputConfig(uri=str(tmp_path)))
    assert [i.uri for i in listing.items] == [str(tmp_path / "a.wav")]
    assert (f"1 entries that are neither files nor folders (FIFOs, sockets, devices) were not "
            f"listed, e.g. {tmp_path / 'pipe.wav'}") in caplog.text


def test_a_folder_that_cannot_be_read_is_said_not_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """fsspec's walk omits a folder it cannot read: the job said "succeeded" over an
    archive missing it, and "no recordings found" for a folder it may not read."""
    import os

    tone(tmp_path / "ok" / "a.wav")
    locked = tone(tmp_path / "locked" / "b.wav").parent
    real_scandir = os.scandir

    def scandir(path):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level("WARNING"):
        listing = list_sources(InputConfig(uri=str(tmp_path)))
    assert [i.uri for i in listing.items] == [str(tmp_path / "ok" / "a.wav")]
    assert f"1 folders could not be read and were not listed, e.g. {locked}" in caplog.text
    with pytest.raises(ConfigError, match=r"permission denied \(PermissionError.*check its "
                                          r"permissions$") as err:
        list_sources(InputConfig(uri=str(locked)))
    assert err.value.field == "input.uri" and str(locked) in str(err.value)


def test_manifest_rows_naming_a_folder_or_a_file_url(folder: Path) -> None:
    """A folder was read as a recording (an "unexpected" error, retried by every run); a
    ``file://`` URL as ``Path.as_uri()`` writes it (``%20``) named no file."""
    spaced = tone(folder / "with space.wav")
    literal = tone(folder / "rec%20one.wav")  # named so: taken literally, as before
    (folder / "sub").mkdir()
    manifest = write_manifest(folder, [("sub", "x"), (spaced.as_uri(), "y"),
                                       (f"file://{literal}", "z")])
    by_uri = {i.uri: i for i in list_sources(InputConfig(manifest=manifest)).items}
    assert by_uri[str(folder / "sub")].problem.startswith("IsADirectoryError: ")
    assert by_uri[str(spaced)].problem == "" and by_uri[str(spaced)].size_bytes > 0
    assert by_uri[str(literal)].problem == ""


def test_manifest_columns_named_twice_are_refused_as_such(folder: Path) -> None:
    """They were refused as names that "differ only by case"."""
    path = folder / "m.tsv"
    path.write_text("uri\tsite\tsite\na.wav\tx\ty\n")
    with pytest.raises(ConfigError, match=r"\['site'\] appear more than once"):
        list_sources(InputConfig(manifest=str(path)))


def test_a_manifest_whose_objects_all_refuse_the_credentials_stops_before_any_work(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong key made every row an error row, after looking every object up; one refused
    object among others is an error row, which later runs try again."""
    from fsspec.implementations.local import LocalFileSystem

    real_info = LocalFileSystem.info

    def info(self, path, **kwargs):
        if "denied" in str(path):
            raise PermissionError("Forbidden")
        return real_info(self, path, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "info", info)
    denied = [(f"denied/{i}.wav", "x") for i in range(3)]
    with pytest.raises(ConfigError, match=r"all 3 objects looked up first were refused, "
                                          r"e.g. .*denied/0.wav: access refused "
                                          r".*check the credentials in input.storage_options "
                                          r"or the environment$") as err:
        list_sources(InputConfig(manifest=write_manifest(folder, denied)))
    assert err.value.field == "input.manifest"
    items = list_sources(InputConfig(manifest=write_manifest(folder, [*denied, ("a.wav", "y")])))
    problems = sorted(i.problem.split(" ")[0] for i in items.items)
    assert problems == ["", "PermissionError:", "PermissionError:", "PermissionError:"]
    # Rows that name their versions are not looked up: the one refused is an error row.
    path = folder / "given.csv"
    path.write_text("uri,source_version\na.wav,ETag=1\nb.wav,ETag=2\ndenied/c.wav,\n")
    items = list_sources(InputConfig(manifest=str(path)))
    assert sorted(i.problem.split(":")[0] for i in items.items) == ["", "", "PermissionError"]


def test_an_existing_path_with_glob_characters_is_taken_literally(tmp_path: Path) -> None:
    rec = tone(tmp_path / "Site [A]" / "rec?1.wav")
    assert [i.uri for i in list_sources(InputConfig(uri=str(rec.parent))).items] == [str(rec)]
    assert [i.uri for i in list_sources(InputConfig(uri=str(rec))).items] == [str(rec)]
    # A pattern that names no file is still a glob.
    globbed = list_sources(InputConfig(uri=str(tmp_path / "Site*" / "*.wav")))
    assert [i.uri for i in globbed.items] == [str(rec)]


def test_a_versioned_object_url_keeps_its_extension() -> None:
    from pipeline.sources import _extensions

    assert "wav" in _extensions("bucket/x.wav?versionId=3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY")
    assert _extensions("bucket/take.2.flac") == {"flac"}


def test_one_s3_object_has_one_version_however_it_was_listed() -> None:
    """s3fs's shapes (s3fs/core.py): a folder listing's entry has the ETag only; info()
    (a HEAD, as for a single file or a manifest URI) adds VersionId on versioned buckets."""
    from pipeline.sources import source_version

    listed = {"name": "b/x.wav", "type": "file", "size": 10, "ETag": '"9a0364b9e99bb480"',
              "LastModified": "2026-11-01T00:00:00Z", "StorageClass": "STANDARD"}
    headed = {**listed, "VersionId": "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY",
              "ContentType": "audio/wav"}
    assert source_version(listed) == source_version(headed) == "ETag=9a0364b9e99bb480"
    assert source_version({"VersionId": "v1", "size": 3}) == "VersionId=v1"


def test_an_http_servers_digest_is_the_objects_version() -> None:
    """A server that says only ``Digest`` (RFC 3230) and a date: the digest changes with the
    content, the date may not (a copy that keeps mtimes), so the digest is the version."""
    from pipeline.sources import source_version

    info = {"size": 10, "Digest": "sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=",
            "Last-Modified": "Mon, 02 Nov 2026 10:00:00 GMT"}
    assert source_version(info) == "Digest=sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="


def test_an_http_object_replaced_by_one_of_the_same_size_is_a_new_version(tmp_path) -> None:
    """Python's http.server sends no ETag, only Last-Modified: a re-exported WAV of the same
    size kept its version (``size=…,mtime=``) and was never embedded again."""
    import os

    from pipeline import storage
    from pipeline.sources import source_version
    from tests.conftest import serving

    (tmp_path / "a.wav").write_bytes(b"RIFF" + bytes(100))
    with serving(tmp_path) as base:
        fs, path = storage.url_to_fs(f"{base}/a.wav")
        before = source_version(fs.info(path))
        (tmp_path / "a.wav").write_bytes(b"RIFF" + bytes(range(100)))
        later = os.stat(tmp_path / "a.wav").st_mtime + 60
        os.utime(tmp_path / "a.wav", (later, later))
        after = source_version(fs.info(path))
    assert before.startswith("size=104,mtime=") and before != "size=104,mtime="
    assert after != before


def test_relative_manifest_uris_in_a_bucket_are_normalised() -> None:
    """An object store takes a key literally: "m/./a.wav" would be another, missing object,
    and a second recording of a.wav."""
    from pipeline.sources import resolve_relative

    assert resolve_relative("./a.wav", "s3://rec/m") == "s3://rec/m/a.wav"
    assert resolve_relative("a.wav", "s3://rec/m") == "s3://rec/m/a.wav"
    assert resolve_relative("../a/aru_1.wav", "gs://rec/m") == "gs://rec/a/aru_1.wav"
    assert resolve_relative("s3://other/x.wav", "s3://rec/m") == "s3://other/x.wav"


def test_a_local_manifests_home_folder_is_the_home_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``~/rec/a.wav`` names what ``input.uri: ~/rec/a.wav`` names (fsspec expands it), not
    a folder named ``~`` beside the manifest; in a bucket, and as ``~a.wav``, it is a name."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    home.mkdir()
    sf.write(home / "a.wav", np.zeros(1600, np.float32), 16_000)
    manifest = tmp_path / "m" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("uri,site\n~/a.wav,x\n")
    listed = list_sources(InputConfig(manifest=str(manifest)))
    assert [i.uri for i in listed.items] == [str(home / "a.wav")]
    assert listed.items[0].version != MISSING
    from pipeline.sources import resolve_relative

    assert resolve_relative("~/a.wav", "s3://rec/m") == "s3://rec/m/~/a.wav"
    assert resolve_relative("~a.wav", str(tmp_path)) == f"{tmp_path}/~a.wav"


def test_a_file_url_naming_a_file_literally_is_not_read_decoded(tmp_path: Path) -> None:
    """``rec%20one.wav`` exists, and so does ``rec one.wav``: the row names the first (only
    a URL naming no file is read percent-decoded)."""
    from pipeline.sources import resolve_relative

    (tmp_path / "rec%20one.wav").write_bytes(b"RIFF")
    (tmp_path / "rec one.wav").write_bytes(b"RIFF")
    literal = f"file://{tmp_path}/rec%20one.wav"
    assert resolve_relative(literal, str(tmp_path)) == literal
    (tmp_path / "rec%20one.wav").unlink()
    assert resolve_relative(literal, str(tmp_path)) == f"file://{tmp_path}/rec one.wav"


def test_a_glob_fsspec_refuses_names_the_field(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16_000)
    with pytest.raises(ConfigError, match=r"not a glob fsspec takes") as err:
        list_sources(InputConfig(uri=f"{tmp_path}/**.wav"))
    assert err.value.field == "input.uri"


def test_refused_credentials_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline import cli

    class NoCredentialsError(Exception):  # botocore's, by name: the CLI does not import it
        pass

    from gcsfs.retry import HttpError, validate_response

    class Wrapped(Exception):
        pass

    wrapped = Wrapped("listing failed")
    wrapped.__cause__ = HttpError({"code": 401, "message": "Invalid Credentials"})
    try:  # gcsfs's own 403: a bare OSError, no status
        validate_response(403, b'{"error": {"message": "x@p.iam.gserviceaccount.com does not '
                          b'have storage.objects.list access"}}', "b/o")
    except OSError as err:
        gcs_forbidden = err
    for err in (PermissionError("Forbidden: https://rec.s3.amazonaws.com/a?X-Amz-Signature=s3cr3t"),
                NoCredentialsError("Unable to locate credentials"),
                gcs_forbidden, wrapped):
        def refused(args, err=err):
            raise err
        monkeypatch.setattr(cli, "cmd_run", refused)
        assert cli.main(["run", "job.yaml"]) == 2
        shown = capsys.readouterr().err
        assert shown.startswith("embed-archive: error: access refused") and "s3cr3t" not in shown
        assert shown.count("\n") == 1

    def not_found(args):
        raise HttpError({"code": 404, "message": "No such object: rec/a.wav"})
    monkeypatch.setattr(cli, "cmd_run", not_found)
    with pytest.raises(HttpError):  # not a refusal: the traceback is the report
        cli.main(["run", "job.yaml"])


def test_a_manifest_the_server_refuses_or_lacks_says_so_in_one_line(folder: Path) -> None:
    """An http manifest answering 403 was a traceback through aiohttp; a 404 said only its
    URL."""
    from tests.conftest import serving

    write_manifest(folder, [("a.wav", "x")])
    with serving(folder, forbidden={"manifest.csv"}) as base:
        with pytest.raises(ConfigError, match=r"cannot read manifest .*: access refused "
                                              r"\(ClientResponseError: 403") as err:
            list_sources(InputConfig(manifest=f"{base}/manifest.csv"))
        assert err.value.field == "input.manifest"
        with pytest.raises(ConfigError, match=r"cannot read manifest .*: no such file or object"):
            list_sources(InputConfig(manifest=f"{base}/other.csv"))


# --------------------------------------------------------------------------- given versions


def test_a_manifest_naming_versions_is_taken_at_its_word_with_the_ids_a_listing_gives(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest made from the job's own rows (source_uri, source_version, source_bytes)
    lists the same recordings, by the same ids, as listing the folder did, without one
    lookup; a row without a version is looked up; neither column becomes metadata."""
    listed = list_sources(InputConfig(uri=str(folder))).items
    path = folder / "manifest.csv"
    with path.open("w", newline="") as fh:  # a local file's version has a comma in it
        csv.writer(fh).writerows([
            ("uri", "source_version", "source_bytes", "site"),
            (listed[0].uri, listed[0].version, listed[0].size_bytes, "x"),
            (listed[1].uri, "", "", "y"), (folder / "gone.wav", "generation=7", "", "z")])
    looked_up: list[str] = []
    real_stat = sources._stat_manifest_uri
    monkeypatch.setattr(sources, "_stat_manifest_uri",
                        lambda uri, *a: looked_up.append(uri) or real_stat(uri, *a))
    listing = list_sources(InputConfig(manifest=str(path)))
    assert looked_up == [listed[1].uri]
    by_uri = {i.uri: i for i in listing.items}
    for item in listed:
        assert by_uri[item.uri].recording_id == item.recording_id
        assert by_uri[item.uri].size_bytes == item.size_bytes
    gone = by_uri[str(folder / "gone.wav")]  # not looked up: it fails when it is read
    assert (gone.version, gone.size_bytes, gone.problem) == ("generation=7", -1, "")
    assert listing.extras is not None and listing.extras.column_names == ["site"]


@pytest.mark.parametrize(("header", "row", "message"), [
    ("uri,source_bytes", "a.wav,10", "source_bytes but no source_version"),
    ("uri,source_version,source_bytes", "a.wav,ETag=1,big", "source_bytes is string"),
    ("uri,source_version,source_bytes", "a.wav,ETag=1,1.5", "source_bytes is double"),
    ("uri,source_version", "a.wav,ETag=1\n./a.wav,ETag=1\na.wav,ETag=2",
     r"gives 1 object\(s\) two versions .*a.wav: 'ETag=1' and 'ETag=2'"),
    # two spellings of one object are one recording: the first row would silently win
    ("uri,source_version", "s3a://b/x.wav,ETag=1\ns3://b/x.wav,ETag=2",
     r"gives 1 object\(s\) two versions .*s3://b/x.wav: 'ETag=1' and 'ETag=2', rows 1 and 2"),
    ("uri,Source_Version", "a.wav,ETag=1", "clash with columns the job writes"),
])
def test_given_columns_that_cannot_be_meant_are_refused(folder: Path, header: str, row: str,
                                                        message: str) -> None:
    path = folder / "manifest.csv"
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(ConfigError, match=message) as err:
        list_sources(InputConfig(manifest=str(path)))
    assert err.value.field == "input.manifest"


def test_what_an_output_writes_for_the_unknown_is_looked_up_or_asked_for(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An error row's version (``missing``) is no version: the object is looked up, so one
    that has arrived since is embedded; an unknown size (-1, or a gap pandas wrote as NaN)
    is asked of the store when the object is read; a bare token is taken, with a warning
    that a listing's ids would differ."""
    pd_like = pa.table({"uri": ["a.wav", "b.wav", "c.wav"],
                        "source_version": [MISSING, "ETag=7", "d41d8cd98f00"],
                        "source_bytes": pa.array([-1.0, float("nan"), 3244.0])})
    pq.write_table(pd_like, folder / "m.parquet")
    listing = list_sources(InputConfig(manifest=str(folder / "m.parquet")))
    a, b, c = listing.items
    assert a.version.startswith("size=") and a.size_bytes > 0  # looked up: it is there now
    assert (b.version, b.size_bytes, c.version, c.size_bytes) == (
        "ETag=7", -1, "d41d8cd98f00", 3244)
    assert "1 source_version value(s) such as 'd41d8cd98f00'" in caplog.text


def test_an_object_listed_once_with_its_version_and_once_without_is_not_refused(
        folder: Path) -> None:
    """A manifest made from an output: the object failed once (``missing``: no version) and
    was embedded later (``ETag=7``). A row without a version gives none to disagree with:
    the first row is taken, and the object is one recording."""
    rows = pa.table({"uri": ["a.wav", "a.wav", "b.wav", "b.wav"],
                     "source_version": [MISSING, "ETag=7", "ETag=8", ""]})
    pq.write_table(rows, folder / "m.parquet")
    listing = list_sources(InputConfig(manifest=str(folder / "m.parquet")))
    a, b = listing.items
    assert a.version.startswith("size=") and b.version == "ETag=8"


def _signed(base: str, name: str, date: str) -> str:
    """``name`` under ``base`` as an S3 SigV4 presigned URL made at ``date``."""
    return (f"{base}/{name}?versionTag=7&X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential=AKIAFAKE%2F{date[:8]}%2Fus-east-1%2Fs3%2Faws4_request"
            f"&X-Amz-Date={date}&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
            f"&X-Amz-Signature=sig{date}")


def test_a_manifest_signed_again_names_the_same_recordings(folder: Path) -> None:
    """Presigned URLs expire, so every rerun gets them signed anew: the signature, date and
    expiry made each run's recordings new ones (all embedded again, every row twice)."""
    from tests.conftest import serving

    with serving(folder) as base:
        runs = []
        for date in ("20261101T000000Z", "20261122T120000Z"):
            manifest = folder / f"m-{date}.csv"
            manifest.write_text("uri\n" + "".join(f"{_signed(base, n, date)}\n"
                                                  for n in ("a.wav", "b.wav")))
            runs.append(list_sources(InputConfig(manifest=str(manifest))).items)
        gone = folder / "m-gone.csv"
        gone.write_text(f"uri\n{_signed(base, 'gone.wav', '20261122T120000Z')}\n")
        missing = list_sources(InputConfig(manifest=str(gone))).items[0]
        with pytest.raises(ConfigError) as err:
            list_sources(InputConfig(manifest=_signed(base, "nope.csv", "20261122T120000Z")))
    first, again = runs
    assert [i.recording_id for i in first] == [i.recording_id for i in again]
    assert [i.uri for i in first] == [f"{base}/a.wav?versionTag=7", f"{base}/b.wav?versionTag=7"]
    assert "X-Amz-Signature" in first[0].path  # what is fetched is the signed URL itself
    assert missing.problem and "sig2026" not in missing.problem + missing.uri
    assert "sig2026" not in str(err.value) and "AKIAFAKE" not in str(err.value)


def test_urls_told_apart_only_by_a_masked_value_are_refused_or_named_by_it(
        folder: Path) -> None:
    """``?key=a.wav`` and ``?key=b.wav`` were both named ``?key=***``, and the second row was
    dropped as the first's duplicate (a recording lost, with a warning of duplicates). Such
    rows are refused before any work, naming them and the parameter; where it names the
    object, ``input.name_params`` shows it, and each row is a recording of its own."""
    base = "https://h.example"
    manifest = folder / "m.csv"
    manifest.write_text("uri,site,source_version\n" + "".join(
        f"{base}/get?key={n}&part=1,{n},ETag={e}\n"
        for n, e in (("a.wav", "e1"), ("b.wav", "e2"), ("a.wav", "e1"))))
    with pytest.raises(ConfigError, match=r"rows 1 and 2 name two objects .* differ only "
                                          r"in the value of key") as err:
        list_sources(InputConfig(manifest=str(manifest)))
    assert err.value.field == "input.name_params" and "a.wav" not in str(err.value)
    listing = list_sources(InputConfig(manifest=str(manifest), name_params=("KEY",)))
    assert [i.uri for i in listing.items] == [f"{base}/get?key={n}&part=1"
                                              for n in ("a.wav", "b.wav")]
    assert listing.extras is not None
    assert [listing.extras.column("site")[i.row].as_py() for i in listing.items] == [
        "a.wav", "b.wav"]


def test_one_object_under_two_tokens_is_one_recording(folder: Path) -> None:
    """A token that changes (``?token=T1``, ``?token=T2``) names no object: rows of one
    version are one recording, named as ever, whichever token a run was given."""
    names = []
    for tokens in (("T0", "T1"), ("T2", "T3")):
        manifest = folder / "m.csv"
        manifest.write_text("uri,source_version\n" + "".join(
            f"https://h.example/a.wav?token={t},ETag=abc\n" for t in tokens))
        names.append([(i.uri, i.recording_id)
                      for i in list_sources(InputConfig(manifest=str(manifest))).items])
    assert names[0] == names[1] and [u for u, _ in names[0]] == ["https://h.example/a.wav?token=***"]


@pytest.mark.parametrize("url", [
    "https://b.s3.amazonaws.com/k.wav?AWSAccessKeyId=AKIA&Expires=1795468390&Signature=abc%3D",
    "https://d1.cloudfront.net/k.wav?Expires=1795468390&Signature=abc~&Key-Pair-Id=K2JCJMDEHXQW5F",
    ("https://storage.googleapis.com/b/k.wav?X-Goog-Algorithm=GOOG4-RSA-SHA256"
    "&X-Goog-Credential=sa%40p.iam&X-Goog-Date=20261122T000000Z&X-Goog-Expires=900"
    "&X-Goog-SignedHeaders=host&X-Goog-Signature=0a1b"),
    ("https://acct.blob.core.windows.net/c/k.wav?sv=2024-11-04&se=2026-11-23T00%3A00%3A00Z"
    "&sr=b&sp=r&sig=abc%3D"),
])
def test_signing_parameters_are_not_part_of_an_objects_name(url: str) -> None:
    assert storage.unsigned_uri(url) == url.partition("?")[0]
    plain = "https://example.org/k.wav?st=3&sp=r"  # unsigned: its parameters are its name
    assert storage.unsigned_uri(plain) == plain
    # Parameters named like another scheme's stay: two clips of one file are two objects.
    clips = [f"https://api.example.org/clip?file=r.wav&st={a}&se={b}&sig={s}"
             for a, b, s in ((0, 60, "A"), (60, 120, "B"))]
    assert len({storage.unsigned_uri(c) for c in clips}) == 2


def test_an_object_key_with_a_question_mark_is_taken_literally() -> None:
    """`q?key=1.flac` and `q?key=2.flac` on S3 or GCS were both named `q?key=***` and one of
    them was dropped as a duplicate of the other: only HTTP(S) URLs have a query."""
    for uri in ("s3://rin/a/q?key=1.flac", "gs://rin/a/q?token=2.flac"):
        assert redact.uri(uri) == uri
        assert storage.unsigned_uri(uri) == uri
    assert redact.uri("https://h/x?token=abc&part=1") == "https://h/x?token=***&part=1"
    for other in ("simplecache::https://h/a.wav?X-Amz-Signature=S3CR3T", "ftp://h/a?password=S3CR3T",
                  " https://h/a?sig=S3CR3T"):  # no object store: masked, as before
        assert "S3CR3T" not in redact.uri(other), other


def test_extensions_match_whatever_their_case(tmp_path: Path) -> None:
    """Field recorders write ``X.WAV``; a config may say ``[WAV, flac]``."""
    for name, fmt in (("a.WAV", "WAV"), ("b.Flac", "FLAC"), ("c.wav", "WAV"), ("notes.txt", "WAV")):
        sf.write(tmp_path / name, np.zeros(160, np.float32), 16_000, format=fmt)
    for extensions in (["wav", "flac"], ["WAV", "FLAC"]):
        listed = list_sources(InputConfig(uri=str(tmp_path), extensions=tuple(extensions)))
        assert sorted(Path(i.uri).name for i in listed.items) == ["a.WAV", "b.Flac", "c.wav"]


def test_recursive_false_lists_the_folder_itself_only(tmp_path: Path) -> None:
    for path in (tmp_path / "top.wav", tmp_path / "2024" / "deep.wav"):
        path.parent.mkdir(exist_ok=True)
        sf.write(path, np.zeros(160, np.float32), 16_000)
    names = {flag: sorted(Path(i.uri).name for i in list_sources(
        InputConfig(uri=str(tmp_path), recursive=flag)).items) for flag in (True, False)}
    assert names == {True: ["deep.wav", "top.wav"], False: ["top.wav"]}


def test_an_objects_version_is_its_most_specific_token() -> None:
    """GCS gives both a generation and an ETag: the generation names the version (taking
    the ETag instead would rename every GCS recording of an output written before). With
    neither, size and mtime to the microsecond: a same-size rewrite within a second is a
    new version."""
    import datetime

    both = {"generation": "1732000000123456", "etag": "CJ+u", "size": 10}
    assert sources.source_version(both) == "generation=1732000000123456"
    when = datetime.datetime(2026, 11, 24, 7, 0, 0, 250_000, tzinfo=datetime.UTC)
    later = when + datetime.timedelta(microseconds=500)
    versions = {sources.source_version({"size": 10, "mtime": t}) for t in (when, later)}
    assert len(versions) == 2
    assert sources.source_version({"size": 10, "mtime": when}).endswith(".250000")


def test_a_shards_id_names_all_its_recordings() -> None:
    """Two shards sharing their first recording are two shards: an id of the first alone
    would let a rerun take one for the other, committed."""
    def items(*ids: str) -> list:
        return [sources.SourceItem(uri=f"/{r}", path=f"/{r}", size_bytes=1, version="v",
                                   recording_id=r) for r in ids]

    [(one, _)] = sources.plan_shards(items("a", "b"), 2)
    [(other, _)] = sources.plan_shards(items("a", "c"), 2)
    [(again, _)] = sources.plan_shards(items("a", "b"), 2)
    assert one != other and one == again


def test_a_shard_of_a_changed_object_is_another_shard() -> None:
    """The same objects, one of them rewritten since (a new version, a new recording id):
    its shard must not take the id of the shard committed for the old version, which a
    rerun would read as already done (or overwrite)."""
    def items(version: str) -> list:
        return [sources.SourceItem(uri=f"/{n}.wav", path=f"/{n}.wav", size_bytes=1,
                                   version=version,
                                   recording_id=sources.recording_id(f"/{n}.wav", version))
                for n in ("a", "b")]

    [(before, _)] = sources.plan_shards(items("ETag=1"), 2)
    [(after, _)] = sources.plan_shards(items("ETag=2"), 2)
    assert before != after


def test_a_folder_of_other_extensions_says_what_it_holds_not_check_the_path(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A folder of AIFFs (a container decoding reads) failed with "check input.uri", as if
    the path were wrong: the message now counts what the listing skipped, by extension, and
    names the setting. Files the job would not read anyway (hidden, text) are no hint."""
    (tmp_path / "site").mkdir()
    for name in ("r0.aiff", "site/r1.AIFF", "site/r2.aiff"):
        sf.write(tmp_path / name, np.zeros(160, np.float32), 16_000, format="AIFF")
    for name in ("notes.txt", "log.txt", "README", ".DS_Store", "site/._r1.aiff"):
        (tmp_path / name).write_text("x")
    with pytest.raises(NoInputsError) as err:
        list_sources(InputConfig(uri=str(tmp_path)))
    assert str(err.value) == (
        f"no recordings found at {tmp_path} with extensions wav, flac, ogg, oga, opus, mp3; "
        "it holds 6 files ending .aiff (3), .txt (2), no extension (1): add the audio ones "
        "to input.extensions (e.g. --set input.extensions=wav,flac,ogg,oga,opus,mp3,aiff)")
    with pytest.raises(NoInputsError, match=r"the glob matches 2 files ending \.txt \(2\), "
                                            "none of them audio the job decodes; check input.uri"):
        list_sources(InputConfig(uri=f"{tmp_path}/*.txt"))
    with pytest.raises(NoInputsError, match="the glob matches no files; check input.uri"):
        list_sources(InputConfig(uri=f"{tmp_path}/*.wav"))
    # Some matched: the rest are counted in one line, from the same listing.
    with caplog.at_level("INFO", logger="pipeline.sources"):
        listed = list_sources(InputConfig(uri=str(tmp_path), extensions=("aiff",)))
    assert len(listed.items) == 3
    assert (f"skipped 3 files with other extensions (.txt 2, no extension 1) under {tmp_path}"
            in caplog.text)


def test_a_manifest_given_as_input_uri_is_named_as_one(tmp_path: Path) -> None:
    manifest = tmp_path / "metadata.csv"
    manifest.write_text("uri,site\na.wav,x\n")
    with pytest.raises(NoInputsError, match=r"it is a \.csv file: if it lists the recordings, "
                                            "give it as input.manifest"):
        list_sources(InputConfig(uri=str(manifest)))
    one = tone(tmp_path / "take.w64").rename(tmp_path / "take.W64")
    with pytest.raises(NoInputsError, match=r"it is a \.w64 file: add w64 to input.extensions"):
        list_sources(InputConfig(uri=str(one)))


def test_a_json_manifest_that_is_not_json_lines_is_refused_saying_what_it_takes(
        folder: Path) -> None:
    """pandas' ``to_json`` writes neither shape by default: an array of rows read as
    "Column() changed from object to array in row 0", and its default, one object of
    columns, was listed as one recording named by the text of a dict (a missing file)."""
    rows = [{"uri": "a.wav", "site": "x"}, {"uri": "b.wav", "site": "y"}]
    array = folder / "records.json"
    array.write_text(json.dumps(rows))
    with pytest.raises(ConfigError, match=r"is a JSON array; a JSON manifest is one object "
                                          r"per line .*orient='records', lines=True") as err:
        list_sources(InputConfig(manifest=str(array)))
    assert err.value.field == "input.manifest"
    columns = folder / "columns.json"
    columns.write_text(json.dumps({"uri": {"0": "a.wav", "1": "b.wav"},
                                   "site": {"0": "x", "1": "y"}}))
    with pytest.raises(ConfigError, match=r"'uri' column is struct<.*>, not text: each row "
                                          r"names one recording") as err:
        list_sources(InputConfig(manifest=str(columns)))
    assert err.value.field == "input.manifest"
    lines = folder / "lines.json"
    lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
    listed = list_sources(InputConfig(manifest=str(lines)))
    assert [Path(i.uri).name for i in listed.items] == ["a.wav", "b.wav"]


@pytest.mark.parametrize(("text", "hint"), [
    ("URI,site\na.wav,x\n", r"\(columns: 'URI', 'site'\): rename 'URI' to 'uri'"),
    (" uri,site\na.wav,x\n", r"\(columns: ' uri', 'site'\): rename ' uri' to 'uri'"),
    ("uri;site\na.wav;x\n",
     r"\(columns: 'uri;site'\); its header reads as one column: the file is separated by ';'"),
])
def test_a_manifest_without_a_uri_column_says_what_it_most_likely_meant(
        folder: Path, text: str, hint: str) -> None:
    """A spreadsheet's header (``URI``, a stray space) or its semicolon-separated CSV was
    refused as having no 'uri' column, the near miss left for the user to spot."""
    manifest = folder / "manifest.csv"
    manifest.write_text(text)
    with pytest.raises(ConfigError, match=hint) as err:
        list_sources(InputConfig(manifest=str(manifest)))
    assert err.value.field == "input.manifest"


@pytest.mark.parametrize(("text", "line"), [
    (b"uri,site\na.wav,R\xedo Negro\n", 2),  # a value: read as raw bytes, a blob in every row
    (b"uri,localit\xe9\na.wav,x\n", 1),  # the header: a UnicodeDecodeError, a traceback
])
def test_a_manifest_saved_as_cp1252_is_refused_naming_the_line(
        folder: Path, text: bytes, line: int) -> None:
    """What Excel on Windows saves as 'CSV (Comma delimited)'; a BOM (its 'CSV UTF-8') is
    read as it always was."""
    manifest = folder / "manifest.csv"
    manifest.write_bytes(text)
    with pytest.raises(ConfigError, match=rf"is not UTF-8 text \(byte 0x\w\w on line {line}, "
                                          r".*save it as 'CSV UTF-8'") as err:
        list_sources(InputConfig(manifest=str(manifest)))
    assert err.value.field == "input.manifest"
    manifest.write_bytes(b"\xef\xbb\xbf" + text.decode("cp1252").encode())
    listed = list_sources(InputConfig(manifest=str(manifest)))
    assert listed.extras is not None and listed.extras.schema.types == [pa.string()]
