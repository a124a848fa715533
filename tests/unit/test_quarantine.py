"""A recording a decode worker died on, decoded again in a process of its own."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline import crashes, quarantine
from pipeline.audio import DecodeReport, DecodeSettings
from pipeline.errors import AudioDecodeError
from pipeline.faults import FAULT_ENV
from pipeline.stages import DecodeSpec, decode_recording
from tests.conftest import write_tone

SPEC = DecodeSpec(DecodeSettings(16_000, channels="each"), window_samples=16_000,
                  hop_samples=8_000, tail="pad", min_tail_samples=400, batch_windows=8)


def decoded(path: Path, deaths: int, crashed: list[int] | None = None,
            ) -> tuple[list[dict[str, np.ndarray]], dict]:
    """The rows of one recording decoded with ``deaths`` earlier deaths, and its report."""
    rows = list(decode_recording("r", str(path), str(path), path.stat().st_size if path.exists()
                                 else -1, "", SPEC, deaths,
                                 on_crash=lambda: (crashed if crashed is not None else []).append(1)))
    report = json.loads(rows[-1]["meta"][-1])
    report.pop("decode_s")
    return rows, report


@pytest.mark.parametrize("name", ["perch/chirp/tests/testdata/21100_36_48.opus",
                                  "perch/chirp/tests/testdata/21100_36_48.mp3"])
def test_a_recording_decoded_apart_gives_the_rows_and_report_the_worker_would(
        real_data: Path, name: str) -> None:
    """Batch for batch the same windows, the same report: a retry that decodes apart what
    its first try decoded in the worker yields what that try did."""
    in_worker, want = decoded(real_data / name, deaths=0)
    apart, got = decoded(real_data / name, deaths=1)
    assert got == want and want["status"] == "ok"
    assert [len(b["recording_id"]) for b in apart] == [len(b["recording_id"]) for b in in_worker]
    for a, b in zip(apart, in_worker, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"meta"}:
            np.testing.assert_array_equal(a[key], b[key])
        assert [bool(m) for m in a["meta"]] == [bool(m) for m in b["meta"]]


def test_a_stereo_recordings_bad_end_is_the_same_partial_decode_apart(tmp_path: Path) -> None:
    """The decode's own failures cross the pipe as they are (an AudioDecodeError keeps its
    type), so a truncated file is the same partial recording, a file that is no audio
    the same error."""
    path = tmp_path / "cut.wav"
    write_tone(path, 6.0, 16_000, channels=2)
    path.write_bytes(path.read_bytes()[: 44 + 4 * 16_000 * 4])  # the header says 6 s, 4 are left
    (tmp_path / "no.wav").write_bytes(b"not audio at all")
    for name in ("cut.wav", "no.wav"):
        _, want = decoded(tmp_path / name, deaths=0)
        _, got = decoded(tmp_path / name, deaths=1)
        assert got == want
    assert decoded(tmp_path / "cut.wav", deaths=1)[1]["status"] == "partial"
    assert decoded(tmp_path / "no.wav", deaths=1)[1]["status"] == "error"


def test_a_recording_that_kills_the_process_it_is_decoded_apart_in_is_an_error_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder dies again, in the child: the recording is an error row naming the
    signal, the ledger is told, and this process (the worker) lives on."""
    path = tmp_path / "poison.wav"
    write_tone(path, 3.0, 16_000)
    marker = tmp_path / "fault.marker"
    marker.write_text("")
    monkeypatch.setenv(FAULT_ENV, f"decode@poison+every:{marker}")
    crashed: list[int] = []
    rows, report = decoded(path, deaths=1, crashed=crashed)
    [killed] = marker.read_text().split()
    assert int(killed) != os.getpid()
    assert crashed == [1]
    assert (report["status"], report["error_type"]) == ("error", crashes.ERROR_TYPE)
    assert report["message"].startswith("decoding it killed the process it ran in apart "
                                        "(killed by SIGKILL), after its decode worker had died")
    assert len(rows) == 1 and rows[0]["window_index"][0] < 0  # the report's row, no window


def test_a_recording_died_on_twice_is_an_error_row_without_a_decode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "poison.wav"
    write_tone(path, 3.0, 16_000)
    marker = tmp_path / "fault.marker"
    marker.write_text("")
    monkeypatch.setenv(FAULT_ENV, f"decode@poison+every:{marker}")
    _, report = decoded(path, deaths=crashes.SUSPECT_DEATHS)
    assert marker.read_text() == ""  # nothing decoded it
    assert (report["error_type"], report["message"]) == (
        crashes.ERROR_TYPE, crashes.died_again(crashes.SUSPECT_DEATHS))


def test_a_quarantined_decode_left_early_is_killed(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A task closed mid-recording (cancelled, its run stopped) leaves no decoder behind."""
    path = tmp_path / "long.wav"
    write_tone(path, 600.0, 16_000)
    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def watched(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", watched)
    windows = quarantine.read_windows("r", str(path), str(path), path.stat().st_size, SPEC,
                                      DecodeReport(), {})
    next(windows)
    [child] = started
    assert child.poll() is None  # still decoding, held back by the full pipe
    windows.close()
    assert child.returncode is not None


def test_a_decode_error_survives_pickling_whole() -> None:
    err = pickle.loads(pickle.dumps(AudioDecodeError("CorruptAudio", "bad frame at 12 s")))
    assert (type(err), err.error_type, str(err)) == (AudioDecodeError, "CorruptAudio",
                                                     "bad frame at 12 s")


def test_a_child_that_dies_before_it_reads_its_request_is_no_crash_of_the_recording(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that cannot start (its interpreter killed at once, out of memory) breaks the
    pipe the request goes down: it never began to decode, so it says nothing of the
    recording, whose error row is transient (a rerun retries it) and the ledger not told."""
    path = tmp_path / "t.wav"
    write_tone(path, 2.0, 16_000)
    popen = subprocess.Popen

    def dead_at_once(args, **kwargs):
        child = popen(["sh", "-c", "exec kill -9 $$"], **kwargs)
        child.wait()  # gone before the request is written
        return child

    monkeypatch.setattr(subprocess, "Popen", dead_at_once)
    with pytest.raises(quarantine.QuarantineUnavailable, match=r"killed by SIGKILL"):
        list(quarantine.read_windows("r", str(path), str(path), path.stat().st_size, SPEC,
                                     DecodeReport(), {}))
    crashed: list[int] = []
    _, report = decoded(path, deaths=1, crashed=crashed)
    assert crashed == []
    assert (report["status"], report["error_type"], report["transient"]) == (
        "error", "QuarantineUnavailable", True)


def test_a_child_that_cannot_import_the_package_says_why_in_a_transient_error_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    """A worker whose interpreter cannot import ``pipeline`` in a new process (a cluster's
    working_dir not on its path) exits with a status, as a decoder calling ``exit()`` on a
    bad file would; only the child's not having said it was ready tells them apart. The
    recording is not made a permanent ``DecoderCrashed`` row, and the row and the worker's
    log say why."""
    path = tmp_path / "t.wav"
    write_tone(path, 2.0, 16_000)
    popen = subprocess.Popen

    def elsewhere(args, **kwargs):  # no site-packages, where the package is installed
        kwargs["env"] = {**kwargs["env"], "PYTHONPATH": str(tmp_path)}
        return popen([args[0], "-S", *args[1:]], cwd=tmp_path, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", elsewhere)
    crashed: list[int] = []
    _, report = decoded(path, deaths=1, crashed=crashed)
    assert crashed == []
    assert (report["status"], report["error_type"], report["transient"]) == (
        "error", "QuarantineUnavailable", True)
    assert re.search(r"ended before it began \(exit status 1: .*No module named 'pipeline'",
                     report["message"]), report["message"]
    assert "No module named 'pipeline'" in capfd.readouterr().err


def test_a_decoder_that_exits_mid_decode_is_a_crash_of_the_recording(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ready, then gone with a status and no outcome: the recording's doing, as a signal."""
    path = tmp_path / "poison.wav"
    write_tone(path, 3.0, 16_000)
    popen = subprocess.Popen
    ready_then_gone = ("import pickle, sys; pickle.load(sys.stdin.buffer); "
                       "pickle.dump(('ready', None), sys.stdout.buffer); sys.exit(1)")

    def exiting(args, **kwargs):
        return popen([args[0], "-c", ready_then_gone], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", exiting)
    crashed: list[int] = []
    _, report = decoded(path, deaths=1, crashed=crashed)
    assert crashed == [1]
    assert (report["error_type"], report["message"]) == (
        crashes.ERROR_TYPE, crashes.died_in_quarantine("exit status 1"))


def test_an_error_crosses_the_pipe_with_the_errors_it_was_raised_from() -> None:
    """s3fs raises S3's InvalidObjectState as a PermissionError whose botocore cause alone
    says the object is archived; pickling drops causes, so sent alone it was a transient
    refusal of the credentials apart. Sent with its chain, it is the ArchivedObject row
    the worker would have made."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from pipeline import stages

    err = translate_boto_error(ClientError(
        {"Error": {"Code": "InvalidObjectState", "StorageClass": "GLACIER"},
         "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject"))
    sent = pickle.loads(pickle.dumps(quarantine._portable_chain(err)))
    got = quarantine._relinked(sent)
    assert type(got) is type(err) and type(got.__cause__) is ClientError
    uri = "s3://b/cold.flac"
    assert stages._failure_meta(got, uri) == stages._failure_meta(err, uri)
    assert stages._failure_meta(got, uri)["error_type"] == "ArchivedObject"
