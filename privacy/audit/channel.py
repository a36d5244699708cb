"""A malicious server against the whole reply channel: membership from every value a reply holds.

The server plays the DP membership game many times. In each trial the node's export holds the
target student (member) or not (non-member), the server sends weights crafted to single the
target out (`canary_lstm_weights`: one LSTM unit fires only on the target's extreme feature
value, and a huge output weight turns it into a huge loss and gradient), and reads back every
value of the train reply: each metric (``num-examples`` included), each numeric field of the
ledger entry, and the weight update projected on the canary's directions. The engine knows no
Flower type: a trial is a callable returning the reply as plain records (`reply_values`
flattens them).

For each value a threshold distinguisher ("member when the value is above / below t") is fitted
on a third of the trials; the value and rule that do best there are evaluated on the other two
thirds, so the advantage ``TPR - FPR`` and its Clopper-Pearson interval are honest (no choice
made on the trials that test it). (epsilon, delta)-DP for add/remove-one-student neighbours caps
the advantage of any distinguisher at ``(e^eps - 1 + 2 delta) / (e^eps + 1)``
(Kairouz et al., 2015); a lower confidence bound above that cap refutes the claim.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import beta

logger = logging.getLogger(__name__)

#: A trial: ``member`` says whether the target is in the node's export; returns the reply's
#: values by name (see `reply_values`).
Trial = Callable[[bool, int], Mapping[str, float]]

FIT_FRACTION = 1 / 3  # trials that choose the value and threshold; the rest test them


def advantage_bound(epsilon: float, delta: float) -> float:
    """The largest membership advantage (TPR - FPR) that (epsilon, delta)-DP allows."""
    e = math.exp(epsilon)
    return min(1.0, (e - 1 + 2 * delta) / (e + 1))


def reply_values(
    records: Mapping[str, Mapping[str, Any]],
    global_weights: Mapping[str, np.ndarray],
    directions: Mapping[str, Mapping[str, np.ndarray]],
) -> dict[str, float]:
    """Every value of a reply as named numbers; what a distinguisher may read.

    Args:
        records: the reply's records by name, each mapping keys to numbers, strings, lists or
            arrays (arrays named like ``global_weights`` are the update).
        global_weights: what the server sent; the update is the reply's weights minus these.
        directions: named directions in weight space (parameter name to array); each gives
            the value ``update . direction``.

    Numbers keep their name (``record/key``), a list of numbers gives one value per element,
    a string holding a JSON object (the signed ledger entry) one value per numeric field and
    any other string its length; the update also gives its L2 norm.
    """
    values: dict[str, float] = {}
    update: dict[str, np.ndarray] = {}
    for record, items in records.items():
        for key, value in items.items():
            name = f"{record}/{key}"
            if isinstance(value, np.ndarray) and key in global_weights:
                update[key] = value.astype(np.float64) - global_weights[key]
            elif isinstance(value, np.ndarray):
                values |= _numbers(name, value.ravel().tolist())
            else:
                values |= _numbers(name, value)
    if update:
        values["update/l2-norm"] = math.sqrt(sum(float((u**2).sum()) for u in update.values()))
        for label, direction in directions.items():
            values[f"update/{label}"] = sum(
                float((update[k] * d).sum()) for k, d in direction.items() if k in update
            )
    return values


def _numbers(name: str, value: Any) -> dict[str, float]:
    if isinstance(value, bool | int | float):
        return {name: float(value)}
    if isinstance(value, list | tuple):
        out: dict[str, float] = {}
        for i, item in enumerate(value):
            out |= _numbers(f"{name}[{i}]", item)
        return out
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out |= _numbers(f"{name}.{key}", item)
        return out
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict | list):
            return _numbers(name, parsed)
        return {f"len({name})": float(len(value))}
    if isinstance(value, bytes):
        return {f"len({name})": float(len(value))}
    return {}


@dataclass(frozen=True)
class Distinguisher:
    """A threshold rule on one value: member when ``value > threshold`` (or ``<`` if not above)."""

    value: str
    threshold: float
    above: bool

    def guess(self, x: np.ndarray) -> np.ndarray:
        return x > self.threshold if self.above else x < self.threshold


@dataclass(frozen=True)
class ValueFinding:
    """One value's best rule on the fit trials and its advantage on the test trials."""

    value: str
    fit_advantage: float
    advantage: float
    low: float
    high: float


@dataclass(frozen=True)
class ChannelAttackResult:
    """What the channel attack found; ``best`` is the value chosen on the fit trials."""

    trials: int
    epsilon: float
    delta: float
    confidence: float
    bound: float
    best: ValueFinding
    values: list[ValueFinding] = field(default_factory=list)

    @property
    def refuted(self) -> bool:
        """The advantage's lower confidence bound exceeds what (epsilon, delta) allows."""
        return self.best.low > self.bound


def channel_attack(
    trial: Trial,
    trials: int,
    *,
    epsilon: float,
    delta: float,
    confidence: float = 0.95,
    seed: int = 0,
) -> ChannelAttackResult:
    """Run ``trials`` trials (half members, in random order) and test every value's leak.

    Raises:
        ValueError: fewer than 12 trials (too few to fit and test a rule).
    """
    if trials < 12:
        raise ValueError(f"need at least 12 trials to fit and test a distinguisher, got {trials}")
    rng = np.random.default_rng(seed)
    members = rng.permutation(np.arange(trials) % 2 == 0)
    rows = []
    for i, member in enumerate(members):
        rows.append(dict(trial(bool(member), i)))
        logger.info("trial %d/%d (%s) done", i + 1, trials, "member" if member else "non-member")
    names = sorted(set().union(*rows))
    table = np.array([[row.get(n, math.nan) for n in names] for row in rows], dtype=np.float64)
    # A value missing from some replies is information too: below every value it took.
    for j in range(len(names)):
        column = table[:, j]
        finite = column[np.isfinite(column)]
        column[~np.isfinite(column)] = finite.min() - 1 if len(finite) else 0.0
    fit = np.zeros(trials, dtype=bool)
    for label in (True, False):  # a third of each class fits, stratified
        idx = np.flatnonzero(members == label)
        fit[rng.permutation(idx)[: max(2, round(len(idx) * FIT_FRACTION))]] = True
    findings = []
    best_rule: tuple[float, Distinguisher] | None = None
    for j, name in enumerate(names):
        rule, fit_adv = _fit(name, table[fit, j], members[fit])
        adv, low, high = _test(rule, table[~fit, j], members[~fit], confidence)
        findings.append(ValueFinding(name, fit_adv, adv, low, high))
        if best_rule is None or fit_adv > best_rule[0]:
            best_rule = (fit_adv, rule)
    assert best_rule is not None
    best = next(f for f in findings if f.value == best_rule[1].value)
    findings.sort(key=lambda f: (-f.advantage, f.value))
    return ChannelAttackResult(
        trials=trials,
        epsilon=epsilon,
        delta=delta,
        confidence=confidence,
        bound=advantage_bound(epsilon, delta),
        best=best,
        values=findings,
    )


def _fit(name: str, x: np.ndarray, members: np.ndarray) -> tuple[Distinguisher, float]:
    """The threshold and direction with the largest TPR - FPR on these trials."""
    candidates = np.unique(x)
    # Midpoints, and one beyond each end (the constant rules).
    cuts = np.r_[candidates[0] - 1, (candidates[:-1] + candidates[1:]) / 2, candidates[-1] + 1]
    best = (Distinguisher(name, float(cuts[0]), True), -1.0)
    for t in cuts:
        for above in (True, False):
            rule = Distinguisher(name, float(t), above)
            adv = _advantage(rule.guess(x), members)
            if adv > best[1]:
                best = (rule, adv)
    return best


def _advantage(guess: np.ndarray, members: np.ndarray) -> float:
    return float(guess[members].mean() - guess[~members].mean())


def _test(
    rule: Distinguisher, x: np.ndarray, members: np.ndarray, confidence: float
) -> tuple[float, float, float]:
    """Advantage on the test trials and its bounds, each one-sided at ``confidence``.

    Clopper-Pearson bounds on TPR and FPR, each at half the error (Bonferroni): the lower
    bound is ``TPR_low - FPR_high``, the upper ``TPR_high - FPR_low``.
    """
    guess = rule.guess(x)
    alpha = (1 - confidence) / 2  # split between the two proportions
    tp, n_pos = int(guess[members].sum()), int(members.sum())
    fp, n_neg = int(guess[~members].sum()), int((~members).sum())
    tpr_low, tpr_high = _clopper_pearson(tp, n_pos, alpha)
    fpr_low, fpr_high = _clopper_pearson(fp, n_neg, alpha)
    return tp / n_pos - fp / n_neg, tpr_low - fpr_high, tpr_high - fpr_low


def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided (1 - alpha) lower and upper Clopper-Pearson bounds of a binomial proportion."""
    low = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return low, high


def canary_lstm_weights(
    weights: Mapping[str, np.ndarray],
    *,
    feature: int,
    threshold: float,
    target_label: float,
    unit: int = 0,
    sharpness: float = 50.0,
    output_weight: float = 1e3,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """The issue's crafted LSTM: one unit that fires only above ``threshold`` on ``feature``.

    Every weight is zero except the canary unit's: its input gate opens only when the input
    ``feature`` exceeds ``threshold`` (steepness ``sharpness``), forget and output gates stay
    open and its candidate is 1, so its cell keeps ~1 from the week the target's value appears;
    the risk head reads it with ``output_weight``, signed so the target's loss is huge. Other
    students see logit 0 (loss ln 2).

    Args:
        weights: the model's named weights (shapes and names of ``rnn.*`` and
            ``head.heads.risk.*``, as `shared_models.models.lstm` builds them).
        feature: index of the feature in the recurrent layer's input.
        target_label: the target's at-risk label (the attacker knows the target's record).

    Returns:
        The crafted weights, and the canary's directions for `reply_values`: ``canary-out``
        (the head's weight on the unit) and ``canary-in`` (the input gate's weight on the
        feature).
    """
    w = {k: np.zeros_like(v, dtype=np.float32) for k, v in weights.items()}
    hidden = w["rnn.weight_hh_l0"].shape[1]
    gate_i, gate_f, gate_g, gate_o = (unit + k * hidden for k in range(4))  # torch's order
    w["rnn.weight_ih_l0"][gate_i, feature] = sharpness
    w["rnn.bias_ih_l0"][gate_i] = -sharpness * threshold
    for gate in (gate_f, gate_g, gate_o):
        w["rnn.bias_ih_l0"][gate] = 20.0
    sign = -1.0 if target_label >= 0.5 else 1.0  # a confident wrong answer for the target
    w["head.heads.risk.weight"][0, unit] = sign * output_weight
    out = {"head.heads.risk.weight": np.zeros_like(w["head.heads.risk.weight"])}
    out["head.heads.risk.weight"][0, unit] = 1.0
    gate = {"rnn.weight_ih_l0": np.zeros_like(w["rnn.weight_ih_l0"])}
    gate["rnn.weight_ih_l0"][gate_i, feature] = 1.0
    return w, {"canary-out": out, "canary-in": gate}


def render_channel_attack(result: ChannelAttackResult, top: int = 12) -> str:
    """The attack's table: the most revealing values on the test trials, then the verdict."""
    n_test = result.trials - round(result.trials * FIT_FRACTION)
    pct = round(100 * result.confidence)
    lines = [
        f"channel attack: {result.trials} trials (member / non-member in turn, about "
        f"{n_test} testing the rules fitted on the rest), epsilon {result.epsilon:g}, "
        f"delta {result.delta:g}",
        f"{'value':<44} {'fit adv':>8} {'test adv':>9}  {pct} % bounds (each one-sided)",
    ]
    for f in result.values[:top]:
        lines.append(
            f"{f.value[:44]:<44} {f.fit_advantage:>8.3f} {f.advantage:>9.3f}  "
            f"[{f.low:.3f}, {f.high:.3f}]"
        )
    if len(result.values) > top:
        lines.append(f"... {len(result.values) - top} more values")
    b = result.best
    lines += [
        f"best value (chosen on the fit trials): {b.value}",
        f"  advantage {b.advantage:.3f}, {pct} % lower bound {b.low:.3f} (upper {b.high:.3f})",
        f"  (epsilon {result.epsilon:g}, delta {result.delta:g}) allows at most {result.bound:.3f}",
    ]
    if result.refuted:
        lines.append("  => the reply channel leaks more than the claimed epsilon allows (REFUTED)")
    else:
        lines.append("  => not refuted: the lower bound stays within what the claim allows")
    return "\n".join(lines)
