"""Padding bookkeeping shared by the backbones.

Conventions: ``valid_samples`` (int64 ``[B]``) counts the real samples at the start of
each row; token masks are bool ``[B, N]`` with ``True`` for tokens that cover real audio
(the :mod:`pipeline.models.base` contract); avex's ``padding_mask`` is bool ``[B, T]``
with ``True`` for padding, padding at the end.
"""

from __future__ import annotations

import torch


def valid_from_padding_mask(padding_mask: torch.Tensor | None, audio_shape: torch.Size
                            ) -> torch.Tensor | None:
    """avex ``padding_mask [B, T]`` (``True`` = pad, at the end) -> ``valid_samples [B]``.

    Only a row's real samples count, and they are taken to be its first ones: a mask of
    another shape, or one with padding before real audio (left padding, a gap, or an
    attention mask's ``True`` = real), would have the real audio zeroed and the padding
    embedded, silently. Such masks are refused.

    Raises:
        ValueError: the mask is not ``audio_shape``, or pads anywhere but the end of a row.
    """
    if padding_mask is None:
        return None
    if padding_mask.shape != audio_shape:
        raise ValueError(f"padding_mask must have the audio's shape {tuple(audio_shape)}, got "
                         f"{tuple(padding_mask.shape)}")
    pad = padding_mask.bool()
    if bool((pad[:, :-1] & ~pad[:, 1:]).any()):
        raise ValueError("padding_mask must be True (padding) only at the end of each row; "
                         "this one has padding before real audio (left padding, or a mask "
                         "with True = real audio?)")
    return (~pad).sum(dim=-1)


def padding_mask_from_valid(valid_samples: torch.Tensor | None, num_samples: int
                            ) -> torch.Tensor | None:
    """``valid_samples [B]`` -> bool ``[B, T]`` with ``True`` on padding (``None`` if none)."""
    if not is_padded(valid_samples, num_samples):
        return None
    positions = torch.arange(num_samples, device=valid_samples.device)
    return positions[None, :] >= valid_samples[:, None]


def is_padded(valid_samples: torch.Tensor | None, num_samples: int) -> bool:
    """Whether any row has fewer than ``num_samples`` real samples."""
    return valid_samples is not None and bool((valid_samples < num_samples).any())


def zero_padding(audio: torch.Tensor, valid_samples: torch.Tensor | None) -> torch.Tensor:
    """``audio [B, T]`` with samples at or past ``valid_samples`` set to 0.

    Outputs then depend on real audio only, whatever the caller padded with.
    """
    if valid_samples is None:
        return audio
    pad = padding_mask_from_valid(valid_samples.to(audio.device), audio.shape[-1])
    return audio if pad is None else audio.masked_fill(pad, 0.0)


def starts_mask(starts: torch.Tensor, valid_samples: torch.Tensor | None, num_samples: int
                ) -> torch.Tensor | None:
    """Real-audio mask for positions that begin at sample ``starts``.

    A position is real iff it starts before ``valid_samples``; rows that are not padded
    are entirely real (a frame centred on the last sample still belongs to real audio).

    Args:
        starts: int ``[N]`` first sample of each position.
        valid_samples: int64 ``[B]`` or ``None``.
        num_samples: ``T``, the padded length.

    Returns:
        bool ``[B, N]``, or ``None`` when every position of every row is real.
    """
    if not is_padded(valid_samples, num_samples):
        return None
    valid = valid_samples.to(starts.device)[:, None]
    mask = (starts[None, :] < valid) | (valid >= num_samples)
    return None if bool(mask.all()) else mask


def proportional_token_mask(valid_samples: torch.Tensor | None, num_samples: int,
                            num_tokens: int, has_cls: bool = False) -> torch.Tensor | None:
    """Token mask for a backbone whose tokens evenly tile the input in time.

    Token ``n`` (after an optional leading CLS token, always real) starts at sample
    ``n * T / N``; it is real iff that start is before ``valid_samples``.

    Args:
        valid_samples: int64 ``[B]`` or ``None``.
        num_samples: ``T``.
        num_tokens: ``N`` including the CLS token if any.
        has_cls: token 0 is a CLS token.

    Returns:
        bool ``[B, N]`` or ``None`` when every token is real.
    """
    timed = num_tokens - int(has_cls)
    device = valid_samples.device if valid_samples is not None else None
    starts = torch.div(torch.arange(timed, device=device) * num_samples, max(timed, 1),
                       rounding_mode="floor")
    mask = starts_mask(starts, valid_samples, num_samples)
    if mask is None or not has_cls:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
