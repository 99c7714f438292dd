"""Bundle checks: every tampering is refused, by name, before onnxruntime sees the file."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
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


def make_bundle(
    folder: Path,
    key: Ed25519PrivateKey,
    model: onnx.ModelProto | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write the model and `files` (relative paths), then sign: the manifest lists the files at
    the top of the folder."""
    folder.mkdir(parents=True)
    (folder / a.MODEL_FILE).write_bytes((model or tiny_model()).SerializeToString())
    for relative, data in (files or {}).items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
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


def test_a_signed_manifest_that_names_a_key_twice_is_refused(
    bundle: Path, key: Ed25519PrivateKey
) -> None:
    """Signed as it is, but read as version 1.2.3 by a tool that keeps the first of two equal
    keys and as 9.9.9 by one that keeps the last: neither reading is the signer's for sure."""
    text = (bundle / a.MANIFEST_FILE).read_text()
    doubled = text.replace('"version": "1.2.3"', '"version": "1.2.3", "version": "9.9.9"', 1)
    assert doubled != text
    (bundle / a.MANIFEST_FILE).write_text(doubled)
    (bundle / a.SIGNATURE_FILE).write_text(a.sign_manifest(doubled.encode(), key))
    with pytest.raises(a.BundleError) as caught:
        a.verify_bundle(bundle, key.public_key())
    assert caught.value.check == "manifest-schema"
    assert "the key 'version' appears twice in one object" in str(caught.value)


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
        # A label travels in every Decision and Verdict: 1 to 64 characters, as the contract.
        ({"labels": ("ok", "d" * 65), "defect_label": "d" * 65}, "at most 64"),
        ({"labels": ("", "defect")}, "at least 1"),
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


def test_a_private_key_others_can_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private, public = tmp_path / "site.key", tmp_path / "site.pub"
    a.generate_keypair(private, public)
    with caplog.at_level(logging.WARNING, logger="linesight.artifacts"):
        a.load_private_key(private)
        assert caplog.records == []  # 0600, as keygen writes it
        private.chmod(0o644)
        a.load_private_key(private)
    assert [r.getMessage() for r in caplog.records] == [
        f"private key {private} is readable by others (mode 644); chmod 600 it"]


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


# --- tensor data outside model.onnx: every tensor, only listed files ---------------------

PROBABILITIES = np.array([0.25, 0.75], dtype=np.float32).tobytes()
FORGED = np.array([1.0, 0.0], dtype=np.float32).tobytes()  # "ok", with certainty


def external_tensor(location: str) -> onnx.TensorProto:
    """A [2] float tensor named W whose bytes live in `location`."""
    tensor = numpy_helper.from_array(np.frombuffer(PROBABILITIES, dtype=np.float32), "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for field, value in (("location", location), ("offset", "0"), ("length", "8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = field, value
    return tensor


def sparse_external(location: str) -> onnx.SparseTensorProto:
    indices = numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "W_indices")
    return helper.make_sparse_tensor(external_tensor(location), indices, [2])


def probabilities_model(
    nodes: Sequence[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto] = (),
    sparse_initializers: Sequence[onnx.SparseTensorProto] = (),
) -> onnx.ModelProto:
    """`nodes` compute p [2]; the model answers [1, 2] probabilities for any image."""
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [*nodes, helper.make_node("Unsqueeze", ["p", "axes"], ["probabilities"])],
        "external",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 2])],
        initializer=[axes, *initializers],
        sparse_initializer=list(sparse_initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_model(
    then_nodes: Sequence[onnx.NodeProto], then_initializers: Sequence[onnx.TensorProto]
) -> onnx.ModelProto:
    """p comes from an If whose then-branch (always taken) is a sub-graph of its own."""
    branch_out = [helper.make_tensor_value_info("p_branch", TensorProto.FLOAT, [2])]
    then_branch = helper.make_graph(
        list(then_nodes), "then", [], branch_out, initializer=list(then_initializers)
    )
    half = numpy_helper.from_array(np.array([0.5, 0.5], dtype=np.float32))
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["p_branch"], value=half)], "else", [], branch_out
    )
    condition = numpy_helper.from_array(np.array(True), "condition")
    return probabilities_model(
        [helper.make_node("If", ["condition"], ["p"], then_branch=then_branch,
                          else_branch=else_branch)],
        initializers=[condition],
    )


def model_reading(place: str, location: str) -> onnx.ModelProto:
    """A model whose tensor W, kept in `location`, sits at `place` in the graph."""
    if place == "sub-graph initializer":
        return if_model([helper.make_node("Identity", ["W"], ["p_branch"])],
                        [external_tensor(location)])
    if place == "sub-graph Constant node":
        return if_model(
            [helper.make_node("Constant", [], ["p_branch"], value=external_tensor(location))], []
        )
    if place == "sparse initializer":
        return probabilities_model([helper.make_node("Identity", ["W"], ["p"])],
                                   sparse_initializers=[sparse_external(location)])
    assert place == "sparse Constant node"
    return probabilities_model(
        [helper.make_node("Constant", [], ["p"], sparse_value=sparse_external(location))]
    )


def refusal(bundle: Path, key: Ed25519PrivateKey) -> a.BundleError:
    with pytest.raises(a.BundleError) as caught:
        a.verify_bundle(bundle, key.public_key())
    return caught.value


@pytest.mark.parametrize(
    "place",
    ["sub-graph initializer", "sub-graph Constant node", "sparse initializer",
     "sparse Constant node"],
)
def test_tensor_data_anywhere_in_the_model_must_be_in_a_listed_file(
    tmp_path: Path, key: Ed25519PrivateKey, place: str
) -> None:
    bundle = make_bundle(tmp_path / "b", key, model_reading(place, "weights.bin"),
                         files={"weights.bin": PROBABILITIES})
    assert "weights.bin" in a.verify_bundle(bundle, key.public_key()).files
    # the same bundle, signed with a manifest that does not list (so never checks) weights.bin
    manifest = a.parse_manifest((bundle / a.MANIFEST_FILE).read_bytes())
    files = {name: entry for name, entry in manifest.files.items() if name != "weights.bin"}
    a.write_signed_manifest(bundle, manifest.model_copy(update={"files": files}), key)
    (bundle / "weights.bin").write_bytes(FORGED)
    error = refusal(bundle, key)
    assert error.check == "external-data" and "'weights.bin'" in error.detail


def test_a_sub_graph_reading_an_unchecked_file_in_a_sub_folder_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    model = model_reading("sub-graph initializer", "sub/w.bin")
    bundle = make_bundle(tmp_path / "a", key, model, files={"sub/w.bin": PROBABILITIES})
    (bundle / "sub" / "w.bin").write_bytes(FORGED)  # after signing
    error = refusal(bundle, key)
    assert error.check == "external-data" and "'sub/w.bin'" in error.detail
    assert "not a file the manifest lists" in str(error)


@pytest.mark.parametrize("location", ["sub/weights.bin", "./sub/weights.bin", "sub/../weights.bin"])
def test_a_listed_file_of_the_same_name_does_not_vouch_for_another_path(
    tmp_path: Path, key: Ed25519PrivateKey, location: str
) -> None:
    """The manifest lists a decoy weights.bin; the model reads a file that is never checked."""
    model = probabilities_model([helper.make_node("Identity", ["W"], ["p"])],
                                    initializers=[external_tensor(location)])
    bundle = make_bundle(tmp_path / "b", key, model,
                         files={"weights.bin": PROBABILITIES, "sub/weights.bin": PROBABILITIES})
    assert "weights.bin" in a.parse_manifest((bundle / a.MANIFEST_FILE).read_bytes()).files
    (bundle / "sub" / "weights.bin").write_bytes(FORGED)  # after signing
    error = refusal(bundle, key)
    assert error.check == "external-data" and repr(location) in error.detail
