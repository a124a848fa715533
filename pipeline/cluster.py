"""Run a job on a Ray cluster through the Ray Jobs API: ``submit``, ``status``, ``logs``, ``stop``.

    embed-archive submit CONFIG --address http://HEAD:8265 [--set k=v ...]   prints the id
    embed-archive status ID    [--address ...]
    embed-archive logs ID      [--address ...] [--follow]
    embed-archive stop ID      [--address ...]

``submit`` validates the config here first (a bad config never reaches the cluster), then
ships two things through the job's ``runtime_env``: this package (``py_modules``, so the
cluster runs exactly the code you have, whatever is baked into its image) and a staging
``working_dir`` that holds only the config file. The entrypoint is a plain
``python -m pipeline.cli run CONFIG --set ...`` with ``compute.address=auto`` added, so the
driver joins the cluster it runs on; the local git commit travels as
``EMBED_ARCHIVE_GIT_COMMIT`` so provenance names the code that ran.

Ray token authentication (Ray >= 2.52; ``ray.init()`` clusters enable it by default since
2.59): the token goes in an ``Authorization: Bearer`` header on every request. It comes
from ``--token-file`` / ``--token``, else ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else (only with ``RAY_AUTH_MODE=token``, as Ray's own clients do)
``~/.ray/auth_token``. ``RAY_AUTH_MODE=disabled`` turns the environment sources off. The
token is never printed, logged or shipped to the job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import socket
import string
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from pipeline.config import JobConfig
from pipeline.errors import EXIT_INTERRUPTED, ConfigError, PipelineError, first_line

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: Checked in Ray's own order; only http(s) values are taken (RAY_ADDRESS is often ``auto``).
ADDRESS_ENV_VARS: tuple[str, ...] = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

#: Never uploaded (gitignore syntax, matched inside every shipped directory).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git/", ".venv/", "venv/", "outputs/", "demo_archive/", "bench_results/",
    "__pycache__/", "*.pyc", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/",
    ".hypothesis/", "*.egg-info/", "build/", "dist/",
)
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)


class ClusterError(PipelineError):
    """The cluster could not be reached, refused us, or answered something unexpected."""


#: ``logs --follow``'s status when the cluster stopped answering before the job ended: its
#: outcome is unknown (it may still run), which no job status (0-4, 1 = failed) may claim.
EXIT_FOLLOW_LOST = 5
EXIT_STOPPED = 15  # run's status for SIGTERM, which `embed-archive stop` sends


# --------------------------------------------------------------------------- address


def resolve_address(flag: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The dashboard URL to talk to: ``--address``, else an http(s) env value, else the default.

    Args:
        flag: the ``--address`` value, if given.
        environ: environment to read (``os.environ`` when ``None``).

    Returns:
        A normalised ``http(s)://host:port`` URL without a trailing slash.

    Raises:
        ClusterError: the address is not a dashboard HTTP address.
    """
    env = os.environ if environ is None else environ
    if flag:
        return normalize_address(flag, "--address")
    for var in ADDRESS_ENV_VARS:
        value = env.get(var, "").strip()
        if value.lower().startswith(("http://", "https://")):
            return normalize_address(value, var)
    return DEFAULT_ADDRESS


def normalize_address(value: str, source: str) -> str:
    """``HEAD:8265`` -> ``http://HEAD:8265``; refuse ``ray://``, ``auto`` and GCS addresses.

    Raises:
        ClusterError: the value cannot be a Ray dashboard URL.
    """
    text = value.strip()
    if "://" not in text:
        text = f"http://{text}"
    parsed = urllib.parse.urlsplit(text)
    hint = "give the Ray dashboard's HTTP address, e.g. http://HEAD:8265"
    if parsed.scheme.lower() not in ("http", "https"):
        raise ClusterError(f"{source}={_redact(value)!r} is not an HTTP address: {hint} "
                           "(not a ray:// client or GCS address)")
    try:
        port = parsed.port
    except ValueError:
        raise ClusterError(f"{source}={_redact(value)!r} has an invalid port: {hint}") from None
    if not parsed.hostname or (parsed.hostname in ("auto", "local") and port is None):
        raise ClusterError(f"{source}={_redact(value)!r} names no host: {hint}")
    return text.rstrip("/")


def _redact(uri: str) -> str:
    from pipeline import redact

    return redact.uri(uri)


# --------------------------------------------------------------------------- token


@dataclass(frozen=True)
class AuthToken:
    """A Ray auth token and where it came from; its value never appears in repr or str.

    Attributes:
        value: the token itself.
        source: where it was read (``--token-file``, ``RAY_AUTH_TOKEN``...), for messages.
    """

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"token from {self.source}"

    def headers(self) -> dict[str, str]:
        """The HTTP header Ray's dashboard checks (``Authorization: Bearer <token>``)."""
        return {"Authorization": f"Bearer {self.value}"}


def load_token(token: str | None = None, token_file: str | None = None,
               environ: Mapping[str, str] | None = None,
               home: Path | None = None) -> AuthToken | None:
    """Find the token for a token-authenticated cluster, as Ray's own clients would.

    Args:
        token: ``--token`` (visible in ``ps`` and shell history; prefer a file).
        token_file: ``--token-file``.
        environ: environment to read (``os.environ`` when ``None``).
        home: home directory for ``~/.ray/auth_token`` (``Path.home()`` when ``None``).

    Returns:
        The token, or ``None`` when no source is configured (a cluster without auth).

    Raises:
        ClusterError: a configured source is missing, empty or malformed.
    """
    env = os.environ if environ is None else environ
    if token is not None:
        return _checked_token(token, "--token")
    if token_file is not None:
        return _read_token_file(Path(token_file).expanduser(), "--token-file")
    mode = env.get(AUTH_MODE_ENV, "").strip().lower()
    if mode == "disabled":
        return None
    if env.get(TOKEN_ENV, "").strip():
        return _checked_token(env[TOKEN_ENV], TOKEN_ENV)
    if env.get(TOKEN_PATH_ENV, "").strip():
        return _read_token_file(Path(env[TOKEN_PATH_ENV]).expanduser(), TOKEN_PATH_ENV)
    if mode == "token":
        default = (home or Path.home()) / ".ray" / "auth_token"
        if not default.is_file():
            raise ClusterError(f"{AUTH_MODE_ENV}=token but no token was found: set {TOKEN_ENV} "
                               f"or {TOKEN_PATH_ENV}, write {default}, or pass --token-file")
        return _read_token_file(default, str(default))
    return None


def _read_token_file(path: Path, source: str) -> AuthToken:
    try:
        text = path.read_text()
    except OSError as err:
        raise ClusterError(f"cannot read the token file {path} ({source}): "
                           f"{err.strerror or err}") from None
    return _checked_token(text, f"{source} ({path})")


def _checked_token(raw: str, source: str) -> AuthToken:
    value = raw.strip()
    if not value:
        raise ClusterError(f"the token from {source} is empty")
    if not set(value) <= _TOKEN_CHARS:  # would break the header (and leak into its error)
        raise ClusterError(f"the token from {source} has whitespace or non-ASCII characters")
    return AuthToken(value=value, source=source)


# --------------------------------------------------------------------------- submission


@dataclass(frozen=True)
class Submission:
    """Everything ``submit_job`` receives; built and checked before the cluster is contacted.

    Attributes:
        submission_id: the Ray Jobs id (``embed-archive-<job_id>`` by default).
        job_id: the ``run.job_id`` the job will write under ``_jobs/``.
        entrypoint: the shell command the head node runs.
        runtime_env: code, config and environment for the driver and every worker.
        metadata: shown by ``ray job list`` / the dashboard.
        warnings: things the user should know but that do not stop the submission.
    """

    submission_id: str
    job_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    warnings: tuple[str, ...] = ()


def prepare_submission(config_path: str | Path, overrides: Sequence[str], staging_dir: Path, *,
                       submission_id: str | None = None, env: Sequence[str] = (),
                       runtime_env_file: str | None = None, py_modules: Sequence[str] = (),
                       check_model: bool = True, git_commit: str | None = None) -> Submission:
    """Validate a config for a cluster run and build its submission.

    Copies the config file into ``staging_dir`` (it becomes the job's ``working_dir``).

    Args:
        config_path: the job config YAML.
        overrides: ``--set`` overrides, applied here and again on the cluster.
        staging_dir: an empty directory that lives until the job is submitted.
        submission_id: explicit Ray submission id.
        env: ``KEY=VALUE`` environment variables for the driver and workers.
        runtime_env_file: YAML/JSON mapping merged into the runtime_env.
        py_modules: more local package directories to ship.
        check_model: resolve the model name and options locally (no weights are loaded).
        git_commit: commit to record (default: this checkout's).

    Raises:
        ConfigError: the config is invalid, or cannot run on a cluster as written.
    """
    from pipeline.provenance import git_commit as local_commit
    from pipeline.provenance import make_job_id

    _refuse_secrets_on_the_command_line(overrides)
    cfg = JobConfig.load(config_path, overrides)
    warnings = check_cluster_config(cfg)
    if check_model:
        check_model_options(cfg)
    job_id = cfg.run.job_id or make_job_id()
    final_overrides = [*overrides, *cluster_overrides(cfg, job_id)]
    JobConfig.load(config_path, final_overrides)  # exactly what the cluster will load
    config_name = stage_config(Path(config_path), staging_dir)
    commit = git_commit or local_commit()
    runtime_env = build_runtime_env(
        staging_dir, package_dir(), commit, env=parse_env(env),
        extra=load_runtime_env(runtime_env_file) if runtime_env_file else None,
        py_modules=py_modules)
    return Submission(
        submission_id=submission_id or default_submission_id(job_id),
        job_id=job_id,
        entrypoint=build_entrypoint(config_name, final_overrides),
        runtime_env=runtime_env,
        metadata={"embed_archive.config": config_name, "embed_archive.job_id": job_id,
                  "embed_archive.git_commit": commit},
        warnings=tuple(warnings),
    )


def _refuse_secrets_on_the_command_line(overrides: Sequence[str]) -> None:
    """``--set`` items become the entrypoint, which ``status``, ``ray job list`` and the
    dashboard show to anyone who can see the cluster: no secret may travel there."""
    from pipeline import redact
    from pipeline.config import apply_override, plain

    for item in overrides:
        key, _, value = item.partition("=")
        # The value as the config will hold it, so a mapping such as
        # storage_options={key: ..., secret: ...} is searched at every depth; text under a
        # secret-looking key is a secret, a number is not (model.options.max_tokens=8), as
        # in every record the job writes (redact.settings).
        parsed: dict[str, Any] = {}
        apply_override(parsed, item)
        parsed = plain(parsed)
        if redact.text(value) != value or redact.settings(parsed) != parsed:
            raise ConfigError(
                "a secret on the command line would be shown by `status`, `ray job list` and "
                "the dashboard (so would one passed with --env, in the job's runtime_env); "
                "give the cluster its own identity (Workload Identity, IRSA, an instance "
                "profile) or the pods a Kubernetes Secret as environment variables, or put "
                "it in the config file", f"--set {key}")


def check_cluster_config(cfg: JobConfig) -> list[str]:
    """Refuse settings that cannot work on a cluster; return warnings for doubtful ones.

    A relative local path would resolve inside the job's temporary working directory on
    the head node (outputs silently lost); an absolute one must exist on every node.

    Raises:
        ConfigError: ``compute.address`` is not ``auto``/unset, or a path is relative.
    """
    address = cfg.compute.address
    if address not in (None, "auto"):
        raise ConfigError(f"{address!r}: a submitted job's driver runs inside the cluster, so "
                          "leave compute.address unset or 'auto'", "compute.address")
    warnings = []
    paths = {"input.uri": cfg.input.uri, "input.manifest": cfg.input.manifest,
             "output.uri": cfg.output.uri}
    if cfg.model.weights not in ("default", "random"):
        paths["model.weights"] = cfg.model.weights
    for key, value in paths.items():
        problem = _local_path_problem(value)
        if problem == "relative":
            raise ConfigError(f"{value!r} is a relative local path; on the cluster it would "
                              "resolve inside the job's temporary working directory. Use a "
                              "bucket URL (gs://, s3://) or an absolute path on a filesystem "
                              "every node mounts", key)
        if problem == "absolute":
            warnings.append(f"{key} is a local path ({value}): every Ray node must see it "
                            "(a shared filesystem), or the job fails or writes to one node only")
    return warnings


def _local_path_problem(value: str | None) -> str | None:
    from pipeline.storage import is_local

    if not value or not is_local(value):
        return None
    path = value.split("://", 1)[1] if "://" in value else value
    if path.startswith("~") or not os.path.isabs(path):
        return "relative"
    return "absolute"


def check_model_options(cfg: JobConfig) -> None:
    """Check the config against its model as ``run`` does before any work (name, options,
    window, hop, pooling, layers), without loading weights.

    ``module.path:ClassName`` backbones are left to the cluster (the module may only exist
    in its image).

    Raises:
        UnknownModelError: no such backbone here.
        ConfigError: invalid model options, or settings the model does not take.
    """
    if ":" in cfg.model.name:
        return
    from pipeline.model_settings import check_model_settings

    check_model_settings(cfg)


def cluster_overrides(cfg: JobConfig, job_id: str) -> list[str]:
    """The ``--set`` items ``submit`` adds: join the cluster, and pin the job id."""
    extra = []
    if cfg.compute.address != "auto":
        extra.append("compute.address=auto")
    if not cfg.run.job_id:
        extra.append(f"run.job_id={job_id}")
    return extra


def build_entrypoint(config_name: str, overrides: Sequence[str]) -> str:
    """``python -m pipeline.cli run CONFIG --set k=v ...``, shell-quoted.

    ``python -m`` rather than the console script: it also works on an image where the
    package is not installed, since ``py_modules`` puts it on the path.
    """
    parts = ["python", "-m", "pipeline.cli", "run", config_name]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def stage_config(config_path: Path, staging_dir: Path) -> str:
    """Copy the config into the (empty) staging directory; returns its file name there."""
    name = config_path.name
    shutil.copyfile(config_path, staging_dir / name)
    return name


def package_dir() -> Path:
    """The directory of the ``pipeline`` package that is running now."""
    return Path(__file__).resolve().parent


# Seconds Ray's job supervisor waits after `stop`'s SIGTERM before it sends SIGKILL (Ray's
# default, 3, its supervisor reads from the job's runtime_env): a driver stopping on a bucket
# writes its final record and releases its lease, a few requests each; killed before, its
# record stays "running" and the next run waits STALE_S for the lease.
STOP_WAIT = {"RAY_JOB_STOP_WAIT_TIME_S": "60"}


def build_runtime_env(staging_dir: Path, package: Path, git_commit: str, *,
                      env: Mapping[str, str] | None = None,
                      extra: Mapping[str, Any] | None = None,
                      py_modules: Sequence[str] = ()) -> dict[str, Any]:
    """The job's runtime_env: config dir, this package, excludes and environment.

    Args:
        staging_dir: directory holding only the config (the job's ``working_dir``).
        package: the ``pipeline`` package directory (shipped as a ``py_module``).
        git_commit: recorded as ``EMBED_ARCHIVE_GIT_COMMIT`` (``.git`` is not shipped).
        env: ``--env`` variables (win over everything else).
        extra: a user runtime_env (``pip``, ``env_vars``, ``py_modules``, ``excludes``...).
        py_modules: more local package directories to ship.

    Raises:
        ConfigError: ``extra`` sets ``working_dir``, a shipped directory is missing, or
            ``extra``'s ``env_vars`` carry a secret (as :func:`parse_env` refuses).
    """
    from pipeline import redact
    from pipeline.provenance import GIT_COMMIT_ENV

    extra = dict(extra or {})
    if "working_dir" in extra:
        raise ConfigError("submit ships the config as the working_dir; put code in py_modules",
                          "runtime_env.working_dir")
    modules = [str(package),
               *(_shippable(m) for m in [*extra.pop("py_modules", []), *py_modules])]
    given = {str(k): str(v) for k, v in dict(extra.pop("env_vars", {}) or {}).items()}
    for key, value in given.items():  # a runtime_env file is shown as --env is
        _refuse_secret(key, value, f"runtime_env.env_vars.{key}")
    for key, value in extra.items():  # pip: ["git+https://user:token@host/..."]
        for text in redact.strings_in(value):
            _refuse_secret("", text, f"runtime_env.{key}")
    env_vars = {GIT_COMMIT_ENV: git_commit, **STOP_WAIT, **given, **dict(env or {})}
    excludes = [*DEFAULT_EXCLUDES, *extra.pop("excludes", [])]
    return {**extra, "working_dir": str(staging_dir), "py_modules": modules,
            "excludes": excludes, "env_vars": env_vars}


def _shippable(module: str) -> str:
    """A remote URI as is; a local path resolved, after checking that it exists."""
    text = str(module)
    if "://" in text:
        return text
    path = Path(text).expanduser()
    if not path.exists():
        raise ConfigError(f"{text}: no such directory or file to ship", "py_modules")
    return str(path.resolve())


def load_runtime_env(path: str) -> dict[str, Any]:
    """Read a YAML/JSON runtime_env mapping.

    Raises:
        ConfigError: unreadable, not YAML, or not a mapping.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}", "--runtime-env") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML/JSON: {err}", "--runtime-env") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping (pip, env_vars, ...)", "--runtime-env")
    return data


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``["A=1", "B=x=y"]`` -> ``{"A": "1", "B": "x=y"}``.

    The variables go in the job's runtime_env, which the dashboard and ``ray job list``
    show: a secret-looking one (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``) is refused, unless
    its value is an absolute path (a key file on the nodes, such as
    ``GOOGLE_APPLICATION_CREDENTIALS``, is no secret itself).

    Raises:
        ConfigError: an item is not ``KEY=VALUE`` with a valid variable name, or carries a
            secret.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--env {key or item!r}: expected KEY=VALUE", "--env")
        _refuse_secret(key, value, f"--env {key}")
        out[key] = value
    return out


def _refuse_secret(key: str, value: str, field: str) -> None:
    """Refuse a runtime_env variable that carries a secret (see :func:`parse_env`)."""
    from pipeline import redact

    if (redact.looks_secret(key) and not value.startswith("/")) or redact.text(value) != value:
        raise ConfigError(
            "a secret in the job's runtime_env would be shown by the dashboard and `ray "
            "job list`; give the cluster its own identity (Workload Identity, IRSA, an "
            "instance profile) or the pods a Kubernetes Secret as environment variables",
            field)


def default_submission_id(job_id: str) -> str:
    """``embed-archive-<job_id>``. A job id names one run (a run refuses an id its output
    already has), so a config that fixes ``run.job_id`` is submitted once: a second submit
    is refused by Ray Jobs at once, by this id. Leave the id unset to resume by
    resubmitting; each submission then gets a new one."""
    return f"embed-archive-{job_id}"


# --------------------------------------------------------------------------- client


#: Seconds to wait for an answer to one request (uploads of this package included); the
#: SDK sets none, so a dashboard that accepts connections and never answers hung forever.
REQUEST_TIMEOUT_S = 120.0


def connect(address: str, token: AuthToken | None, timeout_s: float = 10.0) -> Any:
    """A ``JobSubmissionClient`` for ``address``, with the token header if there is one.

    ``RAY_ADDRESS`` / ``RAY_API_SERVER_ADDRESS`` are hidden while it is built, since Ray
    lets them override an explicit address. Every request it makes (its version check in the
    constructor included) gives up after ``timeout_s`` to connect and
    :data:`REQUEST_TIMEOUT_S` to answer.

    Raises:
        ClusterError: unreachable, not a Ray dashboard, or the token is missing/refused.
    """
    _probe(address, timeout_s)
    from ray.job_submission import JobSubmissionClient

    class Client(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", (timeout_s, max(timeout_s, REQUEST_TIMEOUT_S)))
            return super()._do_request(method, endpoint, **kwargs)

    with _without_env(ADDRESS_ENV_VARS), cluster_errors(address, token):
        return Client(address, headers=token.headers() if token else None)


def _probe(address: str, timeout_s: float) -> None:
    """Fail fast (instead of a minutes-long TCP timeout) when nothing answers."""
    parsed = urllib.parse.urlsplit(address)
    host = parsed.hostname or ""
    if parsed.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return  # a proxy connects for us; let requests try it
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ClusterError(f"cannot reach the Ray dashboard at {_redact(address)}: "
                           f"{reason}") from None


@contextlib.contextmanager
def _without_env(names: Sequence[str]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def cluster_errors(address: str, token: AuthToken | None) -> Iterator[None]:
    """Turn Ray SDK, requests and aiohttp failures into one-line :class:`ClusterError`."""
    import requests
    from ray.exceptions import AuthenticationError

    where = _redact(address)
    try:
        yield
    except AuthenticationError:
        raise _auth_error(where, token) from None
    except requests.exceptions.JSONDecodeError:
        raise ClusterError(f"{where} did not answer like a Ray dashboard") from None
    except (requests.exceptions.RequestException, ConnectionError) as err:
        if _answered_not_http(err):
            raise ClusterError(
                f"{where} answered, but not in HTTP: not the Ray dashboard (the GCS port, "
                "HEAD:6379, which `run`'s compute.address takes, speaks gRPC); give the "
                "dashboard's address, e.g. http://HEAD:8265") from None
        raise ClusterError(f"cannot reach the Ray dashboard at {where} "
                           f"({type(err).__name__})") from None
    except RuntimeError as err:
        raise ClusterError(f"the Ray cluster at {where} refused the request: "
                           f"{first_line(err)}") from None
    except PipelineError:
        raise
    except Exception as err:
        status = getattr(err, "status", None)  # aiohttp's websocket handshake errors
        if status in (401, 403):
            raise _auth_error(where, token) from None
        if type(err).__module__.startswith("aiohttp"):
            raise ClusterError(f"the log stream from {where} failed ({type(err).__name__}"
                               f"{f' {status}' if status else ''})") from None
        raise


def _answered_not_http(err: BaseException) -> bool:
    """Whether the server answered in another protocol: http.client's ``BadStatusLine``
    (a gRPC server's HTTP/2 frames), wrapped by urllib3 and requests in their errors'
    ``args`` and by Ray's SDK as a cause. The TCP probe passed, so "cannot reach" would
    send the user looking at the network, not at the port."""
    import http.client

    pending, seen = [err], 0
    while pending and seen < 16:
        error, seen = pending.pop(), seen + 1
        if isinstance(error, http.client.BadStatusLine):
            return True
        pending += [e for e in (*getattr(error, "args", ()), error.__cause__, error.__context__)
                    if isinstance(e, BaseException)]
    return False


def _auth_error(where: str, token: AuthToken | None) -> ClusterError:
    if token is None:
        return ClusterError(f"the Ray cluster at {where} requires a token (Ray token "
                            f"authentication): pass --token-file FILE or set {TOKEN_ENV} / "
                            f"{TOKEN_PATH_ENV}")
    return ClusterError(f"the Ray cluster at {where} rejected the {token}: use this cluster's "
                        "token")


# --------------------------------------------------------------------------- jobs


def job_summary(info: Any) -> dict[str, Any]:
    """The fields of a ``JobDetails`` worth showing (never its runtime_env: it may hold
    secrets passed with ``--env``)."""
    status = getattr(info.status, "value", info.status)
    return {
        "submission_id": info.submission_id,
        "status": str(status),
        "message": info.message or "",
        "ray_job_id": info.job_id,
        "entrypoint": info.entrypoint,
        "start_time": _iso(info.start_time),
        "end_time": _iso(info.end_time),
        "driver_exit_code": info.driver_exit_code,
        "metadata": dict(info.metadata or {}),
    }


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


# What a job's exit status means (README, "Exit status of run"): Ray calls every non-zero
# one FAILED, a run that embedded all but a few broken recordings included.
OUTCOMES = {
    0: "every recording embedded",
    1: "the job failed after it started",
    2: "refused before any work (config, inputs, or another run on the namespace)",
    3: "finished; some recordings failed (see the errors table)",
    4: "stopped by run.max_failed_fraction",
    EXIT_STOPPED: "stopped; what it committed stays, and a resubmit resumes",
}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def render_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable ``status`` output: Ray's status, what the run's own exit status
    means once it has ended, and Ray's message without the log tail it appends."""
    lines = [f"{summary['submission_id']}: {summary['status']}"]
    if summary["status"] in TERMINAL:
        code = exit_code_for(summary)
        lines.append(f"  {'outcome':<10} exit {code}: {OUTCOMES.get(code, 'see its logs')}")
    shown = {**summary, "message": _message_head(summary.get("message"))}
    for label, key in (("message", "message"), ("ray job", "ray_job_id"),
                       ("started", "start_time"), ("ended", "end_time"),
                       ("exit code", "driver_exit_code"), ("entrypoint", "entrypoint")):
        if shown.get(key) not in (None, ""):
            lines.append(f"  {label:<10} {shown[key]}")
    return "\n".join(lines)


def _message_head(message: str | None) -> str:
    """Ray's job message without the log tail it appends to a failed job's."""
    lines = (message or "").strip().splitlines()
    return lines[0].split(", last available logs")[0].rstrip(":") if lines else ""


def exit_code_for(summary: Mapping[str, Any]) -> int:
    """The job's own exit status: 0 succeeded; the driver's code (``run``'s 1/3/4...) when
    it failed with one; 15 when it was stopped (``embed-archive stop``: ``run``'s status for
    SIGTERM, which Ray does not report for a stopped job); 1 otherwise."""
    if summary["status"] == "SUCCEEDED":
        return 0
    code = summary.get("driver_exit_code")
    if isinstance(code, int) and 0 < code < 256:
        return code
    return EXIT_STOPPED if summary["status"] == "STOPPED" else 1


def status_line(summary: Mapping[str, Any]) -> str:
    """One line for the end of ``logs --follow``: the status, the exit status it gives, and
    the first line of Ray's message without the log tail Ray appends to it (the logs were
    just streamed)."""
    first, code = _message_head(summary.get("message")), exit_code_for(summary)
    return (f"job {summary['submission_id']} {summary['status']} (exit {code}: "
            f"{OUTCOMES.get(code, 'see the logs above')}){': ' + first if first else ''}")


def follow_logs(client: Any, submission_id: str, out: TextIO) -> None:
    """Stream the job's logs to ``out`` until the job ends (or the stream closes).

    Ray's client logs ``WebSocket closed for job ... with close code 1000`` at INFO when a
    stream ends normally (an abnormal close raises): noise between the job's last line and
    ours, so its logger is kept at WARNING."""
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())


def wait_until_terminal(client: Any, submission_id: str, poll_s: float = 1.0) -> Any:
    """Poll until the job reaches SUCCEEDED, FAILED or STOPPED; returns its details."""
    while True:
        info = client.get_job_info(submission_id)
        if str(getattr(info.status, "value", info.status)) in TERMINAL_STATUSES:
            return info
        time.sleep(poll_s)


# --------------------------------------------------------------------------- commands


def add_cluster_commands(sub: Any) -> None:
    """Register ``submit``, ``status``, ``logs`` and ``stop`` on the CLI's subparsers."""
    p = sub.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs API)",
                       description="Validate CONFIG here, ship it with this package to the "
                                   "cluster, print the submission id and return.")
    p.add_argument("config", help="job config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); applied here and on the cluster")
    _add_connection_args(p)
    p.add_argument("--submission-id", help="Ray submission id (default embed-archive-<job_id>)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the driver and every worker (repeatable)")
    p.add_argument("--runtime-env", metavar="FILE",
                   help="YAML/JSON runtime_env merged in (pip, env_vars, py_modules, excludes)")
    p.add_argument("--py-module", dest="py_modules", action="append", default=[],
                   metavar="DIR", help="another local package to ship (e.g. a plugin backbone)")
    p.add_argument("--no-model-check", dest="model_check", action="store_false",
                   help="skip resolving model.name locally (a backbone only the cluster has)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show a submitted job's status")
    p.add_argument("submission_id")
    _add_connection_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="print a submitted job's logs")
    p.add_argument("submission_id")
    _add_connection_args(p)
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--follow", "-f", action="store_true",
                       help="stream until the job ends; exit with the job's exit status")
    shown.add_argument("--tail", type=_positive_int, metavar="N",
                       help="only the last N lines (a long job logs a progress line a minute)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stop", help="stop a submitted job")
    p.add_argument("submission_id")
    _add_connection_args(p)
    p.set_defaults(func=cmd_stop)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of lines, got {text!r}")
    return value


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS / "
                                     f"RAY_ADDRESS if http(s), else {DEFAULT_ADDRESS})")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--token-file", metavar="FILE",
                       help=f"Ray auth token file (default: {TOKEN_ENV}, {TOKEN_PATH_ENV}, or "
                            f"~/.ray/auth_token with {AUTH_MODE_ENV}=token)")
    group.add_argument("--token", help="Ray auth token (visible to other users in `ps`; "
                                       "prefer --token-file or the environment)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="give up on an unreachable dashboard after this long (a request "
                        f"it does not answer: after {REQUEST_TIMEOUT_S:.0f} s, or this if longer)")


def _client(args: argparse.Namespace) -> tuple[Any, str, AuthToken | None]:
    address = resolve_address(args.address)
    token = load_token(args.token, args.token_file)
    return connect(address, token, args.connect_timeout), address, token


def cmd_submit(args: argparse.Namespace) -> int:
    """Validate, build, connect, submit; print the submission id on stdout."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="embed-archive-submit-") as staging:
        submission = prepare_submission(
            args.config, args.overrides, Path(staging), submission_id=args.submission_id,
            env=args.env, runtime_env_file=args.runtime_env, py_modules=args.py_modules,
            check_model=args.model_check)
        for warning in submission.warnings:
            print(f"embed-archive: warning: {warning}", file=sys.stderr)
        client, address, token = _client(args)
        where, sid = _redact(address), submission.submission_id
        # The id is fixed before anything is sent: say it now, since Ctrl-C (or a lost
        # connection) after the POST has gone leaves a job running that nothing else names.
        print(f"submitting {sid} to {where}", file=sys.stderr)
        try:
            with cluster_errors(address, token):
                submitted = client.submit_job(
                    entrypoint=submission.entrypoint, submission_id=sid,
                    runtime_env=submission.runtime_env, metadata=submission.metadata)
        except KeyboardInterrupt:
            print(f"\nembed-archive: interrupted; {sid} may have been submitted: "
                  f"embed-archive status {sid} --address {where} tells, "
                  f"embed-archive stop {sid} --address {where} stops it", file=sys.stderr)
            return EXIT_INTERRUPTED
    print(submitted)
    print(f"submitted {submitted} to {where} (job_id {submission.job_id}, commit "
          f"{submission.metadata['embed_archive.git_commit'][:12]})\n"
          f"  follow:  embed-archive logs {submitted} --follow --address {where}\n"
          f"  status:  embed-archive status {submitted} --address {where}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client, address, token = _client(args)
    with cluster_errors(address, token):
        summary = job_summary(client.get_job_info(args.submission_id))
    print(json.dumps(summary, indent=2) if args.json else render_summary(summary))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client, address, token = _client(args)
    if not args.follow:
        with cluster_errors(address, token):
            logs = client.get_job_logs(args.submission_id)
        if args.tail:
            logs = "".join(logs.splitlines(keepends=True)[-args.tail:])
        sys.stdout.write(logs)
        return 0
    with cluster_errors(address, token):
        # An id the cluster does not know (a typo, another cluster's job): said as `status`
        # says it, exit 1. Its log stream's handshake fails too (404), which, once following,
        # is read as a lost cluster: "may still be running", exit 5, of a job never there.
        client.get_job_info(args.submission_id)
    try:
        with cluster_errors(address, token):
            follow_logs(client, args.submission_id, sys.stdout)
            summary = job_summary(wait_until_terminal(client, args.submission_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (embed-archive stop "
              f"{args.submission_id} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ClusterError as err:
        print(f"embed-archive: lost the cluster while following {args.submission_id}: {err}; "
              f"the job may still be running (embed-archive status {args.submission_id})",
              file=sys.stderr)
        return EXIT_FOLLOW_LOST
    print(status_line(summary), file=sys.stderr)
    return exit_code_for(summary)


def cmd_stop(args: argparse.Namespace) -> int:
    client, address, token = _client(args)
    with cluster_errors(address, token):
        stopped = client.stop_job(args.submission_id)
        status = job_summary(client.get_job_info(args.submission_id))["status"]
    if stopped:
        print(f"stop requested for {args.submission_id} (now {status})")
    else:
        print(f"{args.submission_id} was not running ({status})")
    return 0


__all__ = [
    "AuthToken", "ClusterError", "Submission", "add_cluster_commands", "build_entrypoint",
    "build_runtime_env", "check_cluster_config", "connect", "load_token",
    "prepare_submission", "resolve_address",
]
