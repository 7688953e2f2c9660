"""Exact L2-optimal step approximation of a function sampled on cells.

The problem: given a partition of the line into M consecutive cells with weighted moments

    s0[c] = integral_c w(x) dx,   s1[c] = integral_c w(x) g(x) dx,   s2[c] = integral_c w(x) g(x)^2 dx,

choose K contiguous groups of cells (a segmentation) and one level per group so that the weighted squared
error  sum_groups integral (g - level)^2 w  is minimal. For a fixed group the best level is its weighted mean
s1/s0 and the error is  s2 - s1^2 / s0, so everything reduces to prefix sums.

`optimal_segmentation` solves it exactly by dynamic programming over cell boundaries (O(K M^2) time,
vectorized over one index). `refine_borders` then polishes a segmentation found on a coarse grid over a
finer partition: exact DP restricted to a window of fine boundaries around each border (all borders move
together, which coordinate-wise moves cannot do), alternated with exact block-coordinate descent (each
border to the best fine boundary between its neighbours) until neither changes anything. Every step can
only lower the error, so refinement never undoes what the coarse DP found.
"""

from __future__ import annotations

import numpy as np

__all__ = ["segment_errors", "optimal_segmentation", "refine_borders", "segmentation_error", "windowed_dp"]


def _prefix(values: np.ndarray) -> np.ndarray:
    out = np.zeros(values.size + 1, dtype=np.float64)
    np.cumsum(values, out=out[1:])
    return out


def segment_errors(P0, P1, P2, lo, hi):
    """Error and weight of the groups of cells [lo, hi) given prefix sums (arrays broadcast)."""
    s0 = P0[hi] - P0[lo]
    s1 = P1[hi] - P1[lo]
    s2 = P2[hi] - P2[lo]
    with np.errstate(divide="ignore", invalid="ignore"):
        err = s2 - np.where(s0 > 0, s1 * s1 / s0, 0.0)
    # Cancellation can leave tiny negative values; an error is never below zero.
    return np.maximum(err, 0.0)


def optimal_segmentation(s0, s1, s2, k: int) -> tuple[np.ndarray, float]:
    """Split M cells into exactly k non-empty contiguous groups minimizing the weighted L2 error.

    Returns (cuts, error): `cuts` holds the k - 1 interior boundaries as cell indices (a group is
    cells[cuts[i-1]:cuts[i]]), strictly increasing, and `error` the minimal total error.
    """
    s0 = np.asarray(s0, dtype=np.float64)
    m = s0.size
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}] for {m} cells, got {k}")
    P0, P1, P2 = _prefix(s0), _prefix(np.asarray(s1, np.float64)), _prefix(np.asarray(s2, np.float64))
    idx = np.arange(m + 1)
    # cost[i, j]: error of the group of cells [i, j); +inf where the group would be empty or reversed.
    cost = segment_errors(P0, P1, P2, idx[:, None], idx[None, :])
    cost[idx[:, None] >= idx[None, :]] = np.inf

    best = cost[0].copy()  # best[j]: error of cells [0, j) in 1 group
    back = np.zeros((k, m + 1), dtype=np.int64)
    for g in range(1, k):
        total = best[:, None] + cost  # total[i, j] = best(g groups over [0, i)) + cost[i, j)
        back[g] = np.argmin(total, axis=0)
        best = total[back[g], idx]
    cuts = []
    j = m
    for g in range(k - 1, 0, -1):
        j = int(back[g, j])
        cuts.append(j)
    return np.array(cuts[::-1], dtype=np.int64), float(best[m])


def segmentation_error(P0, P1, P2, cuts) -> float:
    bounds = np.concatenate([[0], np.asarray(cuts, np.int64), [P0.size - 1]])
    return float(segment_errors(P0, P1, P2, bounds[:-1], bounds[1:]).sum())


def windowed_dp(P0, P1, P2, cuts, window: int) -> np.ndarray:
    """Exact optimum over segmentations whose i-th cut lies within `window` boundaries of cuts[i]."""
    m = P0.size - 1
    cands = [np.arange(max(1, c - window), min(m - 1, c + window) + 1) for c in cuts]
    best = segment_errors(P0, P1, P2, 0, cands[0])
    backs = []
    for prev, cur in zip(cands, cands[1:]):
        total = best[:, None] + segment_errors(P0, P1, P2, prev[:, None], cur[None, :])
        total[prev[:, None] >= cur[None, :]] = np.inf
        arg = np.argmin(total, axis=0)
        backs.append(arg)
        best = total[arg, np.arange(cur.size)]
    best = best + segment_errors(P0, P1, P2, cands[-1], m)
    j = int(np.argmin(best))
    out = [int(cands[-1][j])]
    for i in range(len(backs) - 1, -1, -1):
        j = int(backs[i][j])
        out.append(int(cands[i][j]))
    return np.array(out[::-1], dtype=np.int64)


def _coordinate_descent(P0, P1, P2, bounds, max_sweeps):
    for _ in range(max_sweeps):
        moved = False
        for i in range(1, bounds.size - 1):
            a, b = bounds[i - 1], bounds[i + 1]
            cand = np.arange(a + 1, b)  # keep both groups non-empty
            if cand.size <= 1:
                continue
            err = segment_errors(P0, P1, P2, a, cand) + segment_errors(P0, P1, P2, cand, b)
            j = int(cand[np.argmin(err)])
            here = segment_errors(P0, P1, P2, a, bounds[i]) + segment_errors(P0, P1, P2, bounds[i], b)
            # Move only on a strict improvement, so sweeps terminate.
            if j != bounds[i] and err.min() < here - 1e-15 * max(1.0, abs(here)):
                bounds[i] = j
                moved = True
        if not moved:
            return


def refine_borders(s0, s1, s2, cuts, window: int = 32, max_rounds: int = 50) -> np.ndarray:
    """Polish `cuts` on the partition (s0, s1, s2): windowed DP and coordinate descent, alternated until
    a fixed point. The error never increases."""
    P0, P1, P2 = (_prefix(np.asarray(s, np.float64)) for s in (s0, s1, s2))
    m = P0.size - 1
    cuts = np.asarray(cuts, np.int64)
    if cuts.size == 0:
        return cuts.copy()
    err = segmentation_error(P0, P1, P2, cuts)
    for _ in range(max_rounds):
        bounds = np.concatenate([[0], cuts, [m]])
        _coordinate_descent(P0, P1, P2, bounds, max_sweeps=200)
        # The window holds the descended cuts, so the windowed optimum is no worse than they are.
        new = windowed_dp(P0, P1, P2, bounds[1:-1], window)
        new_err = segmentation_error(P0, P1, P2, new)
        improved = new_err < err - 1e-15 * max(1.0, err)
        cuts, err = new, min(err, new_err)
        if not improved:
            break
    return cuts.copy()
