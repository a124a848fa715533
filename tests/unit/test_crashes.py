"""The crash ledger: which recording a decode worker died on, told by the tasks' steps."""

from __future__ import annotations

from pathlib import Path

from pipeline import crashes
from pipeline.crashes import CrashLedger, LedgerClient
from pipeline.layout import OutputLayout
from pipeline.sources import SourceItem


def test_a_recording_started_again_before_it_finished_is_a_death_on_it() -> None:
    ledger = CrashLedger()
    # A task decodes a and b, dies on c; its retry decodes a and b again, dies on c again.
    for _ in range(2):
        ledger.step(None, "a")
        ledger.step("a", "b")
        ledger.step("b", "c")
    ledger.step(None, "a")  # the third try
    ledger.step("a", "b")
    ledger.step("b", "c")
    # Two starts of c found the one before unfinished; the third is still on it when the
    # run has failed: it died a last time, which no start counted.
    assert ledger.died_on(2) == {"c": 3}
    assert ledger.died_on(4) == {}


def test_finished_recordings_and_a_single_death_are_not_suspects() -> None:
    ledger = CrashLedger()
    ledger.step(None, "a")
    ledger.step("a", None)  # the task ended
    ledger.step(None, "a")  # another run of the same recording, say its shard reopened
    ledger.step("a", None)
    ledger.step(None, "x")  # a node lost mid-recording: one death, then it finished
    ledger.step(None, "x")
    ledger.step("x", None)
    assert ledger.died_on(1) == {"x": 1}
    assert ledger.died_on(crashes.SUSPECT_DEATHS) == {}


def test_a_recording_killed_once_whose_retry_the_failing_run_ended_is_not_a_suspect() -> None:
    """x's worker is killed once (its node lost), and the run fails, for some other
    worker's deaths, while x's retry decodes it: that try's end is the run's doing, not
    x's, so x is no suspect; the recording that died on every try still is, with all its
    deaths."""
    ledger = CrashLedger()
    ledger.step(None, "x")  # the node is lost here
    ledger.step(None, "x")  # the retry, elsewhere, when the run fails
    for _ in range(4):  # p kills its worker on every try
        ledger.step(None, "p")
    assert ledger.died_on(crashes.SUSPECT_DEATHS) == {"p": 4}


def test_a_start_is_answered_with_the_deaths_on_it_and_a_quarantined_crash_is_one() -> None:
    """The retry learns its worker died on c (it decodes c apart); the process c is
    decoded in dies too, which the task tells: two deaths, c done with (an error row),
    and named if the run fails after all."""
    ledger = CrashLedger()
    assert [ledger.step(None, "a"), ledger.step("a", "c")] == [0, 0]
    assert [ledger.step(None, "a"), ledger.step("a", "c")] == [0, 1]  # the retry
    ledger.crashed("c")
    assert ledger.step(None, "d") == 0  # the task goes on: c is not open
    assert ledger.died_on(crashes.SUSPECT_DEATHS) == {"c": 2}


def test_the_client_says_a_recording_finished_with_the_next_start(monkeypatch) -> None:
    """One round trip per recording: a finish rides on the next start, the last on close."""
    told: list[tuple[str | None, str | None]] = []
    client = LedgerClient(object())
    monkeypatch.setattr(client, "_tell",
                        lambda finished, starting: told.append((finished, starting)) or 0)
    client.starting("a")
    client.done()
    client.done()  # a recording with a known problem: not started, nothing to finish
    client.starting("b")
    client.done()
    client.close()
    client.close()
    assert told == [(None, "a"), ("a", "b"), ("b", None)]


def test_every_try_of_a_task_tells_the_same_ledger() -> None:
    """A task's recordings, and so its first, are the same at every try: its deaths add up
    in one ledger however many the cluster has."""
    ledgers = ("L0", "L1", "L2")
    firsts = [f"{i:032x}" for i in range(300)]
    picked = [crashes.ledger_of(ledgers, rid) for rid in firsts]
    assert picked == [crashes.ledger_of(ledgers, rid) for rid in firsts]
    assert set(picked) == set(ledgers)  # spread over all of them
    assert crashes.ledger_of((), firsts[0]) is None
    assert crashes.ledger_of(ledgers, "") is None  # an empty batch tells nothing


def test_without_a_ledger_nothing_is_told() -> None:
    client = LedgerClient(None)
    client.starting("a")
    client.done()
    client.close()  # no Ray needed


def test_crash_records_round_trip_and_become_the_recordings_problem(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path / "out"), "beats", "v123")
    assert crashes.recorded(layout) == {}  # no folder yet: nothing recorded
    item = SourceItem(uri="/data/x.flac", path="/data/x.flac", size_bytes=10, version="v1",
                      recording_id="ab" * 16)
    crashes.record(layout, [item], {item.recording_id: 4}, "job-1")
    [entry] = crashes.recorded(layout).values()
    assert (entry["recording_id"], entry["uri"], entry["source_version"], entry["deaths"],
            entry["job_id"]) == (item.recording_id, "/data/x.flac", "v1", 4, "job-1")
    assert (tmp_path / "out" / "_crashes" / "model=beats" / "variant=v123"
            / f"{item.recording_id}.json").is_file()
    problem = crashes.as_problem(entry)
    assert problem.startswith("DecoderCrashed: decoding it killed its process 4 times in "
                              "run job-1 (")
