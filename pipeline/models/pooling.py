"""Pooling: the tokens of one window become one float32 vector.

Masks follow the :mod:`pipeline.models.base` contract: ``True`` marks a token that covers
real audio, ``None`` means every token is real. Padded tokens never count.

A row with no real token at all pools to NaN, so the job drops and reports it instead of
writing a vector that describes padding.
"""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError
from pipeline.models.base import ModelInfo

POOLINGS = ("mean", "max", "cls")


def validate_pooling(info: ModelInfo, method: str | None) -> str:
    """Check a configured pooling against a backbone; ``None`` gives its default.

    Args:
        info: the backbone's registry info.
        method: ``mean``, ``max``, ``cls`` or ``None``.

    Returns:
        The pooling to use.

    Raises:
        ConfigError: unknown method, or one the backbone does not support (``cls`` on a
            model without a CLS token).
    """
    if method is None:
        return info.default_pooling
    if method not in POOLINGS:
        raise ConfigError(f"{method!r} is not a pooling; use one of {POOLINGS}", "model.pooling")
    if method not in info.poolings:
        raise ConfigError(f"{info.name} does not support {method!r} pooling (it has no CLS token)"
                          if method == "cls" else
                          f"{info.name} supports {info.poolings}, not {method!r}", "model.pooling")
    return method


def pool(tokens: torch.Tensor, mask: torch.Tensor | None, method: str) -> torch.Tensor:
    """Pool token features over the token axis.

    Args:
        tokens: ``[B, N, D]`` features, any float dtype.
        mask: bool ``[B, N]`` (``True`` = real audio) or ``None`` (all real).
        method: ``mean`` (average of real tokens), ``max`` (element-wise maximum over
            real tokens) or ``cls`` (token 0; only for backbones with a CLS token, see
            :func:`validate_pooling`).

    Returns:
        float32 ``[B, D]``; NaN rows where ``mask`` has no real token.

    Raises:
        ValueError: unknown method or mismatched shapes.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    if mask is not None and mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens "
                         f"{tuple(tokens.shape[:2])}")
    x = tokens.float()
    if method == "cls":
        return x[:, 0]
    if method == "mean":
        return _masked_mean(x, mask)
    if method == "max":
        return _masked_max(x, mask)
    raise ValueError(f"{method!r} is not a pooling; use one of {POOLINGS}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(dim=1)
    total = x.masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)  # padding may hold anything
    count = mask.sum(dim=1, keepdim=True).to(x.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.nan)


def _masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.amax(dim=1)
    best = x.masked_fill(~mask.unsqueeze(-1), -torch.inf).amax(dim=1)
    return torch.where(mask.any(dim=1, keepdim=True), best, torch.nan)
