"""Signed commands: the fleet controller signs every command, and a station configured with the
controller's public key refuses any command without a valid signature.

The broker's ACL already limits who may publish on a station's `cmd` topic. A signature also
holds where that is not enough: a plant broker shared with other systems, a leaked broker
password, a bridge in between. What is signed is the command's canonical JSON without its
`signature` field: every other field (msg_id, ts, station, seq, cmd_id, body, rollout_id,
expires_at) as linesight/v1 serialises it, keys sorted, no whitespace. A captured command can
be replayed only as itself: a station carries out each cmd_id once and refuses it after
`expires_at`, which the controller sets `command_ttl_s` (an hour) after sending.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from linesight.artifacts import BundleError, load_private_key, load_public_key
from linesight.protocol import Command


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The controller's `command_key`; ValueError naming the setting when it is unusable."""
    try:
        return load_private_key(path)
    except BundleError as exc:
        raise ValueError(f"command_key: {exc.detail}") from exc


def load_verifying_key(path: Path) -> Ed25519PublicKey:
    """A station's `command_key`; ValueError naming the setting when it is unusable."""
    try:
        return load_public_key(path)
    except BundleError as exc:
        raise ValueError(f"command_key: {exc.detail}") from exc


def signing_bytes(command: Command) -> bytes:
    """The bytes a command's signature covers: everything but the signature, canonically."""
    document = command.model_dump(mode="json", by_alias=True, exclude={"signature"})
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_command(command: Command, key: Ed25519PrivateKey) -> Command:
    """The same command with its `signature` set (base64 Ed25519)."""
    signature = base64.b64encode(key.sign(signing_bytes(command))).decode("ascii")
    return command.model_copy(update={"signature": signature})


def signature_error(command: Command, key: Ed25519PublicKey) -> str | None:
    """Why `command` is not signed by `key`'s owner, or None when it is."""
    if command.signature is None:
        return "command is not signed; this station accepts only signed commands"
    try:
        signature = base64.b64decode(command.signature, validate=True)
    except (binascii.Error, ValueError):
        return "command signature is not valid base64"
    try:
        key.verify(signature, signing_bytes(command))
    except InvalidSignature:
        return "command signature does not match the command under the station's command key"
    return None
