"""Mixed precision for backbones: choosing a precision and entering it.

``fp32`` runs everything in float32. ``bf16`` and ``fp16`` run the network under
``torch.autocast``; the front ends switch autocast off for themselves and stay float32.
``bf16`` autocast works on CUDA and on CPUs (fast where the CPU has bf16 instructions);
``fp16`` autocast is CUDA-only here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection
from typing import Any

import torch

from pipeline.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# NVIDIA GPUs of compute capability 8.0 or newer (bf16 tensor cores), by the names Ray gives
# them in its ``accelerator_type:<name>`` node resources: the first all-caps model token of
# the device name ("NVIDIA A100-SXM4-80GB" -> A100, "NVIDIA L40S" -> L40S, "NVIDIA RTX
# A6000" -> RTX-A6000, "NVIDIA RTX PRO 6000 ..." -> RTX-PRO-6000), else the name hyphenated
# ("NVIDIA GeForce RTX 4090" -> GeForce-RTX-4090). Ampere (A*, RTX A*, GeForce 30xx), Ada
# (L*, GeForce 40xx), Hopper (H*, GH*) and Blackwell (B*, GB*, RTX PRO, GeForce 50xx).
# Anything else (K80, P100, T4, V100, V100S, TITAN-V, ...) counts as without bf16, and so
# does RTX-6000: Ray gives that name to the Turing Quadro RTX 6000 and to the RTX 6000 Ada.
_BF16_GPU_NAME = re.compile(
    r"(?:A|H|L|B|GB|GH)\d+[A-Z]*(?:-.*)?|RTX-(?:A|PRO-)\d+.*|(?:GeForce-)?RTX-[345]0\d0.*")


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def _cuda_supports_bf16(device: str | torch.device) -> bool:
    if not torch.cuda.is_available():
        return False
    index = torch.device(device).index
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 8


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """Turn a configured precision into the one to run with on ``device``.

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: torch device string (``cpu``, ``cuda``, ``cuda:1``).

    Returns:
        ``fp32``, ``bf16`` or ``fp16``. ``auto`` gives ``bf16`` on CUDA devices that support
        it (compute capability 8.0 and newer) and ``fp32`` everywhere else.

    Raises:
        ConfigError: unknown precision, or ``fp16`` on a device without CUDA autocast.
    """
    if precision == "auto":
        if _device_type(device) == "cuda" and _cuda_supports_bf16(device):
            return "bf16"
        return "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"{precision!r} is not a precision; use auto, fp32, bf16 or fp16",
                          "model.precision")
    if precision == "fp16" and _device_type(device) != "cuda":
        raise ConfigError(f"fp16 needs a CUDA device (this backbone runs on {device}); "
                          "use bf16 or fp32", "model.precision")
    if precision == "bf16" and _device_type(device) == "cuda" and not _cuda_supports_bf16(device):
        major, minor = torch.cuda.get_device_capability(torch.device(device).index)
        raise ConfigError(f"bf16 needs a GPU of compute capability 8.0 or newer (Ampere); "
                          f"this one is {major}.{minor}: use fp16 or fp32", "model.precision")
    return precision


def job_precision(configured: str, *, gpu_actors: bool, gpu_bf16: bool | None) -> str:
    """The precision a whole job runs at, fixed on the driver before its output namespace.

    ``auto`` must not be left for each actor to resolve: a job resumed on other hardware
    would write bf16 rows (GPU) into a namespace of fp32 rows (CPU) under one variant.

    Args:
        configured: ``model.precision``.
        gpu_actors: whether the embedding actors will get GPUs.
        gpu_bf16: whether those GPUs have bf16 (``None``: not known yet, e.g. an autoscaler
            has not added them; assumed, and checked by each actor when it loads).

    Returns:
        ``configured`` unless it is ``auto``; then ``bf16`` for GPU actors that have it,
        ``fp32`` otherwise.
    """
    if configured != "auto":
        return configured
    return "bf16" if gpu_actors and gpu_bf16 is not False else "fp32"


def gpus_have_bf16(accelerator_types: Collection[str]) -> bool | None:
    """From the accelerator types Ray reports for a cluster: True if every GPU is known to
    have bf16 (Ampere or newer), False if any is not (older, or a name this module does not
    know: ``auto`` then runs fp32, which works everywhere), None if no type is reported (no
    GPU nodes up yet; each actor checks its own GPU when it loads)."""
    types = set(accelerator_types)
    if not types:
        return None
    return all(_BF16_GPU_NAME.fullmatch(t) for t in types)


def autocast_context(precision: str, device: str | torch.device
                     ) -> contextlib.AbstractContextManager[Any]:
    """Context manager that runs the enclosed forward pass at ``precision``.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16`` (``auto`` is resolved first).
        device: the device the backbone runs on.

    Returns:
        ``contextlib.nullcontext()`` for fp32, else a ``torch.autocast`` context.
    """
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=_DTYPES[resolved])
