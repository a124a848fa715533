"""Deterministic pseudo-random checkpoints and inputs shared by the golden script and tests.

``make_golden.py`` (run in a venv with avex) and the unit tests (no avex) both import this
module, so the same tensor names always get the same values: each tensor is drawn from
its own generator seeded by ``(seed, crc32(name))``, independent of key order and of
which other keys exist. Only numpy (and soundfile for the real clip) is used.

Scales are chosen so that activations stay in a sensible range and keep depending on the
input through the networks: norm weights near 1, small biases, ``1/sqrt(fan_in)`` linear
layers, weight-norm magnitudes the norm of their direction tensor times 0.5-2 per tap
(times 1 would make the weight the direction itself, and no test could see a magnitude
that is ignored or mapped wrongly), BatchNorm
statistics near (0, 1), and 2-D convolutions at 1.3 times the He-normal variance, which
(tuned by measurement) keeps EfficientNet's activations near 0.05-0.3 at every stage
instead of vanishing (gain 1.0) or exploding (gain 1.5) with random BatchNorm statistics.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

SEED = 20240607
SAMPLE_RATE_HZ = 16_000
CLIP_SECONDS = 3.0
REAL_CLIP = "perch/chirp/tests/testdata/21100_36_48.wav"
REAL_CLIP_OFFSET_S = 2.0
NATURELM_GAIN = 4.0
"""The NatureLM golden input is the batch times this gain, so clamping to [-1, 1] matters."""

CONV_VARIANCE_GAIN = 1.3

_TIED = re.compile(r"layers\.\d+\.self_attn\.relative_attention_bias")
_WEIGHT_NORM_G = ".parametrizations.weight.original0"
_WEIGHT_NORM_V = ".parametrizations.weight.original1"


def _rng(seed: int, name: str) -> np.random.Generator:
    # BEATs shares one relative position table across layers: give every alias one value.
    canonical = _TIED.sub("layers.0.self_attn.relative_attention_bias", name)
    return np.random.default_rng([seed, zlib.crc32(canonical.encode())])


def _fan_in(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def generate_tensor(name: str, shape: tuple[int, ...], seed: int = SEED) -> np.ndarray:
    """One tensor of the pseudo-random checkpoint (weight-norm magnitudes excepted).

    Args:
        name: state-dict key (decides the scale and, with ``seed``, the values).
        shape: tensor shape.
        seed: checkpoint seed.

    Returns:
        float32 array (int64 for BatchNorm's ``num_batches_tracked``).
    """
    rng = _rng(seed, name)
    if name.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    if name.endswith("running_mean"):
        values = 0.02 * rng.standard_normal(shape)
    elif name.endswith("running_var"):
        values = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("relative_attention_bias.weight"):
        values = 0.5 * rng.standard_normal(shape)
    elif name.endswith("grep_a") or (name.endswith("weight") and len(shape) == 1):
        values = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith("bias"):
        values = 0.02 * rng.standard_normal(shape)
    elif len(shape) == 4:  # 2-D convolutions
        values = rng.standard_normal(shape) * math.sqrt(2.0 * CONV_VARIANCE_GAIN / _fan_in(shape))
    else:
        values = rng.standard_normal(shape) / math.sqrt(_fan_in(shape))
    return values.astype(np.float32)


def generate_state_dict(shapes: Mapping[str, tuple[int, ...]], seed: int = SEED,
                        skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A pseudo-random checkpoint for the given key -> shape layout.

    A weight-norm magnitude (``...original0``, dim 2) is the norm of its direction
    tensor (``...original1``) over dims 0 and 1 times a factor of 0.5-2 per tap, so the
    effective weight is the direction scaled tap by tap.

    Args:
        shapes: state-dict keys and shapes (e.g. from ``module.state_dict()``).
        seed: checkpoint seed.
        skip: substrings of keys to leave out (deterministic buffers such as ``fbank.``).

    Returns:
        key -> numpy array.
    """
    out = {}
    for name, shape in shapes.items():
        if any(s in name for s in skip):
            continue
        if name.endswith(_WEIGHT_NORM_G):
            v_name = name.replace(_WEIGHT_NORM_G, _WEIGHT_NORM_V)
            direction = generate_tensor(v_name, tuple(shapes[v_name]), seed).astype(np.float64)
            norm = np.sqrt((direction**2).sum(axis=(0, 1), keepdims=True))
            out[name] = (norm * _rng(seed, name).uniform(0.5, 2.0, norm.shape)).astype(np.float32)
        else:
            out[name] = generate_tensor(name, tuple(shape), seed)
    return out


def shared_root() -> Path:
    """The shared data folder (``$EMBED_ARCHIVE_SHARED`` or ``../shared`` beside the repo)."""
    repo = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("EMBED_ARCHIVE_SHARED", repo.parent / "shared"))


def real_clip(seconds: float = CLIP_SECONDS) -> np.ndarray:
    """``seconds`` of a real 16 kHz field recording (perch test clip), float32 mono."""
    import soundfile as sf

    path = shared_root() / "data" / "real" / REAL_CLIP
    start = int(REAL_CLIP_OFFSET_S * SAMPLE_RATE_HZ)
    audio, rate = sf.read(path, start=start, frames=int(seconds * SAMPLE_RATE_HZ),
                          dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE_HZ:
        raise ValueError(f"{path} is {rate} Hz, expected {SAMPLE_RATE_HZ}")
    return audio[:, 0]


def synthetic_clip(seconds: float = CLIP_SECONDS) -> np.ndarray:
    """A deterministic chirp (300 Hz -> 6 kHz), two tone bursts and light noise, float32."""
    rng = np.random.default_rng(SEED)
    t = np.arange(int(seconds * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
    f0, f1 = 300.0, 6000.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    bursts = sum(0.3 * np.sin(2 * np.pi * f * t) * ((t > a) & (t < a + 0.4))
                 for f, a in ((1500.0, 0.5), (3200.0, 1.8)))
    audio = 0.3 * np.sin(phase) + bursts + 0.01 * rng.standard_normal(len(t))
    return audio.astype(np.float32)


def golden_batch() -> np.ndarray:
    """The golden input ``[2, 48000]``: the real clip and the synthetic clip."""
    return np.stack([real_clip(), synthetic_clip()])
