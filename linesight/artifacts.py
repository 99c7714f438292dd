"""Model bundles: manifest schema, file digests, Ed25519 signature, and verification.

A bundle is a folder holding `model.onnx`, `manifest.json` and `manifest.sig`. The signature
covers the exact bytes of `manifest.json`; the manifest pins the size and sha256 of every other
file. `verify_bundle` checks all of it before onnxruntime is ever allowed to open the model,
including that any tensor data kept outside `model.onnx` comes from one of those files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from linesight import json_keys
from linesight.protocol import Label

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class BundleError(Exception):
    """A bundle failed one named check; `check` says which, `detail` says why."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"bundle check '{check}' failed: {detail}")
        self.check = check
        self.detail = detail


class StrictModel(BaseModel):
    # Every number finite: an infinite std or scale makes every frame the same tensor, a NaN
    # makes every part a fail-safe hold; JSON itself has no such numbers.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InputSpec(StrictModel):
    """How a camera frame becomes the model's input tensor."""

    name: str = Field(min_length=1, description="ONNX input tensor name")
    layout: Literal["NCHW", "NHWC"]
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    colour: Literal["rgb", "bgr", "gray"]
    dtype: Literal["float32", "uint8"]
    scale: float = Field(default=1 / 255, gt=0, description="multiplied before mean/std (float32)")
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @property
    def channels(self) -> int:
        return 1 if self.colour == "gray" else 3

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        for field in ("mean", "std"):
            values = getattr(self, field)
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"{field} needs 1 or {self.channels} values for colour {self.colour!r}, "
                    f"got {len(values)}"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class OutputSpec(StrictModel):
    """The model's output: one row per image, one probability per label, rows sum to 1."""

    name: str = Field(min_length=1)
    kind: Literal["probabilities"] = "probabilities"


class FileEntry(StrictModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class EvalMetrics(StrictModel):
    """Measured on a held-out synthetic set that the seed and size reproduce."""

    accuracy: float = Field(ge=0, le=1)
    defect_recall: float = Field(ge=0, le=1)
    false_reject_rate: float = Field(ge=0, le=1)
    per_class_recall: dict[str, float]
    seed: int
    size: int = Field(gt=0)
    defect_rate: float = Field(ge=0, le=1)


class Manifest(StrictModel):
    format: Literal[1] = 1
    name: str
    version: str
    task: Literal["binary_classification"] = "binary_classification"
    description: str = ""
    input: InputSpec
    output: OutputSpec
    # Each label travels in every Decision and Verdict, whose contract allows 1 to 64 characters
    # (linesight.protocol.Label): a bundle with another is refused here, not part by part.
    labels: tuple[Label, ...] = Field(min_length=2, max_length=2)
    defect_label: Label
    thresholds: dict[str, float]
    files: dict[str, FileEntry]
    created: datetime
    metrics: EvalMetrics | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("name must be lower-case letters, digits, '.', '_' or '-'")
        return value

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError(f"version {value!r} is not semantic (MAJOR.MINOR.PATCH)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        if self.defect_label not in self.labels:
            raise ValueError(f"defect_label {self.defect_label!r} is not one of {self.labels}")
        unknown = set(self.thresholds) - set(self.labels)
        if unknown:
            raise ValueError(f"thresholds name unknown labels: {sorted(unknown)}")
        if any(not 0 <= t <= 1 for t in self.thresholds.values()):
            raise ValueError("thresholds must lie in [0, 1]")
        if MODEL_FILE not in self.files:
            raise ValueError(f"files must list {MODEL_FILE}")
        for file_name in self.files:
            if not is_plain_file_name(file_name):
                raise ValueError(
                    f"file {file_name!r} must be a plain name inside the bundle (1 to 255 "
                    "bytes, no slash, no control character, not starting with '.')"
                )
        return self

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        return version_tuple(self.version)

    @property
    def ok_label(self) -> str:
        return next(label for label in self.labels if label != self.defect_label)


def is_plain_file_name(name: str) -> bool:
    """A name every station's file system takes for a file inside the bundle folder."""
    return (
        0 < len(name.encode("utf-8", "surrogatepass")) <= 255
        and not any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name)
        and not name.startswith(".")
    )


def version_tuple(version: str) -> tuple[int, int, int]:
    match = SEMVER.match(version)
    if not match:
        raise ValueError(f"version {version!r} is not semantic (MAJOR.MINOR.PATCH)")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


# --- keys -------------------------------------------------------------------------------


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair as PEM; the private key file is readable by its owner only.

    Both files are created new (never over an existing name, nor through a link); when either
    cannot be made, neither is left behind."""
    if private_path.absolute() == public_path.absolute():
        raise ValueError(f"{private_path}: the private and the public key need two files, "
                         "not the same file")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    try:
        for path, data, mode in ((private_path, private_pem, 0o600),
                                 (public_path, public_pem, 0o644)):
            # O_EXCL: a name taken meanwhile (or a dangling link) is refused, not written through.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError as exc:
                raise FileExistsError(f"{path} exists; refusing to overwrite a key") from exc
            created.append(path)
            with os.fdopen(fd, "wb") as stream:
                os.fchmod(stream.fileno(), mode)  # whatever the umask
                stream.write(data)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError("key", f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError("key", f"{path} is not an Ed25519 private key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Whoever reads it can sign bundles (or commands) as this site.
        log.warning("private key %s is readable by others (mode %o); chmod 600 it", path, mode)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError("key", f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("key", f"{path} is not an Ed25519 public key")
    return key


# --- digests and signatures ------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_bytes(manifest: Manifest) -> bytes:
    """Canonical serialisation: what is signed is exactly what is written."""
    document = manifest.model_dump(mode="json")
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def sign_manifest(data: bytes, key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(data)).decode() + "\n"


def check_signature(data: bytes, signature_text: str, key: Ed25519PublicKey) -> None:
    try:
        signature = base64.b64decode(signature_text.strip(), validate=True)
    except ValueError as exc:
        raise BundleError("signature", "manifest.sig is not valid base64") from exc
    try:
        key.verify(signature, data)
    except InvalidSignature as exc:
        raise BundleError(
            "signature", "manifest.sig does not match the manifest under the given public key"
        ) from exc


def parse_manifest(data: bytes) -> Manifest:
    try:
        json_keys.loads(data)
    except json_keys.DuplicateKeyError as exc:
        # Signed bytes that another reader (which keeps the first of two keys) would take
        # for another manifest than this one (which would keep the last).
        raise BundleError("manifest-schema", str(exc)) from exc
    except (ValueError, RecursionError):
        pass  # not JSON: pydantic says where, below
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise BundleError("manifest-schema", problems) from exc


def _tensors(message: Any) -> Iterator[onnx.TensorProto]:
    """Every TensorProto anywhere inside an ONNX protobuf message: initializers and sparse
    initializers of the main graph and of every sub-graph (If, Loop and Scan bodies),
    tensor-valued node attributes, function bodies alike."""
    import onnx

    if isinstance(message, onnx.TensorProto):
        yield message
        return
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:  # a message, or a list of them when repeated
            for item in value if isinstance(value, Sequence) else [value]:
                yield from _tensors(item)


def external_data_references(model_path: Path) -> list[str]:
    """Locations of the tensor data the ONNX file keeps outside itself, from every tensor of the
    model however deeply nested (empty for a self-contained file)."""
    import onnx  # imported here: only verification needs the graph parser

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends without a common base
        raise BundleError(
            "onnx-parse", f"{model_path.name} is not a readable ONNX file: {exc}"
        ) from exc
    return [
        next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        for tensor in _tensors(model)
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0
    ]


def _check_external_data(bundle_dir: Path, manifest: Manifest) -> None:
    """Tensor data may live outside model.onnx only in a file at the top of the bundle that the
    manifest lists, so that its bytes were digest-checked like the model's. A location is read
    relative to the bundle: `weights.bin` (or `./weights.bin`) is accepted when the manifest
    lists `weights.bin`; a sub-folder, `..`, an absolute path or an unlisted name is refused."""
    for location in external_data_references(bundle_dir / MODEL_FILE):
        path = PurePosixPath(location.replace("\\", "/"))
        if not path.parts or path.is_absolute() or ".." in path.parts:
            raise BundleError(
                "external-data", f"{MODEL_FILE} reads tensor data outside its bundle: {location!r}"
            )
        if len(path.parts) != 1 or path.name not in manifest.files:
            raise BundleError(
                "external-data",
                f"{MODEL_FILE} reads tensor data from {location!r}, which is not a file the "
                "manifest lists (only those, at the top of the bundle, are digest-checked)",
            )


def verify_bundle(bundle_dir: Path, public_key: Ed25519PublicKey | None) -> Manifest:
    """Check signature (when a key is given), schema, every file's size and digest, and that the
    ONNX file keeps no data outside the bundle. Raises BundleError naming the failed check."""
    if not bundle_dir.is_dir():
        raise BundleError("layout", f"{bundle_dir} is not a folder")
    manifest_path = bundle_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError("layout", f"{bundle_dir} has no {MANIFEST_FILE}")
    data = manifest_path.read_bytes()
    if public_key is not None:
        signature_path = bundle_dir / SIGNATURE_FILE
        if not signature_path.is_file():
            raise BundleError("signature", f"{bundle_dir} has no {SIGNATURE_FILE}")
        # Not text at all (the raw signature bytes, a damaged file): refused as bad base64.
        signature_text = signature_path.read_bytes().decode("ascii", errors="replace")
        check_signature(data, signature_text, public_key)
    manifest = parse_manifest(data)
    for file_name, entry in sorted(manifest.files.items()):
        path = bundle_dir / file_name
        if path.is_symlink() or not path.is_file():
            raise BundleError("files", f"{file_name} is missing or not a regular file")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(
                "size", f"{file_name} is {size} bytes, the manifest says {entry.size}"
            )
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise BundleError(
                "digest", f"{file_name} sha256 {digest[:12]}… differs from {entry.sha256[:12]}…"
            )
    _check_external_data(bundle_dir, manifest)
    return manifest


def build_bundle(
    bundle_dir: Path,
    *,
    name: str,
    version: str,
    description: str,
    input: InputSpec,
    output: OutputSpec,
    labels: Sequence[str],
    defect_label: str,
    thresholds: Mapping[str, float],
    metrics: EvalMetrics | None,
    private_key: Ed25519PrivateKey,
    created: datetime | None = None,
) -> Manifest:
    """Write manifest.json and manifest.sig for the files already in bundle_dir."""
    files = {
        path.name: FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
        for path in sorted(bundle_dir.iterdir())
        if path.is_file() and path.name not in (MANIFEST_FILE, SIGNATURE_FILE)
    }
    manifest = Manifest(
        name=name,
        version=version,
        description=description,
        input=input,
        output=output,
        labels=tuple(labels),
        defect_label=defect_label,
        thresholds=dict(thresholds),
        files=files,
        created=created or datetime.now(UTC).replace(microsecond=0),
        metrics=metrics,
    )
    write_signed_manifest(bundle_dir, manifest, private_key)
    return manifest


def write_signed_manifest(bundle_dir: Path, manifest: Manifest, key: Ed25519PrivateKey) -> None:
    data = manifest_bytes(manifest)
    (bundle_dir / MANIFEST_FILE).write_bytes(data)
    (bundle_dir / SIGNATURE_FILE).write_text(sign_manifest(data, key))


def resign_bundle(bundle_dir: Path, key: Ed25519PrivateKey) -> Manifest:
    """Refresh digests of the bundle's files and sign again (after a model file was replaced)."""
    manifest = parse_manifest((bundle_dir / MANIFEST_FILE).read_bytes())
    files = {
        file_name: FileEntry(
            sha256=sha256_file(bundle_dir / file_name),
            size=(bundle_dir / file_name).stat().st_size,
        )
        for file_name in manifest.files
    }
    updated = manifest.model_copy(update={"files": files})
    write_signed_manifest(bundle_dir, updated, key)
    return updated


def find_bundles(root: Path) -> list[Path]:
    """Every folder below root holding a manifest, sorted by path."""
    return sorted(path.parent for path in root.rglob(MANIFEST_FILE))
