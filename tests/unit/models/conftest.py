"""Fixtures for the model tests: tiny architectures, checkpoint writers, golden inputs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.models import create_backbone
from pipeline.models.base import Backbone
from tests.golden import weights_gen

TINY_BEATS = {"encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128,
              "encoder_attention_heads": 4, "embed_dim": 64}
"""The tiny BEATs the integration tests use (no post_extract_proj: embed == encoder dim)."""

TINY_BEATS_PROJ = {**TINY_BEATS, "embed_dim": 32, "encoder_layers": 3}
"""A tiny BEATs with a projection and three blocks (layers 0..3)."""

GOLDEN = Path(weights_gen.__file__).resolve().parent


def generated_state(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The deterministic pseudo-random checkpoint for ``module``'s layout."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return {k: torch.from_numpy(v) for k, v in
            weights_gen.generate_state_dict(shapes, skip=skip).items()}


def save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write ``state`` (copies, so shared tensors are fine) as safetensors."""
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return path


def golden(name: str) -> dict[str, np.ndarray]:
    """Arrays from ``tests/golden/<name>_golden.npz``."""
    with np.load(GOLDEN / f"{name}_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_audio(real_data: Path) -> torch.Tensor:
    """The golden input ``[2, 48000]``: 3 s of a real recording and a synthetic chirp."""
    return torch.from_numpy(weights_gen.golden_batch())


@pytest.fixture(scope="session")
def tiny_beats() -> Backbone:
    """A randomly initialised tiny BEATs (shared, read-only)."""
    torch.manual_seed(0)
    return create_backbone("beats", weights="random", options=TINY_BEATS_PROJ)


@pytest.fixture(scope="session")
def effnet() -> Backbone:
    """A randomly initialised full-size EfficientNet-B0 (5 M parameters, fast on CPU)."""
    torch.manual_seed(0)
    return create_backbone("efficientnet_b0", weights="random")
