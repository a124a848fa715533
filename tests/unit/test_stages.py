"""The two stages outside Ray: how decode rows are cut into blocks, and what the embedding
actor copies on the way to the model."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.audio import DecodeSettings
from pipeline.stages import (
    DecodeSpec,
    Embedder,
    EmbedSpec,
    RowBlocks,
    _finite_rows,
    decode_batch,
    decode_recording,
)
from tests.conftest import write_tone
from tests.integration.conftest import TINY_BEATS


@pytest.fixture
def package_warnings(caplog: pytest.LogCaptureFixture,
                     monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, at WARNING for the package's loggers: a decode_batch earlier in this process
    (configure_worker_logging) keeps their records from the root logger, where caplog listens."""
    monkeypatch.setattr(logging.getLogger("pipeline"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        yield caplog


def rows(start: int, n: int) -> dict[str, np.ndarray]:
    """``n`` stage rows numbered from ``start`` (the number is in every column)."""
    ids = np.arange(start, start + n)
    return {"recording_id": ids.astype(str).astype(object),
            "window_index": ids.astype(np.int32),
            "audio": np.repeat(ids[:, None], 4, axis=1).astype(np.float32)}


@pytest.mark.parametrize("sizes", [[3, 5, 1, 40, 2], [8, 8, 8], [7], [1] * 17, [0, 9, 0, 23]])
def test_row_blocks_regroups_in_order_into_full_blocks(sizes: list[int]) -> None:
    blocks, out, start = RowBlocks(8), [], 0
    for n in sizes:
        out.extend(blocks.add(rows(start, n)))
        assert blocks.pending < 8
        start += n
    out.extend(blocks.flush())
    assert [len(b["recording_id"]) for b in out[:-1]] == [8] * (len(out) - 1)
    assert 0 < len(out[-1]["recording_id"]) <= 8
    for column in ("recording_id", "window_index", "audio"):
        got = np.concatenate([b[column] for b in out])
        assert np.array_equal(got, rows(0, start)[column])
    assert all(b["audio"].flags.c_contiguous for b in out)


def test_a_full_batch_passes_through_without_a_copy() -> None:
    blocks = RowBlocks(8)
    part = rows(0, 16)
    out = list(blocks.add(part))
    assert len(out) == 2 and blocks.pending == 0
    assert all(np.shares_memory(b["audio"], part["audio"]) for b in out)


def test_rows_left_over_do_not_pin_the_blocks_already_out() -> None:
    blocks = RowBlocks(8)
    part = rows(0, 11)
    (out,) = blocks.add(part)
    (rest,) = blocks.flush()
    assert np.shares_memory(out["audio"], part["audio"])
    assert not np.shares_memory(rest["audio"], part["audio"])
    assert rest["window_index"].tolist() == [8, 9, 10]


def test_decode_task_yields_whole_blocks_across_its_recordings(tmp_path: Path) -> None:
    paths = [tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"]
    for i, (path, seconds) in enumerate(zip(paths, (41.3, 3.0, 70.0), strict=True)):
        write_tone(path, seconds, 16_000, channels=2 if i == 2 else 1, seed=i)
    spec = DecodeSpec(DecodeSettings(16_000, channels="each"), window_samples=16_000,
                      hop_samples=8_000, tail="pad", min_tail_samples=400, batch_windows=20)
    assert spec.block_rows == 20
    task = {"shard": np.array(["s0"] * 3, dtype=object),
            "recording_id": np.array(["a", "b", "c"], dtype=object),
            "uri": np.array([str(p) for p in paths], dtype=object),
            "path": np.array([str(p) for p in paths], dtype=object),
            "size_bytes": np.array([p.stat().st_size for p in paths]),
            "problem": np.array(["", "", ""], dtype=object)}
    out = list(decode_batch(task, spec))
    assert [len(b["recording_id"]) for b in out[:-1]] == [spec.block_rows] * (len(out) - 1)
    assert all(b["audio"].flags.c_contiguous and b["audio"].shape[1] == 16_000 for b in out)
    flat = {k: np.concatenate([b[k] for b in out]) for k in out[0]}
    reports = [json.loads(m) for m in flat["meta"] if m]
    assert [r["recording_id"] for r in reports] == ["a", "b", "c"]
    windows = {rid: int((flat["recording_id"][flat["window_index"] >= 0] == rid).sum())
               for rid in ("a", "b", "c")}
    assert windows == {"a": 82, "b": 5, "c": 2 * 139}  # pad tails; c has two channels
    assert windows == {r["recording_id"]: sum(r["windows"].values()) for r in reports}
    # A recording's report rides on its last window, in no row of its own: every row is a
    # window (for 5-s clips, a row of its own was half of every model batch).
    last_row = {rid: int(np.flatnonzero(flat["recording_id"] == rid)[-1]) for rid in windows}
    assert all(flat["meta"][last_row[rid]] for rid in windows)
    assert (flat["window_index"] >= 0).all() and len(flat["meta"]) == sum(windows.values())


def test_a_decode_task_holds_one_block_of_audio_however_many_channels(tmp_path: Path) -> None:
    """With channels: each a window is a row per channel: the windower's batch (what a
    decode task holds while it fills) must stay at one block's rows, not channels x that."""
    from pipeline.audio import DecodeReport
    from pipeline.stages import _windows

    write_tone(tmp_path / "six.wav", 30.0, 16_000, channels=6)
    spec = DecodeSpec(DecodeSettings(16_000, channels="each"), window_samples=16_000,
                      hop_samples=8_000, tail="pad", min_tail_samples=400, batch_windows=16)
    reader = storage.RangeReader(*storage.url_to_fs(str(tmp_path / "six.wav"), {}))
    parts = list(_windows("six", reader, DecodeReport(), spec))
    sizes = [len(p["recording_id"]) for p in parts]
    assert max(sizes) <= spec.block_rows and sum(sizes) == 6 * 59


def test_blocks_of_short_windows_grow_to_a_mebibyte() -> None:
    spec = DecodeSpec(DecodeSettings(16_000), window_samples=4_000, hop_samples=4_000,
                      tail="pad", min_tail_samples=400, batch_windows=32)
    assert spec.block_rows == 66 and spec.block_rows * spec.window_bytes >= 2**20


@pytest.mark.parametrize(("batch_windows", "window_samples", "model_batch", "rows"), [
    (None, 80_000, 16, 16),    # the default: one model batch per block
    (None, 80_000, 256, 256),
    (None, 4_000, 16, 80),     # 16 KB windows: 66 rows make 1 MiB, rounded up to batches
])
def test_by_default_a_block_is_one_model_batch(batch_windows: int | None, window_samples: int,
                                               model_batch: int, rows: int) -> None:
    spec = DecodeSpec(DecodeSettings(16_000), window_samples=window_samples, hop_samples=4_000,
                      tail="pad", min_tail_samples=400, batch_windows=batch_windows,
                      model_batch=model_batch)
    assert spec.block_rows == rows


@pytest.mark.parametrize(("model_batch", "rows"), [(1, 32), (16, 32), (48, 48), (256, 256),
                                                   (20, 40)])
def test_a_block_holds_whole_model_batches(model_batch: int, rows: int) -> None:
    spec = DecodeSpec(DecodeSettings(16_000), window_samples=80_000, hop_samples=40_000,
                      tail="pad", min_tail_samples=400, batch_windows=32, model_batch=model_batch)
    assert spec.block_rows == rows


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    spec = EmbedSpec(model_name="beats", weights="random", options=TINY_BEATS,
                     storage_options={}, layers=(0, 1), pooling="mean", precision="fp32",
                     sample_rate_hz=16_000, tail="pad", min_input_samples=2_800, use_gpu=False,
                     torch_threads=1)
    return Embedder(spec)


@pytest.mark.parametrize(("tail", "padded"), [("pad", True), ("keep", False), ("drop", False)])
def test_the_warm_up_runs_a_whole_batch_padded_as_a_recordings_last_window_is(
        embedder: Embedder, monkeypatch: pytest.MonkeyPatch, tail: str, padded: bool) -> None:
    """One batch of the configured size before any data; with ``tail: pad`` its last window
    half padding, so the masked path (and its memory) is met at start-up too."""
    seen: list[tuple[tuple[int, ...], list[int]]] = []
    pool_all = Embedder._pool_all

    def spy(self: Embedder, audio: np.ndarray, valid: np.ndarray, precision: str) -> dict:
        seen.append((audio.shape, valid.tolist()))
        return pool_all(self, audio, valid, precision)

    monkeypatch.setattr(Embedder, "_pool_all", spy)
    Embedder(replace(embedder.spec, tail=tail, warmup_shape=(4, 16_000)))
    assert seen == [((4, 16_000), [16_000, 16_000, 16_000, 8_000 if padded else 16_000])]


def test_a_batch_of_whole_windows_reads_no_tensor_value_before_the_model_runs(
        embedder: Embedder) -> None:
    """On a GPU, reading a value of a tensor on the device (``bool(v.any())``) waits for the
    batch's asynchronous copy, so the model's kernels could not be queued behind it. Whether
    a batch is padded is looked up on the host instead: a batch of whole windows (most of
    them) makes no such read at all. Counted with torch's own dispatch mode on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("_local_scalar_dense", "is_nonzero", "item"):
                self.count += 1
            return func(*args, **(kwargs or {}))

    audio = np.random.default_rng(0).standard_normal((4, 16_000)).astype(np.float32)
    with HostReads() as reads:
        pooled = embedder._forward(audio, None, np.full(4, 16_000), 16_000, "fp32")
    assert reads.count == 0
    assert all(np.isfinite(v).all() and v.shape[0] == 4 for v in pooled.values())


def stage_batch(n: int, report_at: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    batch = {"shard": np.full(n, "s0", dtype=object),
             "recording_id": np.array([f"r{i % 3}" for i in range(n)], dtype=object),
             "channel": np.full(n, -1, np.int16), "window_index": np.arange(n, dtype=np.int32),
             "start_s": np.arange(n) * 0.5, "end_s": np.arange(n) * 0.5 + 1.0,
             "valid_samples": np.full(n, 16_000, np.int32),
             "audio": rng.standard_normal((n, 16_000)).astype(np.float32),
             "meta": np.full(n, "", dtype=object)}
    batch["valid_samples"][-1] = 9_000  # one padded window
    batch["audio"][-1, 9_000:] = 0.0
    if report_at is not None:  # a recording's report in a row of its own (it had no window)
        batch["meta"][report_at] = json.dumps({"type": "report", "recording_id": "r0"})
        batch["window_index"][report_at] = -1
    return batch


def embeddings(table: pa.Table) -> dict[tuple[int, int], np.ndarray]:
    return {(int(w), int(layer)): np.asarray(e, np.float32)
            for w, layer, e in zip(table["window_index"].to_pylist(), table["layer"].to_pylist(),
                                   table["embedding"].to_pylist(), strict=True)
            if layer is not None}


def test_a_read_only_batch_is_embedded_through_one_reused_buffer(embedder: Embedder) -> None:
    """Ray hands the actor read-only views on the object store: the actor must not write
    to them, and its one copy goes into the same host buffer batch after batch."""
    batch = stage_batch(6)
    expected = {k: v.copy() for k, v in batch.items()}
    for v in batch.values():
        v.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable arrays
        first = embeddings(embedder(batch))
    buffer = embedder._staging.data_ptr()
    again = embeddings(embedder(stage_batch(5)))
    assert embedder._staging.data_ptr() == buffer
    assert all(np.array_equal(batch[k], expected[k]) for k in batch)
    assert sorted(first) == [(w, layer) for w in range(6) for layer in (0, 1)]
    assert len(again) == 10


def test_report_rows_in_a_batch_change_nothing_for_its_windows(embedder: Embedder) -> None:
    mixed = stage_batch(7, report_at=3)
    windows_only = {k: np.delete(v, 3, axis=0) for k, v in mixed.items()}
    got, want = embeddings(embedder(mixed)), embeddings(embedder(windows_only))
    assert sorted(got) == sorted(want) and len(got) == 12
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, rtol=1e-5, atol=1e-6)


def test_a_report_riding_on_a_window_is_passed_on_and_its_window_embedded(
        embedder: Embedder) -> None:
    """A recording's report comes on its last window row: that window is embedded like any
    other (with no copy of the batch) and the report leaves as a row of its own."""
    plain = stage_batch(7)
    riding = stage_batch(7)
    riding["meta"][4] = json.dumps({"type": "report", "recording_id": "r1"})
    got, want = embedder(riding), embedder(plain)
    assert embeddings(got).keys() == embeddings(want).keys() and len(embeddings(got)) == 14
    for key, vector in embeddings(want).items():
        np.testing.assert_allclose(embeddings(got)[key], vector, rtol=1e-5, atol=1e-6)
    reports = [r for r in got.to_pylist() if r["meta"] and '"report"' in r["meta"]]
    assert [(r["shard"], r["recording_id"], r["layer"], r["window_index"]) for r in reports] == [
        ("s0", "r1", None, -1)]


def test_a_window_whose_embedding_is_not_finite_is_reported_not_written(
        embedder: Embedder) -> None:
    """Its rows leave as one ``dropped`` report for its recording; the other windows, the
    decode report and the timing row all come out in the stage schema."""
    from pipeline.sink import STAGE_SCHEMA

    batch = stage_batch(7, report_at=3)
    batch["audio"][5] = np.nan
    out = embedder(batch)
    assert out.schema == STAGE_SCHEMA
    assert sorted(embeddings(out)) == [(w, layer) for w in (0, 1, 2, 4, 6) for layer in (0, 1)]
    metas = [json.loads(m) for m in out["meta"].to_pylist() if m]
    assert [m["type"] for m in metas] == ["report", "dropped", "timing"]
    assert metas[1] == {"type": "dropped", "recording_id": "r2", "windows": [[-1, 5]],
                        "reason": "non-finite embedding"}
    rows = out.to_pylist()
    dropped = next(r for r in rows if r["meta"] and json.loads(r["meta"])["type"] == "dropped")
    assert (dropped["shard"], dropped["recording_id"], dropped["layer"]) == ("s0", "r2", None)


def test_an_int8_actor_embeds_what_its_fp32_twin_does(embedder: Embedder) -> None:
    """``model.precision: int8`` through the actor: its network quantized once at load,
    every window embedded, each layer's vector close to float32's."""
    from dataclasses import replace

    int8 = Embedder(replace(embedder.spec, precision="int8"))
    assert int8.precision == "int8" and not int8._retry_in_fp32
    batch = stage_batch(6)
    got, want = embeddings(int8(batch)), embeddings(embedder(batch))
    assert sorted(got) == sorted(want) == [(w, layer) for w in range(6) for layer in (0, 1)]
    for key, vector in want.items():
        cosine = got[key] @ vector / np.linalg.norm(got[key]) / np.linalg.norm(vector)
        assert cosine > 0.999
    # Layer 0 is the patch embedding (a convolution, float32 either way); block 1 is int8.
    assert not any(np.array_equal(got[w, 1], want[w, 1]) for w in range(6))


def test_with_each_channel_every_row_holds_the_audio_of_the_channel_it_names(
        tmp_path: Path) -> None:
    """Stereo, the right channel silent, several windows a batch: a row labelled channel 1
    must hold silence (labels laid out window-major, as the audio is), or the recording's
    per-channel embeddings would pool both channels together, unnoticed: counts balance."""
    import soundfile as sf

    left = 0.5 * np.sin(2 * np.pi * 440 * np.arange(4 * 16_000) / 16_000)
    sf.write(tmp_path / "s.wav", np.stack([left, np.zeros_like(left)], 1).astype(np.float32),
             16_000)
    spec = DecodeSpec(DecodeSettings(16_000, channels="each"), window_samples=16_000,
                      hop_samples=8_000, tail="pad", min_tail_samples=400, batch_windows=8)
    path = str(tmp_path / "s.wav")
    rows = [r for r in decode_recording("r", path, path, -1, "", spec) if "audio" in r]
    channel = np.concatenate([r["channel"][r["meta"] == ""] for r in rows])
    loud = np.concatenate([np.abs(r["audio"][r["meta"] == ""]).max(axis=1) for r in rows])
    index = np.concatenate([r["window_index"][r["meta"] == ""] for r in rows])
    assert max(len(r["channel"]) for r in rows) > 2  # several windows in one batch
    assert set(channel) == {0, 1} and (loud[channel == 0] > 0.4).all()
    assert (loud[channel == 1] == 0).all()
    assert len(set(zip(index.tolist(), channel.tolist(), strict=True))) == len(index)  # no key twice


@pytest.mark.parametrize(("tail", "min_tail_samples", "last"), [
    ("keep", 8_000, (2.0, 2.5, 8_000)),   # exactly min_tail_s of audio: kept, ends with it
    ("keep", 8_001, (1.0, 2.0, 16_000)),  # a sample short of it: dropped
    ("pad", 8_000, (2.0, 3.0, 8_000)),    # padded: the window's full length
])
def test_a_tail_window_ends_where_its_audio_does_unless_padded(
        tmp_path: Path, tail: str, min_tail_samples: int, last: tuple) -> None:
    """2.5 s in 1-s windows: the tail window holds 0.5 s of audio. ``end_s`` is what a
    reader cuts the audio by (``keep``: the real audio; ``pad``: the window), and a tail of
    exactly ``min_tail_s`` is kept."""
    write_tone(tmp_path / "t.wav", 2.5, 16_000)
    spec = DecodeSpec(DecodeSettings(16_000), window_samples=16_000, hop_samples=16_000,
                      tail=tail, min_tail_samples=min_tail_samples, batch_windows=4)
    path = str(tmp_path / "t.wav")
    rows = list(decode_recording("r", path, path, -1, "", spec))
    windows = np.concatenate([r["window_index"] >= 0 for r in rows])
    start, end, valid = (np.concatenate([r[k] for r in rows])[windows]
                         for k in ("start_s", "end_s", "valid_samples"))
    assert (start[-1], end[-1], valid[-1]) == last


@pytest.mark.parametrize(("fail_from", "status", "error_type"), [
    (0, "error", "PermissionError"),          # the very first read: nothing decoded
    (3_000_000, "partial", "PermissionError"),  # the second 2 MiB range: the first's windows stay
    (3_000_000, "partial", "StorageError"),   # resets until the retries give up (an outage)
])
def test_a_read_that_fails_inside_the_decoder_is_a_storage_error_not_a_truncation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        package_warnings: pytest.LogCaptureFixture, fail_from: int, status: str,
        error_type: str) -> None:
    """libsndfile reads through a C callback that turns an exception into end of file; the
    job must still report the failed read (a 403 on a range), not a short recording."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    write_tone(tmp_path / "t.wav", 120.0, 16_000)  # 3.8 MB
    data = (tmp_path / "t.wav").read_bytes()
    fsspec.filesystem("memory").pipe_file("/rr/t.wav", data)
    served = MemoryFileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kw):
        if end is not None and end > fail_from:
            if error_type == "StorageError":
                raise ConnectionResetError(f"reset reading https://h{path}?X-Amz-Signature=s3cr3t")
            raise PermissionError(f"403 Forbidden: https://h{path}?X-Amz-Signature=s3cr3t")
        return served(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # the retries' backoff
    spec = DecodeSpec(DecodeSettings(16_000), window_samples=16_000, hop_samples=16_000,
                      tail="pad", min_tail_samples=400, batch_windows=4)
    rows = list(decode_recording("r", "memory://rr/t.wav", "/rr/t.wav", len(data), "", spec))
    report = json.loads(rows[-1]["meta"][-1])
    assert report["status"] == status
    # Cut short, it is named where it is warned of, the signed URL in its reason masked.
    assert ("partial decode of memory://rr/t.wav: " in package_warnings.text) == (
        status == "partial")
    assert "s3cr3t" not in package_warnings.text
    detail = report["message"] if status == "error" else report["problems"][-1]
    assert error_type in (report.get("error_type", "") + detail)
    assert "s3cr3t" not in json.dumps(report)
    assert "truncated" not in json.dumps(report)
    # What a rerun reads to decide whether to try again: a storage error may pass, and so
    # may a 403 (credentials expire mid-run, policies get fixed): both are tried again.
    assert report["transient"] is True
    if status == "partial":
        assert report["stopped_by"] == error_type
        # Every complete window of the audio decoded before the failure went downstream,
        # including those still in the batch being filled (a block's worth, 16 here).
        sent = sum(int((r["window_index"] >= 0).sum()) for r in rows)
        decoded_windows = int(report["duration_s"] * 16_000) // 16_000
        assert decoded_windows % spec.block_rows != 0  # else this would not tell
        assert sent == report["windows"]["-1"] == decoded_windows


def test_a_store_refusing_the_credentials_is_tried_again_by_later_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs says 403 with a bare OSError, s3fs with a PermissionError: one was an
    "unexpected" error (retried), the other settled for good, though both are credentials
    expiring or a policy changing mid-run, not the recording."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem
    from gcsfs.retry import validate_response

    write_tone(tmp_path / "t.wav", 2.0, 16_000)
    fsspec.filesystem("memory").pipe_file("/rr/g.wav", (tmp_path / "t.wav").read_bytes())

    def cat_file(self, path, start=None, end=None, **kw):  # as gcsfs answers a 403
        validate_response(403, b'{"error": {"message": "x@p.iam does not have '
                               b'storage.objects.get"}}', path)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    spec = DecodeSpec(DecodeSettings(16_000), window_samples=16_000, hop_samples=16_000,
                      tail="pad", min_tail_samples=400, batch_windows=4)
    rows = list(decode_recording("r", "memory://rr/g.wav", "/rr/g.wav", -1, "", spec))
    report = json.loads(rows[-1]["meta"][-1])
    assert (report["status"], report["error_type"], report["transient"]) == (
        "error", "PermissionError", True)
    assert report["message"].startswith("access refused (OSError: Forbidden: /rr/g.wav x@p.iam "
                                        "does not have storage.objects.get)")


@pytest.mark.parametrize("kind", ["ogg", "unfinished_wav"])
def test_a_failed_read_under_a_checking_view_is_a_storage_error_not_a_truncation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Ogg pages are checked, and an unfinished WAV's header patched, by a view over the
    range reader: a read that failed under it was raised into libsndfile's C callback and
    read as the end of the file, so an outage half-way became "partial: truncated, the Ogg
    stream stops at 28 s" (or "header declares N frames, N/2 decoded"), never retried."""
    import functools

    import soundfile as sf
    from fsspec.implementations.memory import MemoryFileSystem

    noise = np.random.default_rng(0).uniform(-0.5, 0.5, (16_000 * 40, 1)).astype(np.float32)
    if kind == "ogg":
        sf.write(tmp_path / "x", noise, 16_000, format="OGG", subtype="VORBIS")
        data = (tmp_path / "x").read_bytes()
    else:
        sf.write(tmp_path / "x", noise, 16_000, format="WAV", subtype="PCM_16")
        data = bytearray((tmp_path / "x").read_bytes())
        data[4:8] = data[40:44] = bytes(4)  # RIFF and data sizes never written
        data = bytes(data)
    MemoryFileSystem().pipe_file("/rv/x", data)
    served = MemoryFileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kw):
        if end is not None and end > len(data) // 2:
            raise ConnectionResetError("reset")
        return served(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    monkeypatch.setattr(storage, "RangeReader",
                        functools.partial(storage.RangeReader, block_bytes=32 * 1024))
    spec = DecodeSpec(DecodeSettings(16_000), window_samples=16_000, hop_samples=16_000,
                      tail="pad", min_tail_samples=400, batch_windows=4)
    rows = list(decode_recording("r", "memory://rv/x", "/rv/x", len(data), "", spec))
    report = json.loads(rows[-1]["meta"][-1])
    assert "truncated" not in json.dumps(report)
    assert "StorageError" in (report.get("error_type", "") + str(report.get("stopped_by")))
    assert report["transient"] is True  # a rerun tries it again


def test_an_unexpected_exception_is_an_error_row_a_rerun_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory, a codec missing on one node, a bug: not the recording's fault, so its
    report says a later run may get past it (``run.retry_transient_errors``); a file that
    is not audio is the recording's own error."""
    import soundfile

    write_tone(tmp_path / "t.wav", 2.0, 16_000)
    (tmp_path / "x.wav").write_bytes(b"not audio at all")
    spec = DecodeSpec(DecodeSettings(16_000), window_samples=16_000, hop_samples=16_000,
                      tail="pad", min_tail_samples=400, batch_windows=4)

    def report_of(name: str) -> dict:
        path = str(tmp_path / name)
        rows = list(decode_recording("r", path, path, -1, "", spec))
        return json.loads(rows[-1]["meta"][-1])

    assert (report_of("x.wav")["status"], report_of("x.wav")["transient"]) == ("error", False)
    gone = report_of("gone.wav")  # deleted between the listing and the read: settled
    assert (gone["status"], gone["error_type"], gone.get("transient", False)) == (
        "error", "FileNotFoundError", False)
    # An object the listing's retries could not stat arrives as a problem: as transient.
    for problem, transient in (("StorageError: stat s3://b/k.wav: gave up after 6 attempts", True),
                               ("PermissionError: access refused (403 Forbidden)", True),
                               ("FileNotFoundError: s3://b/k.wav", False)):
        rows = list(decode_recording("r", "s3://b/k.wav", "b/k.wav", -1, problem, spec))
        listed = json.loads(rows[-1]["meta"][-1])
        assert (listed["status"], listed["transient"]) == ("error", transient)
        assert listed["error_type"] == problem.partition(":")[0]

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(soundfile, "SoundFile", no_memory)
    report = report_of("t.wav")
    assert (report["status"], report["error_type"], report["transient"]) == (
        "error", "MemoryError", True)


def test_an_actor_refuses_a_checkpoint_that_changed_since_the_job_was_planned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver names the output variant by the checkpoint's hash; an actor that loads
    other bytes under the same URI (overwritten object, stale node cache) must not embed."""
    import hashlib

    from safetensors.torch import save_file

    from pipeline.errors import CheckpointMismatchError
    from pipeline.models import create_backbone

    monkeypatch.setenv("EMBED_ARCHIVE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.safetensors"

    module = create_backbone("beats", weights="random", options=TINY_BEATS).module

    def save(shift: float) -> str:  # another checkpoint that fits the same architecture
        save_file({k: (v + shift if k.endswith("fc1.bias") else v).detach().clone().contiguous()
                   for k, v in module.state_dict().items()}, str(path))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    planned = save(0.0)
    spec = EmbedSpec(model_name="beats", weights=str(path), options=TINY_BEATS,
                     storage_options={}, layers=(0,), pooling="mean", precision="fp32",
                     sample_rate_hz=16_000, tail="pad", min_input_samples=2_800, use_gpu=False,
                     torch_threads=1, weights_sha256=planned)
    assert Embedder(spec).backbone.weights.sha256 == planned
    now = save(0.01)
    with pytest.raises(CheckpointMismatchError, match=f"now has sha256 {now}.*with {planned}"):
        Embedder(spec)


def test_an_actor_given_a_gpu_torch_cannot_use_refuses_to_run_on_its_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build, GPU or not
    spec = EmbedSpec(model_name="beats", weights="random", options=TINY_BEATS,
                     storage_options={}, layers=(0,), pooling="mean", precision="fp32",
                     sample_rate_hz=16_000, tail="pad", min_input_samples=2_800, use_gpu=True,
                     torch_threads=1)
    with pytest.raises(RuntimeError, match="given a GPU but torch .* sees no CUDA device"):
        Embedder(spec)


def test_with_each_channel_a_rows_window_index_is_the_window_it_holds(tmp_path: Path) -> None:
    """Stereo, several windows a batch (an odd number, so no key repeats either way): every
    row's ``window_index`` must be the window its ``start_s`` is, each once per channel.
    Labelled channel-major while the audio is window-major, windows 0..n-1 of channel 1 land
    on the wrong rows and the window table's keys point at other audio, unnoticed."""
    import soundfile as sf

    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(4 * 16_000) / 16_000)
    sf.write(tmp_path / "s.wav", np.stack([tone, tone], 1).astype(np.float32), 16_000)
    spec = DecodeSpec(DecodeSettings(16_000, channels="each"), window_samples=16_000,
                      hop_samples=8_000, tail="pad", min_tail_samples=400, batch_windows=8)
    path = str(tmp_path / "s.wav")
    rows = [r for r in decode_recording("r", path, path, -1, "", spec) if "audio" in r]
    windows = np.concatenate([r["window_index"] >= 0 for r in rows])
    index, start, channel = (np.concatenate([r[k] for r in rows])[windows]
                             for k in ("window_index", "start_s", "channel"))
    assert max(len(r["channel"]) for r in rows) > 2  # several windows in one batch
    np.testing.assert_allclose(start, index * 0.5)
    assert sorted(zip(index.tolist(), channel.tolist(), strict=True)) == [
        (w, c) for w in range(7) for c in (0, 1)]


def test_a_partial_recording_is_one_warning_that_names_it(
        tmp_path: Path, package_warnings: pytest.LogCaptureFixture) -> None:
    """A truncated FLAC's only word was "partial decode (decoding stopped at 1.216 s: ...)",
    naming no file, and a truncated WAV (found short after its last block) said nothing:
    the summary counted partial recordings that no log line named."""
    write_tone(tmp_path / "cut.wav", 6.0, 22_050)
    write_tone(tmp_path / "cut.flac", 6.0, 32_000, fmt="FLAC")
    write_tone(tmp_path / "whole.wav", 3.0, 16_000)
    for name in ("cut.wav", "cut.flac"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    spec = DecodeSpec(DecodeSettings(16_000, block_s=0.5), window_samples=16_000,
                      hop_samples=16_000, tail="pad", min_tail_samples=400, batch_windows=4)
    problems = {}
    for name in ("cut.wav", "cut.flac", "whole.wav"):
        path = str(tmp_path / name)
        rows = list(decode_recording(name, path, path, -1, "", spec))
        problems[name] = json.loads(rows[-1]["meta"][-1])["problems"]
    warned = [r.getMessage() for r in package_warnings.records]
    # One line each, however many blocks it was read in, saying what status_detail will.
    assert warned == [f"partial decode of {tmp_path / name}: {'; '.join(problems[name])}"
                      for name in ("cut.wav", "cut.flac")]
    assert "truncated: header declares 132300 frames" in warned[0]
    assert "decoding stopped at" in warned[1]


@pytest.fixture(scope="module")
def keep_embedder(embedder: Embedder) -> Embedder:
    return Embedder(replace(embedder.spec, tail="keep"))


def window_batch(valid: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Stage rows of one recording, one window of 16,000 samples each, zero past ``valid``."""
    n = len(valid)
    audio = np.random.default_rng(seed).standard_normal((n, 16_000)).astype(np.float32)
    for row, v in enumerate(valid):
        audio[row, v:] = 0.0
    return {"shard": np.full(n, "s0", dtype=object), "recording_id": np.full(n, "r", dtype=object),
            "channel": np.full(n, -1, np.int16), "window_index": np.arange(n, dtype=np.int32),
            "start_s": np.arange(n) * 1.0, "end_s": np.arange(n) + np.array(valid) / 16_000,
            "valid_samples": np.array(valid, np.int32), "audio": audio,
            "meta": np.full(n, "", dtype=object)}


def vectors(table: pa.Table) -> dict[tuple[int, int], np.ndarray]:
    return {(int(w), int(layer)): np.asarray(e, np.float32)
            for w, layer, e in zip(table["window_index"].to_pylist(), table["layer"].to_pylist(),
                                   table["embedding"].to_pylist(), strict=True)
            if layer is not None}


def test_a_keep_tail_shorter_than_the_models_shortest_input_is_embedded(
        keep_embedder: Embedder) -> None:
    """``tail: keep`` runs a short window at its own length, but never below the model's
    minimum input (BEATs': 2,800 samples; ``min_tail_s`` may be smaller): cut to its 1,000
    samples, the model refuses the batch and the actor, and with it the job, fails."""
    assert keep_embedder.backbone.info.min_input_samples == 2_800
    out = vectors(keep_embedder(window_batch([16_000, 1_000])))
    assert sorted(out) == [(w, layer) for w in (0, 1) for layer in (0, 1)]
    assert all(np.isfinite(v).all() for v in out.values())


def test_windows_of_several_lengths_in_one_batch_keep_their_own_embeddings(
        keep_embedder: Embedder) -> None:
    """With ``tail: keep`` a batch runs as one forward pass per window length; the results
    must be put back in the rows' order. Out of order, a full window gets a tail window's
    embedding (same dimension, finite, counts all balance)."""
    valid = [16_000, 9_000, 16_000, 12_000, 9_000]
    batch = window_batch(valid, seed=3)
    together = vectors(keep_embedder(batch))
    for row in range(len(valid)):
        alone = vectors(keep_embedder({k: v[row : row + 1] for k, v in batch.items()}))
        for (w, layer), vector in alone.items():
            np.testing.assert_allclose(together[w, layer], vector, rtol=1e-4, atol=1e-5)


def test_what_lies_past_a_padded_windows_valid_samples_changes_nothing(
        keep_embedder: Embedder) -> None:
    """``tail: pad``: the padding mask must reach the model, which masks those tokens out
    of attention and pooling. Without it the tail window's embedding pools padding tokens,
    which noise past ``valid_samples`` shows."""
    pad = Embedder(replace(keep_embedder.spec, tail="pad"))
    clean = window_batch([16_000, 9_000], seed=5)
    noisy = {k: v.copy() for k, v in clean.items()}
    noisy["audio"][1, 9_000:] = np.random.default_rng(6).standard_normal(7_000)
    want, got = vectors(pad(clean)), vectors(pad(noisy))
    assert sorted(got) == sorted(want)
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, rtol=1e-5, atol=1e-6)


def test_a_window_not_finite_in_any_one_layer_is_not_written() -> None:
    """A window's rows are written for every layer or for none: a NaN in one layer's vector
    drops the window (an ``or`` across layers would write the other layer's row and the
    NaN one)."""
    nan, inf = float("nan"), float("inf")
    pooled = {0: np.array([[1.0, 2.0], [nan, 1.0], [1.0, 1.0]], np.float32),
              1: np.array([[1.0, 2.0], [1.0, 1.0], [inf, 1.0]], np.float32)}
    assert _finite_rows(pooled).tolist() == [True, False, False]


def test_an_actor_of_a_job_on_a_cluster_advises_for_a_cluster(tmp_path) -> None:
    """An actor that cannot have the weights says what reaches every node (its own cache
    is its node's alone); on a local Ray, the local advice."""
    from pipeline.errors import WeightsUnavailableError

    spec = EmbedSpec(model_name="beats", weights=str(tmp_path / "gone.safetensors"),
                     options=TINY_BEATS, storage_options={}, layers=(0,), pooling="mean",
                     precision="fp32", sample_rate_hz=16_000, tail="pad",
                     min_input_samples=2_800, use_gpu=False, torch_threads=1, on_cluster=True)
    with pytest.raises(WeightsUnavailableError, match="every node read model.weights"):
        Embedder(spec)
    with pytest.raises(WeightsUnavailableError) as local:
        Embedder(EmbedSpec(**{**spec.__dict__, "on_cluster": False}))
    assert "cluster" not in str(local.value)


def test_a_batch_with_a_report_row_is_not_copied_before_its_one_copy(
        embedder: Embedder) -> None:
    """Most batches of an archive of short clips hold a recording's report row (a 5-s clip
    is one window and one report). Its windows are picked as they are copied into the
    staging buffer; selecting them first copied the batch's audio once more (on a GPU, a
    batch of 256 BEATs windows is 82 MB, copied on the actor's critical path)."""
    import tracemalloc

    mixed = stage_batch(64, report_at=10)
    embedder(mixed)  # the staging buffer exists from here on
    tracemalloc.start()  # numpy's allocations are traced; torch's are not
    try:
        embedder(mixed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < mixed["audio"].nbytes / 4, (peak, mixed["audio"].nbytes)


@pytest.mark.parametrize(("share", "gib", "fraction"), [
    (0.25, 16, 0.25 - 0.5 / 16),   # a quarter of a T4-class card: 3.5 GiB to the allocator
    (0.25, 80, 0.25 - 0.5 / 80),   # of an H100: the same half GiB left, not 5 % of 20 GiB
    (0.1, 4, 0.05),                # a context larger than half the share: half the share
])
def test_actors_sharing_a_gpu_each_leave_one_cuda_context_of_their_share(
        share: float, gib: int, fraction: float) -> None:
    from pipeline.stages import gpu_memory_fraction

    assert gpu_memory_fraction(share, gib * 2**30) == pytest.approx(fraction)
