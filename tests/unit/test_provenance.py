"""The code version every row carries."""

from __future__ import annotations

import pytest

from pipeline.provenance import GIT_COMMIT_ENV, code_version, git_commit, package_version


@pytest.mark.parametrize(("commit", "shown"), [
    ("0123456789abcdef0123456789abcdef01234567", "0123456789ab"),
    ("0123456789abcdef0123456789abcdef01234567-dirty", "0123456789ab-dirty"),
])
def test_rows_say_when_the_code_had_uncommitted_changes(monkeypatch: pytest.MonkeyPatch,
                                                         commit: str, shown: str) -> None:
    monkeypatch.setenv(GIT_COMMIT_ENV, commit)
    git_commit.cache_clear()  # read once per process
    try:
        assert code_version() == f"{package_version()}+{shown}"
    finally:
        git_commit.cache_clear()
