"""The embedding job: plan on the driver, stream every shard through Ray, commit each shard.

:meth:`EmbeddingJob.prepare` does everything that can fail cheaply before Ray starts:
resolve the model and its weights (hashing them), check the config against the model
(:mod:`pipeline.model_settings`), list the inputs, derive the output namespace, recover
from a crashed run and work out what is left. :meth:`EmbeddingJob.run` then executes one
streaming Ray Data pipeline for all of it, so the embedding actors load their model once
and never wait for a shard to drain::

    from_arrow(recordings) -> map_batches(decode_batch)     CPU tasks, a few recordings each
                           -> map_batches(Embedder)          actor pool, one model each
                           -> map_batches(write_stage)       staged Parquet + partial pools

The driver reads the write stage's small returns as they come (:class:`ShardProgress`)
and, as soon as every window of a shard is accounted for, hands the shard to a commit
thread, which builds its recordings and errors tables, publishes its staged files and
writes its commit marker, while the driver reads on (:mod:`pipeline.commit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline import crashes, redact, storage
from pipeline import layout as layout_mod
from pipeline.audio import DecodeSettings
from pipeline.commit import Committer, ShardBook, ShardCommit, take_write_return
from pipeline.compute import (
    ActorRoomWatch,
    ComputePlan,
    actor_needs,
    check_gpus,
    check_nodes,
    embedding_nodes,
    gpus_of,
    local_ray_memory_mib,
    plan_compute,
    usable_cpus,
)
from pipeline.config import (
    ComputeConfig,
    JobConfig,
    output_inside_input,
    output_is_input,
)
from pipeline.errors import (
    EXIT_ABORTED,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    ConfigError,
    JobAborted,
    PipelineError,
    PipelineStalled,
    WorkersCrashed,
    describe,
    first_line,
    from_ray,
)
from pipeline.faults import fault_point
from pipeline.layout import OutputLayout
from pipeline.lease import NamespaceLease
from pipeline.model_settings import (
    ModelSettings,
    batch_mib,
    check_activations_fit,
    check_model_settings,
    check_sizes_fit,
    file_mib,
    mib_text,
    model_name_named,
    settle_model_settings,
)
from pipeline.provenance import JobProvenance, Variant, make_job_id, utc_now
from pipeline.ray_connect import check_ray_address_env, connect_ray, is_terminal, joins_cluster
from pipeline.resume import Resumption
from pipeline.sink import (
    ShardProgress,
    ShardSources,
    SinkSpec,
    WriteReturn,
    file_metadata,
    write_stage,
)
from pipeline.sources import (
    Listing,
    SourceItem,
    list_sources,
    pack_decode_tasks,
    plan_shards,
)
from pipeline.stages import DecodeSpec, Embedder, EmbedSpec, decode_batch
from pipeline.summary import (
    EmbedTiming,
    JobSummary,
    LatestWriter,
    ProgressLog,
    ShardOutcome,
    Written,
)

if TYPE_CHECKING:  # pipeline.models imports torch, which prepare() does when it needs it
    from pipeline.models import ModelInfo, WeightsInfo

log = logging.getLogger(__name__)

# Seconds between updates of a running job's record (_jobs/<job_id>.json), as shards commit.
RECORD_EVERY_S = 30.0
# Other variants of the model named when a new variant starts in a used output.
MAX_VARIANT_NOTES = 3
# output.file_mb below this is warned about (not refused: tests want files of a few rows).
SMALL_FILE_MB = 1

DECODE_INPUT_SCHEMA = pa.schema([("shard", pa.string()), ("recording_id", pa.string()),
                                 ("uri", pa.string()), ("path", pa.string()),
                                 ("size_bytes", pa.int64()), ("problem", pa.string())])

RANDOM_WEIGHTS_BANNER = """
==========================================================================
  RANDOM WEIGHTS: model.weights is 'random'. The embeddings this job writes
  are NOT meaningful: use them to test the pipeline, never for science.
==========================================================================""".strip("\n")


#: Times Ray tries again a decode task whose worker died, or a batch whose embedding actor
#: died, before the run fails. Ray Data's default is forever: a batch that runs its actor
#: out of memory each time (long windows, a batch too large for the node) had Ray's memory
#: monitor kill it and Ray restart it and hand it the same batch, with no error, until
#: run.stall_timeout_s (30 min by default). A node lost, a spot instance preempted, one
#: actor killed: each costs a piece of work in flight there one try.
CRASH_RETRIES = 3


@contextlib.contextmanager
def _no_one_input_advice() -> Iterator[None]:
    """Ray Data warns when the actor pool got a single block in all (a small job, whose one
    decode task's windows fit one block) that its actors cannot all be busy, and advises
    ``override_num_blocks``, a setting the user does not hold: a fact of a small job, not
    the user's to act on. Any other warning is shown as usual."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The minimum number of concurrent actors "
                                r"for 'MapBatches\(Embedder\)'", category=UserWarning)
        yield


@contextlib.contextmanager
def _retries_as_remote_args() -> Iterator[None]:
    """Ray Data 2.60 takes ``max_retries`` / ``max_task_retries`` only among the remote args
    it passes on as they are (``**ray_remote_args``), which it warns are deprecated for the
    named parameters; retries have none yet. Not the user's to act on, so not shown; the
    crash tests fail if a later Ray drops them (pyproject pins 2.60.0)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        yield


def _crashed(err: BaseException) -> WorkersCrashed | None:
    """The run's error as :class:`WorkersCrashed` when a worker's death ended it (Ray's
    errors of a dead actor, a crashed worker or one killed out of memory, anywhere in
    its chain of causes), else None."""
    from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

    pending: list[BaseException] = [err]
    for _ in range(16):
        if not pending:
            return None
        error = pending.pop()
        if isinstance(error, (RayActorError, OutOfMemoryError, WorkerCrashedError)):
            if "creation task" in str(error):  # its __init__ raised: that error says it all
                return None
            break
        pending += [e for e in (getattr(error, "cause", None), error.__cause__,
                                error.__context__) if isinstance(e, BaseException)]
    else:
        return None
    oom = isinstance(error, OutOfMemoryError) or "memory" in str(error).lower()
    # Ray's own words last: its first line is mostly ids ("The actor 3a8a1d10... is
    # unavailable: ..."), and `inspect` shows a record's first 160 characters.
    said = WorkersCrashed(
        f"a worker died {CRASH_RETRIES + 1} times on the same work"
        f"{', out of memory' if oom else ''}: lower model.batch_size or windows.window_s, or "
        "give the workers more memory (compute.decode_memory_mb, larger nodes), as a batch or "
        "recording that runs its worker out of memory each time is the usual cause; the "
        f"shards committed stay, and a rerun resumes (Ray: {type(error).__name__}: "
        f"{first_line(error, 200)})")
    said.by_actor = isinstance(error, RayActorError)
    return said


def failure_message(err: BaseException) -> str:
    """What a failed run's record (and ``inspect``, and the CLI's last line) says: one line.
    Ours say what was kept and what to do; any other error (a model's inside an embedding
    actor, which Ray hands on with the worker's whole traceback as its text) is named by
    :func:`~pipeline.errors.describe`, and told the same. Its traceback is not lost: the
    CLI logs it at DEBUG (run.log_level), and Ray's logs hold the worker's."""
    in_ray = from_ray(err)
    if isinstance(err, PipelineError) and not in_ray:
        return f"{type(err).__name__}: {err}"
    return (f"{describe(err)}; the shards committed stay, and a rerun resumes (its "
            f"traceback: --set run.log_level=DEBUG{', and Ray logs' if in_ray else ''})")


def _stalled(err: BaseException, timeout_s: float, watch: ActorRoomWatch) -> PipelineStalled | None:
    """A stall, said in the job's terms: the watch's interrupt, or Ray Data's no-progress
    guard (whose own message tells how to raise a ``DataContext`` setting the user does not
    hold)."""
    from ray.data.exceptions import ExecutionTimeoutError

    if isinstance(err, KeyboardInterrupt) and watch.reason:
        return PipelineStalled(watch.reason)
    if not isinstance(err, ExecutionTimeoutError):
        return None
    return PipelineStalled(
        f"the pipeline stalled: no stage moved a block for {timeout_s:g} s (run.stall_timeout_s), "
        "e.g. a node lost with blocks another stage waited for, or embedding actors no node "
        "can hold any more; the shards committed stay, and a rerun resumes (raise "
        "run.stall_timeout_s where an autoscaler takes longer to bring a node)")


class EmbeddingJob:
    """One run of a job config. ``prepare()`` needs no Ray; ``run()`` does the work."""

    # Settled by prepare(), in this order: the model and its weights; what the config asks
    # of them (settle_model_settings); the output namespace; the inputs; what is left to do.
    info: ModelInfo
    weights: WeightsInfo
    settings: ModelSettings  # windows, layers and pooling, as the model takes them
    precision: str  # never "auto": the variant records it
    variant: Variant
    provenance: JobProvenance
    file_provenance: dict[str, Any]
    parquet_metadata: dict[bytes, bytes]
    layout: OutputLayout
    listing: Listing
    todo: list[SourceItem]  # listed recordings no committed shard holds
    already_done: int  # listed recordings a committed shard holds
    already_failed: int  # of those: committed as errors
    committed_before: int  # the namespace's committed shards before this run reopened any
    shards: list[tuple[str, list[SourceItem]]]  # todo, planned into commit shards

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.job_id = cfg.run.job_id or make_job_id()
        self.prepared = False
        self._owns_ray = False  # prepare() started Ray (to see a cluster's GPUs); run() stops it
        # recording id -> runs that met an error not its own on it, for the reopened shards'
        # recordings (carried into their new markers: run.max_attempts).
        self._attempts: dict[str, int] = {}
        self._ledgers: tuple[Any, ...] = ()  # the run's pipeline.crashes ledgers, once Ray runs
        self.summary: JobSummary | None = None  # the last run()'s, finished or not
        self._run_started = 0.0  # perf_counter time
        self._record_writer: LatestWriter | None = None  # a running job's record, as shards commit

    # ------------------------------------------------------------------ planning

    def prepare(self) -> None:
        """Resolve model, weights, windows, inputs and namespace; recover; plan shards. What
        it refuses, it refuses before any work, in this order: the model and the compute it
        needs, the output, the inputs, a namespace another run holds.

        Raises:
            ConfigError: the config does not fit the model (window, pooling, layers), the
                compute, or the output; a store refuses the credentials.
            NoInputsError: nothing to embed was found.
            WeightsUnavailableError: the checkpoint cannot be fetched.
            NamespaceBusyError: another run is writing this output namespace.
        """
        mixed = output_inside_input(self.cfg)
        if mixed and output_is_input(self.cfg):
            raise ConfigError(mixed.removeprefix("output.uri "), "output.uri")
        if mixed:
            log.warning("%s", mixed)
        for uri, field in ((self.cfg.input.uri, "input.uri"),
                           (self.cfg.input.manifest, "input.manifest"),
                           (self.cfg.output.uri, "output.uri")):
            if uri and (problem := storage.missing_filesystem(uri)):
                raise ConfigError(problem, field)  # not a traceback after the weights
        self._resolve_model()
        self.variant = self._build_variant()
        self.provenance = JobProvenance.create(self.cfg, self.job_id, self.variant,
                                               self.weights.uri)
        # In every Parquet footer and job record (a record is rebuilt at every commit).
        self.file_provenance = self._file_provenance()
        self.parquet_metadata = file_metadata(self.file_provenance)
        self.layout = OutputLayout(self.cfg.output.uri, self.info.name, self.variant.id,
                                   dict(self.cfg.output.storage_options))
        shown = redact.uri(self.cfg.output.uri)
        with storage.refusals_named("output.uri", shown):
            self._open_output()  # an output the job cannot take fails here, before the listing
        self.listing = list_sources(self.cfg.input)
        with storage.refusals_named("output.uri", shown):
            self._write_variant_record()
        fault_point("listed")
        # Held from before the markers are read until run() ends: see pipeline.lease.
        self._lease = NamespaceLease(self.layout, self.job_id)
        with storage.refusals_named("output.uri", shown):
            self._lease.acquire()
        try:
            self._plan_remaining()
            fault_point("planned")  # the lease held, Ray not yet started
        except BaseException:
            self._lease.release()
            raise
        self._note_other_variants()
        self.prepared = True
        log.info("%d recordings listed (%.2f GB), %d already committed, %d to embed in %d "
                 "shards -> %s", len(self.listing.items), self.listing.total_bytes / 1e9,
                 self.already_done, len(self.todo), len(self.shards),
                 self.layout.uri(self.layout.table_dir("windows")))

    def _resolve_model(self) -> None:
        """The backbone and its weights (loudly when random), the window and layer settings,
        the precision, and the compute they need: all before any listing or output."""
        import ray

        from pipeline.models import resolve_backbone
        from pipeline.models.weights import advice_for_cluster

        cfg, c = self.cfg, self.cfg.compute
        check_ray_address_env(c)
        with advice_for_cluster(joins_cluster(c)), model_name_named():
            # weights missing: advice for where it runs
            self.info, self.weights = resolve_backbone(
                cfg.model.name, weights=cfg.model.weights, options=cfg.model.options,
                storage_options=cfg.model.storage_options)
        if self.weights.is_random:
            if log.isEnabledFor(logging.WARNING):
                log.warning("\n%s", RANDOM_WEIGHTS_BANNER)
            else:  # run.log_level: ERROR must not hide that the embeddings mean nothing
                print(RANDOM_WEIGHTS_BANNER, file=sys.stderr)
        self.settings = settle_model_settings(cfg, self.info)
        if c.gpus_per_actor and not c.embed_actors:
            check_gpus(c, self._gpu_view()[0], c.gpus_per_actor)
        if joins_cluster(c) and (c.embed_resources or c.embed_label_selector
                                 or c.decode_resources):
            self._owns_ray = connect_ray(self.cfg) or self._owns_ray
            check_nodes(c, ray.nodes())
        self.precision = self._job_precision()
        if not joins_cluster(c) and not ray.is_initialized():  # a caller's own Ray: its own
            self._check_local_ray()
        elif joins_cluster(c) and ray.is_initialized():
            self._note_cluster_memory()
        if cfg.output.file_mb < SMALL_FILE_MB:
            log.warning("output.file_mb %g: window files of about %d rows each, so many small "
                        "objects that every reader of the output slows down (fine for a test "
                        "that wants commits soon); %d MB or more is usual", cfg.output.file_mb,
                        self._rows_per_file, SMALL_FILE_MB)

    def _build_variant(self) -> Variant:
        """Everything that changes the embeddings, which names the output namespace."""
        cfg, info = self.cfg, self.info
        variant = Variant(
            model_name=info.name,
            model_family=info.family,
            weights_sha256=self.weights.sha256,
            # No secret is written: options the backbone says never change its embeddings
            # (a plugin's hub token) as "***", other secret-looking text as a fingerprint.
            # How it runs (BirdNET's threads) is no part of it, as compute.torch_threads is not.
            model_options=redact.variant_options(
                {k: v for k, v in cfg.model.options.items() if k not in info.runtime_options},
                info.secret_options),
            preprocessing=dict(info.preprocessing),
            sample_rate_hz=info.sample_rate_hz,
            layers=self.settings.layers,
            pooling=self.settings.pooling,
            precision=self.precision,
            window_s=self.settings.window_s,
            hop_s=self.settings.hop_s,
            tail=cfg.windows.tail,
            min_tail_s=cfg.windows.min_tail_s,
            channels=cfg.audio.channels,
            resample_quality=cfg.audio.resample_quality,
            recording_pooling=cfg.output.recording_pooling,
        )
        for key, value in variant.model_options.items():
            if isinstance(value, str) and value.startswith("pbkdf2:"):
                log.warning("model.options.%s looks like a secret: the variant records a "
                            "fingerprint of it, never the value, so another value is another "
                            "variant; a plugin option that never changes the embeddings (a hub "
                            "token) belongs in the plugin's secret_options", key)
        return variant

    def _note_other_variants(self) -> None:
        """Warn when this variant has nothing committed yet but the output holds committed
        shards of another variant of the same model, naming the settings that differ: a
        changed hop or layer list otherwise re-embeds the whole archive without a word.

        "Nothing committed" is what the run found before reopening any shard: a variant
        whose shards hold only other recordings (one job per prefix) or were all reopened
        (every object changed since) is in use, and telling it that its settings embed
        everything again, and to rerun with another variant's, was wrong advice."""
        if self.committed_before:
            return
        fs, ours = self.layout.fs, self.layout.variant_path()
        try:
            records = [path for path in storage.list_files(
                           fs, storage.join(self.layout.root_path, "_variants"))
                       if path.endswith(".json") and not path.endswith(".columns.json")
                       and path != ours]
        except OSError:
            return  # a note, not worth failing the run for
        shown = 0
        for path in records:
            try:
                record = layout_mod.read_json(fs, path)
                if not isinstance(record, dict) or record.get("model_name") != self.info.name:
                    continue
                other = OutputLayout(self.cfg.output.uri, self.info.name, str(record["variant"]),
                                     dict(self.cfg.output.storage_options))
                shards = len(storage.list_files(fs, other.commits_dir()))
            except (OSError, ValueError, KeyError):
                continue
            if not shards:
                continue
            if shown == MAX_VARIANT_NOTES:
                log.warning("... and more variants of %s there (see %s)", self.info.name,
                            self.layout.uri(storage.join(self.layout.root_path, "_variants")))
                return
            shown += 1
            differs = self.variant.differences(record) or ["nothing the job records"]
            log.warning("%s already holds variant %s of %s (%d committed shards); this run's "
                        "settings make variant %s, so every recording is embedded again. They "
                        "differ in %s. To resume %s instead, rerun with its settings (%s)",
                        redact.uri(self.cfg.output.uri), record["variant"], self.info.name,
                        shards, self.variant.id, "; ".join(differs), record["variant"],
                        self.layout.uri(path))

    def _plan_remaining(self) -> None:
        """Under the lease: what the committed shards settle and what is left, planned into
        shards (see :mod:`pipeline.resume`)."""
        left = Resumption(
            cfg=self.cfg, layout=self.layout, listing=self.listing, job_id=self.job_id,
            model_name=self.info.name, variant_id=self.variant.id, tables=self._tables,
            limits=self._limits, row_group_rows=self._row_group_rows).plan()
        self.listing, self.todo = left.listing, left.todo
        self.already_done, self.already_failed = left.already_done, left.already_failed
        self.committed_before = left.committed_before
        self._attempts = left.attempts
        if crashes.ERROR_TYPE in self.cfg.run.retry_errors:
            # decoded again; a crash again records it again
            crashes.set_aside(self.layout, {i.recording_id for i in self.listing.items})
        elif recorded := crashes.recorded(self.layout):
            self.todo = [dataclasses.replace(i, problem=crashes.as_problem(recorded[i.recording_id]))
                         if i.recording_id in recorded and not i.problem else i
                         for i in self.todo]
        self.shards = plan_shards(self.todo, self.cfg.run.shard_size)

    @property
    def _tables(self) -> list[str]:
        """The tables this run writes (errors always)."""
        o = self.cfg.output
        return [t for t, on in (("windows", o.windows), ("recordings", o.recordings),
                                ("errors", True)) if on]

    @property
    def _limits(self) -> dict[str, Any]:
        """The audio limits a recording can be refused by (``errors.LIMIT_ERRORS``)."""
        a = self.cfg.audio
        return {"min_sample_rate_hz": a.min_sample_rate_hz,
                "max_sample_rate_hz": a.max_sample_rate_hz, "max_channels": a.max_channels}

    def _check_local_ray(self) -> None:
        """Refuse, before any work, what the Ray this job would start on this machine can
        never give, since no autoscaler brings it a bigger node: the job would wait for it
        forever (custom resources, node labels), or stop after the listing (CPUs)."""
        c = self.cfg.compute
        # What a local Ray node has besides CPUs and GPUs: its own node:/accelerator_type:
        # resources and ray.io/ labels, and whatever RAY_OVERRIDE_RESOURCES / _LABELS add.
        for key, asked, builtin, override in (
                ("compute.embed_resources", c.embed_resources, ("node:", "accelerator_type:"),
                 "RAY_OVERRIDE_RESOURCES"),
                ("compute.decode_resources", c.decode_resources,
                 ("node:", "accelerator_type:"), "RAY_OVERRIDE_RESOURCES"),
                ("compute.embed_label_selector", c.embed_label_selector, ("ray.io/",),
                 "RAY_OVERRIDE_LABELS")):
            missing = [k for k in asked if not k.startswith(builtin)]
            if missing and not os.environ.get(override):
                raise ConfigError(f"{', '.join(missing)}: the local Ray this job starts has no "
                                  "custom resources or node labels, so the job would wait "
                                  "forever; leave it empty, join the cluster that has them "
                                  f"(compute.address), or give them with {override}", key)
        import torch

        if c.num_cpus and c.num_cpus > usable_cpus():
            log.warning("compute.num_cpus: %d gives the local Ray more CPUs than this machine "
                        "lets the job use (%d): actors and decode tasks are planned for %d and "
                        "share %d cores, each actor's torch threads too (slower); leave it "
                        "unset for all of them", c.num_cpus, usable_cpus(), c.num_cpus,
                        usable_cpus())
        for_actors = self._check_local_memory()
        # Planned only to be refused: plan_compute raises ConfigError when these CPUs and
        # GPUs cannot hold the actors and decode tasks asked for (run() plans again on Ray).
        plan = self._compute_plan({"CPU": float(c.num_cpus or usable_cpus()),
                                   "GPU": float(torch.cuda.device_count())})
        if not plan.gpus_per_actor:  # on a GPU the activations are on the device
            check_activations_fit(self.cfg, self.settings, self.info, plan.actors, for_actors,
                                  "what a local Ray gives its actors here")

    def _check_local_memory(self) -> float:
        """Refuse what the memory of this machine, which a local Ray gets, can never hold:
        an object store larger than it (Ray's own ValueError, after the listing), a decode
        task reserving more than Ray gives tasks (never scheduled: the job waited for the
        stall timeout, which it then advised raising), a batch or a window larger than it.

        Returns the memory a local Ray gives its tasks and actors here, in MiB (the
        machine's where Ray's count cannot be had)."""
        c = self.cfg.compute
        system, tasks = local_ray_memory_mib(c.object_store_memory_mb)
        if c.object_store_memory_mb and c.object_store_memory_mb > system:
            raise ConfigError(f"{c.object_store_memory_mb} MiB is more than this machine's "
                              f"memory ({mib_text(system)}), which Ray refuses; leave it unset "
                              "(Ray takes about 30% of the memory available)",
                              "compute.object_store_memory_mb")
        if tasks is not None and c.decode_memory_mb > tasks:
            raise ConfigError(f"each decode task reserves {c.decode_memory_mb} MiB, more than "
                              f"the {mib_text(max(tasks, 0))} a local Ray gives tasks here (the "
                              "memory available less its object store): none would ever be "
                              f"scheduled and the job would wait; lower it (default "
                              f"{ComputeConfig.decode_memory_mb})", "compute.decode_memory_mb")
        check_sizes_fit(self.cfg, self.settings, system, "this machine's")
        return system if tasks is None else tasks

    def _note_cluster_memory(self) -> None:
        """On a cluster the job joins (and is connected to), warn of what no live node's
        memory holds now: an autoscaler may bring larger nodes, so it is not refused."""
        import ray

        c = self.cfg.compute
        alive = [n for n in ray.nodes() if n.get("Alive", n.get("alive"))]
        if not alive:
            return
        resources = [n.get("Resources") or {} for n in alive]
        tasks = max(r.get("memory", 0.0) for r in resources) / 1024**2
        total = max(r.get("memory", 0.0) + r.get("object_store_memory", 0.0)
                    for r in resources) / 1024**2
        if c.decode_memory_mb > tasks:
            log.warning("compute.decode_memory_mb: each decode task reserves %d MiB, and no "
                        "node of the cluster has that much memory for tasks now (at most %s, "
                        "%d nodes): decoding waits until an autoscaler adds a larger one",
                        c.decode_memory_mb, mib_text(tasks), len(alive))
        try:
            check_sizes_fit(self.cfg, self.settings, total, "any node's")
            if self._cpu_actors_on(resources):  # on a GPU the activations are on the device
                check_activations_fit(self.cfg, self.settings, self.info, 1, tasks,
                                      "any node's memory for tasks")
        except ConfigError as err:
            log.warning("%s (unless an autoscaler adds a larger node)", err)

    def _cpu_actors_on(self, resources: Sequence[Mapping[str, float]]) -> bool:
        """Whether the embedding actors run on CPUs on nodes with these resources: asked
        to, a backbone that cannot use a GPU, or no GPU on any of them (the default then)."""
        if not self.info.runs_on_gpus:
            return True
        if self.cfg.compute.gpus_per_actor is not None:
            return not self.cfg.compute.gpus_per_actor
        return not any(r.get("GPU", 0.0) for r in resources)

    def _job_precision(self) -> str:
        """``model.precision`` as every actor will run it; ``auto`` is settled here, on the
        driver, because the variant (the output namespace) records it.

        For ``auto`` the driver looks where the actors will run: Ray's resources when it is
        connected or the job joins a cluster (``accelerator_type:*`` names the GPUs), else
        this machine's GPUs, which a local Ray would get.
        """
        from pipeline.models import job_precision

        configured, c = self.cfg.model.precision, self.cfg.compute
        if self.info.family == "birdnet":
            # LiteRT runs its float32 graph whatever torch's autocast says: the variant
            # must say what ran, or the same embeddings land in two namespaces.
            if configured not in ("auto", "fp32"):
                log.warning("%s runs in fp32 (LiteRT); model.precision %s does not apply",
                            self.info.name, configured)
            return "fp32"
        if configured == "int8":
            self._check_int8()
        if configured == "fp16":
            self._check_fp16()
        if configured != "auto" or c.gpus_per_actor == 0:
            return job_precision(configured, gpu_actors=False, gpu_bf16=None)
        gpus, bf16 = self._gpu_view()
        gpu_actors = bool(c.gpus_per_actor) or gpus > 0
        precision = job_precision(configured, gpu_actors=gpu_actors, gpu_bf16=bf16)
        log.info("model.precision auto -> %s (%s GPUs%s)", precision, f"{gpus:g}",
                 "" if bf16 is None else ", bf16 " + ("native" if bf16 else
                                                     "missing or not known for these GPUs: "
                                                     "set model.precision: bf16 if they have it"))
        return precision

    def _check_int8(self) -> None:
        """``int8`` needs CPU actors and a torch network: refused here, before any work,
        rather than by every actor as it loads."""
        import torch

        from pipeline.models import plugins
        from pipeline.models.precision import no_linear_layers

        if self.info.family == "efficientnet":  # as its actors would find when they load it
            raise no_linear_layers(self.cfg.model.name)
        if self.info.family == "plugin":
            cls = plugins.find_plugin_class(self.cfg.model.name, ())
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
                raise ConfigError(f"int8 quantizes a torch network's Linear layers, and plugin "
                                  f"{self.cfg.model.name} is not an nn.Module; use fp32 or bf16",
                                  "model.precision")
        gpus_per_actor = self.cfg.compute.gpus_per_actor
        if gpus_per_actor != 0 and (gpus_per_actor or self._gpu_view()[0] > 0):
            raise ConfigError("int8 runs on CPU actors only, and this job's actors would get "
                              "GPUs: set compute.gpus_per_actor: 0, or use bf16 on the GPUs",
                              "model.precision")

    def _check_fp16(self) -> None:
        """``fp16`` needs GPU actors (CUDA autocast; bf16 runs on CPUs too): refused here,
        before Ray starts, rather than by every actor as it loads. Actors get GPUs when
        ``compute.gpus_per_actor`` asks for them (an autoscaler may bring them), or, unset,
        when the GPUs they may get are there now (:meth:`_gpu_view`)."""
        gpus_per_actor = self.cfg.compute.gpus_per_actor
        if gpus_per_actor:
            return
        if gpus_per_actor == 0:
            why = "compute.gpus_per_actor is 0"
        elif self._gpu_view()[0] > 0:
            return
        elif joins_cluster(self.cfg.compute):
            why = ("the cluster has no GPU for them now; set compute.gpus_per_actor to wait "
                   "for an autoscaler to add some, or")
        else:
            why = "no GPU here;"
        raise ConfigError(f"fp16 runs on GPU actors only, and this job's actors would get "
                          f"none ({why} use bf16, which CPUs run too, or fp32)",
                          "model.precision")

    def _gpu_view(self) -> tuple[float, bool | None]:
        """(GPUs the actors could get, whether they have bf16; None: unknown).

        Not only a look: when Ray is running or the job joins a cluster, this connects to
        it (``connect_ray``) and may start the Ray that ``_owns_ray`` says run() stops.
        """
        import ray

        from pipeline.models import gpus_have_bf16

        if ray.is_initialized() or joins_cluster(self.cfg.compute):
            self._owns_ray = connect_ray(self.cfg) or self._owns_ray
            c = self.cfg.compute
            if c.embed_label_selector or c.embed_resources:  # the GPUs the actors may get
                gpus, types = gpus_of(embedding_nodes(ray.nodes(), c.embed_resources,
                                                      c.embed_label_selector))
            else:
                gpus, types = gpus_of([{"Resources": ray.cluster_resources()}])
            return gpus, gpus_have_bf16(types)
        import torch

        count = torch.cuda.device_count()
        if not count:
            return 0.0, None
        return float(count), all(torch.cuda.get_device_capability(i)[0] >= 8 for i in range(count))

    def _open_output(self) -> None:
        """Refuses an output the job cannot take: a file, a run id already used, a folder
        or bucket it cannot write (:meth:`_check_output`)."""
        cfg = self.cfg
        storage.reach(self.layout.fs, self.layout.root_path, redact.uri(cfg.output.uri))
        if storage.is_file(self.layout.fs, self.layout.root_path):
            raise ConfigError(f"{redact.uri(cfg.output.uri)} is a file; the output is a "
                              "folder (or a bucket prefix) of tables", "output.uri")
        if cfg.run.job_id and storage.exists(self.layout.fs, self.layout.job_path(self.job_id)):
            raise ConfigError(f"{self.job_id!r} already names a run of this output (its record "
                              "is in _jobs/, its id on every row it wrote); give this run "
                              "another id, or none for a generated one", "run.job_id")
        self._check_output()

    def _check_output(self) -> None:
        """Refuse, before the listing (which may take long) and naming ``output.uri``, an
        output that holds another variant under this one's id, or in which the job cannot
        read, write or delete (no such bucket, a path under a file, no permission, a
        write-once bucket). A probe object of this run's own is written and removed, with
        the local folders made for it: a run refused later (no inputs) leaves the output
        as it was, and never removes what another run wrote."""
        fs, doing = self.layout.fs, "write to"
        try:
            self._variant_record_exists()  # for its refusal; a missing record is fine here
            probe = storage.join(self.layout.root_path, f"_probe-{self.job_id}.tmp")
            made = storage.missing_dirs(fs, probe)
            layout_mod.write_json(fs, probe, {"job_id": self.job_id})
            doing = "delete in"  # a write-once bucket: a commit deletes its staged files
            storage.remove_file(fs, probe)
            storage.remove_empty_dirs(made)
        except storage.NOT_TRANSIENT as err:  # not a full disk, nor an outage: a failure
            raise ConfigError(
                f"cannot {doing} {redact.uri(self.cfg.output.uri)}: "
                f"{type(err).__name__}: {redact.text(str(err))}", "output.uri") from err

    def _variant_record_exists(self) -> bool:
        """Whether ``_variants/<id>.json`` is there (False: not yet).

        Raises:
            ConfigError: it is there and describes another variant with this id.
        """
        fs, path = self.layout.fs, self.layout.variant_path()
        if not storage.exists(fs, path):
            return False
        if layout_mod.read_json(fs, path) != self.variant.as_recorded():
            raise ConfigError(f"{self.layout.uri(path)} describes a different variant with the "
                              "same id; refusing to mix outputs", "output.uri")
        return True

    def _write_variant_record(self) -> None:
        """Write ``_variants/<id>.json`` once, after the listing (checked again: another run
        may have written it meanwhile)."""
        if not self._variant_record_exists():
            layout_mod.write_json(self.layout.fs, self.layout.variant_path(),
                                  self.variant.to_dict())

    # ------------------------------------------------------------------ running

    def run(self) -> JobSummary:
        """Embed every remaining shard; returns the summary (never raises for bad recordings).

        Raises:
            JobAborted: failures passed ``run.max_failed_fraction``.
        """
        if not self.prepared:
            self.prepare()
        summary = JobSummary(
            job_id=self.job_id, output_uri=redact.uri(self.cfg.output.uri),
            model=self.info.name, variant=self.variant.id, weights=self.weights.uri,
            recordings_listed=len(self.listing.items), recordings_already_done=self.already_done,
            recordings_already_failed=self.already_failed,
            shards=len(self.shards), layers=len(self.settings.layers),
        )
        self.summary = summary
        started = self._run_started = time.perf_counter()
        self._lease.start()
        with contextlib.ExitStack() as finish:  # last pushed runs first, each whatever befalls
            finish.callback(self._stop_ray)  # after the record and the lease: see there
            finish.callback(setattr, self, "prepared", False)  # a second run() prepares again
            finish.callback(self._lease.release)
            finish.callback(self._write_final_record, summary, started)
            self._run_recorded(summary, started)
        return summary

    def _run_recorded(self, summary: JobSummary, started: float) -> None:
        """Run the shards, setting the summary's status, exit status and message however
        the run ends (run() then writes the final record)."""
        try:
            self._lease.check()  # prepared long ago, another run may have taken over since
            self._write_job_record(summary, started)
            self._record_writer = LatestWriter(self._write_record, "job record", RECORD_EVERY_S)
            if self.shards:
                self._run_shards(summary, started)
            summary.status = "succeeded" if summary.failed == 0 else "completed_with_errors"
            summary.exit_code = EXIT_OK if summary.failed == 0 else EXIT_SOME_FAILED
        except JobAborted as err:
            summary.status, summary.exit_code, summary.message = "aborted", EXIT_ABORTED, str(err)
            raise
        except (KeyboardInterrupt, SystemExit) as err:
            # Recorded with the exit status the process ends with: the CLI's 130 for Ctrl-C;
            # for SIGTERM (`embed-archive stop`, a scheduler), Ray's handler's SystemExit(15).
            summary.status = "stopped"
            if isinstance(err, KeyboardInterrupt):
                summary.exit_code, summary.message = EXIT_INTERRUPTED, "interrupted (SIGINT)"
            else:
                summary.exit_code = err.code if isinstance(err.code, int) else EXIT_FAILURE
                summary.message = ("stopped by SIGTERM (`embed-archive stop`, or a scheduler)"
                                   if err.code == signal.SIGTERM
                                   else f"stopped: SystemExit({err.code!r})")
            raise
        except BaseException as err:
            summary.status, summary.exit_code = "failed", EXIT_FAILURE
            summary.message = failure_message(err)
            raise

    def _run_shards(self, summary: JobSummary, started: float) -> None:
        import ray

        self._owns_ray = connect_ray(self.cfg) or self._owns_ray  # run() stops it, last
        plan = self._compute_plan(ray.cluster_resources(), ray.nodes())
        self._configure_data_context(plan)
        log.info("compute: %s", plan)
        self._stream(summary, started, plan)

    def _stop_ray(self) -> None:
        """Stop the local Ray this job started, after its record is final and its lease
        released: a SIGTERM sent to the whole process group (``timeout``, a scheduler's
        cancel) kills Ray's processes with the driver, and ``ray.shutdown()`` then aborts
        the driver; one during the shutdown kills it outright. Either used to leave the
        job's record "running", its commits uncounted, and its lease held."""
        if self._owns_ray:
            import ray

            self._owns_ray = False
            ray.shutdown()

    def _stream(self, summary: JobSummary, started: float, plan: ComputePlan) -> None:
        """Stream every shard through one Ray Data execution; commit each shard the moment
        its rows are written."""
        import ray

        items = dict(self.shards)
        layers = self.settings.layers
        book = ShardBook({sid: ShardProgress(sid, [i.recording_id for i in members], layers)
                          for sid, members in self.shards})
        sources = ray.put(self._shard_sources())
        self._ledgers = crashes.start_ledgers(plan.cluster_cpus)
        per_actor: dict[str, dict[str, float]] = {}
        pipeline_start = time.time()
        batches = self._dataset(plan, sources).iter_batches(batch_size=None,
                                                            batch_format="pyarrow")
        rows_per_file = self._rows_per_file
        log.info("rows are written, and shards commit, once up to %d window rows have gathered "
                 "(output.file_mb %g): the first commit comes then, or at the end; lower "
                 "output.file_mb for commits sooner", rows_per_file, self.cfg.output.file_mb)
        written = Written()
        sizes_known = all(i.size_bytes >= 0 for i in self.todo)
        watch = ActorRoomWatch(actor_needs(self.cfg.compute, plan),
                               self.cfg.compute.embed_label_selector,
                               # A local Ray's one node does not go away.
                               self.cfg.run.stall_timeout_s if joins_cluster(self.cfg.compute)
                               else 0, ray.nodes)
        progress_log = ProgressLog(summary, written, len(self.todo),
                                   sum(i.size_bytes for i in self.todo) if sizes_known else None,
                                   rows_per_file, self.cfg.run.progress_every_s, watch.waiting)
        shard_commit = self._shard_commit()
        committer = Committer(
            lambda progress, stopping: shard_commit.commit(progress, items[progress.shard_id],
                                                           started, stopping),
            lambda outcome: self._count_committed(summary, outcome),
            lambda: self._check_failure_budget(summary))
        try:
            with watch, progress_log, _no_one_input_advice(), \
                    contextlib.closing(iter(batches)) as returns:
                for batch in returns:
                    if self._lease.lost():  # stop here, not at the next commit
                        self._lease.check()
                    for row in batch.to_pylist():
                        complete = take_write_return(WriteReturn.from_row(row), book,
                                                     written, per_actor)
                        if complete is not None:
                            committer.submit(complete)
                    committer.collect()
            committer.collect(wait="all")
        except BaseException as err:
            said = _stalled(err, self.cfg.run.stall_timeout_s, watch) or _crashed(err)
            if isinstance(said, WorkersCrashed):
                said = self._name_crashes(said)
            committer.close(said or err)  # a stall is a pipeline error, not an interrupt
            if said is not None:
                raise said from err
            raise
        finally:  # a stopped or failed run's record says what its models did too
            summary.embed = EmbedTiming.from_actors(per_actor, pipeline_start)
            crashes.stop_ledgers(self._ledgers)  # asked above, when workers died
            self._ledgers = ()
        committer.close(None)
        if problem := book.uncommitted():
            raise RuntimeError(f"the pipeline ended with {problem}: nothing of them was "
                               "committed, and a rerun redoes them")
        e = summary.embed
        log.info("models busy %.0f%% of their active time (%d batches, forward %.1f s of %.1f s); "
                 "first batch %.1f s after the pipeline started", 100 * e.busy_fraction,
                 e.batches, e.model_s, e.active_s, e.first_batch_s)

    def _name_crashes(self, said: WorkersCrashed) -> WorkersCrashed:
        """The recordings that killed the processes decoding them (see
        :mod:`pipeline.crashes`), recorded for the next run, which makes them error rows
        without decoding them, and named in the run's error.

        A run whose embedding actor died on a batch each time (``said.by_actor``) may have
        set such recordings aside on the way, each an error row: they are recorded and
        named after Ray's words, which stay the run's error; no decode task ran out of
        retries for them."""
        deaths = crashes.suspects(self._ledgers)
        if not deaths:
            return said
        items = [i for i in self.todo if i.recording_id in deaths]
        try:
            crashes.record(self.layout, items, deaths, self.job_id)
        except Exception as err:  # noqa: BLE001 - the run's own error is the one to raise
            log.error("could not record the recordings that killed their decoding processes: %s",
                      redact.text(f"{type(err).__name__}: {err}"))
            return said
        named = "; ".join(f"{i.uri} ({deaths[i.recording_id]} times)" for i in items[:3])
        more = f" and {len(items) - 3} more" if len(items) > 3 else ""
        them = "them" if len(items) > 1 else "it"
        rows = "them error rows" if len(items) > 1 else "it an error row"
        if said.by_actor:
            return WorkersCrashed(
                f"{said}; besides, {len(items)} recording{'s' if len(items) > 1 else ''} "
                f"killed the processes decoding {them} in this run: "
                f"{named}{more}; recorded under {self.layout.uri(self.layout.crashes_dir())}, "
                f"so {self._after_crash(rows, them)}")
        return WorkersCrashed(
            f"{len(items)} recording{'s' if len(items) > 1 else ''} killed the processes "
            "decoding them, more in one task than its retries could set aside: "
            f"{named}{more}; recorded under {self.layout.uri(self.layout.crashes_dir())}, so "
            f"{self._after_crash(rows, them)}; the shards committed stay")

    def _after_crash(self, rows: str, them: str) -> str:
        """What the rerun does with the recordings a failed run named, in words. With
        ``run.retry_errors`` naming ``DecoderCrashed`` a rerun of the same config sets their
        records aside and decodes them again, failing the same way run after run: the
        message must not promise the error rows it would never write."""
        if crashes.ERROR_TYPE not in self.cfg.run.retry_errors:
            return (f"a rerun makes {rows} ({crashes.ERROR_TYPE}) instead of decoding {them} "
                    "and goes on")
        return (f"a rerun makes {rows} ({crashes.ERROR_TYPE}) and goes on only once "
                f"{crashes.ERROR_TYPE} is out of run.retry_errors: with it there, as in this "
                f"run, a rerun sets the crash records aside and decodes {them} again")

    def _check_failure_budget(self, summary: JobSummary) -> None:
        finished = summary.embedded + summary.partial + summary.failed
        budget = self.cfg.run.max_failed_fraction
        if budget >= 1.0 or finished < self.cfg.run.min_recordings_before_abort:
            return
        if summary.failed / finished > budget:
            raise JobAborted(
                f"{summary.failed} of {finished} recordings failed, more than "
                f"run.max_failed_fraction={budget}; committed shards are kept, see the errors table"
            )

    def _configure_data_context(self, plan: ComputePlan) -> None:
        from ray.data import DataContext, ExecutionResources

        ctx = DataContext.get_current()
        progress = self.cfg.run.progress
        if progress is None and not is_terminal(sys.stdout):
            # Where stdout is no terminal (a log file, `| tee`, a scheduler's log) Ray Data
            # logs its bars instead: 9 lines every 10 s ("Total Progress: 0/?", block
            # counts), 54 a minute beside the job's one (run.progress_every_s), in recordings.
            progress = False
        if progress is not None:  # else Ray Data's (and its environment's)
            ctx.enable_progress_bars = progress
        if not ctx.enable_progress_bars:
            # Ray Data then warns once, in its API's terms, how to turn them on (set
            # `DataContext...enable_progress_bars`), a WARNING in every run's log for what was
            # asked for; the job's knob is run.progress.
            from ray.util.debug import log_once

            log_once("ray_data_progress_manager_disabled")
        ctx.max_errored_blocks = 0  # bad recordings are handled per file, never by dropping blocks
        # A lost node can leave a stage waiting forever for blocks it held (their lineage
        # needs a decode slot that a backpressured decode task holds): Ray Data's guard fails
        # such a run once nothing moves (see _stream; actors no node can hold any more are
        # ActorRoomWatch's, since decoding's trickle of blocks keeps this guard quiet).
        stall = self.cfg.run.stall_timeout_s
        ctx.execution_no_progress_timeout_s = stall if stall > 0 else -1
        ctx.execution_options.preserve_order = False
        # Ray Data packs what a generator UDF yields into blocks of up to
        # target_max_block_size (128 MiB by default) before passing them on, so a decode task
        # would hold that much window audio for a long recording. One block's audio keeps a
        # decode worker's memory independent of the recording's length, and makes each of
        # the decode stage's yields (exactly one block's rows, see RowBlocks) a block of its own.
        spec = self._decode_spec()
        ctx.target_max_block_size = spec.block_rows * spec.window_bytes
        ctx.execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=plan.inflight_mb * 2**20)

    def _compute_plan(self, resources: Mapping[str, float],
                      nodes: Sequence[Mapping[str, Any]] | None = None) -> ComputePlan:
        c = self.cfg.compute
        if c.gpus_per_actor is None and not self.info.runs_on_gpus:
            c = dataclasses.replace(c, gpus_per_actor=0.0)  # no GPU held idle by default
        return plan_compute(c, resources, batch_mib(self.cfg, self.settings), file_mib(self.cfg),
                            nodes)

    def _dataset(self, plan: ComputePlan, sources: Any) -> Any:
        """decode (CPU tasks) -> embed (actor pool) -> write (CPU tasks), over every shard."""
        import ray
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        cfg = self.cfg
        # One block per decode task; a task streams its recordings one after another.
        ds = ray.data.from_arrow(self._decode_tasks(plan.cluster_cpus))
        # The memory reservation also keeps Ray from fusing decoding into the embedding actors
        # (it fuses map stages whose remote args are identical), which would move decoding
        # onto the GPU nodes and serialise it behind the model.
        decode_kwargs: dict[str, Any] = {"num_cpus": cfg.compute.decode_cpus,
                                         "memory": cfg.compute.decode_memory_mb * 1024**2,
                                         "max_retries": CRASH_RETRIES}
        if cfg.compute.decode_resources:
            decode_kwargs["resources"] = dict(cfg.compute.decode_resources)
        if cfg.compute.decode_concurrency:
            decode_kwargs["compute"] = TaskPoolStrategy(size=cfg.compute.decode_concurrency)
        with _retries_as_remote_args():
            spec = dataclasses.replace(self._decode_spec(), crash_ledgers=self._ledgers)
            # The task's whole table in one call, so that its recordings' windows gather
            # into whole blocks across them (RowBlocks): one call per recording made each
            # recording's last few windows a block of their own, which the actors' batches
            # then had to stitch together (a copy).
            ds = ds.map_batches(decode_batch, fn_kwargs={"spec": spec},
                                batch_size=None, batch_format="numpy", **decode_kwargs)
        # What each actor asks for: compute.actor_needs says the same to the room watch.
        embed_kwargs: dict[str, Any] = {"num_cpus": plan.cpus_per_actor,
                                        "max_task_retries": CRASH_RETRIES}
        if plan.gpus_per_actor:
            embed_kwargs["num_gpus"] = plan.gpus_per_actor
        if cfg.compute.embed_resources:
            embed_kwargs["resources"] = dict(cfg.compute.embed_resources)
        if cfg.compute.embed_label_selector:
            embed_kwargs["label_selector"] = dict(cfg.compute.embed_label_selector)
        with _retries_as_remote_args():
            ds = ds.map_batches(
                Embedder,
                fn_constructor_kwargs={"spec": self._embed_spec(plan)},
                batch_size=cfg.model.batch_size,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=plan.actors),
                **embed_kwargs,
            )
        sink = self._sink_spec(sources)
        # A write task gathers up to one file's rows; it writes one file per shard among them.
        return ds.map_batches(write_stage, fn_kwargs={"spec": sink},
                              batch_size=sink.rows_per_file, batch_format="pyarrow")

    def _decode_tasks(self, cluster_cpus: float) -> list[pa.Table]:
        """The recordings to decode, as one small table per decode task (at least four per CPU)."""
        items = [(sid, i) for sid, members in self.shards for i in members]
        columns: dict[str, list[Any]] = {
            "shard": [sid for sid, _ in items],
            "recording_id": [i.recording_id for _, i in items],
            "uri": [i.uri for _, i in items],
            "path": [i.path for _, i in items],
            "size_bytes": [i.size_bytes for _, i in items],
            "problem": [i.problem for _, i in items],
        }
        tasks = pack_decode_tasks(columns["size_bytes"],
                                  tasks_at_least=math.ceil(4 * cluster_cpus))
        return [pa.table({k: v[a:b] for k, v in columns.items()}, schema=DECODE_INPUT_SCHEMA)
                for a, b in tasks]

    def _decode_spec(self) -> DecodeSpec:
        a, rate = self.cfg.audio, self.info.sample_rate_hz
        return DecodeSpec(
            settings=DecodeSettings(
                target_sample_rate_hz=rate, channels=a.channels, max_channels=a.max_channels,
                min_sample_rate_hz=a.min_sample_rate_hz, max_sample_rate_hz=a.max_sample_rate_hz,
                block_s=a.block_s, resample_quality=a.resample_quality),
            window_samples=self.settings.window_samples,
            hop_samples=self.settings.hop_samples,
            tail=self.cfg.windows.tail,
            min_tail_samples=max(1, round(self.cfg.windows.min_tail_s * rate)),
            batch_windows=a.batch_windows,
            storage_options=dict(self.cfg.input.storage_options),
            log_level=self.cfg.run.log_level,
            model_batch=self.cfg.model.batch_size,
        )

    def _embed_spec(self, plan: ComputePlan) -> EmbedSpec:
        m = self.cfg.model
        use_gpu = bool(plan.gpus_per_actor)
        warmup = self.cfg.compute.warmup if self.cfg.compute.warmup is not None else use_gpu
        return EmbedSpec(
            model_name=m.name, weights=m.weights, options=dict(m.options),
            storage_options=dict(m.storage_options), layers=self.settings.layers,
            pooling=self.settings.pooling,
            precision=self.precision, sample_rate_hz=self.info.sample_rate_hz,
            tail=self.cfg.windows.tail, min_input_samples=self.info.min_input_samples,
            use_gpu=use_gpu, torch_threads=plan.torch_threads,
            gpu_share=min(plan.gpus_per_actor, 1.0) if use_gpu else 1.0,
            log_level=self.cfg.run.log_level,
            warmup_shape=(m.batch_size, self.settings.window_samples) if warmup else None,
            weights_sha256=self.weights.sha256,
            on_cluster=joins_cluster(self.cfg.compute),
            plugin_code=self.info.preprocessing.get("code") if self.info.family == "plugin" else None,
        )

    @property
    def _row_bytes(self) -> int:
        """About one output row's size: its widest embedding, plus ids and provenance."""
        return 4 * max(l.dim for l in self.info.layers) + 256

    @property
    def _rows_per_file(self) -> int:
        """Window rows a write task gathers: ``output.file_mb`` of them, at least one."""
        return max(1, int(self.cfg.output.file_mb * 1e6 / self._row_bytes))

    @property
    def _row_group_rows(self) -> int:
        """Rows per Parquet row group: ``output.row_group_mb`` of them, at least one."""
        return max(1, int(self.cfg.output.row_group_mb * 1e6 / self._row_bytes))

    def _sink_spec(self, sources: Any) -> SinkSpec:
        o = self.cfg.output
        extras = self.listing.extras
        return SinkSpec(
            staging_uri=self.layout.uri(self.layout.staging_dir()),
            storage_options=dict(o.storage_options),
            sources=sources,
            extras_schema=extras.schema if extras is not None else None,
            provenance=self.provenance.row_columns(),
            file_metadata=self.parquet_metadata,
            write_windows=o.windows,
            rows_per_file=self._rows_per_file,
            row_group_rows=self._row_group_rows,
            compression=o.compression,
        )

    def _file_provenance(self) -> dict[str, Any]:
        return {**self.provenance.to_dict(), "variant_spec": self.variant.to_dict(),
                "config": redact.settings(self.cfg.to_dict())}

    def _shard_sources(self) -> ShardSources:
        """Every planned recording's source columns, shard after shard (for the write tasks)."""
        rows: dict[str, tuple[int, int]] = {}
        start = 0
        for sid, members in self.shards:
            rows[sid] = (start, start + len(members))
            start += len(members)
        return ShardSources(self._sources_table([i for _, ms in self.shards for i in ms]), rows)

    def _sources_table(self, items: Sequence[SourceItem]) -> pa.Table:
        table = pa.table({
            "recording_id": pa.array([i.recording_id for i in items], pa.string()),
            "source_uri": pa.array([i.uri for i in items], pa.string()),
            "source_version": pa.array([i.version for i in items], pa.string()),
            "source_bytes": pa.array([i.size_bytes for i in items], pa.int64()),
        })
        extras = self.listing.extras
        if extras is not None:
            picked = extras.take(pa.array([i.row for i in items], pa.int64()))
            for name in picked.column_names:
                table = table.append_column(picked.schema.field(name), picked.column(name))
        return table

    # ------------------------------------------------------------------ committing

    def _shard_commit(self) -> ShardCommit:
        """What committing a shard needs of this run, settled by prepare() (see
        :mod:`pipeline.commit`)."""
        return ShardCommit(
            cfg=self.cfg, job_id=self.job_id, variant=self.variant, layout=self.layout,
            lease=self._lease, listing=self.listing, provenance=self.provenance,
            parquet_metadata=self.parquet_metadata, tables=self._tables,
            row_group_rows=self._row_group_rows, layers=self.settings.layers,
            attempts=self._attempts, sources_table=self._sources_table)

    def _count_committed(self, summary: JobSummary, outcome: ShardOutcome) -> None:
        """Fold a committed shard into the summary and say so."""
        summary.shard_outcomes.append(outcome)
        for key in ("embedded", "partial", "failed", "retried", "windows", "audio_s"):
            setattr(summary, key, getattr(summary, key) + getattr(outcome, key))
        summary.error_types.update(outcome.error_types)
        log.info("shard %d/%d %s committed: %d recordings (%d failed), %d windows, %.0f audio-s; "
                 "%.1f audio-s/s overall", len(summary.shard_outcomes), len(self.shards),
                 outcome.shard_id, outcome.recordings, outcome.failed, outcome.windows,
                 outcome.audio_s, summary.audio_s / max(outcome.committed_after_s, 1e-9))
        if self._record_writer is not None:  # the writer keeps the latest, writes it in a while
            try:
                summary.wall_s = time.perf_counter() - self._run_started
                self._record_writer.offer(self._job_record(summary.to_dict(outcomes=False), False))
            except Exception as err:  # noqa: BLE001 - progress for `inspect` only: the run goes on
                log.warning("job record not updated: %s", redact.text(str(err)))

    def _write_job_record(self, summary: JobSummary, started: float, final: bool = False) -> None:
        """``_jobs/<job_id>.json``, at the start and at the end; in between, as shards
        commit, through ``_record_writer`` (so ``inspect`` shows a running job's progress),
        which writes the final one too, after any interim write under way."""
        summary.wall_s = time.perf_counter() - started
        record = self._job_record(summary.to_dict(), final)
        writer, self._record_writer = self._record_writer, None
        if final and writer is not None and writer.close(record):
            return
        self._write_record(record)

    def _write_final_record(self, summary: JobSummary, started: float) -> None:
        """The final job record, as the run ends. A run that failed or stopped meets a store
        out of reach here too when an outage is what failed it: that is logged, not raised
        in place of the run's own error (the CLI named the record's write as the failure,
        and the summary's own message was lost with it). A run that ended well raises it:
        its record is part of what it writes."""
        try:
            self._write_job_record(summary, started, final=True)
        except OSError as err:  # StorageError: the retries ran out; a refusal
            if summary.status in ("succeeded", "completed_with_errors"):
                raise
            log.error("job record %s not written at the end: %s",
                      self.layout.uri(self.layout.job_path(self.job_id)),
                      storage.why(err, "output.storage_options"))

    def _job_record(self, summary: dict[str, Any], final: bool) -> dict[str, Any]:
        submission = {"ray_submission": self._lease.submission} if self._lease.submission else {}
        return {**self.file_provenance, **submission, "ended_at": utc_now() if final else None,
                "updated_at": utc_now(), "summary": summary}

    def _write_record(self, record: dict[str, Any]) -> None:
        layout_mod.write_json(self.layout.fs, self.layout.job_path(self.job_id), record)


def run_job(cfg: JobConfig) -> JobSummary:
    """Prepare and run a job; the CLI's ``run`` in one call."""
    job = EmbeddingJob(cfg)
    job.prepare()
    return job.run()


# ModelSettings, check_model_settings and settle_model_settings live in
# pipeline.model_settings; still importable from here, as before they moved.
__all__ = ["EXIT_ABORTED", "EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "EXIT_SOME_FAILED",
           "EmbeddingJob", "JobSummary", "ModelSettings", "check_model_settings", "run_job",
           "settle_model_settings"]
