"""Bundle checks: every tampering is refused, by name, before onnxruntime sees the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from linesight import artifacts as a
from linesight.cli import main

INPUT = a.InputSpec(name="image", layout="NCHW", height=8, width=8, colour="rgb", dtype="float32")
OUTPUT = a.OutputSpec(name="probabilities")


def tiny_model(external_location: str | None = None) -> onnx.ModelProto:
    """image [N,3,8,8] -> mean over pixels -> [N,3] @ W -> softmax -> [N,2]."""
    weights = numpy_helper.from_array(np.ones((3, 2), dtype=np.float32), name="W")
    if external_location is not None:
        weights.ClearField("raw_data")
        weights.ClearField("float_data")
        weights.data_location = TensorProto.EXTERNAL
        entry = weights.external_data.add()
        entry.key, entry.value = "location", external_location
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=[weights, numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def make_bundle(folder: Path, key: Ed25519PrivateKey, model: onnx.ModelProto | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / a.MODEL_FILE).write_bytes((model or tiny_model()).SerializeToString())
    a.build_bundle(
        folder,
        name="tiny",
        version="1.2.3",
        description="test",
        input=INPUT,
        output=OUTPUT,
        labels=("ok", "defect"),
        defect_label="defect",
        thresholds={"ok": 0.8, "defect": 0.6},
        metrics=None,
        private_key=key,
    )
    return folder


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def bundle(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    return make_bundle(tmp_path / "tiny" / "1.2.3", key)


def check_of(bundle: Path, key: Ed25519PrivateKey | None) -> str:
    with pytest.raises(a.BundleError) as caught:
        a.verify_bundle(bundle, key.public_key() if key else None)
    return caught.value.check


def test_a_signed_bundle_verifies(bundle: Path, key: Ed25519PrivateKey) -> None:
    manifest = a.verify_bundle(bundle, key.public_key())
    assert manifest.name == "tiny" and manifest.version_tuple == (1, 2, 3)
    assert manifest.files[a.MODEL_FILE].size == (bundle / a.MODEL_FILE).stat().st_size
    assert manifest.ok_label == "ok"


def test_any_changed_model_byte_is_refused(bundle: Path, key: Ed25519PrivateKey) -> None:
    data = bytearray((bundle / a.MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / a.MODEL_FILE).write_bytes(bytes(data))
    assert check_of(bundle, key) == "digest"
    assert check_of(bundle, None) == "digest"


def test_a_changed_model_size_is_refused(bundle: Path, key: Ed25519PrivateKey) -> None:
    with (bundle / a.MODEL_FILE).open("ab") as stream:
        stream.write(b"\0")
    assert check_of(bundle, key) == "size"


def test_any_changed_manifest_byte_breaks_the_signature(
    bundle: Path, key: Ed25519PrivateKey
) -> None:
    text = (bundle / a.MANIFEST_FILE).read_text()
    (bundle / a.MANIFEST_FILE).write_text(text.replace('"1.2.3"', '"1.2.4"'))
    assert check_of(bundle, key) == "signature"


def test_another_key_is_refused(bundle: Path) -> None:
    assert check_of(bundle, Ed25519PrivateKey.generate()) == "signature"


def test_a_missing_signature_is_refused(bundle: Path, key: Ed25519PrivateKey) -> None:
    (bundle / a.SIGNATURE_FILE).unlink()
    assert check_of(bundle, key) == "signature"


def test_a_bad_manifest_names_the_field(bundle: Path, key: Ed25519PrivateKey) -> None:
    document = json.loads((bundle / a.MANIFEST_FILE).read_text())
    document["input"]["layout"] = "NCWH"
    (bundle / a.MANIFEST_FILE).write_text(json.dumps(document))
    (bundle / a.SIGNATURE_FILE).write_text(
        a.sign_manifest((bundle / a.MANIFEST_FILE).read_bytes(), key)
    )
    with pytest.raises(a.BundleError) as caught:
        a.verify_bundle(bundle, key.public_key())
    assert caught.value.check == "manifest-schema"
    assert "input.layout" in caught.value.detail


def test_a_missing_model_is_refused(bundle: Path, key: Ed25519PrivateKey) -> None:
    (bundle / a.MODEL_FILE).unlink()
    assert check_of(bundle, key) == "files"


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "weights.bin"])
def test_external_data_is_refused(tmp_path: Path, key: Ed25519PrivateKey, location: str) -> None:
    bundle = make_bundle(tmp_path / "ext", key, tiny_model(external_location=location))
    assert check_of(bundle, key) == "external-data"


def test_manifest_rules() -> None:
    with pytest.raises(ValueError, match="semantic"):
        a.version_tuple("2.0")
    base = {
        "name": "m",
        "version": "1.0.0",
        "input": INPUT,
        "output": OUTPUT,
        "labels": ("ok", "defect"),
        "defect_label": "defect",
        "thresholds": {},
        "files": {a.MODEL_FILE: a.FileEntry(sha256="0" * 64, size=1)},
        "created": "2026-01-01T00:00:00Z",
    }
    a.Manifest.model_validate(base)
    for change, message in [
        ({"defect_label": "crack"}, "defect_label"),
        ({"thresholds": {"scratch": 0.5}}, "unknown labels"),
        ({"files": {"../x": a.FileEntry(sha256="0" * 64, size=1)}}, "model.onnx"),
        ({"version": "v1"}, "semantic"),
    ]:
        with pytest.raises(ValueError, match=message):
            a.Manifest.model_validate({**base, **change})
    with pytest.raises(ValueError, match="mean"):
        a.InputSpec(
            name="x",
            layout="NHWC",
            height=1,
            width=1,
            colour="rgb",
            dtype="float32",
            mean=(0.1, 0.2),
        )


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    private, public = tmp_path / "k.key", tmp_path / "k.pub"
    a.generate_keypair(private, public)
    assert private.stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        a.generate_keypair(private, public)
    a.load_private_key(private)
    with pytest.raises(a.BundleError, match="not an Ed25519 private key|cannot read"):
        a.load_private_key(public)


def test_cli_verify_and_sign(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = tmp_path / "site.key", tmp_path / "site.pub"
    assert main(["models", "keygen", "--private", str(private), "--public", str(public)]) == 0
    assert main(["models", "verify", str(bundle), "--key", str(public)]) == 1
    assert "signature" in capsys.readouterr().err
    assert main(["models", "sign", str(bundle), "--key", str(private)]) == 0
    assert main(["models", "verify", str(bundle), "--key", str(public)]) == 0
    assert "signature ok" in capsys.readouterr().out
    (bundle / a.MODEL_FILE).write_bytes(b"x" + (bundle / a.MODEL_FILE).read_bytes()[1:])
    assert main(["models", "verify", str(bundle), "--key", str(public)]) == 1
    assert "digest" in capsys.readouterr().err
    assert main(["models", "verify", str(tmp_path / "nowhere"), "--key", str(public)]) == 1
