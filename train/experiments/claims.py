"""The one registry of metrics and claimed effects, and the one verdict rule, of the demo and the study.

Both reports read evaluation results with the evaluator's keys (eval.json of `python -m train.evaluate`,
docs/METHODS.md §4.1) and judge every claim here the same way.

Verdict rule (paired design: arm and baseline share the seed, hence the data order and, for fine-tuning,
the initial weights). Per claim, d_s = arm_s − baseline_s over the n seeds, signed so that a positive d
means better in the claimed direction; 95% CI = mean(d) ± t_{0.975, n−1}·sd(d)/√n (sd with n − 1;
Student's t interval of the mean difference). "shows": the CI lies entirely above 0; "reversed": entirely
below 0; "not resolved": it contains 0 (the effect, if any, is smaller than this design can see at n
seeds). With one seed there is no spread to judge against: "one seed", no interval.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from train.evaluate.report import markdown_table


@dataclass(frozen=True)
class Metric:
    key: str
    """Path into an eval result, dot-separated (``zero_shot.top1`` = result["zero_shot"]["top1"])."""
    label: str
    higher: Optional[bool]
    """True: higher is better; False: lower is better; None: descriptive, no better direction."""

    @property
    def title(self) -> str:
        return self.label + {True: " ↑", False: " ↓", None: ""}[self.higher]


METRICS = [
    Metric("zero_shot.top1", "zero-shot top-1", True), Metric("zero_shot.top5", "zero-shot top-5", True),
    Metric("zero_shot.ece", "ECE", False), Metric("zero_shot.ece_ts", "ECE after temperature scaling", False),
    Metric("zero_shot.nll", "NLL", False), Metric("zero_shot.nll_ts", "NLL after temperature scaling", False),
    Metric("zero_shot.consistency", "consistency (k-NN over train, mean over k)", True),
    Metric("robustness.shifted_top1", "shifted top-1 (mean of 12)", True),
    Metric("robustness.relative", "shifted / clean top-1", True),
    Metric("robustness.shifted_ece", "shifted ECE (mean of 12)", False),
    Metric("retrieval.i2t_R@1", "image→text R@1", True), Metric("retrieval.t2i_R@1", "text→image R@1", True),
    Metric("retrieval_label.i2t_R@1", "image→text R@1 (any caption of the class)", True),
    Metric("embedding.alignment", "alignment", False), Metric("embedding.uniformity_union", "uniformity (union)", False),
    Metric("embedding.modality_gap", "modality gap", None), Metric("embedding.C_in", "C_in", None),
    Metric("embedding.C_cross", "C_cross", None), Metric("model.logit_scale", "logit scale", None),
]
METRIC = {m.key: m for m in METRICS}

# Arm ids of the claims (the reports map them to their own arms) and their display names.
ARMS = {"clip": "CLIP", "cyclip": "CyCLIP", "plain": "plain FT", "m2mix": "m²-Mix FT"}
CYCLIP = "Goel et al. 2022 (CyCLIP)"
M2MIX = "Oh et al. 2023 (m²-Mix)"


@dataclass(frozen=True)
class Claim:
    arm: str
    baseline: str
    metric: str
    source: str
    text: str
    """The paper's claim, as its abstract states it (docs/METHODS.md §5)."""

    @property
    def measure(self) -> Metric:
        return METRIC[self.metric]


CLAIMS = [
    Claim("cyclip", "clip", "zero_shot.top1", CYCLIP, "+10–24% relative zero-shot top-1 over CLIP on the same data"),
    Claim("cyclip", "clip", "robustness.shifted_top1", CYCLIP, "+10–27% zero-shot top-1 under distribution shift"),
    Claim("cyclip", "clip", "zero_shot.consistency", CYCLIP, "more consistent in-modal and cross-modal predictions"),
    Claim("m2mix", "plain", "zero_shot.top1", M2MIX, "better zero-shot accuracy after robust fine-tuning"),
    Claim("m2mix", "plain", "robustness.shifted_top1", M2MIX, "more robust zero-shot accuracy under distribution shift"),
    Claim("m2mix", "plain", "robustness.relative", M2MIX, "keeps more of its accuracy under distribution shift"),
    Claim("m2mix", "plain", "zero_shot.ece", M2MIX, "lower calibration error"),
    Claim("m2mix", "plain", "zero_shot.nll", M2MIX, "lower calibration error (negative log-likelihood)"),
    Claim("m2mix", "plain", "embedding.alignment", M2MIX, "better alignment of paired embeddings"),
    Claim("m2mix", "plain", "embedding.uniformity_union", M2MIX, "better uniformity of the joint embedding"),
    Claim("m2mix", "plain", "retrieval.i2t_R@1", M2MIX, "better image→text retrieval"),
    Claim("m2mix", "plain", "retrieval.t2i_R@1", M2MIX, "better text→image retrieval"),
]


def claims_of(arm: str, baseline: str) -> List[Claim]:
    """The registered claims of ``arm`` over ``baseline`` (arm ids of ``ARMS``), in registry order."""
    return [c for c in CLAIMS if (c.arm, c.baseline) == (arm, baseline)]


def value(result: Mapping, key: str) -> Optional[float]:
    """result[k1][k2]... for key "k1.k2..." as a float; None where the result lacks it."""
    node = result
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return float(node)


@dataclass
class Verdict:
    claim: Claim
    arm_mean: float
    baseline_mean: float
    gain: float
    """mean(d): positive = better in the claimed direction."""
    lo: Optional[float]
    hi: Optional[float]
    """The 95% t-interval of mean(d); None with one seed."""
    n: int
    status: str
    """"shows", "reversed", "not resolved" or "one seed"."""

    def as_dict(self) -> Dict:
        return {"arm": self.claim.arm, "baseline": self.claim.baseline, "metric": self.claim.metric,
                "arm_mean": self.arm_mean, "baseline_mean": self.baseline_mean, "gain": self.gain,
                "lo": self.lo, "hi": self.hi, "n": self.n, "verdict": self.status}


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (scipy.stats.t.ppf)."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(p, dof))


def judge(claim: Claim, arm: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Verdict:
    """The verdict rule of the module docstring. ``arm[i]`` and ``baseline[i]`` come from the same seed."""
    if len(arm) != len(baseline) or not arm:
        raise ValueError(f"paired values need the same seeds on both sides, got {len(arm)} and {len(baseline)}")
    higher = claim.measure.higher
    if higher is None:
        raise ValueError(f"{claim.metric} has no better direction: it cannot carry a claim")
    gains = [(a - b) if higher else (b - a) for a, b in zip(arm, baseline)]
    n, mean = len(gains), statistics.fmean(gains)
    if n == 1:
        status, lo, hi = "one seed", None, None
    else:
        half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(gains) / math.sqrt(n)
        lo, hi = mean - half, mean + half
        status = "shows" if lo > 0 else "reversed" if hi < 0 else "not resolved"
    return Verdict(claim, statistics.fmean(arm), statistics.fmean(baseline), mean, lo, hi, n, status)


def judge_arms(evals: Mapping[str, Sequence[Mapping]], arm: str, baseline: str,
               names: Optional[Mapping[str, str]] = None) -> List[Verdict]:
    """Every registered claim of ``arm`` over ``baseline`` on eval results ``evals[name]`` (one per seed, in
    seed order on both sides); ``names`` maps the claim's arm ids to the keys of ``evals`` (default: same)."""
    names = names or {}
    out = []
    for claim in claims_of(arm, baseline):
        a = [value(e, claim.metric) for e in evals[names.get(arm, arm)]]
        b = [value(e, claim.metric) for e in evals[names.get(baseline, baseline)]]
        if None not in a and None not in b:    # a metric this evaluation did not compute is not judged
            out.append(judge(claim, a, b))
    return out


def sentence(v: Verdict, arm: str, baseline: str) -> str:
    """One line for a report: the numbers, the interval and what they say about the claim."""
    m = v.claim.measure
    numbers = f"{m.label}: {arm} {v.arm_mean:.4f} vs {baseline} {v.baseline_mean:.4f} (claim: {v.claim.text})"
    if v.status == "one seed":
        direction = "better" if v.gain > 0 else "not better"
        return f"{numbers} — {direction}, but with one seed there is no spread to judge it against."
    ci = f"paired gain {v.gain:+.4f} (+ = better), 95% CI [{v.lo:+.4f}, {v.hi:+.4f}] over {v.n} seeds"
    return {"shows": f"{numbers} — {ci}: above 0, the effect shows.",
            "reversed": f"{numbers} — {ci}: below 0, the claimed effect is **reversed** at this scale.",
            "not resolved": f"{numbers} — {ci}: contains 0, not resolved at this scale."}[v.status]


def summary(verdicts: Sequence[Verdict]) -> str:
    """One sentence counting the verdicts."""
    counts: Dict[str, int] = {}
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
    if counts.get("one seed"):
        return (f"This run has one seed per arm, so none of its {len(verdicts)} comparisons can be judged against "
                "seed noise; read their directions only as anecdotes.")
    return (f"Of {len(verdicts)} claimed effects, {counts.get('shows', 0)} show (95% CI of the paired gain above 0), "
            f"{counts.get('not resolved', 0)} are not resolved (CI contains 0) and {counts.get('reversed', 0)} are "
            "reversed (CI below 0).")


def verdict_table(rows: Sequence[tuple]) -> str:
    """Markdown table of (comparison title, Verdict) rows."""
    cells = []
    for title, v in rows:
        rel = 100 * v.gain / abs(v.baseline_mean) if v.baseline_mean else 0.0
        ci = "—" if v.lo is None else f"[{v.lo:+.4f}, {v.hi:+.4f}]"
        cells.append([title, v.claim.measure.title, f"{v.arm_mean:.4f}", f"{v.baseline_mean:.4f}",
                      f"{v.gain:+.4f} ({rel:+.1f}%)", ci, f"**{v.status}**"])
    return markdown_table(["comparison", "claimed effect", "arm", "baseline", "paired gain, + = better (rel.)",
                           "95% CI", "verdict"], cells)


def cell(values: Sequence[float]) -> str:
    """Mean ± sample sd over seeds ("mean" alone for one seed)."""
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def results_table(evals: Mapping[str, Sequence[Mapping]]) -> str:
    """Every registered metric that some arm has, one column per arm (mean ± sd over its results)."""
    rows = []
    for m in METRICS:
        columns = [[value(e, m.key) for e in runs] for runs in evals.values()]
        if any(v is not None for col in columns for v in col):
            rows.append([m.title] + [cell(col) if None not in col else "—" for col in columns])
    return markdown_table(["metric"] + [f"{arm} (n={len(runs)})" for arm, runs in evals.items()], rows)
