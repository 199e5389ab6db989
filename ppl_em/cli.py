"""``ppl-em``: list the example models, fit one by EM, compare EM with NUTS, choose K.

The example models live in ``models/`` at the repository root (a sibling of the
``ppl_em`` package in an editable install); ``--models-dir`` points elsewhere. A models
directory is a Python package whose ``MODELS`` dict maps names to modules with
``build_model(data=None, k=...)``, ``default_data()``, ``DESCRIPTION`` and ``K_DEFAULT``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

from ppl_em.cli_data import CliError, data_and_columns, load_column, load_data
from ppl_em.options import REFERENCE_MODES

DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


# ---------------------------------------------------------------- models and data


def load_models(models_dir: Path) -> dict[str, ModuleType]:
    """The ``MODELS`` registry of the package at ``models_dir``."""
    models_dir = Path(models_dir).resolve()
    if not (models_dir / "__init__.py").is_file():
        raise CliError(
            f"--models-dir {models_dir} is not a Python package (no __init__.py); "
            f"point it at a directory like {DEFAULT_MODELS_DIR}."
        )
    # The registry imports its modules absolutely (``from models import coin``), so the
    # package's parent directory must be importable.
    if str(models_dir.parent) not in sys.path:
        sys.path.insert(0, str(models_dir.parent))
    package = importlib.import_module(models_dir.name)
    registry = getattr(package, "MODELS", None)
    if not isinstance(registry, dict):
        raise CliError(f"{models_dir}/__init__.py defines no MODELS dict of name -> module.")
    return registry


def get_model(registry: dict[str, ModuleType], name: str) -> ModuleType:
    if name not in registry:
        raise CliError(f"unknown model {name!r}; available: {', '.join(sorted(registry))}.")
    return registry[name]


def _model_and_data(args, columns: dict | None = None) -> tuple[str, ModuleType, object, dict]:
    """The model's module, its data (``--data`` or the default), and the ``columns``
    (``{option: column name}``) taken out of the ``--data`` CSV."""
    module = get_model(load_models(args.models_dir), args.model)
    data, taken = module.default_data(), {}
    if columns:
        if args.data is None:
            option, column = next(iter(columns.items()))
            raise CliError(
                f"--{option} {column}: no such file (and no --data CSV to take a column from)."
            )
        data, taken = data_and_columns(args.data, data, columns)
    elif args.data is not None:
        data = load_data(args.data, data)
    return args.model, module, data, taken


def _observations(args) -> tuple[dict, dict]:
    """``--weights``/``--labels``: values read from files, and column names to take
    from the ``--data`` CSV."""
    files, columns = {}, {}
    for option in ("weights", "labels"):
        source = getattr(args, option, None)
        if source is None:
            continue
        path = Path(source)
        if path.suffix.lower() in (".csv", ".npy") or path.is_file():
            files[option] = load_column(path, f"--{option}")
        else:
            columns[option] = source
    return files, columns


def _k(args, module: ModuleType) -> int:
    return module.K_DEFAULT if args.k is None else args.k


# ---------------------------------------------------------------- numeric options


def int_option(option: str, what: str, example: int, low: int):
    """An argparse ``type`` accepting integers >= ``low``; its errors name the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            problem = "an integer"
        else:
            if value >= low:
                return value
            problem = f">= {low}"
        raise argparse.ArgumentTypeError(
            f"{option} must be {problem}, got {text!r}; it takes an integer >= {low} "
            f"({what}), e.g. {option} {example}."
        )

    return parse


# ---------------------------------------------------------------- commands


def cmd_list(args) -> int:
    registry = load_models(args.models_dir)
    width = max(map(len, registry))
    for name, module in sorted(registry.items()):
        print(f"{name:<{width}}  K={module.K_DEFAULT}  {module.DESCRIPTION}")
    return 0


def cmd_fit(args) -> int:
    import ppl_em
    from ppl_em.inference.stderr import NotIdentifiedError, standard_errors
    from ppl_em.report.fit_plots import scalar_entries

    files, columns = _observations(args)
    name, module, data, taken = _model_and_data(args, columns)
    model = module.build_model(data, k=_k(args, module))
    t0 = time.perf_counter()
    observations = {**files, **taken}
    result = ppl_em.fit(model, mode=args.mode, random_seed=args.seed,
                        progressbar=args.progress, **observations)  # fmt: skip
    elapsed = time.perf_counter() - t0
    try:
        se, se_note = standard_errors(result), ""
    except NotIdentifiedError as err:
        se, se_note = None, f"standard errors unavailable: {err}"
    print(f"{name}: EM ({args.mode}), K={result.n_components}, N={result.n_obs}")
    print(f"{'parameter':<14}{'estimate':>14}{'std. error':>14}")
    for var, label, idx in scalar_entries(result.params):
        err = f"{se[var][idx]:14.6g}" if se is not None else f"{'-':>14}"
        print(f"{label:<14}{result.params[var][idx]:14.6g}{err}")
    if se_note:
        print(se_note)
    objective = "log posterior" if args.mode == "map" else "log-likelihood"
    print(f"{objective}: {result.objective:.6f}   loglik: {result.loglik:.6f}")
    state = "converged" if result.converged else "NOT converged"
    print(f"{state} after {result.n_iter} iterations in {elapsed:.2f} s")
    print(f"BIC {result.bic():.3f}   AIC {result.aic():.3f}   ICL {result.icl():.3f}")
    return 0


def cmd_compare(args) -> int:
    from ppl_em.inference.crosscheck import compare
    from ppl_em.report.writer import check_target, write_report

    if args.mode != "map":
        raise CliError(
            f"compare needs --mode map, got --mode {args.mode}: find_MAP and NUTS use the "
            "posterior, so EM must maximise it too. Use `ppl-em fit --mode mle` for the MLE."
        )
    out = Path(args.out or Path("reports") / args.model)
    try:  # fail before minutes of sampling, not after
        check_target(out, args.force)
    except OSError as err:
        raise CliError(f"--out {out}: {err}") from err
    name, module, data, _ = _model_and_data(args)
    model = module.build_model(data, k=_k(args, module))
    comparison = compare(
        model,
        model_name=name,
        em_kwargs={"mode": args.mode, "progressbar": args.progress},
        draws=args.draws,
        tune=args.tune,
        chains=args.chains,
        random_seed=args.seed,
        progressbar=args.progress,
        reference_modes=args.reference_modes,
    )
    try:
        path = write_report(comparison, out, data=data, force=args.force)
    except OSError as err:  # e.g. the disk filled up while sampling
        raise CliError(f"--out {out}: {err}") from err
    diag = comparison.diagnostics
    inside = int(comparison.table["em_in_hdi"].astype(bool).sum())
    print(comparison.table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(
        f"EM inside the NUTS 94% HDI for {inside}/{len(comparison.table)} parameters; "
        f"{diag['divergences']} divergences, max r_hat {diag['max_r_hat']:.3f}"
    )
    print("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in comparison.timings.items()))
    print(f"report: {path / 'index.html'}")
    return 0


def parse_ks(text: str) -> list[int]:
    """``"1..6"``, ``"2,3,5"`` or ``"4"`` to a list of integers >= 1."""
    try:
        if ".." in text:
            lo, hi = (int(p) for p in text.split(".."))
            ks = list(range(lo, hi + 1))
        else:
            ks = [int(p) for p in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1 or len(set(ks)) < len(ks):
        raise argparse.ArgumentTypeError(
            f"--k must be a range like 1..6 or a list like 2,3,4 of distinct integers >= 1, "
            f"got {text!r}."
        )
    return ks


def cmd_select(args) -> int:
    from ppl_em.inference.selection import select_k

    name, module, data, _ = _model_and_data(args)
    ks = args.k or list(range(1, 7))
    table = select_k(
        module.build_model,
        ks,
        data=data,
        mode=args.mode,
        random_seed=args.seed,
        n_init=args.n_init,
        progressbar=args.progress,
    )
    print(f"{name}: information criteria by K (lower is better), EM mode={args.mode}")
    shown = table.drop(columns=["best_bic", "best_aic", "best_icl", "warnings"])
    print(shown.to_string(float_format=lambda v: f"{v:.3f}"))
    for crit in ("bic", "aic", "icl"):
        print(f"best K by {crit.upper()}: {int(table[crit].idxmin())}")
    for k, text in table["warnings"].items():
        if text:
            print(f"K={k}: {text}")
    return 0


# ---------------------------------------------------------------- parser


def _models_dir_option(p: argparse.ArgumentParser) -> None:
    # Accepted after the command too; SUPPRESS keeps the top-level default when absent.
    p.add_argument(
        "--models-dir", type=Path, default=argparse.SUPPRESS, help="as before the command"
    )


K_TYPE = int_option("--k", "the number of components", 3, low=1)


def _model_options(p: argparse.ArgumentParser, k_help: str, k_type=K_TYPE) -> None:
    _models_dir_option(p)
    p.add_argument("model", metavar="MODEL", help="model name (see `ppl-em list`)")
    p.add_argument("--k", type=k_type, default=None, help=k_help)
    p.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="data file instead of the model's default data: .csv (numbers, optional header "
        "line; one column, or one per dimension / x,y for regressions) or .npy",
    )
    p.add_argument(
        "--mode",
        choices=("map", "mle"),
        default="map",
        help="EM objective: map = log posterior without Jacobian (what find_MAP maximises), "
        "mle = log-likelihood only (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        # numpy's Generator (EM starts) and PyMC's sampler take any integer >= 0
        type=int_option("--seed", "the random seed", 0, low=0),
        default=0,
        help="random seed, an integer >= 0 (default: %(default)s)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppl-em",
        description="Fit mixture models declared in PyMC by EM and check them against NUTS.",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=DEFAULT_MODELS_DIR,
        help="package of example models with a MODELS registry (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_list = sub.add_parser("list", help="list the example models with their descriptions")
    _models_dir_option(p_list)
    p_list.set_defaults(func=cmd_list)

    p_fit = sub.add_parser("fit", help="fit MODEL by EM: estimates, SEs, objective, time")
    _model_options(p_fit, "number of components (default: the model's K_DEFAULT)")
    for option, what in (
        ("--weights", "a weight per observation (>= 0; an integer counts like repeated rows)"),
        ("--labels", "a known component per observation (0..K-1, -1 where unknown)"),
    ):
        p_fit.add_argument(
            option, metavar="FILE|COLUMN", help=f"{what}: .csv or .npy, or a --data CSV column"
        )
    p_fit.set_defaults(func=cmd_fit)

    p_cmp = sub.add_parser("compare", help="EM + find_MAP + NUTS on MODEL, then an HTML report")
    _model_options(p_cmp, "number of components (default: the model's K_DEFAULT)")
    p_cmp.add_argument(
        "--out", type=Path, metavar="DIR", help="report directory (default: reports/MODEL)"
    )
    for option, default, what in (
        ("--draws", 1000, "NUTS draws per chain"),
        # tune >= 1: the HDI and r_hat checks are meaningless without a tuned step size
        ("--tune", 1000, "NUTS tuning steps per chain"),
        ("--chains", 4, "NUTS chains"),
    ):
        kind = int_option(option, what, default, low=1)
        p_cmp.add_argument(option, type=kind, default=default, help=f"{what} ({default})")
    p_cmp.add_argument(
        "--reference-modes",
        choices=REFERENCE_MODES,
        default="fast",
        help="how find_MAP and NUTS compile: 'fast' (NumPy-backed Ops, nothing to compile, "
        "NUTS on numba for a model with linear algebra: quickest on a first run), "
        "'compiled' (NUTS in C: quickest once C's cache holds the model), 'pymc' (PyMC's "
        "defaults); default: fast",
    )
    p_cmp.add_argument(
        "--force", action="store_true", help="replace an existing report directory at --out"
    )
    p_cmp.set_defaults(func=cmd_compare)

    p_sel = sub.add_parser("select", help="BIC, AIC and ICL of MODEL across K")
    _model_options(p_sel, "values of K: a range 1..6 or a list 2,3,4 (default: 1..6)", parse_ks)
    p_sel.add_argument(
        "--n-init",
        type=int_option("--n-init", "EM restarts per K", 3, low=1),
        default=3,
        help="EM restarts per K, best kept (%(default)s)",
    )
    p_sel.set_defaults(func=cmd_select)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ppl-em`` script; returns the exit status."""
    from ppl_em.errors import PplEmError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse printed the usage and the error (or --help)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args.func(args)
    except (CliError, PplEmError, FileExistsError) as err:
        print(f"ppl-em: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
