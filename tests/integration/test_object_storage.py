"""Object storage for real: the same job bucket to bucket on S3 and GCS, with faults.

Every endpoint is a real server on 127.0.0.1, started and stopped here (see
``storage_servers.py``): ``moto_server`` for S3, ``gcp-storage-emulator`` for GCS, a
fault-injecting proxy in front of moto, and a counting proxy (no faults) that measures the
bytes a run fetches. Part of the real recordings is uploaded to a bucket; the job runs
bucket to bucket and its outputs, read back with pyarrow and DuckDB, must equal the same
job run on local copies (keyed by relative path: ``recording_id`` depends on the URI).

The weights are a seeded random tiny BEATs saved once as a checkpoint, so every process
(the test's Ray workers, a CLI subprocess) embeds with identical weights; with
``weights: random`` each process initialises its own and embeddings differ between runs.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from pipeline import storage
from pipeline.catalog import load_catalog, render
from pipeline.config import JobConfig
from pipeline.errors import StorageError
from pipeline.job import EXIT_SOME_FAILED, EmbeddingJob
from pipeline.sink import PROVENANCE_KEY
from pipeline.summary import JobSummary
from tests.integration.conftest import TINY_BEATS, job_dict
from tests.integration.storage_servers import (
    FAULT_KINDS,
    FaultProxy,
    ProxyStats,
    ServerProcess,
    find_secret,
    gcs_options,
    peak_rss_decode_batch,
    poll_until,
    port_is_open,
    running,
    s3_options,
    start_gcs_emulator,
    start_moto,
    upload_files,
)

REPO = Path(__file__).resolve().parents[2]

# A mix of formats, rates and channel counts (relative to the real-data folder).
ARCHIVE_FILES: tuple[str, ...] = (
    "opensoundscape/tests/audio/aru_1.wav",                       # WAV 32 kHz
    "opensoundscape/tests/audio/LOCA_2021_09_24_652_3.wav",       # WAV 22.05 kHz, 1 s
    "opensoundscape/tests/audio/silence_10s.mp3",                 # MP3 44.1 kHz
    "opensoundscape/tests/audio/audiomoth_gps.wav",               # WAV 48 kHz
    "opensoundscape/tests/audio/empty_2c.wav",                    # no samples: an error row
    "perch/chirp/tests/testdata/21100_36_48.flac",                # FLAC 24-bit 16 kHz
    "perch/chirp/tests/testdata/21100_36_48.ogg",                 # OGG/Vorbis
    "perch/chirp/tests/testdata/21100_36_48.opus",                # OGG/Opus
    "perch/chirp/projects/agile_bioacoustics/fish_audio_queries/Pulse purr.wav",  # a space
    "perch/chirp/projects/agile_bioacoustics/fish_audio_queries/Croak.wav",
    "pykanto/pykanto/data/raw/STORM-PETREL/XC663885.wav",        # stereo WAV 44.1 kHz
    "pykanto/pykanto/data/raw/AM/20210502_040000.WAV",            # upper-case extension
    "pykanto/pykanto/data/segmented/great_tit/WAV/2021-B32-0415_05-11.wav",
    "librosa_data/audio/456440__inspectorj__bird-whistling-robin-single-13.hq.ogg",  # stereo OGG
    "scikit-maad/data/indices/S4A03895_20190522_000000.wav",      # WAV 22 kHz
)
EMPTY_FILE = "opensoundscape/tests/audio/empty_2c.wav"
LONG_CLIPS = (  # looped into the long recordings (all 22.05 kHz mono)
    "librosa_data/audio/glacier-bay-humpback.ogg",
    "pykanto/pykanto/data/segmented/great_tit/WAV/2021-B32-0415_05-11.wav",
    "pykanto/pykanto/data/segmented/great_tit/WAV/2021-SW83-0418_04-79.wav",
)

ACCESS_KEY = "AKIAEMBEDARCHIVETEST"
SECRET = "fake-SECRET-7c1e9a4f-do-not-leak"  # moto accepts any key and secret
IN_BUCKET, OUT_BUCKET = "audio-in", "embeddings-out"
RTOL, ATOL = 1e-5, 1e-6  # batching across recordings may change the last float bits
MIB = 1024  # KiB per MiB (RSS figures are in KiB)


# --------------------------------------------------------------------------- reading outputs


@dataclass(frozen=True)
class Rows:
    """An output root's tables, keyed by path relative to the input root.

    Attributes:
        windows: ``(file, channel, window_index, layer) -> (start_s, end_s, valid_s, emb)``.
        recordings: ``(file, channel, layer) -> (duration, rate, channels, windows, status,
            detail, emb)``.
        errors: ``file -> (error_type, message)``.
        ids: ``file -> recording_id`` (the same in every table).
        versions: ``file -> source_version``.
    """

    windows: dict[tuple[str, int, int, int], tuple[Any, ...]]
    recordings: dict[tuple[str, int, int], tuple[Any, ...]]
    errors: dict[str, tuple[str, str]]
    ids: dict[str, str]
    versions: dict[str, str]


def relative(source_uri: str, prefixes: tuple[str, ...]) -> str:
    """``source_uri`` relative to the input root it is under (URL-decoded, no query)."""
    for prefix in prefixes:
        if source_uri.startswith(prefix):
            path = source_uri[len(prefix):].split("?", 1)[0]
            return urllib.parse.unquote(path.lstrip("/"))
    raise AssertionError(f"{source_uri} is under none of {prefixes}")


def _rows(windows: list[dict[str, Any]], recordings: list[dict[str, Any]],
          errors: list[dict[str, Any]], prefixes: tuple[str, ...]) -> Rows:
    ids: dict[str, str] = {}
    versions: dict[str, str] = {}

    def rel(row: dict[str, Any]) -> str:
        name = relative(row["source_uri"], prefixes)
        assert ids.setdefault(name, row["recording_id"]) == row["recording_id"], name
        versions.setdefault(name, row["source_version"])
        assert row["model"] == "beats", row["model"]  # the Hive partition column
        return name

    out = Rows(windows={}, recordings={}, errors={}, ids=ids, versions=versions)
    for r in windows:
        window = (rel(r), r["channel"], r["window_index"], r["layer"])
        assert window not in out.windows, f"duplicate window row {window}"
        out.windows[window] = (r["start_s"], r["end_s"], r["valid_s"],
                               np.asarray(r["embedding"], np.float32))
    for r in recordings:
        recording = (rel(r), r["channel"], r["layer"])
        assert recording not in out.recordings, f"duplicate recording row {recording}"
        out.recordings[recording] = (r["duration_s"], r["source_sample_rate_hz"],
                                     r["source_channels"], r["num_windows"], r["status"],
                                     r["status_detail"], np.asarray(r["embedding"], np.float32))
    for r in errors:
        out.errors[rel(r)] = (r["error_type"], r["message"])
    return out


def read_with_pyarrow(root: str, options: Mapping[str, Any], prefixes: tuple[str, ...]) -> Rows:
    """Read the three tables as Hive-partitioned Parquet datasets through fsspec."""
    fs, path = storage.url_to_fs(root, options)

    def table(name: str) -> list[dict[str, Any]]:
        dataset = pads.dataset(f"{path}/{name}", filesystem=fs, format="parquet",
                               partitioning="hive")
        return dataset.to_table().to_pylist()

    return _rows(table("windows"), table("recordings"), table("errors"), prefixes)


def duckdb_for(root: str, options: Mapping[str, Any]) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that reads ``root``: bucket URLs through the fsspec filesystem
    (DuckDB's httpfs extension is not installable offline)."""
    con = duckdb.connect()
    if not storage.is_local(root):
        con.register_filesystem(storage.url_to_fs(root, options)[0])
    return con


def read_with_duckdb(root: str, options: Mapping[str, Any], prefixes: tuple[str, ...]) -> Rows:
    con = duckdb_for(root, options)

    def table(name: str) -> list[dict[str, Any]]:
        rel = con.sql(f"SELECT * FROM read_parquet('{root}/{name}/**/*.parquet', "
                      "hive_partitioning = true)")
        return [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]

    return _rows(table("windows"), table("recordings"), table("errors"), prefixes)


def assert_same_rows(got: Rows, want: Rows, exact: bool = False) -> float:
    """Same rows and values; embeddings equal within RTOL/ATOL (or exactly). Returns the
    largest embedding difference."""
    assert got.windows.keys() == want.windows.keys()
    assert got.recordings.keys() == want.recordings.keys()
    assert got.errors == want.errors
    worst = 0.0
    pairs: list[tuple[Mapping[Any, tuple[Any, ...]], Mapping[Any, tuple[Any, ...]]]] = [
        (got.windows, want.windows), (got.recordings, want.recordings)]
    for table_got, table_want in pairs:
        for key, values in table_want.items():
            other = table_got[key]
            assert other[:-1] == values[:-1], key
            assert other[-1].shape == values[-1].shape, key
            if exact:
                assert np.array_equal(other[-1], values[-1]), key
            else:
                np.testing.assert_allclose(other[-1], values[-1], rtol=RTOL, atol=ATOL,
                                           err_msg=str(key))
            worst = max(worst, float(np.abs(other[-1] - values[-1]).max(initial=0.0)))
    return worst


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Run:
    """One job run: where it wrote, how to read it, what it reported."""

    root: str
    options: dict[str, Any]
    prefixes: tuple[str, ...]
    summary: JobSummary | None = None

    def rows(self) -> Rows:
        return read_with_pyarrow(self.root, self.options, self.prefixes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("object_storage")


def serving(server: ServerProcess) -> Iterator[ServerProcess]:
    """Yield a started endpoint, then stop it and check that its port is closed."""
    try:
        yield server
    finally:
        server.stop()
    assert not port_is_open(server.port)


@pytest.fixture(scope="module")
def moto(workdir: Path) -> Iterator[ServerProcess]:
    yield from serving(start_moto(workdir / "server-logs"))


@pytest.fixture(scope="module")
def gcs(workdir: Path) -> Iterator[ServerProcess]:
    yield from serving(start_gcs_emulator(workdir / "server-logs"))


@pytest.fixture(scope="module")
def fault_proxy(moto: ServerProcess) -> Iterator[FaultProxy]:
    """Fails the first request of each kind, then 20% of the rest."""
    with running(FaultProxy(moto.port, fault_rate=0.2, seed=20261121)) as proxy:
        yield proxy
    assert not port_is_open(proxy.port)


@pytest.fixture(scope="module")
def counting_proxy(moto: ServerProcess) -> Iterator[FaultProxy]:
    with running(FaultProxy(moto.port, fault_rate=0.0, fail_first=False)) as proxy:
        yield proxy
    assert not port_is_open(proxy.port)


def s3_opts(endpoint_url: str) -> dict[str, Any]:
    return s3_options(endpoint_url, ACCESS_KEY, SECRET)


@pytest.fixture(scope="module")
def archive(workdir: Path, real_data: Path) -> Path:
    """Local copies of the selected recordings (the local run's input)."""
    root = workdir / "archive"
    for rel in ARCHIVE_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_data / rel, root / rel)
    return root


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    """A seeded random tiny BEATs as a safetensors file: identical weights in every process."""
    import torch
    from safetensors.torch import save_file

    from pipeline.models import create_backbone

    with torch.random.fork_rng():
        torch.manual_seed(1234)
        backbone = create_backbone("beats", weights="random", options=TINY_BEATS)
    path = workdir / "tiny_beats.safetensors"
    # clone(): tied tensors (the shared relative-position bias) must not share storage.
    module = backbone.module  # type: ignore[attr-defined]  # a ModuleBackbone
    save_file({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()},
              str(path))
    return path


@pytest.fixture(scope="module")
def s3_buckets(moto: ServerProcess) -> Any:
    """The input and output buckets on moto; returns a filesystem that talks to it directly."""
    fs, _ = storage.url_to_fs(f"s3://{IN_BUCKET}", s3_opts(moto.url))
    fs.mkdir(IN_BUCKET)
    fs.mkdir(OUT_BUCKET)
    return fs


@pytest.fixture(scope="module")
def s3_archive(s3_buckets: Any, archive: Path) -> str:
    fs = s3_buckets
    upload_files(fs, {rel: archive / rel for rel in ARCHIVE_FILES}, f"{IN_BUCKET}/archive")
    return f"s3://{IN_BUCKET}/archive"


@pytest.fixture(scope="module")
def gcs_archive(gcs: ServerProcess, archive: Path) -> str:
    fs, _ = storage.url_to_fs(f"gs://{IN_BUCKET}", gcs_options(gcs.url))
    fs.mkdir(IN_BUCKET)
    fs.mkdir(OUT_BUCKET)
    upload_files(fs, {rel: archive / rel for rel in ARCHIVE_FILES}, f"{IN_BUCKET}/archive")
    return f"gs://{IN_BUCKET}/archive"


def job_config(input_uri: str | None, output_uri: str, checkpoint: Path, job_id: str,
               input_options: Mapping[str, Any] | None = None,
               output_options: Mapping[str, Any] | None = None,
               **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny-BEATs test job (``conftest.job_dict``) with fixed weights and storage options."""
    inputs = {"storage_options": dict(input_options or {}), **sections.pop("input", {})}
    return job_dict(input_uri, output_uri, input=inputs,
                    output={"storage_options": dict(output_options or {})},
                    model={"weights": str(checkpoint)},
                    run={"job_id": job_id, "progress": False}, **sections)


def run_job(raw: dict[str, Any]) -> JobSummary:
    return EmbeddingJob(JobConfig.from_dict(raw)).run()


@pytest.fixture(scope="module")
def local_run(archive: Path, workdir: Path, checkpoint: Path, ray_session: None) -> Run:
    out = workdir / "local-out"
    summary = run_job(job_config(str(archive), str(out), checkpoint, "local"))
    return Run(str(out), {}, (str(archive),), summary)


def bucket_run(archive: str, root: str, checkpoint: Path, name: str,
               options: dict[str, Any]) -> Run:
    """The job from a bucket archive to a bucket output, both through ``options``."""
    summary = run_job(job_config(archive, root, checkpoint, name, options, options))
    return Run(root, options, (archive,), summary)


@pytest.fixture(scope="module")
def s3_run(s3_archive: str, moto: ServerProcess, checkpoint: Path, ray_session: None) -> Run:
    return bucket_run(s3_archive, f"s3://{OUT_BUCKET}/s3", checkpoint, "s3", s3_opts(moto.url))


@pytest.fixture(scope="module")
def gcs_run(gcs_archive: str, gcs: ServerProcess, checkpoint: Path, ray_session: None) -> Run:
    return bucket_run(gcs_archive, f"gs://{OUT_BUCKET}/gcs", checkpoint, "gcs",
                      gcs_options(gcs.url))


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@dataclass(frozen=True)
class CliRun:
    """A job run through ``embed-archive run`` in a subprocess with its own Ray."""

    run: Run
    process: subprocess.CompletedProcess[str]
    config_path: Path
    ray_dir: Path
    faults: ProxyStats


@pytest.fixture(scope="module")
def fault_run(s3_archive: str, fault_proxy: FaultProxy, checkpoint: Path, workdir: Path,
              ) -> Iterator[CliRun]:
    """``embed-archive run`` bucket to bucket through the fault proxy, with the fake secret.

    Its own Ray (RAY_TMPDIR points at a fresh folder) forwards worker logs to its stderr, so
    the captured output and that folder hold everything the run logged.
    """
    options = s3_opts(fault_proxy.url)
    root = f"s3://{OUT_BUCKET}/faults"
    raw = job_config(s3_archive, root, checkpoint, "faults", options, options,
                     compute={"num_cpus": 2, "object_store_memory_mb": 256})
    config_path = workdir / "faults.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    ray_dir = Path(tempfile.mkdtemp(prefix="ea-ray-", dir="/tmp"))  # short: socket paths
    fault_proxy.reset()
    try:
        process = subprocess.run(
            [str(Path(sys.executable).parent / "embed-archive"), "run", str(config_path)],
            env={**os.environ, "RAY_TMPDIR": str(ray_dir), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
            cwd=workdir, capture_output=True, text=True, timeout=300, check=False,
        )
        faults = fault_proxy.stats()
        yield CliRun(Run(root, s3_opts(fault_proxy.url), (s3_archive,)), process, config_path,
                     ray_dir, faults)
    finally:
        # The CLI shuts its Ray down; make sure nothing of it outlives the test.
        poll_until(lambda: not processes_mentioning(str(ray_dir)), 60,
                   f"Ray processes of {ray_dir} to exit")
        shutil.rmtree(ray_dir, ignore_errors=True)


# --------------------------------------------------------------------------- 1. S3 and GCS


def test_s3_bucket_to_bucket_matches_local(s3_run: Run, local_run: Run) -> None:
    assert s3_run.summary is not None and local_run.summary is not None
    for summary in (s3_run.summary, local_run.summary):
        assert summary.recordings_listed == len(ARCHIVE_FILES)
        assert (summary.embedded, summary.partial, summary.failed) == (len(ARCHIVE_FILES) - 1, 0, 1)
        assert summary.exit_code == EXIT_SOME_FAILED
    local = local_run.rows()
    via_arrow = s3_run.rows()
    via_duckdb = read_with_duckdb(s3_run.root, s3_run.options, s3_run.prefixes)
    assert_same_rows(via_duckdb, via_arrow, exact=True)  # two readers, one truth
    worst = assert_same_rows(via_arrow, local)
    print(f"\nS3 vs local: {len(local.windows)} window rows, {len(local.recordings)} recording "
          f"rows, max |embedding difference| {worst:.2e}")
    assert set(via_arrow.ids) == set(ARCHIVE_FILES)
    assert via_arrow.errors == {
        EMPTY_FILE: ("EmptyAudio", "the file holds no audio samples (0 frames)")}
    assert all(v.startswith("ETag=") for v in via_arrow.versions.values())
    assert not set(via_arrow.ids.values()) & set(local.ids.values())  # ids follow the URI
    # Stereo WAV and OGG and an MP3 came through with their own rates and channels.
    shape = {k[0]: v[1:3] for k, v in via_arrow.recordings.items()}
    assert shape["pykanto/pykanto/data/raw/STORM-PETREL/XC663885.wav"] == (44_100, 2)
    assert shape["librosa_data/audio/456440__inspectorj__bird-whistling-robin-single-13.hq.ogg"
                 ] == (44_100, 2)
    assert shape["opensoundscape/tests/audio/silence_10s.mp3"] == (44_100, 1)


def test_every_row_and_file_names_the_checkpoint_by_its_hash(s3_run: Run,
                                                             checkpoint: Path) -> None:
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    con = duckdb_for(s3_run.root, s3_run.options)
    for table in ("windows", "recordings", "errors"):
        got = con.sql(f"SELECT DISTINCT weights_sha256 FROM read_parquet("
                      f"'{s3_run.root}/{table}/**/*.parquet')").fetchall()
        assert got == [(digest,)], table
    files = con.sql(f"SELECT DISTINCT filename FROM read_parquet("
                    f"'{s3_run.root}/windows/**/*.parquet', filename = true)").fetchall()
    fs, _ = storage.url_to_fs(s3_run.root, s3_run.options)
    assert files
    for (name,) in files:
        with fs.open(name.removeprefix("s3://")) as fh:
            meta = json.loads(pq.read_schema(fh).metadata[PROVENANCE_KEY])
        assert meta["weights_sha256"] == meta["variant_spec"]["weights_sha256"] == digest


def test_s3_committed_files_only_with_duckdb(s3_run: Run) -> None:
    """The query README shows: read exactly the files the commit markers list."""
    con = duckdb_for(s3_run.root, s3_run.options)
    con.sql(f"""
        SET VARIABLE committed = (
            SELECT list(f.path)
            FROM (SELECT unnest(files.windows) AS f
                  FROM read_json('{s3_run.root}/_commits/*/*/*.json')))""")
    strict = con.sql("SELECT count(*), count(DISTINCT recording_id) FROM read_parquet("
                     "getvariable('committed'), hive_partitioning = true)").fetchall()[0]
    by_filter = con.sql(f"""
        SELECT count(*) FROM read_parquet('{s3_run.root}/windows/**/*.parquet',
                                          hive_partitioning = true, filename = true)
        WHERE filename IN (SELECT f.path
                           FROM (SELECT unnest(files.windows) AS f
                                 FROM read_json('{s3_run.root}/_commits/*/*/*.json')))"""
                        ).fetchall()[0]
    markers = con.sql("SELECT sum(counts.windows) FROM "
                      f"read_json('{s3_run.root}/_commits/*/*/*.json')").fetchall()[0]
    everything = con.sql("SELECT count(*) FROM "
                         f"read_parquet('{s3_run.root}/windows/**/*.parquet')").fetchall()[0]
    windows = len(s3_run.rows().windows)
    assert strict[0] == by_filter[0] == everything[0] == windows
    assert markers[0] * 2 == windows  # the marker counts windows; the table has 2 layers
    assert strict[1] == len(ARCHIVE_FILES) - 1


def test_gcs_bucket_to_bucket_matches_local(gcs_run: Run, local_run: Run) -> None:
    assert gcs_run.summary is not None
    assert (gcs_run.summary.embedded, gcs_run.summary.failed) == (len(ARCHIVE_FILES) - 1, 1)
    via_arrow = gcs_run.rows()
    via_duckdb = read_with_duckdb(gcs_run.root, gcs_run.options, gcs_run.prefixes)
    assert_same_rows(via_duckdb, via_arrow, exact=True)
    worst = assert_same_rows(via_arrow, local_run.rows())
    print(f"\nGCS vs local: max |embedding difference| {worst:.2e}")
    assert all(v.startswith("generation=") for v in via_arrow.versions.values())
    fs, path = storage.url_to_fs(gcs_run.root, gcs_run.options)
    assert fs.exists(f"{path}/_jobs/gcs.json")
    assert not fs.exists(f"{path}/_staging/model=beats")  # committed shards leave no staging


def test_manifest_of_https_and_s3_uris(moto: ServerProcess, s3_archive: str, checkpoint: Path,
                                       local_run: Run, ray_session: None) -> None:
    """A manifest in a bucket mixing http(s):// URLs (a public object and a pre-signed one)
    with relative (s3) entries, storage options keyed by protocol; a missing URL becomes an
    error row; the pre-signed URL is known without its signing parameters, and its signature
    appears nowhere."""
    options = {"s3": s3_opts(moto.url), "https": {}}  # http(s) reads anonymously
    fs, _ = storage.url_to_fs(f"s3://{IN_BUCKET}", options)
    public = "perch/chirp/tests/testdata/21100_36_48.flac"
    signed = "perch/chirp/projects/agile_bioacoustics/fish_audio_queries/Pulse purr.wav"
    in_s3 = "pykanto/pykanto/data/raw/STORM-PETREL/XC663885.wav"
    http_base = f"{moto.url}/{IN_BUCKET}/archive"
    fs.chmod(f"{IN_BUCKET}/archive/{public}", acl="public-read")
    signed_url = fs.sign(f"{IN_BUCKET}/archive/{signed}", expiration=3600)
    signature = urllib.parse.parse_qs(urllib.parse.urlsplit(signed_url).query)["Signature"][0]
    # Signed for an object that is not there: the error message quotes the URL.
    gone_url = fs.sign(f"{IN_BUCKET}/archive/no/such/signed.wav", expiration=3600)
    gone_signature = urllib.parse.parse_qs(urllib.parse.urlsplit(gone_url).query)["Signature"][0]
    manifest = [("uri", "site"), (f"{http_base}/{urllib.parse.quote(public)}", "site-public"),
                (signed_url, "site-signed"), (f"archive/{in_s3}", "site-relative"),
                (f"{http_base}/no/such/file.wav", "site-missing"), (gone_url, "site-gone")]
    fs.pipe(f"{IN_BUCKET}/manifest-http.csv",
            "".join(f"{uri},{site}\n" for uri, site in manifest).encode())
    root = f"s3://{OUT_BUCKET}/manifest"
    summary = run_job(job_config(None, root, checkpoint, "manifest", options, options,
                                 input={"manifest": f"s3://{IN_BUCKET}/manifest-http.csv"}))
    got = read_with_pyarrow(root, options, (http_base, s3_archive))
    assert got.errors.pop("no/such/file.wav")[0] == "FileNotFoundError"
    gone = [k for k in got.errors if k.startswith("no/such/signed.wav")]
    assert len(gone) == 1 and got.errors.pop(gone[0])[0] == "FileNotFoundError"
    assert (summary.embedded, summary.failed) == (3, 2), got.errors
    keep = {public, signed, in_s3}
    local = local_run.rows()
    assert_same_rows(got, Rows({k: v for k, v in local.windows.items() if k[0] in keep},
                               {k: v for k, v in local.recordings.items() if k[0] in keep},
                               {}, {}, {}))
    recordings = pads.dataset(f"{OUT_BUCKET}/manifest/recordings", filesystem=fs,
                              format="parquet", partitioning="hive").to_table().to_pylist()
    sites = {(r["source_uri"].split("://")[0], r["site"]) for r in recordings}
    assert sites == {("http", "site-public"), ("http", "site-signed"), ("s3", "site-relative")}
    # Known by the URL without its signing parameters: a manifest signed again resumes.
    shown = {r["source_uri"] for r in recordings if r["site"] == "site-signed"}
    assert shown == {signed_url.partition("?")[0]}
    for path in storage.list_files(fs, f"{OUT_BUCKET}/manifest"):
        data = storage.read_bytes(fs, path)
        for secret in (signature, gone_signature):
            for text in (secret, urllib.parse.quote(secret, safe="")):
                assert text.encode() not in data, path
            if path.endswith(".parquet"):
                assert secret not in json.dumps(pq.read_table(pa.BufferReader(data)).to_pylist(),
                                                default=str), path


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_an_object_rewritten_by_another_client_is_seen_by_the_next_listing_in_process(
        store: str, moto: ServerProcess, gcs: ServerProcess, real_data: Path) -> None:
    """s3fs and gcsfs answer ``info()`` from a cached listing of the parent folder: a job run
    after another in the same process (a notebook, a service) must still see an object that
    a third party rewrote meanwhile as a new version, whether it is named as ``input.uri``
    or by a manifest row (else it is neither embedded again nor replaced)."""
    import fsspec

    from pipeline.config import InputConfig
    from pipeline.sources import list_sources

    options = s3_opts(moto.url) if store == "s3" else gcs_options(gcs.url)
    bucket = "rewritten-between-runs"
    other = fsspec.filesystem(store, skip_instance_cache=True, **options)  # another writer
    other.mkdir(bucket)
    clips = real_data / "opensoundscape/tests/audio"
    other.pipe_file(f"{bucket}/in/a.wav", (clips / "LOCA_2021_09_24_652_3.wav").read_bytes())
    other.pipe_file(f"{bucket}/m.csv", f"uri\n{store}://{bucket}/in/a.wav\n".encode())

    def version(**given: Any) -> str:
        cfg = InputConfig(storage_options=dict(options), **given)
        (item,) = list_sources(cfg).items
        return item.version

    before = version(uri=f"{store}://{bucket}/in")  # lists the folder: caches its entries
    # ...which the job drops once it has its items: ~1 KB an object, for the whole run.
    assert not storage.url_to_fs(f"{store}://{bucket}/in", options)[0].dircache
    other.pipe_file(f"{bucket}/in/a.wav", (clips / "LOCA_2021_09_24_652_4.wav").read_bytes())
    info = other.info(f"{bucket}/in/a.wav")
    now = f"ETag={info['ETag'].strip(chr(34))}" if store == "s3" else f"generation={info['generation']}"
    assert now != before
    assert version(uri=f"{store}://{bucket}/in/a.wav") == now
    assert version(manifest=f"{store}://{bucket}/m.csv") == now


def test_an_output_bucket_that_is_not_there_is_refused_before_the_listing(
        moto: ServerProcess, s3_archive: str, checkpoint: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in the output bucket is a refusal naming ``output.uri`` (exit 2), found by
    the job's first write, before a listing that may take hours."""
    from pipeline import job as job_mod
    from pipeline.errors import ConfigError

    def no_listing(*_: object) -> None:
        raise AssertionError("listed the input before trying the output")

    monkeypatch.setattr(job_mod, "list_sources", no_listing)
    options = s3_opts(moto.url)
    raw = job_config(s3_archive, "s3://no-such-bucket/out", checkpoint, "no-bucket", options,
                     options)
    with pytest.raises(ConfigError, match="cannot write to s3://no-such-bucket/out: "
                                          "FileNotFoundError") as err:
        EmbeddingJob(JobConfig.from_dict(raw)).prepare()
    assert err.value.field == "output.uri"


def test_a_manifest_of_an_outputs_own_rows_is_embedded_without_a_lookup(
        moto: ServerProcess, checkpoint: Path, s3_run: Run, ray_session: None) -> None:
    """Embedding an archive again from an earlier output's rows (source_uri, source_version,
    source_bytes of its recordings and errors tables): the manifest names each object's version, so the driver sends no request
    per object (a manifest of bare URIs sends a HEAD each), the recordings keep the ids the
    listing gave them, and the rows are the listing run's. An object gone since fails when
    it is read: an error row, and the job goes on."""
    fs, _ = storage.url_to_fs(f"s3://{OUT_BUCKET}", s3_run.options)
    rows = sorted({(r["source_uri"], r["source_version"], r["source_bytes"])
                   for table in ("recordings", "errors")
                   for r in pads.dataset(f"{OUT_BUCKET}/s3/{table}", filesystem=fs,
                                         format="parquet", partitioning="hive").to_table(
                       columns=["source_uri", "source_version", "source_bytes"]).to_pylist()})
    gone = f"{s3_run.prefixes[0]}/gone/since.wav"
    rows.append((gone, "ETag=0123456789abcdef", 4096))
    manifest = pa.table({name: list(column) for name, column in zip(
        ("uri", "source_version", "source_bytes"), zip(*rows, strict=True), strict=True)})
    sink = pa.BufferOutputStream()
    pq.write_table(manifest, sink)
    fs.pipe(f"{IN_BUCKET}/given.parquet", sink.getvalue().to_pybytes())
    heads = {}
    for name, uri in (("given", f"s3://{IN_BUCKET}/given.parquet"),
                      ("bare", f"s3://{IN_BUCKET}/bare.csv")):
        if name == "bare":
            fs.pipe(f"{IN_BUCKET}/bare.csv", "".join(
                f"{u}\n" for u in ["uri", *manifest.column("uri").to_pylist()]).encode())
        with running(FaultProxy(moto.port, fault_rate=0.0, fail_first=False)) as proxy:
            summary = run_job(job_config(None, f"s3://{OUT_BUCKET}/{name}", checkpoint, name,
                                         s3_opts(proxy.url), s3_run.options,
                                         input={"manifest": uri}))
            heads[name] = proxy.stats().requests["head"]
        got = read_with_pyarrow(f"s3://{OUT_BUCKET}/{name}", s3_run.options, s3_run.prefixes)
        assert got.errors.pop("gone/since.wav")[0] == "FileNotFoundError"
        assert (summary.embedded, summary.failed) == (s3_run.summary.embedded,
                                                      s3_run.summary.failed + 1)
        assert got.ids == s3_run.rows().ids | {"gone/since.wav": got.ids["gone/since.wav"]}
        assert_same_rows(got, s3_run.rows())
    # One HEAD an object fewer; the one left reads the manifest itself.
    assert heads["bare"] - heads["given"] == len(rows) and heads["given"] <= 1, heads


# --------------------------------------------------------------------------- 2. faults


def test_transient_faults_are_retried_and_results_identical(fault_run: CliRun, s3_run: Run,
                                                            local_run: Run) -> None:
    process, stats = fault_run.process, fault_run.faults
    assert process.returncode == EXIT_SOME_FAILED, process.stderr[-4000:]
    got = fault_run.run.rows()
    want = s3_run.rows()
    assert got.ids == want.ids  # same objects, same versions: the same recording ids
    worst = assert_same_rows(got, want)
    assert_same_rows(got, local_run.rows())
    by_category = stats.faults_by_category()
    injected = sum(by_category.values())
    requests = sum(stats.requests.values())
    print(f"\nfault proxy: {injected} faults in {requests} requests ({injected / requests:.0%}); "
          f"by category {by_category}; by kind {stats.faults_by_kind()}; requests "
          f"{dict(stats.requests)}; faulted requests answered on a retry "
          f"{dict(stats.recovered)}; max |embedding difference| vs fault-free {worst:.2e}")
    for category in ("list", "range_read", "write"):
        assert by_category.get(category, 0) >= 1, (category, by_category)
    assert set(stats.faults_by_kind()) == set(FAULT_KINDS)
    assert 0.1 <= injected / requests <= 0.4
    # Every request that failed was sent again and answered, except deletes whose objects
    # were gone by the time of the retry (a retried delete lists first: nothing to resend).
    assert {category for category, _, _ in stats.unrecovered} <= {"delete"}, stats.unrecovered
    assert sum(stats.recovered.values()) >= 1


def test_storage_layer_retries_when_the_client_does_not(
        moto: ServerProcess, s3_buckets: Any, caplog: pytest.LogCaptureFixture) -> None:
    """pipeline.storage's own retries cover writes, listing, range reads, moves, copies and
    deletes even with botocore's retries off (``total_max_attempts: 1``): only s3fs's few
    built-in retries (SlowDown, dropped connections) remain below it."""
    rng = np.random.default_rng(5)
    with running(FaultProxy(moto.port, fault_rate=0.25, seed=99)) as proxy:
        options = {**s3_opts(proxy.url),
                   "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}
        fs, _ = storage.url_to_fs(f"s3://{OUT_BUCKET}", options)
        base = f"{OUT_BUCKET}/retry-layer"
        payloads = {f"{base}/in/{i}.bin": rng.bytes(10_000 + 997 * i) for i in range(4)}
        with caplog.at_level("WARNING", logger="pipeline.storage"):
            for path, data in payloads.items():
                storage.write_bytes(fs, path, data)
            assert storage.list_files(fs, f"{base}/in") == sorted(payloads)
            for path, data in payloads.items():
                assert storage.exists(fs, path)
                reader = storage.RangeReader(fs, path, block_bytes=4096)
                assert reader.read() == data and reader.bytes_fetched == len(data)
                assert storage.read_bytes(fs, path) == data
            for path in payloads:
                storage.move(fs, path, path.replace("/in/", "/out/"))
            assert storage.list_files(fs, f"{base}/in") == []
            assert len(storage.list_files(fs, f"{base}/out")) == len(payloads)
            for path, data in payloads.items():
                storage.copy(fs, path.replace("/in/", "/out/"), path.replace("/in/", "/copy/"))
                assert storage.read_bytes(fs, path.replace("/in/", "/copy/")) == data
            storage.remove_tree(fs, f"{base}/out")
            storage.remove_tree(fs, f"{base}/copy")
            assert not storage.exists(fs, f"{base}/out/0.bin")
        stats = proxy.stats()
    retried = [r.getMessage() for r in caplog.records if "transient" in r.getMessage()]
    by_category = stats.faults_by_category()
    print(f"\nstorage layer, client retries off: {sum(by_category.values())} faults in "
          f"{sum(stats.requests.values())} requests {by_category}; pipeline.storage retried "
          f"{len(retried)} times")
    for category in ("list", "range_read", "write", "head", "copy", "delete"):
        assert by_category.get(category, 0) >= 1, (category, by_category)
    assert retried  # our layer, not only the client's, did retry
    assert {category for category, _, _ in stats.unrecovered} <= {"delete"}, stats.unrecovered


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_a_carve_on_a_bucket_copies_the_files_it_keeps_whole_server_side(
        store: str, request: pytest.FixtureRequest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard reopened for one retry, on a bucket: the file holding only rows kept is
    copied by the store (``storage.copy``), byte for byte, never downloaded; only the file
    mixing rows kept and redone is read whole and filtered. Its recording ids are read by
    range requests (the footer and that column)."""
    from pipeline import layout as layout_mod
    from tests.conftest import write_tone

    server = request.getfixturevalue("moto" if store == "s3" else "gcs")
    options = s3_opts(server.url) if store == "s3" else gcs_options(server.url)
    bucket = "carve-out"
    fs, _ = storage.url_to_fs(f"{store}://{bucket}", options)
    fs.mkdir(bucket)
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        write_tone(src / f"{name}.wav", 1.0, 16_000, seed=ord(name))
    raw = job_dict(str(src), f"{store}://{bucket}/out", output={"storage_options": options},
                   run={"progress": False})

    def prepared() -> EmbeddingJob:
        made = EmbeddingJob(JobConfig.from_dict(raw))
        made.prepare()
        made._lease.release()
        return made

    first = prepared()
    a, b = (i.recording_id for i in first.todo)
    lay, source = first.layout, "d" * 16
    files: dict[str, list[dict[str, Any]]] = {}
    sent: dict[str, bytes] = {}
    for table, rids in (("windows", [b, b]), ("windows", [a, b]), ("errors", [a])):
        path = lay.shard_file(table, source, len(files.get(table, [])))
        rows = pa.table({"recording_id": rids, "job_id": ["first"] * len(rids)})
        buffer = pa.BufferOutputStream()
        pq.write_table(rows.replace_schema_metadata({"provenance": path}), buffer,
                       compression="none", row_group_size=1)
        sent[path] = buffer.getvalue().to_pybytes()
        storage.write_bytes(fs, path, sent[path])
        files.setdefault(table, []).append({"path": lay.uri(path), "rows": len(rids)})
    layout_mod.write_json(fs, lay.commit_path(source), {
        "shard": source, "files": files,
        "recordings": [{"recording_id": a, "outcome": "error", "error_type": "StorageError",
                        "retry": True}, {"recording_id": b, "outcome": "ok"}]})
    read_whole: list[str] = []
    read_bytes = storage.read_bytes

    def spy(fs: Any, path: str) -> bytes:
        read_whole.append(path)
        return read_bytes(fs, path)

    monkeypatch.setattr(storage, "read_bytes", spy)
    again = prepared()
    assert [i.recording_id for i in again.todo] == [a]
    whole, mixed, _ = sent
    assert [p for p in read_whole if p.endswith(".parquet")] == [mixed]
    carved_id = layout_mod.carved_shard_id(source, {b})
    carved = layout_mod.read_json(fs, lay.commit_path(carved_id))
    assert {t: [e["rows"] for e in entries] for t, entries in carved["files"].items()} == {
        "windows": [2, 1]}
    assert fs.cat_file(lay.shard_file("windows", carved_id, 0)) == sent[whole]
    filtered = pq.ParquetFile(pa.BufferReader(fs.cat_file(lay.shard_file("windows", carved_id,
                                                                          1)))).read()
    assert filtered.column("recording_id").to_pylist() == [b]
    assert filtered.schema.metadata == {b"provenance": mixed.encode()}
    fs.invalidate_cache()
    assert not any(storage.exists(fs, p) for p in sent)  # the reopened shard's: recovered
    assert not storage.exists(fs, lay.commit_path(source))


def test_job_survives_faults_without_client_retries(s3_archive: str, moto: ServerProcess,
                                                    checkpoint: Path, s3_run: Run,
                                                    ray_session: None) -> None:
    """The whole job through the fault proxy with botocore's retries off: every call the
    job makes must be retried by pipeline.storage itself."""
    with running(FaultProxy(moto.port, fault_rate=0.2, seed=4242)) as proxy:
        options = {**s3_opts(proxy.url),
                   "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}
        root = f"s3://{OUT_BUCKET}/no-client-retries"
        try:
            run_job(job_config(s3_archive, root, checkpoint, "no-client-retries", options,
                               options))
        except StorageError as err:  # retries ran out: a real failure, never the known gap
            raise AssertionError(f"pipeline.storage gave up: {err}") from err
        stats = proxy.stats()
    assert_same_rows(read_with_pyarrow(root, s3_run.options, s3_run.prefixes), s3_run.rows())
    assert {"list", "range_read", "write"} <= set(stats.faults_by_category())


def test_a_recording_an_outage_kept_out_is_embedded_by_the_next_run(
        s3_archive: str, moto: ServerProcess, checkpoint: Path, s3_run: Run,
        ray_session: None) -> None:
    """Every range read of one object fails until the storage retries give up: the run
    commits it as a StorageError. The next run, the outage over, reopens that shard and
    embeds it: the tables then equal a fault-free run's, the error row gone, nothing twice."""
    victim = "21100_36_48.flac"
    with running(FaultProxy(moto.port, fault_rate=0.0, fail_first=False)) as proxy:
        proxy.outage = victim
        options = {**s3_opts(proxy.url),
                   "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}
        root = f"s3://{OUT_BUCKET}/outage"
        first = run_job(job_config(s3_archive, root, checkpoint, "outage-1", options, options))
        during = read_with_pyarrow(root, s3_run.options, s3_run.prefixes)
        shown = render(load_catalog(root, s3_run.options))
        proxy.outage = None
        second = run_job(job_config(s3_archive, root, checkpoint, "outage-2", options, options))
    lost = f"perch/chirp/tests/testdata/{victim}"
    assert during.errors[lost][0] == "StorageError" and first.failed == 2
    assert ("1 recordings failed or stopped on errors not their own (storage, memory, a "
            "worker's environment; 1 of them in 1 run): the next run embeds them again "
            "while fewer than run.max_attempts runs met them") in shown
    # Only the victim is redone; its shard's other recordings keep their rows (carved out),
    # the empty file's error row with them.
    assert (second.recordings_already_done, second.embedded, second.failed) == (
        len(ARCHIVE_FILES) - 1, 1, 0)
    # Files were rewritten under names this process's client has seen: it must forget the
    # ETags it cached while reading the first run's.
    storage.url_to_fs(root, s3_run.options)[0].invalidate_cache()
    after = read_with_pyarrow(root, s3_run.options, s3_run.prefixes)
    assert_same_rows(after, s3_run.rows())  # errors: only the empty file's, as fault-free
    con = duckdb_for(root, s3_run.options)
    rows, distinct = con.sql(
        f"SELECT count(*), count(DISTINCT (recording_id, channel, window_index, layer)) "
        f"FROM read_parquet('{root}/windows/**/*.parquet')").fetchall()[0]
    assert rows == distinct


def test_an_archived_object_is_its_own_settled_error_until_restored(
        s3_buckets: Any, moto: ServerProcess, checkpoint: Path, real_data: Path,
        ray_session: None) -> None:
    """An object in GLACIER, not restored: moto answers its GET with InvalidObjectState
    (a 403, which s3fs raises as PermissionError), as S3 does, while HEAD and the listing
    see it. It is an ``ArchivedObject`` error row saying to restore it, not a refusal of
    the credentials, and the other recordings are embedded. A rerun before the restore
    reopens nothing (settled, not transient); the rerun after it embeds that one alone."""
    fs = s3_buckets
    files = {rel: real_data / rel for rel in ARCHIVE_FILES[:3]}
    cold = ARCHIVE_FILES[1]
    for rel, local in files.items():
        fs.call_s3("put_object", Bucket=IN_BUCKET, Key=f"glacier/{rel}", Body=local.read_bytes(),
                   **({"StorageClass": "GLACIER"} if rel == cold else {}))
    archive, root = f"s3://{IN_BUCKET}/glacier", f"s3://{OUT_BUCKET}/glacier"
    options = s3_opts(moto.url)

    def run(name: str) -> JobSummary:
        summary = run_job(job_config(archive, root, checkpoint, name, options, options))
        storage.url_to_fs(root, options)[0].invalidate_cache()  # files rewritten under names
        return summary

    first = run("glacier-1")
    rows = read_with_pyarrow(root, options, (archive,))
    error_type, message = rows.errors[cold]
    assert error_type == "ArchivedObject"
    assert f"{archive}/{cold} is in GLACIER, not restored" in message
    assert (f"aws s3api restore-object --bucket {IN_BUCKET} --key glacier/{cold} "
            "--restore-request Days=7") in message
    assert "credentials" not in message
    assert {rec for rec, _, _ in rows.recordings} == set(files) - {cold}
    assert (first.embedded, first.failed, first.exit_code) == (2, 1, EXIT_SOME_FAILED)

    second = run("glacier-2")  # still archived: settled, its shard not reopened
    assert (second.recordings_already_done, second.embedded, second.failed) == (3, 0, 0)
    assert read_with_pyarrow(root, options, (archive,)).errors == rows.errors

    fs.call_s3("restore_object", Bucket=IN_BUCKET, Key=f"glacier/{cold}",
               RestoreRequest={"Days": 1})
    third = run("glacier-3")  # restored: the same object (ETag), embedded now
    assert (third.recordings_already_done, third.embedded, third.failed) == (2, 1, 0)
    out_fs, out_path = storage.url_to_fs(root, options)
    assert not out_fs.find(f"{out_path}/errors")  # its error row gone, with its shard
    recordings = pads.dataset(f"{out_path}/recordings", filesystem=out_fs, format="parquet",
                              partitioning="hive").to_table().to_pylist()
    assert {relative(r["source_uri"], (archive,)): r["recording_id"] for r in recordings} == (
        rows.ids)


def test_a_recording_decoded_apart_reads_its_bucket_as_the_worker_does(
        s3_buckets: Any, moto: ServerProcess, real_data: Path) -> None:
    """The retry of a task whose worker died decodes the recording in a process of its own
    (pipeline.quarantine): the endpoint and credentials of input.storage_options reach it,
    its windows are the worker's, and so is each error row, an archived object's included
    (its PermissionError says "archived" only by its cause, which must cross the pipe)."""
    from pipeline.audio import DecodeSettings
    from pipeline.stages import DecodeSpec, decode_recording

    fs = s3_buckets
    local = real_data / ARCHIVE_FILES[0]
    for key, storage_class in (("apart/ok.wav", "STANDARD"), ("apart/cold.wav", "GLACIER")):
        fs.call_s3("put_object", Bucket=IN_BUCKET, Key=key, Body=local.read_bytes(),
                   StorageClass=storage_class)
    spec = DecodeSpec(DecodeSettings(16_000), window_samples=16_000, hop_samples=8_000,
                      tail="pad", min_tail_samples=400, batch_windows=8,
                      storage_options=s3_opts(moto.url))

    def decoded(name: str, deaths: int) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
        path = f"{IN_BUCKET}/apart/{name}"
        rows = list(decode_recording("r", f"s3://{path}", path, local.stat().st_size, "",
                                     spec, deaths))
        report = json.loads(rows[-1]["meta"][-1])
        report.pop("decode_s")
        return rows, report

    kinds = {}
    for name in ("ok.wav", "cold.wav", "gone.wav"):
        (in_worker, want), (apart, got) = decoded(name, 0), decoded(name, 1)
        assert got == want, name
        for key in ("audio", "window_index", "channel"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in apart]),
                                          np.concatenate([b[key] for b in in_worker]))
        kinds[name] = got.get("error_type", got["status"])
    assert kinds == {"ok.wav": "ok", "cold.wav": "ArchivedObject",
                     "gone.wav": "FileNotFoundError"}


def test_the_driver_commits_shards_side_by_side_on_a_slow_bucket(
        s3_archive: str, moto: ServerProcess, checkpoint: Path, s3_run: Run,
        ray_session: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit is a dozen requests or more on a bucket (files, copies, deletes, the marker,
    lease reads); one shard at a time, 50 ms a request would cap a job at a shard or two a
    second. With a shard per recording, the publishing copies of several shards are under
    way at once (one shard copies its files one after another), and the tables are a
    fault-free run's.

    Whether two shards are complete at once is the pipeline's timing (on a loaded machine
    they came one by one, each commit done before the next shard was): the first two shards
    to publish wait for each other, which only commits on threads of their own can do (one
    at a time, the first would wait out the barrier's timeout and fail)."""
    import itertools
    import threading

    import pipeline.commit

    two_met, publishing = threading.Barrier(2, timeout=120), itertools.count()
    real_fault_point = pipeline.commit.fault_point

    def fault_point(name: str) -> None:
        if name == "before_publish" and next(publishing) < 2:
            two_met.wait()
        real_fault_point(name)

    monkeypatch.setattr(pipeline.commit, "fault_point", fault_point)
    with running(FaultProxy(moto.port, fault_rate=0.0, fail_first=False)) as proxy:
        proxy.latency_s = 0.05
        options = s3_opts(proxy.url)
        root = f"s3://{OUT_BUCKET}/slow"
        raw = job_config(s3_archive, root, checkpoint, "slow", options, options)
        raw["run"]["shard_size"] = 1
        summary = run_job(raw)
        stats = proxy.stats()
    assert summary.shards == len(ARCHIVE_FILES) and stats.requests["copy"] >= summary.shards
    assert stats.most_at_once["copy"] >= 2
    assert_same_rows(read_with_pyarrow(root, s3_run.options, s3_run.prefixes), s3_run.rows())


def test_a_rerun_reads_the_markers_of_a_slow_bucket_many_at_a_time(moto: ServerProcess) -> None:
    """A rerun reads every commit marker of its namespace, a request each (40,000 for 10M
    recordings in shards of 256): ``layout.MARKER_READS`` are under way at once, not the 10
    of botocore's default connection pool, which every thread of the process shared."""
    from pipeline import layout

    markers = 96
    with running(FaultProxy(moto.port, fault_rate=0.0, fail_first=False)) as proxy:
        proxy.latency_s = 0.2
        options = s3_opts(proxy.url)
        lay = layout.OutputLayout("s3://many-markers/out", "m", "v", options)
        fs = lay.fs
        fs.mkdir("many-markers")
        fs.pipe({lay.commit_path(f"{k:016x}"): layout.json_bytes(
                     {"shard": f"{k:016x}", "recordings": [
                         {"recording_id": f"r{k}", "source_uri": f"s3://a/{k}.wav",
                          "outcome": "ok"}]})
                 for k in range(markers)})
        proxy.reset()
        read = layout.committed_shards(lay)
        stats = proxy.stats()
    assert len(read) == markers and stats.requests["get"] == markers
    assert stats.most_at_once["get"] > 32


# --------------------------------------------------------------------------- 3. long recordings


def _write_looped_flac(path: Path, seconds: float, clips: list[np.ndarray], rate: int) -> None:
    loop = np.concatenate(clips)
    frames = int(seconds * rate)
    with sf.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as out:
        written = 0
        while written < frames:
            n = min(len(loop), frames - written)
            out.write(loop[:n])
            written += n


@pytest.fixture(scope="module")
def long_recordings(workdir: Path, moto: ServerProcess, s3_archive: str,
                    real_data: Path) -> dict[str, tuple[str, int]]:
    """A 1-minute and a 30-minute FLAC (22.05 kHz) looped from real clips, in the bucket."""
    clips = []
    for rel in LONG_CLIPS:
        audio, rate = sf.read(real_data / rel, dtype="int16")
        assert rate == 22_050 and audio.ndim == 1, rel
        clips.append(audio)
    fs, _ = storage.url_to_fs(f"s3://{IN_BUCKET}", s3_opts(moto.url))
    out: dict[str, tuple[str, int]] = {}
    for name, seconds in (("one_minute", 60.0), ("thirty_minutes", 1800.0)):
        local = workdir / f"{name}.flac"
        _write_looped_flac(local, seconds, clips, 22_050)
        fs.put_file(str(local), f"{IN_BUCKET}/long/{name}.flac")
        out[name] = (f"s3://{IN_BUCKET}/long/{name}.flac", local.stat().st_size)
        local.unlink()
    return out


def _decode_probe(uri: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Decode one recording in a fresh process (see storage_servers.decode_probe)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.storage_servers", "decode-probe", uri,
         json.dumps(options)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_long_recording_decode_reads_once_in_bounded_memory(
        long_recordings: dict[str, tuple[str, int]], counting_proxy: FaultProxy) -> None:
    """The decode stage alone, in a fresh process per recording: bytes fetched from S3
    (counted at the proxy) and peak RSS for a 1-minute and a 30-minute FLAC."""
    options = s3_opts(counting_proxy.url)
    probes: dict[str, dict[str, Any]] = {}
    for name, (uri, size) in long_recordings.items():
        counting_proxy.reset()
        probe = _decode_probe(uri, options)
        stats = counting_proxy.stats()
        key = "/" + uri.removeprefix("s3://")
        probe["proxy_bytes"], probe["proxy_gets"] = stats.body_bytes[key], stats.gets[key]
        probes[name] = probe
        assert probe["report"]["status"] == "ok"
        assert probe["report"]["bytes_read"] == probe["proxy_bytes"]
        assert size <= probe["proxy_bytes"] <= 1.1 * size, (name, probe["proxy_bytes"], size)
        assert probe["peak_reset"], "cannot reset the peak RSS (/proc/self/clear_refs)"
    short, long = probes["one_minute"], probes["thirty_minutes"]
    assert (short["windows"], long["windows"]) == (59, 1799)
    for label, p in (("1 min ", short), ("30 min", long)):
        print(f"\n{label}: {p['size_bytes']:>9} bytes, fetched {p['proxy_bytes']} in "
              f"{p['proxy_gets']} GETs; decode peak RSS {p['decode_peak_rss_kib'] / MIB:.1f} MiB "
              f"(RSS before {p['rss_before_kib'] / MIB:.1f} MiB); process ru_maxrss "
              f"{p['ru_maxrss_kib'] / MIB:.1f} MiB; decode {p['decode_s']} s", end="")
    print()
    assert long["decode_peak_rss_kib"] <= 1.2 * short["decode_peak_rss_kib"] + 16 * MIB
    assert long["ru_maxrss_kib"] <= 1.2 * short["ru_maxrss_kib"] + 16 * MIB


@dataclass(frozen=True)
class LongJob:
    """The job run on the long recordings through the counting proxy."""

    summary: JobSummary
    stats: ProxyStats
    sizes: dict[str, int]  # object path at the proxy -> size
    decode_peaks: dict[str, dict[str, Any]]  # recording name -> decode worker RSS record


@pytest.fixture(scope="module")
def long_job(long_recordings: dict[str, tuple[str, int]], counting_proxy: FaultProxy,
             checkpoint: Path, workdir: Path, ray_session: None) -> Iterator[LongJob]:
    """Run the real job on both long recordings, its decode UDF wrapped to record the
    decode worker's peak RSS (the wrapper is shipped to workers by value)."""
    import ray.cloudpickle

    import pipeline.job
    import tests.integration.storage_servers as servers

    peaks_dir = workdir / "decode-peaks"
    peaks_dir.mkdir()
    options = s3_opts(counting_proxy.url)
    ray.cloudpickle.register_pickle_by_value(servers)
    try:
        counting_proxy.reset()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pipeline.job, "decode_batch",
                          functools.partial(peak_rss_decode_batch, out_dir=str(peaks_dir)))
            summary = run_job(job_config(f"s3://{IN_BUCKET}/long", f"s3://{OUT_BUCKET}/long",
                                         checkpoint, "long", options, options))
        stats = counting_proxy.stats()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(servers)
    by_uri = {uri: name for name, (uri, _) in long_recordings.items()}
    peaks = {}
    for path in peaks_dir.glob("*.json"):
        record = json.loads(path.read_text())
        peaks[by_uri[record["uri"]]] = record
    yield LongJob(summary, stats,
                  {"/" + uri.removeprefix("s3://"): size for uri, size in long_recordings.values()},
                  peaks)


def test_long_recording_job_fetches_each_object_once(long_job: LongJob) -> None:
    summary, stats = long_job.summary, long_job.stats
    assert (summary.embedded, summary.failed, summary.windows) == (2, 0, 59 + 1799)
    for key, size in long_job.sizes.items():
        assert size <= stats.body_bytes[key] <= 1.1 * size, (key, stats.body_bytes[key], size)
    assert sum(o.bytes_read for o in summary.shard_outcomes) == sum(
        stats.body_bytes[k] for k in long_job.sizes)
    print(f"\njob on both: fetched { {k: stats.body_bytes[k] for k in long_job.sizes} } "
          f"in { {k: stats.gets[k] for k in long_job.sizes} } GETs for sizes {long_job.sizes}")


def test_long_recording_job_decode_worker_memory_is_bounded(long_job: LongJob) -> None:
    peaks = long_job.decode_peaks
    grow = {name: (r["anon_peak_kib"] - r["anon_before_kib"]) / MIB for name, r in peaks.items()}
    print(f"\ndecode worker heap (RssAnon) growth in the job: 1 min {grow['one_minute']:.1f} MiB, "
          f"30 min {grow['thirty_minutes']:.1f} MiB; VmRSS peak (incl. object store pages) "
          f"1 min {peaks['one_minute']['rss_peak_kib'] / MIB:.1f} MiB, 30 min "
          f"{peaks['thirty_minutes']['rss_peak_kib'] / MIB:.1f} MiB")
    assert grow["thirty_minutes"] <= 1.2 * grow["one_minute"] + 16


# --------------------------------------------------------------------------- 4. secrets


def _scan_tree(fs: Any, root: str) -> dict[str, bool]:
    """``path -> secret found`` for every object under ``root`` (Parquet decoded too)."""
    found: dict[str, bool] = {}
    for path in storage.list_files(fs, root):
        data = storage.read_bytes(fs, path)
        hit = find_secret(data, SECRET)
        if path.endswith(".parquet"):
            parquet = pq.ParquetFile(pa.BufferReader(data))
            metadata = parquet.schema_arrow.metadata or {}
            text = json.dumps(parquet.read().to_pylist(), default=str)
            hit = hit or SECRET in text or any(find_secret(v, SECRET) for v in metadata.values())
        found[path] = hit
    return found


def _scan_files(directory: Path) -> dict[str, bool]:
    return {str(p): find_secret(p.read_bytes(), SECRET)
            for p in directory.rglob("*") if p.is_file() and not p.is_socket()}


def test_no_secret_in_outputs_logs_or_job_records(s3_run: Run, fault_run: CliRun,
                                                 moto: ServerProcess) -> None:
    # Positive control: the scan finds the secret where it legitimately is.
    assert find_secret(fault_run.config_path.read_bytes(), SECRET)
    fs, _ = storage.url_to_fs(f"s3://{OUT_BUCKET}", s3_opts(moto.url))
    outputs = {}
    for root in (s3_run.root, fault_run.run.root):
        outputs.update(_scan_tree(fs, storage.url_to_fs(root, s3_run.options)[1]))
    assert any(p.endswith(".parquet") for p in outputs) and any("/_jobs/" in p for p in outputs)
    assert not [p for p, hit in outputs.items() if hit]
    captured = fault_run.process.stdout + fault_run.process.stderr
    assert "job faults:" in captured  # the CLI's summary, i.e. we did capture the run
    assert SECRET not in captured
    ray_logs = _scan_files(fault_run.ray_dir)
    assert any("/logs/" in p for p in ray_logs)
    assert not [p for p, hit in ray_logs.items() if hit]
    import ray

    node = ray._private.worker._global_node  # the session the ray_session fixture started
    assert node is not None
    session = Path(node.get_session_dir_path()) / "logs"
    in_process = _scan_files(session)
    assert in_process and not [p for p, hit in in_process.items() if hit]
    # The job record keeps the options' shape, with the secret (and key) masked.
    job = json.loads(storage.read_bytes(fs, f"{OUT_BUCKET}/s3/_jobs/s3.json"))
    shown = job["config"]["input"]["storage_options"]
    assert shown["secret"] == shown["key"] == "***"
    assert shown["client_kwargs"]["endpoint_url"] == moto.url
    print(f"\nscanned {len(outputs)} output objects, {len(ray_logs)} + {len(in_process)} Ray log "
          f"files and {len(captured)} characters of CLI output: no secret")


# --------------------------------------------------------------------------- 5. inspect


def test_inspect_bucket_output(s3_run: Run, gcs_run: Run, local_run: Run, moto: ServerProcess,
                               workdir: Path) -> None:
    rows = s3_run.rows()
    args = [str(Path(sys.executable).parent / "embed-archive"), "inspect", s3_run.root,
            "--storage-option", f"key={ACCESS_KEY}", "--storage-option", f"secret={SECRET}",
            "--storage-option", f'client_kwargs={{"endpoint_url": "{moto.url}"}}']
    text = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=workdir,
                          check=False)
    assert text.returncode == 0, text.stderr[-3000:]
    out = text.stdout
    print("\n" + out)
    assert f"output: {s3_run.root}" in out
    assert "model=beats variant=" in out
    assert f"windows     {len(rows.windows):>10} rows in 1 files" in out
    assert f"recordings  {len(rows.recordings):>10} rows in 1 files" in out
    assert "errors               1 rows in 1 files" in out
    assert "errors by type: EmptyAudio 1" in out and EMPTY_FILE in out
    assert f"recordings {len(ARCHIVE_FILES)} (error 1, ok {len(ARCHIVE_FILES) - 1})" in out
    assert "s3  completed_with_errors" in out and f"input {s3_run.prefixes[0]}" in out
    assert "WARNING" not in out
    as_json = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120,
                             check=False, cwd=workdir)
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    catalog = json.loads(as_json.stdout)
    (ns,) = catalog["namespaces"]
    assert ns["rows"] == {"windows": len(rows.windows), "recordings": len(rows.recordings),
                          "errors": 1}
    assert [j["job_id"] for j in catalog["jobs"]] == ["s3"]
    assert SECRET not in out + as_json.stdout + text.stderr + as_json.stderr
    # The same catalogue from GCS and from the local run.
    for run in (gcs_run, local_run):
        cat = load_catalog(run.root, run.options)
        (other,) = cat.namespaces
        assert other.rows == ns["rows"] and other.error_types == {"EmptyAudio": 1}
        assert other.uncommitted_files == other.missing_files == 0
        assert "model=beats" in render(cat)


# --------------------------------------------------------------------------- storage helpers


def _client_error(status: int, code: str) -> Exception:
    """What botocore raises for an S3 error response."""
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _s3fs_error(status: int, code: str) -> Exception:
    """What s3fs raises for it (an OSError subclass, the ClientError as its cause)."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(status, code))


def _gcs_error(code: int) -> Exception:
    from gcsfs.retry import HttpError

    return HttpError({"code": code, "message": "from the emulator"})


def _payload_error() -> Exception:
    from aiohttp import ClientPayloadError

    return ClientPayloadError("Response payload is not completed")


def _cut_body_error() -> Exception:
    """A body cut short by a reset, as aiohttp raises it: its cause, the parser's
    ``ContentLengthError``, carries code 400, which no server sent."""
    from aiohttp import ClientPayloadError
    from aiohttp.http_exceptions import ContentLengthError

    try:
        try:
            raise ContentLengthError("Not enough data to satisfy content length header")
        except ContentLengthError as cause:
            raise ClientPayloadError("Response payload is not completed") from cause
    except ClientPayloadError as err:
        return err


def _no_credentials() -> Exception:
    from botocore.exceptions import NoCredentialsError

    return NoCredentialsError()


def _no_profile() -> Exception:
    from botocore.exceptions import ProfileNotFound

    return ProfileNotFound(profile="typo")


def _refresh(retryable: bool) -> Exception:
    from google.auth.exceptions import RefreshError

    return RefreshError("invalid_grant: Token has been expired or revoked.", retryable=retryable)


@pytest.mark.parametrize(("make", "transient"), [
    (lambda: _s3fs_error(503, "SlowDown"), True),           # OSError(EBUSY)
    (lambda: _s3fs_error(503, "ServiceUnavailable"), True),
    (lambda: _s3fs_error(500, "InternalError"), True),      # OSError(EREMOTEIO)
    (lambda: _s3fs_error(404, "NoSuchKey"), False),         # FileNotFoundError
    (lambda: _s3fs_error(403, "AccessDenied"), False),      # PermissionError
    (lambda: _s3fs_error(403, "InvalidObjectState"), False),  # PermissionError: archived
    (lambda: _s3fs_error(400, "InvalidArgument"), False),   # OSError(EINVAL)
    (lambda: _client_error(429, "TooManyRequests"), True),
    (lambda: _client_error(400, "BadDigest"), False),
    (lambda: _client_error(409, "ConditionalRequestConflict"), True),  # racing conditional puts
    (lambda: _client_error(409, "BucketNotEmpty"), False),
    (lambda: ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
    (lambda: OSError(errno.EBUSY, "Please reduce your request rate."), True),
    (_payload_error, True),
    (_cut_body_error, True),
    (_no_credentials, False),
    (_no_profile, False),
    (lambda: _refresh(False), False),
    (lambda: _refresh(True), True),
    (lambda: _gcs_error(503), True),
    (lambda: _gcs_error(429), True),
    (lambda: _gcs_error(408), True),  # request timeout: the server gave up waiting
    (lambda: _gcs_error(400), False),
], ids=["s3-slowdown", "s3-unavailable", "s3-internal", "s3-404", "s3-403", "s3-archived", "s3-400",
        "boto-429", "boto-400", "boto-409-conflict", "boto-409-other", "reset", "ebusy", "payload", "cut-body", "no-credentials", "no-profile",
        "gcs-refresh-revoked", "gcs-refresh-retryable", "gcs-503", "gcs-429", "gcs-408",
        "gcs-400"])
def test_storage_errors_are_classified(make: Any, transient: bool) -> None:
    assert storage.is_transient(make()) is transient


def _archived_error(storage_class: str, tier: str | None = None) -> Exception:
    """What s3fs raises for a GET of an object in an archive storage class, not restored."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    detail = {"Code": "InvalidObjectState", "StorageClass": storage_class,
              "Message": "The operation is not valid for the object's storage class"}
    if tier:
        detail["AccessTier"] = tier
    return translate_boto_error(ClientError(
        {"Error": detail, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject"))


def test_an_archived_object_is_no_refusal_of_the_credentials() -> None:
    """s3fs raises S3's InvalidObjectState as a PermissionError: it is an archived object,
    settled until restored, never "check the credentials" (nor a manifest's early stop,
    nor a retry), whichever archive class or Intelligent-Tiering tier says it."""
    from pipeline import sources, stages

    err = _archived_error("DEEP_ARCHIVE")
    assert isinstance(err, PermissionError)
    assert storage.archived(err) == "DEEP_ARCHIVE"
    assert not storage.access_refused(err) and not storage.is_transient(err)
    assert "credentials" not in storage.why(err) and "restore it first" in storage.why(err)
    assert storage.access_refused(_s3fs_error(403, "AccessDenied"))
    assert storage.archived(_s3fs_error(403, "AccessDenied")) is None

    tiered = _archived_error("INTELLIGENT_TIERING", "ARCHIVE_ACCESS")
    meta = stages._failure_meta(tiered, "s3://b/deep dir/x.wav")
    assert meta["error_type"] == "ArchivedObject" and not meta.get("transient")
    assert meta["message"].startswith(
        "s3://b/deep dir/x.wav is in INTELLIGENT_TIERING ARCHIVE_ACCESS, not restored")
    assert ("aws s3api restore-object --bucket b --key 'deep dir/x.wav' --restore-request "
            "'{}'") in meta["message"]

    item = sources._unreadable("s3://b/x.wav", "b/x.wav", 0, err)
    assert item.problem.startswith("ArchivedObject: s3://b/x.wav is in DEEP_ARCHIVE")
    sources._refuse_if_all_refused([item])  # every lookup archived: no ConfigError


def test_storage_options_by_protocol_and_http_uris() -> None:
    s3 = {"key": "k", "client_kwargs": {"endpoint_url": "http://x"}}
    mixed = {"s3": s3, "https": {"headers": {"X": "1"}}, "anon": False}
    assert storage.options_for("s3://b/k", mixed) == {"anon": False, **s3}
    assert storage.options_for("s3a://b/k", mixed) == {"anon": False, **s3}
    assert storage.options_for("http://h/a.wav", mixed) == {"anon": False, "headers": {"X": "1"}}
    assert storage.options_for("gs://b/k", mixed) == {"anon": False}
    assert storage.options_for("s3://b/k", s3) == s3  # plain options apply to every URI
    fs, path = storage.url_to_fs("https://example.org/a%20b.wav")
    assert storage.full_uri(fs, path) == "https://example.org/a%20b.wav"
    fs, path = storage.url_to_fs("s3://bucket/key.wav", {"anon": True})
    assert storage.full_uri(fs, path) == "s3://bucket/key.wav"
