"""How a complete shard's reports and pooled sums settle into rows and per-recording outcomes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import JobConfig
from pipeline.job import EmbeddingJob, JobSummary
from pipeline.layout import OutputLayout
from pipeline.sources import SourceItem


def test_outcomes_count_windows_dropped_as_non_finite(tmp_path: Path) -> None:
    """The commit marker (what ``inspect`` counts) gets these statuses, not the decoder's."""
    job = EmbeddingJob(JobConfig.from_dict({
        "input": {"uri": str(tmp_path)}, "model": {"name": "beats", "weights": "random"},
        "output": {"uri": str(tmp_path / "out")}}))
    job.layers = [0]
    names = ("clean", "half_dropped", "all_dropped", "unreadable")
    items = [SourceItem(uri=f"/x/{n}.wav", path=f"/x/{n}.wav", size_bytes=1, version="v",
                        recording_id=n) for n in names]
    decoded = {"status": "ok", "problems": [], "windows": {"-1": 2}, "duration_s": 2.0,
               "source_sample_rate_hz": 16_000, "source_channels": 1}
    reports = dict.fromkeys(names[:3], decoded)
    reports["unreadable"] = {"status": "error", "error_type": "UnreadableAudio", "message": "x"}
    dropped = {"half_dropped": {(-1, 1)}, "all_dropped": {(-1, 0), (-1, 1)}}
    pooled = {("clean", -1, 0): (2, np.ones(4, np.float32)),
              ("half_dropped", -1, 0): (1, np.ones(4, np.float32))}
    rec_rows, err_rows, outcome, statuses = job._settle("s", items, reports, dropped, pooled)
    assert statuses == {"clean": "ok", "half_dropped": "partial", "all_dropped": "error",
                        "unreadable": "error"}
    assert (outcome.embedded, outcome.partial, outcome.failed) == (1, 1, 2)
    assert outcome.windows == 3
    assert sorted((r["recording_id"], r["status"]) for r in rec_rows) == [
        ("clean", "ok"), ("half_dropped", "partial")]
    assert sorted((e["recording_id"], e["error_type"]) for e in err_rows) == [
        ("all_dropped", "NonFiniteEmbedding"), ("unreadable", "UnreadableAudio")]


def test_the_summary_points_at_the_errors_directory_the_layout_writes() -> None:
    layout = OutputLayout("/out", "my_pkg.models:Frames", "v1", {})
    summary = JobSummary(job_id="j", output_uri="/out", model="my_pkg.models:Frames",
                         variant="v1", weights="random", failed=1)
    assert layout.uri(layout.table_dir("errors")) in summary.render()
