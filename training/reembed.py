"""`shopguide reembed`: the catalog under new encoders into a new collection, validated, then swapped in."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from encoders.alignment import AlignmentHeads
from index import IndexStore, VectorIndex, VectorSpace
from training.catalog import Catalog, Product, Skipped, load_catalog
from training.evaluate import attribute_phrase
from training.features import (
    EmbeddingCache,
    decode_batches,
    file_hash,
    image_features,
    text_features,
    text_hash,
)
from training.ingest import (
    ALIAS,
    MANIFEST,
    MANIFESTS_DIR,
    build_manifest,
    collection_name,
    manifest_path,
    point_alias,
    read_alias_history,
    spaces_for,
    write_collection,
    write_json_atomic,
)
from training.overrides import OverrideStore
from training.vectors import (
    EncoderConfig,
    ProductVectors,
    Towers,
    build_product_vectors,
    versioned_heads_path,
)

SPACES = ("image", "text", "fused")  # the content spaces a re-embed rebuilds (behavior is the server's)


class NothingToReembed(ValueError):  # noqa: N818 - a refusal, not a failure; the CLI prints it in one line
    """The requested encoders are the ones the live collection was built with."""


# ---- what a server reads after the alias moves ------------------------------------------------------
def collection_manifest(data_dir: Path, collection: str) -> dict:
    """What serving `collection` needs, written before the alias can point at it.

    Keys: `collection`; `encoders` (EncoderConfig fields: the query towers to build, which change with a
    re-embed); `spaces` (name, dim, encoder id per vector); `heads_version` (the alignment heads, at
    training.vectors.versioned_heads_path(data_dir, heads_version), the same file
    serving.search.load_heads_for finds from the collection's image space); `catalog` (its folder)."""
    path = manifest_path(data_dir, collection)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    # Collections ingested before per-collection manifests existed: ingest.json describes the one it built.
    legacy = data_dir / MANIFEST
    if legacy.is_file():
        manifest = json.loads(legacy.read_text(encoding="utf-8"))
        if manifest.get("collection") == collection:
            return manifest
    raise FileNotFoundError(
        f"no manifest for collection {collection!r} in {data_dir / MANIFESTS_DIR}: re-run the "
        f"`shopguide ingest` or `shopguide reembed` that built it (with --data-dir {data_dir})"
    )


def live_manifest(store: IndexStore, data_dir: Path) -> dict:
    """The manifest of the collection the alias points at now (what a server should serve)."""
    target = store.get_alias(ALIAS)
    if target is None:
        raise FileNotFoundError(f"no alias {ALIAS!r} in {data_dir}: run `shopguide ingest` first")
    return collection_manifest(data_dir, target)


# ---- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayConfig:
    """The encoder actor pool of a distributed re-embed (`--ray-address`, `--actors`, ...)."""

    address: str  # a running cluster ("127.0.0.1:6379", "auto", "ray://head:10001"), or "local" (in-process)
    actors: int = 2  # encoder actors in the pool; each loads both towers once
    cpus_per_actor: float = 1.0  # CPUs Ray reserves per actor; also its torch threads (at least 1)
    # GPUs Ray reserves per actor (0.5: two actors share a card); > 0 runs the towers on that GPU.
    gpus_per_actor: float = 0.0
    batch_size: int = 32  # rows (photos or texts) per map_batches call
    resources: dict = field(default_factory=dict)  # custom resources per actor, e.g. {"encoder_node": 1}
    actor_start_timeout_s: int = 600  # the pool waits for all its actors: too few slots fail here, clearly

    def __post_init__(self) -> None:
        if self.actors < 1 or self.batch_size < 1 or self.cpus_per_actor <= 0:
            raise ValueError(
                f"--actors ({self.actors}), --batch-size ({self.batch_size}) and --cpus-per-actor "
                f"({self.cpus_per_actor}) must be positive"
            )
        if self.gpus_per_actor < 0:
            raise ValueError(f"--gpus-per-actor must be >= 0 (0 = CPU actors), got {self.gpus_per_actor}")


@dataclass(frozen=True)
class ValidationConfig:
    """What a new collection must pass before the alias moves to it (each check catches a way to break)."""

    sample: int = 20  # random products checked one by one (vectors, self-retrieval, title queries)
    seed: int = 0
    min_vector_cosine: float = 0.999  # stored vs recomputed: a float32 round trip is ~1e-7 off, a mix-up ~0
    title_k: int = 10
    # Share of sampled titles whose product is in the top title_k of the text space, queried the way the
    # server does (text tower -> the collection's heads file). Measured on 1,000 fashion products: 1.0
    # (all 1,000 titles); 0.004 with heads trained on another seed, 0.01 with the vectors shuffled. The
    # tiny test catalog: 1.0 with MiniLM, 0.40 with a random-init CLIP text tower (refused, rightly).
    min_title_hit_rate: float = 0.5


# ---- results ----------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str  # count | spaces | heads | vectors | self_top1 | features | title_queries
    ok: bool
    detail: str  # what was found; for a failure, why


@dataclass
class ValidationReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


@dataclass
class EmbedStats:
    """The embedding stage: only photos and texts missing from the cache are computed."""

    images: int = 0  # photos embedded in this run
    texts: int = 0  # texts embedded in this run (titles, documents, attribute phrases)
    seconds: float = 0.0  # wall time of the stage (with Ray: actor pool start included)
    nodes: list[str] = field(default_factory=list)  # Ray node ids the encoder actors ran on
    actors: int = 0  # distinct encoder actors that returned results

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 and self.images else 0.0


@dataclass
class ReembedSummary:
    """What a re-embed did (printed by the CLI; `--json` writes to_dict)."""

    collection: str  # the new versioned collection
    previous: str | None  # where the alias pointed before; kept, for --swap-back
    swapped: bool  # the alias now points at `collection`
    validation: ValidationReport
    products_indexed: int  # points written in this run (the rest were there from a killed run)
    products_total: int
    skipped: list[Skipped]
    embed: EmbedStats
    distributed: bool  # embedded by a Ray actor pool
    seconds: float
    heads_metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["validation"] = self.validation.to_dict()
        out["skipped"] = [asdict(s) for s in self.skipped]
        out["embed"]["images_per_second"] = round(self.embed.images_per_second, 2)
        return out


# ---- encoder choice ---------------------------------------------------------------------------------
def reembed_encoder_config(
    data_dir: Path, store: IndexStore, encoder: str | None, yaml_config: EncoderConfig | None
) -> EncoderConfig:
    """The new recipe: the YAML config if given, else the live collection's, with `encoder` as its image
    tower (command line over YAML; a different tower starts from empty encoder args)."""
    if encoder is None and yaml_config is None:
        raise ValueError(
            "say what to re-embed with: --encoder NAME (see `shopguide encoders`) or --config YAML"
        )
    base = yaml_config
    if base is None:
        target = store.get_alias(ALIAS)
        base = (
            EncoderConfig(**collection_manifest(data_dir, target)["encoders"]) if target else EncoderConfig()
        )
        # The device the live collection was built on says nothing about this machine's.
        base = replace(base, device=EncoderConfig.device)
    if encoder is not None and encoder != base.image_encoder:
        base = replace(base, image_encoder=encoder, image_encoder_args={})
    return base


def _towers_key(spaces: list[dict] | list[VectorSpace]) -> tuple:
    """The part of a collection's recipe that the encoders decide (everything but the heads version)."""
    out = []
    for s in spaces:
        s = asdict(s) if isinstance(s, VectorSpace) else s
        if s["name"] in SPACES:
            # "align[<image id>+<text id>]/<heads version>[+w<fused weight>]"; tower ids hold "/" and "+".
            towers, _, heads = s["encoder"].rpartition("]/")
            out.append((s["name"], s["dim"], towers + "]", heads.partition("+")[2]))
    return tuple(sorted(out))


def _refuse_same(towers: Towers, live: str | None, manifest: dict | None) -> None:
    if live is None or manifest is None:
        return
    base = f"align[{towers.image.info.id}+{towers.text.info.id}]"
    dim = towers.config.embed_dim
    wanted = tuple(
        sorted(
            (name, dim, base, f"w{towers.config.fused_image_weight:g}" if name == "fused" else "")
            for name in SPACES
        )
    )
    if _towers_key(manifest.get("spaces", [])) == wanted:
        raise NothingToReembed(
            f"the live collection {live!r} is already built with {towers.image.info.id} + "
            f"{towers.text.info.id} (fused weight {towers.config.fused_image_weight:g}): nothing to "
            "re-embed; catalog changes go through `shopguide ingest`"
        )


# ---- the embedding stage ----------------------------------------------------------------------------
def product_texts(products: list[Product]) -> list[str]:
    """Every text the vectors need per product: title, document, attribute phrase (as
    training.vectors.build_product_vectors embeds them; anything missed there is embedded there)."""
    out: list[str] = []
    for p in products:
        out += [p.title, p.document(), attribute_phrase(p.baseColour, p.gender, p.articleType) or p.title]
    return out


def missing_work(
    catalog: Catalog, towers: Towers, cache: EmbeddingCache
) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """(content hash, photo path) and (text hash, text) pairs the cache lacks for these towers, deduplicated:
    a resumed or incremental run feeds the encoders only these."""
    photos: dict[str, Path] = {}
    for p in catalog.products:
        try:
            photos.setdefault(file_hash(p.image_path), p.image_path)
        except OSError:
            continue  # reported with its reason by build_product_vectors
    cached = cache.get_many(towers.image.info.id, list(photos))
    images = [(h, path) for h, path in photos.items() if h not in cached]
    texts = {text_hash(t): t for t in product_texts(catalog.products)}
    cached = cache.get_many(towers.text.info.id, list(texts))
    return images, [(h, t) for h, t in texts.items() if h not in cached]


def embed_locally(
    catalog: Catalog, towers: Towers, cache: EmbeddingCache, progress: bool = True
) -> EmbedStats:
    """The single-process embedding stage (what `shopguide ingest` does), timed like the Ray one."""
    images, texts = missing_work(catalog, towers, cache)
    start = time.perf_counter()
    feats = image_features(towers.image, [(h, path) for h, path in images], cache, progress)
    text_features(towers.text, [t for _, t in texts], cache, progress)
    return EmbedStats(images=feats.embedded, texts=len(texts), seconds=time.perf_counter() - start)


class EncoderActor:
    """One Ray Data actor: both frozen towers, loaded once; rows (kind, key, item) -> raw feature rows.

    Photos are read by path on the actor's node, so every node must see the catalog at the same path
    (a shared filesystem, or one machine); the driver writes the results into its embedding cache.
    `config` holds EncoderConfig fields, with the device map_batches_options chose for the actor."""

    def __init__(self, config: dict, threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        self.towers = Towers(EncoderConfig(**config))
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.actor_id = context.get_actor_id() or ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds, keys, vectors, errors = [], [], [], []

        def emit(kind: str, key: str, vector: bytes, error: str = "") -> None:
            kinds.append(kind)
            keys.append(key)
            vectors.append(vector)
            errors.append(error)

        rows = list(zip(batch["kind"], batch["key"], batch["item"], strict=True))
        image = self.towers.image
        photos = [(str(key), Path(str(item))) for kind, key, item in rows if kind == "image"]
        for ids, pixels, failed in decode_batches(image, photos, image.batch_size):
            if pixels is not None:
                for key, row in zip(ids, image.encode_tensors(pixels), strict=True):  # (n, image_dim)
                    emit("image", key, row.astype(np.float32).tobytes())
            for key, reason in failed.items():
                emit("image", key, b"", reason)
        texts = [(str(key), str(item)) for kind, key, item in rows if kind == "text"]
        if texts:
            rows_out = self.towers.text.encode_texts([t for _, t in texts])  # (n, text_dim)
            for (key, _), row in zip(texts, rows_out, strict=True):
                emit("text", key, row.astype(np.float32).tobytes())
        n = len(keys)
        return {
            "kind": np.array(kinds, dtype=object),
            "key": np.array(keys, dtype=object),
            "vector": np.array(vectors, dtype=object),
            "error": np.array(errors, dtype=object),
            # The ids the actor's towers report: a node with other weights files must not fill the cache.
            "encoder": np.array(
                [self.towers.image.info.id if k == "image" else self.towers.text.info.id for k in kinds],
                dtype=object,
            ),
            "node_id": np.array([self.node_id] * n, dtype=object),
            "actor_id": np.array([self.actor_id] * n, dtype=object),
        }


def map_batches_options(config: RayConfig, encoder_config: EncoderConfig) -> dict[str, Any]:
    """Keyword arguments of the `map_batches(EncoderActor, ...)` call: the pool's size and what Ray
    reserves per actor. A GPU actor builds its towers on "cuda": Ray sets CUDA_VISIBLE_DEVICES to the
    card it reserved, so that is the actor's GPU; a CPU actor runs them on the CPU, whatever the
    driver's `device` is."""
    import ray.data

    device = "cuda" if config.gpus_per_actor > 0 else "cpu"
    options: dict[str, Any] = {
        "fn_constructor_kwargs": {
            "config": asdict(replace(encoder_config, device=device)),
            "threads": max(1, int(config.cpus_per_actor)),
        },
        "batch_size": config.batch_size,
        "batch_format": "numpy",
        "compute": ray.data.ActorPoolStrategy(size=config.actors),
        "num_cpus": config.cpus_per_actor,
        "resources": dict(config.resources) or None,
    }
    if config.gpus_per_actor > 0:
        # Only when asked, so a CPU pool asks Ray for exactly what it did before GPUs were an option.
        options["num_gpus"] = config.gpus_per_actor
    return options


def check_pool_fits(config: RayConfig, cluster: dict[str, float]) -> None:
    """Fail at once when the cluster (`ray.cluster_resources()`) lacks what the actor pool reserves:
    otherwise Ray Data waits `actor_start_timeout_s` for actors that cannot start."""
    need = {"CPU": config.cpus_per_actor, "GPU": config.gpus_per_actor, **config.resources}
    short = {
        name: (config.actors * amount, cluster.get(name, 0.0))
        for name, amount in need.items()
        if amount > 0 and cluster.get(name, 0.0) < config.actors * amount
    }
    if short:
        detail = ", ".join(f"{need:g} {name} (it has {have:g})" for name, (need, have) in short.items())
        raise ValueError(
            f"the Ray cluster at {config.address} cannot hold {config.actors} encoder actors: they need "
            f"{detail}; lower --actors, --cpus-per-actor or --gpus-per-actor, or add nodes"
        )


def embed_with_ray(
    catalog: Catalog, towers: Towers, cache: EmbeddingCache, config: RayConfig, progress: bool = True
) -> EmbedStats:
    """The embedding stage on a Ray actor pool: the missing photos and texts as a Ray dataset,
    map_batches over `config.actors` EncoderActors, results streamed back into the cache per batch
    (so a killed run keeps what came back, and a re-run sends Ray only the rest)."""
    import ray
    import ray.data

    images, texts = missing_work(catalog, towers, cache)
    stats = EmbedStats()
    if not images and not texts:
        return stats
    start = time.perf_counter()
    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=config.address, logging_level=logging.WARNING)
    try:
        check_pool_fits(config, ray.cluster_resources())
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the bar below counts what reached the cache
        context.wait_for_min_actors_s = config.actor_start_timeout_s
        rows = [{"kind": "image", "key": h, "item": str(path)} for h, path in images]
        rows += [{"kind": "text", "key": h, "item": t} for h, t in texts]
        features = ray.data.from_items(rows).map_batches(
            EncoderActor, **map_batches_options(config, towers.config)
        )
        expected = {"image": towers.image.info.id, "text": towers.text.info.id}
        nodes, actors = set(), set()
        with tqdm(total=len(rows), desc="embed (ray)", unit="row", disable=not progress) as bar:
            for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
                fresh: dict[str, dict[str, np.ndarray]] = {"image": {}, "text": {}}
                for kind, key, vector, error, encoder in zip(
                    batch["kind"],
                    batch["key"],
                    batch["vector"],
                    batch["error"],
                    batch["encoder"],
                    strict=True,
                ):
                    if encoder != expected[kind]:
                        raise ValueError(
                            f"an encoder actor built {kind} tower {encoder!r}, but this driver has "
                            f"{expected[kind]!r}: every node needs the same encoder weights files"
                        )
                    if error:
                        continue  # an unreadable photo: build_product_vectors reports it as skipped
                    fresh[kind][key] = np.frombuffer(vector, dtype=np.float32)
                for kind, items in fresh.items():
                    if items:
                        cache.put_many(expected[kind], items)
                stats.images += len(fresh["image"])
                stats.texts += len(fresh["text"])
                nodes.update(batch["node_id"])
                actors.update(batch["actor_id"])
                bar.update(len(batch["key"]))
        stats.nodes, stats.actors = sorted(nodes), len(actors)
    finally:
        if connected_here:
            ray.shutdown()
    stats.seconds = time.perf_counter() - start
    return stats


# ---- validation -------------------------------------------------------------------------------------
def _same_content(space: str, a: dict, b: dict) -> bool:
    """Two products whose vectors in `space` must be equal (the same photo bytes and/or the same text)."""
    same_image = a.get("image_hash") == b.get("image_hash")
    same_text = a.get("text_hash") == b.get("text_hash")
    return {"image": same_image, "text": same_text}.get(space, same_image and same_text)


def validate_collection(
    index: VectorIndex,
    vectors: ProductVectors,
    spaces: list[VectorSpace],
    towers: Towers,
    data_dir: Path,
    config: ValidationConfig | None = None,
) -> ValidationReport:
    """Check a built collection before it goes live; every check names what it found.

    count: exactly the catalog's usable products. spaces: each vector's dim and encoder id. heads: the
    heads file and manifest a server loads for it. vectors: sampled stored vectors equal the recomputed
    ones (catches rows written to the wrong product). self_top1: each sampled product is its own nearest
    neighbour in every space, ties only with identical content (catches a collapsed encoder or a broken
    index). features: sampled cached raw features equal this process's towers' (catches actors that ran
    other encoders). title_queries: titles, embedded as a server embeds queries, find their products."""
    config = config or ValidationConfig()
    checks: list[Check] = []
    products = vectors.products
    expected = {p.id for p in products}
    stored = set(index.product_ids())
    count = index.count()
    missing, extra = sorted(expected - stored), sorted(stored - expected)
    detail = f"{count} points for {len(products)} usable products"
    if missing:
        detail += f"; missing {len(missing)} (e.g. {missing[:3]})"
    if extra:
        detail += f"; {len(extra)} not in the catalog (e.g. {extra[:3]})"
    checks.append(Check("count", count == len(products) and not missing and not extra, detail))

    wrong = [
        f"{s.name}: has {index.spaces.get(s.name)}, expected {s}"
        for s in spaces
        if index.spaces.get(s.name) != s
    ]
    checks.append(
        Check(
            "spaces",
            not wrong,
            "; ".join(wrong)
            or ", ".join(f"{s.name} dim {s.dim}" for s in spaces) + f" ({spaces[0].encoder})",
        )
    )

    # The heads a server loads for this collection: the version its image space names (load_heads_for).
    heads_version = index.spaces.get("image", spaces[0]).encoder.rsplit("/", 1)[-1]
    heads_file = versioned_heads_path(data_dir, heads_version)
    heads = AlignmentHeads.load(heads_file) if heads_file.is_file() else None
    problems = []
    if heads is None:
        problems.append(f"{heads_file} is missing")
    elif heads.version != heads_version:
        problems.append(f"{heads_file} holds heads {heads.version}, the collection needs {heads_version}")
    try:
        manifest = collection_manifest(data_dir, index.name)
        if manifest.get("heads_version") != heads_version or manifest.get("spaces") != [
            asdict(s) for s in spaces
        ]:
            problems.append(f"the manifest of {index.name} describes other spaces or heads")
    except FileNotFoundError as exc:
        problems.append(str(exc))
    checks.append(Check("heads", not problems, "; ".join(problems) or f"{heads_file.name} and the manifest"))

    rng = random.Random(config.seed)
    sample = sorted(rng.sample(range(len(products)), min(config.sample, len(products))))
    ids = [products[i].id for i in sample]
    records = {r.product_id: r for r in index.get(ids, with_vectors=True)}
    recomputed = {"image": vectors.image, "text": vectors.text, "fused": vectors.fused}
    bad, worst = [], 1.0
    for i, pid in zip(sample, ids, strict=True):
        have = records[pid].vectors if pid in records else {}
        for space in SPACES:
            row = have.get(space)
            if row is None or row.shape != recomputed[space][i].shape:
                bad.append(f"{pid}/{space}: {'missing' if row is None else f'dim {row.shape[-1]}'}")
                continue
            cosine = float(row @ recomputed[space][i])
            worst = min(worst, cosine)
            if cosine < config.min_vector_cosine:
                bad.append(f"{pid}/{space}: cosine {cosine:.4f}")
    checks.append(
        Check(
            "vectors",
            not bad,
            f"{len(ids)} sampled products, stored vs recomputed cosine >= {worst:.5f}"
            + (f"; wrong: {bad[:5]}" if bad else ""),
        )
    )

    present = [pid for pid in ids if pid in records and all(s in records[pid].vectors for s in SPACES)]
    lost = []
    for space in SPACES:
        if not present:
            break
        queries = np.stack([records[pid].vectors[space] for pid in present])  # (n, dim)
        for pid, hits in zip(present, index.search_batch(space, queries, k=1), strict=True):
            top = hits[0] if hits else None
            if top is None or (
                top.product_id != pid and not _same_content(space, top.payload, records[pid].payload)
            ):
                lost.append(f"{pid}/{space} -> {top.product_id if top else 'nothing'}")
    checks.append(
        Check(
            "self_top1",
            bool(present) and not lost,
            f"{len(present) * len(SPACES) - len(lost)}/{len(present) * len(SPACES)} (product, space) "
            "queries return the product first (ties only with identical content)"
            + (f"; not: {lost[:5]}" if lost else ""),
        )
    )

    # The cached raw features (computed by Ray actors, or by an earlier run) must be what this process's
    # towers compute: catches nodes with other weights or library builds, and random-init towers.
    titles = [products[i].title for i in sample]
    title_features = towers.text.encode_texts(titles)  # (n, text_dim)
    photos = [(products[i].id, products[i].image_path) for i in sample]
    fresh: dict[str, np.ndarray] = {}
    for pids, pixels, _ in decode_batches(towers.image, photos, towers.image.batch_size):
        if pixels is not None:
            fresh.update(zip(pids, towers.image.encode_tensors(pixels), strict=True))
    cosines = [float(title_features[j] @ vectors.raw_title[i]) for j, i in enumerate(sample)]
    cosines += [
        float(fresh[products[i].id] @ vectors.raw_image[i]) for i in sample if products[i].id in fresh
    ]
    worst = min(cosines, default=0.0)
    checks.append(
        Check(
            "features",
            worst >= config.min_vector_cosine,
            f"{len(cosines)} raw features recomputed here vs the cache: cosine >= {worst:.5f}"
            + (
                ""
                if worst >= config.min_vector_cosine
                else " (the encoders that filled the cache differ from this process's: other weights on "
                "a node, a random-init tower, or a cache written by another build of the same encoder id)"
            ),
        )
    )

    query_heads = heads if heads is not None and heads.version == heads_version else vectors.heads
    queries = query_heads.project_texts(title_features)  # (n, embed_dim): a query embedded as served
    found = sum(
        pid in {h.product_id for h in hits}
        for pid, hits in zip(ids, index.search_batch("text", queries, k=config.title_k), strict=True)
    )
    rate = found / len(ids) if ids else 0.0
    checks.append(
        Check(
            "title_queries",
            rate >= config.min_title_hit_rate,
            f"{found}/{len(ids)} titles find their product in the top {config.title_k} of the text space "
            f"(need a rate >= {config.min_title_hit_rate:g})",
        )
    )
    return ValidationReport(checks)


# ---- the job ----------------------------------------------------------------------------------------
def run_reembed(
    catalog_dir: Path,
    store: IndexStore,
    data_dir: Path,
    encoder_config: EncoderConfig,
    limit: int | None = None,
    seed: int = 0,
    ray: RayConfig | None = None,
    swap: bool = True,
    validation: ValidationConfig | None = None,
    progress: bool = True,
    rebuild: bool = False,
    overrides: OverrideStore | None = None,
) -> ReembedSummary:
    """Build the collection for `encoder_config`, validate it, and (if it passes and `swap`) move the alias.

    `rebuild` drops that collection first if it exists (one that failed validation; never the live one)
    and writes it anew from the embedding cache.

    Never opens the live collection (in embedded mode a running server owns it): the new one is its own
    shard folder, and its manifest and heads are written before the alias moves. Resumable like ingest:
    the embedding cache and the deterministically named collection keep what a killed run finished."""
    start = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    live = store.get_alias(ALIAS)
    try:
        manifest = collection_manifest(data_dir, live) if live else None
    except FileNotFoundError:
        manifest = None  # checked again below, by collection name, once the heads are known
    towers = Towers(encoder_config)
    _refuse_same(towers, live, manifest)
    catalog = load_catalog(catalog_dir, limit=limit, seed=seed)
    cache = EmbeddingCache(data_dir / "cache" / "embeddings.sqlite")
    try:
        if ray is not None:
            embed = embed_with_ray(catalog, towers, cache, ray, progress)
        else:
            embed = embed_locally(catalog, towers, cache, progress)
    finally:
        cache.close()
    vectors = build_product_vectors(catalog, data_dir, towers, progress=progress)  # from the cache now
    spaces = spaces_for(vectors, towers)
    name = collection_name(spaces)
    if name == live:
        raise NothingToReembed(
            f"these encoders and heads give the live collection {live!r} itself: nothing to re-embed; "
            "catalog changes go through `shopguide ingest`"
        )
    if rebuild and name in store.list_collections():
        store.drop_collection(name)  # refuses a collection an alias points at
    # delete_missing: the new collection is not live yet, so it holds exactly this catalog (and --limit).
    # Live price/stock updates go in too; ones made after this point, the server applies at the swap.
    written, _, total = write_collection(
        store,
        name,
        spaces,
        vectors,
        delete_missing=True,
        progress=progress,
        overrides=overrides or OverrideStore.at(data_dir),
        complete=limit is None,
    )
    new_manifest = build_manifest(name, towers, spaces, vectors, catalog_dir)
    write_json_atomic(manifest_path(data_dir, name), new_manifest)
    index = store.open_collection(name)
    try:
        report = validate_collection(index, vectors, spaces, towers, data_dir, validation)
    finally:
        index.close()
    swapped = False
    if report.ok and swap:
        now = store.get_alias(ALIAS)
        if now != live:
            # Someone else moved it (an ingest, another re-embed): never overwrite that blindly.
            raise ValueError(
                f"alias {ALIAS!r} moved from {live!r} to {now!r} while this re-embed ran; {name!r} is "
                "built and validated: re-run the same command to swap to it"
            )
        swapped, _ = point_alias(store, data_dir, name, new_manifest, "reembed")
    return ReembedSummary(
        collection=name,
        previous=live,
        swapped=swapped,
        validation=report,
        products_indexed=written,
        products_total=total,
        skipped=vectors.skipped,
        embed=embed,
        distributed=ray is not None,
        seconds=time.perf_counter() - start,
        heads_metrics=vectors.heads_metrics,
    )


def swap_back(store: IndexStore, data_dir: Path) -> tuple[str, str]:
    """Point the alias at the collection that was live before the current one (from the alias history).

    Checks only files, never opens a collection (a server may hold either). Returns (from, to); swapping
    back twice returns to where it started."""
    live = store.get_alias(ALIAS)
    if live is None:
        raise ValueError(f"no alias {ALIAS!r} in {data_dir}: nothing to swap back")
    previous = next(
        (h["from"] for h in reversed(read_alias_history(data_dir)) if h["to"] == live and h["from"]), None
    )
    if previous is None:
        raise ValueError(
            f"no collection before {live!r} is recorded in {data_dir / 'alias_history.json'}: nothing to "
            "swap back to"
        )
    if previous not in store.list_collections():
        raise ValueError(
            f"the previous collection {previous!r} no longer exists (collections: "
            f"{store.list_collections()}); re-embed with its encoders instead"
        )
    manifest = collection_manifest(data_dir, previous)
    heads_file = versioned_heads_path(data_dir, manifest["heads_version"])
    if not heads_file.is_file():
        raise FileNotFoundError(f"{previous!r} needs alignment heads {heads_file}, which is missing")
    point_alias(store, data_dir, previous, manifest, "swap-back")
    return live, previous


__all__ = [
    "EncoderActor",
    "NothingToReembed",
    "RayConfig",
    "ReembedSummary",
    "ValidationConfig",
    "ValidationReport",
    "collection_manifest",
    "live_manifest",
    "map_batches_options",
    "reembed_encoder_config",
    "run_reembed",
    "swap_back",
    "validate_collection",
]
