"""Pictures of a training run: validation-slice overlays and learning curves, as PNG files.

Pure functions (arrays and metric lists in, a PNG file out), drawn on matplotlib `Figure` objects
with the Agg canvas: no display, no pyplot global state, safe in a headless training process.
Each file is written to a temporary name and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raysemi.metrics import class_names as default_class_names

__all__ = ["class_colors", "label_rgba", "learning_curves_figure", "overlay_figure", "save_figure",
           "write_learning_curves_png", "write_overlay_png"]

#: ACDC colours (RV red, myocardium green, LV blue); other class counts use matplotlib's tab10
ACDC_COLORS = [(0.90, 0.16, 0.16), (0.18, 0.75, 0.25), (0.20, 0.45, 0.95)]
PANEL_INCHES = 2.4
DPI = 100


def class_colors(num_classes: int) -> list[tuple[float, float, float]]:
    """RGB colours of the foreground classes 1..num_classes-1."""
    if num_classes == 4:
        return list(ACDC_COLORS)
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [tuple(float(v) for v in cmap(i % 10)[:3]) for i in range(num_classes - 1)]


def label_rgba(label: np.ndarray, num_classes: int, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 4) float image: each foreground class in its colour at `alpha`, background clear."""
    lut = np.zeros((num_classes, 4), np.float32)
    for c, rgb in enumerate(class_colors(num_classes), start=1):
        lut[c] = (*rgb, alpha)
    return lut[np.clip(np.asarray(label, np.int64), 0, num_classes - 1)]


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"  # same folder: the rename is atomic
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _slice_dice(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice on one slice over the classes present in either map (nan if none)."""
    scores = []
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        total = p.sum() + g.sum()
        if total:
            scores.append(2.0 * np.logical_and(p, g).sum() / total)
    return float(np.mean(scores)) if scores else float("nan")


def overlay_figure(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                   num_classes: int, names: Sequence[str] | None = None, row_titles: Sequence[str] | None = None,
                   title: str = ""):
    """One row per slice, columns image | ground truth | prediction: the image in gray, the ground
    truth filled in class colours, the prediction filled with the ground truth's outline on top
    (so misses show), the slice's mean foreground Dice in the prediction's title, and a legend of
    the class colours. `names` are the foreground class names (default: ACDC's for 4 classes)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not (len(images) == len(labels) == len(preds)) or not images:
        raise ValueError(f"overlay_figure: {len(images)} images, {len(labels)} labels, {len(preds)} predictions; "
                         "expected the same number, at least one")
    names = list(names) if names is not None else default_class_names(num_classes)
    colors = class_colors(num_classes)
    rows = len(images)
    # rows as tall as the slices' aspect needs, so tall or wide slices leave no wide gaps
    aspect = float(np.clip(max(np.shape(im)[0] / max(np.shape(im)[-1], 1) for im in images), 0.4, 2.5))
    top_in, bottom_in = (0.7 if title else 0.4), 0.45  # room for the titles, and the legend
    fig = _new_figure(3 * PANEL_INCHES, rows * (0.9 * PANEL_INCHES * aspect + 0.12) + top_in + bottom_in)
    axes = fig.subplots(rows, 3, squeeze=False)
    for r, (image, label, pred) in enumerate(zip(images, labels, preds)):
        image, label, pred = np.asarray(image, np.float32), np.asarray(label), np.asarray(pred)
        if not (image.shape == label.shape == pred.shape) or image.ndim != 2:
            raise ValueError(f"overlay_figure: row {r}: shapes {image.shape}, {label.shape}, {pred.shape}; "
                             "expected the same 2D shape")
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        for c, ax in enumerate(axes[r]):
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 1].imshow(label_rgba(label, num_classes), interpolation="nearest")
        axes[r, 2].imshow(label_rgba(pred, num_classes), interpolation="nearest")
        for k, color in enumerate(colors, start=1):
            if (label == k).any() and 0 < (label == k).sum() < label.size:
                axes[r, 2].contour(label == k, levels=[0.5], colors=[color], linewidths=0.9)
        dice = _slice_dice(pred, label, num_classes)
        axes[r, 0].set_ylabel(row_titles[r] if row_titles else f"slice {r}", fontsize=8)
        axes[r, 2].set_title("" if r else "prediction", fontsize=9)
        axes[r, 2].text(0.02, 0.98, "dice -" if math.isnan(dice) else f"dice {dice:.3f}", color="white",
                        fontsize=7, va="top", ha="left", transform=axes[r, 2].transAxes,
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5, "linewidth": 0})
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("ground truth", fontsize=9)
    handles = [Patch(facecolor=color, label=name) for name, color in zip(names, colors)]
    handles.append(Line2D([], [], color="gray", linewidth=0.9, label="outline: ground truth"))
    fig.legend(handles=handles, loc="lower center", ncol=max(len(handles), 1), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.12 / fig.get_figheight(), va="top")
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - top_in / fig.get_figheight(),
                        bottom=bottom_in / fig.get_figheight(), wspace=0.04, hspace=0.08)
    return fig


def write_overlay_png(path: str | Path, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      preds: Sequence[np.ndarray], num_classes: int, **kwargs) -> Path:
    """`overlay_figure(...)` saved as a PNG at `path` (720 px wide, about 230 px per square slice)."""
    return save_figure(overlay_figure(images, labels, preds, num_classes, **kwargs), path)


def _series(rows: Sequence[tuple[int, dict[str, float]]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(it), float(m[key])) for it, m in rows if key in m and math.isfinite(float(m[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def learning_curves_figure(train_logs: Sequence[tuple[int, dict[str, float]]], history: Sequence[dict[str, float]],
                           names: Sequence[str] = (), title: str = ""):
    """Three panels over iterations: the training losses (every `train/*` value except the
    consistency weight), validation Dice and validation HD95 (mean, and per class in `names`,
    dashed). `train_logs` are (iteration, metrics) pairs as the loop logs them; `history` the
    loop's validation records (each with an `iteration`)."""
    val_rows = [(int(h.get("iteration", i)), h) for i, h in enumerate(history)]
    fig = _new_figure(15, 4.2)
    ax_loss, ax_dice, ax_hd = fig.subplots(1, 3)
    loss_keys = sorted({k for _, m in train_logs for k in m
                        if k.startswith("train/") and k != "train/consistency_weight"},
                       key=lambda k: (k != "train/loss", k))
    for k in loss_keys:
        x, y = _series(train_logs, k)
        ax_loss.plot(x, y, label=k[len("train/"):], linewidth=1.6 if k == "train/loss" else 1.0)
    ax_loss.set_title("training losses", fontsize=10)
    for ax, metric, label in ((ax_dice, "dice", "validation Dice"), (ax_hd, "hd95", "validation HD95")):
        x, y = _series(val_rows, f"val/{metric}")
        ax.plot(x, y, marker="o", markersize=3, color="black", label="mean")
        for name, color in zip(names, class_colors(len(names) + 1)):
            x, y = _series(val_rows, f"val/{metric}_{name}")
            if x:
                ax.plot(x, y, linestyle="--", linewidth=1.0, color=color, label=name)
        ax.set_title(label, fontsize=10)
    x, y = _series(val_rows, "val/dice")
    if x:
        best = int(np.argmax(y))
        ax_dice.plot([x[best]], [y[best]], marker="*", markersize=12, color="gold", markeredgecolor="black",
                     linestyle="none", label=f"best {y[best]:.4f} @ {x[best]}")
    # where the curves are not once training has gone a while: Dice rises, losses and HD95 fall
    for ax, corner in ((ax_loss, "upper right"), (ax_dice, "lower right"), (ax_hd, "upper right")):
        ax.set_xlabel("iteration", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7, loc=corner)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_learning_curves_png(path: str | Path, train_logs: Sequence[tuple[int, dict[str, float]]],
                              history: Sequence[dict[str, float]], **kwargs) -> Path:
    """`learning_curves_figure(...)` saved as a PNG at `path` (1500 x 420 px)."""
    return save_figure(learning_curves_figure(train_logs, history, **kwargs), path)


if __name__ == "__main__":  # the name sounds like a command; say where the pictures come from instead
    from raysemi.errors import not_a_command

    raise SystemExit(not_a_command("raysemi.visualize", "training and search write the pictures themselves "
                                   "(overlays/ and plots/ in each run folder, and in MLflow; README: Pictures in "
                                   "MLflow)"))
