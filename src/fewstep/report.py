"""Reports: markdown tables and log-log plots of error vs NFE."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["markdown_table", "plot_error_vs_nfe"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
