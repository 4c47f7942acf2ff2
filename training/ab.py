"""A/B report from the feed log: per-arm CTR / CVR with 95% intervals, their differences, bias guardrails.

The unit is one served feed slot (an impression). A slot is clicked (purchased) when an event of that
type carries the slate's request_id and the slot's product and comes from the user the slate was
served to (the event store marks it; a click on another product or by another user is not credited).
So CTR = clicked impressions / impressions and CVR = purchased impressions / impressions, both
binomial, with Wilson 95% intervals (training.online_metrics.rate_interval). The difference of an arm
from the control arm has Newcombe's hybrid score interval (Newcombe, 1998, method 10), built from the
two Wilson intervals. Both treat impressions as independent; a shopper's impressions are correlated,
so with few shoppers per arm read the intervals as optimistic (training/offpolicy.py clusters by user).

Guardrails per arm and overall, over the served slots: exposure Gini over the whole catalog (never-shown
products count as 0), catalog coverage, popular-item share (impressions on the top 1% of products by
the event store's all-time popularity score), and category coverage (share of the catalog's articleTypes
served at least once). Rows without an arm (no A/B test ran) form one arm, "all".
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.online_metrics import category_coverage, coverage, exposure_gini, popular_share, rate_interval

if TYPE_CHECKING:
    from index import IndexStore

NO_ARM = "all"  # the arm name of rows logged without an A/B test
POPULAR_FRACTION = 0.01  # "popular" = the top 1% of the catalog by all-time popularity


def _field(row: Any, name: str) -> Any:
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def popular_count(catalog_size: int) -> int:
    """How many products make the popular set of a catalog this size (at least 1)."""
    return max(1, math.ceil(POPULAR_FRACTION * catalog_size))


def rate_difference(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int
) -> tuple[float, float, float]:
    """rate_b - rate_a with Newcombe's hybrid score 95% interval (difference, low, high)."""
    p_a, low_a, high_a = rate_interval(successes_a, trials_a)
    p_b, low_b, high_b = rate_interval(successes_b, trials_b)
    diff = p_b - p_a
    return (
        diff,
        diff - math.sqrt((p_b - low_b) ** 2 + (high_a - p_a) ** 2),
        diff + math.sqrt((high_b - p_b) ** 2 + (p_a - low_a) ** 2),
    )


def _rate(successes: int, trials: int) -> dict:
    rate, low, high = rate_interval(successes, trials)
    return {"rate": rate, "low": low, "high": high}


def arm_summary(rows: list[Any], categories: Mapping[str, str], popular: set[str]) -> dict:
    """Impressions, clicks, purchases, CTR / CVR with intervals and the guardrails of one set of rows.

    categories: product_id -> articleType for the whole catalog ("" when unknown); popular: the
    popular product ids."""
    shown = [str(_field(r, "product_id")) for r in rows]
    exposures = Counter(shown)
    impressions = len(rows)
    clicks = sum(bool(_field(r, "clicked")) for r in rows)
    purchases = sum(bool(_field(r, "purchased")) for r in rows)
    # A product served but since removed from the catalog still took exposure: count it in the catalog.
    catalog_size = len(set(categories) | set(exposures))
    all_categories = {c for c in categories.values() if c}
    return {
        "requests": len({_field(r, "request_id") for r in rows}),
        "users": len({_field(r, "user_id") for r in rows}),
        "impressions": impressions,
        "clicks": clicks,
        "purchases": purchases,
        "ctr": _rate(clicks, impressions),
        "cvr": _rate(purchases, impressions),
        "guardrails": {
            "exposure_gini": exposure_gini(exposures, catalog_size) if catalog_size else 0.0,
            "catalog_coverage": coverage(exposures, catalog_size) if catalog_size else 0.0,
            "popular_share": popular_share(shown, popular),
            "category_coverage": category_coverage(
                (categories.get(pid, "") for pid in exposures), all_categories
            ),
        },
    }


def ab_report(
    rows: Iterable[Any],
    categories: Mapping[str, str],
    popular: Iterable[str],
    control: str | None = None,
) -> dict:
    """The A/B report of logged feed rows (the event store's FeedItem objects or mappings with
    request_id, user_id, product_id, arm, clicked, purchased).

    Returns {"arms": {arm: arm_summary}, "overall": arm_summary, "control": arm, "differences":
    {arm: {"ctr": {"diff", "low", "high"}, "cvr": {...}}} (each arm minus the control), "catalog_size",
    "popular_products"}. control: the arm the others are compared with (default: the first by name)."""
    popular = set(popular)
    by_arm: dict[str, list[Any]] = defaultdict(list)
    everything: list[Any] = []
    for row in rows:
        arm = _field(row, "arm")
        by_arm[NO_ARM if arm is None else str(arm)].append(row)
        everything.append(row)
    arms = {arm: arm_summary(by_arm[arm], categories, popular) for arm in sorted(by_arm)}
    if control is not None and arms and control not in arms:
        raise ValueError(f"no rows for control arm {control!r}; arms in the log: {sorted(arms)}")
    control = control if control is not None else (min(arms) if arms else None)
    differences = {}
    for arm, summary in arms.items():
        if arm == control:
            continue
        base = arms[control]
        differences[arm] = {
            metric: dict(
                zip(
                    ("diff", "low", "high"),
                    rate_difference(base[count], base["impressions"], summary[count], summary["impressions"]),
                    strict=True,
                )
            )
            for metric, count in (("ctr", "clicks"), ("cvr", "purchases"))
        }
    return {
        "arms": arms,
        "overall": arm_summary(everything, categories, popular),
        "control": control,
        "differences": differences,
        "catalog_size": len(categories),
        "popular_products": len(popular),
    }


def format_ab_report(report: dict) -> str:
    """The report as a plain-text table (what `shopguide ab report` prints)."""

    def rate(r: dict) -> str:
        return f"{r['rate']:.4f} [{r['low']:.4f}, {r['high']:.4f}]"

    header = (
        f"{'arm':<10} {'users':>6} {'impr':>8} {'clicks':>7} {'buys':>6} {'CTR [95% CI]':<26} "
        f"{'CVR [95% CI]':<26} {'gini':>6} {'pop%':>6} {'cat cov':>7}"
    )
    lines = [header]
    for name, s in [*report["arms"].items(), ("overall", report["overall"])]:
        g = s["guardrails"]
        lines.append(
            f"{name:<10} {s['users']:>6} {s['impressions']:>8} {s['clicks']:>7} {s['purchases']:>6} "
            f"{rate(s['ctr']):<26} {rate(s['cvr']):<26} {g['exposure_gini']:>6.3f} "
            f"{100 * g['popular_share']:>5.1f}% {g['category_coverage']:>7.3f}"
        )
    for arm, diff in report["differences"].items():
        parts = [
            f"{metric.upper()} {d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
            for metric, d in diff.items()
        ]
        lines.append(f"{arm} - {report['control']}: " + ", ".join(parts))
    lines.append(
        f"guardrails over {report['catalog_size']} catalog products; popular = the top "
        f"{report['popular_products']} by all-time popularity; cat cov = share of articleTypes served"
    )
    if not report["overall"]["impressions"]:
        lines.append("no feed impressions logged yet: serve feeds (GET /users/{id}/feed) first")
    return "\n".join(lines)


def catalog_categories(
    data_dir: Path, catalog: Path | None = None, store: IndexStore | None = None
) -> tuple[dict[str, str], str]:
    """product_id -> articleType of the catalog the guardrails are measured over, and where it came from.

    From the index in data_dir when it can be opened (exactly the served products); when a running
    server holds the embedded index, from the catalog folder its ingest recorded (or `catalog`)."""
    from index import IndexInUseError
    from training.catalog import load_catalog

    if catalog is None and store is not None:
        from training.ingest import ALIAS  # imports torch (seconds): only when the index is read

        try:
            index = store.open(ALIAS)
            try:
                ids = list(index.product_ids())
                categories = {}
                for start in range(0, len(ids), 2048):
                    for record in index.get(ids[start : start + 2048]):
                        categories[record.product_id] = record.payload.get("articleType") or ""
            finally:
                index.close()
            return categories, f"the index in {data_dir}"
        except IndexInUseError:
            pass  # a running server owns it: read the catalog folder instead
    source = "given"
    if catalog is None:
        from training.ingest import MANIFEST

        manifest = data_dir / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"no index in {data_dir} ({manifest} is missing): pass --catalog FOLDER for the guardrails"
            )
        recorded = json.loads(manifest.read_text()).get("catalog")
        if not recorded:
            raise FileNotFoundError(f"{manifest} records no catalog folder: pass --catalog FOLDER")
        catalog, source = Path(recorded), "recorded by ingest (the index is in use by a running server)"
    products = load_catalog(catalog).products
    return {p.id: p.articleType or "" for p in products}, f"the catalog folder {catalog}, {source}"
