"""Checkpoint (+ data) -> the report's content -> one HTML file with its images inlined."""

from __future__ import annotations

import base64
import re
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scvi_cli.checkpoint import final_metrics
from scvi_cli.errors import UsageError
from scvi_cli.report import figures, umap_available

DEFAULT_MAX_CELLS = 10_000
MIN_UMAP_CELLS = 10  # below this UMAP's spectral start fails; PCA is used
MIXING_K, PURITY_K = 50, 15


@dataclass
class Report:
    title: str
    card: list[tuple[str, str]]  # (field, value) rows of the model card
    spec_yaml: str
    warnings: list[str]
    images: list[tuple[str, str, bytes]] = field(default_factory=list)  # (file stem, caption, PNG)
    notes: list[str] = field(default_factory=list)  # what the figures show and how they were made
    metrics: list[tuple[str, str, str]] = field(default_factory=list)  # (name, value, definition)


def training_warnings(checkpoint) -> list[str]:
    """What a person should know before trusting the model, from its history and facts."""
    history, training, spec = checkpoint.history, checkpoint.training, checkpoint.spec
    warnings = []
    weights = history.get("kl_weight", [])
    if weights and weights[-1] < 1.0:
        warmup = spec.get("train", {}).get("kl_warmup_epochs")
        cause = (
            "train.max_epochs was left to the heuristic, which gives fewer epochs above about 20k cells (under 160 above 50k)"
            if spec.get("train", {}).get("max_epochs") is None else "train.max_epochs is below train.kl_warmup_epochs"
        )
        warnings.append(
            f"The KL weight never reached 1 (last epoch: {weights[-1]:.3g}): {training.get('epochs_run', len(weights))} "
            f"epochs ran against a KL warm-up of {warmup} ({cause}), so the latent is regularised less than the "
            "ELBO assumes; set train.max_epochs at or above train.kl_warmup_epochs, or lower the warm-up."
        )
    validation = np.asarray(history.get("elbo_validation", []), dtype=float)
    measured = np.flatnonzero(~np.isnan(validation))  # epochs with a validation pass
    validation = validation[measured]
    if len(validation) >= 10:  # a sustained rise, not one noisy pass: the last 5 passes' mean
        best, tail = int(np.argmin(validation)), float(np.mean(validation[-5:]))
        if best < len(validation) - 5 and tail > validation[best] * 1.01:
            warnings.append(
                f"The validation negative ELBO was lowest at epoch {measured[best]} ({validation[best]:.2f}); its mean over "
                f"the last 5 validation passes is {tail - validation[best]:.2f} higher: the model may overfit (train.early_stopping)."
            )
    if training.get("stopped_early"):
        warnings.append(f"Early stopping ended training at epoch {training.get('epochs_run')}; the weights are those of epoch {training.get('best_epoch')}.")
    if not history:
        warnings.append("The checkpoint holds no training history (an imported model): no curves.")
    return warnings


def model_card(path: Path, checkpoint) -> list[tuple[str, str]]:
    training = checkpoint.training
    genes = checkpoint.gene_names
    rows = [
        ("checkpoint", str(path)),
        ("model type", checkpoint.model_type),
        ("genes", f"{len(genes)} ({', '.join(genes[:6])}{', ...' if len(genes) > 6 else ''})"),
    ]
    for key, values in checkpoint.categories.items():
        shown = ", ".join(values[:12]) + (f", ... ({len(values)} in all)" if len(values) > 12 else "")
        rows.append((f"categories: {key}", shown))
    if training:
        rows += [
            ("epochs", f"{training.get('epochs_run')} of {training.get('max_epochs')}"
                       + (f", stopped early (best epoch {training.get('best_epoch')})" if training.get("stopped_early") else "")),
            ("cells", f"{training.get('n_train')} train / {training.get('n_validation')} validation (of {training.get('n_cells')})"),
            ("training time", f"{training.get('seconds')} s on {training.get('device')} ({training.get('threads')} threads)"),
            ("seed", str(training.get("seed"))),
            ("trained on", str(training.get("source"))),
        ]
        mapping = training.get("mapping")
        if isinstance(mapping, dict):
            new = "; ".join(f"{k}: {', '.join(v)}" for k, v in mapping.get("new_categories", {}).items()) or "none"
            rows.append(("mapped onto", f"{mapping.get('reference')} (sha256 {str(mapping.get('reference_sha256'))[:16]}...), new categories {new}"))
    final = final_metrics(checkpoint.history)
    if final:
        rows.append(("last epoch", ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k != "seconds")))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in checkpoint.versions.items())))
    return rows


def subsample(n_cells: int, max_cells: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``max_cells`` cells, drawn without replacement under ``seed``."""
    if n_cells <= max_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, size=max_cells, replace=False))


def two_dimensional(latent: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """(cells x 2 coordinates, a description): UMAP when asked for or available, else PCA."""
    if method == "auto":
        method = "umap" if umap_available() and len(latent) >= MIN_UMAP_CELLS else "pca"
    if method == "umap" and len(latent) < MIN_UMAP_CELLS:
        raise UsageError(f"--map umap needs at least {MIN_UMAP_CELLS} cells, the sample has {len(latent)} (use --map pca)")
    if method == "umap":
        from scvi_cli.report import require

        require("umap")
        import umap

        neighbours = min(15, len(latent) - 1)
        coordinates = umap.UMAP(n_neighbors=neighbours, random_state=seed, n_jobs=1).fit_transform(latent)
        return np.asarray(coordinates), f"UMAP (umap-learn, {neighbours} neighbours, random_state {seed})"
    centred = latent - latent.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    note = "PCA (first two principal components)" + ("" if umap_available() else "; install the report extra for a UMAP")
    return centred @ vt[:2].T, note


def build_report(
    model_path: str | Path,
    data_path: str | Path | None = None,
    *,
    colors: list[str] | None = None,
    labels_key: str | None = None,
    max_cells: int = DEFAULT_MAX_CELLS,
    seed: int = 0,
    map_method: str = "auto",
    device="cpu",
    allow_missing_genes: bool = False,
    backed: bool = False,
    trained=None,
) -> Report:
    """Everything the page shows. With data, the latent of up to ``max_cells`` cells (a seeded
    sample) is mapped to 2-D and scored for batch mixing and label purity."""
    from scvi_cli.apply.integration import label_purity_per_cell, mixing_entropy_per_cell, proportions_entropy
    from scvi_cli.errors import DataError
    from scvi_cli.apply import queries
    from scvi_cli.trained_model import kept_obs, load_trained_model

    import yaml

    path = Path(model_path)
    trained = trained or load_trained_model(path, device=device)
    checkpoint = trained.checkpoint
    report = Report(
        title=f"scvi-cli report: {path.name}",
        card=model_card(path, checkpoint),
        spec_yaml=yaml.safe_dump(checkpoint.spec, sort_keys=False),
        warnings=training_warnings(checkpoint),
    )
    if checkpoint.history:
        report.images.append(("training_curves", "Training curves per epoch (validation dashed).", figures.training_curves(checkpoint.history)))
    if data_path is None:
        return report
    adata, data = trained.load_query(data_path, allow_missing_genes, backed=backed, keep_counts=False)
    obs = kept_obs(adata, data)
    spec = trained.spec.data
    if colors is None:
        colors = [k for k in (spec.batch_key, labels_key or spec.labels_key) if k is not None and k in obs.columns]
    missing = [k for k in colors if k not in obs.columns]
    if missing:
        raise DataError(f"{data_path}: obs has no column {missing[0]!r} (--color)")
    if labels_key is not None and labels_key not in obs.columns:
        raise DataError(f"{data_path}: obs has no column {labels_key!r} (--labels-key)")
    cells = subsample(data.n_cells, max_cells, seed)
    started = time.perf_counter()
    latent = np.concatenate(list(queries.iter_latent(trained.module, data, device=device, cells=cells)))
    coordinates, method = two_dimensional(latent, map_method, seed)
    sample = obs.iloc[cells]
    report.notes.append(
        f"{len(cells):,} of {data.n_cells:,} cells of {data_path}"
        + (f" (a random sample, seed {seed}; --max-cells {max_cells})" if len(cells) < data.n_cells else "")
        + f"; latent: posterior mean of z; map: {method}; {time.perf_counter() - started:.1f} s."
    )
    for key in colors or []:
        report.images.append((f"latent_{key}", f"Latent map coloured by obs[{key!r}].", figures.latent_map(coordinates, sample[key], key, method.split(" ")[0])))
    if not colors:
        report.images.append(("latent", "Latent map.", figures.latent_map(coordinates, pd.Series(["cells"] * len(cells)), "cells", method.split(" ")[0])))
    batch_key = spec.batch_key
    if batch_key is not None and batch_key in sample.columns and sample[batch_key].nunique() > 1 and len(cells) > MIXING_K:
        groups = sample[batch_key].astype(str).to_numpy()
        per_cell = mixing_entropy_per_cell(latent, groups, k=MIXING_K)
        random_level = proportions_entropy(groups)
        names = sorted(set(groups))
        report.metrics.append((
            f"batch mixing ({batch_key})", f"{per_cell.mean():.3f} (random neighbourhoods: {random_level:.3f})",
            f"mean over cells of the entropy of the {batch_key} values among the cell's {MIXING_K} nearest other "
            "cells in the latent, divided by log(number of batches): 0 when neighbourhoods hold one batch, "
            "the entropy of the batch proportions when they are random samples of all cells",
        ))
        report.images.append((
            "batch_mixing", f"Batch mixing by {batch_key}: the mean of the cells of each batch (dashed: random neighbourhoods).",
            figures.per_group_bars(names, [float(per_cell[groups == n].mean()) for n in names], f"batch mixing ({MIXING_K}-NN entropy)", random_level, "normalised entropy"),
        ))
    label = labels_key or spec.labels_key
    if label is not None and label in sample.columns and sample[label].nunique() > 1 and len(cells) > PURITY_K:
        labels = sample[label].astype(str).to_numpy()
        per_cell = label_purity_per_cell(latent, labels, k=PURITY_K)
        names = sorted(set(labels))
        report.metrics.append((
            f"label purity ({label})", f"{per_cell.mean():.3f}",
            f"mean over cells of the share of the cell's {PURITY_K} nearest other cells in the latent that carry its {label}",
        ))
        report.images.append((
            "label_purity", f"Label purity by {label}: the mean of the cells of each label.",
            figures.per_group_bars(names, [float(per_cell[labels == n].mean()) for n in names], f"label purity ({PURITY_K}-NN)", None, "share of neighbours with the same label"),
        ))
    return report


# ---------------------------------------------------------------------------------------------
# The page

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #eee;
text-align: left; vertical-align: top; } th { white-space: nowrap; }
.warning { background: #fff4e0; border-left: 4px solid #e69500; padding: 0.5em 1em; margin: 0.5em 0; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; } img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def render_html(report: Report) -> str:
    """The page: valid HTML5, inline CSS, images as data URIs; nothing is fetched to view it."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(report.title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{e(report.title)}</h1>",
    ]
    if report.warnings:
        parts.append("<h2>Warnings</h2>")
        parts += [f'<div class="warning">{e(w)}</div>' for w in report.warnings]
    parts.append("<h2>Model card</h2><table>")
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in report.card]
    parts.append("</table>")
    if report.metrics:
        parts.append("<h2>Integration</h2><table><tr><th>metric</th><th>value</th><th>definition</th></tr>")
        parts += [f"<tr><th>{e(n)}</th><td>{e(v)}</td><td>{e(d)}</td></tr>" for n, v, d in report.metrics]
        parts.append("</table>")
    if report.images:
        parts.append("<h2>Figures</h2>")
        parts += [f"<p>{e(note)}</p>" for note in report.notes]
        for stem, caption, png in report.images:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure id="{e(stem)}"><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append(f"<h2>Resolved spec</h2><pre>{e(report.spec_yaml)}</pre>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(report: Report, out: str | Path, png_dir: str | Path | None = None) -> list[Path]:
    """Write the page atomically (and each figure as PNG_DIR/<name>.png); returns the PNGs written."""
    from scvi_cli.atomic import atomic_write

    written = []
    if png_dir is not None:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
        for stem, _, png in report.images:
            target = Path(png_dir) / (re.sub(r"[^A-Za-z0-9_.-]", "_", stem) + ".png")
            with atomic_write(target) as tmp:
                Path(tmp).write_bytes(png)
            written.append(target)
    with atomic_write(out) as tmp:
        Path(tmp).write_text(render_html(report), encoding="utf-8")
    return written


def summary(report: Report) -> str:
    return json.dumps({"warnings": report.warnings, "metrics": {n: v for n, v, _ in report.metrics},
                       "figures": [stem for stem, _, _ in report.images]})
