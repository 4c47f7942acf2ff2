"""The `shopguide` command line: ingest, reembed, similar, search, train, eval, bench, report, encoders."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import yaml

from training.catalog import DEFAULT_CATALOG

DEFAULT_DATA_DIR = Path(os.environ.get("SHOPGUIDE_DATA_DIR", "data"))
DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parent.parent / "infra" / "serve" / "shopguide.yaml"


def _add_filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters (repeat a keyword filter to accept any of several values)")
    for name in ("gender", "masterCategory", "subCategory", "articleType", "baseColour"):
        group.add_argument(f"--{name}", action="append", default=[], metavar="VALUE")
    group.add_argument("--min-price", type=float)
    group.add_argument("--max-price", type=float)
    stock = group.add_mutually_exclusive_group()
    stock.add_argument("--in-stock", dest="in_stock", action="store_const", const=True)
    stock.add_argument("--out-of-stock", dest="in_stock", action="store_const", const=False)


def _filters(args: argparse.Namespace):
    from index import Filters

    if args.min_price is not None and args.max_price is not None and args.min_price > args.max_price:
        raise ValueError(f"--min-price {args.min_price} is above --max-price {args.max_price}")
    return Filters(
        gender=tuple(args.gender),
        masterCategory=tuple(args.masterCategory),
        subCategory=tuple(args.subCategory),
        articleType=tuple(args.articleType),
        baseColour=tuple(args.baseColour),
        min_price=args.min_price,
        max_price=args.max_price,
        in_stock=args.in_stock,
    )


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="where the index, models and caches live (default: %(default)s)",
    )
    parser.add_argument("--qdrant-url", help="use a Qdrant server instead of the embedded index")
    parser.add_argument(
        "--qdrant-api-key-env",
        default="QDRANT_API_KEY",
        help="environment variable holding the Qdrant API key (default: %(default)s)",
    )


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overrides-db",
        type=Path,
        help="live price/stock updates, kept across rebuilds (default: DATA_DIR/product_overrides.db; "
        "where the server's `overrides_db` is)",
    )


def _overrides(args: argparse.Namespace):
    from training.overrides import OverrideStore

    return OverrideStore.at(args.data_dir, args.overrides_db)


def _write_json(path: Path, data: dict) -> None:
    """Write a command's result as JSON (parent folders created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    print(f"wrote {path}")


def _check_out_file(path: Path, example: str) -> None:
    """Fail before a long run, not after it, when its output file cannot be written."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file path, e.g. {path / example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write --out {path}: {exc}") from None


def _add_gate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="allowed relative NDCG@10 drop vs live (default: %(default)s)",
    )
    parser.add_argument("--holdout-days", type=float, default=1.0, help="shoppers active in the last N days")
    parser.add_argument("--force", action="store_true", help="promote even if the gate refuses")


def _store(args: argparse.Namespace):
    from index import open_store

    return open_store(
        data_dir=args.data_dir / "index",
        qdrant_url=args.qdrant_url,
        api_key=os.environ.get(args.qdrant_api_key_env) if args.qdrant_url else None,
    )


def _encoder_config(path: Path | None):
    """Defaults < YAML file; unknown keys are errors."""
    from training.vectors import EncoderConfig

    if path is None:
        return EncoderConfig()
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(EncoderConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown encoder config key(s) {unknown}; known: {sorted(known)}")
    return EncoderConfig(**data)


def _print_hits(hits, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                [{"product_id": h.product_id, "score": round(h.score, 5), **h.payload} for h in hits],
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    for rank, hit in enumerate(hits, 1):
        p = hit.payload
        print(
            f"{rank:>3}  {hit.product_id:>8}  {hit.score:6.3f}  {p.get('title', '')}  "
            f"[{p.get('articleType', '?')}, {p.get('baseColour', '?')}, {p.get('price', '?')}]"
        )
    if not hits:
        print("no products match")


def cmd_ingest(args: argparse.Namespace) -> int:
    from training.ingest import run_ingest

    store = _store(args)
    try:
        summary = run_ingest(
            args.catalog,
            store,
            args.data_dir,
            limit=args.limit,
            encoder_config=_encoder_config(args.config),
            retrain_heads=args.retrain_heads,
            seed=args.seed,
            overrides=_overrides(args),
        )
    finally:
        store.close()
    for item in summary.skipped:
        print(f"skipped {item.product_id}: {item.reason}", file=sys.stderr)
    print(
        f"indexed {summary.products_indexed} products ({summary.products_unchanged} unchanged, "
        f"{summary.products_deleted} deleted, {len(summary.skipped)} skipped) into {summary.collection}; "
        f"{summary.products_total} in the index; {summary.images_embedded} images embedded at "
        f"{summary.images_per_second:.1f} images/s; {summary.seconds:.1f} s total"
    )
    if summary.heads_metrics:
        print(f"alignment heads: {summary.heads_metrics}")
    if args.json:
        _write_json(args.json, summary.to_dict())
    return 0


def cmd_reembed(args: argparse.Namespace) -> int:
    from training.reembed import RayConfig, reembed_encoder_config, run_reembed, swap_back

    store = _store(args)
    try:
        if args.swap_back:
            old, new = swap_back(store, args.data_dir)
            print(f"alias products: {old} -> {new} (swapped back; {old} is kept)")
            return 0
        ray = None
        if args.ray_address:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline machines; nothing to report to
            ray = RayConfig(
                address=args.ray_address,
                actors=args.actors,
                cpus_per_actor=args.cpus_per_actor,
                gpus_per_actor=args.gpus_per_actor,
                batch_size=args.batch_size,
            )
        yaml_config = _encoder_config(args.config) if args.config else None
        summary = run_reembed(
            args.catalog,
            store,
            args.data_dir,
            reembed_encoder_config(args.data_dir, store, args.encoder, yaml_config),
            limit=args.limit,
            seed=args.seed,
            ray=ray,
            swap=not args.no_swap,
            rebuild=args.rebuild,
            overrides=_overrides(args),
        )
    finally:
        store.close()
    for item in summary.skipped:
        print(f"skipped {item.product_id}: {item.reason}", file=sys.stderr)
    embed = summary.embed
    where = f"{embed.actors} Ray actors, {len(embed.nodes)} nodes" if summary.distributed else "one process"
    print(
        f"built {summary.collection}: {summary.products_total} products ({summary.products_indexed} written "
        f"now); embedded {embed.images} images and {embed.texts} texts in {embed.seconds:.1f} s "
        f"({embed.images_per_second:.1f} images/s, {where}); {summary.seconds:.1f} s total"
    )
    for check in summary.validation.checks:
        print(f"  {'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    if args.json:
        _write_json(args.json, summary.to_dict())
    if not summary.validation.ok:
        print(
            f"validation failed ({', '.join(c.name for c in summary.validation.failures())}): alias products "
            f"still points at {summary.previous}; {summary.collection} is kept for inspection (a re-run "
            "resumes it; --rebuild writes it anew from the embedding cache)",
            file=sys.stderr,
        )
        return 3
    if summary.swapped:
        note = "new" if summary.previous is None else f"{summary.previous} is kept; --swap-back returns to it"
        print(f"alias products: {summary.previous} -> {summary.collection} ({note})")
    else:
        print(f"validated; alias products still points at {summary.previous} (--no-swap)")
    return 0


def _search(args: argparse.Namespace):
    from serving.search import ProductSearch

    return ProductSearch(args.data_dir, _store(args))


def cmd_similar(args: argparse.Namespace) -> int:
    search = _search(args)
    try:
        hits = search.similar(args.product_id, args.k, args.mode, _filters(args))
    finally:
        search.close()
    _print_hits(hits, args.json)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from PIL import Image

    search = _search(args)
    try:
        if args.image:
            with Image.open(args.image) as image:
                hits = search.search_image(image.convert("RGB"), args.k, args.mode, _filters(args))
        else:
            hits = search.search_text(args.query, args.k, args.mode, _filters(args))
    finally:
        search.close()
    _print_hits(hits, args.json)
    return 0


def cmd_eval_catalog(args: argparse.Namespace) -> int:
    from training.eval_catalog import print_table, run_catalog_eval

    result = run_catalog_eval(
        args.catalog,
        args.data_dir,
        limit=args.limit,
        encoder_config=_encoder_config(args.config),
        retrain_heads=args.retrain_heads,
    )
    print_table(result)
    if args.json:
        _write_json(args.json, result)
    return 0


def cmd_eval_questions(args: argparse.Namespace) -> int:
    from serving.eval_questions import print_question_table, run_question_eval

    result = run_question_eval(args.catalog, args.data_dir, limit=args.limit, progress=True)
    print_question_table(result)
    if args.json:
        _write_json(args.json, result)
    return 0


def cmd_train_sequences(args: argparse.Namespace) -> int:
    from training.sequences import load_config_file, run_train_sequences

    model_config, train_config = load_config_file(args.config)
    summary = run_train_sequences(
        args.dataset,
        args.out,
        seed=args.seed,
        attributes=args.attributes,
        model_config=model_config,
        train_config=train_config,
        progress=not args.no_progress,
        content_index=args.content_index,
    )
    valid = summary["valid"]
    print(
        f"trained on {summary['users']} users, {summary['items']} items: {summary['epochs']} epochs "
        f"({summary['stop_reason']}, best {summary['best_epoch']}), {summary['seconds_per_epoch']} s/epoch, "
        f"{summary['seconds']} s total; validation HR@10 {valid.get('HR@10', 0):.4f} "
        f"NDCG@10 {valid.get('NDCG@10', 0):.4f}; wrote {summary['checkpoint']}"
    )
    return 0


def cmd_eval_sequences(args: argparse.Namespace) -> int:
    from training.sequences import format_table, run_eval_sequences, write_topk_tsv

    result = run_eval_sequences(args.dataset, args.model, baselines=not args.no_baselines)
    print(format_table(result))
    if args.topk_out:
        write_topk_tsv(result, args.topk_out)
        print(f"wrote {args.topk_out}")
    if args.json:
        _write_json(args.json, {k: v for k, v in result.items() if k != "topk"})
    return 0


def cmd_bench_index(args: argparse.Namespace) -> int:
    from index.bench import bench_index
    from training.eval_catalog import real_vectors_for_bench

    real = None if args.no_real else real_vectors_for_bench(args.catalog, args.data_dir)
    result = bench_index(points=args.points, dim=args.dim, queries=args.queries, real_vectors=real)
    print(json.dumps(result, indent=2))
    if args.json:
        _write_json(args.json, result)
    return 0


def cmd_simulate_sessions(args: argparse.Namespace) -> int:
    from training.catalog import load_catalog
    from training.events import write_events
    from training.simulator import SimulatorConfig, simulate_sessions, summarize, write_shoppers

    config = SimulatorConfig(shoppers=args.shoppers, days=args.days, seed=args.seed)
    _check_out_file(args.out, "events.jsonl")
    catalog = load_catalog(args.catalog, limit=args.limit)
    events, shoppers = simulate_sessions(catalog.products, config)
    count = write_events(events, args.out)
    profiles = args.out.with_name(args.out.name + ".shoppers.json")
    write_shoppers(shoppers, profiles)
    print(json.dumps(summarize(events), indent=2))
    print(f"wrote {count} events to {args.out} (latent tastes for analysis only: {profiles})")
    return 0


def cmd_simulate_loop(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import httpx

    from training.loop import (
        STRATEGIES,
        LoopConfig,
        LoopError,
        ReactionConfig,
        format_table,
        run_loop,
        write_outputs,
    )
    from training.sequences import load_config_file

    _check_out_file(args.out, "simulate_loop.json")
    model_config, train_config = load_config_file(args.config)
    chosen = args.strategy or ["all"]
    strategies = tuple(s for s in STRATEGIES if s in chosen or "all" in chosen)  # always in report order
    config = LoopConfig(
        days=args.days,
        shoppers=args.shoppers,
        warmup_days=args.warmup_days,
        seed=args.seed,
        strategies=strategies,
        explore_policy=args.explore_policy,
        reaction=ReactionConfig(k=args.k, type_interest=args.type_interest),
        swap_timeout_s=args.swap_timeout,
        model=model_config,
        train=replace(train_config, seed=args.seed),
    )
    try:
        result = run_loop(
            config,
            args.data_dir,
            work_dir=args.work_dir,
            url=args.url,
            api_key=args.api_key or os.environ.get("SHOPGUIDE_API_KEY"),
            catalog=args.catalog,
            limit=args.limit,
        )
    except (LoopError, httpx.HTTPError) as exc:  # a server that failed to start, swap or answer
        print(f"shopguide: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    json_path, plot_path = write_outputs(result, args.out)
    print(f"wrote {json_path} and {plot_path} ({result['seconds']:.0f} s in all)")
    return 0


def cmd_index_behavior(args: argparse.Namespace) -> int:
    from encoders.sequence import SequenceEncoder
    from training.behavior import upsert_behavior_vectors
    from training.ingest import ALIAS

    encoder = SequenceEncoder.load(args.model)
    store = _store(args)
    try:
        index = store.open(ALIAS)
        result = upsert_behavior_vectors(index, encoder)
        index.optimize()
    finally:
        store.close()
    print(
        f"wrote behavior vectors ({result.space.encoder}, dim {result.space.dim}) for {result.written} "
        f"products; {result.not_in_index} model items are not in the index"
    )
    return 0


def _registry(args: argparse.Namespace):
    from training.registry import ModelRegistry

    return ModelRegistry(args.data_dir / "models" / "registry")


def _promote(args: argparse.Namespace, registry, version: str, events: list) -> int:
    from training.update import holdout_histories, holdout_metrics

    holdout = holdout_histories(events, args.holdout_days)
    result = registry.promote(
        version, lambda folder: holdout_metrics(folder, holdout), tolerance=args.tolerance, force=args.force
    )
    verdict = "promoted" if result.promoted else "NOT promoted"
    print(f"{version} {verdict}: {result.reason} ({len(holdout)} held-out shoppers)")
    return 0 if result.promoted else 3


def cmd_train_update(args: argparse.Namespace) -> int:
    from training.sequences import load_config_file
    from training.update import run_update

    events = _load_events(args)
    model_config, train_config = load_config_file(args.config)
    registry = _registry(args)
    summary = run_update(
        events, registry, args.strategy, model_config=model_config, train_config=train_config,
        progress=not args.no_progress,
    )  # fmt: skip
    print(
        f"{summary['strategy']} update ({summary['reason']}): version {summary['version']} "
        f"(parent {summary['parent']}), {summary['users']} shoppers, {summary['items']} products, "
        f"{summary['seconds']} s; validation NDCG@10 {summary['metrics'].get('NDCG@10', 0):.4f}"
    )
    return _promote(args, registry, summary["version"], events) if args.promote else 0


def cmd_models_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    live = registry.live()
    for v in registry.list():
        marker = "*" if v.version == live else " "
        ndcg = v.metrics.get("NDCG@10")
        print(
            f"{marker} {v.version}  {v.strategy:<11} parent={v.parent or '-'}  "
            f"items={v.training.get('items', '?')}  NDCG@10={'-' if ndcg is None else f'{ndcg:.4f}'}"
        )
    if not registry.list():
        print(f"no models in {registry.root}; train one with `shopguide train update`")
    return 0


def _load_events(args: argparse.Namespace) -> list:
    """The events to train or gate on: a JSON-lines file if given, else a snapshot of the event store."""
    from training.events import read_events
    from training.worker import snapshot_events

    if args.events is not None:
        return list(read_events(args.events))
    return snapshot_events(args.data_dir)


def cmd_models_promote(args: argparse.Namespace) -> int:
    return _promote(args, _registry(args), args.version, _load_events(args))


def cmd_models_rollback(args: argparse.Namespace) -> int:
    print(f"live model is now {_registry(args).rollback()}")
    return 0


def cmd_products_overrides(args: argparse.Namespace) -> int:
    store = _overrides(args)
    recorded = store.read()  # only the SQLite file: safe beside a running server
    if not recorded:
        print(f"no live price/stock updates recorded in {store.path}")
        return 0
    for product_id, by_field in recorded.items():
        for name, override in by_field.items():
            print(
                f"{product_id}  {name:<8} {override['value']!r:<8} "
                f"(catalog: {override['catalog']!r}; set {override['at']})"
            )
    return 0


def cmd_products_update(args: argparse.Namespace) -> int:
    from index import UnknownProductError
    from training.ingest import ALIAS

    fields = {}
    if args.price is not None:
        if not math.isfinite(args.price) or args.price < 0:
            raise ValueError(f"--price must be a finite number >= 0, got {args.price}")
        fields["price"] = float(args.price)
    if args.in_stock is not None:
        fields["in_stock"] = args.in_stock
    if not fields:
        raise ValueError("nothing to change: give --price and/or --in-stock / --out-of-stock")
    store = _store(args)  # a running `shopguide serve` owns the embedded index: then use PATCH /products/ID
    try:
        index = store.open(ALIAS)
        found = index.get([args.product_id])
        if not found:
            raise UnknownProductError(f"product {args.product_id!r} is not in the index")
        # Recorded first, so `shopguide ingest` and `reembed` keep it (training/overrides.py).
        _overrides(args).record(args.product_id, fields, found[0].payload)
        index.set_payload(args.product_id, fields)
        payload = index.get([args.product_id])[0].payload
    finally:
        store.close()
    print(f"{args.product_id}: price {payload.get('price')}, in stock {payload.get('in_stock')}")
    return 0


def cmd_events_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from serving.event_store import SQLiteEventStore
    from training.events import read_events

    db = args.events_db or args.data_dir / "events.db"
    accepted = duplicates = 0
    batch: list = []
    with SQLiteEventStore(db) as store, tqdm(desc="import events", unit="event") as bar:
        for event in read_events(args.file):  # validated line by line; a bad line stops with its number
            batch.append(event)
            if len(batch) == 1000:
                result = store.add(batch)
                accepted, duplicates = accepted + result.accepted, duplicates + result.duplicates
                bar.update(len(batch))
                batch = []
        if batch:
            result = store.add(batch)
            accepted, duplicates = accepted + result.accepted, duplicates + result.duplicates
            bar.update(len(batch))
        total, users = store.count(), store.users()
    print(
        f"imported {accepted} events ({duplicates} already there) into {db}: {total} events, {users} shoppers"
    )
    return 0


# ---- the feed log (serving/explore.py logs every served slot): off-policy evaluation, A/B report -----
def _open_feed_log(data_dir: Path):
    from serving.event_store import SQLiteEventStore

    db = data_dir / "events.db"
    if not db.is_file():
        raise FileNotFoundError(
            f"no event store at {db}: serve feeds first (`shopguide serve --data-dir {data_dir}`)"
        )
    return SQLiteEventStore(db)  # WAL: safe beside a running server


def cmd_eval_offpolicy(args: argparse.Namespace) -> int:
    from training.offpolicy import TARGET_POLICIES, format_estimates, offpolicy_estimate, parse_policy

    policies = [parse_policy(spec, TARGET_POLICIES) for spec in args.policy]  # bad specs fail before reading
    with _open_feed_log(args.data_dir) as store:
        rows = [r for r in store.feed_items() if args.arm is None or r.arm == args.arm]
    estimates = [offpolicy_estimate(rows, policy, cluster=args.cluster) for policy in policies]
    print(format_estimates(estimates))
    if args.json:
        _write_json(args.json, {"arm": args.arm, "cluster": args.cluster, "estimates": estimates})
    return 0


def cmd_ab_report(args: argparse.Namespace) -> int:
    from training.ab import ab_report, catalog_categories, format_ab_report, popular_count

    store = None if args.catalog else _store(args)
    try:
        categories, source = catalog_categories(args.data_dir, args.catalog, store)
    finally:
        if store is not None:
            store.close()
    with _open_feed_log(args.data_dir) as events:
        popular = [pid for pid, _ in events.popular(limit=popular_count(len(categories)))]
        report = ab_report(events.feed_items(), categories, popular, control=args.control)
    print(format_ab_report(report))
    print(f"catalog: {source}")
    if args.json:
        _write_json(args.json, {**report, "catalog_source": source})
    return 0


def _add_feed_log_commands(sub, eval_sub) -> None:
    """`eval offpolicy` and `ab report`: both read the feed log in DATA_DIR/events.db."""
    e = eval_sub.add_parser("offpolicy", help="IPS / SNIPS CTR of a feed policy from the logged feed slots")
    e.add_argument(
        "--policy",
        action="append",
        required=True,
        help="greedy, epsilon:E (0 <= E <= 1) or logging; repeat to evaluate several",
    )
    e.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="its events.db holds the log")
    e.add_argument("--arm", help="only slots served to this A/B arm")
    e.add_argument(
        "--cluster",
        choices=("user", "request", "slot"),
        default="user",
        help="rows that share noise in the interval (default: %(default)s)",
    )
    e.add_argument("--json", type=Path, help="write the estimates here")
    e.set_defaults(func=cmd_eval_offpolicy)

    p = sub.add_parser("ab", help="A/B tests between model versions")
    ab_sub = p.add_subparsers(dest="what", required=True)
    a = ab_sub.add_parser("report", help="per-arm CTR / CVR with 95%% intervals and bias guardrails")
    _add_store(a)
    a.add_argument("--catalog", type=Path, help="catalog folder for the guardrails (default: the index)")
    a.add_argument("--control", help="the arm the others are compared with (default: first by name)")
    a.add_argument("--json", type=Path, help="write the report here")
    a.set_defaults(func=cmd_ab_report)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import run_server

    return run_server(
        args.data_dir,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        no_api_key=args.no_api_key,
        config=args.config,
        qdrant_url=args.qdrant_url,
        sequence_model=args.sequence_model,
        use_ray=not args.no_ray,
        qdrant_api_key_env=args.qdrant_api_key_env,
        recommender_replicas=args.recommender_replicas,
        explore_policy=args.explore_policy,
    )


def cmd_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from training.sequences import load_config_file
    from training.worker import WorkerConfig, run_worker

    model_config, train_config = load_config_file(args.config)
    config = WorkerConfig(
        update_every_s=args.update_every,
        strategy=args.strategy,
        tolerance=args.tolerance,
        holdout_days=args.holdout_days,
        model_config=model_config,
        train_config=train_config,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the job in progress, then exit
    print(
        f"worker on {args.data_dir}: {config.strategy} update every {config.update_every_s:g} s", flush=True
    )
    try:
        done = run_worker(args.data_dir, config, once=args.once, stop=stop)
    except KeyboardInterrupt:
        return 0
    return 0 if all(entry["ok"] for entry in done) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from training.report import ReportConfig, build_report

    config = ReportConfig(
        out=args.out,
        results=args.results,
        bench_results=args.bench_results,
        data_dir=args.data_dir,
        map_points=args.map_points,
        seed=args.seed,
    )
    build_report(config)
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    from encoders import list_image_encoders, list_text_encoders

    print("image encoders:", ", ".join(list_image_encoders()))
    print("text encoders: ", ", ".join(list_text_encoders()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shopguide", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="embed a catalog and index it (incremental, resumable)")
    p.add_argument(
        "--catalog", type=Path, default=DEFAULT_CATALOG, help="catalog folder (default: %(default)s)"
    )
    p.add_argument("--limit", type=int, help="only the first N usable products")
    p.add_argument("--config", type=Path, help="YAML encoder config (image_encoder, fused_image_weight, ...)")
    p.add_argument("--retrain-heads", action="store_true", help="retrain the alignment heads")
    p.add_argument("--seed", type=int, default=0, help="seed for derived prices and stock (default: 0)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON here")
    _add_store(p)
    _add_overrides(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "reembed", help="re-embed the catalog with new encoders into a new collection, validate, swap"
    )
    p.add_argument(
        "--catalog", type=Path, default=DEFAULT_CATALOG, help="catalog folder (default: %(default)s)"
    )
    p.add_argument("--encoder", help="the new image encoder (registry name, see `shopguide encoders`)")
    p.add_argument("--config", type=Path, help="YAML encoder config (default: the live collection's)")
    p.add_argument("--limit", type=int, help="only the first N usable products")
    p.add_argument("--seed", type=int, default=0, help="seed for derived prices and stock (default: 0)")
    p.add_argument("--ray-address", help="embed on this Ray cluster (e.g. 127.0.0.1:6379, auto, local)")
    p.add_argument("--actors", type=int, default=2, help="encoder actors with --ray-address (default: 2)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per encoder actor (default: 1)")
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs Ray reserves per encoder actor, which then runs its encoders on that GPU; 0 = CPU "
        "actors (default: 0; 0.5 puts two actors on one card)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="rows per actor call (default: 32)")
    p.add_argument("--no-swap", action="store_true", help="build and validate, leave the alias alone")
    p.add_argument(
        "--rebuild", action="store_true", help="first drop a new collection that failed validation"
    )
    p.add_argument(
        "--swap-back", action="store_true", help="point the alias at the previously live collection"
    )
    p.add_argument("--json", type=Path, help="also write the summary as JSON here")
    _add_store(p)
    _add_overrides(p)
    p.set_defaults(func=cmd_reembed)

    p = sub.add_parser("similar", help="products similar to one product")
    p.add_argument("product_id")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--mode", default="fused", choices=["fused", "image", "text"])
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_store(p)
    _add_filters(p)
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("search", help="text search (or photo search with --image)")
    p.add_argument("query", nargs="?", default="", help='e.g. "red women\'s handbag"')
    p.add_argument("--image", type=Path, help="search with this photo instead of text")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--mode", default="fused", choices=["fused", "image", "text"])
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_store(p)
    _add_filters(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("train", help="train models")
    train_sub = p.add_subparsers(dest="what", required=True)
    t = train_sub.add_parser("sequences", help="GRU user encoder on `user item item ...` sequences")
    t.add_argument(
        "--dataset", type=Path, required=True, help="e.g. ../shared/datasets/amazon-sequences/Beauty.txt"
    )
    t.add_argument("--out", type=Path, required=True, help="folder for sequence_model.pt")
    t.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    t.add_argument("--attributes", type=Path, help="item side information, {item_id: [attribute ids]} JSON")
    t.add_argument("--config", type=Path, help="YAML with `model:` and `train:` sections overriding defaults")
    t.add_argument(
        "--content-index",
        type=Path,
        metavar="DATA_DIR",
        help="use the fused product vectors of this data dir's index as item side information",
    )
    t.add_argument(
        "--no-progress", action="store_true", help="no progress bars (one line per epoch still prints)"
    )
    t.set_defaults(func=cmd_train_sequences)
    t = train_sub.add_parser(
        "update", help="update the user encoder from events: incremental, full or hybrid"
    )
    t.add_argument("--strategy", choices=("incremental", "full", "hybrid"), default="hybrid")
    t.add_argument(
        "--events", type=Path, help="events as JSON lines (default: DATA_DIR/events.db, the store)"
    )
    t.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="its models/registry holds versions"
    )
    t.add_argument("--config", type=Path, help="YAML with `model:` and `train:` sections")
    t.add_argument("--promote", action="store_true", help="then run the promotion gate on recent events")
    _add_gate(t)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train_update)

    p = sub.add_parser("models", help="the user-encoder registry: list, promote (gated), rollback")
    models_sub = p.add_subparsers(dest="what", required=True)
    m = models_sub.add_parser("list", help="versions, the live one marked *")
    m.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    m.set_defaults(func=cmd_models_list)
    m = models_sub.add_parser("promote", help="make a version live if it does not regress on recent events")
    m.add_argument("version")
    m.add_argument(
        "--events", type=Path, required=True, help="events as JSON lines (recent ones are held out)"
    )
    m.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    _add_gate(m)
    m.set_defaults(func=cmd_models_promote)
    m = models_sub.add_parser("rollback", help="make the previously live version live again")
    m.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    m.set_defaults(func=cmd_models_rollback)

    p = sub.add_parser("eval", help="offline evaluation")
    eval_sub = p.add_subparsers(dest="what", required=True)
    e = eval_sub.add_parser("catalog", help="similar-item, cross-modal and attribute-query quality")
    e.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    e.add_argument("--limit", type=int)
    e.add_argument("--config", type=Path)
    e.add_argument("--retrain-heads", action="store_true")
    e.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    e.add_argument("--json", type=Path, help="write the metrics here")
    e.set_defaults(func=cmd_eval_catalog)
    e = eval_sub.add_parser("questions", help="attribute queries phrased as shopper questions: raw vs parsed")
    e.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    e.add_argument("--limit", type=int)
    e.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    e.add_argument("--json", type=Path, help="write the metrics here")
    e.set_defaults(func=cmd_eval_questions)
    e = eval_sub.add_parser("sequences", help="leave-one-out HR/NDCG@5/10/20 vs baselines and published")
    e.add_argument("--dataset", type=Path, required=True)
    e.add_argument("--model", type=Path, required=True, help="folder written by `train sequences`")
    e.add_argument("--json", type=Path, help="write the metrics here")
    e.add_argument("--topk-out", type=Path, help="TSV: user_id then the 20 top-ranked item ids per test user")
    e.add_argument("--no-baselines", action="store_true", help="skip popularity, item-CF and user-CF")
    e.set_defaults(func=cmd_eval_sequences)
    _add_feed_log_commands(sub, eval_sub)

    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="what", required=True)
    b = bench_sub.add_parser("index", help="embedded vs qdrant-client :memory: latency, HNSW recall")
    b.add_argument("--points", type=int, default=100_000)
    b.add_argument("--dim", type=int, default=256)
    b.add_argument("--queries", type=int, default=200)
    b.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    b.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    b.add_argument("--no-real", action="store_true", help="skip the recall check on real catalog vectors")
    b.add_argument("--json", type=Path)
    b.set_defaults(func=cmd_bench_index)

    p = sub.add_parser("simulate", help="simulated shoppers")
    sim_sub = p.add_subparsers(dest="what", required=True)
    m = sim_sub.add_parser("sessions", help="seeded shoppers browse, search and buy; events as JSON lines")
    m.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    m.add_argument("--limit", type=int, help="only the first N usable products")
    m.add_argument("--shoppers", type=int, default=1000)
    m.add_argument("--days", type=int, default=30)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", type=Path, required=True, help="events file (JSON lines)")
    m.set_defaults(func=cmd_simulate_sessions)
    m = sim_sub.add_parser(
        "loop",
        help="closed loop: simulated shoppers use the HTTP API while the server learns; CTR, CVR, "
        "coverage and Gini per day and strategy",
    )
    m.add_argument("--days", type=int, default=7, help="simulated days (default: %(default)s)")
    m.add_argument("--shoppers", type=int, default=300, help="simulated shoppers (default: %(default)s)")
    m.add_argument(
        "--warmup-days", type=int, default=7, help="simulated days before day 0: the day-0 model's data"
    )
    m.add_argument(
        "--strategy",
        action="append",
        choices=("popularity", "none", "incremental", "full", "hybrid", "all"),
        help="repeat for several (default: all, one after another on copies of the same start)",
    )
    m.add_argument("--seed", type=int, default=0, help="shoppers, reactions and training (default: 0)")
    m.add_argument("--k", type=int, default=10, help="items per slate (default: %(default)s)")
    m.add_argument(
        "--explore-policy",
        default="greedy",
        metavar="POLICY",
        help="the feed's exploration (greedy, epsilon:E, thompson); not greedy: IPS / SNIPS from the "
        "feed log are checked against the simulator's true CTR (default: %(default)s)",
    )
    m.add_argument(
        "--type-interest",
        type=float,
        default=1.0,
        help="weight of the shopper's article-type interest in the click model; 0 leaves it out "
        "(default: %(default)s)",
    )
    m.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="an ingested index (ingested here if missing)"
    )
    m.add_argument("--work-dir", type=Path, help="copies per strategy (default: DATA_DIR/loop)")
    m.add_argument("--catalog", type=Path, help="catalog to ingest when DATA_DIR has no index (or --url's)")
    m.add_argument("--limit", type=int, default=2000, help="products to ingest when DATA_DIR has no index")
    m.add_argument(
        "--url", help="drive this running server (one --strategy; its --data-dir's registry gets the models)"
    )
    m.add_argument("--api-key", help="for --url: the server's key (default: $SHOPGUIDE_API_KEY)")
    m.add_argument("--config", type=Path, help="YAML with `model:` and `train:` sections for the GRU")
    m.add_argument(
        "--swap-timeout", type=float, default=120.0, help="seconds for the server to serve a promoted model"
    )
    m.add_argument("--out", type=Path, default=Path("results/simulate_loop.json"), help="JSON; PNG beside it")
    m.set_defaults(func=cmd_simulate_loop)

    p = sub.add_parser("index", help="index maintenance")
    index_sub = p.add_subparsers(dest="what", required=True)
    b = index_sub.add_parser("behavior", help="write a trained sequence model's item vectors as `behavior`")
    b.add_argument("--model", type=Path, required=True, help="a `shopguide train sequences` folder")
    _add_store(b)
    b.set_defaults(func=cmd_index_behavior)

    p = sub.add_parser("products", help="catalog changes without re-embedding")
    products_sub = p.add_subparsers(dest="what", required=True)
    m = products_sub.add_parser(
        "update", help="payload-only price / stock change (PATCH /products/ID while serving)"
    )
    m.add_argument("product_id")
    m.add_argument("--price", type=float)
    stock = m.add_mutually_exclusive_group()
    stock.add_argument("--in-stock", dest="in_stock", action="store_true", default=None)
    stock.add_argument("--out-of-stock", dest="in_stock", action="store_false")
    _add_store(m)
    _add_overrides(m)
    m.set_defaults(func=cmd_products_update)
    m = products_sub.add_parser(
        "overrides",
        help="the live price / stock updates that ingest and reembed keep, with the catalog's values",
    )
    m.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="default: %(default)s")
    _add_overrides(m)
    m.set_defaults(func=cmd_products_overrides)

    p = sub.add_parser("events", help="the event store")
    ev_sub = p.add_subparsers(dest="what", required=True)
    m = ev_sub.add_parser("import", help="load events (JSON lines, e.g. simulated sessions) into the store")
    m.add_argument("file", type=Path, help="events as JSON lines (the schema of POST /events)")
    m.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    m.add_argument("--events-db", type=Path, help="default: DATA_DIR/events.db (what `serve` reads)")
    m.set_defaults(func=cmd_events_import)

    p = sub.add_parser(
        "worker",
        help="periodic user-encoder updates beside a running server (it picks up promoted models)",
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the served data dir")
    p.add_argument("--update-every", type=float, default=3600.0, help="seconds between updates (%(default)s)")
    p.add_argument("--strategy", choices=("incremental", "full", "hybrid"), default="hybrid")
    p.add_argument("--tolerance", type=float, help="promotion gate: allowed relative NDCG@10 drop (0.02)")
    p.add_argument("--holdout-days", type=float, default=1.0, help="gate on shoppers active this recently")
    p.add_argument("--once", action="store_true", help="run each job once and exit (e.g. from cron)")
    p.add_argument("--config", type=Path, help="YAML model/train config, as for `train sequences`")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "serve",
        help="the HTTP API on Ray Serve (similar, feed, search, events)",
        epilog="Admission: 96 requests at once, up to 1024 while a Recommender restarts, the rest 503 + "
        "Retry-After; set $SHOPGUIDE_ADMISSION to JSON to change it, e.g. "
        '\'{"admit": 64, "admit_during_outage": 512}\' (serving/admission.py AdmissionConfig).',
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="what `shopguide ingest` wrote")
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default: %(default)s, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        help="key for POST /events and DELETE /users (default: $SHOPGUIDE_API_KEY, else generated)",
    )
    p.add_argument("--no-api-key", action="store_true", help="leave writes open (local experiments only)")
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_SERVE_CONFIG,
        help="Ray Serve config; its `deployments:` set replicas and batching",
    )
    p.add_argument(
        "--qdrant-url", help="a Qdrant server instead of the embedded index (`ingest --qdrant-url` fills it)"
    )
    p.add_argument(
        "--qdrant-api-key-env",
        default="QDRANT_API_KEY",
        help="environment variable holding the Qdrant API key, read by every process that connects "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--recommender-replicas",
        type=_positive_int,
        metavar="N",
        help="Recommender replicas (default: --config's num_replicas); more than 1 needs --qdrant-url",
    )
    p.add_argument(
        "--sequence-model",
        type=Path,
        help="GRU user encoder folder (default: DATA_DIR/models/sequence if present)",
    )
    p.add_argument(
        "--explore-policy",
        metavar="POLICY",
        help="exploration on feed slots: greedy, epsilon:E or thompson (default: --config's explore_policy)",
    )
    p.add_argument("--no-ray", action="store_true", help="one process with uvicorn instead of Ray Serve")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="HTML page of tables and plots from the eval and benchmark results")
    p.add_argument("--out", type=Path, required=True, help="folder for index.html and its PNG plots")
    p.add_argument(
        "--results", type=Path, default=Path("results"), help="eval JSON files (default: %(default)s)"
    )
    p.add_argument(
        "--bench-results",
        type=Path,
        default=Path("bench-results"),
        help="benchmark JSON files, serve.json (default: %(default)s)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="index for the product map (default: %(default)s)",
    )
    p.add_argument("--map-points", type=int, default=5000, help="products on the 2-D map at most")
    p.add_argument("--seed", type=int, default=0, help="seed of the map's subsample (default: %(default)s)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("encoders", help="list the registered encoders")
    p.set_defaults(func=cmd_encoders)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # Errors a user can fix (bad input, missing files): one line, no traceback.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"shopguide: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:
        from index import IndexError_

        if isinstance(exc, IndexError_):
            print(f"shopguide: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
