"""`scvi-cli report`: the content, the HTML, the PNGs, and the page as a browser renders it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the report extra (matplotlib) is not installed")

from scvi_cli import report as report_package  # noqa: E402
from scvi_cli.checkpoint import Checkpoint  # noqa: E402
from scvi_cli.report.build import render_html, subsample, training_warnings  # noqa: E402

from conftest import PBMC_SMALL  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VOID = {"meta", "img", "br", "hr", "link", "input"}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


class _Structure(HTMLParser):
    """Balanced tags, and every resource inline."""

    def __init__(self):
        super().__init__()
        self.stack, self.problems, self.images = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if name in attrs and not attrs[name].startswith(("data:", "#")):
                self.problems.append(f"external {name}: {attrs[name][:40]}")
        if tag == "img":
            self.images.append(attrs)
            if not attrs.get("alt"):
                self.problems.append("img without alt")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(f"unbalanced </{tag}>")


def _checked(html_text: str) -> _Structure:
    assert html_text.startswith("<!DOCTYPE html>\n<html lang=\"en\">")
    assert '<meta charset="utf-8">' in html_text and "<title>" in html_text
    parser = _Structure()
    parser.feed(html_text)
    assert not parser.problems and not parser.stack, (parser.problems, parser.stack)
    return parser


def _checkpoint(**history) -> Checkpoint:
    return Checkpoint(model_type="scvi", spec={"train": {"kl_warmup_epochs": 400}}, model_kwargs={}, gene_names=["g"],
                      categories={}, state_dict={}, history=history, training={"epochs_run": len(history.get("kl_weight", []))})


def test_warnings_say_when_the_kl_weight_never_reached_one():
    warnings = training_warnings(_checkpoint(kl_weight=[0.0, 0.0025, 0.005]))
    assert any("KL weight never reached 1" in w and "3 epochs ran against a KL warm-up of 400" in w for w in warnings)
    assert training_warnings(_checkpoint(kl_weight=[0.5, 1.0])) == []
    rising = list(np.linspace(100, 50, 10)) + [60.0] * 5
    assert any("overfit" in w for w in training_warnings(_checkpoint(kl_weight=[1.0] * 15, elbo_validation=rising)))
    one_noisy_epoch = list(np.linspace(100, 50, 14)) + [60.0]
    assert not training_warnings(_checkpoint(kl_weight=[1.0] * 15, elbo_validation=one_noisy_epoch))
    assert any("no training history" in w for w in training_warnings(_checkpoint()))
    # validation every 2 epochs: NaN between passes; the rise is read over the passes, named by epoch
    sparse = [v for pair in zip([np.nan] * 15, rising) for v in pair]
    warning = [w for w in training_warnings(_checkpoint(kl_weight=[1.0] * 30, elbo_validation=sparse)) if "overfit" in w]
    assert len(warning) == 1 and "lowest at epoch 19 (50.00)" in warning[0] and "last 5 validation passes" in warning[0]
    sparse_noise = [v for pair in zip([np.nan] * 15, one_noisy_epoch) for v in pair]
    assert not training_warnings(_checkpoint(kl_weight=[1.0] * 30, elbo_validation=sparse_noise))


def test_training_curves_draw_sparse_validation_at_its_epochs(monkeypatch):
    from scvi_cli.report import figures

    drawn = {}

    def keep(fig):
        drawn["fig"] = fig
        return b"png"

    monkeypatch.setattr(figures, "_png", keep)
    nan = float("nan")
    history = {"elbo_train": [5.0, 4.0, 3.0, 2.5, 2.0], "elbo_validation": [nan, 4.5, nan, 3.5, 3.0], "kl_weight": [1.0] * 5}
    assert figures.training_curves(history) == b"png"
    train_line, validation_line = drawn["fig"].axes[0].get_lines()
    assert train_line.get_xdata().tolist() == [0, 1, 2, 3, 4]
    assert validation_line.get_xdata().tolist() == [1, 3, 4] and validation_line.get_ydata().tolist() == [4.5, 3.5, 3.0]
    assert validation_line.get_marker() == "."


def test_subsample_is_seeded_and_bounded():
    a, b = subsample(1_000_000, 5000, 3), subsample(1_000_000, 5000, 3)
    assert np.array_equal(a, b) and len(np.unique(a)) == 5000 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, subsample(1_000_000, 5000, 4))
    assert np.array_equal(subsample(10, 5000, 0), np.arange(10))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from scvi_cli.cli import main

    root = tmp_path_factory.mktemp("report")
    with pytest.raises(SystemExit) as done:
        main(["train", str(PBMC_SMALL), "--out", str(root / "m.ckpt"), "--set", "data.batch_key=batch",
              "--set", "data.labels_key=cell_type", "--set", "train.max_epochs=4", "-q"])
    assert done.value.code == 0
    return root / "m.ckpt"


def test_report_command_writes_a_self_contained_page_and_pngs(run_cli, model, tmp_path, monkeypatch):
    monkeypatch.setattr(report_package, "umap_available", lambda: False)
    monkeypatch.setattr("scvi_cli.report.build.umap_available", lambda: False)
    out, pngs = tmp_path / "r.html", tmp_path / "figures"
    code, _, err = run_cli("report", model, PBMC_SMALL, "--out", out, "--png-dir", pngs, "--color", "nCount_RNA")
    assert code == 0, err
    assert "warning: The KL weight never reached 1" in err and f"wrote {out}" in err
    text = out.read_text()
    parser = _checked(text)
    for expected in ("Model card", "categories: batch", "Integration", "batch mixing (batch)", "label purity (cell_type)",
                     "PCA (first two principal components); install the report extra for a UMAP", "Resolved spec"):
        assert expected in text, expected
    files = sorted(p.name for p in pngs.iterdir())
    assert files == ["batch_mixing.png", "label_purity.png", "latent_nCount_RNA.png", "training_curves.png"]
    assert len(parser.images) == 4
    for attrs, name in zip(parser.images, ["training_curves", "latent_nCount_RNA", "batch_mixing", "label_purity"]):
        inline = base64.b64decode(attrs["src"].split(",", 1)[1])
        assert inline == (pngs / f"{name}.png").read_bytes()
        width, height = _png_size(inline)
        assert width > 300 and height > 150
    # without data: card, warnings and curves only
    code, _, err = run_cli("report", model, "--out", tmp_path / "card.html", "-q")
    assert code == 0 and "Integration" not in (tmp_path / "card.html").read_text()


def test_report_default_colours_and_sampling(run_cli, model, tmp_path, monkeypatch):
    monkeypatch.setattr("scvi_cli.report.build.umap_available", lambda: False)
    out = tmp_path / "r.html"
    assert run_cli("report", model, PBMC_SMALL, "--out", out, "--max-cells", "60", "--seed", "2", "-q")[0] == 0
    text = out.read_text()
    assert 'id="latent_batch"' in text and 'id="latent_cell_type"' in text
    assert "60 of 80 cells" in text and "seed 2; --max-cells 60" in text
    # too few cells for UMAP: auto takes PCA
    monkeypatch.setattr("scvi_cli.report.build.umap_available", lambda: True)
    assert run_cli("report", model, PBMC_SMALL, "--out", out, "--max-cells", "3", "-q")[0] == 0
    assert "map: PCA" in out.read_text()


def test_report_bad_inputs(run_cli, model, tmp_path):
    code, _, err = run_cli("report", model, PBMC_SMALL, "--out", tmp_path / "r.html", "--color", "nope")
    assert code == 1 and "obs has no column 'nope' (--color)" in err
    code, _, err = run_cli("report", model, "--out", tmp_path / "r.pdf")
    assert code == 2 and "an .html file" in err
    code, _, err = run_cli("report", model, "--out", tmp_path / "r.html", "--map", "tsne")
    assert code == 2 and "--map tsne" in err
    code, _, err = run_cli("report", model, PBMC_SMALL, "--out", tmp_path / "r.html", "--labels-key", "cell_typ")
    assert code == 1 and "obs has no column 'cell_typ' (--labels-key)" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not report_package.umap_available(), reason="umap-learn (the report extra) is not installed")
def test_report_with_umap(run_cli, model, tmp_path):
    out = tmp_path / "r.html"
    assert run_cli("report", model, PBMC_SMALL, "--out", out, "--map", "umap", "-q")[0] == 0
    assert "map: UMAP (umap-learn, 15 neighbours, random_state 0)" in out.read_text()


def test_train_report_writes_the_page_beside_the_checkpoint(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr("scvi_cli.report.build.umap_available", lambda: False)
    code, _, err = run_cli("train", PBMC_SMALL, "--out", tmp_path / "m.ckpt", "--set", "train.max_epochs=2", "--report")
    assert code == 0, err
    page = tmp_path / "m.report.html"
    assert f"wrote {page}" in err
    _checked(page.read_text())


# --------------------------------------------------------------------------------------------
# In a real browser


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_data}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (.ci/run installs Debian's where it can)")
def test_report_renders_in_a_headless_browser(run_cli, model, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr("scvi_cli.report.build.umap_available", lambda: False)
    out = tmp_path / "report.html"
    assert run_cli("report", model, PBMC_SMALL, "--out", out, "-q")[0] == 0
    shot = tmp_path / "page.png"
    result = _chromium("--window-size=1200,2400", f"--screenshot={shot}", out.as_uri(), user_data=tmp_path / "profile1")
    assert shot.exists(), result.stderr[-500:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1200)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page
    # every image decodes in the browser at its own size: a probe page reports naturalWidth x naturalHeight
    parser = _checked(out.read_text())
    sizes = [_png_size(base64.b64decode(a["src"].split(",", 1)[1])) for a in parser.images]
    probe = tmp_path / "probe.html"
    probe.write_text(
        '<!DOCTYPE html><html><body><pre id="out"></pre><script>'
        "const page = new DOMParser().parseFromString(" + json.dumps(out.read_text()).replace("</", "<\\/") + ", 'text/html');"
        "const images = [...page.images]; let done = 0; const sizes = [];"
        "images.forEach((source, i) => { const img = new Image(); img.onload = img.onerror = () => {"
        "sizes[i] = img.naturalWidth + 'x' + img.naturalHeight; if (++done === images.length)"
        " document.getElementById('out').textContent = 'SIZES ' + sizes.join(' '); }; img.src = source.src; });"
        "</script></body></html>"
    )
    result = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), user_data=tmp_path / "profile2")
    found = re.search(r"SIZES ([0-9x ]+)", result.stdout)
    assert found, result.stdout[-500:] + result.stderr[-500:]
    assert found.group(1).split() == [f"{w}x{h}" for w, h in sizes]
