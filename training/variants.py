"""Optimised variants of an exported FP32 model: static INT8 (CPU), FP16 (CUDA), ORT offline-optimised graph.

Every variant keeps the serving contract (uint8 `images` in, float32 `probabilities` out), carries the FP32
model's metadata with `variant` and `test_accuracy` replaced, and must pass the checks below against the FP32
model on the 10k MNIST test set before it is returned; when one fails, VariantError is raised and nothing is
written. Measurements: benchmarks/variants.md.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from serving.contract import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME
from serving.mnist import MNIST
from serving.runtime import CPU, resolve_device

VARIANTS = ("int8", "fp16", "fp32-ort-optimized")

# Calibration sample: CALIBRATION_SIZE training images drawn without replacement with
# numpy.random.default_rng(CALIBRATION_SEED); never test images, which judge the result.
CALIBRATION_SIZE = 1000
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 100

MAX_ACCURACY_DROP = 0.001  # 0.1 points on the 10k test set, for every variant

# "basic" rewrites only with standard ONNX ops (constant folding, Conv+Add fusion...), so the file runs on any
# EP. "extended" adds com.microsoft fused ops some EPs lack, "all" adds CPU-specific NCHWc layouts.
ORT_OFFLINE_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


class VariantError(Exception):
    """A one-line message naming the failed check."""


@dataclass(frozen=True)
class ParityBound:
    """How far a variant may stray from FP32 on the test set: identical-argmax rate and max |Δprobability|."""

    min_argmax_agreement: float
    max_prob_diff: float


PARITY = {
    # 8-bit activations flip ambiguous digits: measured agreement 0.999 / max |Δp| 0.06 on a 98% CNN, 0.993 on
    # a barely trained 87% one. These bounds catch a broken calibration; the accuracy bound guards the rest.
    "int8": ParityBound(min_argmax_agreement=0.99, max_prob_diff=0.3),
    # Half precision keeps ~3 significant digits through the whole graph.
    "fp16": ParityBound(min_argmax_agreement=0.999, max_prob_diff=0.02),
    # Same float maths, only fused or reordered: differences are float rounding.
    "fp32-ort-optimized": ParityBound(min_argmax_agreement=0.9999, max_prob_diff=1e-4),
}


@dataclass(frozen=True)
class VariantReport:
    kind: str
    fp32_accuracy: float
    accuracy: float
    argmax_agreement: float
    max_prob_diff: float


def calibration_images(train_images: np.ndarray) -> np.ndarray:
    """The documented, seeded calibration sample as uint8 [CALIBRATION_SIZE,1,28,28]."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    index = rng.choice(len(train_images), size=min(CALIBRATION_SIZE, len(train_images)), replace=False)
    return train_images[np.sort(index), None]


class _Calibration(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter(
            images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Static INT8, QDQ format, per-channel weights, calibrated (min/max) on uint8 images [N,1,28,28].

    The uint8 input and the in-graph normalisation need no special care: Cast/Div/Sub are not quantizable ops,
    so the first QuantizeLinear sits on the normalised float tensor that feeds the first Conv.
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(fp32, prepared)  # shape inference + basic fusions, as the quantizer expects
        model = onnx.load(prepared)
        # Softmax stays float: a quantized output would round every probability to a multiple of 1/255.
        softmax = [node for node in model.graph.node if node.op_type == "Softmax"]
        for i, node in enumerate(softmax):
            node.name = node.name or f"softmax_{i}"
        quantize_static(
            model,
            Path(tmp) / "int8.onnx",
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights: AVX2 CPUs without VNNI saturate u8*s8 pair sums; measured on this machine,
            # argmax agreement went 0.995 -> 0.999 and max |Δp| 0.43 -> 0.06. Harmless on VNNI CPUs.
            reduce_range=True,
            nodes_to_exclude=[node.name for node in softmax],
        )
        return onnx.load(Path(tmp) / "int8.onnx")


def to_fp16(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and activations for CUDA; keep_io_types keeps uint8 in / float32 out."""
    return convert_float_to_float16(fp32, keep_io_types=True)


def ort_optimized(
    fp32: onnx.ModelProto, level: ort.GraphOptimizationLevel = ORT_OFFLINE_LEVEL
) -> onnx.ModelProto:
    """The graph after ORT's optimizations at `level`, saved so the server need not redo them at load."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(fp32.SerializeToString(), options, providers=[CPU])
        return onnx.load(options.optimized_model_filepath)


def predict(model: onnx.ModelProto, images: np.ndarray, provider: str = CPU, batch: int = 1000) -> np.ndarray:
    """Probabilities for uint8 images [N,28,28] or [N,1,28,28]."""
    images = images.reshape(-1, *IMAGE_SHAPE)
    session = ort.InferenceSession(model.SerializeToString(), providers=[provider])
    runs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch]})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(runs)


def check_variant(kind: str, fp32: onnx.ModelProto, variant: onnx.ModelProto, mnist: MNIST) -> VariantReport:
    """Accuracy within MAX_ACCURACY_DROP of FP32 and parity within PARITY[kind]; VariantError otherwise."""
    # FP16 is for CUDA: judge it there when a GPU is present (CPU runs it through inserted casts).
    provider = resolve_device("auto") if kind == "fp16" else CPU
    want, got = predict(fp32, mnist.test_images), predict(variant, mnist.test_images, provider)
    report = VariantReport(
        kind=kind,
        fp32_accuracy=float((want.argmax(1) == mnist.test_labels).mean()),
        accuracy=float((got.argmax(1) == mnist.test_labels).mean()),
        argmax_agreement=float((got.argmax(1) == want.argmax(1)).mean()),
        max_prob_diff=float(np.abs(got - want).max()),
    )
    bound = PARITY[kind]
    # Compare counts of correct digits, not float rates: a drop of exactly 0.1 points is allowed.
    lost = round((report.fp32_accuracy - report.accuracy) * len(mnist.test_labels))
    if lost > round(MAX_ACCURACY_DROP * len(mnist.test_labels)):
        allowed = f"at most {100 * MAX_ACCURACY_DROP:.1f} points allowed"
        raise VariantError(
            f"{kind} variant loses accuracy: {100 * report.accuracy:.2f}% vs FP32 "
            f"{100 * report.fp32_accuracy:.2f}% on the test set, {allowed}; nothing was written"
        )
    if report.argmax_agreement < bound.min_argmax_agreement or report.max_prob_diff > bound.max_prob_diff:
        raise VariantError(
            f"{kind} variant strays from FP32: argmax agreement {report.argmax_agreement:.4f} "
            f"(min {bound.min_argmax_agreement}), max |Δp| {report.max_prob_diff:.3g} "
            f"(max {bound.max_prob_diff}); nothing was written"
        )
    return report


def build_variant(kind: str, fp32_model_path: Path, mnist: MNIST) -> tuple[onnx.ModelProto, VariantReport]:
    """Build, check and label one variant of the FP32 model at fp32_model_path."""
    fp32 = onnx.load(fp32_model_path)
    if kind == "int8":
        variant = quantize_int8(fp32, calibration_images(mnist.train_images))
    elif kind == "fp16":
        variant = to_fp16(fp32)
    elif kind == "fp32-ort-optimized":
        variant = ort_optimized(fp32)
    else:
        raise ValueError(f"unknown variant {kind!r}; choose from {', '.join(VARIANTS)}")
    report = check_variant(kind, fp32, variant, mnist)
    metadata = {p.key: p.value for p in fp32.metadata_props}
    metadata.update(variant=kind, test_accuracy=f"{report.accuracy:.4f}")
    if kind == "int8":
        metadata["calibration"] = (
            f"{CALIBRATION_SIZE} MNIST training images, numpy default_rng({CALIBRATION_SEED})"
        )
    del variant.metadata_props[:]
    for key, value in metadata.items():
        entry = variant.metadata_props.add()
        entry.key, entry.value = key, value
    return variant, report
