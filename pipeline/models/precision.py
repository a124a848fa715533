"""Mixed precision for backbones: choosing a precision and entering it.

``fp32`` runs everything in float32. ``bf16`` and ``fp16`` run the network under
``torch.autocast``; the front ends switch autocast off for themselves and stay float32.
``bf16`` autocast works on CUDA and on CPUs (fast where the CPU has bf16 instructions);
``fp16`` autocast is CUDA-only here. ``int8`` is for CPUs: the network's ``nn.Linear``
layers are replaced, once after loading, by dynamically quantized ones (int8 weights per
output channel, activations quantized per call from their own range; everything else,
front ends and convolutions included, stays float32).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_PRECISIONS = frozenset(_DTYPES)

# NVIDIA GPUs of compute capability 8.0 or newer (bf16 tensor cores), by the names Ray gives
# them in its ``accelerator_type:<name>`` node resources: the first all-caps model token of
# the device name ("NVIDIA A100-SXM4-80GB" -> A100, "NVIDIA L40S" -> L40S, "NVIDIA RTX
# A6000" -> RTX-A6000, "NVIDIA RTX PRO 6000 ..." -> RTX-PRO-6000), else the name hyphenated
# ("NVIDIA GeForce RTX 4090" -> GeForce-RTX-4090). Ampere (A*, RTX A*, GeForce 30xx), Ada
# (L*, GeForce 40xx), Hopper (H*, GH*) and Blackwell (B*, GB*, RTX PRO, GeForce 50xx).
# Anything else (K80, P100, T4, V100, V100S, TITAN-V, ...) counts as without bf16, and so do
# RTX-3000 to RTX-8000: Ray gives those names to the Turing Quadro RTX 3000-8000 (7.5), and
# to the RTX 4000-6000 Ada too (a bf16 card counted without is only slower; the reverse
# failed every actor at load). GeForce numbers end in 50-90 (RTX 3060, 4090, 5080).
_BF16_GPU_NAME = re.compile(
    r"(?:A|H|L|B|GB|GH)\d+[A-Z]*(?:-.*)?|RTX-(?:A|PRO-)\d+.*|GeForce-RTX-[345]0\d0.*"
    r"|RTX-[345]0[5-9]0.*")


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
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` or ``int8``.
        device: torch device string (``cpu``, ``cuda``, ``cuda:1``).

    Returns:
        ``fp32``, ``bf16``, ``fp16`` or ``int8``. ``auto`` gives ``bf16`` on CUDA devices
        that support it (compute capability 8.0 and newer) and ``fp32`` everywhere else.

    Raises:
        ConfigError: unknown precision, ``fp16`` on a device without CUDA autocast, or
            ``int8`` off the CPU.
    """
    if precision == "auto":
        if _device_type(device) == "cuda" and _cuda_supports_bf16(device):
            return "bf16"
        return "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"{precision!r} is not a precision; use auto, fp32, bf16, fp16 "
                          "or int8", "model.precision")
    if precision == "int8" and _device_type(device) != "cpu":
        raise ConfigError(f"int8 runs on CPUs only (this backbone runs on {device}); use bf16 "
                          "on a GPU, or set compute.gpus_per_actor: 0", "model.precision")
    if precision == "fp16" and _device_type(device) != "cuda":
        raise ConfigError(f"fp16 needs a CUDA device (this backbone runs on {device}); "
                          "use bf16 or fp32", "model.precision")
    if precision == "bf16" and _device_type(device) == "cuda" and not _cuda_supports_bf16(device):
        if not torch.cuda.is_available():
            raise ConfigError(f"bf16 on {device}, but this process sees no CUDA device "
                              "(a CPU build of torch, or no GPU granted)", "model.precision")
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
        precision: ``fp32``, ``bf16``, ``fp16`` or ``int8`` (``auto`` is resolved first).
        device: the device the backbone runs on.

    Returns:
        ``contextlib.nullcontext()`` for fp32 and int8 (whose layers were quantized when the
        backbone was prepared: :func:`quantize_linear_int8`), else a ``torch.autocast``
        context.
    """
    resolved = resolve_precision(precision, device)
    if resolved not in AUTOCAST_PRECISIONS:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=_DTYPES[resolved])


def exact_float32_on_gpus() -> None:
    """Make float32 on CUDA IEEE float32 in this process: no TF32 in convolutions or matmuls.

    Torch lets cuDNN run float32 convolutions in TF32 by default on Ampere and later (a
    10-bit mantissa, ~1e-3 relative error), so ``fp32`` rows, and those of the fp32 retry of
    an autocast overflow, would differ by GPU generation while their variant says the same
    precision. Ops under autocast (bf16, fp16) are unchanged. Process-wide: called where a
    process runs a backbone on a GPU (the job's actors, the benchmark), not by
    :func:`create_backbone`, so a library caller keeps its own setting.

    cuDNN's RNNs (a plugin's LSTM or GRU) default to TF32 too, so they are set as well; and
    the legacy ``torch.backends.cudnn.allow_tf32`` flag is turned off first: torch keeps it
    apart from the per-operator settings and raises on reading it (as
    ``torch.backends.cudnn.flags()`` and ``torch.compile``'s convolutions do) unless it
    agrees with both."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"


def no_linear_layers(name: str) -> ConfigError:
    """The error for int8 asked of a network with nothing int8 would change."""
    return ConfigError(f"{name} has no Linear layers to quantize: int8 would run it in float32 "
                       "under a variant that says int8; use fp32 (or bf16)", "model.precision")


def int8_engine(cpu_flags: Collection[str], supported: Collection[str]) -> str | None:
    """The quantized engine to pack int8 Linear weights for: ``onednn`` on a CPU with VNNI
    (AVX512-VNNI or AVX-VNNI) where this torch has it, else ``None`` (torch's default, ``x86``,
    whose dynamic Linear is fbgemm's).

    On a 2-vCPU Xeon with AVX512-VNNI, full-size BEATs in int8 on one thread, a batch of 16
    5-s windows, three alternating runs: 0.165-0.170 s per window packed for oneDNN against
    0.178-0.182 for the default (1.08x), the same cosine to float32 (0.99970 per token).
    Packing for oneDNN costs more once: building and quantizing the network took 3.0-3.4 s
    against 2.4-2.5, won back after about 60 windows per actor. Without VNNI neither engine
    was measured, so torch's own choice stands.
    """
    vnni = {"avx512_vnni", "avx_vnni"} & set(cpu_flags)
    return "onednn" if vnni and "onednn" in supported else None


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags, as Linux lists them (empty where it does not)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


@contextlib.contextmanager
def _quantized_engine(engine: str | None) -> Iterator[None]:
    """``torch.backends.quantized.engine`` set to ``engine`` inside the block (if given).

    Weights are packed for the engine in force when they are quantized, and a quantized
    Linear runs on the engine its weights were packed for, so the process-wide setting is
    put back afterwards and nothing else in the process sees it changed.
    """
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine or saved
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved


def quantize_linear_int8(module: nn.Module, name: str) -> float:
    """Replace ``module``'s ``nn.Linear`` layers, in place, by dynamically quantized ones.

    Weights become int8 per output channel; each call quantizes its activations from their
    own range and accumulates in int32, on the engine :func:`int8_engine` picks (oneDNN on a
    CPU with VNNI). On a 2-vCPU Xeon with AVX512-VNNI, one thread, batches of 16 5-s windows,
    full-size BEATs ran at 0.17 s per window against 0.36-0.37 s in float32, cosine to
    float32 >= 0.9997 per token (random weights).

    This is torch's own ``torch.ao.quantization.quantize_dynamic``, which torch marks as
    deprecated in favour of torchao; torchao 0.18's ``Int8DynamicActivationInt8WeightConfig``
    ran the same windows at 0.22-0.32 s on that CPU (0.26 compiled): slower than float32,
    so not used. Its deprecation warnings are silenced here, once, not for the process.

    Args:
        module: the network, on the CPU, in eval mode.
        name: the backbone's name, for the log.

    Returns:
        The share of the network's parameters that are now int8 (near 1 for transformers;
        convolutions stay float32).

    Raises:
        ConfigError: the network has no Linear layer (EfficientNet-B0), or this torch has
            no dynamic quantization.
    """
    total = sum(p.numel() for p in module.parameters())
    linear = sum(p.numel() for m in module.modules() if isinstance(m, nn.Linear)
                 for p in m.parameters())
    if not linear:
        raise no_linear_layers(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError as e:
            raise ConfigError(f"int8 needs torch.ao.quantization.quantize_dynamic, which torch "
                              f"{torch.__version__} does not have ({e}); use fp32 or bf16",
                              "model.precision") from e
        engine = int8_engine(cpu_flags(), torch.backends.quantized.supported_engines)
        with _quantized_engine(engine):
            quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig},
                             dtype=torch.qint8, inplace=True)
    share = linear / total if total else 0.0
    log.info("%s: int8 dynamic quantization of its Linear layers (%s), %.0f%% of %.1fM "
             "parameters%s", name, engine or torch.backends.quantized.engine, 100 * share,
             total / 1e6,
             "" if share >= 0.5 else " (the rest, mostly convolutions, stays float32: "
             "expect little speed-up)")
    return share
