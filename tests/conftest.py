"""Shared test fixtures: where the real recordings live, and small audio factories."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EMBED_ARCHIVE_SHARED", REPO.parent / "shared"))
REAL = SHARED / "data" / "real"

# Keep model weights, caches and Ray's temp files out of the user's home during tests.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray replaces builtins.print in a driver that meets a progress bar (a killed task's retry
# does); tests share one process, so keep print as it is.
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real recordings; a missing folder is an error, never a skip."""
    if not (REAL / "metadata.csv").exists():
        raise RuntimeError(f"real recordings not found at {REAL}: the tests need ../shared beside "
                           "the repository (or EMBED_ARCHIVE_SHARED pointing at it)")
    return REAL


@pytest.fixture
def release_leases(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every lease a test made is released after it, passed or failed: no heartbeat thread
    outlives its test, and no token stays in this process's running set."""
    from pipeline import lease as lease_mod

    made: list[lease_mod.NamespaceLease] = []
    real_init = lease_mod.NamespaceLease.__init__

    def init(self: lease_mod.NamespaceLease, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(lease_mod.NamespaceLease, "__init__", init)
    yield
    for lease in made:
        lease._stop.set()
        if lease._thread is not None:
            lease._thread.join(timeout=5)
        with lease_mod._running_lock:
            lease_mod._running.discard(lease.token)


@pytest.fixture(autouse=True)
def _weights_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBED_ARCHIVE_CACHE", str(tmp_path_factory.getbasetemp() / "weights-cache"))


def write_tone(path: Path, seconds: float, sample_rate_hz: int = 16_000, channels: int = 1,
               freq_hz: float = 440.0, fmt: str | None = None, subtype: str | None = None,
               seed: int = 0) -> np.ndarray:
    """Write a tone plus a little noise; returns the samples written ``[frames, channels]``."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate_hz)) / sample_rate_hz
    cols = [0.5 * np.sin(2 * np.pi * freq_hz * (c + 1) * t) + 0.01 * rng.standard_normal(len(t))
            for c in range(channels)]
    audio = np.stack(cols, axis=1).astype(np.float32)
    sf.write(path, audio, sample_rate_hz, format=fmt, subtype=subtype)
    return audio


@contextlib.contextmanager
def serving(directory: Path, forbidden: Collection[str] = ()) -> Iterator[str]:
    """Python's http.server on 127.0.0.1 over ``directory`` (no ETag, no ranges, a
    Last-Modified date): yields its base URL; stopped on exit. The files named in
    ``forbidden`` answer 403."""
    from http.server import SimpleHTTPRequestHandler

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def send_head(self) -> Any:
            if self.path.lstrip("/") in forbidden:
                self.send_error(403, "Forbidden")
                return None
            return super().send_head()

        def log_message(self, *args: Any) -> None:
            pass

    with on_loopback(Handler) as url:
        yield url


@contextlib.contextmanager
def on_loopback(handler: type) -> Iterator[str]:
    """An HTTP server of ``handler`` on 127.0.0.1 in a thread: yields its base URL; stopped
    on exit."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
