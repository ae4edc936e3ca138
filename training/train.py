"""TrainConfig and the training loop. The whole dataset lives in memory as tensors: a DataLoader would be most
of the time of a fast MNIST run. The test set is not touched here: the exported FP32 model is judged on it
(training/export.py: reference_probabilities)."""

import copy
import hashlib
import io
import json
import math
import pickle
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training import models
from training.data import MNIST, TRAIN_SIZE

MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel statistics; the exported graph applies the same
# FP32 inference on the CPU, channels_last: batches of 250 ran 4x faster than batches of 1000 (cache-sized).
EVAL_BATCH = 250


@dataclass
class TrainConfig:
    """Everything a run depends on; the defaults are the default run (benchmarks/training.md)."""

    arch: str = "cnn2"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    optimizer: str = "adam"  # adam | adamw | sgd
    amsgrad: bool = False
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "onecycle"  # none | plateau | onecycle
    early_stopping: int = 0  # patience in epochs on validation loss; 0 = off
    val_size: int = 5000
    augment: bool = False
    hflip: bool = False
    label_smoothing: float = 0.0
    class_weights: bool = False
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    amp: bool = True  # float16 on CUDA, bfloat16 on CPUs with bf16 instructions
    batchnorm: bool | None = None  # None: the architecture's default
    dropout: float | None = None
    device: str = "auto"
    seed: int = 0
    train_limit: int | None = None
    init_from: str | None = None
    freeze: str | None = None  # "features"

    def __post_init__(self) -> None:
        """Refuse what no run can use, naming the command-line flag, before any data is loaded."""
        rules = [
            ("arch", self.arch in models.ARCHS, f"one of {', '.join(models.ARCHS)}"),
            ("epochs", _int_in(self.epochs, 1, 10_000), "an integer from 1 to 10000"),
            ("batch_size", _int_in(self.batch_size, 1, 65_536), "an integer from 1 to 65536"),
            ("lr", _real_in(self.lr, 0, 10, open_low=True), "a number above 0, at most 10"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("weight_decay", _real_in(self.weight_decay, 0, 1), "a number from 0 to 1"),
            ("momentum", _real_in(self.momentum, 0, 1, open_high=True), "a number from 0 to below 1"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("early_stopping", _int_in(self.early_stopping, 0, 10_000), "an integer from 0 to 10000"),
            ("val_size", _int_in(self.val_size, 0, MAX_VAL_SIZE), f"an integer from 0 to {MAX_VAL_SIZE}"),
            ("label_smoothing", _real_in(self.label_smoothing, 0, 1, open_high=True), "from 0 to below 1"),
            ("clip_grad", _real_in(self.clip_grad, 0, math.inf), "a finite number, at least 0"),
            (
                "dropout",
                self.dropout is None or _real_in(self.dropout, 0, 1, open_high=True),
                "from 0 to below 1",
            ),
            ("device", self.device in DEVICES, f"one of {', '.join(DEVICES)}"),
            ("seed", _int_in(self.seed, 0, 2**32 - 1), "an integer from 0 to 2**32-1"),
            (
                "train_limit",
                self.train_limit is None or _int_in(self.train_limit, 1, TRAIN_SIZE),
                f"from 1 to {TRAIN_SIZE}",
            ),
            ("freeze", self.freeze in (None, "features"), "'features'"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"{flag(name)} must be {rule}, not {getattr(self, name)!r}")
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


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "plateau", "onecycle")
DEVICES = ("auto", "cpu", "cuda")
MAX_VAL_SIZE = 50_000  # leaves 10,000 images to train on


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _real_in(value: object, low: float, high: float, open_low: bool = False, open_high: bool = False) -> bool:
    """NaN and the infinities are never in range."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return (low < value if open_low else low <= value) and (value < high if open_high else value <= high)


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


def torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision type the device computes fast, None for FP32: float16 on CUDA; bfloat16 on CPUs
    with bf16 instructions (elsewhere PyTorch emulates bf16, slower than FP32)."""
    if device.type == "cuda":
        return torch.float16
    # Older torch cannot tell: FP32 there.
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"):
        return torch.bfloat16
    return None


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,28,28] -> float [N,1,28,28] in [0,1]; normalised after augmentation: padding = background."""
    return torch.from_numpy(images).unsqueeze(1).float().div_(255)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def augment(x: torch.Tensor, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random rotation +-10 deg, scale 0.9-1.1, translation +-2 px, as one affine warp on the batch."""
    n = x.shape[0]
    rand = torch.rand(n, 5, generator=generator, device=x.device) * 2 - 1  # uniform in [-1, 1]
    angle, scale = rand[:, 0] * math.radians(10), 1 + rand[:, 1] * 0.1
    tx, ty = rand[:, 2] * 2 / 14, rand[:, 3] * 2 / 14  # grid units: 14 px is 1.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    flip = torch.where(rand[:, 4] > 0, -1.0, 1.0) if hflip else torch.ones_like(cos)
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def split(mnist: MNIST, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded train/validation split of the (possibly limited) training set."""
    images, labels = mnist.train_images, mnist.train_labels
    if cfg.train_limit is not None:
        images, labels = images[: cfg.train_limit], labels[: cfg.train_limit]
    val_size = min(cfg.val_size, len(images) // 10) if cfg.train_limit is not None else cfg.val_size
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    x, y = to_tensor(images)[order], torch.from_numpy(labels)[order]
    return x[val_size:], y[val_size:], x[:val_size], y[:val_size]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
        )
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=3, min_lr=1e-6)
    return None


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = EVAL_BATCH
):
    """(mean loss, accuracy) over in-memory tensors, in eval mode and FP32."""
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        logits = model(normalise(xb).contiguous(memory_format=torch.channels_last))
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    n = max(len(x), 1)
    return loss / n, correct / n


def freeze(model: models.Net, part: str | None) -> None:
    if part == "features":
        for p in model.features.parameters():
            p.requires_grad_(False)


@dataclass
class Result:
    model: models.Net  # on the CPU, FP32, eval mode
    history: History
    wall_time: float
    epochs_run: int
    checkpoint: dict


def train(
    cfg: TrainConfig, mnist: MNIST, resume: dict | None = None, checkpoint_path: Path | None = None, log=print
) -> Result:
    """Train on the split training set, early-stop on validation loss; the test set is left to the caller."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch_device(cfg.device)
    # channels_last: oneDNN's and cuDNN's fast convolution layout (measured 1.3x per CPU step with bf16).
    model = models.build(cfg.arch, cfg.batchnorm, cfg.dropout).to(device, memory_format=torch.channels_last)
    if cfg.init_from is not None:
        model.load_state_dict(torch.load(cfg.init_from, map_location=device, weights_only=True)["model"])
    freeze(model, cfg.freeze)
    log(models.format_table(model))

    x_train, y_train, x_val, y_val = split(mnist, cfg)
    x_train, y_train = x_train.to(device), y_train.to(device)
    steps = math.ceil(len(x_train) / cfg.batch_size)
    opt = make_optimizer(model, cfg)
    schedule = make_schedule(opt, cfg, steps)
    weight = None
    if cfg.class_weights:  # inverse class frequency, mean 1
        counts = torch.bincount(y_train, minlength=10).float().clamp(min=1)
        weight = counts.sum() / (10 * counts)
    amp_dtype = autocast_dtype(device) if cfg.amp else None
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    history, first_epoch = History(), 0
    best = (math.inf, None)  # (val loss, state) for early stopping
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if schedule is not None and resume.get("schedule"):
            schedule.load_state_dict(resume["schedule"])
        history, first_epoch = History(**resume["history"]), resume["epoch"]
        gen.set_state(resume["generator"].to(gen.get_state().device))

    epoch, checkpoint = first_epoch, resume
    for epoch in range(first_epoch + 1, cfg.epochs + 1):
        model.train()
        if cfg.freeze == "features":
            model.features.eval()  # frozen BN keeps its running statistics
        order = torch.randperm(len(x_train), generator=gen, device=device)
        total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if cfg.augment:
                xb = augment(xb, cfg.hflip, gen)
            xb = normalise(xb).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(xb).float()
            loss = F.cross_entropy(logits, yb, weight=weight, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            if isinstance(schedule, torch.optim.lr_scheduler.OneCycleLR):
                schedule.step()
            total_loss += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            if step % 50 == 0 or step == steps - 1:  # .item() waits for the device; not every step
                seen = min((step + 1) * cfg.batch_size, len(x_train))
                bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
        val_loss, val_acc = evaluate(model, x_val, y_val, device)
        if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            schedule.step(val_loss)
        history.train_loss.append(total_loss.item() / len(x_train))
        history.train_acc.append(correct.item() / len(x_train))
        history.val_loss.append(val_loss)
        history.val_acc.append(val_acc)
        history.lr.append(opt.param_groups[0]["lr"])
        log(
            f"epoch {epoch}/{cfg.epochs}: train loss {history.train_loss[-1]:.4f} "
            f"acc {history.train_acc[-1]:.4f}  val loss {val_loss:.4f} acc {val_acc:.4f}  "
            f"({time.perf_counter() - start:.0f}s)"
        )
        checkpoint = {
            "config": asdict(cfg),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "schedule": schedule.state_dict() if schedule is not None else None,
            "history": asdict(history),
            "epoch": epoch,
            "generator": gen.get_state(),
        }
        if checkpoint_path is not None:
            save_atomic(checkpoint, checkpoint_path)
        if cfg.early_stopping:
            if val_loss < best[0]:
                best = (val_loss, copy.deepcopy(model.state_dict()))
            elif epoch - 1 - int(np.argmin(history.val_loss)) >= cfg.early_stopping:
                log(f"early stopping: no validation-loss improvement for {cfg.early_stopping} epochs")
                break

    if best[1] is not None:
        model.load_state_dict(best[1])  # the weights early stopping chose
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    checkpoint = {**checkpoint, "model": model.state_dict()}  # the returned (maybe early-stopped) weights
    return Result(model, history, time.perf_counter() - start, epoch, checkpoint)


def save_atomic(checkpoint: dict, path: Path) -> None:
    """Write then rename, so an interrupted run never leaves a truncated checkpoint to resume from."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint mnist-train wrote, loaded on the CPU; ValueError with a one-line reason otherwise."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist") from None
    except (OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"checkpoint {path} is unreadable ({str(e).splitlines()[0]}); pass a file mnist-train wrote"
        ) from None
    if not isinstance(checkpoint, dict) or not {"config", "model"} <= checkpoint.keys():
        raise ValueError(f"checkpoint {path} holds no model and config; pass a file mnist-train wrote")
    return checkpoint


def checkpoint_bytes(checkpoint: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    return buf.getvalue()


def overfit_batch(cfg: TrainConfig, mnist: MNIST, n: int, max_steps: int = 500, log=print) -> float:
    """Sanity mode: fit the first n training images; a healthy model/loop reaches ~100% train accuracy."""
    torch.manual_seed(cfg.seed)
    device = torch_device(cfg.device)
    model = models.build(cfg.arch, cfg.batchnorm, cfg.dropout).to(device)
    x, y = to_tensor(mnist.train_images[:n]).to(device), torch.from_numpy(mnist.train_labels[:n]).to(device)
    opt = make_optimizer(model, cfg)
    acc = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        loss = F.cross_entropy(model(normalise(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            _, acc = evaluate(model, x, y, device)
            log(f"step {step}: loss {loss.item():.4f}, train accuracy {acc:.4f}")
            if acc == 1.0:
                break
    return acc
