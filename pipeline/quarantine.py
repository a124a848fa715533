"""A recording its decode worker died on, decoded again in a process of its own.

A decoder's segfault kills the process it runs in, and with it the Ray worker and every
recording its task holds (see :mod:`pipeline.crashes`). When a task's retry comes back to
the recording a worker died on, it decodes that one here instead: in a child process that
streams the window batches back over a pipe as it decodes them. If the child dies, the
task learns how (the signal) and makes the recording an error row, and goes on with its
next recording; the worker lives. If the recording decodes (the worker had died for some
other reason, its node lost), its windows go downstream as a worker's would, batch for
batch the same. A child that dies before it says it is ready to decode (it could not
import the package, the node is out of memory) says nothing of the recording: that is a
transient error row, which a rerun retries, not a crash.

The child is a new interpreter (``python -m pipeline.quarantine``) on the worker's import
path, not a fork: a Ray worker's threads (gRPC, the object store's client) do not survive
``fork``. It imports what decoding needs (~0.6 s), not torch or Ray, and dies with its
parent, so a task Ray cancels or kills leaves no decoder behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from pipeline.crashes import ERROR_TYPE, died_in_quarantine
from pipeline.errors import AudioDecodeError

if TYPE_CHECKING:
    from pipeline.audio import DecodeReport
    from pipeline.stages import DecodeSpec

log = logging.getLogger(__name__)

# Seconds a child that sent its last message may take to exit before it is killed.
EXIT_WAIT_S = 10.0
# Bytes of a child's stderr copied to the worker's log.
STDERR_KEPT = 1 << 16


class QuarantineDied(AudioDecodeError):
    """The process a recording was decoded in apart died (``how``: the signal or status)."""

    def __init__(self, how: str, message: str) -> None:
        self.how = how
        super().__init__(ERROR_TYPE, message)


class QuarantineUnavailable(RuntimeError):
    """The process to decode a recording apart in ended before it began to decode.

    Not an :class:`~pipeline.errors.AudioDecodeError`: it says nothing of the recording
    (the worker's environment, memory), so the recording's error row is a transient one.
    """


def read_windows(rid: str, uri: str, path: str, size: int, spec: DecodeSpec,
                 report: DecodeReport, counts: dict[int, int]) -> Iterator[dict[str, np.ndarray]]:
    """:func:`pipeline.stages.read_windows`, run in a child process.

    Yields the same window batches, and leaves the same ``report`` and ``counts``; raises
    the error the decode raised there, :class:`QuarantineDied` if the child died, or
    :class:`QuarantineUnavailable` if it died before it began to decode.
    """
    request = (rid, uri, path, size, dataclasses.replace(spec, crash_ledgers=()), os.getpid())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # Its stderr goes to a file, copied to the worker's once it ended: the last line of a
    # child that could not start says why (a missing module) in the error row.
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.quarantine"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                env=env)
        try:
            yield from _talk(proc, request, report, counts, errors)
        finally:
            _end(proc)
            _pass_on(errors)


def _talk(proc: subprocess.Popen[bytes], request: tuple[Any, ...], report: DecodeReport,
          counts: dict[int, int], errors: IO[bytes]) -> Iterator[dict[str, np.ndarray]]:
    """Send the child its recording, pass on its window batches, and raise as it ended."""
    from pipeline.stages import count_windows  # stages imports this module

    assert proc.stdin is not None and proc.stdout is not None
    try:
        with proc.stdin:
            pickle.dump(request, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
    except BrokenPipeError:
        pass  # it died before it read the request: said below, as any early death
    ready = False
    while (message := _receive(proc.stdout)) is not None:
        kind, value = message
        if kind == "ready":
            ready = True
        elif kind == "rows":
            count_windows(value, counts)
            yield value
        else:
            child_report, chain = value
            vars(report).update(vars(child_report))
            if chain:
                raise _relinked(chain)
            return
    how = _how_it_ended(proc)
    if not ready:
        raise QuarantineUnavailable(
            f"the process to decode it apart in ended before it began ({how}"
            f"{_last_words(errors)}), after its decode worker had died on it")
    raise QuarantineDied(how, died_in_quarantine(how))


def _receive(stream: IO[bytes]) -> tuple[str, Any] | None:
    """The child's next message; None once it sent nothing more (or died mid-message)."""
    try:
        return pickle.load(stream)
    except (EOFError, pickle.UnpicklingError):
        return None


def _how_it_ended(proc: subprocess.Popen[bytes]) -> str:
    try:
        code = proc.wait(timeout=EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        return "it closed its output and hung"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _tail(errors: IO[bytes]) -> str:
    """The last :data:`STDERR_KEPT` bytes the child wrote to its stderr (a library may have
    written a line per frame)."""
    size = errors.seek(0, os.SEEK_END)
    errors.seek(max(0, size - STDERR_KEPT))
    return errors.read().decode(errors="replace")


def _last_words(errors: IO[bytes]) -> str:
    """``: `` and the last line the child wrote to its stderr, if any."""
    lines = [line.strip() for line in _tail(errors).splitlines() if line.strip()]
    return f": {lines[-1]}" if lines else ""


def _pass_on(errors: IO[bytes]) -> None:
    """Copy the tail of what the child wrote to its stderr to the worker's (its log)."""
    said = _tail(errors)
    if said:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(said)
            sys.stderr.flush()


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Reap the child; kill it first if it is still there (the task was closed early)."""
    if proc.poll() is None:
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the worker that started it dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any exception that cannot cross the pipe
        return RuntimeError(f"{type(err).__name__}: {err}")


def _portable_chain(err: BaseException, limit: int = 8) -> list[BaseException]:
    """``err`` and the errors it was raised from, each :func:`_portable`, for the pipe.

    Pickling drops ``__cause__`` and ``__context__``, and what an error means is read down
    that chain (:func:`pipeline.storage.archived`, :func:`~pipeline.storage.access_refused`):
    s3fs raises S3's ``InvalidObjectState`` as a bare ``PermissionError`` whose cause, the
    botocore error, alone says the object is archived. Sent alone, it made an archived
    recording a transient refusal of the credentials here, not its ``ArchivedObject`` row.
    """
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and len(chain) < limit and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return [_portable(e) for e in chain]


def _relinked(chain: list[BaseException]) -> BaseException:
    """The first error of a :func:`_portable_chain`, raised from the rest as in the child."""
    for err, cause in itertools.pairwise(chain):
        err.__cause__ = cause
    return chain[0]


def main() -> None:
    """The child: decode one recording, sending each window batch, then the outcome."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's print must not land in the pipe
    rid, uri, path, size, spec, parent = pickle.load(sys.stdin.buffer)
    _die_with_parent(parent)
    from pipeline.audio import DecodeReport
    from pipeline.stages import configure_worker_logging, read_windows

    configure_worker_logging(spec.log_level)
    pickle.dump(("ready", None), out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()
    report, counts = DecodeReport(), {}
    chain: list[BaseException] = []  # the error, and those it was raised from
    try:
        for rows in read_windows(rid, uri, path, size, spec, report, counts):
            pickle.dump(("rows", rows), out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
    except Exception as err:  # noqa: BLE001 - the parent makes it the error row
        chain = _portable_chain(err)
    pickle.dump(("end", (report, chain)), out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


if __name__ == "__main__":
    main()
