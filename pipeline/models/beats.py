"""BEATs (Chen et al. 2022, https://arxiv.org/abs/2212.09058), laid out like avex's model.

The module tree, parameter names and shapes are those of avex 1.4's BEATs wrapper, so the
ESP-AVES2 checkpoints load strictly:

* ``backbone`` -- :class:`BEATs`: Kaldi fbank front end (``fbank.window``,
  ``fbank.mel_fb``), 16x16 patch embedding, LayerNorm, projection to the encoder width,
  a convolutional positional embedding (weight norm via
  ``torch.nn.utils.parametrizations``), and post-LN transformer blocks with DeepNorm
  residual scaling and a gated relative position bias shared by all blocks.
  ``backbone.predictor`` exists when a checkpoint's AudioSet head is kept.
* ``classifier`` -- optional linear head on mean-pooled features (avex's fine-tuned models).

This implementation is for inference: dropout, LayerDrop and layer-wise gradient decay
are training-time settings; they are kept in :class:`BeatsConfig` (so configs round-trip)
but have no effect.

Tokens are time-major: the fbank ``[frames, 128]`` is cut into 16x16 patches, giving
``steps = frames // 16`` time steps of ``128 / 16 = 8`` frequency patches; token
``n = 8 * step + patch``. Step ``t`` starts at fbank frame ``16 t``, i.e. sample
``16 t * 160`` at 16 kHz, and lasts 160 ms.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from pipeline.errors import ConfigError
from pipeline.models.base import TokenFeatures
from pipeline.models.frontends import KaldiFbank, by_row_chunks
from pipeline.models.masks import starts_mask, valid_from_padding_mask, zero_padding
from pipeline.models.pooling import pool

KALDI_INPUT_SCALE = 2.0**15
"""BEATs feeds Kaldi 16-bit-scaled samples: audio in [-1, 1] times 32768."""

SPECTRA_KEPT = 3
"""FFT sizes whose positional-kernel spectra an encoder keeps (see ``_spectral_pos_conv``)."""

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu,
                                                                    "relu": F.relu}


@dataclasses.dataclass(frozen=True)
class BeatsConfig:
    """BEATs architecture and front-end settings (field names as avex's ``BEATsConfig``).

    Defaults are the BEATs iter3 SSL model. Training-only fields (dropouts, LayerDrop,
    ``layer_wise_gradient_decay_ratio``) are recorded but unused here.
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.05
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    sample_frequency: float = 16000.0
    num_mel_bins: int = 128
    frame_length: float = 25.0
    frame_shift: float = 10.0
    fbank_mean: float = 15.41663
    fbank_std: float = 6.55582
    finetuned_model: bool = False
    predictor_dropout: float = 0.0
    predictor_class: int = 527

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every configurable key."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def updated(self, values: Mapping[str, Any], *, ignore_unknown: bool = False,
                source: str = "model.options") -> BeatsConfig:
        """A copy with ``values`` applied, validated.

        Args:
            values: field -> value.
            ignore_unknown: skip keys that are not fields (checkpoint configs carry extra
                training keys); otherwise they are an error.
            source: where the values came from, for messages.

        Returns:
            The new config.

        Raises:
            ConfigError: unknown keys (unless ignored) or an unsupported architecture.
        """
        names = set(self.field_names())
        unknown = sorted(set(values) - names)
        if unknown and not ignore_unknown:
            raise ConfigError(f"unknown BEATs option(s) {unknown}; valid options: "
                              f"{sorted(names)}", source)
        known = {k: v for k, v in values.items() if k in names}
        if not ignore_unknown:  # a user's options; a checkpoint's cfg is taken as it was saved
            known = {k: _option_of_type(k, v, getattr(self, k), source) for k, v in known.items()}
        cfg = dataclasses.replace(self, **known)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "model.options") -> None:
        """Reject settings this implementation does not support.

        Raises:
            ConfigError: naming the offending setting.
        """
        if self.layer_norm_first:
            raise ConfigError("layer_norm_first=True (pre-LN BEATs) is not supported; the "
                              "published BEATs and ESP-AVES2 models are post-LN", source)
        if self.activation_fn not in _ACTIVATIONS:
            raise ConfigError(f"activation_fn {self.activation_fn!r} is not supported; use "
                              f"one of {sorted(_ACTIVATIONS)}", source)
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ConfigError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                              f"encoder_attention_heads {self.encoder_attention_heads}", source)
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ConfigError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                              f"conv_pos_groups {self.conv_pos_groups}", source)
        if self.num_mel_bins % self.input_patch_size:
            raise ConfigError(f"num_mel_bins {self.num_mel_bins} is not a multiple of "
                              f"input_patch_size {self.input_patch_size}", source)
        if self.encoder_layers < 1:
            raise ConfigError("encoder_layers must be at least 1", source)

    @property
    def hop_samples(self) -> int:
        """Fbank frame shift in samples."""
        return int(self.sample_frequency * self.frame_shift / 1000.0)

    @property
    def frame_samples(self) -> int:
        """Fbank frame length in samples."""
        return int(self.sample_frequency * self.frame_length / 1000.0)

    @property
    def patches_per_step(self) -> int:
        """Frequency patches (tokens) per time step."""
        return self.num_mel_bins // self.input_patch_size

    @property
    def step_samples(self) -> int:
        """Samples between consecutive token steps (2560 = 160 ms at 16 kHz)."""
        return self.input_patch_size * self.hop_samples

    @property
    def min_input_samples(self) -> int:
        """Shortest input that yields one token step (16 fbank frames: 2800 at 16 kHz)."""
        return self.frame_samples + (self.input_patch_size - 1) * self.hop_samples

    def num_tokens(self, num_samples: int) -> int:
        """Tokens for an input of ``num_samples``: ``(frames // 16) * 8``."""
        if num_samples < self.frame_samples:
            return 0
        frames = 1 + (num_samples - self.frame_samples) // self.hop_samples
        return (frames // self.input_patch_size) * self.patches_per_step

    def layer_names(self) -> tuple[str, ...]:
        """Module paths of the capturable layers: the encoder input, then each block."""
        first = ("backbone.post_extract_proj" if self.embed_dim != self.encoder_embed_dim
                 else "backbone.layer_norm")
        return (first, *(f"backbone.encoder.layers.{i}" for i in range(self.encoder_layers)))



def _option_of_type(name: str, value: Any, default: Any, source: str) -> Any:
    """``value`` for the option ``name`` if it has the type of its ``default`` (an integer
    is a number too), else a ConfigError naming it: a string reaching the architecture
    failed deep inside it, with a TypeError."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"BEATs option {name} must be of type {type(default).__name__} "
                          f"(like its default, {default!r}), got {value!r}", source)
    return value


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5-style bidirectional buckets of ``key - query`` offsets (BEATs' float32 arithmetic).

    Half the buckets are for positive offsets; within each half, offsets below a quarter
    of ``num_buckets`` get their own bucket and larger ones share log-spaced buckets up to
    ``max_distance``.

    Args:
        length: sequence length ``N``.
        num_buckets: total buckets.
        max_distance: offset at which bucketing saturates.

    Returns:
        int64 ``[N, N]`` bucket of (query row, key column).
    """
    positions = torch.arange(length, dtype=torch.long)
    offsets = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = offsets.abs()
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (offsets > 0).long() * half + torch.where(distance < exact, distance, far)


def _smooth_size(n: int) -> int:
    """The smallest integer >= ``n`` with no prime factor above 5 (a fast FFT length)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


class _TrimLast(nn.Module):
    """Drop the last time step (the extra output of an even-width 'same' convolution)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :-1]


class BeatsAttention(nn.Module):
    """Multi-head self-attention with BEATs' gated relative position bias (via SDPA)."""

    def __init__(self, cfg: BeatsConfig, owns_bias_table: bool) -> None:
        """Create projections and, in block 0, the relative position table.

        Args:
            cfg: architecture.
            owns_bias_table: create ``relative_attention_bias`` here (block 0); later
                blocks are given the same module by :class:`BeatsEncoder`.
        """
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scaling = self.head_dim**-0.5
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        self.has_relative_bias = cfg.relative_position_embedding
        if self.has_relative_bias and owns_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, heads)
        self._buckets: torch.Tensor | None = None
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru_rel_pos = cfg.gru_rel_pos
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def position_bias(self, length: int) -> torch.Tensor:
        """Relative position bias ``[H, N, N]`` from the shared table.

        The bucket indices of the last length seen are kept on the table's device, so a
        stream of equal-length batches builds and uploads them once.
        """
        table: nn.Embedding = self.relative_attention_bias
        cached = self._buckets
        if cached is None or cached.shape[0] != length or cached.device != table.weight.device:
            # A normal tensor even when built under inference_mode: a later call with
            # gradients on (fine-tuning, saliency) must be able to save it for backward.
            with torch.inference_mode(False):
                cached = relative_position_buckets(length, self.num_buckets, self.max_distance)
                self._buckets = cached = cached.to(table.weight.device)
        return table(cached).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                position_bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend.

        Args:
            x: ``[B, N, D]``.
            key_padding_mask: bool ``[B, N]``, ``True`` for keys to ignore, or ``None``.
            position_bias: ``[H, N, N]`` from an earlier block, or ``None`` (computed here).

        Returns:
            ``([B, N, D], position_bias)``; the ungated bias is passed on to later blocks.
        """
        batch, length, dim = x.shape
        if self.has_relative_bias and position_bias is None:
            position_bias = self.position_bias(length)
        q, k, v = (proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        bias = self._gated_bias(q, position_bias) if position_bias is not None else None
        if key_padding_mask is not None:
            pad = torch.zeros(batch, 1, 1, length, device=x.device, dtype=torch.float32)
            pad = pad.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
            bias = pad if bias is None else bias + pad
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=self.scaling)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)), position_bias

    def _gated_bias(self, q: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        """Scale the bias per query by a gate computed from the (unscaled) query."""
        if not self.gru_rel_pos:
            return position_bias.unsqueeze(0)
        batch, heads, length, _ = q.shape
        gates = torch.sigmoid(self.grep_linear(q).view(batch, heads, length, 2, 4).sum(-1))
        gate_a, gate_b = gates.chunk(2, dim=-1)
        return (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * position_bias


class BeatsEncoderLayer(nn.Module):
    """Post-LN transformer block with DeepNorm residual scaling."""

    def __init__(self, cfg: BeatsConfig, owns_bias_table: bool) -> None:
        """Create the block.

        Args:
            cfg: architecture.
            owns_bias_table: see :class:`BeatsAttention`.
        """
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = BeatsAttention(cfg, owns_bias_table)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _ACTIVATIONS[cfg.activation_fn]
        self.residual_scale = (2.0 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                position_bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, N, D] -> [B, N, D]``, passing the position bias on."""
        attended, position_bias = self.self_attn(x, key_padding_mask, position_bias)
        x = self.self_attn_layer_norm(x * self.residual_scale + attended)
        hidden = self.fc2(self.activation(self.fc1(x)))
        return self.final_layer_norm(x * self.residual_scale + hidden), position_bias


class BeatsEncoder(nn.Module):
    """Convolutional positional embedding, LayerNorm, then the transformer blocks."""

    def __init__(self, cfg: BeatsConfig) -> None:
        """Create the encoder; blocks 1.. share block 0's relative position table.

        Args:
            cfg: architecture.
        """
        super().__init__()
        dim = cfg.encoder_embed_dim
        conv = nn.Conv1d(dim, dim, kernel_size=cfg.conv_pos, padding=cfg.conv_pos // 2,
                         groups=cfg.conv_pos_groups)
        conv = parametrizations.weight_norm(conv, name="weight", dim=2)
        trim = [_TrimLast()] if cfg.conv_pos % 2 == 0 else []
        self.pos_conv = nn.Sequential(conv, *trim, nn.GELU())
        self.layers = nn.ModuleList(BeatsEncoderLayer(cfg, owns_bias_table=(i == 0))
                                    for i in range(cfg.encoder_layers))
        if cfg.relative_position_embedding:
            table = self.layers[0].self_attn.relative_attention_bias
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = table
        self.layer_norm = nn.LayerNorm(dim)
        # FFT size -> (weights' identity, spectrum); the most recently used last.
        self._kernel_spectra: collections.OrderedDict[int, tuple[tuple[Any, ...], torch.Tensor]] = (
            collections.OrderedDict())
        # Inference tensors keep no version counter, so an in-place reload under
        # inference_mode would leave the kept spectra stale: a load always drops them.
        self.register_load_state_dict_pre_hook(
            lambda module, *_args, **_kwargs: module._kernel_spectra.clear())

    def position_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """``pos_conv`` along time: ``[B, N, D] -> [B, N, D]``.

        On a CPU, unless the convolution is being trained, as a product of spectra (see
        :meth:`_spectral_pos_conv`); elsewhere as the grouped convolution itself.
        """
        conv = self.pos_conv[0]
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in conv.parameters())
        if x.device.type == "cpu" and not trains:
            return self._spectral_pos_conv(x)
        return self.pos_conv(x.transpose(1, 2)).transpose(1, 2)

    def _spectral_pos_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The positional convolution by FFT, in float32.

        BEATs' kernel (128 taps, 16 groups of 48 channels) is half as long as a 5-s window's
        248 tokens. oneDNN's direct grouped convolution does its 2.3 GFLOP per window at
        ~45 GFLOP/s on one core of this project's CPUs, 18-25 % of an int8 forward; as
        products of spectra the same sums take 5-7x less time (batches of 2-16 windows).
        The kernels' spectra are computed once per FFT size and kept until the weights
        change (they are ``~ D * D / G * n_fft * 4`` bytes: 47 MB for 5-s windows), for the
        :data:`SPECTRA_KEPT` sizes used last: with ``windows.tail: keep`` a short last window
        comes between full ones, and one slot rebuilt the full windows' spectrum after each
        (100-185 ms a time).
        """
        conv = self.pos_conv[0]
        batch, length, dim = x.shape
        groups, taps, pad = conv.groups, conv.kernel_size[0], conv.padding[0]
        # y[t] = sum_k w[k] x[t + k - pad] for t < length: a linear convolution with the
        # reversed kernel, read from index taps - 1 - pad on. A circular one of length
        # n_fft >= length + max(pad, taps - 1 - pad) wraps only onto indices before that.
        start = taps - 1 - pad
        n_fft = _smooth_size(length + max(pad, start))
        spectrum = self._spectrum(conv, n_fft)  # [G, F, out, in]
        with torch.autocast(device_type="cpu", enabled=False):
            signal = torch.fft.rfft(x.float(), n=n_fft, dim=1)  # [B, F, D]
            signal = signal.view(batch, -1, groups, dim // groups).permute(2, 1, 3, 0)
            product = torch.matmul(spectrum, signal)  # [G, F, out, B]
            product = product.permute(3, 1, 0, 2).reshape(batch, -1, dim)
            y = torch.fft.irfft(product, n=n_fft, dim=1)[:, start:start + length]
            return self.pos_conv[-1](y + conv.bias).to(x.dtype)

    def _spectrum(self, conv: nn.Conv1d, n_fft: int) -> torch.Tensor:
        """Spectra of the reversed kernels, ``[G, n_fft // 2 + 1, out, in]``, cached."""
        # A model built under torch.inference_mode has inference tensors, which keep no
        # version counter (and cannot be changed in place outside that mode).
        weights = tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.device)
                        for p in conv.parameters())
        cached = self._kernel_spectra.get(n_fft)
        if cached is not None and cached[0] == weights:
            self._kernel_spectra.move_to_end(n_fft)
            return cached[1]
        if any(kept != weights for kept, _ in self._kernel_spectra.values()):
            self._kernel_spectra.clear()  # new weights: every kept spectrum is stale
        self._kernel_spectra.pop(n_fft, None)
        while len(self._kernel_spectra) >= SPECTRA_KEPT:
            self._kernel_spectra.popitem(last=False)  # freed before the new one is made
        # A normal tensor even under inference_mode (a later pass may need autograd).
        with torch.inference_mode(False), torch.no_grad():
            weight = conv.weight.float()  # weight norm applied once, here
            per_group, taps = weight.shape[1:]
            kernels = weight.flip(-1).view(conv.groups, -1, per_group, taps)
            spectrum = torch.fft.rfft(kernels, n=n_fft).permute(0, 3, 1, 2).contiguous()
        self._kernel_spectra[n_fft] = (weights, spectrum)
        return spectrum

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                num_layers: int | None = None) -> list[torch.Tensor]:
        """Run the first ``num_layers`` blocks (all by default).

        Args:
            x: ``[B, N, D]`` projected patch embeddings.
            key_padding_mask: bool ``[B, N]``, ``True`` for padding tokens; they are zeroed
                before the positional convolution and ignored as attention keys.
            num_layers: how many blocks to run.

        Returns:
            The output ``[B, N, D]`` of each block run, in order.
        """
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask[..., None], 0.0)
        x = x + self.position_embedding(x)
        x = self.layer_norm(x)
        outputs: list[torch.Tensor] = []
        position_bias = None
        for layer in self.layers[:num_layers]:
            x, position_bias = layer(x, key_padding_mask, position_bias)
            outputs.append(x)
        return outputs


class BEATs(nn.Module):
    """The BEATs network, waveform in (avex's ``backbone`` submodule)."""

    def __init__(self, cfg: BeatsConfig) -> None:
        """Create the network (``predictor`` is added by :meth:`BeatsModel.attach_heads`).

        Args:
            cfg: architecture and front end.
        """
        super().__init__()
        self.cfg = cfg
        self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                                  if cfg.embed_dim != cfg.encoder_embed_dim else None)
        self.fbank = KaldiFbank(num_mel_bins=cfg.num_mel_bins,
                                sample_rate_hz=cfg.sample_frequency,
                                frame_length_ms=cfg.frame_length,
                                frame_shift_ms=cfg.frame_shift)
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.input_patch_size,
                                         stride=cfg.input_patch_size, bias=cfg.conv_bias)
        self.encoder = BeatsEncoder(cfg)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.predictor: nn.Linear | None = None

    def preprocess(self, audio: torch.Tensor) -> torch.Tensor:
        """Normalised fbank: ``(fbank(audio * 2**15) - mean) / (2 * std)``, float32.

        On a CPU a few examples at a time, scaling and normalising included (see
        :func:`~pipeline.models.frontends.by_row_chunks`).

        Args:
            audio: ``[B, T]`` in [-1, 1].

        Returns:
            float32 ``[B, frames, num_mel_bins]``.
        """
        return by_row_chunks(self._normalised_fbank, audio,
                             row_bytes=self.fbank.row_bytes(audio.shape[-1]))

    def _normalised_fbank(self, audio: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=audio.device.type, enabled=False):
            fbank = self.fbank(audio.float() * KALDI_INPUT_SCALE)
            return (fbank - self.cfg.fbank_mean) / (2.0 * self.cfg.fbank_std)

    def token_mask(self, valid_samples: torch.Tensor | None, num_samples: int
                   ) -> torch.Tensor | None:
        """Real-audio mask of the tokens: step ``t`` is real iff ``16 t * hop < valid``.

        Args:
            valid_samples: int64 ``[B]`` or ``None``.
            num_samples: ``T``.

        Returns:
            bool ``[B, N]`` (``N = steps * 8``) or ``None`` when every token is real.
        """
        steps = self.cfg.num_tokens(num_samples) // self.cfg.patches_per_step
        device = self.fbank.window.device
        starts = torch.arange(steps, device=device) * self.cfg.step_samples
        mask = starts_mask(starts, valid_samples, num_samples)
        return None if mask is None else mask.repeat_interleave(self.cfg.patches_per_step, dim=1)

    def extract_layers(self, audio: torch.Tensor, valid_samples: torch.Tensor | None,
                       layers: Sequence[int]) -> dict[int, TokenFeatures]:
        """One forward pass, stopping after the deepest requested layer.

        Samples past ``valid_samples`` are zeroed first, so padding content never matters,
        and padding tokens are masked out of attention.

        Args:
            audio: float32 ``[B, T]`` in [-1, 1].
            valid_samples: int64 ``[B]`` or ``None`` (all real).
            layers: indices, 0 = encoder input (after patch embedding, LayerNorm and
                ``post_extract_proj``), ``i`` = output of encoder block ``i - 1``.

        Returns:
            ``{layer: TokenFeatures([B, N, D], mask [B, N] or None)}``.
        """
        mask = self.token_mask(valid_samples, audio.shape[-1])
        key_padding = None if mask is None else ~mask
        features = self.preprocess(zero_padding(audio, valid_samples))
        x = self.patch_embedding(features.unsqueeze(1))  # [B, E, steps, patches]
        x = self.layer_norm(x.flatten(2).transpose(1, 2))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        deepest = max(layers)
        outputs = [x] + (self.encoder(x, key_padding, num_layers=deepest) if deepest else [])
        return {i: TokenFeatures(outputs[i], mask) for i in layers}

    def forward(self, audio: torch.Tensor, valid_samples: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last-layer features and their token mask.

        Args:
            audio: ``[B, T]`` in [-1, 1].
            valid_samples: int64 ``[B]`` or ``None``.

        Returns:
            ``([B, N, encoder_embed_dim], mask [B, N] or None)``.
        """
        out = self.extract_layers(audio, valid_samples, [self.cfg.encoder_layers])
        return out[self.cfg.encoder_layers]


class BeatsModel(nn.Module):
    """avex's BEATs wrapper: ``backbone`` plus an optional ``classifier`` head.

    ``model(audio, padding_mask)`` follows avex: features ``[B, N, D]`` without a
    classifier, else logits of the classifier on mean-pooled real tokens.
    """

    def __init__(self, cfg: BeatsConfig, *, clamp_audio: bool = False) -> None:
        """Create the wrapper without heads (see :meth:`attach_heads`).

        Args:
            cfg: architecture.
            clamp_audio: clamp input to [-1, 1] first (avex's NatureLM variant does).
        """
        super().__init__()
        self.clamp_audio = clamp_audio
        self.backbone = BEATs(cfg)
        self.classifier: nn.Linear | None = None

    @property
    def cfg(self) -> BeatsConfig:
        """The backbone's config."""
        return self.backbone.cfg

    def attach_heads(self, num_classes: int) -> None:
        """Add ``classifier`` (and, for fine-tuned configs, ``backbone.predictor``: BEATs'
        AudioSet head, which avex keeps but never uses in forward) so a checkpoint with
        heads loads whole; weights come from the checkpoint.

        Args:
            num_classes: classifier outputs (from the checkpoint's ``classifier.weight``).
        """
        self.classifier = nn.Linear(self.cfg.encoder_embed_dim, num_classes)
        if self.cfg.finetuned_model:
            self.backbone.predictor = nn.Linear(self.cfg.encoder_embed_dim,
                                                self.cfg.predictor_class)

    def extract_layers(self, audio: torch.Tensor, valid_samples: torch.Tensor | None,
                       layers: Sequence[int]) -> dict[int, TokenFeatures]:
        """:meth:`BEATs.extract_layers` after the optional clamp."""
        if self.clamp_audio:
            audio = audio.clamp(-1.0, 1.0)
        return self.backbone.extract_layers(audio, valid_samples, layers)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """avex-style call.

        Args:
            x: ``[B, T]`` audio in [-1, 1], on any device (moved to the model's, as avex does).
            padding_mask: bool ``[B, T]``, ``True`` on padding (at the end), or ``None``.

        Returns:
            ``[B, N, encoder_embed_dim]`` features, or ``[B, num_classes]`` logits when the
            model has a classifier.
        """
        device = self.backbone.fbank.window.device  # avex moves inputs to the model
        valid = valid_from_padding_mask(
            None if padding_mask is None else padding_mask.to(device), x.shape)
        last = self.cfg.encoder_layers
        tokens, mask = self.extract_layers(x.to(device), valid, [last])[last]
        if self.classifier is None:
            return tokens
        return self.classifier(pool(tokens, mask, "mean").to(tokens.dtype))


def init_beats_weights(model: nn.Module, cfg: BeatsConfig) -> None:
    """Random initialisation as BEATs/avex do it (BERT-style, DeepNorm gains).

    Linear and embedding weights ~ N(0, 0.02) with zero biases; with DeepNorm, q/k
    projections get Xavier-normal (gain 1) and v/out/fc1/fc2 Xavier-normal with gain
    ``(8 * layers) ** -0.25``; the positional convolution ~ N(0, sqrt(4 / (k * D))).

    Args:
        model: a :class:`BeatsModel` or :class:`BEATs`.
        cfg: its config.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        encoder = model.encoder if isinstance(model, BEATs) else model.backbone.encoder
        conv = encoder.pos_conv[0]
        std = math.sqrt(4.0 / (cfg.conv_pos * cfg.encoder_embed_dim))
        weight = torch.randn_like(conv.weight) * std
        conv.parametrizations.weight.original1.copy_(weight)
        conv.parametrizations.weight.original0.copy_(
            torch.linalg.vector_norm(weight, dim=(0, 1), keepdim=True))
        conv.bias.zero_()
        if cfg.deep_norm:
            beta = (8.0 * cfg.encoder_layers) ** -0.25
            for layer in encoder.layers:
                attn = layer.self_attn
                for linear, gain in ((attn.q_proj, 1.0), (attn.k_proj, 1.0), (attn.v_proj, beta),
                                     (attn.out_proj, beta), (layer.fc1, beta), (layer.fc2, beta)):
                    nn.init.xavier_normal_(linear.weight, gain=gain)
