"""The compute plan: actors, their CPUs, GPUs and torch threads, from config and resources."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.compute import (
    ActorRoomWatch,
    ComputePlan,
    actor_needs,
    actor_slots,
    embedding_nodes,
    gpus_of,
    plan_compute,
)
from pipeline.config import ComputeConfig


@pytest.mark.parametrize(("gpus", "per_actor", "actors"), [
    (1.0, 1.0, 1), (4.0, 1.0, 4), (2.0, 0.5, 4), (1.0, 0.25, 4), (3.0, 2.0, 1),
    # Shares whose float quotient falls just short: 1.0 // 0.1 is 9.0, Ray holds 10.
    (1.0, 0.1, 10), (1.0, 0.2, 5), (3.0, 0.3, 10), (2.0, 0.1, 20),
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


def _node(resources: dict[str, float], labels: dict[str, str] | None = None,
          alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": 4.0, **resources}, "Labels": labels or {}}


def test_embedding_actors_no_node_of_the_cluster_can_hold_are_refused_naming_why(
        caplog: pytest.LogCaptureFixture) -> None:
    """They stayed pending for ever, the job's progress line saying only that no rows were
    written yet."""
    from pipeline.compute import check_nodes
    from pipeline.errors import ConfigError

    nodes = [_node({"cpu_node": 2}), _node({"gpu_node": 1}, {"node-group": "gpu"}),
             _node({"big_gpu": 1}, {"node-group": "big"}, alive=False)]
    for compute, field, what in (
            ({"embed_resources": {"gpu_node": 2}}, "compute.embed_resources", "2 gpu_node"),
            ({"embed_resources": {"big_gpu": 1}}, "compute.embed_resources", "1 big_gpu"),
            ({"embed_resources": {"gpu_node": 1}, "embed_label_selector": {"node-group": "cpu"}},
             "compute.embed_label_selector", "1 gpu_node, label node-group=cpu"),
            ({"embed_label_selector": {"node-group": "in(big, huge)"}},
             "compute.embed_label_selector", "label node-group=in(big, huge)")):
        with pytest.raises(ConfigError, match=rf"{field}: no node of the cluster has "
                                              rf"{re.escape(what)} \(2 nodes\).*compute.embed_actors"):
            check_nodes(ComputeConfig(**compute), nodes)
    for fits in ({"embed_resources": {"gpu_node": 1}, "embed_label_selector": {"node-group": "gpu"}},
                 {"embed_resources": {"cpu_node": 1.5}},
                 {"embed_label_selector": {"node-group": "!gpu"}},  # a node without the label
                 {"embed_label_selector": {"node-group": "in(gpu, big)"}},
                 {"embed_label_selector": {"node-group": "!in(big)"}}):
        check_nodes(ComputeConfig(**fits), nodes)
    assert not caplog.records
    # An autoscaler will add them (the pool is sized, as for GPUs), or decode nodes scale
    # from zero when tasks ask: warned, not refused.
    with caplog.at_level("WARNING", logger="pipeline.compute"):
        check_nodes(ComputeConfig(embed_resources={"big_gpu": 1}, embed_actors=4), nodes)
        check_nodes(ComputeConfig(decode_resources={"decode_node": 1}), nodes)
    assert "the 4 embedding actors wait until an autoscaler adds one" in caplog.text
    assert "1 decode_node now (2 nodes): decoding waits until one joins" in caplog.text


def test_address_local_is_a_local_ray_as_unset_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compute.address: local`` passed the config's check but counted as joining a cluster:
    one CPU actor instead of the local plan's narrow ones, ``num_cpus`` ignored."""
    from pipeline.ray_connect import joins_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    resources = {"CPU": 4.0}
    local = plan_compute(ComputeConfig(address="local"), resources, batch_mib=1.0, file_mib=16.0)
    unset = plan_compute(ComputeConfig(), resources, batch_mib=1.0, file_mib=16.0)
    assert (local.actors, local.torch_threads) == (unset.actors, unset.torch_threads) == (4, 1)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # "local" is a new Ray even then
    assert not joins_cluster(ComputeConfig(address="local"))
    assert joins_cluster(ComputeConfig()) and joins_cluster(ComputeConfig(address="auto"))


def node(alive: bool = True, **resources: float) -> dict[str, Any]:
    return {"Alive": alive, "Resources": resources, "Labels": {}}


def watch_nodes(*answers: list[dict[str, Any]]) -> Callable[[], list[dict[str, Any]]]:
    """``ray.nodes()`` answering each of ``answers`` in turn, then the last for good."""
    it = iter(answers)
    last: list[list[dict[str, Any]]] = [answers[-1]]

    def nodes() -> list[dict[str, Any]]:
        last[0] = next(it, last[0])
        return last[0]
    return nodes


def test_the_room_watch_stops_a_run_once_no_live_node_can_hold_an_actor_for_its_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    stopped = threading.Event()
    gpu = node(CPU=8, GPU=1, gpu_node=1)
    nodes = watch_nodes([gpu, node(CPU=16)], [node(False, CPU=8, GPU=1, gpu_node=1),
                                              node(CPU=16), node(CPU=4, GPU=1)])
    with ActorRoomWatch({"GPU": 1, "gpu_node": 1}, {}, timeout_s=0.05, nodes=nodes,
                        every_s=0.01, stop_run=stopped.set) as watch:
        assert watch.waiting() is None  # until it has looked
        assert stopped.wait(5)
    assert re.fullmatch(r"waiting \d+ s for a live node that can hold an embedding actor "
                        r"\(1 GPU, 1 gpu_node\); fails at 0.05 s \(run.stall_timeout_s\)",
                        watch.waiting() or "")
    assert watch.reason and "no live node could hold an embedding actor (1 GPU, 1 gpu_node) " \
        "for 0.05 s (run.stall_timeout_s)" in watch.reason
    assert "no live node can hold an embedding actor (1 GPU, 1 gpu_node; 2 nodes)" in caplog.text


def test_the_room_watch_lets_a_run_wait_for_a_node_that_comes_back(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    stopped, looked_again = threading.Event(), threading.Event()
    cpu, gpu = node(CPU=16), node(CPU=8, GPU=1)
    answers = watch_nodes([cpu], [cpu], [cpu], [cpu, gpu])  # the GPU node is back at the 4th
    calls: list[int] = []

    def nodes() -> list[dict[str, Any]]:
        calls.append(1)
        if len(calls) > 6:
            looked_again.set()
        return answers()
    with ActorRoomWatch({"GPU": 1}, {}, timeout_s=60, nodes=nodes, every_s=0.01,
                        stop_run=stopped.set) as watch:
        assert looked_again.wait(5)
    assert not stopped.is_set() and watch.reason is None and watch.waiting() is None
    assert "no live node can hold an embedding actor (1 GPU; 1 nodes)" in caplog.text
    assert "a node that can hold an embedding actor is back, " in caplog.text


def test_the_room_watch_never_stops_a_run_after_it_ended_nor_when_switched_off() -> None:
    stopped = threading.Event()
    with ActorRoomWatch({"GPU": 1}, {}, timeout_s=0, nodes=list, every_s=0.01,
                        stop_run=stopped.set):
        assert not stopped.wait(0.1)  # 0: wait forever
    looked = threading.Event()

    def nodes() -> list[dict[str, Any]]:
        looked.set()
        return []
    with ActorRoomWatch({"GPU": 1}, {}, timeout_s=3600, nodes=nodes, every_s=0.01,
                        stop_run=stopped.set):
        assert looked.wait(5)
    assert not stopped.is_set()


def test_the_room_watch_never_interrupts_a_main_thread_the_run_is_not_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """A caller running the job on a thread of its own: the main thread is not the run's to
    interrupt (a KeyboardInterrupt there would land in the caller's code); it says so."""
    entered = threading.Event()

    def run() -> None:
        with ActorRoomWatch({"GPU": 1}, {}, timeout_s=0.05, nodes=list, every_s=0.01) as watch:
            entered.set()
            while watch.reason is None:
                time.sleep(0.01)
            time.sleep(0.05)
    worker = threading.Thread(target=run)
    worker.start()
    worker.join(10)  # a SIGINT to this (main) thread would raise KeyboardInterrupt here
    assert entered.is_set() and not worker.is_alive()
    assert "the run is not on the main thread, which alone this watch may interrupt" in caplog.text


def test_the_room_watch_interrupts_a_driver_that_ignores_sigint() -> None:
    # `embed-archive run ... &` from a script starts the driver with SIGINT ignored: the
    # watch's interrupt must still reach the main thread, and only the watch's.
    import signal

    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ActorRoomWatch({"GPU": 1}, {}, timeout_s=3600, nodes=list, every_s=3600) as watch:
            signal.raise_signal(signal.SIGINT)  # someone else's: still ignored
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        with (pytest.raises(KeyboardInterrupt),
              ActorRoomWatch({"GPU": 1}, {}, timeout_s=0.05, nodes=list, every_s=0.01) as watch):
            time.sleep(10)
        assert watch.reason is not None
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, saved)


def test_an_actor_needs_its_cpus_gpus_and_resources_only() -> None:
    plan = ComputePlan(actors=2, gpus_per_actor=0.0, cpus_per_actor=1.0, torch_threads=1,
                       inflight_mb=256, cluster_cpus=4, cluster_gpus=0)
    assert actor_needs(ComputeConfig(embed_resources={"big_mem": 1}), plan) == {
        "CPU": 1.0, "big_mem": 1}


def _gpu_node(gpus: float, cpus: float, labels: dict[str, str] | None = None,
              kind: str = "L4") -> dict:
    return {"Alive": True, "Labels": labels or {},
            "Resources": {"CPU": cpus, "GPU": gpus, f"accelerator_type:{kind}": 1.0}}


@pytest.mark.parametrize(("compute", "nodes", "actors"), [
    # One node of 4 GPUs but 8 CPUs: actors of 4 CPUs, two at once, not four.
    ({"cpus_per_actor": 4.0}, [_gpu_node(4, 8)], 2),
    # GPUs on nodes the selector leaves out hold no actor of this job.
    ({"embed_label_selector": {"pool": "l4"}},
     [_gpu_node(2, 16, {"pool": "l4"}), _gpu_node(2, 16, {"pool": "t4"}, "T4")], 2),
    # Two actors to a GPU: 4 on two GPUs, as without the nodes.
    ({"gpus_per_actor": 0.5}, [_gpu_node(1, 8), _gpu_node(1, 8)], 4),
    # Ten shares of 0.1 in a GPU (1.0 // 0.1 is 9.0), on the nodes as in the totals.
    ({"gpus_per_actor": 0.1}, [_gpu_node(1, 16)], 10),
    # No node holds one now (an autoscaler is to add them): the cluster's totals, as before.
    ({"embed_label_selector": {"pool": "a100"}}, [_gpu_node(2, 16, {"pool": "l4"})], 2),
    # A pool asked for is the user's: no cut.
    ({"cpus_per_actor": 4.0, "embed_actors": 4}, [_gpu_node(4, 8)], 4),
])
def test_the_default_gpu_pool_is_what_the_nodes_that_may_run_it_hold(
        compute: dict, nodes: list[dict], actors: int, caplog: pytest.LogCaptureFixture) -> None:
    c = ComputeConfig(address="auto", **compute)
    gpus = sum(n["Resources"]["GPU"] for n in nodes)
    resources = {"CPU": sum(n["Resources"]["CPU"] for n in nodes), "GPU": gpus}
    plan = plan_compute(c, resources, batch_mib=1.0, file_mib=16.0, nodes=nodes)
    assert plan.actors == actors
    shares = round(gpus / plan.gpus_per_actor, 6) // 1  # as Ray counts fractions
    cut = actors < (c.embed_actors or shares)
    assert ("embedding actors of" in caplog.text) == cut
    assert plan_compute(c, resources, batch_mib=1.0, file_mib=16.0).actors == (
        c.embed_actors or int(shares))


def test_the_gpus_the_actors_may_get_are_those_of_the_nodes_they_may_run_on() -> None:
    nodes = [_gpu_node(2, 16, {"pool": "l4"}), _gpu_node(4, 16, {"pool": "t4"}, "T4"),
             {**_gpu_node(8, 16, {"pool": "l4"}, "H100"), "Alive": False}]
    assert gpus_of(embedding_nodes(nodes, {}, {"pool": "l4"})) == (2.0, ["L4"])
    assert gpus_of(embedding_nodes(nodes, {}, {})) == (6.0, ["L4", "T4"])
    assert actor_slots(nodes, {"GPU": 1.0, "CPU": 1.0}, {"pool": "!l4"}) == 4
