"""Audio front ends: waveform batches in, log-mel feature batches out.

Both front ends are ``nn.Module`` s whose constant tensors (window, mel matrix) are
buffers, so they follow the network to its device and a batch never leaves it. They
always compute in float32, even inside an autocast region: in bf16 the log-mel values
drift by several hundredths, which is large next to what the networks resolve.

* :class:`KaldiFbank` reproduces ``torchaudio.compliance.kaldi.fbank`` with the settings
  BEATs uses (what avex's ``_BatchedFbank`` computes), batched.
* :class:`LogMelSpectrogram` reproduces avex's ``AudioProcessor`` for
  ``representation="mel_spectrogram", normalize=True`` (the EfficientNet front end):
  ``torch.stft`` power spectrum, torchaudio's HTK ``MelScale`` defaults, ``log(x + 1e-6)``
  and a per-example min-max scaling to ``[0, 1]``.

Neither imports torchaudio: the filterbanks are built here from their textbook
definitions, in float64, then stored as float32.

On a CPU both run a batch a few examples at a time (:func:`by_row_chunks`): every example's
features depend on its own samples only, and whole-batch intermediates (a batch of 16 5-s
windows holds five buffers of 8-16 MB: frames, pre-emphasis, padding, the complex FFT, its
power) are slower than cache-sized ones and leave the actor's heap fragmented, so its
memory wanders from batch to batch. On an accelerator the batch goes through whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FLOAT32_EPS = float(np.finfo(np.float32).eps)
"""Kaldi's log floor: energies below float32 epsilon are clamped to it before the log."""

LOG_OFFSET = 1e-6
"""avex ``AudioProcessor``: ``log(power + 1e-6)``."""

MINMAX_EPS = 1e-8
"""avex ``AudioProcessor``: added to ``max - min`` before dividing."""

CPU_CHUNK_BYTES = 2 * 2**20
"""On a CPU, front ends work on as many examples at once as keep their largest intermediate
(the framed signal, its FFT) near this size: about 2 windows of 5 s at 16 kHz. Measured on
16 such windows, one thread: the Kaldi fbank in 65 ms whole, 30 ms by 1 or 2, 35 ms by 4,
45 ms by 8, bit-identical."""


def by_row_chunks(fn: Callable[..., torch.Tensor], x: torch.Tensor, *more: torch.Tensor | None,
                  row_bytes: int) -> torch.Tensor:
    """``fn(x, *more)``, on a CPU computed over chunks of rows into one output tensor.

    Args:
        fn: a function of ``[b, ...]`` tensors whose output rows depend on the same rows of
            its inputs only.
        x: ``[B, ...]`` input.
        *more: further ``[B, ...]`` inputs split the same way (``None`` passes through).
        row_bytes: bytes of ``fn``'s largest intermediate per row.

    Returns:
        ``fn``'s ``[B, ...]`` output, whole.
    """
    rows = max(1, CPU_CHUNK_BYTES // max(1, row_bytes))
    if x.device.type != "cpu" or len(x) <= rows:
        return fn(x, *more)
    out: torch.Tensor | None = None
    for start in range(0, len(x), rows):
        stop = start + rows
        part = fn(x[start:stop], *(m if m is None else m[start:stop] for m in more))
        if out is None:
            out = part.new_empty((len(x), *part.shape[1:]))
        out[start:stop] = part
    assert out is not None
    return out


def kaldi_mel(freq_hz: np.ndarray | float) -> np.ndarray:
    """Kaldi's mel scale, ``1127 * ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(freq_hz, dtype=np.float64) / 700.0)


def povey_window(length: int) -> torch.Tensor:
    """Kaldi's "povey" window: a symmetric Hann window raised to the power 0.85.

    Args:
        length: window length in samples.

    Returns:
        float32 ``[length]``.
    """
    n = np.arange(length, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / (length - 1))
    return torch.from_numpy(hann**0.85).float()


def kaldi_mel_banks(
    n_fft: int, n_mels: int, sample_rate_hz: float, low_freq_hz: float, high_freq_hz: float
) -> torch.Tensor:
    """Kaldi's triangular mel filterbank (``MelBanks`` without VTLN warping).

    Triangles are equally spaced on the Kaldi mel scale between ``low_freq_hz`` and
    ``high_freq_hz``; FFT bin ``j`` sits at ``j * sample_rate / n_fft`` Hz. The Nyquist
    bin gets weight 0, as in Kaldi.

    Args:
        n_fft: FFT size (the padded frame length).
        n_mels: number of triangles.
        sample_rate_hz: sampling rate.
        low_freq_hz: lower edge of the first triangle.
        high_freq_hz: upper edge of the last triangle.

    Returns:
        float32 ``[n_fft // 2 + 1, n_mels]``.
    """
    mel_low, mel_high = kaldi_mel(low_freq_hz), kaldi_mel(high_freq_hz)
    delta = (mel_high - mel_low) / (n_mels + 1)
    edges = mel_low + delta * np.arange(n_mels + 2, dtype=np.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bin_mel = kaldi_mel(np.arange(n_fft // 2, dtype=np.float64) * sample_rate_hz / n_fft)[None, :]
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))  # [n_mels, n_fft // 2]
    banks = np.pad(banks, ((0, 0), (0, 1)))  # Nyquist column
    return torch.from_numpy(banks.T.copy()).float()


def htk_mel_banks(n_freqs: int, n_mels: int, sample_rate_hz: int, f_min_hz: float = 0.0,
                  f_max_hz: float | None = None) -> torch.Tensor:
    """HTK mel filterbank with torchaudio ``MelScale`` defaults (no area normalisation).

    Triangle corners are ``n_mels + 2`` points equally spaced on the HTK mel scale
    (``2595 * log10(1 + f / 700)``) between ``f_min_hz`` and ``f_max_hz``; STFT bin ``j``
    sits at ``j * (sample_rate // 2) / (n_freqs - 1)`` Hz.

    Args:
        n_freqs: STFT bins (``n_fft // 2 + 1``).
        n_mels: number of triangles.
        sample_rate_hz: sampling rate.
        f_min_hz: lowest corner.
        f_max_hz: highest corner; ``None`` means ``sample_rate // 2``.

    Returns:
        float32 ``[n_freqs, n_mels]``.
    """
    f_max = float(sample_rate_hz // 2) if f_max_hz is None else f_max_hz
    bin_hz = np.linspace(0.0, sample_rate_hz // 2, n_freqs)
    mel_min, mel_max = (2595.0 * np.log10(1.0 + f / 700.0) for f in (f_min_hz, f_max))
    corners_hz = 700.0 * (10.0 ** (np.linspace(mel_min, mel_max, n_mels + 2) / 2595.0) - 1.0)
    widths = np.diff(corners_hz)
    slopes = corners_hz[None, :] - bin_hz[:, None]  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return torch.from_numpy(np.maximum(0.0, np.minimum(down, up))).float()


def kaldi_num_frames(num_samples: int, frame_length: int, frame_shift: int) -> int:
    """Frames Kaldi makes from ``num_samples`` with ``snip_edges=True`` (0 if too short)."""
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


class KaldiFbank(nn.Module):
    """Batched log-mel filterbank, numerically ``torchaudio.compliance.kaldi.fbank``.

    Settings are Kaldi's defaults except those named here: ``snip_edges=True``,
    ``dither=0``, per-frame DC removal, pre-emphasis with Kaldi's replicate-first-sample
    convention, povey window, zero padding to the next power of two, power spectrum,
    Kaldi mel banks, and ``log(max(energy, float32 eps))``.

    Buffers (persistent, so the state dict matches avex's ``BEATs.fbank``):
        window: float32 ``[frame_length]``, the povey window.
        mel_fb: float32 ``[n_fft // 2 + 1, num_mel_bins]``, the mel matrix.
    """

    window: torch.Tensor
    mel_fb: torch.Tensor

    def __init__(self, num_mel_bins: int = 128, sample_rate_hz: float = 16000.0,
                 frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                 preemphasis: float = 0.97, low_freq_hz: float = 20.0,
                 high_freq_hz: float = 0.0) -> None:
        """Build the window and the mel matrix.

        Args:
            num_mel_bins: mel bands.
            sample_rate_hz: sampling rate of the input.
            frame_length_ms: frame length (25 ms = 400 samples at 16 kHz).
            frame_shift_ms: hop (10 ms = 160 samples at 16 kHz).
            preemphasis: pre-emphasis coefficient.
            low_freq_hz: lower edge of the mel range.
            high_freq_hz: upper edge; ``<= 0`` is an offset from Nyquist (Kaldi convention).
        """
        super().__init__()
        self.frame_length = int(sample_rate_hz * frame_length_ms / 1000.0)
        self.frame_shift = int(sample_rate_hz * frame_shift_ms / 1000.0)
        self.n_fft = 1 << (self.frame_length - 1).bit_length()
        self.preemphasis = preemphasis
        if high_freq_hz <= 0.0:
            high_freq_hz += sample_rate_hz / 2.0
        self.register_buffer("window", povey_window(self.frame_length))
        self.register_buffer(
            "mel_fb",
            kaldi_mel_banks(self.n_fft, num_mel_bins, sample_rate_hz, low_freq_hz, high_freq_hz),
        )

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for an input of ``num_samples`` samples."""
        return kaldi_num_frames(num_samples, self.frame_length, self.frame_shift)

    def row_bytes(self, num_samples: int) -> int:
        """Bytes of the largest intermediate per example (its frames padded to the FFT)."""
        return self.num_frames(num_samples) * self.n_fft * 4

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Log-mel energies (on a CPU a few examples at a time, see :func:`by_row_chunks`).

        Args:
            waveforms: ``[B, T]`` samples, already in the scale Kaldi expects (BEATs
                multiplies [-1, 1] audio by ``2**15``). Any float dtype; computed in float32.

        Returns:
            float32 ``[B, num_frames, num_mel_bins]``.
        """
        return by_row_chunks(self._fbank, waveforms,
                             row_bytes=self.row_bytes(waveforms.shape[-1]))

    def _fbank(self, waveforms: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            frames = waveforms.float().unfold(-1, self.frame_length, self.frame_shift)
            frames = frames - frames.mean(dim=-1, keepdim=True)
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
            frames = (frames - self.preemphasis * previous) * self.window
            frames = F.pad(frames, (0, self.n_fft - self.frame_length))
            power = torch.fft.rfft(frames).abs().pow(2.0)
            return torch.matmul(power, self.mel_fb).clamp(min=FLOAT32_EPS).log()


class LogMelSpectrogram(nn.Module):
    """avex's ``AudioProcessor`` (``mel_spectrogram``, ``normalize=True``), batched.

    ``torch.stft`` (centred, reflect padding, periodic Hann window) -> power -> HTK mel
    -> ``log(x + 1e-6)`` -> per-example min-max to ``[0, 1]`` over (mel, time).

    Buffers are non-persistent: avex's processor is not a module, so its tensors are not
    part of the EfficientNet state dict.
    """

    window: torch.Tensor
    mel_fb: torch.Tensor

    def __init__(self, sample_rate_hz: int = 16000, n_fft: int = 800, hop_length: int = 160,
                 win_length: int = 800, n_mels: int = 128) -> None:
        """Build the window and the mel matrix.

        Args:
            sample_rate_hz: sampling rate of the input.
            n_fft: FFT size.
            hop_length: STFT hop in samples.
            win_length: Hann window length in samples.
            n_mels: mel bands (0 Hz to Nyquist).
        """
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.register_buffer("mel_fb", htk_mel_banks(n_fft // 2 + 1, n_mels, sample_rate_hz),
                             persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """STFT frames for ``num_samples`` samples (centred: one per hop, plus one)."""
        return num_samples // self.hop_length + 1

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Unnormalised ``log(mel power + 1e-6)``.

        Args:
            waveforms: ``[B, T]`` audio in [-1, 1], ``T > n_fft // 2`` (reflect padding).

        Returns:
            float32 ``[B, n_mels, num_frames(T)]``.
        """
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            spec = torch.stft(waveforms.float(), n_fft=self.n_fft, hop_length=self.hop_length,
                              win_length=self.win_length, window=self.window, center=True,
                              return_complex=True)
            power = spec.abs().pow(2)
            return torch.log(torch.matmul(power.transpose(-1, -2), self.mel_fb) + LOG_OFFSET
                             ).transpose(-1, -2)

    def forward(self, waveforms: torch.Tensor, real_frames: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Normalised log-mel spectrogram (on a CPU a few examples at a time).

        Args:
            waveforms: ``[B, T]`` audio in [-1, 1].
            real_frames: optional bool ``[B, num_frames(T)]``, ``True`` for frames of real
                audio. When given, each example's min and max are taken over its real
                frames only and padded frames are set to 0 (the real minimum). ``None``
                is avex's behaviour: statistics over every frame.

        Returns:
            float32 ``[B, n_mels, num_frames(T)]``, in ``[0, 1]`` on real frames.
        """
        # The centred STFT's complex output, per example: frames x (n_fft / 2 + 1) x 8 bytes.
        row_bytes = self.num_frames(waveforms.shape[-1]) * (self.n_fft // 2 + 1) * 8
        return by_row_chunks(self._normalised, waveforms, real_frames, row_bytes=row_bytes)

    def _normalised(self, waveforms: torch.Tensor, real_frames: torch.Tensor | None
                    ) -> torch.Tensor:
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            x = self.log_mel(waveforms)
            if real_frames is None:
                low = x.amin(dim=(-2, -1), keepdim=True)
                high = x.amax(dim=(-2, -1), keepdim=True)
                return (x - low) / (high - low + MINMAX_EPS)
            real = real_frames[:, None, :]
            low = x.masked_fill(~real, math.inf).amin(dim=(-2, -1), keepdim=True)
            high = x.masked_fill(~real, -math.inf).amax(dim=(-2, -1), keepdim=True)
            return ((x - low) / (high - low + MINMAX_EPS)).masked_fill(~real, 0.0)
