"""Window arithmetic: counts, starts, ends and padding masks for every tail policy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.windows import StreamingWindower, count_full_windows, plan_windows, samples_for

TAILS = ("pad", "keep", "drop")


@pytest.mark.parametrize(
    ("seconds", "tail", "expected"),
    [
        (10.0, "pad", 3),   # full at 0, 2.5, 5 -> covers all
        (10.0, "drop", 3),
        (11.0, "pad", 4),   # tail window at 7.5 s with 3.5 s real
        (11.0, "keep", 4),
        (11.0, "drop", 3),
        (3.0, "pad", 1),    # shorter than one window
        (3.0, "drop", 0),
        (0.0, "pad", 0),
    ],
)
def test_counts_at_16k(seconds: float, tail: str, expected: int) -> None:
    size, hop = samples_for(5.0, 16_000), samples_for(2.5, 16_000)
    plan = plan_windows(int(seconds * 16_000), size, hop, tail)
    assert len(plan) == expected


def test_tail_window_values() -> None:
    plan = plan_windows(11 * 16_000, 80_000, 40_000, "pad")
    assert plan.starts.tolist() == [0, 40_000, 80_000, 120_000]
    assert plan.valid.tolist() == [80_000, 80_000, 80_000, 56_000]
    assert plan.ends().tolist() == [80_000, 120_000, 160_000, 200_000]
    keep = plan_windows(11 * 16_000, 80_000, 40_000, "keep")
    assert keep.ends()[-1] == 176_000


def test_hop_larger_than_window_leaves_gaps() -> None:
    plan = plan_windows(100, 10, 30, "pad")
    assert plan.starts.tolist() == [0, 30, 60, 90]
    assert plan.valid.tolist() == [10, 10, 10, 10]
    # 95 samples: windows at 0/30/60 are full, 90 has 5 real samples.
    assert plan_windows(95, 10, 30, "pad").valid.tolist() == [10, 10, 10, 5]


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        plan_windows(10, 0, 1, "pad")
    with pytest.raises(ValueError):
        plan_windows(10, 1, 1, "wrap")


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 4000), size=st.integers(1, 400), hop=st.integers(1, 500),
       tail=st.sampled_from(TAILS))
def test_plan_properties(n: int, size: int, hop: int, tail: str) -> None:
    plan = plan_windows(n, size, hop, tail)
    n_full = count_full_windows(n, size, hop)
    assert np.array_equal(plan.starts, np.arange(len(plan)) * hop)
    assert (plan.valid > 0).all() and (plan.valid <= size).all()
    assert (plan.starts + plan.valid <= n).all()
    assert (plan.valid[:n_full] == size).all()
    if tail == "drop":
        assert len(plan) == n_full
    else:
        assert len(plan) - n_full in (0, 1)
        if hop <= size and n > 0:
            # Every sample lies in some window.
            assert plan.starts[-1] + plan.valid[-1] == n
    if tail == "keep":
        assert (plan.ends() == plan.starts + plan.valid).all()
    else:
        assert (plan.ends() == plan.starts + size).all()


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 3000), size=st.integers(1, 300), hop=st.integers(1, 400),
       tail=st.sampled_from(TAILS), channels=st.integers(1, 3),
       chunks=st.lists(st.integers(1, 700), min_size=1, max_size=30),
       max_batch=st.integers(1, 7))
def test_streaming_matches_plan(n: int, size: int, hop: int, tail: str, channels: int,
                                chunks: list[int], max_batch: int) -> None:
    rng = np.random.default_rng(n)
    signal = rng.standard_normal((n, channels)).astype(np.float32)
    windower = StreamingWindower(size, hop, tail, max_batch=max_batch)
    batches = []
    pos = 0
    i = 0
    while pos < n:
        step = chunks[i % len(chunks)]
        batches.extend(windower.push(signal[pos : pos + step]))
        pos += step
        i += 1
    batches.extend(windower.finish())
    plan = plan_windows(n, size, hop, tail)
    index = np.concatenate([b.index for b in batches]) if batches else np.zeros(0, int)
    starts = np.concatenate([b.start for b in batches]) if batches else np.zeros(0, int)
    valid = np.concatenate([b.valid for b in batches]) if batches else np.zeros(0, int)
    assert index.tolist() == list(range(len(plan)))
    assert starts.tolist() == plan.starts.tolist()
    assert valid.tolist() == plan.valid.tolist()
    assert all(len(b) <= max_batch for b in batches)
    full = count_full_windows(n, size, hop)
    # Every batch but the ones finish() gives (the rest of the full windows, the tail) is full.
    assert [len(b) for b in batches[: full // max_batch]] == [max_batch] * (full // max_batch)
    for b in batches:
        for k in range(len(b)):
            s, v = int(b.start[k]), int(b.valid[k])
            assert np.array_equal(b.audio[k, :, :v], signal[s : s + v].T)
            assert not b.audio[k, :, v:].any()  # padding is zero
    assert windower.num_windows == len(plan)


def test_streaming_memory_is_bounded() -> None:
    """The sample buffer never holds more than a window, a hop and a chunk, however long the
    stream (windows wait for their batch as copies, not as samples)."""
    windower = StreamingWindower(1000, 500, "pad", max_batch=4)
    chunk = np.ones((300, 1), np.float32)
    peak = 0
    for _ in range(5000):
        for _batch in windower.push(chunk):
            pass
        peak = max(peak, windower._buf.shape[0])  # the private buffer is the invariant under test
    assert peak <= 1000 + 500 + 300
    assert len(list(windower.finish())) == 1  # the windows short of a full batch
    assert windower.num_windows == count_full_windows(5000 * 300, 1000, 500)


@pytest.mark.parametrize(("seconds", "rate", "samples"), [
    (2.3, 48_000, 110_400), (0.7, 22_050, 15_435), (5.0, 16_000, 80_000), (0.00001, 16_000, 1),
    (1 / 3, 48_000, 16_000),
])
def test_a_duration_is_the_nearest_whole_number_of_samples(seconds: float, rate: int,
                                                           samples: int) -> None:
    """2.3 * 48000 is 110399.99999999999 in floating point: truncated, every window and
    hop would be a sample short and start times would drift."""
    assert samples_for(seconds, rate) == samples


@pytest.mark.parametrize(("size", "hop"), [(1000, 500), (100, 300)])
def test_between_chunks_a_windower_holds_less_than_a_window_of_samples(size: int,
                                                                       hop: int) -> None:
    """After each chunk, the samples kept are those from the next window's start on: fewer
    than a window. Trimming from one window too early holds a hop more for every recording
    in flight; the buffer is never regrown past a window, a hop and a chunk."""
    windower = StreamingWindower(size, hop, "pad", max_batch=4)
    chunk = np.ones((300, 1), np.float32)
    for _ in range(200):
        for _batch in windower.push(chunk):
            pass
        assert windower._buf.shape[0] < size  # the private buffer is the invariant under test
        assert len(windower._store) <= size + hop + len(chunk)
