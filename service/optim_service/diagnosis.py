"""Reading a session's history as the loss-curve lessons read a plot, with rules a person can check.

Over the last ``window`` steps (thresholds are settings, ``OPTIM_DIAGNOSIS_*``):

- ``not_enough_data``: fewer than ``min_steps`` steps.
- ``diverging``: a step came out non-finite and was skipped, or a loss sent was not finite, or the
  smoothed loss rose above ``divergence_factor`` (4) times its best (fastai's stop rule for lr_find).
- ``oscillating``: successive updates point against each other in more than ``oscillation_fraction``
  of the window (the cosine between consecutive updates is negative: the zig-zag across a valley,
  which on a quadratic happens while the loss still falls), or the loss goes up as often as down
  without falling over the window.
- ``too_slow``: the smoothed loss fell by less than ``slow_decrease`` (relative) over the window while
  the median update-to-parameter ratio stayed below ``slow_ratio`` (far under the ~1e-3 rule of
  thumb), or while the loss fell on nine steps of ten: a crawl, steady and small — unless the loss
  has already fallen a thousandfold since the first step (converged: then a plateau, if anything).
- ``plateau``: no improvement of the best loss by ``plateau_threshold`` (relative, as
  ReduceLROnPlateau's default) for ``patience`` steps.
- ``healthy`` otherwise.

Each verdict comes with its evidence (the numbers the rule read) and a suggestion.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Thresholds:
    window: int = 50
    min_steps: int = 10
    divergence_factor: float = 4.0
    oscillation_fraction: float = 0.6
    slow_decrease: float = 1e-3
    slow_ratio: float = 1e-4
    patience: int = 20
    plateau_threshold: float = 1e-4


SUGGESTIONS = {
    "not_enough_data": "step on, sending the loss with each step; the diagnosis reads the last steps' history",
    "diverging": "the learning rate is far too large: divide it by 10 (POST .../fork with a smaller lr), or clip "
                 "the gradients (clip_grad_norm)",
    "oscillating": "the learning rate is above what the steepest direction takes (1/L on a quadratic): halve it "
                   "or more; momentum or Adam damp the zig-zag",
    "too_slow": "the learning rate is too small: multiply it by 3 to 10 (an lr_range_test finds the range)",
    "plateau": "no improvement lately: if the loss is as low as it goes (evidence.converged), stop; else lower "
               "the learning rate by 10 (what reduce_on_plateau does)",
    "healthy": "keep going",
}


def smoothed(losses: list[float], beta: float = 0.98) -> list[float]:
    """fastai's debiased exponential moving average of the loss."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def diagnose(steps: list[dict], t: Thresholds = Thresholds(), range_test: bool = False) -> dict:
    """The verdict on the last window of ``steps``; for a session under an ``lr_range_test``
    schedule, also the learning rate its whole curve suggests."""
    found = _diagnose(steps, t)
    if range_test:
        suggested = suggest_lr(steps, t)
        if suggested is not None:
            found["evidence"]["suggested_lr"] = suggested
            found["suggestion"] = (f"the range test suggests lr ≈ {suggested['valley']:.3g} (the valley rule), "
                                   f"{suggested['steepest']:.3g} where the loss fell fastest; create or fork a "
                                   "session with it")
    return found


def suggest_lr(steps: list[dict], t: Thresholds = Thresholds()) -> dict | None:
    """From a range test's (lr, loss) curve, up to where it diverged (smoothed loss over 4× its best):
    the lr of the steepest descent of the smoothed loss against log lr (fastai's and Lightning's
    "steep"), and fastai's "valley" (half way into the longest descending stretch)."""
    points = [(s["lr"][0], s["loss"]) for s in steps if s.get("loss") is not None and s.get("lr")]
    if len(points) < t.min_steps:
        return None
    lrs = np.array([p[0] for p in points])
    curve = np.array(smoothed([p[1] for p in points]))
    best = np.minimum.accumulate(curve)
    stop = next((i for i in range(len(curve)) if best[i] > 0 and curve[i] > t.divergence_factor * best[i]), len(curve))
    lrs, curve = lrs[:stop], curve[:stop]
    if len(curve) < 3:
        return None
    slopes = np.gradient(curve, np.log(lrs))
    steepest = float(lrs[int(np.argmin(slopes))])
    n = len(curve)
    run = [1] * n  # the longest decreasing subsequence ending at each point (fastai's valley)
    end = 0
    for i in range(1, n):
        for j in range(i):
            if curve[i] < curve[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end = i
    start = end - run[end]  # as fastai counts it
    third = (end - start) / 3
    valley = float(lrs[start + int(third) + int(third / 2)])
    return {"steepest": steepest, "valley": valley}


def _diagnose(steps: list[dict], t: Thresholds) -> dict:
    window = steps[-t.window:]
    if len(window) < t.min_steps:
        return _verdict("not_enough_data", {"steps": len(window), "needed": t.min_steps})
    losses = [s["loss"] for s in window if s.get("loss") is not None]
    skipped = sum(1 for s in window if s.get("skipped"))
    if skipped or any(not math.isfinite(x) for x in losses):
        return _verdict("diverging", {"skipped_steps": skipped, "non_finite_losses": sum(
            1 for x in losses if not math.isfinite(x))})
    evidence: dict = {"steps": len(window)}
    curve = smoothed(losses) if len(losses) >= t.min_steps else []
    if curve:
        best, last = min(curve), curve[-1]
        evidence |= {"smoothed_loss": last, "best_smoothed_loss": best}
        if best > 0 and last > t.divergence_factor * best:
            return _verdict("diverging", evidence | {"ratio_to_best": last / best})
    cosines = _cosines([s["u"] for s in window if s.get("u")])
    if cosines:
        against = sum(c < 0 for c in cosines) / len(cosines)
        evidence |= {"opposed_updates": against, "mean_cosine": statistics.fmean(cosines)}
        if against > t.oscillation_fraction:
            return _verdict("oscillating", evidence)
    if len(losses) >= t.min_steps:
        ups = sum(b > a for a, b in zip(losses, losses[1:])) / (len(losses) - 1)
        evidence["loss_increases"] = ups
        if ups >= 0.4 and losses[-1] >= losses[0]:
            return _verdict("oscillating", evidence)
    ratios = [r for s in window for r in (s.get("ratio") or {}).values() if r is not None]
    median_ratio = statistics.median(ratios) if ratios else None
    evidence["median_update_ratio"] = median_ratio
    if curve:
        first = curve[0]
        decrease = (first - curve[-1]) / abs(first) if first else 0.0
        falls = sum(b < a for a, b in zip(losses, losses[1:])) / (len(losses) - 1)
        evidence |= {"relative_decrease": decrease, "loss_decreases": falls}
        tiny = median_ratio is not None and median_ratio < t.slow_ratio
        first_ever = next((s["loss"] for s in steps if s.get("loss") is not None), None)
        converged = bool(first_ever and first_ever > 0 and min(losses) < 1e-3 * first_ever)  # fell 1000×: not slow
        evidence["converged"] = converged
        if 0 <= decrease < t.slow_decrease and (tiny or falls >= 0.9) and not converged:  # small, steady steps
            return _verdict("too_slow", evidence)
    elif not curve and median_ratio is not None and median_ratio < t.slow_ratio:
        return _verdict("too_slow", evidence)
    if len(losses) > t.patience:
        best, since = math.inf, 0
        for i, loss in enumerate(losses):
            if loss < best * (1 - t.plateau_threshold) if best > 0 else loss < best:
                best, since = loss, i
        stale = len(losses) - 1 - since
        evidence["steps_without_improvement"] = stale
        if stale >= t.patience:
            return _verdict("plateau", evidence)
    return _verdict("healthy", evidence)


def _cosines(sketches: list[list[float]]) -> list[float]:
    out = []
    for a, b in zip(sketches, sketches[1:]):
        a, b = np.asarray(a), np.asarray(b)
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        if norm > 0:
            out.append(float(a @ b) / norm)
    return out


def _verdict(verdict: str, evidence: dict) -> dict:
    return {"verdict": verdict, "evidence": evidence, "suggestion": SUGGESTIONS[verdict]}
