"""The demo archive: written once per seed, so a second ``make demo`` resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import InputConfig
from pipeline.demo import write_demo_archive
from pipeline.errors import ConfigError
from pipeline.sources import list_sources


def recording_ids(root: Path) -> list[str]:
    return [i.recording_id for i in list_sources(
        InputConfig(manifest=str(root / "manifest.csv"))).items]


def test_a_second_demo_keeps_the_archive_and_its_recording_ids(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    paths = write_demo_archive(root)
    assert len(paths) == 9 and all(p.stat().st_size > 0 for p in paths)
    before = recording_ids(root)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert write_demo_archive(root) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert recording_ids(root) == before  # the job would find all nine already committed
    # Another seed is another archive; a missing file is written again.
    paths[0].unlink()
    write_demo_archive(root)
    assert paths[0].is_file()
    rewritten = recording_ids(root)
    write_demo_archive(root, seed=8)
    after = recording_ids(root)
    # Every file written again: a stamp that ignored the seed kept the old archive.
    assert all(a != b for a, b in zip(after, rewritten, strict=True)) and after != before


def test_the_demo_command_says_whether_it_kept_the_archive_or_wrote_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another seed writes the archive again, new recordings to a job: it said "kept"."""
    from pipeline.cli import main

    root = str(tmp_path / "demo")
    said = []
    for seed in ("7", "7", "8"):
        assert main(["demo", root, "--seed", seed]) == 0
        said.append(capsys.readouterr().out)
    assert "written in" in said[0] and "kept as they were" in said[1]
    assert "written in" in said[2] and "seed 8" in said[2]
    # Only an archive written over one before is new recordings to a job: the first
    # write said so too, as if something had been replaced.
    assert "written again" not in said[0] and "written again" in said[2]


def test_a_folder_of_someone_elses_files_is_refused_not_written_over(tmp_path: Path) -> None:
    """``embed-archive demo .`` in a folder of recordings wrote its manifest.csv over the
    user's own; a folder the demo began and never finished (no stamp yet) is still its."""
    theirs = tmp_path / "recordings"
    theirs.mkdir()
    (theirs / "manifest.csv").write_text("uri,site\nmine.wav,home\n")
    (theirs / "mine.wav").write_bytes(b"RIFF")
    with pytest.raises(ConfigError, match=r"holds files the demo did not write \(mine\.wav\); "
                                          r"it would write .* give a new or empty folder") as err:
        write_demo_archive(theirs)
    assert err.value.field == "directory"
    assert (theirs / "manifest.csv").read_text() == "uri,site\nmine.wav,home\n"
    assert sorted(p.name for p in theirs.iterdir()) == ["manifest.csv", "mine.wav"]
    cut_short = tmp_path / "demo"
    cut_short.mkdir()
    (cut_short / ".DS_Store").write_bytes(b"\0")
    paths = write_demo_archive(cut_short)
    (cut_short / ".demo.json").unlink()
    paths[-1].unlink()
    assert write_demo_archive(cut_short) == paths
