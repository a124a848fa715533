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
        return extractor.extract_layers(audio, valid_samples, sorted(set(layers)))

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
