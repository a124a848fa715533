"""How a run uses the Ray it gets: embedding actors, their CPUs, GPUs and torch threads, and
the object-store budget for what is in flight, from the config and the cluster's resources.

Pure arithmetic on :class:`~pipeline.config.ComputeConfig` and a resources mapping (what
``ray.cluster_resources()`` returns) or node list (``ray.nodes()``), so every rule can be
read and tested without Ray. What can never run is refused here, naming the setting, rather
than left to wait forever: more GPUs per actor than there are, actors that no node of a
joined cluster can hold, or, on a local Ray (no autoscaler will bring a bigger node), a
decode task and an actor that cannot fit at once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from pipeline.config import ComputeConfig
from pipeline.errors import ConfigError
from pipeline.ray_connect import joins_cluster

log = logging.getLogger(__name__)

# On a local Ray without GPUs, one embedding actor per CPU up to this many.
MAX_LOCAL_CPU_ACTORS = 4
# How often a run on a cluster looks for a live node that can hold an embedding actor.
ROOM_CHECK_EVERY_S = 15.0


@dataclass(frozen=True)
class ComputePlan:
    """How a run uses the Ray it got: the embedding actor pool and the object-store budget."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    torch_threads: int  # intra-op threads per actor
    inflight_mb: int  # object-store budget for windows and rows in flight
    cluster_cpus: float
    cluster_gpus: float


def plan_compute(c: ComputeConfig, resources: Mapping[str, float], batch_mib: float,
                 file_mib: float, nodes: Sequence[Mapping[str, Any]] | None = None
                 ) -> ComputePlan:
    """The plan for ``resources`` (``{"CPU": 16.0, "GPU": 4.0}``); ``batch_mib``: one batch
    of windows, ``file_mib``: one output file's rows, which the in-flight budget must hold.

    With ``nodes`` (``ray.nodes()``), the default GPU pool (one actor per share of the
    cluster's GPUs) is cut to the actors its live nodes can hold now (:func:`actor_slots`):
    GPUs on nodes that ``compute.embed_label_selector`` or ``embed_resources`` leave out, or
    whose CPUs cannot hold ``cpus_per_actor`` per actor, would only keep actors pending.

    Raises:
        ConfigError: the actors asked for cannot run here, ever.
    """
    gpus = float(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 1.0))
    gpus_per_actor = c.gpus_per_actor if c.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpus_per_actor and c.embed_actors is None:
        check_gpus(c, gpus, gpus_per_actor)
    if gpus_per_actor and c.embed_actors and gpus < gpus_per_actor * c.embed_actors:
        if not joins_cluster(c):
            raise ConfigError(f"{c.embed_actors} actors x {gpus_per_actor:g} GPU asked, "
                              f"this machine has {gpus:g}: the job would wait forever",
                              "compute.embed_actors")
        log.warning("%d actors x %s GPU asked, %s GPU present; the autoscaler must add "
                    "the rest", c.embed_actors, gpus_per_actor, gpus)
    local_cpu = not gpus_per_actor and not joins_cluster(c)
    if c.embed_actors:
        actors = c.embed_actors
    elif gpus_per_actor:
        actors = max(1, _fits(gpus, gpus_per_actor))
    elif local_cpu:  # narrow actors: see ComputeConfig.embed_actors
        actors = local_cpu_actors(cpus)[0]
    else:
        actors = 1
    if c.cpus_per_actor is not None:
        cpus_per_actor = c.cpus_per_actor
    elif local_cpu:  # leave one decode task its CPU
        cpus_per_actor = max(0.0, min(1.0, (cpus - c.decode_cpus) / actors))
    else:
        cpus_per_actor = 1.0
    if nodes is not None and gpus_per_actor and c.embed_actors is None:
        slots = actor_slots(nodes, _needs(c, cpus_per_actor, gpus_per_actor),
                            c.embed_label_selector)
        if 0 < slots < actors:  # none: an autoscaler is to add them, as before
            log.warning("the cluster has %g GPUs, but its nodes hold %d embedding actors of "
                        "%s now (compute.embed_label_selector / embed_resources / "
                        "cpus_per_actor): a pool of %d, not %d; set compute.embed_actors to "
                        "wait for more", gpus, slots,
                        _asked(_needs(c, cpus_per_actor, gpus_per_actor),
                               c.embed_label_selector), slots, actors)
            actors = slots
    if c.torch_threads:
        threads = c.torch_threads
    elif local_cpu:  # the actors share this machine's cores
        threads = local_cpu_actors(cpus, actors)[1]
    else:
        threads = max(1, int(cpus_per_actor))
    if not joins_cluster(c):  # no autoscaler will bring a bigger node: Ray would wait forever
        for need, key in ((c.decode_cpus, "compute.decode_cpus"),
                          (cpus_per_actor, "compute.cpus_per_actor"),
                          (c.decode_cpus + cpus_per_actor, "compute.decode_cpus")):
            if need > cpus:
                raise ConfigError(
                    f"one decode task ({c.decode_cpus:g} CPU) and one embedding actor "
                    f"({cpus_per_actor:g} CPU) must fit on this local Ray's {cpus:g} CPUs "
                    "at once, or the job waits forever; lower compute.decode_cpus / "
                    "compute.cpus_per_actor, or raise compute.num_cpus", key)
    inflight = c.inflight_mb or default_inflight_mb(actors, batch_mib, file_mib)
    return ComputePlan(actors=actors, gpus_per_actor=gpus_per_actor,
                       cpus_per_actor=round(cpus_per_actor, 3), torch_threads=threads,
                       inflight_mb=inflight, cluster_cpus=cpus, cluster_gpus=gpus)


def default_inflight_mb(actors: int, batch_mib: float, file_mib: float) -> int:
    """``compute.inflight_mb`` left unset: eight batches of windows in flight to each actor
    (at least 256 MiB, so decoding runs well ahead of small models), plus two output
    files' rows (one gathering for its write task, one being written)."""
    return max(256, math.ceil(8 * actors * batch_mib)) + math.ceil(2 * file_mib)


def min_inflight_mb(batch_mib: float, file_mib: float) -> int:
    """The least ``compute.inflight_mb`` a job runs with: Ray Data counts the rows waiting
    for a write task against the budget, so one below a file's rows (plus half of one for
    the rows of the next, already coming) and a few window batches stops the embedder for
    good instead of merely slowing it."""
    return math.ceil(1.5 * file_mib + 4 * batch_mib)


def check_gpus(c: ComputeConfig, gpus: float, gpus_per_actor: float) -> None:
    """Refuses actors that each ask for more GPUs than there are.

    Raises:
        ConfigError: naming ``compute.gpus_per_actor``.
    """
    if gpus < gpus_per_actor:
        if joins_cluster(c):
            where, wait = "the cluster has", "set compute.embed_actors to wait for an autoscaler, or "
        else:
            where, wait = "this machine has", ""
        raise ConfigError(f"each actor asks for {gpus_per_actor:g} GPU but {where} "
                          f"{gpus:g}; {wait}set compute.gpus_per_actor: 0 to embed on CPUs",
                          "compute.gpus_per_actor")


def check_nodes(c: ComputeConfig, nodes: Sequence[Mapping[str, Any]]) -> None:
    """Refuses, on a cluster the job joins, embedding actors that no node there can hold
    (``compute.embed_resources``, ``embed_label_selector``): Ray would keep them pending and
    the job would wait forever, its progress line saying only that no rows were written.
    With ``compute.embed_actors`` set (as for GPUs: the pool an autoscaler is to bring nodes
    for) it warns instead; decode tasks that no node can take are warned about (a node
    group scaled to zero gets nodes when tasks ask).

    ``nodes``: what ``ray.nodes()`` returns; only those alive count.

    Raises:
        ConfigError: naming ``compute.embed_resources`` or ``compute.embed_label_selector``.
    """
    alive = [n for n in nodes if n.get("Alive", n.get("alive"))]
    if (c.embed_resources or c.embed_label_selector) and not any(
            _holds(n, c.embed_resources, c.embed_label_selector) for n in alive):
        what = _asked(c.embed_resources, c.embed_label_selector)
        if c.embed_actors:
            log.warning("no node of the cluster has %s now (%d nodes): the %d embedding actors "
                        "wait until an autoscaler adds one", what, len(alive), c.embed_actors)
        else:
            raise ConfigError(
                f"no node of the cluster has {what} ({len(alive)} nodes): the embedding "
                "actors would wait forever; fix the resources or labels, or set "
                "compute.embed_actors to wait for an autoscaler to add such nodes",
                "compute.embed_label_selector"  # the resources alone some node has
                if any(_holds(n, c.embed_resources, {}) for n in alive)
                else "compute.embed_resources")
    if c.decode_resources and not any(_holds(n, c.decode_resources, {}) for n in alive):
        log.warning("no node of the cluster has %s now (%d nodes): decoding waits until one "
                    "joins (an autoscaler)", _asked(c.decode_resources, {}), len(alive))


def actor_needs(c: ComputeConfig, plan: ComputePlan) -> dict[str, float]:
    """What one embedding actor asks a node for: its CPUs and GPUs and
    ``compute.embed_resources``, as ``EmbeddingJob._dataset`` asks Ray for them."""
    return _needs(c, plan.cpus_per_actor, plan.gpus_per_actor)


def _needs(c: ComputeConfig, cpus: float, gpus: float) -> dict[str, float]:
    needs = {"CPU": cpus, "GPU": gpus, **c.embed_resources}
    return {key: amount for key, amount in needs.items() if amount}


def actor_slots(nodes: Sequence[Mapping[str, Any]], needs: Mapping[str, float],
                selector: Mapping[str, str]) -> int:
    """How many actors asking ``needs`` the live ``nodes`` that ``selector`` matches hold at
    once: per node, the fewest any of its resources holds (a GPU node of 8 CPUs holds two
    actors of 4 CPUs, however many GPUs it has)."""
    total = 0
    for node in embedding_nodes(nodes, {}, selector):
        have = node.get("Resources") or {}
        total += min((_fits(have.get(key, 0.0), amount)
                      for key, amount in needs.items() if amount), default=0)
    return total


def _fits(have: float, amount: float) -> int:
    """How many ``amount`` fit in ``have``, as Ray counts (to 1e-4): 10 of 0.1 GPU in one,
    where ``1.0 // 0.1`` says 9."""
    return math.floor(have / amount + 1e-9)


def gpus_of(nodes: Sequence[Mapping[str, Any]]) -> tuple[float, list[str]]:
    """The GPUs of ``nodes`` (``ray.nodes()`` entries, or one of the cluster's totals) and
    their accelerator types (Ray's ``accelerator_type:<type>`` resources)."""
    gpus, types = 0.0, []
    for node in nodes:
        have = node.get("Resources") or {}
        gpus += float(have.get("GPU", 0.0))
        types += [k.partition(":")[2] for k in have if k.startswith("accelerator_type:")]
    return gpus, types


def embedding_nodes(nodes: Sequence[Mapping[str, Any]], resources: Mapping[str, float],
                    selector: Mapping[str, str]) -> list[Mapping[str, Any]]:
    """The live ``nodes`` that have ``resources`` and match ``selector``: where embedding
    actors may run."""
    return [n for n in nodes if n.get("Alive", n.get("alive")) and _holds(n, resources, selector)]


class ActorRoomWatch:
    """Fails a run on a joined cluster once no live node could hold an embedding actor for
    ``timeout_s``: the node that held them lost (a preempted VM) and none come in its place.

    Ray keeps such actors pending and the pipeline waits forever; Ray Data's own no-progress
    guard (``run.stall_timeout_s``) does not see it while decoding still has work, since it
    lets the decode stage hand the stalled embedder one more block every 10 s. Every
    ``every_s`` it reads ``nodes()`` (what ``ray.nodes()`` returns): it warns when the room
    goes, says when it comes back, and once it has been gone ``timeout_s`` sets
    :attr:`reason` and calls ``stop_run`` (by default a SIGINT to the main thread, whose
    wait for the pipeline it breaks; the job turns it into :class:`PipelineStalled`).
    """

    def __init__(self, needs: Mapping[str, float], selector: Mapping[str, str],
                 timeout_s: float, nodes: Callable[[], Sequence[Mapping[str, Any]]],
                 every_s: float | None = None, stop_run: Callable[[], None] | None = None) -> None:
        self._needs, self._selector = dict(needs), dict(selector)
        self._timeout_s, self._nodes = timeout_s, nodes
        self._every_s = ROOM_CHECK_EVERY_S if every_s is None else every_s
        self._stop_run = stop_run or _interrupt_main_thread
        self._owns_sigint = stop_run is None
        self._can_stop = True
        self._saved_sigint: Any = None
        self.reason: str | None = None
        self._gone_since: float | None = None  # when the watch first saw no room
        self._done = threading.Event()
        self._lock = threading.Lock()  # no stop_run once __exit__ has returned
        self._thread = threading.Thread(target=self._run, name="actor-room-watch", daemon=True)

    def __enter__(self) -> Self:
        if self._timeout_s > 0:
            # A run on another thread (a caller's own) is not the main thread's to interrupt:
            # there the watch only says what it saw.
            on_main = threading.current_thread() is threading.main_thread()
            self._can_stop = on_main or not self._owns_sigint
            if on_main and self._owns_sigint:
                self._hear_sigint()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._saved_sigint is not None:
            signal.signal(signal.SIGINT, self._saved_sigint)
            self._saved_sigint = None

    def _hear_sigint(self) -> None:
        """Make the main thread hear the watch's SIGINT where SIGINT is ignored (a driver
        started with ``cmd &`` from a script, or by a launcher that ignores it): Python then
        installs no handler, and the interrupt would be lost while the run hangs. A SIGINT
        from anyone else stays ignored."""
        if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.SIG_DFL):
            return

        def on_sigint(signum: int, frame: object) -> None:
            if self.reason is not None:
                raise KeyboardInterrupt

        self._saved_sigint = signal.signal(signal.SIGINT, on_sigint)

    def waiting(self) -> str | None:
        """What the run waits for, for the progress line; ``None`` while actors have room."""
        gone_since = self._gone_since
        if gone_since is None:
            return None
        return (f"waiting {time.monotonic() - gone_since:.0f} s for a live node that can hold "
                f"an embedding actor ({_asked(self._needs, self._selector)}); fails at "
                f"{self._timeout_s:g} s (run.stall_timeout_s)")

    def _room(self) -> tuple[bool, int]:
        alive = [n for n in self._nodes() if n.get("Alive", n.get("alive"))]
        return any(_holds(n, self._needs, self._selector) for n in alive), len(alive)

    def _run(self) -> None:
        what = _asked(self._needs, self._selector)
        while not self._done.wait(self._every_s):
            try:
                room, alive = self._room()
            except Exception as err:  # noqa: BLE001 - a GCS hiccup is no lost node
                log.debug("could not read the cluster's nodes: %s", err)
                continue
            now = time.monotonic()
            if room:
                if self._gone_since is not None:
                    log.info("a node that can hold an embedding actor is back, %.0f s after "
                             "the watch first saw none", now - self._gone_since)
                self._gone_since = None
                continue
            if self._gone_since is None:
                self._gone_since = now
                log.warning("no live node can hold an embedding actor (%s; %d nodes): the "
                            "pipeline waits for one to join, and fails after %g s without "
                            "(run.stall_timeout_s)", what, alive, self._timeout_s)
            elif now - self._gone_since >= self._timeout_s:
                with self._lock:
                    if self._done.is_set():
                        return
                    self.reason = (
                        f"the pipeline stalled: no live node could hold an embedding actor "
                        f"({what}) for {self._timeout_s:g} s (run.stall_timeout_s): the node "
                        "that held them was lost and none joined in its place; the shards "
                        "committed stay, and a rerun resumes")
                    if self._can_stop:
                        self._stop_run()
                    else:
                        log.error("%s; the run is not on the main thread, which alone this "
                                  "watch may interrupt: stop it", self.reason)
                return


def _interrupt_main_thread() -> None:
    # To the main thread itself: a signal the kernel hands another thread does not wake a
    # main thread blocked on a lock.
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _holds(node: Mapping[str, Any], resources: Mapping[str, float],
           selector: Mapping[str, str]) -> bool:
    """Whether ``node`` (an entry of ``ray.nodes()``) has ``resources`` in all and labels
    that ``selector`` matches (Ray's forms: ``v``, ``!v``, ``in(a, b)``, ``!in(a, b)``; a
    negation matches a node without the label)."""
    have, labels = node.get("Resources") or {}, node.get("Labels") or {}
    if any(have.get(key, 0.0) < amount for key, amount in resources.items()):
        return False
    for key, wanted in selector.items():
        negated, wanted = wanted.startswith("!"), wanted.removeprefix("!").strip()
        if wanted.startswith("in(") and wanted.endswith(")"):
            values = {v.strip() for v in wanted[3:-1].split(",")}
        else:
            values = {wanted}
        if (labels.get(key) in values) == negated:
            return False
    return True


def _asked(resources: Mapping[str, float], selector: Mapping[str, str]) -> str:
    parts = [f"{amount:g} {key}" for key, amount in resources.items()]
    parts += [f"label {key}={value}" for key, value in selector.items()]
    return ", ".join(parts)


def local_cpu_actors(cpus: float, actors: int | None = None) -> tuple[int, int]:
    """(actors, torch threads each) on a local Ray without GPUs: one narrow actor per CPU up
    to ``MAX_LOCAL_CPU_ACTORS`` (unless ``actors`` is given), the CPUs shared among them."""
    actors = actors or max(1, min(MAX_LOCAL_CPU_ACTORS, int(cpus)))
    return actors, max(1, int(cpus) // actors)


def local_ray_memory_mib(object_store_memory_mb: int | None) -> tuple[float, float | None]:
    """This machine's memory, and what a local Ray started here would give its tasks and
    actors (the memory available less the object store), in MiB, as Ray counts them (a
    container's limit included); the second None where Ray's count cannot be had."""
    try:
        from ray._private import utils  # private: guarded, with a fallback

        system = utils.get_system_memory()
        available = utils.estimate_available_memory()
        store = (object_store_memory_mb * 1024**2 if object_store_memory_mb
                 else utils.resolve_object_store_memory(available))
        return system / 1024**2, (available - store) / 1024**2
    except Exception:  # noqa: BLE001 - any failure of a private API: the plain count
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**2, None


def usable_cpus() -> int:
    """CPUs a local Ray started here gets, counted as Ray counts them (a container's CPU
    quota included); this machine's CPUs where Ray's count cannot be had."""
    try:
        from ray._private.utils import get_num_cpus  # private: guarded, with a fallback

        return max(1, int(get_num_cpus()))
    except Exception:  # noqa: BLE001 - any failure of a private API: the plain count
        return os.cpu_count() or 1
