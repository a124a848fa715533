"""Exactly-once: kill the job at many moments, rerun, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import yaml

from pipeline.config import JobConfig
from pipeline.errors import ConfigError, PipelineStalled
from pipeline.job import EmbeddingJob
from tests.conftest import write_tone
from tests.integration.conftest import job_dict

NUM_FILES = 12
SHARD = 4  # three shards


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve short recordings of different lengths, rates and formats."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(3)
    for i in range(NUM_FILES):
        rate = [16_000, 22_050, 32_000, 44_100][i % 4]
        fmt, ext = [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")][i % 3]
        write_tone(root / f"rec_{i:02d}.{ext}", float(rng.uniform(1.0, 7.0)), rate,
                   freq_hz=float(rng.uniform(200, 3000)), fmt=fmt, seed=i)
    return root


def config(archive: Path, out: Path, address: str | None = None, **run: object) -> dict:
    """The job; with ``address`` it joins the session's Ray (a CLI subprocess does)."""
    compute: dict[str, object] = {"torch_threads": 1}  # same arithmetic in every process
    if address:
        compute["address"] = address
    # Files of a few rows, so that shards commit one by one while the pipeline still runs
    # (a write task gathers up to one file's rows before it writes).
    return job_dict(str(archive), str(out), run={"shard_size": SHARD, **run}, compute=compute,
                    output={"file_mb": 0.005})


def rows(out: Path) -> dict[tuple, np.ndarray]:
    """(recording, channel, window, layer) -> embedding, asserting no key appears twice."""
    got = duckdb.sql(f"""SELECT recording_id, channel, window_index, layer, embedding
                         FROM read_parquet('{out}/windows/**/*.parquet')""").fetchall()
    table = {(r, c, w, l): np.asarray(e, np.float32) for r, c, w, l, e in got}
    assert len(table) == len(got), "duplicate window rows"
    return table


def recording_rows(out: Path) -> list[tuple]:
    got = duckdb.sql(f"""SELECT recording_id, channel, layer, num_windows
                         FROM read_parquet('{out}/recordings/**/*.parquet') ORDER BY ALL""").fetchall()
    assert len(got) == len(set(got))
    return got


@pytest.fixture(scope="module")
def baseline(archive: Path, tmp_path_factory: pytest.TempPathFactory, ray_session: None):
    out = tmp_path_factory.mktemp("baseline") / "out"
    summary = EmbeddingJob(JobConfig.from_dict(config(archive, out))).run()
    assert summary.embedded == NUM_FILES and summary.shards == 3
    return rows(out), recording_rows(out)


def run_cli(cfg: dict, tmp: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    path = tmp / f"job-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(path)], env={**os.environ, **env},
        capture_output=True, text=True, timeout=timeout, start_new_session=True, check=False)


def assert_same(out: Path, baseline) -> None:
    want_rows, want_recs = baseline
    got = rows(out)
    assert set(got) == set(want_rows)
    for key, emb in want_rows.items():
        np.testing.assert_allclose(got[key], emb, rtol=1e-5, atol=1e-6)
    assert recording_rows(out) == want_recs


def recorded_failed_then_resumed(archive: Path, out: Path, baseline, message: str) -> None:
    """The failed run's record says so, its message starting with ``message``; a rerun
    then finishes with every recording, exactly as an undisturbed run."""
    record = json.loads(next((out / "_jobs").glob("*.json")).read_text())
    assert record["summary"]["status"] == "failed"
    assert record["summary"]["message"].startswith(message)
    summary = EmbeddingJob(JobConfig.from_dict(config(archive, out))).run()
    assert summary.exit_code == 0
    assert summary.embedded + summary.recordings_already_done == NUM_FILES
    assert_same(out, baseline)


@pytest.mark.parametrize("point", ["listed", "decode", "decoded", "embed", "before_publish",
                                   "publishing", "before_commit"])
def test_sigkill_at_each_point_then_rerun(point: str, archive: Path, baseline, tmp_path: Path,
                                         ray_address: str) -> None:
    out = tmp_path / "out"
    marker = tmp_path / "fault.marker"
    marker.write_text("armed")
    cfg = config(archive, out, ray_address)
    proc = run_cli(cfg, tmp_path, {"EMBED_ARCHIVE_FAULT": f"{point}:{marker}",
                                   "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    assert not marker.exists(), f"fault point {point} was never reached:\n{proc.stderr[-3000:]}"
    if point in ("decode", "decoded", "embed"):
        # A worker or actor died; Ray retried it and the job finished by itself.
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        summary = EmbeddingJob(JobConfig.from_dict(config(archive, out))).run()
        assert summary.exit_code == 0
        # Every point is first reached in the first shard, so nothing was committed yet.
        assert summary.recordings_already_done == 0
        assert summary.embedded == NUM_FILES
    assert_same(out, baseline)


def test_sigkill_after_the_first_commit_then_rerun_does_only_the_rest(
        archive: Path, baseline, tmp_path: Path, ray_address: str) -> None:
    """The driver dies right after its first commit marker, with another shard's commit
    perhaps under way on a second thread: the rerun takes the committed shards as done and
    embeds exactly the others.

    A kill from outside "as soon as a marker appears" raced the driver, which on a fast
    machine committed all three shards within one poll; the fault point makes the moment exact.
    """
    out = tmp_path / "out"
    marker = tmp_path / "fault.marker"
    marker.write_text("armed")
    proc = run_cli(config(archive, out, ray_address), tmp_path,
                   {"EMBED_ARCHIVE_FAULT": f"committed:{marker}",
                    "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    committed = len(list((out / "_commits").glob("**/*.json")))
    # The other shards' commits run beside the first, on other threads (COMMIT_THREADS):
    # between its marker and the kill they may write theirs, up to all three (seen once in
    # a CI run under load).
    assert 1 <= committed <= 3
    summary = EmbeddingJob(JobConfig.from_dict(config(archive, out))).run()
    assert summary.exit_code == 0
    assert summary.recordings_already_done == committed * SHARD
    assert summary.shards == 3 - committed
    assert summary.embedded == NUM_FILES - committed * SHARD
    assert_same(out, baseline)


def test_a_stalled_pipeline_fails_in_time_and_a_rerun_resumes(
        archive: Path, baseline, tmp_path: Path, ray_address: str) -> None:
    """The embedding actor hangs mid batch, for good (as actors waiting on blocks a lost node
    held, or on a node that never comes back): no block moves any more, and the run fails
    once ``run.stall_timeout_s`` has gone by, saying so in the job's terms (exit 1), where it
    used to wait 30 minutes (Ray Data's default) and print how to change a DataContext."""
    out = tmp_path / "out"
    marker = tmp_path / "fault.marker"
    marker.write_text("armed")
    began = time.monotonic()
    proc = run_cli(config(archive, out, ray_address, stall_timeout_s=4), tmp_path,
                   {"EMBED_ARCHIVE_FAULT": f"embed+hang:{marker}",
                    "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}, timeout=180)
    assert not marker.exists(), proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.monotonic() - began < 120
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("embed-archive: failed: the pipeline stalled: no stage moved a "
                           "block for 4 s (run.stall_timeout_s)"), last
    recorded_failed_then_resumed(archive, out, baseline, "PipelineStalled: the pipeline stalled")


def test_a_batch_that_kills_its_actor_each_time_fails_the_run_at_once_and_resumes(
        archive: Path, baseline, tmp_path: Path, ray_address: str) -> None:
    """Every embedding actor that takes a batch dies (as one run out of memory by a batch
    too large for its node does): Ray used to restart it and hand it the same batch
    forever, with no error, until ``run.stall_timeout_s`` (30 min). The batch is tried
    ``CRASH_RETRIES`` + 1 times and the run fails saying why (exit 1); the rerun resumes."""
    from pipeline.job import CRASH_RETRIES

    out = tmp_path / "out"
    marker = tmp_path / "fault.marker"
    marker.write_text("")
    proc = run_cli(config(archive, out, ray_address), tmp_path,
                   {"EMBED_ARCHIVE_FAULT": f"embed+every:{marker}",
                    "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Each try of the batch killed an actor (the other actor's batches may have too).
    assert CRASH_RETRIES + 1 <= len(marker.read_text().split()) <= 2 * (CRASH_RETRIES + 1)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"embed-archive: failed: a worker died {CRASH_RETRIES + 1} times on "
                           "the same work"), last
    marker.unlink()
    recorded_failed_then_resumed(archive, out, baseline, "WorkersCrashed: a worker died")


def test_a_recording_that_kills_every_process_decoding_it_is_an_error_row_in_its_run(
        archive: Path, baseline, tmp_path: Path, ray_address: str) -> None:
    """One recording kills every process that decodes it (a decoder's segfault): its decode
    worker dies once, the task's retry decodes it in a process of its own, which dies too,
    and it becomes an error row, ``DecoderCrashed``, in that run, which finishes (exit 3)
    with the rest embedded exactly as an undisturbed run does. The next run has nothing
    left to do; one that names the error, the decoder fixed, embeds it."""
    out = tmp_path / "out"
    marker = tmp_path / "fault.marker"
    marker.write_text("")
    culprit = next(archive.glob("rec_05.*"))
    env = {"EMBED_ARCHIVE_FAULT": f"decode@{culprit.name}+every:{marker}",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = run_cli(config(archive, out, ray_address), tmp_path, env, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]  # done, some recordings failed
    assert len(marker.read_text().split()) == 2  # its worker, then the process apart
    [(rid, kind, message)] = duckdb.sql(f"""
        SELECT recording_id, error_type, message
        FROM read_parquet('{out}/errors/**/*.parquet')""").fetchall()
    assert kind == "DecoderCrashed"
    assert message.startswith("decoding it killed the process it ran in apart (killed by "
                              "SIGKILL), after its decode worker had died on it"), message
    assert not (out / "_crashes").exists()  # the error row is its record
    want_rows, want_recs = baseline
    assert rid in {key[0] for key in want_rows}
    got = rows(out)
    assert set(got) == {key for key in want_rows if key[0] != rid}
    for key, emb in got.items():
        np.testing.assert_allclose(emb, want_rows[key], rtol=1e-5, atol=1e-6)
    assert recording_rows(out) == [r for r in want_recs if r[0] != rid]
    again = EmbeddingJob(JobConfig.from_dict(config(archive, out))).run()
    assert (again.exit_code, again.recordings_already_done) == (0, NUM_FILES)

    # The decoder fixed (the fault disarmed), a run that names the error redoes it: the
    # recording is embedded, its error row gone, every row as undisturbed.
    marker.unlink()
    fixed = EmbeddingJob(JobConfig.from_dict(
        config(archive, out, retry_errors=["DecoderCrashed"]))).run()
    assert (fixed.exit_code, fixed.embedded, fixed.failed) == (0, 1, 0)
    assert not list((out / "errors").rglob("*.parquet"))  # its shard's only error row
    assert_same(out, baseline)


def test_more_such_recordings_in_a_task_than_it_has_retries_fail_the_run_naming_them(
        tmp_path: Path, ray_address: str) -> None:
    """Five recordings of one decode task kill every process that decodes them. Each costs
    the task a try, so it runs out of them at the fourth: the run fails (exit 1) naming
    the three whose error rows its tries had made, and records them; the rerun makes
    those error rows without decoding them, meets the other two as the first run met
    these, and finishes (exit 3), every recording embedded or an error row."""
    from pipeline.job import CRASH_RETRIES

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    # Forty recordings on the session's two CPUs make tasks of five, in the listing's order.
    names = [f"a_bad_{i}.wav" for i in range(5)] + [f"b_ok_{i:02d}.wav" for i in range(35)]
    for i, name in enumerate(names):
        write_tone(src / name, 1.0, 16_000, seed=i)
    marker = tmp_path / "fault.marker"
    marker.write_text("")
    env = {"EMBED_ARCHIVE_FAULT": f"decode@a_bad+every:{marker}",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = run_cli(config(src, out, ray_address), tmp_path, env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Each try died on a recording the tries before had not reached; each but the first
    # decoded the one before apart, which died too.
    assert len(marker.read_text().split()) == 2 * CRASH_RETRIES + 1
    last = proc.stderr.strip().splitlines()[-1]
    named = "; ".join(f"{src / f'a_bad_{i}.wav'} (2 times)" for i in range(CRASH_RETRIES))
    assert last.startswith(f"embed-archive: failed: {CRASH_RETRIES} recordings killed the "
                           "processes decoding them, more in one task than its retries could "
                           f"set aside: {named}; recorded under "), last
    assert len(list((out / "_crashes").rglob("*.json"))) == CRASH_RETRIES

    proc = run_cli(config(src, out, ray_address), tmp_path, env, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len(marker.read_text().split()) == 2 * CRASH_RETRIES + 1 + 2 * 2
    errors = duckdb.sql(f"""SELECT error_type, count(*) FROM
                            read_parquet('{out}/errors/**/*.parquet') GROUP BY ALL""").fetchall()
    assert errors == [("DecoderCrashed", 5)]
    embedded = duckdb.sql(f"""SELECT count(DISTINCT recording_id) FROM
                              read_parquet('{out}/recordings/**/*.parquet')""").fetchall()
    assert embedded == [(35,)]
    rows(out)  # no window row twice


def test_a_run_stops_its_crash_ledgers_when_its_pipeline_is_over(
        tmp_path: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs in one process on one Ray (a notebook, a service, this test session) leave no
    ledger actor behind them, though the job object lives on."""
    import ray
    from ray.exceptions import RayActorError

    from pipeline import crashes

    started: list[Any] = []
    start = crashes.start_ledgers
    monkeypatch.setattr(crashes, "start_ledgers",
                        lambda cpus: tuple(started.extend(start(cpus)) or started))
    src = tmp_path / "in"
    src.mkdir()
    write_tone(src / "a.wav", 2.5, 16_000)
    job = EmbeddingJob(JobConfig.from_dict(config(src, tmp_path / "out")))
    assert job.run().exit_code == 0
    assert started
    for ledger in started:
        with pytest.raises(RayActorError):
            ray.get(ledger.died_on.remote(crashes.SUSPECT_DEATHS), timeout=30)


def test_a_run_whose_actors_lost_every_node_that_could_hold_them_fails_and_resumes(
        archive: Path, baseline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cluster, the node that held the embedding actors is lost and none can take them:
    Ray keeps them pending, and its no-progress guard does not fire while decoding still
    hands the embedder a block every 10 s. The job's own watch (``ray.nodes()`` answering
    no live node here) interrupts the wait once ``run.stall_timeout_s`` has gone by, and the
    run fails as a stall (exit 1, complete shards committed); the rerun resumes exactly."""
    import ray

    from pipeline import compute

    monkeypatch.setattr(compute, "ROOM_CHECK_EVERY_S", 0.1)
    monkeypatch.setattr(ray, "nodes", list)
    out = tmp_path / "out"
    job = EmbeddingJob(JobConfig.from_dict(config(archive, out, "auto", stall_timeout_s=0.5)))
    with pytest.raises(PipelineStalled, match=r"^the pipeline stalled: no live node could hold "
                       r"an embedding actor \(1 CPU\) for 0.5 s \(run.stall_timeout_s\)"):
        job.run()  # the watch fires well before the actors' first batch
    record = json.loads(next((out / "_jobs").glob("*.json")).read_text())
    assert (record["summary"]["status"], record["summary"]["exit_code"]) == ("failed", 1)
    monkeypatch.undo()
    again = EmbeddingJob(JobConfig.from_dict(config(archive, out))).run()
    assert again.exit_code == 0
    assert again.embedded + again.recordings_already_done == NUM_FILES
    assert_same(out, baseline)


def test_a_config_change_never_mixes_outputs(archive: Path, baseline, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    first = EmbeddingJob(JobConfig.from_dict(config(archive, out, shard_size=NUM_FILES)))
    first.run()
    changed = config(archive, out, shard_size=NUM_FILES)
    changed["windows"] = {"window_s": 1.0, "hop_s": 1.0, "tail": "pad"}
    second = EmbeddingJob(JobConfig.from_dict(changed))
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        second.prepare()
    assert second.already_done == 0  # a new namespace: nothing of the first run counts
    # ... which the run says, naming what differs: a changed hop re-embeds everything
    noted = [r.getMessage() for r in caplog.records if "already holds variant" in r.getMessage()]
    assert len(noted) == 1 and first.variant.id in noted[0] and second.variant.id in noted[0]
    assert "differ in windows.window_s: 2.0 there, 1.0 here. To resume" in noted[0]
    second.run()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        EmbeddingJob(JobConfig.from_dict(changed)).prepare()  # resuming its own: no word
    assert not [r for r in caplog.records if "already holds variant" in r.getMessage()]
    variants = duckdb.sql(f"""SELECT variant, count(*) FROM read_parquet('{out}/windows/**/*.parquet',
                                hive_partitioning = true) GROUP BY variant""").fetchall()
    assert len(variants) == 2
    first_variant = next(v for v, _ in variants if v != second.variant.id)
    only_first = duckdb.sql(f"""SELECT recording_id, channel, window_index, layer, embedding
        FROM read_parquet('{out}/windows/**/*.parquet', hive_partitioning = true)
        WHERE variant = '{first_variant}'""").fetchall()
    assert len(only_first) == len(baseline[0])


def test_variant_record_conflict_is_refused(archive: Path, tmp_path: Path, ray_session: None) -> None:
    out = tmp_path / "out"
    job = EmbeddingJob(JobConfig.from_dict(config(archive, out)))
    job.prepare()
    path = Path(job.layout.variant_path())
    path.write_text(path.read_text().replace('"pad"', '"drop"'))
    with pytest.raises(ConfigError, match="refusing to mix"):
        EmbeddingJob(JobConfig.from_dict(config(archive, out))).prepare()


def test_a_retried_decode_task_repeats_none_of_its_delivered_blocks(tmp_path: Path,
                                                                     data_context) -> None:
    """What a multi-recording decode task relies on: Ray retries a killed generator task
    from the start and drops the blocks the first attempt had already delivered."""
    import pyarrow as pa
    import ray.data

    marker = tmp_path / "killed"
    data_context.target_max_block_size = 1  # every yield is its own block, sent at once

    def decode(batch: dict) -> Iterator[dict]:
        for rid in batch["rid"]:
            if rid == "b" and not marker.exists():  # "a" went out; die before "b"
                time.sleep(1.0)
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            for k in range(3):
                yield {"rid": np.array([rid]), "k": np.array([k]), "pad": np.zeros((1, 1000))}

    ds = ray.data.from_arrow([pa.table({"rid": ["a", "b", "c"]}), pa.table({"rid": ["d"]})])
    got = sorted((str(rid), int(k)) for b in ds.map_batches(decode, batch_size=1).iter_batches()
                 for rid, k in zip(b["rid"], b["k"], strict=True))
    assert marker.exists()
    assert got == [(rid, k) for rid in "abcd" for k in range(3)]


def test_a_reopened_shard_keeps_the_rows_of_recordings_no_longer_listed(
        tmp_path: Path, ray_session: None) -> None:
    """Shard {r0, r1}: r1's object is deleted, r0's rewritten. The rerun replaces r0's rows
    by its new version's (the shard reopens) and keeps r1's as they were, moved to a shard
    of their own first; nothing is duplicated, and a third run has nothing to do."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        write_tone(src / f"r{i}.wav", 2.5 + i, 16_000, freq_hz=300.0 + 200 * i, seed=i)
    out = tmp_path / "out"
    cfg = JobConfig.from_dict(job_dict(str(src), str(out), run={"shard_size": 2}))

    def by_uri(table: str) -> dict[str, list[tuple]]:
        got = duckdb.sql(f"""SELECT source_uri, recording_id, channel, layer, embedding
                             FROM read_parquet('{out}/{table}/**/*.parquet')
                             ORDER BY ALL""").fetchall()
        found: dict[str, list[tuple]] = {}
        for uri, *rest in got:
            found.setdefault(Path(uri).name, []).append(tuple(rest[:3]) + (tuple(rest[3]),))
        return found

    first = EmbeddingJob(cfg).run()
    assert first.embedded == 4 and first.shards == 2
    windows, recordings = by_uri("windows"), by_uri("recordings")
    (src / "r1.wav").unlink()
    write_tone(src / "r0.wav", 4.0, 16_000, freq_hz=900.0, seed=9)  # a new version
    second = EmbeddingJob(cfg).run()
    assert second.embedded == 1 and second.recordings_already_done == 2
    rows(out)  # no (recording, channel, window, layer) twice
    after_w, after_r = by_uri("windows"), by_uri("recordings")
    assert after_w["r1.wav"] == windows["r1.wav"] and after_r["r1.wav"] == recordings["r1.wav"]
    assert {r[0] for r in after_w["r0.wav"]} != {r[0] for r in windows["r0.wav"]}
    assert len({r[0] for r in after_w["r0.wav"]}) == 1  # the new version's rows only
    assert after_w["r2.wav"] == windows["r2.wav"] and after_w["r3.wav"] == windows["r3.wav"]
    carved = [m for m in map(json.loads, map(Path.read_text, (out / "_commits").rglob("*.json")))
              if "carved_from" in m]
    assert [[Path(r["source_uri"]).name for r in m["recordings"]] for m in carved] == [["r1.wav"]]
    third = EmbeddingJob(cfg).run()
    assert third.shards == 0 and third.recordings_already_done == 3


def test_a_recording_refused_by_the_jobs_limits_is_embedded_once_they_admit_it(
        tmp_path: Path, ray_session: None) -> None:
    """An 8-kHz and a 3-channel file refused by min_sample_rate_hz / max_channels: a rerun
    that admits them said "0 to embed" and exit 0, their error rows standing, since the
    limits are in no variant (they decide what is embedded, not what it embeds to). The
    marker records the rate and channels refused; a run whose limits admit them redoes
    those recordings only (the shard's others keep their rows: tighter limits never turn
    rows already embedded into errors); limits that still refuse them redo nothing."""
    src = tmp_path / "in"
    src.mkdir()
    write_tone(src / "low.wav", 3.0, 8_000, freq_hz=500.0, seed=1)
    write_tone(src / "wide.wav", 3.0, 16_000, freq_hz=700.0, seed=2, channels=3)
    write_tone(src / "stereo.wav", 3.0, 16_000, freq_hz=800.0, seed=4, channels=2)
    write_tone(src / "fine.wav", 3.0, 16_000, freq_hz=900.0, seed=3)
    out = tmp_path / "out"

    def run(**audio: int) -> Any:
        return EmbeddingJob(JobConfig.from_dict(job_dict(str(src), str(out),
                                                         audio=audio))).run()

    def names(table: str) -> list[tuple]:
        if not list((out / table).rglob("*.parquet")):
            return []
        extra = ", error_type" if table == "errors" else ""
        return duckdb.sql(f"""SELECT DISTINCT regexp_extract(source_uri, '[^/]+$'){extra}
                              FROM read_parquet('{out}/{table}/**/*.parquet') ORDER BY 1""").fetchall()

    first = run(min_sample_rate_hz=10_000, max_channels=2)
    assert (first.embedded, first.failed) == (2, 2)
    assert names("errors") == [("low.wav", "UnsupportedSampleRate"), ("wide.wav", "TooManyChannels")]
    before = rows(out)
    fine_id = duckdb.sql(f"""SELECT DISTINCT recording_id FROM read_parquet('{out}/recordings/**/*.parquet')
                            WHERE source_uri LIKE '%fine.wav'""").fetchall()[0][0]
    # Other limits that still refuse both (and would refuse stereo.wav): nothing redone.
    assert run(min_sample_rate_hz=12_000, max_channels=1).shards == 0
    # Limits that admit the 8-kHz file only (and would refuse stereo.wav): it is done, and
    # fine.wav, marked as met by an outage (a retry) in the same shard; stereo.wav keeps
    # its rows (a shard reopened for a retry was redone whole, stereo turned into an error).
    for path in (out / "_commits").rglob("*.json"):
        marker = json.loads(path.read_text())
        for entry in marker["recordings"]:
            if entry["source_uri"].endswith("fine.wav"):
                entry.update(outcome="error", error_type="StorageError", retry=True, attempts=1)
                path.write_text(json.dumps(marker))
    admitted = run(min_sample_rate_hz=8_000, max_channels=1)
    assert (admitted.embedded, admitted.failed) == (2, 0)
    assert names("errors") == [("wide.wav", "TooManyChannels")]
    assert names("recordings") == [("fine.wav",), ("low.wav",), ("stereo.wav",)]
    after = rows(out)  # nothing twice; the rows kept are the rows written first
    assert before.keys() <= after.keys()
    fine = {k for k in before if k[0] == fine_id}
    assert all(np.array_equal(after[k], v) for k, v in before.items() if k not in fine)
    wider = run(min_sample_rate_hz=8_000, max_channels=3)
    assert (wider.embedded, wider.failed) == (1, 0)
    assert names("errors") == []
    assert run(min_sample_rate_hz=8_000, max_channels=3).shards == 0
    rows(out)
