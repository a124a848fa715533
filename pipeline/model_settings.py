"""A job's config, settled against its model: windows, hop, layers and pooling as the model
takes them (:class:`ModelSettings`), and the sizes they make.

The model fixes what the config may ask: BirdNET's 3 s window, a backbone's shortest
input, its layers and poolings. :func:`settle_model_settings` turns the config's windows,
layers and pooling into what the actors and the variant use (seconds, and samples at the
model's rate; layer indices, none negative), refusing what does not fit, naming the field
to change. The sizes that follow are reckoned here too, in MiB: a batch of windows
(:func:`batch_mib`) and an output file's rows (:func:`file_mib`), which
``compute.inflight_mb`` must hold (checked as the settings are settled), and with a window
and a decode block, a machine's memory (:func:`check_sizes_fit`); so must a CPU actor's
forward pass of a batch (:func:`check_activations_fit`).

``EmbeddingJob.prepare()`` settles them once the model is resolved;
:func:`check_model_settings` does the same from the registry alone (no weights, no Ray, no
I/O), which is how ``submit`` refuses a bad config before it reaches a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pipeline.compute import min_inflight_mb
from pipeline.config import JobConfig, WindowsConfig
from pipeline.errors import ConfigError, UnknownModelError
from pipeline.windows import samples_for

if TYPE_CHECKING:  # pipeline.models imports torch, which the job imports when it needs it
    from pipeline.models import ModelInfo
    from pipeline.models.base import ActivationCost

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What a config asks of its model, as the model takes it."""

    window_s: float
    hop_s: float
    window_samples: int  # at the model's rate
    hop_samples: int
    layers: tuple[int, ...]  # resolved: no negative index
    pooling: str


def settle_model_settings(cfg: JobConfig, info: ModelInfo) -> ModelSettings:
    """Window, hop (seconds and samples), pooling and layers, as the model takes them, and
    the in-flight budget they need.

    Raises:
        ConfigError: the config does not fit the model, naming the field.
    """
    from pipeline.models import validate_pooling

    fixed = info.fixed_window_s
    window_s = cfg.windows.window_s or fixed or 5.0
    if fixed is not None and abs(window_s - fixed) > 1e-9:
        raise ConfigError(f"{info.name} only takes {fixed} s windows, got {window_s}",
                          "windows.window_s")
    hop_s = cfg.windows.hop_s or window_s / 2
    if hop_s > window_s:  # sparse sampling may be meant, but say what it costs
        log.warning("windows.hop_s %g s > window_s %g s: %.0f%% of every recording is "
                    "never embedded", hop_s, window_s, 100 * (1 - window_s / hop_s))
    if cfg.windows.min_tail_s > window_s:  # it would drop full windows too
        if cfg.windows.min_tail_s == WindowsConfig.min_tail_s:  # not set: the window is
            raise ConfigError(f"{window_s} s is shorter than windows.min_tail_s "
                              f"({cfg.windows.min_tail_s} s by default, the least audio a "
                              "window may hold): lengthen the window, or lower "
                              "windows.min_tail_s too", "windows.window_s")
        raise ConfigError(f"{cfg.windows.min_tail_s} s is longer than the window "
                          f"({window_s} s)", "windows.min_tail_s")
    pooling = validate_pooling(info, cfg.model.pooling)
    try:
        layers = info.resolve_layers(cfg.model.layers)
    except ValueError as err:
        raise ConfigError(str(err), "model.layers") from None
    rate = info.sample_rate_hz
    settings = ModelSettings(window_s=window_s, hop_s=hop_s,
                             window_samples=samples_for(window_s, rate),
                             hop_samples=samples_for(hop_s, rate), layers=layers,
                             pooling=pooling)
    # With any tail policy: `keep` extends a short tail to the shortest input, but a
    # window shorter than it would fail every batch (and the warm-up) in every actor.
    if settings.window_samples < info.min_input_samples:
        raise ConfigError(f"{window_s} s is shorter than {info.name}'s shortest input "
                          f"({info.min_input_samples / rate:.3f} s)", "windows.window_s")
    _check_inflight_budget(cfg, settings)
    return settings


def batch_mib(cfg: JobConfig, settings: ModelSettings) -> float:
    """A batch of windows, as float32 samples."""
    return cfg.model.batch_size * settings.window_samples * 4 / 2**20


def file_mib(cfg: JobConfig) -> float:
    """An output file's rows."""
    return cfg.output.file_mb * 1e6 / 2**20


def mib_text(mib: float) -> str:
    """``58 TiB``, ``586 MiB``: a size in the binary unit that keeps it readable."""
    for unit in ("MiB", "GiB", "TiB", "PiB"):
        if mib < 1024 or unit == "PiB":
            return f"{mib:,.0f} {unit}" if mib >= 10 or unit == "MiB" else f"{mib:.1f} {unit}"
        mib /= 1024
    raise AssertionError("unreachable")


def check_sizes_fit(cfg: JobConfig, settings: ModelSettings, memory_mib: float,
                    where: str) -> None:
    """Refuse sizes that no worker of ``memory_mib`` could hold, naming the setting that
    makes them so: one window, a decode task's block (``audio.batch_windows``), or what the
    job holds at once to move at all (:func:`pipeline.compute.min_inflight_mb`: a few
    window batches and one output file's rows). A batch that size fails as every
    recording's ``MemoryError``, a window as a traceback in every decode task. The margin is
    wide: a 10-minute window at 16 kHz is 37 MiB.

    ``where``: whose memory that is, for the message (``this machine's``).
    """
    window = settings.window_samples * 4 / 2**20
    batch = batch_mib(cfg, settings)
    file = file_mib(cfg)
    held = min_inflight_mb(batch, file)
    block = (cfg.audio.batch_windows or 0) * window
    if window * 4 > memory_mib:
        field = "windows.window_s"
        what = f"one {settings.window_s:g} s window is {mib_text(window)} of audio"
    elif block > memory_mib:
        field = "audio.batch_windows"
        what = (f"a decode block of {cfg.audio.batch_windows} windows of {settings.window_s:g} s "
                f"is {mib_text(block)}")
    elif held > memory_mib:
        field = "output.file_mb" if 1.5 * file > 4 * batch else "model.batch_size"
        what = (f"the job holds a few window batches ({cfg.model.batch_size} windows of "
                f"{settings.window_s:g} s: {mib_text(batch)} each) and one output file's rows "
                f"({cfg.output.file_mb:g} MB) at once, {mib_text(held)}")
    else:
        return
    raise ConfigError(f"{what}, more than {where} memory ({mib_text(memory_mib)}): lower "
                      f"{field}", field)


def check_activations_fit(cfg: JobConfig, settings: ModelSettings, info: ModelInfo,
                          actors: int, memory_mib: float, where: str) -> None:
    """Refuse a forward pass that ``actors`` CPU actors, each running a batch at once,
    cannot hold in ``memory_mib``: BEATs' attention is quadratic in the window (a 60-s
    window takes ~2 GiB, 10 minutes ~145 GiB), and a pass too large was killed for memory
    in every actor, retried, and failed the run minutes later. Names what to lower: the
    window when one window alone does not fit, else the batch, else the actors.

    Only for CPU actors: on a GPU the activations are on the device (``compute.warmup``
    runs a full batch there at start-up). ``where``: whose memory, for the message.
    """
    cost = info.activations
    if cost is None:
        return
    window, batch, layers = settings.window_samples, cfg.model.batch_size, settings.layers
    each, least = cost.mib(batch, window, layers), cost.mib(1, window, layers)
    if actors * each <= memory_mib:
        return
    if least > memory_mib:
        longest = _longest_window_s(cost, batch, layers, actors, memory_mib,
                                   info.sample_rate_hz)
        field, advice = "windows.window_s", f"windows of at most {longest:g} s fit"
    elif actors * least <= memory_mib:
        most = max(b for b in range(1, batch)
                   if actors * cost.mib(b, window, layers) <= memory_mib)
        field, advice = "model.batch_size", f"batches of at most {most} windows fit"
    else:
        field = "compute.embed_actors"
        most = int(memory_mib // each) if each <= memory_mib else int(memory_mib // least)
        advice = f"at most {most} actor{'' if most == 1 else 's'} of " + (
            "such batches fit" if each <= memory_mib else "one window a batch fit")
    windows = f"{batch} window{'' if batch == 1 else 's'}"
    together = f", {mib_text(actors * each)} for {actors} actors at once" if actors > 1 else ""
    raise ConfigError(
        f"a forward pass of {windows} of {settings.window_s:g} s takes about "
        f"{mib_text(each)} on a CPU actor beyond its model ({info.name}, estimated from "
        f"measured peaks){together}: more than {where} ({mib_text(memory_mib)}); lower "
        f"{field} ({advice})", field)


def _longest_window_s(cost: ActivationCost, batch: int, layers: tuple[int, ...], actors: int,
                      memory_mib: float, rate: int) -> int:
    """The longest whole-second window (at least 1 s) whose passes, ``batch`` windows a
    batch in ``actors`` actors at once, fit in ``memory_mib``."""
    seconds = 1
    while actors * cost.mib(batch, (seconds + 1) * rate, layers) <= memory_mib:
        seconds += 1
    return seconds


def _check_inflight_budget(cfg: JobConfig, settings: ModelSettings) -> None:
    """The writer gathers one file's rows before writing them; a smaller budget deadlocks
    (``compute.min_inflight_mb``)."""
    budget = cfg.compute.inflight_mb
    needed = min_inflight_mb(batch_mib(cfg, settings), file_mib(cfg))
    if budget is not None and budget < needed:
        raise ConfigError(
            f"{budget} MiB cannot hold one output file ({cfg.output.file_mb:g} MB) "
            f"plus a few window batches; use at least {needed} or lower output.file_mb",
            "compute.inflight_mb")


def check_model_settings(cfg: JobConfig) -> None:
    """What ``prepare()`` checks of a config against its model (window, hop, pooling, layers,
    the in-flight budget), with no weights, no Ray and no I/O: how ``submit`` refuses a bad
    config before it reaches the cluster.

    Raises:
        UnknownModelError: no such backbone here.
        ConfigError: the config does not fit the model.
    """
    from pipeline.models import model_info

    with model_name_named():
        info = model_info(cfg.model.name, cfg.model.options)
    settle_model_settings(cfg, info)


@contextlib.contextmanager
def model_name_named() -> Iterator[None]:
    """An unknown backbone refused as a config error is: naming ``model.name`` first."""
    try:
        yield
    except UnknownModelError as err:
        if str(err).startswith("model.name: "):
            raise
        raise UnknownModelError(f"model.name: {err}") from err
