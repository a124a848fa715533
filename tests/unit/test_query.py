"""The demo's DuckDB queries read one namespace: rows of two variants never mix."""

from __future__ import annotations

import json
from pathlib import Path

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
