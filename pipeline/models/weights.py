"""Fetching checkpoint files: any fsspec URI in, a verified local file out.

Local paths and ``file://`` URIs are read where they are. Everything else (``hf://``,
``gs://``, ``s3://``, ``https://``, ``memory://`` ...) is streamed once into a content-addressed
cache and found there afterwards, with one metadata request to check that the original has
not changed (offline, the cached copy is used with a warning)::

    $EMBED_ARCHIVE_CACHE (default ~/.cache/embed-archive)/weights/
        blobs/<sha256>            the checkpoint bytes
        refs/<sha256 of URI>.json {"uri": <redacted URI>, "sha256": ..., "size": ...}

Both are written to a temporary file in the same folder and renamed into place, so
concurrent actors on one node never see a partial file; two of them downloading at once
both produce the same blob.

When a file cannot be had, :class:`~pipeline.errors.WeightsUnavailableError` says which
URI failed, why (one line, secrets scrubbed), and how to supply the file: point
``model.weights`` at a local copy, or pre-fill the cache with :func:`cache_weights`
(``embed-archive cache-weights URI FILE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline import redact
from pipeline.errors import WeightsUnavailableError
from pipeline.models.base import WeightsInfo

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SHARED_MODE = 0o644
_LOCAL_PROTOCOLS = (None, "file", "local")

RANDOM_WEIGHTS = WeightsInfo(uri="random", sha256="random", format="random")
"""Provenance of randomly initialised weights."""


@dataclass(frozen=True)
class LocalWeights:
    """A checkpoint file on local disk.

    Attributes:
        path: where the bytes are.
        uri: the URI it was asked for under, with secrets redacted.
        sha256: hex digest of the file.
        format: ``safetensors``, ``torch``, ``tflite`` or ``unknown`` (from the content).
    """

    path: Path
    uri: str
    sha256: str
    format: str


def cache_root() -> Path:
    """The weights cache folder (``$EMBED_ARCHIVE_CACHE/weights`` or ``~/.cache/...``)."""
    base = os.environ.get("EMBED_ARCHIVE_CACHE") or Path.home() / ".cache" / "embed-archive"
    return Path(base) / "weights"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def detect_format(path: Path) -> str:
    """Checkpoint format from the first bytes of the file.

    Returns:
        ``safetensors`` (8-byte header length then a JSON object), ``torch`` (a zip
        archive or a legacy pickle), ``tflite`` (``TFL3`` identifier) or ``unknown``.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if head[4:8] == b"TFL3":
        return "tflite"
    return "unknown"


def fetch_weights(uri: str, storage_options: Mapping[str, Any] | None = None) -> LocalWeights:
    """Resolve a checkpoint URI to a verified local file.

    Args:
        uri: a local path, ``file://`` URI, or any URI fsspec can open.
        storage_options: fsspec options for the remote filesystem (credentials,
            endpoints); never logged or stored.

    Returns:
        The local file with its hash and detected format.

    Raises:
        WeightsUnavailableError: the file does not exist, cannot be reached (no network,
            offline mode, missing credentials, missing fsspec backend) or is empty.

    Cached files are re-hashed on every use, so the recorded sha256 is always that of
    the bytes actually loaded. A file this function downloaded is checked against the
    remote object's identity (ETag, generation, version, size...) on every use, one metadata
    request: an object replaced under its URI is fetched again, on every node, instead of
    each node keeping whichever copy it fetched first. Where that check cannot run (offline,
    no credentials) the cached copy is used. A file registered with :func:`cache_weights`
    is used as given.
    """
    shown = redact.checkpoint_uri(uri)
    secrets = redact.secrets_in(uri, storage_options)
    local = _local_path(uri)
    if local is not None:
        if not local.is_file():
            raise WeightsUnavailableError(f"checkpoint {shown} does not exist or is not a file")
        return _describe(local, shown)
    options = dict(storage_options or {})
    cached = _cached_blob(shown)
    if cached is not None:
        blob, remote = cached
        if not remote:  # registered by hand (cache-weights): nothing to compare with
            return _describe(blob, shown, blob.name)
        try:
            current = _remote_identity(uri, options)
        except Exception as err:  # noqa: BLE001 - offline, no credentials, gone: keep the copy
            reason = redact.scrub(f"{type(err).__name__}: {err}".splitlines()[0], secrets)
            log.warning("cannot check the cached copy of %s against the original (%s); "
                        "using the cached copy", shown, reason)
            return _describe(blob, shown, blob.name)
        if current == remote and set(current) - {"size"}:
            return _describe(blob, shown, blob.name)
        if current == remote:  # two checkpoints of one architecture have one size
            log.warning("%s says nothing of its version but its size; fetching it again, as "
                        "a copy cached earlier may be of another checkpoint", shown)
        else:
            log.warning("%s changed since this node cached it (%s, was %s); fetching it again",
                        shown, current, remote)
    waited_from = time.time()
    with _fetch_lock(shown):
        # The actors of one node start together: one downloads, the others wait here and
        # take what it registered.
        fresh = _cached_blob(shown)
        if fresh is not None and _ref_path(shown).stat().st_mtime >= waited_from:
            return _describe(fresh[0], shown, fresh[0].name)
        try:
            blob, remote = _download(uri, options)
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(f"{shown}: {err}") from None
        except Exception as err:  # noqa: BLE001 - any backend failure becomes one clear message
            reason = redact.scrub(f"{type(err).__name__}: {err}".splitlines()[0], secrets)
            raise WeightsUnavailableError(_unavailable_message(shown, reason)) from None
        _write_ref(shown, blob, remote)
    return _describe(blob, shown, blob.name)


def cache_weights(uri: str, local_path: str | os.PathLike[str]) -> LocalWeights:
    """Pre-fill the cache: make ``uri`` resolve to a copy of ``local_path`` offline.

    This is what ``embed-archive cache-weights URI FILE`` runs, for machines that cannot
    reach the weights' host: download the file elsewhere, copy it over, register it.

    Args:
        uri: the URI jobs will ask for (e.g. a registry entry's published ``hf://`` URI).
        local_path: the checkpoint file.

    Returns:
        The cached file (its ``uri`` is the redacted ``uri``).

    Raises:
        WeightsUnavailableError: ``local_path`` is not a readable file, or not a checkpoint.
    """
    source = Path(local_path)
    if not source.is_file():
        raise WeightsUnavailableError(f"cannot cache {redact.checkpoint_uri(uri)}: {source} is not a file")
    if detect_format(source) == "unknown":  # else every later run blames the URI
        raise WeightsUnavailableError(f"cannot cache {redact.checkpoint_uri(uri)}: {source} is not a "
                                      "checkpoint (neither safetensors, torch nor TFLite)")
    with open(source, "rb") as f:
        blob = _store_blob(f)
    shown = redact.checkpoint_uri(uri)
    _write_ref(shown, blob)  # no remote identity: used as given, never checked online
    return _describe(blob, shown, blob.name)


# --------------------------------------------------------------------------- helpers


def _local_path(uri: str) -> Path | None:
    from fsspec.core import split_protocol

    protocol, path = split_protocol(uri)
    if protocol not in _LOCAL_PROTOCOLS:
        return None
    return Path(urllib.parse.unquote(path) if protocol else path).expanduser()


def _describe(path: Path, shown: str, sha256: str | None = None) -> LocalWeights:
    return LocalWeights(path=path, uri=shown, sha256=sha256 or sha256_file(path),
                        format=detect_format(path))


def _ref_path(shown: str) -> Path:
    return cache_root() / "refs" / f"{hashlib.sha256(shown.encode()).hexdigest()}.json"


@contextlib.contextmanager
def _fetch_lock(shown: str) -> Iterator[None]:
    """An exclusive lock on this machine for fetching ``shown`` (``flock``; none where the
    platform has no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent downloads stay correct, only wasteful
        yield
        return
    path = _ref_path(shown).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_blob(shown: str) -> tuple[Path, dict[str, str]] | None:
    """The cached file for ``shown`` and the remote identity it was fetched at (empty for
    a file registered by hand), if its index entry and intact blob exist.

    A blob whose content no longer matches its name is deleted (and fetched again).
    """
    ref = _ref_path(shown)
    try:
        record = json.loads(ref.read_text())
        digest, remote = record["sha256"], dict(record.get("remote") or {})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    blob = cache_root() / "blobs" / digest
    if not blob.is_file():
        return None
    if sha256_file(blob) != digest:
        log.warning("cached weights %s are corrupt; fetching %s again", blob, shown)
        blob.unlink(missing_ok=True)
        return None
    return blob, remote


# What identifies one version of an object, as fsspec backends report it (S3, GCS, Azure,
# HTTP, Hugging Face, local and memory filesystems); the size is in it, but never alone
# enough to call two versions equal: a copy known by its size alone is fetched again.
_IDENTITY_KEYS = ("ETag", "etag", "VersionId", "generation", "md5Hash", "content_md5",
                  "Content-MD5", "Digest", "blob_id", "lfs", "LastModified", "last_modified",
                  "Last-Modified", "updated", "mtime", "created", "size")


def _identity(info: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(info[k]) for k in _IDENTITY_KEYS if info.get(k) is not None}


def _remote_identity(uri: str, storage_options: dict[str, Any]) -> dict[str, str]:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri, **storage_options)
    return _identity(fs.info(path))


def _download(uri: str, storage_options: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    """The object in a blob, and its identity as read just before the download (an object
    replaced during it is caught by the next use's check)."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri, **storage_options)
    info = fs.info(path)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    # Read through, not by range: an HTTP server need not support ranges (http.server does not).
    streamed = {"block_size": 0} if "http" in protocols or "https" in protocols else {}
    with fs.open(path, "rb", **streamed) as f:
        blob = _store_blob(f)
    expected = info.get("size")
    got = blob.stat().st_size
    if expected is not None and int(expected) != got:
        raise WeightsUnavailableError(f"incomplete download: {got} of {expected} bytes "
                                      "(the object changed while it was read?); try again")
    return blob, _identity(info)


def _store_blob(stream: IO[bytes]) -> Path:
    """Copy a stream into ``blobs/<sha256>`` atomically; returns the blob path."""
    folder = cache_root() / "blobs"
    folder.mkdir(parents=True, exist_ok=True)
    _sweep_partials(folder)
    digest = hashlib.sha256()
    size = 0
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".partial-", delete=False) as tmp:
        try:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                digest.update(chunk)
                tmp.write(chunk)
                size += len(chunk)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    if size == 0:
        os.unlink(tmp.name)
        raise WeightsUnavailableError("the checkpoint file is empty")
    blob = folder / digest.hexdigest()
    # Readable by every user of a shared cache (NamedTemporaryFile makes files 0600).
    os.chmod(tmp.name, _SHARED_MODE)
    os.replace(tmp.name, blob)
    return blob


def _sweep_partials(folder: Path, older_than_s: float = 86_400.0) -> None:
    """Remove downloads a killed process left half-written (a day old: none in progress)."""
    cutoff = time.time() - older_than_s
    for stale in folder.glob(".partial-*"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()


def _write_ref(shown: str, blob: Path, remote: Mapping[str, str] | None = None) -> None:
    ref = _ref_path(shown)
    ref.parent.mkdir(parents=True, exist_ok=True)
    record = {"uri": shown, "sha256": blob.name, "size": blob.stat().st_size,
              "remote": dict(remote or {})}
    with tempfile.NamedTemporaryFile("w", dir=ref.parent, prefix=".partial-", delete=False) as tmp:
        json.dump(record, tmp)
    os.chmod(tmp.name, _SHARED_MODE)
    os.replace(tmp.name, ref)


def _unavailable_message(shown: str, reason: str) -> str:
    lines = [f"could not fetch model weights from {shown} ({reason})."]
    download = _browser_url(shown)
    if download:
        lines.append(f"Download it on a machine with network access: {download}")
    lines += [
        "Then either set model.weights to the local file's path, or pre-fill the cache with",
        f"  embed-archive cache-weights {shown} /path/to/file",
        f"(cache: {cache_root()}; set EMBED_ARCHIVE_CACHE to move it).",
    ]
    return "\n".join(lines)


def _browser_url(shown: str) -> str | None:
    """``https://huggingface.co/[datasets/|spaces/]<org>/<repo>/resolve/<revision>/<file>``
    for ``hf://`` URIs (``hf://[datasets/]org/repo[@revision]/file``)."""
    if not shown.startswith("hf://"):
        return None
    parts = shown[len("hf://"):].split("/")
    kind = ""
    if parts and parts[0] in ("datasets", "spaces"):
        kind, parts = parts[0] + "/", parts[1:]
    if len(parts) < 3:
        return None
    org, repo, *rest = parts
    repo, _, revision = repo.partition("@")
    revision = urllib.parse.quote(urllib.parse.unquote(revision or "main"), safe="")
    return f"https://huggingface.co/{kind}{org}/{repo}/resolve/{revision}/{'/'.join(rest)}"

