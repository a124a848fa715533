"""One run per namespace: a live holder refuses a second run, a gone one is taken over."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline import lease as lease_mod
from pipeline import storage
from pipeline.errors import LeaseLostError, NamespaceBusyError
from pipeline.layout import OutputLayout
from pipeline.lease import NamespaceLease

pytestmark = pytest.mark.usefixtures("release_leases")  # tests/conftest.py


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OutputLayout:
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(lease_mod, "STALE_S", 1.5)
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.05)
    return OutputLayout(str(tmp_path / "out"), "beats", "v1")


@pytest.fixture
def fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease as on a store without compare-and-swap (``memory://``, Azure, an emulator
    that ignores preconditions): write, settle, read back. The races these tests stage are
    that path's; on a local filesystem the lease's writes are conditional."""
    monkeypatch.setattr(storage, "conditional_store", lambda fs, path: None)


def holder_of(layout: OutputLayout) -> dict:
    return json.loads(Path(layout.lease_path()).read_text())


def plant(layout: OutputLayout, **record: object) -> None:
    """Another run's lease record, on this machine unless ``record`` says otherwise; written
    atomically, as the lease's own writes are."""
    path = Path(layout.lease_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"job_id": "other", "token": "t-other", **lease_mod.machine(),
                               "pid": os.getpid(), "heartbeat": time.time(), **record}))
    os.replace(tmp, path)


def park_heartbeat(monkeypatch: pytest.MonkeyPatch, lease: NamespaceLease) -> threading.Event:
    """Hold ``lease``'s heartbeat at the start of its next beat, before it reads the record:
    a record planted (or deleted) now cannot fall between a beat's read and its write, which
    would write it back (no compare-and-swap: a window of one write, a flake on a loaded
    machine). Returns the event that lets it go on."""
    gate, parked = threading.Event(), threading.Event()
    real = NamespaceLease._still_mine

    def still_mine(self: NamespaceLease) -> bool:
        if self is lease and threading.current_thread().name == "lease-heartbeat":
            parked.set()
            gate.wait(10)
        return real(self)

    monkeypatch.setattr(NamespaceLease, "_still_mine", still_mine)
    assert parked.wait(5)
    return gate


def test_a_running_holder_refuses_a_second_run_until_it_ends(layout: OutputLayout) -> None:
    first = NamespaceLease(layout, "first")
    first.acquire()
    first.start()
    started = time.monotonic()
    with pytest.raises(NamespaceBusyError, match=r"job first \(host .*\) is running on"):
        NamespaceLease(layout, "second").acquire()
    assert time.monotonic() - started < 1.5  # refused on its heartbeat, not left to go stale
    first.release()
    assert not Path(layout.lease_path()).exists()
    second = NamespaceLease(layout, "second")
    second.acquire()
    assert holder_of(layout)["job_id"] == "second"
    second.release()


def test_a_lease_record_that_cannot_be_read_is_taken(layout: OutputLayout) -> None:
    """A record cut short (a local write killed mid-way by hand, a store's partial object)
    names no holder to wait for: the run takes the lease, it does not crash on it."""
    path = Path(layout.lease_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"job_id": "cut", "tok')
    lease = NamespaceLease(layout, "next")
    lease.acquire()
    assert holder_of(layout)["job_id"] == "next"
    lease.release()


def test_a_driver_that_died_on_this_host_is_taken_over_at_once(layout: OutputLayout) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    plant(layout, pid=dead.pid)
    started = time.monotonic()
    NamespaceLease(layout, "rerun").acquire()
    assert time.monotonic() - started < 1.0
    assert holder_of(layout)["job_id"] == "rerun"


def test_a_dead_pid_in_another_pid_namespace_proves_nothing(layout: OutputLayout) -> None:
    """Pods sharing a node's network share its host name: a pid there is not a pid here."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    plant(layout, pid=dead.pid, pidns="pid:[4026531836]-elsewhere")
    started = time.monotonic()
    NamespaceLease(layout, "rerun").acquire()
    assert time.monotonic() - started > 1.0  # watched until stale, not taken at once


def test_a_live_holder_with_a_skewed_clock_is_not_taken_over(layout: OutputLayout) -> None:
    """Its heartbeat reads 10 minutes old here (its clock is behind), but it keeps beating."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.2):
            plant(layout, host="another-node", heartbeat=time.time() - 600)

    plant(layout, host="another-node", heartbeat=time.time() - 600)
    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(NamespaceBusyError, match="job other"):
            NamespaceLease(layout, "skewed").acquire()
    finally:
        stop.set()
        beating.join()


def test_two_runs_given_one_job_id_are_two_holders(layout: OutputLayout) -> None:
    first = NamespaceLease(layout, "nightly")
    first.acquire()
    first.start()
    with pytest.raises(NamespaceBusyError, match="job nightly"):
        NamespaceLease(layout, "nightly").acquire()
    first.release()


@pytest.mark.usefixtures("fallback")
def test_of_two_runs_starting_at_once_only_the_one_whose_write_landed_last_proceeds(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both found no lease and wrote theirs; the other run's write landed after this one's,
    within the settle time: the read-back shows the other's record, so this run is refused
    (both proceeding would embed the same recordings twice)."""
    real_write = lease_mod.write_json

    def raced(fs, path, record):
        real_write(fs, path, record)
        if record["job_id"] == "first":  # the other run's write lands just after ours
            real_write(fs, path, {**record, "job_id": "second", "token": "t-second",
                                  "host": "another-node"})

    monkeypatch.setattr(lease_mod, "write_json", raced)
    with pytest.raises(NamespaceBusyError, match="job second"):
        NamespaceLease(layout, "first").acquire()
    assert holder_of(layout)["job_id"] == "second"


@pytest.mark.usefixtures("fallback")
def test_a_lease_whose_first_write_stalled_counts_from_before_the_write(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write that takes the lease stalled (a PUT in retries) for longer than a heartbeat
    may stay away: another run may have found no lease and taken it meanwhile, so this run
    must not commit as if it had renewed the lease just now."""
    real_write = lease_mod.write_json

    def stalled(fs, path, record):
        time.sleep(lease_mod.STALE_S - lease_mod.HEARTBEAT_S + 0.2)
        real_write(fs, path, record)

    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 60.0)  # no beat gets through meanwhile
    monkeypatch.setattr(lease_mod, "STALE_S", 60.8)
    monkeypatch.setattr(lease_mod, "write_json", stalled)
    lease = NamespaceLease(layout, "stalled")
    lease.acquire()
    assert lease.lost()
    with pytest.raises(LeaseLostError, match="could not renew"):
        lease.check()
    lease.release()


def test_the_heartbeat_runs_from_the_moment_the_lease_is_taken(layout: OutputLayout) -> None:
    """Planning (reading markers, recovering) can be long: the lease must not go stale then."""
    held = NamespaceLease(layout, "planning")
    held.acquire()
    first = holder_of(layout)["heartbeat"]
    # A beat every HEARTBEAT_S (0.2 s), never start()ed: poll for one rather than sleep a
    # fixed 0.5 s, which a loaded machine's scheduler can outlast.
    deadline = time.monotonic() + 5
    while holder_of(layout)["heartbeat"] == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert holder_of(layout)["heartbeat"] > first
    held.release()


@pytest.mark.usefixtures("fallback")
def test_a_run_whose_heartbeat_cannot_get_through_stops_committing(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    held = NamespaceLease(layout, "cut-off")
    held.acquire()
    held.start()
    held.check()

    calls: list[float] = []

    def refused(*args: object, **kwargs: object) -> None:
        calls.append(time.monotonic())
        raise PermissionError("403 Forbidden")  # not retried: the beat used to die of it

    # Counted, not slept through: two refused beats, with the stale time out of reach
    # meanwhile (a fixed 0.9 s sleep left 0.35 s to a loaded machine's scheduler) ...
    monkeypatch.setattr(lease_mod, "STALE_S", 60.0)
    monkeypatch.setattr(lease_mod, "write_json", refused)
    deadline = time.monotonic() + 10
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls) >= 2
    assert held._thread is not None and held._thread.is_alive()  # still trying
    assert not held.lost()
    # ... then the stale time back within reach: the next beat finds itself silent for
    # more than STALE_S - HEARTBEAT_S = 1.3 s, and stops.
    monkeypatch.setattr(lease_mod, "STALE_S", 1.5)
    held._thread.join(10)
    assert held.lost()  # what the driver asks of every batch, without a read
    with pytest.raises(LeaseLostError, match=r"could not renew its lease .* \(no other run "
                                             r"holds it yet: this machine, or the store, stalled\)"):
        held.check()
    # ... and then stopped: another run may hold the lease now, a write would take it back.
    assert not held._thread.is_alive()
    held.release()


@pytest.mark.usefixtures("fallback")
def test_a_heartbeat_write_that_lands_after_a_takeover_does_not_count(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """A's heartbeat read "mine", then its write stalled (a PUT in retries, a paused
    process) while B took over; the write landed on B's record. It counted as a renewal
    from when it landed, so A went on committing and B stopped. Now A stops: its last
    renewal dates from before the stall."""
    real_write = lease_mod.write_json
    stall, stalled, go, landed = (threading.Event() for _ in range(4))

    def write_json(fs, path, record):
        if threading.current_thread().name == "lease-heartbeat":
            if record["job_id"] == "b":
                # b's own beats are not this test's race (a beat's read-then-write can
                # always land on a record written in between): none may overwrite a's.
                raise OSError("b's heartbeat held back")
            if stall.is_set():
                stall.clear()
                stalled.set()
                go.wait(10)  # past B's takeover, however long that took
                real_write(fs, path, record)
                landed.set()
                return
        real_write(fs, path, record)

    monkeypatch.setattr(lease_mod, "write_json", write_json)
    a = NamespaceLease(layout, "a")
    a.acquire()
    a.start()
    a.check()
    stall.set()  # a's next beat stalls between its ownership check and its write
    assert stalled.wait(5)  # from here a's record stays unchanged
    plant_elsewhere = NamespaceLease(layout, "b")
    plant_elsewhere.acquire()  # watches a's unchanged record for STALE_S, then takes over
    assert holder_of(layout)["job_id"] == "b"
    go.set()
    assert landed.wait(5)  # a's stalled write lands on b's record
    assert holder_of(layout)["job_id"] == "a"
    with pytest.raises(LeaseLostError, match="could not renew"):
        a.check()  # a stops: no renewal since before the stall
    with pytest.raises(LeaseLostError, match="job a"):
        plant_elsewhere.check()  # and b, whose record was overwritten: nothing runs twice
    a.release()
    plant_elsewhere.release()


def test_a_holder_whose_clock_is_behind_is_watched_for_the_whole_stale_time(
        layout: OutputLayout) -> None:
    """The record's heartbeat comes from the holder's wall clock: one 75 s behind (here
    1 s at 1/75 scale) made a live holder look stale after the 1.5 heartbeats' minimum, long
    before the holder itself would stop (STALE_S - HEARTBEAT_S without a renewal)."""
    plant(layout, host="another-node", heartbeat=time.time() - 1.0)
    started = time.monotonic()
    NamespaceLease(layout, "next").acquire()
    assert time.monotonic() - started >= lease_mod.STALE_S


def test_a_silent_holder_elsewhere_is_taken_over_once_stale(layout: OutputLayout) -> None:
    plant(layout, host="another-node", heartbeat=time.time() - 0.5)
    started = time.monotonic()
    NamespaceLease(layout, "retry").acquire()
    assert 0.8 < time.monotonic() - started < 3.0
    assert holder_of(layout)["job_id"] == "retry"


def test_a_job_of_this_process_that_was_only_prepared_does_not_block(layout: OutputLayout) -> None:
    NamespaceLease(layout, "prepared").acquire()
    started = time.monotonic()
    NamespaceLease(layout, "next").acquire()
    assert time.monotonic() - started < 1.0


def test_a_run_whose_lease_was_taken_over_stops_before_committing(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = NamespaceLease(layout, "slow")
    slow.acquire()
    slow.start()
    slow.check()
    beat = park_heartbeat(monkeypatch, slow)
    plant(layout, job_id="usurper", host="another-node")
    assert not slow.lost()  # not known before the heartbeat reads it ...
    with pytest.raises(LeaseLostError, match="job usurper .* took it over"):
        slow.check()
    assert slow.lost()  # ... and from then on
    beat.set()
    time.sleep(0.6)  # a few heartbeats: none of them writes over the usurper's lease
    slow.release()
    assert holder_of(layout)["job_id"] == "usurper"  # not ours to delete


def test_a_run_that_never_learnt_of_a_takeover_leaves_the_takers_lease_on_release(
        layout: OutputLayout) -> None:
    """A run paused past the stale time, taken over, then ending without another check:
    deleting the lease now would let a third run start beside the live taker."""
    paused = NamespaceLease(layout, "paused")
    paused.acquire()
    plant(layout, job_id="taker", token="t-taker", host="another-node")
    paused.release()
    assert holder_of(layout)["job_id"] == "taker"


def test_a_run_stops_committing_a_heartbeat_before_another_may_take_over(
        layout: OutputLayout) -> None:
    """A run may take over a lease silent for STALE_S; the holder counts itself lost a
    heartbeat sooner, so a commit it checks just in time cannot land after the takeover."""
    lease = NamespaceLease(layout, "holder")
    lease.acquire()
    margin = lease_mod.STALE_S - lease_mod.HEARTBEAT_S  # 1.3 s with this fixture's times
    lease._renewed = time.monotonic() - (margin - 0.1)
    assert not lease.lost()
    lease._renewed = time.monotonic() - (margin + 0.1)  # still short of STALE_S
    assert lease.lost()
    with pytest.raises(LeaseLostError):
        lease.check()


def test_a_lease_whose_record_is_gone_is_lost(layout: OutputLayout,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that took the lease over and finished deletes it: the run it took over (which
    was stopped, or went without a heartbeat) must not write it again and commit the shards
    it planned, which the other run may have committed under the same ids."""
    slow = NamespaceLease(layout, "slow")
    slow.acquire()
    slow.start()
    beat = park_heartbeat(monkeypatch, slow)
    Path(layout.lease_path()).unlink()  # taken over, the taker done and gone
    with pytest.raises(LeaseLostError, match="its record is gone"):
        slow.check()
    beat.set()
    time.sleep(0.6)  # a few heartbeats: none of them writes the lease again
    assert not Path(layout.lease_path()).exists()
    slow.release()
    assert not Path(layout.lease_path()).exists()


def test_inspect_shows_the_run_writing_a_namespace(layout: OutputLayout) -> None:
    from pipeline.catalog import load_catalog, render
    from pipeline.layout import write_json

    write_json(layout.fs, layout.commit_path("s1"), {"shard": "s1", "recordings": [], "files": {}})
    held = NamespaceLease(layout, "nightly")
    held.acquire()
    assert f"running: job nightly (host {socket.gethostname()}, pid {os.getpid()})" in render(
        load_catalog(layout.root))
    held.release()
    assert "running:" not in render(load_catalog(layout.root))


def test_inspect_shows_a_run_on_another_machine_with_a_fresh_heartbeat_as_running(
        layout: OutputLayout) -> None:
    """Its pid means nothing here: only its heartbeat's age tells, and a fresh one is a live
    run (called stopped, a user would start another run beside it)."""
    from pipeline.catalog import load_catalog, render

    plant(layout, job_id="remote", host="another-host", heartbeat=time.time())
    shown = render(load_catalog(layout.root))
    assert "running: job remote (host another-host" in shown
    assert "stale lease" not in shown


@pytest.mark.usefixtures("fallback")
def test_a_write_landing_while_the_lease_settles_takes_it(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs start at once: the other's write lands a moment after this one's, before
    this one reads its lease back. Reading back at once would find this run's own record,
    and both would run; after the settle time it finds the other's, and is refused."""
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if seconds == lease_mod.SETTLE_S:
            plant(layout, job_id="same-instant", token="t-same", host="another-node")
        real_sleep(seconds)

    monkeypatch.setattr(lease_mod.time, "sleep", sleep)
    with pytest.raises(NamespaceBusyError, match="job same-instant"):
        NamespaceLease(layout, "mine").acquire()


def test_inspect_tells_a_dead_runs_lease_and_record_from_a_live_one(
        layout: OutputLayout) -> None:
    """A killed run leaves its lease and a job record it never finished: inspect says the
    run stopped (its pid has exited here; elsewhere, its heartbeat is old), not that it runs."""
    from pipeline.catalog import load_catalog, render
    from pipeline.layout import write_json

    write_json(layout.fs, layout.commit_path("s1"), {"shard": "s1", "recordings": [], "files": {}})
    gone_pid = subprocess.Popen(["true"])  # a pid that has exited
    gone_pid.wait()
    plant(layout, job_id="killed", pid=gone_pid.pid)
    write_json(layout.fs, layout.job_path("killed"),
               {"job_id": "killed", "started_at": "2026-11-22T10:00:00Z", "ended_at": None,
                "summary": {"status": "running"}})
    shown = render(load_catalog(layout.root))
    assert f"stopped: job killed (host {socket.gethostname()}, pid {gone_pid.pid})" in shown
    assert f"stale lease (pid {gone_pid.pid} has exited)" in shown and "running:" not in shown
    assert "  killed  interrupted" in shown
    plant(layout, job_id="elsewhere", host="another-host", heartbeat=time.time() - 5)
    shown = render(load_catalog(layout.root))
    assert "stale lease (no heartbeat for 5 s)" in shown
    held = NamespaceLease(layout, "killed")  # the same id, live: not interrupted
    Path(layout.lease_path()).unlink()
    held.acquire()
    assert "  killed  running" in render(load_catalog(layout.root))
    # What a running job's record says as its shards commit (was "recordings 0").
    write_json(layout.fs, layout.job_path("killed"),
               {"job_id": "killed", "ended_at": None, "updated_at": "2026-11-22T10:05:00Z",
                "summary": {"status": "running", "recordings_listed": 50,
                            "recordings_already_done": 5, "embedded": 15, "failed": 1}})
    assert ("recordings 16 of 45 (failed 1), as of 2026-11-22T10:05:00Z"
            in render(load_catalog(layout.root)))
    held.release()
    # Once it ended, its counts are final: no "as of".
    write_json(layout.fs, layout.job_path("killed"),
               {"job_id": "killed", "ended_at": "2026-11-22T10:09:00Z",
                "updated_at": "2026-11-22T10:09:00Z",
                "summary": {"status": "succeeded", "recordings_listed": 50,
                            "recordings_already_done": 5, "embedded": 44, "failed": 1}})
    shown = render(load_catalog(layout.root))
    assert "recordings 45 of 45 (failed 1)  config" in shown and "as of" not in shown


def test_inspect_finds_a_first_run_before_its_first_commit(layout: OutputLayout) -> None:
    """Namespaces were found by their commit markers only: a first run still going was
    listed as no namespace at all and its job as "interrupted"; one killed before its
    first commit left a stale lease and published files that inspect did not mention."""
    from pipeline.catalog import load_catalog, render
    from pipeline.layout import write_json

    write_json(layout.fs, layout.job_path("first"),
               {"job_id": "first", "started_at": "2026-11-22T10:00:00Z", "ended_at": None,
                "summary": {"status": "running"}})
    held = NamespaceLease(layout, "first")
    held.acquire()
    shown = render(load_catalog(layout.root))
    assert f"model={layout.model} variant={layout.variant}" in shown
    assert "committed shards 0, recordings 0\n" in shown
    assert "running: job first" in shown and "  first  running" in shown
    held.release()
    gone_pid = subprocess.Popen(["true"])
    gone_pid.wait()
    plant(layout, job_id="first", pid=gone_pid.pid)
    orphan = Path(layout.table_dir("windows")) / "shard-x-0.parquet"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"PAR1")
    shown = render(load_catalog(layout.root))
    assert f"stale lease (pid {gone_pid.pid} has exited)" in shown
    assert "WARNING: 1 files without a commit marker (a run was interrupted" in shown
    assert "  first  interrupted" in shown
    Path(layout.lease_path()).unlink()  # the files alone still show the namespace
    assert "WARNING: 1 files without a commit marker" in render(load_catalog(layout.root))


def test_a_run_refused_beside_a_submitted_one_is_told_how_to_stop_it(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second submit to the same output was refused naming the job id only, not the Ray
    Jobs submission that `embed-archive stop` takes (Ray's job supervisor gives its driver
    the id in RAY_JOB_CONFIG_JSON_ENV_VAR's metadata)."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "embed-archive-first",
                                         "embed_archive.job_id": "first"}}))
    first = NamespaceLease(layout, "first")
    first.acquire()
    first.start()
    assert holder_of(layout)["ray_submission"] == "embed-archive-first"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")  # said nothing of then
    with pytest.raises(NamespaceBusyError,
                       match="it is the Ray job embed-archive-first: embed-archive stop "
                             "embed-archive-first; its lease is"):
        NamespaceLease(layout, "second").acquire()
    first.release()
    second = NamespaceLease(layout, "second")
    second.acquire()
    assert "ray_submission" not in holder_of(layout)
    second.release()


def test_inspect_lists_the_latest_runs_and_says_how_many_it_left_out(
        layout: OutputLayout, capsys: pytest.CaptureFixture[str]) -> None:
    """An output that many runs wrote (one per prefix of an archive) holds hundreds of job
    records: read side by side, the latest 20 listed, ``--jobs N|all`` for more."""
    from pipeline.catalog import load_catalog, render
    from pipeline.cli import main
    from pipeline.layout import write_json

    for k in range(25):
        write_json(layout.fs, layout.job_path(f"run-{k:02d}"),
                   {"job_id": f"run-{k:02d}", "started_at": f"2026-11-24T10:{k:02d}:00Z",
                    "ended_at": f"2026-11-24T10:{k:02d}:30Z", "summary": {"status": "ok"}})
    catalog = load_catalog(layout.root)
    assert [j["job_id"] for j in catalog.jobs] == [f"run-{k:02d}" for k in range(25)]
    shown = render(catalog)
    assert "jobs: the latest 20; 5 earlier not shown (--jobs all)" in shown
    assert "run-04" not in shown and "run-05" in shown and "run-24" in shown
    assert "run-00" in render(catalog, None) and "not shown" not in render(catalog, None)
    assert main(["inspect", layout.root, "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "the latest 2; 23 earlier" in out and "run-22" not in out and "run-23" in out
    assert main(["inspect", layout.root, "--jobs", "0"]) == 0
    out = capsys.readouterr().out
    assert "jobs: 25 not shown (--jobs all)" in out and "run-" not in out
    with pytest.raises(SystemExit):
        main(["inspect", layout.root, "--jobs", "some"])


def test_a_release_the_store_refuses_leaves_the_record_to_be_taken_over_and_raises_nothing(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A release runs as a run ends: an outage then (the one that failed the run, or one
    just after its last commit) used to raise out of ``run()`` in place of the run's own
    error or summary, a run that committed everything exiting 1. The record stays, warned
    about, and the next run takes it over."""
    held = NamespaceLease(layout, "ending")
    held.acquire()
    held.start()

    def outage(*args: object, **kwargs: object) -> bool:
        raise OSError(errno.EIO, "Service Unavailable")  # transient: retried, then given up

    monkeypatch.setattr(storage.LocalConditionalStore, "_delete", outage)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # the retries' backoff
    with caplog.at_level("WARNING", logger="pipeline.lease"):
        held.release()
    assert holder_of(layout)["job_id"] == "ending"
    assert "not released" in caplog.text and "gave up after 6 attempts" in caplog.text
    monkeypatch.undo()
    nxt = NamespaceLease(layout, "next")  # this process's, its run over: taken at once
    nxt.acquire()
    assert holder_of(layout)["job_id"] == "next"
    nxt.release()
