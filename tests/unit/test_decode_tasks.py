"""How recordings are grouped into decode tasks (one Ray block each)."""

from __future__ import annotations

import pytest

from pipeline.sources import pack_decode_tasks

MB = 2**20


def covers_in_order(tasks: list[tuple[int, int]], n: int) -> bool:
    return [i for a, b in tasks for i in range(a, b)] == list(range(n))


def test_a_small_job_gets_a_task_per_recording() -> None:
    tasks = pack_decode_tasks([MB] * 5, tasks_at_least=8)
    assert tasks == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_short_clips_share_a_task_up_to_the_recording_cap() -> None:
    tasks = pack_decode_tasks([100_000] * 1000, tasks_at_least=8, max_recordings=64)
    assert covers_in_order(tasks, 1000)
    assert max(b - a for a, b in tasks) == 64
    assert len(tasks) == 16  # 15 full tasks and one of 40


def test_never_fewer_tasks_than_asked_when_recordings_allow() -> None:
    tasks = pack_decode_tasks([1000] * 100, tasks_at_least=8)
    assert covers_in_order(tasks, 100)
    assert len(tasks) >= 8
    assert {b - a for a, b in tasks} <= {12, 4}


@pytest.mark.parametrize("size", [200 * MB, -1])
def test_a_large_or_unknown_recording_is_a_task_alone(size: int) -> None:
    sizes = [MB] * 10 + [size] + [MB] * 10
    tasks = pack_decode_tasks(sizes, tasks_at_least=1, max_bytes=64 * MB)
    assert covers_in_order(tasks, 21)
    assert (10, 11) in tasks
    assert all(sum(max(s, 0) for s in sizes[a:b]) <= 64 * MB or b - a == 1 for a, b in tasks)


def test_the_byte_cap_splits_a_run_of_medium_recordings() -> None:
    tasks = pack_decode_tasks([30 * MB] * 6, tasks_at_least=1, max_bytes=64 * MB)
    assert tasks == [(0, 2), (2, 4), (4, 6)]


def test_nothing_to_decode() -> None:
    assert pack_decode_tasks([], tasks_at_least=8) == []


@pytest.mark.parametrize("sizes", [
    [5 * MB] * 200_000,                                  # a big archive of 5-MB recordings
    [100_000] * 200_000,                                 # of short clips
    [(i * 7919) % (300 * MB) for i in range(200_000)],   # sizes all over, up to 300 MB
    [-1] * 150_000 + [MB] * 50_000,                      # mostly of unknown size
])
def test_a_big_job_gets_about_max_tasks_tasks_whatever_its_size(sizes: list[int]) -> None:
    """The driver holds a block per task: a million recordings must not become 77,000."""
    tasks = pack_decode_tasks(sizes, tasks_at_least=64, max_tasks=2_000)
    assert covers_in_order(tasks, len(sizes))
    assert 64 <= len(tasks) <= 2 * 2_000 + 1
    before = pack_decode_tasks(sizes, tasks_at_least=64, max_tasks=len(sizes))  # no bound
    assert len(before) > len(tasks)
