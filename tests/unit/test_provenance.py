"""The code version every row carries, and the variant id that names a namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.provenance import (
    GIT_COMMIT_ENV,
    Variant,
    code_version,
    commit_of,
    git_commit,
    package_version,
)


@pytest.mark.parametrize(("commit", "shown"), [
    ("0123456789abcdef0123456789abcdef01234567", "0123456789ab"),
    ("0123456789abcdef0123456789abcdef01234567-dirty", "0123456789ab-dirty"),
])
def test_rows_say_when_the_code_had_uncommitted_changes(monkeypatch: pytest.MonkeyPatch,
                                                         commit: str, shown: str) -> None:
    monkeypatch.setenv(GIT_COMMIT_ENV, commit)
    git_commit.cache_clear()  # read once per process
    try:
        assert code_version() == f"{package_version()}+{shown}"
    finally:
        git_commit.cache_clear()


def test_a_checkout_with_changed_tracked_files_is_dirty(tmp_path) -> None:
    """What git says, in a real repository: the test above only passes the suffix along."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t",
                               "-c", "user.email=t@example.org", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert commit_of(tmp_path) == "unknown"  # not a checkout
    git("init", "-q")
    (tmp_path / "job.py").write_text("a = 1\n")
    git("add", "job.py")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    assert commit_of(tmp_path) == head
    (tmp_path / "notes.txt").write_text("untracked")
    assert commit_of(tmp_path) == head  # untracked files are not the code that ran
    (tmp_path / "job.py").write_text("a = 2\n")
    assert commit_of(tmp_path) == f"{head}-dirty"
    # The package in a virtualenv (ignored, untracked) inside this repository: not its code.
    site = tmp_path / ".venv" / "site-packages" / "pipeline"
    site.mkdir(parents=True)
    (site / "provenance.py").write_text("")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    assert commit_of(site.parent, tracked=site / "provenance.py") == "unknown"
    assert commit_of(tmp_path, tracked=tmp_path / "job.py") == f"{head}-dirty"


def test_a_variant_id_stays_a_string_in_readers_that_type_partitions_by_their_look(
        tmp_path: Path) -> None:
    """Spark, Polars and pyarrow's Hive discovery type ``variant=012345678901`` as a number
    (its 0 lost; ``1234e5678901`` a float, inf): about one hash in 120 looks so. Found here
    by trying windows until the hash is all digits, then read back as pyarrow discovers it."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    base = Variant(model_name="beats", model_family="beats", weights_sha256="random",
                   model_options={}, preprocessing={}, sample_rate_hz=16_000, layers=(11,),
                   pooling="mean", precision="fp32", window_s=5.0, hop_s=2.5, tail="pad",
                   min_tail_s=0.0, channels="mix", resample_quality="HQ",
                   recording_pooling="mean")
    variant = next(v for k in range(1, 100_000)
                   if (v := dataclasses.replace(base, hop_s=k / 1000)).id[1:].isdigit())
    assert re.fullmatch(r"v[0-9]{12}", variant.id)
    folder = tmp_path / f"variant={variant.id}"
    folder.mkdir()
    pq.write_table(pa.table({"x": [1]}), folder / "part.parquet")
    read = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert read.schema.field("variant").type == pa.string()
    assert read.column("variant").to_pylist() == [variant.id]


def test_every_row_carries_this_jobs_config_hash_weights_and_code(tmp_path: Path) -> None:
    """The row columns and the job record must name the config that ran and the weights
    loaded: one swapped for another (the variant id as ``config_sha256``, the model name
    as ``weights_sha256``) and rows from different configs or checkpoints look alike."""
    import datetime as dt

    from pipeline.config import JobConfig
    from pipeline.provenance import JobProvenance, make_job_id

    cfg = JobConfig.from_dict({"input": {"uri": str(tmp_path)},
                               "model": {"name": "beats", "weights": "random"},
                               "output": {"uri": str(tmp_path / "out")}})
    variant = Variant(model_name="beats", model_family="beats", weights_sha256="ab" * 32,
                      model_options={}, preprocessing={}, sample_rate_hz=16_000, layers=(11,),
                      pooling="mean", precision="fp32", window_s=5.0, hop_s=2.5, tail="pad",
                      min_tail_s=0.0, channels="mix", resample_quality="HQ",
                      recording_pooling="mean")
    job_id = make_job_id()
    prov = JobProvenance.create(cfg, job_id, variant, "gs://w/beats.pt")
    assert prov.row_columns() == {
        "job_id": job_id, "model_name": "beats", "weights_sha256": "ab" * 32,
        "config_sha256": cfg.sha256(), "code_version": code_version()}
    record = prov.to_dict()
    assert (record["config_sha256"], record["weights_sha256"], record["variant"],
            record["weights_uri"]) == (cfg.sha256(), "ab" * 32, variant.id, "gs://w/beats.pt")
    assert {"python", "torch", "ray", "pyarrow", "numpy", "soundfile", "soxr",
            "fsspec"} <= set(record["libraries"])
    # Job ids sort by start time: year, month, day, then the time of day.
    stamp = dt.datetime.strptime(job_id.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 60
