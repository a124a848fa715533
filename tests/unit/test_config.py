"""Job config loading: strict keys, types, ranges, overrides; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import JobConfig, apply_override, redacted
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def load(raw: dict, overrides: tuple[str, ...] = ()) -> JobConfig:
    return JobConfig.from_dict(raw, overrides)


BASE = {"input": {"uri": "/data"}, "output": {"uri": "/out"}}


def test_defaults_fill_every_section() -> None:
    cfg = load(BASE)
    assert cfg.windows.tail == "pad"
    assert cfg.model.name == "esp_aves2_sl_beats_all"
    assert cfg.audio.channels == "mix"
    assert cfg.input.extensions == ("wav", "flac", "ogg", "oga", "opus", "mp3")


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({**BASE, "windows": {"hop": 1.0}}, "windows.hop", "did you mean 'hop_s'"),
        ({**BASE, "modle": {}}, "modle", "did you mean 'model'"),
        ({**BASE, "windows": {"tail": "wrap"}}, "windows.tail", "pad, keep, drop"),
        ({**BASE, "windows": {"window_s": -1}}, "windows.window_s", "> 0"),
        ({**BASE, "windows": {"window_s": "five"}}, "windows.window_s", "expected a number"),
        ({**BASE, "windows": {"window_s": float("nan")}}, "windows.window_s", "finite number"),
        ({**BASE, "output": {"file_mb": float("inf")}}, "output.file_mb", "finite number"),
        ({**BASE, "compute": {"gpus_per_actor": float("nan")}}, "compute.gpus_per_actor",
         "finite number"),
        ({**BASE, "compute": {"address": "bogus"}}, "compute.address", "not a Ray address"),
        ({**BASE, "compute": {"address": "ray://head:10001"}}, "compute.address", "Ray Client"),
        ({**BASE, "model": {"batch_size": 2.5}}, "model.batch_size", "expected an integer"),
        ({**BASE, "model": {"layers": "first"}}, "model.layers", "'last', 'all'"),
        ({**BASE, "model": {"precision": "int4"}}, "model.precision", "bf16, fp16, int8"),
        ({**BASE, "audio": {"channels": "left"}}, "audio.channels", "mix, each"),
        ({**BASE, "run": {"max_failed_fraction": 2}}, "run.max_failed_fraction", "between 0 and 1"),
        ({**BASE, "run": {"job_id": "../../etc"}}, "run.job_id", "letters, digits"),
        ({**BASE, "input": {"uri": "/d", "extensions": [".wav"]}}, "input.extensions",
         "bare extensions"),
        ({"output": {"uri": "/out"}}, "input", "set input.uri"),
        ({**BASE, "compute": {"embed_resources": {"gpu_node": "many"}}},
         "compute.embed_resources.gpu_node", "expected a number"),
        ({**BASE, "input": {"uri": "simplecache::s3://b/x"}}, "input.uri", "chained"),
        ({**BASE, "input": {"manifest": "zip://m.csv::gs://b/m.zip"}}, "input.manifest",
         "chained"),
        ({**BASE, "output": {"uri": "filecache::s3://b/out"}}, "output.uri", "chained"),
        ({**BASE, "model": {"weights": "blockcache::hf://o/r/w.safetensors"}}, "model.weights",
         "chained"),
    ],
)
def test_bad_values_name_the_field(raw: dict, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(raw)
    assert err.value.field == field
    assert words in str(err.value)
    assert str(err.value).startswith(field)


def test_overrides_apply_before_validation() -> None:
    cfg = load(BASE, ("model.batch_size=8", "windows.tail=drop", "model.layers=[-1, 3]",
                      "compute.embed_resources.gpu_node=0.5", "model.options.encoder_layers=2"))
    assert cfg.model.batch_size == 8
    assert cfg.windows.tail == "drop"
    assert cfg.model.layers == [-1, 3]
    assert cfg.compute.embed_resources == {"gpu_node": 0.5}
    assert cfg.model.options == {"encoder_layers": 2}
    with pytest.raises(ConfigError, match="model.batch_size: expected an integer"):
        load(BASE, ("model.batch_size=lots",))
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load(BASE, ("batch_size=8",))
    with pytest.raises(ConfigError, match="model.bach_size: unknown key"):
        load(BASE, ("model.bach_size=8",))


def test_apply_override_nested() -> None:
    data: dict = {}
    apply_override(data, "input.storage_options.client_kwargs.endpoint_url=http://127.0.0.1:1")
    assert data == {"input": {"storage_options": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}}}


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        JobConfig.load(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        JobConfig.load(tmp_path / "missing.yaml")
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        JobConfig.load(bad)


def test_hash_ignores_secrets_and_key_order() -> None:
    a = load({**BASE, "input": {"uri": "s3://b/x", "storage_options": {"secret": "AAA", "key": "K1"}}})
    b = load({"output": {"uri": "/out"},
              "input": {"storage_options": {"key": "K2", "secret": "BBB"}, "uri": "s3://b/x"}})
    assert a.sha256() == b.sha256()
    assert load({**BASE, "model": {"batch_size": 3}}).sha256() != load(BASE).sha256()
    shown = redacted(a.to_dict())
    assert "AAA" not in str(shown) and "K1" not in str(shown)


def test_numbers_under_secret_looking_keys_still_count_in_the_hash() -> None:
    """`max_tokens: 8` vs `16` hashed the same (and showed as ***): only text is a secret."""
    eight = load({**BASE, "model": {"name": "beats", "options": {"max_tokens": 8}}})
    sixteen = load({**BASE, "model": {"name": "beats", "options": {"max_tokens": 16}}})
    assert eight.sha256() != sixteen.sha256()
    shown = redacted({"model": {"options": {"api_token": "t0k", "max_tokens": 8}}})
    assert shown == {"model": {"options": {"api_token": "***", "max_tokens": 8}}}


@pytest.mark.parametrize("value", [[], 0, False, ""])
def test_a_section_that_is_present_but_not_a_mapping_is_refused(value: object) -> None:
    """`audio: []` or `windows: ""` was taken as all defaults."""
    with pytest.raises(ConfigError, match="must be a mapping") as err:
        load({**BASE, "audio": value})
    assert err.value.field == "audio"
    assert load({**BASE, "audio": None}).audio == load(BASE).audio  # `audio:` and nothing


def test_exponents_yaml_reads_as_text_are_numbers() -> None:
    """PyYAML (YAML 1.1) reads `1e-1` as a string: `audio.block_s: expected a number, got
    '1e-1'` was true of the parse and baffling to whoever wrote the number."""
    cfg = JobConfig.from_dict(yaml.safe_load(
        "input: {uri: /data}\naudio: {block_s: 1e-1}\nwindows: {window_s: 2.5E+0}\n"))
    assert (cfg.audio.block_s, cfg.windows.window_s) == (0.1, 2.5)
    with pytest.raises(ConfigError, match="expected a number"):
        load({**BASE, "audio": {"block_s": "1e-1s"}})


def test_redacts_credentials_in_uris() -> None:
    shown = redacted({"uri": "https://user:pw@host/x?X-Amz-Signature=abc&part=1"})
    assert shown["uri"] == "https://***@host/x?X-Amz-Signature=***&part=1"


@pytest.mark.parametrize("path", sorted((REPO / "job_configs").glob("*.yaml")))
def test_shipped_job_configs_validate(path: Path) -> None:
    JobConfig.load(path)
