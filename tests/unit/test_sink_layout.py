"""Schemas, partial pooling and the commit layout, without Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import layout, storage
from pipeline.layout import OutputLayout
from pipeline.sink import (
    PROVENANCE_KEY,
    STAGE_SCHEMA,
    ShardProgress,
    ShardSources,
    SinkSpec,
    WriteReturn,
    enrich_windows,
    errors_schema,
    file_metadata,
    merge_timing,
    partial_pools,
    recordings_schema,
    reduce_partials,
    windows_schema,
    write_stage,
)


def stage_rows(rng: np.random.Generator, rids: list[str], layers: list[int], dim: int,
               shard: str = "s0") -> pa.Table:
    rows = []
    for rid in rids:
        for w in range(int(rng.integers(1, 6))):
            for layer in layers:
                rows.append({"shard": shard, "recording_id": rid, "channel": -1, "window_index": w,
                             "start_s": w * 1.0, "end_s": w + 2.0, "valid_s": 2.0,
                             "layer": layer, "embedding": rng.standard_normal(dim).astype(np.float32),
                             "meta": ""})
    rng.shuffle(rows)
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def test_partial_pools_reduce_to_exact_mean_and_max() -> None:
    rng = np.random.default_rng(0)
    table = stage_rows(rng, ["a", "b", "c"], [0, 3], 8)
    # Split arbitrarily, as write tasks would receive the rows.
    parts = [partial_pools(table.slice(0, 7)), partial_pools(table.slice(7))]
    for method in ("mean", "max"):
        pooled = reduce_partials(parts, method)
        for rid in "abc":
            for layer in (0, 3):
                mask = [r == rid and l == layer for r, l in zip(
                    table.column("recording_id").to_pylist(), table.column("layer").to_pylist(),
                    strict=True)]
                emb = np.stack(table.filter(pa.array(mask)).column("embedding").to_numpy(
                    zero_copy_only=False))
                count, vec = pooled[(rid, -1, layer)]
                assert count == len(emb)
                expected = emb.mean(axis=0) if method == "mean" else emb.max(axis=0)
                np.testing.assert_allclose(vec, expected, rtol=1e-6, atol=1e-6)


def test_partials_of_layers_of_different_widths_and_channels_reduce_apart() -> None:
    """A model's layers may differ in width (EfficientNet's stages), a recording's channels
    pool apart, and a write task's partials may be slices of a larger table."""
    rng = np.random.default_rng(3)
    rows = []
    for layer, dim in ((1, 5), (4, 12)):
        for channel in (0, 1):
            for rid in ("a", "b"):
                for w in range(int(rng.integers(1, 5))):
                    rows.append({"shard": "s", "recording_id": rid, "channel": channel,
                                 "window_index": w, "start_s": 0.0, "end_s": 1.0,
                                 "valid_s": 1.0, "layer": layer, "meta": "",
                                 "embedding": rng.standard_normal(dim).astype(np.float32)})
    order = rng.permutation(len(rows))
    table = pa.Table.from_pylist([rows[i] for i in order], schema=STAGE_SCHEMA)
    whole = partial_pools(table)
    parts = [whole.slice(0, 3), whole.slice(3, 4), whole.slice(7)]
    for method in ("mean", "max"):
        pooled = reduce_partials(parts, method)
        assert len(pooled) == 8
        for (rid, channel, layer), (count, vec) in pooled.items():
            emb = np.stack([r["embedding"] for r in rows if (r["recording_id"], r["channel"],
                                                             r["layer"]) == (rid, channel, layer)])
            assert count == len(emb) and vec.dtype == np.float32
            expected = emb.mean(axis=0) if method == "mean" else emb.max(axis=0)
            np.testing.assert_allclose(vec, expected, rtol=1e-6, atol=1e-6)
    assert reduce_partials([], "mean") == {}
    with pytest.raises(ValueError, match="unknown recording pooling"):
        reduce_partials(parts, "median")


def test_timings_fold_per_actor_and_into_a_job_summary() -> None:
    from pipeline.summary import EmbedTiming

    def call(actor: str, start: float, busy: float, model: float, windows: int) -> dict:
        return {"type": "timing", "actor": actor, "start": start, "end": start + busy,
                "busy_s": busy, "model_s": model, "windows": windows, "batches": 1}

    per_actor: dict = {}
    for t in (call("a", 110.0, 2.0, 1.5, 16), call("a", 100.0, 2.0, 1.8, 16),
              call("b", 103.0, 1.0, 0.9, 8), call("a", 120.0, 1.0, 0.5, 4)):
        merge_timing(per_actor, t)
    assert per_actor["a"] == {"start": 100.0, "end": 121.0, "busy_s": 5.0, "model_s": 3.8,
                              "windows": 36, "batches": 3}
    job = EmbedTiming.from_actors(per_actor, started=95.0)
    assert (job.actors, job.batches, job.windows) == (2, 4, 44)
    assert job.active_s == pytest.approx(21.0 + 1.0)
    assert job.span_s == pytest.approx(21.0)
    assert job.first_batch_s == pytest.approx(5.0)
    assert job.first_batch_at == pytest.approx(100.0)
    assert job.busy_fraction == pytest.approx(6.0 / 22.0)
    assert EmbedTiming.from_actors({}, 0.0).busy_fraction == 0.0


PROVENANCE = {"job_id": "J", "model_name": "m", "weights_sha256": "w", "config_sha256": "c",
              "code_version": "v"}


def meta_rows(shard: str, *metas: dict) -> pa.Table:
    return pa.Table.from_pylist([
        {"shard": shard, "recording_id": m.get("recording_id", ""), "channel": -1,
         "window_index": -1, "start_s": 0.0, "end_s": 0.0, "meta": json.dumps(m)}
        for m in metas], schema=STAGE_SCHEMA)


def report(rid: str, windows: int, status: str = "ok") -> dict:
    return {"type": "report", "recording_id": rid, "status": status, "windows": {"-1": windows}}


def test_write_stage_returns_let_the_driver_commit_each_shard_when_complete(tmp_path: Path) -> None:
    """Rows of two shards arrive split across write tasks in any order; a shard completes
    exactly when its last window or report arrives, never before, and files are per shard."""
    rng = np.random.default_rng(7)
    layers = [0, 2]
    s1 = stage_rows(rng, ["a", "b"], layers, 4, shard="s1")
    s2 = stage_rows(rng, ["c"], layers, 4, shard="s2")

    def windows_of(table: pa.Table, rid: str) -> int:
        return sum(1 for r, l in zip(table.column("recording_id").to_pylist(),
                                     table.column("layer").to_pylist(), strict=True)
                   if r == rid and l == 0)

    timing = {"type": "timing", "actor": "x", "start": 1.0, "end": 2.0, "busy_s": 1.0,
              "model_s": 0.5, "windows": 3, "batches": 1}
    everything = pa.concat_tables([
        s1, s2, meta_rows("s1", report("a", windows_of(s1, "a")), report("b", windows_of(s1, "b"))),
        meta_rows("s2", report("c", windows_of(s2, "c"))), meta_rows("", timing)])
    order = rng.permutation(everything.num_rows)
    tasks = [everything.take(order[i:i + 5]) for i in range(0, len(order), 5)]
    sources = pa.table({"recording_id": ["a", "b", "c"], "source_uri": ["/x/a", "/x/b", "/x/c"],
                        "source_version": ["1", "2", "3"], "source_bytes": [1, 2, 3]})
    spec = SinkSpec(staging_uri=str(tmp_path / "staging"), storage_options={},
                    sources=ShardSources(sources, {"s1": (0, 2), "s2": (2, 3)}),
                    extras_schema=None, provenance=PROVENANCE, file_metadata={})
    progress = {"s1": ShardProgress("s1", ["a", "b"], layers),
                "s2": ShardProgress("s2", ["c"], layers)}
    completed_at: dict[str, int] = {}
    timings = 0
    for n, task in enumerate(tasks):
        for row in write_stage(task, spec).to_pylist():
            ret = WriteReturn.from_row(row)
            if not ret.shard:
                timings += 1
                assert ret.timing["x"]["windows"] == 3
                continue
            progress[ret.shard].add(ret)
            if progress[ret.shard].complete and ret.shard not in completed_at:
                completed_at[ret.shard] = n
    assert timings == 1
    for shard, table in (("s1", s1), ("s2", s2)):
        # Complete at the task holding its last row, not earlier.
        mine = [n for n, t in enumerate(tasks)
                if shard in t.column("shard").to_pylist()]
        assert completed_at[shard] == max(mine)
        files = progress[shard].files
        assert sum(n for _, n in files) == table.num_rows
        assert all(f"shard={shard}" in p and Path(p).exists() for p, _ in files)
        assert pq.read_table(files[0][0]).column("job_id")[0].as_py() == "J"
    # A retried task writes the same files again (same names), it does not add copies.
    again = {p for r in write_stage(tasks[0], spec).to_pylist()
             for p, _ in WriteReturn.from_row(r).files}
    assert again <= {p for pr in progress.values() for p, _ in pr.files}
    # ...and if the driver ever received rows twice, the counts overshoot: no commit.
    twice = ShardProgress("s2", ["c"], layers)
    ret = WriteReturn.from_row(write_stage(s2, spec).to_pylist()[0])
    twice.add(ret)
    twice.add(ret)
    with pytest.raises(RuntimeError, match="duplicates"):
        twice.add(WriteReturn("s2", reports=[json.dumps(report("c", windows_of(s2, "c")))]))


@pytest.mark.parametrize(("rows", "refused"), [(3, False), (4, True)])
def test_one_window_row_too_many_refuses_the_commit(rows: int, refused: bool) -> None:
    """A recording of 3 windows whose rows arrive 4 times (a task's rows taken twice) is
    never committed: not by a whole shard's worth, not by one row."""
    progress = ShardProgress("s", ["c"], [0])
    partials = pa.table({"recording_id": ["c"], "channel": pa.array([-1], pa.int16()),
                         "layer": pa.array([0], pa.int16()), "count": [rows]})
    progress.add(WriteReturn("s", partials=partials))
    done = WriteReturn("s", reports=[json.dumps(report("c", 3))])
    if refused:
        with pytest.raises(RuntimeError, match="4 window rows, 3 expected"):
            progress.add(done)
    else:
        assert progress.add(done) == {"c"}


def test_shard_progress_counts_dropped_and_failed_recordings() -> None:
    progress = ShardProgress("s", ["ok", "bad", "nan"], [0])
    progress.add(WriteReturn("s", reports=[json.dumps({"type": "report", "recording_id": "bad",
                                                      "status": "error", "windows": {}})]))
    assert progress.waiting == {"ok", "nan"}
    rows = stage_rows(np.random.default_rng(0), ["ok"], [0], 3, shard="s")
    progress.add(WriteReturn("s", partials=partial_pools(rows),
                             reports=[json.dumps(report("ok", rows.num_rows))]))
    assert progress.waiting == {"nan"}
    # Three windows decoded; one came back non-finite and was dropped by the embedder.
    progress.add(WriteReturn("s", reports=[json.dumps(report("nan", 3))]))
    nan_rows = stage_rows(np.random.default_rng(1), ["nan"], [0], 3, shard="s").slice(0, 2)
    progress.add(WriteReturn("s", partials=partial_pools(nan_rows)))
    assert not progress.complete
    progress.add(WriteReturn("s", reports=[json.dumps({"type": "dropped", "recording_id": "nan",
                                                      "windows": [[-1, 2]]})]))
    assert progress.complete
    with pytest.raises(RuntimeError, match="another shard"):
        ShardProgress("s", ["x"], [0]).add(WriteReturn("s", reports=[json.dumps(report("y", 0))]))


def test_output_schemas_are_plain_and_carry_provenance() -> None:
    extras = pa.schema([("site", pa.string()), ("depth_m", pa.float64())])
    meta = {b"embed_archive.provenance": b"{}"}
    for schema in (windows_schema(extras, meta), recordings_schema(extras, meta),
                   errors_schema(extras, meta)):
        for f in schema:
            assert not isinstance(f.type, pa.ExtensionType), f
        for name in ("recording_id", "source_uri", "source_version", "job_id", "model_name",
                     "weights_sha256", "config_sha256", "code_version", "site", "depth_m"):
            assert name in schema.names
        assert schema.metadata == meta
    assert windows_schema(None).field("embedding").type == pa.list_(pa.float32())


def test_enrich_adds_sources_provenance_and_manifest_columns_sorted() -> None:
    rng = np.random.default_rng(1)
    rows = stage_rows(rng, ["r2", "r1"], [1, 0], 4)
    sources = pa.table({"recording_id": ["r1", "r2"], "source_uri": ["/a/1.wav", "/a/2.wav"],
                        "source_version": ["v1", "v2"], "source_bytes": [10, 20],
                        "site": ["north", "south"]})
    spec = SinkSpec(staging_uri="/tmp/x", storage_options={},
                    sources=ShardSources(sources, {"s0": (0, 2)}),
                    extras_schema=pa.schema([("site", pa.string())]),
                    provenance={"job_id": "J", "model_name": "m", "weights_sha256": "w",
                                "config_sha256": "c", "code_version": "v"},
                    file_metadata={})
    out = enrich_windows(rows, spec)
    assert out.num_rows == rows.num_rows
    keys = list(zip(out.column("layer").to_pylist(), out.column("recording_id").to_pylist(),
                    out.column("window_index").to_pylist(), strict=True))
    assert keys == sorted(keys)
    by_rid = dict(zip(out.column("recording_id").to_pylist(), out.column("site").to_pylist(),
                      strict=True))
    assert by_rid == {"r1": "north", "r2": "south"}
    assert set(out.column("job_id").to_pylist()) == {"J"}


def test_window_rows_find_their_sources_among_their_own_shards_rows() -> None:
    """A write task looks each shard's recordings up in that shard's rows of the sources
    table only; a recording or a shard the job did not plan stops it, naming which."""
    rng = np.random.default_rng(2)
    sources = ShardSources(pa.table({
        "recording_id": ["a", "b", "c", "d"], "source_uri": ["/x/a", "/x/b", "/x/c", "/x/d"],
        "source_version": ["1", "2", "3", "4"], "source_bytes": [1, 2, 3, 4]}),
        {"s1": (0, 2), "s2": (2, 4)})
    spec = SinkSpec(staging_uri="/tmp/x", storage_options={}, sources=sources,
                    extras_schema=None, provenance=PROVENANCE, file_metadata={})
    rows = pa.concat_tables([stage_rows(rng, ["b", "a"], [0], 2, shard="s1"),
                             stage_rows(rng, ["d"], [0], 2, shard="s2")])
    out = enrich_windows(rows, spec)
    assert {(r["recording_id"], r["source_uri"], r["source_version"])
            for r in out.to_pylist()} == {("a", "/x/a", "1"), ("b", "/x/b", "2"), ("d", "/x/d", "4")}
    with pytest.raises(RuntimeError, match="recording c that this job did not list"):
        enrich_windows(stage_rows(rng, ["a", "c"], [0], 2, shard="s1"), spec)
    with pytest.raises(RuntimeError, match="shard 's3', which this job did not plan"):
        enrich_windows(stage_rows(rng, ["a"], [0], 2, shard="s3"), spec)


@pytest.mark.parametrize("model", ["../../etc", "pkg.mod:Class", "a/b\\c", "..", "ok_name"])
def test_paths_derived_from_names_stay_under_the_root(tmp_path: Path, model: str) -> None:
    lay = OutputLayout(str(tmp_path / "out"), model, "../v")
    root = (tmp_path / "out").resolve()
    for path in (lay.table_dir("windows"), lay.shard_file("windows", "0" * 16, 0),
                 lay.staging_dir("0" * 16), lay.commit_path("0" * 16), lay.variant_path(),
                 lay.job_path("../../../x")):
        resolved = Path(path).resolve()
        assert resolved.is_relative_to(root), path
        assert "/../" not in path


def test_recover_removes_only_uncommitted_shards(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Files of shards without a marker go, and markers never renamed into place; a crash's
    are warned of, while those of the shards this run reopened on purpose are only said (no
    run stopped)."""
    lay = OutputLayout(str(tmp_path / "out"), "m", "v")
    fs = lay.fs
    keep, drop, reopened = "a" * 16, "b" * 16, "c" * 16
    for shard in (keep, drop, reopened):
        for table in ("windows", "recordings"):
            storage.write_bytes(fs, lay.shard_file(table, shard, 0), b"x")
    storage.write_bytes(fs, storage.join(lay.staging_dir(drop), "windows", "part.parquet"), b"x")
    layout.write_json(fs, lay.commit_path(keep), {"shard": keep, "recordings": []})
    # A marker killed between its write and its rename (32 SIGKILL trials left 3): it was
    # never deleted, and a reader globbing _commits/ took it for an eleventh of ten shards.
    killed = Path(lay.commits_dir()) / ".tmp-0123abcd"
    killed.write_text(json.dumps({"shard": drop, "recordings": []}))
    with caplog.at_level("INFO", logger="pipeline.layout"):
        removed = layout.recover(lay, layout.committed_shards(lay), {reopened})
    assert removed == 4 and not killed.exists()
    assert sorted(p.name for p in Path(lay.commits_dir()).iterdir()) == [f"{keep}.json"]
    assert Path(lay.shard_file("windows", keep, 0)).exists()
    assert not Path(lay.shard_file("windows", drop, 0)).exists()
    assert not Path(lay.shard_file("windows", reopened, 0)).exists()
    assert not Path(lay.staging_dir()).exists()
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("INFO", "removed 2 files of the 1 shard(s) this run reopened"),
                    ("WARNING", ("removed 2 files of shards that were never committed (a "
                                 "previous run stopped while publishing)"))]


def test_recover_on_a_bucket_lists_no_markers_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A marker on an object store is one PUT, never a temporary object, so ``recover``
    does not list the markers folder again for one (a LIST page per 1,000 markers, one after
    another), and still removes the files of shards without a marker."""
    lay = OutputLayout("memory://recover-on-a-bucket/out", "m", "v")
    fs = lay.fs
    keep, drop = "a" * 16, "b" * 16
    for shard in (keep, drop):
        storage.write_bytes(fs, lay.shard_file("windows", shard, 0), b"x")
    layout.write_json(fs, lay.commit_path(keep), {"shard": keep, "recordings": []})
    markers = layout.committed_shards(lay)
    listed: list[str] = []
    list_files = storage.list_files

    def listing(fs: object, path: str) -> list[str]:
        listed.append(path)
        return list_files(fs, path)

    monkeypatch.setattr(storage, "list_files", listing)
    assert layout.recover(lay, markers) == 1
    assert lay.commits_dir() not in listed and lay.table_dir("windows") in listed
    assert fs.exists(lay.shard_file("windows", keep, 0))
    assert not fs.exists(lay.shard_file("windows", drop, 0))


def test_inspect_shows_a_marker_entry_without_an_outcome(tmp_path: Path) -> None:
    """A hand-edited marker whose entry says no outcome is counted as such (sorting it
    beside the others failed with a TypeError)."""
    from pipeline.catalog import load_catalog, render

    lay = OutputLayout(str(tmp_path / "out"), "m", "v")
    layout.write_json(lay.fs, lay.commit_path("a" * 16), {"shard": "a" * 16, "files": {},
                                                          "recordings": [
        {"recording_id": "x", "source_uri": "/a.wav"},
        {"recording_id": "y", "source_uri": "/b.wav", "outcome": "ok"}]})
    assert "recordings 2 (no outcome 1, ok 1)" in render(load_catalog(str(tmp_path / "out")))


def test_a_copied_output_root_is_inspected_as_itself(tmp_path: Path) -> None:
    """Markers keep the URL each file was written to; a copy of the root (gsutil cp -r, a
    move to cold storage) must not look like missing and unmarked files."""
    import shutil

    from pipeline.catalog import load_catalog, render

    lay = OutputLayout(str(tmp_path / "out"), "m", "v")
    path = lay.shard_file("errors", "a" * 16, 0)
    Path(path).parent.mkdir(parents=True)
    pq.write_table(pa.table({"source_uri": ["/a/x.wav"], "error_type": ["UnreadableAudio"],
                             "message": ["not audio"]}), path)
    layout.write_json(lay.fs, lay.commit_path("a" * 16), {
        "shard": "a" * 16, "recordings": [{"recording_id": "x", "outcome": "error"}],
        "files": {"errors": [{"path": lay.uri(path), "rows": 1}]}})
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    shutil.rmtree(tmp_path / "out")
    shown = render(load_catalog(str(tmp_path / "copy")))
    assert "errors by type: UnreadableAudio 1" in shown and "/a/x.wav: not audio" in shown
    assert "missing" not in shown and "without a commit marker" not in shown
    # ... while a committed file that is gone from the copy is named as missing
    (tmp_path / "copy" / Path(path).relative_to(tmp_path / "out")).unlink()
    assert "WARNING: 1 committed files are missing" in render(load_catalog(str(tmp_path / "copy")))


def test_inspect_counts_errors_from_the_markers_and_reads_only_the_examples_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """40 shards with an error each: the types come from the markers, and only the files
    holding the first examples (by URI) are read, plus that of a marker too old to name its
    error's type."""
    from pipeline import catalog

    lay = OutputLayout(str(tmp_path / "out"), "m", "v")
    for k in range(41):
        shard, uri = f"{k:016x}", f"/a/{40 - k:02d}.wav"
        kind = "TooShort" if k % 4 else "UnreadableAudio"
        path = lay.shard_file("errors", shard, 0)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"source_uri": [uri], "error_type": [kind],
                                 "message": [f"message {k}"]}), path)
        rec = {"recording_id": str(k), "source_uri": uri, "outcome": "error"}
        if k != 20:  # this marker is of a version that did not record the type
            rec["error_type"] = kind
        layout.write_json(lay.fs, lay.commit_path(shard), {
            "shard": shard, "recordings": [rec], "files": {"errors": [{"path": lay.uri(path),
                                                                      "rows": 1}]}})
    reads: list[int] = []
    real = catalog.read_parquet_bytes
    monkeypatch.setattr(catalog, "read_parquet_bytes",
                        lambda data, **kw: reads.append(1) or real(data, **kw))
    [ns] = catalog.load_catalog(str(tmp_path / "out")).namespaces
    assert ns.error_types == {"TooShort": 30, "UnreadableAudio": 11}
    assert [e["source_uri"] for e in ns.error_examples] == [f"/a/{i:02d}.wav" for i in range(5)]
    assert ns.error_examples[0]["message"] == "message 40"
    assert len(reads) == 6  # the first five by URI, and the old marker's


def test_inspect_shows_the_first_partial_recordings_and_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary counted partial recordings, and only a query of the recordings table
    named them. The markers name them: only the recordings files of the first few (by URI)
    are read, and a channel's row that is ok does not stand for its recording."""
    from pipeline import catalog
    from pipeline.layout import namespace_dir

    lay = OutputLayout(str(tmp_path / "out"), "m", "v")
    for k in range(8):
        shard, uri = f"{k:016x}", f"/a/{7 - k:02d}.wav"
        path = lay.shard_file("recordings", shard, 0)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"source_uri": [uri, uri, f"/b/{k}.wav"],
                                 "channel": [0, 1, -1], "status": ["ok", "partial", "ok"],
                                 "status_detail": ["", f"truncated: {k}", ""]}), path)
        layout.write_json(lay.fs, lay.commit_path(shard), {
            "shard": shard, "files": {"recordings": [{"path": lay.uri(path), "rows": 3}]},
            "recordings": [{"recording_id": str(k), "source_uri": uri, "outcome": "partial"},
                           {"recording_id": f"b{k}", "source_uri": f"/b/{k}.wav",
                            "outcome": "ok"}]})
    reads: list[int] = []
    real = catalog.read_parquet_bytes
    monkeypatch.setattr(catalog, "read_parquet_bytes",
                        lambda data, **kw: reads.append(1) or real(data, **kw))
    cat = catalog.load_catalog(str(tmp_path / "out"))
    [ns] = cat.namespaces
    assert ns.partial_examples == [{"source_uri": f"/a/{i:02d}.wav",
                                    "status_detail": f"truncated: {7 - i}"} for i in range(5)]
    assert len(reads) == 5
    shown = catalog.render(cat)
    assert (f"  partial recordings 8: status 'partial' in {namespace_dir('recordings', 'm', 'v')}/"
            ", why in status_detail\n"
            f"    {'partial':<22} /a/00.wav: truncated: 7\n") in shown
    assert "    ... (3 more)" in shown


def test_a_carve_out_a_crash_interrupted_is_finished_by_the_next_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Killed between committing the carved shard and uncommitting its source, a run leaves
    both markers naming the kept recordings: the next run uncommits the source (whose files
    recover() then deletes), so no row is visible twice."""
    lay = layout.OutputLayout(str(tmp_path / "out"), "m", "v")
    carved_id = layout.carved_shard_id("a" * 16, {"kept"})
    kept = {"recording_id": "kept", "outcome": "ok"}
    for shard_id, extra, recs in (("a" * 16, {}, [kept, {"recording_id": "redo", "outcome": "ok"}]),
                                  (carved_id, {"carved_from": "a" * 16}, [kept]),
                                  ("b" * 16, {}, [{"recording_id": "other", "outcome": "ok"}])):
        layout.write_json(lay.fs, lay.commit_path(shard_id),
                              {"shard": shard_id, "files": {}, "recordings": recs, **extra})
        path = Path(lay.shard_file("windows", shard_id, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"rows")
    markers = layout.committed_shards(lay)
    assert layout.finish_carves(lay, markers) == {"a" * 16}
    assert sorted(markers) == sorted([carved_id, "b" * 16])
    assert not Path(lay.commit_path("a" * 16)).exists()
    with caplog.at_level("INFO", logger="pipeline.layout"):
        layout.recover(lay, markers, carved={"a" * 16})
    # Said as what it is: not files a stopped run left unpublished.
    assert [(r.levelname, r.getMessage()) for r in caplog.records][-1:] == [
        ("INFO", ("removed 1 files of the 1 shard(s) whose carve-out this run finished "
                  "(their kept rows are in the carved shards)"))]
    assert sorted(p.name for p in Path(lay.table_dir("windows")).iterdir()) == sorted(
        f"shard-{s}-00000.parquet" for s in (carved_id, "b" * 16))
    assert carved_id == layout.carved_shard_id("a" * 16, ["kept"])  # the same carve, the same id
    # ... whatever order the recordings come in (a set's order changes between processes)
    many = [f"r{k}" for k in range(20)]
    assert layout.carved_shard_id("a" * 16, many) == layout.carved_shard_id("a" * 16, many[::-1])


def test_a_process_that_read_an_errors_file_exits_cleanly(tmp_path: Path) -> None:
    """A thread pyarrow starts can abort a short-lived process at exit (exit 134 after the
    output was printed; `pq.read_table(use_threads=False)` still did, 1 run in 6 in CI):
    `inspect` reads the errors files it summarises, and must start no thread doing so. The
    thread count is the deterministic check; the abort itself comes only now and then."""
    import subprocess
    import sys

    from pipeline.sink import errors_schema, file_metadata, parquet_bytes

    lay = OutputLayout(str(tmp_path / "out"), "m", "v")
    schema = errors_schema(pa.schema([("site", pa.string())]),
                           file_metadata({"config": {f"key_{i}": "v" * 40 for i in range(150)}}))
    row = {f.name: f"{f.name} of r" if pa.types.is_string(f.type) else 1 for f in schema}
    row.update(error_type="EmptyAudio")
    path = Path(lay.shard_file("errors", "a" * 16, 0))
    path.parent.mkdir(parents=True)
    path.write_bytes(parquet_bytes(pa.Table.from_pylist([row], schema), 1000, "zstd"))
    layout.write_json(lay.fs, lay.commit_path("a" * 16), {
        "shard": "a" * 16, "recordings": [{"recording_id": "r", "outcome": "error"}],
        "files": {"errors": [{"path": str(path), "rows": 1}]}})
    script = ("import os; from pipeline.catalog import load_catalog, render; "
              "before = len(os.listdir('/proc/self/task')); "
              f"print(render(load_catalog({str(tmp_path / 'out')!r}))); "
              "print('threads', before, len(os.listdir('/proc/self/task')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-500:]
    assert "EmptyAudio" in done.stdout
    before, after = done.stdout.split("threads ")[-1].split()
    assert after == before, "reading the errors file started a thread"


def test_a_local_write_that_fails_leaves_no_temporary_file(tmp_path: Path) -> None:
    """`recover` only knows shard files: a `.tmp-*` left by a failed write stayed forever."""
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        storage.write_bytes(fsspec.filesystem("file"), str(tmp_path / "taken"), b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    storage.write_bytes(fsspec.filesystem("file"), str(tmp_path / "fine"), b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fine", "taken"]


def test_inspect_tells_a_wrong_path_from_an_empty_output(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped output root, or a folder that is not one, read as "no committed shards",
    exit 0, like a real output whose run had not committed yet; a failed run's reason was
    only in its JSON record."""
    from pipeline import cli
    from pipeline.catalog import load_catalog, render
    from pipeline.errors import NoInputsError

    with pytest.raises(NoInputsError, match="no such output root"):
        load_catalog(str(tmp_path / "typo"))
    assert cli.main(["inspect", str(tmp_path / "typo")]) == 2
    assert "no such output root" in capsys.readouterr().err
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(b"RIFF")
    with pytest.raises(NoInputsError, match="audio is not an embed-archive output root"):
        load_catalog(str(tmp_path / "audio"))
    assert cli.main(["inspect", "--json", str(tmp_path / "audio")]) == 2
    assert "not an embed-archive output root" in capsys.readouterr().err
    # A file, a chained URL, a secret that is not YAML: one line each, exit 2, no traceback.
    assert cli.main(["inspect", str(tmp_path / "audio" / "a.wav")]) == 2
    assert "a.wav is a file, not an output root" in capsys.readouterr().err
    assert cli.main(["inspect", f"zip://x::file://{tmp_path}/a.zip"]) == 2
    assert "output_uri: " in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "typo"), "--storage-option",
                     "secret=@Sup3rS3cret"]) == 2
    shown = capsys.readouterr().err
    assert "secret=***: the value is not valid YAML" in shown and "Sup3rS3cret" not in shown
    (tmp_path / "started" / "_variants").mkdir(parents=True)  # refused after its first write
    assert "no run has started here" in render(load_catalog(str(tmp_path / "started")))
    lay = OutputLayout(str(tmp_path / "out"), "m", "v")
    layout.write_json(lay.fs, str(tmp_path / "out" / "_jobs" / "j1.json"), {
        "job_id": "j1", "started_at": "2026-11-23T10:00:00Z", "ended_at": "2026-11-23T10:01:00Z",
        "summary": {"status": "failed", "message": "LeaseLostError: lost the lease x\nmore"}})
    shown = render(load_catalog(str(tmp_path / "out")))
    assert "failed: LeaseLostError: lost the lease x" in shown and "more" not in shown


def test_markers_are_held_compactly_and_read_back_as_written(tmp_path: Path) -> None:
    """Read markers keep their recordings compactly (ids as one Arrow array, URIs
    compressed); iterating gives back every entry as written, failures and retries are the
    `noted` ones, and a listing is matched against the settled ids by outcome."""
    lay = layout.OutputLayout(str(tmp_path / "out"), "m", "v")
    written = {
        "a" * 16: [{"recording_id": f"{k:032x}", "source_uri": f"s3://b/ü\n{k}.wav",
                    "outcome": "ok"} for k in range(5)]
        + [{"recording_id": f"{9:032x}", "source_uri": "s3://b/9.wav", "outcome": "error",
            "error_type": "StorageError", "retry": True, "attempts": 2}],
        "b" * 16: [{"recording_id": f"{7:032x}", "source_uri": None, "outcome": "partial"},
                   {"recording_id": f"{8:032x}", "outcome": "error"}],  # an older marker's
        "c" * 16: [],
    }
    for shard, recordings in written.items():
        layout.write_json(lay.fs, lay.commit_path(shard),
                          {"shard": shard, "files": {}, "recordings": recordings})
    markers = layout.committed_shards(lay)
    for shard, recordings in written.items():
        held = markers[shard]["recordings"]
        assert isinstance(held, layout.MarkerRecordings) and len(held) == len(recordings)
        assert list(held) == recordings
        assert held.ids.to_pylist() == [r["recording_id"] for r in recordings]
    assert markers["a" * 16]["recordings"].noted() == written["a" * 16][-1:]
    assert markers["b" * 16]["recordings"].noted() == written["b" * 16][1:]
    assert {s: len(ids) for s, ids in layout.recordings_to_retry(markers).items()} == {"a" * 16: 1}
    listed = [f"{k:032x}" for k in (0, 4, 6, 8, 9)]
    assert layout.settled_among(listed, markers) == [True, True, False, True, True]
    assert layout.settled_among(listed, markers, "error") == [False, False, False, True, True]
    assert layout.settled_among([], markers) == []
    assert layout.settled_among(listed, {}) == [False] * 5


def test_a_few_listed_are_matched_without_hashing_every_settled_id(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun of one prefix of an archive lists a few recordings against the markers of
    all of it (10M ids, 1.2 GB of hash table): only the smaller side is hashed, whichever
    it is, and either way each listed id is settled exactly when a marker names it."""
    import pyarrow.compute as pc

    hashed: list[int] = []
    is_in = pc.is_in

    def counting_is_in(values, value_set, **kwargs):  # type: ignore[no-untyped-def]
        hashed.append(len(value_set))
        return is_in(values, value_set=value_set, **kwargs)

    monkeypatch.setattr(pc, "is_in", counting_is_in)
    markers = {f"{s:016x}": layout.compact({"shard": f"{s:016x}", "recordings": [
                   {"recording_id": f"{s}-{k}", "source_uri": None, "outcome": "ok"}
                   for k in range(100)]}) for s in range(50)}
    few = ["0-0", "49-99", "7-100", "12-5", "12-5"]
    assert layout.settled_among(few, markers) == [True, True, False, True, True]
    assert max(hashed) <= len(few)
    hashed.clear()
    many = [f"{s}-{k}" for s in range(60) for k in range(100)]
    assert layout.settled_among(many, markers) == [s < 50 for s in range(60) for _ in range(100)]
    assert max(hashed) <= 50 * 100


PROVENANCE_COLUMNS = [("job_id", "string"), ("model_name", "string"),
                      ("weights_sha256", "string"), ("config_sha256", "string"),
                      ("code_version", "string")]
SOURCE_COLUMNS = [("recording_id", "string"), ("source_uri", "string"),
                  ("source_version", "string")]


@pytest.mark.parametrize(("schema", "columns"), [
    (windows_schema, [*SOURCE_COLUMNS, ("channel", "int16"), ("window_index", "int32"),
                      ("start_s", "double"), ("end_s", "double"), ("valid_s", "float"),
                      ("layer", "int16"), ("embedding", "list<item: float>"),
                      *PROVENANCE_COLUMNS]),
    (recordings_schema, [*SOURCE_COLUMNS, ("source_bytes", "int64"), ("channel", "int16"),
                         ("layer", "int16"), ("duration_s", "double"),
                         ("source_sample_rate_hz", "int32"), ("source_channels", "int16"),
                         ("num_windows", "int32"), ("embedding", "list<item: float>"),
                         ("status", "string"), ("status_detail", "string"),
                         *PROVENANCE_COLUMNS]),
    (errors_schema, [*SOURCE_COLUMNS, ("source_bytes", "int64"), ("error_type", "string"),
                     ("message", "string"), *PROVENANCE_COLUMNS]),
], ids=["windows", "recordings", "errors"])
def test_the_tables_columns_and_types_are_the_readmes_contract(schema, columns) -> None:
    """Every file of a namespace, written by any version, must read together: a column's
    type changed (``source_channels`` int16 -> int32) breaks the merge with the files
    already written. Changing one is a migration, not an edit; the manifest's columns follow."""
    extras = pa.schema([("site", pa.string())])
    assert [(f.name, str(f.type)) for f in schema(extras)] == [*columns, ("site", "string")]


def one_channel_rows(channel: int) -> pa.Table:
    """Stage rows of recording ``a``'s windows 0 and 1 on one channel, one layer."""
    return pa.Table.from_pylist([
        {"shard": "s0", "recording_id": "a", "channel": channel, "window_index": w,
         "start_s": w * 1.0, "end_s": w + 2.0, "valid_s": 2.0, "layer": 0,
         "embedding": [float(channel), float(w)], "meta": ""} for w in (0, 1)],
        schema=STAGE_SCHEMA)


def sink_spec(tmp_path: Path, file_metadata: dict[bytes, bytes]) -> SinkSpec:
    sources = pa.table({"recording_id": ["a"], "source_uri": ["/x/a"], "source_version": ["1"],
                        "source_bytes": [1]})
    return SinkSpec(staging_uri=str(tmp_path / "staging"), storage_options={},
                    sources=ShardSources(sources, {"s0": (0, 1)}), extras_schema=None,
                    provenance={"job_id": "J", "model_name": "m", "weights_sha256": "w",
                                "config_sha256": "c", "code_version": "v"},
                    file_metadata=file_metadata)


def test_a_window_file_carries_the_jobs_provenance_in_its_footer(tmp_path: Path) -> None:
    """Every window file a write task stages has the job record in its Parquet footer
    (``embed_archive.provenance``): what says, file by file, which job and config made it."""
    metadata = file_metadata({"job_id": "J", "config_sha256": "c"})
    out = write_stage(one_channel_rows(0), sink_spec(tmp_path, metadata)).to_pylist()
    (path, rows), = json.loads(out[0]["files"])
    assert rows == 2
    footer = pq.read_schema(path).metadata
    assert json.loads(footer[PROVENANCE_KEY]) == {"job_id": "J", "config_sha256": "c"}


def test_two_channels_of_the_same_windows_stage_two_files(tmp_path: Path) -> None:
    """With ``channels: each`` two write tasks may get the same windows of one recording on
    different channels. A staged file is named by the rows it holds; a name blind to the
    channel makes the second task overwrite the first's file, and a channel's windows are
    lost while both tasks report a file."""
    spec = sink_spec(tmp_path, {})
    paths = [json.loads(write_stage(one_channel_rows(ch), spec).to_pylist()[0]["files"])[0][0]
             for ch in (0, 1)]
    assert paths[0] != paths[1]
    channels = sorted(pq.read_table(p).column("channel").to_pylist()[0] for p in paths)
    assert channels == [0, 1]


def test_inspect_sums_rows_and_files_over_every_committed_shard(tmp_path: Path) -> None:
    """``embed-archive inspect`` reports a namespace's rows and files as the sum over its
    shards' markers; kept per marker instead, it shows the last shard read as the whole."""
    from pipeline import layout
    from pipeline.catalog import load_catalog
    from pipeline.layout import OutputLayout

    lay = OutputLayout(str(tmp_path / "out"), "m", "v")
    for shard, files in (("a" * 16, [7, 5]), ("b" * 16, [3])):
        layout.write_json(lay.fs, lay.commit_path(shard), {
            "shard": shard,
            "files": {"windows": [{"path": f"{lay.table_dir('windows')}/shard-{shard}-"
                                           f"{i:05d}.parquet", "rows": n}
                                  for i, n in enumerate(files)]},
            "recordings": [{"recording_id": shard, "source_uri": "/a.wav", "outcome": "ok"}]})
    ns, = load_catalog(str(tmp_path / "out")).namespaces
    assert (ns.shards, ns.recordings) == (2, 2)
    assert ns.rows == {"windows": 15}
    assert ns.files == {"windows": 3}


def test_a_marker_from_before_attempts_were_counted_counts_as_one_run() -> None:
    """Markers written before ``attempts`` was kept say nothing of it: such a recording met
    its error in one run. Counted as none, ``run.max_attempts: 1`` would retry it forever."""
    old = {"recording_id": "r", "outcome": "error", "error_type": "StorageError"}
    assert layout.attempts(old) == 1
    assert not layout.to_retry(old, max_attempts=1)
    assert layout.to_retry(old, max_attempts=2) and layout.to_retry(old)
    assert not layout.to_retry({**old, "error_type": "CorruptAudio"})


def layer_row_groups(path: str) -> list[tuple[int, int, int]]:
    """``(min layer, max layer, rows)`` of each row group of a Parquet file."""
    meta = pq.read_metadata(path)
    at = meta.schema.to_arrow_schema().get_field_index("layer")
    return [(g.column(at).statistics.min, g.column(at).statistics.max, g.num_rows)
            for g in (meta.row_group(i) for i in range(meta.num_row_groups))]


def test_a_filter_on_layer_reads_only_that_layers_row_groups(tmp_path: Path) -> None:
    """Window rows are sorted by layer, but sorting alone prunes nothing when a file is one
    row group (``output.file_mb`` = ``row_group_mb``, the default): its statistics span
    every layer. Each layer starts a row group of its own, so ``WHERE layer = 12`` on an
    output of ``layers: all`` reads that layer's rows, not every layer's."""
    rows = stage_rows(np.random.default_rng(5), ["a", "b", "c"], [12, 0, 6], 4)
    sources = pa.table({"recording_id": ["a", "b", "c"], "source_uri": ["/x/a", "/x/b", "/x/c"],
                        "source_version": ["1", "2", "3"], "source_bytes": [1, 2, 3]})
    spec = dataclasses.replace(sink_spec(tmp_path, {}),
                               sources=ShardSources(sources, {"s0": (0, 3)}))
    (path, written), = json.loads(write_stage(rows, spec).to_pylist()[0]["files"])
    per_layer = written // 3
    assert layer_row_groups(path) == [(0, 0, per_layer), (6, 6, per_layer), (12, 12, per_layer)]
    fragment, = ds.dataset(path, format="parquet").get_fragments()
    kept = fragment.subset(ds.field("layer") == 12).row_groups  # what a reader scans
    assert [group.num_rows for group in kept] == [per_layer]
    # A layer of more rows than a row group holds still splits at row_group_rows.
    small = dataclasses.replace(spec, row_group_rows=2)
    (path, _), = json.loads(write_stage(rows, small).to_pylist()[0]["files"])
    groups = layer_row_groups(path)
    assert all(low == high and n <= 2 for low, high, n in groups)
    assert sum(n for *_, n in groups) == written
