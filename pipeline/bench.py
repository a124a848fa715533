"""The benchmark: does the data plane keep the model busy, and is memory flat in length?

``embed-archive bench`` measures, in one run, on one machine, with one model and settings:

1. **model only**: the backbone's batched forward pass on the exact windows the job would
   cut from the corpus, already in memory (the ceiling for this device);
2. **pipeline**: the whole job end to end on the same files (Ray start, listing, decode,
   resample, windows, embed, Parquet, commit);
3. **seed loop**: the seed notebook's approach: for each file read it whole, resample,
   cut windows, one forward call per window, mean-pool;
4. **memory**: peak RSS of a decode worker, and of every process of a whole job, for a
   1-minute and a long recording built from real clips (1 hour; 3 minutes with
   ``--quick``); in full mode also a 10-minute one, and both jobs under a tight
   object-store budget (``TIGHT_INFLIGHT_MB``);
5. **decode**: audio-seconds per second per core for WAV, FLAC, MP3, OGG/Vorbis and Opus,
   including resampling to 16 kHz.

Throughputs are audio-seconds per wall-clock second over the same corpus, so the ratios
compare like with like; model only and pipeline alternate twice in full mode and each
side's best run counts (this VM's speed drifts by +-15 % minute to minute). The pipeline is
also measured by its own clock: each embedding actor times every call, so the job reports
its throughput while the model ran (first batch start to last batch end), the share of that
time its model was busy (1.0: the data plane never kept it waiting), and its forward passes
against the same passes run here. Results go to ``<out>/bench.json`` and a table on stdout.
``--quick`` uses a tiny BEATs, a few files, shorter recordings and no long-recording
throughput comparison, so a test can run it in about a minute.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import soundfile as sf
import soxr

from pipeline import storage
from pipeline.audio import DecodeReport, DecodeSettings, decode_stream
from pipeline.config import AUDIO_EXTENSIONS
from pipeline.demo import write_audio
from pipeline.errors import ConfigError
from pipeline.windows import plan_windows, samples_for

log = logging.getLogger(__name__)

# --quick's model: BEATs cut to 2 layers of 64 dimensions, so a test runs in about a minute.
TINY_BEATS = {"encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128,
              "encoder_attention_heads": 4, "embed_dim": 64, "conv_pos": 16, "conv_pos_groups": 4}
# The shared data beside the checkout, or where EMBED_ARCHIVE_SHARED says (as for the tests).
DEFAULT_REAL = Path(os.environ.get("EMBED_ARCHIVE_SHARED",
                                   Path(__file__).resolve().parents[2] / "shared")) / "data" / "real"
# Under the shared data: the clip the long recordings loop (1 minute), and the 1-second
# recording the fixed start-up of a job is timed on.
LONG_SOURCE = "opensoundscape/tests/audio/1min.wav"
STARTUP_SOURCE = "opensoundscape/tests/audio/LOCA_2021_09_24_652_3.wav"
# Length of the long corpus's recording in full mode, unless --long-s says otherwise.
DEFAULT_LONG_S = 1800.0
# compute.inflight_mb of the memory section's tight-budget runs (output.file_mb 32): a
# little above the 66 MiB the job requires for one such file plus four tiny-BEATs batches
# (compute.min_inflight_mb).
TIGHT_INFLIGHT_MB = 80
# The job's default windows.min_tail_s: a last window with less real audio than this (and
# shorter than a window) is not embedded, so model only and the seed loop skip it too.
MIN_TAIL_S = 0.025
SECTIONS = ("real", "long", "memory", "decode")
# Quick mode's pipeline CPU samples: its decode tasks take tenths of a second, which samples
# half a second apart may miss, leaving the decode workers counted as idle Ray workers.
QUICK_CPU_EVERY_S = 0.1
#: Seconds of model-only work on a GPU (the corpus passed over again until then), and the
#: nvidia-smi samples (one per 100 ms) a busy figure needs before it says anything.
MIN_GPU_SPAN_S = 5.0
MIN_BUSY_SAMPLES = 10
# How long a model-only actor process may take to build, warm up and run its share before
# the benchmark gives up on it: a bound that catches a hung process.
MODEL_SHARE_TIMEOUT_S = 3600.0


def _usable_cpus() -> int:
    """The CPUs a local Ray started here gets, a container's CPU quota included, as the
    job's own plan counts them: under a quota, ``os.cpu_count()`` (the host's CPUs) would
    give model only and the seed loop many more threads than the CPUs they may use, slowing
    them against a job planned for those CPUs."""
    from pipeline import compute

    return compute.usable_cpus()


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark configuration (the same for every measurement that compares)."""

    model: str = "beats"
    options: dict[str, Any] | None = None
    precision: str = "fp32"
    window_s: float = 5.0
    hop_s: float = 2.5
    batch_size: int = 16
    # Model only and the seed loop: one process on all the CPUs the job plans with.
    threads: int = field(default_factory=_usable_cpus)
    sample_rate_hz: int = 16_000
    device: str = "cpu"  # model only and the seed loop; the job's actors take a GPU if any

    def job(self, input_uri: str, output_uri: str, **extra: Any) -> dict[str, Any]:
        """The job config (as a dict) for these settings; ``extra`` maps a config section to
        keys that override or add to it (``compute={"torch_threads": 1}``)."""
        raw = {
            "input": {"uri": input_uri},
            "windows": {"window_s": self.window_s, "hop_s": self.hop_s, "tail": "pad"},
            "model": {"name": self.model, "weights": "random", "options": dict(self.options or {}),
                      "batch_size": self.batch_size, "precision": self.precision, "layers": "last"},
            # The job's own plan on a CPU machine (narrow actors sharing the cores); on a GPU
            # machine one actor on one GPU, the device model only and the seed loop use (the
            # default plan would put an actor on every GPU of the machine).
            "compute": {} if self.device == "cpu" else {"embed_actors": 1, "gpus_per_actor": 1},
            "output": {"uri": output_uri},
            "run": {"progress": False, "shard_size": 10_000},
        }
        for section, values in extra.items():
            raw.setdefault(section, {}).update(values)
        return raw


# --------------------------------------------------------------------------- corpus


def list_audio(root: Path) -> list[Path]:
    exts = {f".{e}" for e in AUDIO_EXTENSIONS}
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in exts)


def corpus_windows(files: Sequence[Path], s: BenchSettings) -> tuple[np.ndarray, np.ndarray, float]:
    """Every window the job cuts from ``files`` (audio ``[n, T]``, valid ``[n]``), and seconds of audio."""
    windows, valids, seconds = [], [], 0.0
    for path in files:
        audio, report = _decode_whole(path, s.sample_rate_hz)
        if audio is None:
            continue
        seconds += report.duration_s
        for w, valid in cut_windows(audio, s):
            windows.append(w)
            valids.append(valid)
    return np.stack(windows), np.asarray(valids, np.int64), seconds


def cut_windows(audio: np.ndarray, s: BenchSettings) -> Iterator[tuple[np.ndarray, int]]:
    """The windows the job cuts from mono ``audio`` at the model's rate, zero-padded, each
    with its real samples; a last one with less than ``MIN_TAIL_S`` of audio is left out."""
    size = samples_for(s.window_s, s.sample_rate_hz)
    for start, valid in _kept_windows(len(audio), s):
        w = np.zeros(size, np.float32)
        w[:valid] = audio[start : start + valid]
        yield w, valid


def planned_windows(seconds: float, s: BenchSettings) -> int:
    """How many windows the job cuts from a recording of ``seconds`` (:func:`cut_windows`'s
    count, without the audio)."""
    return sum(1 for _ in _kept_windows(samples_for(seconds, s.sample_rate_hz), s))


def _kept_windows(num_samples: int, s: BenchSettings) -> Iterator[tuple[int, int]]:
    """(start, real samples) of each window the job embeds from ``num_samples`` at the model's
    rate: a last one with less than ``MIN_TAIL_S`` of audio is left out."""
    size, hop = samples_for(s.window_s, s.sample_rate_hz), samples_for(s.hop_s, s.sample_rate_hz)
    min_tail = int(MIN_TAIL_S * s.sample_rate_hz)
    plan = plan_windows(num_samples, size, hop, "pad")
    for start, valid in zip(plan.starts.tolist(), plan.valid.tolist(), strict=True):
        if valid < min_tail and valid < size:
            continue
        yield start, valid


# How far two counts of the same audio may differ (decoders end a recording's last frame
# differently) and still be the same work.
SAME_AUDIO_TOLERANCE_S = 0.5


def require_same_work(what: str, windows: int, audio_s: float | None, want_windows: int,
                      want_audio_s: float) -> None:
    """Stop the benchmark unless ``what`` embedded the windows and audio it is compared
    against (``audio_s`` None: windows only).

    The job exits 3 when recordings fail, which the real corpus's broken files make
    normal, so a run that lost more (a decoder stopping early in a long recording, a
    file model only has and the job skipped) still gave figures: a flat memory ratio of
    a job that read a third of its hour, a rate of other work than its ceiling's.
    """
    if windows != want_windows or (audio_s is not None
                                   and abs(audio_s - want_audio_s) > SAME_AUDIO_TOLERANCE_S):
        got = f"{windows} windows" + (f" of {audio_s:.1f} s of audio" if audio_s is not None else "")
        raise RuntimeError(f"{what} embedded {got}, not the {want_windows} windows of "
                           f"{want_audio_s:.1f} s it is measured on (a recording failed or "
                           "stopped early): its figures would be of other work")


def _decode_whole(path: Path, rate: int) -> tuple[np.ndarray | None, DecodeReport]:
    report = DecodeReport()
    fs, p = storage.url_to_fs(str(path))
    try:
        with storage.RangeReader(fs, p) as reader:
            chunks = list(decode_stream(reader, DecodeSettings(rate), report))
    except Exception:  # noqa: BLE001 - the job turns these into error rows; so does the bench
        return None, report
    return np.concatenate(chunks)[:, 0], report


def make_long_recording(path: Path, seconds: float, source: Path) -> Path:
    """A FLAC of ``seconds`` built by looping a real clip, written block by block."""
    clip, rate = sf.read(source, dtype="float32", always_2d=True)
    with sf.SoundFile(path, "w", rate, clip.shape[1], format="FLAC") as out:
        remaining = int(seconds * rate)
        while remaining > 0:
            piece = clip[: min(len(clip), remaining)]
            out.write(piece)
            remaining -= len(piece)
    return path


# --------------------------------------------------------------------------- measurements


def _backbone(s: BenchSettings, precision: str = "fp32", device: str = "cpu") -> tuple[Any, int]:
    """The settings' model with random weights, as the job builds it, and the index of its
    last layer (the one the job embeds with ``layers: last``)."""
    from pipeline.models import create_backbone, exact_float32_on_gpus

    if device != "cpu":
        exact_float32_on_gpus()  # as the job's actors run
    backbone = create_backbone(s.model, weights="random", options=s.options or {},
                               device=device, precision=precision)
    return backbone, len(backbone.info.layers) - 1


def _forward_passes(windows: np.ndarray, valid: np.ndarray, s: BenchSettings,
                    threads: int) -> Callable[[int | None], None]:
    """A backbone built as the job builds it, and a function that runs batched forward
    passes (front end, last layer, mean pooling) over the first ``n`` windows (all: None)."""
    import torch

    from pipeline.models import pool

    torch.set_num_threads(threads)
    backbone, layer = _backbone(s, s.precision, s.device)
    # Already in memory means on the device: the ceiling leaves out even the copy to a GPU.
    x_all = torch.from_numpy(windows).to(s.device)
    v_all = torch.from_numpy(valid).to(s.device)
    padded = valid < windows.shape[1]  # looked up on the host: no device sync per batch

    def forward(n: int | None = None) -> None:
        end = len(windows) if n is None else min(n, len(windows))
        for i in range(0, end, s.batch_size):
            x, v = x_all[i : i + s.batch_size], v_all[i : i + s.batch_size]
            with torch.inference_mode(), backbone.autocast(s.precision):
                feats = backbone.extract(x, v if padded[i : i + s.batch_size].any() else None,
                                         [layer])
                pool(feats[layer].tokens, feats[layer].mask, "mean")
        _synchronize(s.device)

    return forward


def model_only(windows: np.ndarray, valid: np.ndarray, seconds: float, s: BenchSettings) -> dict[str, Any]:
    """Batched forward passes on windows already in memory, in this process (all cores)."""
    forward = _forward_passes(windows, valid, s, s.threads)
    forward(s.batch_size)  # warm-up: first-call allocations and kernel selection
    # The sampler starts and stops outside the timed span. On a GPU the corpus is passed
    # over again until MIN_GPU_SPAN_S have gone by: one pass of the real corpus is some
    # 0.04 s there, shorter than one nvidia-smi sample.
    with GpuBusySampler(s.device) as gpu:
        passes, started, span_from = 0, time.perf_counter(), time.time()
        while True:
            forward()
            passes += 1
            wall = time.perf_counter() - started
            if not gpu.enabled or wall >= MIN_GPU_SPAN_S:
                break
        span = (span_from, time.time())
    return {"windows": len(windows), "audio_s": seconds, "passes": passes, "wall_s": wall,
            "audio_s_per_s": passes * seconds / wall, "windows_per_s": passes * len(windows) / wall,
            **gpu.result(span)}


def local_actor_plan() -> tuple[int, int]:
    """(actors, torch threads each) of the job's own plan for a local Ray on CPUs only."""
    from pipeline.compute import local_cpu_actors, usable_cpus

    return local_cpu_actors(usable_cpus())


def model_only_as_actors(windows: np.ndarray, valid: np.ndarray, seconds: float,
                         s: BenchSettings) -> dict[str, Any] | None:
    """Model only shaped as the job's CPU actors run it: as many processes as the job plans
    actors on this machine, each with the plan's torch threads and its share of the windows,
    started together after their warm-up; all the audio over the slowest one's time.

    On two cores the job runs two actors of one thread each, which outrun one process of
    two threads (its threads wait for each other at every operator, BENCHMARKS.md): measured
    one way only, "model only" would be no ceiling. None on a GPU, where the job runs one
    actor per GPU, as :func:`model_only` does.
    """
    import multiprocessing
    import queue

    if s.device != "cpu":
        return None
    actors, threads = local_actor_plan()
    ctx = multiprocessing.get_context("spawn")  # torch's threads do not survive a fork
    barrier, results = ctx.Barrier(actors), ctx.Queue()
    shares = np.array_split(np.arange(len(windows)), actors)
    procs = [ctx.Process(target=_model_share, daemon=True,
                         args=(windows[idx], valid[idx], s, threads, barrier, results))
             for idx in shares]
    for proc in procs:
        proc.start()
    try:
        walls: list[float] = []
        cpus: list[float] = []
        deadline = time.monotonic() + MODEL_SHARE_TIMEOUT_S
        while len(walls) < actors:
            try:
                kind, value = results.get(timeout=1.0)
            except queue.Empty:  # one killed (out of memory) says nothing: look for it
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError("a model-only process " + (
                        f"died (exit {dead[0]})" if dead else
                        f"gave no result in {MODEL_SHARE_TIMEOUT_S} s")) from None
                continue
            if kind == "error":
                raise RuntimeError(f"a model-only process failed: {value}")
            walls.append(value[0])
            cpus.append(value[1])
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    wall = max(walls)
    return {"actors": actors, "torch_threads": threads, "windows": len(windows),
            "audio_s": seconds, "wall_s": wall, "audio_s_per_s": seconds / wall,
            "windows_per_s": len(windows) / wall, "walls_s": [round(w, 3) for w in walls],
            "cpu_s": sum(cpus)}


def _model_share(windows: np.ndarray, valid: np.ndarray, s: BenchSettings, threads: int,
                 barrier: Any, results: Any) -> None:
    """One process of :func:`model_only_as_actors`: build, warm up, wait for the others,
    time its share."""
    try:
        forward = _forward_passes(windows, valid, s, threads)
        forward(s.batch_size)
        barrier.wait(timeout=MODEL_SHARE_TIMEOUT_S)
        started, cpu = time.perf_counter(), time.process_time()
        forward()
        results.put(("wall", (time.perf_counter() - started, time.process_time() - cpu)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        barrier.abort()
        results.put(("error", f"{type(err).__name__}: {err}"))


def seed_loop(files: Sequence[Path], s: BenchSettings, precision: str) -> dict[str, Any]:
    """The seed notebook: per file, whole read, resample, one window per forward, mean-pool.

    ``precision`` is ``fp32`` for the notebook as written; the benchmark also runs it at
    the pipeline's precision so a reader can see what batching and the data plane add.
    """
    import torch

    torch.set_num_threads(s.threads)
    backbone, layer = _backbone(s, precision, s.device)
    seconds, n_windows = 0.0, 0
    started = time.perf_counter()
    for path in files:
        try:
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
        except sf.LibsndfileError as err:  # the notebook skips unreadable files
            log.info("seed loop skips %s: %s", path.name, err)
            continue
        if len(audio) == 0:
            continue
        mono = soxr.resample(audio.mean(axis=1), rate, s.sample_rate_hz, quality="HQ")
        seconds += len(audio) / rate
        per_file = []
        for w, _ in cut_windows(mono, s):
            with torch.no_grad(), backbone.autocast(precision):
                feats = backbone.extract(torch.from_numpy(w)[None].to(s.device), None, [layer])
            per_file.append(feats[layer].tokens.mean(dim=1))
            n_windows += 1
        if per_file:
            torch.cat(per_file).mean(dim=0).cpu()  # the notebook keeps one vector per file
    wall = time.perf_counter() - started
    return {"windows": n_windows, "audio_s": seconds, "wall_s": wall,
            "audio_s_per_s": seconds / wall, "precision": precision}


def _synchronize(device: str) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done, not when it was queued."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_flops_per_window(s: BenchSettings) -> float:
    """FLOPs of one window's forward pass (matmuls and convolutions, as MFU counts them).

    Counted by torch's FlopCounterMode on the CPU at fp32 (the count does not depend on the
    device or precision); the front end's FFT is not counted. A torch network is counted
    with gradients on, so that every layer runs as defined, not as an inference-only path
    that the counter misses or that does fewer FLOPs: at inference on a CPU, BEATs'
    attention runs as a fused kernel the counter has no formula for (2.3 GFLOP per 5-s
    window uncounted) and its positional convolution by FFT (2.3 GFLOP as defined). So
    model FLOP/s compare across devices, as MFU does.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    backbone, layer = _backbone(s)
    network = getattr(backbone, "module", None)
    if isinstance(network, torch.nn.Module):
        network.requires_grad_(True)
    window = torch.zeros(1, samples_for(s.window_s, s.sample_rate_hz))
    with torch.set_grad_enabled(network is not None), FlopCounterMode(display=False) as counter:
        backbone.extract(window, None, [layer])
    return float(counter.get_total_flops())


# Dense bf16/fp16 tensor-core peak per GPU in TFLOP/s (NVIDIA datasheets, without sparsity).
# The first name found as whole words in torch's device name wins, so longer names come first
# ("NVIDIA L40" is not an L4, "NVIDIA RTX A1000" not an A100).
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                   ("H200 NVL", 835.0), ("H200", 989.0),
                   ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
                   ("A10", 125.0))


def peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """The table's dense peak for a GPU name (``torch.cuda.get_device_name``) at ``bf16`` or
    ``fp16``; None for another precision (fp32 runs on other units: no share of this peak)
    or a GPU not in the table (pass ``--peak-tflops``)."""
    if precision not in ("bf16", "fp16"):
        return None
    for name, tflops in GPU_PEAK_TFLOPS:
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w])", device_name):
            return tflops
    return None


def gpu_busy(samples: Sequence[tuple[float, int, float]],
             span: tuple[float, float] | None = None,
             min_samples: int = MIN_BUSY_SAMPLES) -> dict[str, Any]:
    """Mean GPU utilisation (0-1) per GPU over ``span`` (Unix times), from (time, GPU, %) samples.

    Without a span, each GPU's from its first to its last sample with a kernel running. GPUs
    that never ran one are left out; ``gpu_busy`` is the mean over the others, or None when
    one of them has fewer than ``min_samples`` samples (a span too short to tell: NVML's
    figure covers the past sample period, so a few samples mostly describe time before it).
    """
    series: dict[int, list[tuple[float, float]]] = {}
    for t, index, util in samples:
        if span is None or span[0] <= t <= span[1]:
            series.setdefault(index, []).append((t, util))
    busy, counts = {}, {}
    for index, points in sorted(series.items()):
        used = [i for i, (_, u) in enumerate(points) if u > 0]
        if used:
            steady = points[used[0] : used[-1] + 1] if span is None else points
            busy[index] = sum(u for _, u in steady) / len(steady) / 100
            counts[index] = len(steady)
    mean: float | None
    if not busy:
        mean = 0.0  # no kernel ran in the span
    elif min(counts.values()) < min_samples:
        mean = None
    else:
        mean = sum(busy.values()) / len(busy)
    return {"gpu_busy": mean, "gpu_busy_per_gpu": busy, "gpu_busy_samples": counts}


class GpuBusySampler:
    """How busy the GPUs were while a block ran: ``nvidia-smi`` sampled every 100 ms.

    NVML's ``utilization.gpu`` is the share of a sample period in which a kernel ran; see
    :func:`gpu_busy` for how samples become one figure. Off a GPU, or without
    ``nvidia-smi``, :meth:`result` is empty.
    """

    # Each sample with nvidia-smi's own time of it: printed into a pipe, its lines may be
    # buffered and arrive in bursts, so the time they are read at is not when they were taken.
    COMMAND = ("nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu",
               "--format=csv,noheader,nounits", "-lms", "100")

    def __init__(self, device: str) -> None:
        self.enabled = device.startswith("cuda") and shutil.which(self.COMMAND[0]) is not None
        self.samples: list[tuple[float, int, float]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> Self:
        if self.enabled:
            self._proc = subprocess.Popen(self.COMMAND, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._thread.join(timeout=10)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            parts = [part.strip() for part in line.split(",")]
            if len(parts) != 3:  # a warning line
                continue
            try:
                self.samples.append((_smi_time(parts[0]), int(parts[1]), float(parts[2])))
            except ValueError:  # "[N/A]"
                continue

    def result(self, span: tuple[float, float] | None = None) -> dict[str, Any]:
        return gpu_busy(self.samples, span) if self.enabled else {}


def _smi_time(text: str) -> float:
    """nvidia-smi's ``timestamp`` (``2026/11/25 05:30:12.345``, this machine's local time)
    as seconds since the epoch, as ``time.time()`` counts them; the time it is read at if
    a driver spells it otherwise (a sample late, rather than none)."""
    try:
        return datetime.datetime.strptime(text, "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return time.time()


def cpu_model() -> str:
    """The CPU's model name (speeds differ several-fold between CPUs with the same flags)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_claims_bf16() -> bool:
    """Whether this CPU's flags claim bf16 dot products (AVX512-BF16 or AMX)."""
    from pipeline.models.precision import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# Windows (of random noise) each candidate precision runs in :func:`choose_precision`.
PRECISION_PROBE_WINDOWS = 4


def choose_precision(s: BenchSettings) -> dict[str, Any]:
    """The precision the benchmark runs at when none is given.

    bf16 on a GPU that has it. On a CPU, whichever of fp32, bf16 (where the CPU's flags
    claim it) and int8 runs four windows of this model fastest, on every core in one
    process (the actors run 1-thread batches of 16: a quick ranking, not their speed;
    model only then measures the choice over the whole corpus): the flags alone say
    little. BEATs in bf16 ran 2.5x faster than fp32 on an AMD EPYC with AVX512-BF16, and
    1.6x slower on an Intel Xeon with the same flag and no AMX (0.34 vs 0.21 s per 5-s
    window, 2 threads), where int8 ran 0.11. Each candidate's pooled embeddings are
    compared with fp32's (the lowest cosine of the batch), so the table shows what the
    speed costs.

    Returns:
        ``{"precision": ..., "why": ..., "s_per_window": {precision: seconds},
        "cosine_to_fp32": {precision: lowest cosine}, "not_tried": {precision: why}}``;
        on a GPU only ``precision``, ``why`` and an empty ``s_per_window``.
    """
    import torch

    from pipeline.models import pool, resolve_precision

    if s.device != "cpu":
        # The job's own rule (compute capability 8.0 or newer), not torch.cuda.is_bf16_supported():
        # that one says True on a T4 or V100 too (bf16 emulated), where the backbone refuses bf16.
        bf16 = resolve_precision("auto", s.device) == "bf16"
        return {"precision": "bf16" if bf16 else "fp32", "s_per_window": {},
                "why": "GPU with bf16" if bf16 else "GPU without bf16"}
    torch.set_num_threads(s.threads)
    n = min(PRECISION_PROBE_WINDOWS, s.batch_size)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(
        (n, samples_for(s.window_s, s.sample_rate_hz))).astype(np.float32) * 0.1)
    timings: dict[str, float] = {}
    cosines: dict[str, float] = {}
    reference = None
    skipped: dict[str, str] = {}
    for precision in ("fp32", *(("bf16",) if cpu_claims_bf16() else ()), "int8"):
        try:
            backbone, layer = _backbone(s, precision)
        except ConfigError as e:  # int8 of a network without Linear layers (EfficientNet)
            if precision == "fp32":
                raise
            skipped[precision] = str(e)
            continue
        best = math.inf
        for _ in range(3):  # best of 3: the first call pays first-call costs
            started = time.perf_counter()
            with torch.inference_mode(), backbone.autocast(precision):
                feats = backbone.extract(x, None, [layer])
            best = min(best, time.perf_counter() - started)
        timings[precision] = best / n
        pooled = pool(feats[layer].tokens, feats[layer].mask, "mean").float()
        reference = pooled if reference is None else reference
        cosines[precision] = float(torch.nn.functional.cosine_similarity(pooled, reference).min())
    chosen = min(timings, key=timings.__getitem__)
    return {"precision": chosen, "s_per_window": timings, "cosine_to_fp32": cosines,
            "why": f"measured fastest here on {n} windows", "not_tried": skipped}


def pipeline_run(input_dir: Path, s: BenchSettings, workdir: Path, memory: bool = True,
                 cpu_every_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """The job end to end in a fresh process (its own local Ray), timed from outside.

    ``memory``: sample its processes' memory too. That walks every process's page tables
    five times a second (``smaps_rollup``), which took 8 % of two cores from the job it
    measured; throughput runs sample CPU only, every ``cpu_every_s`` (None: twice a
    second). What sampling cost this process is reported (``sampling_cpu_s``): on a small
    machine it is CPU the job lacked.
    """
    out = workdir / f"out-{time.monotonic_ns()}"
    cfg = workdir / f"job-{time.monotonic_ns()}.json"
    cfg.write_text(json.dumps(s.job(str(input_dir), str(out), **extra)))
    code = ("import json,sys;from pipeline.config import JobConfig;from pipeline.job import run_job;"
            "s=run_job(JobConfig.from_dict(json.load(open(sys.argv[1]))));"
            "print('SUMMARY'+json.dumps(s.to_dict()));sys.exit(s.exit_code)")
    started, own_cpu_before = time.perf_counter(), time.process_time()
    sampler = (ProcessTreeSampler() if memory
               else ProcessTreeSampler(cpu_every_s or ProcessTreeSampler.CPU_ONLY_INTERVAL_S,
                                       memory=False))
    with sampler, GpuBusySampler(s.device) as gpu, \
            _in_own_session([sys.executable, "-c", code, str(cfg)]) as proc:
        sampler.watch(proc.pid)
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    # This process only waited on the job: its CPU time is what its samplers' threads took.
    sampling_cpu_s = time.process_time() - own_cpu_before
    # Exit 3: some recordings failed, as the real corpus's broken files do (model only and
    # the seed loop skip them too); anything else is no run to time.
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"pipeline run failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    summary = json.loads(stdout.split("SUMMARY", 1)[1])
    embed = summary["embed"]
    # CPU and GPU busy over the span the job's own "while its model ran" uses: first batch
    # start to last batch end (an actor's warm-up batch and the shutdown fall outside it).
    span = ((embed["first_batch_at"], embed["first_batch_at"] + embed["span_s"])
            if embed["batches"] else None)
    return {"windows": summary["windows"], "audio_s": summary["audio_s"], "wall_s": wall,
            "job_wall_s": summary["wall_s"], "audio_s_per_s": summary["audio_s"] / wall,
            "steady_audio_s_per_s": summary["steady_audio_s_per_s"], "embed": embed,
            "peak_rss_mb": sampler.peaks_mb(), "cpu_s": sampler.cpu_s(),
            # Where the cores went while the models ran (the steady rate's span).
            "steady_cpu_s": sampler.cpu_s_between(*span) if span else {},
            "sampling_cpu_s": round(sampling_cpu_s, 2),
            "output": str(out), **gpu.result(span)}


# Seconds a stopped job's processes get to exit on SIGTERM before the rest are killed.
JOB_STOP_GRACE_S = 10.0


@contextlib.contextmanager
def _in_own_session(args: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
    """``args`` run in a session (and process group) of their own, stopped with every
    process of it if the block is left by an exception.

    A Ctrl-C reaches only the terminal's foreground session, not this one: without the
    stop, an interrupted benchmark left the job and its Ray running on the cores (and
    writing into the folder the benchmark had just removed) until the job ended.
    """
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        yield proc
    except BaseException:
        _stop_session(proc, JOB_STOP_GRACE_S)
        raise


def _stop_session(proc: subprocess.Popen[str], grace_s: float) -> None:
    """SIGTERM to every process of ``proc``'s session (its process group), SIGKILL to those
    still there after ``grace_s``."""
    group = proc.pid  # a session's leader leads its process group too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while proc.poll() is None or _group_has_live_members(group):
            if time.monotonic() > deadline:
                os.killpg(group, signal.SIGKILL)
                break
            time.sleep(0.1)
    proc.wait()


def _group_has_live_members(group: int) -> bool:
    """Whether a process of process group ``group`` runs still (zombies, which no signal
    moves and an orphan's reaper may never collect, do not count)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = _stat_fields(int(entry))  # state, ppid, pgrp, ...
                if int(fields[2]) == group and fields[0] != "Z":
                    return True
    return False


def decode_rss(path: Path, s: BenchSettings) -> dict[str, Any]:
    """Peak RSS of a fresh process that runs the job's decode stage on one file with the
    settings' windows, in the job's default blocks (one model batch)."""
    rate = s.sample_rate_hz
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (the benchmark
    # process holds models), while VmHWM belongs to the new address space after exec.
    # DecodeSpec's fields: settings, window and hop samples, tail, min_tail_samples,
    # batch_windows (None: one model batch per block).
    code = ("import sys,time;from pipeline.stages import DecodeSpec,decode_recording;"
            "from pipeline.audio import DecodeSettings;"
            f"spec=DecodeSpec(DecodeSettings({rate}),{samples_for(s.window_s, rate)},"
            f"{samples_for(s.hop_s, rate)},'pad',{int(MIN_TAIL_S * rate)},None,"
            f"model_batch={s.batch_size});"
            "t=time.perf_counter();"
            "n=sum(len(b['audio']) for b in decode_recording('r',sys.argv[1],sys.argv[1],-1,'',spec));"
            "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1];"
            "print(n,time.perf_counter()-t,hwm)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True).stdout.split()
    return {"rows": int(out[0]), "wall_s": float(out[1]), "peak_rss_mb": int(out[2]) / 1024}


# Sample rate decode_speed's files are written at (a common recorder rate, and Opus's own).
DECODE_SOURCE_HZ = 48_000


def decode_speed(source_dir: Path, workdir: Path, seconds: float) -> dict[str, Any]:
    """Single-core speed per format of decoding ``seconds`` of 48 kHz audio and resampling
    it to the model's 16 kHz; each format's first use is warmed up untimed."""
    src, rate_hz = DECODE_SOURCE_HZ, BenchSettings.sample_rate_hz
    audio, rate = sf.read(source_dir / LONG_SOURCE, dtype="float32")
    resampled = soxr.resample(audio, rate, src)
    reps = math.ceil(seconds * src / len(resampled))
    long = np.tile(resampled, reps)[: int(seconds * src)]
    results = {}
    for name, fmt, subtype in (("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"),
                               ("mp3", "MP3", "MPEG_LAYER_III"), ("ogg", "OGG", "VORBIS"),
                               ("opus", "OGG", "OPUS")):
        path = workdir / f"decode-{name}.{'ogg' if name == 'opus' else name}"
        # One second first, untimed: a decoder's first use imports its library (MP3's PyAV:
        # 2.2x the warm time on a 30-s file), which no long job pays per recording.
        warm = path.with_stem(f"{path.stem}-warm")
        write_audio(warm, long[:src], src, fmt, subtype)
        _decode_whole(warm, rate_hz)
        write_audio(path, long, src, fmt, subtype)
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        decoded, report = _decode_whole(path, rate_hz)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        assert decoded is not None
        results[name] = {"audio_s": report.duration_s, "cpu_s": cpu, "wall_s": wall,
                         "audio_s_per_cpu_s": report.duration_s / cpu,
                         "bytes": path.stat().st_size}
    return results


class ProcessTreeSampler:
    """Samples the RSS of a process and all its descendants (Ray workers included).

    Peaks are the largest of samples taken every ``interval_s`` (plus a pass over /proc,
    ~0.05 s here: a sample every ~0.25 s), so a spike between two samples is missed; a
    shorter interval would take a core of its own from the job it measures. The decode
    stage alone is also measured exactly, by its kernel high-water mark (:func:`decode_rss`).
    """

    #: Seconds between samples with memory (the default), and of CPU only (throughput runs).
    MEMORY_INTERVAL_S = 0.2
    CPU_ONLY_INTERVAL_S = 0.5

    def __init__(self, interval_s: float = MEMORY_INTERVAL_S, memory: bool = True) -> None:
        self.interval_s = interval_s
        self.memory = memory  # False: CPU only, far cheaper (no smaps_rollup walks)
        self.peaks: dict[str, float] = {}
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds so far)
        self._series: list[tuple[float, dict[str, float]]] = []  # (time, CPU s by role)
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, pid: int) -> None:
        self._pid = pid

    def peaks_mb(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in sorted(self.peaks.items())}

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds by role (user + system, as last sampled: a process's final moments
        after its last sample are not counted): where the machine's cores went."""
        return _largest_first(self._cpu_by_role())

    def cpu_s_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds by role between two ``time.time()`` moments, each read by linear
        interpolation between the samples around it (taken every ``interval_s``, plus a
        pass over /proc); empty unless a sample was taken in between."""
        if not any(start <= t <= end for t, _ in self._series):
            return {}
        first, last = self._cpu_at(start), self._cpu_at(end)
        return _largest_first({role: last[role] - first.get(role, 0.0) for role in last})

    def _cpu_at(self, moment: float) -> dict[str, float]:
        before = [(t, cpu) for t, cpu in self._series if t <= moment]
        after = [(t, cpu) for t, cpu in self._series if t > moment]
        if not before:
            return {}  # the job had not started: nothing counted yet
        (t0, a), (t1, b) = before[-1], (after[0] if after else before[-1])
        w = (moment - t0) / (t1 - t0) if t1 > t0 else 0.0
        return {role: a.get(role, 0.0) + w * (b[role] - a.get(role, 0.0)) for role in b}

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._pid is not None:
                if self.memory:
                    self._sample_memory_and_count_cpu()
                else:
                    for pid in _descendants(self._pid):
                        if (label := _role_of(pid)) is not None:
                            self._count_cpu(pid, label)
                self._sample_cpu()
            self._stop.wait(self.interval_s)

    def _sample_memory_and_count_cpu(self) -> None:
        """One pass over the tree: each process's CPU, and the peaks of private memory (by
        role, and all processes together with the object store's pages counted once)."""
        assert self._pid is not None
        private, shared_sum, largest_shared, all_proportional = 0.0, 0.0, 0.0, True
        for pid in _descendants(self._pid):
            sample = _memory_of(pid)
            if sample is None:
                continue
            label, anon, shmem, shmem_share = sample
            self._count_cpu(pid, label)
            private += anon
            largest_shared = max(largest_shared, shmem)
            if shmem_share is None:
                all_proportional = False
            else:
                shared_sum += shmem_share
            self._raise_peak(label, anon)
        # Ray's object store is one shared arena mapped by every worker: each page counted
        # once, as the sum of the processes' proportional shares (Pss_Shmem); the largest
        # single mapping (the fallback) would miss pages that decode workers and actors
        # touch apart.
        shared = shared_sum if all_proportional else largest_shared
        self._raise_peak("all_processes", private + shared)
        self._raise_peak("object_store_pages", shared)

    def _raise_peak(self, key: str, mb: float) -> None:
        self.peaks[key] = max(self.peaks.get(key, 0.0), mb)

    def _count_cpu(self, pid: int, label: str) -> None:
        cpu = _cpu_seconds(pid)
        if cpu is not None:  # a worker keeps the job's role it was seen in
            role = self._cpu.get(pid, (label, 0.0))[0]
            self._cpu[pid] = (role if role in _JOB_ROLES else label, cpu)

    def _sample_cpu(self) -> None:
        self._series.append((time.time(), self._cpu_by_role()))

    def _cpu_by_role(self) -> dict[str, float]:
        by_role: dict[str, float] = {}
        for role, seconds in self._cpu.values():  # the dead keep their last count
            by_role[role] = by_role.get(role, 0.0) + seconds
        return by_role


def _largest_first(seconds_by_role: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds by role, rounded to 0.01 s, the largest first."""
    return {role: round(sec, 2)
            for role, sec in sorted(seconds_by_role.items(), key=lambda kv: -kv[1])}


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Roles a process keeps once seen in one (a Ray worker is "python" before it names itself,
# and IDLE between tasks).
_JOB_ROLES = ("decode_worker", "embed_actor", "driver")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces and ")"): state
    first, so field N of proc(5) is at index N - 3."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def _cmdline(pid: int) -> str:
    """/proc/PID/cmdline with its NULs as spaces."""
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process so far (utime, stime); None if gone."""
    try:
        fields = _stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _memory_of(pid: int) -> tuple[str, float, float, float | None] | None:
    """A readable role, private resident memory (RssAnon), shared-memory pages (RssShmem)
    and its proportional share of them (Pss_Shmem: None where the kernel does not say), in
    MiB, for one process; None if it is gone.

    VmRSS would count every object-store page a worker ever touched as its own, so a worker
    that passed more data through Ray looks bigger without holding more.
    """
    try:
        with open(f"/proc/{pid}/status") as fh:
            status = dict(line.split(":", 1) for line in fh if ":" in line)
        cmd = _cmdline(pid)
    except OSError:
        return None
    anon = int(status.get("RssAnon", "0 kB").split()[0]) / 1024
    shmem = int(status.get("RssShmem", "0 kB").split()[0]) / 1024
    share = None
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss_Shmem:"):
                share = int(line.split()[1]) / 1024
    return _role(cmd, status.get("Name", "")), anon, shmem, share


def _role(cmd: str, name: str) -> str:
    """A process's role in the job, from its command line (Ray workers rename themselves)."""
    if "decode_batch" in cmd:
        return "decode_worker"
    if "Embedder" in cmd:
        return "embed_actor"
    if "run_job" in cmd:
        return "driver"
    if cmd.startswith("ray::"):
        return cmd.split()[0].replace("ray::", "worker:")[:40]
    return name.strip()[:40]


def _role_of(pid: int) -> str | None:
    """:func:`_role` of a live process, from two small reads; None if it is gone."""
    try:
        cmd = _cmdline(pid)
        with open(f"/proc/{pid}/comm") as fh:
            name = fh.read()
    except OSError:
        return None
    return _role(cmd, name)


# --------------------------------------------------------------------------- report


def run(out_dir: Path, real_dir: Path, quick: bool, precision: str | None = None,
        long_s: float | None = None, batch_size: int | None = None,
        peak: float | None = None, long_copies: int | None = None,
        sections: Collection[str] = SECTIONS, seed: bool = True) -> dict[str, Any]:
    """Every measurement, written to ``out_dir/bench.json`` and printed as a table.

    ``sections`` picks among ``real``, ``long``, ``memory`` and ``decode`` (the start-up is
    always measured); ``seed=False`` leaves the seed loops out of the comparisons, for long
    corpora where they would take most of the time. ``peak``: the device's dense TFLOP/s at
    the precision used, for the share of it reached (default on a GPU: ``GPU_PEAK_TFLOPS``).

    On a GPU machine model only and the seed loop run on the GPU, batches default to 256
    windows, and the long corpus is one copy of the long recording per CPU (a recording is
    decoded by one task, so a single file would measure one core's decoding, not the job).
    """
    import torch

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown benchmark sections {unknown}; choose from {list(SECTIONS)}")
    # Before anything is built or timed: without the shared data, the precision probe's
    # full-size models took a minute and more to end in this error.
    files = _corpus_files(real_dir, quick)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = BenchSettings(options=TINY_BEATS if quick else None, device=device,
                      batch_size=batch_size or (16 if device == "cpu" else 256))
    choice = ({"precision": precision, "s_per_window": {}, "why": "given"} if precision
              else choose_precision(s))
    s = replace(s, precision=choice["precision"])
    log.info("precision %s (%s%s)", s.precision, choice["why"],
             "".join(f", {p} {t:.3f} s/window" for p, t in choice["s_per_window"].items()))
    if device != "cpu":
        peak = peak or peak_tflops(torch.cuda.get_device_name(), s.precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": _machine(device),
        "settings": {**s.__dict__, "options": s.options or "full size"},
        "precision_choice": choice,
        "mode": "quick" if quick else "full",
        "model_flops_per_window": model_flops_per_window(s),
        "peak_tflops": peak,
    }
    with tempfile.TemporaryDirectory(prefix="bench-", dir=out_dir) as tmp:
        work = Path(tmp)
        results["startup"] = _startup(real_dir, s, work)
        # Model only and the pipeline alternate this many times; each side's best run counts.
        repeats = 1 if quick else 2
        flops = results["model_flops_per_window"]
        if "real" in sections:
            corpus = work / "corpus"
            corpus.mkdir()
            for f in files:  # one flat folder of links, named by their path under real_dir
                (corpus / f.relative_to(real_dir).as_posix().replace("/", "__")).symlink_to(f)
            windows, valid, seconds = corpus_windows(files, s)
            log.info("corpus: %d files, %.0f s of audio, %d windows", len(files), seconds,
                     len(windows))
            results["real"] = _compare(corpus, files, windows, valid, seconds, s, work, repeats,
                                       flops, peak, seed,
                                       cpu_every_s=QUICK_CPU_EVERY_S if quick else None)
        # Quick mode's memory runs already embed long recordings end to end.
        if "long" in sections and not quick:
            copies = long_copies or (1 if device == "cpu" else _usable_cpus())
            results["long"] = _compare_long(real_dir, s, work, long_s or DEFAULT_LONG_S, copies,
                                            repeats, flops, peak, seed)
        if "memory" in sections:
            results["memory"] = _memory(real_dir, work, quick)
        if "decode" in sections:
            results["decode"] = decode_speed(real_dir, work, 30.0 if quick else 600.0)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2))
    print(render(results))
    return results


def _corpus_files(real_dir: Path, quick: bool) -> list[Path]:
    """The real corpus's recordings (in quick mode six short ones), after checking that
    ``real_dir`` holds the shared data the benchmark needs."""
    files = list_audio(real_dir)
    if quick:
        files = [f for f in files if "perch/chirp/projects" in str(f)][:6]
    if not files or not (real_dir / LONG_SOURCE).is_file():
        raise ConfigError(f"{real_dir} does not hold the shared recordings (no audio, or no "
                          f"{LONG_SOURCE}): give --real, or EMBED_ARCHIVE_SHARED", "--real")
    return files


def _machine(device: str) -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cpus": _usable_cpus(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if device != "cpu" else None,
            "gpus": torch.cuda.device_count(), "python": platform.python_version()}


def _compare_long(real_dir: Path, s: BenchSettings, work: Path, seconds: float, copies: int,
                  repeats: int, flops_per_window: float, peak: float | None,
                  seed: bool) -> dict[str, Any]:
    """:func:`_compare` on a corpus of ``copies`` links to one long recording of ``seconds``
    built from a real clip."""
    long_file = make_long_recording(work / "long.flac", seconds, real_dir / LONG_SOURCE)
    long_dir = work / "long"
    long_dir.mkdir()
    for i in range(copies):
        (long_dir / f"long-{i:03d}.flac").symlink_to(long_file)
    windows, valid, audio_s = corpus_windows([long_file], s)
    out = _compare(long_dir, [long_file] * copies, np.tile(windows, (copies, 1)),
                   np.tile(valid, copies), audio_s * copies, s, work, repeats,
                   flops_per_window, peak, seed)
    out["copies"] = copies
    return out


def _startup(real_dir: Path, s: BenchSettings, work: Path) -> dict[str, Any]:
    """Fixed cost of a job: the same settings on one 1-second recording, end to end."""
    return pipeline_run(_folder_of(work / "startup", real_dir / STARTUP_SOURCE), s, work,
                        memory=False)


def _folder_of(folder: Path, recording: Path) -> Path:
    """A new input folder holding just ``recording`` (linked, not copied)."""
    folder.mkdir()
    (folder / recording.name).symlink_to(recording)
    return folder


def _compare(input_dir: Path, files: Sequence[Path], windows: np.ndarray, valid: np.ndarray,
             seconds: float, s: BenchSettings, work: Path, repeats: int,
             flops_per_window: float, peak: float | None, seed: bool = True,
             cpu_every_s: float | None = None) -> dict[str, Any]:
    """Model only and pipeline, alternated ``repeats`` times; the best run of each counts;
    then the seed loop at fp32 and at the job's precision, unless ``seed`` is off.
    ``cpu_every_s``: the pipeline's CPU samples (None: :func:`pipeline_run`'s).

    A shared VM's speed drifts by +-15 % from one minute to the next (we saw the same
    batched forward pass at 5.4 and 8.1 windows/s a minute apart, with no steal time
    reported), so single runs minutes apart compare the machine's mood as much as the
    code. Alternating and keeping each side's best treats both alike; every run is kept
    in the JSON.
    """
    models, pipes, shaped = [], [], []
    for _ in range(repeats):
        models.append(model_only(windows, valid, seconds, s))
        if (as_actors := model_only_as_actors(windows, valid, seconds, s)) is not None:
            shaped.append(as_actors)
        pipes.append(pipeline_run(input_dir, s, work, memory=False, cpu_every_s=cpu_every_s))
        require_same_work("the pipeline", pipes[-1]["windows"], pipes[-1]["audio_s"],
                          len(windows), seconds)
    model, pipe = _best_run(models), _best_run(pipes)
    pipe["runs_steady_audio_s_per_s"] = [round(p["steady_audio_s_per_s"], 3) for p in pipes]
    embed = pipe["embed"]
    # embed["model_s"] sums every actor's time in embedding calls.
    actor_forward_audio_s_per_s = (pipe["audio_s"] * max(embed["actors"], 1)
                                   / max(embed["model_s"], 1e-9))
    steady_ratio = pipe["steady_audio_s_per_s"] / model["audio_s_per_s"]
    # What the run spent outside its steady rate (start-up, first-call costs, the tail,
    # shutdown): the run's wall time less the time its audio takes at that rate.
    overhead_s = pipe["wall_s"] - pipe["audio_s"] / pipe["steady_audio_s_per_s"]
    out: dict[str, Any] = {
        "model_only": model, "pipeline": pipe,
        "pipeline_over_model_only": pipe["audio_s_per_s"] / model["audio_s_per_s"],
        # From the job's own clock: first batch start to last batch end of its actors.
        "pipeline_steady_over_model_only": steady_ratio,
        "pipeline_overhead_s": overhead_s,
        "audio_s_for_end_to_end_0_9": audio_for_ratio(0.9, steady_ratio, overhead_s,
                                                      pipe["steady_audio_s_per_s"]),
        # Share of the actors' active time spent in embedding calls (1.0: never starved).
        "model_busy_fraction": embed["busy_fraction"],
        # The actors' forward passes alone (running side by side, so their summed time over
        # the number of actors) vs the same passes in this process: what sharing the cores
        # with Ray, decoding and writing costs the model itself.
        "actor_forward_over_model_only": actor_forward_audio_s_per_s / model["audio_s_per_s"],
    }
    if edges := model_edges(pipe):
        out["model_edges"] = edges
        edges["over_model_only"] = edges["audio_s_per_s"] / model["audio_s_per_s"]
    if shaped:  # the same ratios against model only shaped as the job's actors
        best = out["model_only_as_actors"] = _best_run(shaped)
        out["pipeline_over_model_only_as_actors"] = pipe["audio_s_per_s"] / best["audio_s_per_s"]
        out["pipeline_steady_over_model_only_as_actors"] = (pipe["steady_audio_s_per_s"]
                                                            / best["audio_s_per_s"])
        out["actor_forward_over_model_only_as_actors"] = (actor_forward_audio_s_per_s
                                                          / best["audio_s_per_s"])
        if edges:
            edges["over_model_only_as_actors"] = edges["audio_s_per_s"] / best["audio_s_per_s"]
        # The same length of job against this ceiling: where it is the faster one, the
        # figure above is no promise (0.96 against one process, 0.88 as actors: 2.6 h
        # there, never here).
        out["audio_s_for_end_to_end_0_9_as_actors"] = audio_for_ratio(
            0.9, out["pipeline_steady_over_model_only_as_actors"], overhead_s,
            pipe["steady_audio_s_per_s"])
        if split := steady_cpu_split(pipe, best):
            out["steady_cpu_split"] = split
    if seed:
        fp32 = out["seed_loop_fp32"] = seed_loop(files, s, "fp32")
        require_same_work("the seed loop", fp32["windows"], fp32["audio_s"], len(windows), seconds)
        out["pipeline_over_seed_loop_fp32"] = pipe["audio_s_per_s"] / fp32["audio_s_per_s"]
    if seed and s.precision != "fp32":
        same = seed_loop(files, s, s.precision)
        require_same_work("the seed loop", same["windows"], same["audio_s"], len(windows), seconds)
        out["seed_loop_same_precision"] = same
        out["pipeline_over_seed_loop_same_precision"] = pipe["audio_s_per_s"] / same["audio_s_per_s"]
    # Model FLOP/s: FLOPs per window x windows per audio-second x audio-seconds per second.
    per_audio_s = flops_per_window * len(windows) / seconds / 1e12
    out["tflops"] = {"model_only": per_audio_s * model["audio_s_per_s"],
                     "pipeline_steady": per_audio_s * pipe["steady_audio_s_per_s"],
                     "pipeline": per_audio_s * pipe["audio_s_per_s"]}
    if peak:
        out["fraction_of_peak"] = {k: v / peak for k, v in out["tflops"].items()}
    return out


def _best_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of ``runs`` (audio-s/s), with every run's rate added to it."""
    best = max(runs, key=lambda r: r["audio_s_per_s"])
    best["runs_audio_s_per_s"] = [round(r["audio_s_per_s"], 3) for r in runs]
    return best


# Shorter spans hold too few CPU samples (one every 0.5 s) to split: quick mode's one batch.
MIN_SPLIT_SPAN_S = 5.0


def steady_cpu_split(pipe: Mapping[str, Any], alone: Mapping[str, Any],
                     cores: int | None = None) -> dict[str, Any] | None:
    """The steady ratio against model only as actors, taken apart into where the cores went
    and what the actors made of theirs (CPU only; None without the samples to say).

    ``ratio = actors' share of the cores / the share model only had x the actors' audio
    per CPU-second / model only's``, exactly (the actors' CPU seconds cancel out; the
    shares themselves are as good as the samples, interpolated at the span's edges):
    the first two say what the job's other processes (driver, decoding, writing, Ray) took
    from the models, the last what sharing the cores with them costs each CPU-second the
    models do get (caches, preemptions).
    """
    from pipeline.compute import usable_cpus

    span, cpu = pipe["embed"]["span_s"], pipe.get("steady_cpu_s") or {}
    actors_cpu = cpu.get("embed_actor", 0.0)
    if span < MIN_SPLIT_SPAN_S or not (actors_cpu and alone.get("cpu_s")):
        return None
    cores = cores or usable_cpus()
    others = {role: round(sec / (cores * span), 4) for role, sec in cpu.items()
              if role != "embed_actor" and sec >= 0.01 * cores * span}
    others_cpu = sum(sec for role, sec in cpu.items() if role != "embed_actor")
    return {
        "cores": cores, "span_s": span,
        "actors_share_of_cores": actors_cpu / (cores * span),
        # The job's other processes together, and what none of the job's processes used
        # (idle, or taken by something outside the job: the bench's own sampler included).
        "others_total_share_of_cores": others_cpu / (cores * span),
        "unused_share_of_cores": 1 - (actors_cpu + others_cpu) / (cores * span),
        "model_only_share_of_cores": alone["cpu_s"] / (cores * alone["wall_s"]),
        "actor_audio_s_per_cpu_s_over_model_only": ((pipe["audio_s"] / actors_cpu)
                                                    / (alone["audio_s"] / alone["cpu_s"])),
        "others_share_of_cores": others,  # roles with at least 1 % of the cores
    }


def model_edges(pipe: Mapping[str, Any]) -> dict[str, Any] | None:
    """The steady span's edges: actor-seconds of it in which an actor had not yet started
    its first batch or had finished its last, and the rate without them (each actor's
    first to last batch); None with fewer than two actors, where there are no such edges.

    The span runs from the first actor's first batch to the last actor's last one, so it
    holds up to a batch per actor of one model waiting for the others at both ends (the
    first blocks reach one actor first; the last go to one actor while the other has
    none left). That is a fixed cost per job, like start-up, not the data plane falling
    behind: on a short corpus it is a visible share of the span, on a long one it fades.
    """
    e = pipe["embed"]
    if e["actors"] < 2 or e["span_s"] <= 0 or e["active_s"] <= 0:
        return None
    held = e["actors"] * e["span_s"]
    return {"idle_actor_s": held - e["active_s"], "span_actor_s": held,
            "share_of_span": (held - e["active_s"]) / held,
            "audio_s_per_s": pipe["audio_s"] * e["actors"] / e["active_s"]}


def audio_for_ratio(target: float, steady_ratio: float, overhead_s: float,
                    steady_audio_s_per_s: float) -> float | None:
    """Audio-seconds a job needs before its end-to-end rate reaches ``target`` x model only,
    if it keeps this run's steady rate and pays this run's fixed overhead once; None when
    the steady rate itself is below the target.

    End to end over model only is ``steady_ratio * w / (overhead_s + w)`` for a job whose
    audio takes ``w`` seconds at the steady rate; solved for ``w``.
    """
    if steady_ratio <= target:
        return None
    return steady_audio_s_per_s * target * max(overhead_s, 0.0) / (steady_ratio - target)


def _memory(real_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    """Peak memory of the decode stage alone and of a whole job (tiny BEATs, 1 torch thread
    per actor) on a 1-minute and a long recording (1 hour; 3 minutes in quick mode): flat in
    length means ratios near 1. Full mode adds a 10-minute recording and a tight budget."""
    short = make_long_recording(work / "one_minute.flac", 60.0, real_dir / LONG_SOURCE)
    long_s = 180.0 if quick else 3600.0
    long = make_long_recording(work / "one_hour.flac", long_s, real_dir / LONG_SOURCE)
    tiny = BenchSettings(options=TINY_BEATS)
    out: dict[str, Any] = {"long_recording_s": long_s}
    for label, path, seconds in (("one_minute", short, 60.0), ("long", long, long_s)):
        job = _memory_job(_folder_of(work / f"mem-{label}", path), seconds, label, tiny, work)
        if "decode_worker" not in job["peak_rss_mb"]:
            raise RuntimeError(f"the memory sampler saw no decode worker in the {label} job "
                               f"(every {ProcessTreeSampler.MEMORY_INTERVAL_S} s): its decoding "
                               "took less than a sample")
        out[label] = {"decode_worker": _decode_rss_whole(path, seconds, label, tiny),
                      "job_peak_rss_mb": job["peak_rss_mb"],
                      "job_wall_s": job["wall_s"], "job_windows": job["windows"]}
    out["decode_rss_ratio"] = (out["long"]["decode_worker"]["peak_rss_mb"]
                               / out["one_minute"]["decode_worker"]["peak_rss_mb"])
    out["job_rss_ratio"] = (out["long"]["job_peak_rss_mb"]["all_processes"]
                            / out["one_minute"]["job_peak_rss_mb"]["all_processes"])
    out["job_decode_worker_ratio"] = (out["long"]["job_peak_rss_mb"]["decode_worker"]
                                      / out["one_minute"]["job_peak_rss_mb"]["decode_worker"])
    if not quick:
        # Growth with length, from a point where the job has reached its working set: a
        # 1-minute recording's 23 windows never fill two blocks in a decode task nor give
        # both actors a full batch, and never fill the object store up to the in-flight
        # budget (reached near 30 minutes with this model).
        ten = make_long_recording(work / "ten_minutes.flac", 600.0, real_dir / LONG_SOURCE)
        ten_peaks = _memory_job(_folder_of(work / "mem-ten", ten), 600.0, "ten_minutes", tiny,
                                work)["peak_rss_mb"]
        out["ten_minutes"] = {"decode_worker": _decode_rss_whole(ten, 600.0, "ten_minutes", tiny),
                              "job_peak_rss_mb": ten_peaks}
        out["decode_rss_plateau_ratio"] = (out["long"]["decode_worker"]["peak_rss_mb"]
                                           / out["ten_minutes"]["decode_worker"]["peak_rss_mb"])
        out["job_decode_worker_plateau_ratio"] = (
            out["long"]["job_peak_rss_mb"]["decode_worker"] / ten_peaks["decode_worker"])
        out["job_rss_plateau_ratio"] = (out["long"]["job_peak_rss_mb"]["all_processes"]
                                        / ten_peaks["all_processes"])
        # What the object-store budget buys: the same two jobs (on the input folders made
        # above) with a tight budget (TIGHT_INFLIGHT_MB, 32 MB output files) instead of the
        # default.
        tight = {"compute": {"torch_threads": 1, "inflight_mb": TIGHT_INFLIGHT_MB},
                 "output": {"file_mb": 32}}
        peaks = {label: _memory_job(work / f"mem-{label}", seconds, f"tight-budget {label}",
                                    tiny, work, **tight)["peak_rss_mb"]
                 for label, seconds in (("one_minute", 60.0), ("long", long_s))}
        out["tight_budget"] = {"settings": tight, **peaks,
                               "job_rss_ratio": (peaks["long"]["all_processes"]
                                                 / peaks["one_minute"]["all_processes"])}
    return out


def _memory_job(folder: Path, seconds: float, label: str, s: BenchSettings, work: Path,
                **extra: Any) -> dict[str, Any]:
    """:func:`pipeline_run` with memory sampled and 1 torch thread per actor, on ``folder``'s
    one recording of ``seconds``, checked to have embedded all of it."""
    compute = {"torch_threads": 1, **extra.pop("compute", {})}
    job = pipeline_run(folder, s, work, compute=compute, **extra)
    require_same_work(f"the memory section's {label} job", job["windows"], job["audio_s"],
                      planned_windows(seconds, s), seconds)
    return job


def _decode_rss_whole(path: Path, seconds: float, label: str, s: BenchSettings) -> dict[str, Any]:
    """:func:`decode_rss`, checked to have cut every window of the recording's ``seconds``."""
    measured = decode_rss(path, s)
    require_same_work(f"the memory section's {label} decode stage", measured["rows"], None,
                      planned_windows(seconds, s), seconds)
    return measured


def _gpu_busy_text(measured: Mapping[str, Any]) -> str:
    busy = measured.get("gpu_busy")
    if busy is None:
        return f"n/a ({sum(measured.get('gpu_busy_samples', {}).values())} samples: too short)"
    return f"{busy:.3f}"


def render(r: dict[str, Any]) -> str:
    """The results as the table printed on stdout."""
    peak = r.get("peak_tflops")
    choice = r.get("precision_choice") or {"why": "given", "s_per_window": {}}
    cosines = choice.get("cosine_to_fp32", {})
    timings = ", ".join(f"{p} {t:.3f}" + (f" (cosine to fp32 {cosines[p]:.5f})"
                                         if p in cosines and p != "fp32" else "")
                        for p, t in choice["s_per_window"].items())
    lines = [f"machine: {r['machine']}", f"settings: {r['settings']}",
             f"precision: {r['settings']['precision']} ({choice['why']}"
             + (f"; s per window: {timings})" if timings else ")"),
             f"fixed start-up of a job (1 s recording, end to end): {r['startup']['wall_s']:.1f} s",
             f"model FLOPs per window: {r['model_flops_per_window'] / 1e9:.2f} G; device peak: "
             + (f"{peak:g} TFLOP/s" if peak else "unknown (--peak-tflops)"), ""]
    for corpus in ("real", "long"):
        if corpus in r:
            lines.extend(_render_corpus(corpus, r[corpus], r))
    if "memory" in r:
        lines.extend(["", *_render_memory(r["memory"])])
    if "decode" in r:
        lines.extend(["", "[decode] audio-s per CPU-s, incl. resampling 48 -> 16 kHz"])
        for fmt, d in r["decode"].items():
            lines.append(f"  {fmt:<5} {d['audio_s_per_cpu_s']:>9.0f}")
    return "\n".join(lines)


def _render_corpus(corpus: str, c: Mapping[str, Any], r: Mapping[str, Any]) -> list[str]:
    """The table's rows for one corpus's comparison (``r``: the whole results)."""
    gpu = r["settings"]["device"] != "cpu"
    lines = [f"[{corpus}] {c['model_only']['audio_s']:.0f} s of audio, "
             f"{c['model_only']['windows']} windows"
             + (f" ({c['copies']} copies of one recording)" if c.get("copies", 1) > 1 else "")]
    for name in ("model_only", "model_only_as_actors", "pipeline", "seed_loop_fp32",
                 "seed_loop_same_precision"):
        if name in c:
            m = c[name]
            runs = m.get("runs_audio_s_per_s", [])
            # On a GPU model only passes over the corpus until MIN_GPU_SPAN_S have gone by:
            # its wall is theirs, not one pass's (the corpus's seconds over it are no rate).
            passes = m.get("passes", 1)
            lines.append(f"  {name:<25} {m['audio_s_per_s']:>8.2f} audio-s/s   wall {m['wall_s']:.1f} s"
                         + (f" for {passes} passes over the corpus" if passes > 1 else "")
                         + (f"   best of {runs}" if len(runs) > 1 else "")
                         + (f"   ({m['actors']} processes x {m['torch_threads']} threads)"
                            if "actors" in m else ""))
    e = c["pipeline"]["embed"]
    lines.append(f"  pipeline while its model ran  {c['pipeline']['steady_audio_s_per_s']:>8.2f} "
                 f"audio-s/s   first batch after {e['first_batch_s']:.1f} s")
    lines.append(f"  pipeline / model only                 {c['pipeline_over_model_only']:.3f}"
                 f"   (while the model ran {c['pipeline_steady_over_model_only']:.3f}; "
                 "target >= 0.9)")
    if "model_only_as_actors" in c:
        lines.append(f"  pipeline / model only as actors       "
                     f"{c['pipeline_over_model_only_as_actors']:.3f}   (while the model ran "
                     f"{c['pipeline_steady_over_model_only_as_actors']:.3f}; the lower of "
                     "the two ratios is the one to judge by)")
    if edges := c.get("model_edges"):
        against = edges.get("over_model_only_as_actors", edges["over_model_only"])
        lines.append(f"  the span's edges (an actor before its first or after its last batch) "
                     f"{edges['idle_actor_s']:.1f} of {edges['span_actor_s']:.1f} actor-s; "
                     f"without them {against:.3f} x model only"
                     + (" as actors" if "over_model_only_as_actors" in edges else ""))
    lines.append(f"  pipeline overhead (start-up, tail)    {c['pipeline_overhead_s']:.1f} s; "
                 + _reach_text(c.get("audio_s_for_end_to_end_0_9"), "model only"))
    if "model_only_as_actors" in c:
        lines.append("  " + " " * 38 + _reach_text(c.get("audio_s_for_end_to_end_0_9_as_actors"),
                                                   "model only as actors"))
    lines.append(f"  model busy (share of active time)     {c['model_busy_fraction']:.3f}")
    if cpu := c["pipeline"].get("cpu_s"):
        top = ", ".join(f"{role} {sec:.0f}" for role, sec in list(cpu.items())[:6])
        lines.append(f"  CPU seconds of the pipeline by role   {top} (of "
                     f"{c['pipeline']['wall_s'] * _cores_usable(r['machine']):.0f} the "
                     f"cores had; the bench's sampling "
                     f"{c['pipeline'].get('sampling_cpu_s', 0):.1f})")
    if split := c.get("steady_cpu_split"):
        others = ", ".join(f"{role} {share:.3f}"
                           for role, share in split["others_share_of_cores"].items())
        lines.append(f"  while the models ran, actors' share of the cores "
                     f"{split['actors_share_of_cores']:.3f} (model only "
                     f"{split['model_only_share_of_cores']:.3f}); the job's other "
                     f"processes {split['others_total_share_of_cores']:.3f} ({others or 'none'}"
                     f" >= 0.01); unused {split['unused_share_of_cores']:.3f}")
        lines.append(f"  actors' audio-s per CPU-s / model only's   "
                     f"{split['actor_audio_s_per_cpu_s_over_model_only']:.3f}   (the two "
                     "shares' ratio x this = the ratio as actors, while the model ran)")
    lines.append(f"  actor forward / model-only forward    {c['actor_forward_over_model_only']:.3f}"
                 + (f"   (as actors: {c['actor_forward_over_model_only_as_actors']:.3f})"
                    if "actor_forward_over_model_only_as_actors" in c else ""))
    if "pipeline_over_seed_loop_fp32" in c:
        label = f"pipeline ({r['settings']['precision']}) / seed loop (fp32)"
        lines.append(f"  {label:<38}{c['pipeline_over_seed_loop_fp32']:.3f}   "
                     f"(target >= {50 if gpu else 1.5})")
    if "pipeline_over_seed_loop_same_precision" in c:
        label = f"pipeline / seed loop (both {r['settings']['precision']})"
        lines.append(f"  {label:<38}{c['pipeline_over_seed_loop_same_precision']:.3f}")
    t = c["tflops"]
    line = (f"  model TFLOP/s: model only {t['model_only']:.3g}, pipeline while its model "
            f"ran {t['pipeline_steady']:.3g}, end to end {t['pipeline']:.3g}")
    if share := c.get("fraction_of_peak"):
        line += (f"; share of peak {share['model_only']:.3f} / "
                 f"{share['pipeline_steady']:.3f} / {share['pipeline']:.3f}")
        line += "  (target >= 0.4)" if gpu else ""
    lines.append(line)
    if "gpu_busy" in c["pipeline"]:
        lines.append(f"  GPU busy (nvidia-smi, steady part)    {_gpu_busy_text(c['pipeline'])}"
                     f"   (target >= 0.9; model only {_gpu_busy_text(c['model_only'])})")
    return lines


def _cores_usable(machine: Mapping[str, Any]) -> int:
    """The CPUs the job could use (results before ``usable_cpus`` was kept: every core)."""
    return machine.get("usable_cpus") or machine["cores"] or 1


def _reach_text(need: float | None, ceiling: str) -> str:
    """Where end to end reaches 0.9 x ``ceiling`` (:func:`audio_for_ratio`'s ``need``)."""
    if need is None:
        return f"the steady rate is below 0.9 x {ceiling}: end to end never reaches it"
    return f"end to end reaches 0.9 x {ceiling} from ~{need / 3600:.2f} audio-h"


def _render_memory(m: dict[str, Any]) -> list[str]:
    lines = []
    one, long = m["one_minute"], m["long"]
    minutes = m["long_recording_s"] / 60
    lines.append(f"[memory] 1-minute vs {minutes:.0f}-minute recording (tiny model), peak MiB")
    lines.append(f"  decode stage alone (VmHWM)        {one['decode_worker']['peak_rss_mb']:7.0f} "
                 f"{long['decode_worker']['peak_rss_mb']:7.0f}   ratio {m['decode_rss_ratio']:.3f}"
                 "  (target <= 1.2)")
    lines.append(f"  decode worker in the job (private) {one['job_peak_rss_mb']['decode_worker']:6.0f} "
                 f"{long['job_peak_rss_mb']['decode_worker']:7.0f}   ratio "
                 f"{m['job_decode_worker_ratio']:.3f}")
    lines.append(f"  whole job (private + object store) {one['job_peak_rss_mb']['all_processes']:6.0f} "
                 f"{long['job_peak_rss_mb']['all_processes']:7.0f}   ratio {m['job_rss_ratio']:.3f}"
                 "  (target <= 1.2)")
    if "ten_minutes" in m:
        ten = m["ten_minutes"]
        for what, a, b, ratio in (
                ("decode stage alone", ten["decode_worker"]["peak_rss_mb"],
                 long["decode_worker"]["peak_rss_mb"], m["decode_rss_plateau_ratio"]),
                ("decode worker in job", ten["job_peak_rss_mb"]["decode_worker"],
                 long["job_peak_rss_mb"]["decode_worker"], m["job_decode_worker_plateau_ratio"]),
                ("whole job", ten["job_peak_rss_mb"]["all_processes"],
                 long["job_peak_rss_mb"]["all_processes"], m["job_rss_plateau_ratio"])):
            label = f"10 vs {minutes:.0f} min: {what}"
            lines.append(f"  {label:<34}{a:7.0f} {b:7.0f}   ratio {ratio:.3f}")
    if "tight_budget" in m:
        t = m["tight_budget"]
        lines.append(f"  whole job, inflight_mb={TIGHT_INFLIGHT_MB:<3}        "
                     f"{t['one_minute']['all_processes']:6.0f} {t['long']['all_processes']:7.0f}"
                     f"   ratio {t['job_rss_ratio']:.3f}")
        lines.append(f"  object store pages (default / tight) "
                     f"{one['job_peak_rss_mb']['object_store_pages']:.0f} -> "
                     f"{long['job_peak_rss_mb']['object_store_pages']:.0f} / "
                     f"{t['one_minute']['object_store_pages']:.0f} -> "
                     f"{t['long']['object_store_pages']:.0f}")
    return lines


def add_bench_command(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure pipeline vs model-only vs seed loop, memory, decode")
    p.add_argument("--out", default="bench_results", help="directory for bench.json")
    p.add_argument("--real", default=str(DEFAULT_REAL), help="folder of real recordings")
    p.add_argument("--quick", action="store_true", help="tiny model, few files (for tests)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8"), default=None,
                   help="pipeline and model-only precision (default: bf16 on a GPU that has it; "
                        "on a CPU the fastest of fp32, bf16 and int8 on four windows)")
    p.add_argument("--long-s", type=float, default=None,
                   help="length of the synthetic long recording (full mode; default 1800)")
    p.add_argument("--long-copies", type=int, default=None,
                   help="copies of it in the long corpus (default: 1 on CPU, one per CPU on GPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (default: 16 on CPU, 256 on GPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak for the precision used, to report the share "
                        "of it reached (default: a table of NVIDIA GPUs; none on CPU)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of %(default)s to measure (the fixed start-up "
                        "is always measured)")
    p.add_argument("--no-seed-loop", dest="seed", action="store_false",
                   help="leave the seed loops out (for long corpora, where they take longest)")
    p.set_defaults(func=lambda a: run(Path(a.out), Path(a.real), a.quick, precision=a.precision,
                                      long_s=a.long_s, batch_size=a.batch_size,
                                      peak=a.peak_tflops, long_copies=a.long_copies,
                                      sections=_sections(a.sections), seed=a.seed) and 0)


def _sections(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"embed-archive bench: unknown --sections {unknown}; "
                         f"choose from {','.join(SECTIONS)}")
    return chosen


__all__ = ["BenchSettings", "add_bench_command", "run"]
