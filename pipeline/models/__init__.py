"""Backbones for embed-archive: registry, loading, pooling and precision.

The job uses::

    from pipeline.models import create_backbone, model_info, pool, resolve_precision

    backbone = create_backbone("esp_aves2_sl_beats_all", weights="default", device="cuda")
    with torch.inference_mode(), backbone.autocast(resolve_precision("auto", "cuda")):
        feats = backbone.extract(audio, valid_samples, layers=[12])
    vectors = pool(feats[12].tokens, feats[12].mask, "mean")

and the avex-style API mirrors ``avex.load_model``::

    model = load_model("esp_aves2_sl_beats_all", return_features_only=True)
    features = model(audio, padding_mask=None)   # (batch, tokens, 768)

See ``pipeline/models/README.md`` for the registry, layers, masks and plugins.
"""

from __future__ import annotations

from pipeline.models.base import Backbone, LayerInfo, ModelInfo, TokenFeatures, WeightsInfo
from pipeline.models.plugins import ENTRY_POINT_GROUP
from pipeline.models.pooling import POOLINGS, pool, validate_pooling
from pipeline.models.precision import (
    AUTOCAST_PRECISIONS,
    PRECISIONS,
    autocast_context,
    exact_float32_on_gpus,
    gpus_have_bf16,
    job_precision,
    quantize_linear_int8,
    resolve_precision,
)
from pipeline.models.registry import (
    MissingDependencyError,
    create_backbone,
    describe_model,
    list_models,
    load_model,
    model_info,
    resolve_backbone,
)
from pipeline.models.weights import cache_weights, fetch_weights

__all__ = [
    "AUTOCAST_PRECISIONS",
    "ENTRY_POINT_GROUP",
    "POOLINGS",
    "PRECISIONS",
    "Backbone",
    "LayerInfo",
    "MissingDependencyError",
    "ModelInfo",
    "TokenFeatures",
    "WeightsInfo",
    "autocast_context",
    "cache_weights",
    "create_backbone",
    "describe_model",
    "exact_float32_on_gpus",
    "fetch_weights",
    "gpus_have_bf16",
    "job_precision",
    "list_models",
    "load_model",
    "model_info",
    "pool",
    "quantize_linear_int8",
    "resolve_backbone",
    "resolve_precision",
    "validate_pooling",
]
