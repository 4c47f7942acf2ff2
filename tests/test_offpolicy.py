"""Off-policy evaluation (training/offpolicy.py) against a synthetic click model whose CTR is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.explore import ExploreSettings, explore_slate, slot_alternatives
from training.offpolicy import (
    Policy,
    format_estimates,
    offpolicy_estimate,
    parse_policy,
    target_probability,
)

USERS, SLOTS, ALTERNATIVES = 40, 4, 3
POSITION_EFFECT = np.array([1.0, 0.8, 0.65, 0.5])  # the click probability falls down the slate


class ClickModel:
    """Fixed users, each with a model slate (greedy) and a pool of alternatives, every (user, product)
    with a known click probability, times a position effect. The true CTR per slot of an epsilon
    policy on this population is a finite sum, so estimates can be checked against the exact value."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.greedy = [[f"g{u}-{i}" for i in range(SLOTS)] for u in range(USERS)]
        self.pool = [[f"p{u}-{j}" for j in range(SLOTS * ALTERNATIVES)] for u in range(USERS)]
        self.click = {}
        for u in range(USERS):
            # The model is mostly right: its picks are clicked more than the alternatives on average.
            self.click.update({pid: rng.uniform(0.15, 0.5) for pid in self.greedy[u]})
            self.click.update({pid: rng.uniform(0.02, 0.35) for pid in self.pool[u]})

    def true_ctr(self, epsilon: float) -> float:
        """Exact CTR per slot of epsilon-greedy over the same per-slot candidates, users uniform."""
        total = 0.0
        for u in range(USERS):
            for i, alternatives in enumerate(slot_alternatives(SLOTS, self.pool[u], ALTERNATIVES)):
                pick = self.greedy[u][i]
                uniform = np.mean([self.click[pid] for pid in (pick, *alternatives)])
                total += POSITION_EFFECT[i] * ((1 - epsilon) * self.click[pick] + epsilon * uniform)
        return total / (USERS * SLOTS)

    def log(self, settings: ExploreSettings, requests: int, seed: int, stats=None) -> list[dict]:
        """Serve `requests` slates to uniformly drawn users with the real slot policy; draw clicks."""
        rng = np.random.default_rng(seed)
        rows = []
        for r in range(requests):
            u = int(rng.integers(USERS))
            for d in explore_slate(self.greedy[u], self.pool[u], settings, rng, stats):
                p_click = POSITION_EFFECT[d.position] * self.click[d.product_id]
                rows.append(
                    {
                        "request_id": f"r{r}",
                        "user_id": f"u{u}",
                        "product_id": d.product_id,
                        "greedy_product_id": d.greedy_product_id,
                        "propensity": d.propensity,
                        "candidates": d.candidates,
                        "policy": settings.policy.spec,
                        "clicked": bool(rng.random() < p_click),
                    }
                )
        return rows


@pytest.fixture(scope="module")
def model() -> ClickModel:
    return ClickModel()


@pytest.fixture(scope="module")
def epsilon_log(model: ClickModel) -> list[dict]:
    # 15,000 slates x 4 slots logged under epsilon 0.3 (about a second).
    return model.log(ExploreSettings(parse_policy("epsilon:0.3"), alternatives=ALTERNATIVES), 15_000, seed=1)


@pytest.mark.parametrize(("target", "epsilon"), [("greedy", 0.0), ("epsilon:0.1", 0.1), ("logging", 0.3)])
def test_ips_and_snips_cover_the_exact_ctr_of_greedy_and_epsilon_targets(
    model: ClickModel, epsilon_log: list[dict], target: str, epsilon: float
) -> None:
    truth = model.true_ctr(epsilon)
    est = offpolicy_estimate(epsilon_log, target)
    assert est["n"] == 60_000 and est["clusters"] == USERS and est["policy"] == target
    for name in ("ips", "snips"):
        assert est[f"{name}_low"] <= truth <= est[f"{name}_high"], (name, truth, est)
        assert abs(est[name] - truth) / truth < 0.03, (name, truth, est[name])
    # Right propensities make the weights average 1 under any target (a check of the logged values).
    assert est["mean_weight"] == pytest.approx(1.0, abs=0.01)
    # Greedy puts weight only on slots that showed the greedy item: (1 - 0.3) + 0.3 / 4 of them.
    if target == "greedy":
        assert est["ess"] == pytest.approx(60_000 * 0.775, rel=0.02)
    if target == "logging":
        assert est["ips"] == pytest.approx(est["logged_ctr"]) and est["ess"] == pytest.approx(60_000)


def test_thompson_logs_with_monte_carlo_propensities_still_give_unbiased_estimates(model: ClickModel) -> None:
    # Evidence for every other product (200 impressions at its true rate): the slots then mix the
    # model's pick and alternatives; 200 Monte Carlo draws per slot keep the test fast.
    stats = {pid: (200, int(200 * p)) for pid, p in list(model.click.items())[::2]}
    settings = ExploreSettings(parse_policy("thompson"), alternatives=ALTERNATIVES, thompson_samples=200)
    rows = model.log(settings, 2_500, seed=2, stats=stats)
    shown_greedy = np.mean([r["product_id"] == r["greedy_product_id"] for r in rows])
    assert 0.3 < shown_greedy < 0.9  # it really explored
    for target, epsilon in (("greedy", 0.0), ("epsilon:0.1", 0.1)):
        est = offpolicy_estimate(rows, target)
        truth = model.true_ctr(epsilon)
        assert est["ips_low"] <= truth <= est["ips_high"], (target, truth, est)
        assert est["snips_low"] <= truth <= est["snips_high"], (target, truth, est)
        # Unbiased weights (see serving/explore.py), but some are large: 10,000 slots leave ~0.05 of noise.
        assert est["mean_weight"] == pytest.approx(1.0, abs=0.15)


def test_estimates_match_the_formulas_on_a_hand_made_log() -> None:
    rows = [
        # greedy shown (p = 0.8), clicked; greedy shown, not clicked; alternative shown (p = 0.1), clicked
        {"product_id": "a", "greedy_product_id": "a", "propensity": 0.8, "candidates": 3, "clicked": True},
        {"product_id": "a", "greedy_product_id": "a", "propensity": 0.8, "candidates": 3, "clicked": False},
        {"product_id": "b", "greedy_product_id": "a", "propensity": 0.1, "candidates": 3, "clicked": 1},
    ]
    greedy = offpolicy_estimate(rows, "greedy", cluster="slot")
    w = np.array([1.25, 1.25, 0.0])
    r = np.array([1.0, 0.0, 1.0])
    assert greedy["ips"] == pytest.approx((w * r).mean()) == pytest.approx(1.25 / 3)
    assert greedy["snips"] == pytest.approx(0.5)
    assert greedy["ess"] == pytest.approx(2.0)
    # One row per cluster: the cluster-robust variance is the textbook s^2 / n.
    assert greedy["ips_se"] == pytest.approx(np.std(w * r, ddof=1) / math.sqrt(3))
    assert greedy["ips_high"] - greedy["ips"] == pytest.approx(1.96 * greedy["ips_se"])
    # epsilon 0.3 over 3 candidates: 0.7 + 0.1 on the greedy item, 0.1 on the alternative.
    eps = offpolicy_estimate(rows, "epsilon:0.3", cluster="slot")
    assert eps["ips"] == pytest.approx((0.8 / 0.8 + 0.1 / 0.1) / 3)
    assert target_probability(Policy("epsilon", 0.3), rows[2]) == pytest.approx(0.1)
    assert "greedy" in format_estimates([greedy, eps])


def test_clusters_widen_the_interval_when_a_users_slots_move_together() -> None:
    # Two users, each always clicking all or nothing: slot-level noise understates the uncertainty.
    rows = [
        {"user_id": u, "request_id": f"{u}{i}", "product_id": "a", "greedy_product_id": "a",
         "propensity": 1.0, "candidates": 1, "clicked": u == "x"}
        for u in ("x", "y", "z", "w") for i in range(25)
    ]  # fmt: skip
    by_slot = offpolicy_estimate(rows, "greedy", cluster="slot")
    by_user = offpolicy_estimate(rows, "greedy", cluster="user")
    assert by_slot["ips"] == by_user["ips"] == 0.25
    assert by_user["ips_se"] > 3 * by_slot["ips_se"]
    assert by_user["unexplored"] == 100  # logged greedy: no slot can tell targets apart


def test_policy_specs_and_bad_logs_are_refused_with_the_fix() -> None:
    assert (
        parse_policy("epsilon:0.1") == Policy("epsilon", 0.1) and Policy("epsilon", 0.1).spec == "epsilon:0.1"
    )
    assert parse_policy("greedy").spec == "greedy" and parse_policy("thompson").spec == "thompson"
    for bad, message in (
        ("epsilon", "needs a number"),
        ("epsilon:x", "needs a number"),
        ("epsilon:1.5", "between 0 and 1"),
        ("softmax", "use one of"),
        ("greedy:1", "takes no parameter"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_policy(bad)
    with pytest.raises(ValueError, match="use one of: greedy, epsilon"):
        offpolicy_estimate([], "thompson")  # needs the candidates and posteriors, not logged
    row = {"product_id": "a", "greedy_product_id": "a", "propensity": 0.0, "candidates": 1, "clicked": 0}
    with pytest.raises(ValueError, match="row 0: propensity"):
        offpolicy_estimate([row], "greedy", cluster="slot")
    empty = offpolicy_estimate([], "greedy")
    assert empty["n"] == 0 and empty["ips"] is None and empty["ess"] == 0.0
