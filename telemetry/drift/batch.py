"""PSI, chi-square and binned KS for every feature at once (what the monitor runs per evaluation).

Same numbers as :func:`telemetry.drift.psi.psi`, :func:`telemetry.drift.chi2.chi2_homogeneity`
and :func:`telemetry.drift.ks_binned.ks_binned` applied feature by feature (a test checks), on
histograms padded with empty bins to one width: an empty bin in both histograms adds nothing to
PSI (both shares floored to the same eps), is left out of the chi-square table, and leaves both
CDFs at 1.

>>> psi_, chi2_p, ks_p = feature_tests([[50, 50], [25, 25, 25, 25]], [[50, 50], [10, 10, 10, 70]])
>>> [round(float(v), 3) for v in psi_], bool(chi2_p[0] > 0.99), bool(chi2_p[1] < 1e-6), bool(ks_p[1] < 1e-3)
([0.0, 0.876], True, True, True)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.special import chdtrc, kolmogorov


def _pad(hists: Sequence[Sequence[float]], width: int) -> np.ndarray:
    out = np.zeros((len(hists), width))
    for i, h in enumerate(hists):
        out[i, :len(h)] = h
    return out


def feature_tests(reference: Sequence[Sequence[float]], current: Sequence[Sequence[float]],
                  eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PSI, chi-square p-value, binned KS p-value) per feature, for histograms on the same bins."""
    if len(reference) != len(current):
        raise ValueError(f"{len(reference)} reference and {len(current)} current histograms")
    for i, (r, c) in enumerate(zip(reference, current, strict=True)):
        if len(r) != len(c):
            raise ValueError(f"feature {i}: histograms have {len(r)} and {len(c)} bins")
    f = len(reference)
    if f == 0:
        return np.zeros(0), np.ones(0), np.ones(0)
    width = max(len(h) for h in reference)
    R, C = _pad(reference, width), _pad(current, width)
    n, m = R.sum(axis=1), C.sum(axis=1)
    ok = (n > 0) & (m > 0)
    sn, sm = np.where(ok, n, 1.0)[:, None], np.where(ok, m, 1.0)[:, None]
    real = np.arange(width)[None, :] < np.array([len(h) for h in reference])[:, None]
    # PSI over the real bins only (padding would add eps-floored zeros on both sides: nothing)
    p, q = np.maximum(R / sn, eps), np.maximum(C / sm, eps)
    psi = np.where(ok, (np.where(real, (q - p) * np.log(q / p), 0.0)).sum(axis=1), 0.0)
    # chi-square homogeneity on the columns where either histogram has counts
    col = R + C
    used = col > 0
    total = np.where(ok, n + m, 1.0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        e_r, e_c = n[:, None] * col / total, m[:, None] * col / total
        terms = np.where(used, (R - e_r) ** 2 / e_r + (C - e_c) ** 2 / e_c, 0.0)
    stat = terms.sum(axis=1)
    df = used.sum(axis=1) - 1
    chi2_p = np.where(ok & (df >= 1), chdtrc(np.maximum(df, 1), stat), 1.0)
    # KS on the CDFs at the bin edges
    d = np.abs(np.cumsum(R, axis=1) / sn - np.cumsum(C, axis=1) / sm)[:, :-1].max(axis=1) if width > 1 else np.zeros(f)
    ks_p = np.where(ok & (d > 0), np.minimum(1.0, kolmogorov(d * np.sqrt(n * m / np.where(ok, n + m, 1.0)))), 1.0)
    return psi, chi2_p, ks_p
