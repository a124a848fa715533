"""Fetching checkpoint files: any fsspec URI in, a verified local file out.

Local paths and ``file://`` URIs are read where they are. Everything else (``hf://``,
``gs://``, ``s3://``, ``https://``, ``memory://`` ...) is streamed once into a content-addressed
cache and found there afterwards, with one metadata request to check that the original has
not changed (offline, the cached copy is used with a warning)::

    $EMBED_ARCHIVE_CACHE (default ~/.cache/embed-archive)/weights/
        blobs/<sha256>            the checkpoint bytes
        refs/<sha256 of key>.json {"uri": <redacted URI>, "sha256": ..., "size": ...}

The key is the redacted URI, plus, where ``storage_options`` point it at another store than
its protocol's default (``endpoint_url``: an S3-compatible service; an Azure account), that
store: ``s3://bucket/key`` on two endpoints is two objects.

Both are written to a temporary file in the same folder and renamed into place, so
concurrent actors on one node never see a partial file; two of them downloading at once
both produce the same blob.

When a file cannot be had, :class:`~pipeline.errors.WeightsUnavailableError` says which
URI failed, why (one line, secrets scrubbed), and how to supply the file: point
``model.weights`` at a local copy, or pre-fill the cache with :func:`cache_weights`
(``embed-archive cache-weights URI FILE``). Within :func:`advice_for_cluster` (a job that
joins a Ray cluster, whose driver and nodes each fetch into a cache of their own), it says
instead to put the file in a bucket every node reads, or in a cache folder they all mount.
"""

from __future__ import annotations

import contextlib
import contextvars
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

from pipeline import redact, storage
from pipeline.errors import WeightsUnavailableError
from pipeline.models.base import WeightsInfo

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SHARED_MODE = 0o644
_LOCAL_PROTOCOLS = (None, "file", "local")

# Endpoint-like storage options, which make one URI name another object (top level, or in
# ``client_kwargs`` / ``config_kwargs``): s3fs's and gcsfs's ``endpoint_url``, Hugging Face's
# ``endpoint``, adlfs's ``account_name`` / ``account_host``.
_STORE_OPTIONS = ("endpoint_url", "endpoint", "account_name", "account_host")
_S3_PROTOCOLS = ("s3", "s3a")

_ON_CLUSTER: contextvars.ContextVar[bool] = contextvars.ContextVar("weights_on_cluster",
                                                                   default=False)

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


@contextlib.contextmanager
def advice_for_cluster(on_cluster: bool = True) -> Iterator[None]:
    """Within: weights that cannot be had are being fetched for a job that joins a Ray
    cluster (``on_cluster``), so the error advises what reaches every node (a bucket, a
    shared cache folder), not ``embed-archive cache-weights`` on this machine alone."""
    token = _ON_CLUSTER.set(on_cluster)
    try:
        yield
    finally:
        _ON_CLUSTER.reset(token)


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
        return _format_of(f.read(16))


def _format_of(head: bytes) -> str:
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
    return _fetch(uri, storage_options, keep=False)[0]


def read_weights(uri: str, storage_options: Mapping[str, Any] | None = None
                 ) -> tuple[LocalWeights, bytes]:
    """:func:`fetch_weights`, and the file's bytes, hashed as they were read.

    The bytes are read once and hashed once: ``sha256`` is that of the bytes returned, even
    if the file is replaced or rewritten meanwhile. (A file this call downloads is read and
    hashed once more after the download.)

    Raises:
        WeightsUnavailableError: as :func:`fetch_weights`.
    """
    local, data = _fetch(uri, storage_options, keep=True)
    assert data is not None
    return local, data


def _fetch(uri: str, storage_options: Mapping[str, Any] | None, keep: bool
           ) -> tuple[LocalWeights, bytes | None]:
    """:func:`fetch_weights`; with ``keep``, also the bytes, hashed in the same pass."""
    shown = redact.checkpoint_uri(uri)
    secrets = redact.secrets_in(uri, storage_options)
    local = _local_path(uri)
    if local is not None:
        if not local.is_file():
            raise WeightsUnavailableError(_missing_message(shown))
        return _describe(local, shown, keep=keep)
    options = dict(storage_options or {})
    storage.quiet_gcsfs_retries()  # this reports a failed request in one line, not gcsfs
    key = _cache_key(uri, shown, options)
    cached = _cached_blob(key, keep)
    if cached is not None:
        blob, remote, data = cached
        if not remote:  # registered by hand (cache-weights): nothing to compare with
            return _describe(blob, shown, blob.name, data)
        try:
            current = _remote_identity(uri, options)
        except Exception as err:  # noqa: BLE001 - offline, no credentials, gone: keep the copy
            reason = redact.scrub(f"{type(err).__name__}: {err}".splitlines()[0], secrets)
            log.warning("cannot check the cached copy of %s against the original (%s); "
                        "using the cached copy", shown, reason)
            return _describe(blob, shown, blob.name, data)
        if current == remote and set(current) - {"size"}:
            return _describe(blob, shown, blob.name, data)
        del data
        if current == remote:  # two checkpoints of one architecture have one size
            log.warning("%s says nothing of its version but its size; fetching it again, as "
                        "a copy cached earlier may be of another checkpoint", shown)
        else:
            log.warning("%s changed since this node cached it (%s, was %s); fetching it again",
                        shown, current, remote)
    waited_from = time.time()
    with _fetch_lock(key):
        # The actors of one node start together: one downloads, the others wait here and
        # take what it registered.
        fresh = _cached_blob(key, keep)
        if fresh is not None and _ref_path(key).stat().st_mtime >= waited_from:
            return _describe(fresh[0], shown, fresh[0].name, fresh[2])
        del fresh
        try:
            blob, remote = _download(uri, options)
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(f"{shown}: {err}") from None
        except Exception as err:  # noqa: BLE001 - any backend failure becomes one clear message
            reason = redact.scrub(f"{type(err).__name__}: {err}".splitlines()[0], secrets)
            raise WeightsUnavailableError(_unavailable_message(
                shown, reason, flags=_store_flags(_store_of(uri, options)))) from None
        _write_ref(key, shown, blob, remote)
    return _describe(blob, shown, blob.name, keep=keep)


def cache_weights(uri: str, local_path: str | os.PathLike[str],
                  storage_options: Mapping[str, Any] | None = None) -> LocalWeights:
    """Pre-fill the cache: make ``uri`` resolve to a copy of ``local_path`` offline.

    This is what ``embed-archive cache-weights URI FILE`` runs, for machines that cannot
    reach the weights' host: download the file elsewhere, copy it over, register it.

    Args:
        uri: the URI jobs will ask for (e.g. a registry entry's published ``hf://`` URI).
        local_path: the checkpoint file.
        storage_options: the endpoint-like options jobs give the URI with
            (``model.storage_options``: ``endpoint_url`` and the like; the others are
            ignored), or for S3 ``AWS_ENDPOINT_URL[_S3]``: a copy is found only by jobs that
            point the URI at the same store.

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
    # No remote identity: used as given, never checked online. Keyed by the URI and the
    # store it names: a job pointing it at another endpoint looks under another key.
    _write_ref(_cache_key(uri, shown, dict(storage_options or {})), shown, blob)
    return _describe(blob, shown, blob.name)[0]


# --------------------------------------------------------------------------- helpers


def _local_path(uri: str) -> Path | None:
    from fsspec.core import split_protocol

    protocol, path = split_protocol(uri)
    if protocol not in _LOCAL_PROTOCOLS:
        return None
    return Path(urllib.parse.unquote(path) if protocol else path).expanduser()


def _describe(path: Path, shown: str, sha256: str | None = None, data: bytes | None = None,
              keep: bool = False) -> tuple[LocalWeights, bytes | None]:
    """The file as :class:`LocalWeights`, and with ``keep`` its bytes (``data``, when the
    caller read and hashed them already, or read and hashed now: one pass, whose hash must
    be ``sha256`` when given)."""
    if keep and data is None:
        digest, data = sha256_of_file_bytes(path)
        if sha256 is not None and digest != sha256:
            raise WeightsUnavailableError(changed_message(shown, sha256))
        sha256 = digest
    if data is not None:
        fmt = _format_of(data[:16])
    else:
        fmt = detect_format(path)
    return LocalWeights(path=path, uri=shown, sha256=sha256 or sha256_file(path),
                        format=fmt), data


def sha256_of_file_bytes(path: Path) -> tuple[str, bytes]:
    """A file's SHA-256 and bytes: read once into one buffer, hashed once."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha256(data).hexdigest(), data


def changed_message(shown: str, sha256: str) -> str:
    """A file whose bytes no longer hash to what it was recorded by."""
    return (f"{shown} changed while it was read (its sha256 is no longer {sha256[:16]}…); "
            "run again once it is written")


def _store_of(uri: str, storage_options: Mapping[str, Any]) -> dict[str, str]:
    """The store ``storage_options`` (or, for S3, ``AWS_ENDPOINT_URL[_S3]``) point ``uri``
    at, as ``{"[scope.]option": redacted value}``; empty for the protocol's default."""
    from fsspec.core import split_protocol

    store: dict[str, str] = {}
    for scope in ("", "client_kwargs", "config_kwargs"):
        options = storage_options.get(scope) if scope else storage_options
        if not isinstance(options, Mapping):
            continue
        for name in _STORE_OPTIONS:
            value = options.get(name)
            if value not in (None, ""):
                # Redacted as URIs are: a password in an endpoint is never hashed into a name.
                store[f"{scope}.{name}".lstrip(".")] = redact.checkpoint_uri(str(value))
    if not store and split_protocol(uri)[0] in _S3_PROTOCOLS:
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if env:
            store["endpoint_url"] = redact.checkpoint_uri(env)
    return store


def _cache_key(uri: str, shown: str, storage_options: Mapping[str, Any]) -> str:
    """What the cache files ``uri`` under: its redacted form, plus the store that
    ``storage_options`` (or, for S3, ``AWS_ENDPOINT_URL[_S3]``) point it at, if any. Without
    one, the URI alone, as before endpoints counted: caches filled then are still found."""
    store = _store_of(uri, storage_options)
    return f"{shown} at {json.dumps(store, sort_keys=True)}" if store else shown


def _store_flags(store: Mapping[str, str]) -> str:
    """``--storage-option`` flags for ``embed-archive cache-weights`` that key a copy under
    the store ``store`` names (a :func:`_store_of` result), each with a leading space."""
    scoped: dict[str, dict[str, str]] = {}
    for name, value in store.items():
        scope, _, option = name.rpartition(".")
        scoped.setdefault(scope, {})[option] = value
    flags = [f" --storage-option '{option}={value}'" for option, value in scoped.pop("", {}).items()]
    flags += [f" --storage-option '{scope}={json.dumps(options, sort_keys=True)}'"
              for scope, options in scoped.items()]
    return "".join(flags)


def _ref_path(key: str) -> Path:
    return cache_root() / "refs" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


@contextlib.contextmanager
def _fetch_lock(key: str) -> Iterator[None]:
    """An exclusive lock on this machine for fetching what the cache files under ``key``
    (``flock``; none where the platform has no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent downloads stay correct, only wasteful
        yield
        return
    path = _ref_path(key).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_blob(key: str, keep: bool = False
                 ) -> tuple[Path, dict[str, str], bytes | None] | None:
    """The cached file under ``key``, the remote identity it was fetched at (empty for a
    file registered by hand) and, with ``keep``, its bytes (read and checked in one pass),
    if its index entry and intact blob exist.

    A blob whose content no longer matches its name is deleted (and fetched again).
    """
    ref = _ref_path(key)
    try:
        record = json.loads(ref.read_text())
        digest, remote = record["sha256"], dict(record.get("remote") or {})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    blob = cache_root() / "blobs" / digest
    if not blob.is_file():
        return None
    data = None
    if keep:
        try:
            actual, data = sha256_of_file_bytes(blob)
        except FileNotFoundError:  # removed meanwhile (found corrupt by another actor)
            return None
    else:
        actual = sha256_file(blob)
    if actual != digest:
        log.warning("cached weights %s are corrupt; fetching %s again",
                    blob, record.get("uri", key))
        blob.unlink(missing_ok=True)
        return None
    return blob, remote, data


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


def _write_ref(key: str, shown: str, blob: Path,
               remote: Mapping[str, str] | None = None) -> None:
    ref = _ref_path(key)
    ref.parent.mkdir(parents=True, exist_ok=True)
    record = {"uri": shown, **({"key": key} if key != shown else {}), "sha256": blob.name,
              "size": blob.stat().st_size, "remote": dict(remote or {})}
    with tempfile.NamedTemporaryFile("w", dir=ref.parent, prefix=".partial-", delete=False) as tmp:
        json.dump(record, tmp)
    os.chmod(tmp.name, _SHARED_MODE)
    os.replace(tmp.name, ref)


def _missing_message(shown: str) -> str:
    message = f"checkpoint {shown} does not exist or is not a file"
    if _ON_CLUSTER.get():
        message += (" (on a Ray cluster the driver and every node read model.weights for "
                    "themselves: a local path must exist on each, e.g. a folder they all "
                    "mount; or copy the file to a bucket and set model.weights to its gs:// "
                    "or s3:// URI)")
    return message


def _unavailable_message(shown: str, reason: str, on_cluster: bool | None = None,
                         flags: str = "") -> str:
    """What failed and how to supply the file: for this machine, or (``on_cluster``;
    default: within :func:`advice_for_cluster`) for a Ray cluster's driver and nodes, whose
    caches are their own. ``flags``: what ``cache-weights`` needs to key the copy as the job
    looks it up (:func:`_store_flags`)."""
    lines = [f"could not fetch model weights from {shown} ({reason})."]
    download = _browser_url(shown)
    if download:
        lines.append(f"Download it on a machine with network access: {download}")
    if _ON_CLUSTER.get() if on_cluster is None else on_cluster:
        name = shown.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"
        lines += [
            "This job runs on a Ray cluster, where the driver and every node fetch the weights",
            "into a cache of their own: `embed-archive cache-weights` fills only the cache of",
            "the machine it runs on. Copy the file to a bucket the nodes can read and set",
            f"  model.weights: gs://your-bucket/{name}",
            "(or s3://...; credentials and endpoint in model.storage_options),",
            "or set EMBED_ARCHIVE_CACHE, for the driver and every node (`embed-archive submit",
            "--env EMBED_ARCHIVE_CACHE=...`), to a folder they all mount, and fill it once with",
            f"  embed-archive cache-weights{flags} {shown} /path/to/file",
        ]
        return "\n".join(lines)
    lines += [
        "Then either set model.weights to the local file's path, or pre-fill the cache with",
        f"  embed-archive cache-weights{flags} {shown} /path/to/file",
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

