"""mnist-train: train an MNIST model; export it to ONNX plus reports into a Triton-layout model repository."""

import time

START = time.perf_counter()  # before the imports: the per-phase times count them

import argparse  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, fields  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

# Passive OpenMP waits: on a shared CPU, spinning worker threads made training 2-10x slower (measured).
# Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch
except ImportError:  # a serving-only install: say what to install instead of a traceback
    sys.exit(
        "mnist-train: error: PyTorch is not installed; install the train extra: "
        "pip install 'mnist-serving[train]' (on the project's machines, pip install torch==2.13.0 first)"
    )

import numpy as np  # noqa: E402

from serving.commandline import HelpFormatter, add_flags, build_config  # noqa: E402
from serving.mnist import MNIST, DataError, load_mnist  # noqa: E402
from training import models, reports  # noqa: E402
from training.config import ARCH_PRESETS, RunConfig, TrainConfig  # noqa: E402
from training.ensemble import Member, accuracy, export_ensemble, load_member  # noqa: E402
from training.export import (  # noqa: E402
    ExportError,
    check_name,
    check_parity,
    check_writable,
    reference_probabilities,
    to_onnx,
    write_version,
)
from training.train import checkpoint_bytes, load_checkpoint, overfit_batch, torch_device, train  # noqa: E402
from training.variants import VariantError, build_variant  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    preset = " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in ARCH_PRESETS["best"].items()
    )
    p = argparse.ArgumentParser(
        prog="mnist-train",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="--arch best: a wider VGG-style CNN with BatchNorm and dropout 0.3, trained on augmented "
        f"digits (random rotation +-10 deg, scale 0.9-1.1, shift +-2 px); it sets {preset} unless given. "
        "Five best models and their ensemble in one command: --arch best --name mnist-best --seeds 0,1,2,3,4 "
        "--ensemble mnist-best-x5. Every export is checked against PyTorch FP32 on the CPU, whatever device "
        "and precision trained it. The last stdout line is `exported: <version dir>`.",
    )
    add_flags(p, RunConfig)
    return p


def parse_config(argv: list[str] | None) -> tuple[RunConfig, list[TrainConfig]]:
    """The command's configuration and the models it trains, in order. Every flag is checked before anything
    starts: a bad one exits with one `mnist-train: error:` line."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    given = {name: getattr(namespace, name) for name in given_flags(parser, argv) if name in TRAIN_FIELDS}
    for name, value in ARCH_PRESETS.get(namespace.arch, {}).items():
        if name not in given:
            setattr(namespace, name, value)
    config = build_config(parser, RunConfig, namespace)
    try:
        return config, config.trainings(given)
    except ValueError as e:
        parser.error(str(e))


TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The fields whose flags the command line gives (argparse fills in a default only where a field is
    missing from the namespace it is handed)."""
    unset = object()
    names = TRAIN_FIELDS | {f.name for f in fields(RunConfig)}
    namespace = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name for name, value in vars(namespace).items() if value is not unset}


class Phases:
    """Wall seconds per phase of the command, printed at the end and kept in metrics.json."""

    def __init__(self) -> None:
        self.seconds = {"start-up and imports": time.perf_counter() - START}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def line(self) -> str:
        total = time.perf_counter() - START
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.seconds.items())
        return f"time: {total:.1f}s ({parts})"


def run(argv: list[str] | None, written: list[str]) -> None:
    """The whole command; appends each version it writes to `written` as it goes."""
    phases = Phases()
    config, trainings = parse_config(argv)
    cfg = config.train
    # The cores this process may use (taskset, cpusets), not the machine's: extra threads only contend.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    resume = check_before_training(config)
    members = [load_member(config.repo, name, version) for name, version in config.member_list()]
    with phases("load MNIST"):
        mnist = load_mnist(config.data_dir, config.cache_dir)
    if config.overfit_batch:
        acc = overfit_batch(cfg, mnist, config.overfit_batch)
        print(f"overfit {config.overfit_batch} images: train accuracy {acc:.4f}")
        if acc < 0.99:
            sys.exit(
                f"mnist-train: error: could not fit {config.overfit_batch} images (accuracy {acc:.4f}); "
                "the model or the loop is broken"
            )
        return
    for training in trainings:
        members.append(train_and_export(config, training, mnist, resume, phases, written))
    if config.ensemble is not None:
        with phases("ensemble"):
            path = export_ensemble(config.repo, config.ensemble, members, mnist)
        written.append(str(path))
        print(phases.line())
        print(f"exported: {path}")


def check_before_training(config: RunConfig) -> dict | None:
    """What can fail after training, checked before it: names, the repository, the device, checkpoints.
    Returns the --resume checkpoint."""
    cfg = config.train
    names = [] if config.members else [config.name]
    names += [f"{config.name}-{kind}" for kind in variant_kinds(config)]
    names += [config.ensemble] if config.ensemble else []
    for name in names:
        check_name(name)
    check_writable(config.repo, names)
    torch_device(cfg.device)  # --device cuda without a GPU: fail now, not after loading the data
    if cfg.init_from:
        load_checkpoint(Path(cfg.init_from), cfg, resuming=False)
    if not config.resume:
        return None
    resume = load_checkpoint(config.resume, cfg, resuming=True)
    planned = resume["config"].get("epochs")
    if cfg.schedule == "onecycle" and planned != cfg.epochs:
        raise ValueError(
            f"checkpoint {config.resume} follows a one-cycle schedule planned for {planned} epochs; "
            "resume with that --epochs, or start from its weights with --init-from"
        )
    return resume


def variant_kinds(config: RunConfig) -> list[str]:
    wanted = (("int8", config.quantize), ("fp16", config.fp16), ("fp32-ort-optimized", config.ort_optimize))
    return [kind for kind, on in wanted if on]


def train_and_export(
    config: RunConfig, cfg: TrainConfig, mnist: MNIST, resume: dict | None, phases: Phases, written: list[str]
) -> Member:
    """Train one model and write it, its variants and its reports; prints `exported: <version dir>` and
    appends what it wrote to `written`."""
    with phases("training"):
        result = train(cfg, mnist, resume=resume, checkpoint_path=config.checkpoint)
    with phases("test evaluation"):
        # Judged as exported (FP32 on the CPU), not as the training device computed it (TF32, autocast).
        test_probs = reference_probabilities(result.model, mnist.test_images)
    test_accuracy = accuracy(test_probs, mnist.test_labels)
    test_labels, test_pred = mnist.test_labels, test_probs.argmax(1)
    cm = reports.confusion_matrix(test_labels, test_pred)
    params = models.param_count(result.model)
    print(
        f"test accuracy {test_accuracy:.4f}  ({result.epochs_run} epochs, "
        f"{result.wall_time:.1f}s, {params:,} params, seed {cfg.seed})"
    )

    ckpt = checkpoint_bytes(result.checkpoint)
    metadata = {
        "arch": cfg.arch,
        "test_accuracy": f"{test_accuracy:.4f}",
        "config_digest": cfg.digest(),
        "checkpoint_digest": hashlib.sha256(ckpt).hexdigest(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with phases("ONNX export"):
        model_bytes = to_onnx(result.model, metadata)
    with phases("parity check"):
        parity = check_parity(model_bytes, mnist.test_images, test_probs)
    metrics = {
        "arch": cfg.arch,
        "params": params,
        "epochs_run": result.epochs_run,
        "wall_time_s": round(result.wall_time, 2),
        "test_accuracy": test_accuracy,
        "per_class_accuracy": (np.diag(cm) / cm.sum(1)).round(4).tolist(),
        "confusion_matrix": cm.tolist(),
        "onnx_parity_max_abs_diff": parity,
        "history": asdict(result.history),
        "config": asdict(cfg),
        **{k: metadata[k] for k in ("config_digest", "checkpoint_digest", "created_at")},
    }

    def extras(out: Path) -> None:
        (out / "checkpoint.pt").write_bytes(ckpt)
        reports.write_reports(out, metrics, result.model, mnist.test_images, test_labels, test_pred)

    with phases("variants"):
        variants = build_variants(model_bytes, variant_kinds(config), mnist)  # may fail: before any write
    with phases("reports and writing"):
        version_dir = write_version(config.repo, config.name, model_bytes, extras)
        written.append(f"{version_dir} (seed {cfg.seed})")
        for kind, variant_bytes in variants:
            path = write_version(config.repo, f"{config.name}-{kind}", variant_bytes, lambda out: None)
            written.append(f"{path} (seed {cfg.seed}, {kind})")
            print(f"variant {kind}: {path}")
    print(phases.line())
    print(f"exported: {version_dir}")
    return Member(f"{config.name}:{version_dir.name}", cfg.arch, result.model, model_bytes, test_probs)


def build_variants(model_bytes: bytes, kinds: list[str], mnist: MNIST) -> list[tuple[str, bytes]]:
    """Build and check each variant of the FP32 model; prints each one's test accuracy."""
    built = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "model.onnx"
        fp32_path.write_bytes(model_bytes)
        for kind in kinds:
            variant, report = build_variant(kind, fp32_path, mnist)
            print(
                f"variant {kind}: test accuracy {report.accuracy:.4f} (fp32 {report.fp32_accuracy:.4f}), "
                f"argmax agreement {report.argmax_agreement:.4f}"
            )
            built.append((kind, variant.SerializeToString()))
    return built


def main(argv: list[str] | None = None) -> None:
    # The ONNX exporter logs warnings about optional packages (torchvision) that do not concern the user.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    written: list[str] = []
    try:
        run(argv, written)
    except (DataError, ExportError, VariantError, ValueError) as e:
        after = f"; exported before the error: {', '.join(written)}" if written else ""
        sys.exit(f"mnist-train: error: {e}{after}")
    except KeyboardInterrupt:
        done = f"exported before it: {', '.join(written)}" if written else "nothing was exported"
        sys.exit(f"mnist-train: interrupted; {done}")


if __name__ == "__main__":
    main()
