"""How many distinct inputs a window saw: a 64-register HyperLogLog sketch, mergeable across windows.

A device that loops over a recorded data set, replays a test set, or watches a still scene sends
the same inputs again and again. Every repeat adds to the counts of its feature histograms, yet
tells the monitor nothing new: a drift test that believes 1,000 inferences when they hold 171
distinct rows is five times too confident, and raises alarms on clean data. Each window therefore
carries ``distinct``, the registers of a HyperLogLog sketch of its rows (Flajolet et al., 2007):
64 small integers (sent as 64 characters, :func:`to_text`), merged across windows and devices by
their element-wise maximum, from which the monitor estimates the number of distinct rows behind
any set of windows within about 13% (1.04 / sqrt(64)), and for fewer than 160 rows within a few
rows (linear counting). The monitor's tests then use at most that many samples.

Rows are hashed as a whole, by value: the float64 value of each feature (NaN included, as its bit
pattern), combined by a multilinear hash with fixed odd multipliers and a final mixer (the
finaliser of SplitMix64), so equal rows collide on every device and run, and different rows do
not, up to the 2^-64 chance. A row of more than 256 values is hashed on 256 of them, evenly
spaced.

References: Flajolet, P., Fusy, E., Gandouet, O., Meunier, F. (2007). HyperLogLog: the analysis
of a near-optimal cardinality estimation algorithm. AofA 2007; Whang, K.-Y., Vander-Zanden, B. T.,
Taylor, H. M. (1990). A linear-time probabilistic counting algorithm for database applications.
ACM TODS 15(2) (linear counting).

>>> rng = np.random.default_rng(0)
>>> rows = rng.normal(size=(171, 30))
>>> regs = new_registers()
>>> add_rows(regs, rows[rng.integers(0, 171, 1000)])       # 1,000 draws of 171 distinct rows
>>> 150 < estimate(regs) < 190
True
>>> other = new_registers(); add_rows(other, rows)          # the same rows seen by another window
>>> round(estimate(merge([regs.tolist(), other.tolist()]))) == round(estimate(regs))
True
>>> fresh = new_registers(); add_rows(fresh, rng.normal(size=(5000, 30)))
>>> 4000 < estimate(fresh) < 6000
True
>>> estimate(new_registers())
0.0
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

REGISTERS = 64                 # m: 6 index bits
_INDEX_BITS = 6
_REST_BITS = 64 - _INDEX_BITS
MAX_RANK = _REST_BITS + 1      # a register's largest value
MAX_VALUES = 256               # values of a row that enter its hash
_ALPHA = 0.709                 # the bias constant for m = 64
DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"   # a register's character
_VALUE = {c: i for i, c in enumerate(DIGITS)}
_MULT = np.random.default_rng(0x5EED).integers(1, 2 ** 62, size=MAX_VALUES, dtype=np.uint64) * np.uint64(2) \
    + np.uint64(1)             # odd multipliers, fixed for every device and run


def new_registers() -> np.ndarray:
    return np.zeros(REGISTERS, dtype=np.uint8)


def _mix(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 values (wrapping arithmetic)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row of a 2-D array (by value, as float64)."""
    x = np.asarray(rows, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] > MAX_VALUES:
        x = x[:, np.linspace(0, x.shape[1] - 1, MAX_VALUES).astype(np.int64)]
    x = np.where(x == 0.0, 0.0, x)                       # -0.0 and 0.0 are one value
    bits = np.ascontiguousarray(x).view(np.uint64)
    with np.errstate(over="ignore"):
        h = (bits * _MULT[: bits.shape[1]]).sum(axis=1, dtype=np.uint64) + np.uint64(bits.shape[1])
        return _mix(h)


def add_rows(registers: np.ndarray, rows: np.ndarray) -> None:
    """Add the rows of a 2-D array to ``registers`` (in place)."""
    if len(rows) == 0:
        return
    h = row_hashes(rows)
    index = (h >> np.uint64(_REST_BITS)).astype(np.int64)
    rest = h & np.uint64((1 << _REST_BITS) - 1)
    # rank: the position of the first 1-bit in the remaining bits, from the top (MAX_RANK when all are 0)
    top = np.floor(np.log2(np.maximum(rest, 1).astype(np.float64))).astype(np.int64)
    rank = np.where(rest == 0, MAX_RANK, _REST_BITS - np.minimum(top, _REST_BITS - 1)).astype(np.uint8)
    np.maximum.at(registers, index, rank)


def to_text(registers: Sequence[int]) -> str:
    """The registers as 64 characters, one per register (0-9, A-Z, a-z): a third of a JSON list's bytes.

    >>> to_text([0, 9, 10, 35, 36, 59] + [1] * 58)[:8]
    '09AZax11'
    """
    return "".join(DIGITS[int(r)] for r in registers)


def from_text(text: str) -> list[int]:
    """The registers back from :func:`to_text` (ValueError for a character outside its alphabet).

    >>> from_text(to_text([0, 9, 10, 35, 36, 59] + [1] * 58))[:6]
    [0, 9, 10, 35, 36, 59]
    """
    try:
        return [_VALUE[c] for c in text]
    except KeyError:
        raise ValueError("not a distinct-rows sketch") from None


def merge(many: Iterable[Sequence[int]]) -> np.ndarray:
    """The registers of the union: element-wise maximum (of register lists or their text form)."""
    out = new_registers()
    for regs in many:
        if isinstance(regs, str):
            regs = from_text(regs)
        if len(regs) != REGISTERS:
            raise ValueError(f"a distinct-rows sketch has {REGISTERS} registers, not {len(regs)}")
        np.maximum(out, np.asarray(regs, dtype=np.uint8), out=out)
    return out


def estimate(registers: Sequence[int]) -> float:
    """The number of distinct rows behind ``registers``."""
    regs = np.asarray(registers, dtype=np.float64)
    m = float(len(regs))
    zeros = int((regs == 0).sum())
    if zeros == m:
        return 0.0
    raw = _ALPHA * m * m / float(np.sum(2.0 ** -regs))
    if raw <= 2.5 * m and zeros:
        return m * math.log(m / zeros)
    return raw
