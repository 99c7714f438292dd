"""`linesight models keygen`: the private half ends up in a private file, and nowhere else."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from linesight.artifacts import generate_keypair, load_private_key, load_public_key
from linesight.cli import main


def test_the_same_file_for_both_halves_is_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both halves named the same file used to leave only the public key in it, with the
    message that a private key had been written."""
    same = tmp_path / "site.pem"
    assert main(["models", "keygen", "--private", str(same), "--public", str(same)]) == 2
    assert "same file" in capsys.readouterr().err
    assert not same.exists()


def test_a_name_taken_by_a_dangling_link_is_not_written_through(tmp_path: Path) -> None:
    link = tmp_path / "site.key"
    link.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(FileExistsError):
        generate_keypair(link, tmp_path / "site.pub")
    assert not (tmp_path / "elsewhere.key").exists()
    assert not (tmp_path / "site.pub").exists()


def test_a_refused_public_name_leaves_no_private_half_behind(tmp_path: Path) -> None:
    (tmp_path / "site.pub").write_text("an older public key\n")
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "site.key", tmp_path / "site.pub")
    assert not (tmp_path / "site.key").exists()
    assert (tmp_path / "site.pub").read_text() == "an older public key\n"


def test_the_private_half_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_keypair(tmp_path / "keys" / "site.key", tmp_path / "keys" / "site.pub")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "keys" / "site.key").stat().st_mode) == 0o600
    private = load_private_key(tmp_path / "keys" / "site.key")
    public = load_public_key(tmp_path / "keys" / "site.pub")
    assert private.public_key().public_bytes_raw() == public.public_bytes_raw()
