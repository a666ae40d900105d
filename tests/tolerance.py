"""Tolerances derived from what a test compares: float32's resolution, scaled by the terms a compared quantity sums.

EPS32 (2**-23) is the spacing of float32 numbers in [1, 2): a float32 number x is known to |x| x EPS32. A float32 sum of
n terms of one sign rounds at each addition, in an order that depends on the CPU's vector width (torch picks its
kernels by `ATEN_CPU_CAPABILITY`) and the thread count: two correct sums of the same terms differ by at most n x EPS32
x the total (the bound of recursive summation). Logits, of order one, are compared absolutely: two float32 forwards of
the same tiny model (streamprune's block loop and transformers' modules) round differently, by at most LOGITS_ATOL.
A log-probability is a logit minus a log-sum-exp of logits, so it moves by at most twice that; a sum of log-
probabilities, or a perplexity (the exponential of their mean), by the sum of both effects over its terms.
"""

from __future__ import annotations

import math

EPS32 = 2.0**-23
LOGITS_ATOL = 1e-4


def sum_rounding(n: int) -> float:
    """Relative difference of two float32 sums of the same `n` terms of one sign, added in other orders."""
    return n * EPS32


def logprob_sum(n: int, total: float) -> float:
    """Absolute tolerance of a sum of `n` float32 log-probabilities (`total`) computed by two implementations."""
    return n * 2 * LOGITS_ATOL + sum_rounding(n) * abs(total)


def perplexity(window: int, ppl: float) -> float:
    """Relative tolerance of a perplexity computed by two implementations over windows of `window` tokens: the mean
    negative log-likelihood (log ppl) moves by at most twice LOGITS_ATOL per token, plus the float32 rounding of each
    window's sum of `window` terms."""
    return 2 * LOGITS_ATOL + sum_rounding(window) * math.log(ppl)
