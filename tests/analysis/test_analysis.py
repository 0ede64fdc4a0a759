"""compare (tables, Pareto plots, geometry) and the HTML report, from real runs."""

import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import e2edict
from e2edict.analysis.compare import pareto_front
from e2edict.analysis.runs import load_runs

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_gpt2_dir):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for preset, lam in (("local", 0.5), ("e2e", 2.0)):
        cfg = {
            "name": f"small-{preset}",
            "model": {"name": str(small_gpt2_dir)},
            "data": {"n_ctx": 32},
            "saes": {"positions": ["blocks.1.hook_resid_pre"], "dict_ratio": 4},
            "loss": {"preset": preset, "sparsity": {"coeff": lam}},
            "train": {"tokens": 8192, "batch_size": 8, "lr": 3e-3, "log_every": 2},
            "eval": {"tokens": 2048, "alive_tokens": 4096},
        }
        out[preset] = e2edict.train(cfg, out=base / preset, progress=False)
    return out


def test_pareto_front():
    pts = [(10, 0.5), (5, 0.9), (20, 0.2), (12, 0.6), (5, 1.0), (30, 0.25)]
    assert pareto_front(pts) == [(5, 0.9), (10, 0.5), (20, 0.2)]


@pytest.mark.slow
def test_compare_writes_tables_plots_and_geometry(runs, tmp_path):
    out = tmp_path / "cmp"
    r = subprocess.run(
        ["python", "-m", "e2edict", "compare", runs["local"], runs["e2e"], "--out", out],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    with open(out / "runs.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [row["run"] for row in table] == ["small-local", "small-e2e"]
    for row, preset in zip(table, ("local", "e2e"), strict=True):
        ev = json.loads((runs[preset] / "eval.json").read_text())
        m = ev["saes"]["blocks.1.hook_resid_pre"]
        assert row["type"] == preset
        assert float(row["l0"]) == pytest.approx(m["l0"])
        assert int(row["alive"]) == m["alive"]
        assert float(row["ce_loss_increase"]) == pytest.approx(ev["ce_loss_increase"])
        assert float(row["norm_ratio_pos_gt0"]) == pytest.approx(m["norm_ratio_pos_gt0"])
    md = (out / "runs.md").read_text()
    assert "small-local" in md and "| type |" in md
    for png in ("l0_vs_ce.png", "alive_vs_ce.png", "downstream_ev.png", "norm_ratio.png", "geometry.png"):
        assert (out / png).read_bytes()[:8] == PNG and (out / png).stat().st_size > 5000

    # geometry against an independent computation over the alive directions
    with open(out / "geometry.csv") as fh:
        geo = {(g["sae"], g["against"]): g for g in csv.DictReader(fh)}
    saes = {p: e2edict.load_saes(runs[p])["blocks.1.hook_resid_pre"] for p in runs}
    from safetensors.torch import load_file

    dirs = {}
    for p, sae in saes.items():
        dens = load_file(str(runs[p] / "saes/blocks.1.hook_resid_pre/sparsity.safetensors"))["sparsity"]
        d = sae.dictionary.detach().numpy()
        dirs[p] = d[dens.numpy() > -9.5]
    sims = dirs["local"] @ dirs["local"].T
    np.fill_diagonal(sims, -2)
    assert float(geo[("small-local", "itself")]["mean"]) == pytest.approx(sims.max(1).mean(), rel=1e-5)
    cross = (dirs["e2e"] @ dirs["local"].T).max(1)
    g = geo[("small-e2e", "small-local")]
    assert float(g["mean"]) == pytest.approx(cross.mean(), rel=1e-5)
    assert float(g["ci95_low"]) <= float(g["mean"]) <= float(g["ci95_high"])
    assert int(g["n"]) == len(dirs["e2e"])


def test_load_runs_rejects_unfinished(tmp_path):
    from e2edict.errors import E2EDictError

    with pytest.raises(E2EDictError, match="not a finished run directory"):
        load_runs([tmp_path])


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (make test installs it with apt-get)")
    pytest.skip("chromium not installed")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(runs, tmp_path):
    run = runs["e2e"]
    r = subprocess.run(
        ["python", "-m", "e2edict", "report", run, "--tokens", "4096", "--features", "12", "--per-page", "5", "--contexts", "4"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    report = run / "report"
    pages = sorted(p.name for p in report.glob("sae0_features_*.html"))
    assert pages == ["sae0_features_1.html", "sae0_features_2.html", "sae0_features_3.html"]
    browser = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    shot = tmp_path / "page.png"
    for page, n_features in (("index.html", 0), ("sae0_features_1.html", 5), ("sae0_features_3.html", 2)):
        url = (report / page).as_uri()
        dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        if page == "index.html":
            assert 'id="overall"' in dom and 'id="sae-table"' in dom and 'class="browse"' in dom
            assert 'id="curves"' in dom and "blocks.1.hook_resid_pre" in dom
        else:
            assert dom.count('class="feature"') == n_features
            assert 'class="tok' in dom and 'class="promoted"' in dom and 'class="suppressed"' in dom
            assert "<svg" in dom and 'class="pager"' in dom
        subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1000,800", url], capture_output=True, timeout=120)
        assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 10_000
        shot.unlink()
    # features come in the browser's order of the densities on disk: densest first, the
    # near-always-on ones (above 10% of tokens) last
    from safetensors.torch import load_file

    from e2edict.analysis.report import DENSE, feature_order
    from e2edict.eval_metrics import density_from_log10

    dens = density_from_log10(load_file(str(run / "saes/blocks.1.hook_resid_pre/sparsity.safetensors"))["sparsity"])
    first = (report / "sae0_features_1.html").read_text()
    shown = [int(x.split('"')[0]) for x in first.split('id="f')[1:]]
    expected = [i for i in torch.argsort(dens, descending=True, stable=True).tolist() if 0 < dens[i] <= DENSE]
    expected += [i for i in torch.argsort(dens, descending=True, stable=True).tolist() if dens[i] > DENSE]
    assert shown == expected[:5] == feature_order(dens)[:5].tolist()


def test_report_escapes_tokens():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("e2edict.analysis", "templates"), autoescape=select_autoescape(["html"]))
    evil = "<script>alert(1)</script>"
    card = {
        "id": 3,
        "density": 0.1,
        "max_act": 1.0,
        "histogram": "",
        "contexts": [{"value": 1.0, "tokens": [{"text": evil, "act": 1.0, "alpha": 1.0, "peak": True}]}],
        "promoted": [(evil, 1.0)],
        "suppressed": [("&", -1.0)],
    }

    class S:
        d_sae = 8

    html = env.get_template("features.html").render(
        run=evil, hook=evil, sae=S, cards=[card], page=1, pages=1, prev=None, next=None, metrics={}, shown=1
    )
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
