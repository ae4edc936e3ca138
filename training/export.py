"""ONNX export (uint8 in, normalisation and softmax inside the graph), the parity check, and the atomic
writer of a Triton-layout model repository:
<repo>/<name>/config.pbtxt and <repo>/<name>/<version>/model.onnx."""

import copy
import functools
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from serving.contract import (
    IMAGE_SHAPE,
    INPUT_NAME,
    LABELS,
    MODEL_NAME_RULE,
    NUM_CLASSES,
    OUTPUT_NAME,
    is_valid_model_name,
)
from serving.mnist import MEAN, STD
from training.data import normalise, to_tensor
from training.train import EVAL_BATCH

OPSET = 18
PARITY_TOL = 1e-5


class ExportError(Exception):
    """A one-line message naming the problem and the fix."""


class Servable(nn.Module):
    """What the server runs: raw uint8 pixels in, class probabilities out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((images.float() / 255.0 - MEAN) / STD), dim=1)


def fp32_cpu_copy(net: nn.Module) -> nn.Module:
    """The net as it is exported: FP32 on the CPU in eval mode, whatever trained it; `net` stays as it is."""
    return copy.deepcopy(net).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()


def _build_the_torchlib_registry_once() -> None:
    """torch.onnx.export rebuilds onnxscript's operator registry on every call, re-parsing the source of
    about 500 functions: 2-3 s on a 2-core CPU, paid again by every member of an ensemble and every seed of
    --seeds. An export only reads the registry, so one per opset serves every export of the process."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:  # another torch layout: exports stay correct, only slower
        return
    build = ONNXRegistry.from_torchlib  # a classmethod, bound here
    if not hasattr(build, "cache_info"):
        ONNXRegistry.from_torchlib = staticmethod(functools.cache(build))


def to_onnx(net: nn.Module, metadata: dict[str, str]) -> bytes:
    """Export with the dynamo exporter (the TorchScript one is deprecated), batch dimension dynamic."""
    servable = Servable(fp32_cpu_copy(net))
    example = torch.zeros(2, *IMAGE_SHAPE, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    _build_the_torchlib_registry_once()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's chatter is not the user's concern
        program = torch.onnx.export(
            servable,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes={INPUT_NAME: {0: batch}},
            external_data=False,
            verbose=False,
        )
    return finish(program.model_proto, metadata)


def finish(model: onnx.ModelProto, metadata: dict[str, str]) -> bytes:
    """The exported graph as the repository keeps it: batch dimension "N", the labels and `metadata` in its
    metadata, checked in full."""
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"  # the exporter names it after the torch Dim
    for key, value in {"labels": ",".join(LABELS), "variant": "fp32", **metadata}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


@torch.no_grad()
def reference_probabilities(net: nn.Module, images: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    """PyTorch's FP32 probabilities on the CPU for uint8 images [N,28,28]: what the exported graph must
    reproduce. Never the training device's own outputs: CUDA convolutions run in TF32 by default, and
    autocast in float16/bfloat16; either misses the parity tolerance by orders of magnitude."""
    cpu_net = fp32_cpu_copy(net).to(memory_format=torch.channels_last)
    probs = []
    with torch.autocast("cpu", enabled=False):
        for i in range(0, len(images), batch):
            x = normalise(to_tensor(images[i : i + batch])).contiguous(memory_format=torch.channels_last)
            probs.append(torch.softmax(cpu_net(x), dim=1))
    return torch.cat(probs).numpy()


def check_parity(model_bytes: bytes, images: np.ndarray, expected: np.ndarray, batch: int = 1000) -> float:
    """ONNX Runtime CPU on `images` (uint8 [N,28,28]) vs PyTorch's probabilities `expected` [N,10], computed
    from the same pixels by the training code's own normalisation, so the graph's uint8 path is checked too.
    Raises ExportError unless they agree within PARITY_TOL with identical argmax; returns the max abs diff."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    worst, mismatched = 0.0, 0
    for i in range(0, len(images), batch):
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch, None]})
        want = expected[i : i + batch]
        worst = max(worst, float(np.abs(got - want).max()))
        mismatched += int((got.argmax(1) != want.argmax(1)).sum())
    if worst > PARITY_TOL or mismatched:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch (max abs diff {worst:.2e}, tolerance {PARITY_TOL:.0e}; "
            f"{mismatched} argmax mismatches); nothing was written — report this with the command line"
        )
    return worst


# Serving defaults measured with mnist-bench on 2 CPU cores (benchmarks/serving.md): ORT throughput is flat
# above batch 8, so batches past 64 only add latency; two instances let one batch compute while the next
# forms. No queue delay, as Triton recommends: under load the next batch fills while one computes.
def config_pbtxt(name: str, max_batch_size: int = 64, instances: int = 2, max_queue_delay_us: int = 0) -> str:
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
instance_group [ {{ count: {instances} }} ]
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ {", ".join(map(str, IMAGE_SHAPE))} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {NUM_CLASSES} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
"""


def check_name(name: str) -> None:
    if not is_valid_model_name(name):
        raise ExportError(f"model name {name!r} is not allowed; use {MODEL_NAME_RULE}")


def check_writable(repo: Path, names: Iterable[str]) -> None:
    """Fail before training, not after: each model directory <repo>/<name> is created (unless it exists) and
    a scratch directory made and removed in it, as write_version will; what did not exist before is removed.
    Permission bits alone would not tell (root passes them; read-only mounts and ACLs do not show in them)."""
    path = repo
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise ExportError(
            f"cannot create repository {repo}: {path} is a file, not a directory; pick another --repo"
        )
    for name in names:
        model_dir = repo / name
        if model_dir.exists() and not model_dir.is_dir():
            raise ExportError(f"{model_dir} is a file, not a model directory; move it or pick another --name")
        topmost_new = next((p for p in (*reversed(model_dir.parents), model_dir) if not p.exists()), None)
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=model_dir))
        except OSError as e:
            raise ExportError(
                f"cannot write to repository {repo} ({e.strerror}: {e.filename}); pick a writable --repo"
            ) from None
        finally:
            if topmost_new is not None:
                shutil.rmtree(topmost_new, ignore_errors=True)


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def write_version(repo: Path, name: str, model_bytes: bytes, write_extras: Callable[[Path], None]) -> Path:
    """Write model.onnx plus whatever write_extras puts beside it into a temp dir inside <repo>/<name>, then
    rename it to the next version number. On any failure the repository is left exactly as it was."""
    check_name(name)
    model_dir = repo / name
    topmost_new = next((p for p in (*reversed(model_dir.parents), model_dir) if not p.exists()), None)
    config = model_dir / "config.pbtxt"
    had_config = config.exists()
    tmp = None
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        # A dot-dir: Triton and our scanner only look at positive-integer version dirs.
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server running as another user
        (tmp / "model.onnx").write_bytes(model_bytes)
        write_extras(tmp)
        if not had_config:
            _write_atomic(config, config_pbtxt(name))
        for _ in range(100):  # another exporter may take the same number first: rename fails, try the next
            version = model_dir / str(max(versions(model_dir), default=0) + 1)
            try:
                os.rename(tmp, version)  # atomic: the version dir appears complete or not at all
                return version
            except OSError:
                if not version.exists():
                    raise
        raise ExportError(f"could not allocate a version number in {model_dir}; retry")
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not had_config:
            config.unlink(missing_ok=True)
        if topmost_new is not None:
            shutil.rmtree(topmost_new, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExportError(
                f"cannot write to repository {repo} ({e.strerror}); pick a writable --repo"
            ) from None
        raise


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the config from a server running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
