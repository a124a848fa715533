"""How a complete shard's reports and pooled sums settle into rows and per-recording outcomes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import JobConfig
from pipeline.job import EmbeddingJob
from pipeline.layout import OutputLayout, shards_to_retry
from pipeline.sources import SourceItem
from pipeline.summary import JobSummary


def test_outcomes_count_windows_dropped_as_non_finite(tmp_path: Path) -> None:
    """The commit marker (what ``inspect`` counts) gets these statuses, not the decoder's."""
    job = EmbeddingJob(JobConfig.from_dict({
        "input": {"uri": str(tmp_path)}, "model": {"name": "beats", "weights": "random"},
        "output": {"uri": str(tmp_path / "out")}}))
    job.layers = [0]
    names = ("clean", "half_dropped", "all_dropped", "unreadable", "cut_short", "outage", "oom")
    items = [SourceItem(uri=f"/x/{n}.wav", path=f"/x/{n}.wav", size_bytes=1, version="v",
                        recording_id=n) for n in names]
    decoded = {"status": "ok", "problems": [], "windows": {"-1": 2}, "duration_s": 2.0,
               "source_sample_rate_hz": 16_000, "source_channels": 1}
    reports = dict.fromkeys(names[:3], decoded)
    reports["unreadable"] = {"status": "error", "error_type": "UnreadableAudio", "message": "x"}
    reports["cut_short"] = {**decoded, "status": "partial", "stopped_by": "StorageError",
                            "transient": True, "problems": ["StorageError: read gave up"]}
    reports["outage"] = {"status": "error", "error_type": "StorageError", "message": "gave up",
                         "transient": True}
    reports["oom"] = {"status": "error", "error_type": "MemoryError", "transient": True,
                      "message": "unexpected: "}
    dropped = {"half_dropped": {(-1, 1)}, "all_dropped": {(-1, 0), (-1, 1)}}
    pooled = {(n, -1, 0): (2, np.ones(4, np.float32)) for n in ("clean", "cut_short")}
    pooled[("half_dropped", -1, 0)] = (1, np.ones(4, np.float32))
    job._attempts = {"oom": 2}  # met in the two runs before this one
    rec_rows, err_rows, outcome, settled = job._shard_rows("s", items, reports, dropped, pooled)
    assert settled == {
        "clean": {"outcome": "ok"},
        "half_dropped": {"outcome": "partial"},
        "all_dropped": {"outcome": "error", "error_type": "NonFiniteEmbedding"},
        "unreadable": {"outcome": "error", "error_type": "UnreadableAudio"},
        "cut_short": {"outcome": "partial", "error_type": "StorageError", "retry": True,
                      "attempts": 1},
        "outage": {"outcome": "error", "error_type": "StorageError", "retry": True,
                   "attempts": 1},
        "oom": {"outcome": "error", "error_type": "MemoryError", "retry": True, "attempts": 3}}
    assert (outcome.embedded, outcome.partial, outcome.failed) == (1, 2, 4)
    assert outcome.windows == 5
    assert sorted((r["recording_id"], r["status"]) for r in rec_rows) == [
        ("clean", "ok"), ("cut_short", "partial"), ("half_dropped", "partial")]
    assert sorted((e["recording_id"], e["error_type"]) for e in err_rows) == [
        ("all_dropped", "NonFiniteEmbedding"), ("oom", "MemoryError"),
        ("outage", "StorageError"), ("unreadable", "UnreadableAudio")]
    # What a rerun reopens: the shard of the three recordings errors not their own stopped
    # (a marker written before ``retry`` existed counts its StorageErrors).
    marker = {"recordings": [{"recording_id": r, **v} for r, v in settled.items()]}
    assert shards_to_retry({"s": marker}) == {"s": 3}
    # run.max_attempts 3: the recording met by such an error in three runs is settled.
    assert shards_to_retry({"s": marker}, max_attempts=3) == {"s": 2}
    assert shards_to_retry({"s": marker}, max_attempts=1) == {}
    assert shards_to_retry({"s": marker}, listed={"outage", "clean"}) == {"s": 1}  # others gone
    old = {"recordings": [{"recording_id": "x", "outcome": "error", "error_type": "StorageError"}]}
    assert shards_to_retry({"old": old}) == {"old": 1}
    assert shards_to_retry({"old": old}, max_attempts=2) == {"old": 1}  # no count kept: one


def test_the_summary_points_at_the_errors_directory_the_layout_writes() -> None:
    layout = OutputLayout("/out", "my_pkg.models:Frames", "v1", {})
    summary = JobSummary(job_id="j", output_uri="/out", model="my_pkg.models:Frames",
                         variant="v1", weights="random", failed=1)
    assert layout.uri(layout.table_dir("errors")) in summary.render()
