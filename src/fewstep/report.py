"""Reports and pictures: markdown tables, log-log plots of error vs NFE, per-solver sample grids,
and the one image-grid routine (:func:`tile`) that both the report figures and the command line's
``.png`` / ``.jpg`` outputs (:func:`write_image_grid`) draw with."""

from __future__ import annotations

import io
import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ArgumentError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .models import Model

__all__ = ["markdown_table", "plot_error_vs_nfe", "plot_image_grid", "tile", "IMAGE_SUFFIXES", "is_image_shape", "images_of", "unit_images",
           "write_image_grid", "default_scale"]

#: file suffixes written as a picture (a grid of samples); the format follows the suffix
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _save(fig: "object", path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()  # type: ignore[attr-defined]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path


def plot_error_vs_nfe(
    series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, title: str, ylabel: str = "RMSE vs reference"
) -> Path:
    """One connected line per solver (points sorted by NFE), log-log axes with the NFEs run as plain
    tick labels (5, 10, 20, 50), saved as PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ticks: set[float] = set()
    for label, (nfes, errs) in series.items():
        points = sorted(zip(nfes, errs))
        ax.loglog([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ticks.update(float(p[0]) for p in points)
    ax.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (model evaluations per sample)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend()
    return _save(fig, path)


def tile(images: "np.ndarray", cols: int, pad: int = 1, fill: float = float("nan")) -> "np.ndarray":
    """Images (n, h, w) or (n, h, w, channels) as one mosaic, row by row with ``cols`` columns and
    ``pad`` pixels of ``fill`` between the tiles and around them: tile ``k`` (row ``k // cols``,
    column ``k % cols``) starts at pixel ``(pad + row * (h + pad), pad + column * (w + pad))``."""
    import numpy as np

    images = np.asarray(images, dtype=np.float64)
    if images.ndim not in (3, 4) or images.shape[0] < 1:
        raise ArgumentError(f"tile takes images shaped (n, h, w) or (n, h, w, c) with n >= 1, got {images.shape}")
    if cols < 1 or pad < 0:
        raise ArgumentError(f"tile needs cols >= 1 and pad >= 0, got cols={cols}, pad={pad}")
    n, h, w = images.shape[:3]
    cols = min(cols, n)
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, *images.shape[3:]), fill, dtype=np.float64)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + h, x:x + w] = images[k]
    return out


def is_image_shape(shape: Sequence[int]) -> bool:
    """Is a sample shape (without the batch) a picture: ``(C, H, W)`` with ``C`` 1 or 3, or ``(H, W)``?"""
    shape = tuple(int(s) for s in shape)
    return (len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 1) or (len(shape) == 2 and min(shape) >= 1)


def _bundled_pixels(model: "Model") -> float | None:
    """The pixel maximum of a bundled digits model's ``to_images`` (0..16), else ``None``."""
    from .zoo.data import PIXEL_MAX, to_images

    return PIXEL_MAX if getattr(model, "_to_images", None) is to_images else None


def images_of(model: "Model", x: "torch.Tensor | None" = None, *, shape: Sequence[int] | None = None) -> "np.ndarray | None":
    """Samples of ``model`` as images with values in [0, 1], shaped (n, H, W) (grey) or (n, H, W, 3).

    The bundled digits models map their samples with ``model.to_images`` (pixel values 0..16, read as
    0..1); any other model's samples of an image shape (:func:`is_image_shape`) are read as values in
    [-1, 1] (clamped). Without ``x``: only checks that the samples (``shape``, default
    ``model.sample_shape``) can be drawn (an :class:`~fewstep.ArgumentError` otherwise) and returns ``None``."""
    import torch

    top = _bundled_pixels(model)
    sample_shape = tuple(shape if shape is not None else (model.sample_shape or ()))
    if top is None and not is_image_shape(sample_shape):
        raise ArgumentError(f"samples of shape {sample_shape} are not images (a picture needs (C, H, W) with C 1 or 3, or (H, W)): "
                            "write them as .npy or .safetensors instead")
    if x is None:
        return None
    if top is not None:
        return model.to_images(x).detach().cpu().to(torch.float64).numpy() / top
    return unit_images(x)


def unit_images(x: "torch.Tensor | np.ndarray") -> "np.ndarray":
    """Image-shaped samples (n, C, H, W) with C 1 or 3, or (n, H, W), in [-1, 1] as values in [0, 1]
    (clamped), shaped (n, H, W) or (n, H, W, 3)."""
    import numpy as np

    a = x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)
    if not is_image_shape(a.shape[1:]):
        raise ArgumentError(f"samples of shape {tuple(a.shape[1:])} are not images")
    if a.ndim == 4:
        a = a[:, 0] if a.shape[1] == 1 else np.moveaxis(a, 1, -1)
    return np.clip((a + 1.0) / 2.0, 0.0, 1.0)


def default_scale(images: "np.ndarray") -> int:
    """Nearest-neighbour upscaling that makes a tile at least 64 pixels on its longer side (8 for 8x8)."""
    return max(1, math.ceil(64 / max(images.shape[1], images.shape[2])))


def write_image_grid(images: "np.ndarray", path: str | Path, *, cols: int | None = None, scale: int | None = None, pad: int = 2) -> Path:
    """Write images (n, H, W) or (n, H, W, 3), values in [0, 1], as one picture: each image upscaled
    ``scale`` times by nearest neighbour (default :func:`default_scale`), laid out by :func:`tile` with
    ``cols`` columns (default ``ceil(sqrt(n))``) and ``pad`` white pixels between and around; a pixel
    value ``v`` becomes ``round(255 v)``. The format follows the suffix (.png, .jpg / .jpeg); written
    atomically. Needs Pillow (installed with matplotlib: the ``report`` extra)."""
    import numpy as np

    from .atomic import write_atomic

    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    if fmt is None:
        raise ArgumentError(f"{str(path)!r}: a picture is written as {', '.join(IMAGE_SUFFIXES)}")
    images = np.asarray(images, dtype=np.float64)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise ArgumentError(f"images must be shaped (n, H, W) or (n, H, W, 3), got {images.shape}")
    scale = default_scale(images) if scale is None else scale
    cols = math.ceil(math.sqrt(images.shape[0])) if cols is None else cols
    if scale < 1 or cols < 1:
        raise ArgumentError(f"scale and cols must be positive, got scale={scale}, cols={cols}")
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = np.round(np.clip(tile(big, cols, pad, fill=1.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise ArgumentError("writing a picture needs Pillow: pip install 'fewstep[report]'") from None
    buf = io.BytesIO()
    Image.fromarray(grid, mode="RGB" if grid.ndim == 3 else "L").save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return write_atomic(path, buf.getvalue())


def _wrap_label(label: str, width: int = 18) -> str:
    """A solver label on lines of about ``width`` characters, broken after ``:`` / ``,`` / spaces where it can."""
    pieces = [p for p in re.split(r"(?<=[:, ])", label) if p]
    lines = [""]
    for piece in pieces:
        if lines[-1] and len(lines[-1]) + len(piece.rstrip()) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(textwrap.fill(line.strip(), width) for line in lines)


def plot_image_grid(
    cells: dict[str, dict[int, "np.ndarray"]],
    path: str | Path,
    *,
    title: str,
    vmin: float = 0.0,
    vmax: float = 16.0,
    reference: "np.ndarray | None" = None,
    cols: int = 4,
) -> Path:
    """One row per solver, one column per NFE; each cell a mosaic of the same samples (n, h, w),
    so the effect of the solver and of the NFE can be read side by side. ``reference`` (the
    converged samples) is drawn as an extra first column. Row labels are horizontal, wrapped, and
    kept inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(cells)
    nfes = sorted({n for row in cells.values() for n in row})
    columns: list[str | int] = (["reference"] if reference is not None else []) + nfes  # type: ignore[operator]
    wrapped = [_wrap_label(label) for label in labels]
    margin = 0.25 + 0.075 * max((len(line) for w in wrapped for line in w.splitlines()), default=0)  # inches for the row labels
    fig, axes = plt.subplots(len(labels), len(columns), figsize=(1.5 * len(columns) + margin + 0.4, 1.5 * len(labels) + 0.6), dpi=110,
                             squeeze=False)
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="white")
    for i, label in enumerate(wrapped):
        for j, col in enumerate(columns):
            ax = axes[i][j]
            imgs = reference if col == "reference" else cells[labels[i]].get(int(col))
            if imgs is not None:
                ax.imshow(tile(imgs, cols), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col if col == "reference" else f"NFE {col}", fontsize=9)
            if j == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
