"""Front ends against textbook float64 references and against torchaudio/avex (golden)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models import frontends
from pipeline.models.frontends import (
    KaldiFbank,
    LogMelSpectrogram,
    by_row_chunks,
    htk_mel_banks,
    kaldi_mel_banks,
)
from tests.unit.models import reference_frontends as ref
from tests.unit.models.conftest import golden

BEATS_MEAN, BEATS_STD = 15.41663, 6.55582


@pytest.fixture(scope="module")
def kaldi_reference(golden_audio: torch.Tensor) -> np.ndarray:
    return np.stack([ref.kaldi_fbank(row * 2**15) for row in golden_audio.numpy()])


@pytest.fixture(scope="module")
def htk_reference(golden_audio: torch.Tensor) -> np.ndarray:
    return np.stack([ref.htk_log_mel(row) for row in golden_audio.numpy()])


def test_kaldi_fbank_matches_textbook_reference(golden_audio, kaldi_reference):
    ours = KaldiFbank()(golden_audio * 2**15).double().numpy()
    assert ours.shape == kaldi_reference.shape == (2, 298, 128)
    diff = np.abs(ours - kaldi_reference)
    # Bands within 12 nats (a factor 1.6e5 in energy) of the frame's loudest band agree to
    # float32 precision; the remaining error is float32 FFT rounding in near-silent bands
    # (torchaudio's own fbank is 5.7e-3 from the float64 reference on this input).
    near_peak = kaldi_reference.max(axis=-1, keepdims=True) - kaldi_reference < 12.0
    assert diff[near_peak].max() < 1e-4
    assert np.quantile(diff, 0.999) < 1e-3
    assert diff.max() < 5e-3


def test_kaldi_fbank_matches_torchaudio_golden(golden_audio, kaldi_reference):
    torchaudio_fbank = golden("beats")["fbank_kaldi"]
    ours = KaldiFbank()(golden_audio * 2**15).numpy()
    # torchaudio (float32 throughout, per-row) is the less accurate of the two: its error
    # against the float64 reference dominates this difference.
    near_peak = kaldi_reference.max(axis=-1, keepdims=True) - kaldi_reference < 12.0
    assert np.abs(ours - torchaudio_fbank)[near_peak].max() < 1e-3
    assert np.abs(ours - torchaudio_fbank).max() < 1e-2


def test_htk_log_mel_matches_textbook_reference(golden_audio, htk_reference):
    frontend = LogMelSpectrogram()
    log_mel = frontend.log_mel(golden_audio).double().numpy()
    assert log_mel.shape == htk_reference.shape == (2, 128, 301)
    assert np.abs(log_mel - htk_reference).max() < 1e-3
    normalised = frontend(golden_audio).double().numpy()
    expected = np.stack([ref.minmax(r) for r in htk_reference])
    assert np.abs(normalised - expected).max() < 1e-4


def test_log_mel_matches_avex_audio_processor_golden(golden_audio):
    avex = golden("effnet")["spectrogram"]
    assert np.abs(LogMelSpectrogram()(golden_audio).numpy() - avex).max() < 1e-4


def test_filterbanks_have_expected_support():
    kaldi = kaldi_mel_banks(512, 128, 16000.0, 20.0, 8000.0).numpy()
    assert kaldi.shape == (257, 128)
    assert kaldi[-1].sum() == 0.0  # Nyquist bin unused, as in Kaldi
    assert kaldi.max() <= 1.0
    # 128 Kaldi bands on a 512-point FFT: band 3 (about 60-95 Hz) falls between two FFT bins
    # and is empty, as in Kaldi itself (its log energy is the float32-eps floor).
    assert np.flatnonzero(kaldi.sum(axis=0) == 0).tolist() == [3]
    htk = htk_mel_banks(401, 128, 16000).numpy()
    assert htk.shape == (401, 128) and (htk.sum(axis=0) > 0).all() and htk.max() <= 1.0


@pytest.mark.parametrize("frontend", [KaldiFbank(), LogMelSpectrogram()], ids=["kaldi", "htk"])
def test_front_ends_stay_float32_under_autocast(frontend, golden_audio):
    x = golden_audio * (2**15 if isinstance(frontend, KaldiFbank) else 1)
    plain = frontend(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = frontend(x.bfloat16())
    assert mixed.dtype == torch.float32
    # the only difference is the bf16 rounding of the input samples themselves
    assert torch.allclose(mixed, frontend(x.bfloat16().float()), atol=0, rtol=0)
    assert plain.dtype == torch.float32


def test_masked_minmax_uses_real_frames_only(golden_audio):
    frontend = LogMelSpectrogram()
    frames = frontend.num_frames(golden_audio.shape[-1])
    real = torch.ones(2, frames, dtype=torch.bool)
    assert torch.equal(frontend(golden_audio, real), frontend(golden_audio))
    real[1, 200:] = False
    out = frontend(golden_audio, real)
    assert torch.equal(out[0], frontend(golden_audio)[0])
    assert out[1, :, :200].min() == 0.0 and out[1, :, :200].max() == pytest.approx(1.0, abs=1e-6)
    assert (out[1, :, 200:] == 0).all()


def test_by_row_chunks_splits_cpu_batches_and_passes_none_through(monkeypatch):
    monkeypatch.setattr(frontends, "CPU_CHUNK_BYTES", 3 * 100)
    seen: list[tuple[int, bool]] = []

    def twice(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        seen.append((len(x), extra is None))
        return (x * 2).sum(dim=1, keepdim=True)

    x = torch.arange(8 * 5, dtype=torch.float32).reshape(8, 5)
    out = by_row_chunks(twice, x, None, row_bytes=100)
    assert seen == [(3, True), (3, True), (2, True)]
    assert torch.equal(out, (x * 2).sum(dim=1, keepdim=True))
    seen.clear()
    by_row_chunks(twice, x.to("meta"), None, row_bytes=100)  # not a CPU: one call, whole
    assert seen == [(8, True)]


@pytest.mark.parametrize("frontend", [KaldiFbank(), LogMelSpectrogram()], ids=["kaldi", "htk"])
def test_cpu_chunks_give_the_whole_batch_result(frontend, monkeypatch):
    """A CPU batch goes through a few examples at a time; the result is the batch's."""
    audio = torch.from_numpy(np.random.default_rng(3).standard_normal((7, 48_000)) * 0.1).float()
    if isinstance(frontend, KaldiFbank):
        audio = audio * 2**15
    rows = frontends.CPU_CHUNK_BYTES // (frontend.num_frames(48_000) * frontend.n_fft * 4)
    assert 1 <= rows < 7  # the batch really is split
    chunked = frontend(audio)
    monkeypatch.setattr(frontends, "CPU_CHUNK_BYTES", 2**40)
    whole = frontend(audio)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_cpu_chunks_keep_each_examples_real_frames(monkeypatch):
    frontend = LogMelSpectrogram()
    audio = torch.from_numpy(np.random.default_rng(4).standard_normal((7, 48_000)) * 0.1).float()
    frames = frontend.num_frames(48_000)
    real = torch.ones(7, frames, dtype=torch.bool)
    for row in range(7):
        real[row, frames - 20 * row:] = False
    chunked = frontend(audio, real)
    monkeypatch.setattr(frontends, "CPU_CHUNK_BYTES", 2**40)
    torch.testing.assert_close(chunked, frontend(audio, real), rtol=1e-6, atol=1e-6)
    assert (chunked[6, :, frames - 120:] == 0).all()
