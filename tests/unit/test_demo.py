"""The demo archive: written once per seed, so a second ``make demo`` resumes."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import InputConfig
from pipeline.demo import write_demo_archive
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
