"""The training loop. The whole dataset lives in memory as tensors: a DataLoader would be most of the time of
a fast MNIST run. The test set is not touched here: the exported FP32 model is judged on it
(training/export.py: reference_probabilities)."""

import copy
import inspect
import io
import math
import os
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

from serving.contract import NUM_CLASSES
from serving.mnist import MNIST
from training import models
from training.config import TrainConfig
from training.data import augment, normalise, split, to_tensor

# FP32 inference on the CPU, channels_last: batches of 250 ran 4x faster than batches of 1000 (cache-sized).
EVAL_BATCH = 250
# oneDNN instruction sets with bf16 dot products; $ONEDNN_MAX_CPU_ISA below them makes bf16 an emulation.
BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512", "ALL", "DEFAULT")


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # each epoch's own, validation included


def torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision type the device computes fast, None for FP32: float16 on CUDA; bfloat16 on CPUs
    with bf16 instructions that oneDNN may use (elsewhere PyTorch emulates bf16, slower than FP32)."""
    if device.type == "cuda":
        return torch.float16
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if not isa.startswith(BF16_ISAS):
        return None
    # Older torch cannot tell: FP32 there.
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"):
        return torch.bfloat16
    return None


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


@dataclass
class Optimisation:
    """One run's model and what updates it: optimiser, schedule, precision, loss weights, random state."""

    cfg: TrainConfig
    model: models.Net
    device: torch.device
    steps_per_epoch: int
    class_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.opt = make_optimizer(self.model, self.cfg)
        self.schedule = make_schedule(self.opt, self.cfg, self.steps_per_epoch)
        self.amp_dtype = autocast_dtype(self.device) if self.cfg.amp else None
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on a batch of [0,1] images; returns the batch's (loss, logits)."""
        cfg = self.cfg
        if cfg.augment or cfg.elastic:
            xb = augment(xb, self.generator, cfg.hflip and cfg.augment, cfg.elastic)
        xb = normalise(xb).contiguous(memory_format=torch.channels_last)
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
            logits = self.model(xb).float()
        loss = F.cross_entropy(logits, yb, weight=self.class_weight, label_smoothing=cfg.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        if isinstance(self.schedule, torch.optim.lr_scheduler.OneCycleLR):
            self.schedule.step()
        return loss.detach(), logits

    def state(self, history: History, epoch: int) -> dict:
        """A resumable checkpoint."""
        return {
            "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "history": asdict(history),
            "epoch": epoch,
            "generator": self.generator.get_state(),
        }

    def restore(self, checkpoint: dict) -> tuple[History, int]:
        """Continue from a checkpoint `state` wrote; returns its history and its last epoch."""
        self.model.load_state_dict(checkpoint["model"])
        self.opt.load_state_dict(checkpoint["optimizer"])
        if self.schedule is not None and checkpoint.get("schedule"):
            self.schedule.load_state_dict(checkpoint["schedule"])
        self.generator.set_state(checkpoint["generator"].to(self.generator.get_state().device))
        return History(**checkpoint["history"]), checkpoint["epoch"]


def train_epoch(run: Optimisation, x: torch.Tensor, y: torch.Tensor, desc: str) -> tuple[float, float]:
    """One shuffled pass over the training split; returns its (mean loss, accuracy)."""
    cfg, device = run.cfg, run.device
    run.model.train()
    if cfg.freeze == "features":
        run.model.features.eval()  # frozen BN keeps its running statistics
    order = torch.randperm(len(x), generator=run.generator, device=device)
    total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    bar = tqdm(range(run.steps_per_epoch), desc=desc, leave=False, disable=None)
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        yb = y[idx]
        loss, logits = run.step(x[idx], yb)
        total_loss += loss * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        if step % 50 == 0 or step == run.steps_per_epoch - 1:  # .item() waits for the device; not every step
            seen = min((step + 1) * cfg.batch_size, len(x))
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    return total_loss.item() / len(x), correct.item() / len(x)


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
        model.load_state_dict(read_checkpoint(Path(cfg.init_from))["model"])
    freeze(model, cfg.freeze)
    log(models.format_table(model))

    x_train, y_train, x_val, y_val = split(mnist, cfg.val_size, cfg.seed, cfg.train_limit)
    x_train, y_train = x_train.to(device), y_train.to(device)
    run = Optimisation(
        cfg, model, device, math.ceil(len(x_train) / cfg.batch_size), class_weight(cfg, y_train)
    )
    history, first_epoch = run.restore(resume) if resume is not None else (History(), 0)

    epoch, checkpoint, best = first_epoch, resume, (math.inf, None)  # best: (val loss, weights)
    for epoch in range(first_epoch + 1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        train_loss, train_acc = train_epoch(run, x_train, y_train, f"epoch {epoch}/{cfg.epochs}")
        record = {"train_loss": train_loss, "train_acc": train_acc, "lr": run.opt.param_groups[0]["lr"]}
        line = f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f}"
        if len(x_val):  # --val-size 0 trains on every training digit and validates nothing
            val_loss, val_acc = evaluate(model, x_val, y_val, device)
            record |= {"val_loss": val_loss, "val_acc": val_acc}
            line += f"  val loss {val_loss:.4f} acc {val_acc:.4f}"
            if isinstance(run.schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
                run.schedule.step(val_loss)
        record["epoch_seconds"] = round(time.perf_counter() - epoch_start, 2)
        for name, value in record.items():
            getattr(history, name).append(value)
        log(f"{line}  ({record['epoch_seconds']:.1f}s)")
        checkpoint = run.state(history, epoch)
        if checkpoint_path is not None:
            save_atomic(checkpoint, checkpoint_path)
        if cfg.early_stopping:
            if history.val_loss[-1] < best[0]:
                best = (history.val_loss[-1], copy.deepcopy(model.state_dict()))
            elif epoch - 1 - int(np.argmin(history.val_loss)) >= cfg.early_stopping:
                log(f"early stopping: no validation-loss improvement for {cfg.early_stopping} epochs")
                break

    if best[1] is not None:
        model.load_state_dict(best[1])  # the weights early stopping chose
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    checkpoint = {**checkpoint, "model": model.state_dict()}  # the returned (maybe early-stopped) weights
    return Result(model, history, time.perf_counter() - start, epoch, checkpoint)


def class_weight(cfg: TrainConfig, labels: torch.Tensor) -> torch.Tensor | None:
    """With --class-weights, inverse class frequency with mean 1."""
    if not cfg.class_weights:
        return None
    counts = torch.bincount(labels, minlength=NUM_CLASSES).float().clamp(min=1)
    return counts.sum() / (NUM_CLASSES * counts)


# --- checkpoints ----------------------------------------------------------------------------------------

MODEL_OPTIONS = ("arch", "batchnorm", "dropout")  # what builds the network; the rest only trains it


def save_atomic(checkpoint: dict, path: Path) -> None:
    """Write then rename, so an interrupted run never leaves a truncated checkpoint to resume from."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint mnist-train wrote, loaded on the CPU; ValueError with a one-line reason otherwise.

    Only PyTorch's zip archives are opened, and only with weights_only=True: a file of unknown origin is never
    unpickled beyond tensors and plain values, and PyTorch's advice to retry without that guard is not passed
    on."""
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    not_ours = f"{path} is not a checkpoint of mnist-train; pass a checkpoint.pt it wrote"
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{not_ours} (it is not a PyTorch checkpoint archive)")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{not_ours} (it holds objects other than weights; not loaded)") from None
    except (OSError, RuntimeError, zipfile.BadZipFile, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in reason:
            reason = "not loadable as weights"
        raise ValueError(
            f"checkpoint {path} is unreadable ({reason}); pass a checkpoint.pt mnist-train wrote"
        ) from None
    if not isinstance(checkpoint, dict) or not {"config", "model"} <= checkpoint.keys():
        raise ValueError(f"{not_ours} (it holds no model and config)")
    return checkpoint


def model_options(config: dict) -> dict:
    """The options that build the network, with the architecture's defaults filled in for None."""
    arch = config.get("arch")
    defaults = inspect.signature(models.ARCHS[arch]).parameters if arch in models.ARCHS else {}
    options = {"arch": arch}
    for name in MODEL_OPTIONS[1:]:
        value = config.get(name)
        options[name] = defaults[name].default if value is None and name in defaults else value
    return options


def spell(options: dict) -> str:
    """Model options as the flags that give them."""
    words = [f"--arch {options['arch']}", "--batchnorm" if options["batchnorm"] else "--no-batchnorm"]
    if "dropout" in options:
        words.append(f"--dropout {options['dropout']:g}")
    return " ".join(words)


def load_checkpoint(path: Path, cfg: TrainConfig, resuming: bool) -> dict:
    """Read a checkpoint and check, before any data is loaded, that this run's network takes its weights:
    same architecture and batch-norm (and dropout, to resume the same run). ValueError in one line if not."""
    checkpoint = read_checkpoint(path)
    names = MODEL_OPTIONS if resuming else MODEL_OPTIONS[:2]
    theirs, ours = model_options(checkpoint["config"]), model_options(asdict(cfg))
    theirs, ours = ({k: v[k] for k in names} for v in (theirs, ours))
    flag = "--resume" if resuming else "--init-from"
    if theirs != ours:
        raise ValueError(
            f"{flag} {path} holds a model trained with {spell(theirs)}, this run builds {spell(ours)}; "
            f"pass {spell(theirs)}"
        )
    try:
        models.build(cfg.arch, cfg.batchnorm, cfg.dropout).load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{flag} {path}: its weights do not fit {spell(ours)} ({str(e).splitlines()[0]})"
        ) from None
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
