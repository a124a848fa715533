"""Fault injection for the crash tests: die by SIGKILL at a named point.

``EMBED_ARCHIVE_FAULT=<point>:<marker-file>`` kills the process that reaches ``point``
(SIGKILL: no cleanup, no atexit) the first time it gets there while the marker file exists;
the marker is removed first, so the rerun (or Ray's retry) passes. Points: ``listed``
(driver, after listing), ``planned`` (driver, the namespace's lease held, Ray not yet
started), ``decode`` (the process that decodes a recording, before it reads it: a decode
task, or the process it decodes one apart in), ``decoded`` (a decode task, after a
recording's windows and report went out: Ray's retry must not repeat them), ``embed``
(an embedding actor, mid batch), ``before_publish``, ``publishing`` (after the first file
of a shard is in place), ``before_commit`` (all files in place, no marker
yet), ``committed`` (the driver's commit thread that wrote the first marker, right after it;
other shards' commits may be under way on the other threads).
``<point>+hang:<marker-file>`` blocks the process's thread there for good instead (a stall:
``run.stall_timeout_s``); ``<point>+every:<marker-file>`` kills every process that gets there
while the marker exists, adding a line with its pid to it (a batch that runs its worker out
of memory each time it is tried).
``<point>@<text>...`` limits the fault to the calls whose subject (the recording's URI at
``decode``) contains ``text``: one recording that kills its worker every time.
Any other ``+mode`` is a typo: no fault, the marker stays.
Unset in normal runs, where it costs one environment lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

FAULT_ENV = "EMBED_ARCHIVE_FAULT"


def fault_point(name: str, subject: str = "") -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, marker = spec.partition(":")
    point, _, how = point.partition("+")
    point, _, text = point.partition("@")
    if point != name or not marker or text not in subject or not os.path.exists(marker):
        return
    if how not in ("", "hang", "every"):  # never a SIGKILL the spec did not ask for
        log.error("fault injection: unknown mode %r in %s=%s; no fault", how, FAULT_ENV, spec)
        return
    if how == "every":
        with open(marker, "a") as fh:  # one line per kill: the tests count them
            fh.write(f"{os.getpid()}\n")
    else:
        try:
            os.remove(marker)
        except FileNotFoundError:
            return  # another process took this fault
    if how == "hang":
        log.error("fault injection: pid %d hangs at %s", os.getpid(), name)
        threading.Event().wait()
    log.error("fault injection: killing pid %d at %s", os.getpid(), name)
    os.kill(os.getpid(), signal.SIGKILL)
