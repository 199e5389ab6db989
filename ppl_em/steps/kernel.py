"""The fused E-step pass compiled with numba, for the compiled backends.

Same contract as :func:`ppl_em.steps.passes.fused_estep` (the NumPy pass, which stays the
reference and the pass of ``backend="python"``): from the joint's K rows, the
log-responsibilities (optional), the log-likelihood and the responsibility-weighted
sums of the statistics columns. NumPy needs about 18 calls per chunk for this, each a
trip through cache; here every row of a block of ``BLOCK`` observations is read once
and the work stays in registers and L1.

numba's ``exp`` and ``log`` are calls to the scalar libm (no SVML is installed), which
do not vectorise; the two functions below are written so that LLVM vectorises them:
``exp`` of a non-positive argument by Cody-Waite reduction and a degree-13 Taylor
polynomial, ``log`` of the row sums (which lie in [1, K]) by splitting off the binary
exponent and an atanh series. They are within 2 and 3 ulp of NumPy's
(``tests/test_kernel.py``); ``benchmarks/README.md`` has the timings behind this
module's choices and constants.

The kernel releases the GIL, so for large N two threads each take one contiguous half
(a fixed split: the result does not depend on thread timing).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ppl_em.steps.cores import halves, run_split, usable_cores

# reassoc lets LLVM vectorise the sums; no nnan/ninf: -inf is a legitimate joint value
# and NaN marks a row no component explains, which the caller reports.
_JIT = {
    "fastmath": {"reassoc", "contract", "nsz"},
    "error_model": "numpy",
    "nogil": True,
    "cache": True,
}
# The elementary functions without reassoc: it would fold Cody-Waite's two-part ln 2
# back into one constant (d - t*LN2_HI - t*LN2_LO -> d - t*ln2), an error growing with
# |t| (185 ulp at exp(-662) in tests/test_kernel.py). Their loops have no reductions and vectorise
# without it; LLVM keeps each instruction's flags when it inlines them into _block.
_ELEMENTARY = {**_JIT, "fastmath": {"contract", "nsz"}}
# Observations per block: K + 4 rows of scratch stay in L1/L2.
BLOCK = 1024
# Two threads from this many observations (below it one thread was faster).
PARALLEL_MIN = 100_000
# Without log-responsibilities, a block's log-likelihood takes this many logs (of
# products of its row sums) instead of one per observation.
LANES = 64

LOG2E = 1.4426950408889634
# ln 2 split so that n * LN2_HI is exact for |n| < 2^21 (fdlibm's constants).
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
SQRT2 = 1.4142135623730951
# Below this, exp underflows towards the subnormals; those terms are set to 0 (an
# absolute error under 1e-307 on a sum that is at least 1).
EXP_FLOOR = -708.0
MANTISSA = 0xFFFFFFFFFFFFF
ONE_BITS = 1023 << 52


@njit(**_ELEMENTARY)
def _exp_taylor(r):
    """exp(r) for |r| <= ln2/2: the degree-13 Taylor polynomial (truncation < 5e-18)."""
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    return p * r + 1.0


@njit(**_ELEMENTARY)
def exp_shifted(row, shift, out, bits, n):
    """``out[:n] = exp(row - shift)`` where ``row <= shift`` (or NaN); ``bits`` is
    int64 scratch whose float64 view holds the powers of two."""
    scale = bits.view(np.float64)
    for i in range(n):
        d = max(row[i] - shift[i], EXP_FLOOR)
        t = np.floor(d * LOG2E + 0.5)
        bits[i] = (np.int64(t) + 1023) << 52
        out[i] = _exp_taylor((d - t * LN2_HI) - t * LN2_LO)
    for i in range(n):
        v = out[i] * scale[i]
        out[i] = 0.0 if row[i] - shift[i] < EXP_FLOOR else v


@njit(**_ELEMENTARY)
def _log_mantissa(f):
    """log(f) for f in [1/sqrt2, sqrt2]: 2 atanh(t), t = (f-1)/(f+1), |t| < 0.172,
    by its series to t^21 (truncation < 1e-18)."""
    t = (f - 1.0) / (f + 1.0)
    t2 = t * t
    q = 1.0 / 21.0
    q = q * t2 + 1.0 / 19.0
    q = q * t2 + 1.0 / 17.0
    q = q * t2 + 1.0 / 15.0
    q = q * t2 + 1.0 / 13.0
    q = q * t2 + 1.0 / 11.0
    q = q * t2 + 1.0 / 9.0
    q = q * t2 + 1.0 / 7.0
    q = q * t2 + 1.0 / 5.0
    q = q * t2 + 1.0 / 3.0
    return 2.0 * t * (q * t2 + 1.0)


@njit(**_ELEMENTARY)
def log_positive(x, out, bits, n):
    """``out[:n] = log(x)`` for positive normal numbers (and NaN); ``bits`` as above."""
    mant = bits.view(np.float64)
    for i in range(n):
        mant[i] = x[i]
    for i in range(n):
        b = bits[i]
        out[i] = np.float64((b >> 52) - 1023)
        bits[i] = (b & MANTISSA) | ONE_BITS
    for i in range(n):
        f = mant[i]
        big = f > SQRT2
        f = f * 0.5 if big else f
        ex = out[i] + 1.0 if big else out[i]
        v = ex * LN2_HI + (ex * LN2_LO + _log_mantissa(f))
        out[i] = v if x[i] == x[i] else np.nan


@njit(**_JIT)
def _weights(rows, a, n, mx, tot, e, bits):
    """Block ``a:a+n``: ``mx`` the row max, ``e[k] = exp(row_k - mx)``, ``tot`` their sum."""
    k_total = len(rows)
    first = rows[0][a : a + n]
    for i in range(n):
        mx[i] = first[i]
        tot[i] = 0.0
    for k in range(1, k_total):
        row = rows[k][a : a + n]
        for i in range(n):
            mx[i] = row[i] if row[i] > mx[i] else mx[i]
    for k in range(k_total):
        ek = e[k]
        exp_shifted(rows[k][a : a + n], mx, ek, bits, n)
        for i in range(n):
            tot[i] += ek[i]


@njit(**_JIT)
def _sum_log(tot, n, lanes, bits):
    """``sum(log(tot[:n]))`` for ``tot`` in [1, K] by ``LANES`` logs: lane l multiplies
    every LANES-th value, at most BLOCK / LANES = 16 of them (no overflow below
    K = 10^19), so the block takes 64 logs instead of 1024."""
    products = lanes[0]
    products[:] = 1.0
    whole = n - n % LANES
    for j in range(0, whole, LANES):
        for lane in range(LANES):
            products[lane] *= tot[j + lane]
    for i in range(whole, n):
        products[i - whole] *= tot[i]
    log_positive(lanes[0], lanes[1], bits, LANES)
    return lanes[1].sum()


@njit(**_JIT)
def _block(rows, out, cols, wts, a, n, nk, s, mx, tot, lse, e, bits, lanes):
    """One block of observations ``a:a+n``; returns its log-likelihood. With ``out`` of
    zero rows the log-responsibilities are not written and (without weights) the
    log-likelihood takes one log per LANES observations instead of one per observation.
    With weights ``wts`` (one per observation; none when empty) every observation's
    log-likelihood and statistics count ``wts[i]`` times; its responsibilities do not
    change."""
    k_total = len(rows)
    _weights(rows, a, n, mx, tot, e, bits)
    keep = out.shape[0] > 0
    weighted = wts.shape[0] > 0
    loglik = 0.0
    if keep or weighted:
        log_positive(tot, lse, bits, n)
        for i in range(n):
            lse[i] += mx[i]
        if weighted:
            for i in range(n):
                loglik += wts[a + i] * lse[i]
        else:
            for i in range(n):
                loglik += lse[i]
    else:
        for i in range(n):
            loglik += mx[i]
        loglik += _sum_log(tot, n, lanes, bits)
    for i in range(n):
        tot[i] = 1.0 / tot[i]
    if weighted:
        for i in range(n):
            tot[i] *= wts[a + i]
    for k in range(k_total):
        ek = e[k]
        acc = 0.0
        for i in range(n):
            g = ek[i] * tot[i]
            ek[i] = g
            acc += g
        nk[k] += acc
        if keep:
            row, dst = rows[k][a : a + n], out[k, a : a + n]
            for i in range(n):
                dst[i] = row[i] - lse[i]
        for m in range(cols.shape[0]):
            col = cols[m, a : a + n]
            acc = 0.0
            for i in range(n):
                acc += ek[i] * col[i]
            s[m, k] += acc
    return loglik


@njit(**_JIT)
def _run(rows, out, cols, wts, start, stop, nk, s):
    """Blocks over observations ``start:stop``; adds into ``nk`` and ``s``."""
    k_total = len(rows)
    mx, tot, lse = np.empty(BLOCK), np.empty(BLOCK), np.empty(BLOCK)
    e = np.empty((k_total, BLOCK))
    bits = np.empty(BLOCK, dtype=np.int64)
    lanes = np.empty((2, LANES))  # products, then their logs
    loglik = 0.0
    for a in range(start, stop, BLOCK):
        n = min(BLOCK, stop - a)
        loglik += _block(rows, out, cols, wts, a, n, nk, s, mx, tot, lse, e, bits, lanes)
    return loglik


def _one_array(rows) -> np.ndarray | None:
    """The C-contiguous float64 K x N array whose consecutive rows ``rows`` are (the
    buffer of rows written out, :mod:`ppl_em.steps.mvn_rows`), else None."""
    base = getattr(rows[0], "base", None) if len(rows) else None
    if not (isinstance(base, np.ndarray) and base.ndim == 2 and base.shape[0] == len(rows)):
        return None
    if base.dtype != np.float64 or not base.flags.c_contiguous:
        return None
    start, step = base.__array_interface__["data"][0], base.strides[0]
    for k, row in enumerate(rows):
        if not (isinstance(row, np.ndarray) and row.base is base and row.shape == base.shape[1:]):
            return None
        if row.__array_interface__["data"][0] != start + k * step:
            return None
    return base


def _as_rows(joint, keep: bool) -> tuple[np.ndarray | tuple[np.ndarray, ...], np.ndarray]:
    """The K rows as one K x N array where they are one (a numba type for every K), else
    as a tuple of contiguous float64 vectors (a numba type per K: 2-6 s each to compile
    cold, benchmarks/README.md), and the K x N array the log-responsibilities go to: the joint
    itself when it is one writable K x N array, else a new one (rows passed one by one
    are read only), or K x 0 when they are not kept."""
    if isinstance(joint, np.ndarray) and joint.ndim == 2:
        rows = joint = np.require(joint, dtype=np.float64, requirements=("C", "W"))
    else:
        rows = _one_array(joint)
        if rows is None:
            rows = tuple(np.ascontiguousarray(r, dtype=np.float64).reshape(-1) for r in joint)
            if len({r.shape for r in rows}) != 1:
                raise ValueError(f"joint rows have different lengths {[r.size for r in rows]}.")
    k_total, n = len(rows), rows[0].size
    if not keep:
        return rows, np.empty((0, n))
    return rows, joint if isinstance(joint, np.ndarray) else np.empty((k_total, n))


def compiled_fused_estep(
    joint,
    columns: np.ndarray | None = None,
    keep: bool = True,
    *,
    workers: int | None = None,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray | None, float, np.ndarray, np.ndarray]:
    """:func:`ppl_em.steps.passes.fused_estep` by the numba kernel.

    ``joint`` is the K x N joint (overwritten with the log-responsibilities, as the NumPy
    pass does) or a sequence of its K rows (read only; the log-responsibilities go to a
    new K x N array, which saves the compiled graph a join of its rows). Returns the
    N x K view of the log-responsibilities (None with ``keep=False``: an EM iteration
    with closed-form statistics needs only those and the log-likelihood), the
    log-likelihood and the statistics.
    """
    rows, out = _as_rows(joint, keep)
    k_total, n = len(rows), out.shape[1]
    columns = np.zeros((0, n)) if columns is None else columns
    columns = np.require(columns, dtype=np.float64, requirements="C").reshape(-1, n)
    # Block-aligned halves, one partial result each, summed in a fixed order.
    if workers is None:
        workers = 2 if n >= PARALLEL_MIN and usable_cores() >= 2 else 1
    spans = halves(n, BLOCK, workers)
    parts = [(np.zeros(k_total), np.zeros((columns.shape[0], k_total))) for _ in spans]
    wts = np.zeros(0) if weights is None else np.require(weights, np.float64, "C").reshape(n)
    logliks = run_split(lambda j: _run(rows, out, columns, wts, *spans[j], *parts[j]), len(spans))
    nk, s = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return (out.T if keep else None), float(sum(logliks)), nk, s
