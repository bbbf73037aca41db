"""PNG of the training curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os

from mta_kernels.distill.metrics import read_metrics as _read


def plot_runs(runs: dict[str, str], out_png: str) -> str | None:
    """Plot the train loss, its terms, the held-out perplexity (and ROUGE-L) of one or more runs.

    Args:
        runs: label -> path of a ``metrics.jsonl``.
        out_png: where to write the figure.
    Returns:
        ``out_png``, or ``None`` when matplotlib is not installed (the run itself does not need it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = {label: _read(path) for label, path in runs.items() if os.path.exists(path)}
    rouge = any(r.get("eval_rougeL") is not None for recs in records.values() for r in recs)
    fig, axes = plt.subplots(1, 4 if rouge else 3, figsize=(18 if rouge else 14, 4))
    for label, recs in records.items():
        train = [r for r in recs if r["kind"] == "train"]
        evals = [r for r in recs if r["kind"] == "eval"]
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train], label=f"{label}: total")
        axes[0].plot(steps, [r["ce"] for r in train], "--", label=f"{label}: CE")
        if any(r.get("kd") is not None for r in train):
            axes[1].plot(steps, [r["kd"] for r in train], label=f"{label}: KD")
        if any(r.get("mta") is not None for r in train):
            axes[1].plot(steps, [r["mta"] for r in train], label=f"{label}: MTA")
        if evals:
            axes[2].plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], "o-", label=label)
        scored = [r for r in evals if r.get("eval_rougeL") is not None]
        if scored:
            axes[3].plot([r["step"] for r in scored], [r["eval_rougeL"] for r in scored], "o-", label=label)
    axes[0].set_title("training loss")
    axes[1].set_title("distillation terms")
    axes[2].set_title("held-out perplexity")
    axes[2].set_yscale("log")
    if rouge:
        axes[3].set_title("held-out ROUGE-L (--eval-gen)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
