"""A manifest.sig that is not text (the raw 64 signature bytes, a damaged file) is a failed
`signature` check like any other bad signature, not a crash of whoever verifies the bundle."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from linesight import artifacts as a
from linesight.cli import main
from tests.unit.test_artifacts import make_bundle


@pytest.mark.parametrize("damage", ["raw bytes", "not utf-8"])
def test_a_signature_file_that_is_not_text_fails_the_signature_check(
    tmp_path: Path, damage: str
) -> None:
    key = Ed25519PrivateKey.generate()
    bundle = make_bundle(tmp_path / "tiny" / "1.2.3", key)
    signature = base64.b64decode((bundle / a.SIGNATURE_FILE).read_text())
    (bundle / a.SIGNATURE_FILE).write_bytes(
        signature if damage == "raw bytes" else b"\xff\xfe" + signature[:10]
    )
    with pytest.raises(a.BundleError) as raised:
        a.verify_bundle(bundle, key.public_key())
    assert raised.value.check == "signature"
    assert "manifest.sig is not valid base64" in str(raised.value)


def test_models_verify_goes_on_after_a_signature_file_that_is_not_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = tmp_path / "site.key", tmp_path / "site.pub"
    a.generate_keypair(private, public)
    key = a.load_private_key(private)
    damaged = make_bundle(tmp_path / "damaged" / "1.2.3", key)
    good = make_bundle(tmp_path / "good" / "1.2.3", key)
    (damaged / a.SIGNATURE_FILE).write_bytes(
        base64.b64decode((damaged / a.SIGNATURE_FILE).read_text())
    )
    assert main(["models", "verify", str(damaged), str(good), "--key", str(public)]) == 1
    out, err = capsys.readouterr()
    assert f"FAIL {damaged}: bundle check 'signature' failed" in err
    assert f"ok   {good}" in out
