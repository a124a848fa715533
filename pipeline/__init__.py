"""embed-archive: embeddings for large bioacoustic archives, from buckets to Parquet.

The Python API mirrors the ``avex`` model API for the backbones::

    from pipeline import load_model, list_models, describe_model
    model = load_model("esp_aves2_sl_beats_all", return_features_only=True, device="cpu")
    features = model(audio, padding_mask=None)   # (batch, tokens, 768)

Heavy imports (torch, ray) happen only when these functions are first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "describe_model", "list_models", "load_model"]

if TYPE_CHECKING:
    from pipeline.models import describe_model, list_models, load_model


def __getattr__(name: str) -> Any:
    if name in ("load_model", "list_models", "describe_model"):
        from pipeline import models

        return getattr(models, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
