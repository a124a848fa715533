"""EfficientNet-B0 on log-mel spectrograms, laid out like avex's EfficientNet wrapper.

The network is torchvision's ``efficientnet_b0`` written in plain torch with the same
module names (``features.0`` .. ``features.8``, MBConv blocks with
``block.{i}`` Conv2dNormActivation / SqueezeExcitation children, ``avgpool``,
``classifier.1``), wrapped under ``model.`` as avex does, so ESP-AVES2 EfficientNet
checkpoints (and plain torchvision state dicts) load strictly.

Front end (avex ``AudioProcessor`` with the registry's audio config): 800-point STFT,
hop 160, periodic Hann window, centred; power; 128 HTK mel bands 0-8 kHz; ``log(x+1e-6)``;
per-example min-max to [0, 1]; repeated to 3 channels. The image is ``[B, 3, mel, time]``,
so feature maps are ``[B, C, H (mel), W (time)]``.

Inference only: stochastic depth and classifier dropout are identity in eval and are not
implemented.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.base import TokenFeatures
from pipeline.models.frontends import LogMelSpectrogram
from pipeline.models.masks import starts_mask, valid_from_padding_mask, zero_padding
from pipeline.models.pooling import pool

# (expand ratio, kernel, stride, input channels, output channels, blocks) per MBConv stage.
_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_STEM_STRIDE = 2
_BN_EPS = 1e-5
_DROPOUT = 0.2

LAYER_DIMS = (_STEM_CHANNELS, *(stage[4] for stage in _STAGES), _HEAD_CHANNELS)
"""Channels of ``features.0`` .. ``features.8``: 32, 16, 24, 40, 80, 112, 192, 320, 1280."""

LAYER_STRIDES = tuple(itertools.accumulate((_STEM_STRIDE, *(s[2] for s in _STAGES), 1),
                                           operator.mul))
"""Total downsampling after ``features.i`` (both axes): 2, 2, 4, 8, 16, 16, 32, 32, 32."""


@dataclasses.dataclass(frozen=True)
class EfficientNetAudioConfig:
    """Front-end settings (names as avex's ``AudioConfig``); the registry's are defaults."""

    sample_rate: int = 16000
    n_fft: int = 800
    hop_length: int = 160
    win_length: int = 800
    n_mels: int = 128

    def updated(self, values: Mapping[str, Any], source: str = "model.options"
                ) -> EfficientNetAudioConfig:
        """A copy with ``values`` applied.

        Raises:
            ConfigError: unknown keys, non-positive values, or a window longer than the FFT.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown EfficientNet option(s) {unknown}; valid options: "
                              f"{sorted(names)}", source)
        bad = sorted(k for k, v in values.items()
                     if not isinstance(v, int) or isinstance(v, bool) or v <= 0)
        if bad:
            raise ConfigError(f"EfficientNet option(s) {bad} must be positive integers", source)
        out = dataclasses.replace(self, **values)
        if out.win_length > out.n_fft:  # torch.stft would refuse it in every actor
            raise ConfigError(f"EfficientNet win_length {out.win_length} is longer than n_fft "
                              f"{out.n_fft}", source)
        return out

    @property
    def min_input_samples(self) -> int:
        """Shortest input the centred (reflect-padded) STFT accepts."""
        return self.n_fft // 2 + 1

    def feature_shape(self, num_samples: int) -> tuple[int, int]:
        """``(H, W)`` of the final feature map for ``num_samples`` of audio."""
        frames = num_samples // self.hop_length + 1
        return (_downsampled(self.n_mels, LAYER_STRIDES[-1]),
                _downsampled(frames, LAYER_STRIDES[-1]))

    def preprocessing(self) -> dict[str, Any]:
        """JSON-able description of the front end (part of the output namespace)."""
        return {
            "frontend": "log_mel_minmax", "sample_rate_hz": self.sample_rate,
            "n_fft": self.n_fft, "hop_length": self.hop_length, "win_length": self.win_length,
            "window": "hann_periodic", "center": True, "pad_mode": "reflect", "power": 2.0,
            "n_mels": self.n_mels, "mel_scale": "htk", "f_min_hz": 0.0,
            "f_max_hz": self.sample_rate / 2, "mel_norm": None, "log_offset": 1e-6,
            "normalize": "per-example min-max over real frames", "channels": 3,
        }


def _downsampled(size: int, stride: int) -> int:
    """Size after ``log2(stride)`` stride-2 'same' convolutions (each ``ceil(n / 2)``)."""
    for _ in range(int(math.log2(stride))):
        size = (size + 1) // 2
    return size


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional SiLU; children ``0``, ``1``, ``2``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, activation: bool = True) -> None:
        """Create the triple with 'same' padding."""
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, eps=_BN_EPS),
        ]
        if activation:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention: ``x * sigmoid(fc2(silu(fc1(mean_hw(x)))))``."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        """Create ``fc1`` / ``fc2`` as 1x1 convolutions (torchvision names)."""
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class MBConv(nn.Module):
    """Inverted residual block: [expand 1x1] -> depthwise kxk -> SE -> project 1x1."""

    def __init__(self, expand_ratio: int, kernel: int, stride: int, in_channels: int,
                 out_channels: int) -> None:
        """Create the block (``block`` children numbered as in torchvision)."""
        super().__init__()
        expanded = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(ConvNormActivation(in_channels, expanded, 1))
        layers += [
            ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded),
            SqueezeExcitation(expanded, max(1, in_channels // 4)),
            ConvNormActivation(expanded, out_channels, 1, activation=False),
        ]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class EfficientNetB0(nn.Module):
    """torchvision's EfficientNet-B0 module tree; ``classifier`` is set only for a head."""

    def __init__(self) -> None:
        """Create the features-only network."""
        super().__init__()
        stages: list[nn.Module] = [ConvNormActivation(3, _STEM_CHANNELS, 3, _STEM_STRIDE)]
        for expand, kernel, stride, in_ch, out_ch, blocks in _STAGES:
            stages.append(nn.Sequential(*(
                MBConv(expand, kernel, stride if i == 0 else 1, in_ch if i == 0 else out_ch,
                       out_ch) for i in range(blocks))))
        stages.append(ConvNormActivation(_STAGES[-1][4], _HEAD_CHANNELS, 1))
        self.features = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier: nn.Sequential | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` -> logits (with a classifier) or features ``[B, 1280, h, w]``."""
        features = self.features(x)
        if self.classifier is None:
            return features
        return self.classifier(torch.flatten(self.avgpool(features), 1))


class EfficientNetModel(nn.Module):
    """avex's EfficientNet wrapper: front end + ``model`` (the network)."""

    def __init__(self, audio: EfficientNetAudioConfig = EfficientNetAudioConfig()) -> None:
        """Create front end and features-only network (see :meth:`attach_classifier`).

        Args:
            audio: front-end settings.
        """
        super().__init__()
        self.audio = audio
        self.frontend = LogMelSpectrogram(sample_rate_hz=audio.sample_rate, n_fft=audio.n_fft,
                                          hop_length=audio.hop_length,
                                          win_length=audio.win_length, n_mels=audio.n_mels)
        self.model = EfficientNetB0()

    def attach_classifier(self, num_classes: int) -> None:
        """Add ``model.classifier`` (dropout + linear, torchvision layout) for a checkpoint
        with a head; weights come from the checkpoint."""
        self.model.classifier = nn.Sequential(nn.Dropout(_DROPOUT, inplace=True),
                                              nn.Linear(_HEAD_CHANNELS, num_classes))

    def spectrogram(self, audio: torch.Tensor, valid_samples: torch.Tensor | None
                    ) -> torch.Tensor:
        """The 3-channel normalised log-mel image, float32 ``[B, 3, n_mels, frames]``.

        With padding, min-max statistics come from real frames only (frame ``j`` is real
        iff its centre ``j * hop < valid_samples``) and padded frames are set to 0.
        """
        audio = zero_padding(audio, valid_samples)
        frames = self.frontend.num_frames(audio.shape[-1])
        real = self._column_mask(valid_samples, audio.shape[-1], frames, 1)
        return self.frontend(audio, real).unsqueeze(1).repeat(1, 3, 1, 1)

    def _column_mask(self, valid_samples: torch.Tensor | None, num_samples: int, width: int,
                     stride: int) -> torch.Tensor | None:
        """Column ``w`` of a map with time stride ``stride`` (in frames) is real iff its
        first frame's centre ``stride * w * hop`` is before ``valid_samples``."""
        starts = torch.arange(width, device=self.frontend.window.device)
        return starts_mask(starts * stride * self.audio.hop_length, valid_samples, num_samples)

    def extract_layers(self, audio: torch.Tensor, valid_samples: torch.Tensor | None,
                       layers: Sequence[int]) -> dict[int, TokenFeatures]:
        """One forward pass through ``features.0`` .. the deepest requested layer.

        Args:
            audio: float32 ``[B, T]`` in [-1, 1].
            valid_samples: int64 ``[B]`` or ``None``.
            layers: indices ``i`` = output of ``features.i``.

        Returns:
            ``{i: TokenFeatures([B, H*W, C_i], mask [B, H*W] or None)}``; token
            ``h * W + w`` is map position ``(h, w)``; the mask is by time column.
        """
        x = self.spectrogram(audio, valid_samples)
        out: dict[int, TokenFeatures] = {}
        for i in range(max(layers) + 1):
            x = self.model.features[i](x)
            if i in layers:
                out[i] = self._tokens(x, valid_samples, audio.shape[-1], LAYER_STRIDES[i])
        return out

    def _tokens(self, fmap: torch.Tensor, valid_samples: torch.Tensor | None, num_samples: int,
                stride: int) -> TokenFeatures:
        batch, _, height, width = fmap.shape
        columns = self._column_mask(valid_samples, num_samples, width, stride)
        mask = None if columns is None else columns[:, None, :].expand(batch, height, width)
        return TokenFeatures(fmap.flatten(2).transpose(1, 2),
                             None if mask is None else mask.reshape(batch, height * width))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """avex-style call.

        Args:
            x: ``[B, T]`` audio in [-1, 1], on any device (moved to the model's, as avex does).
            padding_mask: bool ``[B, T]``, ``True`` on padding (at the end), or ``None``.
                avex ignores it; here it restricts normalisation and pooling to real audio.

        Returns:
            Features ``[B, 1280, H, W]`` without a classifier, else logits
            ``[B, num_classes]`` from the classifier on the (masked) average pool.
        """
        device = self.frontend.window.device  # avex moves inputs to the model
        x = x.to(device)
        valid = valid_from_padding_mask(
            None if padding_mask is None else padding_mask.to(device), x.shape)
        last = len(LAYER_DIMS) - 1
        if self.model.classifier is None:
            return self.model.features(self.spectrogram(x, valid))
        tokens, mask = self.extract_layers(x, valid, [last])[last]
        return self.model.classifier(pool(tokens, mask, "mean").to(tokens.dtype))


def init_efficientnet_weights(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal (fan out) convolutions, unit BatchNorm,
    uniform(+-1/sqrt(out)) linear layers, zero biases."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                module.weight.uniform_(-bound, bound)
                module.bias.zero_()
