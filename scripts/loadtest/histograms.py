"""The one HDR histogram shape (range and precision) that client processes record into and
the parent merges: any two can be added.
"""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

from loadtest.config import HARD_CAP_SECONDS

# HDR histogram range: 1 us .. twice the hard cap (open-loop latency can exceed the timeout,
# being measured from the intended send time), 3 significant digits.
HDR_LOWEST_US = 1
HDR_HIGHEST_US = int(2 * HARD_CAP_SECONDS * 1_000_000)
HDR_DIGITS = 3


def new_histogram() -> HdrHistogram:
    """Every histogram with the same range and precision, so that any two can be added."""
    return HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_DIGITS)
