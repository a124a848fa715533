"""Where a job's Ray comes from: a new local Ray, or the cluster it was pointed at.

A job started by ``embed-archive run`` on a laptop starts its own Ray (and stops it after);
one with ``compute.address`` set, or under Ray Jobs (which exports ``RAY_ADDRESS``), joins
that cluster. Addresses a driver cannot join are refused before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import TextIO

from pipeline.config import ComputeConfig, JobConfig
from pipeline.errors import ConfigError, PipelineError, first_line


def joins_cluster(compute: ComputeConfig) -> bool:
    """Whether the job joins a running cluster rather than starting a Ray of its own:
    ``compute.address`` is set, or ``RAY_ADDRESS`` is (how Ray Jobs points a driver at its
    cluster). ``local``, which the config accepts, is Ray's own word for a new local Ray: the
    same as unset (a local plan, ``num_cpus``), except that ``RAY_ADDRESS`` is not read."""
    if compute.address == "local":
        return False
    return bool(compute.address or os.environ.get("RAY_ADDRESS"))


def check_ray_address_env(compute: ComputeConfig) -> None:
    """Refuse, before any work, a ``RAY_ADDRESS`` that a driver cannot join.

    ``compute.address`` unset, ``ray.init()`` takes ``RAY_ADDRESS``: an ``http://`` one (the
    dashboard's, which ``ray job submit`` wants, often exported for it) or a Ray Client
    ``ray://`` one would fail there with a traceback, or, for ray://, later in Ray Data's
    executor. ``compute.address`` set, the variable is not read."""
    value = os.environ.get("RAY_ADDRESS", "")
    scheme = value.strip().lower()
    if compute.address is not None or not scheme.startswith(("http://", "https://", "ray://")):
        return
    what = ("a Ray Client address, under which Ray Data's executor fails"
            if scheme.startswith("ray://") else "a dashboard address, which `ray job submit` "
            "and `embed-archive submit` take and a driver cannot join")
    raise ConfigError(f"{value} is {what}: unset it for a local Ray, set it (or "
                      "compute.address) to the cluster's HEAD:6379 or auto from a cluster node, "
                      "or submit the job", "RAY_ADDRESS")


def cannot_join(address: str | None, err: Exception, token_hint: bool = True) -> PipelineError:
    """One line for a cluster ``ray.init`` could not join (Ray's own error is a traceback
    after minutes of retries): where, why, and what a token-auth cluster (Ray 2.60's
    ``ray start`` default once a token exists) wants of this driver (``token_hint``: for a
    cluster that answered at all)."""
    where = address or os.environ.get("RAY_ADDRESS", "")
    hint = _token_hint() if token_hint else ""
    return PipelineError(f"cannot join the Ray cluster at {where} (compute.address / "
                         f"RAY_ADDRESS): {first_line(err)}{hint}")


def _token_hint() -> str:
    """What a driver joining a token-auth cluster lacks. Ray's driver sends a token only
    with ``RAY_AUTH_MODE=token``: ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` alone (as
    ``embed-archive submit`` takes them) is not read, and the join fails as "Failed to
    connect", the same as a wrong token."""
    tokens = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return ("; a cluster with token authentication wants RAY_AUTH_MODE=token and its "
                "token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (the head's)")
    if any(os.environ.get(k) for k in tokens):
        return ("; with token authentication, check that RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH "
                "hold this cluster's token (the head's ~/.ray/auth_token)")
    return ("; a cluster with token authentication wants its token: set RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH (the head's ~/.ray/auth_token)")


def unreachable(address: str, timeout_s: float = 10.0) -> str | None:
    """Why nothing answers at a ``HOST:PORT`` Ray address; None when something does, or for
    an address that names no port (``auto``: Ray finds the cluster itself).

    ``ray.init`` tries an address where nothing listens for about 14 minutes (20 tries of a
    GCS connection that waits ~41 s each), printing a warning every few seconds, before
    its ``ConnectionError``: a mistyped ``compute.address`` looked like a hung job.
    """
    try:
        parsed = urllib.parse.urlsplit(f"//{address.strip()}")
        host, port = parsed.hostname, parsed.port
    except ValueError:
        return None  # Ray's to refuse, as it spells it
    if not host or port is None:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        return f"nothing answers at {address.strip()} ({reason})"


def connect_ray(cfg: JobConfig) -> bool:
    """Start a local Ray or join ``compute.address``; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    plain_worker_prefixes()
    from pipeline.faults import FAULT_ENV
    from pipeline.provenance import GIT_COMMIT_ENV, git_commit

    env = {k: os.environ[k] for k in ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "EMBED_ARCHIVE_CACHE",
                                      GIT_COMMIT_ENV, "HF_HUB_OFFLINE", FAULT_ENV)
           if k in os.environ}

    env.setdefault(GIT_COMMIT_ENV, git_commit())
    # In a submitted job the job's runtime_env already reaches every worker, and ray.init()
    # refuses to repeat one of its env vars; send only what the job does not set.
    job_env = ((json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
                .get("runtime_env") or {}).get("env_vars") or {})
    env = {k: v for k, v in env.items() if k not in job_env}
    c = cfg.compute
    if joins_cluster(c):
        why = unreachable(c.address or os.environ.get("RAY_ADDRESS", ""))
        if why is not None:
            raise cannot_join(c.address, ConnectionError(why), token_hint=False)
        try:
            ray.init(address=c.address, runtime_env={"env_vars": env}, log_to_driver=True)
        except Exception as err:
            # Token auth on (RAY_AUTH_MODE=token) and no token: Ray's AuthenticationError
            # (no ConnectionError), raised before any connection is tried.
            auth = getattr(getattr(ray, "exceptions", None), "AuthenticationError", ())
            if not isinstance(err, (ConnectionError, auth)):
                raise
            raise cannot_join(c.address, err) from err
        return True
    # A Ray this call starts inherits the environment of its start, and so do its workers:
    # no job runtime_env, whose setup for every new worker (the runtime-env agent) cost
    # ~2 s before the first batch here. "local": unset means a new Ray, never a cluster
    # that `ray start` left running on this machine.
    with _environ(env):
        ray.init(
            address="local",
            num_cpus=c.num_cpus,
            include_dashboard=False,
            object_store_memory=c.object_store_memory_mb * 1024**2 if c.object_store_memory_mb else None,
            log_to_driver=True,
        )
    return True


def plain_worker_prefixes(*streams: TextIO) -> None:
    """Turn off the colour of the ``(MapWorker(...) pid=...)`` prefix that Ray puts on the
    workers' lines it prints in the driver, unless every stream it prints them to
    (``streams``, by default stdout and stderr) is a terminal, or ``RAY_COLOR_PREFIX`` is set.

    Ray colours that prefix whatever it writes to: in a log file, ``| tee``, a Ray Jobs
    driver log (``embed-archive logs``), every actor's line began with ``\\x1b[36m`` and held
    ``\\x1b[0m``, the escape codes spelled out for whoever greps or reads the file. Ray reads
    the variable as it prints each line, in this (the driver's) process.
    """
    if "RAY_COLOR_PREFIX" in os.environ:
        return
    if not all(is_terminal(s) for s in (streams or (sys.stdout, sys.stderr))):
        os.environ["RAY_COLOR_PREFIX"] = "0"


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (a tty), as Ray asks it."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced stream without it, a closed one
        return False


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
