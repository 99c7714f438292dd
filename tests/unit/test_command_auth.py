"""Signed commands: what is signed, and every way a signature is refused."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from linesight import protocol as p
from linesight.artifacts import generate_keypair
from linesight.command_auth import (
    load_signing_key,
    load_verifying_key,
    sign_command,
    signature_error,
    signing_bytes,
)

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()


def command(**fields: object) -> p.Command:
    values: dict[str, object] = {
        "station": "press-01", "seq": 7, "cmd_id": uuid.uuid4(),
        "body": p.SetMode(mode=p.DeploymentMode.CANARY, canary_fraction=0.05),
        "rollout_id": "r-1", "expires_at": datetime.now(UTC) + timedelta(minutes=5),
    }
    values.update(fields)
    return p.Command.model_validate(values)


def over_the_wire(signed: p.Command) -> p.Command:
    return p.parse(p.Command, signed.to_json())


def test_a_signed_command_verifies_after_its_trip_through_json() -> None:
    signed = sign_command(command(), KEY)
    assert signed.signature is not None
    assert signature_error(over_the_wire(signed), KEY.public_key()) is None


def test_the_signature_covers_every_field_but_itself() -> None:
    original = command()
    assert b"signature" not in signing_bytes(original)
    signed = sign_command(original, KEY)
    assert signing_bytes(signed) == signing_bytes(original)
    for change in (
        {"station": "press-02"}, {"seq": 8}, {"cmd_id": uuid.uuid4()},
        {"body": p.SetMode(mode=p.DeploymentMode.CANARY, canary_fraction=0.5)},
        {"rollout_id": "r-2"}, {"expires_at": None}, {"msg_id": uuid.uuid4()},
        {"ts": signed.ts + timedelta(seconds=1)},
    ):
        tampered = over_the_wire(signed).model_copy(update=change)
        error = signature_error(tampered, KEY.public_key())
        assert error is not None and "does not match" in error, change


def test_unsigned_foreign_and_garbled_signatures_are_refused() -> None:
    public = KEY.public_key()
    unsigned = signature_error(command(), public)
    assert unsigned is not None and "not signed" in unsigned
    foreign = sign_command(command(), Ed25519PrivateKey.generate())
    assert "does not match" in (signature_error(foreign, public) or "")
    garbled = command(signature="not base64 at all!")
    assert "not valid base64" in (signature_error(garbled, public) or "")
    short = command(signature=base64.b64encode(b"short").decode())
    assert "does not match" in (signature_error(short, public) or "")


def test_an_unusable_command_key_is_an_error_naming_the_setting(tmp_path: Path) -> None:
    private, public = tmp_path / "command.key", tmp_path / "command.pub"
    generate_keypair(private, public)
    assert load_signing_key(private) is not None and load_verifying_key(public) is not None
    with pytest.raises(ValueError, match=r"command_key: cannot read public key .*missing\.pub"):
        load_verifying_key(tmp_path / "missing.pub")
    with pytest.raises(ValueError, match="command_key: cannot read public key"):
        load_verifying_key(private)  # the private half where the public one belongs
    with pytest.raises(ValueError, match="command_key: cannot read private key"):
        load_signing_key(public)
