"""User plugins through ``module:Class`` and the ``embed_archive.backbones`` entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.models import create_backbone, describe_model, list_models, pool, validate_pooling


class FramePlugin:
    """Mean-and-energy frame features: a toy backbone with a CLS token."""

    sample_rate_hz = 8_000
    embedding_dim = 4
    layer_names = ("frames", "projected")
    layer_dims = (2, 4)
    has_cls = True

    def __init__(self, weights: str | None, device: str, frame: int = 800) -> None:
        self.weights = weights
        self.device = device
        self.frame = frame
        self.seen_padding: torch.Tensor | None = None

    def forward_features(self, audio: torch.Tensor, padding_mask: torch.Tensor | None
                         ) -> list[torch.Tensor]:
        self.seen_padding = padding_mask
        frames = audio.unfold(-1, self.frame, self.frame)  # [B, N, frame]
        feats = torch.stack([frames.mean(-1), frames.pow(2).mean(-1)], dim=-1)
        cls = feats.mean(dim=1, keepdim=True)
        first = torch.cat([cls, feats], dim=1)
        return [first, torch.cat([first, first * 2], dim=-1)]


PLUGIN = f"{FramePlugin.__module__}:FramePlugin"


def test_module_class_plugin_end_to_end():
    backbone = create_backbone(PLUGIN, options={"frame": 400})
    info = backbone.info
    assert info.family == "plugin" and info.sample_rate_hz == 8_000
    assert [(layer.name, layer.dim) for layer in info.layers] == [("frames", 2), ("projected", 4)]
    assert validate_pooling(info, "cls") == "cls"
    assert backbone.plugin.frame == 400 and backbone.plugin.weights is None
    audio = torch.randn(2, 8_000)
    valid = torch.tensor([8_000, 2_000])
    out = backbone.extract(audio, valid, [0, 1])
    assert out[1].tokens.shape == (2, 21, 4)
    assert backbone.plugin.seen_padding[1, 1_999:2_001].tolist() == [False, True]
    # CLS always real; 20 frames start every 400 samples: 5 start before sample 2000
    assert out[1].mask[1].sum() == 1 + 5 and out[1].mask[1, 0]
    assert torch.equal(pool(out[1].tokens, out[1].mask, "cls"), out[1].tokens[:, 0])


def test_plugin_options_are_checked_against_the_constructor():
    with pytest.raises(ConfigError, match="frame_size"):
        create_backbone(PLUGIN, options={"frame_size": 3})


def test_plugin_weights_are_fetched_to_a_local_path(tmp_path: Path):
    path = tmp_path / "plugin.bin"
    path.write_bytes(b"plugin weights")
    backbone = create_backbone(PLUGIN, weights=path.as_uri())
    assert backbone.plugin.weights == str(path)
    assert backbone.weights.format == "unknown" and len(backbone.weights.sha256) == 64


class WeightedPlugin(FramePlugin):
    """A plugin with torch parameters of its own."""

    def __init__(self, weights: str | None, device: str, frame: int = 800) -> None:
        super().__init__(weights, device, frame)
        self.w = torch.randn(4)


def test_a_random_plugin_is_the_same_model_in_every_actor():
    """Built under a generator seeded from the name and options, as built-in random models
    are: actors of one variant must not run different networks."""
    name = f"{WeightedPlugin.__module__}:WeightedPlugin"
    first = create_backbone(name, weights="random")
    torch.randn(100)  # whatever ran before
    assert torch.equal(create_backbone(name, weights="random").plugin.w, first.plugin.w)
    other = create_backbone(name, weights="random", options={"frame": 400})
    assert not torch.equal(other.plugin.w, first.plugin.w)


def test_a_plugins_default_weights_are_in_the_variant_by_their_weights_id(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Without a weights_id the job cannot tell two versions of a plugin's own weights apart,
    and says so; with one, the variant records it."""
    with caplog.at_level("WARNING", logger="pipeline.models.plugins"):
        assert create_backbone(PLUGIN).weights.sha256 == "unknown"
    assert "cannot hash" in caplog.text
    monkeypatch.setattr(FramePlugin, "weights_id", "frames-v2", raising=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.models.plugins"):
        assert create_backbone(PLUGIN).weights.sha256 == "frames-v2"
    assert "cannot hash" not in caplog.text


def test_entry_point_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[embed_archive.backbones]\ntoy = {PLUGIN}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "toy" in list_models()
    described = describe_model("toy")
    assert described["family"] == "plugin" and described["poolings"] == ["mean", "max", "cls"]
    assert described["description"].startswith("Mean-and-energy frame features")
    assert create_backbone("toy").info.name == "toy"


def test_plugin_missing_attributes():
    with pytest.raises(ConfigError, match="sample_rate_hz"):
        create_backbone(f"{__name__}:NotABackbone")


class NotABackbone:
    """Lacks the interface."""

    def __init__(self, weights, device):
        pass
