"""`shopguide report`: one self-contained HTML page (tables + matplotlib PNGs) from the result files.

Every input is optional; a missing or unreadable one is named in the report with the command that
produces it, and the report is still written. Sections and the files they read:

- catalog quality: RESULTS/eval.json (`shopguide eval catalog --json`), RESULTS/questions.json
  (`shopguide eval questions --json`)
- sequence accuracy: every RESULTS/*.json written by `shopguide eval sequences --json` (recognised by
  its keys, so results/seq_beauty.json and results/sim_eval.json both count), beside the published rows
- simulator curves: RESULTS/simulate_loop.json, the format below
- serving latency: BENCH_RESULTS/serve.json (and serve-no-ray.json when present) from
  tests/bench/bench_serve.py; rows carry `histogram_ms: {"edges": [...], "counts": [...]}` since the
  report exists, older runs get the table only
- product map: the fused vectors of DATA_DIR/index (alias `products`), PCA to 2-D

Simulator curves (`results/simulate_loop.json`, written by the closed-loop simulator `shopguide simulate
loop`, training/loop.py; `write_simulate_loop` below checks and writes it)::

    {"rows": [{"strategy": "popularity", "day": 0, "ctr": 0.031, "cvr": 0.12, "coverage": 0.05,
               "gini": 0.91}, ...],
     ...}   # any other top-level key (seed, shoppers, days, catalog) is shown as run metadata

One row per (strategy, day); `day` an int >= 0; every metric a number in [0, 1], for that day alone:
ctr = clicks on recommended items / recommended items shown; cvr = purchases of recommended items /
recommended items shown (purchases per impression, as the online-learning issue defines it; the loop
adds purchases_per_click beside it); coverage = distinct products recommended / products in the catalog;
gini = Gini coefficient of how often each catalog product was recommended (0 = evenly, near 1 = a few
products get nearly every slot).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the OO API: no pyplot, no global backend (renders with Agg)

LOOP_METRICS = ("ctr", "cvr", "coverage", "gini")  # simulate_loop.json metrics, in plot order
LOOP_HIGHER_IS_BETTER = {"ctr": True, "cvr": True, "coverage": True, "gini": False}
CATALOG_COLUMNS = ("random", "raw_cnn", "raw_title", "image", "text", "fused")  # eval_catalog.COLUMNS
SEQ_COLUMNS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")
# bench_serve.py output -> the command that writes it; the first one is the one reported missing
SERVE_FILES = {
    "serve.json": "make bench (or: python tests/bench/bench_serve.py --data-dir data/bench)",
    "serve-no-ray.json": "python tests/bench/bench_serve.py --data-dir data/bench --no-ray",
}

COMMANDS = {
    "eval": "shopguide eval catalog --catalog ../shared/datasets/fashion-catalog --json results/eval.json",
    "questions": "shopguide eval questions --catalog ../shared/datasets/fashion-catalog "
    "--json results/questions.json",
    "sequences": "shopguide eval sequences --dataset ../shared/datasets/amazon-sequences/Beauty.txt "
    "--model data/seq/beauty --json results/seq_beauty.json",
    "loop": "shopguide simulate loop --days 7 --shoppers 300 --strategy all --data-dir data/demo "
    "(or make loop; writes results/simulate_loop.json)",
    "ingest": "shopguide ingest --catalog ../shared/datasets/fashion-catalog --data-dir DATA_DIR",
}


@dataclass
class ReportConfig:
    """Where the report reads its inputs and writes its page; defaults match the other commands."""

    out: Path  # folder for index.html and the PNG plots (created if needed)
    results: Path = Path("results")  # `shopguide eval ... --json` files and simulate_loop.json
    bench_results: Path = Path("bench-results")  # tests/bench/*.py output (serve.json)
    data_dir: Path = Path("data")  # the index whose fused vectors are mapped (DATA_DIR/index)
    map_points: int = 5000  # products drawn on the 2-D map at most (a seeded subsample beyond)
    seed: int = 0  # seed of that subsample

    def validate(self) -> None:
        if self.map_points < 2:
            raise ValueError(f"map_points must be at least 2, got {self.map_points}")


@dataclass
class Section:
    """One part of the page: HTML fragments, the files read and what was missing (with its command)."""

    title: str
    anchor: str
    body: list[str] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (what is missing, how to produce it)

    def note_missing(self, what: str, command: str) -> None:
        self.missing.append((what, command))
        self.body.append(
            f'<p class="missing">Missing: {_e(what)}. Produce it with <code>{_e(command)}</code>.</p>'
        )


# ----------------------------------------------------------------------------------------- helpers


def _e(text: object) -> str:
    return html.escape(str(text))


def _num(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return _e(value)


def _best(values: Sequence[float | None], digits: int, higher: bool = True) -> set[int]:
    """Positions holding the best value as shown (rounded; ties all count); None and NaN never do."""
    real = [(i, round(v, digits)) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if len(real) < 2:
        return set()
    target = max(v for _, v in real) if higher else min(v for _, v in real)
    return {i for i, v in real if v == target}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css: Sequence[str] = ()) -> str:
    """An HTML table; cells are HTML already (numbers formatted, best values wrapped in <b>)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    lines = []
    for i, row in enumerate(rows):
        cls = f' class="{css[i]}"' if i < len(css) and css[i] else ""
        lines.append(f"<tr{cls}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _bold_row(values: Sequence[float | None], digits: int, higher: bool = True) -> list[str]:
    best = _best(values, digits, higher)
    return [f"<b>{_num(v, digits)}</b>" if i in best else _num(v, digits) for i, v in enumerate(values)]


def _save(figure: Figure, out: Path, name: str, alt: str) -> str:
    """Write a PNG into the report folder; returns the <img> tag (relative path)."""
    figure.savefig(out / name, dpi=100, bbox_inches="tight")
    return f'<figure><img src="{_e(name)}" alt="{_e(alt)}"><figcaption>{_e(alt)}</figcaption></figure>'


def _read_json(section: Section, path: Path, what: str, command: str) -> dict | None:
    """The JSON object at path, or None with the reason stated in the section (missing or unreadable)."""
    if not path.is_file():
        section.note_missing(f"{what} ({path})", command)
        return None
    section.inputs.append(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        section.note_missing(f"{what}: {path} is unreadable ({exc})", command)
        return None
    if not isinstance(data, dict):
        section.note_missing(f"{what}: {path} holds a {type(data).__name__}, not a JSON object", command)
        return None
    return data


# ----------------------------------------------------------------------------------------- catalog


def catalog_section(config: ReportConfig, section: Section) -> None:
    """Catalog quality per vector mode vs the baselines, and shopper questions raw vs parsed."""
    result = _read_json(section, config.results / "eval.json", "catalog evaluation", COMMANDS["eval"])
    if result is not None:
        rows = [
            ("similar P@10, same articleType", result["similar_p10_articleType"]),
            ("similar P@10, same subCategory", result["similar_p10_subCategory"]),
            ("title → image R@10, held-out", result.get("title_to_image_r10_by_mode", {})),
            ("attribute query P@10", result.get("attribute_query_p10_by_mode", {})),
        ]
        section.body.append(
            f"<p>{_e(result.get('catalog', '?'))}: {_num(result.get('products'), 0)} products, "
            f"{_num(result.get('heldout_products'), 0)} held out, "
            f"{_num(result.get('attribute_queries'), 0)} attribute queries; encoders "
            f"{_e(json.dumps(result.get('encoders', {})))}. Best per row in bold.</p>"
        )
        table = [
            [_e(label), *_bold_row([values.get(c) for c in CATALOG_COLUMNS], 3)] for label, values in rows
        ]
        section.body.append(_table(["metric", *CATALOG_COLUMNS], table))
        section.body.append(
            "<p>raw_cnn / raw_title: frozen features before alignment (title only); image / text / fused: "
            "the aligned vectors the index serves.</p>"
        )
        section.body.append(_catalog_plot(rows, config.out))
    questions = _read_json(
        section, config.results / "questions.json", "shopper-question evaluation", COMMANDS["questions"]
    )
    if questions is not None:
        section.body.append(_questions_table(questions["question_p10"]))


def _catalog_plot(rows: list[tuple[str, dict]], out: Path) -> str:
    figure = Figure(figsize=(10, 4))
    ax = figure.subplots()
    width = 0.8 / len(CATALOG_COLUMNS)
    for j, column in enumerate(CATALOG_COLUMNS):
        heights = [values.get(column, np.nan) for _, values in rows]
        ax.bar(np.arange(len(rows)) + (j - 2.5) * width, heights, width, label=column)
    ax.set_xticks(np.arange(len(rows)), [label.replace(", ", ",\n") for label, _ in rows], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend(ncols=len(CATALOG_COLUMNS), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax.grid(axis="y", alpha=0.3)
    return _save(
        figure, out, "catalog_quality.png", "Catalog quality per vector mode (missing bars: not measured)"
    )


def _questions_table(q: dict) -> str:
    columns = ("raw", "rewritten", "parsed")
    rows = [[_e("template baseline: {colour} {gender} {articleType}"), _num(q.get("template")), "", "", ""]]
    for template, row in q.get("by_template", {}).items():
        rows.append([_e(template), "", *_bold_row([row.get(c) for c in columns], 3)])
    rows.append(["<b>all questions</b>", "", *_bold_row([q.get(c) for c in columns], 3)])
    share = q.get("parsed_exact_filters")
    parsed_note = f" {share:.1%} parse to exactly the right colour, gender and article type." if share else ""
    return (
        f"<h3>Shopper questions (P@10, fused vectors)</h3><p>{_num(q.get('questions'), 0)} questions over "
        f"{_num(q.get('combos'), 0)} attribute combinations; raw: the question embedded as it is; rewritten: "
        f"the parsed query without its filters; parsed: filters + the rest as the query (what /search "
        f"does).{parsed_note} Best per row in bold.</p>" + _table(["question", "template", *columns], rows)
    )


# --------------------------------------------------------------------------------------- sequences


def _is_sequence_eval(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("rows"), dict) and "published" in data


def sequences_section(config: ReportConfig, section: Section) -> None:
    """HR/NDCG@5/10/20 of every `eval sequences` result beside the published rows for its dataset."""
    found = 0
    for path in sorted(config.results.glob("*.json")) if config.results.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours to judge: other sections name their own unreadable files
        if not _is_sequence_eval(data):
            continue
        found += 1
        section.inputs.append(path)
        section.body.append(_sequence_block(data, path, config.out))
    if not found:
        section.note_missing(
            f"no `shopguide eval sequences` result in {config.results}/ (seq_<name>.json)",
            COMMANDS["sequences"],
        )


def _sequence_block(data: dict, path: Path, out: Path) -> str:
    ours = dict(data["rows"])
    published = {f"{name} (S3-Rec paper)": m for name, m in data.get("published", {}).items()}
    models = {**ours, **published}
    columns = [[models[m].get(c) for m in models] for c in SEQ_COLUMNS]  # per metric, over models
    best = [_best(values, 4) for values in columns]
    rows = []
    for i, model in enumerate(models):
        cells = [columns[j][i] for j in range(len(SEQ_COLUMNS))]
        rows.append(
            [_e(model)]
            + [f"<b>{_num(v, 4)}</b>" if i in best[j] else _num(v, 4) for j, v in enumerate(cells)]
        )
    css = ["" for _ in ours] + ["published" for _ in published]
    name = data.get("dataset_name", path.stem)
    notes = [
        f"{_num(data.get('users'), 0)} test users, {_num(data.get('items'), 0)} items; "
        f"{data.get('protocol', '')}."
    ]
    if not published:
        notes.append(
            f"No published baselines for dataset {name!r} (the S3-Rec paper covers Beauty and Sports)."
        )
    if "index_recall_at_10" in data:
        notes.append(
            f"Serving path: index (HNSW) top-10 vs the model's exact top-10, recall "
            f"{data['index_recall_at_10']:.4f} over {data.get('index_recall_users', '?')} users."
        )
    plot = _sequence_plot(
        ours, published, out, f"sequences_{path.stem}.png", f"{name}: HR@k and NDCG@k ({path.name})"
    )
    return (
        f"<h3>{_e(name)} <small>({_e(path)}, model {_e(data.get('model', '?'))})</small></h3>"
        f"<p>{_e(' '.join(notes))} Best per column in bold"
        + ("; grey rows are published numbers.</p>" if published else ".</p>")
        + _table(["model", *SEQ_COLUMNS], rows, css)
        + plot
    )


def _sequence_plot(ours: dict, published: dict, out: Path, name: str, alt: str) -> str:
    figure = Figure(figsize=(10, 3.6))
    axes = figure.subplots(1, 2)
    ks = [5, 10, 20]
    for ax, metric in zip(axes, ("HR", "NDCG"), strict=True):
        for style, rows in (("-", ours), ("--", published)):
            for model, metrics in rows.items():
                values = [metrics.get(f"{metric}@{k}") for k in ks]
                ax.plot(ks, [np.nan if v is None else v for v in values], style, marker="o", label=model)
        ax.set_xticks(ks)
        ax.set_xlabel("k")
        ax.set_title(f"{metric}@k")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(figure, out, name, alt + ("; solid: measured here, dashed: published" if published else ""))


# -------------------------------------------------------------------------------------- simulator


def check_loop_rows(rows: object) -> list[dict]:
    """The rows of simulate_loop.json, checked: raises ValueError naming the first bad row and field."""
    if not isinstance(rows, list) or not rows:
        raise ValueError('"rows" must be a non-empty list of {strategy, day, ctr, cvr, coverage, gini}')
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i} is not an object: {row!r}")
        absent = [key for key in ("strategy", "day", *LOOP_METRICS) if key not in row]
        if absent:
            raise ValueError(f"row {i} lacks {absent}: {row}")
        if not isinstance(row["strategy"], str) or not row["strategy"]:
            raise ValueError(f"row {i}: strategy must be a non-empty string, got {row['strategy']!r}")
        if not isinstance(row["day"], int) or isinstance(row["day"], bool) or row["day"] < 0:
            raise ValueError(f"row {i}: day must be an int >= 0, got {row['day']!r}")
        for metric in LOOP_METRICS:
            value = row[metric]
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ValueError(f"row {i}: {metric} must be a number in [0, 1], got {value!r}")
        key = (row["strategy"], row["day"])
        if key in seen:
            raise ValueError(f"row {i}: a second row for strategy {key[0]!r} day {key[1]}")
        seen.add(key)
    return rows


def write_simulate_loop(path: Path, rows: list[dict], **metadata: object) -> Path:
    """Check and write simulate_loop.json (the closed-loop simulator's output; format in the docstring)."""
    check_loop_rows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**metadata, "rows": rows}, indent=1))
    return path


def simulator_section(config: ReportConfig, section: Section) -> None:
    """CTR, CVR, coverage and Gini per day, one line per recommendation strategy."""
    path = config.results / "simulate_loop.json"
    data = _read_json(section, path, "closed-loop simulator curves", COMMANDS["loop"])
    if data is None:
        section.body.append(
            "<p>Expected format (documented in <code>training/report.py</code>): "
            '<code>{"rows": [{"strategy", "day", "ctr", "cvr", "coverage", "gini"}, ...]}</code>, '
            "one row per strategy and day.</p>"
        )
        return
    try:
        rows = check_loop_rows(data.get("rows"))
    except ValueError as exc:
        section.note_missing(f"usable simulator curves: {path}: {exc}", COMMANDS["loop"])
        return
    meta = {k: v for k, v in data.items() if k != "rows" and not isinstance(v, dict | list)}
    if meta:
        section.body.append("<p>Run: " + _e(", ".join(f"{k} {v}" for k, v in meta.items())) + "</p>")
    strategies = list(dict.fromkeys(row["strategy"] for row in rows))
    means = {
        s: [float(np.mean([r[m] for r in rows if r["strategy"] == s])) for m in LOOP_METRICS]
        for s in strategies
    }
    days = {s: len([r for r in rows if r["strategy"] == s]) for s in strategies}
    per_metric = [
        _best([means[s][j] for s in strategies], 3, LOOP_HIGHER_IS_BETTER[m])
        for j, m in enumerate(LOOP_METRICS)
    ]
    table = [
        [_e(s), str(days[s])]
        + [f"<b>{_num(v)}</b>" if i in per_metric[j] else _num(v) for j, v in enumerate(means[s])]
        for i, s in enumerate(strategies)
    ]
    section.body.append("<p>Mean over days; best per column in bold (lowest Gini is best).</p>")
    section.body.append(_table(["strategy", "days", *(f"mean {m}" for m in LOOP_METRICS)], table))
    section.body.append(_loop_plot(rows, strategies, config.out))


def _loop_plot(rows: list[dict], strategies: list[str], out: Path) -> str:
    figure = Figure(figsize=(11, 6.5))
    axes = figure.subplots(2, 2).ravel()
    for ax, metric in zip(axes, LOOP_METRICS, strict=True):
        for strategy in strategies:
            mine = sorted((r["day"], r[metric]) for r in rows if r["strategy"] == strategy)
            ax.plot([d for d, _ in mine], [v for _, v in mine], marker=".", label=strategy)
        ax.set_title(metric.upper() if metric in ("ctr", "cvr") else metric)
        ax.set_xlabel("day")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, out, "simulator_curves.png", "Closed-loop simulator: metrics per day and strategy")


# ----------------------------------------------------------------------------------------- latency


def latency_section(config: ReportConfig, section: Section) -> None:
    """p50/p99/throughput per endpoint from the serving benchmark, and latency histograms."""
    for i, (file_name, command) in enumerate(SERVE_FILES.items()):
        path = config.bench_results / file_name
        if i > 0 and not path.is_file():
            continue  # the no-Ray comparison run is optional
        data = _read_json(section, path, "serving benchmark", command)
        if data is not None:
            _latency_block(section, data, path, config.out, command)


def _latency_block(section: Section, data: dict, path: Path, out: Path, command: str) -> None:
    rows = data["rows"]
    index = data.get("index", {})
    header = (
        f"<h3>{_e(data.get('server', path.stem))} <small>({_e(path)}, run {_e(data.get('when', '?'))}, "
        f"{_e(data.get('machine', {}).get('cpus', '?'))} CPUs, "
        f"{_num(index.get('products'), 0)} products)</small></h3>"
    )
    table = [
        [
            _e(r["endpoint"]),
            str(r["concurrency"]),
            _num(r.get("requests"), 0),
            _num(r.get("errors"), 0),
            _num(r.get("p50_ms"), 1),
            _num(r.get("p99_ms"), 1),
            _num(r.get("throughput_rps"), 1),
            _num(r.get("throughput_vs_healthz"), 2),
        ]
        for r in rows
    ]
    parts = [
        header,
        _table(["endpoint", "c", "requests", "errors", "p50 ms", "p99 ms", "req/s", "÷ healthz"], table),
    ]
    targets = data.get("targets")
    if targets:
        parts.append("<p>Targets: " + _e(", ".join(f"{k} {v}" for k, v in targets.items())) + "</p>")
    has_histograms = all("histogram_ms" in r for r in rows)
    if has_histograms:
        parts.append(
            _latency_plot(rows, out, f"latency_{path.stem}.png", f"Latency histograms ({path.name})")
        )
    section.body.append("".join(parts))
    if not has_histograms:
        section.note_missing(
            f'latency histograms: {path} predates them (rows without "histogram_ms"), so the table only',
            command,
        )


def _latency_plot(rows: list[dict], out: Path, name: str, alt: str) -> str:
    endpoints = list(dict.fromkeys(r["endpoint"] for r in rows))
    n_cols = min(2, len(endpoints))
    n_rows = math.ceil(len(endpoints) / n_cols)
    figure = Figure(figsize=(5.5 * n_cols, 3.2 * n_rows))
    axes = np.atleast_1d(figure.subplots(n_rows, n_cols)).ravel()
    for ax, endpoint in zip(axes, endpoints, strict=False):
        spans = []  # (lowest, highest) latency edge holding samples, per concurrency
        for r in (r for r in rows if r["endpoint"] == endpoint):
            edges = np.asarray(r["histogram_ms"]["edges"], dtype=float)  # (bins + 1,)
            counts = np.asarray(r["histogram_ms"]["counts"], dtype=float)  # (bins,)
            if counts.any():
                used = np.flatnonzero(counts)
                spans.append((edges[used[0]], edges[used[-1] + 1]))
            p99 = r.get("p99_ms")
            label = f"c={r['concurrency']}" + (f" (p99 {p99:.0f} ms)" if p99 is not None else "")
            drawn = ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, alpha=0.45, label=label)
            if p99 is not None:
                ax.axvline(p99, color=drawn.get_facecolor(), alpha=1, linestyle="--", linewidth=1)
        ax.set_xscale("log")
        if spans:
            ax.set_xlim(min(low for low, _ in spans) / 1.5, max(high for _, high in spans) * 1.5)
        ax.set_title(endpoint)
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("share of requests")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(endpoints) :]:
        ax.set_visible(False)
    figure.tight_layout()
    return _save(figure, out, name, alt + "; dashed: p99")


# --------------------------------------------------------------------------------------------- map


def map_section(config: ReportConfig, section: Section) -> None:
    """The fused product vectors projected to 2-D (PCA), coloured by category."""
    from index import IndexError_, IndexInUseError, open_store

    index_dir = config.data_dir / "index"
    command = COMMANDS["ingest"].replace("DATA_DIR", str(config.data_dir))
    # Checked before open_store, which would create an empty index folder.
    if not (index_dir / "aliases" / "products").is_file():
        section.note_missing(f"product index ({index_dir}, alias `products`)", command)
        return
    section.inputs.append(index_dir)
    store = open_store(index_dir)
    try:
        index = store.open("products")
        product_ids = sorted(index.product_ids())
        total = len(product_ids)
        if total > config.map_points:
            rng = np.random.default_rng(config.seed)
            product_ids = sorted(rng.choice(product_ids, config.map_points, replace=False).tolist())
        records = []
        for start in range(0, len(product_ids), 1000):
            records += index.get(product_ids[start : start + 1000], with_vectors=True)
        collection = index.name
    except IndexInUseError as exc:
        section.note_missing(
            f"product map: {exc}",
            "stop the process that holds the index (e.g. `shopguide serve`) and run the report again",
        )
        return
    except IndexError_ as exc:
        section.note_missing(f"readable product index: {exc}", command)
        return
    finally:
        store.close()
    records = [r for r in records if "fused" in r.vectors]
    if len(records) < 2:
        section.note_missing(f"fused vectors in {index_dir} (found {len(records)})", command)
        return
    vectors = np.stack([r.vectors["fused"] for r in records])  # (n, dim)
    points, explained = pca_2d(vectors)  # (n, 2), (2,)
    section.body.append(
        f"<p>Collection {_e(collection)}: {len(records):,} of {total:,} products "
        f"({'all' if len(records) == total else f'a seeded sample, seed {config.seed}'}), fused vectors "
        f"projected on their first two principal components ({explained[0]:.1%} + {explained[1]:.1%} of the "
        "variance). PCA keeps global structure but overlaps clusters that t-SNE or UMAP would pull apart "
        "(neither is installed here).</p>"
    )
    master = [r.payload.get("masterCategory") or "unknown" for r in records]
    article = [r.payload.get("articleType") or "unknown" for r in records]
    section.body.append(_map_plot(points, master, article, config.out))


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows on their first two principal components: (n, 2) points, (2,) explained variance share."""
    centered = vectors - vectors.mean(axis=0)  # (n, dim)
    _, singular, components = np.linalg.svd(centered, full_matrices=False)  # components: (min(n, dim), dim)
    points = centered @ components[:2].T  # (n, 2)
    variance = singular**2
    return points, variance[:2] / max(variance.sum(), 1e-12)


def _top_labels(labels: list[str], keep: int) -> list[str]:
    """Labels outside the `keep` most common become "other"."""
    top = {label for label, _ in Counter(labels).most_common(keep)}
    return [label if label in top else "other" for label in labels]


def _map_plot(points: np.ndarray, master: list[str], article: list[str], out: Path) -> str:
    figure = Figure(figsize=(13, 5.5))
    axes = figure.subplots(1, 2)
    panels = (("masterCategory", _top_labels(master, 9)), ("articleType (top 10)", _top_labels(article, 10)))
    for ax, (title, labels) in zip(axes, panels, strict=True):
        counts = Counter(labels)
        order = sorted(counts, key=lambda label: (label == "other", -counts[label]))
        for i, label in enumerate(order):
            mask = np.array([lab == label for lab in labels])
            colour = "lightgrey" if label == "other" else f"C{i % 10}"
            ax.scatter(
                points[mask, 0],
                points[mask, 1],
                s=4,
                alpha=0.6,
                color=colour,
                label=f"{label} ({counts[label]})",
            )
        ax.set_title(f"coloured by {title}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7, markerscale=3, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return _save(figure, out, "product_map.png", "Fused product vectors, PCA to 2-D")


# -------------------------------------------------------------------------------------------- page

# anchor -> (title, builder, the command that rewrites its input when the input is unusable)
SECTIONS: dict[str, tuple[str, Callable[[ReportConfig, Section], None], str]] = {
    "catalog": ("Catalog quality", catalog_section, COMMANDS["eval"]),
    "sequences": ("Sequence accuracy", sequences_section, COMMANDS["sequences"]),
    "simulator": ("Simulator curves", simulator_section, COMMANDS["loop"]),
    "latency": ("Serving latency", latency_section, SERVE_FILES["serve.json"]),
    "map": ("Product map", map_section, COMMANDS["ingest"]),
}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}tr.published td{color:#777;font-style:italic}
.missing{background:#fff4e0;border-left:4px solid #e8a33d;padding:.4em .8em}
figure{margin:1em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}
code{background:#f3f3f3;padding:0 .2em}small{color:#666;font-weight:normal}
"""


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write the report to {out}: {exc}; choose another --out folder") from exc


def build_report(config: ReportConfig, progress: bool = True) -> Path:
    """Write OUT/index.html and its PNGs; returns the page's path. Missing inputs are stated, not raised."""
    config.validate()
    _check_writable(config.out)
    say = print if progress else (lambda *_a, **_k: None)
    sections = []
    for anchor, (title, build, command) in SECTIONS.items():
        say(f"report: {title.lower()} ...", flush=True)
        section = Section(title, anchor)
        try:
            build(config, section)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # An input of the wrong shape (an older or hand-edited file) costs its section, not the report.
            source = section.inputs[-1] if section.inputs else "its input"
            section.note_missing(f"a usable {source} ({type(exc).__name__}: {exc})", command)
        for what, _ in section.missing:
            say(f"  missing: {what}", flush=True)
        sections.append(section)
    page = render_page(sections, config)
    path = config.out / "index.html"
    path.write_text(page, encoding="utf-8")
    missing = sum(len(s.missing) for s in sections)
    say(f"wrote {path} ({len(sections)} sections, {missing} missing input(s))", flush=True)
    return path


def render_page(sections: list[Section], config: ReportConfig) -> str:
    """The whole page: header, missing-inputs list, sections, input files."""
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    toc = " · ".join(f'<a href="#{s.anchor}">{_e(s.title)}</a>' for s in sections)
    missing = [(s, what, command) for s in sections for what, command in s.missing]
    if missing:
        items = "".join(
            f'<li><a href="#{s.anchor}">{_e(s.title)}</a>: {_e(what)}: <code>{_e(command)}</code></li>'
            for s, what, command in missing
        )
        missing_html = f'<h2 id="missing">Missing inputs</h2><ul class="missing">{items}</ul>'
    else:
        missing_html = '<h2 id="missing">Missing inputs</h2><p>None: every section had its input.</p>'
    body = "".join(
        f'<h2 id="{s.anchor}">{_e(s.title)}</h2>' + "".join(s.body or ["<p>Nothing to show.</p>"])
        for s in sections
    )
    inputs = [p for s in sections for p in s.inputs]
    input_rows = [
        [_e(p), time.strftime("%Y-%m-%d %H:%M", time.localtime(p.stat().st_mtime)) if p.exists() else "-"]
        for p in dict.fromkeys(inputs)
    ]
    inputs_html = (
        _table(["input", "modified"], input_rows) if input_rows else "<p>No input files were found.</p>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>shopguide report</title><style>{STYLE}</style></head><body>"
        f"<h1>shopguide report</h1><p>Generated {_e(generated)} from results {_e(config.results)}, "
        f"bench results {_e(config.bench_results)}, data dir {_e(config.data_dir)}.</p><p>{toc}</p>"
        f'{missing_html}{body}<h2 id="inputs">Input files</h2>{inputs_html}</body></html>\n'
    )
