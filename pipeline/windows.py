"""Window arithmetic and a streaming windower.

All arithmetic is in samples at the model's rate. Windows start every ``hop`` samples and
are ``size`` samples long; what happens to the samples after the last full window is the
tail policy:

``pad``
    one more window starts at the next hop position and is zero-padded to full length;
    ``valid`` tells how many of its samples are real (the padding mask).
``keep``
    the same window, but it ends where the audio ends: it is shorter than the rest, and its
    ``end_s`` is the end of the recording.
``drop``
    only full windows; a recording shorter than one window yields none.

A tail window is added only when some samples are covered by no full window. The plan is
the same whether the audio arrives whole (:func:`plan_windows`) or in chunks
(:class:`StreamingWindower`); the tests hold the two to that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

TAIL_POLICIES: tuple[str, ...] = ("pad", "keep", "drop")


@dataclass(frozen=True)
class WindowPlan:
    """Where windows fall in a signal of ``num_samples`` samples.

    Attributes:
        starts: int64 ``[n]`` first sample of each window.
        valid: int64 ``[n]`` real samples in each window (``size`` except maybe the last).
        size: window length in samples.
        num_samples: length of the signal the plan covers.
        tail: the tail policy used.
    """

    starts: np.ndarray
    valid: np.ndarray
    size: int
    num_samples: int
    tail: str

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def ends(self) -> np.ndarray:
        """End sample (exclusive) of each window as reported: nominal, or the audio end for keep."""
        if self.tail == "keep":
            return self.starts + self.valid
        return self.starts + self.size


def samples_for(seconds: float, sample_rate_hz: int) -> int:
    """Round a duration to a whole number of samples (at least one)."""
    return max(1, round(seconds * sample_rate_hz))


def count_full_windows(num_samples: int, size: int, hop: int) -> int:
    """Number of windows of ``size`` fully inside ``num_samples``, one every ``hop``."""
    if num_samples < size:
        return 0
    return (num_samples - size) // hop + 1


def plan_windows(num_samples: int, size: int, hop: int, tail: str) -> WindowPlan:
    """Plan the windows of a signal whose length is known.

    Args:
        num_samples: signal length in samples (>= 0).
        size: window length in samples (> 0).
        hop: distance between window starts in samples (> 0).
        tail: ``pad``, ``keep`` or ``drop``.

    Returns:
        The window plan.

    Raises:
        ValueError: on non-positive size/hop or an unknown tail policy.
    """
    _check(size, hop, tail)
    n_full = count_full_windows(num_samples, size, hop)
    starts = np.arange(n_full, dtype=np.int64) * hop
    valid = np.full(n_full, size, dtype=np.int64)
    covered = int(starts[-1]) + size if n_full else 0
    tail_start = n_full * hop
    if tail != "drop" and covered < num_samples and tail_start < num_samples:
        starts = np.append(starts, tail_start)
        valid = np.append(valid, num_samples - tail_start)
    return WindowPlan(starts=starts, valid=valid, size=size, num_samples=num_samples, tail=tail)


def _check(size: int, hop: int, tail: str) -> None:
    if size <= 0 or hop <= 0:
        raise ValueError(f"window size and hop must be positive, got size={size} hop={hop}")
    if tail not in TAIL_POLICIES:
        raise ValueError(f"tail must be one of {TAIL_POLICIES}, got {tail!r}")


@dataclass
class WindowBatch:
    """Consecutive windows, every channel.

    Attributes:
        index: int64 ``[n]`` window numbers within the recording.
        start: int64 ``[n]`` first sample of each window.
        valid: int64 ``[n]`` real samples in each window.
        audio: float32 ``[n, channels, size]``; samples past ``valid`` are zero.
    """

    index: np.ndarray
    start: np.ndarray
    valid: np.ndarray
    audio: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])


class StreamingWindower:
    """Cuts windows from audio that arrives in chunks, in batches of ``max_batch`` windows.

    Feed chunks with :meth:`push` (each yields a batch whenever ``max_batch`` windows are
    complete), then call :meth:`finish` once for the windows left and the tail window.
    Works on ``[frames, channels]`` float32 chunks; every yielded batch covers all channels
    (``audio`` is ``[n, channels, size]``). Each window is copied once, as it completes, into
    the batch being filled, so a batch is one contiguous array (what the next stage ships as
    one block). Holds at most that batch plus about a window and a chunk of samples, however
    long the stream.

    Args:
        size: window length in samples.
        hop: hop in samples.
        tail: tail policy.
        max_batch: windows per yielded batch (bounds memory per batch).
    """

    def __init__(self, size: int, hop: int, tail: str, max_batch: int = 32) -> None:
        _check(size, hop, tail)
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.size, self.hop, self.tail, self.max_batch = size, hop, tail, max_batch
        # Samples from _buf_start on, in the first _len frames of one reusable array (grown
        # only when a chunk does not fit): no allocation per chunk, so a long stream does
        # not fragment the heap of the worker decoding it.
        self._store: np.ndarray | None = None  # [capacity, channels]
        self._len = 0
        self._buf_start = 0
        self._seen = 0  # samples pushed so far
        self._next = 0  # index of the next window to copy into a batch
        self._batch: np.ndarray | None = None  # [max_batch, channels, size], being filled
        self._filled = 0

    @property
    def _buf(self) -> np.ndarray | None:
        """The samples held: ``[frames, channels]`` starting at sample ``_buf_start``."""
        return None if self._store is None else self._store[: self._len]

    @property
    def num_windows(self) -> int:
        """Windows emitted so far."""
        return self._next

    def push(self, chunk: np.ndarray) -> Iterator[WindowBatch]:
        """Add ``[frames, channels]`` samples; yield every full batch of complete windows."""
        if chunk.ndim != 2:
            raise ValueError(f"chunk must be [frames, channels], got shape {chunk.shape}")
        n = chunk.shape[0]
        if n == 0:
            return
        if self._store is None:
            self._store = np.empty((self.size + self.hop + n, chunk.shape[1]), np.float32)
        elif chunk.shape[1] != self._store.shape[1]:
            raise ValueError(f"chunk has {chunk.shape[1]} channels, earlier ones "
                             f"{self._store.shape[1]}")
        elif self._len + n > len(self._store):
            grown = np.empty((max(2 * len(self._store), self._len + n), chunk.shape[1]),
                             np.float32)
            grown[: self._len] = self._store[: self._len]
            self._store = grown
        self._store[self._len : self._len + n] = chunk
        self._len += n
        self._seen += n
        yield from self._emit_full()
        self._trim()

    def finish(self) -> Iterator[WindowBatch]:
        """Yield the complete windows still held, then the tail window if the policy and
        the audio call for one."""
        if self._buf is None:
            return
        yield from self._emit_full(flush=True)
        if self.tail == "drop":
            return
        covered = (self._next - 1) * self.hop + self.size if self._next else 0
        start = self._next * self.hop
        if covered >= self._seen or start >= self._seen:
            return
        valid = self._seen - start
        channels = self._buf.shape[1]
        audio = np.zeros((1, channels, self.size), dtype=np.float32)
        offset = start - self._buf_start
        audio[0, :, :valid] = self._buf[offset : offset + valid].T
        self._next += 1
        yield WindowBatch(
            index=np.array([self._next - 1], dtype=np.int64),
            start=np.array([start], dtype=np.int64),
            valid=np.array([valid], dtype=np.int64),
            audio=audio,
        )

    def flush(self) -> Iterator[WindowBatch]:
        """Yield the complete windows held now, without the tail: what a stream cut short by
        an error still has to give (``finish`` is for a stream that ended)."""
        if self._buf is not None:
            yield from self._emit_full(flush=True)

    def _emit_full(self, flush: bool = False) -> Iterator[WindowBatch]:
        """Copy every newly complete window into the batch being filled; yield it when it
        holds ``max_batch`` windows (or, with ``flush``, whatever it holds)."""
        assert self._buf is not None
        n_ready = count_full_windows(self._seen, self.size, self.hop) - self._next
        if n_ready > 0:
            # [frames - size + 1, channels, size]: every window start, as a strided view.
            views = np.lib.stride_tricks.sliding_window_view(self._buf, self.size, axis=0)
        while n_ready > 0:
            if self._batch is None:
                self._batch = np.empty((self.max_batch, self._buf.shape[1], self.size),
                                       np.float32)
            m = min(n_ready, self.max_batch - self._filled)
            first = self._next * self.hop - self._buf_start
            self._batch[self._filled : self._filled + m] = views[
                first : first + (m - 1) * self.hop + 1 : self.hop]
            self._filled += m
            self._next += m
            n_ready -= m
            if self._filled == self.max_batch:
                yield self._take_batch()
        if flush and self._filled:
            yield self._take_batch()

    def _take_batch(self) -> WindowBatch:
        assert self._batch is not None
        n, audio = self._filled, self._batch[: self._filled]
        self._batch, self._filled = None, 0
        index = np.arange(self._next - n, self._next, dtype=np.int64)
        return WindowBatch(index=index, start=index * self.hop,
                           valid=np.full(n, self.size, dtype=np.int64), audio=audio)

    def _trim(self) -> None:
        """Drop samples no future window (full or tail) can reach."""
        assert self._store is not None
        keep_from = min(self._next * self.hop, self._seen)
        drop = keep_from - self._buf_start
        if drop > 0:
            # Move the rest to the front in place: a 1-D overlapping copy needs no temporary.
            channels = self._store.shape[1]
            flat = self._store.reshape(-1)
            flat[: (self._len - drop) * channels] = flat[drop * channels : self._len * channels]
            self._len -= drop
            self._buf_start = keep_from
