"""A corpus of broken recordings: the job finishes and each file lands where the policy says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from pipeline.catalog import load_catalog, render
from pipeline.config import JobConfig
from pipeline.job import EXIT_ABORTED, EXIT_SOME_FAILED, EmbeddingJob
from tests.conftest import write_tone
from tests.integration.conftest import job_dict


def _damage(path: Path, keep_fraction: float | None = None, scramble_middle: bool = False) -> None:
    data = bytearray(path.read_bytes())
    if keep_fraction is not None:
        data = data[: int(len(data) * keep_fraction)]
    if scramble_middle:
        mid = len(data) // 2
        data[mid : mid + 4000] = np.random.default_rng(5).bytes(4000)
    path.write_bytes(bytes(data))


# file name -> (where it must land, error_type or expected status)
EXPECTED = {
    "random_bytes.wav": ("error", "UnreadableAudio"),
    "zero_bytes.flac": ("error", "UnreadableAudio"),
    "text.mp3": ("error", "UnreadableAudio"),
    "no_frames.wav": ("error", "EmptyAudio"),
    "one_sample.wav": ("error", "TooShort"),
    "many_channels.wav": ("error", "TooManyChannels"),
    "too_slow.wav": ("error", "UnsupportedSampleRate"),
    "truncated.wav": ("partial", "truncated"),
    "truncated.flac": ("partial", "decoding stopped"),
    "truncated.mp3": ("partial", "truncated"),  # its Xing header still declares the full length
    "corrupt_middle.flac": ("partial", "decoding stopped"),
    "nan_inf.wav": ("partial", "non-finite samples replaced by 0"),
    "good.wav": ("ok", None),
    "good_stereo.flac": ("ok", None),
}


@pytest.fixture(scope="module")
def bad_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "random_bytes.wav").write_bytes(np.random.default_rng(0).bytes(50_000))
    (root / "zero_bytes.flac").write_bytes(b"")
    (root / "text.mp3").write_text("this is a text file pretending to be an mp3\n" * 100)
    sf.write(root / "no_frames.wav", np.zeros((0, 1), np.float32), 16_000)
    sf.write(root / "one_sample.wav", np.zeros((1, 1), np.float32), 16_000)
    sf.write(root / "many_channels.wav", np.zeros((16_000, 80), np.float32), 16_000)
    sf.write(root / "too_slow.wav", np.zeros(2_000, np.float32), 400)
    write_tone(root / "truncated.wav", 6.0, 22_050)
    _damage(root / "truncated.wav", keep_fraction=0.5)
    write_tone(root / "truncated.flac", 6.0, 32_000, fmt="FLAC")
    _damage(root / "truncated.flac", keep_fraction=0.5)
    write_tone(root / "truncated.mp3", 6.0, 44_100, fmt="MP3", subtype="MPEG_LAYER_III")
    _damage(root / "truncated.mp3", keep_fraction=0.5)
    write_tone(root / "corrupt_middle.flac", 6.0, 16_000, fmt="FLAC")
    _damage(root / "corrupt_middle.flac", scramble_middle=True)
    x = write_tone(root / "nan_inf.wav", 4.0, 16_000)
    x[1000:1100] = np.nan
    x[20_000] = np.inf
    x[30_000] = -np.inf
    sf.write(root / "nan_inf.wav", x, 16_000, subtype="FLOAT")
    write_tone(root / "good.wav", 5.0, 48_000)
    write_tone(root / "good_stereo.flac", 5.0, 22_050, channels=2, fmt="FLAC")
    return root


@pytest.fixture(scope="module")
def bad_run(bad_archive: Path, tmp_path_factory: pytest.TempPathFactory, ray_session: None):
    out = tmp_path_factory.mktemp("bad-out") / "out"
    raw = job_dict(str(bad_archive), str(out), audio={"max_channels": 64})
    summary = EmbeddingJob(JobConfig.from_dict(raw)).run()
    return out, summary


def test_every_file_lands_where_the_policy_says(bad_run) -> None:
    out, summary = bad_run
    assert summary.exit_code == EXIT_SOME_FAILED
    errors = {Path(uri).name: (etype, msg) for uri, etype, msg in duckdb.sql(
        f"SELECT source_uri, error_type, message FROM read_parquet('{out}/errors/**/*.parquet')"
    ).fetchall()}
    recs = {Path(uri).name: (status, detail) for uri, status, detail in duckdb.sql(
        f"""SELECT DISTINCT source_uri, status, status_detail
            FROM read_parquet('{out}/recordings/**/*.parquet')""").fetchall()}
    assert set(errors) | set(recs) == set(EXPECTED)
    assert not set(errors) & set(recs)
    for name, (where, what) in EXPECTED.items():
        if where == "error":
            assert errors[name][0] == what, (name, errors.get(name))
            assert errors[name][1], name
        else:
            status, detail = recs[name]
            assert status == where, (name, status, detail)
            if what:
                assert what in detail, (name, detail)
    assert summary.failed == sum(1 for w, _ in EXPECTED.values() if w == "error")


def test_no_nan_anywhere(bad_run) -> None:
    out, _ = bad_run
    for table in ("windows", "recordings"):
        data = pq.read_table(out / table, partitioning="hive")
        emb = np.concatenate(data.column("embedding").to_numpy(zero_copy_only=False))
        assert np.isfinite(emb).all(), table
        assert data.num_rows > 0


def test_partial_recordings_keep_what_decoded(bad_run) -> None:
    out, _ = bad_run
    rows = dict(duckdb.sql(f"""SELECT regexp_extract(source_uri, '[^/]+$'), max(duration_s)
                               FROM read_parquet('{out}/recordings/**/*.parquet') GROUP BY 1""").fetchall())
    assert 2.0 < rows["truncated.wav"] < 3.1
    assert 0.5 < rows["corrupt_middle.flac"] < 4.0
    assert rows["good.wav"] == pytest.approx(5.0)


def test_inspect_and_the_summary_say_where_the_partial_recordings_are(bad_run) -> None:
    """"(1 ok, 3 partial, 2 failed)", and only a query found which were partial, and why."""
    out, summary = bad_run
    partial = {name: what for name, (where, what) in EXPECTED.items() if where == "partial"}
    assert summary.partial == len(partial)
    assert (f"partial      {len(partial)} recordings embedded in part, why in status_detail"
            in summary.render())
    shown = render(load_catalog(str(out)))
    assert f"partial recordings {len(partial)}: status 'partial' in recordings/" in shown
    examples = dict(line.split(None, 1)[1].split(": ", 1) for line in shown.splitlines()
                    if line.startswith("    partial "))
    assert {Path(uri).name for uri in examples} == set(partial)  # five: all of them
    for uri, detail in examples.items():
        assert partial[Path(uri).name] in detail, (uri, detail)


def test_failure_budget_stops_the_job(bad_archive: Path, tmp_path: Path, ray_session: None) -> None:
    raw = job_dict(str(bad_archive), str(tmp_path / "out"),
                   run={"shard_size": 7, "max_failed_fraction": 0.2, "min_recordings_before_abort": 5})
    from pipeline.errors import JobAborted

    job = EmbeddingJob(JobConfig.from_dict(raw))
    with pytest.raises(JobAborted, match="max_failed_fraction=0.2"):
        job.run()
    record = json.loads(next((tmp_path / "out" / "_jobs").glob("*.json")).read_text())
    assert record["summary"]["status"] == "aborted"
    assert record["summary"]["exit_code"] == EXIT_ABORTED
    # The first shard is kept, and any other whose commit was under way; the record counts
    # every committed shard.
    markers = list((tmp_path / "out" / "_commits").glob("**/*.json"))
    assert 1 <= len(markers) == len(record["summary"]["shard_outcomes"])
    assert record["summary"]["failed"] == sum(
        r.get("outcome") == "error" for m in markers for r in json.loads(m.read_text())["recordings"])


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_exit_codes(bad_archive: Path, tmp_path: Path, ray_address: str) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job_dict(str(tmp_path / "nothing-here"), str(tmp_path / "o"))))
    empty = cli("run", str(cfg), cwd=tmp_path)
    assert empty.returncode == 2
    assert "does not exist" in empty.stderr and "Traceback" not in empty.stderr

    (tmp_path / "empty_dir").mkdir()
    cfg.write_text(yaml.safe_dump(job_dict(str(tmp_path / "empty_dir"), str(tmp_path / "o"))))
    none = cli("run", str(cfg), cwd=tmp_path)
    assert none.returncode == 2 and "no recordings found" in none.stderr

    bad = cli("run", str(cfg), "--set", "windows.hop=3", cwd=tmp_path)
    assert bad.returncode == 2
    assert "windows.hop: unknown key (did you mean 'hop_s'?)" in bad.stderr
    assert "Started a local Ray" not in bad.stderr + bad.stdout  # failed before Ray started

    cfg.write_text(yaml.safe_dump(job_dict(str(bad_archive), str(tmp_path / "o2"),
                                           run={"progress": False},
                                           compute={"address": ray_address})))
    mixed = cli("run", str(cfg), cwd=tmp_path)
    assert mixed.returncode == EXIT_SOME_FAILED, mixed.stderr[-2000:]
    assert "recordings failed ->" in mixed.stdout
    # Each partial recording named on the console, as its decode task said it (the WAV too,
    # found short only after its last block).
    for name, (where, what) in EXPECTED.items():
        said = f"partial decode of {bad_archive / name}: "
        assert (said in mixed.stderr) == (where == "partial"), (name, mixed.stderr[-3000:])
        if where == "partial":
            assert what in mixed.stderr.partition(said)[2].splitlines()[0], name
