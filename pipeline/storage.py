"""Everything that touches a filesystem: fsspec URLs, retries, atomic writes, redaction.

Stage code never calls ``open()`` on a path: it asks this module for a filesystem built
from plain options (``url_to_fs``), which is cached per process so a worker builds one
client per bucket, not one per file. Filesystem objects are never shipped between
processes; the options are (some clients do not pickle cleanly).
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import errno
import hashlib
import heapq
import io
import logging
import os
import random
import re
import shlex
import shutil
import stat
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import fsspec
import fsspec.asyn
from fsspec.utils import glob_translate

from pipeline import redact
from pipeline.errors import AudioDecodeError, ConfigError, PipelineError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

# gcsfs >= 2026.x probes a gRPC "storage layout" API before every call; against anything
# but real GCS (the emulator, a proxy) that waits 60 s per call. Workers inherit this.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


class _GcsfsRetryTracebacks(logging.Filter):
    """Drop gcsfs's ERROR record, with its traceback, of a request it gives up on.

    gcsfs's retry wrapper logs ``logger.exception`` before it raises the same exception to
    its caller: offline, ~100 lines of aiohttp traceback per request ahead of the job's
    own one-line error, which already names it (and once per call the job retries itself).
    Kept where DEBUG is asked for: ``run.log_level: DEBUG`` lowers the root logger on the
    driver and the ``pipeline`` logger in Ray workers (or a user lowers ``gcsfs``'s own).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.funcName != "retry_request" or record.levelno < logging.ERROR:
            return True
        return any(logging.getLogger(name).isEnabledFor(logging.DEBUG)
                   for name in ("gcsfs", "pipeline"))


def quiet_gcsfs_retries() -> None:
    """Install :class:`_GcsfsRetryTracebacks` on the ``gcsfs`` logger, once per process."""
    logger = logging.getLogger("gcsfs")
    if not any(isinstance(f, _GcsfsRetryTracebacks) for f in logger.filters):
        logger.addFilter(_GcsfsRetryTracebacks())


quiet_gcsfs_retries()

_PROTOCOL_ALIASES: dict[str, frozenset[str]] = {
    alias: group
    for group in (frozenset({"s3", "s3a"}), frozenset({"gs", "gcs"}), frozenset({"http", "https"}),
                  frozenset({"file", "local"}), frozenset({"az", "abfs", "abfss"}))
    for alias in group
}
# Names that, as a storage_options key with a mapping value, mean "options for this protocol".
_KNOWN_PROTOCOLS = frozenset(_PROTOCOL_ALIASES) | frozenset(
    {"hf", "memory", "ftp", "sftp", "ssh", "smb", "webdav", "hdfs", "webhdfs", "oss", "oci", "adl"})

# Connections an S3 filesystem opens at once. botocore's default, 10, is one pool for every
# thread of the process that uses the (cached) filesystem: the markers a rerun reads 64 at
# a time, a manifest's 32 lookups, the commit threads beside the carving ones, all had 10
# requests in flight at most.
S3_CONNECTIONS = 128

_FS_CACHE: dict[tuple[str, str], fsspec.AbstractFileSystem] = {}
_FS_LOCK = threading.Lock()


_CHAINED = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*::|::[a-zA-Z][a-zA-Z0-9+.-]*://")


def chained_url_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be used, if it is an fsspec chain (``simplecache::s3://b/k``,
    ``zip://a.wav::s3://b/x.zip``); else ``None``."""
    if not _CHAINED.search(uri):
        return None
    return ("chained fsspec URLs ('a::b') are not supported: recordings are read by byte "
            "range and named by their own URL (a cache layer would copy whole objects); "
            "give the object's URL, and its options in storage_options")


def protocol_of(uri: str) -> str:
    """``s3`` for ``s3://b/k``, ``file`` for plain paths."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else "file"


def unknown_protocol(uri: str) -> str | None:
    """Why fsspec cannot take ``uri``'s protocol as written: one it does not know
    (``s3x://``, or ``S3://``: fsspec's are lower case), which it refuses with a bare
    ``ValueError: Protocol not known`` at the first use, a traceback; else None."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    if not match:
        return None
    written = match.group(1)
    try:  # the registry too: a plugin's filesystem, registered at run time
        fsspec.get_filesystem_class(written)
        return None
    except ImportError:  # known, its library missing: missing_filesystem says so
        return None
    except ValueError:
        pass
    known = [*fsspec.available_protocols(), *fsspec.registry]
    near = ([written.lower()] if written.lower() in known
            else difflib.get_close_matches(written.lower(), known, n=1))
    return (f"{written}:// is no protocol fsspec knows"
            + (f" (did you mean {near[0]}://?)" if near else ""))


def missing_filesystem(uri: str) -> str | None:
    """Why ``uri``'s filesystem cannot be made here: fsspec knows its protocol, but the
    library behind it is not installed (``abfs://`` without adlfs); else None (an unknown
    protocol is fsspec's to say where the URL is used)."""
    protocol = protocol_of(uri)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:
        return (f"{protocol}:// needs a library this environment lacks ({err}); install it "
                "here and on every node of a cluster")
    except ValueError:
        return None
    return None


# Options every fsspec filesystem takes besides its constructor's own: the instance cache's
# (taken by fsspec before the constructor) and the listings cache's (AbstractFileSystem's).
_FSSPEC_OPTIONS = frozenset({"skip_instance_cache", "use_listings_cache",
                             "listings_expiry_time", "max_paths"})


def _aiobotocore_session_options() -> frozenset[str]:
    from aiobotocore.session import AioSession

    return _named_parameters(AioSession.__init__)[0]


# Where a filesystem class sends the options its constructor does not name, when not to
# the class above it: s3fs hands them all to aiobotocore's session, which takes only its
# own (``endpoint`` for ``endpoint_url`` failed there, at the first request).
_KWARGS_TAKEN_BY: dict[str, Callable[[], frozenset[str]]] = {
    "s3fs.core.S3FileSystem": _aiobotocore_session_options,
}


def _named_parameters(function: Any) -> tuple[frozenset[str], bool]:
    """The keyword arguments ``function`` names, and whether it takes others (``**``)."""
    import inspect

    params = inspect.signature(function).parameters.values()
    named = frozenset(p.name for p in params if p.kind in (
        p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def filesystem_options(protocol: str) -> frozenset[str] | None:
    """The options ``protocol``'s filesystem takes, or None where it takes any (most pass
    what they do not name on to fsspec's base class, which keeps them unused) or its
    library is not installed.

    Read from the constructors' signatures, up the class's bases while each passes unnamed
    options on, and from where a class is known to send them instead
    (:data:`_KWARGS_TAKEN_BY`).
    """
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return None
    names: set[str] = set(_FSSPEC_OPTIONS)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is fsspec.AbstractFileSystem:  # takes anything, as storage_options
            return None
        try:
            named, takes_more = _named_parameters(init)
        except (TypeError, ValueError):  # no signature to read: say nothing
            return None
        names |= named
        if not takes_more:
            return frozenset(names)
        taken_by = _KWARGS_TAKEN_BY.get(f"{klass.__module__}.{klass.__qualname__}")
        if taken_by is not None:
            try:
                return frozenset(names | taken_by())
            except (ImportError, TypeError, ValueError):
                return None
    return None


def unknown_option_problem(uri: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """Why the options that apply to ``uri`` (:func:`options_for`) include one its
    filesystem does not take, with the closest it does; else None. Options keyed by
    another protocol, for a manifest that mixes stores, are checked against that one's."""
    import difflib

    options = dict(storage_options or {})
    checks = [(protocol_of(uri), options_for(uri, options))]
    checks += [(key.lower(), value) for key, value in options.items()
               if isinstance(value, Mapping) and key.lower() in _KNOWN_PROTOCOLS]
    for protocol, given in checks:
        taken = filesystem_options(protocol)
        if taken is None:
            continue
        for key in given:
            if isinstance(given.get(key), Mapping) and key.lower() in _KNOWN_PROTOCOLS:
                continue  # options keyed by protocol, checked as their own
            if key not in taken:
                close = difflib.get_close_matches(key, sorted(taken), n=1)
                hint = (f" (did you mean {close[0]}?)" if close else
                         f"; it takes {', '.join(sorted(taken - _FSSPEC_OPTIONS))}")
                return f"unknown option {key!r} for {protocol}{hint}"
    return None


def canonical_protocol(protocol: str) -> str:
    """One name for a store however a URL spells it: ``s3`` for ``s3a``, ``file`` for
    ``local``."""
    return min(_PROTOCOL_ALIASES.get(protocol, frozenset({protocol})))


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def options_for(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The filesystem options that apply to ``uri``.

    ``storage_options`` is either one mapping for every URI (``{"key": ..., "secret": ...}``)
    or keyed by protocol, for a manifest that mixes stores::

        {"s3": {"key": ..., "client_kwargs": {"endpoint_url": ...}}, "https": {}, "anon": False}

    A value keyed by the URI's protocol (or an alias: ``gs``/``gcs``, ``s3``/``s3a``,
    ``http``/``https``) is merged over the plain keys; other protocols' values are dropped.
    """
    options = dict(storage_options or {})
    keyed = [k for k, v in options.items()
             if isinstance(v, Mapping) and k.lower() in _KNOWN_PROTOCOLS]
    if not keyed:
        return options
    base = {k: v for k, v in options.items() if k not in keyed}
    protocol = protocol_of(uri)
    aliases = _PROTOCOL_ALIASES.get(protocol, frozenset({protocol}))
    for name in keyed:
        if name.lower() in aliases:
            base.update(options[name])
    return base


def url_to_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """Filesystem and in-filesystem path for ``uri``, cached per (protocol, options, and
    the settings fsspec derives from the URL itself, such as S3's ``?versionId=``).

    Args:
        uri: any fsspec URL or local path.
        storage_options: options for the filesystem constructor (see :func:`options_for`
            for options keyed by protocol).

    Returns:
        ``(fs, path)``.

    Raises:
        ValueError: ``uri`` is a chained URL (see :func:`chained_url_problem`).
    """
    problem = chained_url_problem(uri)
    if problem:
        raise ValueError(f"{redact.uri(uri)}: {problem}")
    options = options_for(uri, storage_options)
    protocol = protocol_of(uri)
    try:
        from_url = fsspec.get_filesystem_class(protocol)._get_kwargs_from_urls(uri)
    except (ImportError, ValueError):  # unknown protocol: fsspec's own call says so below
        from_url = {}
    key = (protocol, repr(sorted(options.items(), key=lambda kv: kv[0])),
           repr(sorted(from_url.items(), key=lambda kv: kv[0])))
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
    if fs is None:
        fs, path = fsspec.core.url_to_fs(uri, **_connection_pool(protocol, options))
        with _FS_LOCK:
            _FS_CACHE.setdefault(key, fs)
        return fs, path
    return fs, fs._strip_protocol(uri)


def _connection_pool(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with an S3 filesystem's connection pool raised to :data:`S3_CONNECTIONS`,
    unless they set it (``config_kwargs: {max_pool_connections: N}``)."""
    if canonical_protocol(protocol) != "s3":
        return dict(options)
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", S3_CONNECTIONS)
    return {**options, "config_kwargs": config}


def forget_listings() -> None:
    """Drop what the cached filesystems remember of listings (fsspec's ``dircache``).

    s3fs and gcsfs answer ``info()`` from an earlier listing of the parent folder when they
    have one, without a request. In a process that runs more than one job (a notebook, a
    service, the tests), a folder listed by one run would then describe its objects to the
    next as they were: a single object or a manifest row rewritten meanwhile by another
    client kept its old version, so the next run neither embedded nor replaced it. Called
    before every listing, so each run sees the store as it is now.
    """
    with _FS_LOCK:
        cached = list(_FS_CACHE.values())
    for fs in cached:
        invalidate = getattr(fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate()


def full_uri(fs: Any, path: str) -> str:
    """The URL a user would write for ``path`` on ``fs`` (plain absolute path for local files)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return os.path.abspath(path)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path):
        return path  # HTTP(S) filesystems keep the whole URL as the path
    return f"{protocol}://{path}"


def join(root: str, *parts: str) -> str:
    """Join URL or path segments with ``/`` (fsspec paths are always ``/``-separated)."""
    out = root.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def safe_component(text: str) -> str:
    """Make ``text`` usable as one path component: no separators, no dot-dot, bounded length.

    Used for every path segment derived from data (model names, job ids) so that nothing
    from an input can escape ``output.uri``.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._=-]", "_", text).strip(".")
    return cleaned[:120] or "_"


# The signing schemes, each by the parameter that holds its signature (and what must be
# beside it), with every parameter that signing adds: the same object signed again differs
# in exactly those. AWS SigV4 and GCS V4; AWS SigV2, GCS V2 and CloudFront; Azure SAS.
_SIGNING_SCHEMES = (
    ({"x-amz-signature"}, re.compile(r"(?i)^x-amz-")),
    ({"x-goog-signature"}, re.compile(r"(?i)^x-goog-")),
    ({"signature"}, re.compile(r"(?i)^(signature|expires|awsaccesskeyid|googleaccessid|policy"
                               r"|key-pair-id)$")),
    ({"sig", "sv"}, re.compile(r"(?i)^(sig|sv|ss|srt|sp|se|st|spr|sr|si|sdd|skoid|sktid|skt"
                               r"|ske|sks|skv|saoid|suoid|scid)$")),
)


def unsigned_uri(uri: str) -> str:
    """A signed URL without its signing parameters (credential, date, expiry, signature),
    which change every time the same object is signed: the name the object is known by,
    in output rows and in its recording id. Any other URL, as it is."""
    if "?" not in uri or not redact.has_query(uri):
        return uri
    base, _, query = uri.partition("?")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    names = {k.lower() for k, _ in pairs}
    kept = pairs
    for needed, signing in _SIGNING_SCHEMES:
        if needed <= names:
            kept = [(k, v) for k, v in kept if not signing.match(k)]
    if kept is pairs:  # unsigned (or by a scheme not known here): as it is
        return uri
    return f"{base}?{urllib.parse.urlencode(kept)}" if kept else base


def source_uri(fs: Any, path: str, keep: Collection[str] = ()) -> str:
    """The URL a recording is known by: :func:`full_uri`, unsigned and redacted (but for
    the query parameters named in ``keep``: see :func:`redact.uri`)."""
    return redact.uri(unsigned_uri(full_uri(fs, path)), keep=keep)


# --------------------------------------------------------------------------- retries

NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                 FileExistsError)
# s3fs turns 503 SlowDown / ServiceUnavailable into EBUSY and 500 InternalError into EREMOTEIO.
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                    errno.ETIMEDOUT, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH,
                    errno.EIO, errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)}
# Errors that retrying cannot fix, whatever module raised them (missing or bad credentials,
# invalid parameters): fail at once with the library's own message.
_PERMANENT_NAMES = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "ParamValidationError", "NoRegionError", "InvalidConfigError", "UnknownServiceError",
    "DefaultCredentialsError", "InvalidRegionError", "ProfileNotFound", "ConfigNotFound",
    "ConfigParseError", "UnknownCredentialError",
})
_TRANSIENT_TEXT = re.compile(
    r"(?i)(\b5\d\d\b|\b429\b|throttl|slow ?down|rate ?limit|reduce your request rate|"
    r"timed? ?out|timeout|connection|reset|temporar|unavailable|internal ?error|service error|"
    r"broken pipe|incomplete|server disconnected|payload)"
)


# S3's 409s that ask for the request again: two conditional writes of one key racing
# (``ConditionalRequestConflict``), a conflicting operation under way (``OperationAborted``).
_RETRY_CONFLICTS = frozenset({"ConditionalRequestConflict", "OperationAborted"})


def _error_code(err: BaseException) -> str | None:
    """A botocore error's code (``NoSuchKey``...), if ``err`` is one."""
    response = getattr(err, "response", None)
    if isinstance(response, Mapping):
        return (response.get("Error") or {}).get("Code")
    return None


def http_status(err: BaseException) -> int | None:
    """The HTTP status an I/O error carries, if any (aiohttp, botocore, gcsfs, requests).

    aiohttp's own parser errors (``aiohttp.http_exceptions``: a body cut short by a reset,
    ``ContentLengthError``) carry ``code`` 400 too, but no server said it: they have none.
    """
    if type(err).__module__ == "aiohttp.http_exceptions":
        return None
    for attr in ("status", "code", "status_code"):
        value = getattr(err, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    response = getattr(err, "response", None)
    if isinstance(response, Mapping):  # botocore ClientError
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return value if isinstance(value, int) else None
    value = getattr(response, "status_code", None) or getattr(response, "status", None)
    return value if isinstance(value, int) else None


def _error_chain(err: BaseException, limit: int = 8) -> list[BaseException]:
    """``err`` and the errors it was raised from (``__cause__``, else ``__context__``)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and len(chain) < limit and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def is_transient(err: BaseException) -> bool:
    """Whether an I/O error is worth retrying (5xx, throttling, resets, timeouts).

    Looks through the chain of causes, because storage libraries translate errors: s3fs
    raises ``OSError(EBUSY)`` for a 503 SlowDown, with the botocore error (and its HTTP
    status) as the cause. A 4xx status other than 408/429, missing credentials and
    invalid parameters are permanent.
    """
    if isinstance(err, NOT_TRANSIENT):
        return False
    chain = _error_chain(err)
    for e in chain:
        if type(e).__name__ in _PERMANENT_NAMES:
            return False
        if type(e).__name__ == "RefreshError":  # google-auth says itself (invalid_grant: no)
            return bool(getattr(e, "retryable", False))
        status = http_status(e)
        if status is not None:
            return (status >= 500 or status in (408, 429)
                    or status == 409 and _error_code(e) in _RETRY_CONFLICTS)
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
    module = type(err).__module__ or ""
    if module.startswith(("aiohttp", "botocore", "aiobotocore", "urllib3", "requests",
                          "google", "gcsfs", "s3fs", "fsspec", "http")):
        return True
    return bool(_TRANSIENT_TEXT.search(f"{type(err).__name__} {err}"))


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 6,
    base_delay_s: float = 0.2,
    max_delay_s: float = 10.0,
) -> T:
    """Call ``fn`` and retry transient I/O errors with jittered exponential backoff.

    Args:
        fn: the operation; must be idempotent.
        what: description for logs and the final error (secrets redacted by the caller).
        attempts: total tries.
        base_delay_s: first backoff.
        max_delay_s: backoff cap.

    Raises:
        StorageError: the last transient error, once attempts are spent.
        Exception: any non-transient error, unchanged, at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise StorageError(redact.text(f"{what}: gave up after {attempts} attempts: "
                                               f"{type(err).__name__}: {err}")) from err
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            log.warning("%s: transient %s (%s); retry %d/%d in %.2fs", redact.text(what),
                        type(err).__name__, redact.text(str(err)), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def reach(fs: Any, path: str, shown: str, call: Callable[[], T] | None = None) -> T | None:
    """A job's first contact with a store, before any work: fails at once when no
    connection could be made at all (no such host, connection refused, no answer to the
    connect, a TLS handshake refused), which at a job's start is a network, an endpoint or
    a certificate set wrong far more often than an outage. gcsfs, botocore and s3fs retry
    such a connection for seconds to half a minute themselves; six rounds of :func:`retry`
    on top made an unresolvable bucket fail after four minutes and a closed port after
    75 s. A store whose library does not retry (http) gets those rounds as before.

    ``call``: the first call to make, returned, with its errors (retried when transient);
    without one, ``fs.info(path)`` is the probe, and whatever else it meets (nothing there,
    a 403, a 503) is left to the calls after it, which say what it means.

    Raises:
        StorageError: no connection could be made, or ``call``'s retries ran out.
        Exception: ``call``'s other errors, unchanged.
    """
    def first() -> Any:
        if call is not None:
            return call()
        fs.info(path)  # exists() of s3fs swallows every error on a bucket's root
        return None

    try:
        return first()
    except Exception as err:
        if no_connection(err) and _retries_connections(fs):
            raise StorageError(redact.text(
                f"cannot reach {shown}: {type(err).__name__}: {err} (no connection could be "
                "made, before any work; check the endpoint, the network and TLS)")) from err
        if call is None:
            return None
        if not is_transient(err):
            raise
    return retry(first, what=f"reach {shown}")


# What no connection could be made looks like (classes and their bases): botocore, urllib3,
# aiohttp (gcsfs), ssl, sockets.
_NO_CONNECTION_NAMES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "NewConnectionError",
    "NameResolutionError", "ClientConnectorError", "ConnectionTimeoutError", "gaierror",
    "ConnectionRefusedError", "SSLError", "SSLCertVerificationError", "CertificateError"})
# Stores whose client library retries a failed connection itself.
_RETRYING_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"})


def no_connection(err: BaseException) -> bool:
    """Whether ``err`` (or an error it came from) says no connection could be made at all."""
    return any(c.__name__ in _NO_CONNECTION_NAMES
               for e in _error_chain(err) for c in type(e).__mro__)


# What "these credentials may not" or "no credentials found" looks like, whatever the store.
_CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError",
                                "DefaultCredentialsError", "RefreshError"})


# S3's answer to a GET of an object in an archive storage class (GLACIER, DEEP_ARCHIVE, the
# archive tiers of INTELLIGENT_TIERING) not restored: a 403 that s3fs raises as a
# ``PermissionError``. HEAD works on such objects: listings and manifest lookups see them.
_ARCHIVED_CODES = frozenset({"InvalidObjectState"})


def archived(err: BaseException) -> str | None:
    """Where ``err`` (or an error it came from) says the object sits in an archive storage
    class, not restored (S3's ``InvalidObjectState``): its storage class, with the
    Intelligent-Tiering access tier where S3 names one (``INTELLIGENT_TIERING
    ARCHIVE_ACCESS``), or ``"an archive storage class"`` where it names none; else ``None``.
    Not a refusal of the credentials (:func:`access_refused`), nor transient: the object
    reads once restored (S3 RestoreObject)."""
    for e in _error_chain(err):
        response = getattr(e, "response", None)
        detail = response.get("Error") if isinstance(response, Mapping) else None
        if isinstance(detail, Mapping) and detail.get("Code") in _ARCHIVED_CODES:
            where = " ".join(str(detail[k]) for k in ("StorageClass", "AccessTier")
                             if detail.get(k))
            return where or "an archive storage class"
    return None


def archived_message(err: BaseException, shown: str) -> str:
    """What a read of the archived object ``shown`` (:func:`archived`) means, and what to do:
    the restore command for an ``s3://`` URL (no ``Days`` for an Intelligent-Tiering archive
    tier, which S3 refuses there: a restore moves the object back to its Frequent Access
    tier)."""
    where = archived(err) or "an archive storage class"
    bucket, _, key = shown.partition("://")[2].partition("/")
    key = key.split("?", 1)[0]  # (a ?versionId= is not part of the key)
    if protocol_of(shown) in ("s3", "s3a") and bucket and key:
        request = "'{}'" if where.startswith("INTELLIGENT_TIERING") else "Days=7"
        how = (f"aws s3api restore-object --bucket {bucket} --key {shlex.quote(key)} "
               f"--restore-request {request}")
    else:
        how = "S3 RestoreObject"
    return (f"{shown} is in {where}, not restored, so it cannot be read (InvalidObjectState): "
            f"restore it first ({how}; it takes hours, up to 48 from DEEP_ARCHIVE), then "
            "rerun the job: a rerun embeds the archived recordings that read by then")


def access_refused(err: BaseException) -> bool:
    """Whether ``err`` (or an error it came from) says the store refused these credentials,
    or found none: a ``PermissionError`` (s3fs's AccessDenied, a local folder), an HTTP 401
    or 403 (http, gcsfs's 401), gcsfs's 403 (a bare ``OSError("Forbidden: <path>...")``,
    no status), a credentials error of botocore or google-auth. Not an object in an archive
    storage class (:func:`archived`), which s3fs raises as a ``PermissionError`` too."""
    if archived(err) is not None:
        return False
    return any(isinstance(e, PermissionError) or type(e).__name__ in _CREDENTIAL_ERRORS
               or http_status(e) in (401, 403)
               or (type(e) is OSError and str(e).startswith("Forbidden: "))
               for e in _error_chain(err))


def why(err: BaseException, options: str = "input.storage_options / output.storage_options"
        ) -> str:
    """What an I/O error means, in one redacted line: nothing there, access refused (and
    where credentials go: ``options``), an archived object, else the error's type and text."""
    text = " ".join(redact.text(f"{type(err).__name__}: {err}").split())  # one line
    if (where := archived(err)) is not None:
        return f"{text}; the object is in {where}, not restored: restore it first"
    if isinstance(err, PermissionError) and getattr(err, "filename", None):  # local disk
        return f"permission denied ({text}); check its permissions"
    if access_refused(err):  # before "not found": fsspec's http says that of a 403
        return f"access refused ({text}); check the credentials in {options} or the environment"
    if isinstance(err, FileNotFoundError):
        return f"no such file or object ({text})"
    return text


@contextlib.contextmanager
def refusals_named(field: str, shown: str) -> Iterator[None]:
    """A store's refusal of the credentials met inside, raised as a ``ConfigError`` naming
    the setting and the URI (s3fs's says only ``Forbidden``): a refusal before any work.

    ``field``: ``input.uri``, ``output.uri``...; its section's ``storage_options`` are named
    as where the credentials go."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        if not access_refused(err):
            raise
        options = field.rsplit(".", 1)[0] + ".storage_options"
        raise ConfigError(f"{shown}: {why(err, options)}", field) from err


def _retries_connections(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", "")
    protocols = {protocol} if isinstance(protocol, str) else set(protocol)
    return bool(protocols & _RETRYING_PROTOCOLS)


class ReadView:
    """A read-only file object over another, for decoders: a subclass sees, or changes, the
    bytes each read returns (:meth:`_after_read`); seeks and positions are the other's.

    Sized reads go through the other's ``readinto``, so a :class:`RangeReader` below keeps
    a storage failure in its ``error`` (and reads as ending there) instead of raising it into
    libsndfile's C callback, where it would be printed and taken for the end of the file:
    a failed read must never look like a recording cut short."""

    def __init__(self, fileobj: Any) -> None:
        self._raw = fileobj

    def read(self, size: int = -1) -> bytes:
        start = self._raw.tell()
        if size is None or size < 0:
            return self._after_read(start, self._raw.read())
        chunk = bytearray(size)
        got = self._raw.readinto(chunk)
        return self._after_read(start, bytes(memoryview(chunk)[:got]))

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _after_read(self, start: int, data: bytes) -> bytes:
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    @property
    def error(self) -> BaseException | None:
        """The storage failure the underlying :class:`RangeReader` kept, if any."""
        return getattr(self._raw, "error", None)


class RangeReader(io.RawIOBase):
    """A seekable read-only file over fsspec that fetches aligned byte ranges, with retries.

    Every fetch is one independent, retried range request (``fs.cat_file(path, start,
    end)``), so a reset connection costs one block, never the stream. The last few blocks
    are kept because decoders seek backwards a little all the time (libsndfile's FLAC reader
    re-reads a few KB every 20 KB); with them, a recording is fetched about once, and memory
    stays at ``block_bytes * cached_blocks`` however long it is.

    libsndfile reads through :meth:`readinto` from a C callback, where an exception cannot
    pass: it would be printed and read as end of file, so a failed read would look like a
    truncated recording. ``readinto`` therefore keeps the first failure in :attr:`error`
    and reports end of file from then on; whoever drives the decoder must check it
    (``pipeline.stages.decode_recording`` does). :meth:`read` raises as usual.

    Args:
        fs: an fsspec filesystem.
        path: path on ``fs``.
        size: object size in bytes, if known (saves a metadata request).
        block_bytes: size of one range request.
        cached_blocks: blocks kept for backward seeks.
    """

    def __init__(self, fs: Any, path: str, size: int | None = None,
                 block_bytes: int = 2 * 1024 * 1024, cached_blocks: int = 3) -> None:
        super().__init__()
        self._fs, self._path = fs, path
        self._shown = redact.text(path)  # a signed URL's signature stays out of messages
        self._block, self._keep = block_bytes, max(1, cached_blocks)
        self.error: BaseException | None = None
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._pos = 0
        self.bytes_fetched = 0
        self.fetches = 0
        if size is None or size < 0:
            size = retry(lambda: fs.size(path), what=f"stat {self._shown}")
            if size is None:  # an HTTP server that sends no Content-Length
                raise StorageError(f"stat {self._shown}: the store gives no size, and a decoder "
                                   "needs one to seek; serve it with Content-Length")
        self._size = int(size)

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._pos
        end = min(self._size, self._pos + size)
        parts = []
        while self._pos < end:
            index = self._pos // self._block
            block = self._get(index)
            offset = self._pos - index * self._block
            piece = block[offset : offset + end - self._pos]
            if not piece:
                break
            parts.append(piece)
            self._pos += len(piece)
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        if self.error is not None:
            return 0
        try:
            data = self.read(len(buffer))
        except Exception as err:  # noqa: BLE001 - kept for the caller, see the class docstring
            self.error = err
            return 0
        buffer[: len(data)] = data
        return len(data)

    def _get(self, index: int) -> bytes:
        block = self._cache.get(index)
        if block is not None:
            self._cache.move_to_end(index)
            return block
        start = index * self._block
        stop = min(self._size, start + self._block)

        def fetch() -> bytes:
            data = self._fs.cat_file(self._path, start=start, end=stop)
            if len(data) < stop - start:
                # A body cut short (a dropped connection not every client reports), or an
                # object now shorter than listed: read again, then give up as a StorageError.
                raise ConnectionError(f"got {len(data)} of {stop - start} bytes; the object "
                                      "changed or is shorter than listed")
            return data

        block = retry(fetch, what=f"read {self._shown} bytes {start}-{stop}")
        if len(block) > stop - start:
            # Every read would fetch the whole object again; and no later run does better.
            raise AudioDecodeError(
                "UnsupportedSource", f"read {self._shown} bytes {start}-{stop}: got "
                f"{len(block)} bytes; the server ignores HTTP Range requests, which streaming "
                "decode needs (copy the files to a bucket, or serve them with Range support)")
        self.fetches += 1
        self.bytes_fetched += len(block)
        self._cache[index] = block
        while len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return block


# --------------------------------------------------------------------------- writes


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a whole object so readers see all of it or none of it.

    Local files go to a temporary sibling and are renamed into place (a failed write
    leaves no temporary file behind); object stores get one PUT (objects appear whole),
    retried on transient errors.
    """
    if _is_local_fs(fs):
        _write_local(path, data)
        return
    retry(lambda: fs.pipe_file(path, data), what=f"write {path}")


def _write_local(path: str, data: bytes) -> None:
    """Write the local file ``path`` whole or not at all (:func:`_replace_atomically`)."""
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
    _replace_atomically(path, fill)


def _replace_atomically(path: str, fill: Callable[[str], None]) -> None:
    """Make the local file ``path`` whole or not at all: ``fill`` writes a temporary sibling,
    which is synced and renamed into place (and removed if anything fails)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
    try:
        fill(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def move(fs: Any, src: str, dst: str) -> None:
    """Move one object into place: a rename locally, a server-side copy on object stores.

    Both steps are retried. A delete whose response was lost may have happened: when a
    retry finds the source gone, the move is done.
    """
    if _is_local_fs(fs):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        return
    retry(lambda: fs.copy(src, dst), what=f"copy {src} -> {dst}")
    attempts = 0

    def delete() -> None:
        nonlocal attempts
        attempts += 1
        try:
            fs.rm(src)
        except FileNotFoundError:
            if attempts == 1:
                raise

    retry(delete, what=f"delete {src}")


def copy(fs: Any, src: str, dst: str) -> None:
    """Copy one object to a new name, byte for byte, without its bytes passing through this
    process on object stores: a server-side copy (fsspec's ``copy``: S3 CopyObject, GCS
    rewrite), retried. Local files are copied to a temporary sibling and renamed into
    place, as :func:`write_bytes` writes them, so ``dst`` is whole or absent."""
    if _is_local_fs(fs):
        _replace_atomically(dst, lambda tmp: shutil.copyfile(src, tmp))
        return
    retry(lambda: fs.copy(src, dst), what=f"copy {redact.text(src)} -> {redact.text(dst)}")


def remove_file(fs: Any, path: str) -> None:
    """Delete one object or file, retried; absent is fine (a retried delete may find it gone)."""
    def rm() -> None:
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass

    retry(rm, what=f"delete {redact.text(path)}")


def missing_dirs(fs: Any, path: str) -> list[str]:
    """The folders above ``path`` that do not exist yet, deepest first (local filesystems;
    an object store has no folders: ``[]``): what writing ``path`` would create."""
    if not _is_local_fs(fs):
        return []
    out = []
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        out.append(parent)
        parent, last = os.path.dirname(parent), parent
        if parent == last:
            break
    return out


def remove_empty_dirs(dirs: Sequence[str]) -> None:
    """Remove local folders in order while they are empty (stops at the first that is not:
    something else wrote there meanwhile, and keeps it)."""
    for directory in dirs:
        try:
            os.rmdir(directory)
        except OSError:
            return


def remove_tree(fs: Any, path: str) -> None:
    """Delete ``path`` and everything under it; absent is fine."""
    def rm() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    retry(rm, what=f"delete {path}")


def find_files(fs: Any, path: str, shown: str, maxdepth: int | None = None
               ) -> dict[str, dict[str, Any]]:
    """Every file below the folder ``path``, with its info, as ``fs.find`` gives them;
    retried. On local disk symlinks are followed, as ``find -L`` does (fsspec's walk
    skips a linked folder and describes a linked file by the link's own mtime): see
    :func:`_walk_local`."""
    if _is_local_fs(fs):
        return _walk_local(path, maxdepth)
    return retry(lambda: fs.find(path, maxdepth=maxdepth, withdirs=False, detail=True),
                 what=f"list {shown}")


def glob_files(fs: Any, pattern: str, root: str, shown: str) -> dict[str, dict[str, Any]]:
    """The files matching ``pattern`` (fsspec's glob syntax; ``root``: the folder before its
    first wildcard), with their info; retried; on local disk as :func:`find_files`, matched
    as fsspec's glob matches (its pattern translation, and its depth: unbounded with
    ``**``, else the pattern's components below ``root``). A ``root`` that is missing or no
    folder matches nothing, as with fsspec.

    Raises:
        ValueError: fsspec does not take the pattern (``'**' can only be an entire path
            component``).
    """
    if not _is_local_fs(fs):
        return retry(lambda: fs.glob(pattern, detail=True), what=f"glob {shown}")
    match = re.compile(glob_translate(pattern)).match
    depth = None if "**" in pattern else pattern[len(root):].count("/") + 1
    try:
        found = _walk_local(root.rstrip("/") or "/", depth)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {name: info for name, info in found.items() if match(name)}


def _walk_local(root: str, maxdepth: int | None) -> dict[str, dict[str, Any]]:
    """The files below a local folder, following symlinks, as ``find -L`` does: a linked
    file is described by what it links to (its size and mtime, so a rewritten target is a
    new version, as a manifest naming the link sees it); a dangling link is a file of
    unknown size (reading it fails; the day its target appears, it is a new version).

    Each real folder is listed once, so a link loop ends and a folder two links reach is
    not embedded twice. Which path it is listed under decides its recordings' names and
    ids, so it is the first of: a path with neither a link nor a hidden folder in it (what
    a listing without links gives: ``latest -> 2024`` or ``.current -> data`` renames
    nothing), then one through a link (``current -> .versions/v3`` is listed, not skipped
    as hidden), then a hidden one; among equals, the first in path order (a link added
    later in that order renames nothing). Where the walk is depth-limited (a glob without
    ``**``), a folder reached again nearer ``root`` is listed again there. A folder below
    ``root`` that cannot be read is skipped with a warning, not silently, and so are FIFOs,
    sockets and devices; ``root`` itself raises.

    Raises:
        OSError: ``root`` cannot be read (``PermissionError``: the job refuses to start).
    """
    found: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[int, int], int] = {}  # real folder -> the depth it was listed at
    unreadable: list[str] = []
    special: list[str] = []  # a FIFO named x.wav: not a recording to open and wait on
    # Folders to list, by (rank: 0 plain, 1 through a link, 2 hidden; path; depth).
    pending: list[tuple[int, str, int]] = [(0, root, 1)]
    while pending:
        rank, folder, depth = heapq.heappop(pending)
        try:
            real = os.stat(folder)
            key = (real.st_dev, real.st_ino)
            if key in seen and (maxdepth is None or seen[key] <= depth):
                continue
            seen[key] = depth
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError:
            if folder == root:  # the folder asked for: a refusal, not an empty listing
                raise
            unreadable.append(folder)
            continue
        for entry in listed:
            try:
                st = entry.stat()  # follows a link
            except OSError:  # a dangling link, or gone since
                if entry.is_symlink():
                    found[entry.path] = {"name": entry.path, "type": "file", "size": None,
                                         "mtime": None}
                continue
            if stat.S_ISDIR(st.st_mode):
                if maxdepth is None or depth < maxdepth:
                    below = max(rank, 2 if entry.name.startswith(".") else
                                1 if entry.is_symlink() else 0)
                    heapq.heappush(pending, (below, entry.path, depth + 1))
            elif stat.S_ISREG(st.st_mode):
                found[entry.path] = {"name": entry.path, "type": "file", "size": st.st_size,
                                     "mtime": st.st_mtime}
            else:
                special.append(entry.path)
    if unreadable:
        log.warning("%d folders could not be read and were not listed, e.g. %s",
                    len(unreadable), unreadable[0])
    if special:
        log.warning("%d entries that are neither files nor folders (FIFOs, sockets, devices) "
                    "were not listed, e.g. %s", len(special), special[0])
    return found


def list_files(fs: Any, path: str) -> list[str]:
    """Every file under ``path`` (recursively); empty if it does not exist."""
    def find() -> list[str]:
        try:
            return sorted(fs.find(path))
        except FileNotFoundError:
            return []

    return retry(find, what=f"list {path}")


def read_bytes(fs: Any, path: str) -> bytes:
    """A whole (small) object: markers, manifests, error tables. Retried."""
    return retry(lambda: fs.cat_file(path), what=f"read {path}")


def exists(fs: Any, path: str) -> bool:
    """Whether ``path`` exists; transient errors are retried, never read as "absent"."""
    return bool(retry(lambda: fs.exists(path), what=f"check {path}"))


def is_file(fs: Any, path: str) -> bool:
    """Whether ``path`` is a file (an object); retried like :func:`exists`."""
    return bool(retry(lambda: fs.isfile(path), what=f"check {path}"))


def _is_local_fs(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


# --------------------------------------------------------------------------- conditional writes


class ConditionalStore:
    """Compare-and-swap on one small object, where the store offers it.

    A version names one write of the object: an ETag on S3, a generation on GCS, the
    content's hash on a local filesystem. Every write here lands only if the object is still
    as the caller last saw it, so two writers cannot both believe they won.

    Each call is retried on transient errors. A retried write may find its own earlier
    attempt landed (a reset after the store acted): the store then refuses the retry, and
    reading back the very bytes this call wrote tells that apart from another writer, whose
    record differs (a lease record carries its holder's token and heartbeat time).
    """

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and their version, read in one go; None if absent."""
        raise NotImplementedError

    def create_if_absent(self, path: str, data: bytes) -> str | None:
        """Write ``data`` only if ``path`` does not exist: its version, or None if it does."""
        return self._landed(path, data, lambda: self._create(path, data))

    def replace_if_unchanged(self, path: str, data: bytes, version: str) -> str | None:
        """Write ``data`` only if ``path`` is still at ``version``: the new version, or None
        if it changed or is gone."""
        return self._landed(path, data, lambda: self._replace(path, data, version))

    def delete_if_unchanged(self, path: str, version: str) -> bool:
        """Delete ``path`` only if it is still at ``version``. True once it is gone (deleted
        now, by an earlier attempt of this call, or already); False if it changed."""
        if retry(lambda: self._delete(path, version), what=f"delete {redact.text(path)}"):
            return True
        return self.read(path) is None

    def _landed(self, path: str, data: bytes, write: Callable[[], str | None]) -> str | None:
        version = retry(write, what=f"write {redact.text(path)}")
        if version is not None:
            return version
        found = self.read(path)
        return found[1] if found is not None and found[0] == data else None

    def _create(self, path: str, data: bytes) -> str | None:
        raise NotImplementedError

    def _replace(self, path: str, data: bytes, version: str) -> str | None:
        raise NotImplementedError

    def _delete(self, path: str, version: str) -> bool:
        raise NotImplementedError


def _precondition_failed(err: BaseException) -> bool:
    """Whether a store refused a write because its condition did not hold (HTTP 412:
    s3fs raises FileExistsError or OSError(EINVAL) from it, gcsfs FileExistsError)."""
    return any(isinstance(e, FileExistsError) or http_status(e) == 412 for e in _error_chain(err))


def _conditionally(fs: Any, path: str, request: Callable[[], T], absent: T | None) -> T | None:
    """``request``'s answer; None where the store refused it for its condition (412),
    ``absent`` where the object is not there (404: a replace of an object deleted meanwhile
    is refused, a delete of one is done). The listings cache forgets ``path`` either way."""
    try:
        return request()
    except FileNotFoundError:
        return absent
    except OSError as err:
        if _precondition_failed(err):
            return None
        raise
    finally:
        fs.invalidate_cache(path)


class LocalConditionalStore(ConditionalStore):
    """A local filesystem: each conditional write holds an exclusive POSIX lock (``lockf``)
    on a lock file beside the object while it compares and renames a temporary file into
    place, so it excludes the other conditional writers on this machine, and on an NFS
    mount those of its other clients (the server keeps POSIX locks). Readers need no lock: a rename is atomic. The
    version is a hash of the content, which a rewrite of the same record cannot fake
    (inode numbers are reused; mtimes are coarse)."""

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = read_bytes(self.fs, path)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        import fcntl

        fd = os.open(self.lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def lock_path(path: str) -> str:
        """The lock file beside ``path``: a regular file opened for writing, so that its
        POSIX lock (``lockf``) spans an NFS mount's clients, which ``flock`` on a folder
        does not (it stays on each client, or fails)."""
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, f".{os.path.basename(path)}.lock")

    def lockable(self, path: str) -> bool:
        """Whether the lock can be taken here (a filesystem without POSIX locks refuses it:
        ``ENOLCK``, ``ENOTSUP``...; the lease then falls back to write and read back)."""
        try:
            with self._locked(path):
                return True
        except OSError as err:
            log.warning("no POSIX lock beside %s (%s): the lease falls back to write and read "
                        "back", path, err)
            return False

    def _write(self, path: str, data: bytes) -> str:
        _write_local(path, data)
        return hashlib.sha256(data).hexdigest()

    def _create(self, path: str, data: bytes) -> str | None:
        with self._locked(path):
            return None if os.path.exists(path) else self._write(path, data)

    def _replace(self, path: str, data: bytes, version: str) -> str | None:
        with self._locked(path):
            found = self.read(path)
            return self._write(path, data) if found and found[1] == version else None

    def _delete(self, path: str, version: str) -> bool:
        with self._locked(path):
            found = self.read(path)
            if found is not None and found[1] == version:
                os.unlink(path)
            return found is None or found[1] == version


class S3ConditionalStore(ConditionalStore):
    """S3 conditional requests: PutObject with ``If-None-Match: *`` (create) or
    ``If-Match: <ETag>`` (replace), DeleteObject with ``If-Match``; 412 when the condition
    fails. Called through s3fs's botocore client (s3fs's ``pipe_file`` knows only the
    first)."""

    def read(self, path: str) -> tuple[bytes, str] | None:
        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await response["Body"].read(), str(response["ETag"])
            finally:
                response["Body"].close()

        try:
            return retry(lambda: fsspec.asyn.sync(self.fs.loop, get), what=f"read {path}")
        except FileNotFoundError:
            return None

    def _put(self, path: str, data: bytes, **condition: str) -> str | None:
        bucket, key, _ = self.fs.split_path(path)
        response = _conditionally(self.fs, path, lambda: self.fs.call_s3(
            "put_object", Bucket=bucket, Key=key, Body=data, **condition), absent=None)
        return None if response is None else str(response["ETag"])

    def _create(self, path: str, data: bytes) -> str | None:
        return self._put(path, data, IfNoneMatch="*")

    def _replace(self, path: str, data: bytes, version: str) -> str | None:
        return self._put(path, data, IfMatch=version)

    def _delete(self, path: str, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        return _conditionally(self.fs, path, lambda: self.fs.call_s3(
            "delete_object", Bucket=bucket, Key=key, IfMatch=version) or True,
            absent=True) is not None


class GCSConditionalStore(ConditionalStore):
    """GCS preconditions on the JSON API: an upload with ``ifGenerationMatch=0`` (create)
    or ``=<generation>`` (replace), a delete with ``ifGenerationMatch``; 412 when the
    condition fails. gcsfs's ``pipe_file`` knows only the first, so these are its raw
    calls. A read asks for the object's generation, then for the bytes of that generation
    (404 if it was replaced in between: asked again)."""

    def read(self, path: str) -> tuple[bytes, str] | None:
        bucket, key, _ = self.fs.split_path(path)

        def get() -> tuple[bytes, str] | None:
            for _ in range(5):
                try:
                    meta = self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
                except FileNotFoundError:
                    return None
                try:
                    _, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media",
                                           generation=meta["generation"])
                except FileNotFoundError:
                    continue  # replaced or deleted since its metadata was read
                return data, str(meta["generation"])
            raise OSError(errno.EAGAIN, f"{path} kept changing while it was read")

        return retry(get, what=f"read {path}")

    def _upload(self, path: str, data: bytes, generation: str) -> str | None:
        bucket, key, _ = self.fs.split_path(path)
        out = _conditionally(self.fs, path, lambda: self.fs.call(
            "POST", f"{self.fs._location}/upload/storage/v1/b/{{}}/o", bucket,
            uploadType="media", name=key, ifGenerationMatch=generation, data=data,
            json_out=True, headers={"Content-Type": "application/octet-stream"}), absent=None)
        return None if out is None else str(out["generation"])

    def _create(self, path: str, data: bytes) -> str | None:
        return self._upload(path, data, "0")

    def _replace(self, path: str, data: bytes, version: str) -> str | None:
        return self._upload(path, data, version)

    def _delete(self, path: str, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        return _conditionally(self.fs, path, lambda: self.fs.call(
            "DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version) or True,
            absent=True) is not None


# Whether a store honours its preconditions, per (filesystem, bucket): probed once.
_HONOURED: dict[tuple[str, str], bool] = {}
_HONOURED_LOCK = threading.Lock()
_NO_SUCH_VERSION = {S3ConditionalStore: '"0"', GCSConditionalStore: "1"}


def conditional_store(fs: Any, path: str) -> ConditionalStore | None:
    """Compare-and-swap for the object ``path`` on ``fs``, or None where it cannot be had
    (then callers write, wait and read back: see ``pipeline.lease``).

    Local filesystems (POSIX) always have it. S3 and GCS have it on the real services, but
    an S3-compatible store or an emulator may ignore the conditions and write anyway
    (gcp-storage-emulator does): such a store is probed once per process and bucket, beside
    ``path``, and trusted only if it refused all three writes it should have. Any other
    store (memory, Azure...) has none here.
    """
    protocol = canonical_protocol(fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0])
    if protocol == "file":
        if os.name != "posix":
            return None
        local = LocalConditionalStore(fs)
        return local if local.lockable(path) else None
    kinds: dict[str, type[ConditionalStore]] = {"s3": S3ConditionalStore,
                                                "gcs": GCSConditionalStore}
    kind = kinds.get(protocol)
    if kind is None:
        return None
    store = kind(fs)
    key = (str(fs._fs_token), fs.split_path(path)[0])
    with _HONOURED_LOCK:
        honoured = _HONOURED.get(key)
        if honoured is None:
            try:
                honoured = _probe(store, fs, path, _NO_SUCH_VERSION[kind])
                if not honoured:
                    log.warning("%s ignores conditional writes (an emulator, or an "
                                "S3-compatible store without them): the lease falls back to "
                                "write and read back", protocol)
            except Exception as err:  # noqa: BLE001 - not known: none, for this process
                # A store without conditional requests may answer them 501 or 400: not
                # asked again by every run of this process (nor retried, slower, each time).
                log.warning("could not tell whether %s honours conditional writes (%s); "
                            "falling back to write and read back", protocol,
                            redact.text(str(err)))
                honoured = False
            _HONOURED[key] = honoured
    return store if honoured else None


def _probe(store: ConditionalStore, fs: Any, path: str, wrong_version: str) -> bool:
    """Whether ``store`` refuses what it must: a second create, and a replace and a delete
    at a version the object does not have. On a scratch object beside ``path``, removed."""
    scratch = join(os.path.dirname(path), f".conditional-write-probe-{uuid.uuid4().hex}")
    try:
        return (store.create_if_absent(scratch, b"first") is not None
                and store.create_if_absent(scratch, b"second") is None
                and store.replace_if_unchanged(scratch, b"third", wrong_version) is None
                and not store.delete_if_unchanged(scratch, wrong_version))
    finally:
        remove_file(fs, scratch)
