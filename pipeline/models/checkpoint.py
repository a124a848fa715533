"""Reading checkpoint files and loading them strictly into a module.

Files are read without executing code: safetensors directly, torch files only through
``torch.load(weights_only=True)``. Container layouts are unwrapped (``{"model": ...}``,
``{"model_state_dict": ...}``, ``{"state_dict": ...}``, and Microsoft's BEATs
``{"cfg": ..., "model": ...}``, whose ``cfg`` is kept).

Loading normalises what differs between harmless layouts, like avex does: a leading
``module.`` (DDP) is dropped, wrapper prefixes (``model.``, ``backbone.``) are added or
removed to match the target, and old-style weight norm (``weight_g`` / ``weight_v``) is
renamed to ``torch.nn.utils.parametrizations`` names. After that it is strict: any
missing key, unexpected key, shape mismatch or non-finite value raises
:class:`~pipeline.errors.CheckpointMismatchError` naming them.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.errors import CheckpointMismatchError, WeightsUnavailableError
from pipeline.models.weights import LocalWeights, changed_message, sha256_of_file_bytes

_CONTAINER_KEYS = ("model_state_dict", "state_dict", "model")
_CONFIG_KEYS = ("cfg", "config")
_WEIGHT_NORM_RENAMES = {"weight_g": "parametrizations.weight.original0",
                        "weight_v": "parametrizations.weight.original1"}
_SHOWN_PER_LIST = 12
_BUFFER_ATOL = 1e-4


@dataclass(frozen=True)
class Checkpoint:
    """Tensors of a checkpoint file, plus the architecture config it carried (if any).

    Attributes:
        state_dict: tensor name -> tensor (CPU).
        config: e.g. the ``cfg`` dict of a Microsoft BEATs checkpoint, else ``None``.
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None


@dataclass(frozen=True)
class LoadRules:
    """Model-specific relaxations of strict loading.

    Attributes:
        drop_prefixes: checkpoint keys with these prefixes (after normalisation) are
            discarded, e.g. classifier heads when loading features only.
        computed: deterministic buffers the module builds itself (filterbank window, mel
            matrix). Optional in a checkpoint; when present they must match.
        tied: groups of names for one shared tensor (BEATs' relative position table).
            At least one name of a group must be present; all present must be equal.
        wrapper_prefixes: prefixes added or removed to match the target's layout.
    """

    drop_prefixes: tuple[str, ...] = ()
    computed: tuple[str, ...] = ()
    tied: tuple[tuple[str, ...], ...] = ()
    wrapper_prefixes: tuple[str, ...] = field(default=("model.", "backbone."))


def read_checkpoint(weights: LocalWeights, data: bytes | None = None) -> Checkpoint:
    """Read a checkpoint file into CPU tensors without running pickled code.

    Args:
        weights: the local file (see :func:`pipeline.models.weights.fetch_weights`).
        data: its bytes as :func:`pipeline.models.weights.read_weights` returned them with
            ``weights`` (hashed as read: not hashed again). ``None``: the file is read now,
            and refused unless its bytes still hash to ``weights.sha256``.

    Returns:
        The unwrapped state dict and the embedded config, if any.

    Raises:
        WeightsUnavailableError: the file is not a safetensors or torch checkpoint, or
            it contains pickled objects other than tensors and plain containers.
    """
    if data is None:
        data = _read_as_hashed(weights)
    if weights.format == "safetensors":
        from safetensors.torch import load

        try:
            return Checkpoint(state_dict=load(data))
        except Exception as err:  # noqa: BLE001 - SafetensorError is a plain Exception
            raise WeightsUnavailableError(
                f"cannot read {weights.uri} as safetensors (corrupt or truncated?): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from None
    if weights.format != "torch":
        raise WeightsUnavailableError(
            f"{weights.uri} is not a safetensors or torch checkpoint (detected: {weights.format})")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsUnavailableError(
            f"refusing to load {weights.uri}: it contains pickled Python objects other than "
            f"tensors, which torch.load(weights_only=True) will not execute "
            f"({_unpickler_reason(err)}). Re-save just the state dict, ideally as .safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise WeightsUnavailableError(f"cannot read {weights.uri} as a torch checkpoint "
                                      f"(corrupt or truncated?): {str(err).splitlines()[0]}"
                                      ) from None
    return unwrap_checkpoint(obj, weights.uri)


def _read_as_hashed(weights: LocalWeights) -> bytes:
    """The file's bytes, read once and checked against the hash it is recorded by: a file
    replaced between hashing and loading would put one checkpoint's embeddings under the
    other's hash (and variant)."""
    digest, data = sha256_of_file_bytes(weights.path)
    if digest != weights.sha256:
        raise WeightsUnavailableError(changed_message(weights.uri, weights.sha256))
    return data


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The useful sentence of torch's long weights-only error (which global was refused)."""
    marker = "WeightsUnpickler error:"
    for line in str(err).splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip().split(". ")[0]
    return str(err).strip().splitlines()[0]


def unwrap_checkpoint(obj: Any, source: str = "checkpoint") -> Checkpoint:
    """Find the state dict (and config) inside a loaded checkpoint object.

    Args:
        obj: what ``torch.load`` returned.
        source: name for error messages.

    Returns:
        The state dict and config.

    Raises:
        CheckpointMismatchError: no tensor dictionary was found.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{source} holds a {type(obj).__name__}, not a state dict")
    config = next((dict(obj[k]) for k in _CONFIG_KEYS if isinstance(obj.get(k), Mapping)), None)
    if _is_state_dict(obj):
        return Checkpoint(state_dict=dict(obj), config=config)
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and _is_state_dict(inner):
            return Checkpoint(state_dict=dict(inner), config=config)
    raise CheckpointMismatchError(
        f"{source} has no state dict (top-level keys: {sorted(map(str, obj))[:_SHOWN_PER_LIST]})")


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                             for k, v in obj.items())


def normalise_keys(state_dict: Mapping[str, torch.Tensor], target_keys: Sequence[str],
                   wrapper_prefixes: Sequence[str] = ("model.", "backbone.")
                   ) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the target's layout.

    Args:
        state_dict: checkpoint tensors.
        target_keys: the module's ``state_dict()`` keys.
        wrapper_prefixes: prefixes to add (target has them, checkpoint does not) or strip
            (checkpoint has them, target does not), in this order.

    Returns:
        A new dict with renamed keys.
    """
    out = {k.removeprefix("module."): v for k, v in state_dict.items()}
    for prefix in wrapper_prefixes:
        target_has = any(k.startswith(prefix) for k in target_keys)
        ckpt_has = any(k.startswith(prefix) for k in out)
        if target_has and not ckpt_has:
            out = {prefix + k: v for k, v in out.items()}
        elif ckpt_has and not target_has:
            out = {k.removeprefix(prefix): v for k, v in out.items()}
    targets = set(target_keys)
    return {_weight_norm_name(k, targets): v for k, v in out.items()}


def _weight_norm_name(key: str, targets: set[str]) -> str:
    stem, _, leaf = key.rpartition(".")
    renamed = f"{stem}.{_WEIGHT_NORM_RENAMES[leaf]}" if leaf in _WEIGHT_NORM_RENAMES else key
    return renamed if renamed in targets else key


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                rules: LoadRules = LoadRules()) -> None:
    """Normalise ``state_dict`` and load it into ``module``, failing on any mismatch.

    Args:
        module: the target (its parameters are overwritten in place).
        state_dict: checkpoint tensors, in any layout :func:`normalise_keys` understands.
        source: the checkpoint's (redacted) URI, for messages.
        rules: model-specific relaxations.

    Raises:
        CheckpointMismatchError: missing keys, unexpected keys, shape mismatches, tied
            tensors that differ, computed buffers that differ from the module's, or NaN or
            infinite values (which would make every embedding NaN).
    """
    target = module.state_dict()
    sd = normalise_keys(state_dict, list(target), rules.wrapper_prefixes)
    sd = {k: v for k, v in sd.items() if not k.startswith(rules.drop_prefixes)}
    problems = _fill_tied(sd, rules.tied) + _fill_computed(sd, target, rules.computed)
    for key in target:
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = target[key]  # a BatchNorm counter, unused at inference
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(target[k].shape)})"
              for k in target if k in sd and sd[k].shape != target[k].shape]
    non_finite = [k for k in target if k in sd and not _all_finite(sd[k])]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes),
                         ("tensors with NaN or infinite values", non_finite)):
        if items:
            problems.append(f"{len(items)} {label}: {_shorten(items)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``; a sum first (one pass, 35 ms for BEATs' 90 M values, where
    ``isfinite(...).all()`` takes 370), the exact test only if the sum is not finite."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _fill_tied(sd: dict[str, torch.Tensor], groups: Sequence[Sequence[str]]) -> list[str]:
    problems = []
    for group in groups:
        present = [k for k in group if k in sd]
        if not present:
            continue  # reported as missing
        first = sd[present[0]]
        differing = [k for k in present[1:]
                     if sd[k].shape != first.shape or not torch.equal(sd[k], first)]
        if differing:
            problems.append(f"tensors that the model shares differ: {present[0]} vs "
                            f"{_shorten(differing)}")
        for key in group:
            sd.setdefault(key, first)
    return problems


def _fill_computed(sd: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                   names: Sequence[str]) -> list[str]:
    problems = []
    for name in names:
        mine = target[name]
        theirs = sd.get(name)
        if theirs is not None and (theirs.shape != mine.shape or not torch.allclose(
                theirs.float(), mine.float(), rtol=_stored_precision(theirs), atol=_BUFFER_ATOL)):
            problems.append(f"front-end buffer {name} differs from the one this model computes "
                            "(different front-end settings?)")
        sd[name] = mine
    return problems


def _stored_precision(tensor: torch.Tensor) -> float:
    """The relative error rounding to ``tensor``'s dtype may have added: a checkpoint saved in
    fp16 or bf16 (half the download) holds the front-end buffers rounded to 3 or 2 significant
    digits, which are the same buffers, not other front-end settings; float32 adds none."""
    if not tensor.is_floating_point() or torch.finfo(tensor.dtype).bits >= 32:
        return 0.0
    return torch.finfo(tensor.dtype).eps


def _shorten(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN_PER_LIST])
    return shown + (f", ... ({len(items) - _SHOWN_PER_LIST} more)"
                    if len(items) > _SHOWN_PER_LIST else "")
