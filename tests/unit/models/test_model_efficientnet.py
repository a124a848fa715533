"""EfficientNet-B0: shapes, layers, column masks, padding, checkpoint layouts."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import CheckpointMismatchError, ConfigError
from pipeline.models import create_backbone, load_model, pool
from pipeline.models.efficientnet import LAYER_DIMS, LAYER_STRIDES, EfficientNetAudioConfig
from tests.unit.models.conftest import golden, save_safetensors

SR = 16_000


def _audio(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, int(seconds * SR), generator=g)


def test_info(effnet):
    info = effnet.info
    assert [layer.dim for layer in info.layers] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert [layer.name for layer in info.layers] == [f"model.features.{i}" for i in range(9)]
    assert info.embedding_dim == 1280 and info.min_input_samples == 401
    assert LAYER_STRIDES == (2, 2, 4, 8, 16, 16, 32, 32, 32)


@pytest.mark.parametrize(("seconds", "width"), [(1, 4), (5, 16), (10, 32)])
def test_feature_shapes_match_avex(effnet, seconds, width):
    assert golden("effnet")[f"shape_{seconds}s"].tolist() == [1, 1280, 4, width]
    model = effnet.module
    with torch.no_grad():
        features = model(_audio(1, seconds))
    assert features.shape == (1, 1280, 4, width)
    assert EfficientNetAudioConfig().feature_shape(seconds * SR) == (4, width)
    tokens = effnet.extract(_audio(1, seconds), None, [8])[8].tokens
    assert torch.equal(tokens, features.flatten(2).transpose(1, 2))


def test_layers_from_one_pass_equal_separate_passes(effnet):
    audio = _audio(2, 1.0)
    together = effnet.extract(audio, None, list(range(9)))
    for layer in (0, 4, 8):
        assert torch.equal(together[layer].tokens, effnet.extract(audio, None, [layer])[layer].tokens)
    assert [together[i].tokens.shape[-1] for i in range(9)] == list(LAYER_DIMS)


def test_column_masks_follow_stride(effnet):
    audio = _audio(2, 1.0)
    valid = torch.tensor([16_000, 8_000])
    out = effnet.extract(audio, valid, [0, 8])
    final = out[8].mask.view(2, 4, 4)  # H=4 rows, W=4 columns
    assert (final == final[:, :1]).all()  # one value per time column
    # columns start at 32 * w * 160 = 0, 5120, 10240, 15360 samples
    assert final[1, 0].tolist() == [True, True, False, False]
    assert final[0].all()
    first = out[0].mask.view(2, 64, 51)
    assert first[1, 0].sum() == 25  # stride 2: columns start every 320 samples, 8000/320 = 25


def test_padding_normalises_over_real_frames_and_ignores_padding_content(effnet):
    audio = _audio(2, 2.0)
    valid = torch.tensor([32_000, 20_000])
    image = effnet.module.spectrogram(audio, valid)
    real_frames = 20_000 // 160 + 1  # frames centred before sample 20000
    assert image[1, :, :, :real_frames].min() == 0.0
    assert image[1, :, :, :real_frames].max() == pytest.approx(1.0, abs=1e-6)
    assert (image[1, :, :, real_frames:] == 0).all()
    assert torch.equal(image[0], effnet.module.spectrogram(audio[:1], None)[0])
    noisy = audio.clone()
    noisy[1, 20_000:] = torch.randn(12_000)
    a = effnet.extract(audio, valid, [8])[8]
    b = effnet.extract(noisy, valid, [8])[8]
    assert torch.equal(pool(a.tokens, a.mask, "mean"), pool(b.tokens, b.mask, "mean"))


def test_torchvision_layout_loads_and_gives_logits(effnet, tmp_path):
    """A torchvision ``efficientnet_b0`` state dict: no ``model.`` prefix, 1000-class head."""
    state = {k.removeprefix("model."): v for k, v in effnet.module.state_dict().items()}
    state["classifier.1.weight"] = torch.randn(1000, 1280) * 0.01
    state["classifier.1.bias"] = torch.zeros(1000)
    path = save_safetensors(state, tmp_path / "torchvision_b0.safetensors")
    loaded = create_backbone("efficientnet_b0", weights=str(path))
    audio = _audio(2, 1.0)
    assert torch.equal(loaded.extract(audio, None, [8])[8].tokens,
                       effnet.extract(audio, None, [8])[8].tokens)
    classifier = load_model("efficientnet_b0", return_features_only=False, weights=str(path))
    with torch.no_grad():
        logits = classifier(audio)
        pooled = effnet.module(audio).mean(dim=(2, 3))
    assert logits.shape == (2, 1000)
    assert torch.allclose(logits, pooled @ state["classifier.1.weight"].T, atol=1e-5)


def test_padding_mask_before_real_audio_is_refused(effnet):
    """avex-style ``padding_mask`` is padding at the end; left padding would be embedded in
    place of the audio it zeroes, so it fails instead."""
    audio = _audio(2, 1.0)
    left = torch.zeros_like(audio, dtype=torch.bool)
    left[1, :4_000] = True
    with torch.no_grad():
        assert effnet.module(audio, padding_mask=left.flip(1)).shape == (2, 1280, 4, 4)
        with pytest.raises(ValueError, match="only at the end of each row"):
            effnet.module(audio, padding_mask=left)


def test_wrong_shape_names_the_key(effnet, tmp_path):
    state = dict(effnet.module.state_dict())
    state["model.features.8.0.weight"] = torch.zeros(1280, 321, 1, 1)
    path = save_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"model\.features\.8\.0\.weight"):
        create_backbone("efficientnet_b0", weights=str(path))


def test_front_end_options(effnet):
    small = create_backbone("efficientnet_b0", weights="random", options={"n_mels": 64})
    assert small.info.preprocessing["n_mels"] == 64
    assert small.extract(_audio(1, 1.0), None, [8])[8].tokens.shape == (1, 2 * 4, 1280)
    with pytest.raises(ConfigError, match="n_melz"):
        create_backbone("efficientnet_b0", weights="random", options={"n_melz": 64})
    with pytest.raises(ConfigError, match="win_length 1024 is longer than n_fft 800"):
        create_backbone("efficientnet_b0", weights="random", options={"win_length": 1024})
    with pytest.raises(ConfigError, match="positive integers"):  # YAML's `n_mels: yes`
        create_backbone("efficientnet_b0", weights="random", options={"n_mels": True})
