"""Listing a manifest: one item per object, whatever the spelling; refusals name the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import InputConfig
from pipeline.errors import ConfigError
from pipeline.sources import _size, list_sources


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, np.zeros(1600, np.float32), 16_000)
    return tmp_path


def write_manifest(folder: Path, rows: list[tuple[str, str]]) -> str:
    path = folder / "manifest.csv"
    path.write_text("uri,site\n" + "".join(f"{uri},{site}\n" for uri, site in rows))
    return str(path)


def test_spellings_of_one_file_are_one_recording_with_the_first_rows_metadata(
        folder: Path) -> None:
    manifest = write_manifest(folder, [
        ("./a.wav", "first"), ("b.wav", "b"), ("a.wav", "second"),
        (str(folder / "a.wav"), "third"), (f"file://{folder / 'a.wav'}", "fourth")])
    listing = list_sources(InputConfig(manifest=manifest))
    assert [i.uri for i in listing.items] == [str(folder / "a.wav"), str(folder / "b.wav")]
    assert len({i.recording_id for i in listing.items}) == 2
    assert listing.extras is not None
    sites = listing.extras.column("site").to_pylist()
    assert [sites[i.row] for i in listing.items] == ["first", "b"]


def test_a_row_without_a_uri_is_refused_with_its_row_number(folder: Path) -> None:
    manifest = write_manifest(folder, [("a.wav", "x"), ("", "y"), ("b.wav", "z")])
    with pytest.raises(ConfigError, match=r"1 row\(s\) without a uri \(rows 2;") as err:
        list_sources(InputConfig(manifest=manifest))
    assert err.value.field == "input.manifest"


def test_an_unknown_size_is_unknown_not_empty() -> None:
    assert _size({"size": None}) == -1
    assert _size({}) == -1
    assert _size({"size": 0}) == 0
    assert _size({"size": 1234}) == 1234
