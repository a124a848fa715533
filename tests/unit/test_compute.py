"""The compute plan: actors, their CPUs, GPUs and torch threads, from config and resources."""

from __future__ import annotations

import pytest

from pipeline.compute import plan_compute
from pipeline.config import ComputeConfig


@pytest.mark.parametrize(("gpus", "per_actor", "actors"), [
    (1.0, 1.0, 1), (4.0, 1.0, 4), (2.0, 0.5, 4), (1.0, 0.25, 4), (3.0, 2.0, 1),
])
def test_one_actor_per_share_of_the_gpus(gpus: float, per_actor: float, actors: int) -> None:
    """``gpus_per_actor: 0.5`` packs two actors on each GPU, not one (half of it idle)."""
    plan = plan_compute(ComputeConfig(gpus_per_actor=per_actor), {"CPU": 16.0, "GPU": gpus},
                        batch_mib=1.0, file_mib=16.0)
    assert (plan.actors, plan.gpus_per_actor) == (actors, per_actor)


@pytest.mark.parametrize(("cpus_per_actor", "threads"), [(None, 1), (1.0, 1), (4.0, 4),
                                                         (8.0, 8), (2.5, 2)])
def test_a_gpu_actor_runs_torch_on_the_cpus_it_asks_for(cpus_per_actor: float | None,
                                                       threads: int) -> None:
    plan = plan_compute(ComputeConfig(cpus_per_actor=cpus_per_actor),
                        {"CPU": 16.0, "GPU": 1.0}, batch_mib=1.0, file_mib=16.0)
    assert plan.torch_threads == threads
