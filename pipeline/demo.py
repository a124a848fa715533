"""A small synthetic archive of animal-like calls, so the job runs anywhere with no download.

Six call types (frequency-modulated bird chirps, a trill, a toad-like pulsed croak, a
whistle with vibrato, an echolocation click train, a whale-like moan) over quiet
background noise, written at different lengths, rates and formats (WAV, FLAC, OGG/Vorbis,
MP3, Opus), one stereo file, plus ``manifest.csv`` with made-up site metadata that the job
carries through to its outputs. Deterministic for a given seed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from pipeline.errors import ConfigError

Synth = Callable[[np.random.Generator, int, float], np.ndarray]


def _t(sr: int, seconds: float) -> np.ndarray:
    return np.arange(int(sr * seconds)) / sr


def _envelope(n: int, attack: float = 0.1) -> np.ndarray:
    a = max(1, int(n * attack))
    env = np.ones(n)
    env[:a] = np.linspace(0, 1, a)
    env[-a:] = np.linspace(1, 0, a)
    return env


def _place(rng: np.random.Generator, total: np.ndarray, call: np.ndarray, count: int) -> None:
    for _ in range(count):
        if len(call) >= len(total):
            total[:] += call[: len(total)]
            return
        at = rng.integers(0, len(total) - len(call))
        total[at : at + len(call)] += call * rng.uniform(0.5, 1.0)


def chirp(rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    """Bird-like downward FM sweeps with a second harmonic."""
    out = np.zeros(int(sr * seconds))
    for _ in range(max(1, int(seconds * 1.5))):
        dur = rng.uniform(0.08, 0.25)
        t = _t(sr, dur)
        f0, f1 = rng.uniform(3500, 6000), rng.uniform(1800, 3000)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * dur))
        call = (np.sin(phase) + 0.3 * np.sin(2 * phase)) * _envelope(len(t))
        _place(rng, out, 0.4 * call, 1)
    return out


def trill(rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    """Rapidly repeated short notes (an insect or warbler trill)."""
    t = _t(sr, seconds)
    rate = rng.uniform(15, 30)
    gate = (np.sin(2 * np.pi * rate * t) > 0.3).astype(float)
    carrier = np.sin(2 * np.pi * rng.uniform(4000, 7000) * t)
    bouts = np.zeros_like(t)
    _place(rng, bouts, np.ones(int(sr * min(seconds, rng.uniform(0.8, 2.0)))), 2)
    return 0.3 * carrier * gate * np.clip(bouts, 0, 1)


def croak(rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    """Toad-like pulsed harmonic stack around 300-900 Hz."""
    out = np.zeros(int(sr * seconds))
    f0 = rng.uniform(250, 400)
    for _ in range(max(1, int(seconds / 1.5))):
        t = _t(sr, rng.uniform(0.4, 1.2))
        pulses = 0.5 * (1 + np.sign(np.sin(2 * np.pi * rng.uniform(8, 14) * t)))
        stack = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
        _place(rng, out, 0.35 * stack * pulses * _envelope(len(t)), 1)
    return out


def whistle(rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    """A pure tone with vibrato (a robin-like whistle)."""
    out = np.zeros(int(sr * seconds))
    for _ in range(max(1, int(seconds / 2))):
        t = _t(sr, rng.uniform(0.5, 1.5))
        f = rng.uniform(2000, 3500) + 150 * np.sin(2 * np.pi * rng.uniform(5, 9) * t)
        phase = 2 * np.pi * np.cumsum(f) / sr
        _place(rng, out, 0.4 * np.sin(phase) * _envelope(len(t), 0.2), 1)
    return out


def clicks(rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    """An echolocation-like click train (broadband, exponentially decaying)."""
    out = np.zeros(int(sr * seconds))
    click_t = _t(sr, 0.002)
    click = np.sin(2 * np.pi * min(sr / 3, 15000) * click_t) * np.exp(-click_t / 0.0004)
    period = rng.uniform(0.02, 0.08)
    for k in range(int(seconds / period)):
        at = int((k * period + rng.normal(0, 0.002)) * sr)
        if 0 <= at < len(out) - len(click):
            out[at : at + len(click)] += 0.6 * click
    return out


def moan(rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    """A slow, low, whale-like frequency sweep with harmonics."""
    out = np.zeros(int(sr * seconds))
    for _ in range(max(1, int(seconds / 6))):
        dur = rng.uniform(2.0, 4.0)
        t = _t(sr, dur)
        f = np.interp(t, [0, dur / 2, dur], [rng.uniform(80, 150), rng.uniform(250, 400),
                                             rng.uniform(100, 200)])
        phase = 2 * np.pi * np.cumsum(f) / sr
        call = (np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase))
        _place(rng, out, 0.3 * call * _envelope(len(t), 0.25), 1)
    return out


CALLS: dict[str, Synth] = {"chirp": chirp, "trill": trill, "croak": croak,
                           "whistle": whistle, "clicks": clicks, "moan": moan}


@dataclass(frozen=True)
class DemoFile:
    name: str
    calls: tuple[str, ...]
    seconds: float
    sample_rate_hz: int
    format: str
    subtype: str
    site: str
    channels: int = 1


DEMO_FILES: tuple[DemoFile, ...] = (
    DemoFile("forest_dawn_chirps.wav", ("chirp", "whistle"), 30.0, 32_000, "WAV", "PCM_16", "forest-a"),
    DemoFile("pond_toads.flac", ("croak",), 20.0, 22_050, "FLAC", "PCM_16", "pond-b"),
    DemoFile("meadow_trills.ogg", ("trill", "chirp"), 12.0, 44_100, "OGG", "VORBIS", "meadow-c"),
    DemoFile("robin_whistles.mp3", ("whistle",), 8.0, 44_100, "MP3", "MPEG_LAYER_III", "forest-a"),
    DemoFile("bay_moans.opus", ("moan",), 40.0, 48_000, "OGG", "OPUS", "bay-d"),
    DemoFile("bay_clicks.wav", ("clicks",), 6.0, 48_000, "WAV", "PCM_24", "bay-d"),
    DemoFile("stereo_duet.wav", ("chirp", "croak"), 15.0, 44_100, "WAV", "PCM_16", "pond-b", 2),
    DemoFile("short_call.wav", ("chirp",), 1.5, 16_000, "WAV", "FLOAT", "meadow-c"),
    DemoFile("night_soundscape.flac", ("croak", "trill", "moan"), 45.0, 16_000, "FLAC", "PCM_24",
             "pond-b"),
)


def write_audio(path: Path, audio: np.ndarray, sample_rate_hz: int, fmt: str, subtype: str,
                block_frames: int = 48_000) -> None:
    """Write ``audio`` ``[frames]`` or ``[frames, channels]`` in blocks.

    libsndfile 1.2.2 (bundled with soundfile 0.14) segfaults when one call hands its
    Vorbis encoder about a minute of audio at 48 kHz; writing in blocks avoids it.
    """
    audio = audio if audio.ndim == 2 else audio[:, None]
    with sf.SoundFile(path, "w", sample_rate_hz, audio.shape[1], format=fmt, subtype=subtype) as out:
        for start in range(0, len(audio), block_frames):
            out.write(audio[start : start + block_frames])


def render(spec: DemoFile, rng: np.random.Generator) -> np.ndarray:
    """Audio ``[frames, channels]`` in [-1, 1] for one demo file."""
    n = int(spec.seconds * spec.sample_rate_hz)
    channels = []
    for c in range(spec.channels):
        calls = spec.calls if spec.channels == 1 else spec.calls[c % len(spec.calls):][:1]
        x = 0.01 * rng.standard_normal(n)  # background
        for call in calls:
            x += CALLS[call](rng, spec.sample_rate_hz, spec.seconds)[:n]
        channels.append(x)
    audio = np.stack(channels, axis=1)
    return (0.9 * audio / max(1e-9, np.abs(audio).max())).astype(np.float32)


def write_demo_archive(directory: str | Path, seed: int = 7) -> list[Path]:
    """Write the demo archive and its manifest into ``directory``; returns the audio paths.

    An archive this function already wrote there with the same seed is left as it is: a
    recording's version is its size and modification time, so files written again would be
    new recordings to the job, and a second ``make demo`` would embed everything twice
    instead of showing the resume. (The Ogg encoders write a random stream serial, so the
    bytes themselves never repeat.)
    """
    root = Path(directory)
    if demo_archive_written(root, seed):
        return [root / spec.name for spec in DEMO_FILES]
    _refuse_a_folder_of_other_files(root, {spec.name for spec in DEMO_FILES} | {"manifest.csv"})
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / ".demo.json"
    stamp.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    rows = []
    for i, spec in enumerate(DEMO_FILES):
        path = root / spec.name
        write_audio(path, render(spec, rng), spec.sample_rate_hz, spec.format, spec.subtype)
        paths.append(path)
        rows.append({"uri": spec.name, "site": spec.site, "calls": "+".join(spec.calls),
                     "recorded_at": f"2026-05-{1 + i:02d}T05:{10 + i:02d}:00Z"})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stamp.write_text(json.dumps(_stamp(seed)))  # last: an interrupted write is redone next time
    return paths


def _stamp(seed: int) -> dict[str, Any]:
    return {"seed": seed, "files": [spec.name for spec in DEMO_FILES]}


def demo_archive_written(directory: str | Path, seed: int = 7) -> bool:
    """Whether :func:`write_demo_archive` wrote its whole archive in ``directory`` with
    ``seed``, so that it would leave it as it is."""
    root = Path(directory)
    try:
        same = json.loads((root / ".demo.json").read_text()) == _stamp(seed)
    except (OSError, ValueError):
        return False
    return same and all((root / spec.name).is_file() for spec in DEMO_FILES) and (
        root / "manifest.csv").is_file()


def demo_files_present(directory: str | Path) -> bool:
    """Whether ``directory`` holds any file the demo writes (its stamp, a recording, the
    manifest): an archive written there now replaces one written before."""
    root = Path(directory)
    names = [".demo.json", "manifest.csv", *(spec.name for spec in DEMO_FILES)]
    return any((root / name).exists() for name in names)


def _refuse_a_folder_of_other_files(root: Path, ours: set[str]) -> None:
    """Refuse a folder the demo never wrote that holds anything but its own file names: the
    demo writes its recordings and a ``manifest.csv`` there, over the user's own
    (``embed-archive demo .`` run in a folder of recordings). A folder with the stamp is
    the demo's, whatever seed or set of files wrote it; one with the demo's names alone is
    a first write cut short; hidden files (a Finder's ``.DS_Store``) are no one's archive.

    Raises:
        ConfigError: naming the folder and a few of the files found there.
    """
    if not root.is_dir() or (root / ".demo.json").exists():
        return
    others = sorted(entry.name for entry in root.iterdir()
                    if entry.name not in ours and not entry.name.startswith("."))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3
                                         else "")
        raise ConfigError(f"{root} holds files the demo did not write ({shown}); it would "
                          "write its recordings and a manifest.csv among them, over any of "
                          "the same name: give a new or empty folder", "directory")
