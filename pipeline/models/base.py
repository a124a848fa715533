"""The contract between the embedding stage and any backbone.

The job only ever talks to a :class:`Backbone`: it hands over a batch of fixed-length
windows at the model's sample rate plus how many samples of each are real audio, names
the layers it wants, and gets back token features with a validity mask per layer. The
embedding stage pools those tokens; nothing else about a model leaks into the pipeline.

Shapes and units:
    audio:          float32 ``[B, T]`` in [-1, 1] at ``info.sample_rate_hz``.
    valid_samples:  int64 ``[B]``; samples ``>= valid_samples[b]`` are padding.
    tokens:         ``[B, N, D_layer]`` (any float dtype; pooled in float32).
    mask:           bool ``[B, N]``, ``True`` where the token covers real audio, or ``None``
                    when every token is real.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerInfo:
    """One capturable layer.

    Attributes:
        index: position in ``ModelInfo.layers`` (0-based; the job also accepts negatives).
        name: the module path inside the backbone (``backbone.encoder.layers.11``).
        dim: feature dimension of this layer's tokens.
    """

    index: int
    name: str
    dim: int


@dataclass(frozen=True)
class ActivationCost:
    """What a CPU forward pass of one batch (``extract`` and pooling) holds beyond the loaded
    model, fitted to measured peaks, so a batch or a window no CPU actor can hold is refused
    before any work instead of killing every actor that tries it.

    A CPU pass runs a batch ``pass_samples`` of audio at a time (at least one window:
    ``ModuleBackbone.extract``), so a long window costs its own square whatever the batch,
    and the batch adds the requested layers' tokens, kept for the whole batch (each pass's,
    then joined: two copies). In MiB, with ``n`` the window's units (``window_samples /
    samples_per_unit``: BEATs' tokens, EfficientNet's seconds) and ``rows`` the windows of a
    pass::

        fixed_mib + rows * (unit_mib * n + unit_pair_mib * n**2)
                  + batch * n * sum(layer_unit_mib[i] for i in layers)

    Attributes:
        samples_per_unit: samples per unit of ``n``.
        pass_samples: audio a CPU pass runs at once, in samples.
        fixed_mib: what any pass holds (first-call buffers).
        unit_mib, unit_pair_mib: per window of a pass, per unit and per pair of units
            (attention's ``[H, N, N]`` scores and biases).
        layer_unit_mib: per window of the batch and unit, each layer's kept tokens.
    """

    samples_per_unit: float
    pass_samples: int
    fixed_mib: float
    unit_mib: float
    unit_pair_mib: float
    layer_unit_mib: tuple[float, ...]

    def windows_per_pass(self, batch: int, window_samples: int) -> int:
        """Windows a CPU pass runs at once, as ``ModuleBackbone.extract`` splits a batch."""
        return min(batch, max(1, self.pass_samples // window_samples))

    def mib(self, batch: int, window_samples: int, layers: Sequence[int]) -> float:
        """The estimate for ``batch`` windows of ``window_samples``, ``layers`` returned."""
        n = window_samples / self.samples_per_unit
        rows = self.windows_per_pass(batch, window_samples)
        kept = sum(self.layer_unit_mib[i] for i in set(layers))
        return (self.fixed_mib + rows * (self.unit_mib * n + self.unit_pair_mib * n * n)
                + batch * n * kept)


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a backbone before anything is loaded.

    Attributes:
        name: registry name (``esp_aves2_sl_beats_all``).
        family: architecture family (``beats``, ``efficientnet``, ``birdnet``, ``plugin``).
        sample_rate_hz: rate the backbone expects; the job resamples to it.
        embedding_dim: dimension of the last layer (the default embedding).
        layers: every layer the backbone can return, in index order.
        default_layers: the layer indices the backbone's authors point to (``(-1,)``),
            shown by ``describe-model``; ``model.layers`` defaults to ``last`` for every
            backbone.
        poolings: pooling methods this backbone supports (``mean``, ``max``, ``cls``).
        default_pooling: pooling used when the config does not say.
        min_input_samples: shortest input (at ``sample_rate_hz``) that yields one token.
        fixed_window_s: the only window length the backbone accepts, or ``None``.
        weights_uri: published checkpoint URI, or ``None`` when there is none.
        license: licence of the published weights.
        description: one line for ``list-models``.
        preprocessing: front-end parameters; part of the output namespace hash.
        secret_options: ``model.options`` that never change the embeddings (a plugin's hub
            token): recorded in the variant as ``"***"``, so a new value is no new variant.
        runtime_options: ``model.options`` that set how the model runs, not what it embeds
            (BirdNET's LiteRT thread count): left out of the variant, as
            ``compute.torch_threads`` is, so a rerun with another value resumes.
        runs_on_gpus: whether the backbone can run on a GPU at all (BirdNET's LiteRT cannot):
            if not, ``compute.gpus_per_actor`` defaults to 0 even where there are GPUs.
        activations: host memory a CPU pass of a batch takes, or ``None`` where it was never
            measured (BirdNET, plugins): then nothing is refused on its account.
    """

    name: str
    family: str
    sample_rate_hz: int
    embedding_dim: int
    layers: tuple[LayerInfo, ...]
    default_layers: tuple[int, ...] = (-1,)
    poolings: tuple[str, ...] = ("mean", "max")
    default_pooling: str = "mean"
    min_input_samples: int = 1
    fixed_window_s: float | None = None
    weights_uri: str | None = None
    license: str = ""
    description: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    secret_options: tuple[str, ...] = ()
    runtime_options: tuple[str, ...] = ()
    runs_on_gpus: bool = True
    activations: ActivationCost | None = None

    def resolve_layers(self, selectors: Sequence[int | str] | str) -> tuple[int, ...]:
        """Turn config layer selectors into sorted, unique, non-negative indices.

        Args:
            selectors: ``"all"``, ``"last"``, or a sequence of ints (negative counts
                from the end) and/or layer names.

        Returns:
            Sorted tuple of layer indices.

        Raises:
            ValueError: a selector is out of range or names no layer.
        """
        n = len(self.layers)
        if isinstance(selectors, str):
            selectors = [selectors]
        out: set[int] = set()
        names = {layer.name: layer.index for layer in self.layers}
        for sel in selectors:
            if sel == "all":
                out.update(range(n))
            elif sel == "last":
                out.add(n - 1)
            elif isinstance(sel, bool):
                raise ValueError(f"layer selector {sel!r} is a boolean; use an index or a name")
            elif isinstance(sel, int):
                if not -n <= sel < n:
                    raise ValueError(
                        f"layer {sel} is out of range for {self.name}, which has {n} layers "
                        f"(valid: 0..{n - 1} or -{n}..-1)"
                    )
                out.add(sel % n)
            elif isinstance(sel, str) and sel in names:
                out.add(names[sel])
            else:
                raise ValueError(
                    f"layer {sel!r} is not a layer of {self.name}; use an index, 'all', 'last' "
                    f"or one of {sorted(names)}"
                )
        return tuple(sorted(out))


class TokenFeatures(NamedTuple):
    """Features of one layer for a batch: ``tokens [B, N, D]`` and ``mask [B, N]`` or None."""

    tokens: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class WeightsInfo:
    """Where a loaded backbone's weights came from.

    Attributes:
        uri: the URI the user asked for (secrets redacted), or ``"random"``.
        sha256: content hash of the checkpoint file, ``"random"``, or ``"unknown"`` (a
            plugin's own default weights, which it loads itself).
        format: ``safetensors``, ``torch``, ``tflite``, ``random``, or ``plugin``.
    """

    uri: str
    sha256: str
    format: str

    @property
    def is_random(self) -> bool:
        return self.sha256 == "random"


class Backbone(abc.ABC):
    """A loaded model, ready to embed batches on one device.

    Implementations load their weights once (in ``__init__`` or a factory) and keep the
    front end on the same device as the network, so a batch of raw windows goes in and
    token features come out without a host round trip.
    """

    info: ModelInfo
    weights: WeightsInfo
    device: str

    @abc.abstractmethod
    def extract(
        self,
        audio: torch.Tensor,
        valid_samples: torch.Tensor | None,
        layers: Sequence[int],
    ) -> dict[int, TokenFeatures]:
        """Run one forward pass and return the requested layers.

        Args:
            audio: float32 ``[B, T]`` on ``self.device``.
            valid_samples: int64 ``[B]`` count of real samples per row, or ``None`` (all real).
            layers: non-negative layer indices, as resolved by ``ModelInfo.resolve_layers``.

        Returns:
            ``{layer_index: TokenFeatures}`` for every requested layer, all from the same pass.
        """

    def prepare(self, precision: str) -> None:
        """Ready the loaded network for ``precision``, once, before its first batch.

        Autocast precisions need nothing here (see :meth:`autocast`); ``int8`` quantizes
        the network's Linear layers, which a backbone without a torch network cannot do.

        Raises:
            ConfigError: ``int8`` for this backbone.
        """
        if precision == "int8":
            raise ConfigError(f"{self.info.name} cannot run int8: it has no torch network to "
                              "quantize; use fp32 or bf16", "model.precision")

    def autocast(self, precision: str) -> contextlib.AbstractContextManager[Any]:
        """Context manager for mixed precision (``fp32`` means none). Front ends stay fp32."""
        return contextlib.nullcontext()
