"""What a run did: per-shard outcomes, how the embedding actors spent their time, and the
end-of-run summary that ``embed-archive run`` prints and ``_jobs/<job_id>.json`` keeps.

While the run goes on, :class:`ProgressLog` says how far it got, and :class:`LatestWriter`
keeps ``_jobs/<job_id>.json`` up to date as shards commit (what ``embed-archive inspect``
shows of a running job), off the commit threads."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from pipeline import layout as layout_mod
from pipeline import redact, storage
from pipeline.errors import EXIT_OK

log = logging.getLogger(__name__)


@dataclass
class EmbedTiming:
    """How the embedding actors spent a shard (or a job): is the data plane keeping up?

    ``busy_s`` is time inside the embedding call, ``model_s`` the forward passes alone,
    ``active_s`` each actor's first-batch-start to last-batch-end summed over actors,
    ``span_s`` the first start to the last end over all actors, ``first_batch_s`` how long
    after the pipeline started the first batch began (actor start-up and model load included),
    ``first_batch_at`` when, in Unix time (so a GPU monitor can be read over the same span).
    """

    actors: int = 0
    batches: int = 0
    windows: int = 0
    busy_s: float = 0.0
    model_s: float = 0.0
    active_s: float = 0.0
    span_s: float = 0.0
    first_batch_s: float = 0.0
    first_batch_at: float = 0.0

    @classmethod
    def from_actors(cls, per_actor: Mapping[str, Mapping[str, float]], started: float) -> EmbedTiming:
        if not per_actor:
            return cls()
        t = per_actor.values()
        first = min(a["start"] for a in t)
        return cls(actors=len(per_actor), batches=int(sum(a["batches"] for a in t)),
                   windows=int(sum(a["windows"] for a in t)),
                   busy_s=sum(a["busy_s"] for a in t), model_s=sum(a["model_s"] for a in t),
                   active_s=sum(a["end"] - a["start"] for a in t),
                   span_s=max(a["end"] for a in t) - first,
                   first_batch_s=max(0.0, first - started), first_batch_at=first)

    @property
    def busy_fraction(self) -> float:
        """Share of the actors' active time spent embedding (1.0: never waited for data)."""
        return self.busy_s / self.active_s if self.active_s > 0 else 0.0


@dataclass
class ShardOutcome:
    """What one committed shard contained, and when (seconds after the run started)."""

    shard_id: str
    recordings: int = 0
    embedded: int = 0
    partial: int = 0
    failed: int = 0
    retried: int = 0  # failed or stopped early on an error not their own: a rerun redoes them
    windows: int = 0
    audio_s: float = 0.0
    bytes_read: int = 0
    committed_after_s: float = 0.0
    error_types: Counter[str] = field(default_factory=Counter)  # of the failed: how many each


@dataclass
class JobSummary:
    """The end-of-run summary (also written to ``_jobs/<job_id>.json``)."""

    job_id: str
    output_uri: str
    model: str
    variant: str
    weights: str
    recordings_listed: int = 0
    recordings_already_done: int = 0
    recordings_already_failed: int = 0  # of those: error rows an earlier run committed
    shards: int = 0
    layers: int = 1  # window rows per window: one per layer
    embedded: int = 0
    partial: int = 0
    failed: int = 0
    error_types: Counter[str] = field(default_factory=Counter)  # of the failed: how many each
    retried: int = 0  # of the failed and partial: those a rerun tries again (ShardOutcome's)
    windows: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    exit_code: int = EXIT_OK
    status: str = "running"
    message: str = ""
    embed: EmbedTiming = field(default_factory=EmbedTiming)
    shard_outcomes: list[ShardOutcome] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Audio seconds embedded per wall-clock second."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_throughput(self) -> float:
        """Audio seconds per second while the models ran (start-up and commits excluded)."""
        return self.audio_s / self.embed.span_s if self.embed.span_s > 0 else 0.0

    def to_dict(self, outcomes: bool = True) -> dict[str, Any]:
        """The summary as a job record holds it; ``outcomes``: with every shard's (a running
        job's record leaves them out: 39,000 shards are 10 MB of JSON)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("shard_outcomes", "embed")}
        out["throughput_audio_s_per_s"] = round(self.throughput, 3)
        out["steady_audio_s_per_s"] = round(self.steady_throughput, 3)
        out["embed"] = {**self.embed.__dict__, "busy_fraction": round(self.embed.busy_fraction, 4)}
        if outcomes:
            out["shard_outcomes"] = [{k: v for k, v in o.__dict__.items() if k != "error_types"}
                                     for o in self.shard_outcomes]
        return out

    def render(self) -> str:
        errors_at, recordings_at = (
            storage.join(self.output_uri, layout_mod.namespace_dir(table, self.model, self.variant))
            for table in ("errors", "recordings"))
        e = self.embed
        lines = [
            f"job {self.job_id}: {self.status}",
            (f"  recordings   {self.embedded + self.partial + self.failed} this run "
             f"({self.embedded} ok, {self.partial} partial, {self.failed} failed); "
             f"{self.recordings_already_done} already done of {self.recordings_listed} listed"
             + (f" ({self.recordings_already_failed} of them errors, in the errors table)"
                if self.recordings_already_failed else "")),
            (f"  windows      {self.windows}" + (f" ({self.windows * self.layers} window rows: "
                                                f"{self.layers} layers)"
                                                if self.layers > 1 and self.windows else "")),
            (f"  audio        {self.audio_s / 3600:.3f} h in {self.wall_s:.1f} s "
             f"= {self.throughput:.1f} audio-s/s"),
        ]
        if e.batches:
            lines.append(
                f"  embedding    busy {e.busy_fraction:.0%} of the models' active time "
                f"({e.actors} actor{'s' if e.actors != 1 else ''} given batches, {e.batches} batches, forward "
                f"{e.model_s:.1f} s); {self.steady_throughput:.1f} audio-s/s while running, "
                f"first batch {e.first_batch_s:.1f} s after start")
        lines += [
            f"  model        {self.model} (variant {self.variant}, weights {self.weights})"
            # The banner saying so is at the log's start, far above in a long run's output
            # (and among Ray's lines): the summary, read last, says it again.
            + (": RANDOM, the embeddings are NOT meaningful" if self.weights == "random" else ""),
            f"  output       {self.output_uri}",
        ]
        if self.failed:
            # Why, in the log too: a cause every recording meets (credentials a cluster's
            # workers lack, a codec one node misses) reads as "5 failed" otherwise.
            kinds = sorted(self.error_types.items(), key=lambda kv: (-kv[1], kv[0]))
            why = ", ".join(f"{name} {count}" for name, count in kinds[:3])
            why += ", ..." if len(kinds) > 3 else ""
            lines.append(f"  errors       {self.failed} recordings failed -> {errors_at}"
                         + (f" ({why}; `embed-archive inspect {self.output_uri}` shows a few)"
                            if why else ""))
        if self.partial:
            # The console named each as it was decoded, among thousands of lines: where to
            # look them up after.
            lines.append(f"  partial      {self.partial} recordings embedded in part, why in "
                         f"status_detail -> {recordings_at} (status = 'partial'; `embed-archive "
                         f"inspect {self.output_uri}` shows a few)")
        if self.message:
            lines.append(f"  note         {self.message}")
        if self.status in ("stopped", "failed", "aborted"):
            done = self.embedded + self.partial + self.failed
            left = self.recordings_listed - self.recordings_already_done - done
            # Only errors not the recording's own are tried again (an EmptyAudio never is).
            lines.append(f"  resume       {done} recordings committed by this run stay; a rerun "
                         f"embeds the other {left}"
                         + (f" (and tries again the {self.retried} that failed or stopped on an "
                            "error not their own)" if self.retried else ""))
        return "\n".join(lines)


@dataclass
class Written:
    """What reached the driver from the write stage: recordings whose rows are written
    (committed or waiting for the rest of their shard), the audio they hold and the bytes
    read for them. Counted on the driver's thread, read by :class:`ProgressLog`'s."""

    recordings: int = 0
    audio_s: float = 0.0
    bytes_read: int = 0


class ProgressLog:
    """A line every ``every_s`` seconds while the pipeline runs, on a thread of its own:
    rows reach the driver only once a file's worth is written (``output.file_mb``), so a
    loop over them would go silent for minutes, and Ray Data's bars count blocks, not
    recordings. It says what is committed and what is written of the recordings to do,
    the audio read, the rate so far and the time left: from the bytes still to read where
    every recording's size is known (``todo_bytes``), else from the recordings."""

    def __init__(self, summary: JobSummary, written: Written, todo: int, todo_bytes: int | None,
                 first_file_rows: int, every_s: float,
                 waiting: Callable[[], str | None] = lambda: None) -> None:
        self._summary, self._written = summary, written
        self._waiting = waiting  # what the pipeline waits for, if it does (no time left then)
        self._todo, self._todo_bytes = todo, todo_bytes
        self._first_file_rows = first_file_rows
        self._every_s = every_s
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-log", daemon=True)

    def __enter__(self) -> Self:
        if self._every_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        # A wait beyond threading.TIMEOUT_MAX (~292 years: run.progress_every_s 1e10 meant
        # "never") raised OverflowError in this thread, a traceback in the run's output.
        while not self._stop.wait(min(self._every_s, threading.TIMEOUT_MAX)):
            log.info("%s", self.line())

    def line(self) -> str:
        s, w = self._summary, self._written
        elapsed = time.monotonic() - self._started
        committed = s.embedded + s.partial + s.failed
        text = (f"progress: {committed} of {self._todo} recordings committed "
                f"({len(s.shard_outcomes)} of {s.shards} shards)")
        if not w.recordings:
            return (f"{text}; none written yet after {_duration(elapsed)}: " + (
                self._waiting() or f"the first file gathers up to {self._first_file_rows} "
                "window rows (output.file_mb)"))
        text += (f", {w.recordings} written; {w.audio_s / 3600:.2f} h of audio, "
                 f"{w.bytes_read / 1e9:.2f} GB read, {w.audio_s / elapsed:.1f} audio-s/s")
        done = (w.bytes_read / self._todo_bytes if self._todo_bytes else
                w.recordings / self._todo if self._todo_bytes is None and self._todo else 0.0)
        # Only once audio is written: recordings that failed at once (an empty file, a
        # header alone) read a few bytes in seconds, and a time left from them said
        # "about 173h" and grew by the line.
        waiting = self._waiting()
        if waiting:
            text += f"; {waiting}"
        elif 0 < done < 1 and w.audio_s > 0:
            text += f"; about {_duration(elapsed * (1 - done) / done)} left"
        return text


class LatestWriter:
    """Writes a running job's record on a thread of its own: the latest offered, at most
    every ``every_s`` seconds (a burst of commits leaves its last state written, not its
    first), and the final record last. Written on the commit threads, a slow or failing
    bucket (seconds, with retries) held the commit lock, and the driver with it."""

    def __init__(self, write: Callable[[dict[str, Any]], None], what: str,
                 every_s: float) -> None:
        self._write, self._what, self._every_s = write, what, every_s
        self._lock = threading.Lock()
        self._latest: dict[str, Any] | None = None
        self._final: dict[str, Any] | None = None
        self._final_written = False
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{what} writer", daemon=True)
        self._thread.start()

    def offer(self, value: dict[str, Any]) -> None:
        with self._lock:
            if self._closing.is_set():
                return
            self._latest = value
        self._wake.set()

    def close(self, final: dict[str, Any], wait_s: float = 5.0) -> bool:
        """Write ``final`` after any write under way, and nothing after it; wait up to
        ``wait_s``. Returns whether it is written (else the caller writes it: a write under
        way that lands later is then followed by this one's, still last)."""
        with self._lock:
            self._final, self._latest = final, None
            self._closing.set()
        self._wake.set()
        self._thread.join(wait_s)
        return self._final_written

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                value, self._latest = self._latest, None
                final = self._final
            if final is not None:
                self._put(final, final=True)
                return
            if value is not None:
                self._put(value, final=False)
                self._closing.wait(self._every_s)  # rate limit; a close cuts it short
                self._wake.set()  # whatever came meanwhile

    def _put(self, value: dict[str, Any], final: bool) -> None:
        try:
            self._write(value)
            self._final_written = final
        except Exception as err:  # noqa: BLE001 - the caller writes the final one itself
            log.warning("%s not updated: %s", self._what, redact.text(str(err)))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
