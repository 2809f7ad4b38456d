"""Figures shared by the bench outputs and the HTML report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_scatter(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Clean accuracy vs ASR after each defense, one point per method x model (cf. Sha et al. Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]  # a failed cell has no point to plot
    sizes = sorted({r["clean_images"] for r in rows}, reverse=True) or [0]
    methods = sorted({r["method"] for r in rows})
    models = sorted({r["model"] for r in rows})
    markers = "osD^v<>pP*Xh"
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.6), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes, strict=True):
        for m, method in enumerate(methods):
            for k, model in enumerate(models):
                cells = [r for r in rows if r["clean_images"] == size and r["method"] == method
                         and r["model"] == model]
                for cell in cells:
                    ax.scatter(cell["asr_after"] * 100, cell["ca_after"] * 100, color=colors(m % 10),
                               marker=markers[k % len(markers)], s=42, alpha=0.85,
                               label=method if k == 0 else None)
        ax.set_title(f"{size} clean images")
        ax.set_xlabel("ASR after defense (%)")
        ax.set_xlim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("clean accuracy after defense (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    model_keys = [plt.Line2D([], [], color="gray", marker=markers[k % len(markers)], linestyle="", label=model)
                  for k, model in enumerate(models)]
    fig.legend(handles + model_keys, labels + models, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
