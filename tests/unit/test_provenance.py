"""The code version every row carries."""

from __future__ import annotations

import pytest

from pipeline.provenance import GIT_COMMIT_ENV, code_version, commit_of, git_commit, package_version


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


def test_a_checkout_with_changed_tracked_files_is_dirty(tmp_path) -> None:
    """What git says, in a real repository: the test above only passes the suffix along."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t",
                               "-c", "user.email=t@example.org", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert commit_of(tmp_path) == "unknown"  # not a checkout
    git("init", "-q")
    (tmp_path / "job.py").write_text("a = 1\n")
    git("add", "job.py")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    assert commit_of(tmp_path) == head
    (tmp_path / "notes.txt").write_text("untracked")
    assert commit_of(tmp_path) == head  # untracked files are not the code that ran
    (tmp_path / "job.py").write_text("a = 2\n")
    assert commit_of(tmp_path) == f"{head}-dirty"
    # The package in a virtualenv (ignored, untracked) inside this repository: not its code.
    site = tmp_path / ".venv" / "site-packages" / "pipeline"
    site.mkdir(parents=True)
    (site / "provenance.py").write_text("")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    assert commit_of(site.parent, tracked=site / "provenance.py") == "unknown"
    assert commit_of(tmp_path, tracked=tmp_path / "job.py") == f"{head}-dirty"
