"""Who made a row, with what, from what: job ids, code and library versions, the variant.

Provenance is stamped three ways: columns on every row (``job_id``, ``model_name``,
``weights_sha256``, ``config_sha256``, ``code_version``, ``source_uri``, ``source_version``),
the same record as JSON in every Parquet file's key-value metadata, and the job record in
``_jobs/<job_id>.json``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig, canonical_json

GIT_COMMIT_ENV = "EMBED_ARCHIVE_GIT_COMMIT"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def make_job_id() -> str:
    """``20261121T174502Z-3f9a1c``: sortable by start time, unique enough across clusters."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Commit of the code that runs: from the environment (set by ``submit``) or git."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    here = Path(__file__).resolve()
    return commit_of(here.parent.parent, tracked=here)


def commit_of(root: Path, tracked: Path | None = None) -> str:
    """``HEAD`` of the git checkout at ``root``, ``-dirty`` when tracked files changed
    (untracked ones do not count); ``unknown`` outside a checkout, without git, or when
    ``tracked`` is not a file of that checkout (the package installed in a virtualenv or
    copied into some other repository's folder must not take that repository's commit)."""
    try:
        if tracked is not None:
            subprocess.run(["git", "-C", str(root), "ls-files", "--error-unmatch", "--",
                            str(tracked)], capture_output=True, timeout=5, check=True)
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{out}{'-dirty' if dirty else ''}" if out else "unknown"


def package_version() -> str:
    try:
        return importlib.metadata.version("embed-archive")
    except importlib.metadata.PackageNotFoundError:
        from pipeline import __version__

        return __version__


def code_version() -> str:
    """``0.1.0+<commit>``: the package version and the commit (12 hex digits), with
    ``-dirty`` kept when tracked files had changed."""
    commit = git_commit()
    dirty = "-dirty" if commit.endswith("-dirty") else ""
    return f"{package_version()}+{commit.removesuffix('-dirty')[:12]}{dirty}"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "ray", "pyarrow", "numpy", "soundfile", "soxr", "fsspec"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@dataclass(frozen=True)
class Variant:
    """Everything that determines an embedding's value, and its short hash.

    Two runs with the same variant write interchangeable rows; a run with another variant
    writes to its own ``variant=<id>`` partition, never into this one.
    """

    model_name: str
    model_family: str
    weights_sha256: str
    model_options: dict[str, Any]
    preprocessing: dict[str, Any]
    sample_rate_hz: int
    layers: tuple[int, ...]
    pooling: str
    precision: str
    window_s: float
    hop_s: float
    tail: str
    min_tail_s: float
    channels: str
    resample_quality: str
    recording_pooling: str

    @property
    def id(self) -> str:
        """``v`` and 12 hex digits of the hash. The letter keeps the ``variant=`` partition
        a string in every reader: Spark and Polars type a partition value by its look, and
        one id in about 120 is all digits (``012345678901`` read as a number loses its 0) or
        digits, ``e``, digits (read as a float: ``inf``)."""
        return "v" + hashlib.sha256(canonical_json(asdict(self)).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.id, **asdict(self)}

    def as_recorded(self) -> dict[str, Any]:
        """:meth:`to_dict` as ``_variants/<id>.json`` reads back (tuples as lists)."""
        return json.loads(json.dumps(self.to_dict(), default=str))

    def differences(self, record: Mapping[str, Any]) -> list[str]:
        """What sets another variant's record (``_variants/<id>.json``) apart from this one,
        as the settings a user would change back: ``windows.hop_s: 5.0 there, 2.5 here``."""
        ours = self.as_recorded()
        out = []
        for key, setting in VARIANT_SETTINGS.items():
            theirs = record.get(key, ours[key])
            if theirs == ours[key]:
                continue
            if key == "weights_sha256":
                out.append(f"{setting}: another checkpoint")
            elif isinstance(theirs, dict) or isinstance(ours[key], dict):
                out.append(f"{setting}: other values")
            else:
                out.append(f"{setting}: {theirs} there, {ours[key]} here")
        return out


# A variant's fields as the settings behind them (preprocessing and the model's rate come
# with the model's code: another version of the job or plugin).
VARIANT_SETTINGS = {
    "weights_sha256": "model.weights", "model_options": "model.options",
    "layers": "model.layers", "pooling": "model.pooling", "precision": "model.precision",
    "window_s": "windows.window_s", "hop_s": "windows.hop_s", "tail": "windows.tail",
    "min_tail_s": "windows.min_tail_s", "channels": "audio.channels",
    "resample_quality": "audio.resample_quality",
    "recording_pooling": "output.recording_pooling",
    "preprocessing": "the model's preprocessing (its code's version)",
    "sample_rate_hz": "the model's sample rate (its code's version)",
}


@dataclass(frozen=True)
class JobProvenance:
    """The record stamped on outputs; constant for one job."""

    job_id: str
    config_sha256: str
    code_version: str
    git_commit: str
    package_version: str
    model_name: str
    weights_uri: str
    weights_sha256: str
    variant: str
    libraries: dict[str, str]
    started_at: str

    @classmethod
    def create(cls, cfg: JobConfig, job_id: str, variant: Variant, weights_uri: str) -> JobProvenance:
        return cls(
            job_id=job_id,
            config_sha256=cfg.sha256(),
            code_version=code_version(),
            git_commit=git_commit(),
            package_version=package_version(),
            model_name=variant.model_name,
            weights_uri=weights_uri,
            weights_sha256=variant.weights_sha256,
            variant=variant.id,
            libraries=library_versions(),
            started_at=utc_now(),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row_columns(self) -> dict[str, str]:
        """The provenance values repeated on every output row."""
        return {
            "job_id": self.job_id,
            "model_name": self.model_name,
            "weights_sha256": self.weights_sha256,
            "config_sha256": self.config_sha256,
            "code_version": self.code_version,
        }
