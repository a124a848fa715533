"""User plugins through ``module:Class`` and the ``embed_archive.backbones`` entry points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


class DropoutPlugin(FramePlugin):
    """A plugin holding a network with dropout and BatchNorm, built in training mode."""

    def __init__(self, weights: str | None, device: str, frame: int = 800) -> None:
        super().__init__(weights, device, frame)
        self.net = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.5))

    def forward_features(self, audio: torch.Tensor, padding_mask: torch.Tensor | None
                         ) -> list[torch.Tensor]:
        first = super().forward_features(audio, padding_mask)[0]
        first = self.net(first.transpose(1, 2)).transpose(1, 2)
        return [first, torch.cat([first, first * 2], dim=-1)]


class ModulePlugin(torch.nn.Module, DropoutPlugin):
    """The same, the plugin itself a torch module."""

    def __init__(self, weights: str | None, device: str, frame: int = 800) -> None:
        torch.nn.Module.__init__(self)
        DropoutPlugin.__init__(self, weights, device, frame)


@pytest.mark.parametrize("cls", [DropoutPlugin, ModulePlugin])
def test_a_plugin_runs_in_eval_mode_whatever_mode_it_was_built_in(cls: type) -> None:
    """Dropout off and BatchNorm on its running statistics: the same audio embeds the same
    every time, and no batch moves the statistics."""
    backbone = create_backbone(f"{cls.__module__}:{cls.__name__}")
    net = backbone.plugin.net
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    audio = torch.randn(3, 8_000)
    with torch.inference_mode():
        first = backbone.extract(audio, None, [0])[0].tokens
        second = backbone.extract(audio, None, [0])[0].tokens
    assert torch.equal(first, second)
    assert torch.equal(net[0].running_mean, torch.zeros(2))


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


class TokenPlugin(FramePlugin):
    """Takes a hub token, as a plugin fetching its own weights would, and an option whose
    name looks secret but changes the embeddings."""

    secret_options = ("hub_token",)

    def __init__(self, weights: str | None, device: str, frame: int = 800,
                 hub_token: str | None = None, token_pooling: str = "mean") -> None:
        super().__init__(weights, device, frame)


def _prepared(tmp_path: Path, options: dict) -> Any:
    import numpy as np
    import soundfile as sf

    from pipeline.config import JobConfig
    from pipeline.job import EmbeddingJob

    (tmp_path / "in").mkdir(exist_ok=True)
    sf.write(tmp_path / "in" / "a.wav", np.zeros(8_000, np.float32), 8_000)
    job = EmbeddingJob(JobConfig.from_dict({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
        "model": {"name": f"{__name__}:TokenPlugin", "weights": "random", "options": options},
        "run": {"progress": False}}))
    job.prepare()
    job._lease.release()
    return job


def test_a_plugins_secret_options_are_in_no_output_and_other_options_stay_in_its_variant(
        tmp_path: Path) -> None:
    """The variant (in _variants/, _jobs/ and every Parquet footer) had the token in clear.
    A declared secret option is "***" (a new token is no new variant); undeclared
    secret-looking text is fingerprinted, so two values never share a variant."""
    import json

    jobs = {}
    for token, pooling in (("hf_Secret1", "mean"), ("hf_Secret2", "mean"),
                           ("hf_Secret1", "scaled")):
        job = jobs[token, pooling] = _prepared(tmp_path, {"hub_token": token, "frame": 400,
                                                          "token_pooling": pooling})
        written = json.dumps(job.variant.to_dict()) + repr(job.parquet_metadata)
        assert token not in written
        options = job.variant.model_options
        assert options["hub_token"] == "***" and options["frame"] == 400
        assert options["token_pooling"].startswith("pbkdf2:")
        assert job.variant.preprocessing["options"]["hub_token"] == "'***'"
    ids = {key: job.variant.id for key, job in jobs.items()}
    assert ids["hf_Secret1", "mean"] == ids["hf_Secret2", "mean"]  # the token is no variant
    assert ids["hf_Secret1", "mean"] != ids["hf_Secret1", "scaled"]  # the pooling is
    assert not any("hf_Secret" in p.read_text() for p in (tmp_path / "out").rglob("*.json"))


def _write_plugin(root: Path, module: str, body: str, version: str | None = None) -> str:
    (root / f"{module}.py").write_text(body)
    if version is not None:  # installed as a distribution that provides the module
        dist = root / f"{module}_dist-{version}.dist-info"
        dist.mkdir(exist_ok=True)
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {module}-dist\nVersion: {version}\n")
        (dist / "top_level.txt").write_text(f"{module}\n")
    return f"{module}:P"


PLUGIN_SOURCE = f'''
import torch
from {__name__} import FramePlugin


class P(FramePlugin):
    SCALE = {{scale}}

    def forward_features(self, audio, padding_mask):
        return [t * self.SCALE for t in super().forward_features(audio, padding_mask)]
'''


def _code(name: str) -> dict:
    import importlib
    import sys

    for module in [m for m in sys.modules if m.startswith(name.split(":")[0].split(".")[0])]:
        del sys.modules[module]  # import the files as they are now
    importlib.invalidate_caches()
    return create_backbone(name).info.preprocessing["code"]


def test_a_plugins_code_is_part_of_its_variant_whatever_file_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changed plugin code landed in the old variant (only the class name was recorded).
    Every Python file of its package counts (a helper's constant changes the embeddings as
    much as the class); how the package was installed does not."""
    monkeypatch.syspath_prepend(str(tmp_path))
    package = tmp_path / "pkgh"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "helpers.py").write_text("SCALE = 1\n")
    (package / "sub" / "model.py").write_text(
        PLUGIN_SOURCE.format(scale="__import__('pkgh.sub.helpers').sub.helpers.SCALE"))
    name = "pkgh.sub.model:P"
    first = _code(name)
    assert set(first) == {"source_sha256"}
    assert _code(name) == first  # the same files, the same code
    dist = tmp_path / "pkgh-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pkgh\nVersion: 0.1\n")
    (dist / "top_level.txt").write_text("pkgh\n")
    assert _code(name) == first  # now "installed": still the same code
    (package / "sub" / "helpers.py").write_text("SCALE = 1000\n")
    assert _code(name) != first
    # The whole package from its top, not the model's subpackage alone: a module beside it
    # (one the model may import) is its code too.
    changed = _code(name)
    (package / "common.py").write_text("GAIN = 2\n")
    assert _code(name) != changed
    # A plain module file: its own bytes; a code_version attribute is recorded as well.
    single = _write_plugin(tmp_path, "codeplug_b", "code_version = 'x'\n"
                           + PLUGIN_SOURCE.format(scale=100).replace(
                               "    SCALE = 100", "    SCALE = 100\n    code_version = 'lib-2.1'"))
    code = _code(single)
    assert code["code_version"] == "lib-2.1" and len(code["source_sha256"]) == 64


def test_a_plugin_imported_from_a_zip_is_named_by_its_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its file is no file on disk: the source its loader gives is hashed instead (the code
    was {} before, so any edit shared the variant)."""
    import zipfile

    archive = tmp_path / "plugins.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zipplug.py", PLUGIN_SOURCE.format(scale=3))
    monkeypatch.syspath_prepend(str(archive))
    code = _code("zipplug:P")
    assert len(code["source_sha256"]) == 64


def test_a_plugin_layer_of_another_width_than_it_declares_is_refused() -> None:
    """Rows 5 wide under a layer declared 4 wide broke fixed-width readers (BigQuery
    vectors, np.stack across runs) and went out without a word."""
    backbone = create_backbone(PLUGIN)
    backbone.info = backbone.info.__class__(**{
        **backbone.info.__dict__,
        "layers": (backbone.info.layers[0], backbone.info.layers[1].__class__(1, "projected", 5))})
    with pytest.raises(ValueError, match=r"D=5"):
        backbone.extract(torch.randn(1, 8_000), None, [1])


def test_a_plugin_that_fails_to_import_or_build_is_a_refusal_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A module raising at import, or a constructor raising, gave a traceback and exit 1
    (failed after it started: schedulers retry); and one installed plugin that could not
    load broke list-models for every model."""
    from pipeline.cli import main
    from pipeline.errors import UnknownModelError

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "badimport.py").write_text("raise RuntimeError('no licence server')\n")
    with pytest.raises(UnknownModelError, match="RuntimeError: no licence server"):
        create_backbone("badimport:X")
    _write_plugin(tmp_path, "badbuild", f"""
from {__name__} import FramePlugin


class P(FramePlugin):
    def __init__(self, weights, device, frame=800):
        raise FileNotFoundError('/models/frames.bin')
""")
    with pytest.raises(ConfigError, match=r"badbuild.P\(None, 'cpu', \*\*model.options\) "
                                          r"raised FileNotFoundError: /models/frames.bin"):
        create_backbone("badbuild:P")
    assert main(["describe-model", "badimport:X"]) == 2
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    _write_plugin(tmp_path, "badattr", f"""
from {__name__} import FramePlugin


class P(FramePlugin):
    sample_rate_hz = "16 kHz"
""")
    with pytest.raises(ConfigError, match="attribute of the wrong type"):
        create_backbone("badattr:P")
    (dist / "entry_points.txt").write_text(
        "[embed_archive.backbones]\nbroken = badimport:X\nbadattr = badattr:P\n")
    capsys.readouterr()
    assert main(["list-models"]) == 1
    out, err = capsys.readouterr()
    assert "broken" in out and "cannot be loaded" in out and "no licence server" in out
    assert "badattr" in out and "wrong type" in out
    assert "beats" in out and "efficientnet_b0" in out and "2 installed backbone" in err


def test_an_actor_with_other_plugin_code_than_the_driver_refuses_to_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node with another version of the plugin would write its rows into the variant that
    names the driver's code."""
    from pipeline.stages import Embedder, EmbedSpec

    monkeypatch.syspath_prepend(str(tmp_path))
    name = _write_plugin(tmp_path, "codeplug_c", PLUGIN_SOURCE.format(scale=1), version="1.0")
    planned = _code(name)
    spec = EmbedSpec(model_name=name, weights="default", options={}, storage_options={},
                     layers=(0,), pooling="mean", precision="fp32", sample_rate_hz=8_000,
                     tail="pad", min_input_samples=1, use_gpu=False, torch_threads=1,
                     plugin_code=planned)
    assert Embedder(spec).backbone.info.preprocessing["code"] == planned
    elsewhere = {**planned, "source_sha256": "0" * 64}  # that node's files differ
    with pytest.raises(RuntimeError, match="install the same plugin on every node"):
        Embedder(EmbedSpec(**{**spec.__dict__, "plugin_code": elsewhere}))


def test_an_installed_backbone_named_like_a_built_in_is_said_to_be_shadowed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """It was silently ignored: a user who installed their own 'beats' ran ours."""
    dist = tmp_path / "shadow_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shadow-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[embed_archive.backbones]\nbeats = {PLUGIN}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("WARNING", logger="pipeline.models.registry"):
        assert list_models().count("beats") == 1
    assert "registers a backbone named 'beats'" in caplog.text and "built-in" in caplog.text
    assert create_backbone("beats", weights="random").info.family == "beats"


def test_a_plugins_code_hash_reads_its_package_not_a_project_folder_around_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A dangling '.#model.py' (an editor's lock link) crashed the job with a traceback; a
    .venv under the package's __init__.py was hashed whole (16,682 files, 2.5 s, and a pip
    install changed the variant). Hidden files and folders, environments and caches are no
    code; a tree too big to be a package is named by the module's own file."""
    from pipeline.models import plugins as plugins_mod

    monkeypatch.syspath_prepend(str(tmp_path))
    package = tmp_path / "projplug"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text(PLUGIN_SOURCE.format(scale=1))
    (package / ".#model.py").symlink_to("me@host.12345:1700000000")  # dangling
    site = package / ".venv" / "lib" / "site-packages" / "dep"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("X = 1\n")
    env = package / "env"
    (env / "lib").mkdir(parents=True)
    (env / "pyvenv.cfg").write_text("home = /usr\n")
    (env / "lib" / "big.py").write_text("Y = 2\n")
    name = "projplug.model:P"
    first = _code(name)
    (site / "new.py").write_text("Z = 3\n")  # a pip install into the environments
    (env / "lib" / "new.py").write_text("Z = 3\n")
    assert _code(name) == first
    (package / "helpers.py").write_text("W = 4\n")  # the package's own code
    assert _code(name) != first
    monkeypatch.setattr(plugins_mod, "MAX_SOURCE_FILES", 2)
    (package / "more.py").write_text("V = 5\n")
    with caplog.at_level("WARNING", logger="pipeline.models.plugins"):
        alone = _code(name)
    assert "no package, so only its own file" in caplog.text
    import hashlib

    assert alone["source_sha256"] == hashlib.sha256(
        b"model.py\0" + (package / "model.py").read_bytes()).hexdigest()
