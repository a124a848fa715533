"""A :class:`~pipeline.models.base.Backbone` around a torch module that extracts layers.

BEATs and EfficientNet implement ``extract_layers(audio, valid_samples, layers)`` on their
avex-layout module; this class adds the contract's input checks and precision handling,
so the two share everything that is not model-specific.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.models.base import Backbone, ModelInfo, TokenFeatures, WeightsInfo
from pipeline.models.precision import autocast_context, quantize_linear_int8

CPU_CHUNK_SECONDS = 20.0
"""Audio per forward pass on a CPU: a batch runs through the network this much at a time.

Measured on one thread of this project's 2-vCPU Xeon, a batch of 16 5-s windows run whole /
by 8 / 4 / 2 / 1 windows, s per window, two rounds: BEATs int8 0.212-0.222 / 0.185-0.205 /
0.182-0.199 / 0.189-0.191 / 0.192-0.206; BEATs fp32 0.394-0.405 / 0.373-0.383 /
0.361-0.363 / 0.370-0.375 / 0.397-0.400; EfficientNet-B0 fp32 0.055-0.061 / 0.034-0.044 /
0.031-0.040 / 0.032-0.033 / 0.034. Whole, a batch's larger intermediates (BEATs' 3072-wide
FFN activations and its ``[B, H, N, N]`` attention biases, ~50 MB at 16 windows) exceed
glibc's largest mmap threshold (32 MiB), so each is a fresh mapping whose pages fault in on
first touch: the GELU over them took 110 ms per block instead of ~10 (profiled). Four 5-s
windows keep them in the heap, and nearer the caches. An accelerator runs the batch whole."""


class LayerExtractor(Protocol):
    """A module that runs one forward pass and returns several layers."""

    def extract_layers(self, audio: torch.Tensor, valid_samples: torch.Tensor | None,
                       layers: Sequence[int]) -> dict[int, TokenFeatures]:
        """``{layer: TokenFeatures}`` for the requested layers, from one pass."""
        ...


class ModuleBackbone(Backbone):
    """Backbone over an ``nn.Module`` with ``extract_layers``; inference only.

    Attributes:
        module: the avex-layout torch module (in eval mode, gradients off).
        info: registry info reflecting the module's actual architecture.
        weights: where the weights came from.
        device: torch device string.
    """

    def __init__(self, module: nn.Module, info: ModelInfo, weights: WeightsInfo, device: str
                 ) -> None:
        """Move ``module`` to ``device`` and freeze it.

        Args:
            module: an ``nn.Module`` implementing :class:`LayerExtractor`.
            info: registry info.
            weights: provenance of the weights.
            device: where to run.
        """
        self.module = module.to(device).eval().requires_grad_(False)
        self.info = info
        self.weights = weights
        self.device = device

    def extract(self, audio: torch.Tensor, valid_samples: torch.Tensor | None,
                layers: Sequence[int]) -> dict[int, TokenFeatures]:
        """See :meth:`Backbone.extract`.

        Raises:
            ValueError: bad shapes, an input shorter than ``info.min_input_samples``, or a
                layer index outside ``0..len(info.layers) - 1``.
        """
        self._check_inputs(audio, valid_samples, layers)
        extractor: LayerExtractor = self.module  # type: ignore[assignment]
        wanted = sorted(set(layers))
        rows = max(1, round(CPU_CHUNK_SECONDS * self.info.sample_rate_hz) // audio.shape[1])
        if audio.device.type != "cpu" or len(audio) <= rows:
            return extractor.extract_layers(audio, valid_samples, wanted)
        parts = [extractor.extract_layers(
            audio[start:start + rows],
            None if valid_samples is None else valid_samples[start:start + rows], wanted)
            for start in range(0, len(audio), rows)]
        return {layer: _concatenate([part[layer] for part in parts]) for layer in wanted}

    def prepare(self, precision: str) -> None:
        """See :meth:`Backbone.prepare`: ``int8`` quantizes the module's Linear layers."""
        if precision == "int8":
            quantize_linear_int8(self.module, self.info.name)

    def autocast(self, precision: str) -> contextlib.AbstractContextManager[Any]:
        """Autocast for ``precision`` on this backbone's device; front ends stay fp32."""
        return autocast_context(precision, self.device)

    def _check_inputs(self, audio: torch.Tensor, valid_samples: torch.Tensor | None,
                      layers: Sequence[int]) -> None:
        if audio.dim() != 2:
            raise ValueError(f"audio must be [B, T], got shape {tuple(audio.shape)}")
        if audio.shape[1] < self.info.min_input_samples:
            raise ValueError(
                f"{self.info.name} needs at least {self.info.min_input_samples} samples "
                f"({self.info.min_input_samples / self.info.sample_rate_hz:.3f} s) per window, "
                f"got {audio.shape[1]}")
        if valid_samples is not None and valid_samples.shape != audio.shape[:1]:
            raise ValueError(f"valid_samples must be [B]={audio.shape[0]}, got "
                             f"{tuple(valid_samples.shape)}")
        if not layers:
            raise ValueError("no layers requested")
        bad = [i for i in layers if not 0 <= i < len(self.info.layers)]
        if bad:
            raise ValueError(f"layers {bad} out of range for {self.info.name} "
                             f"(0..{len(self.info.layers) - 1}; resolve negatives first)")


def _concatenate(parts: Sequence[TokenFeatures]) -> TokenFeatures:
    """One layer's features of consecutive chunks of a batch, as the batch's."""
    tokens = torch.cat([part.tokens for part in parts])
    if all(part.mask is None for part in parts):
        return TokenFeatures(tokens, None)
    masks = [part.mask if part.mask is not None else
             torch.ones(part.tokens.shape[:2], dtype=torch.bool, device=part.tokens.device)
             for part in parts]
    return TokenFeatures(tokens, torch.cat(masks))
