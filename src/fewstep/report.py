"""Reports: markdown tables, log-log plots of error vs NFE, and image grids of samples."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

__all__ = ["markdown_table", "plot_error_vs_nfe", "plot_image_grid", "tile"]


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
    """One line per solver, log-log axes, saved as PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, (nfes, errs) in series.items():
        ax.loglog(list(nfes), list(errs), marker="o", label=label)
    ax.set_xlabel("NFE (model evaluations per sample)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def tile(images: "np.ndarray", cols: int, pad: int = 1) -> "np.ndarray":
    """Images (n, h, w) as one mosaic with ``cols`` columns and ``pad`` pixels of background between."""
    import numpy as np

    n, h, w = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), np.nan)
    for k in range(n):
        r, c = divmod(k, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[k]
    return out


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
    converged samples) is drawn as an extra first column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(cells)
    nfes = sorted({n for row in cells.values() for n in row})
    columns: list[str | int] = (["reference"] if reference is not None else []) + nfes  # type: ignore[operator]
    fig, axes = plt.subplots(len(labels), len(columns), figsize=(1.5 * len(columns) + 1.2, 1.5 * len(labels) + 0.6), dpi=110, squeeze=False)
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="white")
    for i, label in enumerate(labels):
        for j, col in enumerate(columns):
            ax = axes[i][j]
            imgs = reference if col == "reference" else cells[label].get(int(col))
            if imgs is not None:
                ax.imshow(tile(imgs, cols), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col if col == "reference" else f"NFE {col}", fontsize=9)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
