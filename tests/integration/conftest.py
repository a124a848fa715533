"""Integration fixtures: one real local Ray for the whole session, tiny-model job configs."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# A BEATs with the real architecture and code path, shrunk so a CPU runs the suite in minutes.
TINY_BEATS: dict[str, Any] = {
    "encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128,
    "encoder_attention_heads": 4, "embed_dim": 64, "conv_pos": 16, "conv_pos_groups": 4,
}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024**2,
             log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_session: None) -> str:
    """GCS address of the session's Ray: CLI runs in subprocesses join it as drivers
    (``compute.address``) instead of paying for a Ray start of their own each."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture
def data_context(ray_session: None) -> Iterator[Any]:
    """Restore Ray Data's global context after each test that changes it."""
    from ray.data import DataContext

    saved = copy.deepcopy(DataContext.get_current())
    yield DataContext.get_current()
    DataContext._set_current(saved)


def job_dict(input_uri: str | None, output_uri: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A job config (as a mapping) for the tiny BEATs on CPU; ``sections`` override keys."""
    raw: dict[str, Any] = {
        "input": {"uri": input_uri} if input_uri else {},
        "windows": {"window_s": 2.0, "hop_s": 1.0, "tail": "pad"},
        "model": {"name": "beats", "weights": "random", "options": dict(TINY_BEATS),
                  "layers": [-1, 0], "batch_size": 16},
        "output": {"uri": output_uri},
        "run": {"shard_size": 64, "progress": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


@pytest.fixture
def tiny_job(tmp_path: Path):
    return lambda input_uri, **sections: job_dict(input_uri, str(tmp_path / "out"), **sections)
