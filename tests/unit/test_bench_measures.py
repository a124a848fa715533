"""The benchmark's FLOP count, GPU peak table and GPU busy sampler (no Ray, no GPU needed).

``nvidia-smi`` cannot run here, so the sampler is fed by a stand-in script on PATH that
prints what ``nvidia-smi --query-gpu=timestamp,index,utilization.gpu -lms`` prints.
"""

from __future__ import annotations

import datetime
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import bench
from pipeline.bench import (
    TINY_BEATS,
    BenchSettings,
    GpuBusySampler,
    ProcessTreeSampler,
    _sections,
    audio_for_ratio,
    choose_precision,
    gpu_busy,
    model_flops_per_window,
    peak_tflops,
)
from pipeline.models import create_backbone


def test_flop_count_covers_every_linear_layer_of_the_encoder() -> None:
    s = BenchSettings(options=TINY_BEATS)
    flops = model_flops_per_window(s)
    backbone = create_backbone("beats", weights="random", options=TINY_BEATS)
    layer = len(backbone.info.layers) - 1
    with torch.inference_mode():
        tokens = backbone.extract(torch.zeros(1, 80_000), None, [layer])[layer].tokens.shape[1]
    linear = sum(m.weight.numel() for m in backbone.module.modules()
                 if isinstance(m, torch.nn.Linear))
    # Each token goes through every linear layer once (2 FLOPs per weight); attention, the
    # patch convolution and the mel projection come on top (most of it in this tiny model;
    # 10 % in full-size BEATs, 47.1 GFLOP per 5 s window).
    assert flops > 2 * tokens * linear
    # Attention (QK^T and AV, 2 * 2 * N^2 * D per block) and the positional convolution
    # (2 FLOPs per weight and token) count as defined, though at inference on a CPU the first
    # runs as a fused kernel the counter misses and the second by FFT (a small matmul).
    with torch.inference_mode(), FlopCounterMode(display=False) as inference:
        backbone.extract(torch.zeros(1, 80_000), None, [layer])
    encoder = backbone.module.backbone.encoder
    attention = len(encoder.layers) * 4 * tokens**2 * TINY_BEATS["encoder_embed_dim"]
    convolution = 2 * tokens * encoder.pos_conv[0].weight.numel()
    assert flops - inference.get_total_flops() > 0.95 * (attention + convolution)


def test_audio_for_ratio_is_where_end_to_end_reaches_the_target() -> None:
    # Steady at 0.95 x model only (20 audio-s/s), 20 s of overhead paid once.
    need = audio_for_ratio(0.9, 0.95, 20.0, 20.0)
    assert need is not None
    steady_wall = need / 20.0
    assert 0.95 * steady_wall / (20.0 + steady_wall) == pytest.approx(0.9)
    assert audio_for_ratio(0.9, 0.95, 0.0, 20.0) == 0.0
    assert audio_for_ratio(0.9, 0.9, 20.0, 20.0) is None  # never, however long the job
    assert audio_for_ratio(0.9, 0.85, 20.0, 20.0) is None


def test_bench_sections_are_checked() -> None:
    assert _sections("long, decode") == ("long", "decode")
    with pytest.raises(SystemExit, match="unknown --sections"):
        _sections("long,gpu")


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),   # the PCIe card: the H100 NVL's peak, not the SXM's
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0),
    ("Tesla T4", None),
    ("NVIDIA L40", None),         # not an L4 (the table matched it as one)
    ("NVIDIA RTX A1000", None),   # not an A100
])
def test_peak_table_matches_torch_device_names(name: str, tflops: float | None) -> None:
    assert peak_tflops(name) == tflops
    assert peak_tflops(name, "fp16") == tflops
    assert peak_tflops(name, "fp32") is None  # the table is tensor-core bf16/fp16 only


def fake_nvidia_smi(folder: Path, output: str) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{output}'\nexec sleep 30\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_gpu_busy_over_the_jobs_span_or_between_the_first_and_last_kernel() -> None:
    # GPU 0: idle, warm-up, idle while the first windows are decoded, then the job's batches
    # (t = 10..13), then idle at shutdown; GPU 1 never ran a kernel.
    samples = [(0.0, 0, 0.0), (1.0, 0, 100.0), (2.0, 0, 0.0), (10.0, 0, 80.0),
               (11.0, 0, 100.0), (12.0, 0, 90.0), (13.0, 0, 90.0), (14.0, 0, 0.0)]
    samples += [(float(t), 1, 0.0) for t in range(15)]
    over_span = gpu_busy(samples, span=(10.0, 13.0), min_samples=4)
    assert over_span == {"gpu_busy": pytest.approx(0.9), "gpu_busy_per_gpu": {0: pytest.approx(0.9)},
                         "gpu_busy_samples": {0: 4}}
    # Without the job's span, the warm-up and the gap after it count.
    assert gpu_busy(samples, min_samples=4)["gpu_busy"] == pytest.approx(
        (100 + 0 + 80 + 100 + 90 + 90) / 6 / 100)
    assert gpu_busy([(0.0, 0, 0.0)])["gpu_busy"] == 0.0
    # Four samples (0.4 s of nvidia-smi) say nothing about a span: no figure, not a wrong one.
    assert gpu_busy(samples, span=(10.0, 13.0))["gpu_busy"] is None


def test_gpu_sampler_reads_what_nvidia_smi_prints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    printed = "".join(f"2026/11/25 05:30:{12 + k // 2:02d}.{k * 50:03d}, {gpu}\\n"
                      for k, gpu in enumerate(["0, 0", "1, 0", "0, 40", "1, 0", "0, 100",
                                               "1, [N/A]", "0, 0", "1, 0"]))
    fake_nvidia_smi(tmp_path, "a warning line\\n" + printed)
    monkeypatch.setenv("PATH", f"{tmp_path}:{Path('/usr/bin')}:{Path('/bin')}")
    with GpuBusySampler("cuda") as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [(i, u) for _, i, u in sampler.samples] == [
        (0, 0.0), (1, 0.0), (0, 40.0), (1, 0.0), (0, 100.0), (0, 0.0), (1, 0.0)]
    # Each at the time nvidia-smi took it, not when its line was read (all at once here).
    start = datetime.datetime(2026, 11, 25, 5, 30, 12).timestamp()
    assert [round(t - start, 3) for t, _, _ in sampler.samples] == [
        0.0, 0.05, 1.1, 1.15, 2.2, 3.3, 3.35]
    assert gpu_busy(sampler.samples, min_samples=2) == {
        "gpu_busy": pytest.approx(0.7), "gpu_busy_per_gpu": {0: pytest.approx(0.7)},
        "gpu_busy_samples": {0: 2}}
    assert sampler.result()["gpu_busy"] is None  # two samples: too few to tell
    assert sampler._proc is not None and sampler._proc.poll() is not None  # stopped


def test_gpu_sampler_is_off_on_cpu_and_without_nvidia_smi(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with GpuBusySampler("cpu") as sampler:
        pass
    assert sampler.result() == {}
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi here
    with GpuBusySampler("cuda") as sampler:
        pass
    assert sampler.result() == {}


def test_on_a_gpu_machine_the_pipeline_gets_the_one_gpu_model_only_uses(tmp_path) -> None:
    from pipeline.config import JobConfig

    gpu = JobConfig.from_dict(BenchSettings(device="cuda").job(str(tmp_path), str(tmp_path / "o")))
    assert (gpu.compute.embed_actors, gpu.compute.gpus_per_actor) == (1, 1)
    cpu = JobConfig.from_dict(BenchSettings().job(str(tmp_path), str(tmp_path / "o")))
    assert cpu.compute.embed_actors is None  # the job's own plan


@pytest.mark.parametrize("bf16_flag", [False, True])
def test_precision_on_a_cpu_is_the_fastest_one_measured(monkeypatch, bf16_flag: bool) -> None:
    """The flag alone is not trusted (bf16 ran 1.6x slower than fp32 on an Intel Xeon);
    bf16 is tried where the flags claim it, int8 always, and each says how far it strays."""
    monkeypatch.setattr(bench, "cpu_claims_bf16", lambda: bf16_flag)
    choice = choose_precision(BenchSettings(options=TINY_BEATS, threads=1))
    timings = choice["s_per_window"]
    assert set(timings) == ({"fp32", "bf16", "int8"} if bf16_flag else {"fp32", "int8"})
    assert all(t > 0 for t in timings.values())
    cosines = choice["cosine_to_fp32"]
    assert set(cosines) == set(timings) and cosines["fp32"] == pytest.approx(1.0)
    assert all(0.99 < c <= 1.0 + 1e-6 for c in cosines.values()) and cosines["int8"] < 0.999999
    assert choice["precision"] == min(timings, key=timings.__getitem__)


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), "fp32"), ((8, 0), "bf16")])
def test_precision_on_a_gpu_is_bf16_only_where_the_backbone_runs_it(
        monkeypatch, capability: tuple[int, int], expected: str) -> None:
    """On a T4 (7.5) torch.cuda.is_bf16_supported() says True (bf16 emulated), but the job's
    backbones refuse bf16 below compute capability 8.0: the benchmark died there. No GPU
    here, so torch's answers for one are stood in for (the only fake: two queries)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    choice = choose_precision(BenchSettings(device="cuda"))
    assert choice["precision"] == expected
    from pipeline.models import resolve_precision
    assert resolve_precision(choice["precision"], "cuda") == expected  # the backbone takes it


def test_a_precision_the_model_cannot_run_is_not_tried(monkeypatch) -> None:
    """EfficientNet has no Linear layer for int8: the choice goes on without it."""
    monkeypatch.setattr(bench, "cpu_claims_bf16", lambda: False)
    choice = choose_precision(BenchSettings(model="efficientnet_b0", threads=1))
    assert set(choice["s_per_window"]) == {"fp32"} and choice["precision"] == "fp32"
    assert "no Linear layers" in choice["not_tried"]["int8"]


SHARED_HALVES = """
import os, time
from multiprocessing import shared_memory
shm = shared_memory.SharedMemory(create=True, size=64 << 20)
for half in (0, 1):
    if os.fork() == 0:
        for i in range(half * (32 << 20), (half + 1) * (32 << 20), 4096):
            shm.buf[i] = 1
        time.sleep(2.5)
        os._exit(0)
time.sleep(3.0)
shm.close()
shm.unlink()
"""


def test_the_job_memory_counts_each_shared_page_once_however_it_is_spread() -> None:
    """Two workers each touching half of one 64 MiB shared arena (as decode workers and
    actors touch different object-store pages): the largest single mapping said 32 MiB;
    the processes' proportional shares add up to the 64 held."""
    import subprocess
    import sys

    with ProcessTreeSampler() as sampler:
        proc = subprocess.Popen([sys.executable, "-c", SHARED_HALVES])
        sampler.watch(proc.pid)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert 60 <= sampler.peaks["object_store_pages"] <= 66


BURN_THEN_SLEEP = """
import time
print(time.time(), flush=True)
end = time.process_time() + 1.0
while time.process_time() < end:
    pass
print(time.time(), flush=True)
time.sleep(1.5)
"""


@pytest.mark.parametrize("memory", [True, False])
def test_cpu_seconds_between_two_moments_count_only_what_ran_between_them(memory: bool) -> None:
    """A process that burns one CPU-second, then sleeps: the burn's span holds about that
    second, the sleep's next to nothing (samples every ~0.25 s, so the edges blur); with
    or without memory sampling."""
    import subprocess
    import sys

    with ProcessTreeSampler(interval_s=0.05, memory=memory) as sampler:
        proc = subprocess.Popen([sys.executable, "-c", BURN_THEN_SLEEP], stdout=subprocess.PIPE,
                                text=True)
        sampler.watch(proc.pid)
        out, _ = proc.communicate(timeout=30)
    burn_start, burn_end = map(float, out.split())
    burning = sum(sampler.cpu_s_between(burn_start, burn_end).values())
    sleeping = sum(sampler.cpu_s_between(burn_end + 0.3, burn_end + 1.3).values())
    assert 0.6 <= burning <= 1.4, burning
    assert sleeping <= 0.15, sleeping
    assert sampler.cpu_s_between(burn_end + 60, burn_end + 61) == {}  # no sample then
    assert bool(sampler.peaks_mb()) is memory


def test_the_steady_ratio_splits_into_the_actors_share_and_their_work_per_cpu_second() -> None:
    """Made-up runs: 2 cores; model only as actors did 100 audio-s in 10 s on 19 CPU-s; the
    job did them in a 16-s span, its actors on 24 of the 32 CPU-s, the driver on 4."""
    pipe = {"audio_s": 100.0, "steady_audio_s_per_s": 100.0 / 16,
            "embed": {"span_s": 16.0},
            "steady_cpu_s": {"embed_actor": 24.0, "driver": 4.0, "worker:_StatsActor": 0.2}}
    alone = {"audio_s": 100.0, "wall_s": 10.0, "cpu_s": 19.0, "audio_s_per_s": 10.0}
    split = bench.steady_cpu_split(pipe, alone, cores=2)
    assert split["actors_share_of_cores"] == pytest.approx(24 / 32)
    assert split["model_only_share_of_cores"] == pytest.approx(19 / 20)
    assert split["actor_audio_s_per_cpu_s_over_model_only"] == pytest.approx((100 / 24) / (100 / 19))
    assert split["others_share_of_cores"] == {"driver": 0.125}  # under 1 % left out
    assert split["others_total_share_of_cores"] == pytest.approx(4.2 / 32)
    assert split["unused_share_of_cores"] == pytest.approx(1 - 28.2 / 32)
    ratio = pipe["steady_audio_s_per_s"] / alone["audio_s_per_s"]
    assert ratio == pytest.approx(split["actors_share_of_cores"] / split["model_only_share_of_cores"]
                                  * split["actor_audio_s_per_cpu_s_over_model_only"])
    assert bench.steady_cpu_split({**pipe, "steady_cpu_s": {}}, alone, cores=2) is None


def test_the_span_edges_are_the_actor_seconds_outside_each_actors_first_to_last_batch() -> None:
    """Made-up run: two actors over a 20-s span, one from 0 to 20 s, the other from 1 to
    18.5 s (it got its first block later and had none left at the end): 2.5 of the span's
    40 actor-seconds idle at its edges; 100 audio-s over a mean of 18.75 s per actor."""
    pipe = {"audio_s": 100.0, "embed": {"actors": 2, "span_s": 20.0, "active_s": 20.0 + 17.5}}
    edges = bench.model_edges(pipe)
    assert edges["idle_actor_s"] == pytest.approx(2.5)
    assert edges["span_actor_s"] == pytest.approx(40.0)
    assert edges["share_of_span"] == pytest.approx(2.5 / 40)
    assert edges["audio_s_per_s"] == pytest.approx(100.0 / 18.75)
    # One actor has no edges to leave out; a run that embedded nothing has no span.
    assert bench.model_edges({**pipe, "embed": {"actors": 1, "span_s": 20.0, "active_s": 20.0}}) is None
    assert bench.model_edges({**pipe, "embed": {"actors": 2, "span_s": 0.0, "active_s": 0.0}}) is None


def test_cpu_seconds_between_two_moments_are_interpolated_at_both_edges() -> None:
    """Cut at the samples inside the span, a 24-s span sampled every 0.5 s lost up to 2 %
    of the actors' CPU: as much as the shares it was meant to tell apart."""
    sampler = ProcessTreeSampler()
    sampler._series = [(10.0, {"embed_actor": 0.0}), (11.0, {"embed_actor": 1.0}),
                       (12.0, {"embed_actor": 3.0, "driver": 0.5})]
    got = sampler.cpu_s_between(10.5, 11.5)
    assert got["embed_actor"] == pytest.approx((1.0 + 0.5 * 2.0) - 0.5)
    assert got["driver"] == pytest.approx(0.25)  # first seen at 12: none before
    assert sampler.cpu_s_between(9.0, 9.5) == {}


def test_model_only_and_the_seed_loop_take_the_cpus_the_job_plans_with(monkeypatch) -> None:
    """Under a container's CPU quota ``os.cpu_count()`` counts the host's CPUs: model only
    and the seed loop ran that many threads on the few CPUs the job was planned for."""
    from pipeline import compute

    monkeypatch.setattr(compute, "usable_cpus", lambda: 1)  # a one-CPU quota on this host
    assert BenchSettings().threads == 1
    assert bench.local_actor_plan() == (1, 1)  # the job's own plan, from the same count


# Ctrl-C made KeyboardInterrupt, as in a terminal: a process started in the background by a
# shell without job control (CI's, `cmd &`) begins with SIGINT ignored.
STOPPED_BENCH = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from pipeline.bench import _in_own_session
with _in_own_session([sys.executable, "-c", sys.argv[1], sys.argv[2]]) as proc:
    proc.communicate()
"""
JOB_WITH_A_CHILD = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: only its parent's wait is missing)."""
    try:
        return bench._stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def test_an_interrupted_benchmark_stops_the_job_and_the_processes_it_started(tmp_path) -> None:
    """The job runs in a session of its own, which a Ctrl-C in the terminal does not reach:
    it and its local Ray went on after the benchmark had stopped."""
    import os
    import signal
    import subprocess
    import sys

    pids = tmp_path / "pids"
    stopped = subprocess.Popen([sys.executable, "-c", STOPPED_BENCH, JOB_WITH_A_CHILD, str(pids)])
    deadline = time.monotonic() + 60
    while not pids.exists() and stopped.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids.exists(), f"the job did not start (exit {stopped.poll()})"
    job, child = map(int, pids.read_text().split())
    try:
        stopped.send_signal(signal.SIGINT)  # a Ctrl-C reaches the benchmark's session only
        assert stopped.wait(timeout=60) != 0
        assert not _running(job) and not _running(child)
    finally:  # what this test started ends with it, whatever the code under test did
        for pid in (job, child):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_without_the_shared_data_the_benchmark_stops_before_it_builds_or_writes(tmp_path) -> None:
    """The error came after the precision probe had built and timed the model three times
    (a minute and more with full-size BEATs), and after the output folder was made."""
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="does not hold the shared recordings"):
        bench.run(tmp_path / "out", tmp_path / "no-shared-data", quick=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seconds", [0.02, 0.03, 4.9, 5.0, 60.0, 61.01, 180.0])
def test_planned_windows_count_what_the_bench_cuts(seconds: float) -> None:
    s = BenchSettings(threads=1)
    audio = np.zeros(round(seconds * s.sample_rate_hz), np.float32)
    assert bench.planned_windows(seconds, s) == len(list(bench.cut_windows(audio, s)))


def test_a_side_that_embedded_other_work_stops_the_comparison() -> None:
    """The job exits 3 when recordings fail, and the benchmark took its figures all the same:
    a side's rate or memory was of other work than what it was compared with."""
    bench.require_same_work("the pipeline", 330, 946.2, 330, 945.97)  # decoders' last frames
    bench.require_same_work("the decode stage", 71, None, 71, 180.0)
    with pytest.raises(RuntimeError, match="the pipeline embedded 329 windows of 944.0 s of "
                                           "audio, not the 330 windows of 946.0 s"):
        bench.require_same_work("the pipeline", 329, 944.0, 330, 946.0)
    with pytest.raises(RuntimeError, match="the seed loop embedded 330 windows of 940.0 s"):
        bench.require_same_work("the seed loop", 330, 940.0, 330, 946.0)


def test_the_memory_section_stops_on_a_long_recording_decoded_in_part(tmp_path: Path) -> None:
    """A 3-minute recording of which only the first minute decodes (cut short): the decode
    stage's peak memory was taken as the 3-minute figure, a flat ratio of a third of the
    work, with no word."""
    clip = tmp_path / "clip.wav"
    sf.write(clip, np.random.default_rng(0).standard_normal(32_000).astype(np.float32) * 0.1,
             32_000)
    whole = bench.make_long_recording(tmp_path / "long.flac", 180.0, clip)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    tiny = BenchSettings(options=TINY_BEATS, threads=1)
    assert bench._decode_rss_whole(whole, 180.0, "long", tiny)["rows"] == 71
    assert bench.decode_rss(cut, tiny)["rows"] < 71  # what was measured, silently
    with pytest.raises(RuntimeError, match="long decode stage embedded .* not the 71 windows"):
        bench._decode_rss_whole(cut, 180.0, "long", tiny)
