"""BEATs on tiny configurations: tokens, layers, masks, padding, checkpoint formats."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.models import create_backbone, frontends, load_model, module_backbone, pool
from pipeline.models.beats import BeatsConfig, BeatsEncoder, relative_position_buckets
from tests.unit.models.conftest import TINY_BEATS, TINY_BEATS_PROJ, golden

SR = 16_000


def _audio(batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, int(seconds * SR), generator=g)


def test_info_reflects_tiny_options(tiny_beats):
    info = tiny_beats.info
    assert info.embedding_dim == 64 and len(info.layers) == 4
    assert [layer.name for layer in info.layers] == [
        "backbone.post_extract_proj", "backbone.encoder.layers.0",
        "backbone.encoder.layers.1", "backbone.encoder.layers.2"]
    assert {layer.dim for layer in info.layers} == {64}
    assert info.min_input_samples == 2800
    no_proj = create_backbone("beats", weights="random", options=TINY_BEATS).info
    assert no_proj.layers[0].name == "backbone.layer_norm"


@pytest.mark.parametrize(("seconds", "tokens"), [(1, 48), (5, 248), (10, 496)])
def test_token_counts_match_avex(tiny_beats, seconds, tokens):
    """Tokens = (fbank frames // 16) * 8, time-major; avex's shapes are in the golden file."""
    assert golden("beats")[f"shape_{seconds}s"].tolist() == [1, tokens, 768]
    out = tiny_beats.extract(_audio(1, seconds), None, [3])[3]
    assert out.tokens.shape == (1, tokens, 64) and out.mask is None
    assert BeatsConfig().num_tokens(seconds * SR) == tokens


def test_layers_from_one_pass_equal_separate_passes(tiny_beats):
    audio = _audio(2, 1.0)
    together = tiny_beats.extract(audio, None, [0, 1, 2, 3])
    for layer in range(4):
        alone = tiny_beats.extract(audio, None, [layer])[layer].tokens
        assert torch.equal(together[layer].tokens, alone)


def test_cpu_front_end_chunks_give_the_batch_result(tiny_beats, monkeypatch):
    """On a CPU scaling, fbank and normalisation run a few windows at a time."""
    audio = _audio(9, 5.0, seed=2)
    backbone = tiny_beats.module.backbone
    assert frontends.CPU_CHUNK_BYTES // backbone.fbank.row_bytes(audio.shape[1]) < 9
    chunked = backbone.preprocess(audio)
    monkeypatch.setattr(frontends, "CPU_CHUNK_BYTES", 2**40)
    torch.testing.assert_close(chunked, backbone.preprocess(audio), rtol=1e-6, atol=1e-6)


def test_forward_stops_after_deepest_requested_layer(tiny_beats):
    calls = []
    blocks = tiny_beats.module.backbone.encoder.layers
    handles = [b.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, b in
               enumerate(blocks)]
    try:
        tiny_beats.extract(_audio(1, 1.0), None, [0, 2])
        assert calls == [0, 1]
        calls.clear()
        tiny_beats.extract(_audio(1, 1.0), None, [0])
        assert calls == []
    finally:
        for h in handles:
            h.remove()


def test_last_layer_equals_plain_forward(tiny_beats):
    audio = _audio(2, 2.0)
    features = tiny_beats.module(audio)  # avex-style call, no padding mask
    assert torch.equal(tiny_beats.extract(audio, None, [3])[3].tokens, features)
    full = torch.full((2,), audio.shape[1])
    unpadded = tiny_beats.extract(audio, full, [3])[3]
    assert unpadded.mask is None and torch.equal(unpadded.tokens, features)


def test_token_mask_by_step_start(tiny_beats):
    audio = _audio(3, 2.0)
    valid = torch.tensor([32000, 10000, 2561])
    mask = tiny_beats.extract(audio, valid, [3])[3].mask
    steps = mask.view(3, -1, 8)
    assert (steps == steps[..., :1]).all()  # all 8 frequency patches share the step's mask
    assert steps[..., 0].sum(dim=1).tolist() == [12, 4, 2]  # steps start every 2560 samples


@settings(max_examples=60, deadline=None)
@given(num_samples=st.integers(2800, 6 * SR), data=st.data())
def test_token_mask_property(tiny_beats, num_samples, data):
    valid = data.draw(st.integers(1, num_samples))
    mask = tiny_beats.module.backbone.token_mask(torch.tensor([valid]), num_samples)
    steps = BeatsConfig().num_tokens(num_samples) // 8
    expected = [16 * t * 160 < valid or valid >= num_samples for t in range(steps)]
    got = [True] * steps if mask is None else mask[0, ::8].tolist()
    assert got == expected


def test_padding_content_never_matters(tiny_beats):
    audio = _audio(2, 3.0)
    valid = torch.tensor([3 * SR, 30_000])
    noisy = audio.clone()
    noisy[1, 30_000:] = 5.0 * torch.randn(noisy.shape[1] - 30_000)
    clean = audio.clone()
    clean[1, 30_000:] = 0.0
    a = tiny_beats.extract(noisy, valid, [0, 3])
    b = tiny_beats.extract(clean, valid, [0, 3])
    for layer in (0, 3):
        assert torch.equal(a[layer].tokens, b[layer].tokens)
        assert torch.equal(pool(a[layer].tokens, a[layer].mask, "mean"),
                           pool(b[layer].tokens, b[layer].mask, "mean"))


def test_padding_does_not_leak_into_real_tokens(tiny_beats):
    """The same 2.1 s of audio padded to 3 s or to 5 s: real tokens agree (attention masks
    padding keys; padding tokens are zeroed before the positional convolution)."""
    real = _audio(1, 2.1, seed=3)
    valid = torch.tensor([real.shape[1]])
    short = torch.nn.functional.pad(real, (0, 3 * SR - real.shape[1]))
    long = torch.nn.functional.pad(real, (0, 5 * SR - real.shape[1]))
    a = tiny_beats.extract(short, valid, [3])[3]
    b = tiny_beats.extract(long, valid, [3])[3]
    n_real = int(a.mask.sum())
    assert n_real == int(b.mask.sum()) == 14 * 8
    assert torch.allclose(a.tokens[:, :n_real], b.tokens[:, :n_real], atol=1e-5)
    assert torch.allclose(pool(a.tokens, a.mask, "mean"), pool(b.tokens, b.mask, "mean"),
                          atol=1e-5)
    # without the attention mask, padding would change real tokens
    unmasked = tiny_beats.extract(long, None, [3])[3]
    assert not torch.allclose(unmasked.tokens[:, :n_real], b.tokens[:, :n_real], atol=1e-3)


def test_load_model_matches_backbone_and_maps_padding_mask(tiny_beats, tmp_path):
    from tests.unit.models.conftest import save_safetensors

    path = save_safetensors(tiny_beats.module.state_dict(), tmp_path / "tiny.safetensors")
    model = load_model("beats", weights=str(path), options=TINY_BEATS_PROJ)
    audio = _audio(2, 2.0)
    padding = torch.zeros_like(audio, dtype=torch.bool)
    padding[1, 20_000:] = True
    with torch.no_grad():
        assert torch.equal(model(audio), tiny_beats.extract(audio, None, [3])[3].tokens)
        expected = tiny_beats.extract(audio, torch.tensor([32_000, 20_000]), [3])[3].tokens
        assert torch.equal(model(audio, padding_mask=padding), expected)


@pytest.mark.parametrize("where", ["left padding", "a gap", "attention-mask style"])
def test_load_model_refuses_padding_mask_not_at_the_end(tiny_beats, tmp_path, where):
    """The mask becomes a count of real samples taken from the start of each row: padding
    before real audio would have that audio zeroed and the padding embedded, silently."""
    from tests.unit.models.conftest import save_safetensors

    path = save_safetensors(tiny_beats.module.state_dict(), tmp_path / "tiny.safetensors")
    model = load_model("beats", weights=str(path), options=TINY_BEATS_PROJ)
    audio = _audio(2, 2.0)
    padding = torch.zeros_like(audio, dtype=torch.bool)
    if where == "left padding":
        padding[1, :12_000] = True
    elif where == "a gap":
        padding[1, 10_000:12_000] = True
    else:  # True on the real audio, as Hugging Face's attention_mask
        padding[:, :20_000] = True
    with torch.no_grad(), pytest.raises(ValueError, match="only at the end of each row"):
        model(audio, padding_mask=padding)
    with torch.no_grad(), pytest.raises(ValueError, match="the audio's shape"):
        model(audio, padding_mask=padding[:, :16_000])


def test_microsoft_checkpoint_format_loads(tiny_beats, tmp_path):
    """``{"cfg", "model"}`` with ``weight_g``/``weight_v``, no fbank buffers, no prefix."""
    state = {}
    for key, value in tiny_beats.module.state_dict().items():
        key = key.removeprefix("backbone.")
        if key.startswith("fbank."):
            continue
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        state[key] = value.clone()
    cfg = {**dataclasses.asdict(BeatsConfig()), **TINY_BEATS_PROJ, "mask_prob": 0.75}
    path = tmp_path / "BEATs_tiny.pt"
    torch.save({"cfg": cfg, "model": state}, path)
    loaded = create_backbone("beats", weights=str(path))  # architecture from the cfg
    assert loaded.info.embedding_dim == 64 and len(loaded.info.layers) == 4
    assert loaded.weights.format == "torch"
    audio = _audio(2, 1.5)
    assert torch.equal(loaded.extract(audio, None, [3])[3].tokens,
                       tiny_beats.extract(audio, None, [3])[3].tokens)


def test_config_validation():
    with pytest.raises(ConfigError, match="encoder_layerz"):
        create_backbone("beats", weights="random", options={"encoder_layerz": 2})
    with pytest.raises(ConfigError, match="not divisible"):
        BeatsConfig().updated({"encoder_embed_dim": 65})
    with pytest.raises(ConfigError, match="layer_norm_first"):
        BeatsConfig().updated({"layer_norm_first": True, "deep_norm": False})
    # A value of the wrong type is named, not left to fail inside the architecture.
    for name, value in (("encoder_layers", "abc"), ("encoder_layers", 2.5), ("deep_norm", 1),
                        ("fbank_mean", float("nan")), ("activation_fn", 3)):
        with pytest.raises(ConfigError, match=f"BEATs option {name} must be of type") as err:
            create_backbone("beats", weights="random", options={name: value})
        assert err.value.field == "model.options"
    assert BeatsConfig().updated({"sample_frequency": 16000}).sample_frequency == 16000.0


def test_relative_position_buckets_are_t5_style():
    buckets = relative_position_buckets(1000, 320, 800)
    assert buckets[0, 0] == 0 and buckets[0, 79] == 160 + 79 and buckets[79, 0] == 79
    assert buckets[0, 999] == 319 and buckets[999, 0] == 159  # saturated far offsets
    assert buckets.min() == 0 and buckets.max() == 319


def test_too_short_input_is_rejected(tiny_beats):
    with pytest.raises(ValueError, match="at least 2800 samples"):
        tiny_beats.extract(torch.zeros(1, 2799), None, [0])


def test_a_model_built_under_inference_mode_runs() -> None:
    """Built inside torch.inference_mode (its parameters inference tensors, which keep no
    version counter), it gives what the same model built outside gives."""
    audio = torch.randn(2, 16_000)
    outside = load_model("beats", weights="random", options=TINY_BEATS)
    with torch.inference_mode():
        inside = load_model("beats", weights="random", options=TINY_BEATS)
        torch.testing.assert_close(inside(audio), outside(audio))


def test_a_model_used_under_inference_mode_can_still_be_trained() -> None:
    """load_model hands out a trainable module: a first call under inference_mode (as the
    job makes) must not leave inference tensors that a later backward pass cannot save."""
    model = load_model("beats", weights="random", options=TINY_BEATS)
    audio = torch.randn(2, 16_000)
    with torch.inference_mode():
        model(audio)
    model.requires_grad_(True)
    model(audio).sum().backward()
    assert any(p.grad is not None for p in model.parameters())
    # trained, the positional convolution runs as itself, not from a cached spectrum
    assert model.backbone.encoder.pos_conv[0].parametrizations.weight.original1.grad is not None



def test_weights_loaded_in_place_under_inference_mode_reach_the_positional_convolution():
    """Inference tensors keep no version counter, so the kept kernel spectra could not see
    new weights loaded into the same tensors: the convolution ran on the old kernels while
    every other layer had the new ones (1.13 apart on a tiny model)."""
    audio = torch.randn(2, 16_000) * 0.1
    with torch.inference_mode():
        model = load_model("beats", weights="random", options=TINY_BEATS)
        before = model(audio)
        new = {k: v * 1.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(new)
        reference = load_model("beats", weights="random", options=TINY_BEATS)
        reference.load_state_dict(new)  # before its first call: nothing kept yet
        assert not torch.allclose(before, reference(audio))
        torch.testing.assert_close(model(audio), reference(audio))

@pytest.mark.parametrize(("taps", "groups", "length"), [(128, 16, 248), (128, 16, 21),
                                                        (33, 4, 50), (8, 2, 3)])
def test_spectral_positional_convolution_is_the_convolution(taps, groups, length):
    """On a CPU the positional convolution runs by FFT; even and odd kernels, sequences
    shorter than the kernel, and a spectrum recomputed when the weights change."""
    cfg = BeatsConfig(encoder_layers=1, encoder_embed_dim=64, encoder_ffn_embed_dim=64,
                      encoder_attention_heads=4, conv_pos=taps, conv_pos_groups=groups)
    encoder = BeatsEncoder(cfg).eval()
    x = torch.randn(3, length, 64, generator=torch.Generator().manual_seed(taps))
    conv = encoder.pos_conv[0]
    for round_ in range(2):
        with torch.inference_mode():
            expected = encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2)
            got = encoder.position_embedding(x)
        assert len(encoder._kernel_spectra) == 1
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert got.abs().max() > 0.1
        with torch.no_grad():  # new weights: the cached spectrum must not be used
            conv.parametrizations.weight.original1.mul_(-2.0 - round_)
            conv.bias.add_(1.0)


def test_cpu_batches_run_in_chunks_with_the_whole_batch_result(tiny_beats, monkeypatch):
    """A CPU batch goes through the network a few windows at a time (see
    CPU_CHUNK_SECONDS); features and masks equal the batch run whole, including chunks
    where no window is padded next to chunks where some are."""
    audio = _audio(7, 1.0, seed=5)
    valid = torch.tensor([SR, SR, SR, 9_000, SR, 4_000, SR])
    calls = []
    backbone = tiny_beats.module.backbone
    original = backbone.extract_layers
    monkeypatch.setattr(backbone, "extract_layers",
                        lambda a, v, layers: calls.append(len(a)) or original(a, v, layers))
    monkeypatch.setattr(module_backbone, "CPU_CHUNK_SECONDS", 3.0)
    chunked = tiny_beats.extract(audio, valid, [0, 3])
    assert calls == [3, 3, 1]
    monkeypatch.setattr(module_backbone, "CPU_CHUNK_SECONDS", 1000.0)
    whole = tiny_beats.extract(audio, valid, [0, 3])
    assert calls[3:] == [7]
    for layer in (0, 3):
        torch.testing.assert_close(chunked[layer].tokens, whole[layer].tokens,
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(chunked[layer].mask, whole[layer].mask)
    assert not chunked[3].mask[:3].logical_not().any()  # the first chunk had no padding
    no_padding = tiny_beats.extract(audio, None, [3])[3]
    assert no_padding.mask is None


@pytest.mark.parametrize(("options", "n_fft"), [({}, 512),
                                                ({"sample_frequency": 32000.0}, 1024)])
def test_recorded_preprocessing_is_what_the_front_end_does(options: dict, n_fft: int) -> None:
    backbone = create_backbone("beats", weights="random", options={**TINY_BEATS, **options})
    fbank = backbone.module.backbone.fbank
    assert backbone.info.preprocessing["n_fft"] == fbank.n_fft == n_fft


def test_kernel_spectra_of_a_few_lengths_are_kept(monkeypatch):
    """`tail: keep` puts a short last window between full ones: the full windows' spectrum
    must survive it (one slot rebuilt it after every short window, 100-185 ms a time)."""
    from pipeline.models import beats

    cfg = BeatsConfig(encoder_layers=1, encoder_embed_dim=64, encoder_ffn_embed_dim=64,
                      encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4)
    encoder = BeatsEncoder(cfg).eval()
    built = []
    real_rfft = torch.fft.rfft

    def counted(x, n=None, dim=-1):
        if x.dim() == 4:  # the kernels, not a signal
            built.append(n)
        return real_rfft(x, n=n, dim=dim)

    monkeypatch.setattr(torch.fft, "rfft", counted)
    with torch.inference_mode():
        for length in (248, 40, 248, 31, 248, 40, 248, 31):
            encoder.position_embedding(torch.randn(2, length, 64))
        assert len(built) == 3  # one spectrum per length, each made once
        for length in (7, 20, 3, 248):  # three more lengths push the oldest out
            encoder.position_embedding(torch.randn(2, length, 64))
    assert len(built) == 7 and len(encoder._kernel_spectra) == beats.SPECTRA_KEPT
