"""``embed-archive submit`` against a real two-node Ray cluster on 127.0.0.1.

The test starts a head node (dashboard on a free port, a ``cpu_node`` resource) and a second
node advertising ``gpu_node`` (a stand-in for a GPU node, with the label
``node-group=gpu``), both with ``ray start --block`` in their own process groups and temp
dirs, and with Ray token authentication on (``RAY_AUTH_MODE=token``, a token file made for
the test). Ray 2.60's ``ray start`` turns token auth on only when told to or when a token
already exists, so the test tells it to, and every client below must present the token.

It submits the tiny BEATs on five real recordings through the CLI, follows the logs to
the end, reads the Parquet back with DuckDB, and asks Ray's state API where things ran:
the embedding actor only on the ``gpu_node`` node (decode tasks ask for ``cpu_node``, which
only the head has), every decode task on the head.

Teardown kills both process groups (SIGTERM, then SIGKILL: ``ray start --block`` outlives
SIGTERM) and every process descended from them or naming the cluster's temp dir (Ray workers
get their own process groups). ``ray stop --force`` is deliberately not used: it kills
every Ray process on the machine by name, including other people's clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from pipeline.provenance import package_version
from tests.integration.conftest import TINY_BEATS

pytestmark = pytest.mark.timeout(420)

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
EMBED_ARCHIVE = str(BIN / "embed-archive")
FILES_GLOB = "opensoundscape/tests/audio/aru_*.wav"  # five 3 s recordings
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567-test"

# Runs in a subprocess with the cluster's auth environment: the state API takes the token
# from RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH, which this (pytest) process must not change.
STATE_SCRIPT = """
import json, sys
from ray.util.state import list_actors, list_jobs, list_nodes, list_tasks
address, job_id = sys.argv[1], sys.argv[2]
nodes = [{"node_id": n.node_id, "state": n.state, "resources": n.resources_total,
          "labels": n.labels} for n in list_nodes(address=address, limit=100)]
out = {"nodes": nodes, "jobs": [{"submission_id": j.submission_id, "entrypoint": j.entrypoint}
                                for j in list_jobs(address=address)]}
if job_id:
    flt = [("job_id", "=", job_id)]
    out["actors"] = [{"class_name": a.class_name, "repr_name": a.repr_name, "node_id": a.node_id,
                      "required_resources": a.required_resources,
                      "label_selector": a.label_selector}
                     for a in list_actors(address=address, filters=flt, detail=True, limit=10000)]
    out["tasks"] = [{"name": t.name, "node_id": t.node_id, "type": str(t.type),
                     "state": str(t.state)}
                    for t in list_tasks(address=address, filters=flt, limit=10000)]
print(json.dumps(out))
"""


# --------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, str]]:
    """``pid -> (ppid, command line)`` for every process we can read (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, cmdline)
    return table


def _cluster_processes(roots: set[int], marker: str) -> set[int]:
    """Live processes descended from ``roots`` or whose command line names ``marker``."""
    table = _proc_table()
    found = {pid for pid, (_, cmd) in table.items() if marker in cmd}
    found |= {pid for pid in roots if pid in table}
    changed = True
    while changed:
        new = {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found}
        found |= new
        changed = bool(new)
    return {pid for pid in found if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the cluster


@dataclass
class LocalCluster:
    """A head and a stand-in GPU node, started with ``ray start --block``."""

    root: Path
    token_file: Path
    env: dict[str, str]
    gcs_port: int = field(default_factory=_free_port)
    dashboard_port: int = field(default_factory=_free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)
    stopped: bool = False

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def start(self) -> None:
        common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                  "--object-store-memory=200000000", "--min-worker-port=0", "--max-worker-port=0"]
        self._launch("head", [
            "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--num-cpus=2", '--resources={"cpu_node": 2}', *common])
        self._wait_for_dashboard(timeout_s=60)
        self._launch("gpu", [
            f"--address=127.0.0.1:{self.gcs_port}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--num-cpus=1", '--resources={"gpu_node": 1}', "--labels=node-group=gpu", *common])
        self._wait_for_nodes(2, timeout_s=60)

    def _launch(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([RAY, "start", f"--temp-dir={self.root / name}", *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append(proc)

    def _check_running(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                logs = "\n".join(p.read_text()[-3000:] for p in self.root.glob("*.log"))
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{logs}")

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        request = urllib.request.Request(f"{self.dashboard}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        while True:
            self._check_running()
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the head node's dashboard did not come up")
            time.sleep(0.5)

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_running()
            alive = [n for n in self.state()["nodes"] if n["state"] == "ALIVE"]
            if len(alive) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {count} Ray nodes came up")
            time.sleep(1)

    def state(self, ray_job_id: str = "") -> dict[str, Any]:
        """Nodes, jobs, and (for a job) its actors and tasks, from Ray's state API."""
        out = subprocess.run([sys.executable, "-c", STATE_SCRIPT, self.dashboard, ray_job_id],
                             env=self.env, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> set[int]:
        """Kill everything the cluster started; returns what is still alive (should be empty)."""
        roots = {p.pid for p in self.procs}
        marker = str(self.root)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        _signal_all(_cluster_processes(roots, marker), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _cluster_processes(roots, marker) and time.monotonic() < deadline:
            time.sleep(0.25)
        for _ in range(3):  # SIGKILL what survived, including children forked meanwhile
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            _signal_all(_cluster_processes(roots, marker), signal.SIGKILL)
            time.sleep(0.5)
        for proc in self.procs:
            proc.wait(timeout=10)
        self.stopped = True
        deadline = time.monotonic() + 10
        while (left := _cluster_processes(roots, marker)) and time.monotonic() < deadline:
            time.sleep(0.25)
        return left


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # A short root: Ray's Unix socket paths live under it and must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="ea-cluster-test-", dir="/tmp"))
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))
           and k != "EMBED_ARCHIVE_GIT_COMMIT"}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    c = LocalCluster(root=root, token_file=token_file, env=env)
    try:
        c.start()
        yield c
    finally:
        if not c.stopped:
            c.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- the CLI


def client_env(**extra: str) -> dict[str, str]:
    """A laptop-like environment: no Ray auth settings, no address (the CLI gets flags)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EMBED_ARCHIVE, *args], env=env or client_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def base_config(path: Path) -> Path:
    """The job config the test submits: tiny BEATs; input, output and placement via --set."""
    raw = {
        "windows": {"window_s": 2.0, "hop_s": 1.0, "tail": "pad"},
        "model": {"name": "beats", "weights": "random", "options": dict(TINY_BEATS),
                  "layers": [-1, 0], "batch_size": 4},
        "run": {"shard_size": 64, "progress": False},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def submitted(cluster: LocalCluster, real_data: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Submit once, follow to the end; the tests below inspect what happened."""
    work = tmp_path_factory.mktemp("cluster-job")
    out_dir = work / "out"
    config = base_config(work / "tiny.yaml")
    started = time.monotonic()
    sub = cli("submit", str(config), "--address", cluster.dashboard,
              "--token-file", str(cluster.token_file),
              "--set", f"input.uri={real_data / FILES_GLOB}",
              "--set", f"output.uri={out_dir}",
              "--set", "compute.embed_actors=1",
              "--set", "compute.gpus_per_actor=0",
              "--set", "compute.embed_resources={gpu_node: 1}",
              "--set", "compute.embed_label_selector={node-group: gpu}",
              "--set", "compute.decode_resources={cpu_node: 1}",
              env=client_env(EMBED_ARCHIVE_GIT_COMMIT=FAKE_COMMIT))
    assert sub.returncode == 0, sub.stderr
    submission_id = sub.stdout.strip()
    logs = cli("logs", submission_id, "--follow", "--address", cluster.dashboard,
               env=client_env(RAY_AUTH_TOKEN=cluster.token), timeout=300)
    status = cli("status", submission_id, "--json", "--address", cluster.dashboard,
                 "--token-file", str(cluster.token_file))
    assert status.returncode == 0, status.stderr
    return {"id": submission_id, "submit": sub, "logs": logs,
            "status": json.loads(status.stdout), "out": out_dir,
            "wall_s": time.monotonic() - started}


# --------------------------------------------------------------------------- tests


def test_job_succeeds_and_logs_follow_to_the_end(cluster: LocalCluster,
                                                 submitted: dict[str, Any]) -> None:
    logs, status = submitted["logs"], submitted["status"]
    assert logs.returncode == 0, logs.stdout[-4000:] + logs.stderr[-2000:]
    where = ["--address", cluster.dashboard, "--token-file", str(cluster.token_file)]
    whole, tail = (cli("logs", submitted["id"], *more, *where) for more in ([], ["--tail", "3"]))
    assert whole.returncode == tail.returncode == 0, whole.stderr + tail.stderr
    assert len(whole.stdout.splitlines()) > 3
    assert tail.stdout.splitlines() == whole.stdout.splitlines()[-3:]
    assert status["status"] == "SUCCEEDED"
    assert status["driver_exit_code"] == 0
    assert status["submission_id"] == submitted["id"]
    job_id = status["metadata"]["embed_archive.job_id"]
    assert submitted["id"] == f"embed-archive-{job_id}"
    # The entrypoint is the real CLI; the driver joined the cluster instead of a local Ray.
    assert status["entrypoint"].startswith("python -m pipeline.cli run tiny.yaml ")
    assert "--set compute.address=auto" in status["entrypoint"]
    assert f"job {job_id}: succeeded" in logs.stdout
    assert "Connecting to existing Ray cluster" in logs.stdout
    assert f"job {submitted['id']} SUCCEEDED" in logs.stderr


def test_outputs_are_complete_without_duplicates(submitted: dict[str, Any]) -> None:
    out = submitted["out"]
    job_id = submitted["status"]["metadata"]["embed_archive.job_id"]
    con = duckdb.connect()
    windows = f"read_parquet('{out}/windows/**/*.parquet', hive_partitioning = true)"
    total, distinct, recordings, jobs = con.sql(f"""
        SELECT count(*), count(DISTINCT (recording_id, channel, window_index, layer)),
               count(DISTINCT recording_id), list(DISTINCT job_id)
        FROM {windows}""").fetchall()[0]
    assert recordings == 5
    assert total == distinct > 0
    assert jobs == [job_id]
    rec = con.sql(f"""
        SELECT count(*), count(DISTINCT (recording_id, channel, layer)), min(status),
               max(status), list(DISTINCT code_version)
        FROM read_parquet('{out}/recordings/**/*.parquet', hive_partitioning = true)
        """).fetchall()[0]
    assert rec[0] == rec[1] == 5 * 2  # 5 recordings x 2 layers, mono
    assert rec[2] == rec[3] == "ok"
    # Provenance: the commit submit sent (EMBED_ARCHIVE_GIT_COMMIT) is what the job recorded.
    assert rec[4] == [f"{package_version()}+{FAKE_COMMIT[:12]}"]
    record = json.loads((out / "_jobs" / f"{job_id}.json").read_text())
    assert record["git_commit"] == FAKE_COMMIT
    assert record["ray_submission"] == submitted["id"]  # what `embed-archive stop` takes
    assert record["config"]["compute"]["address"] == "auto"


def settled_state(cluster: LocalCluster, ray_job_id: str, timeout_s: float = 30) -> dict[str, Any]:
    """The job's state once Ray has reported its tasks: the decode tasks and the embedder's
    calls (task events arrive asynchronously, the actors' apart from the tasks')."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = cluster.state(ray_job_id)
        decoded = sum(1 for t in state["tasks"] if "decode_batch" in t["name"])
        embedded = sum(1 for t in state["tasks"] if t["type"] == "ACTOR_TASK"
                       and t["name"].startswith("MapWorker(MapBatches(Embedder))"))
        if (decoded >= 5 and embedded) or time.monotonic() > deadline:
            return state
        time.sleep(1)


def test_embedding_ran_only_on_the_gpu_node_and_decoding_elsewhere(
        cluster: LocalCluster, submitted: dict[str, Any]) -> None:
    state = settled_state(cluster, submitted["status"]["ray_job_id"])
    gpu_nodes = {n["node_id"] for n in state["nodes"] if "gpu_node" in n["resources"]}
    head_nodes = {n["node_id"] for n in state["nodes"] if "cpu_node" in n["resources"]}
    assert len(gpu_nodes) == 1 and len(head_nodes) == 1 and gpu_nodes != head_nodes

    embedders = [a for a in state["actors"] if "Embedder" in (a["repr_name"] or "")]
    assert len(embedders) == 1, state["actors"]  # one backbone, loaded once, in one actor
    for actor in embedders:
        assert actor["node_id"] in gpu_nodes
        assert actor["required_resources"].get("gpu_node") == 1
        assert actor["label_selector"] == {"node-group": "gpu"}

    decode = [t for t in state["tasks"] if "decode_batch" in t["name"]]
    assert len(decode) >= 5, sorted({t["name"] for t in state["tasks"]})
    assert {t["node_id"] for t in decode} <= head_nodes
    calls = [t for t in state["tasks"] if t["type"] == "ACTOR_TASK"
             and t["name"].startswith("MapWorker(MapBatches(Embedder))")]
    assert calls and {t["node_id"] for t in calls} <= gpu_nodes
    # One model load for the whole job (the backbone warns once per load), many batches.
    loads = [line for line in submitted["logs"].stdout.splitlines()
             if "MapWorker(MapBatches(Embedder))" in line and "RANDOM weights" in line]
    assert len(loads) == 1, loads


def test_wrong_or_missing_token_fails_in_one_line(cluster: LocalCluster, tmp_path: Path) -> None:
    config = base_config(tmp_path / "tiny.yaml")
    args = ["submit", str(config), "--address", cluster.dashboard,
            "--set", f"input.uri={tmp_path}", "--set", f"output.uri={tmp_path / 'out'}"]
    bad = "0" * 64
    wrong = cli(*args, env=client_env(RAY_AUTH_TOKEN=bad))
    missing = cli(*args)
    for result, words in ((wrong, "rejected the token from RAY_AUTH_TOKEN"),
                          (missing, "requires a token")):
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("embed-archive: failed: ") and words in lines[-1]
        assert "Traceback" not in result.stderr
        assert bad not in result.stdout + result.stderr
        assert cluster.token not in result.stdout + result.stderr


def test_bad_config_is_refused_before_submitting(cluster: LocalCluster, tmp_path: Path) -> None:
    config = base_config(tmp_path / "broken.yaml")
    result = cli("submit", str(config), "--address", cluster.dashboard,
                 "--token-file", str(cluster.token_file),
                 "--set", "input.uri=/data/x", "--set", "model.batch_size=0")
    assert result.returncode == 2
    assert "model.batch_size: must be > 0" in result.stderr
    relative = cli("submit", str(config), "--address", cluster.dashboard,
                   "--token-file", str(cluster.token_file),
                   "--set", "input.uri=/data/x", "--set", "output.uri=outputs/here")
    assert relative.returncode == 2 and "relative local path" in relative.stderr
    assert not any("broken.yaml" in j["entrypoint"] for j in cluster.state()["jobs"])


def test_actors_no_node_can_hold_are_refused_before_any_work(
        cluster: LocalCluster, real_data: Path, tmp_path: Path) -> None:
    """Pinned to resources or labels no node of the cluster has, the embedding actors stayed
    pending and the job ran on for ever, writing nothing."""
    config = base_config(tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    env = cluster.env  # a driver on a node of the cluster, as with compute.address auto
    common = ["run", str(config), "--set", f"compute.address=127.0.0.1:{cluster.gcs_port}",
              "--set", f"input.uri={real_data / 'opensoundscape/tests/audio'}",
              "--set", f"output.uri={out}"]
    for placement, words in (
            (["compute.embed_resources={gpu_node: 2}"],
             "compute.embed_resources: no node of the cluster has 2 gpu_node (2 nodes)"),
            (["compute.embed_resources={gpu_node: 1}", "compute.embed_label_selector={node-group: cpu}"],
             ("compute.embed_label_selector: no node of the cluster has 1 gpu_node, "
              "label node-group=cpu (2 nodes)"))):
        result = cli(*common, *(a for p in placement for a in ("--set", p)), env=env)
        assert result.returncode == 2, result.stderr[-3000:]
        assert words in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()  # nothing listed, nothing written


def test_unreachable_cluster_fails_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    result = cli("status", "nope", "--address", f"http://127.0.0.1:{_free_port()}")
    assert result.returncode == 1
    assert "cannot reach the Ray dashboard" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_cluster_stops_without_stray_processes(cluster: LocalCluster,
                                               submitted: dict[str, Any]) -> None:
    left = cluster.stop()
    assert not left, {pid: _proc_table().get(pid) for pid in left}
    assert all(p.returncode is not None for p in cluster.procs)
