"""Strict checkpoint loading: layouts that must load, mismatches that must be named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.errors import CheckpointMismatchError, ConfigError, WeightsUnavailableError
from pipeline.models import create_backbone, load_model
from tests.unit.models.conftest import TINY_BEATS_PROJ, save_safetensors

SR = 16_000


@pytest.fixture
def tiny_state(tiny_beats) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_beats.module.state_dict().items()}


def _load_tiny(state: dict[str, torch.Tensor], path: Path):
    save_safetensors(state, path)
    return create_backbone("beats", weights=str(path), options=TINY_BEATS_PROJ)


def _same_output(a, b) -> bool:
    audio = 0.3 * torch.randn(1, SR, generator=torch.Generator().manual_seed(1))
    return torch.equal(a.extract(audio, None, [3])[3].tokens, b.extract(audio, None, [3])[3].tokens)


def test_avex_layout_with_heads_loads_features_only(tiny_beats, tiny_state, tmp_path):
    tiny_state["classifier.weight"] = torch.randn(7, 64)
    tiny_state["classifier.bias"] = torch.zeros(7)
    tiny_state["backbone.predictor.weight"] = torch.randn(527, 64)
    tiny_state["backbone.predictor.bias"] = torch.zeros(527)
    assert _same_output(_load_tiny(tiny_state, tmp_path / "heads.safetensors"), tiny_beats)


@pytest.mark.parametrize("prefix", ["module.", "model.", "module.model."])
def test_wrapper_prefixes_are_normalised(tiny_beats, tiny_state, tmp_path, prefix):
    state = {prefix + k: v for k, v in tiny_state.items()}
    assert _same_output(_load_tiny(state, tmp_path / "prefixed.safetensors"), tiny_beats)


def test_bare_beats_keys_get_backbone_prefix(tiny_beats, tiny_state, tmp_path):
    state = {k.removeprefix("backbone."): v for k, v in tiny_state.items()}
    assert _same_output(_load_tiny(state, tmp_path / "bare.safetensors"), tiny_beats)


def test_fbank_buffers_are_optional_but_checked(tiny_beats, tiny_state, tmp_path):
    without = {k: v for k, v in tiny_state.items() if ".fbank." not in k}
    assert _same_output(_load_tiny(without, tmp_path / "nofbank.safetensors"), tiny_beats)
    assert _same_output(_load_tiny(tiny_state, tmp_path / "fbank.safetensors"), tiny_beats)
    tiny_state["backbone.fbank.mel_fb"] = tiny_state["backbone.fbank.mel_fb"] * 1.01
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.fbank\.mel_fb differs"):
        _load_tiny(tiny_state, tmp_path / "badfbank.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_with_fbank_buffers_loads(tiny_state, tmp_path, dtype):
    """A checkpoint saved in fp16/bf16 holds the fbank buffers rounded to its dtype: the same
    front end, loaded (not refused as "different front-end settings"); a real difference in
    them is still refused."""
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_state.items()}
    backbone = _load_tiny(half, tmp_path / "half.safetensors")
    loaded = backbone.module.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in half.items() if ".fbank." not in k)
    half["backbone.fbank.mel_fb"] = (tiny_state["backbone.fbank.mel_fb"] * 1.05).to(dtype)
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.fbank\.mel_fb differs"):
        _load_tiny(half, tmp_path / "badfbank.safetensors")


def test_shared_relative_bias_may_be_stored_once(tiny_beats, tiny_state, tmp_path):
    key = "backbone.encoder.layers.{}.self_attn.relative_attention_bias.weight"
    once = {k: v for k, v in tiny_state.items() if k not in (key.format(1), key.format(2))}
    assert _same_output(_load_tiny(once, tmp_path / "once.safetensors"), tiny_beats)
    tiny_state[key.format(2)] = tiny_state[key.format(2)] + 1.0
    with pytest.raises(CheckpointMismatchError, match="share"):
        _load_tiny(tiny_state, tmp_path / "differ.safetensors")


def test_wrong_shape_extra_and_missing_keys_are_named(tiny_state, tmp_path):
    bad = dict(tiny_state)
    bad["backbone.encoder.layers.0.fc1.weight"] = torch.zeros(129, 64)
    bad["backbone.encoder.extra.weight"] = torch.zeros(3)
    del bad["backbone.encoder.layers.1.fc2.bias"]
    with pytest.raises(CheckpointMismatchError) as err:
        _load_tiny(bad, tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "backbone.encoder.layers.0.fc1.weight (checkpoint (129, 64), model (128, 64))" in message
    assert "1 unexpected keys: backbone.encoder.extra.weight" in message
    assert "1 missing keys: backbone.encoder.layers.1.fc2.bias" in message


def test_non_finite_tensors_are_named_and_large_finite_ones_load(tiny_beats, tiny_state, tmp_path):
    bad = dict(tiny_state)
    bad["backbone.encoder.layers.0.fc1.weight"] = tiny_state["backbone.encoder.layers.0.fc1.weight"].clone()
    bad["backbone.encoder.layers.0.fc1.weight"][3, 5] = float("nan")
    bad["backbone.encoder.layers.1.fc2.bias"] = torch.full_like(
        tiny_state["backbone.encoder.layers.1.fc2.bias"], float("inf"))
    with pytest.raises(CheckpointMismatchError) as err:
        _load_tiny(bad, tmp_path / "nan.safetensors")
    assert ("2 tensors with NaN or infinite values: backbone.encoder.layers.0.fc1.weight, "
            "backbone.encoder.layers.1.fc2.bias") in str(err.value)
    # An fp16 tensor whose sum overflows (the quick test) but whose values are all finite.
    big = dict(tiny_state)
    big["backbone.encoder.layers.0.fc1.weight"] = torch.full((128, 64), 60_000.0,
                                                             dtype=torch.float16)
    loaded = _load_tiny(big, tmp_path / "big.safetensors")
    assert torch.equal(loaded.module.state_dict()["backbone.encoder.layers.0.fc1.weight"],
                       torch.full((128, 64), 60_000.0))


def test_checkpoint_for_another_architecture_fails(tiny_state, tmp_path):
    path = save_safetensors(tiny_state, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        create_backbone("beats", weights=str(path))  # full-size defaults


def test_logits_need_a_classifier(tiny_state, tmp_path):
    path = save_safetensors(tiny_state, tmp_path / "nohead.safetensors")
    with pytest.raises(ConfigError, match="no classifier head"):
        load_model("beats", return_features_only=False, weights=str(path),
                   options=TINY_BEATS_PROJ)
    with pytest.raises(ConfigError, match="random weights have no classifier"):
        load_model("beats", return_features_only=False, weights="random",
                   options=TINY_BEATS_PROJ)


class Payload:
    """An arbitrary object a malicious checkpoint could smuggle in."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_torch_checkpoint_with_pickled_object_is_refused(tiny_state, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_state, "extra": Payload()}, path)
    with pytest.raises(WeightsUnavailableError, match="weights_only") as err:
        create_backbone("beats", weights=str(path), options=TINY_BEATS_PROJ)
    # The pickled global is print (or Ray's safe_print, should a Ray driver in this process
    # patch builtins.print; tests/conftest.py sets RAY_TQDM_PATCH_PRINT=0 against that).
    assert "Unsupported global: GLOBAL" in str(err.value) and "print" in str(err.value)
    assert "this must never run" not in capsys.readouterr().out


def test_plain_torch_state_dict_loads(tiny_beats, tiny_state, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(tiny_state, path)
    loaded = create_backbone("beats", weights=str(path), options=TINY_BEATS_PROJ)
    assert loaded.weights.format == "torch" and _same_output(loaded, tiny_beats)


def test_non_checkpoint_file_is_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="not a safetensors or torch checkpoint"):
        create_backbone("beats", weights=str(path), options=TINY_BEATS_PROJ)
