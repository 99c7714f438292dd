"""Rebuild the shipped part-classifier bundles from the synthetic part generator.

    .venv/bin/python -m models.recipe.build --out models      # from the repository root

Everything is seeded: the training parts, the held-out parts, the weight initialisation and the
batch order. Each bundle is trained, exported to a single-file ONNX graph, measured on the
held-out parts with ``edge_agent.evaluate`` and signed with ``linesight.artifacts.build_bundle``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from edge_agent.evaluate import evaluate_bundle
from edge_agent.preprocess import preprocess
from edge_agent.synthetic import PartGenerator, SyntheticPart
from linesight.artifacts import (
    MODEL_FILE,
    EvalMetrics,
    InputSpec,
    Manifest,
    OutputSpec,
    build_bundle,
    load_private_key,
)

log = logging.getLogger("models.recipe")

LABELS = ("ok", "defect")
DEFECT_LABEL = "defect"
# Pass a part only when the model is sure it is good (a missed defect ships to a customer);
# reject on a lower bar (a false reject costs one part). Between the two: operator review.
THRESHOLDS = {"ok": 0.8, "defect": 0.6}
INPUT_NAME = "image"
OUTPUT = OutputSpec(name="probabilities", kind="probabilities")

TRAIN_SEED = 1000
TRAIN_SIZE = 12_000
# More defects than on the line, so each of the five classes has enough examples to learn from.
TRAIN_DEFECT_RATE = 0.45
CALIBRATION_SEED = 2000
CALIBRATION_SIZE = 1000
HELD_OUT_SEED = 9001
HELD_OUT_SIZE = 2000
HELD_OUT_DEFECT_RATE = 0.3
OPSET = 17
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_KEY = REPO_ROOT / "models" / "keys" / "demo.key"

RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = 0.45
GRAY_STD = 0.25


@dataclass(frozen=True, slots=True)
class BundleRecipe:
    """One shipped bundle: its identity, input convention, network and training schedule."""

    name: str
    version: str
    description: str
    input: InputSpec
    make_net: Callable[[], nn.Module]
    epochs: int
    lr: float
    seed: int
    # A defect class labelled "ok" during training: builds a deliberately regressed model.
    blind_class: str | None = None
    # Floor on recall: shift the defect logit, if needed, until this share of calibration
    # defects is flagged; a weak model should over-reject rather than miss.
    target_recall: float | None = None


# --- networks ----------------------------------------------------------------------------


def conv_block(c_in: int, c_out: int, *, norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    return layers


class SmallNet(nn.Module):
    """Four batch-normalised stages; global max pooling keeps a small defect's evidence."""

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(channels, width, norm=True),
            *conv_block(width, width, norm=True),
            nn.MaxPool2d(2),
            *conv_block(width, 2 * width, norm=True),
            nn.MaxPool2d(2),
            *conv_block(2 * width, 3 * width, norm=True),
            nn.MaxPool2d(2),
            *conv_block(3 * width, 4 * width, norm=True),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


class Uint8Nhwc(nn.Module):
    """Takes raw uint8 NHWC pixels and normalises inside the graph (for the gray bundle)."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.permute(0, 3, 1, 2).float() / 255.0
        logits: torch.Tensor = self.net((pixels - self.mean) / self.std)
        return logits


class WithSoftmax(nn.Module):
    """The exported graph: logits -> probabilities, as the manifest's output kind promises."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


# --- the shipped bundles -------------------------------------------------------------------


def _rgb_spec(size: int) -> InputSpec:
    return InputSpec(
        name=INPUT_NAME, layout="NCHW", height=size, width=size, colour="rgb",
        dtype="float32", scale=1 / 255, mean=RGB_MEAN, std=RGB_STD,
    )


GRAY_SPEC = InputSpec(
    name=INPUT_NAME, layout="NHWC", height=96, width=96, colour="gray", dtype="uint8",
    scale=1 / 255, mean=(0.0,), std=(1.0,),
)

RECIPES: tuple[BundleRecipe, ...] = (
    BundleRecipe(
        name="part-classifier", version="1.0.0",
        description="Narrow CNN at 32x32 RGB: catches cracks, missing holes and stains; misses "
        "a quarter of the fine scratches and rejects some good parts.",
        input=_rgb_spec(32), make_net=lambda: SmallNet(3, width=8), epochs=5, lr=3e-3, seed=1,
        target_recall=0.9,
    ),
    BundleRecipe(
        name="part-classifier", version="2.0.0",
        description="Small batch-normalised CNN at 64x64 RGB: sees fine scratches and pits.",
        input=_rgb_spec(64), make_net=lambda: SmallNet(3, width=16), epochs=4, lr=3e-3, seed=2,
    ),
    BundleRecipe(
        name="part-classifier", version="2.1.0",
        description="Same network as 2.0.0, retrained on data where cracks were labelled ok "
        "(a labelling regression kept as a rollback drill).",
        input=_rgb_spec(64), make_net=lambda: SmallNet(3, width=16), epochs=8, lr=3e-3, seed=2,
        blind_class="crack",
    ),
    BundleRecipe(
        name="part-classifier-gray", version="1.0.0",
        description="Gray 96x96 NHWC uint8 input, normalised inside the graph (monochrome "
        "cameras).",
        input=GRAY_SPEC, make_net=lambda: Uint8Nhwc(SmallNet(1, width=8), GRAY_MEAN, GRAY_STD),
        epochs=3, lr=3e-3, seed=3,
    ),
)


def generate_parts(seed: int, size: int, defect_rate: float) -> list[SyntheticPart]:
    generator = PartGenerator(seed, defect_rate=defect_rate)
    return [generator.part(index) for index in range(size)]


def tensors_for(parts: Sequence[SyntheticPart], spec: InputSpec) -> torch.Tensor:
    """Every part through the same preprocessing the station runs, stacked into one batch."""
    batch = np.concatenate([preprocess(part.image, spec) for part in parts])
    return torch.from_numpy(batch)


def targets_for(parts: Sequence[SyntheticPart], blind_class: str | None) -> torch.Tensor:
    flags = [p.defect is not None and p.defect != blind_class for p in parts]
    return torch.tensor(flags, dtype=torch.long)


def train(
    net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, epochs: int, lr: float,
    seed: int, batch_size: int = 64,
) -> nn.Module:
    order = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(inputs) + batch_size - 1) // batch_size)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for epoch in range(epochs):
        permutation = torch.randperm(len(inputs), generator=order)
        total = 0.0
        for start in range(0, len(inputs), batch_size):
            idx = permutation[start : start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(net(inputs[idx]), targets[idx])
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
        log.info("  epoch %d/%d  loss %.4f", epoch + 1, epochs, total / len(inputs))
    return net.eval()


def defect_margins(net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """logit(defect) - logit(ok) per input: > 0 means the part is flagged."""
    with torch.no_grad():
        logits: torch.Tensor = net.eval()(inputs)
    return logits[:, 1] - logits[:, 0]


def recall_shift(defective_margins: torch.Tensor, target_recall: float) -> float:
    """The smallest non-negative logit shift that flags ``target_recall`` of these defects."""
    cut = torch.quantile(defective_margins, 1.0 - target_recall)
    return max(0.0, 1e-3 - float(cut))


def shift_defect_logit(net: nn.Module, shift: float) -> None:
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.bias[1] += shift


def calibrate(net: nn.Module, spec: InputSpec, target_recall: float) -> float:
    parts = generate_parts(CALIBRATION_SEED, CALIBRATION_SIZE, TRAIN_DEFECT_RATE)
    defective = [p for p in parts if p.is_defective]
    shift = recall_shift(defect_margins(net, tensors_for(defective, spec)), target_recall)
    shift_defect_logit(net, shift)
    return shift


def export_onnx(net: nn.Module, spec: InputSpec, path: Path) -> None:
    """Single-file ONNX, dynamic batch, probabilities out."""
    graph = WithSoftmax(net).eval()
    shape = (
        (1, spec.channels, spec.height, spec.width)
        if spec.layout == "NCHW"
        else (1, spec.height, spec.width, spec.channels)
    )
    dtype = torch.uint8 if spec.dtype == "uint8" else torch.float32
    example = torch.zeros(shape, dtype=dtype)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but needs no onnxscript; its output is plain ONNX.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), str(path), input_names=[spec.name], output_names=[OUTPUT.name],
            dynamic_axes={spec.name: {0: "batch"}, OUTPUT.name: {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )


def sign(
    bundle_dir: Path, recipe: BundleRecipe, metrics: EvalMetrics | None, key: Ed25519PrivateKey
) -> Manifest:
    return build_bundle(
        bundle_dir, name=recipe.name, version=recipe.version, description=recipe.description,
        input=recipe.input, output=OUTPUT, labels=LABELS, defect_label=DEFECT_LABEL,
        thresholds=THRESHOLDS, metrics=metrics, private_key=key,
    )


def build_one(
    recipe: BundleRecipe, train_parts: Sequence[SyntheticPart], out: Path, key_path: Path,
    held_out_size: int,
) -> Manifest:
    started = time.perf_counter()
    log.info("%s %s: training", recipe.name, recipe.version)
    torch.manual_seed(recipe.seed)
    net = recipe.make_net()
    net = train(
        net, tensors_for(train_parts, recipe.input), targets_for(train_parts, recipe.blind_class),
        epochs=recipe.epochs, lr=recipe.lr, seed=recipe.seed,
    )
    if recipe.target_recall is not None:
        shift = calibrate(net, recipe.input, recipe.target_recall)
        log.info("  defect logit shifted by %.3f for recall %.2f", shift, recipe.target_recall)
    bundle_dir = out / recipe.name / recipe.version
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    bundle_dir.mkdir(parents=True)
    export_onnx(net, recipe.input, bundle_dir / MODEL_FILE)
    key = load_private_key(key_path)
    # Sign once without metrics so the evaluator opens a bundle exactly as a station would.
    draft = sign(bundle_dir, recipe, None, key)
    metrics = evaluate_bundle(
        bundle_dir, draft, seed=HELD_OUT_SEED, size=held_out_size,
        defect_rate=HELD_OUT_DEFECT_RATE,
    )
    manifest = sign(bundle_dir, recipe, metrics, key)
    log.info(
        "%s %s: accuracy %.4f  defect recall %.4f  false rejects %.4f  per class %s  (%.0f s)",
        recipe.name, recipe.version, metrics.accuracy, metrics.defect_recall,
        metrics.false_reject_rate,
        {k: round(v, 3) for k, v in metrics.per_class_recall.items()},
        time.perf_counter() - started,
    )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models",
                        help="folder that receives <name>/<version>/ bundles")
    parser.add_argument("--key", type=Path, default=DEFAULT_KEY, help="Ed25519 signing key (PEM)")
    parser.add_argument("--only", action="append", metavar="NAME/VERSION",
                        help="build only these bundles (repeatable)")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    parser.add_argument("--held-out-size", type=int, default=HELD_OUT_SIZE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    recipes = [r for r in RECIPES if not args.only or f"{r.name}/{r.version}" in args.only]
    if not recipes:
        known = [f"{r.name}/{r.version}" for r in RECIPES]
        parser.error(f"--only matched nothing; bundles: {known}")
    started = time.perf_counter()
    train_parts = generate_parts(TRAIN_SEED, args.train_size, TRAIN_DEFECT_RATE)
    log.info("generated %d training parts in %.0f s", len(train_parts),
             time.perf_counter() - started)
    for recipe in recipes:
        build_one(recipe, train_parts, args.out, args.key, args.held_out_size)
    log.info("all bundles built in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
