"""Data files for the command line: ``--data``, ``--weights`` and ``--labels`` as .csv
or .npy, read into the structure and dtype of a model's ``default_data()``, with errors
that name the file, the line and the fix. An empty, NA or NaN cell is a missing value;
``--weights``/``--labels`` may also name a column of the ``--data`` CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


class CliError(Exception):
    """A user-facing problem (bad file, unknown model, existing output): message, exit 1."""


MISSING_CELLS = {"", "na", "nan"}


def _read_table(path: Path) -> tuple[list[str] | None, np.ndarray]:
    """Numeric CSV to its header (None without one) and a 2-d float array, an empty, NA
    or NaN cell as NaN (a missing value); errors name file and line."""
    with path.open(newline="") as fh:
        rows = [(n, r) for n, r in enumerate(csv.reader(fh), start=1) if any(c.strip() for c in r)]
    header = None
    if rows and not all(_is_cell(c) for c in rows[0][1]):
        header = [c.strip() for c in rows.pop(0)[1]]
    if not rows:
        raise CliError(f"{path}: no data rows found.")
    width = len(rows[0][1])
    values = []
    for line, row in rows:
        if len(row) != width:
            raise CliError(f"{path} line {line}: {len(row)} columns, expected {width}.")
        bad = [c for c in row if not _is_cell(c)]
        if bad:
            raise CliError(f"{path} line {line}: could not parse {bad[0]!r} as a number.")
        values.append([np.nan if _is_missing(c) else float(c) for c in row])
    return header, np.array(values)


def _squeezed(table: np.ndarray) -> np.ndarray:
    return table[:, 0] if table.shape[1] == 1 else table


def _is_missing(text: str) -> bool:
    return text.strip().lower() in MISSING_CELLS


def _is_cell(text: str) -> bool:
    if _is_missing(text):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_data(path: Path, template):
    """Read ``path`` (.csv or .npy) into the structure and dtype of ``default_data()``."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"--data {path}: no such file.")
    if path.suffix.lower() == ".npy":
        try:
            array = np.asarray(np.load(path, allow_pickle=False))
        except ValueError as err:
            raise CliError(f"{path}: not a readable .npy array ({err}).") from err
    elif path.suffix.lower() == ".csv":
        array = _squeezed(_read_table(path)[1])
    else:
        raise CliError(f"--data {path}: unsupported extension; use .csv or .npy.")
    return conform(array, template, path)


def conform(array: np.ndarray, template, path: Path):
    """``array`` in the structure and dtype of ``template`` (a model's default data)."""
    if not np.issubdtype(array.dtype, np.number) or np.isinf(array).any():
        raise CliError(f"{path}: data must be numbers, NaN where missing (found inf or text).")
    if isinstance(template, tuple):
        if array.ndim != 2 or array.shape[1] != len(template):
            raise CliError(
                f"{path}: this model takes {len(template)} columns (e.g. x, y), "
                f"got an array of shape {array.shape}."
            )
        return tuple(array[:, j] for j in range(array.shape[1]))
    template = np.asarray(template)
    if array.ndim != template.ndim or array.shape[1:] != template.shape[1:]:
        raise CliError(
            f"{path}: expected rows shaped like {template.shape[1:] or 'a single column'} "
            f"(default data {template.shape}), got {array.shape}."
        )
    if np.issubdtype(template.dtype, np.integer):
        if np.isnan(array).any():
            raise CliError(f"{path}: this model counts integers; NaN (missing) found.")
        if not np.all(array == np.round(array)):
            raise CliError(f"{path}: this model counts integers; the file has fractional values.")
        return array.astype(template.dtype)
    return array.astype(float)


def load_column(path: Path, option: str) -> np.ndarray:
    """One number per observation from a one-column .csv or a 1-d .npy."""
    array = load_data(path, np.zeros(1))
    if np.isnan(array).any():
        raise CliError(
            f"{option} {path}: NaN at row {int(np.isnan(array).argmax())}; give a value."
        )
    if array.ndim != 1:
        raise CliError(f"{option} {path}: give one column (one value per observation).")
    return array


def data_and_columns(path: Path, template, columns: dict[str, str]):
    """The ``--data`` CSV without the named columns, shaped like ``template``, and each
    named column (``{option: column name}``) as one value per observation."""
    path = Path(path)
    header, table = None, None
    if path.suffix.lower() == ".csv" and path.is_file():
        header, table = _read_table(path)
    missing = [f"--{opt} {col}" for opt, col in columns.items() if col not in (header or [])]
    if missing:
        found = f"its columns are {header}" if header else "it has no header line naming columns"
        raise CliError(
            f"{missing[0]}: not a file, nor a column of --data {path} ({found}); give a "
            ".csv/.npy file or the name of a --data CSV column."
        )
    out = {}
    for option, column in columns.items():
        values = table[:, header.index(column)]
        if np.isnan(values).any():
            row = int(np.isnan(values).argmax())
            raise CliError(f"--{option} {column}: NaN at data row {row}; give every row a value.")
        out[option] = values
    keep = [j for j, name in enumerate(header) if name not in columns.values()]
    return conform(_squeezed(table[:, keep]), template, path), out
