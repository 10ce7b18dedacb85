"""The study's two design rules, torch-free: has a quantity settled by the end of a run, and does a grid bracket
its val optimum (train/experiments/study/run.py applies both; the report states them).

Settling (issue 24's rule): a quantity q recorded over a run of T steps has settled when its relative change
over the last ``window`` of the run is below ``tolerance``: |q_end − q_start| / |q_end| < tolerance. The window
is measured two ways, because a cosine schedule makes the literal one nearly empty:

- ``steps``: the last ``window``·T steps (the rule as written);
- ``lr``: the last ``window`` of the run's summed learning rate Σ_t lr_t. With AdamW a parameter moves at most
  about lr_t per step, so under cosine decay the last 20% of the *steps* carry only ~1.3% of the summed lr and
  any quantity "settles" there by the schedule alone; the last 20% of the summed lr starts near half of T.

The study reports both and calls a quantity settled only when the ``lr`` reading holds.
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence, Tuple

from train.config import OptimConfig
from train.core.schedule import cosine_lr


def schedule_lrs(optim: OptimConfig) -> List[float]:
    """The learning rate of each of a run's ``optim.steps`` steps: the trainer's schedule (cosine_lr)."""
    return [cosine_lr(step, optim) for step in range(optim.steps)]


def window_start(lrs: Sequence[float], window: float, by: str) -> int:
    """The first step of the last ``window`` of a run whose step t had learning rate ``lrs[t]``.

    Args:
        lrs: the learning rate of every step, len T ≥ 1.
        window: fraction in (0, 1).
        by: "steps" (the last window·T steps) or "lr" (the steps carrying the last window of Σ lr).
    Raises:
        ValueError for another ``by`` or a window outside (0, 1).
    """
    if not 0 < window < 1:
        raise ValueError(f"window {window} must be in (0, 1)")
    total_steps = len(lrs)
    if by == "steps":
        return min(total_steps - 1, int(round((1 - window) * total_steps)))
    if by != "lr":
        raise ValueError(f"by={by!r}: expected 'steps' or 'lr'")
    cumulative, acc = [], 0.0
    for lr in lrs:
        acc += lr
        cumulative.append(acc)
    return min(total_steps - 1, bisect.bisect_left(cumulative, (1 - window) * acc))


def relative_change(steps: Sequence[int], values: Sequence[float], start: int) -> Tuple[float, int]:
    """(|q_end − q_start| / |q_end|, the step q_start was recorded at): q_start is the value at the last
    recorded step ≤ ``start`` (records come every few steps; the run's first record is step 0). ``steps``
    ascending, same length as ``values``; q_end = 0 gives inf."""
    i = max(0, bisect.bisect_right(list(steps), start) - 1)
    end = values[-1]
    return (abs(end - values[i]) / abs(end) if end else float("inf")), steps[i]


def settling(records: List[Dict], key: str, lrs: Sequence[float], window: float = 0.2,
             tolerance: float = 0.05) -> Dict:
    """Whether ``records[*][key]`` settled over a run with per-step learning rates ``lrs``.

    Returns {"end": q_end, "steps": reading, "lr": reading, "settled_steps": bool, "settled": bool}, each
    reading {"start": the window's first step, "from": the step of the record compared with the end (the
    last at or before "start"), "change": the relative change}; ``settled`` is the ``lr`` reading (module
    docstring). Records without ``key`` are ignored (a probe runs every few records).

    Raises:
        ValueError: fewer than two records carry ``key``.
    """
    rows = [(r["step"], float(r[key])) for r in records if key in r]
    if len(rows) < 2:
        raise ValueError(f"{key!r}: {len(rows)} records, need at least 2")
    steps, values = [s for s, _ in rows], [v for _, v in rows]
    out: Dict = {"end": values[-1]}
    for by in ("steps", "lr"):
        start = window_start(lrs, window, by)
        change, used = relative_change(steps, values, start)
        out[by] = {"start": start, "from": used, "change": change}
    out["settled_steps"] = out["steps"]["change"] < tolerance
    out["settled"] = out["lr"]["change"] < tolerance
    return out


def best(rows: List[Dict], key: str) -> Dict:
    """The row of highest "val_top1"; a tie goes to the smaller ``key`` (λ or w: the weaker regulariser),
    the rule next_grid_value brackets by."""
    return max(sorted(rows, key=lambda r: r[key]), key=lambda r: r["val_top1"])


def next_grid_value(scores: Dict[float, float], tried_extensions: int, max_extensions: int,
                    step_up: float = 2.5, step_down: float = 0.5) -> Optional[float]:
    """The next value to try when the best of a grid sits at its edge, or None when it is bracketed.

    Args:
        scores: {value > 0: val score} of the method's grid (the λ = 0 baseline is not in it: a best
            at the smallest value is an edge whatever the baseline scored, since the optimum may lie
            between 0 and that value).
        tried_extensions, max_extensions: extensions made so far, and the most allowed.
    Returns:
        max·step_up when the best is the largest value (also for a one-value grid), min·step_down when it
        is the smallest, None when the best has a neighbour on each side or the extensions are spent (the
        report then says the optimum is at an edge). Ties go to the smaller value (the weaker regulariser).
    """
    if not scores or tried_extensions >= max_extensions:
        return None
    best = max(sorted(scores), key=lambda v: scores[v])
    if best == max(scores):
        return best * step_up
    if best == min(scores):
        return best * step_down
    return None


def at_edge(scores: Dict[float, float]) -> bool:
    """Whether the best of ``scores`` (as next_grid_value picks it) is the grid's smallest or largest value."""
    if len(scores) < 3:
        return True
    best = max(sorted(scores), key=lambda v: scores[v])
    return best in (min(scores), max(scores))
