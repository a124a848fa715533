"""Masked pooling and precision selection."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.models import (
    create_backbone,
    gpus_have_bf16,
    job_precision,
    model_info,
    pool,
    resolve_precision,
    validate_pooling,
)
from pipeline.models.precision import autocast_context, int8_engine
from tests.unit.models.conftest import TINY_BEATS_PROJ


def test_mean_and_max_ignore_padding():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert pool(tokens, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(tokens, mask, "max").tolist() == [[3.0, 4.0]]
    assert pool(tokens, None, "mean").tolist() == [[pytest.approx(104 / 3), pytest.approx(-94 / 3)]]
    tokens[0, 2] = float("nan")  # whatever padding holds never counts
    assert pool(tokens, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(tokens, mask, "max").tolist() == [[3.0, 4.0]]


def test_rows_without_real_tokens_pool_to_nan():
    tokens = torch.ones(2, 3, 4)
    mask = torch.tensor([[False] * 3, [True] * 3])
    for method in ("mean", "max"):
        out = pool(tokens, mask, method)
        assert torch.isnan(out[0]).all() and (out[1] == 1).all()


def test_pool_is_float32_and_cls_is_token_zero():
    tokens = torch.randn(2, 5, 3).bfloat16()
    assert pool(tokens, None, "mean").dtype == torch.float32
    assert torch.equal(pool(tokens, None, "cls"), tokens[:, 0].float())
    with pytest.raises(ValueError, match="not a pooling"):
        pool(tokens, None, "median")


def test_validate_pooling():
    info = model_info("esp_aves2_sl_beats_all")
    assert validate_pooling(info, None) == "mean"
    assert validate_pooling(info, "max") == "max"
    with pytest.raises(ConfigError, match="no CLS token"):
        validate_pooling(info, "cls")


def test_resolve_precision_on_cpu():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    assert resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ConfigError, match="not a precision"):
        resolve_precision("int4", "cpu")


@pytest.mark.parametrize(("capability", "expected"), [((8, 0), "bf16"), ((7, 5), "fp32")])
def test_resolve_precision_on_cuda(monkeypatch, capability, expected):
    """The CUDA branch, with the device query stubbed (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert resolve_precision("auto", "cuda:0") == expected
    assert resolve_precision("fp16", "cuda") == "fp16"


def test_autocast_context():
    with autocast_context("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_tiny_beats_bf16_agrees_with_fp32(tiny_beats):
    audio = 0.3 * torch.randn(2, 32_000, generator=torch.Generator().manual_seed(0))
    pooled = {}
    for precision in ("fp32", "bf16"):
        with torch.inference_mode(), tiny_beats.autocast(precision):
            out = tiny_beats.extract(audio, torch.tensor([32_000, 20_000]), [3])[3]
            pooled[precision] = pool(out.tokens, out.mask, "mean")
    assert out.tokens.dtype == torch.bfloat16
    cosine = torch.nn.functional.cosine_similarity(pooled["fp32"], pooled["bf16"])
    assert cosine.min().item() > 0.999 and not math.isnan(cosine.sum().item())


def test_int8_quantizes_every_linear_layer_and_agrees_with_fp32(tiny_beats):
    """int8 replaces the network's Linear layers once, at load, and runs without autocast;
    several layers still come from one pass, padded rows still pool over their real part."""
    audio = 0.3 * torch.randn(2, 32_000, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([32_000, 20_000])
    int8 = create_backbone("beats", weights="random", options=TINY_BEATS_PROJ, precision="int8")
    assert not any(type(m) is torch.nn.Linear for m in int8.module.modules())
    quantized = [m for m in int8.module.modules()
                 if type(m).__module__ == "torch.ao.nn.quantized.dynamic.modules.linear"]
    assert len(quantized) == sum(type(m) is torch.nn.Linear for m in tiny_beats.module.modules())
    with int8.autocast("int8"):
        assert not torch.is_autocast_enabled("cpu")
    pooled = {}
    for name, backbone in (("fp32", tiny_beats), ("int8", int8)):
        with torch.inference_mode(), backbone.autocast(name):
            out = backbone.extract(audio, valid, [1, 3])
        pooled[name] = {k: pool(f.tokens, f.mask, "mean") for k, f in out.items()}
    for layer in (1, 3):
        cosine = torch.nn.functional.cosine_similarity(pooled["fp32"][layer], pooled["int8"][layer])
        assert cosine.min().item() > 0.999
        assert not torch.equal(pooled["fp32"][layer], pooled["int8"][layer])  # it did quantize


def test_int8_packs_for_onednn_where_the_cpu_has_vnni():
    supported = ["qnnpack", "onednn", "x86", "fbgemm"]
    assert int8_engine({"avx2", "avx512_vnni"}, supported) == "onednn"
    assert int8_engine({"avx2", "avx_vnni"}, supported) == "onednn"
    assert int8_engine({"avx2", "avx512f"}, supported) is None  # torch's default stands
    assert int8_engine({"avx512_vnni"}, ["x86", "fbgemm"]) is None
    assert int8_engine(set(), ["qnnpack"]) is None  # an ARM CPU


@pytest.mark.parametrize("engine", [None, "onednn"])
def test_int8_is_packed_on_the_chosen_engine_and_the_process_keeps_its_own(
        engine, tiny_beats, monkeypatch):
    """The weights are packed under the chosen engine (a quantized Linear runs on the engine
    it was packed for); the process-wide setting is put back; either engine agrees with fp32."""
    from torch.ao import quantization

    from pipeline.models import precision

    packed_on = []
    original = quantization.quantize_dynamic

    def recording(*args, **kwargs):
        packed_on.append(torch.backends.quantized.engine)
        return original(*args, **kwargs)

    monkeypatch.setattr(quantization, "quantize_dynamic", recording)
    monkeypatch.setattr(precision, "int8_engine", lambda flags, supported: engine)
    before = torch.backends.quantized.engine
    int8 = create_backbone("beats", weights="random", options=TINY_BEATS_PROJ, precision="int8")
    assert packed_on == [engine or before]
    assert torch.backends.quantized.engine == before
    audio = 0.3 * torch.randn(2, 32_000, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, ref = (b.extract(audio, None, [3])[3].tokens.mean(1) for b in (int8, tiny_beats))
    assert torch.nn.functional.cosine_similarity(ours, ref).min().item() > 0.999


def test_int8_of_a_network_without_linear_layers_is_refused(effnet):
    """EfficientNet-B0 is all convolutions: int8 would change nothing but the variant."""
    with pytest.raises(ConfigError, match="efficientnet_b0 has no Linear layers") as err:
        create_backbone("efficientnet_b0", weights="random", precision="int8")
    assert err.value.field == "model.precision"


def test_int8_is_refused_off_the_cpu_and_without_a_torch_network(monkeypatch):
    class Frames:  # a plugin that is not an nn.Module
        sample_rate_hz, embedding_dim, layer_names, layer_dims = 8_000, 1, ("x",), (1,)

        def __init__(self, weights, device):
            pass

        def forward_features(self, audio, padding_mask):
            return [audio.unfold(-1, 800, 800).mean(-1, keepdim=True)]

    monkeypatch.setattr(sys.modules[__name__], "Frames", Frames, raising=False)
    with pytest.raises(ConfigError, match="not an nn.Module|no torch network") as err:
        create_backbone(f"{__name__}:Frames", precision="int8")
    assert err.value.field == "model.precision"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="int8 runs on CPUs only") as err:
        resolve_precision("int8", "cuda")
    assert err.value.field == "model.precision"


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 0))
    with pytest.raises(ConfigError, match="compute capability 8.0 or newer.*7.0") as err:
        resolve_precision("bf16", "cuda")
    assert err.value.field == "model.precision"


def test_job_precision_from_where_the_actors_run():
    assert job_precision("auto", gpu_actors=False, gpu_bf16=None) == "fp32"
    assert job_precision("auto", gpu_actors=False, gpu_bf16=True) == "fp32"
    assert job_precision("auto", gpu_actors=True, gpu_bf16=True) == "bf16"
    assert job_precision("auto", gpu_actors=True, gpu_bf16=None) == "bf16"
    assert job_precision("auto", gpu_actors=True, gpu_bf16=False) == "fp32"
    assert job_precision("fp16", gpu_actors=False, gpu_bf16=None) == "fp16"
    assert gpus_have_bf16(["H100"]) is True
    assert gpus_have_bf16(["A100-80G", "T4"]) is False
    assert gpus_have_bf16([]) is None


@pytest.mark.parametrize("device_name", [
    "NVIDIA A100-SXM4-80GB", "NVIDIA A10G", "NVIDIA A10", "NVIDIA L4", "NVIDIA L40S",
    "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA B200", "NVIDIA GB200", "NVIDIA RTX A6000",
    "NVIDIA RTX PRO 6000 Blackwell Server Edition", "NVIDIA GeForce RTX 3090",
    "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 5090", "NVIDIA GeForce RTX 3060",
])
def test_gpus_with_bf16_by_the_names_ray_gives_them(device_name: str) -> None:
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    name = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(device_name)
    assert gpus_have_bf16([name]) is True, name


@pytest.mark.parametrize("device_name", [
    "Tesla K80", "Tesla P100-PCIE-16GB", "Tesla T4", "Tesla V100-SXM2-16GB",
    "Tesla V100S-PCIE-32GB", "NVIDIA TITAN V", "Quadro RTX 6000", "NVIDIA GeForce RTX 2080 Ti",
    "Tesla M60", "NVIDIA GeForce GTX 1080",
    "NVIDIA RTX 6000 Ada Generation",  # bf16, but Ray names it RTX-6000 like the Turing card
    "Quadro RTX 4000", "Quadro RTX 5000", "Quadro RTX 3000",  # Turing: were taken for bf16
])
def test_older_or_unknown_gpus_run_auto_at_fp32(device_name: str) -> None:
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    name = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(device_name)
    assert gpus_have_bf16([name]) is False, name
    assert job_precision("auto", gpu_actors=True, gpu_bf16=gpus_have_bf16([name])) == "fp32"


def test_bf16_on_cuda_without_a_gpu_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """It raised torch's AssertionError ('Torch not compiled with CUDA enabled')."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine too
    with pytest.raises(ConfigError, match="sees no CUDA device") as err:
        resolve_precision("bf16", "cuda")
    assert err.value.field == "model.precision"


def test_float32_on_gpus_is_ieee_float32_not_tf32() -> None:
    """cuDNN's default would run fp32 convolutions in TF32 on Ampere and later: rows of one
    variant would differ by GPU generation. The actors turn it off, process-wide."""
    from pipeline.models import exact_float32_on_gpus

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    legacy = cudnn.allow_tf32
    before = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision
    try:
        exact_float32_on_gpus()
        assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision,
                matmul.fp32_precision) == ("ieee", "ieee", "ieee")
        # The legacy flags read False, not raise (torch.backends.cudnn.flags() reads them).
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
        with cudnn.flags(enabled=cudnn.enabled):
            pass
    finally:
        cudnn.allow_tf32 = legacy
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision = before
    assert (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision,
            matmul.fp32_precision) == before
    assert cudnn.allow_tf32 == legacy
