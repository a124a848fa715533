"""The job end to end on the real recordings, with real Ray, read back with DuckDB."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import job as job_mod
from pipeline import layout as layout_mod
from pipeline import sources, storage
from pipeline.audio import DecodeReport, DecodeSettings, decode_stream
from pipeline.config import JobConfig
from pipeline.errors import AudioDecodeError
from pipeline.job import EXIT_SOME_FAILED, EmbeddingJob
from pipeline.sink import PROVENANCE_KEY
from pipeline.summary import JobSummary, LatestWriter
from pipeline.windows import plan_windows
from tests.conftest import write_tone
from tests.integration.conftest import TINY_BEATS

RATE, WINDOW, HOP = 16_000, 32_000, 16_000
MIN_TAIL = 400  # windows.min_tail_s = 0.025 s at 16 kHz


def expected_windows(path: Path) -> int | None:
    """Windows the job must produce for a file, from an independent decode; None if it fails."""
    report = DecodeReport()
    fs, p = storage.url_to_fs(str(path))
    try:
        with storage.RangeReader(fs, p) as reader:
            for _ in decode_stream(reader, DecodeSettings(RATE), report):
                pass
    except AudioDecodeError:
        return None
    plan = plan_windows(report.output_samples, WINDOW, HOP, "pad")
    n = len(plan)
    if n and plan.valid[-1] < MIN_TAIL and plan.valid[-1] < WINDOW:
        n -= 1
    return n or None


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, real_data: Path, ray_session: None):
    out = tmp_path_factory.mktemp("real") / "out"
    raw = {
        "input": {"uri": str(real_data)},
        "windows": {"window_s": 2.0, "hop_s": 1.0, "tail": "pad"},
        "model": {"name": "beats", "weights": "random", "options": dict(TINY_BEATS),
                  "layers": [-1, 0], "batch_size": 16},
        "output": {"uri": str(out)},
        "run": {"shard_size": 64, "progress": False, "job_id": "first-run"},
    }
    cfg = JobConfig.from_dict(raw)
    # What the job offers its record writer at each commit, and what `inspect` finds in
    # _jobs/ as the run goes (the writer keeps the latest offered: written, or superseded).
    records: dict[str, list[dict]] = {"offered": [], "written": []}
    real_write, real_offer = layout_mod.write_json, LatestWriter.offer

    def write_json(fs, path, value, *args, **kwargs):
        if "/_jobs/" in path:
            records["written"].append(json.loads(json.dumps(value, default=str)))
        return real_write(fs, path, value, *args, **kwargs)

    def offer(self, value):
        records["offered"].append(json.loads(json.dumps(value, default=str)))
        return real_offer(self, value)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job_mod, "RECORD_EVERY_S", 0.0)
        mp.setattr(layout_mod, "write_json", write_json)
        mp.setattr(LatestWriter, "offer", offer)
        summary = EmbeddingJob(cfg).run()
    return out, summary, raw, records


def test_summary(real_run) -> None:
    _, summary, _, _ = real_run
    assert summary.recordings_listed == 102
    assert summary.shards == 2
    assert summary.embedded + summary.partial + summary.failed == 102
    # empty_2c.wav has 0 frames; stereo.wav has 5 frames (0.1 ms), too short for a window.
    assert summary.failed == 2
    assert summary.exit_code == EXIT_SOME_FAILED
    assert summary.audio_s == pytest.approx(945.967, abs=0.5)


def test_a_running_jobs_record_says_what_it_committed_so_far(real_run) -> None:
    """The record was written at the start and the end only: `inspect` showed a job that
    had committed shards as having done nothing."""
    _, summary, _, records = real_run
    offered = records["offered"]
    started, *during, final = records["written"]
    assert started["ended_at"] is None and started["summary"]["embedded"] == 0

    def done(record: dict) -> int:
        return sum(record["summary"][k] for k in ("embedded", "partial", "failed"))

    # One state offered at each commit, each counting more than the one before.
    assert len(offered) == summary.shards
    assert [done(r) for r in offered] == sorted({done(r) for r in offered})
    assert 0 < done(offered[0]) and done(offered[-1]) == 102
    assert all(r["ended_at"] is None and r["updated_at"] for r in offered)
    assert all("shard_outcomes" not in r["summary"] for r in offered)
    # Written: some of those, in order. Shards that commit together may leave only the
    # last of the burst written, and the final record supersedes one offered just before
    # the run closes the writer (so none at all here is not a fault: the writer's own test
    # pins that an offered state is written).
    assert [done(r) for r in during] == [done(r) for r in offered if r in during]
    assert all(r in offered for r in during)
    assert done(final) == 102
    assert len(final["summary"]["shard_outcomes"]) == summary.shards
    assert final["ended_at"] and final["summary"]["status"] == "completed_with_errors"
    assert final["summary"]["layers"] == 2


def test_summary_says_how_busy_the_model_was(real_run) -> None:
    _, summary, _, _ = real_run
    e = summary.embed
    # Every window the job counted went through an embedder call that timed itself.
    assert e.windows == summary.windows == sum(o.windows for o in summary.shard_outcomes)
    assert e.batches >= -(-summary.windows // 16)
    assert e.actors == 2  # the session's local Ray has 2 CPUs and no GPU: two narrow actors
    assert 0 < e.model_s <= e.busy_s <= e.active_s <= e.actors * e.span_s
    assert e.span_s <= summary.wall_s
    assert 0 < e.busy_fraction <= 1
    assert 0 < e.first_batch_s < summary.wall_s
    assert summary.steady_throughput > summary.throughput
    record = summary.to_dict()
    assert record["embed"]["busy_fraction"] == round(e.busy_fraction, 4)
    assert "busy" in summary.render()


def test_window_rows_match_the_arithmetic(real_run, real_data: Path) -> None:
    out, _, _, _ = real_run
    con = duckdb.connect()
    rows = con.sql(f"""
        SELECT source_uri, layer, count(*) AS n, count(DISTINCT window_index) AS distinct_windows,
               min(len(embedding)) AS dmin, max(len(embedding)) AS dmax,
               bool_and(isfinite(list_aggregate(embedding, 'sum'))) AS finite
        FROM read_parquet('{out}/windows/**/*.parquet', hive_partitioning = true)
        GROUP BY ALL""").fetchall()
    got = {(uri, layer): (n, d, dmin, dmax, finite) for uri, layer, n, d, dmin, dmax, finite in rows}
    with open(real_data / "metadata.csv") as fh:
        files = [real_data / r["file"] for r in csv.DictReader(fh)]
    for path in files:
        expected = expected_windows(path)
        for layer in (0, 2):
            if expected is None:
                assert (str(path), layer) not in got
                continue
            n, distinct, dmin, dmax, finite = got[(str(path), layer)]
            assert n == distinct == expected, path
            assert dmin == dmax == TINY_BEATS["encoder_embed_dim"]
            assert finite
    assert {layer for _, layer in got} == {0, 2}


def test_no_nan_and_times(real_run) -> None:
    out, _, _, _ = real_run
    table = pq.read_table(out / "windows", partitioning="hive")
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert np.isfinite(emb).all()
    start = table.column("start_s").to_numpy()
    idx = table.column("window_index").to_numpy()
    assert np.allclose(start, idx * 1.0)
    assert np.allclose(table.column("end_s").to_numpy(), start + 2.0)
    assert (table.column("valid_s").to_numpy() <= 2.0 + 1e-6).all()
    assert set(table.column("channel").to_pylist()) == {-1}


def test_recordings_table(real_run) -> None:
    out, _, _, _ = real_run
    con = duckdb.connect()
    rec = con.sql(f"""
        SELECT r.recording_id, r.layer, r.num_windows, r.status, len(r.embedding) AS dim,
               w.n AS window_rows
        FROM read_parquet('{out}/recordings/**/*.parquet', hive_partitioning = true) r
        JOIN (SELECT recording_id, layer, count(*) AS n
              FROM read_parquet('{out}/windows/**/*.parquet') GROUP BY ALL) w
          USING (recording_id, layer)""").fetchall()
    assert len(rec) == 100 * 2
    for _rid, _layer, num_windows, status, dim, window_rows in rec:
        assert num_windows == window_rows
        assert status == "ok"
        assert dim == 64
    # The pooled embedding is the mean of the window embeddings.
    one = con.sql(f"""
        SELECT r.embedding AS pooled, list(w.embedding) AS windows
        FROM read_parquet('{out}/recordings/**/*.parquet') r
        JOIN read_parquet('{out}/windows/**/*.parquet') w USING (recording_id, layer)
        WHERE r.source_uri LIKE '%great_plains_toad.wav' AND r.layer = 2
        GROUP BY r.embedding""").fetchall()[0]
    assert np.allclose(np.asarray(one[0]), np.mean(np.asarray(one[1]), axis=0), atol=1e-5)


def test_errors_table(real_run) -> None:
    out, _, _, _ = real_run
    errs = duckdb.sql(f"""SELECT regexp_extract(source_uri, '[^/]+$') AS f, error_type, message, job_id
                          FROM read_parquet('{out}/errors/**/*.parquet')
                          ORDER BY f""").fetchall()
    assert [(f, t) for f, t, _, _ in errs] == [("empty_2c.wav", "EmptyAudio"), ("stereo.wav", "TooShort")]
    assert all(job == "first-run" for *_, job in errs)


def test_provenance_everywhere(real_run) -> None:
    out, _, _, _ = real_run
    files = sorted(out.glob("windows/**/*.parquet"))
    assert files
    meta = json.loads(pq.read_schema(files[0]).metadata[PROVENANCE_KEY])
    assert meta["job_id"] == "first-run"
    # Random weights are named "random" (a checkpoint's hash: test_object_storage).
    assert meta["weights_sha256"] == meta["variant_spec"]["weights_sha256"] == "random"
    assert len(meta["config_sha256"]) == 64
    for key in ("torch", "ray", "pyarrow"):
        assert meta["libraries"][key]
    assert meta["variant_spec"]["window_s"] == 2.0
    job = json.loads((out / "_jobs" / "first-run.json").read_text())
    assert job["summary"]["status"] == "completed_with_errors"
    assert job["ended_at"] and job["started_at"]
    assert job["model_name"] == "beats" and job["weights_uri"] == "random"
    assert job["git_commit"] and job["package_version"]
    cols = duckdb.sql(f"""SELECT DISTINCT job_id, model_name, weights_sha256, config_sha256, code_version,
                                 model, variant
                          FROM read_parquet('{out}/windows/**/*.parquet', hive_partitioning = true)""").fetchall()
    assert len(cols) == 1 and cols[0][0] == "first-run" and cols[0][5] == "beats"
    # Each row's hashes are the run's own: the footer's, and the config's the record keeps.
    assert cols[0][2:4] == (meta["weights_sha256"], meta["config_sha256"])
    assert meta["config_sha256"] == JobConfig.from_dict(job["config"]).sha256() != "random"


def test_embedding_is_a_plain_float_list(real_run) -> None:
    out, _, _, _ = real_run
    schema = pq.read_schema(next(out.glob("windows/**/*.parquet")))
    assert str(schema.field("embedding").type) == "list<element: float>"
    assert "ray" not in str(schema.field("embedding").type)
    kind = duckdb.sql(f"DESCRIBE SELECT embedding FROM read_parquet('{out}/windows/**/*.parquet')").fetchall()
    assert kind[0][1] == "FLOAT[]"


def readme_duckdb_statements() -> list[str]:
    """Every statement of the README's DuckDB examples (its ```sql blocks that read
    outputs/demo; the BigQuery ones name tables in backticks)."""
    import re

    text = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```sql\n(.*?)```", text, re.DOTALL)
              if "outputs/demo" in b and "`" not in b]
    statements = [s.strip() for b in blocks for s in b.split(";")]
    return [s for s in statements if s and not all(line.startswith("--")
                                                   for line in s.splitlines())]


def test_the_readmes_duckdb_examples_run_on_a_real_output(real_run) -> None:
    out, summary, _, _ = real_run
    statements = readme_duckdb_statements()
    assert len(statements) >= 4  # windows per layer, nearest neighbour, the committed files
    con = duckdb.connect()
    last = con.execute(f"SELECT max(layer) FROM read_parquet('{out}/recordings/**/*.parquet')"
                       ).fetchone()
    for sql in statements:
        sql = sql.replace("outputs/demo", str(out)).replace("layer = 12", f"layer = {last[0]}"
                                                            ).replace("variant=V",
                                                                      f"variant={summary.variant}")
        con.execute(sql)
        if sql.lstrip().startswith(("SELECT", "--")):
            rows = con.fetchall()
            assert rows and all(v is not None for row in rows for v in row), sql
    windows = con.execute(f"SELECT count(*) FROM read_parquet('{out}/windows/**/*.parquet')")
    assert rows == windows.fetchall()  # the committed files: every window row


def test_a_manifest_the_readmes_sql_makes_of_an_output_resumes_it_without_lookups(
        real_run, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's COPY of an output's recordings is a manifest naming every recording
    the folder run embedded, with its version: a run from it looks no object up, gives each
    recording the id the listing gave, and so finds nothing left to do."""
    out, summary, raw, _ = real_run
    copy = [s for s in readme_duckdb_statements() if s.startswith("COPY")]
    assert len(copy) == 1
    duckdb.connect().execute(copy[0].replace("outputs/demo", str(out)).replace(
        "variant=V", f"variant={summary.variant}"))

    def no_lookup(uri: str, *_: object) -> None:
        raise AssertionError(f"looked up {uri}")

    monkeypatch.setattr(sources, "_stat_manifest_uri", no_lookup)
    again = EmbeddingJob(JobConfig.from_dict({
        **raw, "input": {"manifest": f"{out}-manifest.parquet"},
        "run": {**raw["run"], "job_id": "from-manifest"}}))
    again.prepare()
    assert (again.already_done, again.already_failed, again.shards) == (100, 0, [])
    summary = again.run()
    assert summary.embedded == summary.failed == 0


def test_the_readmes_sql_on_the_demo_archive_keeps_variants_and_manifest_columns_apart(
        tmp_path: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's output, with its manifest's columns (site, calls, a time) and two variants
    of the same recordings: the README's nearest-neighbour query gives one row per
    recording, channel and variant; its COPY of one variant's recordings is a manifest a
    run into that namespace takes, with no lookup and nothing left to do."""
    from pipeline.demo import write_demo_archive

    write_demo_archive(tmp_path / "demo_archive")
    out = tmp_path / "out"
    raw = {"input": {"manifest": str(tmp_path / "demo_archive" / "manifest.csv")},
           "audio": {"channels": "each"},
           "windows": {"window_s": 2.0, "hop_s": 2.0},
           "model": {"name": "beats", "weights": "random", "options": dict(TINY_BEATS),
                     "batch_size": 16},
           "output": {"uri": str(out), "windows": False},
           "run": {"progress": False}}
    first = EmbeddingJob(JobConfig.from_dict(raw)).run()
    other = EmbeddingJob(JobConfig.from_dict({**raw, "windows": {"window_s": 2.0, "hop_s": 1.0}})
                         ).run()
    assert first.variant != other.variant and first.embedded == other.embedded == 9
    con = duckdb.connect()
    [nearest] = [s for s in readme_duckdb_statements() if "nearest" in s]
    [(last,)] = con.execute(f"SELECT DISTINCT layer FROM read_parquet('{out}/recordings/**/*.parquet')"
                            ).fetchall()
    rows = con.execute(nearest.replace("outputs/demo", str(out)).replace("layer = 12",
                                                                         f"layer = {last}")
                       ).fetchall()
    keys = [(variant, uri, channel) for _, variant, uri, channel, *_ in rows]
    assert len(keys) == len(set(keys)) == 2 * 10  # 8 mono recordings and a stereo one, twice
    assert {v for v, _, _ in keys} == {first.variant, other.variant}
    [copy] = [s for s in readme_duckdb_statements() if s.startswith("COPY")]
    con.execute(copy.replace("outputs/demo", str(out)).replace("variant=V",
                                                                f"variant={first.variant}"))
    manifest = pq.read_table(f"{out}-manifest.parquet")
    assert sorted(manifest.column_names) == sorted(
        ["uri", "source_version", "source_bytes", "site", "calls", "recorded_at"])

    def no_lookup(uri: str, *_: object) -> None:
        raise AssertionError(f"looked up {uri}")

    monkeypatch.setattr(sources, "_stat_manifest_uri", no_lookup)
    again = EmbeddingJob(JobConfig.from_dict({**raw, "input": {
        "manifest": f"{out}-manifest.parquet"}}))
    again.prepare()
    again._lease.release()
    assert (again.already_done, again.shards) == (9, [])


def test_rerun_resumes_and_ids_are_stable(real_run, tmp_path: Path) -> None:
    out, _, raw, _ = real_run
    again = EmbeddingJob(JobConfig.from_dict({**raw, "run": {**raw["run"], "job_id": "second-run"}}))
    again.prepare()
    assert again.already_done == 102 and not again.shards
    summary = again.run()
    assert summary.embedded == summary.failed == 0
    assert not list((out / "_leases").rglob("*.json"))  # each run let go of its namespace
    n = duckdb.sql(f"SELECT count(*), count(DISTINCT (recording_id, window_index, layer)) "
                   f"FROM read_parquet('{out}/windows/**/*.parquet')").fetchall()[0]
    assert n[0] == n[1]
    # A fresh run elsewhere derives the same recording ids.
    other = {**raw, "output": {"uri": str(tmp_path / "other")}, "run": {**raw["run"], "job_id": "x"},
             "input": {"uri": str(Path(raw["input"]["uri"]) / "perch")}}
    EmbeddingJob(JobConfig.from_dict(other)).run()
    ids_a = {r[0] for r in duckdb.sql(
        f"SELECT DISTINCT recording_id FROM read_parquet('{out}/recordings/**/*.parquet') "
        "WHERE source_uri LIKE '%/perch/%'").fetchall()}
    ids_b = {r[0] for r in duckdb.sql(
        f"SELECT DISTINCT recording_id FROM read_parquet('{tmp_path}/other/recordings/**/*.parquet')"
    ).fetchall()}
    assert ids_a == ids_b and len(ids_a) == 17


def copy_probe(out_dir: str) -> type:
    """The job's embedding actor, recording for each batch whether its audio arrived as a
    read-only view on the object store (no copy on the way) or as a private copy."""
    import os

    from pipeline.stages import Embedder

    class CopyProbe(Embedder):
        def __call__(self, batch: dict[str, np.ndarray]) -> object:
            audio = batch["audio"]
            with open(Path(out_dir) / f"{os.getpid()}.jsonl", "a") as fh:
                fh.write(json.dumps({"rows": len(audio),
                                     "read_only": not audio.flags.writeable}) + "\n")
            return super().__call__(batch)

    return CopyProbe


def probed_run(folder: Path, tmp_path: Path, batch_size: int,
               batch_windows: int) -> tuple[JobSummary, list[dict[str, object]]]:
    """A tiny-BEATs job over ``folder`` (2-s windows, 1-s hop) whose actors record each
    batch they get (:func:`copy_probe`): its summary, and those records."""
    import pipeline.job

    probes = tmp_path / "probes"
    probes.mkdir()
    raw = {"input": {"uri": str(folder)},
           "windows": {"window_s": 2.0, "hop_s": 1.0, "tail": "pad"},
           "model": {"name": "beats", "weights": "random", "options": dict(TINY_BEATS),
                     "layers": [-1], "batch_size": batch_size},
           "audio": {"batch_windows": batch_windows},
           "output": {"uri": str(tmp_path / "out")}, "run": {"progress": False}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.job, "Embedder", copy_probe(str(probes)))
        summary = EmbeddingJob(JobConfig.from_dict(raw)).run()
    return summary, [json.loads(line) for path in probes.glob("*.jsonl")
                     for line in path.read_text().splitlines()]


def test_the_model_reads_its_batches_straight_from_the_object_store(
        real_data: Path, tmp_path: Path, ray_session: None) -> None:
    """The decode stage ships whole blocks (one contiguous array each), so every batch an
    actor gets is a zero-copy slice of one: Ray Data copies a batch it must stitch together
    from a block made of many small pieces, which the windows of a long recording used to be."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "1min.wav").symlink_to(real_data / "opensoundscape/tests/audio/1min.wav")
    summary, batches = probed_run(folder, tmp_path, batch_size=16, batch_windows=32)
    assert summary.embedded == 1 and summary.windows == 59
    assert sum(b["rows"] for b in batches) == 59  # the report rides on the last window
    assert len(batches) == 4 and all(b["read_only"] for b in batches), batches


def test_a_decode_task_gathers_its_short_recordings_into_whole_blocks(
        tmp_path: Path, ray_session: None) -> None:
    """A decode task of many short recordings ships blocks of exactly one block's rows
    across them (RowBlocks), so the actors' batches are still zero-copy slices. Handed one
    recording per call, the stage made every recording's few windows a block of their own:
    every batch was stitched together from pieces, a copy, and an archive of 5-s clips
    was a block per recording for Ray Data to track."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(48):  # 3 windows each, 6 recordings a decode task on 2 CPUs
        write_tone(folder / f"clip_{i:02d}.wav", 4.0, 16_000, freq_hz=300.0 + 20 * i, seed=i)
    summary, batches = probed_run(folder, tmp_path, batch_size=4, batch_windows=4)
    assert summary.embedded == 48 and summary.windows == 144
    assert sum(b["rows"] for b in batches) == 144
    # A task's last block may be short, and a batch reaching into the next block is a copy:
    # at most two of those per task (8 tasks), the rest slices.
    read_only = sum(b["read_only"] for b in batches)
    assert read_only >= len(batches) - 16 and read_only >= 20, batches


def refusing_actor() -> type:
    """The job's embedding actor, refusing to start (as one given another plugin version
    than the driver planned with does)."""
    from pipeline.stages import Embedder

    class Refusing(Embedder):
        def __init__(self, spec: object) -> None:
            raise RuntimeError("plugin here is v2, but the job was planned with v1")

    return Refusing


def test_an_actor_that_refuses_to_start_fails_the_run_with_its_own_error(
        tmp_path: Path, ray_session: None) -> None:
    """Ray says "the actor died" of an actor whose constructor raised: that is its error,
    not a worker dying on a batch time after time (``job.WorkersCrashed``)."""
    import pipeline.job

    (tmp_path / "in").mkdir()
    write_tone(tmp_path / "in" / "a.wav", 2.0, 16_000)
    raw = {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
           "model": {"name": "beats", "weights": "random", "options": dict(TINY_BEATS)},
           "run": {"progress": False}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.job, "Embedder", refusing_actor())
        with pytest.raises(Exception, match="planned with v1") as raised:
            EmbeddingJob(JobConfig.from_dict(raw)).run()
    assert "a worker died" not in str(raised.value)


@pytest.mark.parametrize("join", [False, True], ids=["local Ray", "RAY_ADDRESS"])
def test_the_workers_get_the_job_environment(join: bool, tmp_path: Path,
                                              request: pytest.FixtureRequest) -> None:
    """A Ray the job starts itself gives its workers the job's environment by inheritance,
    not by a job runtime_env (whose per-worker setup cost ~2 s of start-up): the fault
    switch, the weights cache and the code version the driver adds must still arrive, and
    the driver's environment must come back as it was. With ``RAY_ADDRESS`` set (how Ray
    Jobs points a driver at its cluster) the job joins that cluster and sends the same
    variables as a runtime_env. In a fresh process: the suite's session Ray is up in this one."""
    code = """
import json, os, ray
from pipeline.config import JobConfig
from pipeline.ray_connect import connect_ray
from pipeline.provenance import git_commit
before = {k: v for k, v in os.environ.items() if k.startswith("EMBED_ARCHIVE_")}
cfg = JobConfig.from_dict({"input": {"uri": "/nowhere"}, "output": {"uri": "/nowhere"},
                           "compute": {"num_cpus": 1}})
assert connect_ray(cfg)
seen = ray.get(ray.remote(lambda: {k: v for k, v in os.environ.items()
                                   if k.startswith("EMBED_ARCHIVE_")}).remote())
after = {k: v for k, v in os.environ.items() if k.startswith("EMBED_ARCHIVE_")}
ctx = ray.get_runtime_context()
print("SEEN" + json.dumps({"worker": seen, "commit": git_commit(), "restored": after == before,
                           "runtime_env": ctx.runtime_env, "gcs": ctx.gcs_address}))
ray.shutdown()
"""
    # The session's Ray first: starting it sets the token mode the joining driver needs.
    address = request.getfixturevalue("ray_address") if join else None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "EMBED_"))}
    env.update({"EMBED_ARCHIVE_FAULT": "nowhere:/no/marker", "EMBED_ARCHIVE_CACHE": str(tmp_path)})
    if address:
        env["RAY_ADDRESS"] = address
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("SEEN", 1)[1])
    want = {"EMBED_ARCHIVE_FAULT": "nowhere:/no/marker", "EMBED_ARCHIVE_CACHE": str(tmp_path),
            "EMBED_ARCHIVE_GIT_COMMIT": got["commit"]}
    # A joined cluster's workers also inherit what its own processes had (the session Ray
    # was started from this pytest, EMBED_ARCHIVE_SHARED and all): only those may be extra.
    inherited = {k: v for k, v in os.environ.items() if join and k.startswith("EMBED_ARCHIVE_")}
    assert got["worker"] == {**{k: v for k, v in inherited.items() if k not in want}, **want}
    assert got["restored"]  # the code version it added for the workers is gone again
    if join:
        assert got["gcs"] == env["RAY_ADDRESS"]
        assert want.items() <= got["runtime_env"]["env_vars"].items()
    else:
        assert not got["runtime_env"].get("env_vars")
