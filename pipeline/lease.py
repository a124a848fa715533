"""One run at a time per output namespace: a lease object with a heartbeat.

Every run starts by deleting what a crashed run left behind and planning from the commit
markers (``pipeline.layout``). A second run started on the same namespace while the first
still runs would delete the first's staged files and embed the recordings the first has
not committed yet; whichever committed second would duplicate them. So a run first takes
``_leases/model=M/variant=V.json``: its job id, a token of this acquisition, where its
driver runs (host, boot id, pid namespace, pid) and a heartbeat the driver rewrites every
``HEARTBEAT_S``.

The heartbeat runs from the moment the lease is taken (planning included) until it is
released. Each acquisition carries its own random token, so two runs given the same
``run.job_id`` are still two holders.

A lease is taken over when its holder is gone: its pid no longer runs on this machine (same
host name, boot and pid namespace: a killed driver here), it is this process's own and its
run never started (one that was only prepared), or its record stays unchanged for
``STALE_S``, watched with this process's own monotonic clock (a driver that crashed on
another node). The record's wall-clock heartbeat is never trusted for that: a holder's clock
behind ours by a minute made a live holder look dead after 45 s. A holder whose record
changes while we watch is alive: the run is refused.

A run checks that the lease is still its own when it starts, before it publishes a shard
and again before it writes the shard's commit marker, and stops if it is not (another run's
record, or none: a run that took over and has finished deletes it), or if its own heartbeat
has not got through for ``STALE_S - HEARTBEAT_S`` (another run may then have taken over). A
heartbeat counts from before its ownership check, not from when its write landed: a write
that stalled past a takeover and then overwrote the taker's record must not look fresh (the
stalled run stops at its next check; the taker, finding the record not its own, stops too;
a rerun resumes, nothing is committed twice).

Where the store has compare-and-swap (``storage.conditional_store``: local filesystems, S3,
GCS; an S3-compatible store or emulator that ignores the conditions is found out by a probe
and gets the fallback below), every lease write is conditional on what the run last saw:
a run takes a lease only if there is none (create if absent), or if the record is still
the one it judged gone (replace if unchanged: of two runs taking over one stale lease, one
wins); a heartbeat writes only over the run's own last write, so a beat that stalled past a
takeover is refused instead of landing on the taker's record (the taker keeps running); a
release deletes only the run's own last write, never a taker's record. A run whose write is
refused is refused the lease, as when another run's record was there already.

Any other store (``memory://``, Azure...) has no compare-and-swap through fsspec. There,
and with ``SETTLE_S``: two runs starting in the same instant both write, read back after
``SETTLE_S``, and the one whose write landed last proceeds; two starts whose read-back gaps
exceed ``SETTLE_S`` could both proceed, a takeover is a plain overwrite, a stalled heartbeat
write can land on a taker's record (both then stop, as above), and a release's
read-then-delete could delete the record of a run that took over in between (which then
stops: its record is gone); each window is a fraction of a second, against hours of a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline import redact, storage
from pipeline.errors import LeaseLostError, NamespaceBusyError
from pipeline.layout import OutputLayout, json_bytes, write_json

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_S = 120.0
SETTLE_S = 0.5
_running: set[str] = set()  # tokens of this process's leases whose runs have started
_running_lock = threading.Lock()


class NamespaceLease:
    """The lease of one job on one namespace: :meth:`acquire`, :meth:`start`, :meth:`release`."""

    def __init__(self, layout: OutputLayout, job_id: str) -> None:
        self.layout = layout
        self.job_id = job_id
        self.path = layout.lease_path()
        self.token = uuid.uuid4().hex
        self.submission = ray_submission_id()  # under Ray Jobs: what `stop` takes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._lost_to: dict[str, Any] | None = None
        self._renewed = 0.0  # monotonic time of the last heartbeat that got through
        self._store: storage.ConditionalStore | None = None  # None: write, settle, read back
        self._version: str | None = None  # of this run's last write, under compare-and-swap

    def acquire(self) -> None:
        """Take the lease, waiting up to ``STALE_S`` for a silent holder to go stale.

        Raises:
            NamespaceBusyError: another run holds it and is alive.
        """
        fs = self.layout.fs
        self._store = storage.conditional_store(fs, self.path)
        watched: tuple[dict[str, Any], float] | None = None  # the record, since when
        while True:
            holder, seen = self._read_versioned()
            if holder is not None and holder.get("token") != self.token:
                gone = self.holder_gone(holder)
                if not gone:
                    if watched is not None and holder != watched[0]:
                        raise NamespaceBusyError(self._busy_message(holder))  # it beat
                    if watched is None:
                        log.warning("%s; watching its heartbeat for up to %.0f s",
                                    self._busy_message(holder), STALE_S)
                        watched = (holder, time.monotonic())
                    if time.monotonic() - watched[1] < STALE_S:
                        time.sleep(min(HEARTBEAT_S / 3, 5.0))
                        continue
                    gone = f"its lease unchanged for {time.monotonic() - watched[1]:.0f} s"
                log.warning("taking over the lease of %s from job %s (%s)",
                            self.layout.uri(self.path), holder.get("job_id"), gone)
            written_from = time.monotonic()
            if self._store is not None:
                self._version = self._take(seen)
                taken = self._version is not None
                mine = None if taken else self._read()  # who wrote first, if anyone still
            else:
                write_json(fs, self.path, self._record())
                time.sleep(SETTLE_S)
                mine = self._read()
                taken = mine is not None and mine.get("token") == self.token
            if taken:
                self._held = True
                self._renewed = written_from
                self._thread = threading.Thread(target=self._beat, name="lease-heartbeat",
                                                daemon=True)
                self._thread.start()
                return
            if mine is not None:
                raise NamespaceBusyError(self._busy_message(mine))

    def _take(self, seen: str | None) -> str | None:
        """Write this run's record if the lease is still as last read (``seen``: the version
        of the record judged gone, or None where there was none): its version, or None if
        another run wrote first."""
        assert self._store is not None
        data = json_bytes(self._record())
        if seen is None:
            return self._store.create_if_absent(self.path, data)
        return self._store.replace_if_unchanged(self.path, data, seen)

    def start(self) -> None:
        """Mark this lease's run as started (a lease of this process whose run never
        started is free to take: see :meth:`holder_gone`)."""
        with _running_lock:
            _running.add(self.token)

    def check(self) -> None:
        """Raise if another run took the lease over (this one looked dead to it), or if this
        run's heartbeat has not got through for long enough that another may have: called
        before a shard is published and before its marker is written, so nothing more is
        committed. One small read."""
        silent = self._silent(time.monotonic())
        if self._lost_to is None and silent is not None:
            mine = self._still_mine_if_readable()
            if mine is not False:
                raise LeaseLostError(
                    f"this run could not renew its lease {self.layout.uri(self.path)} for "
                    f"{silent:.0f} s ("
                    + ("no other run holds it yet: this machine, or the store, stalled"
                       if mine else "the lease cannot be read either: the store is out of reach")
                    + "), and from now on another run may take it over; stopping before "
                    "committing more (a rerun resumes)")
        if self._lost_to is None and self._still_mine():
            return
        lost = self._lost_to or {}
        who = (f"job {lost.get('job_id')} (host {lost.get('host')}) took it over, finding "
               f"this run's record unchanged for {STALE_S:.0f} s (this run paused, or its "
               "heartbeat could not get through)" if lost.get("job_id") else
               "its record is gone: deleted by hand, or by a run that took it over and has "
               "finished; either way another run may have written")
        raise LeaseLostError(f"lost the lease {self.layout.uri(self.path)}: {who}; stopping "
                             "before committing more (a rerun resumes)")

    def lost(self) -> bool:
        """Whether :meth:`check` would raise, as far as this process knows without a read:
        the heartbeat found the lease taken, or has not got through for long enough that
        another run may take it. The driver asks this of every batch of written rows it
        reads, so a run that lost its lease stops there, not at its next commit."""
        return self._lost_to is not None or self._silent(time.monotonic()) is not None

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours.

        Never raises for the store: a release runs as a run ends, failed or not, and a store
        out of reach then (the outage that failed the run, or one at its very end) would
        otherwise replace the run's own error, or turn a run that committed everything into
        a failure. A record left behind is taken over like a dead run's (at once on this
        host, after ``STALE_S`` elsewhere), so it is only warned about."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _running_lock:
            _running.discard(self.token)
        if not self._held:
            return
        self._held = False
        try:
            self._delete_own_record()
        except OSError as err:  # StorageError: the retries ran out; a refusal
            log.warning("lease %s not released (%s): the next run takes it over once its "
                        "record has stayed unchanged for %.0f s (at once on this host)",
                        self.layout.uri(self.path), storage.why(err, "output.storage_options"),
                        STALE_S)

    def _delete_own_record(self) -> None:
        """Delete the lease's record if it is still this run's."""
        if self._store is not None:
            assert self._version is not None  # set whenever a conditional write took it
            if self._store.delete_if_unchanged(self.path, self._version):
                return
            own = self._own_version()  # a heartbeat that landed unanswered
            if own is None or not self._store.delete_if_unchanged(self.path, own):
                log.warning("lease %s not released: another run holds it now",
                            self.layout.uri(self.path))
            return
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            storage.remove_file(self.layout.fs, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                began = time.monotonic()
                silent = self._silent(began)
                if silent is not None:
                    # Another run may hold it now: writing would take it back from that run.
                    # check() stops this one.
                    log.error("lease %s not renewed for %.0f s; no longer renewing it",
                              self.layout.uri(self.path), silent)
                    return
                if not self._still_mine():
                    log.error("lease %s was taken over by %s", self.layout.uri(self.path),
                              f"job {job}" if (job := (self._lost_to or {}).get("job_id"))
                              else "a run that has finished since (its record is gone)")
                    return
                if not self._renew():
                    log.error("lease %s was taken over while this heartbeat was written; "
                              "no longer renewing it", self.layout.uri(self.path))
                    return
                self._renewed = began  # from before the check: a stalled write is no renewal
            except Exception as err:  # noqa: BLE001 - the next beat may get through; check() watches
                log.warning("lease heartbeat failed: %s", redact.text(str(err)))

    def _renew(self) -> bool:
        """Write this run's record again; under compare-and-swap only over its own last
        write, else False (and who took it kept in ``_lost_to``, for :meth:`check`)."""
        if self._store is None:
            write_json(self.layout.fs, self.path, self._record())
            return True
        assert self._version is not None
        renewed = self._store.replace_if_unchanged(self.path, json_bytes(self._record()),
                                                   self._version)
        if renewed is None and (own := self._own_version()) is not None:
            renewed = self._store.replace_if_unchanged(self.path, json_bytes(self._record()),
                                                       own)
        if renewed is None:
            self._still_mine()  # who holds it now (or that none does), for check()
            return False
        self._version = renewed
        return True

    def _own_version(self) -> str | None:
        """The version of the record in the store if it is this run's own: an earlier
        write of ours that landed though its answer was lost (its retries spent) left
        ``_version`` one write behind, which no other run's record explains."""
        assert self._store is not None
        found = self._store.read(self.path)
        if found is None:
            return None
        try:
            record = json.loads(found[0])
        except ValueError:
            return None
        return found[1] if record.get("token") == self.token else None

    def _silent(self, now: float) -> float | None:
        """Seconds since the last renewal once they are ``STALE_S - HEARTBEAT_S`` or more (a
        run watching the record may take the lease over from then on), else None."""
        silent = now - self._renewed
        return silent if silent > STALE_S - HEARTBEAT_S else None

    def _still_mine_if_readable(self) -> bool | None:
        """:meth:`_still_mine`; None where the lease cannot be read (the store is down)."""
        try:
            return self._still_mine()
        except Exception:  # noqa: BLE001 - only what the message says depends on it
            return None

    def _still_mine(self) -> bool:
        """False (and who took it kept in ``_lost_to``) once another run holds the lease, or
        once its record is gone: nothing deletes a held lease but a run that took it over
        and has finished (or a person), and that run may have committed the shards this one
        planned, under the same ids. Writing the lease again then would commit them twice."""
        holder = self._read()
        if holder is None:
            self._lost_to, self._held = {"job_id": None}, False
            return False
        if holder.get("token") != self.token:
            self._lost_to, self._held = holder, False
            return False
        return True

    def _record(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "token": self.token, **machine(), "pid": os.getpid(),
                "heartbeat": time.time(),
                **({"ray_submission": self.submission} if self.submission else {})}

    def _read(self) -> dict[str, Any] | None:
        fs = self.layout.fs
        try:
            return json.loads(storage.read_bytes(fs, self.path))
        except (FileNotFoundError, ValueError):  # none, or not one we can read: take it
            return None

    def _read_versioned(self) -> tuple[dict[str, Any] | None, str | None]:
        """The record (None if absent or unreadable) and, under compare-and-swap, the version
        read with it (None if absent): what a takeover may replace."""
        if self._store is None:
            return self._read(), None
        found = self._store.read(self.path)
        if found is None:
            return None, None
        try:
            return json.loads(found[0]), found[1]
        except ValueError:  # not one we can read: take it, if still the same
            return None, found[1]

    @staticmethod
    def holder_gone(holder: dict[str, Any]) -> str:
        """Why ``holder`` surely no longer runs (known on this machine alone), or ``""`` if
        it may: then only watching its heartbeat tells."""
        if any(holder.get(k) != v for k, v in machine().items()):
            return ""  # another machine, or another pid namespace: its pid means nothing here
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            with _running_lock:
                return "" if holder.get("token") in _running else "prepared here, never run"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} has exited"
        except PermissionError:
            pass
        return ""

    def _busy_message(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat", 0.0))
        submission = holder.get("ray_submission")
        stop = (f"it is the Ray job {submission}: embed-archive stop {submission}; "
                if isinstance(submission, str) and submission else "")
        return (f"job {holder.get('job_id')} (host {holder.get('host')}, pid {holder.get('pid')}) "
                f"is running on {self.layout.uri(self.layout.table_dir('windows'))}, heartbeat "
                f"{age:.0f} s ago; two runs on one namespace would embed the same recordings. "
                f"Wait for it, or stop it ({stop}its lease is {self.layout.uri(self.path)})")


def ray_submission_id() -> str | None:
    """The Ray Jobs submission id of this driver (what ``embed-archive stop`` takes), from
    the job config Ray's job supervisor gives it; None outside Ray Jobs."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        submission = config.get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):  # not Ray's, or another shape: say nothing
        return None
    return submission if isinstance(submission, str) and submission else None


def machine() -> dict[str, str]:
    """Where a pid means one process: host name, boot and pid namespace (Linux; elsewhere
    the host name alone). Pods sharing a node's network share its host name too."""
    found = {"host": socket.gethostname()}
    with contextlib.suppress(OSError):
        found["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        found["pidns"] = os.readlink("/proc/self/ns/pid")
    return found
