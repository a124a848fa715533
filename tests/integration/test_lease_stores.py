"""The lease's compare-and-swap on real stores: a local folder, S3 (moto_server) and GCS
(gcp-storage-emulator), each on 127.0.0.1.

Each race is staged where a write-then-read-back lease loses it: the other run's write
lands after this run read the lease but before its own write reaches the store, so no
settle time helps (``SETTLE_S`` is 0 here). With conditional writes the later write is
refused. The GCS emulator ignores preconditions (it writes whatever ``ifGenerationMatch``
says): the probe finds that out, and the lease there falls back to write and read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import lease as lease_mod
from pipeline import storage
from pipeline.errors import LeaseLostError, NamespaceBusyError
from pipeline.layout import OutputLayout, json_bytes
from pipeline.lease import NamespaceLease
from tests.integration.storage_servers import (
    FAULT_KINDS,
    FaultProxy,
    ServerProcess,
    gcs_options,
    running,
    s3_options,
    start_gcs_emulator,
    start_moto,
)

BUCKET = "lease-races"


def with_bucket(server: ServerProcess, scheme: str,
                options: Callable[[str], dict[str, Any]]) -> Iterator[ServerProcess]:
    """``server``, holding the bucket the tests race on, until the module is done."""
    try:
        storage.url_to_fs(f"{scheme}://{BUCKET}", options(server.url))[0].mkdir(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from with_bucket(start_moto(tmp_path_factory.mktemp("lease-servers")), "s3", s3_options)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from with_bucket(start_gcs_emulator(tmp_path_factory.mktemp("lease-servers")), "gs",
                           gcs_options)


@pytest.fixture(autouse=True)
def _timings(monkeypatch: pytest.MonkeyPatch, release_leases: None) -> None:
    """Short lease times, no settle time (it is what these races get past), and every
    lease made released after its test (``release_leases``, tests/conftest.py)."""
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(lease_mod, "STALE_S", 1.5)
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.0)


@pytest.fixture(params=["local", "s3"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> OutputLayout:
    """A fresh namespace on a store with compare-and-swap."""
    if request.param == "local":
        return OutputLayout(str(tmp_path / "out"), "beats", "v1")
    server = request.getfixturevalue("moto")
    return OutputLayout(f"s3://{BUCKET}/{uuid.uuid4().hex}", "beats", "v1",
                        s3_options(server.url))


def holder_of(layout: OutputLayout) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(layout.fs, layout.lease_path()))
    except FileNotFoundError:
        return None


def plant(layout: OutputLayout, **record: object) -> None:
    """Another run's lease record, written plainly (as by a run on a fallback store, or
    one whose conditional write landed first)."""
    storage.write_bytes(layout.fs, layout.lease_path(), json_bytes(
        {"job_id": "other", "token": "t-other", **lease_mod.machine(), "pid": os.getpid(),
         "heartbeat": time.time(), **record}))


def before(monkeypatch: pytest.MonkeyPatch, method: str, job_id: str,
           land: Callable[[], None]) -> None:
    """Run ``land`` (another run's write) just before ``ConditionalStore.method`` is called
    for ``job_id``'s record, once: what a slow request of that run would find."""
    real = getattr(storage.ConditionalStore, method)
    armed = [True]

    def wrapped(self: storage.ConditionalStore, path: str, *args: Any) -> Any:
        mine = f'"job_id": "{job_id}"'.encode()
        if armed[0] and (method == "delete_if_unchanged" or mine in args[0]):
            armed[0] = False
            land()
        return real(self, path, *args)

    monkeypatch.setattr(storage.ConditionalStore, method, wrapped)


def test_the_stores_measured(moto: ServerProcess, gcs: ServerProcess, tmp_path: Path) -> None:
    """Local folders and moto refuse a create over an existing object, and a replace or a
    delete at a version the object no longer has; the GCS emulator performs all three, so
    the lease there gets no compare-and-swap. The probe leaves nothing behind."""
    local = storage.url_to_fs(str(tmp_path))[0]
    s3 = storage.url_to_fs(f"s3://{BUCKET}", s3_options(moto.url))[0]
    gs = storage.url_to_fs(f"gs://{BUCKET}", gcs_options(gcs.url))[0]
    for raw, root, honours in ((storage.LocalConditionalStore(local), str(tmp_path), True),
                               (storage.S3ConditionalStore(s3), BUCKET, True),
                               (storage.GCSConditionalStore(gs), BUCKET, False)):
        assert (storage.conditional_store(raw.fs, f"{root}/_leases/x.json") is not None
                ) is honours, type(raw).__name__
        path = f"{root}/measured-{uuid.uuid4().hex}"
        stale = raw.create_if_absent(path, b"1")
        assert stale is not None
        assert raw.replace_if_unchanged(path, b"2", stale) is not None
        assert (raw.create_if_absent(path, b"3") is None) is honours
        assert (raw.replace_if_unchanged(path, b"4", stale) is None) is honours
        assert raw.delete_if_unchanged(path, stale) is not honours
        storage.remove_file(raw.fs, path)
        assert not [p for p in raw.fs.find(root) if "conditional-write-probe" in p]


def test_of_two_runs_starting_at_once_the_later_write_is_refused(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both found no lease; the other run took it (wrote and read back its own record)
    before this run's write reached the store. Written plainly, this run's write would
    land over the other's and its read-back show its own record: both would run."""
    second = NamespaceLease(layout, "second")
    before(monkeypatch, "create_if_absent", "first", second.acquire)
    with pytest.raises(NamespaceBusyError, match="job second"):
        NamespaceLease(layout, "first").acquire()
    assert holder_of(layout)["job_id"] == "second"
    second.check()
    second.release()
    assert holder_of(layout) is None


def test_of_two_runs_taking_over_one_stale_lease_only_one_wins(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both judged the same dead holder's record gone; the other run took the lease over
    while this one was still deciding. Its takeover must not overwrite the winner's."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    plant(layout, job_id="dead", pid=dead.pid)
    judged, go = threading.Event(), threading.Event()
    real_gone = NamespaceLease.holder_gone

    def holder_gone(holder: dict[str, Any]) -> str:
        why = real_gone(holder)
        if threading.current_thread().name == "slow-taker":
            judged.set()
            go.wait(10)
        return why

    monkeypatch.setattr(NamespaceLease, "holder_gone", staticmethod(holder_gone))
    outcome: list[BaseException | None] = []

    def slow_take() -> None:
        try:
            NamespaceLease(layout, "slow").acquire()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome.append(err)

    slow = threading.Thread(target=slow_take, name="slow-taker")
    slow.start()
    assert judged.wait(10)
    fast = NamespaceLease(layout, "fast")
    fast.acquire()
    go.set()
    slow.join(10)
    assert isinstance(outcome[0], NamespaceBusyError), outcome
    assert "job fast" in str(outcome[0])
    assert holder_of(layout)["job_id"] == "fast"
    fast.check()
    fast.release()


def test_a_release_does_not_delete_a_record_written_just_before_it(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run ending found its own record, but a run that took the lease over (this one had
    paused past the stale time) wrote before the delete arrived: the taker keeps it."""
    held = NamespaceLease(layout, "paused")
    held.acquire()
    held._stop.set()  # its heartbeat would find the taker's record: not the race here
    held._thread.join(5)
    before(monkeypatch, "delete_if_unchanged", "paused",
           lambda: plant(layout, job_id="taker", token="t-taker", host="another-node"))
    held.release()
    assert holder_of(layout)["job_id"] == "taker"


def test_a_heartbeat_that_stalled_past_a_takeover_is_refused_and_the_taker_runs_on(
        layout: OutputLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """A's beat read "mine", then its write stalled while B took the lease over. Written
    plainly, it landed on B's record and both runs stopped; now it is refused: A stops, B
    keeps the lease."""
    stalled, go = threading.Event(), threading.Event()

    def hold_a() -> None:
        stalled.set()
        go.wait(10)  # past B's takeover, however long that took

    a = NamespaceLease(layout, "a")
    a.acquire()
    a.start()
    before(monkeypatch, "replace_if_unchanged", "a", hold_a)  # a's next beat stalls
    assert stalled.wait(5)  # from here a's record stays unchanged
    b = NamespaceLease(layout, "b")
    b.acquire()  # watches a's unchanged record for STALE_S, then takes over
    go.set()
    assert a._thread is not None
    a._thread.join(5)
    assert not a._thread.is_alive()
    assert holder_of(layout)["job_id"] == "b"
    assert a.lost()
    with pytest.raises(LeaseLostError, match="job b"):
        a.check()
    b.check()  # b runs on
    a.release()
    assert holder_of(layout)["job_id"] == "b"
    b.release()


def test_a_conditional_write_whose_response_was_lost_still_takes_the_lease(
        moto: ServerProcess) -> None:
    """The connection dropped after S3 stored the lease record: the retry is refused (the
    object exists now), and reading back this run's very bytes tells it the lease is its
    own, not another run's."""
    with running(FaultProxy(moto.port, fault_rate=0.0, fail_first=False)) as proxy:
        layout = OutputLayout(f"s3://{BUCKET}/{uuid.uuid4().hex}", "beats", "v1",
                              s3_options(proxy.url))
        assert storage.conditional_store(layout.fs, layout.lease_path()) is not None  # probed
        proxy.reset()
        proxy.fault_rate, proxy.fail_first = 0.0, True
        proxy._kind_index["write"] = FAULT_KINDS.index("reset_mid")  # after moto stored it
        lease = NamespaceLease(layout, "dropped")
        lease.acquire()
        assert proxy.stats().faults[("write", "reset_mid")] == 1
        assert holder_of(layout)["job_id"] == "dropped"
        lease.release()
        assert holder_of(layout) is None


def test_on_the_gcs_emulator_the_lease_falls_back_to_write_and_read_back(
        gcs: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulator ignores preconditions: trusting them there would let both racers run.
    The lease writes plainly, settles and reads back, as on any store without them."""
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.05)
    layout = OutputLayout(f"gs://{BUCKET}/{uuid.uuid4().hex}", "beats", "v1",
                          gcs_options(gcs.url))
    assert storage.conditional_store(layout.fs, layout.lease_path()) is None
    first = NamespaceLease(layout, "first")
    first.acquire()
    first.start()
    assert first._store is None
    with pytest.raises(NamespaceBusyError, match="job first"):
        NamespaceLease(layout, "second").acquire()
    first.release()
    assert holder_of(layout) is None


def test_a_heartbeat_whose_answer_was_lost_is_still_its_runs_own(layout: OutputLayout) -> None:
    """A renewal that landed but whose answer never came (retries spent on a dropped
    connection) leaves the run's idea of its version one write behind. The record in the
    store is still its own: the next beat and the release find that, and neither stops a
    healthy run nor leaves its lease behind."""
    lease = NamespaceLease(layout, "run")
    lease.acquire()
    lease._stop.set()  # beats by hand below
    lease._thread.join(5)
    store = lease._store
    assert store is not None and lease._version is not None
    behind = lease._version
    assert store.replace_if_unchanged(lease.path, json_bytes(lease._record()), behind)
    assert lease._version == behind  # the answer that never came
    assert lease._renew() and lease._version != behind
    lease.check()
    assert store.replace_if_unchanged(lease.path, json_bytes(lease._record()), lease._version)
    lease.release()  # one write behind again
    assert holder_of(layout) is None


def test_a_local_lease_locks_a_file_beside_it(tmp_path: Path) -> None:
    """The local lock is a POSIX lock on a regular file opened for writing, which an NFS
    server keeps for all its clients (``flock`` on a folder stays on each client); the
    catalog does not take that file for a namespace."""
    from pipeline.catalog import load_catalog

    layout = OutputLayout(str(tmp_path / "out"), "beats", "v1")
    lease = NamespaceLease(layout, "run")
    lease.acquire()
    lock = storage.LocalConditionalStore.lock_path(layout.lease_path())
    assert os.path.isfile(lock) and os.path.dirname(lock) == os.path.dirname(layout.lease_path())
    assert [(ns.model, ns.variant) for ns in load_catalog(layout.root).namespaces] == [
        ("beats", "v1")]
    lease.release()
