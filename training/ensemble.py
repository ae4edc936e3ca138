"""Several trained models exported as one: the members' probabilities averaged inside one ONNX graph, so the
server and Triton serve it like any other model (uint8 `images` in, float32 `probabilities` out).

Members come from the repository (name:version: the model.onnx, and the net rebuilt from the checkpoint.pt
beside it) or from models trained in the same command. The graph is composed from the members' own exported
graphs, not exported again from PyTorch (seconds per member with the dynamo exporter), so the ensemble
computes exactly what its members serve. It is parity-checked against the mean of the members' FP32
PyTorch probabilities on the full test set (computed once: a member trained in the same command brings the
probabilities it was judged on), and written atomically as a new version.
"""

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import compose, helper
from torch import nn

from serving.contract import INPUT_NAME, OUTPUT_NAME
from serving.mnist import MNIST
from training import models, reports
from training.export import check_parity, finish, reference_probabilities, versions, write_version
from training.train import read_checkpoint


@dataclass
class Member:
    model: str  # "name:version" in the repository
    arch: str
    net: nn.Module
    exported: bytes  # its model.onnx
    # Its FP32 probabilities on the test set, when the same command trained it and judged it on them already.
    test_probabilities: np.ndarray | None = None


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def load_member(repo: Path, name: str, version: int | None) -> Member:
    """Rebuild one exported model from the checkpoint.pt beside its model.onnx."""
    available = versions(repo / name)
    if not available:
        raise ValueError(f"no model {name!r} in repository {repo}; train it first or fix --repo")
    version = available[-1] if version is None else version
    if version not in available:
        raise ValueError(
            f"{name} has no version {version} in {repo} (it has {', '.join(map(str, available))})"
        )
    path = repo / name / str(version) / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: only single models mnist-train trained can be members")
    checkpoint = read_checkpoint(path)
    config = checkpoint["config"]
    try:
        net = models.build(config.get("arch"), config.get("batchnorm"), config.get("dropout"))
        net.load_state_dict(checkpoint["model"])
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{path} does not rebuild its model ({str(e).splitlines()[0]})") from None
    return Member(f"{name}:{version}", config["arch"], net, (path.parent / "model.onnx").read_bytes())


def averaged(exported: list[bytes], metadata: dict[str, str]) -> bytes:
    """One graph that gives `images` to each member's graph and outputs the mean of their probabilities."""
    graphs = [
        compose.add_prefix(onnx.load_model_from_string(model), f"member{i}/")
        for i, model in enumerate(exported)
    ]
    opsets = {(o.domain, o.version) for g in graphs for o in g.opset_import}
    if len({domain for domain, _ in opsets}) != len(opsets):
        raise ValueError(
            f"the members were exported for different opsets ({sorted(opsets)}); export them again"
        )
    first = graphs[0].graph
    images = helper.make_value_info(INPUT_NAME, first.input[0].type)
    probabilities = helper.make_value_info(OUTPUT_NAME, first.output[0].type)
    nodes = [helper.make_node("Identity", [INPUT_NAME], [g.graph.input[0].name]) for g in graphs]
    nodes += [node for g in graphs for node in g.graph.node]
    nodes.append(helper.make_node("Mean", [g.graph.output[0].name for g in graphs], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes, "ensemble", [images], [probabilities],
        initializer=[t for g in graphs for t in g.graph.initializer],
        value_info=[v for g in graphs for v in g.graph.value_info],
    )  # fmt: skip
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in sorted(opsets)],
        functions=[f for g in graphs for f in g.functions],
        ir_version=graphs[0].ir_version,
    )
    return finish(model, metadata)


def export_ensemble(repo: Path, name: str, members: list[Member], mnist: MNIST) -> Path:
    """Write one ONNX model that averages the members' probabilities; prints its accuracy, returns its dir."""
    member_probs = [
        m.test_probabilities if m.test_probabilities is not None
        else reference_probabilities(m.net, mnist.test_images)
        for m in members
    ]  # fmt: skip
    expected = np.mean(member_probs, axis=0, dtype=np.float32)
    test_accuracy = accuracy(expected, mnist.test_labels)
    listed = [
        {"model": m.model, "arch": m.arch, "test_accuracy": round(accuracy(probs, mnist.test_labels), 4)}
        for m, probs in zip(members, member_probs, strict=True)
    ]
    metadata = {
        "arch": "ensemble",
        "test_accuracy": f"{test_accuracy:.4f}",
        "members": json.dumps(listed),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    model_bytes = averaged([m.exported for m in members], metadata)
    parity = check_parity(model_bytes, mnist.test_images, expected)
    cm = reports.confusion_matrix(mnist.test_labels, expected.argmax(1))
    metrics = {
        "arch": "ensemble",
        "members": listed,
        "params": sum(models.param_count(m.net) for m in members),
        "test_accuracy": test_accuracy,
        "per_class_accuracy": (np.diag(cm) / cm.sum(1)).round(4).tolist(),
        "confusion_matrix": cm.tolist(),
        "onnx_parity_max_abs_diff": parity,
        "created_at": metadata["created_at"],
    }
    member_accuracies = ", ".join(f"{m['test_accuracy']:.4f}" for m in listed)
    print(f"ensemble of {len(members)}: test accuracy {test_accuracy:.4f} (members {member_accuracies})")

    def extras(out: Path) -> None:
        reports.write_metrics(out, metrics)
        reports.plot_confusion(out, cm)
        reports.plot_misclassified(out, mnist.test_images, mnist.test_labels, expected.argmax(1))

    return write_version(repo, name, model_bytes, extras)
