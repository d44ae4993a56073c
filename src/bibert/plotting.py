"""The PNG of a run's training curves: the loss and its parts, and each evaluation's metric.

matplotlib with the Agg backend (no display needed), imported only when a plot is drawn.
"""
from __future__ import annotations

from pathlib import Path


def plot_training_curves(history: list[dict], evaluations: list[dict], metric: str, path: str | Path) -> None:
    """history: [{"step", "loss", <part>: value, ...}] logged during training;
    evaluations: [{"step", metric: value, ...}] of the first dev split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        steps = [h["step"] for h in history]
        parts = [k for k in history[0] if k not in ("step", "lr", "flip")]
        for name in parts:
            ax_loss.plot(steps, [h[name] for h in history], label=name, lw=2 if name == "loss" else 1)
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=8)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss and its parts")
    scored = [e for e in evaluations if metric in e]
    if scored:
        ax_metric.plot([e["step"] for e in scored], [e[metric] for e in scored], marker="o")
    ax_metric.set(xlabel="step", ylabel=metric, title=f"dev {metric}")
    ax_metric.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
