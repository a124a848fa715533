"""Listing recordings on the driver: a directory, a glob, one file, or a manifest of URIs.

Listing happens once, on the driver, with fsspec; the result is a sorted, de-duplicated
list of :class:`SourceItem` that carries everything a worker needs to open the object
(its URL, size and version) and the stable ``recording_id`` that every output row is
keyed by. Workers never list.
"""

from __future__ import annotations

import codecs
import errno
import fnmatch
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from pipeline import redact, storage
from pipeline.config import InputConfig
from pipeline.errors import ConfigError, NoInputsError
from pipeline.sink import read_parquet_bytes

log = logging.getLogger(__name__)

# Columns the job writes itself; a manifest may not reuse them.
RESERVED_COLUMNS = frozenset({
    "recording_id", "source_uri", "source_version", "source_bytes", "channel", "window_index",
    "start_s", "end_s", "valid_s", "layer", "embedding", "job_id", "model", "model_name",
    "variant", "weights_sha256", "config_sha256", "code_version", "duration_s",
    "source_sample_rate_hz", "source_channels", "num_windows", "status", "status_detail",
    "error_type", "message", "shard",
})

# Columns a manifest may carry for the job itself, named as its rows name them: each
# object's version (and size), which the manifest then vouches for, so the job does not look
# the object up (see _given_item).
GIVEN_COLUMNS = ("source_version", "source_bytes")

# The version of an object that could not be read (its error row's source_version).
MISSING = "missing"

_STAT_THREADS = 32
_STAT_CHUNK = 20_000
# Most decode tasks (Ray blocks) a job plans: see pack_decode_tasks.
MAX_DECODE_TASKS = 10_000

# Extensions of the containers decoding reads (libsndfile's, and MP3 by FFmpeg) beyond the
# default input.extensions: a listing that skipped only these says to add them. Not WavPack
# (.wv) nor M4A/AAC, which no decoder here reads.
DECODABLE_EXTENSIONS = frozenset({
    "wav", "wave", "bwf", "rf64", "w64", "aif", "aiff", "aifc", "au", "snd", "caf", "flac",
    "ogg", "oga", "opus", "mp3", "sph", "nist", "voc", "sf", "ircam", "paf", "svx", "htk",
    "sd2", "xi", "pvf", "wve", "avr", "mpc2k"})
# What a manifest file ends in (see read_manifest): input.uri naming one gets a hint.
MANIFEST_EXTENSIONS = ("csv", "tsv", "parquet", "jsonl", "ndjson", "json")
# Extensions named in a "no recordings found" message.
_SKIPPED_SHOWN = 5


@dataclass(frozen=True)
class SourceItem:
    """One recording to embed.

    Attributes:
        uri: full URL (plain absolute path for local files), secrets redacted.
        path: path on the input filesystem (what ``fs.open`` takes).
        size_bytes: object size, or -1 when it could not be read.
        version: etag / generation / mtime, whatever the store offers.
        recording_id: 32 hex chars derived from ``uri`` and ``version``: stable across runs,
            different when the object changes.
        row: index into the manifest's extra-columns table, or -1 without a manifest.
        problem: why the object cannot be read (``FileNotFoundError: ...``), else ``""``;
            such items become error rows instead of failing the listing.
    """

    uri: str
    path: str
    size_bytes: int
    version: str
    recording_id: str
    row: int = -1
    problem: str = ""


@dataclass(frozen=True)
class Listing:
    """Result of listing: the items plus the manifest's extra columns (rows aligned to ``row``)."""

    items: tuple[SourceItem, ...]
    extras: pa.Table | None

    @property
    def total_bytes(self) -> int:
        return sum(max(0, i.size_bytes) for i in self.items)


def recording_id(uri: str, version: str) -> str:
    """Stable id of one version of one object."""
    return hashlib.sha256(f"{uri}\x00{version}".encode()).hexdigest()[:32]


def source_version(info: dict[str, Any]) -> str:
    """The most specific version token fsspec's ``info()`` offers for an object, taken from
    fields that a folder listing and a single object's ``info()`` both carry: s3fs gives
    ``VersionId`` from ``info()`` (HEAD) but not in listings, so on a versioned bucket it
    would give one object two recording ids (a folder run, then a manifest run, would embed
    it twice). ``VersionId`` counts only where nothing else is known. An HTTP server says
    ``ETag``, ``Content-MD5``, ``Digest`` or at least ``Last-Modified`` (without which a
    same-size replacement kept its id and was not embedded again)."""
    for key in ("generation", "ETag", "etag", "md5Hash", "Content-MD5", "Digest", "blob_id",
                "VersionId", "version_id"):
        value = info.get(key)
        if value not in (None, "", "null"):
            return f"{key}={str(value).strip(chr(34))}"
    mtime = (info.get("mtime") or info.get("LastModified") or info.get("updated")
             or info.get("Last-Modified") or "")  # the last: HTTP's, a date
    if hasattr(mtime, "timestamp"):
        mtime = f"{mtime.timestamp():.6f}"
    return f"size={info.get('size', -1)},mtime={mtime}"


def list_sources(cfg: InputConfig) -> Listing:
    """List the recordings a job config points at.

    Raises:
        NoInputsError: nothing matched (a silent empty success would hide a wrong path).
        ConfigError: the manifest is unreadable, lacks a ``uri`` column, or reuses a
            reserved column name.
    """
    storage.forget_listings()  # a listing cached by an earlier run in this process is stale
    if cfg.manifest:
        listing = _list_manifest(cfg)
        where = f"manifest {redact.uri(cfg.manifest)}"
    else:
        assert cfg.uri is not None
        where = redact.uri(cfg.uri)
        with storage.refusals_named("input.uri", where):
            items, found = _list_uri(cfg)
        listing = Listing(items=tuple(items), extras=None)
    # s3fs and gcsfs keep every listed object's info (~1 KB each) in the cached filesystem:
    # 10M objects would hold ~10 GB on the driver for the whole run. The items hold what
    # the job needs of them.
    storage.forget_listings()
    if not listing.items and cfg.manifest:
        raise NoInputsError(f"{where} lists no recordings; check input.manifest")
    if not listing.items:
        raise NoInputsError(
            f"no recordings found at {where} with extensions {', '.join(cfg.extensions)}"
            f"{'' if cfg.recursive else ' (recursive: false)'}; {found}"
        )
    return listing


def _list_uri(cfg: InputConfig) -> tuple[list[SourceItem], str]:
    """The recordings ``input.uri`` names, and when there are none, what it holds instead
    and what to do about it (counted as the one listing goes: a bucket is never listed
    twice)."""
    assert cfg.uri is not None
    fs, path = storage.url_to_fs(cfg.uri, cfg.storage_options)
    exts = {e.lower() for e in cfg.extensions}
    shown = redact.uri(cfg.uri)
    # Every call is retried: a 503 while listing must not read as "no such input". A path
    # that exists is taken literally, even with glob characters in it ("Site [A]/").
    def stat() -> dict[str, Any] | None:
        try:  # not fs.exists(): s3fs's swallows every error on a bucket's root (a 403)
            return dict(fs.info(path))
        except (FileNotFoundError, NotADirectoryError):  # a path under a file: not there
            return None
        except OSError as err:  # a path through a link to itself: not there either
            if err.errno == errno.ELOOP:
                return None
            raise

    top = storage.reach(fs, path, shown, stat)
    if top is not None and top.get("type") != "directory":
        infos, root = {path: top}, None
    elif top is None and _has_magic(path):
        root = _glob_root(path)
        try:
            infos = storage.glob_files(fs, path, root, shown)
        except ValueError as err:  # fsspec: "'**' can only be an entire path component"
            raise ConfigError(f"{shown} is not a glob fsspec takes: {err} (e.g. **/*.wav)",
                              "input.uri") from None
    else:
        if top is None:
            raise NoInputsError(f"input.uri {shown} does not exist")
        infos = storage.find_files(fs, path, shown, maxdepth=None if cfg.recursive else 1)
        root = path
    items, hidden = [], 0
    skipped: Counter[str] = Counter()  # visible files of other extensions, by extension
    for name, info in infos.items():
        if info.get("type") == "directory":
            continue
        if not _extensions(name) & exts:
            # "/." first: the cheap test that rules out most names before _hidden's
            if not (root is not None and "/." in name and _hidden(name, root, path)):
                skipped[_shown_extension(name)] += 1
            continue
        if root is not None and _hidden(name, root, path):
            hidden += 1
            continue
        uri = storage.source_uri(fs, name)
        version = source_version(info)
        items.append(SourceItem(uri=uri, path=name, size_bytes=_size(info),
                                version=version, recording_id=recording_id(uri, version)))
    if hidden:
        log.info("skipped %d hidden files (names or folders starting with '.') under %s",
                 hidden, shown)
    if items and skipped:
        log.info("skipped %d files with other extensions (%s) under %s", skipped.total(),
                 ", ".join(f"{ext} {n}" for ext, n in skipped.most_common(_SKIPPED_SHOWN)),
                 shown)
    found = "" if items else _what_was_found(cfg, skipped, glob=root is not None and
                                             root != path, single=root is None, hidden=hidden)
    return _dedup_sorted(items), found


def _shown_extension(name: str) -> str:
    """``.aiff`` for ``x.AIFF``; one bucket for names with no extension, or none that
    reads as one (``take-3.final copy``): the count stays a handful of kinds."""
    base = name.rsplit("/", 1)[-1].split("?", 1)[0]
    ext = base.rsplit(".", 1)[-1].lower() if "." in base.lstrip(".") else ""
    return f".{ext}" if ext and len(ext) <= 10 and ext.isalnum() else "no extension"


def _what_was_found(cfg: InputConfig, skipped: Counter[str], *, glob: bool,
                    single: bool, hidden: int = 0) -> str:
    """The end of a "no recordings found" message: what ``input.uri`` holds instead, and
    the setting to change (a wrong path reads as "check input.uri" only when it holds
    nothing the job could read, not even recordings listing skips as hidden)."""
    kinds = skipped.most_common(_SKIPPED_SHOWN)
    if single and kinds:
        ext = kinds[0][0]
        if ext.lstrip(".") in MANIFEST_EXTENSIONS:
            return (f"it is a {ext} file: if it lists the recordings, give it as "
                    "input.manifest (a 'uri' column), not input.uri")
        held = f"it is a file with {ext}" if ext == "no extension" else f"it is a {ext} file"
    elif kinds:
        total = skipped.total()
        listed = ", ".join(f"{e} ({n})" for e, n in kinds)
        if len(skipped) > len(kinds):
            listed += f", {len(skipped) - len(kinds)} other kinds"
        held = (f"{'the glob matches' if glob else 'it holds'} {total} "
                f"file{'s' if total > 1 else ''} ending {listed}")
    elif hidden:
        return (f"{'the glob matches' if glob else 'it holds'} only {hidden} hidden "
                f"recording{'s' if hidden > 1 else ''} (a name or folder starting with '.', "
                "which listing skips; a glob that spells the dot takes them, e.g. "
                "dir/.folder/**/*.wav)")
    else:
        return f"{'the glob matches' if glob else 'it holds'} no files; check input.uri"
    audio = [e[1:] for e, _ in skipped.most_common() if e[1:] in DECODABLE_EXTENSIONS]
    if not audio:
        none = "not" if single else "none of them"
        return f"{held}, {none} audio the job decodes; check input.uri"
    wanted = ",".join(dict.fromkeys([*cfg.extensions, *audio]))
    return (f"{held}: add {audio[0] if single else 'the audio ones'} to input.extensions "
            f"(e.g. --set input.extensions={wanted})")


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _extensions(name: str) -> set[str]:
    """Lower-case extension of an object name, and the one before a URL query
    (``x.wav?versionId=...``) if the name has one."""
    base = name.rsplit("/", 1)[-1]
    found = {base.rsplit(".", 1)[-1].lower()}
    if "?" in base:
        found.add(base.split("?", 1)[0].rsplit(".", 1)[-1].lower())
    return found


def _glob_root(pattern: str) -> str:
    """The folder a glob lists below: its components before the first with a wildcard."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
    return "/".join(parts[:fixed]) + "/" if fixed else ""


def _hidden(name: str, root: str, pattern: str) -> bool:
    """Whether a listed object is hidden below the listed folder or glob root: a name or
    folder starting with a dot (macOS's ``._x.wav`` resource forks, ``.snapshot/`` copies of
    a whole NFS tree, ``.Trash``), which listing skips. A glob that spells a dot itself
    (``site/.snapshot/*/*.wav``, ``site/.*.wav``) asks for what it matches."""
    rel = name[len(root):] if root and name.startswith(root) else name.rsplit("/", 1)[-1]
    asked = [part for part in pattern[len(root):].split("/") if part.startswith(".")]
    return any(part.startswith(".") and not any(fnmatch.fnmatchcase(part, a) for a in asked)
               for part in rel.split("/") if part)


def _dedup_sorted(items: Iterable[SourceItem]) -> list[SourceItem]:
    seen: dict[str, SourceItem] = {}
    for item in items:
        seen.setdefault(item.uri, item)
    return sorted(seen.values(), key=lambda i: i.uri)


MAX_REPEATS_SHOWN = 5  # manifest rows dropped as repeats, named in the warning


def _repeated_rows(uris: Sequence[str], first_row: Mapping[str, int],
                   stated: Iterable[SourceItem]) -> list[tuple[int, int, str]]:
    """(row, the earlier row it repeats, the recording, as shown) for each manifest row
    dropped as naming a recording an earlier row names: the same spelling (``uris``, with
    the first row of each in ``first_row``), or another spelling of one object (``stated``,
    one item per spelling), in row order."""
    repeats = [(row, first_row[uri], redact.uri(uri)) for row, uri in enumerate(uris)
               if first_row[uri] != row]
    kept: dict[str, SourceItem] = {}
    for item in sorted(stated, key=lambda i: i.row):
        first = kept.setdefault(item.uri, item)
        if first is not item:
            repeats.append((item.row, first.row, item.uri))
    return sorted(repeats)


def _list_manifest(cfg: InputConfig) -> Listing:
    assert cfg.manifest is not None
    table = read_manifest(cfg.manifest, cfg.storage_options)
    if "uri" not in table.column_names:
        raise ConfigError(f"manifest has no 'uri' column (columns: "
                          f"{', '.join(map(repr, table.column_names))}){_uri_hint(table)}",
                          "input.manifest")
    _check_uri_type(table.schema.field("uri").type, cfg.manifest)
    table = _without_unnamed_columns(table)
    _check_column_names([n for n in table.column_names if n not in GIVEN_COLUMNS])
    versions, sizes = _given_columns(table)
    base = cfg.manifest.rsplit("/", 1)[0] if "/" in cfg.manifest else "."
    raw = ["" if u is None else str(u) for u in table.column("uri").to_pylist()]
    uris = [resolve_relative(u, base) for u in raw]
    extras = table.drop_columns(["uri", *(c for c in GIVEN_COLUMNS if c in table.column_names)])
    extras = _portable_columns(extras)
    blank = [i for i, uri in enumerate(raw) if not uri.strip()]
    if blank:
        raise ConfigError(
            f"manifest has {len(blank)} row(s) without a uri (rows "
            f"{', '.join(str(i + 1) for i in blank[:10])}{', ...' if len(blank) > 10 else ''}; "
            "1 = first data row); fill or remove them", "input.manifest")
    _check_filesystems(uris)
    # First occurrence of each URI wins; its row keeps its metadata.
    first_row: dict[str, int] = {}
    for i, uri in enumerate(uris):
        first_row.setdefault(uri, i)
    # Each named version's URL resolved once: for the version check and for its item.
    located = {uri: _locate(uri, cfg)
               for uri in dict.fromkeys(u for u, v in zip(uris, versions, strict=True) if v)}
    _check_one_version_each([_object_key(uri, located[uri]) if versions[i] else uri
                             for i, uri in enumerate(uris)], versions)
    given = [(uri, row) for uri, row in first_row.items() if versions[row]]
    stated = _stat_all([(uri, row) for uri, row in first_row.items() if not versions[row]], cfg,
                       total=len(first_row))
    if given:
        log.info("manifest: %d object(s) named with their version (source_version), not "
                 "looked up; %d looked up", len(given), len(stated))
        stated += [_given_item(uri, row, versions[row], sizes[row], cfg, located[uri])
                   for uri, row in given]
    # Spellings of one object (./a.wav and a.wav, file:///x/a.wav and /x/a.wav) are one
    # recording: they have one id, and listing it twice would write its rows twice.
    _check_told_apart(sorted(stated, key=lambda i: i.row), cfg)
    items = _dedup_sorted(sorted(stated, key=lambda i: i.row))
    if len(items) < len(uris):  # the same spelling twice, or two spellings of one object
        repeats = _repeated_rows(uris, first_row, stated)
        shown = "; ".join(f"row {row + 1} ({uri}, as row {first + 1})"
                          for row, first, uri in repeats[:MAX_REPEATS_SHOWN])
        more = (f"; and {len(repeats) - MAX_REPEATS_SHOWN} more"
                if len(repeats) > MAX_REPEATS_SHOWN else "")
        log.warning("manifest: %d row(s) name a recording an earlier row already names; "
                    "the first row's metadata is kept (1 = first data row): %s%s",
                    len(uris) - len(items), shown, more)
    return Listing(items=tuple(items), extras=extras if extras.num_columns else None)


def _uri_hint(table: pa.Table) -> str:
    """What a manifest without a ``uri`` column most likely meant: a header written ``URI``
    or `` uri`` (a spreadsheet's), or a CSV separated by semicolons, as spreadsheets write it
    where the comma is the decimal mark, whose header reads as one column ``uri;site``."""
    names = table.column_names
    near = [name for name in names if name.strip().lower() == "uri"]
    if near:
        return f": rename {near[0]!r} to 'uri' (lower case, no spaces)"
    if len(names) == 1 and ";" in names[0]:
        return ("; its header reads as one column: the file is separated by ';', not ','. "
                "Save it comma-separated (or tab-separated, as .tsv)")
    return ""


def _check_uri_type(uri_type: pa.DataType, manifest: str) -> None:
    """Refuse a ``uri`` column that holds no text: a JSON manifest in the shape pandas'
    ``DataFrame.to_json`` writes by default, ``{"uri": {"0": "a.wav", ...}, ...}``, reads
    as one row whose uri is an object, which would be listed as one recording named by
    that object's text, and fail as a missing file, with every other column a struct.

    Raises:
        ConfigError: naming the type and the shape a JSON manifest takes.
    """
    if pa.types.is_dictionary(uri_type):
        uri_type = uri_type.value_type
    if (pa.types.is_string(uri_type) or pa.types.is_large_string(uri_type)
            or pa.types.is_string_view(uri_type) or pa.types.is_null(uri_type)
            or pa.types.is_integer(uri_type)):  # a CSV's names of digits alone, read exactly
        return
    is_json = manifest.lower().endswith((".jsonl", ".ndjson", ".json"))
    raise ConfigError(f"the manifest's 'uri' column is {uri_type}, not text: each row names "
                      "one recording" + (". A JSON manifest is one object per line, "
                                         '{"uri": "a.wav", "site": "x"} (pandas writes it with '
                                         "df.to_json(path, orient='records', lines=True))"
                                         if is_json else ""), "input.manifest")


def _check_told_apart(items: Sequence[SourceItem], cfg: InputConfig) -> None:
    """Refuse rows that name two objects whose URLs, as the job shows them, differ only in a
    masked query value (``https://h/get?key=a.wav`` and ``?key=b.wav``, both ``?key=***``):
    they would be one recording, the second dropped as the first's duplicate. Rows of one
    object under two tokens (``?token=T1``, ``?token=T2``) are one recording, as they should
    be: their versions agree (the same ETag, or size and time), and they pass.

    Raises:
        ConfigError: naming the rows and the parameter (field ``input.name_params``, which
            says which parameters name an object and are shown).
    """
    first: dict[str, SourceItem] = {}
    for item in items:
        if f"={redact.MASK}" not in item.uri:
            continue
        other = first.setdefault(item.uri, item)
        if other is item or item.version == other.version or MISSING in (item.version,
                                                                          other.version):
            continue
        mine = redact.masked_params(storage.unsigned_uri(item.path), cfg.name_params)
        theirs = redact.masked_params(storage.unsigned_uri(other.path), cfg.name_params)
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if differ:
            raise ConfigError(
                f"manifest rows {other.row + 1} and {item.row + 1} name two objects (versions "
                f"{other.version!r} and {item.version!r}) whose URLs differ only in the "
                f"value of {', '.join(differ)}, masked as a secret in a recording's name "
                f"({item.uri}): they would be one recording. If {differ[0]!r} names the "
                f"object, not a credential, set input.name_params: [{', '.join(differ)}] to "
                "show it (rows are numbered from the first data row)", "input.name_params")


def _given_columns(table: pa.Table) -> tuple[list[str], list[int]]:
    """Each row's ``source_version`` (``""`` where it gives none, or ``missing``, the job's
    word for an object it could not read: that object is looked up) and ``source_bytes``
    (-1 where unknown or negative, as the job writes an unknown size: a decoder asks the
    store).

    Raises:
        ConfigError: ``source_bytes`` without ``source_version``, or not whole numbers.
    """
    rows = table.num_rows
    versions, sizes = [""] * rows, [-1] * rows
    names = table.column_names
    if "source_version" in names:
        column = table.column("source_version")
        if not pa.types.is_string(column.type):
            column = column.cast(pa.string())  # a CSV of bare generation numbers
        versions = ["" if v is None or v.strip() == MISSING else v.strip()
                    for v in column.to_pylist()]
        bare = [v for v in versions if v and "=" not in v]
        if bare:
            log.warning("manifest: %d source_version value(s) such as %r are not spelled as the "
                        "job writes versions (generation=..., ETag=..., size=...,mtime=...): "
                        "they are taken as given, but a listing of the same objects gives "
                        "other recording ids (and a run that lists them replaces these rows)",
                        len(bare), bare[0])
    if "source_bytes" in names:
        if "source_version" not in names:
            raise ConfigError("manifest has source_bytes but no source_version: an object's size "
                              "counts only with the version it is the size of", "input.manifest")
        column = table.column("source_bytes")
        given = column.to_pylist()
        whole = pa.types.is_integer(column.type) or pa.types.is_null(column.type) or (
            pa.types.is_floating(column.type)  # pandas writes a column with gaps as floats
            and all(n is None or math.isnan(n) or float(n).is_integer() for n in given))
        if not whole:
            raise ConfigError(f"manifest column source_bytes is {column.type}; it holds each "
                              "object's size in bytes (whole numbers)", "input.manifest")
        sizes = [-1 if n is None or math.isnan(n) or n < 0 or not versions[i] else int(n)
                 for i, n in enumerate(given)]
    return versions, sizes


def _check_filesystems(uris: Sequence[str]) -> None:
    """Refuse a manifest whose rows name a store this environment has no library for
    (``abfs://`` without adlfs): every such row would fail alike, on a traceback.

    Raises:
        ConfigError: naming the protocol, its first row and what to install.
    """
    first: dict[str, int] = {}
    for i, uri in enumerate(uris):
        first.setdefault(storage.protocol_of(uri), i)
    for protocol, row in first.items():
        if problem := storage.missing_filesystem(uris[row]):
            raise ConfigError(f"manifest row {row + 1} (the first of {protocol}://; 1 = first "
                              f"data row): {problem}", "input.manifest")


def _check_one_version_each(keys: Sequence[str], versions: Sequence[str]) -> None:
    """Refuse a manifest that gives one object two versions (an output's rows of runs before
    and after the object changed): which to embed is not the job's to guess, and taking the
    first would relabel the new content with the old version's id. ``keys``: each row's
    object (:func:`_object_key`), so that two spellings of it (``s3a://b/x.wav`` and
    ``s3://b/x.wav``), which are one recording, are compared too.

    Raises:
        ConfigError: naming the first such object, its rows and both versions.
    """
    first: dict[str, int] = {}
    clashes = [(i, first[key]) for i, (key, version) in enumerate(zip(keys, versions,
                                                                       strict=True))
               if version and versions[first.setdefault(key, i)] != version]
    if clashes:
        row, earlier = clashes[0]
        raise ConfigError(
            f"manifest gives {len({keys[i] for i, _ in clashes})} object(s) two versions in "
            f"source_version (first: {redact.uri(keys[row])}: {versions[earlier]!r} and "
            f"{versions[row]!r}, rows {earlier + 1} and {row + 1}, numbered from the first "
            "data row); keep one row per object, with its current version, or leave "
            "source_version empty there to have the object looked up", "input.manifest")


def _locate(uri: str, cfg: InputConfig) -> tuple[Any, str] | ValueError:
    """``(fs, path)`` of a manifest URL, or the error of one this job cannot use (fsspec's
    ``ValueError``, which becomes an error row)."""
    try:
        return storage.url_to_fs(uri, cfg.storage_options)
    except ValueError as err:
        return err


def _object_key(uri: str, located: tuple[Any, str] | ValueError) -> str:
    """The object ``uri`` names, however it is spelled: its URL as the job writes it
    (:func:`storage.full_uri`: ``s3a://`` as ``s3://``, ``file:///x`` as ``/x``), unsigned but
    not redacted (URLs that differ only in a masked value are :func:`_check_told_apart`'s).
    A URL this job cannot use (``located``: :func:`_locate`'s) is its own key."""
    if isinstance(located, ValueError):
        return uri
    return storage.unsigned_uri(storage.full_uri(*located))


def _given_item(uri: str, row: int, version: str, size: int, cfg: InputConfig,
                located: tuple[Any, str] | ValueError) -> SourceItem:
    """A manifest row that names its object's version: taken at its word, with no request.
    Its id is the one a listing of that version would give when the token is spelled as the
    job writes ``source_version`` (``generation=...``, ``ETag=...``). A URL this job cannot
    use (``located``: :func:`_locate`'s) is an error row, as when looking it up; a missing
    object fails when it is read."""
    if isinstance(located, ValueError):  # a URL fsspec (or this job) cannot use
        return _unreadable(redact.uri(storage.unsigned_uri(uri), keep=cfg.name_params),
                           uri, row, located)
    fs, path = located
    shown = storage.source_uri(fs, path, cfg.name_params)
    return SourceItem(uri=shown, path=path, size_bytes=size, version=version,
                      recording_id=recording_id(shown, version), row=row)


def _without_unnamed_columns(table: pa.Table) -> pa.Table:
    """The manifest without its columns that have no name and no value (a CSV whose lines
    end in a comma, ``uri,site,``), and refusing one that has values: a header cell left
    empty, as ``df.to_csv(path)`` writes a DataFrame's index (``,uri,site``). Carried to
    every row, such a column was a Parquet column named ``""``, which BigQuery and Spark
    refuse, and which DuckDB names by its position, so differently in each table (``C18``
    in recordings, ``C15`` in windows).

    Raises:
        ConfigError: naming the column's position and how to name or drop it.
    """
    unnamed = [k for k, name in enumerate(table.column_names) if not name.strip()]
    held = [k + 1 for k in unnamed if table.column(k).null_count < table.num_rows]
    if held:
        raise ConfigError(
            f"manifest columns number {', '.join(map(str, held))} (of {table.num_columns}) "
            "have no name: an empty header cell, as pandas writes a DataFrame's index with "
            "df.to_csv(path). Name them, or leave them out (df.to_csv(path, index=False))",
            "input.manifest")
    return table.drop_columns([table.column_names[k] for k in unnamed]) if unnamed else table


def _check_column_names(names: Sequence[str]) -> None:
    """Refuse manifest columns that would collide in a reader: a name the job writes, or a
    second spelling of one name. BigQuery's and Spark's column names (by default) and
    DuckDB's ignore case, so ``Model`` (the recorder's) would meet the ``model`` partition
    key, and ``Site`` and ``site`` would be one column.

    Raises:
        ConfigError: such a column (field ``input.manifest``).
    """
    clashes = sorted(n for n in names if n.lower() in RESERVED_COLUMNS)
    if clashes:
        raise ConfigError(
            f"manifest columns {clashes} clash with columns the job writes (names are compared "
            "ignoring case, as BigQuery, Spark and DuckDB do); rename them (source_version "
            "and source_bytes, spelled so, give each object's version and size)",
            "input.manifest")
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault(name.lower(), []).append(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"manifest columns {repeated} appear more than once; rename or drop "
                          "the copies", "input.manifest")
    twice = sorted(str(v) for v in spellings.values() if len(v) > 1)
    if twice:
        raise ConfigError(f"manifest columns {', '.join(twice)} differ only by case, which "
                          "BigQuery, Spark and DuckDB read as one column; rename them",
                          "input.manifest")
    odd = [n for n in names if not _PLAIN_NAME.fullmatch(n)]
    if odd:
        log.warning("manifest columns %s are not plain names (letters, digits, _): DuckDB and "
                    "pandas read them, but BigQuery loads them only with flexible column names "
                    "and older Spark refuses them", odd)


_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _is_uuid(t: pa.DataType) -> bool:
    return getattr(t, "extension_name", None) == "arrow.uuid"  # pa.UuidType: pyarrow 18+


def portable_type(t: pa.DataType) -> pa.DataType:
    """``t`` as a type every reader the README names takes from Parquet: no unsigned
    integers (BigQuery's INT64 is signed; Spark reads UINT_64 as a decimal, before 3.2 not at
    all), no nanosecond times (Spark refuses them, BigQuery keeps microseconds), no time of
    day (Spark before 4.1 refuses a Parquet TIME, and the whole table with it; 4.1 and later
    only with ``spark.sql.timeType.enabled``): ISO text, ``05:10:00``; no extension types
    (Spark refuses a Parquet UUID, and the table with it): a UUID as its canonical text,
    JSON as text; no null type (a column or field with no value at all: text), no struct
    without fields (``{}``, which Parquet cannot store: text), no dictionary, large or view
    encodings, no half floats, no decimal of more than 38 digits (Spark's and DuckDB's
    widest; pyarrow reads a Parquet DECIMAL(40, 2) as ``decimal256``): its exact text. At
    any depth: inside lists, structs and maps too. (A duration has no such type: Parquet
    stores it as a bare INT64, and :func:`_portable_columns` refuses it.)"""
    if _is_uuid(t) or pa.types.is_null(t) or pa.types.is_time(t):
        return pa.string()
    if pa.types.is_decimal(t) and t.precision > _WIDEST_DECIMAL:
        return pa.string()
    if isinstance(t, pa.BaseExtensionType):
        return portable_type(t.storage_type)
    if pa.types.is_dictionary(t):
        return portable_type(t.value_type)
    if pa.types.is_unsigned_integer(t):
        return pa.int64()
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_timestamp(t) and t.unit == "ns":
        return pa.timestamp("us", t.tz)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t) or pa.types.is_fixed_size_list(t)):
        return pa.list_(portable_type(t.value_type))
    if pa.types.is_map(t):
        return pa.map_(portable_type(t.key_type), portable_type(t.item_type))
    if pa.types.is_struct(t):
        if not t.num_fields:
            return pa.string()
        return pa.struct([f.with_type(portable_type(f.type)) for f in t])
    return t


def _portable_columns(table: pa.Table) -> pa.Table:
    """The manifest's columns in :func:`portable_type` types, so the rows load into BigQuery
    and Spark as well as DuckDB and pandas. Times lose what is below a microsecond.

    Raises:
        ConfigError: a value the portable type cannot hold (an unsigned integer past 2^63-1),
            or a type no reader takes and none stands for (an interval; a duration, such as
            a pandas Timedelta column, at any depth).
    """
    for i, field in enumerate(table.schema):
        duration = _duration_in(field.type)
        if duration is not None:
            raise ConfigError(
                f"manifest column {field.name!r} ({field.type}) holds a duration, which "
                f"Parquet stores as a bare INT64 count of {_UNIT_NAMES[duration.unit]}: "
                "BigQuery, Spark and DuckDB would read raw numbers; give it as text or a "
                "number of seconds", "input.manifest")
        wanted = portable_type(field.type)
        if wanted == field.type:
            continue
        try:
            column = pa.chunked_array([_portable_array(chunk, wanted, safe=True)
                                       for chunk in table.column(i).chunks], wanted)
        except pa.ArrowInvalid as err:
            if "would lose data" not in str(err) or pa.types.is_integer(wanted):
                raise ConfigError(f"manifest column {field.name!r} ({field.type}) does not fit "
                                  f"{wanted}, which BigQuery and Spark read: {err}",
                                  "input.manifest") from None
            # unsafe only drops digits below a microsecond; an unsigned overflow stays an error
            column = pa.chunked_array([_portable_array(chunk, wanted, safe=False)
                                       for chunk in table.column(i).chunks], wanted)
        except pa.ArrowNotImplementedError:
            raise ConfigError(f"manifest column {field.name!r} ({field.type}) has no type "
                              "that BigQuery, Spark and DuckDB all read; give it as text",
                              "input.manifest") from None
        table = table.set_column(i, field.with_type(wanted), column)
    return table


_WIDEST_DECIMAL = 38  # digits: the widest DECIMAL Spark and DuckDB have
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds",
               "ns": "nanoseconds"}


def _duration_in(t: pa.DataType) -> pa.DurationType | None:
    """The first duration type in ``t``, at any depth (inside lists, structs, maps,
    dictionaries and extension types), or None."""
    if pa.types.is_duration(t):
        return t
    if isinstance(t, pa.BaseExtensionType):
        return _duration_in(t.storage_type)
    if pa.types.is_dictionary(t):
        return _duration_in(t.value_type)
    if pa.types.is_map(t):
        return _duration_in(t.key_type) or _duration_in(t.item_type)
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t) or pa.types.is_fixed_size_list(t)):
        return _duration_in(t.value_type)
    if pa.types.is_struct(t):
        return next((d for d in (_duration_in(f.type) for f in t) if d is not None), None)
    return None


def _portable_array(arr: pa.Array, wanted: pa.DataType, *, safe: bool) -> pa.Array:
    """``arr`` in ``wanted`` (its :func:`portable_type`), at any depth: a UUID as its
    canonical text (``8c3f0e6e-6d1e-...``), never its 16 bytes read as UTF-8; a time of day
    as ``05:10:00`` or ``05:10:00.25`` whatever its unit; a ``{}`` as that text; a decimal
    in fixed point, with its scale's digits (``12.50``, never ``1.25E+1``); the rest
    cast, values checked where ``safe``.

    Raises:
        pyarrow.ArrowInvalid: a value ``wanted`` cannot hold.
        pyarrow.ArrowNotImplementedError: a type no conversion stands for.
    """
    kind = arr.type
    if kind == wanted:
        return arr
    if _is_uuid(kind):
        return pa.array([None if b is None else str(uuid.UUID(bytes=b))
                         for b in arr.storage.to_pylist()], pa.string())
    if isinstance(arr, pa.ExtensionArray):
        return _portable_array(arr.storage, wanted, safe=safe)
    if pa.types.is_dictionary(kind):
        return _portable_array(arr.dictionary_decode(), wanted, safe=safe)
    if pa.types.is_time(kind):  # the fraction without its trailing zeros, or none
        text = pc.replace_substring_regex(arr.cast(pa.string()), r"(\.\d*?)0+$", r"\1")
        return pc.replace_substring_regex(text, r"\.$", "")
    if pa.types.is_struct(kind) and not kind.num_fields:
        return pa.array([None if v is None else "{}" for v in arr.to_pylist()], pa.string())
    if pa.types.is_decimal(kind) and pa.types.is_string(wanted):  # 1E-42 as 0.000…01
        return pa.array([None if v is None else format(v, "f") for v in arr.to_pylist()],
                        pa.string())
    if pa.types.is_struct(kind):
        children = [_portable_array(child, field.type, safe=safe)
                    for child, field in zip(arr.flatten(), wanted, strict=True)]
        return pa.StructArray.from_arrays(children, fields=list(wanted), mask=arr.is_null())
    if pa.types.is_list(wanted) and not pa.types.is_map(kind):
        if not pa.types.is_list(kind):  # large, view or fixed-size: plain offsets first
            arr = arr.cast(pa.list_(kind.value_type))
        offsets = arr.offsets  # of arr.values, whose start a slice leaves in place
        start, end = offsets[0].as_py(), offsets[-1].as_py()
        values = _portable_array(arr.values.slice(start, end - start), wanted.value_type,
                                 safe=safe)
        return pa.ListArray.from_arrays(pc.subtract(offsets, start), values, type=wanted,
                                        mask=arr.is_null())
    return arr.cast(wanted, safe=safe)  # maps whose keys or items need more refuse here


def _stat_all(uris: Sequence[tuple[str, int]], cfg: InputConfig, total: int) -> list[SourceItem]:
    """Stat every ``(uri, row)`` with ``_STAT_THREADS`` threads, ``_STAT_CHUNK`` at a time:
    ``Executor.map`` makes every future up front: 280 MiB more for 200,000 rows. ``total``:
    the manifest's objects, looked up or not."""
    stated: list[SourceItem] = []
    with ThreadPoolExecutor(_STAT_THREADS) as pool:
        for start in range(0, len(uris), _STAT_CHUNK):
            chunk = uris[start:start + _STAT_CHUNK]
            stated.extend(pool.map(lambda kv: _stat_manifest_uri(kv[0], kv[1], cfg), chunk))
            if not start and len(uris) == total:  # every row looked up: none vouched for
                _refuse_if_all_refused(stated)
            if len(uris) > _STAT_CHUNK:
                log.info("manifest: %d of %d objects looked up", len(stated), len(uris))
    return stated


def _refuse_if_all_refused(stated: Sequence[SourceItem]) -> None:
    """Stops the job before any work when every object of the first lookups (up to
    ``_STAT_CHUNK``) refused the credentials, in a manifest none of whose rows names its
    version (those are not looked up: one refused object among them is an error row): a
    wrong key or profile, which would otherwise make every row of the manifest an error
    row, after hours of lookups.

    Raises:
        ConfigError: naming the first of them, and the setting to check.
    """
    refused = [i for i in stated if i.problem.startswith("PermissionError: ")]
    if refused and len(refused) == len(stated):
        raise ConfigError(
            f"all {len(stated)} objects looked up first were refused, e.g. "
            f"{refused[0].uri}: {refused[0].problem.removeprefix('PermissionError: ')}",
            "input.manifest")


def resolve_relative(uri: str, base: str) -> str:
    """Manifest URIs without a scheme that are not absolute are relative to the manifest,
    except ``~/…`` in a local manifest: the home folder, as fsspec reads ``input.uri``
    (joined to the manifest's folder, every such row was a missing file). A ``file://`` URL
    naming no file is read percent-decoded if that names one, as RFC 8089 has it written
    (``Path.as_uri()`` writes ``with%20space.wav``); fsspec, and this job before, take it
    literally, which a file named ``rec%20one.wav`` keeps."""
    if uri[:7].lower() == "file://" and "%" in uri:
        literal = uri[7:]
        decoded = urllib.parse.unquote(literal)
        if not os.path.exists(literal) and os.path.exists(decoded):
            return uri[:7] + decoded
    if "://" in uri or uri.startswith("/") or not uri:
        return uri
    if uri.startswith("~/") and "://" not in base:  # the home folder, as input.uri reads it
        return os.path.expanduser(uri)
    # ./a.wav and ../b/a.wav name the objects a.wav and b/a.wav: an object store takes a key
    # literally, so "m/./a.wav" would be another (missing) object, and a second recording.
    scheme, sep, rest = base.rpartition("://")
    joined = posixpath.normpath(posixpath.join(rest or ".", uri))
    return f"{scheme}{sep}{joined}" if sep else storage.join(base, uri)


def _stat_manifest_uri(uri: str, row: int, cfg: InputConfig) -> SourceItem:
    try:
        fs, path = storage.url_to_fs(uri, cfg.storage_options)
    except ValueError as err:  # a URL fsspec (or this job) cannot use: an error row
        return _unreadable(redact.uri(storage.unsigned_uri(uri), keep=cfg.name_params),
                           uri, row, err)
    shown = storage.source_uri(fs, path, cfg.name_params)
    try:
        info = storage.retry(lambda: fs.info(path), what=f"stat {shown}")
    except (OSError, ValueError) as err:  # missing or unreadable: becomes an error row
        return _unreadable(shown, path, row, err)
    if info.get("type") == "directory":  # settled: not a read that may work next time
        return _unreadable(shown, path, row, IsADirectoryError(
            f"{shown} is a folder, not a recording (a folder is listed with input.uri)"))
    version = source_version(info)
    return SourceItem(uri=shown, path=path, size_bytes=_size(info),
                      version=version, recording_id=recording_id(shown, version), row=row)


def _unreadable(shown: str, path: str, row: int, err: Exception) -> SourceItem:
    """A manifest row whose object cannot be had: an error row, named for its ``err`` (a
    refusal of the credentials, whatever the store, as ``PermissionError``: retried by
    later runs, see ``errors.RETRYABLE_ERRORS``)."""
    if storage.archived(err):  # a HEAD does not meet it, but a store may answer so anyway
        problem = f"ArchivedObject: {storage.archived_message(err, shown)}"
    elif storage.access_refused(err):
        problem = f"PermissionError: {storage.why(err, 'input.storage_options')}"
    else:
        problem = f"{type(err).__name__}: {redact.text(str(err))}"
    return SourceItem(uri=shown, path=path, size_bytes=-1, version=MISSING,
                      recording_id=recording_id(shown, MISSING), row=row, problem=problem)


def _size(info: dict[str, Any]) -> int:
    """The object's size, -1 where the listing did not say: the decoder then asks the
    store (and fails the recording clearly if it has no size), instead of reading 0 bytes."""
    size = info.get("size")
    return -1 if size is None else int(size)


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read a CSV, Parquet or JSON-lines manifest into an Arrow table (types inferred).

    Raises:
        ConfigError: unreadable file or unknown extension.
    """
    data, lower = _manifest_bytes(uri, storage_options)
    try:
        if lower.endswith(".parquet"):
            _refuse_intervals(data)
            return _without_pandas_index(read_parquet_bytes(data))
        if lower.endswith((".jsonl", ".ndjson", ".json")):
            _refuse_json_array(data, uri)
            return pa_json.read_json(io.BytesIO(data))
        if lower.endswith((".csv", ".tsv")):
            _refuse_other_encodings(data, uri)
            return _read_csv(data, "\t" if lower.endswith(".tsv") else ",")
    except pa.ArrowInvalid as err:
        raise ConfigError(f"manifest {redact.uri(uri)} is malformed: "
                          f"{redact.text(str(err))}",
                          "input.manifest") from None
    raise ConfigError(
        f"{redact.uri(uri)}: manifest must end in .csv, .tsv, .parquet, .jsonl or .json",
        "input.manifest",
    )


def read_manifest_text(uri: str, storage_options: dict[str, Any] | None,
                       names: Sequence[str]) -> dict[str, pa.ChunkedArray]:
    """Columns ``names`` of a CSV, TSV or JSON-lines manifest as the file spells them, before
    any type is inferred (``2026-05-01T05:10:00Z``, ``1.10``, ``TRUE``), in the rows
    :func:`read_manifest` reads: for values that join a column a namespace stores as text
    (``resume.Resumption.check_manifest_columns``), which pyarrow's rendering of the type it
    inferred would spell otherwise (``2026-05-01 05:10:00Z``, ``1.1``, ``true``). A Parquet
    manifest's columns are typed in the file, and a JSON number has no text of its own: those
    are not returned.

    Raises:
        ConfigError: the manifest cannot be read.
    """
    data, lower = _manifest_bytes(uri, storage_options)
    try:
        if lower.endswith((".csv", ".tsv")):
            text = pa_csv.read_csv(
                io.BytesIO(data), parse_options=pa_csv.ParseOptions(
                    delimiter="\t" if lower.endswith(".tsv") else ","),
                convert_options=pa_csv.ConvertOptions(
                    column_types={name: pa.string() for name in names},
                    include_columns=list(names)))
            text = _empty_cells_missing(text)
            return {name: text.column(name) for name in names}
    except pa.ArrowInvalid:
        return {}
    out: dict[str, pa.ChunkedArray] = {}
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        for name in names:  # one by one: a column of numbers is refused as text, alone
            try:
                text = pa_json.read_json(io.BytesIO(data), parse_options=pa_json.ParseOptions(
                    explicit_schema=pa.schema([(name, pa.string())]),
                    unexpected_field_behavior="ignore"))
            except pa.ArrowInvalid:
                continue
            out[name] = text.column(name)
    return out


def _manifest_bytes(uri: str, storage_options: dict[str, Any] | None) -> tuple[bytes, str]:
    """A manifest's bytes, and its path in lower case (its extension says its format).

    Raises:
        ConfigError: it cannot be read.
    """
    fs, path = storage.url_to_fs(uri, storage_options)
    try:
        data = storage.reach(fs, path, redact.uri(uri), lambda: fs.cat_file(path))
    except Exception as err:
        if not isinstance(err, (OSError, ValueError)) and not storage.access_refused(err):
            raise
        raise ConfigError(f"cannot read manifest {redact.uri(uri)}: "
                          f"{storage.why(err, 'input.storage_options')}", "input.manifest") from None
    return data, path.lower()


def _refuse_other_encodings(data: bytes, uri: str) -> None:
    """Refuse a CSV that is not UTF-8, as Excel on Windows saves "CSV (Comma delimited)"
    (cp1252): pyarrow reads a column holding ``Río`` as raw bytes, which every output row
    would then carry as a blob, and a header holding one raised a UnicodeDecodeError (a
    traceback). Checked in pieces: a large manifest is never decoded whole in memory.

    Raises:
        ConfigError: naming the line and the byte, and how to save the file as UTF-8.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    piece = 1 << 20
    for start in range(0, len(data), piece):
        held = len(decoder.getstate()[0])  # a character's first bytes, from the last piece
        try:
            decoder.decode(data[start:start + piece], final=start + piece >= len(data))
        except UnicodeDecodeError as err:
            at = start - held + err.start
            line = data.count(b"\n", 0, at) + 1
            raise ConfigError(
                f"manifest {redact.uri(uri)} is not UTF-8 text (byte 0x{data[at]:02x} on line "
                f"{line}, likely cp1252, as Excel's 'CSV (Comma delimited)' saves it): save "
                "it as 'CSV UTF-8', or convert it (iconv -f cp1252 -t utf-8)",
                "input.manifest") from None


def _refuse_json_array(data: bytes, uri: str) -> None:
    """Refuse a JSON manifest that is one array of rows (``[{"uri": ...}, ...]``, as
    ``json.dump`` of a list or pandas' ``orient='records'`` writes it): pyarrow reads JSON
    lines only, and says of an array "Column() changed from object to array in row 0".

    Raises:
        ConfigError: saying what the file is and the shape it takes.
    """
    if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
        raise ConfigError(f"manifest {redact.uri(uri)} is a JSON array; a JSON manifest is "
                          'one object per line (JSON lines: {"uri": "a.wav", "site": "x"}), '
                          "as pandas writes it with df.to_json(path, orient='records', "
                          "lines=True)", "input.manifest")


_PANDAS_INDEX = re.compile(r"__index_level_\d+__")


def _without_pandas_index(table: pa.Table) -> pa.Table:
    """A Parquet manifest without the index pandas stores beside a DataFrame's columns when
    it is not a plain range (any DataFrame filtered by a mask, sorted, deduplicated or
    concatenated): an unnamed level is a column ``__index_level_0__``, which pandas reads
    back as the index, not as a column. Kept, every output row carried the DataFrame's row
    numbers, and a later run whose manifest had a plain index was refused for lacking that
    column. A named index level (``df.set_index("site")``) is the user's column, and stays.
    """
    stored = (table.schema.metadata or {}).get(b"pandas")
    if not stored:
        return table
    try:
        index = json.loads(stored).get("index_columns", [])
    except (ValueError, AttributeError):  # not the metadata pandas writes
        return table
    unnamed = [name for name in index if isinstance(name, str)
               and _PANDAS_INDEX.fullmatch(name) and name in table.column_names]
    if unnamed:
        log.info("manifest: left out %s, the index pandas stored beside the DataFrame's "
                 "columns (pandas reads it back as the index)", ", ".join(unnamed))
    return table.drop_columns(unnamed)


def _refuse_intervals(data: bytes) -> None:
    """Refuse a Parquet manifest with an INTERVAL column (DuckDB writes them): pyarrow reads
    one as 12 raw bytes, which every reader would then take as a blob.

    Raises:
        ConfigError: naming the column.
    """
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(io.BytesIO(data)).schema
    for k in range(len(schema)):
        column = schema.column(k)
        if column.converted_type == "INTERVAL" or column.logical_type.type == "INTERVAL":
            raise ConfigError(f"manifest column {column.path!r} is a Parquet INTERVAL, which "
                              "pyarrow, Spark and BigQuery read as raw bytes; give it as "
                              "text or a number of seconds", "input.manifest")


def _read_csv(data: bytes, delimiter: str) -> pa.Table:
    """A CSV manifest with its types inferred, except where a number would lose what the
    file says: a numeric column keeps its text when any value is zero-padded (ids such as
    ``007``) or an integer too long to survive a float. (``3.10`` is the number 3.1.) An
    empty cell is a missing value in every column (:func:`_empty_cells_missing`).

    ``NA``, ``N/A``, ``null``, ``NaN`` and the like are missing values in a numeric column
    (pyarrow's reading, and pandas': R writes ``NA`` for a missing number) and text in a
    text column, including one of nothing else: ``continent`` = ``NA`` in a manifest of
    North American sites alone is that text, as it is beside ``EU`` (pyarrow alone reads
    such a column as all nulls)."""
    parse = pa_csv.ParseOptions(delimiter=delimiter)
    typed = pa_csv.read_csv(io.BytesIO(data), parse_options=parse)
    numeric = [f.name for f in typed.schema
               if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    words = [f.name for f in typed.schema if pa.types.is_null(f.type)]  # or all empty
    if not numeric and not words:
        return _empty_cells_missing(typed)
    text = pa_csv.read_csv(io.BytesIO(data), parse_options=parse,
                           convert_options=pa_csv.ConvertOptions(
                               column_types={name: pa.string() for name in numeric + words}))
    for name in numeric:
        spelled = text.column(name)
        floating = pa.types.is_floating(typed.schema.field(name).type)
        if not all(_plain_number(v, floating) for v in spelled.to_pylist() if v):
            typed = typed.set_column(typed.schema.get_field_index(name), name, spelled)
    for name in words:
        spelled = text.column(name)
        if any(spelled.to_pylist()):  # not a column of empty cells alone
            typed = typed.set_column(typed.schema.get_field_index(name), name, spelled)
    return _empty_cells_missing(typed)


def _empty_cells_missing(table: pa.Table) -> pa.Table:
    """A CSV's empty cells in its text columns as missing values (NULL), as they are in its
    numeric ones, in a column of nothing else, and to BigQuery's CSV loads and pandas.
    pyarrow reads them as ``""`` in a column with other text, so one manifest column was
    ``""`` in one run and NULL in the next (where that run's cells were all empty), and
    ``WHERE site IS NULL`` missed the rows of some runs. ``NA`` and the like stay text."""
    for k, field in enumerate(table.schema):
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        column = table.column(k)
        empty = pc.equal(column, "")
        if pc.any(empty).as_py():
            table = table.set_column(k, field, pc.if_else(empty, pa.scalar(None, field.type),
                                                          column))
    return table


_LEADING_ZERO = re.compile(r"^[+-]?0\d")
_INTEGER = re.compile(r"^[+-]?\d+$")


def _plain_number(text: str, floating: bool) -> bool:
    """Whether reading ``text`` as a number loses nothing a reader would want back: no
    zero padding, and no integer past what a float holds exactly (Arrow reads integers
    beyond int64 as floats, exact to 15 digits)."""
    text = text.strip()
    if _LEADING_ZERO.match(text):
        return False
    return not (floating and _INTEGER.match(text) and len(text.lstrip("+-")) > 15)


def plan_shards(items: Sequence[SourceItem], shard_size: int) -> list[tuple[str, list[SourceItem]]]:
    """Split sorted items into commit shards; a shard's id is a hash of its recording ids.

    The same remaining set always produces the same shards, so a rerun after a crash
    rewrites the exact shard that was lost.
    """
    shards = []
    for start in range(0, len(items), shard_size):
        members = list(items[start : start + shard_size])
        digest = hashlib.sha256("\n".join(i.recording_id for i in members).encode()).hexdigest()
        shards.append((digest[:16], members))
    return shards


def pack_decode_tasks(sizes: Sequence[int], *, tasks_at_least: int, max_recordings: int = 64,
                      max_bytes: int = 64 * 2**20,
                      max_tasks: int = MAX_DECODE_TASKS) -> list[tuple[int, int]]:
    """Group consecutive recordings into decode tasks: ``[start, end)`` index ranges.

    One task per recording does not scale: on a 2-core machine Ray took 21 s to create 20,000
    one-row blocks and 225 s to run a trivial task over each (11 ms a task, more than
    decoding a short clip takes); a million recordings would spend a quarter of an hour in
    ``from_items`` alone. A task holds up to ``max_recordings`` recordings
    and ``max_bytes`` of encoded audio (a recording larger than that, or of unknown size, is
    a task alone, unless half the tasks would be such), but never so many that there are
    fewer than ``tasks_at_least`` tasks, so small jobs still decode in parallel. Both limits
    grow with the job so that it has about ``max_tasks`` tasks at most: the driver holds
    every task's block from the start (some 3.4 ms and 55 KB each), and a streamed task is
    as cheap to run long as short.
    """
    known = sum(size for size in sizes if size >= 0)
    max_recordings = max(max_recordings, -(-len(sizes) // max_tasks))
    max_bytes = max(max_bytes, -(-known // max_tasks))
    # An unsized recording counts as a whole task's bytes, unless so many are unsized that
    # they alone would make more than half the tasks: then they share tasks evenly.
    unsized = sum(1 for size in sizes if size < 0)
    unsized_bytes = max_bytes if unsized <= max_tasks // 2 else max_bytes * (max_tasks // 2) // unsized
    n = len(sizes)
    per_task = max(1, min(max_recordings, n // max(1, tasks_at_least)))
    tasks: list[tuple[int, int]] = []
    start, held = 0, 0
    for i, size in enumerate(sizes):
        size = size if size >= 0 else unsized_bytes
        if i > start and (i - start >= per_task or held + size > max_bytes):
            tasks.append((start, i))
            start, held = i, 0
        held += size
    if n:
        tasks.append((start, n))
    return tasks
