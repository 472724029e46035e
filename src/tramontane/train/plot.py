"""The loss curves of a fine-tuning run as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_losses(history: Any, path: str | Path) -> Path:
    """Train loss per step and eval loss at its steps, one chart, written to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never opens a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if history.train:
            ax.plot([r["step"] for r in history.train], [r["loss"] for r in history.train], label="train")
        if history.eval:
            ax.plot([r["step"] for r in history.eval], [r["loss"] for r in history.eval], "o-", label="eval")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps are whole numbers
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean cross-entropy per target token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return Path(path)
