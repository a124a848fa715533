"""Textbook float64 numpy front ends, written from the Kaldi / HTK definitions.

They share no code with :mod:`pipeline.models.frontends` and loop where the definitions
loop, so they are slow but easy to check by eye.
"""

from __future__ import annotations

import numpy as np

KALDI_EPS = np.finfo(np.float32).eps


def _kaldi_mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def kaldi_fbank(wave: np.ndarray, sample_rate: int = 16000, num_mel_bins: int = 128,
                frame_ms: float = 25.0, shift_ms: float = 10.0, preemph: float = 0.97,
                low_hz: float = 20.0) -> np.ndarray:
    """Kaldi ``compute-fbank-feats`` defaults as BEATs uses them; ``wave`` already scaled.

    Returns:
        ``[frames, num_mel_bins]`` log mel energies.
    """
    wave = np.asarray(wave, dtype=np.float64)
    length = int(sample_rate * frame_ms / 1000)
    shift = int(sample_rate * shift_ms / 1000)
    n_fft = 1
    while n_fft < length:
        n_fft *= 2
    num_frames = 1 + (len(wave) - length) // shift
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))) ** 0.85
    # Kaldi MelBanks: triangles equally spaced in mel between low_hz and Nyquist.
    mel_lo, mel_hi = _kaldi_mel(low_hz), _kaldi_mel(sample_rate / 2)
    delta = (mel_hi - mel_lo) / (num_mel_bins + 1)
    banks = np.zeros((num_mel_bins, n_fft // 2 + 1))
    for m in range(num_mel_bins):
        left, center, right = (mel_lo + k * delta for k in (m, m + 1, m + 2))
        for j in range(n_fft // 2):  # the Nyquist bin keeps weight 0
            mel = _kaldi_mel(j * sample_rate / n_fft)
            if left < mel < right:
                banks[m, j] = (mel - left) / (center - left) if mel <= center else \
                    (right - mel) / (right - center)
    out = np.empty((num_frames, num_mel_bins))
    for i in range(num_frames):
        frame = wave[i * shift:i * shift + length].copy()
        frame -= frame.mean()
        for n in range(length - 1, 0, -1):
            frame[n] -= preemph * frame[n - 1]
        frame[0] -= preemph * frame[0]
        padded = np.zeros(n_fft)
        padded[:length] = frame * window
        power = np.abs(np.fft.rfft(padded)) ** 2
        out[i] = np.log(np.maximum(banks @ power, KALDI_EPS))
    return out


def _htk_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _htk_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def htk_log_mel(wave: np.ndarray, sample_rate: int = 16000, n_fft: int = 800, hop: int = 160,
                n_mels: int = 128) -> np.ndarray:
    """Centred reflect-padded STFT, periodic Hann, power, HTK mel (no norm), log(x + 1e-6).

    Returns:
        ``[n_mels, frames]``.
    """
    wave = np.asarray(wave, dtype=np.float64)
    padded = np.pad(wave, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    num_frames = 1 + len(wave) // hop
    freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    corners = _htk_hz(np.linspace(_htk_mel(0.0), _htk_mel(sample_rate / 2), n_mels + 2))
    banks = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        left, center, right = corners[m], corners[m + 1], corners[m + 2]
        rising = (freqs - left) / (center - left)
        falling = (right - freqs) / (right - center)
        banks[m] = np.clip(np.minimum(rising, falling), 0.0, None)
    out = np.empty((n_mels, num_frames))
    for i in range(num_frames):
        power = np.abs(np.fft.rfft(padded[i * hop:i * hop + n_fft] * window)) ** 2
        out[:, i] = np.log(banks @ power + 1e-6)
    return out


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] over the whole array (avex ``AudioProcessor._normalize``)."""
    return (x - x.min()) / (x.max() - x.min() + 1e-8)
