"""The ppl-em command line: listing, data files, fit/select output, compare's safety checks."""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ppl_em
from models import MODELS, coin, poisson_counts
from ppl_em import cli, select_k


def run(capsys, *argv):
    status = cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_list_shows_every_model_with_description(capsys):
    status, out, _ = run(capsys, "list")
    assert status == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(MODELS)
    assert f"K=3  {coin.DESCRIPTION}" in out


def test_models_dir_option_and_errors(capsys, tmp_path):
    status, out, _ = run(capsys, "list", "--models-dir", str(cli.DEFAULT_MODELS_DIR))
    assert status == 0 and "poisson_counts" in out
    status, _, err = run(capsys, "--models-dir", str(tmp_path), "list")
    assert status == 1 and f"--models-dir {tmp_path} is not a Python package" in err
    status, _, err = run(capsys, "fit", "no_such_model")
    assert status == 1 and "unknown model 'no_such_model'; available: coin" in err


def test_help_documents_every_option():
    help_text = subprocess.run(
        [sys.executable, "-m", "ppl_em.cli", "compare", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for option in ("--draws", "--tune", "--chains", "--seed", "--data", "--force", "--mode",
                   "--no-progress", "--out", "--k", "--models-dir"):  # fmt: skip
        assert option in help_text
    entry = Path(sys.executable).with_name("ppl-em")
    if entry.exists():  # the installed console script points at cli.main
        assert "select" in subprocess.run([entry, "--help"], capture_output=True, text=True).stdout


def test_parse_ks():
    assert cli.parse_ks("1..4") == [1, 2, 3, 4]
    assert cli.parse_ks("2,3,5") == [2, 3, 5]
    for bad in ("0..3", "a..b", "", "2,x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--k"):
            cli.parse_ks(bad)


def test_load_data_csv_npy_and_clear_errors(tmp_path):
    good = tmp_path / "counts.csv"
    good.write_text("count\n3\n7\n\n2\n")
    data = cli.load_data(good, poisson_counts.default_data())
    assert data.dtype.kind == "i" and data.tolist() == [3, 7, 2]
    pairs = tmp_path / "xy.csv"
    pairs.write_text("x,y\n0.5,1.0\n1.5,2.5\n")
    x, y = cli.load_data(pairs, (np.zeros(3), np.zeros(3)))
    assert x.tolist() == [0.5, 1.5] and y.tolist() == [1.0, 2.5]
    npy = tmp_path / "x.npy"
    np.save(npy, np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert cli.load_data(npy, np.zeros((5, 2))).shape == (2, 2)

    bad = tmp_path / "bad.csv"
    bad.write_text("count\n3\n7\nseven\n")
    with pytest.raises(cli.CliError, match=r"bad.csv line 4: could not parse 'seven'"):
        cli.load_data(bad, poisson_counts.default_data())
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2\n3\n")
    with pytest.raises(cli.CliError, match=r"ragged.csv line 2: 1 columns, expected 2"):
        cli.load_data(ragged, np.zeros((5, 2)))
    frac = tmp_path / "frac.csv"
    frac.write_text("1\n2.5\n")
    with pytest.raises(cli.CliError, match="fractional"):
        cli.load_data(frac, poisson_counts.default_data())
    with pytest.raises(cli.CliError, match="expected rows shaped like"):
        cli.load_data(npy, poisson_counts.default_data())
    with pytest.raises(cli.CliError, match="no such file"):
        cli.load_data(tmp_path / "missing.csv", poisson_counts.default_data())
    gaps = tmp_path / "gaps.csv"
    gaps.write_text("x,y\n0.5,\nNA,2.5\n1.0,nan\n")
    x, y = cli.load_data(gaps, (np.zeros(3), np.zeros(3)))
    assert x[0] == 0.5 and np.isnan(x[1]) and np.isnan(y[0]) and np.isnan(y[2])
    counts_gap = tmp_path / "counts_gap.csv"
    counts_gap.write_text("count\n3\nNA\n2\n")
    with pytest.raises(cli.CliError, match="counts integers; NaN"):
        cli.load_data(counts_gap, poisson_counts.default_data())
    notes = tmp_path / "x.txt"
    notes.write_text("1\n")
    with pytest.raises(cli.CliError, match="unsupported extension"):
        cli.load_data(notes, poisson_counts.default_data())


def test_fit_prints_estimates_matching_the_library(capsys, tmp_path):
    csv = tmp_path / "coin.csv"
    csv.write_text("\n".join(map(str, coin.SEED_DATA)) + "\n")
    status, out, _ = run(capsys, "fit", "coin", "--data", str(csv), "--no-progress")
    assert status == 0
    ref = ppl_em.fit(coin.build_model(), random_seed=0, progressbar=False)
    for k in range(3):
        assert f"p[{k}]" in out and f"{ref.params['p'][k]:14.6g}" in out
    assert f"log posterior: {ref.objective:.6f}" in out
    assert f"after {ref.n_iter} iterations" in out
    assert f"BIC {ref.bic():.3f}" in out
    # Three near-identical coins: the information is singular and the CLI says so.
    assert "standard errors unavailable" in out


def test_fit_takes_weights_and_labels_files(capsys, tmp_path):
    counts = poisson_counts.default_data()
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 4, counts.size)
    labels = np.full(counts.size, -1)
    labels[np.argmax(counts)] = 1
    np.save(tmp_path / "w.npy", weights)
    (tmp_path / "labels.csv").write_text("label\n" + "\n".join(map(str, labels)) + "\n")
    status, out, _ = run(capsys, "fit", "poisson_counts", "--weights", str(tmp_path / "w.npy"),
                         "--labels", str(tmp_path / "labels.csv"), "--no-progress")  # fmt: skip
    assert status == 0
    ref = ppl_em.fit(poisson_counts.build_model(), random_seed=0, weights=weights,
                     labels=labels, progressbar=False)  # fmt: skip
    assert f"log posterior: {ref.objective:.6f}" in out
    assert f"BIC {ref.bic():.3f}" in out
    (tmp_path / "bad.csv").write_text("1\n2\n")
    status, _, err = run(capsys, "fit", "poisson_counts", "--weights", str(tmp_path / "bad.csv"))
    assert status == 1 and "weights has shape (2,)" in err


def test_weights_and_labels_as_columns_of_the_data_csv(capsys, tmp_path):
    counts = poisson_counts.default_data()
    weights = np.random.default_rng(1).integers(1, 4, counts.size)
    labels = np.full(counts.size, -1)
    labels[np.argmax(counts)] = 1
    table = np.stack([weights, counts, labels], axis=1)
    csv = tmp_path / "data.csv"
    csv.write_text("w,count,known\n" + "\n".join(",".join(map(str, r)) for r in table) + "\n")
    status, out, _ = run(capsys, "fit", "poisson_counts", "--data", str(csv), "--weights", "w",
                         "--labels", "known", "--no-progress")  # fmt: skip
    assert status == 0
    ref = ppl_em.fit(poisson_counts.build_model(), random_seed=0, weights=weights,
                     labels=labels, progressbar=False)  # fmt: skip
    assert f"log posterior: {ref.objective:.6f}" in out
    status, _, err = run(capsys, "fit", "poisson_counts", "--data", str(csv), "--weights", "wt")
    assert status == 1
    assert "--weights wt: not a file, nor a column of --data" in err and "'count'" in err
    status, _, err = run(capsys, "fit", "poisson_counts", "--weights", "w")
    assert status == 1 and "no --data CSV to take a column from" in err


def test_compare_refuses_existing_output_before_sampling(capsys, tmp_path):
    out_dir = tmp_path / "existing"
    out_dir.mkdir()
    status, _, err = run(capsys, "compare", "coin", "--out", str(out_dir), "--no-progress")
    assert status == 1 and f"{out_dir} already exists" in err and "--force" in err
    status, _, err = run(capsys, "compare", "coin", "--mode", "mle", "--out", str(tmp_path / "n"))
    assert status == 1 and "compare needs --mode map" in err
    assert not (tmp_path / "n").exists()
    status, _, err = run(capsys, "compare", "coin", "--draws", "0")
    assert status == 2 and "--draws must be >= 1" in err


def test_select_prints_criteria_and_best_k(capsys):
    status, out, _ = run(capsys, "select", "poisson_counts", "--k", "1..2", "--no-progress")
    assert status == 0
    table = select_k(
        poisson_counts.build_model, [1, 2], data=poisson_counts.default_data(), random_seed=0,
        n_init=3,
    )  # fmt: skip
    assert "best K by BIC: 2" in out and "best K by ICL: 2" in out
    assert f"{table.loc[2, 'bic']:.3f}" in out and f"{table.loc[1, 'aic']:.3f}" in out


@pytest.mark.parametrize(
    "argv, option, value, accepted",
    [
        (["fit", "coin", "--k", "0"], "--k", "0", "an integer >= 1"),
        (["fit", "coin", "--k", "two"], "--k", "two", "an integer >= 1"),
        (["fit", "coin", "--seed", "-1"], "--seed", "-1", "an integer >= 0"),
        (["fit", "coin", "--seed", "seven"], "--seed", "seven", "an integer >= 0"),
        (["compare", "coin", "--seed", "1.5"], "--seed", "1.5", "an integer >= 0"),
        (["compare", "coin", "--k", "-3"], "--k", "-3", "an integer >= 1"),
        (["compare", "coin", "--draws", "0"], "--draws", "0", "an integer >= 1"),
        (["compare", "coin", "--tune", "-5"], "--tune", "-5", "an integer >= 1"),
        (["compare", "coin", "--chains", "0"], "--chains", "0", "an integer >= 1"),
        (["compare", "coin", "--chains", "2.5"], "--chains", "2.5", "an integer >= 1"),
        (["select", "coin", "--n-init", "0"], "--n-init", "0", "an integer >= 1"),
        (["select", "coin", "--seed", "-1"], "--seed", "-1", "an integer >= 0"),
        (["select", "coin", "--k", "0..3"], "--k", "0..3", "integers >= 1"),
        (["select", "coin", "--k", "4..2"], "--k", "4..2", "integers >= 1"),
        (["select", "coin", "--k", "2,2"], "--k", "2,2", "distinct integers >= 1"),
    ],
)
def test_numeric_options_are_refused_by_the_parser(
    capsys, monkeypatch, argv, option, value, accepted
):
    def no_fitting(*args, **kwargs):
        raise AssertionError("a model was built although an option was invalid")

    monkeypatch.setattr(cli, "_model_and_data", no_fitting)
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert f"argument {option}:" in err and f"{option} must be" in err
    assert repr(value) in err and accepted in err


def test_compare_checks_the_output_location_before_fitting(capsys, monkeypatch, tmp_path):
    from ppl_em.inference import crosscheck

    def no_sampling(*args, **kwargs):
        raise AssertionError("compare() ran before --out was checked")

    monkeypatch.setattr(crosscheck, "compare", no_sampling)
    monkeypatch.setattr(cli, "_model_and_data", no_sampling)
    (tmp_path / "data.csv").write_text("1\n")
    under_file = tmp_path / "data.csv" / "rep"
    status, _, err = run(capsys, "compare", "coin", "--out", str(under_file), "--no-progress")
    assert status == 1 and f"--out {under_file}" in err
    assert f"{tmp_path / 'data.csv'} is not a directory" in err
    # Nothing can be created in /proc, not even by root (a chmod-ed directory would be).
    status, _, err = run(capsys, "compare", "coin", "--out", "/proc/ppl-em-rep", "--force")
    assert status == 1 and "--out /proc/ppl-em-rep" in err and "writable" in err
    # A --force that would delete files the report did not write fails here too.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    status, _, err = run(capsys, "compare", "coin", "--out", str(mine), "--force")
    assert status == 1 and str(mine / "notes.txt") in err
    assert (mine / "notes.txt").read_text() == "keep me"


def test_compare_refuses_a_read_only_directory_before_fitting(capsys, monkeypatch, tmp_path):
    from test_report_files import read_only_dir

    def no_fitting(*args, **kwargs):
        raise AssertionError("a model was built before --out was checked")

    monkeypatch.setattr(cli, "_model_and_data", no_fitting)
    locked = read_only_dir(tmp_path / "locked")
    try:
        status, _, err = run(capsys, "compare", "coin", "--out", str(locked / "rep"))
    finally:
        locked.chmod(0o755)
    assert status == 1 and f"--out {locked / 'rep'}" in err and str(locked) in err
