"""Fetching weights: local, file://, fsspec URLs, the offline cache, failure messages."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import fsspec
import pytest
import torch

from pipeline.errors import WeightsUnavailableError
from pipeline.models import cache_weights, create_backbone, fetch_weights
from pipeline.models.efficientnet import EfficientNetModel
from pipeline.models.registry import model_info
from tests.conftest import on_loopback
from tests.unit.models.conftest import generated_state, save_safetensors

HF_URI = "hf://EarthSpeciesProject/esp-aves2-sl-beats-all/esp-aves2-sl-beats-all.safetensors"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("EMBED_ARCHIVE_CACHE", str(root))
    return root / "weights"


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_safetensors({"w": torch.arange(12.0).view(3, 4)}, tmp_path / "w.safetensors")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_path_and_file_uri_are_read_in_place(cache, checkpoint):
    for uri in (str(checkpoint), checkpoint.as_uri()):
        local = fetch_weights(uri)
        assert local.path == checkpoint
        assert local.sha256 == _sha(checkpoint)
        assert local.format == "safetensors"
        assert local.uri == uri
    assert not cache.exists()  # nothing copied


def test_fsspec_url_is_cached_by_content_and_works_offline(cache, checkpoint):
    fs = fsspec.filesystem("memory")
    fs.pipe("/weights/w.safetensors", checkpoint.read_bytes())
    first = fetch_weights("memory://weights/w.safetensors")
    assert first.path == cache / "blobs" / _sha(checkpoint)
    assert first.sha256 == _sha(checkpoint) and first.format == "safetensors"
    fs.rm("/weights/w.safetensors")  # the source is gone: the index answers
    second = fetch_weights("memory://weights/w.safetensors")
    assert second == first
    assert not list((cache / "blobs").glob(".partial-*"))


def test_corrupt_cache_blob_is_fetched_again(cache, checkpoint):
    fs = fsspec.filesystem("memory")
    fs.pipe("/weights/c.safetensors", checkpoint.read_bytes())
    blob = fetch_weights("memory://weights/c.safetensors").path
    blob.write_bytes(b"bit rot")
    again = fetch_weights("memory://weights/c.safetensors")
    assert again.path == blob and again.sha256 == _sha(checkpoint) == _sha(blob)
    fs.rm("/weights/c.safetensors")
    blob.write_bytes(b"bit rot")
    with pytest.raises(WeightsUnavailableError, match="memory://weights/c.safetensors"):
        fetch_weights("memory://weights/c.safetensors")


def test_failed_download_leaves_no_partial_file(cache, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 0:
                raise ConnectionResetError("peer went away")
            return super().read(1 << 20)

    fsspec.filesystem("memory").pipe("/weights/b.safetensors", b"x" * (3 << 20))
    monkeypatch.setattr(MemoryFileSystem, "_open", lambda *a, **k: Broken(b"x" * (3 << 20)))
    with pytest.raises(WeightsUnavailableError, match="ConnectionResetError: peer went away"):
        fetch_weights("memory://weights/b.safetensors")
    assert list((cache / "blobs").iterdir()) == []
    assert not list((cache / "refs").glob("*.json"))  # nothing registered


def test_a_download_shorter_than_the_object_is_not_cached(cache, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    fsspec.filesystem("memory").pipe("/weights/short.safetensors", b"y" * 1000)
    monkeypatch.setattr(MemoryFileSystem, "_open", lambda *a, **k: io.BytesIO(b"y" * 600))
    with pytest.raises(WeightsUnavailableError, match="incomplete download: 600 of 1000 bytes"):
        fetch_weights("memory://weights/short.safetensors")
    assert not list((cache / "refs").glob("*.json"))  # nothing registered


def test_an_object_replaced_under_its_uri_is_fetched_again(cache, checkpoint, tmp_path,
                                                           monkeypatch):
    """Every node checks its copy against the object (one metadata request), so none keeps
    serving the checkpoint it fetched first after the object was overwritten."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = fsspec.filesystem("memory")
    fs.pipe("/weights/r.safetensors", checkpoint.read_bytes())
    first = fetch_weights("memory://weights/r.safetensors")
    assert fetch_weights("memory://weights/r.safetensors") == first  # unchanged: the copy
    other = save_safetensors({"w": torch.ones(3, 4)}, tmp_path / "other.safetensors")
    fs.pipe("/weights/r.safetensors", other.read_bytes())
    second = fetch_weights("memory://weights/r.safetensors")
    assert second.sha256 == _sha(other) != first.sha256
    # The check cannot run (offline, no credentials): the copy it has is used.
    def offline(self, path, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(MemoryFileSystem, "info", offline)
    assert fetch_weights("memory://weights/r.safetensors") == second
    # Shared caches: every user of the machine can read what one of them fetched.
    assert (second.path.stat().st_mode & 0o777) == 0o644


def test_a_checkpoint_over_plain_http_is_fetched_again_once_replaced(cache, checkpoint,
                                                                     tmp_path):
    """Python's http.server: no ETag, no ranges, a Last-Modified date. The download reads
    through, not by range, and a checkpoint replaced by another of the same size is told
    apart by its date (the size alone served the first forever)."""
    import os

    from tests.conftest import serving

    served = tmp_path / "served"
    served.mkdir()
    (served / "w.safetensors").write_bytes(checkpoint.read_bytes())
    with serving(served) as base:
        uri = f"{base}/w.safetensors"
        first = fetch_weights(uri)
        assert first.sha256 == _sha(checkpoint)
        other = save_safetensors({"w": torch.ones(3, 4)}, tmp_path / "other.safetensors")
        assert other.stat().st_size == checkpoint.stat().st_size
        (served / "w.safetensors").write_bytes(other.read_bytes())
        later = checkpoint.stat().st_mtime + 60
        os.utime(served / "w.safetensors", (later, later))
        assert fetch_weights(uri).sha256 == _sha(other)


def test_a_checkpoint_replaced_between_hashing_and_loading_is_refused(checkpoint, tmp_path):
    """The bytes loaded are the bytes hashed: a file replaced after its hash was taken would
    otherwise put one checkpoint's embeddings under the other's hash."""
    from pipeline.models.checkpoint import read_checkpoint

    local = fetch_weights(str(checkpoint))
    save_safetensors({"w": torch.ones(3, 4)}, checkpoint)
    with pytest.raises(WeightsUnavailableError, match="changed while it was read"):
        read_checkpoint(local)


def test_a_registered_copy_is_used_as_given(cache, checkpoint, tmp_path):
    """cache-weights says "this file is that URI": no online check may replace it."""
    fs = fsspec.filesystem("memory")
    other = save_safetensors({"w": torch.ones(3, 4)}, tmp_path / "other.safetensors")
    fs.pipe("/weights/g.safetensors", other.read_bytes())
    registered = cache_weights("memory://weights/g.safetensors", checkpoint)
    assert fetch_weights("memory://weights/g.safetensors") == registered
    assert registered.sha256 == _sha(checkpoint)


def test_a_truncated_safetensors_file_is_a_clear_error(tmp_path):
    from pipeline.models.checkpoint import read_checkpoint

    good = save_safetensors({"w": torch.arange(4096.0)}, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(WeightsUnavailableError, match="cannot read .*cut.safetensors as "
                                                       "safetensors"):
        read_checkpoint(fetch_weights(str(cut)))


def test_cache_weights_prefills_a_published_uri(cache, tmp_path, monkeypatch):
    """What `embed-archive cache-weights URI FILE` does, then a default load offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    layout = EfficientNetModel()
    path = save_safetensors(generated_state(layout), tmp_path / "effnet.safetensors")
    uri = model_info("esp_aves2_effnetb0_all").weights_uri
    cached = cache_weights(uri, path)
    assert cached.sha256 == _sha(path) and cached.path.parent == cache / "blobs"
    backbone = create_backbone("esp_aves2_effnetb0_all")
    assert backbone.weights.uri == uri and backbone.weights.sha256 == _sha(path)
    with pytest.raises(WeightsUnavailableError, match="is not a file"):
        cache_weights(uri, tmp_path / "missing.safetensors")
    (tmp_path / "manifest.csv").write_text("uri\n/a.wav\n")  # the wrong file of the two
    with pytest.raises(WeightsUnavailableError, match="is not a checkpoint"):
        cache_weights(uri, tmp_path / "manifest.csv")
    assert create_backbone("esp_aves2_effnetb0_all").weights.sha256 == _sha(path)  # kept


def test_hf_offline_gives_a_helpful_error(cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("esp_aves2_sl_beats_all")
    err = info.value
    message = str(err)
    assert HF_URI in message and "offline" in message.lower()
    assert "https://huggingface.co/EarthSpeciesProject/esp-aves2-sl-beats-all/resolve/main/" \
           "esp-aves2-sl-beats-all.safetensors" in message
    assert "model.weights" in message and f"embed-archive cache-weights {HF_URI}" in message
    assert err.__cause__ is None and err.__suppress_context__  # no chained internals
    rendered = "".join(traceback.format_exception_only(type(err), err))
    assert "Traceback" not in rendered and "huggingface_hub" not in rendered


def test_secrets_never_appear(cache):
    uri = "https://alice:hunter2-pass@127.0.0.1:9/w.safetensors?X-Amz-Signature=sig-value-99&v=2"
    options = {"client_kwargs": {"headers": {"Authorization": "Bearer tok-secret-123"}}}
    with pytest.raises(WeightsUnavailableError) as info:
        fetch_weights(uri, options)
    message = str(info.value)
    for secret in ("hunter2-pass", "sig-value-99", "tok-secret-123"):
        assert secret not in message
    assert "https://alice:***@127.0.0.1:9/w.safetensors?X-Amz-Signature=***&v=2" in message


def test_redact_checkpoint_uri():
    """As it was when it keyed every weights cache there is (a change misses them)."""
    from pipeline import redact

    assert redact.checkpoint_uri("/data/w.safetensors") == "/data/w.safetensors"
    assert redact.checkpoint_uri("gs://bucket/w.pt") == "gs://bucket/w.pt"
    assert (redact.checkpoint_uri("https://tok@host/w?token=abc&x=1")
            == "https://***@host/w?token=***&x=1")
    assert (redact.checkpoint_uri("https://user:pw@h/w.safetensors?auth=S3CR3T&X-Amz-Date=1")
            == "https://user:***@h/w.safetensors?auth=***&X-Amz-Date=***")


def test_missing_local_file(cache, tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        fetch_weights(str(tmp_path / "nope.safetensors"))


def test_random_weights_provenance(tiny_beats):
    assert tiny_beats.weights.is_random and tiny_beats.weights.uri == "random"


def test_actors_of_one_node_download_a_checkpoint_once(cache, checkpoint, monkeypatch):
    """They start together: one fetches, the others wait for it and take its copy."""
    import threading
    import time

    from fsspec.implementations.memory import MemoryFileSystem

    fsspec.filesystem("memory").pipe("/weights/n.safetensors", checkpoint.read_bytes())
    opened = []
    real_open = MemoryFileSystem._open

    def slow_open(self, path, *args, **kwargs):
        opened.append(path)
        time.sleep(0.3)  # a download long enough for every actor to ask meanwhile
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", slow_open)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        fetch_weights("memory://weights/n.safetensors"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 1
    assert len(results) == 4 and len(set(results)) == 1


def test_download_links_for_hub_uris() -> None:
    from pipeline.models.weights import _browser_url

    assert _browser_url("hf://org/repo/w.safetensors") == \
        "https://huggingface.co/org/repo/resolve/main/w.safetensors"
    assert _browser_url("hf://datasets/org/repo@v1.0/sub/w.pt") == \
        "https://huggingface.co/datasets/org/repo/resolve/v1.0/sub/w.pt"
    assert _browser_url("gs://b/w.pt") is None


def test_checkpoints_of_one_file_name_in_two_places_are_two_cache_entries(cache) -> None:
    """Two runs' ``.../v1/model.pt`` and ``.../v2/model.pt``: sharing a cache entry, an
    offline run would load the other's weights."""
    from pipeline.models import weights as weights_mod

    assert (weights_mod._ref_path("gs://b/v1/model.pt")
            != weights_mod._ref_path("gs://b/v2/model.pt"))


def test_unavailable_weights_advice_is_for_where_the_job_runs(cache, monkeypatch) -> None:
    """On a Ray cluster the driver and every node fetch into a cache of their own:
    `embed-archive cache-weights` on one machine does not reach them, a bucket does."""
    import huggingface_hub.constants

    from pipeline.models.weights import _unavailable_message, advice_for_cluster

    local = _unavailable_message(HF_URI, "offline")
    assert f"embed-archive cache-weights {HF_URI}" in local and "Ray cluster" not in local
    cluster = _unavailable_message(HF_URI, "offline", on_cluster=True)
    assert "Ray cluster" in cluster and "only the cache of" in cluster
    assert "model.weights: gs://your-bucket/esp-aves2-sl-beats-all.safetensors" in cluster
    assert "s3://" in cluster and "EMBED_ARCHIVE_CACHE" in cluster
    assert "huggingface.co/EarthSpeciesProject" in cluster  # where to download it, still

    # What the job's driver (and its actors, EmbedSpec.on_cluster) raise.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with advice_for_cluster(True), pytest.raises(WeightsUnavailableError) as on_cluster:
        create_backbone("esp_aves2_sl_beats_all")
    assert "Ray cluster" in str(on_cluster.value) and "gs://your-bucket/" in str(on_cluster.value)
    with advice_for_cluster(False), pytest.raises(WeightsUnavailableError) as here:
        create_backbone("esp_aves2_sl_beats_all")
    assert "Ray cluster" not in str(here.value)
    with pytest.raises(WeightsUnavailableError) as unset:  # the default: a local run's advice
        create_backbone("esp_aves2_sl_beats_all")
    assert str(unset.value) == str(here.value)
    with advice_for_cluster(), pytest.raises(WeightsUnavailableError, match="every node"):
        fetch_weights("/nowhere/w.safetensors")


def test_a_job_joining_a_cluster_advises_for_a_cluster(monkeypatch) -> None:
    """The driver resolves the weights under the cluster advice, and tells its actors to."""
    from types import SimpleNamespace

    from pipeline import job as job_mod
    from pipeline.models import weights as weights_mod

    seen = []

    def resolve(*args, **kwargs):
        seen.append(weights_mod._ON_CLUSTER.get())
        raise WeightsUnavailableError("stop here")

    monkeypatch.setattr("pipeline.models.resolve_backbone", resolve)
    for address, expected in ((None, False), ("10.0.0.1:6379", True)):
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        cfg = SimpleNamespace(compute=SimpleNamespace(address=address),
                              model=SimpleNamespace(name="m", weights="w", options={},
                                                    storage_options={}))
        fake = SimpleNamespace(cfg=cfg)
        with pytest.raises(WeightsUnavailableError, match="stop here"):
            job_mod.EmbeddingJob._resolve_model(fake)
        assert seen[-1] is expected


def test_one_uri_on_two_endpoints_is_two_cache_entries(cache, checkpoint, tmp_path,
                                                       monkeypatch) -> None:
    """``s3://bucket/key`` on AWS and on a MinIO is two objects: offline (no identity check),
    one must never be served the other's cached copy."""
    from pipeline.models import weights as weights_mod

    uri = "s3://bucket/w.safetensors"
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    key = weights_mod._cache_key
    # No endpoint: the URI alone, the key every existing cache was filled under.
    assert key(uri, uri, {}) == uri and key(uri, uri, {"anon": True, "key": "k"}) == uri
    minio = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://minio:9000"}}
    other = {"client_kwargs": {"endpoint_url": "http://other:9000"}}
    assert len({key(uri, uri, {}), key(uri, uri, minio), key(uri, uri, other),
                key(uri, uri, {"endpoint_url": "http://minio:9000"})}) == 4
    assert key(uri, uri, minio) == key(uri, uri, {**minio, "secret": "rotated"})
    with_password = key(uri, uri, {"client_kwargs": {"endpoint_url": "https://u:pw@h"}})
    assert "pw" not in with_password
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert key(uri, uri, {}) != uri  # botocore's own endpoint variable
    monkeypatch.delenv("AWS_ENDPOINT_URL")

    # Offline, a copy registered for one endpoint is not what the other endpoint gets.
    registered = cache_weights(uri, checkpoint)  # no endpoint: under the URI alone
    def refuse(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(weights_mod, "_download", refuse)
    monkeypatch.setattr(weights_mod, "_remote_identity", refuse)
    assert fetch_weights(uri) == registered
    with pytest.raises(WeightsUnavailableError, match="no network"):
        fetch_weights(uri, minio)

    # Fetched per endpoint, each is found again under its own key.
    other_ckpt = save_safetensors({"w": torch.ones(3, 4)}, tmp_path / "o.safetensors")
    served = {"http://minio:9000": other_ckpt, None: checkpoint}

    def download(u, options):
        endpoint = (options.get("client_kwargs") or {}).get("endpoint_url")
        with open(served[endpoint], "rb") as f:
            return weights_mod._store_blob(f), {"ETag": endpoint or "aws"}
    monkeypatch.setattr(weights_mod, "_download", download)
    assert fetch_weights(uri, minio).sha256 == _sha(other_ckpt)
    monkeypatch.setattr(weights_mod, "_download", refuse)
    assert fetch_weights(uri, minio).sha256 == _sha(other_ckpt)  # offline, its own copy
    assert fetch_weights(uri).sha256 == _sha(checkpoint)


def test_read_weights_hashes_once_and_returns_the_bytes_hashed(cache, checkpoint,
                                                              monkeypatch) -> None:
    """The loader's bytes are read and hashed in one pass: no second hash of the file, and
    the recorded sha256 is that of exactly the bytes loaded."""
    from pipeline.models import weights as weights_mod
    from pipeline.models.checkpoint import read_checkpoint

    fsspec.filesystem("memory").pipe("/weights/once.safetensors", checkpoint.read_bytes())
    fetch_weights("memory://weights/once.safetensors")  # cached
    cache_weights("gs://b/registered.safetensors", checkpoint)
    calls = []
    real = weights_mod.sha256_of_file_bytes
    monkeypatch.setattr(weights_mod, "sha256_of_file_bytes",
                        lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(weights_mod, "sha256_file", lambda p: pytest.fail(f"hashed {p} again"))
    for uri in (str(checkpoint), "memory://weights/once.safetensors",
                "gs://b/registered.safetensors"):
        calls.clear()
        local, data = weights_mod.read_weights(uri)
        assert len(calls) == 1
        assert local.sha256 == _sha(checkpoint) == hashlib.sha256(data).hexdigest()
        assert local.format == "safetensors"
        assert torch.equal(read_checkpoint(local, data).state_dict["w"],
                           torch.arange(12.0).view(3, 4))
    blob = cache / "blobs" / _sha(checkpoint)
    blob.chmod(0o644)
    blob.write_bytes(b"corrupt")  # found in the same pass that reads it, and fetched again
    calls.clear()
    local, data = weights_mod.read_weights("memory://weights/once.safetensors")
    assert local.sha256 == _sha(checkpoint) == hashlib.sha256(data).hexdigest()


def test_cache_weights_for_an_endpoint_is_found_by_jobs_on_that_endpoint(cache, checkpoint,
                                                                         monkeypatch) -> None:
    """The advice for a URI on an S3-compatible store (cache-weights) must be one that works:
    a copy registered with the job's endpoint (or AWS_ENDPOINT_URL) is found offline."""
    import shlex

    from pipeline.cli import main
    from pipeline.models import weights as weights_mod

    uri = "s3://bucket/w.safetensors"
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)

    def refuse(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(weights_mod, "_download", refuse)
    monkeypatch.setattr(weights_mod, "_remote_identity", refuse)
    minio = {"key": "k", "client_kwargs": {"endpoint_url": "http://minio:9000"}}
    with pytest.raises(WeightsUnavailableError) as err:
        fetch_weights(uri, minio)
    command = shlex.split(next(line for line in str(err.value).splitlines()
                               if "embed-archive cache-weights" in line))
    assert command[:3] == ["embed-archive", "cache-weights", "--storage-option"]
    flags = command[2:-2]
    assert main(["cache-weights", *flags, uri, str(checkpoint)]) == 0
    assert fetch_weights(uri, minio).sha256 == _sha(checkpoint)
    with pytest.raises(WeightsUnavailableError):
        fetch_weights(uri)  # the default endpoint: another object

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://other:9000")  # set for both
    cache_weights(uri, checkpoint)
    assert fetch_weights(uri).sha256 == _sha(checkpoint)


@contextlib.contextmanager
def _gcs_refusing_every_request() -> Iterator[str]:
    """A GCS JSON API stand-in on 127.0.0.1 that answers every request 400, which gcsfs
    does not retry: it gives up at once, as it does offline after its retries."""

    class Handler(BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            body = json.dumps({"error": {"code": 400, "message": "no such store here"}}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_HEAD = do_POST = _refuse

        def log_message(self, *args: object) -> None:
            pass

    with on_loopback(Handler) as url:
        yield url


def test_a_gcs_request_gcsfs_gives_up_on_is_one_line_not_its_traceback(cache, caplog) -> None:
    """gcsfs logs each request it gives up on with its traceback (logger.exception) before
    raising it: offline, ~100 lines of aiohttp frames ahead of the job's one-line error,
    which names the same exception. Shown at run.log_level DEBUG (the driver's root logger,
    a worker's `pipeline` logger)."""
    uri = "gs://weights-bucket/x.safetensors"

    def gcsfs_tracebacks(level: int, logger: str | None = None) -> list[logging.LogRecord]:
        caplog.clear()
        refused = pytest.raises(WeightsUnavailableError, match="HttpError: no such store here")
        with _gcs_refusing_every_request() as url, caplog.at_level(level, logger=logger), refused:
            fetch_weights(uri, {"endpoint_url": url, "token": "anon", "project": "p1"})
        return [r for r in caplog.records if r.name == "gcsfs" and r.exc_info]

    assert gcsfs_tracebacks(logging.INFO) == []
    assert gcsfs_tracebacks(logging.DEBUG)
    assert gcsfs_tracebacks(logging.DEBUG, logger="pipeline")
