"""The report's figures as PNG bytes (matplotlib, off-screen)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

DPI = 110
MAX_LEGEND = 20  # categories shown by name; the rest are drawn grey as "other"


def _pyplot():
    from scvi_cli.report import require

    require("matplotlib")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buffer.getvalue()


def training_curves(history: dict[str, list[float]]) -> bytes:
    """Four panels per epoch: negative ELBO, reconstruction, KL (train and validation) and the KL weight."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    panels = [("elbo", "negative ELBO per cell"), ("reconstruction_loss", "reconstruction NLL per cell"),
              ("kl_local", "KL(q(z|x) || p(z)) per cell")]
    for ax, (name, title) in zip(axes, panels):
        for split, style in (("train", "-"), ("validation", "--")):
            values = np.asarray(history.get(f"{name}_{split}", []), dtype=float)
            # validation may run every n epochs only (NaN between); a NaN of training is a gap
            measured = np.flatnonzero(~np.isnan(values)) if split == "validation" else np.arange(len(values))
            if len(measured):
                ax.plot(measured, values[measured], style, marker="." if len(measured) < len(values) else None, label=split)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if ax.get_lines():  # a history without this metric leaves the panel empty
            ax.legend(fontsize=8)
    weight = history.get("kl_weight", [])
    axes[3].plot(np.arange(len(weight)), weight, color="tab:green")
    axes[3].set_ylim(-0.02, 1.05)
    axes[3].set_title("KL weight (warm-up)", fontsize=10)
    axes[3].set_xlabel("epoch")
    fig.tight_layout()
    return _png(fig)


def latent_map(coordinates: np.ndarray, values: pd.Series, key: str, method: str) -> bytes:
    """A 2-D map of the cells coloured by one obs column (categories, or a colour scale for numbers)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    size = max(1.0, min(12.0, 30000 / max(len(coordinates), 1)))
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype) and values.nunique() > 20:
        points = ax.scatter(coordinates[:, 0], coordinates[:, 1], c=values.to_numpy(dtype=float), s=size, cmap="viridis", linewidths=0)
        fig.colorbar(points, ax=ax, shrink=0.8)
    else:
        text = values.astype(str)
        counts = text.value_counts()
        shown = list(counts.index[:MAX_LEGEND])
        palette = plt.get_cmap("tab20" if len(shown) > 10 else "tab10")
        order = np.random.default_rng(0).permutation(len(text))  # no category painted over the others
        colours = np.full((len(text), 4), (0.75, 0.75, 0.75, 1.0))
        for i, name in enumerate(shown):
            colours[(text == name).to_numpy()] = palette(i % palette.N)
        ax.scatter(coordinates[order, 0], coordinates[order, 1], c=colours[order], s=size, linewidths=0)
        for i, name in enumerate(shown):
            ax.scatter([], [], color=palette(i % palette.N), label=f"{name} ({counts[name]})", s=20)
        if len(counts) > len(shown):
            ax.scatter([], [], color=(0.75, 0.75, 0.75), label=f"{len(counts) - len(shown)} more", s=20)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(f"{method} of the latent, coloured by {key}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def per_group_bars(groups: Sequence[str], values: Sequence[float], title: str, reference: float | None, xlabel: str) -> bytes:
    """Horizontal bars of one score per group, with a dashed line at ``reference``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(groups) + 1.2))
    ax.barh(np.arange(len(groups)), values, color="tab:blue")
    ax.set_yticks(np.arange(len(groups)), labels=list(groups), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    if reference is not None:
        ax.axvline(reference, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)
