"""One run at a time per output namespace: a lease object with a heartbeat.

Every run starts by deleting what a crashed run left behind and planning from the commit
markers (``pipeline.layout``). A second run started on the same namespace while the first
still runs would delete the first's staged files and embed the recordings the first has
not committed yet; whichever committed second would duplicate them. So a run first takes
``_leases/model=M/variant=V.json``: its job id, host, pid and a heartbeat the driver
rewrites every ``HEARTBEAT_S``.

A lease is taken over when its holder is gone: its heartbeat is older than ``STALE_S``
(a driver that crashed on another node), its pid no longer runs on this host (a killed
driver here), or it is this process's own and its job is not running (one that was only
prepared). A holder whose heartbeat moves while we wait is alive: the run is refused.
A run checks that the lease is still its own before each commit, and its heartbeat stops
if it is not. Two runs starting in the same instant both write, read back after
``SETTLE_S``, and the one whose write landed last proceeds. Object stores have no portable
compare-and-swap through fsspec, so two starts whose read-back gaps exceed ``SETTLE_S``
could both proceed; the window is a fraction of a second, against hours of a run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from pipeline import storage
from pipeline.errors import NamespaceBusyError
from pipeline.layout import OutputLayout, write_json

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_S = 120.0
SETTLE_S = 0.5
_running: set[str] = set()  # job ids of this process whose runs hold their lease
_running_lock = threading.Lock()


class NamespaceLease:
    """The lease of one job on one namespace: :meth:`acquire`, :meth:`start`, :meth:`release`."""

    def __init__(self, layout: OutputLayout, job_id: str) -> None:
        self.layout = layout
        self.job_id = job_id
        self.path = layout.lease_path()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._lost_to: dict[str, Any] | None = None

    def acquire(self) -> None:
        """Take the lease, waiting up to ``STALE_S`` for a silent holder to go stale.

        Raises:
            NamespaceBusyError: another run holds it and is alive.
        """
        fs = self.layout.fs
        waited_for: dict[str, Any] | None = None
        while True:
            holder = self._read()
            if holder is not None and holder.get("job_id") != self.job_id:
                gone = self._gone(holder)
                if not gone:
                    if waited_for is not None and holder != waited_for:
                        raise NamespaceBusyError(self._busy_message(holder))
                    if waited_for is None:
                        log.warning("%s; waiting up to %.0f s for its heartbeat to stop or go "
                                    "stale", self._busy_message(holder), STALE_S)
                        waited_for = holder
                    time.sleep(min(HEARTBEAT_S / 3, 5.0))
                    continue
                log.warning("taking over the lease of %s from job %s (%s)",
                            self.layout.uri(self.path), holder.get("job_id"), gone)
            write_json(fs, self.path, self._record())
            time.sleep(SETTLE_S)
            mine = self._read()
            if mine is not None and mine.get("job_id") == self.job_id:
                self._held = True
                return
            if mine is not None:
                raise NamespaceBusyError(self._busy_message(mine))

    def start(self) -> None:
        """Mark this job running here and keep the heartbeat going until :meth:`release`."""
        with _running_lock:
            _running.add(self.job_id)
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise if another run took the lease over (this one looked dead to it): called
        before each commit, so nothing more is committed. One small read."""
        if self._lost_to is None and self._still_mine():
            return
        lost = self._lost_to or {}
        raise NamespaceBusyError(
            f"job {lost.get('job_id')} (host {lost.get('host')}) took over "
            f"{self.layout.uri(self.path)} while this run went without a heartbeat for over "
            f"{STALE_S:.0f} s; stopping before committing more")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _running_lock:
            _running.discard(self.job_id)
        if not self._held:
            return
        self._held = False
        holder = self._read()
        if holder is not None and holder.get("job_id") == self.job_id:
            storage.remove_file(self.layout.fs, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._still_mine():
                    log.error("lease %s was taken over by job %s", self.layout.uri(self.path),
                              (self._lost_to or {}).get("job_id"))
                    return
                write_json(self.layout.fs, self.path, self._record())
            except storage.StorageError as err:  # the next beat may get through
                log.warning("lease heartbeat failed: %s", err)

    def _still_mine(self) -> bool:
        """False (and who took it kept in ``_lost_to``) once another job holds the lease."""
        holder = self._read()
        if holder is not None and holder.get("job_id") != self.job_id:
            self._lost_to, self._held = holder, False
            return False
        return True

    def _record(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": time.time()}

    def _read(self) -> dict[str, Any] | None:
        fs = self.layout.fs
        try:
            return json.loads(storage.read_bytes(fs, self.path))
        except (FileNotFoundError, ValueError):  # none, or not one we can read: take it
            return None

    @staticmethod
    def _gone(holder: dict[str, Any]) -> str:
        """Why ``holder`` no longer runs, or ``""`` if it may."""
        age = time.time() - float(holder.get("heartbeat", 0.0))
        if age > STALE_S:
            return f"no heartbeat for {age:.0f} s"
        if holder.get("host") != socket.gethostname():
            return ""
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            with _running_lock:
                return "" if holder.get("job_id") in _running else "prepared here, never run"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} has exited"
        except PermissionError:
            pass
        return ""

    def _busy_message(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat", 0.0))
        return (f"job {holder.get('job_id')} (host {holder.get('host')}, pid {holder.get('pid')}) "
                f"is running on {self.layout.uri(self.layout.table_dir('windows'))}, heartbeat "
                f"{age:.0f} s ago; two runs on one namespace would embed the same recordings. "
                f"Wait for it, or stop it (its lease is {self.layout.uri(self.path)})")
