"""The demo's DuckDB queries read one namespace: rows of two variants never mix."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import query


def write_namespace(root: Path, variant: str, job_id: str, files: list[str]) -> None:
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
    for table, data in (("recordings", rec), ("windows", win)):
        folder = root / table / "model=beats" / f"variant={variant}"
        folder.mkdir(parents=True)
        pq.write_table(data, folder / "part-0.parquet")


def test_the_newest_namespace_by_default_another_by_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_namespace(tmp_path, "0123", "20261122T100000Z-aaaaaa", ["old.wav", "both.wav"])
    write_namespace(tmp_path, "4567", "20261122T110000Z-bbbbbb", ["new.wav", "both.wav"])
    assert query.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "namespace model=beats/variant=4567" in out
    assert "new.wav" in out and "old.wav" not in out
    assert query.main([str(tmp_path), "0123"]) == 0  # a zero-led id stays a string
    out = capsys.readouterr().out
    assert "variant=0123" in out and "new.wav" not in out and "old.wav" in out
    assert query.main([str(tmp_path), "89"]) == 1
