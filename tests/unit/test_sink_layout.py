"""Schemas, partial pooling and the commit layout, without Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import layout, storage
from pipeline.layout import OutputLayout
from pipeline.sink import (
    STAGE_SCHEMA,
    SinkSpec,
    enrich_windows,
    errors_schema,
    merge_timing,
    partial_pools,
    recordings_schema,
    reduce_partials,
    windows_schema,
)


def stage_rows(rng: np.random.Generator, rids: list[str], layers: list[int], dim: int) -> pa.Table:
    rows = []
    for rid in rids:
        for w in range(int(rng.integers(1, 6))):
            for layer in layers:
                rows.append({"recording_id": rid, "channel": -1, "window_index": w,
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


def test_timings_fold_per_actor_and_into_a_shard_summary() -> None:
    from pipeline.job import EmbedTiming

    def call(actor: str, start: float, busy: float, model: float, windows: int) -> dict:
        return {"type": "timing", "actor": actor, "start": start, "end": start + busy,
                "busy_s": busy, "model_s": model, "windows": windows, "batches": 1}

    per_actor: dict = {}
    for t in (call("a", 110.0, 2.0, 1.5, 16), call("a", 100.0, 2.0, 1.8, 16),
              call("b", 103.0, 1.0, 0.9, 8), call("a", 120.0, 1.0, 0.5, 4)):
        merge_timing(per_actor, t)
    assert per_actor["a"] == {"start": 100.0, "end": 121.0, "busy_s": 5.0, "model_s": 3.8,
                              "windows": 36, "batches": 3}
    shard = EmbedTiming.from_actors(per_actor, shard_start=95.0)
    assert (shard.actors, shard.batches, shard.windows) == (2, 4, 44)
    assert shard.active_s == pytest.approx(21.0 + 1.0)
    assert shard.span_s == pytest.approx(21.0)
    assert shard.first_batch_s == pytest.approx(5.0)
    assert shard.busy_fraction == pytest.approx(6.0 / 22.0)
    job = EmbedTiming()
    job.add(shard)
    job.add(EmbedTiming.from_actors({"c": {**per_actor["b"]}}, shard_start=0.0))
    assert job.first_batch_s == pytest.approx(5.0)  # the first shard's
    assert (job.batches, job.windows) == (5, 52)
    assert EmbedTiming.from_actors({}, 0.0).busy_fraction == 0.0


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
    spec = SinkSpec(staging_uri="/tmp/x", storage_options={}, sources=sources,
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


def test_recover_removes_only_uncommitted_shards(tmp_path: Path) -> None:
    lay = OutputLayout(str(tmp_path / "out"), "m", "v")
    fs = lay.fs
    keep, drop = "a" * 16, "b" * 16
    for shard in (keep, drop):
        for table in ("windows", "recordings"):
            storage.write_bytes(fs, lay.shard_file(table, shard, 0), b"x")
    storage.write_bytes(fs, storage.join(lay.staging_dir(drop), "windows", "part.parquet"), b"x")
    layout.write_json(fs, lay.commit_path(keep), {"shard": keep, "recordings": []})
    removed = layout.recover(lay, layout.committed_shards(lay))
    assert removed == 2
    assert Path(lay.shard_file("windows", keep, 0)).exists()
    assert not Path(lay.shard_file("windows", drop, 0)).exists()
    assert not Path(lay.staging_dir()).exists()
