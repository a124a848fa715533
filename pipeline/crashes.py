"""Recordings that kill their decode worker: an error row in the same run.

A recording whose decoding kills the worker process (a decoder's segfault, a header that
makes it allocate more than the worker may hold) raises nothing a decode task could catch
and turn into an error row. Ray retries the task (``job.CRASH_RETRIES``), and without more
the worker would die on the same recording each time, the run would fail, and so would
every rerun, naming nothing.

So each decode task tells the run's :class:`CrashLedger` (a small Ray actor beside the
driver; several on a large cluster) which recording it starts, before the decoder runs,
and that the one before is finished, in one round trip per recording: a recording
started again while its last start never finished is one a worker died on, and the
ledger's answer says how many times. The task's retry then decodes that recording in a
process of its own (:mod:`pipeline.quarantine`): if that process dies too, the recording
becomes an error row, ``DecoderCrashed``, and the task goes on with its next recording;
if it decodes there (the worker had died for another reason: its node lost), it is
embedded as usual. One a worker died on :data:`SUSPECT_DEATHS` times (its quarantined
decode too, say, run out of memory) is not decoded again in the run.

Each such recording costs its task one of its retries. A task with more of them than it
has retries fails the run: the driver then asks the ledgers which recordings were died on
:data:`SUSPECT_DEATHS` times or more (the quarantined crash counts), names them in the
run's error and records each in the namespace
(``_crashes/model=M/variant=V/<recording_id>.json``). The next run hands such a recording
to the decode stage as a known problem, ``DecoderCrashed``: an error row without a
decode. A recording's id follows its object's version, so a rewritten object is decoded
again.
"""

from __future__ import annotations

import collections
import logging
import math
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline import layout as layout_mod
from pipeline import storage
from pipeline.layout import OutputLayout
from pipeline.provenance import utc_now

if TYPE_CHECKING:
    from pipeline.sources import SourceItem

log = logging.getLogger(__name__)

# Deaths on one recording that make it the suspect: one could be its node going away.
SUSPECT_DEATHS = 2
# Decode CPUs one ledger actor serves: each answers some 1,300 steps a second on a 2-core
# machine busy with the decoding too, so a cluster decoding many short recordings at
# once spreads them over several.
CPUS_PER_LEDGER = 32
# Seconds a decode task, and the failing driver, wait for a ledger's answer.
ASK_TIMEOUT_S = 10.0
ERROR_TYPE = "DecoderCrashed"


class CrashLedger:
    """Which recording each decode worker is on (a Ray actor: see :func:`start_ledgers`).

    Holds the recordings started and not yet finished (one per decode task running) and
    the deaths counted so far: a few entries, whatever the size of the job.
    """

    def __init__(self) -> None:
        self._open: set[str] = set()
        self._deaths: collections.Counter[str] = collections.Counter()

    def step(self, finished: str | None, starting: str | None) -> int:
        """A decode task finished one recording and/or is starting the next; returns the
        deaths on the one starting so far (0 for a first try)."""
        if finished is not None:
            self._open.discard(finished)
        if starting is None:
            return 0
        if starting in self._open:  # the last try at it never finished
            self._deaths[starting] += 1
        self._open.add(starting)
        return self._deaths[starting]

    def crashed(self, rid: str) -> None:
        """The process a task decoded ``rid`` in apart (:mod:`pipeline.quarantine`) died:
        one death more, and a recording the task has done with (an error row)."""
        self._deaths[rid] += 1
        self._open.discard(rid)

    def died_on(self, at_least: int) -> dict[str, int]:
        """Recordings workers died on at least ``at_least`` times, and how many times,
        asked once the run has failed. Only the deaths a new start found, and quarantined
        decodes that died, count towards ``at_least``: a recording still started then was
        on a task the failed run ended, whatever its content (a good one retried after its
        node was lost, a decode killed beside an actor run out of memory); one already died
        on that often died a last time there too, which the count it is named with
        includes."""
        return {rid: n + (rid in self._open) for rid, n in self._deaths.items()
                if n >= at_least}


def start_ledgers(cluster_cpus: float) -> tuple[Any, ...]:
    """The run's ledger, one actor per :data:`CPUS_PER_LEDGER` CPUs of the cluster (one on a
    laptop), placed beside the driver where there is room; each decode task tells one of
    them, the same for every try of the task (:func:`ledger_of`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_restarts=0)(CrashLedger).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True))
    return tuple(actor.remote() for _ in range(max(1, math.ceil(cluster_cpus / CPUS_PER_LEDGER))))


def stop_ledgers(ledgers: Sequence[Any]) -> None:
    """Kill the run's ledgers once its pipeline is over. Its job and Ray Data's plan hold
    their handles, so they would otherwise live, a worker process each (some 130 MiB), as
    long as the process that ran the job: one more set for every run a notebook, a service
    or a test session makes on the same Ray."""
    import ray

    for ledger in ledgers:
        try:
            ray.kill(ledger, no_restart=True)
        except Exception as err:  # noqa: BLE001 - gone already, or Ray is: nothing to stop
            log.debug("crash ledger not killed: %s", type(err).__name__)


def ledger_of(ledgers: Sequence[Any], first_recording: str) -> Any:
    """The ledger a decode task tells, picked by its first recording (a task's recordings,
    and so that, are the same at every try); None without ledgers."""
    if not ledgers or not first_recording:
        return None
    return ledgers[zlib.crc32(first_recording.encode()) % len(ledgers)]


class LedgerClient:
    """A decode task's side of the ledger: one round trip per recording started, saying
    that the last one finished and the next starts (the last's finish at :meth:`close`),
    and answered with the deaths on the one starting. A ledger that no longer answers is
    told nothing more: decoding goes on without it (a recording its worker died on is
    then decoded in the worker again, as a first try is)."""

    def __init__(self, ledger: Any) -> None:
        self._ledger = ledger
        self._current: str | None = None
        self._finished: str | None = None

    def starting(self, rid: str) -> int:
        """Say ``rid`` starts; returns how many times workers died on it already."""
        deaths = self._tell(self._finished, rid)
        self._current, self._finished = rid, None
        return deaths

    def crashed(self) -> None:
        """The recording started last killed the process it was decoded in apart."""
        if self._current is None or self._ledger is None:
            return
        import ray

        rid, self._current = self._current, None
        try:
            ray.get(self._ledger.crashed.remote(rid), timeout=ASK_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - its error row is made all the same
            log.warning("the crash ledger did not answer (%s): this task goes on without it",
                        type(err).__name__)
            self._ledger = None

    def done(self) -> None:
        """The recording started last is decoded (told with the next start, or at close)."""
        if self._current is not None:
            self._current, self._finished = None, self._current

    def close(self) -> None:
        if self._finished is not None:
            self._tell(self._finished, None)
            self._finished = None

    def _tell(self, finished: str | None, starting: str | None) -> int:
        if self._ledger is None:
            return 0
        import ray

        try:  # waited for: the ledger must know before the decoder can kill this process
            return int(ray.get(self._ledger.step.remote(finished, starting),
                               timeout=ASK_TIMEOUT_S))
        except Exception as err:  # noqa: BLE001 - never a decode failed for the ledger's sake
            log.warning("the crash ledger did not answer (%s): this task goes on without it",
                        type(err).__name__)
            self._ledger = None
            return 0


def suspects(ledgers: Sequence[Any]) -> dict[str, int]:
    """Recording id -> deaths, for those died on :data:`SUSPECT_DEATHS` times or more ({}
    when the ledgers do not answer)."""
    import ray

    try:
        answers = ray.get([ledger.died_on.remote(SUSPECT_DEATHS) for ledger in ledgers],
                          timeout=ASK_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - the run's own error is the one to raise
        log.warning("could not ask the crash ledger which recordings killed their workers: %s",
                    type(err).__name__)
        return {}
    return {rid: n for answer in answers for rid, n in answer.items()}


def record(layout: OutputLayout, items: Iterable[SourceItem], deaths: Mapping[str, int],
           job_id: str) -> None:
    """Write a crash record for each of ``items`` (under the run's lease)."""
    for item in items:
        layout_mod.write_json(layout.fs, layout.crash_path(item.recording_id), {
            "recording_id": item.recording_id, "uri": item.uri, "source_version": item.version,
            "deaths": deaths[item.recording_id], "job_id": job_id, "recorded_at": utc_now()})


def recorded(layout: OutputLayout) -> dict[str, dict[str, Any]]:
    """The namespace's crash records, by recording id: one listing, usually empty."""
    fs = layout.fs
    paths = [p for p in storage.list_files(fs, layout.crashes_dir()) if p.endswith(".json")]
    return {entry["recording_id"]: entry
            for entry in (layout_mod.read_json(fs, path) for path in paths)}


def set_aside(layout: OutputLayout, listed: Collection[str]) -> None:
    """Delete the crash records of the ``listed`` recordings (``run.retry_errors`` names
    DecoderCrashed: the crash is believed fixed). They are decoded again; those that still
    kill their workers are named and recorded again by the run that meets them. The records
    of recordings this run does not list stay: a job over another prefix of the archive
    into the same output would otherwise drop them, and its own next run, without
    DecoderCrashed, decode them again and fail as the run that recorded them did."""
    fs = layout.fs
    for path in storage.list_files(fs, layout.crashes_dir()):
        if path.endswith(".json") and path.rsplit("/", 1)[-1][:-len(".json")] in listed:
            log.warning("crash record set aside (run.retry_errors): %s",
                        layout_mod.read_json(fs, path).get("uri", path))
            storage.remove_file(fs, path)


# The likely cause of a DecoderCrashed row, and when it is decoded again: the end of its message.
_CAUSE = ("a decoder crash or one running out of memory; not decoded again until the object "
          "changes")


def died_in_quarantine(how: str) -> str:
    """The error row's message of a recording whose quarantined decode died ``how``."""
    return (f"decoding it killed the process it ran in apart ({how}), after its decode "
            f"worker had died on it: {_CAUSE}")


def died_again(deaths: int) -> str:
    """The error row's message of a recording not decoded again in the run: ``deaths``."""
    return (f"its decode workers died {deaths} times on this recording in this run: a decoder "
            "crash or one running the worker out of memory; not decoded again until the "
            "object changes")


def as_problem(entry: Mapping[str, Any]) -> str:
    """The decode stage's known problem for a recorded recording: its error row's message."""
    return (f"{ERROR_TYPE}: decoding it killed its process {entry['deaths']} times in run "
            f"{entry['job_id']} ({entry['recorded_at']}): {_CAUSE}")
