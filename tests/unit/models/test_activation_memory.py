"""The estimate of a CPU forward pass's memory (``ModelInfo.activations``) against peaks
measured on this project's 2-vCPU machine: peak RSS of one ``extract`` and pooling less the
RSS before it, one fresh process a point, one thread, random weights, a padded last window
(the job's path, as ``bench._forward_passes`` runs it)."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import create_backbone, model_info
from pipeline.models.module_backbone import CPU_CHUNK_SECONDS
from tests.unit.models.conftest import TINY_BEATS

# (backbone, precision, window s, batch, layers, measured MiB): where the memory matters
# (BEATs' square from 20 s on, EfficientNet's long windows); * held out of the fit.
MEASURED = [
    ("beats", "fp32", 20, 16, "last", 505),
    ("beats", "fp32", 20, 64, "last", 783),  # *
    ("beats", "fp32", 20, 16, "all", 1488),  # *
    ("beats", "fp32", 30, 4, "last", 772),
    ("beats", "fp32", 45, 4, "last", 1330),  # *
    ("beats", "fp32", 60, 1, "last", 1977),  # *
    ("beats", "fp32", 60, 8, "last", 2092),  # *
    ("beats", "fp32", 90, 1, "last", 4027),
    ("beats", "fp32", 120, 1, "last", 6632),  # *
    ("beats", "int8", 30, 16, "last", 991),
    ("beats", "int8", 120, 1, "last", 6948),  # *
    ("beats", "bf16", 60, 2, "last", 1881),  # *
    ("esp_aves2_sl_beats_all", "fp32", 60, 2, "last", 1992),  # *
    ("efficientnet_b0", "fp32", 60, 8, "last", 337),  # *
    ("efficientnet_b0", "fp32", 60, 8, "all", 965),  # *
    ("efficientnet_b0", "fp32", 120, 4, "last", 472),  # *
    ("efficientnet_b0", "fp32", 300, 2, "last", 1072),
    ("efficientnet_b0", "fp32", 300, 16, "last", 1433),  # *
    ("efficientnet_b0", "fp32", 300, 4, "all", 2047),  # * the worst: +37 %
    ("efficientnet_b0", "fp32", 600, 4, "last", 1875),
]


@pytest.mark.parametrize(("name", "precision", "window_s", "batch", "layers", "measured"),
                         MEASURED)
def test_the_estimate_is_near_the_measured_peak(name: str, precision: str, window_s: int,
                                                batch: int, layers: str, measured: float
                                                ) -> None:
    info = model_info(name)
    assert info.activations is not None
    estimate = info.activations.mib(batch, window_s * info.sample_rate_hz,
                                    info.resolve_layers(layers))
    assert measured * 0.75 <= estimate <= measured * 1.4


def test_a_long_window_costs_its_square_whatever_the_batch() -> None:
    """A CPU pass runs one window at a time past 20 s: a 60-s window is ~8x a 20-s one's
    memory (attention), while 16 windows of it cost little more than one."""
    cost = model_info("esp_aves2_sl_beats_all").activations
    assert cost is not None
    one = cost.mib(1, 60 * 16_000, [12])
    assert one > 4 * cost.mib(1, 20 * 16_000, [12])
    assert one < cost.mib(16, 60 * 16_000, [12]) < 1.5 * one


def test_the_estimate_follows_the_architecture() -> None:
    """Options that shrink a bare BEATs shrink its estimate: attention's square by heads,
    the rest by width; a checkpoint's architecture is what the registry's info reflects."""
    full, tiny = model_info("beats").activations, model_info("beats", TINY_BEATS).activations
    assert full is not None and tiny is not None
    heads, dim = TINY_BEATS["encoder_attention_heads"], TINY_BEATS["encoder_embed_dim"]
    assert tiny.unit_pair_mib == pytest.approx(full.unit_pair_mib * heads / 12)
    assert tiny.unit_mib == pytest.approx(full.unit_mib * dim / 768)
    assert len(tiny.layer_unit_mib) == TINY_BEATS["encoder_layers"] + 1


def test_the_estimate_splits_a_batch_as_a_cpu_pass_does(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The windows a CPU pass runs at once, as the estimate counts them, are the ones the
    backbone runs together."""
    torch.manual_seed(0)
    backbone = create_backbone("beats", weights="random", options=TINY_BEATS)
    cost = backbone.info.activations
    assert cost is not None
    assert cost.pass_samples == round(CPU_CHUNK_SECONDS * backbone.info.sample_rate_hz)
    module = backbone.module
    seen: list[int] = []
    run = module.extract_layers

    def counted(audio: torch.Tensor, *args: object) -> object:
        seen.append(len(audio))
        return run(audio, *args)

    monkeypatch.setattr(module, "extract_layers", counted)
    window = 6 * 16_000
    with torch.inference_mode():
        backbone.extract(torch.zeros(7, window), None, [1])
    assert max(seen) == cost.windows_per_pass(7, window) == 3
