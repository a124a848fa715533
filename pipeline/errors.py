"""One root exception for the package, with small subclasses that also inherit builtins.

Callers catch ``PipelineError`` for "our job said no", or the builtin (``ValueError``,
``OSError``) they would catch anyway. Each class carries a message written for the user:
what went wrong, where, and what to do about it.
"""

from __future__ import annotations

import re
from typing import Any

# Exit codes of ``embed-archive run`` (and ``JobSummary.exit_code``).
EXIT_OK = 0
EXIT_FAILURE = 1  # the job itself failed
EXIT_CONFIG = 2  # refused before any work: config, inputs, model, weights, or a busy namespace
EXIT_SOME_FAILED = 3  # done, and some recordings are in the errors table
EXIT_ABORTED = 4  # stopped by run.max_failed_fraction
EXIT_INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C), as a shell reports it


# Error types (the errors table's ``error_type``) that are not the recording's own, which
# later runs try again (``run.retry_transient_errors``, up to ``run.max_attempts``): a
# store's retries running out, and a store refusing the credentials (they expire, a policy
# is fixed). The decode stage marks such rows ``retry``. A marker that does not (written
# before ``retry`` was recorded, or before a refusal was counted among these) is read by
# this list: the first runs after an upgrade try its refused recordings again, as many
# times as ``run.max_attempts`` allows.
RETRYABLE_ERRORS = frozenset({"StorageError", "PermissionError"})
# Refusals by the job's own limits (audio.min/max_sample_rate_hz, audio.max_channels), not
# by the recording: a marker records the rate and channels refused, and a run whose limits
# admit them tries the recording again (see :func:`pipeline.layout.admitted_now`).
LIMIT_ERRORS = frozenset({"UnsupportedSampleRate", "TooManyChannels"})
# A read refused because the object sits in an archive storage class, not restored (S3's
# InvalidObjectState on GLACIER, DEEP_ARCHIVE, Intelligent-Tiering's archive tiers): neither
# the recording's fault nor an outage. Settled: no rerun reopens its shard for it, however
# many runs, until its object reads again (restored, or copied to another storage class),
# which a rerun checks of each with one small read (see
# :meth:`pipeline.resume.Resumption.reopen_shards`).
ARCHIVED_ERRORS = frozenset({"ArchivedObject"})


class PipelineError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A job config is malformed. Raised before any work starts.

    Attributes:
        field: dotted path of the offending key (``windows.hop_s``), or ``None``.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class NoInputsError(PipelineError, FileNotFoundError):
    """The input URI or manifest matched no recordings."""


class AudioDecodeError(PipelineError):
    """A recording could not be decoded (or not at all usefully).

    Attributes:
        error_type: short stable label written to the errors table (``EmptyAudio``,
            ``UnsupportedSampleRate``...).
    """

    def __init__(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled whole (a quarantined decode sends its error to the task; Ray sends
        # errors between processes): by default only ``args``, the message, would go.
        return type(self), (self.error_type, str(self))


class WeightsUnavailableError(PipelineError, FileNotFoundError):
    """Model weights could not be fetched or read; the message says how to supply them."""


class CheckpointMismatchError(PipelineError, ValueError):
    """A checkpoint's tensor names or shapes do not match the backbone they were loaded
    into, or its bytes changed between the driver's check and an actor's load."""


class UnknownModelError(PipelineError, KeyError):
    """No backbone is registered under the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; we don't want that.
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(PipelineError, ImportError):
    """An optional dependency of a backbone is not installed (BirdNET's extra); the message
    says what to install. A refusal, as an unknown model is: nothing can run without it."""


class StorageError(PipelineError, OSError):
    """Reading or writing through fsspec failed after the retries were spent."""


class NamespaceBusyError(PipelineError):
    """Another run is writing the same output namespace (``pipeline.lease``): refused
    before any work."""


class LeaseLostError(PipelineError):
    """Another run took this run's lease over while it ran (it went without a heartbeat
    for too long): it stops before committing more. A failure, not a refusal: the shards
    it committed before stay, and a rerun resumes."""


class PipelineStalled(PipelineError):
    """The pipeline could not go on for ``run.stall_timeout_s``: no stage moved a block (a
    node lost with blocks a stage waits for), or no live node could hold an embedding actor
    (their node lost, none in its place). A failure, not a wait forever: the shards it
    committed before stay, and a rerun resumes."""


class WorkersCrashed(PipelineError):
    """A decode worker or an embedding actor died each time one piece of work was tried
    (``job.CRASH_RETRIES`` + 1 times), most often out of memory: a failure said at once,
    not actors restarted until ``run.stall_timeout_s``. The shards it committed stay.

    Attributes:
        by_actor: the work was an actor's (an embedding actor's batch), not a task's (a
            decode task's recordings): no decode task ran out of retries.
    """

    by_actor: bool = False


class JobAborted(PipelineError):
    """The job stopped itself (e.g. ``run.max_failed_fraction`` was exceeded)."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """An error's first line (its type's name when it says nothing), clipped to ``limit``
    characters: what a one-line failure message quotes of another library's error."""
    return _clipped(str(err), limit) or type(err).__name__


def _clipped(text: str, limit: int = 300) -> str:
    lines = text.strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


# What Python prints between two tracebacks of a chain (a cause, then the error it caused).
_CHAINED = re.compile(r"\n\s*\n(?:The above exception was the direct cause of the following "
                      r"exception:|During handling of the above exception, another exception "
                      r"occurred:)\s*\n")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_WHERE = re.compile(r"(ray::\S+)")
_RAISED = re.compile(r"[A-Za-z_][\w.]*(?:: |$)")  # "module.Type: message", or "Type" alone


def from_ray(err: BaseException) -> bool:
    """Whether ``err`` is one of Ray's wrappers (a worker's error handed on to the driver,
    its text the worker's whole traceback), not an error of ours or of a library here."""
    return type(err).__module__.startswith("ray.")


def describe(err: BaseException) -> str:
    """A run's error in one line, type first: what its record, ``inspect`` and the CLI's
    last line say. Any but Ray's: its first line. Ray's wrappers (an embedding actor's or a stage's
    error, an actor that could not start) carry the worker's whole traceback as their text,
    whose first line says only which process it was: the error raised there is named
    instead, with where (the traceback is for the log, at DEBUG, and Ray's logs)."""
    if not from_ray(err):
        return f"{type(err).__name__}: {first_line(err)}"
    text = _ANSI.sub("", str(err))
    raised = [line for line in _raised_lines(text) if not line.startswith("ray.")]
    if not raised:  # Ray's own error (an actor unavailable): its first line says it
        return f"{type(err).__name__}: {_clipped(text)}"
    name, sep, message = raised[-1].partition(": ")
    where = _RAY_WHERE.search(text)
    line = _clipped(f"{name.rpartition('.')[2]}{sep}{message}")  # pipeline.errors.X: X
    return line + (f" (raised in {where.group(1)})" if where else "")


def _raised_lines(text: str) -> list[str]:
    """The first line of each error ("module.Type: message") of a traceback as Python
    prints it, causes first: the line after each traceback's last frame (its indented
    lines), or after Ray's "ray::..." header line where a traceback has no frames."""
    found = []
    for block in _CHAINED.split(text):
        lines = [line for line in block.splitlines() if line.strip()]
        frames = [i for i, line in enumerate(lines) if line[:1].isspace()]
        start = frames[-1] + 1 if frames else int(bool(lines) and "ray::" in lines[0])
        if start < len(lines) and _RAISED.match(lines[start]):
            found.append(lines[start].strip())
    return found
