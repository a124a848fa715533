"""Our BEATs and EfficientNet against outputs of the real avex 1.4 code (tests/golden/).

The golden files were made by ``tests/golden/make_golden.py`` with avex's own modules and
the deterministic pseudo-random checkpoint of ``tests/golden/weights_gen.py``. Here the
same checkpoint is rebuilt, saved as safetensors in avex's key layout (with classifier and
predictor heads, without the fbank buffers, as a checkpoint from avex training looks) and
loaded strictly through the registry.

Measured maximum absolute differences (CPU, torch 2.13): BEATs last-layer features 2.2e-4
(values of unit scale), per-layer mean-pooled features 1.5e-5, logits 6.1e-6, NatureLM
pooled 1.1e-5; EfficientNet spectrogram 1.1e-5, features 6.4e-7, per-layer pooled 1.2e-7,
logits 6.4e-8. bf16 vs fp32 (mean-pooled, every layer): minimum cosine similarity 0.99999
(BEATs) and 0.99997 (EfficientNet).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models import create_backbone, load_model, pool
from pipeline.models.base import Backbone
from pipeline.models.beats import BeatsModel
from pipeline.models.efficientnet import EfficientNetModel
from pipeline.models.registry import get_entry, model_info
from tests.golden import weights_gen
from tests.unit.models.conftest import GOLDEN, generated_state, golden, save_safetensors

BEATS = "esp_aves2_sl_beats_all"
EFFNET = "esp_aves2_effnetb0_all"


def _cosines(backbone: Backbone, audio: torch.Tensor, layers: list[int],
             int8: Backbone | None = None) -> list[float]:
    """Per layer, the lowest cosine between ``backbone``'s fp32 and its bf16 (or ``int8``'s)
    mean-pooled embeddings."""
    pooled = {}
    for precision, model in (("fp32", backbone), ("bf16", backbone) if int8 is None
                             else ("int8", int8)):
        with torch.inference_mode(), model.autocast(precision):
            out = model.extract(audio, None, layers)
            pooled[precision] = [pool(out[i].tokens, out[i].mask, "mean") for i in layers]
    return [torch.nn.functional.cosine_similarity(a, b).min().item()
            for a, b in zip(*pooled.values(), strict=True)]


def test_state_dict_layouts_match_avex():
    """Every key and shape of avex's modules (recorded by make_golden.py) is ours."""
    layouts = json.loads((GOLDEN / "layouts.json").read_text())
    beats = BeatsModel(get_entry(BEATS).beats)
    features_only = _layout(beats)
    beats.attach_heads(5)
    assert _layout(beats) == layouts["beats_sl_classifier5"]
    # avex keeps the unused AudioSet predictor even in features-only mode; we drop it
    avex_naturelm = {k: v for k, v in layouts["beats_naturelm_features"].items()
                     if not k.startswith("backbone.predictor.")}
    assert features_only == avex_naturelm
    effnet = EfficientNetModel()
    effnet.attach_classifier(5)
    assert _layout(effnet) == layouts["effnet_classifier5"]


def _layout(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- BEATs


@pytest.fixture(scope="module")
def beats_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = BeatsModel(get_entry(BEATS).beats)
    layout.attach_heads(5)
    state = generated_state(layout, skip=("fbank.",))
    return save_safetensors(state, tmp_path_factory.mktemp("beats") / "sl_beats.safetensors")


@pytest.fixture(scope="module")
def beats(beats_checkpoint: Path) -> Backbone:
    return create_backbone(BEATS, weights=str(beats_checkpoint))


@pytest.mark.integration
def test_beats_features_match_avex(beats, golden_audio):
    expected = golden("beats")
    assert beats.weights.format == "safetensors" and len(beats.weights.sha256) == 64
    with torch.inference_mode():
        out = beats.extract(golden_audio, None, list(range(13)))
    features = out[12].tokens.numpy()
    assert features.shape == expected["features"].shape == (2, 144, 768)
    assert np.abs(features - expected["features"]).max() < 1e-3
    means = np.stack([out[i].tokens.mean(dim=1).numpy() for i in range(13)])
    assert np.abs(means - expected["layer_means"]).max() < 1e-4


@pytest.mark.integration
def test_beats_logits_match_avex(beats_checkpoint, golden_audio):
    model = load_model(BEATS, return_features_only=False, weights=str(beats_checkpoint))
    assert model.backbone.predictor is not None  # the fine-tuned head loads whole
    with torch.inference_mode():
        logits = model(golden_audio).numpy()
    assert np.abs(logits - golden("beats")["logits"]).max() < 1e-4


@pytest.mark.integration
def test_naturelm_clamps_like_avex(beats_checkpoint, golden_audio):
    naturelm = create_backbone("esp_aves2_naturelm_audio_v1_beats", weights=str(beats_checkpoint))
    loud = golden_audio * weights_gen.NATURELM_GAIN
    assert loud.abs().max() > 1.0
    with torch.inference_mode():
        pooled = naturelm.extract(loud, None, [12])[12].tokens.mean(dim=1).numpy()
    assert np.abs(pooled - golden("beats")["naturelm_mean"]).max() < 1e-4


@pytest.mark.integration
def test_beats_bf16_agrees_with_fp32(beats, golden_audio):
    assert min(_cosines(beats, golden_audio, list(range(13)))) > 0.999


@pytest.mark.integration
def test_beats_int8_agrees_with_fp32(beats, beats_checkpoint, golden_audio):
    int8 = create_backbone(BEATS, weights=str(beats_checkpoint), precision="int8")
    assert min(_cosines(beats, golden_audio, list(range(13)), int8)) > 0.999


@pytest.mark.integration
def test_beats_full_size_shapes(beats):
    for seconds, tokens in ((1, 48), (5, 248), (10, 496)):
        with torch.inference_mode():
            out = beats.extract(torch.zeros(1, seconds * 16_000), None, [12])[12]
        assert tuple(out.tokens.shape) == tuple(golden("beats")[f"shape_{seconds}s"]) == (
            1, tokens, 768)
    assert model_info(BEATS).layers[-1].name == "backbone.encoder.layers.11"


# --------------------------------------------------------------------------- EfficientNet


@pytest.fixture(scope="module")
def effnet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = EfficientNetModel()
    layout.attach_classifier(5)
    return save_safetensors(generated_state(layout),
                            tmp_path_factory.mktemp("effnet") / "effnet.safetensors")


def test_effnet_matches_avex(effnet_checkpoint, golden_audio):
    expected = golden("effnet")
    backbone = create_backbone(EFFNET, weights=str(effnet_checkpoint))
    with torch.inference_mode():
        image = backbone.module.spectrogram(golden_audio, None)
        out = backbone.extract(golden_audio, None, list(range(9)))
    assert np.abs(image[:, 0].numpy() - expected["spectrogram"]).max() < 1e-4
    assert torch.equal(image[:, 0], image[:, 2])
    features = out[8].tokens.transpose(1, 2).reshape(2, 1280, 4, 10).numpy()
    assert np.abs(features - expected["features"]).max() < 1e-5
    for i in range(9):
        assert np.abs(out[i].tokens.mean(dim=1).numpy() - expected[f"layer{i}_mean"]).max() < 1e-5
    # the two inputs give clearly different embeddings (the weights are not degenerate)
    assert np.abs(expected["layer8_mean"][0] - expected["layer8_mean"][1]).max() > 0.02
    assert min(_cosines(backbone, golden_audio, list(range(9)))) > 0.999


def test_effnet_logits_match_avex(effnet_checkpoint, golden_audio):
    model = load_model(EFFNET, return_features_only=False, weights=str(effnet_checkpoint))
    with torch.inference_mode():
        logits = model(golden_audio).numpy()
    assert np.abs(logits - golden("effnet")["logits"]).max() < 1e-5
