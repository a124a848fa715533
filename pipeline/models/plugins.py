"""User backbones: any class with a small interface becomes a :class:`Backbone`.

Name one in the config as ``module.path:ClassName``, or install a package that registers
it under the entry-point group ``embed_archive.backbones``::

    [project.entry-points."embed_archive.backbones"]
    my_model = "my_package.models:MyBackbone"

The interface (class attributes: `describe-model` and `submit` read them from the class,
without building the model; a job's driver builds it once, on its CPU, to check the options
and weights before any work starts, and then each actor builds its own)::

    class MyBackbone:
        sample_rate_hz: int                  # rate the model expects
        embedding_dim: int                   # dim of the last layer
        layer_names: tuple[str, ...]         # capturable layers, shallow to deep
        layer_dims: tuple[int, ...]          # optional; default embedding_dim for all
        has_cls: bool                        # optional; token 0 is a CLS token
        min_input_samples: int               # optional; default 1
        weights_id: str                      # optional; names the default weights (their
                                             # hash or version): recorded in the variant
        secret_options: tuple[str, ...]      # optional; options that never change the
                                             # embeddings (a hub token): "***" in the variant

        def __init__(self, weights: str | None, device: str, **options): ...
            # weights: None for "default" (the plugin's own), "random" (built with torch's
            # generator seeded from the name and options, so every actor builds the same
            # model), or the local path of a fetched checkpoint URI (hashed into the
            # variant). options: the config's model.options.

        def forward_features(self, audio, padding_mask):
            # audio: float32 [B, T] on device; padding_mask: bool [B, T], True = padding
            # (at the end), or None. Returns one [B, N, D] tensor per layer_names entry.

A plugin's Python code is part of its variant: the sha256 over the source files of the
package that defines the class (every ``.py`` file under its top-level regular package, or
the one module file), so rows of edited Python code do not land beside the old ones; how it
was installed does not matter. Compiled extensions and other packages it imports are not
hashed: a plugin that depends on them can name them in a ``code_version`` attribute, which
is recorded too.

The job runs a plugin in evaluation mode: a plugin that is a ``torch.nn.Module``, or the
modules it holds as attributes, are put in ``eval()`` with gradients off when it is built
(dropout off, BatchNorm on its running statistics); modules tucked away deeper (in a list,
a dict) are the plugin's own to put there.

Token masks are derived by proportional time mapping: token ``n`` of ``N`` (after the
CLS token, which is always real) starts at sample ``n * T / N`` and is real iff that is
before the row's valid length. ``mean`` and ``max`` pooling are always available, ``cls``
when ``has_cls`` is true.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import inspect
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch

from pipeline import redact
from pipeline.errors import ConfigError, UnknownModelError
from pipeline.models.base import Backbone, LayerInfo, ModelInfo, TokenFeatures, WeightsInfo
from pipeline.models.masks import padding_mask_from_valid, proportional_token_mask
from pipeline.models.precision import autocast_context, quantize_linear_int8
from pipeline.models.weights import RANDOM_WEIGHTS, fetch_weights

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "embed_archive.backbones"
PLUGIN_DEFAULT_WEIGHTS = WeightsInfo(uri="default", sha256="unknown", format="plugin")
_REQUIRED = ("sample_rate_hz", "embedding_dim", "layer_names")


def entry_point_names() -> list[str]:
    """Names registered under ``embed_archive.backbones`` by installed packages."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def unknown_model_message(name: str, known: Sequence[str]) -> str:
    """Error text for an unknown name, with close matches and the plugin syntax."""
    close = get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (f"no backbone named {name!r}.{hint} Known: {', '.join(known)}; or give a plugin "
            "class as 'module.path:ClassName'.")


def find_plugin_class(name: str, known: Sequence[str]) -> type:
    """Resolve an entry-point name or ``module.path:ClassName`` to the class.

    Args:
        name: the configured model name.
        known: all known names, for the error message.

    Returns:
        The plugin class.

    Raises:
        UnknownModelError: nothing matches, or the module/class cannot be imported.
    """
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _load(ep.value, lambda ep=ep: ep.load())
    if ":" in name:
        module_path, _, class_name = name.partition(":")
        return _load(name, lambda: getattr(importlib.import_module(module_path), class_name))
    raise UnknownModelError(unknown_model_message(name, known))


def _load(reference: str, loader: Any) -> type:
    try:
        cls = loader()
    except Exception as err:  # noqa: BLE001 - whatever the module raises on import, named
        # (ImportError, AttributeError, and a module's own RuntimeError alike: refused, exit 2)
        raise UnknownModelError(f"cannot load backbone class {reference!r}: "
                                f"{type(err).__name__}: {err}") from None
    if not inspect.isclass(cls):
        raise UnknownModelError(f"{reference!r} is a {type(cls).__name__}, not a class")
    return cls


def plugin_info(name: str, source: Any, options: Mapping[str, Any]) -> ModelInfo:
    """:class:`ModelInfo` from a plugin class or instance's attributes.

    Args:
        name: the configured name (``module:Class`` or entry-point name).
        source: the class (for ``describe``) or the constructed instance.
        options: constructor options (recorded in ``preprocessing``).

    Raises:
        ConfigError: required attributes are missing or inconsistent.
    """
    missing = [a for a in _REQUIRED if getattr(source, a, None) is None]
    if missing:
        raise ConfigError(f"plugin {name} lacks required attribute(s) {missing} (see "
                          "pipeline/models/README.md, 'Plugins')", "model.name")
    cls = source if inspect.isclass(source) else type(source)
    try:
        names = tuple(str(n) for n in source.layer_names)
        dims = tuple(int(d) for d in getattr(source, "layer_dims", None)
                     or (int(source.embedding_dim),) * len(names))
        rate, dim = int(source.sample_rate_hz), int(source.embedding_dim)
        min_input = int(getattr(source, "min_input_samples", 1))
        secret = tuple(str(k) for k in getattr(source, "secret_options", ()) or ())
    except (TypeError, ValueError) as err:  # sample_rate_hz = "16 kHz"
        raise ConfigError(f"plugin {name} has an attribute of the wrong type ({err}): see "
                          "pipeline/models/README.md, 'Plugins'", "model.name") from None
    if not names or len(dims) != len(names):
        raise ConfigError(f"plugin {name} has {len(names)} layer_names and {len(dims)} "
                          "layer_dims", "model.name")
    has_cls = bool(getattr(source, "has_cls", False))
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    return ModelInfo(
        name=name, family="plugin", sample_rate_hz=rate, embedding_dim=dim,
        layers=tuple(LayerInfo(i, n, d) for i, (n, d) in enumerate(zip(names, dims, strict=True))),
        poolings=("mean", "max", "cls") if has_cls else ("mean", "max"),
        min_input_samples=min_input,
        description=doc[0] if doc else f"plugin {cls.__module__}:{cls.__qualname__}",
        preprocessing={"plugin": f"{cls.__module__}:{cls.__qualname__}",
                       "code": plugin_code(cls),
                       "options": {k: repr(v) for k, v
                                   in sorted(redact.variant_options(options, secret).items())}},
        secret_options=secret,
    )


def plugin_code(cls: type) -> dict[str, str]:
    """What names a plugin class's code, for its variant: ``source_sha256`` over the Python
    files of the package defining it (every ``.py`` under its top-level regular package,
    by relative path; or the one module file; or the module's source as its loader gives
    it, from a zip), and the class's ``code_version`` if it has one. Empty, with a warning,
    when neither can be had."""
    out: dict[str, str] = {}
    if (version := getattr(cls, "code_version", None)) is not None:
        out["code_version"] = str(version)
    module = sys.modules.get(cls.__module__)
    digest = hashlib.sha256()
    files = _package_sources(module)
    for root, path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    if not files:
        with contextlib.suppress(TypeError, OSError):  # built in C, or no source at all
            digest.update(inspect.getsource(module).encode())  # type: ignore[arg-type]
            files = [(Path(), Path())]
    if files:
        out["source_sha256"] = digest.hexdigest()
    elif not out:
        log.warning("cannot read the source of plugin %s.%s: its variant cannot tell two "
                    "versions of its code apart (give the class a code_version)",
                    cls.__module__, cls.__qualname__)
    return out


# A plugin package is a few files; past these, what was found is no package but a project
# folder (a virtualenv, data, notebooks under one __init__.py): the module's file alone.
MAX_SOURCE_FILES = 2_000
MAX_SOURCE_BYTES = 32 * 2**20
# Folders never part of a package's code: hidden ones, caches, environments.
_NOT_CODE = ("__pycache__", "site-packages", "dist-packages", "node_modules")


def _package_sources(module: Any) -> list[tuple[Path, Path]]:
    """``(root, file)`` for every ``.py`` file of the regular package that ``module`` belongs
    to (its topmost folder with an ``__init__.py``), or just the module's file when it is in
    no package; empty when it is not a file on disk (a zip import, ``__main__`` of a REPL).

    Hidden files and folders (an editor's lock files, ``.venv``), caches, environments
    (``site-packages``, a folder with ``pyvenv.cfg``) and anything not a regular file (a
    dangling link) are no code; a tree past ``MAX_SOURCE_FILES`` / ``MAX_SOURCE_BYTES`` is
    a project folder, not a package: the module's file alone then, with a warning."""
    path = Path(getattr(module, "__file__", None) or "")
    if not path.name or not path.is_file():
        return []
    root = path.parent if (path.parent / "__init__.py").is_file() else None
    while root is not None and (root.parent / "__init__.py").is_file():
        root = root.parent
    if root is None:
        return [(path.parent, path)]
    files, total = [], 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _NOT_CODE
                         and not (Path(folder, d) / "pyvenv.cfg").exists())
        for name in sorted(names):
            file = Path(folder, name)
            if name.endswith(".py") and not name.startswith(".") and file.is_file():
                files.append((root, file))
                total += file.stat().st_size
        if len(files) > MAX_SOURCE_FILES or total > MAX_SOURCE_BYTES:
            log.warning("plugin module %s is in a folder tree of over %d Python files or %d "
                        "MiB under %s: no package, so only its own file names its code in "
                        "the variant", getattr(module, "__name__", path), MAX_SOURCE_FILES,
                        MAX_SOURCE_BYTES // 2**20, root)
            return [(path.parent, path)]
    return sorted(files, key=lambda rf: rf[1].relative_to(rf[0]).parts)  # by path, as hashed


def _torch_modules(plugin: Any) -> list[torch.nn.Module]:
    """The torch modules a plugin runs: itself if it is one, else those it holds as
    attributes (its network, a front end)."""
    if isinstance(plugin, torch.nn.Module):
        return [plugin]
    return [value for value in getattr(plugin, "__dict__", {}).values()  # none: __slots__
            if isinstance(value, torch.nn.Module)]


class PluginBackbone(Backbone):
    """Adapts a plugin object to the :class:`Backbone` contract."""

    def __init__(self, plugin: Any, info: ModelInfo, weights: WeightsInfo, device: str) -> None:
        """Wrap a constructed plugin.

        Args:
            plugin: the plugin instance.
            info: from :func:`plugin_info`.
            weights: provenance of the weights.
            device: where the plugin runs.
        """
        self.plugin = plugin
        self.info = info
        self.weights = weights
        self.device = device
        for module in _torch_modules(plugin):
            # Embedding is inference: dropout off, BatchNorm on its running statistics (which
            # a module left in training mode would also update, batch after batch, under
            # inference_mode), as every built-in backbone runs.
            module.eval().requires_grad_(False)

    def extract(self, audio: torch.Tensor, valid_samples: torch.Tensor | None,
                layers: Sequence[int]) -> dict[int, TokenFeatures]:
        """Run ``forward_features`` once and map each requested layer's tokens to time.

        Raises:
            ValueError: the plugin returned the wrong number or shape of layers.
        """
        num_samples = audio.shape[-1]
        outputs = list(self.plugin.forward_features(
            audio, padding_mask_from_valid(valid_samples, num_samples)))
        if len(outputs) != len(self.info.layers):
            raise ValueError(f"plugin {self.info.name} returned {len(outputs)} layers, "
                             f"expected {len(self.info.layers)} (one per layer_names entry)")
        result = {}
        for i in layers:
            tokens = outputs[i]
            dim = self.info.layers[i].dim
            if tokens.dim() != 3 or tokens.shape[0] != audio.shape[0] or tokens.shape[2] != dim:
                raise ValueError(f"plugin {self.info.name} layer {i} has shape "
                                 f"{tuple(tokens.shape)}, expected [B={audio.shape[0]}, N, "
                                 f"D={dim}] (D from its layer_dims / embedding_dim)")
            mask = proportional_token_mask(valid_samples, num_samples, tokens.shape[1],
                                           has_cls="cls" in self.info.poolings)
            result[i] = TokenFeatures(tokens, mask)
        return result

    def prepare(self, precision: str) -> None:
        """See :meth:`Backbone.prepare`: ``int8`` quantizes the Linear layers of a plugin
        that is an ``nn.Module``."""
        if precision == "int8" and isinstance(self.plugin, torch.nn.Module):
            quantize_linear_int8(self.plugin, self.info.name)
        else:
            super().prepare(precision)

    def autocast(self, precision: str) -> contextlib.AbstractContextManager[Any]:
        """Autocast on the plugin's device (the plugin runs inside it)."""
        return autocast_context(precision, self.device)


def create_plugin_backbone(name: str, cls: type, *, weights: str, device: str,
                           options: dict[str, Any],
                           storage_options: Mapping[str, Any] | None) -> PluginBackbone:
    """Construct a plugin and wrap it.

    Args:
        name: the configured name.
        cls: the plugin class.
        weights: ``default`` (passed as ``None``), ``random`` (passed through, with a
            warning) or a URI (fetched and cached; the plugin gets the local path).
        device: torch device string.
        options: constructor keyword options.
        storage_options: fsspec options for fetching ``weights``.

    Raises:
        ConfigError: the constructor does not accept these options, or attributes are
            missing.
        WeightsUnavailableError: the weights URI cannot be fetched.
    """
    provenance, argument = _plugin_weights(name, cls, weights, storage_options)
    try:
        inspect.signature(cls).bind(argument, device, **options)
    except TypeError as err:
        raise ConfigError(f"plugin {name} does not accept these options {sorted(options)}: "
                          f"{err}", "model.options") from None
    try:
        if weights == "random":  # the same "random" model in every actor, as for built-ins
            from pipeline.models.registry import seeded_rng

            with seeded_rng(name, options):
                plugin = cls(argument, device, **options)
        else:
            plugin = cls(argument, device, **options)
    except Exception as err:  # the plugin's own failure, named: refused, exit 2
        raise ConfigError(f"plugin {name} could not be built ({cls.__module__}."
                          f"{cls.__qualname__}({'weights' if argument else 'None'}, {device!r}, "
                          f"**model.options) raised {type(err).__name__}: "
                          f"{redact.text(str(err))})", "model.name") from err
    return PluginBackbone(plugin, plugin_info(name, plugin, options), provenance, device)


def _plugin_weights(name: str, cls: type, weights: str,
                    storage_options: Mapping[str, Any] | None) -> tuple[WeightsInfo, str | None]:
    if weights == "default":
        weights_id = getattr(cls, "weights_id", None)
        if weights_id:
            return WeightsInfo(uri="default", sha256=str(weights_id), format="plugin"), None
        log.warning("plugin %s runs its own default weights, which this job cannot hash: the "
                    "variant records them as 'unknown', so rows of two versions of them would "
                    "share one namespace. Set model.weights to the checkpoint (hashed like any "
                    "other), or give the class a weights_id (their hash or version)", name)
        return PLUGIN_DEFAULT_WEIGHTS, None
    if weights == "random":
        log.warning("!!! %s was asked for RANDOM weights: its embeddings are NOT meaningful "
                    "(for tests and demos only). !!!", name)
        return RANDOM_WEIGHTS, "random"
    local = fetch_weights(weights, storage_options)
    return WeightsInfo(uri=local.uri, sha256=local.sha256, format=local.format), str(local.path)
