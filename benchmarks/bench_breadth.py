"""The other model shapes of the breadth issue, against ``pm.find_MAP``.

Each model the issue names as running on a slow numeric M-step before, as a user
writes it, at a size where both sides take measurable time:

- latent class analysis, 2218 x 20 binary answers, K=3 (``models/latent_class.py``:
  Beta(2, 2) item probabilities; closed form from the statistics);
- a tied full covariance, one ``LKJCholeskyCov`` shared by K=2 components, features
  differing in scale by 20x (Old Faithful-like), N=10^4 (closed form: the pooled
  covariance);
- a diagonal covariance, independent Normals per feature sharing the label, D=3, K=3,
  Normal/HalfNormal priors, N=10^5 (Newton on Q of the statistics);
- a mixture of experts (``models/experts.py``: softmax gating on a covariate, Poisson
  regression components), N=10^4;
- a Normal + Student-t(3) contamination mixture (``models/student_t.py``), N=10^4.

Same protocol as ``bench_regression.py`` (:func:`benchmarks.bench_regression.rows_for`):
EM from its default start with default settings, median of 3 fits after ``prepare``;
``pm.find_MAP`` on the marginalised model from that start, its compilation included,
warm cache.

Run: ``python -m benchmarks.bench_breadth`` from the repository root.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pymc as pm

from benchmarks._common import markdown_table, write_report
from benchmarks.bench_regression import rows_for
from models import experts, latent_class, student_t


def latent_classes(n: int = 2218, items: int = 20, k: int = 3) -> np.ndarray:
    rng = np.random.default_rng(21)
    p = rng.uniform(0.1, 0.9, size=(k, items))
    z = rng.choice(k, size=n, p=[0.5, 0.3, 0.2])
    return (rng.random((n, items)) < p[z]).astype(int)


def faithful_like(n: int) -> np.ndarray:
    """Eruption minutes and waiting minutes: two clusters, scales about 20x apart."""
    rng = np.random.default_rng(22)
    short = rng.random(n) < 0.35
    dur = np.where(short, rng.normal(2.0, 0.25, n), rng.normal(4.3, 0.4, n))
    wait = np.where(short, 54.0 + 8.0 * (dur - 2.0), 80.0 + 6.0 * (dur - 4.3))
    return np.column_stack([dur, wait + rng.normal(0.0, 5.0, n)])


def tied_full(x: np.ndarray, k: int = 2) -> pm.Model:
    n, d = x.shape
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Flat("mu", shape=(k, d))
        chol, _, _ = pm.LKJCholeskyCov("chol", n=d, eta=1.0, sd_dist=pm.HalfFlat.dist())
        z = pm.Categorical("z", p=w, shape=n)
        pm.MvNormal("x", mu=mu[z], chol=chol, observed=x)
    return model


def diagonal(n: int, k: int = 3) -> pm.Model:
    rng = np.random.default_rng(23)
    means = np.array([[-4.0, 0.0, 2.0], [0.0, 3.0, -2.0], [4.0, -3.0, 0.0]])
    sds = np.array([[1.0, 0.5, 2.0], [0.7, 1.5, 0.6], [1.2, 0.8, 1.0]])
    z = rng.integers(0, k, n)
    x = rng.normal(means[z], sds[z])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Normal("mu", 0.0, 10.0, shape=(k, 3))
        sigma = pm.HalfNormal("sigma", 5.0, shape=(k, 3))
        label = pm.Categorical("z", p=w, shape=n)
        pm.Normal("x", mu=mu[label], sigma=sigma[label], observed=x)
    return model


def main() -> str:
    warnings.filterwarnings("ignore")
    __import__("logging").getLogger("pymc").setLevel("ERROR")
    answers = latent_classes()
    rows = rows_for("latent class analysis, 20 items, K=3",
                    latent_class.build_model(answers), len(answers), numeric=False)  # fmt: skip
    rows += rows_for("tied full covariance, D=2, K=2", tied_full(faithful_like(10**4)), 10**4,
                     numeric=False)  # fmt: skip
    rows += rows_for("diagonal covariance, D=3, K=3", diagonal(10**5), 10**5, numeric=False)
    x, y = experts.default_data(n=10**4)
    rows += rows_for("mixture of experts (gating), K=2", experts.build_model((x, y)), 10**4,
                     numeric=False)  # fmt: skip
    rows += rows_for("Normal + Student-t(3)", student_t.build_model(student_t.default_data(10**4)),
                     10**4, numeric=False)  # fmt: skip
    head = ["model", "N", "method", "seconds", "x EM time", "objective - best", "iterations"]
    body = markdown_table(head, rows)
    write_report("breadth", "The breadth issue's model shapes vs pm.find_MAP", body)
    return body


if __name__ == "__main__":
    print(main() if len(sys.argv) == 1 else __doc__)
