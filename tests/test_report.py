"""The HTML/JSON report: contents, figures, safe writing, and a headless-browser check."""

import base64
import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from models_for_tests import gaussian_data, gaussian_mixture

import ppl_em
from models import poisson_counts, regression_mixture
from ppl_em.inference.crosscheck import compare
from ppl_em.report import data_plots, files, write_report, writer

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">')


@pytest.fixture(scope="module")
def comparison():
    # compare() includes EM standard errors, whose Hessian graph takes PyTensor minutes to
    # rewrite; the tests using this fixture are therefore marked slow.
    model = poisson_counts.build_model()
    return compare(model, model_name="poisson_counts", draws=200, tune=200, chains=2, cores=1)


@pytest.fixture(scope="module")
def report_dir(comparison, tmp_path_factory):
    return write_report(comparison, tmp_path_factory.mktemp("r") / "poisson")


@pytest.mark.slow
def test_report_files_and_json_numbers(comparison, report_dir):
    assert sorted(p.name for p in report_dir.iterdir()) == ["index.html", "report.json"]
    saved = json.loads((report_dir / "report.json").read_text())
    assert saved == json.loads(json.dumps(comparison.to_json()))
    assert saved["table"]["mu[1]"]["em"] == pytest.approx(comparison.em.params["mu"][1])
    assert saved["em"]["n_iter"] == comparison.em.n_iter


@pytest.mark.slow
def test_report_html_has_table_figures_and_summary(comparison, report_dir):
    page = (report_dir / "index.html").read_text()
    images = IMG.findall(page)
    alts = [alt for alt, _ in images]
    assert alts == [
        "data",
        "intervals",
        "posteriors",
        "responsibilities",
        "objective",
        "trace plot",
        "rank plot",
    ]
    for _, payload in images:
        png = base64.b64decode(payload)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert 'id="comparison-table"' in page and 'id="diagnostics-table"' in page
    for label in comparison.table.index:
        assert f"<td>{label}</td>" in page
    em = comparison.em
    assert f"converged in {em.n_iter} iterations" in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: no external links
    n_in = int(comparison.table["em_in_hdi"].sum())
    assert f"{n_in} of {len(comparison.table)} parameters" in page


@pytest.mark.slow
def test_nuts_responsibilities_match_crosscheck(comparison):
    em_resp, nuts = comparison.label_posteriors()
    # The report draws label_posteriors()[1] (fit_plots.nuts_responsibilities is gone):
    # the posterior mean over the NUTS draws of the recorded p(z_i = k | x, theta).
    lp = comparison.idata.posterior[f"lp_{comparison.em.label_name}"]
    np.testing.assert_allclose(np.exp(np.asarray(lp, dtype=float)).mean(axis=(0, 1)), nuts)
    # Well-separated rates: EM and the posterior agree on memberships to a few percent.
    assert np.abs(nuts - em_resp).max() < 0.1


@pytest.mark.slow
def test_existing_directory_needs_force_and_foreign_files_survive(comparison, tmp_path):
    out = tmp_path / "rep"
    write_report(comparison, out)
    stamp = (out / "index.html").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=r"rep already exists.*--force"):
        write_report(comparison, out)
    assert (out / "index.html").stat().st_mtime_ns == stamp
    write_report(comparison, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "report.json"]
    (out / "my_notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"my_notes\.txt"):
        write_report(comparison, out, force=True)
    assert (out / "my_notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary leftovers


@pytest.mark.slow
def test_interrupted_write_leaves_old_report_and_no_temp(comparison, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    write_report(comparison, out)
    before = (out / "index.html").read_text()

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "render_html", broken)
    with pytest.raises(KeyboardInterrupt):
        write_report(comparison, out, force=True)
    with pytest.raises(KeyboardInterrupt):
        write_report(comparison, tmp_path / "new")
    assert (out / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_density_curve_is_the_model_mixture_density():
    x = gaussian_data(n=400, seed=3)
    em = ppl_em.fit(gaussian_mixture(x, 3), mode="mle", n_init=3, random_seed=1, progressbar=False)
    # The grid evaluation reproduces the fit's own joint matrix at the data.
    np.testing.assert_allclose(data_plots._joint_at(em, x), em.joint_logp(), rtol=1e-12)
    fig, caption = data_plots.data_figure(em)
    assert "density" in caption
    curve = _line(fig.axes[0], "EM mixture")
    grid, dens = curve.get_xdata(), curve.get_ydata()
    w, mu, sd = em.params["w"], em.params["mu"], em.params["sigma"]
    expected = (
        w * np.exp(-0.5 * ((grid[:, None] - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
    ).sum(1)
    np.testing.assert_allclose(dens, expected, rtol=1e-10)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=5e-3)


@pytest.mark.slow
def test_pmf_and_regression_figures(comparison):
    fig, caption = data_plots.data_figure(comparison.em)
    pmf = _line(fig.axes[0], "EM mixture").get_ydata()
    assert "pmf" in caption and pmf.sum() == pytest.approx(1.0, abs=1e-3)
    x, y = regression_mixture.default_data(n=120)
    em = ppl_em.fit(regression_mixture.build_model((x, y)), random_seed=0, progressbar=False)
    assert not data_plots._rows_independent(em)  # the covariate makes rows differ
    fig, caption = data_plots.data_figure(em, data=(x, y))
    assert "least-squares" in caption
    slopes = sorted(np.polyfit(*line.get_data(), 1)[0] for line in fig.axes[0].get_lines())
    np.testing.assert_allclose(slopes, sorted(em.params["beta"]), atol=0.05)
    fig, caption = data_plots.data_figure(em)
    assert "covariates" in caption


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK_SCRIPT = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-check', JSON.stringify({
    widths: imgs.map(i => i.complete ? i.naturalWidth : 0),
    tables: document.querySelectorAll('#comparison-table tr').length}));
});</script>"""


def _chromium(*args):
    profile = tempfile.mkdtemp()
    try:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_loads_every_image_and_the_table(comparison, report_dir, tmp_path):
    # A copy with a probe script: the report itself stays script-free.
    probe = tmp_path / "probe.html"
    page = (report_dir / "index.html").read_text()
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'data-check="([^"]+)"', dom)
    assert found, dom[:500]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(check["widths"]) == 7 and min(check["widths"]) > 100
    assert check["tables"] == len(comparison.table) + 1
    shot = tmp_path / "shot.png"
    _chromium(
        "--window-size=1200,3000", f"--screenshot={shot}", (report_dir / "index.html").as_uri()
    )
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 50_000


def test_table_flags_problems_and_formats_numbers():
    import pandas as pd

    from ppl_em.report import html

    table = pd.DataFrame(
        {"em": [0.5, 2.0], "em_in_hdi": [True, False], "r_hat": [1.002, 1.05],
         "ess_bulk": [900.0, 150.0], "z_score": [0.3, -3.5], "em_se": [0.01, np.nan]},
        index=["w[0]", "mu[1]"],
    )  # fmt: skip
    page = html.table_html(table, n_chains=2)  # ESS flagged below 100 per chain = 200
    assert page.count('class="bad"') == 4  # em_in_hdi no, r_hat 1.05, ESS 150, z -3.5
    assert "<td>mu[1]</td>" in page and '<td class="bad">1.05</td>' in page
    assert "<td>0.002</td>" not in page and "<td>1.002</td>" in page
    assert '<td class="bad">no</td>' in page and "<td>–</td>" in page  # NaN SE shown as a dash
    assert html.fmt(1234567.0) == "1.235e+06" and html.fmt(3) == "3"


def test_check_target_rules(tmp_path):
    writer.check_target(tmp_path / "new", force=False)  # absent: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        writer.check_target(tmp_path / "file", force=True)
    # A previous report is what the writer wrote: its page ends with the files' manifest.
    files.replace_dir(tmp_path / "old", {"report.json": "{}", "index.html": "<html></html>"}, False)
    with pytest.raises(FileExistsError, match="--force"):
        writer.check_target(tmp_path / "old", force=False)
    writer.check_target(tmp_path / "old", force=True)  # a previous report may be replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "index.html").write_text("<html></html>")  # not written by ppl_em
    with pytest.raises(FileExistsError, match=r"mine/index\.html .*even with --force"):
        writer.check_target(tmp_path / "mine", force=True)
