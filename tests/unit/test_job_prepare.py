"""What ``EmbeddingJob.prepare()`` refuses before any Ray work starts, and the compute plan."""

from __future__ import annotations

import errno
import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from pipeline.config import JobConfig
from pipeline.errors import CheckpointMismatchError, ConfigError, NamespaceBusyError
from pipeline.job import EmbeddingJob
from pipeline.sink import errors_schema, rows_to_table


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    sf.write(root / "a.wav", np.zeros(16_000, np.float32), 16_000)
    return root


_MADE: list[EmbeddingJob] = []


@pytest.fixture(autouse=True)
def _release_leases() -> Iterator[None]:
    """Prepared jobs hold their namespace's lease, with a heartbeat thread: released after
    each test, so no heartbeat outlives it (and logs into a closed stream at exit)."""
    yield
    while _MADE:
        made = _MADE.pop()
        if getattr(made, "_lease", None) is not None:
            made._lease.release()


def job(archive: Path, tmp_path: Path, **sections: dict) -> EmbeddingJob:
    raw = {"input": {"uri": str(archive)}, "model": {"name": "beats", "weights": "random"},
           "output": {"uri": str(tmp_path / "out")}, "run": {"progress": False}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    made = EmbeddingJob(JobConfig.from_dict(raw))
    _MADE.append(made)
    return made


def prepared(archive: Path, tmp_path: Path, **sections: Any) -> EmbeddingJob:
    """A job prepared as a run would be, its lease let go (so the next may prepare)."""
    prepared_job = job(archive, tmp_path, **sections)
    prepared_job.prepare()
    prepared_job._lease.release()
    return prepared_job


@pytest.mark.parametrize("where", ["input", "output", "manifest"])
def test_a_store_whose_library_is_missing_is_refused_naming_the_field(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """``abfs://`` without adlfs: fsspec raises an ImportError where the URL is first used,
    which was a traceback (after the weights, or mid-manifest). Refused before any work."""
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "nolib", {
        "class": "no_such_module_for_tests.FileSystem", "err": "Install nolib to read nolib://"})
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri\n{next(archive.glob('*.wav'))}\nnolib://c/x.wav\n")
    sections = {"input": {"uri": "nolib://c/x"}} if where == "input" else (
        {"output": {"uri": "nolib://c/out"}} if where == "output"
        else {"input": {"uri": None, "manifest": str(manifest)}})
    with pytest.raises(ConfigError, match="nolib:// needs a library this environment lacks "
                       r"\(Install nolib to read nolib://\)") as err:
        job(archive, tmp_path, **sections).prepare()
    assert err.value.field == ("input.manifest" if where == "manifest" else f"{where}.uri")
    if where == "manifest":
        assert "manifest row 2 (the first of nolib://" in str(err.value)


def test_an_output_uri_that_is_a_file_is_refused(archive: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="is a file") as err:
        job(archive, tmp_path, output={"uri": str(tmp_path / "notes.txt")}).prepare()
    assert err.value.field == "output.uri"


def test_random_weights_are_said_whatever_the_log_level(
        archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run.log_level ERROR silences warnings, not the banner that the embeddings mean
    nothing."""
    import logging

    logger = logging.getLogger("pipeline")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        job(archive, tmp_path).prepare()
    finally:
        logger.setLevel(level)
    assert "RANDOM WEIGHTS" in capsys.readouterr().err


def test_an_output_uri_it_cannot_write_is_refused_naming_it(archive: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="cannot write to .*notes.txt/out: NotADirectoryError"
                       ) as err:
        job(archive, tmp_path, output={"uri": str(tmp_path / "notes.txt" / "out")}).prepare()
    assert err.value.field == "output.uri"


def test_an_output_it_may_write_but_not_delete_in_is_refused_first_run_or_later(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write-once bucket took a rerun (whose variant was recorded) through all its work
    to fail at the first commit, a shard's files published without their marker."""
    from pipeline import storage

    first = job(archive, tmp_path)
    first.prepare()  # records the variant, as a first run does
    first._lease.release()

    def remove_file(fs: object, path: str) -> None:
        raise PermissionError(f"AccessDenied: DeleteObject {path}")

    monkeypatch.setattr(storage, "remove_file", remove_file)
    with pytest.raises(ConfigError, match=r"cannot delete in .*: PermissionError") as err:
        job(archive, tmp_path).prepare()
    assert err.value.field == "output.uri"


def test_an_output_that_fails_for_the_while_is_a_failure_not_a_refusal(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage that outlasted the retries, or a full disk, is no config error: it fails
    the run (exit 1, which a scheduler retries), not refuses it (exit 2)."""
    import errno

    from pipeline import layout as layout_mod
    from pipeline.errors import StorageError

    for failure in (StorageError("gave up after 6 attempts: HttpError: 503"),
                    OSError(errno.ENOSPC, "No space left on device")):
        def write_json(*_: object, failure: OSError = failure) -> None:
            raise failure

        monkeypatch.setattr(layout_mod, "write_json", write_json)
        with pytest.raises(OSError) as err:
            job(archive, tmp_path).prepare()
        assert err.value is failure


@pytest.mark.parametrize(("sections", "field", "text"), [
    ({"compute": {"inflight_mb": 8}}, "compute.inflight_mb", "cannot hold one output file"),
    ({"model": {"pooling": "cls"}}, "model.pooling", "does not support 'cls'"),
    ({"model": {"layers": [40]}}, "model.layers", "40"),
    ({"windows": {"window_s": 0.05}}, "windows.window_s", "shortest input"),
    ({"windows": {"window_s": 0.05, "tail": "keep"}}, "windows.window_s", "shortest input"),
    ({"windows": {"min_tail_s": 6.0}}, "windows.min_tail_s", "longer than the window (5.0 s)"),
    # min_tail_s left at its default: the window the user set is what is too short.
    ({"windows": {"window_s": 0.01}}, "windows.window_s",
     "0.01 s is shorter than windows.min_tail_s (0.025 s by default"),
])
def test_prepare_refuses_with_the_field(archive: Path, tmp_path: Path, sections: dict,
                                        field: str, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        job(archive, tmp_path, **sections).prepare()
    assert err.value.field == field
    assert text in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def test_more_gpus_than_there_are_is_refused_before_listing(archive: Path, tmp_path: Path) -> None:
    """A config written for a GPU cluster, run on a laptop: refused before any output."""
    import torch

    have = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"asks for {have + 1} GPU but this machine has {have}"
                       ) as err:
        job(archive, tmp_path, compute={"gpus_per_actor": have + 1}).prepare()
    assert err.value.field == "compute.gpus_per_actor"
    assert not (tmp_path / "out").exists()


@pytest.fixture
def ray_not_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """As for `embed-archive run`: no Ray in this process yet (the integration tests' session
    Ray, when the whole suite runs in one process, would be a caller's own, not checked)."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)


@pytest.mark.parametrize(("compute", "field", "text"), [
    ({"cpus_per_actor": 64}, "compute.cpus_per_actor", "must fit on this local Ray's"),
    ({"decode_cpus": 64}, "compute.decode_cpus", "must fit on this local Ray's"),
    ({"num_cpus": 1, "cpus_per_actor": 1}, "compute.decode_cpus", "local Ray's 1 CPUs"),
    ({"decode_resources": {"decode_node": 1}}, "compute.decode_resources", "wait forever"),
    ({"embed_resources": {"gpu_pool": 1}}, "compute.embed_resources", "wait forever"),
    ({"embed_label_selector": {"pool": "gpu"}}, "compute.embed_label_selector", "wait forever"),
    ({"embed_actors": 2, "gpus_per_actor": 1}, "compute.embed_actors", "would wait forever"),
])
@pytest.mark.usefixtures("ray_not_started")
def test_what_a_local_ray_could_never_give_is_refused_before_any_work(
        archive: Path, tmp_path: Path, compute: dict, field: str, text: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found after the listing, the lease and the job record, once Ray had started (exit 1,
    a raw Ray error, or a job waiting forever for a resource no local node has)."""
    import ray
    import torch

    from pipeline import job as job_mod

    if "gpus_per_actor" in compute:  # more actors than this machine has GPUs, whatever it has
        compute = {**compute, "embed_actors": torch.cuda.device_count() + 2}
    with pytest.raises(ConfigError, match=text) as err:
        job(archive, tmp_path, compute=compute).prepare()
    assert err.value.field == field
    assert not (tmp_path / "out").exists()
    # Joining a cluster, its nodes decide (a node that has them all here): nothing refused.
    monkeypatch.setattr(job_mod, "connect_ray", lambda cfg: False)
    monkeypatch.setattr(ray, "nodes", lambda: [{
        "Alive": True, "Resources": {"CPU": 64.0, "decode_node": 1.0, "gpu_pool": 1.0},
        "Labels": {"pool": "gpu"}}])
    job(archive, tmp_path / "c", compute={**compute, "address": "auto"},
        model={"precision": "fp32"}).prepare()


@pytest.mark.usefixtures("ray_not_started")
def test_what_a_local_ray_node_has_besides_cpus_is_not_refused(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Its own node:/accelerator_type: resources and ray.io/ labels, and what
    RAY_OVERRIDE_RESOURCES / RAY_OVERRIDE_LABELS give it; more CPUs than the machine's
    when num_cpus says so (Ray takes it), with a warning: the plan's actors and threads then
    share fewer cores (64 on 2 ran at 4.6 audio-s/s against 8.2, unsaid)."""
    from pipeline.compute import usable_cpus

    with caplog.at_level("WARNING", logger="pipeline.job"):
        job(archive, tmp_path / "a", compute={"embed_resources": {"node:__internal_head__": 0.01},
                                              "num_cpus": 64, "cpus_per_actor": 8}).prepare()
    assert (f"compute.num_cpus: 64 gives the local Ray more CPUs than this machine lets the "
            f"job use ({usable_cpus()})") in caplog.text
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", '{"fast_disk": 4}')
    monkeypatch.setenv("RAY_OVERRIDE_LABELS", '{"pool": "local"}')
    job(archive, tmp_path / "b", compute={"decode_resources": {"fast_disk": 1},
                                          "embed_label_selector": {"pool": "local"}}).prepare()


def test_a_refused_listing_leaves_the_output_as_it_was(archive: Path, tmp_path: Path) -> None:
    """The variant record is written before the listing (an output the job cannot write is
    refused before a listing that may take hours); a listing refused then left it behind,
    and `inspect` took the folder for an output."""
    from pipeline.errors import NoInputsError

    out = tmp_path / "new" / "out"
    with pytest.raises(NoInputsError):
        job(archive, tmp_path, input={"uri": str(tmp_path / "nothing-here")},
            output={"uri": str(out)}).prepare()
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    (kept / "_variants").mkdir(parents=True)
    (kept / "notes.txt").write_text("x")
    with pytest.raises(NoInputsError):
        job(archive, tmp_path, input={"uri": str(tmp_path / "nothing-here")},
            output={"uri": str(kept)}).prepare()
    assert sorted(p.name for p in kept.rglob("*")) == ["_variants", "notes.txt"]
    done = job(archive, tmp_path, output={"uri": str(kept)})  # a real run's record stays
    done.prepare()
    done._lease.release()
    record = next((kept / "_variants").iterdir())
    with pytest.raises(NoInputsError):
        job(archive, tmp_path, input={"uri": str(tmp_path / "nothing-here")},
            output={"uri": str(kept)}).prepare()
    assert record.exists()


def test_a_run_refused_while_another_lists_leaves_that_runs_record(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record was written before the listing and taken back when the listing was
    refused: a second run of the variant that started meanwhile lost it, and with it the
    guard against another variant under the same id. Now it is written after the listing."""
    from pipeline import job as job_mod
    from pipeline.errors import NoInputsError

    first = job(archive, tmp_path, input={"uri": str(tmp_path / "nothing-here")})
    second = job(archive, tmp_path)
    real_list = job_mod.list_sources

    def listing_during_which_another_run_prepares(cfg: Any) -> Any:
        if cfg is first.cfg.input:
            second.prepare()
        return real_list(cfg)

    monkeypatch.setattr(job_mod, "list_sources", listing_during_which_another_run_prepares)
    with pytest.raises(NoInputsError):
        first.prepare()
    assert [p.name for p in (tmp_path / "out" / "_variants").iterdir()
            if not p.name.endswith(".columns.json")] == [f"{second.variant.id}.json"]


def test_a_job_id_names_one_run(archive: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "out" / "_jobs"
    jobs.mkdir(parents=True)
    (jobs / "nightly.json").write_text("{}")
    with pytest.raises(ConfigError, match="'nightly' already names a run") as err:
        job(archive, tmp_path, run={"job_id": "nightly"}).prepare()
    assert err.value.field == "run.job_id"
    job(archive, tmp_path, run={"job_id": "nightly-2"}).prepare()


def test_default_budget_holds_two_files_and_eight_batches_per_actor(archive: Path,
                                                                     tmp_path: Path) -> None:
    j = job(archive, tmp_path, output={"file_mb": 100}, model={"batch_size": 64},
            windows={"window_s": 10.0})
    j.prepare()
    plan = j._compute_plan({"CPU": 16.0, "GPU": 4.0})
    batch_mib = 64 * 160_000 * 4 / 2**20
    assert plan.actors == 4
    assert plan.inflight_mb == int(np.ceil(8 * 4 * batch_mib)) + int(np.ceil(2 * 100e6 / 2**20))
    # A budget just big enough is accepted.
    needed = int(np.ceil(1.5 * 100e6 / 2**20 + 4 * batch_mib))
    job(archive, tmp_path / "b", output={"file_mb": 100}, model={"batch_size": 64},
        windows={"window_s": 10.0}, compute={"inflight_mb": needed}).prepare()


@pytest.mark.parametrize(("progress", "ray_default", "terminal", "shown"), [
    (None, False, True, False), (None, True, True, True), (None, True, False, False),
    (True, False, False, True), (False, True, True, False)])
def test_progress_bars_follow_ray_datas_setting_unless_the_config_says(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, progress: bool | None,
        ray_default: bool, terminal: bool, shown: bool) -> None:
    """Unset, ``run.progress`` leaves Ray Data's setting, which the container image turns
    off (``RAY_DATA_DISABLE_PROGRESS_BARS=1``: bars in a cluster job's log are noise); it
    forced them on before, whatever the environment said. Where stdout is no terminal Ray
    Data logs its bars as 9 lines every 10 s: off there too, unless the config says."""
    import copy
    import os

    from ray.data import DataContext
    from ray.data._internal.progress import get_progress_manager
    from ray.util.debug import reset_log_once

    reset_log_once("ray_data_progress_manager_disabled")  # as in a new driver
    before = DataContext.get_current()
    ctx = copy.deepcopy(before)  # the job sets more of it: none of it outlives the test
    DataContext._set_current(ctx)
    ctx.enable_progress_bars = ray_default  # False as RAY_DATA_DISABLE_PROGRESS_BARS=1 leaves it
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w") as tty:
            if terminal:
                monkeypatch.setattr("sys.stdout", tty)
            j = job(archive, tmp_path, run={"progress": progress})
            j.prepare()
            j._configure_data_context(j._compute_plan({"CPU": 2.0}))
            monkeypatch.undo()
        assert DataContext.get_current().enable_progress_bars is shown
        # Bars off, Ray Data's warning how to turn them on in its API's terms (the job's
        # knob is run.progress) is not shown: a WARNING line in every run's log.
        said = logging.getLogger("ray.data._internal.progress")
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        said.addHandler(handler)
        try:
            get_progress_manager(DataContext.get_current(), "ds", {}, False)
        finally:
            said.removeHandler(handler)
        assert not [r for r in records if "Progress bars disabled" in r.getMessage()]
    finally:
        os.close(leader)
        DataContext._set_current(before)


@pytest.mark.parametrize(("stall", "guard"), [(None, 1800.0), (45.0, 45.0), (0.0, -1)])
def test_the_stall_timeout_is_ray_datas_no_progress_guard(
        archive: Path, tmp_path: Path, stall: float | None, guard: float) -> None:
    """``run.stall_timeout_s`` 0 (wait forever) is Ray's -1: its guard refuses 0 as a
    timeout that would fail every execution at once."""
    import copy

    from ray.data import DataContext

    before = DataContext.get_current()
    DataContext._set_current(copy.deepcopy(before))
    try:
        j = job(archive, tmp_path, run={} if stall is None else {"stall_timeout_s": stall})
        j.prepare()
        j._configure_data_context(j._compute_plan({"CPU": 2.0}))
        assert DataContext.get_current().execution_no_progress_timeout_s == guard
    finally:
        DataContext._set_current(before)


@pytest.mark.parametrize(("spec", "fired"), [
    ("embed:{m}", "kill"), ("embed+hang:{m}", "hang"), ("decode:{m}", None),
    ("decode+hang:{m}", None), ("embed+hnag:{m}", None), ("embed:{m}.gone", None),
    ("embed+every:{m}", "kill every time")])
def test_a_fault_point_kills_or_hangs_as_its_spec_says(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spec: str, fired: str | None) -> None:
    """``+hang`` leaves the plain points as they were; a mode it does not know (a typo) is
    no fault, rather than the SIGKILL of a plain point, and its marker stays; ``+every``
    kills each process that gets there while its marker stays."""
    import threading

    from pipeline import faults

    marker = tmp_path / "marker"
    marker.write_text("armed")
    seen: list[str] = []

    class Hang:
        def wait(self) -> None:
            seen.append("hang")

    monkeypatch.setattr(threading, "Event", Hang)
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: seen.append("kill"))
    monkeypatch.setenv(faults.FAULT_ENV, spec.format(m=marker))
    faults.fault_point("embed")
    if fired == "kill every time":
        faults.fault_point("embed")
        assert seen == ["kill", "kill"] and marker.exists()
        return
    assert seen[:1] == ([fired] if fired else [])
    assert marker.exists() == (fired is None)


@pytest.mark.parametrize(("cpus", "actors", "threads", "reserved"), [
    (1.0, 1, 1, 0.0),    # one CPU: the actor reserves none, so decoding can run
    (2.0, 2, 1, 0.5),    # this CI machine: two 1-thread actors, one CPU left for decoding
    (8.0, 4, 2, 1.0),
    (32.0, 4, 8, 1.0),
])
def test_local_cpu_plan_uses_narrow_actors_and_leaves_decoding_a_cpu(
        archive: Path, tmp_path: Path, cpus: float, actors: int, threads: int,
        reserved: float) -> None:
    j = job(archive, tmp_path)
    j.prepare()
    plan = j._compute_plan({"CPU": cpus})
    assert (plan.actors, plan.torch_threads, plan.cpus_per_actor) == (
        actors, threads, reserved)
    assert plan.actors * plan.cpus_per_actor <= cpus - 1 or cpus == 1
    # Explicit settings win; on a cluster (or with GPUs) the defaults stay one actor per GPU.
    # (num_cpus: a local Ray that could hold them, so that prepare() lets them by.)
    fixed = job(archive, tmp_path / "x", compute={"embed_actors": 1, "cpus_per_actor": 2,
                                                  "num_cpus": 64})
    fixed.prepare()
    if cpus >= 3:
        assert (fixed._compute_plan({"CPU": cpus}).actors,
                fixed._compute_plan({"CPU": cpus}).cpus_per_actor) == (1, 2)
    else:  # an actor of 2 CPUs and a decode task of 1 cannot run at once: Ray would wait forever
        with pytest.raises(ConfigError, match=f"must fit on this local Ray's {cpus:g} CPUs"):
            fixed._compute_plan({"CPU": cpus})
    for compute, field in (({"decode_cpus": 4}, "compute.decode_cpus"),
                           ({"cpus_per_actor": 3}, "compute.cpus_per_actor")):
        big = prepared(archive, tmp_path / field, compute={**compute, "num_cpus": 64})
        if max(compute.values()) > cpus:
            with pytest.raises(ConfigError) as err:
                big._compute_plan({"CPU": cpus})
            assert err.value.field == field
    gpu = job(archive, tmp_path / "g")
    gpu.prepare()
    if cpus < 2:  # a GPU actor's CPU and a decode task's: not both on one CPU
        return
    assert gpu._compute_plan({"CPU": cpus, "GPU": 2.0}).actors == 2
    assert gpu._compute_plan({"CPU": cpus, "GPU": 2.0}).cpus_per_actor == 1.0


def test_a_backbone_that_cannot_run_on_gpus_holds_none_by_default(archive: Path,
                                                                  tmp_path: Path) -> None:
    """BirdNET runs on LiteRT, on CPUs: by default its actors ask for no GPU, even where
    there are some (one per actor would sit idle, and the pool be one actor per GPU)."""
    from pipeline.models.birdnet import BIRDNET_INFO

    assert not BIRDNET_INFO.runs_on_gpus
    j = job(archive, tmp_path)
    j.prepare()
    assert j._compute_plan({"CPU": 8.0, "GPU": 2.0}).gpus_per_actor == 1.0
    j.info = replace(j.info, runs_on_gpus=False)
    plan = j._compute_plan({"CPU": 8.0, "GPU": 2.0})
    assert plan.gpus_per_actor == 0.0 and not j._embed_spec(plan).use_gpu


def test_a_driver_pointed_at_a_cluster_by_ray_address_plans_like_address_auto(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under Ray Jobs the driver finds its cluster in RAY_ADDRESS: it joins it, so the plan
    is a cluster's (no narrow local actors sized to a laptop's CPUs)."""
    fp32 = {"precision": "fp32"}  # auto would ask the (absent) cluster for its GPUs
    auto = job(archive, tmp_path / "a", compute={"address": "auto"}, model=fp32)
    auto.prepare()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    unset = job(archive, tmp_path / "u", model=fp32)
    unset.prepare()
    resources = {"CPU": 8.0}
    assert unset._compute_plan(resources) == auto._compute_plan(resources)
    monkeypatch.delenv("RAY_ADDRESS")
    assert unset._compute_plan(resources).actors == 4  # a local Ray: narrow actors


def test_a_submitted_driver_sends_only_the_variables_its_job_does_not_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under Ray Jobs the job's runtime_env already reaches every worker and ray.init()
    refuses to repeat its variables: those are left out, and the rest (the weights cache,
    the code version rows carry) still go. A filter turned the wrong way sent only the
    repeated ones, and the workers lost the cache and the commit."""
    import json
    import sys
    import types

    from pipeline.provenance import GIT_COMMIT_ENV, git_commit
    from pipeline.ray_connect import connect_ray

    calls: list[dict[str, Any]] = []
    fake = types.SimpleNamespace(is_initialized=lambda: False,
                                 init=lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, "ray", fake)
    from pipeline.faults import FAULT_ENV

    for name in ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", FAULT_ENV):
        monkeypatch.delenv(name, raising=False)
    head = _listening()  # the driver checks that something answers there before ray.init
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{head.getsockname()[1]}")
    monkeypatch.setenv("EMBED_ARCHIVE_CACHE", "/cache")
    monkeypatch.setenv(GIT_COMMIT_ENV, "abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}))
    cfg = JobConfig.from_dict({"input": {"uri": "/nowhere"}, "output": {"uri": "/nowhere"}})
    assert connect_ray(cfg) is True
    assert calls[0]["runtime_env"] == {"env_vars": {"EMBED_ARCHIVE_CACHE": "/cache",
                                                    GIT_COMMIT_ENV: "abc123"}}
    monkeypatch.delenv(GIT_COMMIT_ENV)  # a driver not started by submit: its own commit
    connect_ray(cfg)
    assert calls[1]["runtime_env"]["env_vars"][GIT_COMMIT_ENV] == git_commit()
    head.close()


def _listening() -> socket.socket:
    """A TCP socket listening on a free port of 127.0.0.1 (close it after)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_a_cluster_address_where_nothing_answers_fails_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped compute.address (or RAY_ADDRESS): ray.init tried it for ~14 minutes,
    printing a warning every few seconds, before its ConnectionError. Now one line at once,
    without the token hint (nothing answered to ask for one); ray.init is never called."""
    import sys
    import time
    import types

    from pipeline.errors import PipelineError
    from pipeline.ray_connect import connect_ray

    def joined(**kwargs: Any) -> None:
        raise AssertionError("ray.init was called")

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False,
                                                                  init=joined))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    closed = _listening()
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now
    for compute, env in (({"address": address}, None), ({}, address)):
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)
        cfg = JobConfig.from_dict({"input": {"uri": "/nowhere"}, "output": {"uri": "/nowhere"},
                                   "compute": compute})
        started = time.monotonic()
        with pytest.raises(PipelineError) as err:
            connect_ray(cfg)
        assert time.monotonic() - started < 5
        text = str(err.value)
        assert text.startswith(f"cannot join the Ray cluster at {address} ")
        assert f"nothing answers at {address} (Connection refused)" in text
        assert "\n" not in text and "RAY_AUTH_TOKEN" not in text


def test_a_cluster_that_cannot_be_joined_fails_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`run` with compute.address auto, on a token-auth cluster without the token, ended
    in Ray's ConnectionError traceback: now one line naming the address and the token."""
    import sys
    import types

    from ray.exceptions import AuthenticationError

    from pipeline import cli
    from pipeline.errors import PipelineError
    from pipeline.ray_connect import connect_ray

    def refuse(**kwargs: Any) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False,
                                                                  init=refuse))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    cfg = JobConfig.from_dict({"input": {"uri": "/nowhere"}, "output": {"uri": "/nowhere"},
                               "compute": {"address": "auto"}})
    with pytest.raises(PipelineError) as err:
        connect_ray(cfg)
    text = str(err.value)
    assert "\n" not in text and text.startswith("cannot join the Ray cluster at auto")
    assert "Failed to connect to Ray cluster at 10.0.0.1:6379" in text
    assert "RAY_AUTH_MODE=token and its token: RAY_AUTH_TOKEN" in text
    # A token alone is not sent: Ray's driver reads one only with RAY_AUTH_MODE=token (the
    # hint said "set RAY_AUTH_TOKEN", then, once it was set, nothing).
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    with pytest.raises(PipelineError) as err:
        connect_ray(cfg)
    assert "wants RAY_AUTH_MODE=token" in str(err.value) and "x" * 64 not in str(err.value)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # both: the token may be another cluster's
    with pytest.raises(PipelineError) as err:
        connect_ray(cfg)
    assert "hold this cluster's token" in str(err.value) and "x" * 64 not in str(err.value)
    monkeypatch.delenv("RAY_AUTH_TOKEN")  # the mode, no token
    with pytest.raises(PipelineError, match="wants its token: set RAY_AUTH_TOKEN"):
        connect_ray(cfg)
    monkeypatch.setattr(cli, "cmd_run", lambda args: connect_ray(cfg))
    assert cli.main(["run", "job.yaml"]) == 1
    assert capsys.readouterr().err.startswith("embed-archive: failed: cannot join the Ray cluster")
    # Token auth on and no token: Ray raises its AuthenticationError (no ConnectionError)
    # before trying to connect; anything else is not a cluster that cannot be joined.
    for raised, caught in ((AuthenticationError("no token found"), True),
                           (ValueError("a bug"), False)):
        def fail(error: Exception = raised, **kwargs: Any) -> None:
            raise error

        sys.modules["ray"].init = fail
        sys.modules["ray"].exceptions = types.SimpleNamespace(
            AuthenticationError=AuthenticationError)
        with pytest.raises(PipelineError if caught else ValueError, match="no token found"
                           if caught else "a bug"):
            connect_ray(cfg)


@pytest.mark.parametrize(("value", "text"), [("http://head:8265", "dashboard address"),
                                           ("https://head", "dashboard address"),
                                           ("HTTP://head:8265", "dashboard address"),
                                           (" http://head:8265", "dashboard address"),
                                           ("ray://head:10001", "Ray Client")])
def test_a_ray_address_a_driver_cannot_join_is_refused_before_any_work(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str,
        text: str) -> None:
    """RAY_ADDRESS exported for `ray job submit` (the dashboard's http:// address) made
    `run` end in Ray's traceback (exit 1); now a one-line error naming it, before the model
    or the output are touched. compute.address set, the variable is not read."""
    monkeypatch.setenv("RAY_ADDRESS", value)
    with pytest.raises(ConfigError, match=text) as err:
        job(archive, tmp_path).prepare()
    assert err.value.field == "RAY_ADDRESS"
    assert not (tmp_path / "out").exists()
    job(archive, tmp_path / "set", compute={"address": "auto"},
        model={"precision": "fp32"}).prepare()


def test_decode_tasks_hold_every_recording_once_with_its_shard(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for k in range(30):
        sf.write(root / f"r{k:02d}.wav", np.zeros(1600, np.float32), 16_000)
    j = job(root, tmp_path, run={"shard_size": 7})
    j.prepare()
    tables = j._decode_tasks(cluster_cpus=2.0)
    assert [t.num_rows for t in tables] == [3] * 10  # 30 clips, at least 8 tasks (4 a CPU)
    rows = [r for t in tables for r in t.to_pylist()]
    expected = [(sid, i.recording_id) for sid, members in j.shards for i in members]
    assert [(r["shard"], r["recording_id"]) for r in rows] == expected


def test_auto_precision_is_settled_before_the_namespace(archive: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` resolves on the driver, from where the actors will run, and the variant
    records the result: a job resumed on GPUs never writes bf16 rows among the fp32 rows
    a CPU run left (nor the other way round)."""
    import ray

    def variant(resources: dict[str, float] | None, **compute: object) -> tuple[str, str]:
        if resources is not None:  # a cluster's view, as Ray reports it (no GPU here)
            monkeypatch.setattr(ray, "is_initialized", lambda: True)
            monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
        else:  # no Ray (the suite's session Ray may be up: it must not be asked)
            monkeypatch.setattr(ray, "is_initialized", lambda: False)
        j = job(archive, tmp_path, compute=compute)
        j.prepare()
        monkeypatch.undo()
        return j.variant.precision, j.variant.id

    explicit = job(archive, tmp_path, model={"precision": "fp32"})
    explicit.prepare()
    cpu = variant({"CPU": 8.0})
    assert cpu == ("fp32", explicit.variant.id)  # auto on CPUs is fp32, one namespace
    h100 = variant({"CPU": 64.0, "GPU": 8.0, "accelerator_type:H100": 8.0})
    assert h100[0] == "bf16" and h100[1] != cpu[1]
    assert variant({"CPU": 32.0, "GPU": 4.0, "accelerator_type:T4": 4.0})[0] == "fp32"
    # GPUs asked for but none up yet (an autoscaler adds them): bf16, checked by each actor.
    assert variant({"CPU": 4.0}, gpus_per_actor=1, embed_actors=2) == h100
    assert variant({"CPU": 8.0, "GPU": 8.0}, gpus_per_actor=0) == cpu
    # This machine, no Ray: the GPUs a local Ray would get (none here).
    assert variant(None) == cpu


def test_int8_is_its_own_variant_and_refused_where_it_cannot_run(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 embeddings differ from fp32's: their own namespace. A job whose actors would get
    GPUs, or whose network has no Linear layer, is refused before any work, by field."""
    import ray

    int8 = job(archive, tmp_path, model={"precision": "int8"})
    int8.prepare()
    fp32 = job(archive, tmp_path, model={"precision": "fp32"})
    fp32.prepare()
    assert int8.variant.precision == "int8" and int8.variant.id != fp32.variant.id
    for model, compute, words in (
            ({"name": "efficientnet_b0", "weights": "random"}, {}, "no Linear layers"),
            ({}, {"gpus_per_actor": 1}, "CPU actors only"),
            ({}, {}, "CPU actors only")):  # the default plan on a cluster with GPUs
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
        with pytest.raises(ConfigError, match=words) as err:
            job(archive, tmp_path, model={**model, "precision": "int8"}, compute=compute).prepare()
        assert err.value.field == "model.precision"
        monkeypatch.undo()
    job(archive, tmp_path, model={"precision": "int8"}, compute={"gpus_per_actor": 0}).prepare()


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_birdnet_variants_say_fp32_whatever_is_asked(archive: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     precision: str) -> None:
    """LiteRT runs BirdNET's float32 graph on any device: a variant saying bf16 would put
    the same embeddings in a second namespace."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources",
                        lambda: {"CPU": 64.0, "GPU": 8.0, "accelerator_type:H100": 8.0})
    j = job(archive, tmp_path, model={"name": "birdnet_v2_4", "weights": "default",
                                      "precision": precision},
            windows={"window_s": 3.0, "hop_s": 3.0})
    j.prepare()
    assert j.variant.precision == "fp32"


def test_birdnets_thread_count_is_no_new_variant(archive: Path, tmp_path: Path) -> None:
    """model.options.num_threads (LiteRT's threads: the speed, not the embeddings, as
    compute.torch_threads for the torch backbones) named a variant of its own: a rerun with
    more threads embedded every recording again, beside the rows it already had."""
    birdnet = {"name": "birdnet_v2_4", "weights": "default"}
    windows = {"window_s": 3.0, "hop_s": 3.0}
    variants = {prepared(archive, tmp_path, model={**birdnet, "options": options},
                         windows=windows).variant.id
                for options in ({}, {"num_threads": 4}, {"num_threads": 2, "labels_path": "l"})}
    assert len(variants) == 1
    other = prepared(archive, tmp_path, model={**birdnet, "options": {"xnnpack": False}},
                     windows=windows)
    assert other.variant.id not in variants  # other kernels: other numbers


@pytest.mark.parametrize("retry", [True, False])
def test_a_rerun_reopens_shards_that_met_errors_not_their_own(archive: Path, tmp_path: Path,
                                                        retry: bool) -> None:
    """A recording the storage retries could not get (an outage) is embedded again by the
    next run, its whole shard with it: uncommitted first, so no recording ends up with an
    error row beside a later success."""
    from pipeline import layout as layout_mod

    sf.write(archive / "b.wav", np.zeros(16_000, np.float32), 16_000)
    first = job(archive, tmp_path)
    first.prepare()
    a, b = (i.recording_id for i in first.todo)
    lay = first.layout
    shards = {"a" * 16: {"recording_id": a, "outcome": "error", "error_type": "MemoryError",
                         "retry": True},
              "b" * 16: {"recording_id": b, "outcome": "ok"}}
    for shard_id, rec in shards.items():
        path = Path(lay.shard_file("windows", shard_id, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"rows")
        layout_mod.write_json(lay.fs, lay.commit_path(shard_id),
                              {"shard": shard_id, "recordings": [rec], "files": {}})
    again = job(archive, tmp_path, run={"retry_transient_errors": retry})
    again.prepare()
    assert [i.recording_id for i in again.todo] == ([a] if retry else [])
    assert again.already_done == (1 if retry else 2)
    # A rerun that embeds nothing exits 0; its summary still counts the stored error rows.
    assert again.already_failed == (0 if retry else 1)
    assert Path(lay.commit_path("a" * 16)).exists() is not retry
    assert Path(lay.shard_file("windows", "a" * 16, 0)).exists() is not retry
    assert Path(lay.shard_file("windows", "b" * 16, 0)).exists()
    if retry:  # a recording no longer listed keeps its rows: moved out of the reopened shard
        (archive / "b.wav").unlink()
        layout_mod.write_json(lay.fs, lay.commit_path("c" * 16), {"shard": "c" * 16, "files": {},
                              "recordings": [{**shards["a" * 16]}, shards["b" * 16]]})
        third = job(archive, tmp_path)
        third.prepare()
        assert [i.recording_id for i in third.todo] == [a]
        assert not Path(lay.commit_path("c" * 16)).exists()
        carved = layout_mod.read_json(lay.fs, lay.commit_path(
            layout_mod.carved_shard_id("c" * 16, {b})))
        assert (carved["carved_from"], carved["recordings"]) == ("c" * 16, [shards["b" * 16]])


def two_recordings(archive: Path, tmp_path: Path) -> tuple[str, str, Any]:
    """The archive with a second recording, prepared once (its lease let go): the two ids
    and the output's layout, for markers a test writes by hand."""
    sf.write(archive / "b.wav", np.zeros(16_000, np.float32), 16_000)
    first = prepared(archive, tmp_path)
    a, b = (i.recording_id for i in first.todo)
    return a, b, first.layout


def test_an_error_met_in_max_attempts_runs_is_not_retried_again(
        archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failure not the recording's own that comes back run after run (a file that runs its
    worker out of memory each time) is no outage: after ``run.max_attempts`` runs its shard
    stays committed, with a warning, instead of being embedded again at every rerun. A
    reopened shard's recordings carry their count into the run that redoes them."""
    from pipeline import layout as layout_mod

    a, b, lay = two_recordings(archive, tmp_path)
    for shard_id, rid, tries in (("a" * 16, a, 2), ("b" * 16, b, 3)):
        layout_mod.write_json(lay.fs, lay.commit_path(shard_id), {
            "shard": shard_id, "files": {},
            "recordings": [{"recording_id": rid, "outcome": "error", "error_type": "MemoryError",
                            "retry": True, "attempts": tries}]})
    again = job(archive, tmp_path)
    with caplog.at_level("WARNING", logger="pipeline.resume"):
        again.prepare()
    again._lease.release()
    assert [i.recording_id for i in again.todo] == [a]
    assert again._attempts == {a: 2}  # its new marker will say 3
    assert Path(lay.commit_path("b" * 16)).exists()
    assert ("1 recording(s) met errors not their own (MemoryError) in 3 runs or more: not "
            "retried again") in caplog.text
    more = prepared(archive, tmp_path, run={"max_attempts": 4})
    assert sorted(i.recording_id for i in more.todo) == sorted([a, b])  # a: still to redo
    assert not Path(lay.commit_path("b" * 16)).exists()


def committed_files(lay: Any, shard_id: str, tables: dict[str, list[list[str]]]
                    ) -> dict[str, list[dict[str, Any]]]:
    """Write a shard's files by hand, one per list of recording ids (a ``job_id`` column
    beside them, file metadata, no compression: unlike what a carve would write), and
    return the marker's ``files``."""
    import pyarrow.parquet as pq

    files: dict[str, list[dict[str, Any]]] = {}
    for table, parts in tables.items():
        for part, rids in enumerate(parts):
            path = Path(lay.shard_file(table, shard_id, part))
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = pa.table({"recording_id": rids, "job_id": [f"{table}-{r}" for r in rids]})
            pq.write_table(rows.replace_schema_metadata({"provenance": f"{shard_id}/{table}"}),
                           path, compression="none", row_group_size=1)
            files.setdefault(table, []).append({"path": lay.uri(str(path)), "rows": len(rids)})
    return files


def test_a_carve_copies_the_files_it_keeps_whole_and_filters_only_those_that_mix(
        archive: Path, tmp_path: Path) -> None:
    """A shard reopened for one retry: a file holding only rows kept is copied as it is,
    byte for byte (no download and rewrite), one holding only the retried recording's rows
    is left behind, and only a file mixing both is filtered, its file metadata kept."""
    import pyarrow.parquet as pq

    from pipeline import layout as layout_mod

    a, b, lay = two_recordings(archive, tmp_path)
    source = "d" * 16
    files = committed_files(lay, source, {"windows": [[b, b], [a, b, a]], "recordings": [[a]],
                                          "errors": [[a]]})
    before = {(t, k): Path(lay.shard_file(t, source, k)).read_bytes()
              for t, entries in files.items() for k in range(len(entries))}
    layout_mod.write_json(lay.fs, lay.commit_path(source), {
        "shard": source, "files": files,
        "recordings": [{"recording_id": a, "outcome": "error", "error_type": "StorageError",
                        "retry": True}, {"recording_id": b, "outcome": "ok"}]})
    again = prepared(archive, tmp_path)
    assert [i.recording_id for i in again.todo] == [a]
    assert not Path(lay.commit_path(source)).exists()
    assert not list(Path(lay.table_dir("windows")).glob(f"shard-{source}-*"))
    carved_id = layout_mod.carved_shard_id(source, {b})
    carved = layout_mod.read_json(lay.fs, lay.commit_path(carved_id))
    assert carved["carved_from"] == source
    assert {t: [e["rows"] for e in entries] for t, entries in carved["files"].items()} == {
        "windows": [2, 1]}
    whole, mixed = (Path(lay.shard_file("windows", carved_id, k)) for k in (0, 1))
    assert whole.read_bytes() == before[("windows", 0)]
    filtered = pq.read_table(mixed)
    assert filtered.to_pydict() == {"recording_id": [b], "job_id": [f"windows-{b}"]}
    assert filtered.schema.metadata == {b"provenance": f"{source}/windows".encode()}
    assert not list(Path(lay.table_dir("recordings")).glob("shard-*"))


def test_a_carve_that_fails_fails_the_run_and_leaves_its_shard_committed(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards are carved side by side: a failure in one still stops prepare(), and the
    shard it was carving from stays committed (its carve is redone by the next run)."""
    from pipeline import layout as layout_mod
    from pipeline import storage
    from pipeline.errors import StorageError

    a, b, lay = two_recordings(archive, tmp_path)
    shards = ("e" * 16, "f" * 16)
    for shard_id in shards:
        layout_mod.write_json(lay.fs, lay.commit_path(shard_id), {
            "shard": shard_id, "files": committed_files(lay, shard_id, {"windows": [[b]]}),
            "recordings": [{"recording_id": a, "outcome": "error",
                            "error_type": "StorageError", "retry": True},
                           {"recording_id": b, "outcome": "ok"}]})
    copy = storage.copy

    def failing(fs: Any, src: str, dst: str) -> None:
        if f"shard-{shards[1]}-" in src:
            raise StorageError(f"copy {src}: gave up")
        copy(fs, src, dst)

    monkeypatch.setattr(storage, "copy", failing)
    with pytest.raises(StorageError, match="gave up"):
        job(archive, tmp_path).prepare()
    assert Path(lay.commit_path(shards[1])).exists()
    assert not Path(lay.commit_path(shards[0])).exists()
    assert Path(lay.commit_path(layout_mod.carved_shard_id(shards[0], {b}))).exists()


def test_a_carve_out_a_crash_interrupted_keeps_the_count_of_the_recordings_it_redoes(
        archive: Path, tmp_path: Path) -> None:
    """Killed between committing a carved shard and uncommitting its source, a run leaves the
    count of runs that met an error on the recordings it was redoing in the source's marker
    alone: the next run, uncommitting the source, counted from 0 again, and a recording that
    fails that way each time had ``run.max_attempts`` runs more per such crash."""
    from pipeline import layout as layout_mod

    a, b, lay = two_recordings(archive, tmp_path)
    kept = {"recording_id": b, "outcome": "ok"}
    carved_id = layout_mod.carved_shard_id("a" * 16, {b})
    for shard_id, extra, recs in (
            ("a" * 16, {}, [{"recording_id": a, "outcome": "error", "error_type": "MemoryError",
                             "retry": True, "attempts": 2}, kept]),
            (carved_id, {"carved_from": "a" * 16}, [kept])):
        layout_mod.write_json(lay.fs, lay.commit_path(shard_id),
                              {"shard": shard_id, "files": {}, "recordings": recs, **extra})
    again = prepared(archive, tmp_path)
    assert not Path(lay.commit_path("a" * 16)).exists()
    assert [i.recording_id for i in again.todo] == [a]
    assert again._attempts == {a: 2}  # its new marker will say 3, the last try by default


def test_jobs_over_two_prefixes_into_one_output_leave_each_others_shards_alone(
        archive: Path, tmp_path: Path) -> None:
    """README, At scale: an archive run as one job per prefix, one after another, into one
    output. A job over the second prefix neither redoes nor reopens the first's shards, and
    the first prefix run again finds everything done."""
    from pipeline import layout as layout_mod

    for prefix in ("a", "b"):
        (archive / prefix).mkdir()
        sf.write(archive / prefix / "x.wav", np.zeros(16_000, np.float32), 16_000)
    first = prepared(archive, tmp_path, input={"uri": str(archive / "a")})
    [a] = first.todo
    lay = first.layout
    layout_mod.write_json(lay.fs, lay.commit_path("a" * 16), {
        "shard": "a" * 16, "files": {}, "tables": ["windows", "recordings", "errors"],
        "recordings": [{"recording_id": a.recording_id, "source_uri": a.uri, "outcome": "ok"}]})
    other = prepared(archive, tmp_path, input={"uri": str(archive / "b")})
    assert [i.uri for i in other.todo] == [str(archive / "b" / "x.wav")]
    assert other.already_done == 0 and Path(lay.commit_path("a" * 16)).exists()
    again = prepared(archive, tmp_path, input={"uri": str(archive / "a")})
    assert (again.already_done, again.todo) == (1, [])


def test_a_variant_with_shards_of_its_own_is_never_told_its_settings_embed_everything_again(
        archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The note naming another variant's settings is for a variant with nothing committed.
    One whose shards hold only another prefix's recordings (README, At scale), or whose
    shards were all reopened because every object changed since, is in use: it was told
    that its settings embed every recording again and to rerun with the other's."""
    from pipeline import layout as layout_mod

    def commit(j: EmbeddingJob) -> None:  # a marker for j's one recording, as a run leaves it
        [item] = j.todo
        layout_mod.write_json(j.layout.fs, j.layout.commit_path("a" * 16), {
            "shard": "a" * 16, "files": {}, "tables": ["windows", "recordings", "errors"],
            "recordings": [{"recording_id": item.recording_id, "source_uri": item.uri,
                            "outcome": "ok"}]})

    def noted() -> list[str]:
        return [r.getMessage() for r in caplog.records if "already holds variant" in r.getMessage()]

    for prefix in ("a", "b"):
        (archive / prefix).mkdir()
        sf.write(archive / prefix / "x.wav", np.zeros(16_000, np.float32), 16_000)
    site_a = {"uri": str(archive / "a")}
    commit(prepared(archive, tmp_path, input=site_a, windows={"hop_s": 1.0}))  # another variant
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        ours = prepared(archive, tmp_path, input=site_a)
    assert len(noted()) == 1  # nothing of its own yet: the note is due
    commit(ours)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        site_b = prepared(archive, tmp_path, input={"uri": str(archive / "b")})
    assert (site_b.already_done, len(site_b.todo)) == (0, 1) and not noted()
    sf.write(archive / "a" / "x.wav", np.zeros(24_000, np.float32), 16_000)  # a new version
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        changed = prepared(archive, tmp_path, input=site_a)
    assert (changed.already_done, len(changed.todo)) == (0, 1) and not noted()


def test_a_recording_in_two_reopened_shards_carries_its_higher_count(
        archive: Path, tmp_path: Path) -> None:
    """Hand-made markers may name one recording in two shards: the count carried on is the
    higher one, whichever shard is read first."""
    from pipeline import layout as layout_mod

    first = prepared(archive, tmp_path)
    [a] = (i.recording_id for i in first.todo)
    lay = first.layout
    for shard_id, tries in (("a" * 16, 2), ("b" * 16, 1), ("c" * 16, 1)):
        layout_mod.write_json(lay.fs, lay.commit_path(shard_id), {
            "shard": shard_id, "files": {},
            "recordings": [{"recording_id": a, "outcome": "error", "error_type": "MemoryError",
                            "retry": True, "attempts": tries}]})
    again = prepared(archive, tmp_path)
    assert again._attempts == {a: 2}


def test_a_prepared_run_whose_lease_was_taken_meanwhile_does_nothing(
        archive: Path, tmp_path: Path) -> None:
    """Prepared, then overtaken by a run that finished (and deleted the lease): run() stops
    before any work, instead of embedding and committing its plan a second time."""
    from pipeline.errors import LeaseLostError

    first = job(archive, tmp_path)
    first.prepare()
    second = job(archive, tmp_path)
    second.prepare()  # takes over: the first was only prepared
    second._lease.release()  # ... and it ran to the end
    with pytest.raises(LeaseLostError, match="its record is gone"):
        first.run()
    assert not Path(first.layout.lease_path()).exists()


def test_a_table_turned_on_later_reopens_the_shards_written_without_it(archive: Path,
                                                                       tmp_path: Path) -> None:
    """Shards committed with output.windows false hold no window rows: a run that writes
    windows embeds them again (else the table would stay empty while the run said every
    recording was done). Turning a table off redoes nothing; markers from before tables
    were recorded count as holding every table."""
    from pipeline import layout as layout_mod

    for name in ("b", "c"):
        sf.write(archive / f"{name}.wav", np.zeros(16_000, np.float32), 16_000)
    first = job(archive, tmp_path, output={"windows": False})
    first.prepare()
    assert first._tables == ["recordings", "errors"]
    first._lease.release()
    a, b, c = (i.recording_id for i in first.todo)
    lay = first.layout
    markers = {"a" * 16: (a, ["recordings", "errors"]),
               "b" * 16: (b, ["windows", "recordings", "errors"]), "c" * 16: (c, None)}
    for shard_id, (rid, tables) in markers.items():
        marker = {"shard": shard_id, "files": {},
                  "recordings": [{"recording_id": rid, "outcome": "ok"}]}
        if tables is not None:
            marker["tables"] = tables
        layout_mod.write_json(lay.fs, lay.commit_path(shard_id), marker)
    off = prepared(archive, tmp_path, output={"windows": False})
    assert off.todo == []
    on = prepared(archive, tmp_path)
    assert [i.recording_id for i in on.todo] == [a]
    assert not Path(lay.commit_path("a" * 16)).exists()
    assert Path(lay.commit_path("b" * 16)).exists() and Path(lay.commit_path("c" * 16)).exists()


def test_a_shard_reopened_for_a_new_table_does_not_keep_an_earlier_versions_rows(
        archive: Path, tmp_path: Path) -> None:
    """A shard written without windows holds an earlier version of a.wav (rewritten since)
    and a recording no longer listed. Turning windows on reopens it: the one no longer
    listed keeps its rows, carved out; the earlier version of a.wav does not, or the tables
    would hold a.wav twice, beside the new version's rows."""
    from pipeline import layout as layout_mod

    first = prepared(archive, tmp_path, output={"windows": False})
    [a] = first.todo
    lay = first.layout
    old_a = {"recording_id": "a-before-it-changed", "source_uri": a.uri, "outcome": "ok"}
    gone = {"recording_id": "gone", "source_uri": "/nowhere/x.wav", "outcome": "ok"}
    layout_mod.write_json(lay.fs, lay.commit_path("e" * 16), {
        "shard": "e" * 16, "files": {}, "tables": ["recordings", "errors"],
        "recordings": [old_a, gone]})
    again = prepared(archive, tmp_path)
    assert [i.recording_id for i in again.todo] == [a.recording_id]
    assert not Path(lay.commit_path("e" * 16)).exists()
    kept = layout_mod.read_json(lay.fs, lay.commit_path(
        layout_mod.carved_shard_id("e" * 16, {"gone"})))
    assert kept["recordings"] == [gone]


def test_a_shard_without_a_new_table_holding_none_of_this_runs_recordings_is_left_alone(
        archive: Path, tmp_path: Path) -> None:
    """Another prefix's shard, written before windows were turned on: this run can redo
    none of its recordings, so it is not reopened (nor copied into a shard of its own on
    every run)."""
    from pipeline import layout as layout_mod

    first = prepared(archive, tmp_path, output={"windows": False})
    lay = first.layout
    layout_mod.write_json(lay.fs, lay.commit_path("h" * 16), {
        "shard": "h" * 16, "files": {}, "tables": ["recordings", "errors"],
        "recordings": [{"recording_id": "elsewhere", "source_uri": "/other/x.wav",
                        "outcome": "ok"}]})
    prepared(archive, tmp_path)
    assert sorted(p.name for p in Path(lay.commit_path("h" * 16)).parent.iterdir()) == [
        "h" * 16 + ".json"]


def test_recordings_refused_by_limits_this_run_admits_are_redone_if_still_listed(
        archive: Path, tmp_path: Path) -> None:
    """A run with wider audio limits redoes the listed recordings the earlier limits
    refused; the error row of one no longer listed stays (nothing would replace it)."""
    from pipeline import layout as layout_mod

    first = prepared(archive, tmp_path)
    [a] = first.todo
    lay = first.layout
    refused = {"outcome": "error", "error_type": "TooManyChannels",
               "refused": {"sample_rate_hz": 16_000, "channels": 12}}
    for shard_id, rec in (("f" * 16, {"recording_id": a.recording_id, "source_uri": a.uri}),
                          ("g" * 16, {"recording_id": "gone", "source_uri": "/nowhere/x.wav"})):
        layout_mod.write_json(lay.fs, lay.commit_path(shard_id), {
            "shard": shard_id, "files": {}, "recordings": [{**rec, **refused}]})
    narrow = prepared(archive, tmp_path, audio={"max_channels": 8})
    assert narrow.todo == []
    wide = prepared(archive, tmp_path)
    assert [i.recording_id for i in wide.todo] == [a.recording_id]
    assert not Path(lay.commit_path("f" * 16)).exists()
    assert Path(lay.commit_path("g" * 16)).exists()


def test_retry_errors_naming_no_committed_error_type_says_so(
        archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``run.retry_errors`` naming a type no listed recording was committed with (a typo, a
    case slip, or one whose recordings are redone by now) reopens nothing: the run says
    so, naming the types there are, instead of finishing as if it had retried them."""
    from pipeline import layout as layout_mod

    a, b, lay = two_recordings(archive, tmp_path)
    layout_mod.write_json(lay.fs, lay.commit_path("e" * 16), {
        "shard": "e" * 16, "files": {},
        "recordings": [{"recording_id": a, "outcome": "error", "error_type": "UnreadableAudio"},
                       {"recording_id": b, "outcome": "ok"}]})
    with caplog.at_level("WARNING", logger="pipeline.resume"):
        typo = prepared(archive, tmp_path, run={"retry_errors": ["unreadableaudio"]})
    assert typo.todo == []
    assert ("run.retry_errors names unreadableaudio, which no listed recording was committed "
            "with: no shard is reopened for it (the listed recordings' committed error types: "
            "UnreadableAudio 1;"
            ) in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.resume"):
        both = prepared(archive, tmp_path, run={"retry_errors": ["CorruptAudio",
                                                                 "UnreadableAudio"]})
    assert [i.recording_id for i in both.todo] == [a]
    assert "run.retry_errors names CorruptAudio, which no listed" in caplog.text
    assert "names UnreadableAudio," not in caplog.text


def test_retrying_decoder_crashes_sets_aside_only_the_records_of_listed_recordings(
        archive: Path, tmp_path: Path) -> None:
    """A job over one prefix of an archive with ``run.retry_errors: [DecoderCrashed]`` decodes
    its own crash-recorded recordings again; the records of another prefix's recordings,
    into the same output, stay, so that prefix's next run makes them error rows instead of
    decoding them and failing again."""
    from pipeline import crashes
    from pipeline.sources import SourceItem

    first = prepared(archive, tmp_path)
    [mine] = first.todo
    other = SourceItem(uri="/elsewhere/b.flac", path="/elsewhere/b.flac", size_bytes=10,
                       version="v1", recording_id="cd" * 16)
    crashes.record(first.layout, [mine, other], {mine.recording_id: 4, other.recording_id: 4},
                   "job-1")
    retried = prepared(archive, tmp_path, run={"retry_errors": ["DecoderCrashed"]})
    assert [i.problem for i in retried.todo] == [""]  # decoded again
    assert set(crashes.recorded(first.layout)) == {other.recording_id}


@pytest.mark.parametrize("retrying", [False, True])
def test_a_run_failed_by_crashing_recordings_says_what_its_rerun_does_with_them(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retrying: bool) -> None:
    """More recordings of one task killed their decoders than its retries could set aside:
    the run names and records those it did. Its rerun makes them error rows, unless
    ``run.retry_errors`` names DecoderCrashed, when a rerun of the same config sets the
    records aside and decodes them again: the message must not promise the error rows."""
    from pipeline import crashes
    from pipeline.errors import WorkersCrashed

    j = prepared(archive, tmp_path,
                 run={"retry_errors": ["DecoderCrashed"] if retrying else []})
    [item] = j.todo
    monkeypatch.setattr(crashes, "suspects", lambda ledgers: {item.recording_id: 2})
    said = str(j._name_crashes(WorkersCrashed("a worker died 4 times on the same work")))
    assert said.startswith(f"1 recording killed the processes decoding them, more in one task "
                           f"than its retries could set aside: {item.uri} (2 times); "
                           "recorded under "), said
    if retrying:
        assert said.endswith("so a rerun makes it an error row (DecoderCrashed) and goes on "
                             "only once DecoderCrashed is out of run.retry_errors: with it "
                             "there, as in this run, a rerun sets the crash records aside and "
                             "decodes it again; the shards committed stay"), said
    else:
        assert said.endswith("so a rerun makes it an error row (DecoderCrashed) instead of "
                             "decoding it and goes on; the shards committed stay"), said
    assert set(crashes.recorded(j.layout)) == {item.recording_id}


def test_a_run_failed_by_its_embedding_actors_says_so_beside_the_crashes_it_set_aside(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recording set aside by its quarantined decode is died on twice in the run, which
    goes on; if the run then fails because an embedding actor died on a batch each time
    (an actor's death, not a decode task's), its error is that one, with Ray's advice,
    and names the recording set aside after it: it used to say the recording had run a
    decode task out of retries, hiding the batch that ended the run."""
    from ray.exceptions import ActorUnavailableError

    from pipeline import crashes
    from pipeline.job import _crashed

    j = prepared(archive, tmp_path)
    [item] = j.todo
    monkeypatch.setattr(crashes, "suspects", lambda ledgers: {item.recording_id: 2})
    died = _crashed(ActorUnavailableError("The actor died unexpectedly",
                                          bytes.fromhex("cbaf7929224e6bc65f6f951202000000")))
    assert died is not None
    said = str(j._name_crashes(died))
    assert said.startswith(f"{died}; besides, 1 recording killed the processes decoding it in "
                           f"this run: {item.uri} (2 times); recorded under "), said
    assert said.endswith("so a rerun makes it an error row (DecoderCrashed) instead of "
                         "decoding it and goes on"), said
    assert "more in one task than its retries" not in said
    assert set(crashes.recorded(j.layout)) == {item.recording_id}


def _commit_one_shard(j: EmbeddingJob, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Commit a prepared job's first shard as its write tasks would have left it: ``a.wav``
    embedded, ``bad.wav`` an error. Returns ``recording_id -> uri``."""
    import threading
    import time

    from pipeline import commit as commit_mod
    from pipeline.sink import ShardProgress

    shard_id, items = j.shards[0]
    progress = ShardProgress(shard_id, [i.recording_id for i in items], j.settings.layers)
    for i in items:
        progress.reports[i.recording_id] = (
            {"status": "error", "error_type": "EmptyAudio", "message": "x"}
            if i.uri.endswith("bad.wav") else
            {"status": "ok", "problems": [], "windows": {"-1": 1}, "duration_s": 1.0,
             "source_sample_rate_hz": 16_000, "source_channels": 1})
    monkeypatch.setattr(commit_mod, "reduce_partials", lambda partials, pooling: {
        (i.recording_id, -1, layer): (1, np.ones(768, np.float32))
        for i in items if not i.uri.endswith("bad.wav") for layer in j.settings.layers})
    j._shard_commit().commit(progress, items, time.perf_counter(), threading.Event())
    return {i.recording_id: i.uri for i in items}


def test_a_commit_writes_the_tables_asked_for_and_a_marker_naming_this_job(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """output.recordings false: the commit writes the errors table and no recordings table
    (a commit that wrote it anyway filled a table the config turned off). The marker names
    this job and variant, and each recording with its own outcome."""
    import json

    sf.write(archive / "bad.wav", np.zeros(0, np.float32), 16_000)
    j = job(archive, tmp_path, output={"recordings": False}, model={"precision": "fp32"})
    j.prepare()
    assert "recordings" not in j._tables and len(j.shards) == 1
    uris = _commit_one_shard(j, monkeypatch)
    written = {p.relative_to(tmp_path / "out").parts for p in (tmp_path / "out").rglob("*.parquet")}
    assert any("errors" in " ".join(parts) for parts in written)
    assert not any("recordings" in " ".join(parts) for parts in written)
    marker = json.loads(Path(j.layout.commit_path(j.shards[0][0])).read_text())
    assert (marker["job_id"], marker["variant"]) == (j.job_id, j.variant.id)
    assert {r["source_uri"]: r["outcome"] for r in marker["recordings"]} == {
        uri: "error" if uri.endswith("bad.wav") else "ok" for uri in uris.values()}
    assert {r["recording_id"]: r["source_uri"] for r in marker["recordings"]} == uris


def test_a_lease_lost_while_publishing_leaves_no_marker(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishing can take long on a bucket: the lease is checked again before the marker,
    else a shard the new holder's recovery is deleting would be marked committed."""
    from pipeline.errors import LeaseLostError

    j = job(archive, tmp_path, model={"precision": "fp32"})
    j.prepare()
    checks: list[int] = []

    def check() -> None:
        checks.append(1)
        if len(checks) > 1:
            raise LeaseLostError("taken over while publishing")

    monkeypatch.setattr(j._lease, "check", check)
    with pytest.raises(LeaseLostError):
        _commit_one_shard(j, monkeypatch)
    assert len(checks) == 2 and not Path(j.layout.commit_path(j.shards[0][0])).exists()


def test_a_manifest_whose_columns_differ_from_the_namespaces_rows_is_refused(
        archive: Path, tmp_path: Path) -> None:
    """Rows already written carry site as an integer: a manifest that makes it text, or
    adds a column, would give one namespace two schemas, which readers cannot take."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import layout as layout_mod
    from pipeline.sink import recordings_schema

    def manifest(name: str, text: str) -> dict:
        (archive / name).write_text(text)
        return {"uri": None, "manifest": str(archive / name)}

    first = prepared(archive, tmp_path, input=manifest("m1.csv", "uri,site\na.wav,1\n"))
    lay = first.layout
    written = Path(lay.shard_file("recordings", "a" * 16, 0))
    written.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(recordings_schema(pa.schema([("site", pa.int64())])).empty_table(), written)
    layout_mod.write_json(lay.fs, lay.commit_path("a" * 16), {
        "shard": "a" * 16, "recordings": [{"recording_id": "elsewhere", "outcome": "ok"}],
        "files": {"recordings": [{"path": str(written), "rows": 0}]}})
    for name, text in (("m2.csv", "uri,site\na.wav,A1\n"),
                       ("m3.csv", "uri,site,habitat\na.wav,1,reef\n"), ("m4.csv", "uri\na.wav\n")):
        with pytest.raises(ConfigError, match=r"carry the manifest columns \[site: int64\]") as err:
            job(archive, tmp_path, input=manifest(name, text)).prepare()
        assert err.value.field == "input.manifest"
    for name, text in (("m5.csv", "uri,site\na.wav,7\n"), ("m6.csv", "uri,site\na.wav,\n")):
        again = job(archive, tmp_path, input=manifest(name, text))
        again.prepare()  # same type, or a column left empty: takes the stored type
        again._lease.release()
        assert again.listing.extras.schema.field("site").type == pa.int64()
    # A column empty in the first run is stored as text (never Arrow's null type, which a
    # later run's values could not join); values of a later run join it as text.
    (tmp_path / "t").mkdir()
    empty = prepared(archive, tmp_path / "t", input=manifest("m7.csv", "uri,notes\na.wav,\n"))
    assert empty.listing.extras.schema.field("notes").type == pa.string()
    stored = Path(empty.layout.shard_file("recordings", "b" * 16, 0))
    stored.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(recordings_schema(empty.listing.extras.schema).empty_table(), stored)
    layout_mod.write_json(empty.layout.fs, empty.layout.commit_path("b" * 16), {
        "shard": "b" * 16, "recordings": [{"recording_id": "elsewhere", "outcome": "ok"}],
        "files": {"recordings": [{"path": str(stored), "rows": 0}]}})
    later = prepared(archive, tmp_path / "t", input=manifest("m8.csv", "uri,notes\na.wav,42\n"))
    assert later.listing.extras.column("notes").to_pylist() == ["42"]


def test_a_manifest_with_its_columns_reordered_writes_them_in_the_stored_order(
        archive: Path, tmp_path: Path) -> None:
    """BigQuery loads the files of one table only if their columns come in one order: a
    rerun whose manifest header lists the same columns in another order writes the
    namespace's order."""
    (archive / "m1.csv").write_text("uri,site,calls\na.wav,north,3\n")
    first = prepared_on(archive, tmp_path, {"uri": None, "manifest": str(archive / "m1.csv")})
    table = error_row_of(first)
    (archive / "m2.csv").write_text("uri,calls,site\na.wav,4,south\n")
    again = prepared_after_committing(table, first, archive, tmp_path,
                                      {"uri": None, "manifest": str(archive / "m2.csv")})
    assert again.listing.extras.schema.names == ["site", "calls"]
    assert again.listing.extras.to_pylist() == [{"site": "south", "calls": 4}]
    assert error_row_of(again).schema.names == table.schema.names


def test_a_manifest_column_another_variant_stores_in_another_type_is_warned_about(
        archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each variant keeps one schema, but ``site`` as text in one variant and a number in
    the next broke Spark's ``mergeSchema`` and Polars over the whole root, silently: the
    second run now says so, naming the column, both types and the other variant."""
    (archive / "m1.csv").write_text("uri,site,calls\na.wav,north,3\n")
    (archive / "m2.csv").write_text("uri,site,calls\na.wav,7,4\n")
    first = prepared_on(archive, tmp_path, {"uri": None, "manifest": str(archive / "m1.csv")})
    with caplog.at_level("WARNING", logger="pipeline.resume"):
        again = job(archive, tmp_path, input={"uri": None, "manifest": str(archive / "m1.csv")})
        again.prepare()  # the same variant, the same columns: nothing to say
        again._lease.release()
        assert not [r for r in caplog.records if r.name == "pipeline.resume"]
        other = job(archive, tmp_path, input={"uri": None, "manifest": str(archive / "m2.csv")},
                    windows={"hop_s": 1.25})
        other.prepare()
    assert other.variant.id != first.variant.id
    [warning] = [r.getMessage() for r in caplog.records if r.name == "pipeline.resume"]
    assert (f"'site' is int64 here (model beats, variant {other.variant.id}) but string in 1 "
            f"other namespace(s)") in warning and first.variant.id in warning
    assert "'calls'" not in warning  # int64 in both
    records = sorted((tmp_path / "out" / "_variants").glob("*.columns.json"))
    assert [r.name for r in records] == sorted(f"{v.variant.id}.columns.json"
                                               for v in (first, other))


def test_a_manifest_column_only_one_variant_has_is_no_clash(
        archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Variants of one root with different manifest columns: a column another namespace
    lacks has no other type there, and a run must neither warn of it nor fail on it."""
    (archive / "m1.csv").write_text("uri,site\na.wav,north\n")
    (archive / "m2.csv").write_text("uri,calls\na.wav,4\n")
    prepared_on(archive, tmp_path, {"uri": None, "manifest": str(archive / "m1.csv")})
    with caplog.at_level("WARNING", logger="pipeline.resume"):
        other = job(archive, tmp_path, input={"uri": None, "manifest": str(archive / "m2.csv")},
                    windows={"hop_s": 1.25})
        other.prepare()
        other._lease.release()
    assert not [r for r in caplog.records if r.name == "pipeline.resume"]


def prepared_on(archive: Path, tmp_path: Path, inputs: dict[str, Any]) -> EmbeddingJob:
    """A first run of ``inputs``, prepared (its lease given back)."""
    first = prepared(archive, tmp_path, input=inputs)
    return first


def error_row_of(j: EmbeddingJob) -> pa.Table:
    """An error row of ``j``'s one recording, as the job writes it (its manifest columns)."""
    [item] = j.todo
    return rows_to_table([{"recording_id": item.recording_id, "error_type": "X", "message": "m"}],
                         errors_schema(j.listing.extras.schema), j._sources_table(j.todo),
                         j.provenance.row_columns())


def test_manifest_columns_are_checked_against_a_file_that_is_still_there(
        archive: Path, tmp_path: Path) -> None:
    """The first committed file (by shard) was deleted by hand; the next one still tells
    the namespace's columns, and a manifest with other columns is refused, not let in."""
    from pipeline import layout as layout_mod
    from pipeline.sink import write_parquet

    (archive / "m1.csv").write_text("uri,site\na.wav,north\n")
    (archive / "m2.csv").write_text("uri,site,calls\na.wav,north,3\n")
    first = prepared_on(archive, tmp_path, {"uri": None, "manifest": str(archive / "m1.csv")})
    lay = first.layout
    for shard_id in ("a" * 16, "b" * 16):
        path = lay.shard_file("errors", shard_id, 0)
        layout_mod.write_json(lay.fs, lay.commit_path(shard_id), {
            "shard": shard_id, "recordings": [{"recording_id": shard_id, "outcome": "error"}],
            "files": {"errors": [{"path": path, "rows": 1}]}})
    write_parquet(error_row_of(first), lay.shard_file("errors", "b" * 16, 0), {}, 100, "zstd")
    with pytest.raises(ConfigError, match=r"carry the manifest columns \[site: string\]"):
        job(archive, tmp_path, input={"uri": None, "manifest": str(archive / "m2.csv")}).prepare()


def test_a_namespace_with_nothing_committed_records_the_columns_of_its_latest_run(
        archive: Path, tmp_path: Path) -> None:
    """A first run stopped before committing anything; the next brings other manifest
    columns, which the namespace's rows will carry: its columns record says so (other
    variants' runs warn against it)."""
    import json

    (archive / "m1.csv").write_text("uri,site\na.wav,7\n")
    (archive / "m2.csv").write_text("uri,site\na.wav,north\n")
    first = prepared_on(archive, tmp_path, {"uri": None, "manifest": str(archive / "m1.csv")})
    record = Path(first.layout.columns_path())
    assert json.loads(record.read_text())["columns"] == {"site": "int64"}
    prepared_on(archive, tmp_path, {"uri": None, "manifest": str(archive / "m2.csv")})
    assert json.loads(record.read_text())["columns"] == {"site": "string"}


def test_manifest_columns_are_compared_as_parquet_stores_them(archive: Path,
                                                              tmp_path: Path) -> None:
    """A CSV's timestamps are read in seconds, which Parquet stores in milliseconds: the
    same manifest twice (make demo twice) must not look like two schemas."""
    (archive / "m.csv").write_text("uri,recorded_at\na.wav,2026-05-06T05:15:00Z\n")
    inputs = {"uri": None, "manifest": str(archive / "m.csv")}
    first = prepared_on(archive, tmp_path, inputs)
    table = error_row_of(first)
    assert str(table.schema.field("recorded_at").type) == "timestamp[s, tz=UTC]"
    prepared_after_committing(table, first, archive, tmp_path, inputs)


def prepared_after_committing(errors: pa.Table, first: EmbeddingJob, archive: Path,
                              tmp_path: Path, inputs: dict[str, Any]) -> EmbeddingJob:
    """A job of ``inputs`` prepared after ``first`` committed a shard of ``errors`` rows."""
    from pipeline import layout as layout_mod
    from pipeline.sink import write_parquet

    path = first.layout.shard_file("errors", "a" * 16, 0)
    write_parquet(errors, path, {}, 100, "zstd")
    layout_mod.write_json(first.layout.fs, first.layout.commit_path("a" * 16), {
        "shard": "a" * 16, "recordings": [{"recording_id": "other", "outcome": "error"}],
        "files": {"errors": [{"path": path, "rows": 1}]}})
    again = prepared(archive, tmp_path, input=inputs)
    return again


@pytest.mark.parametrize("stored", [pa.timestamp("ns", "UTC"), pa.uint32(),
                                    pa.dictionary(pa.int32(), pa.string())])
def test_a_namespace_an_earlier_version_wrote_in_other_types_is_resumed(
        archive: Path, tmp_path: Path, stored: pa.DataType) -> None:
    """Earlier versions stored a manifest's nanosecond times, unsigned integers and
    dictionaries as read; this one writes them portably (microseconds, int64, plain), and
    a rerun into such a namespace keeps the stored type instead of refusing it."""
    value = {"timestamp[ns, tz=UTC]": "2026-05-06T05:15:00.250Z", "uint32": "7"}.get(
        str(stored), "north")
    (archive / "m.csv").write_text(f"uri,x\na.wav,{value}\n")
    inputs = {"uri": None, "manifest": str(archive / "m.csv")}
    first = prepared(archive, tmp_path, input=inputs)
    [item] = first.todo
    old = first.listing.extras.set_column(0, pa.field("x", stored),
                                          first.listing.extras.column("x").cast(stored))
    table = rows_to_table([{"recording_id": item.recording_id, "error_type": "X", "message": "m"}],
                          errors_schema(old.schema), first._sources_table(first.todo).drop_columns(
                              ["x"]).append_column(pa.field("x", stored), old.column("x")),
                          first.provenance.row_columns())
    again = prepared_after_committing(table, first, archive, tmp_path, inputs)
    assert again.listing.extras.schema.field("x").type == stored


@pytest.mark.parametrize(("stored", "given", "value", "joins"), [
    # DuckDB writes microseconds where a CSV's times were stored in milliseconds
    (pa.timestamp("ms", "UTC"), pa.timestamp("us", "UTC"), 1_778_044_500_250_000, True),
    (pa.timestamp("ms", "UTC"), pa.timestamp("us", "UTC"), 1_778_044_500_250_001, False),
    (pa.timestamp("ms", "UTC"), pa.timestamp("ms"), 1_778_044_500_250, False),  # no zone
    (pa.int64(), pa.float64(), 3.0, True),
    (pa.int64(), pa.float64(), 3.5, False),
    (pa.float64(), pa.int32(), 7, True),
    (pa.float64(), pa.float32(), 0.5, True),
    (pa.float32(), pa.float64(), 0.5, False),  # pyarrow rounds to a narrower float unchecked
    (pa.int64(), pa.string(), "3", False),
])
def test_a_manifest_in_other_types_joins_a_namespace_where_its_values_carry_over_exactly(
        archive: Path, tmp_path: Path, stored: pa.DataType, given: pa.DataType, value: Any,
        joins: bool) -> None:
    """A manifest written another way (CSV, then Parquet from DuckDB) gives a column another
    width or unit: it takes the namespace's type when every value fits it exactly, else the
    run is refused, naming both types."""
    import pyarrow.parquet as pq

    (archive / "m.csv").write_text("uri,x\na.wav,1\n")
    first = prepared(archive, tmp_path, input={"uri": None, "manifest": str(archive / "m.csv")})
    [item] = first.todo
    stored_x = pa.array([1], pa.int64()).cast(stored) if not pa.types.is_timestamp(stored) else \
        pa.array([0], stored)
    table = rows_to_table([{"recording_id": item.recording_id, "error_type": "X", "message": "m"}],
                          errors_schema(pa.schema([("x", stored)])),
                          first._sources_table(first.todo).drop_columns(["x"]).append_column(
                              pa.field("x", stored), stored_x),
                          first.provenance.row_columns())
    pq.write_table(pa.table({"uri": ["a.wav"], "x": pa.array([value], given)}),
                   archive / "m.parquet")
    inputs = {"uri": None, "manifest": str(archive / "m.parquet")}
    if not joins:
        with pytest.raises(ConfigError, match=re.escape(f"x: {stored}]; this run's would "
                                                         f"carry [x: {given}]")) as err:
            prepared_after_committing(table, first, archive, tmp_path, inputs)
        assert err.value.field == "input.manifest"
        return
    again = prepared_after_committing(table, first, archive, tmp_path, inputs)
    x = again.listing.extras.column("x")
    assert x.type == stored and x.to_pylist() == pa.array([value], given).cast(stored).to_pylist()


@pytest.mark.parametrize("name, later", [
    ("m2.csv", "uri,recorded_at,code,flag\na.wav,2026-05-01T05:10:00Z,1.10,TRUE\n"),
    ("m2.jsonl", ('{"uri": "a.wav", "recorded_at": "2026-05-01T05:10:00Z", "code": "1.10", '
                  '"flag": "TRUE"}\n')),
])
def test_values_that_join_a_column_stored_as_text_keep_the_manifests_spelling(
        archive: Path, tmp_path: Path, name: str, later: str) -> None:
    """A column the namespace stores as text (a first manifest had ``unknown`` among its
    times, ``A1`` among its codes) takes a later manifest's values as that manifest spells
    them: pyarrow's rendering of the type it inferred would write ``2026-05-01 05:10:00Z``
    beside the first run's ``2026-05-01T05:10:00Z`` in one column (a text comparison then
    orders them wrongly), and the code ``1.10`` as ``1.1``, another code."""
    (archive / "m1.csv").write_text("uri,recorded_at,code,flag\na.wav,unknown,A1,maybe\n")
    first = prepared_on(archive, tmp_path, {"uri": None, "manifest": str(archive / "m1.csv")})
    assert set(first.listing.extras.schema.types) == {pa.string()}
    (archive / name).write_text(later)
    again = prepared_after_committing(error_row_of(first), first, archive, tmp_path,
                                      {"uri": None, "manifest": str(archive / name)})
    assert again.listing.extras.to_pylist() == [
        {"recorded_at": "2026-05-01T05:10:00Z", "code": "1.10", "flag": "TRUE"}]


def test_an_empty_cell_is_missing_whatever_the_columns_other_cells_hold(
        archive: Path, tmp_path: Path) -> None:
    """An empty CSV cell is NULL in a column of empty cells alone (``site`` in the first
    run), in a text column with values (``site`` in the second), and in numbers spelled as
    text to join a column stored as text (``code``): it was ``''`` in the last two, so one
    output column held both, and ``WHERE site IS NULL`` missed the second run's rows."""
    sf.write(archive / "b.wav", np.zeros(16_000, np.float32), 16_000)
    (archive / "m1.csv").write_text("uri,code,site\na.wav,A1,\n")
    first = prepared_on(archive, tmp_path, {"uri": None, "manifest": str(archive / "m1.csv")})
    assert first.listing.extras.to_pylist() == [{"code": "A1", "site": None}]
    (archive / "m2.csv").write_text("uri,code,site\na.wav,,north\nb.wav,7,\n")
    again = prepared_after_committing(error_row_of(first), first, archive, tmp_path,
                                      {"uri": None, "manifest": str(archive / "m2.csv")})
    assert again.listing.extras.to_pylist() == [{"code": None, "site": "north"},
                                                {"code": "7", "site": None}]


@pytest.mark.parametrize("replace", [True, False])
def test_a_changed_object_replaces_its_earlier_versions_rows(archive: Path, tmp_path: Path,
                                                             replace: bool) -> None:
    """A rewritten object is a new recording (new version, new id); the shard holding the
    earlier version is reopened, so the tables hold the object once, and only that version
    leaves it: the shard's other recordings keep their rows (they were embedded again,
    whole shard, before). A recording no longer listed at all keeps its rows too."""
    from pipeline import layout as layout_mod

    sf.write(archive / "b.wav", np.zeros(16_000, np.float32), 16_000)
    first = prepared(archive, tmp_path)
    a, b = first.todo
    lay = first.layout
    old_a = {"recording_id": "a-before-it-changed", "source_uri": a.uri, "outcome": "ok"}
    gone = {"recording_id": "gone", "source_uri": "/nowhere/x.wav", "outcome": "ok"}
    markers = {"a" * 16: [old_a, {"recording_id": b.recording_id, "source_uri": b.uri,
                                  "outcome": "ok"}],
               "c" * 16: [{**old_a, "recording_id": "another-old-a"}, gone]}
    for shard_id, recs in markers.items():
        layout_mod.write_json(lay.fs, lay.commit_path(shard_id),
                              {"shard": shard_id, "recordings": recs, "files": {}})
    again = prepared(archive, tmp_path, run={"replace_changed_sources": replace})
    if replace:  # only the earlier version leaves the shard: b keeps its rows, carved out
        assert [i.recording_id for i in again.todo] == [a.recording_id]
        assert not Path(lay.commit_path("a" * 16)).exists()
        kept = layout_mod.read_json(lay.fs, lay.commit_path(
            layout_mod.carved_shard_id("a" * 16, {b.recording_id})))
        assert [r["recording_id"] for r in kept["recordings"]] == [b.recording_id]
    else:
        assert [i.recording_id for i in again.todo] == [a.recording_id]
        assert Path(lay.commit_path("a" * 16)).exists()
    # c's earlier version of a goes; "gone", no longer listed, keeps its rows in a shard of
    # its own (with replace off nothing of c is replaced, so c stays as it is).
    assert Path(lay.commit_path("c" * 16)).exists() is not replace
    carved = Path(lay.commit_path(layout_mod.carved_shard_id("c" * 16, {"gone"})))
    assert carved.exists() is replace
    if replace:
        assert layout_mod.read_json(lay.fs, str(carved))["recordings"] == [gone]
    if replace:  # an object that cannot be read at listing time replaces nothing
        (archive / "m.csv").write_text(f"uri\n{a.uri}\n/no/such/b.wav\n")
        layout_mod.write_json(lay.fs, lay.commit_path("d" * 16), {
            "shard": "d" * 16, "files": {},
            "recordings": [{"recording_id": "b-when-it-existed", "source_uri": "/no/such/b.wav",
                            "outcome": "ok"}]})
        prepared(archive, tmp_path, input={"uri": None, "manifest": str(archive / "m.csv")})
        assert Path(lay.commit_path("d" * 16)).exists()


@pytest.mark.parametrize("phase", ["prepare", "run"])
@pytest.mark.parametrize("error", [
    pytest.param(lambda: NamespaceBusyError("job other is running"), id="busy"),
    pytest.param(lambda: CheckpointMismatchError("checkpoint changed"), id="checkpoint"),
    pytest.param(lambda: PermissionError("403 Forbidden"), id="forbidden")])
def test_what_prepare_refuses_exits_2_and_what_stops_a_run_exits_1(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], phase: str, error: Any) -> None:
    """Exit 2 promises nothing ran; once run() started, shards may be committed and the job
    record says failed (exit 1): a lease lost, a checkpoint changed under an actor, a bucket
    refusing a write are failures then, whatever their type."""
    from pipeline import cli

    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{uri: {archive}}}\nmodel: {{name: beats, weights: random}}\n"
                      f"output: {{uri: {tmp_path / 'out'}}}\n")

    def fails(self: EmbeddingJob) -> None:
        raise error()

    monkeypatch.setattr(EmbeddingJob, "prepare", fails if phase == "prepare" else lambda self: None)
    monkeypatch.setattr(EmbeddingJob, "run", fails)
    assert cli.main(["run", str(config)]) == (2 if phase == "prepare" else 1)
    shown = capsys.readouterr().err
    assert shown.startswith("embed-archive: " + ("error" if phase == "prepare" else "failed"))
    assert shown.count("\n") == 1


def test_a_lost_lease_is_a_failure_not_a_refusal(archive: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import cli
    from pipeline.errors import LeaseLostError

    def lost(self: EmbeddingJob) -> None:
        raise LeaseLostError("lost the lease")

    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{uri: {archive}}}\noutput: {{uri: {tmp_path / 'out'}}}\n")
    monkeypatch.setattr(EmbeddingJob, "prepare", lambda self: None)
    monkeypatch.setattr(EmbeddingJob, "run", lost)
    assert cli.main(["run", str(config)]) == 1
    assert not isinstance(LeaseLostError("x"), NamespaceBusyError)


def test_a_summary_counts_the_error_rows_earlier_runs_left() -> None:
    """A rerun that finds everything committed says "succeeded": it must not read as if
    every recording had been embedded."""
    from pipeline.summary import JobSummary

    shown = JobSummary(job_id="j", output_uri="/out", model="m", variant="v", weights="w",
                       recordings_listed=3, recordings_already_done=3,
                       recordings_already_failed=1).render()
    assert "3 already done of 3 listed (1 of them errors, in the errors table)" in shown
    assert "of them errors" not in JobSummary(job_id="j", output_uri="/out", model="m", weights="w",
                                              variant="v").render()


@pytest.mark.parametrize(("stop", "said", "code"), [
    (SystemExit(15), "stopped by SIGTERM (`embed-archive stop`, or a scheduler)", 15),
    (KeyboardInterrupt(), "interrupted (SIGINT)", 130)])
def test_a_stopped_run_is_recorded_as_stopped_not_failed(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        stop: BaseException, said: str, code: int) -> None:
    """Ray's driver turns SIGTERM (`embed-archive stop`, a scheduler) into SystemExit(15):
    the job record and `inspect` said "failed: SystemExit: 15". The record is final, and
    the lease released, before the job stops the Ray it started: a SIGTERM to the whole
    process group kills Ray with the driver, and `ray.shutdown()` then aborted the driver
    before either (the record stayed "running", its commits uncounted)."""
    import json

    from pipeline.catalog import load_catalog, render

    j = job(archive, tmp_path)
    j._owns_ray = True
    done: list[str] = []
    record_path = tmp_path / "out" / "_jobs" / f"{j.job_id}.json"

    def stopped(*_: Any) -> None:
        raise stop

    def stop_ray() -> None:
        record = json.loads(record_path.read_text())
        done.append(f"ray stopped, record {record['summary']['status']}, lease "
                    f"{'held' if j._lease._held else 'released'}")

    monkeypatch.setattr(j, "_run_shards", stopped)
    monkeypatch.setattr(j, "_stop_ray", stop_ray)
    with pytest.raises(type(stop)):
        j.run()
    assert done == ["ray stopped, record stopped, lease released"]
    summary = json.loads(record_path.read_text())["summary"]
    assert (summary["status"], summary["message"], summary["exit_code"]) == ("stopped", said, code)
    assert f"      stopped: {said}" in render(load_catalog(str(tmp_path / "out")))


def _model_error_in_an_actor() -> BaseException:
    """A model's error in an embedding actor, as the driver gets it: Ray Data wraps it in
    UserCodeException, and Ray in a RayTaskError whose text is the worker's whole traceback
    (the error itself does not cross the process boundary, only its text)."""
    import traceback

    from ray.exceptions import RayTaskError, UserCodeException

    def forward() -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n"
                           "See documentation for Memory Management")

    try:
        try:
            forward()
        except RuntimeError as err:
            raise UserCodeException("UDF failed to process a data block.\nFailed to apply UDF "
                                    "transform after 1/1 attempts") from err
    except UserCodeException as err:
        return RayTaskError("submit", traceback.format_exc(), err, pid=1, ip="127.0.0.1",
                            proctitle="ray::MapWorker(MapBatches(Embedder)).submit"
                            ).as_instanceof_cause()
    raise AssertionError("unreachable")


def _run_cli(archive: Path, tmp_path: Path, *overrides: str) -> int:
    from pipeline import cli

    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{uri: {archive}}}\nmodel: {{name: beats, weights: random}}\n"
                      f"output: {{uri: {tmp_path / 'out'}}}\nrun: {{progress: false}}\n")
    return cli.main(["run", str(config), *[f"--set={o}" for o in overrides]])


def test_a_model_error_in_an_actor_is_one_line_in_the_record_inspect_and_the_cli(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A model's error inside an embedding actor (a CUDA out-of-memory) ended `run` with
    Python's traceback of Ray's traceback (35 lines, the last Ray Data's advice to configure
    a DataContext), and the job record's message, the summary's note and `inspect` quoted
    Ray's text, whose first line names a process: "RayTaskError(UserCodeException): ray::
    MapWorker(...) (pid=..., actor_id=...)". The error raised there is named instead, in
    one line; its traceback is logged at DEBUG."""
    import json

    from pipeline.catalog import load_catalog, render

    def failing(*_: Any) -> None:
        raise _model_error_in_an_actor()

    monkeypatch.setattr(EmbeddingJob, "_run_shards", failing)
    with caplog.at_level(logging.DEBUG, logger="pipeline.cli"):
        assert _run_cli(archive, tmp_path) == 1
    said = ("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (raised in "
            "ray::MapWorker(MapBatches(Embedder)).submit()); the shards committed stay, and a "
            "rerun resumes (its traceback: --set run.log_level=DEBUG, and Ray logs)")
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == f"embed-archive: failed: {said}"
    assert "Traceback" not in captured.err
    assert f"  note         {said}\n" in captured.out
    [record_path] = (tmp_path / "out" / "_jobs").glob("*.json")
    summary = json.loads(record_path.read_text())["summary"]
    assert (summary["status"], summary["exit_code"], summary["message"]) == ("failed", 1, said)
    assert "      failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (raised " \
        in render(load_catalog(str(tmp_path / "out")))
    # Not lost: the whole of it, the worker's traceback included, at DEBUG.
    [logged] = [r for r in caplog.records if r.message == "the run failed"]
    assert logged.levelno == logging.DEBUG and logged.exc_info is not None
    assert "See documentation for Memory Management" in str(logged.exc_info[1])


@pytest.mark.parametrize(("stop", "code", "said"), [
    (SystemExit(15), 15, "stopped by SIGTERM"), (KeyboardInterrupt(), 130, "interrupted (SIGINT)")])
def test_a_stopped_run_ends_with_a_line_saying_so(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], stop: BaseException, code: int, said: str) -> None:
    """Ctrl-C ended with "embed-archive: interrupted", and SIGTERM (`embed-archive stop`, a
    scheduler) with no line of ours at all: the last lines were Ray's dump of the signal's
    C++ stack. Each says what stopped the run, and what it leaves."""

    def stopped(*_: Any) -> None:
        raise stop

    monkeypatch.setattr(EmbeddingJob, "_run_shards", stopped)
    try:
        got = _run_cli(archive, tmp_path)
    except SystemExit as err:
        got = err.code
    assert got == code
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"embed-archive: {said}; the shards committed stay, and a rerun resumes"


def test_a_worker_crash_says_what_to_do_within_what_inspect_shows() -> None:
    """Ray's words came first in the message ("... (ActorUnavailableError: The actor
    cbaf7929... is unavailable: The actor is temporarily unavailable: RpcError: ..."), and
    `inspect`, which shows a record's first 160 characters, showed them and no advice."""
    from ray.exceptions import ActorUnavailableError

    from pipeline.catalog import _clip
    from pipeline.job import _crashed

    said = _crashed(ActorUnavailableError(
        "The actor is temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14",
        bytes.fromhex("cbaf7929224e6bc65f6f951202000000")))
    assert said is not None
    shown = _clip(f"WorkersCrashed: {said}", 160)
    assert "lower model.batch_size" in shown and "cbaf7929" not in shown
    assert str(said).endswith("Socket closed rpc_code: 14. The task may or may not have been "
                              "executed on the a...)")  # Ray's words still there, last


def test_a_sigterm_before_ray_starts_exits_15_as_after(archive: Path, tmp_path: Path) -> None:
    """`embed-archive stop` and a scheduler's cancel send SIGTERM, which `run` ends with 15
    (README, Exit status) through the handler `ray.init` installs. Before Ray started
    (the weights fetched, a manifest looked up, the markers read: minutes on a large
    archive) Python's default killed the driver instead: 143, and once the lease was taken,
    left it held for the next run to wait out."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{uri: {archive}}}\nmodel: {{name: beats, weights: random}}\n"
                      f"output: {{uri: {tmp_path / 'out'}}}\n")
    marker = tmp_path / "hang"
    marker.touch()
    # Planned: the namespace's lease taken, Ray not started yet.
    env = {**os.environ, "EMBED_ARCHIVE_FAULT": f"planned+hang:{marker}"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not marker.exists(), "the driver never reached the end of its planning"
        leases = list((tmp_path / "out" / "_leases").rglob("*.json"))
        assert leases, "no lease held while planned"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 15
        assert not any(p.exists() for p in leases)  # released, not left for the next run
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("section", ["output", "input"])
def test_a_store_it_cannot_connect_to_fails_at_once(archive: Path, tmp_path: Path,
                                                    section: str) -> None:
    """An unresolvable bucket took four minutes to fail (six rounds of our retries, each
    over the storage library's own), a closed port 75 s: no connection at the first
    contact is raised at once. A store that answers (a 503) is retried as ever."""
    import socket

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from pipeline.errors import StorageError

    class Unreachable(MemoryFileSystem):
        protocol = ("unreachable", "gs")  # stands for gcsfs, which retries connections itself
        calls = 0

        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            type(self).calls += 1
            raise ConnectionError("Cannot connect to host storage.example:443") from (
                socket.gaierror(-2, "Name or service not known"))

        exists = info

    class Busy(MemoryFileSystem):
        protocol = ("busy", "gs")
        calls = 0

        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            type(self).calls += 1
            if type(self).calls == 1:
                raise OSError(errno.EBUSY, "503 SlowDown")
            return super().info(path, **kwargs)

    protocol = f"unreachable{section}"  # filesystems are cached by protocol
    fsspec.register_implementation(protocol, Unreachable, clobber=True)
    with pytest.raises(StorageError, match=rf"^cannot reach {protocol}://bucket/x: "
                                           r"ConnectionError: Cannot connect to host"):
        job(archive, tmp_path, **{section: {"uri": f"{protocol}://bucket/x"}}).prepare()
    assert Unreachable.calls == 1
    if section == "output":
        fsspec.register_implementation("busy", Busy, clobber=True)
        job(archive, tmp_path, output={"uri": "busy://bucket/x"}).prepare()
        assert Busy.calls >= 2


def variant_of(archive: Path, tmp_path: Path, **sections: dict) -> str:
    """The variant id a config resolves to (the model resolved, nothing listed or written)."""
    made = job(archive, tmp_path, **sections)
    made._resolve_model()
    return made._build_variant().id


@pytest.mark.parametrize(("section", "setting"), [
    ("windows", {"window_s": 2.0}), ("windows", {"hop_s": 1.0}), ("windows", {"tail": "keep"}),
    ("windows", {"tail": "drop"}), ("windows", {"min_tail_s": 0.5}),
    ("audio", {"channels": "each"}), ("audio", {"resample_quality": "VHQ"}),
    ("output", {"recording_pooling": "max"}), ("model", {"pooling": "max"}),
    ("model", {"layers": [0]}), ("model", {"options": {"encoder_layers": 2}}),
    ("model", {"precision": "int8"}),
])
def test_every_setting_that_changes_the_embeddings_is_another_variant(
        archive: Path, tmp_path: Path, section: str, setting: dict) -> None:
    """A rerun with any of them would otherwise resume into, and mix its rows with, the
    namespace of embeddings computed another way."""
    assert variant_of(archive, tmp_path, **{section: setting}) != variant_of(archive, tmp_path)


@pytest.mark.parametrize(("section", "setting"), [
    ("model", {"batch_size": 3}), ("run", {"shard_size": 8}), ("output", {"file_mb": 32}),
    ("output", {"windows": False}), ("compute", {"num_cpus": 1}), ("run", {"max_attempts": 5}),
    ("audio", {"max_channels": 4}),
])
def test_settings_that_leave_the_embeddings_alone_keep_the_variant(
        archive: Path, tmp_path: Path, section: str, setting: dict) -> None:
    """So a rerun that only changes how the work is done resumes the same namespace."""
    assert variant_of(archive, tmp_path, **{section: setting}) == variant_of(archive, tmp_path)


def test_an_output_inside_the_input_is_warned_about(
        archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Outputs written among the recordings (windows/, _jobs/...) are walked by every later
    listing: said at the start, naming output.uri (a whole bucket as input, embeddings
    under a prefix of it, is a layout some archives have: not refused)."""
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        job(archive, tmp_path, output={"uri": str(archive / "embeddings")}).prepare()
    said = [r.getMessage() for r in caplog.records if "inside input.uri" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"output.uri {archive / 'embeddings'} is")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        prepared(archive, tmp_path)  # output beside the input: no word
    assert not [r for r in caplog.records if "input.uri" in r.getMessage()]


def test_an_output_that_is_the_input_itself_is_refused(archive: Path, tmp_path: Path) -> None:
    """However spelled: the job's tables would be written among the recordings (nested
    outputs are only warned about, above)."""
    for output in (str(archive), f"{archive}/", f"file://{archive}"):
        with pytest.raises(ConfigError, match="is input.uri itself") as err:
            job(archive, tmp_path, output={"uri": output}).prepare()
        assert err.value.field == "output.uri"
    assert sorted(p.name for p in archive.iterdir()) == ["a.wav"]


@pytest.mark.usefixtures("ray_not_started")
def test_fp16_without_gpus_for_the_actors_is_refused_before_ray_starts(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was refused by every actor as it loaded, after Ray started (exit 1, 410 lines).
    bf16 runs on CPUs too: not refused."""
    import ray
    import torch

    from pipeline import job as job_mod

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a GPU machine too
    for compute, words in (({}, "no GPU here"), ({"gpus_per_actor": 0}, "gpus_per_actor is 0")):
        with pytest.raises(ConfigError, match=f"fp16 runs on GPU actors only.*{words}") as err:
            job(archive, tmp_path, model={"precision": "fp16"}, compute=compute).prepare()
        assert err.value.field == "model.precision"
        assert not (tmp_path / "out").exists()
    assert prepared(archive, tmp_path, model={"precision": "bf16"}).variant.precision == "bf16"
    # A cluster: its GPUs now, or GPUs asked for (an autoscaler adds them).
    monkeypatch.setattr(job_mod, "connect_ray", lambda cfg: False)
    monkeypatch.setattr(ray, "nodes", list)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError, match="the cluster has no GPU for them now"):
        job(archive, tmp_path / "c", model={"precision": "fp16"},
            compute={"address": "auto"}).prepare()
    assert prepared(archive, tmp_path / "c", model={"precision": "fp16"},
                    compute={"address": "auto", "gpus_per_actor": 1, "embed_actors": 1}
                    ).variant.precision == "fp16"
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    assert prepared(archive, tmp_path / "c", model={"precision": "fp16"},
                    compute={"address": "auto"}).variant.precision == "fp16"


@pytest.mark.parametrize(("sections", "field", "text"), [
    ({"compute": {"decode_memory_mb": 10**9}}, "compute.decode_memory_mb",
     "each decode task reserves 1000000000 MiB, more than the"),
    ({"compute": {"object_store_memory_mb": 10**9}}, "compute.object_store_memory_mb",
     "1000000000 MiB is more than this machine's memory"),
    ({"model": {"batch_size": 10**9}}, "model.batch_size",
     "a few window batches (1000000000 windows of 5 s: 291 TiB each)"),
    ({"windows": {"window_s": 1e12}}, "windows.window_s", "one 1e+12 s window is 57 PiB"),
    ({"audio": {"batch_windows": 10**9}}, "audio.batch_windows",
     "a decode block of 1000000000 windows of 5 s is 291 TiB"),
    ({"output": {"file_mb": 1e12}}, "output.file_mb", "one output file's rows (1e+12 MB)"),
])
@pytest.mark.usefixtures("ray_not_started")
def test_sizes_no_memory_here_holds_are_refused_before_ray_starts(
        archive: Path, tmp_path: Path, sections: dict, field: str, text: str) -> None:
    """A decode task reserving more memory than Ray gives tasks waited for the stall
    timeout; a batch larger than memory made every recording a MemoryError row; a window
    that large, a traceback; an object store that large, Ray's ValueError."""
    with pytest.raises(ConfigError) as err:
        job(archive, tmp_path, **sections).prepare()
    assert err.value.field == field
    assert text in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("ray_not_started")
def test_long_windows_and_large_batches_a_machine_holds_are_not_refused(
        archive: Path, tmp_path: Path) -> None:
    """10-minute windows of EfficientNet, 16 to a batch: 586 MiB a batch, ~2.4 GiB a CPU
    actor's forward pass (BEATs' attention makes one 10-minute window ~145 GiB: refused)."""
    prepared(archive, tmp_path, windows={"window_s": 600.0},
             model={"name": "efficientnet_b0", "batch_size": 16})


@pytest.mark.parametrize(("window_s", "batch", "compute", "field", "advice"), [
    (120.0, 1, {"embed_actors": 1}, "windows.window_s", "windows of at most 89 s fit"),
    (60.0, 256, {"embed_actors": 1}, "model.batch_size", "batches of at most 117 windows fit"),
    (60.0, 16, {"embed_actors": 3, "num_cpus": 4}, "compute.embed_actors",
     "at most 1 actor of such batches fit"),
])
@pytest.mark.usefixtures("ray_not_started")
def test_a_forward_pass_no_cpu_actor_can_hold_is_refused_naming_the_field(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window_s: float,
        batch: int, compute: dict, field: str, advice: str) -> None:
    """BEATs' attention is quadratic in the window (60 s: ~2 GiB an actor, 16 x the 5-s
    default's tokens); a pass too large for memory killed every actor that tried it, the
    batch was retried 4 times and the run failed minutes later with WorkersCrashed."""
    from pipeline import job as job_mod

    monkeypatch.setattr(job_mod, "local_ray_memory_mib", lambda store: (8192.0, 4096.0))
    with pytest.raises(ConfigError) as err:
        job(archive, tmp_path, windows={"window_s": window_s}, model={"batch_size": batch},
            compute=compute).prepare()
    assert err.value.field == field
    assert f"a forward pass of {batch} window" in str(err.value)
    assert f"of {window_s:g} s takes about" in str(err.value)
    assert "than what a local Ray gives its actors here (4.0 GiB)" in str(err.value)
    assert advice in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("ray_not_started")
def test_the_default_forward_pass_fits_and_gpu_actors_are_not_held_to_host_memory(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults fit 4 actors in 2 GiB; a GPU actor's activations are on the device (its
    warm-up batch tries them there), so host memory refuses nothing of it."""
    import torch

    from pipeline import job as job_mod

    monkeypatch.setattr(job_mod, "local_ray_memory_mib", lambda store: (4096.0, 2048.0))
    prepared(archive, tmp_path / "default", compute={"num_cpus": 4})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 0))
    prepared(archive, tmp_path / "gpu", windows={"window_s": 600.0},
             model={"precision": "fp32"}, compute={"gpus_per_actor": 1})


def test_a_forward_pass_no_node_of_a_cluster_holds_is_warned_about(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """On a cluster an autoscaler may add larger nodes: CPU actors whose pass no live node
    holds now are warned about, not refused; GPU actors' activations are on the device."""
    import ray

    node = {"Alive": True, "Resources": {"CPU": 8.0, "memory": 4 * 2.0**30,
                                         "object_store_memory": 2 * 2.0**30}}
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    fp32 = {"precision": "fp32"}  # auto would ask the (absent) cluster for its GPUs
    j = prepared(archive, tmp_path, windows={"window_s": 120.0}, model=fp32,
                 compute={"address": "auto"})
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        j._note_cluster_memory()
    assert "a forward pass of 16 windows of 120 s takes about" in caplog.text
    assert "more than any node's memory for tasks (4.0 GiB); lower windows.window_s" in (
        caplog.text)
    assert "unless an autoscaler adds a larger node" in caplog.text
    caplog.clear()
    node["Resources"]["GPU"] = 1.0
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        j._note_cluster_memory()
    assert "forward pass" not in caplog.text


def test_tiny_output_files_are_warned_about_not_refused(
        archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Tests ask for files of a few rows on purpose (commits sooner); an archive's run with
    output.file_mb: 1e-6 wrote one row per file without a word."""
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        prepared(archive, tmp_path, output={"file_mb": 1e-6})
    assert "output.file_mb 1e-06: window files of about 1 rows each" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.job"):
        prepared(archive, tmp_path)
    assert "output.file_mb" not in caplog.text
