"""Off-policy evaluation of feed policies from logged slates: IPS and SNIPS with 95% intervals.

The unit is one served slot (a row of the feed log): the logging policy showed `product_id` at that
position with probability `propensity`, its exploit choice there was `greedy_product_id`, and the slot
had `candidates` products to choose from (the greedy one and its alternatives; see serving/explore.py).
The reward is a click on that item carrying the slate's request_id, by the user it was served to.

A target policy needs only those fields to say how likely it was to show the logged item:

    greedy       pi'(a) = [a == greedy]
    epsilon:E    pi'(a) = (1 - E) * [a == greedy] + E / candidates   (E = 0 is greedy)
    logging      pi'(a) = propensity                                 (the on-policy CTR of the logs)

With w = pi'(a) / propensity, IPS = mean(w * r) and SNIPS = sum(w * r) / sum(w) (Swaminathan &
Joachims, 2015: biased by O(1/n), much lower variance when weights are large). Both estimate the CTR
per slot the target would have had on the logged requests, slot by slot, with each slot's candidates
as logged.

Intervals are normal approximations with cluster-robust variances: slots of one user (by default) are
one cluster, because a shopper's clicks on one slate and across slates are not independent; treating
slots as independent would give intervals that are too narrow on real logs. SNIPS's variance is the
delta-method (linearised ratio) one. Rows logged without exploration (one candidate) give every target
the logged item: the estimate there is the greedy CTR whatever the target, which `unexplored` counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

LOGGING_POLICIES = ("greedy", "epsilon", "thompson")  # what the feed can run (serving/explore.py)
TARGET_POLICIES = ("greedy", "epsilon", "logging")  # what can be evaluated from the logged fields
CLUSTERS = ("user", "request", "slot")


@dataclass(frozen=True)
class Policy:
    """A parsed policy spec: "greedy", "epsilon:0.1", "thompson" or "logging"."""

    name: str
    epsilon: float = 0.0  # only for "epsilon"

    @property
    def spec(self) -> str:
        """The canonical spec string (what the feed response and the log carry)."""
        return f"epsilon:{self.epsilon:g}" if self.name == "epsilon" else self.name


def parse_policy(spec: str, allowed: Iterable[str] = LOGGING_POLICIES) -> Policy:
    """Parse a spec ("epsilon:0.1" -> Policy("epsilon", 0.1)) among the `allowed` names; unknown names
    and bad numbers raise ValueError naming the accepted forms."""
    allowed = tuple(allowed)
    forms = ", ".join("epsilon:E (0 <= E <= 1)" if name == "epsilon" else name for name in allowed)
    name, _, value = str(spec).strip().partition(":")
    if name not in allowed:
        raise ValueError(f"unknown policy {spec!r}; use one of: {forms}")
    if name != "epsilon":
        if value:
            raise ValueError(f"policy {name!r} takes no parameter (got {spec!r}); use one of: {forms}")
        return Policy(name)
    try:
        epsilon = float(value)
    except ValueError:
        raise ValueError(
            f"policy {spec!r} needs a number: epsilon:E with 0 <= E <= 1, e.g. epsilon:0.1"
        ) from None
    if not 0.0 <= epsilon <= 1.0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be between 0 and 1, got {spec!r}")
    return Policy("epsilon", epsilon)


def _field(row: Any, name: str) -> Any:
    """Rows are the event store's FeedItem objects or plain mappings (e.g. a simulator's dicts)."""
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def target_probability(policy: Policy, row: Any) -> float:
    """Probability that `policy` shows the logged item in the logged slot (see the module docstring)."""
    if policy.name == "logging":
        return float(_field(row, "propensity"))
    is_greedy = _field(row, "product_id") == _field(row, "greedy_product_id")
    if policy.name == "greedy":
        return float(is_greedy)
    if policy.name == "epsilon":
        return (1.0 - policy.epsilon) * is_greedy + policy.epsilon / int(_field(row, "candidates"))
    raise ValueError(f"{policy.spec!r} cannot be evaluated from the logs; use one of {TARGET_POLICIES}")


def _cluster_sums(values: np.ndarray, keys: list) -> np.ndarray:
    """Sum `values` (n,) within each cluster key; returns (clusters,)."""
    index: dict[Any, int] = {}
    codes = np.fromiter((index.setdefault(key, len(index)) for key in keys), dtype=np.int64, count=len(keys))
    return np.bincount(codes, weights=values, minlength=len(index))


def offpolicy_estimate(
    rows: Iterable[Any], target_policy: str | Policy, cluster: str = "user", z: float = 1.96
) -> dict:
    """IPS and SNIPS estimates of the target's CTR per slot from logged feed rows, with 95% intervals.

    rows: objects or mappings with product_id, greedy_product_id, propensity, candidates, clicked
    (bool/0/1) and the cluster key (user_id or request_id; not needed for cluster="slot").
    target_policy: "greedy", "epsilon:E", "logging" (or a parsed Policy).
    cluster: "user" (default), "request" or "slot": which rows share noise in the variance.

    Returns {"policy", "n", "clusters", "ips", "ips_low", "ips_high", "ips_se", "snips", "snips_low",
    "snips_high", "snips_se", "ess" (effective sample size (sum w)^2 / sum w^2), "mean_weight" (about
    1 when the logged propensities are right), "max_weight", "logged_ctr" (the logs' own CTR),
    "unexplored" (rows with one candidate), "logging_policies" (rows per logged policy)}.
    """
    policy = (
        target_policy if isinstance(target_policy, Policy) else parse_policy(target_policy, TARGET_POLICIES)
    )
    if policy.name not in TARGET_POLICIES:
        raise ValueError(f"{policy.spec!r} cannot be evaluated from the logs; use one of {TARGET_POLICIES}")
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; use one of {CLUSTERS}")
    weights, rewards, keys = [], [], []
    logging_policies: Counter[str] = Counter()
    unexplored = 0
    for position, row in enumerate(rows):
        propensity = float(_field(row, "propensity"))
        if not 0.0 < propensity <= 1.0:
            raise ValueError(
                f"row {position}: propensity must be in (0, 1], got {propensity}; the log is corrupt"
            )
        weights.append(target_probability(policy, row) / propensity)
        rewards.append(float(bool(_field(row, "clicked"))))
        keys.append(
            position if cluster == "slot" else _field(row, "user_id" if cluster == "user" else "request_id")
        )
        unexplored += int(_field(row, "candidates")) == 1
        policy_spec = row.get("policy") if isinstance(row, Mapping) else getattr(row, "policy", None)
        logging_policies[str(policy_spec or "unknown")] += 1
    n = len(weights)
    out: dict[str, Any] = {"policy": policy.spec, "n": n, "clusters": len(set(keys))}
    if n == 0:
        empty = ("ips", "ips_low", "ips_high", "ips_se", "snips", "snips_low", "snips_high", "snips_se")
        return {
            **out,
            **dict.fromkeys(empty),
            **dict.fromkeys(("mean_weight", "max_weight", "logged_ctr")),
            "ess": 0.0,
            "unexplored": 0,
            "logging_policies": {},
        }
    w = np.asarray(weights)  # (n,)
    r = np.asarray(rewards)  # (n,)
    n_clusters = out["clusters"]
    # J / (J - 1): the usual small-sample correction of cluster-robust variances (1 with one cluster).
    correction = n_clusters / (n_clusters - 1) if n_clusters > 1 else 1.0
    ips = float((w * r).mean())
    ips_var = correction * float((_cluster_sums(w * r - ips, keys) ** 2).sum()) / n**2
    total_w = float(w.sum())
    if total_w > 0:
        snips = float((w * r).sum() / total_w)
        snips_var = correction * float((_cluster_sums(w * (r - snips), keys) ** 2).sum()) / total_w**2
    else:  # the target never shows a logged item: SNIPS is undefined
        snips, snips_var = None, None
    ips_se = math.sqrt(ips_var)
    snips_se = math.sqrt(snips_var) if snips_var is not None else None
    return {
        **out,
        "ips": ips,
        "ips_low": ips - z * ips_se,
        "ips_high": ips + z * ips_se,
        "ips_se": ips_se,
        "snips": snips,
        "snips_low": None if snips is None else snips - z * snips_se,
        "snips_high": None if snips is None else snips + z * snips_se,
        "snips_se": snips_se,
        "ess": total_w**2 / float((w * w).sum()) if total_w > 0 else 0.0,
        "mean_weight": float(w.mean()),
        "max_weight": float(w.max()),
        "logged_ctr": float(r.mean()),
        "unexplored": unexplored,
        "logging_policies": dict(sorted(logging_policies.items())),
    }


def format_estimates(estimates: list[dict]) -> str:
    """A plain-text table of offpolicy_estimate results, one row per target policy."""

    def num(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"{'policy':<14} {'IPS [95% CI]':<28} {'SNIPS [95% CI]':<28} {'n':>8} {'ESS':>10}"]
    for e in estimates:
        ips = f"{num(e['ips'])} [{num(e['ips_low'])}, {num(e['ips_high'])}]"
        snips = f"{num(e['snips'])} [{num(e['snips_low'])}, {num(e['snips_high'])}]"
        lines.append(f"{e['policy']:<14} {ips:<28} {snips:<28} {e['n']:>8} {e['ess']:>10.1f}")
    if estimates and estimates[0]["n"]:
        first = estimates[0]
        lines.append(
            f"logged CTR {num(first['logged_ctr'])} over {first['n']} slots, {first['clusters']} clusters; "
            f"logging policies {first['logging_policies']}"
        )
        if first["unexplored"]:
            lines.append(
                f"{first['unexplored']} slots were served without exploration (one candidate): there every "
                "target shows the logged item, so those slots cannot tell targets apart"
            )
    return "\n".join(lines)
