"""What the driver's terminal shows of the workers' lines Ray prints there."""

from __future__ import annotations

import io
import os

import pytest

from pipeline.ray_connect import plain_worker_prefixes


def _printed(line: str) -> str:
    """``line`` as Ray's driver prints an embedding actor's log line."""
    from ray._private.worker import print_worker_logs

    out = io.StringIO()
    print_worker_logs({"pid": 4242, "ip": "10.0.0.1", "localhost": "10.0.0.1",
                       "actor_name": "MapWorker(MapBatches(Embedder))", "lines": [line]}, out)
    return out.getvalue()


def _unset_for_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RAY_COLOR_PREFIX`` unset now and as it was after the test, whatever the test sets
    (``delenv`` of a variable not there would restore nothing)."""
    monkeypatch.setenv("RAY_COLOR_PREFIX", "")
    monkeypatch.delenv("RAY_COLOR_PREFIX")


def test_worker_lines_in_a_log_file_carry_no_escape_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray coloured the ``(MapWorker(...) pid=...)`` prefix whatever it printed to: a log
    file, ``| tee`` or a Ray Jobs driver log held ``\\x1b[36m`` on every actor's line."""
    _unset_for_the_test(monkeypatch)
    line = "WARNING pipeline.models.registry: !!! beats uses RANDOM weights"
    assert "\x1b[" in _printed(line)  # Ray's own default
    plain_worker_prefixes(io.StringIO(), io.StringIO())
    assert _printed(line) == f"(MapWorker(MapBatches(Embedder)) pid=4242) {line}\n"


def test_a_terminal_keeps_the_colour_and_a_users_setting_is_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _unset_for_the_test(monkeypatch)
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        plain_worker_prefixes(tty, tty)
        assert "RAY_COLOR_PREFIX" not in os.environ
        plain_worker_prefixes(tty, io.StringIO())  # stdout a terminal, stderr a file
        assert os.environ["RAY_COLOR_PREFIX"] == "0"
    os.close(leader)
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    plain_worker_prefixes(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "1"
