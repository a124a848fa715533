"""How a complete shard's reports and pooled sums settle into rows and per-recording
outcomes, and how the driver's commit threads finish when a run stops."""

from __future__ import annotations

import json
import threading
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import commit as commit_mod
from pipeline import summary as summary_mod
from pipeline.config import JobConfig
from pipeline.errors import JobAborted, LeaseLostError
from pipeline.job import EmbeddingJob
from pipeline.layout import OutputLayout, recordings_to_retry
from pipeline.model_settings import settle_model_settings
from pipeline.models import model_info
from pipeline.sink import ShardProgress, WriteReturn
from pipeline.sources import SourceItem
from pipeline.summary import EmbedTiming, JobSummary, LatestWriter, ShardOutcome, Written


def _retry_counts(*args, **kwargs) -> dict[str, int]:
    """``shard -> recordings`` a rerun redoes, counted."""
    return {shard: len(ids) for shard, ids in recordings_to_retry(*args, **kwargs).items()}


def test_with_channels_each_a_status_is_its_channels_and_an_emptied_channel_is_named(
        tmp_path: Path) -> None:
    """Windows dropped on channel 1 made channel 0's rows partial too ("2 windows dropped",
    no channel said), so `status = 'ok'` dropped good rows; a channel that lost every window
    vanished without a word, the run exit 0. Two stereo recordings: one loses a window of
    channel 1, the other every window of channel 1."""
    job = EmbeddingJob(JobConfig.from_dict({
        "input": {"uri": str(tmp_path)}, "model": {"name": "beats", "weights": "random", "layers": [0]},
        "output": {"uri": str(tmp_path / "out")}, "audio": {"channels": "each"}}))
    job.settings = settle_model_settings(job.cfg, model_info("beats"))
    items = [SourceItem(uri=f"/x/{n}.wav", path=f"/x/{n}.wav", size_bytes=1, version="v",
                        recording_id=n) for n in ("some", "all")]
    decoded = {"status": "ok", "problems": [], "windows": {"0": 2, "1": 2}, "duration_s": 2.0,
               "source_sample_rate_hz": 16_000, "source_channels": 2}
    reports = dict.fromkeys(("some", "all"), decoded)
    dropped = {"some": {(1, 0)}, "all": {(1, 0), (1, 1)}}
    pooled = {(n, 0, 0): (2, np.ones(4, np.float32)) for n in ("some", "all")}
    pooled[("some", 1, 0)] = (1, np.ones(4, np.float32))
    rec_rows, err_rows, outcome, settled = commit_mod.shard_rows(
        "s", items, reports, dropped, pooled, cfg=job.cfg, layers=job.settings.layers, attempts={})
    got = {(r["recording_id"], r["channel"]): (r["status"], r["status_detail"]) for r in rec_rows}
    assert got == {
        ("some", 0): ("ok", ""),
        ("some", 1): ("partial", "1 windows dropped: non-finite embedding"),
        ("all", 0): ("partial", "channel 1: every window's embedding was non-finite (no rows)")}
    assert settled == {"some": {"outcome": "partial"}, "all": {"outcome": "partial"}}
    assert (outcome.embedded, outcome.partial, outcome.failed, outcome.windows) == (0, 2, 0, 5)
    assert err_rows == []


def test_outcomes_count_windows_dropped_as_non_finite(tmp_path: Path) -> None:
    """The commit marker (what ``inspect`` counts) gets these statuses, not the decoder's."""
    job = EmbeddingJob(JobConfig.from_dict({
        "input": {"uri": str(tmp_path)}, "model": {"name": "beats", "weights": "random", "layers": [0]},
        "output": {"uri": str(tmp_path / "out")}}))
    job.settings = settle_model_settings(job.cfg, model_info("beats"))
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
    attempts = {"oom": 2}  # met in the two runs before this one
    rec_rows, err_rows, outcome, settled = commit_mod.shard_rows(
        "s", items, reports, dropped, pooled, cfg=job.cfg, layers=job.settings.layers,
        attempts=attempts)
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
    assert outcome.error_types == {"NonFiniteEmbedding": 1, "UnreadableAudio": 1,
                                   "StorageError": 1, "MemoryError": 1}
    # What the summary says a rerun tries again: cut_short and outage; oom met its third
    # run (run.max_attempts 3), the others were the recordings' own.
    assert outcome.retried == 2
    assert outcome.windows == 5
    assert sorted((r["recording_id"], r["status"]) for r in rec_rows) == [
        ("clean", "ok"), ("cut_short", "partial"), ("half_dropped", "partial")]
    assert sorted((e["recording_id"], e["error_type"]) for e in err_rows) == [
        ("all_dropped", "NonFiniteEmbedding"), ("oom", "MemoryError"),
        ("outage", "StorageError"), ("unreadable", "UnreadableAudio")]
    # What a rerun reopens: the shard of the three recordings errors not their own stopped
    # (a marker written before ``retry`` existed counts its StorageErrors).
    marker = {"recordings": [{"recording_id": r, **v} for r, v in settled.items()]}
    assert _retry_counts({"s": marker}) == {"s": 3}
    # run.max_attempts 3: the recording met by such an error in three runs is settled.
    assert _retry_counts({"s": marker}, max_attempts=3) == {"s": 2}
    assert _retry_counts({"s": marker}, max_attempts=1) == {}
    assert _retry_counts({"s": marker}, listed={"outage", "clean"}) == {"s": 1}  # others gone
    old = {"recordings": [{"recording_id": "x", "outcome": "error", "error_type": "StorageError"}]}
    assert _retry_counts({"old": old}) == {"old": 1}
    assert _retry_counts({"old": old}, max_attempts=2) == {"old": 1}  # no count kept: one


def test_the_summary_points_at_the_errors_directory_the_layout_writes() -> None:
    layout = OutputLayout("/out", "my_pkg.models:Frames", "v1", {})
    summary = JobSummary(job_id="j", output_uri="/out", model="my_pkg.models:Frames",
                         variant="v1", weights="random", failed=1)
    assert layout.uri(layout.table_dir("errors")) in summary.render()


def test_the_summary_says_what_the_recordings_failed_of() -> None:
    """Credentials a cluster's workers lack (right on the driver, which listed the bucket)
    fail every recording: the log said only "5 recordings failed", the why was in the
    errors table. The kinds are counted as shards commit; the shard outcomes in the job
    record do not repeat them."""
    job = EmbeddingJob(JobConfig.from_dict({"input": {"uri": "/x"}, "output": {"uri": "/out"}}))
    job.shards = [object(), object()]
    summary = JobSummary(job_id="j", output_uri="s3://emb/run", model="m", variant="v",
                         weights="w")
    job._count_committed(summary, ShardOutcome("a", recordings=3, failed=3,
                                               error_types={"PermissionError": 3}))
    job._count_committed(summary, ShardOutcome("b", recordings=4, failed=2, embedded=2,
                                               error_types={"PermissionError": 1,
                                                            "UnreadableAudio": 1}))
    assert summary.error_types == {"PermissionError": 4, "UnreadableAudio": 1}
    line = next(x for x in summary.render().splitlines() if "recordings failed" in x)
    assert line.endswith("(PermissionError 4, UnreadableAudio 1; `embed-archive inspect "
                         "s3://emb/run` shows a few)")
    assert all("error_types" not in o for o in summary.to_dict()["shard_outcomes"])
    summary.error_types.update({"A": 1, "B": 1, "C": 1})
    assert "(PermissionError 4, A 1, B 1, ...;" in summary.render()


class SlowCommits:
    """Commits that take ``seconds`` each and honour ``stopping`` as ShardCommit.commit does."""

    def __init__(self, seconds: float, fail: set[str] = frozenset()) -> None:
        self.seconds, self.fail = seconds, fail
        self.recorded: list[str] = []
        self.checks: list[str] = []
        self.most_outstanding = 0

    def commit(self, progress: ShardProgress, stopping: threading.Event) -> ShardOutcome:
        stopping.wait(self.seconds)
        if stopping.is_set():
            raise commit_mod.CommitStopped("stopping")
        if progress.shard_id in self.fail:
            raise OSError(f"bucket refused {progress.shard_id}")
        return ShardOutcome(shard_id=progress.shard_id, recordings=1)

    def record(self, outcome: ShardOutcome) -> None:
        self.recorded.append(outcome.shard_id)

    def check(self) -> None:
        self.checks.append(threading.current_thread().name)


def submit_all(committer: commit_mod.Committer, commits: SlowCommits, n: int) -> None:
    for k in range(n):
        committer.submit(ShardProgress(f"s{k:02d}", ["r"], (0,)))
        commits.most_outstanding = max(commits.most_outstanding, len(committer._futures))


def test_after_a_pipeline_error_every_complete_shard_is_still_committed() -> None:
    """As one commit at a time would have: the rows are all written, only the marker waits."""
    commits = SlowCommits(0.02)
    committer = commit_mod.Committer(commits.commit, commits.record, commits.check)
    submit_all(committer, commits, 40)
    committer.close(RuntimeError("the pipeline failed"))
    assert sorted(commits.recorded) == [f"s{k:02d}" for k in range(40)]
    assert commits.most_outstanding <= 3 * commit_mod.COMMIT_THREADS  # the driver waited


def _partials(rid: str, n: int) -> pa.Table:
    """A write return's partial pools: ``n`` window rows of ``rid``, layer 0."""
    return pa.table({"recording_id": [rid], "channel": pa.array([-1], pa.int16()),
                     "layer": pa.array([0], pa.int16()), "count": [n]})


def _report(rid: str, n: int) -> str:
    return json.dumps({"type": "report", "recording_id": rid, "status": "ok",
                       "windows": {"-1": n}, "duration_s": 2.0})


def test_a_shard_whose_rows_arrive_twice_is_refused_and_the_others_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """Duplicated rows (a retried decode task whose second attempt cut its blocks otherwise)
    cost their shard, not the job: it leaves ``pending`` for ``refused``, its later returns
    are dropped, another shard still completes, and the run ends naming what it refused."""
    book = commit_mod.ShardBook({s: ShardProgress(s, [f"{s}-r"], (0,)) for s in ("a", "b")})
    written = Written()

    def take(ret: WriteReturn) -> ShardProgress | None:
        return commit_mod.take_write_return(ret, book, written, {})

    assert take(WriteReturn("a", partials=_partials("a-r", 3))) is None
    assert take(WriteReturn("a", partials=_partials("a-r", 3),
                            reports=[_report("a-r", 3)])) is None
    assert set(book.pending) == {"b"}
    assert "a-r channel -1 layer 0 has 6 window rows" in book.refused["a"]
    assert "nothing of the shard is committed" in caplog.text
    assert take(WriteReturn("a", partials=_partials("a-r", 1))) is None  # dropped, no error
    complete = take(WriteReturn("b", partials=_partials("b-r", 2), reports=[_report("b-r", 2)]))
    assert complete is not None and complete.shard_id == "b" and not book.pending
    assert book.complete == {"b"} and written.recordings == 1 and written.audio_s == 2.0
    assert book.uncommitted().startswith(
        "1 shard(s) refused for rows that reached the driver twice")
    assert commit_mod.ShardBook({}).uncommitted() == ""


def test_rows_that_arrive_twice_after_their_recording_or_shard_settled_are_caught() -> None:
    """A duplicate arriving after its recording settled, the shard still waiting on another,
    overshoots too: the shard is refused, never committed with the copy. One arriving after
    the whole shard was complete (handed to the committer with each row once) is dropped."""
    book = commit_mod.ShardBook({"a": ShardProgress("a", ["r1", "r2"], (0,)),
                               "b": ShardProgress("b", ["r3"], (0,))})

    def take(ret: WriteReturn) -> ShardProgress | None:
        return commit_mod.take_write_return(ret, book, Written(), {})

    assert take(WriteReturn("a", partials=_partials("r1", 3), reports=[_report("r1", 3)])) is None
    assert book.pending["a"].waiting == {"r2"}
    assert take(WriteReturn("a", partials=_partials("r1", 3))) is None
    assert "a" not in book.pending and "r1 channel -1 layer 0 has 6 window rows" in book.refused["a"]
    assert take(WriteReturn("a", partials=_partials("r2", 1), reports=[_report("r2", 1)])) is None
    assert take(WriteReturn("b", partials=_partials("r3", 2), reports=[_report("r3", 2)]))
    assert take(WriteReturn("b", partials=_partials("r3", 2))) is None
    assert book.complete == {"b"} and "b" not in book.refused
    with pytest.raises(RuntimeError, match="of no shard of this run"):
        take(WriteReturn("c", partials=_partials("r4", 1)))


@pytest.mark.parametrize("err", [KeyboardInterrupt(), JobAborted("budget"),
                                 LeaseLostError("taken over")])
def test_an_interrupted_run_starts_no_more_commits(err: BaseException,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    commits = SlowCommits(5.0)
    committer = commit_mod.Committer(commits.commit, commits.record, commits.check)
    submit_all(committer, commits, 20)
    started = time.monotonic()
    committer.close(err)
    # Under-way commits stopped, queued never ran: well short of one commit's 5 s (2 s was
    # a margin a loaded machine's scheduler could eat).
    assert time.monotonic() - started < 4.5
    assert commits.recorded == [] and "not committed" not in caplog.text


def test_a_failed_commit_stops_the_others_and_every_failure_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    commits = SlowCommits(0.05, fail={"s00", "s01"})
    committer = commit_mod.Committer(commits.commit, commits.record, commits.check)
    submit_all(committer, commits, 4)
    with pytest.raises(OSError, match="bucket refused s0[01]") as raised:
        committer.collect(wait="all")
    committer.close(raised.value)
    assert committer.stopping.is_set()
    other = "s01" if "s00" in str(raised.value) else "s00"
    assert f"shard {other} was not committed: OSError: bucket refused {other}" in caplog.text


def test_an_interrupt_while_waiting_after_a_pipeline_error_stops_the_rest() -> None:
    """Ctrl-C while the complete shards commit after a pipeline error: no commit may go on
    past the job record, so the rest stop as after any interrupt."""
    commits = SlowCommits(5.0)
    committer = commit_mod.Committer(commits.commit, commits.record, commits.check)
    submit_all(committer, commits, 20)
    real, calls = committer._pool.shutdown, []

    def interrupted(wait: bool = True, cancel_futures: bool = False) -> None:
        calls.append(cancel_futures)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(wait=wait, cancel_futures=cancel_futures)

    committer._pool.shutdown = interrupted  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        committer.close(RuntimeError("the pipeline failed"))
    assert calls == [False, True] and committer.stopping.is_set()
    assert time.monotonic() - started < 4.5 and commits.recorded == []  # short of one commit


def test_a_commit_is_recorded_when_it_ends_and_its_budget_checked_by_the_driver() -> None:
    """A pipeline stalled for a lost node reads no batch for minutes: the shards committed
    meanwhile are said (and counted) then, not at the next batch; the failure budget, which
    stops the job, is still applied on the driver's thread."""
    commits = SlowCommits(0.01)
    committer = commit_mod.Committer(commits.commit, commits.record, commits.check)
    submit_all(committer, commits, 3)
    deadline = time.monotonic() + 10
    while len(commits.recorded) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # no collect(): the driver is blocked reading the next batch
    assert sorted(commits.recorded) == ["s00", "s01", "s02"] and commits.checks == []
    committer.collect(wait="all")
    assert commits.checks == [threading.current_thread().name]
    committer.close(None)
    assert sorted(commits.recorded) == ["s00", "s01", "s02"]  # each once


def test_each_commit_is_recorded_once_whatever_the_driver_collects() -> None:
    """A commit records itself on its thread before it is done; collect() never does."""
    commits = SlowCommits(0.0)
    committer = commit_mod.Committer(commits.commit, commits.record, commits.check)
    for k in range(300):
        committer.submit(ShardProgress(f"s{k:03d}", ["r"], (0,)))
        committer.collect()
    committer.collect(wait="all")
    committer.close(None)
    assert sorted(commits.recorded) == [f"s{k:03d}" for k in range(300)]


def test_the_failure_budget_stops_the_run_from_collect() -> None:
    commits = SlowCommits(0.0)

    def over_budget() -> None:
        raise JobAborted("4 of 5 recordings failed")

    committer = commit_mod.Committer(commits.commit, commits.record, over_budget)
    submit_all(committer, commits, 2)
    with pytest.raises(JobAborted, match="4 of 5"):
        committer.collect(wait="all")
    committer.close(JobAborted("budget"))
    assert sorted(commits.recorded) == ["s00", "s01"]


def _job(tmp_path: Path, **run: object) -> EmbeddingJob:
    job = EmbeddingJob(JobConfig.from_dict({
        "input": {"uri": str(tmp_path)}, "model": {"name": "beats", "weights": "random", "layers": [0]},
        "output": {"uri": str(tmp_path / "out")}, "run": run}))
    job.settings = settle_model_settings(job.cfg, model_info("beats"))
    return job


def _counts(embedded: int, partial: int, failed: int) -> JobSummary:
    return JobSummary(job_id="j", output_uri="o", model="m", variant="v", weights="w",
                      embedded=embedded, partial=partial, failed=failed)


def test_the_failure_budget_counts_every_finished_recording_and_allows_exactly_its_fraction(
        tmp_path: Path) -> None:
    """Partial recordings are finished too (left out, 3 failed of 6 read as 3 of 4); a
    fraction exactly at the budget is allowed (``more than``); the budget applies from
    ``min_recordings_before_abort`` finished recordings on, not one later."""
    job = _job(tmp_path, max_failed_fraction=0.5, min_recordings_before_abort=4)
    job._check_failure_budget(_counts(1, 2, 3))  # 3 of 6: at the budget
    job._check_failure_budget(_counts(0, 0, 3))  # 3 finished: too few to judge
    with pytest.raises(JobAborted, match="3 of 4 recordings failed"):
        job._check_failure_budget(_counts(1, 0, 3))  # 4 finished: judged
    with pytest.raises(JobAborted, match="4 of 7 recordings failed"):
        job._check_failure_budget(_counts(1, 2, 4))


def test_a_refusal_by_the_jobs_limits_records_the_rate_and_channels_refused() -> None:
    """What a later run with wider limits compares against: the channels recorded as the
    rate (or the reverse) and ``admitted_now`` reopens the wrong recordings, or none."""
    item = SourceItem(uri="/x/a.wav", path="/x/a.wav", size_bytes=1, version="v",
                      recording_id="a")
    mark = commit_mod._failure_mark(item, {"status": "error", "error_type": "TooManyChannels",
                                           "message": "x", "source_sample_rate_hz": 96_000,
                                           "source_channels": 12}, {})
    assert mark == {"outcome": "error", "error_type": "TooManyChannels",
                    "refused": {"sample_rate_hz": 96_000, "channels": 12}}


def test_a_recording_whose_pooled_windows_are_not_those_it_kept_is_refused(
        tmp_path: Path) -> None:
    """Pooled sums that lost windows, or counted one twice, must stop
    the commit, not write a vector pooled over the wrong windows; ``num_windows`` is the
    windows kept, not the channels."""
    job = _job(tmp_path)
    items = [SourceItem(uri="/x/a.wav", path="/x/a.wav", size_bytes=1, version="v",
                        recording_id="a")]
    report = {"status": "ok", "problems": [], "windows": {"-1": 3}, "duration_s": 3.0,
              "source_sample_rate_hz": 16_000, "source_channels": 1}
    settled_by = {"cfg": job.cfg, "layers": job.settings.layers, "attempts": {}}
    rows = commit_mod.shard_rows("s", items, {"a": report}, {}, {("a", -1, 0): (3, np.ones(4))},
                                 **settled_by)
    assert [r["num_windows"] for r in rows.recordings] == [3]
    for count in (2, 4):  # windows lost on their way, or counted twice
        with pytest.raises(RuntimeError, match=f"has {count} window rows, expected 3"):
            commit_mod.shard_rows("s", items, {"a": report}, {},
                                  {("a", -1, 0): (count, np.ones(4))}, **settled_by)


# --------------------------------------------------------------------------- what an operator sees


def test_progress_lines_say_what_is_committed_written_and_left(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows reach the driver a file at a time: before the first, the log said nothing of
    the job for minutes (Ray Data's bars count blocks); after, only as shards committed."""
    import logging

    from pipeline.summary import ProgressLog, Written

    summary = JobSummary(job_id="j", output_uri="/out", model="m", variant="v", weights="w",
                         shards=11)
    written = Written()
    log = ProgressLog(summary, written, todo=45, todo_bytes=4_000_000_000, first_file_rows=4848,
                      every_s=0.05)
    assert log.line().startswith("progress: 0 of 45 recordings committed (0 of 11 shards); "
                                 "none written yet after 0m00s: the first file gathers up to "
                                 "4848 window rows (output.file_mb)")
    log._waiting = lambda: "waiting 45 s for a live node"
    assert log.line().endswith("none written yet after 0m00s: waiting 45 s for a live node")
    log._waiting = lambda: None
    # The first rows written are a failed recording's (an empty file: 44 bytes, no audio):
    # no time left from them (it said "about 173h19m left", then 346h, 519h...).
    written.recordings, written.bytes_read = 1, 44
    assert log.line().endswith("1 written; 0.00 h of audio, 0.00 GB read, 0.0 audio-s/s")
    summary.embedded, summary.failed = 7, 1
    summary.shard_outcomes += [ShardOutcome("a", recordings=8)] * 2
    written.recordings, written.audio_s, written.bytes_read = 12, 1800.0, 1_000_000_000
    line = log.line()
    assert line.startswith("progress: 8 of 45 recordings committed (2 of 11 shards), 12 "
                           "written; 0.50 h of audio, 1.00 GB read, ")
    assert line.endswith(" left") and "about 0m0" in line  # 3 GB to go at 1 GB in a moment
    # While the pipeline waits for a node (ActorRoomWatch), that, not a time left that grows.
    log._waiting = lambda: "waiting 45 s for a live node"
    waiting = log.line()
    assert waiting.endswith(" audio-s/s; waiting 45 s for a live node") and "left" not in waiting
    log._waiting = lambda: None
    # Sizes unknown (a manifest that names versions, not sizes): by the recordings instead.
    by_count = ProgressLog(summary, written, todo=45, todo_bytes=None, first_file_rows=1,
                           every_s=0)
    now = by_count._started + 330.0  # 12 of 45 written in 5.5 minutes: 33 more take 15m07s
    with monkeypatch.context() as frozen:  # a clock that stops: 0.2 s more read 15m08s
        frozen.setattr("pipeline.summary.time", types.SimpleNamespace(monotonic=lambda: now))
        assert by_count.line().endswith("; about 15m07s left")
    with caplog.at_level(logging.INFO, logger="pipeline.summary"), log:
        deadline = time.monotonic() + 10  # a line every 0.05 s: two, however loaded
        while sum("progress: 8 of 45" in r.message for r in caplog.records) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert not log._thread.is_alive()


def test_progress_lines_this_rarely_run_without_a_traceback() -> None:
    """run.progress_every_s 1e10 (a way to say "never"): the thread's wait overflowed
    (OverflowError: timestamp out of range), a traceback in the run's output."""
    from pipeline.summary import ProgressLog

    summary = JobSummary(job_id="j", output_uri="/out", model="m", variant="v", weights="w")
    died: list[BaseException] = []
    hook, threading.excepthook = threading.excepthook, lambda args: died.append(args.exc_value)
    try:
        with ProgressLog(summary, Written(), todo=1, todo_bytes=None, first_file_rows=1,
                         every_s=1e10) as log:
            time.sleep(0.2)
            assert log._thread.is_alive()
    finally:
        threading.excepthook = hook
    assert not died and not log._thread.is_alive()


def test_a_stopped_run_says_what_it_committed_and_what_a_rerun_does(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C printed only "interrupted" though shards had committed."""
    from pipeline import cli, config, job

    summary = JobSummary(job_id="j", output_uri="/out", model="m", variant="v", weights="w",
                         recordings_listed=45, recordings_already_done=5, layers=2,
                         embedded=18, failed=2, windows=300, status="stopped",
                         message="interrupted (SIGINT)")

    class Stopped:
        def __init__(self, cfg: object) -> None:
            self.summary = None

        def prepare(self) -> None:
            pass

        def run(self) -> None:
            self.summary = summary
            raise KeyboardInterrupt

    monkeypatch.setattr(job, "EmbeddingJob", Stopped)
    cfg = JobConfig.from_dict({"input": {"uri": "/archive"}})
    monkeypatch.setattr(config.JobConfig, "load", classmethod(lambda cls, *a: cfg))
    assert cli.main(["run", "job.yaml"]) == 130
    out = capsys.readouterr().out
    assert "job j: stopped" in out and "windows      300 (600 window rows: 2 layers)" in out
    assert "resume       20 recordings committed by this run stay; a rerun embeds the other 20" in out


def test_a_running_jobs_record_is_written_off_the_commit_threads_latest_only(
        caplog: pytest.LogCaptureFixture) -> None:
    """Written on a commit thread, under the commit lock, a slow bucket held the driver; a
    burst of commits must leave its last state written; the final record lands last."""
    gate, entered, written = threading.Event(), threading.Event(), []

    def write(value: dict) -> None:
        entered.set()
        gate.wait(5)
        if value["n"] == "fail":
            raise OSError("503 SlowDown")
        written.append(value["n"])

    writer = LatestWriter(write, "job record", every_s=0.2)
    started = time.perf_counter()
    for n in range(3):
        writer.offer({"n": n})  # never waits for the store
    assert time.perf_counter() - started < 0.5
    gate.set()
    deadline = time.monotonic() + 5
    while written[-1:] != [2] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert written[-1] == 2 and len(written) <= 2  # the last of the burst; one before at most
    with caplog.at_level("WARNING"):
        writer.offer({"n": "fail"})
        deadline = time.monotonic() + 5
        while "503 SlowDown" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "job record not updated: 503 SlowDown" in caplog.text  # the run goes on
    gate.clear()  # a slow store: the final record waits behind the write under way
    entered.clear()
    writer.offer({"n": 5})
    assert entered.wait(5)
    assert not writer.close({"n": "final"}, wait_s=0.1)  # not yet: the caller writes it too
    writer.offer({"n": 6})  # after close: dropped
    gate.set()
    writer._thread.join(5)
    assert written[-2:] == [5, "final"] and 6 not in written


@pytest.mark.parametrize("status", ["stopped", "failed", "aborted"])
def test_a_run_that_did_not_finish_says_what_a_rerun_embeds(status: str) -> None:
    """Aborted too (``run.max_failed_fraction``): what it committed stays."""
    shown = JobSummary(job_id="j", output_uri="/out", model="m", variant="v", weights="w",
                       recordings_listed=45, recordings_already_done=5, embedded=18, failed=2,
                       retried=1, status=status).render()
    assert ("resume       20 recordings committed by this run stay; a rerun embeds the other "
            "20 (and tries again the 1 that failed or stopped on an error not their own)"
            ) in shown
    finished = JobSummary(job_id="j", output_uri="/out", model="m", variant="v", weights="w",
                          recordings_listed=45, embedded=45, status="succeeded").render()
    assert "resume" not in finished


def test_the_summary_of_a_run_with_random_weights_says_its_embeddings_mean_nothing() -> None:
    """The RANDOM WEIGHTS banner is the log's first lines, scrolled away under Ray's; the
    summary, read last, said only ``weights random``."""
    def model_line(weights: str) -> str:
        shown = JobSummary(job_id="j", output_uri="/out", model="beats", variant="v",
                           weights=weights, status="succeeded").render()
        return next(x for x in shown.splitlines() if x.startswith("  model"))

    assert model_line("random") == ("  model        beats (variant v, weights random): RANDOM, "
                                     "the embeddings are NOT meaningful")
    assert "RANDOM" not in model_line("/ckpt/beats.pt")


def test_a_rerun_promises_no_retry_of_failures_that_are_the_recordings_own() -> None:
    """Two EmptyAudio failures, never tried again: the resume line said a rerun "tries again
    those that failed on an error not their own" all the same."""
    shown = JobSummary(job_id="j", output_uri="/out", model="m", variant="v", weights="w",
                       recordings_listed=45, recordings_already_done=5, embedded=18, failed=2,
                       status="stopped").render()
    assert ("resume       20 recordings committed by this run stay; a rerun embeds the other "
            "20\n") in shown + "\n"
    assert "tries again" not in shown


def test_the_summary_says_where_the_partial_recordings_are() -> None:
    """"6 this run (1 ok, 3 partial, 2 failed)", and nothing said where the three were."""
    layout = OutputLayout("/out", "m", "v", {})
    shown = JobSummary(job_id="j", output_uri="/out", model="m", variant="v", weights="w",
                       recordings_listed=6, embedded=1, partial=3, failed=2,
                       status="succeeded").render()
    assert (f"  partial      3 recordings embedded in part, why in status_detail -> "
            f"{layout.uri(layout.table_dir('recordings'))} (status = 'partial'; "
            "`embed-archive inspect /out` shows a few)") in shown
    assert "partial     " not in JobSummary(job_id="j", output_uri="/out", model="m", variant="v",
                                            weights="w", embedded=1).render()


@pytest.mark.parametrize(("seconds", "shown"), [
    (59, "0m59s"), (61, "1m01s"), (3599, "59m59s"), (3600, "1h00m"), (4500, "1h15m"),
    (90_000, "25h00m"),
])
def test_durations_read_as_minutes_then_hours(seconds: float, shown: str) -> None:
    assert summary_mod._duration(seconds) == shown


def test_the_steady_rate_is_audio_over_the_span_the_models_ran() -> None:
    """Two actors busy over the same 10 s embedded 100 s of audio: 10 audio-s/s while the
    models ran. Dividing by their summed active time (20 s) halves the rate with every
    actor added."""
    summary = JobSummary(job_id="j", output_uri="/o", model="m", variant="v", weights="w",
                         audio_s=100.0, wall_s=40.0,
                         embed=EmbedTiming(actors=2, batches=4, active_s=20.0, span_s=10.0))
    assert summary.steady_throughput == pytest.approx(10.0)
    assert summary.to_dict()["steady_audio_s_per_s"] == pytest.approx(10.0)
    assert summary.throughput == pytest.approx(2.5)


def test_a_run_failed_by_an_outage_raises_its_own_error_not_the_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage of the output store fails the pipeline (a write task's retries run out),
    and the final job record and the lease's release, written as the run ends, meet it
    too: their StorageError used to replace the run's own error, so the CLI said the job
    record's write had failed the job. The run's error goes on; the others are logged."""
    from pipeline import layout as layout_mod
    from pipeline import storage
    from pipeline.errors import StorageError
    from tests.conftest import write_tone

    (tmp_path / "in").mkdir()
    write_tone(tmp_path / "in" / "a.wav", 1.0, 16_000)
    job = EmbeddingJob(JobConfig.from_dict({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
        "model": {"name": "beats", "weights": "random", "options": {
            "encoder_layers": 1, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
            "encoder_attention_heads": 2, "embed_dim": 32, "conv_pos": 16,
            "conv_pos_groups": 2}}}))
    job.prepare()

    def down(*args: object, **kwargs: object) -> None:
        raise StorageError("write out/_jobs/x.json: gave up after 6 attempts: OSError: 503")

    def pipeline_fails(summary: JobSummary, started: float) -> None:
        monkeypatch.setattr(layout_mod, "write_json", down)  # the store goes down
        monkeypatch.setattr(storage.LocalConditionalStore, "_delete", down)
        raise RuntimeError("write_stage: gave up after 6 attempts (the outage)")

    monkeypatch.setattr(job, "_run_shards", pipeline_fails)
    with pytest.raises(RuntimeError, match="the outage"):
        job.run()
    assert job.summary.status == "failed"
    assert "the outage" in job.summary.message
