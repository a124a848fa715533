"""Produce golden reference outputs from the real avex code (BEATs and EfficientNet-B0).

This runs in a separate virtual environment with avex 1.4.0 (it needs torchaudio and
torchvision, which do not import in the project's CPU environment). Set it up once::

    python3.11 -m venv /work/avex-venv
    /work/avex-venv/bin/pip install torch==2.13.0
    /work/avex-venv/bin/pip install --no-deps avex==1.4.0 torchaudio==2.11.0 torchvision==0.28.0
    /work/avex-venv/bin/pip install pydantic pydantic-settings omegaconf einops tqdm pyyaml \\
        numpy soundfile safetensors pillow huggingface_hub gcsfs s3fs h5py
    rm /work/avex-venv/lib/python3.11/site-packages/torchaudio/lib/*.so   # pure-Python use

then, from the repository root::

    /work/avex-venv/bin/python tests/golden/make_golden.py

It builds avex's models with the registry configs, loads the deterministic pseudo-random
checkpoint from ``weights_gen.py`` (the unit tests rebuild the same one), runs them on
``weights_gen.golden_batch()`` (3 s of a real recording and 3 s of a synthetic chirp) and
writes ``beats_golden.npz``, ``effnet_golden.npz``, ``layouts.json`` (every avex state-dict
key and shape) and ``manifest.json`` here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import weights_gen

SHAPE_SECONDS = (1, 5, 10)
AVEX_CONFIGS = "avex.api.configs.official_models"


def _torchvision_shim() -> None:
    """Let torchvision import without its compiled ops (CPU torch build mismatch)."""
    spec = importlib.util.find_spec("torchvision")
    try:
        torch.ops.load_library(os.path.join(next(iter(spec.submodule_search_locations)), "_C.so"))
    except OSError:
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_shim.lib = lib  # keep the registration alive


def _model_spec(name: str) -> dict:
    from importlib import resources

    import yaml

    text = (resources.files(AVEX_CONFIGS) / f"{name}.yml").read_text()
    return yaml.safe_load(text)["model_spec"]


LAYOUTS: dict[str, dict[str, list[int]]] = {}
"""State-dict key -> shape of each avex model built here (written to layouts.json)."""


def _load_generated(model: torch.nn.Module, layout: str, skip: tuple[str, ...] = ()) -> None:
    LAYOUTS[layout] = {k: list(v.shape) for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {k: torch.from_numpy(v) for k, v in
             weights_gen.generate_state_dict(shapes, skip=skip).items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(s in k for s in skip)]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)


def _capture(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Register hooks that keep each named module's (first) output."""
    captured: dict[str, torch.Tensor] = {}
    for name in names:
        def hook(_m, _i, out, name=name):
            captured[name] = out[0] if isinstance(out, tuple) else out
        model.get_submodule(name).register_forward_hook(hook)
    return captured


def beats_golden(audio: torch.Tensor) -> dict[str, np.ndarray]:
    """avex BEATs (sl_beats_all config, 5-class classifier) outputs on ``audio``."""
    import torchaudio
    from avex.models.beats_model import Model

    init = _model_spec("esp_aves2_sl_beats_all")["init_config"]
    model = Model(num_classes=5, pretrained=False, device="cpu", init_config=init,
                  return_features_only=False).eval()
    _load_generated(model, "beats_sl_classifier5", skip=("fbank.",))
    layers = ["backbone.post_extract_proj"] + [f"backbone.encoder.layers.{i}" for i in range(12)]
    captured = _capture(model, layers)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        out["logits"] = model(audio).numpy()
        means = []
        for name in layers:  # encoder blocks run time-major (T, B, C)
            x = captured[name] if name.endswith("proj") else captured[name].transpose(0, 1)
            means.append(x.mean(dim=1))
        out["layer_means"] = torch.stack(means).numpy()
        out["features"] = model.backbone(audio)[0].numpy()
        out["fbank_kaldi"] = np.stack([
            torchaudio.compliance.kaldi.fbank(row[None] * 2**15, num_mel_bins=128,
                                              sample_frequency=16000, frame_length=25,
                                              frame_shift=10).numpy() for row in audio])
        for seconds in SHAPE_SECONDS:
            shape = model.backbone(torch.zeros(1, seconds * weights_gen.SAMPLE_RATE_HZ))[0].shape
            out[f"shape_{seconds}s"] = np.array(shape)
    out.update(_naturelm_golden(audio))
    return out


def _naturelm_golden(audio: torch.Tensor) -> dict[str, np.ndarray]:
    """NatureLM BEATs (clamps to [-1, 1]) on the batch times ``NATURELM_GAIN``."""
    from avex.models.beats_model import Model

    init = _model_spec("esp_aves2_naturelm_audio_v1_beats")["init_config"]
    model = Model(pretrained=False, device="cpu", init_config=init, use_naturelm=True,
                  return_features_only=True).eval()
    _load_generated(model, "beats_naturelm_features", skip=("fbank.",))
    with torch.no_grad():
        features = model(audio * weights_gen.NATURELM_GAIN)
    return {"naturelm_mean": features.mean(dim=1).numpy()}


def effnet_golden(audio: torch.Tensor) -> dict[str, np.ndarray]:
    """avex EfficientNet-B0 (effnetb0_all audio config, 5-class head) outputs on ``audio``."""
    from avex.configs import AudioConfig
    from avex.models.efficientnet import Model

    spec = _model_spec("esp_aves2_effnetb0_all")
    model = Model(num_classes=5, pretrained=False, device="cpu",
                  audio_config=AudioConfig(**spec["audio_config"]),
                  return_features_only=False).eval()
    _load_generated(model, "effnet_classifier5")
    captured = _capture(model, [f"model.features.{i}" for i in range(9)])
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        out["logits"] = model(audio).numpy()
        for i in range(9):
            out[f"layer{i}_mean"] = captured[f"model.features.{i}"].mean(dim=(2, 3)).numpy()
        image = model.process_audio(audio)
        out["spectrogram"] = image[:, 0].numpy()
        out["features"] = model.model.features(image).numpy()
        for seconds in SHAPE_SECONDS:
            x = model.process_audio(torch.zeros(1, seconds * weights_gen.SAMPLE_RATE_HZ))
            x[..., 0, 0] = 1.0  # a constant image would divide 0 by 1e-8; shape is what counts
            out[f"shape_{seconds}s"] = np.array(model.model.features(x).shape)
    return out


def main() -> None:
    _torchvision_shim()
    torch.manual_seed(0)
    audio = torch.from_numpy(weights_gen.golden_batch())
    np.savez_compressed(HERE / "beats_golden.npz", **beats_golden(audio))
    np.savez_compressed(HERE / "effnet_golden.npz", **effnet_golden(audio))
    manifest = {
        "generated_by": "tests/golden/make_golden.py",
        "versions": {p: importlib.metadata.version(p)
                     for p in ("avex", "torch", "torchaudio", "torchvision", "numpy")},
        "seed": weights_gen.SEED,
        "input": {
            "rows": [f"{weights_gen.REAL_CLIP} from {weights_gen.REAL_CLIP_OFFSET_S} s",
                     "weights_gen.synthetic_clip()"],
            "seconds": weights_gen.CLIP_SECONDS, "sample_rate_hz": weights_gen.SAMPLE_RATE_HZ,
            "naturelm_gain": weights_gen.NATURELM_GAIN,
        },
        "beats": {"config": "esp_aves2_sl_beats_all init_config", "classifier": 5,
                  "fbank_kaldi": "torchaudio.compliance.kaldi.fbank(x * 2**15), unnormalised",
                  "layer_means": "[13, B, 768]: post_extract_proj, encoder.layers.0..11"},
        "effnet": {"config": "esp_aves2_effnetb0_all audio_config", "classifier": 5,
                   "spectrogram": "AudioProcessor output, channel 0"},
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (HERE / "layouts.json").write_text(json.dumps(LAYOUTS, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
