"""metrics.json and the PNGs written next to each exported model."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from serving.contract import IMAGE_SIDE, NUM_CLASSES  # noqa: E402


def confusion_matrix(labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """[true, predicted] counts."""
    return np.bincount(labels * NUM_CLASSES + pred, minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )


def write_metrics(out: Path, metrics: dict) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def plot_curves(out: Path, history: dict) -> None:
    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        if history[f"{split}_loss"]:  # no validation split: train only
            ax_loss.plot(epochs, history[f"{split}_loss"], marker="o", label=split)
            ax_acc.plot(epochs, history[f"{split}_acc"], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def plot_confusion(out: Path, cm: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(np.log1p(cm), cmap="Blues")  # log: the diagonal would wash out every error
    for t in range(NUM_CLASSES):
        for p in range(NUM_CLASSES):
            if cm[t, p]:
                ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=7)
    ax.set(
        xlabel="predicted",
        ylabel="true",
        xticks=range(NUM_CLASSES),
        yticks=range(NUM_CLASSES),
        title="test confusion matrix",
    )
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)


def plot_misclassified(
    out: Path, images: np.ndarray, labels: np.ndarray, pred: np.ndarray, n: int = 36
) -> None:
    """The first n misclassified test digits in one mosaic, each labelled "predicted / true" and its index."""
    wrong = np.flatnonzero(pred != labels)[:n]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    cell = IMAGE_SIDE + 12  # room for the label above each digit
    mosaic = np.zeros((rows * cell, cols * cell), dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(cols * 1.3, rows * 1.3 + 0.4))
    for k, i in enumerate(wrong):
        r, c = divmod(k, cols)
        mosaic[r * cell + 10 : r * cell + 10 + IMAGE_SIDE, c * cell + 6 : c * cell + 6 + IMAGE_SIDE] = images[
            i
        ]
        ax.text(c * cell + cell / 2, r * cell + 5, f"{pred[i]} / {labels[i]}  #{i}", ha="center", fontsize=7)
    ax.imshow(mosaic, cmap="gray_r", interpolation="nearest")  # one image: 36 subplots took a second
    ax.axis("off")
    ax.set_title(
        f"misclassified test digits ({int((pred != labels).sum())} in all): predicted / true  #index"
    )
    fig.tight_layout()
    fig.savefig(out / "misclassified.png", dpi=100)
    plt.close(fig)


def plot_filters(out: Path, net: nn.Module) -> None:
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:  # the MLP has no filters; plot its first layer's weights as 28x28 templates instead
        first = next(m for m in net.modules() if isinstance(m, nn.Linear))
        weights = first.weight.detach().cpu().numpy()[:32].reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        title = "first layer weights (first 32 units)"
    else:
        weights = conv.weight.detach().cpu().numpy()[:, 0]
        title = f"first conv filters ({conv.kernel_size[0]}x{conv.kernel_size[1]})"
    # One image with a blank line between filters, each scaled by its own largest weight: a grid of subplots
    # took up to a second.
    cols = 8
    rows = -(-len(weights) // cols)
    side = weights.shape[-1]
    cell = side + 1
    mosaic = np.full((rows * cell - 1, cols * cell - 1), np.nan)
    for k, w in enumerate(weights):
        r, c = divmod(k, cols)
        scale = max(float(np.abs(w).max()), 1e-12)
        mosaic[r * cell : r * cell + side, c * cell : c * cell + side] = w / scale
    fig, ax = plt.subplots(figsize=(cols, rows + 0.4))
    ax.imshow(mosaic, cmap="bwr", vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "filters.png", dpi=100)
    plt.close(fig)


def write_reports(
    out: Path,
    metrics: dict,
    net: nn.Module,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    test_pred: np.ndarray,
) -> None:
    write_metrics(out, metrics)
    plot_curves(out, metrics["history"])
    plot_confusion(out, np.asarray(metrics["confusion_matrix"]))
    plot_misclassified(out, test_images, test_labels, test_pred)
    plot_filters(out, net)
