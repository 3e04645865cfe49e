"""The figures a simulated run reports, and the few summaries that make them.

Invariants: a figure is JSON-representable (number, None, string, bool or a list of numbers),
rounded to the millisecond where it is a time, so printed output is stable across platforms.
"""

from __future__ import annotations

import math
import statistics

Figure = float | int | str | bool | None | list[float | None]


def rounded(x: float | None) -> float | None:
    """`x` rounded to 3 decimals (milliseconds for times); None stays None."""
    return None if x is None else round(x, 3)


def median_reached(xs: list[float | None]) -> float | None:
    """Median over the values reached; None if any value is None or there are none."""
    if not xs or any(x is None for x in xs):
        return None
    return rounded(statistics.median([x for x in xs if x is not None]))


def worst_reached(xs: list[float | None]) -> float | None:
    """The largest value; None if any value is None (not reached) or there are none."""
    if not xs or any(x is None for x in xs):
        return None
    return rounded(max(x for x in xs if x is not None))


def nearest_rank(sorted_xs: list[float], q: float) -> float | None:
    """The nearest-rank `q` quantile of the sorted values; None when there are none."""
    if not sorted_xs:
        return None
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))]
