"""One contract suite for both index backends: embedded qdrant-edge and qdrant-client (in-process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from index import (
    CollectionAliasedError,
    CollectionExistsError,
    EdgeSettings,
    EdgeStore,
    Filters,
    Hit,
    IndexInUseError,
    IndexStore,
    InvalidVectorError,
    Record,
    SchemaMismatchError,
    UnknownCollectionError,
    UnknownProductError,
    VectorIndex,
    VectorSpace,
    open_store,
)

REPO = Path(__file__).resolve().parents[1]

SPACES = [VectorSpace("image", 8, "img-test/1"), VectorSpace("text", 16, "txt-test/1")]
N_POINTS = 200

GENDERS = ("Men", "Women", "Unisex")
MASTER = ("Apparel", "Footwear", "Accessories")
SUB = ("Topwear", "Bottomwear", "Shoes", "Bags", "Watches")
ARTICLES = ("Tshirts", "Shirts", "Jeans", "Casual Shoes", "Handbags", "Watches", "Kurtas")
COLOURS = ("Black", "White", "Blue", "Red", "Türkis", "Navy Blue")


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.normal(size=(n, dim)).astype(np.float32)  # (n, dim)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@dataclass
class Catalog:
    ids: list[str]
    vectors: dict[str, np.ndarray]  # space -> (n, dim)
    payloads: list[dict]

    def records(self, rows: range | list[int] | None = None) -> list[Record]:
        rows = range(len(self.ids)) if rows is None else rows
        return [
            Record(self.ids[i], {s: v[i] for s, v in self.vectors.items()}, dict(self.payloads[i]))
            for i in rows
        ]

    def row(self, product_id: str) -> int:
        return self.ids.index(product_id)


def make_catalog(n: int = N_POINTS, seed: int = 0) -> Catalog:
    rng = np.random.default_rng(seed)
    # Every 7th id is non-ASCII: catalog ids are arbitrary strings and must round-trip.
    ids = [f"商品-{i}-ç🙂" if i % 7 == 0 else f"p{i:04d}" for i in range(n)]
    payloads = [
        {
            "gender": str(rng.choice(GENDERS)),
            "masterCategory": str(rng.choice(MASTER)),
            "subCategory": str(rng.choice(SUB)),
            "articleType": str(rng.choice(ARTICLES)),
            "baseColour": str(rng.choice(COLOURS)),
            "price": round(float(rng.uniform(5, 300)), 2),
            "in_stock": bool(rng.random() < 0.7),
            "title": f"Robe d'été №{i} – 夏のドレス",
        }
        for i in range(n)
    ]
    return Catalog(ids, {s.name: unit_rows(rng, n, s.dim) for s in SPACES}, payloads)


CATALOG = make_catalog()
QUERY_RNG = np.random.default_rng(123)
QUERIES = {s.name: unit_rows(QUERY_RNG, 4, s.dim) for s in SPACES}  # space -> (4, dim)


def exact_ranking(
    cat: Catalog, space: str, query: np.ndarray, filters: Filters | None = None, exclude: tuple = ()
) -> list[tuple[str, float]]:
    """Brute-force reference: every passing point, best first, using Filters.matches semantics."""
    scores = cat.vectors[space] @ query  # (n,)
    keep = [
        i
        for i in range(len(cat.ids))
        if (filters is None or filters.matches(cat.payloads[i])) and cat.ids[i] not in exclude
    ]
    keep.sort(key=lambda i: -scores[i])
    return [(cat.ids[i], float(scores[i])) for i in keep]


def assert_topk(hits: list[Hit], ranking: list[tuple[str, float]], k: int) -> None:
    """Hits equal the exact top-k: same ids (as sets, up to a tie at the cut) and same scores."""
    assert len(hits) == min(k, len(ranking))
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    cut = len(hits)
    # A tie across the cut makes either point a correct answer; compare only what is unambiguous.
    while 0 < cut < len(ranking) and abs(ranking[cut - 1][1] - ranking[cut][1]) < 1e-5:
        cut -= 1
    assert {h.product_id for h in hits[:cut]} == {pid for pid, _ in ranking[:cut]}
    np.testing.assert_allclose(scores, [s for _, s in ranking[: len(hits)]], atol=1e-4)


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> IndexStore:
    if request.param == "edge":
        s = open_store(data_dir=tmp_path / "data")
    else:
        s = open_store(qdrant_url=":memory:")
    yield s
    s.close()


@pytest.fixture
def index(store: IndexStore) -> VectorIndex:
    idx = store.create_collection("products_v1", SPACES)
    idx.upsert(CATALOG.records())
    return idx


# --- search ---------------------------------------------------------------------------------


@pytest.mark.parametrize("space", [s.name for s in SPACES])
def test_search_matches_exact_top_k(index: VectorIndex, space: str) -> None:
    assert index.count() == N_POINTS
    for query in QUERIES[space]:
        assert_topk(index.search(space, query, k=10), exact_ranking(CATALOG, space, query), 10)


def test_point_finds_itself_first(index: VectorIndex) -> None:
    for row in (0, 7, 55, 199):
        hits = index.search("image", CATALOG.vectors["image"][row], k=3)
        assert hits[0].product_id == CATALOG.ids[row]
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        # Hits carry the catalog payload; the id lives in Hit.product_id, not repeated in the payload.
        assert hits[0].payload == CATALOG.payloads[row]


def test_search_returns_the_vectors_asked_for(index: VectorIndex) -> None:
    query = CATALOG.vectors["image"][3]
    plain = index.search("image", query, k=8)
    assert all(h.vectors == {} for h in plain)  # none unless asked: converting them costs time
    hits = index.search("image", query, k=8, filters=Filters(gender=("Women",)), with_vectors=("text",))
    stored = {r.product_id: r for r in index.get([h.product_id for h in hits], with_vectors=True)}
    assert hits and all(set(h.vectors) == {"text"} for h in hits)
    for hit in hits:
        assert hit.vectors["text"].dtype == np.float32
        np.testing.assert_allclose(hit.vectors["text"], stored[hit.product_id].vectors["text"], atol=1e-6)
    assert [h.product_id for h in hits] == [
        h.product_id for h in index.search("image", query, k=8, filters=Filters(gender=("Women",)))
    ]
    with pytest.raises(SchemaMismatchError, match=r"no vector space 'fused'"):
        index.search("image", query, with_vectors=("fused",))
    with pytest.raises(TypeError, match="sequence of space names"):
        index.search("image", query, with_vectors="text")


def test_similarity_scores_listed_products_like_an_exact_search(index: VectorIndex) -> None:
    query = CATALOG.vectors["text"][11]
    listed = [CATALOG.ids[i] for i in (0, 5, 11, 42, 199)] + ["no-such-product"]
    scores = index.similarity("text", query, listed)
    assert set(scores) == set(listed[:-1])  # an unknown product is left out, not an error
    for pid, score in scores.items():
        row = CATALOG.ids.index(pid)
        expected = float(CATALOG.vectors["text"][row] @ query / np.linalg.norm(query))
        assert score == pytest.approx(expected, abs=1e-5)
    assert scores[CATALOG.ids[11]] == pytest.approx(1.0, abs=1e-5)
    assert index.similarity("text", query, []) == {}
    with pytest.raises(SchemaMismatchError, match=r"no vector space 'fused'"):
        index.similarity("fused", query, listed)


FILTER_CASES = {
    "gender": Filters(gender=("Women",)),
    "masterCategory": Filters(masterCategory=("Footwear", "Accessories")),
    "subCategory": Filters(subCategory=("Topwear",)),
    "articleType": Filters(articleType=("Jeans", "Kurtas", "Watches")),
    "baseColour_unicode": Filters(baseColour=("Türkis", "Navy Blue")),
    "min_price": Filters(min_price=120.0),
    "max_price": Filters(max_price=60.0),
    "price_range": Filters(min_price=50.0, max_price=150.0),
    "in_stock": Filters(in_stock=True),
    "out_of_stock": Filters(in_stock=False),
    "combined": Filters(
        gender=("Men", "Unisex"), baseColour=("Black", "White", "Blue"), max_price=200.0, in_stock=True
    ),
    "combined_all": Filters(
        gender=("Women", "Unisex"),
        masterCategory=("Apparel", "Footwear"),
        subCategory=("Topwear", "Shoes", "Bottomwear"),
        articleType=("Tshirts", "Shirts", "Casual Shoes", "Jeans"),
        min_price=20.0,
        in_stock=True,
    ),
}


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_filters_match_reference_semantics(index: VectorIndex, case: str) -> None:
    filters = FILTER_CASES[case]
    matching = [p for p in CATALOG.payloads if filters.matches(p)]
    assert 0 < len(matching) < N_POINTS  # the case really filters
    for space in ("image", "text"):
        for query in QUERIES[space][:2]:
            hits = index.search(space, query, k=10, filters=filters)
            assert all(filters.matches(h.payload) for h in hits)
            assert_topk(hits, exact_ranking(CATALOG, space, query, filters), 10)


def test_filter_with_no_match_and_k_larger_than_matches(index: VectorIndex) -> None:
    assert index.search("image", QUERIES["image"][0], k=5, filters=Filters(gender=("Nobody",))) == []
    narrow = FILTER_CASES["combined_all"]
    ranking = exact_ranking(CATALOG, "image", QUERIES["image"][0], narrow)
    hits = index.search("image", QUERIES["image"][0], k=len(ranking) + 20, filters=narrow)
    assert_topk(hits, ranking, len(ranking) + 20)


def test_exclude_ids(index: VectorIndex) -> None:
    query = CATALOG.vectors["image"][0]
    exclude = (CATALOG.ids[0], CATALOG.ids[1], "not-a-product")
    hits = index.search("image", query, k=10, exclude_ids=exclude)
    assert not {h.product_id for h in hits} & set(exclude)
    assert_topk(hits, exact_ranking(CATALOG, "image", query, exclude=exclude), 10)
    # Exclusions compose with filters.
    flt = Filters(in_stock=True)
    hits = index.search("image", query, k=10, filters=flt, exclude_ids=exclude)
    assert_topk(hits, exact_ranking(CATALOG, "image", query, flt, exclude), 10)


@pytest.mark.parametrize("filters", [None, FILTER_CASES["combined"]])
def test_search_batch_equals_single_searches(index: VectorIndex, filters: Filters | None) -> None:
    queries = QUERIES["text"]  # (4, 16)
    batch = index.search_batch("text", queries, k=7, filters=filters)
    assert len(batch) == len(queries)
    for query, batch_hits in zip(queries, batch, strict=True):
        single = index.search("text", query, k=7, filters=filters)
        assert [h.product_id for h in batch_hits] == [h.product_id for h in single]
        np.testing.assert_allclose([h.score for h in batch_hits], [h.score for h in single], atol=1e-6)


@pytest.mark.filterwarnings("ignore:Local mode performs exact")  # qdrant-client's test double: no HNSW
def test_per_query_hnsw_ef_is_accepted_and_exact_on_small_data(index: VectorIndex) -> None:
    query = QUERIES["text"][0]
    plain = index.search("text", query, k=7)
    assert [h.product_id for h in index.search("text", query, k=7, hnsw_ef=256)] == [
        h.product_id for h in plain
    ]
    batch = index.search_batch("text", QUERIES["text"], k=7, hnsw_ef=256)
    assert [h.product_id for h in batch[0]] == [h.product_id for h in plain]


def test_optimize_keeps_results(index: VectorIndex) -> None:
    query = QUERIES["image"][1]
    before = index.search("image", query, k=10, filters=FILTER_CASES["combined"])
    index.optimize()
    assert index.count() == N_POINTS
    assert index.search("image", query, k=10, filters=FILTER_CASES["combined"]) == before


# --- writes ---------------------------------------------------------------------------------


def test_upsert_is_idempotent_and_latest_payload_wins(index: VectorIndex) -> None:
    index.upsert(CATALOG.records())
    assert index.count() == N_POINTS
    rows = [3, 14, 150]
    changed = CATALOG.records(rows)
    for rec in changed:
        rec.payload = {**rec.payload, "price": 1.25, "title": "nouveau"}
    index.upsert(changed)
    assert index.count() == N_POINTS
    for rec in index.get([CATALOG.ids[i] for i in rows]):
        assert rec.payload["price"] == 1.25 and rec.payload["title"] == "nouveau"
    assert sorted(index.product_ids()) == sorted(CATALOG.ids)


def test_upsert_replaces_vectors(index: VectorIndex) -> None:
    pid = CATALOG.ids[5]
    new_image = CATALOG.vectors["image"][6]
    index.upsert([Record(pid, {"image": new_image, "text": CATALOG.vectors["text"][5]}, CATALOG.payloads[5])])
    (rec,) = index.get([pid], with_vectors=True)
    np.testing.assert_allclose(rec.vectors["image"], new_image, atol=1e-6)


def test_delete(index: VectorIndex) -> None:
    gone = [CATALOG.ids[0], CATALOG.ids[10], CATALOG.ids[20]]
    index.delete(gone + ["never-existed"])
    assert index.count() == N_POINTS - 3
    assert index.get(gone) == []
    assert set(index.product_ids()) == set(CATALOG.ids) - set(gone)
    hits = index.search("image", CATALOG.vectors["image"][0], k=N_POINTS)
    assert not {h.product_id for h in hits} & set(gone)
    assert len(hits) == N_POINTS - 3
    index.delete([])  # a no-op, not an error


def test_set_payload_changes_fields_not_vectors(index: VectorIndex) -> None:
    pid = CATALOG.ids[42]
    (before,) = index.get([pid], with_vectors=True)
    index.set_payload(pid, {"price": 9.99, "in_stock": not before.payload["in_stock"]})
    (after,) = index.get([pid], with_vectors=True)
    assert after.payload == {**before.payload, "price": 9.99, "in_stock": not before.payload["in_stock"]}
    assert set(after.vectors) == {"image", "text"}
    for space in after.vectors:
        np.testing.assert_array_equal(after.vectors[space], before.vectors[space])
    # The payload index sees the change: the point moves between in_stock=True and False.
    query = CATALOG.vectors["image"][42]
    flt = Filters(in_stock=after.payload["in_stock"], max_price=10.0)
    assert index.search("image", query, k=1, filters=flt)[0].product_id == pid


def test_set_payload_errors(index: VectorIndex) -> None:
    with pytest.raises(UnknownProductError, match="nope"):
        index.set_payload("nope", {"price": 1.0})
    with pytest.raises(KeyError):  # UnknownProductError is a KeyError too
        index.set_payload("nope", {"price": 1.0})
    with pytest.raises(ValueError, match="product_id"):
        index.set_payload(CATALOG.ids[1], {"product_id": "other"})


def test_get_keeps_order_and_skips_missing(index: VectorIndex) -> None:
    ask = [CATALOG.ids[9], "missing", CATALOG.ids[0], CATALOG.ids[7]]
    got = index.get(ask, with_vectors=True)
    assert [r.product_id for r in got] == [CATALOG.ids[9], CATALOG.ids[0], CATALOG.ids[7]]
    for rec in got:
        row = CATALOG.row(rec.product_id)
        assert rec.payload == CATALOG.payloads[row]
        for space, vec in rec.vectors.items():
            np.testing.assert_allclose(vec, CATALOG.vectors[space][row], atol=1e-6)
    assert index.get([CATALOG.ids[3]])[0].vectors == {}
    assert index.get([]) == []
    # Named spaces: only those vectors, the same values, the payload as ever.
    space = sorted(CATALOG.vectors)[0]
    (one,) = index.get([CATALOG.ids[9]], with_vectors=[space])
    assert list(one.vectors) == [space] and one.payload == CATALOG.payloads[CATALOG.row(CATALOG.ids[9])]
    np.testing.assert_allclose(
        one.vectors[space], CATALOG.vectors[space][CATALOG.row(CATALOG.ids[9])], atol=1e-6
    )


def test_unicode_ids_and_payloads_round_trip(index: VectorIndex) -> None:
    pid = "Säule/ダ?#&🙂 'x' \"y\""
    payload = {"title": "Ünïcödé ✓ — 長い名前", "baseColour": "Türkis", "price": 12.5, "in_stock": True}
    vec = CATALOG.vectors["image"][3]
    index.upsert([Record(pid, {"image": vec}, payload)])
    (rec,) = index.get([pid])
    assert rec.product_id == pid and rec.payload == payload
    hits = index.search("image", vec, k=1, filters=Filters(baseColour=("Türkis",), max_price=13.0))
    assert hits[0].product_id == pid and hits[0].payload == payload
    assert pid in set(index.product_ids())
    non_ascii = [p for p in CATALOG.ids if not p.isascii()]
    assert {r.product_id for r in index.get(non_ascii)} == set(non_ascii)


def test_numpy_payload_values_are_stored_as_plain_json(index: VectorIndex) -> None:
    pid = CATALOG.ids[11]
    index.set_payload(
        pid, {"price": np.float32(19.5), "in_stock": np.bool_(True), "sizes": np.array([38, 40])}
    )
    (rec,) = index.get([pid])
    assert (
        rec.payload["price"] == 19.5 and rec.payload["in_stock"] is True and rec.payload["sizes"] == [38, 40]
    )


# --- validation at the door -----------------------------------------------------------------


def test_upsert_wrong_dim_names_space_and_both_dims(index: VectorIndex) -> None:
    good = CATALOG.records([0])[0]
    bad = Record("bad", {"image": np.ones(4, dtype=np.float32) / 2, "text": CATALOG.vectors["text"][0]})
    with pytest.raises(SchemaMismatchError) as err:
        index.upsert([good, bad])
    assert "'image'" in str(err.value) and "dim=8" in str(err.value) and "dim=4" in str(err.value)
    assert index.get(["bad"]) == []  # the whole batch is refused before anything is written


def test_upsert_unknown_space(index: VectorIndex) -> None:
    with pytest.raises(SchemaMismatchError, match=r"'audio'.*\['image', 'text'\]"):
        index.upsert([Record("x", {"audio": CATALOG.vectors["image"][0]})])


@pytest.mark.parametrize(
    "vector, message",
    [
        (np.full(8, np.nan, dtype=np.float32), "NaN or inf"),
        (np.array([np.inf] + [0.0] * 7, dtype=np.float32), "NaN or inf"),
        (np.ones(8, dtype=np.float32), "unit norm"),
        (np.zeros(8, dtype=np.float32), "unit norm"),
        (np.eye(8, dtype=np.int64)[0], "float"),
    ],
)
def test_upsert_and_search_reject_bad_values(index: VectorIndex, vector: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidVectorError, match=message) as err:
        index.upsert([CATALOG.records([0])[0], Record("bad-ü", {"image": vector})])
    assert "'image'" in str(err.value)
    if message != "float":
        assert "'bad-ü'" in str(err.value)  # names the product, not a row number
    with pytest.raises(ValueError, match=message):  # InvalidVectorError is a ValueError
        index.search("image", vector)
    assert index.count() == N_POINTS


def test_unit_norm_tolerance(index: VectorIndex) -> None:
    nearly = CATALOG.vectors["image"][0] * np.float32(1.0005)  # within 1e-3 of unit norm
    index.upsert([Record("nearly", {"image": nearly})])
    assert index.search("image", CATALOG.vectors["image"][0], k=2)[0].score == pytest.approx(1.0, abs=1e-5)


def test_search_wrong_dim_and_unknown_space(index: VectorIndex) -> None:
    with pytest.raises(SchemaMismatchError, match=r"'text'.*dim=16.*dim=8"):
        index.search("text", CATALOG.vectors["image"][0])
    with pytest.raises(SchemaMismatchError, match=r"'text'.*dim=16.*dim=8"):
        index.search_batch("text", CATALOG.vectors["image"][:3])
    with pytest.raises(SchemaMismatchError, match=r"'behavior'.*\['image', 'text'\]"):
        index.search("behavior", CATALOG.vectors["image"][0])
    with pytest.raises(ValueError, match="k must be"):
        index.search("image", CATALOG.vectors["image"][0], k=0)


def test_check_spaces_names_both_sides(store: IndexStore, index: VectorIndex) -> None:
    index.check_spaces({s.name: s for s in SPACES})  # matching: no error
    with pytest.raises(SchemaMismatchError) as err:
        index.check_spaces({"image": VectorSpace("image", 8, "img-test/2")})
    assert "img-test/1" in str(err.value) and "img-test/2" in str(err.value)
    with pytest.raises(SchemaMismatchError, match="dim=8.*dim=32"):
        index.check_spaces({"image": VectorSpace("image", 32, "img-test/1")})
    with pytest.raises(SchemaMismatchError, match="no vector space 'fused'"):
        index.check_spaces({"fused": VectorSpace("fused", 8, "x/1")})
    # The spaces (with their encoders) are stored, not just kept in memory by this handle.
    assert store.open_collection("products_v1").spaces == {s.name: s for s in SPACES}


# --- a space added later (room for behavior) ------------------------------------------------

BEHAVIOR = VectorSpace("behavior", 12, "beh-test/1")
BEHAVIOR_VECTORS = unit_rows(np.random.default_rng(7), N_POINTS, BEHAVIOR.dim)  # (n, 12)
# Only half the products get a behavior vector (even rows; they include non-ASCII ids).
FILLED = [i for i in range(N_POINTS) if i % 2 == 0]
FILLED_CATALOG = Catalog(
    [CATALOG.ids[i] for i in FILLED],
    {"behavior": BEHAVIOR_VECTORS[FILLED]},
    [CATALOG.payloads[i] for i in FILLED],
)
BEHAVIOR_QUERIES = unit_rows(np.random.default_rng(8), 3, BEHAVIOR.dim)  # (3, 12)


def behavior_updates(rows: list[int] = FILLED) -> dict[str, dict[str, np.ndarray]]:
    return {CATALOG.ids[i]: {"behavior": BEHAVIOR_VECTORS[i]} for i in rows}


def add_behavior(index: VectorIndex) -> None:
    index.add_space(BEHAVIOR)
    index.update_vectors(behavior_updates())


def assert_records_equal(after: list[Record], before: list[Record]) -> None:
    assert [r.product_id for r in after] == [r.product_id for r in before]
    for a, b in zip(after, before, strict=True):
        assert a.payload == b.payload
        assert set(a.vectors) == set(b.vectors)
        for space in a.vectors:
            np.testing.assert_array_equal(a.vectors[space], b.vectors[space])


def test_added_space_is_searched_only_where_filled(index: VectorIndex) -> None:
    before = index.get(CATALOG.ids, with_vectors=True)
    add_behavior(index)
    assert index.spaces == {**{s.name: s for s in SPACES}, "behavior": BEHAVIOR}
    assert index.count() == N_POINTS
    filled_ids = set(FILLED_CATALOG.ids)
    for query in BEHAVIOR_QUERIES:
        hits = index.search("behavior", query, k=10)
        assert_topk(hits, exact_ranking(FILLED_CATALOG, "behavior", query), 10)
        # Asking for every point still returns only the ones that have a behavior vector.
        everything = index.search("behavior", query, k=N_POINTS)
        assert {h.product_id for h in everything} == filled_ids
    flt = FILTER_CASES["combined"]
    hits = index.search("behavior", BEHAVIOR_QUERIES[0], k=10, filters=flt)
    assert_topk(hits, exact_ranking(FILLED_CATALOG, "behavior", BEHAVIOR_QUERIES[0], flt), 10)
    batch = index.search_batch("behavior", BEHAVIOR_QUERIES, k=5)
    assert [[h.product_id for h in hits] for hits in batch] == [
        [h.product_id for h in index.search("behavior", q, k=5)] for q in BEHAVIOR_QUERIES
    ]
    row = FILLED[3]
    top = index.search("behavior", BEHAVIOR_VECTORS[row], k=1)[0]
    assert top.product_id == CATALOG.ids[row] and top.payload == CATALOG.payloads[row]

    # Image/text vectors and payloads are untouched; get returns only the vectors a point has.
    after = index.get(CATALOG.ids, with_vectors=True)
    for a, b in zip(after, before, strict=True):
        row = CATALOG.row(a.product_id)
        assert a.payload == b.payload == CATALOG.payloads[row]
        if a.product_id in filled_ids:
            assert set(a.vectors) == {"image", "text", "behavior"}
            np.testing.assert_allclose(a.vectors["behavior"], BEHAVIOR_VECTORS[row], atol=1e-6)
        else:
            assert set(a.vectors) == {"image", "text"}
        for space in ("image", "text"):
            np.testing.assert_array_equal(a.vectors[space], b.vectors[space])
    # The old spaces still search every point.
    assert_topk(
        index.search("image", QUERIES["image"][0], k=10),
        exact_ranking(CATALOG, "image", QUERIES["image"][0]),
        10,
    )


def test_update_vectors_replaces_one_space_only(index: VectorIndex) -> None:
    pid = CATALOG.ids[5]
    (before,) = index.get([pid], with_vectors=True)
    index.update_vectors({pid: {"image": CATALOG.vectors["image"][6]}})
    (after,) = index.get([pid], with_vectors=True)
    np.testing.assert_allclose(after.vectors["image"], CATALOG.vectors["image"][6], atol=1e-6)
    np.testing.assert_array_equal(after.vectors["text"], before.vectors["text"])
    assert after.payload == before.payload
    index.update_vectors({})  # a no-op, not an error


def test_add_space_is_idempotent_and_mismatch_names_both(store: IndexStore, index: VectorIndex) -> None:
    add_behavior(index)
    index.add_space(BEHAVIOR)  # identical: a no-op that keeps the vectors
    index.add_space(SPACES[0])  # an original space, identical: also a no-op
    assert index.spaces["behavior"] == BEHAVIOR
    assert len(index.search("behavior", BEHAVIOR_QUERIES[0], k=N_POINTS)) == len(FILLED)
    with pytest.raises(SchemaMismatchError, match=r"'behavior'.*dim=12.*dim=24"):
        index.add_space(VectorSpace("behavior", 24, "beh-test/1"))
    with pytest.raises(SchemaMismatchError) as err:
        index.add_space(VectorSpace("behavior", 12, "beh-test/2"))
    assert "beh-test/1" in str(err.value) and "beh-test/2" in str(err.value)
    with pytest.raises(SchemaMismatchError, match=r"'image'.*dim=8.*dim=12"):
        index.add_space(VectorSpace("image", 12, "img-test/1"))
    with pytest.raises(ValueError, match="dim >= 1"):
        index.add_space(VectorSpace("empty", 0, "x/1"))
    assert index.spaces == {**{s.name: s for s in SPACES}, "behavior": BEHAVIOR}
    # The stored space metadata sees it (a new handle reads it back; edge hands back the open one).
    reopened = store.open_collection("products_v1")
    assert reopened.spaces == index.spaces
    reopened.check_spaces({**{s.name: s for s in SPACES}, "behavior": BEHAVIOR})


def test_drop_space_removes_vectors_and_metadata(store: IndexStore, index: VectorIndex) -> None:
    add_behavior(index)
    index.drop_space("behavior")
    index.drop_space("behavior")  # already gone: a no-op, so a retried drop is safe
    assert "behavior" not in index.spaces
    assert store.open_collection("products_v1").spaces == {s.name: s for s in SPACES}
    assert all(set(r.vectors) == {"image", "text"} for r in index.get(CATALOG.ids, with_vectors=True))
    with pytest.raises(SchemaMismatchError, match="behavior"):
        index.search("behavior", BEHAVIOR_QUERIES[0], k=3)
    add_behavior(index)  # the name can be added again, and fills again
    assert len(index.search("behavior", BEHAVIOR_QUERIES[0], k=N_POINTS)) == len(FILLED)
    index.drop_space("image")
    index.drop_space("behavior")
    with pytest.raises(SchemaMismatchError, match="only vector space"):
        index.drop_space("text")
    assert list(index.spaces) == ["text"]


def test_update_vectors_unknown_product_writes_nothing(
    index: VectorIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small write batches, so the unknown id sits in a later batch than the writes it must prevent.
    monkeypatch.setattr("index.edge.WRITE_BATCH", 16)
    monkeypatch.setattr("index.server.WRITE_BATCH", 16)
    index.add_space(BEHAVIOR)
    updates = {**behavior_updates(), "ghost-ü": {"behavior": BEHAVIOR_VECTORS[1]}}
    with pytest.raises(UnknownProductError, match="ghost-ü") as err:
        index.update_vectors(updates)
    assert isinstance(err.value, KeyError) and "nothing was written" in str(err.value)
    assert index.search("behavior", BEHAVIOR_QUERIES[0], k=N_POINTS) == []
    assert all(set(r.vectors) == {"image", "text"} for r in index.get(CATALOG.ids, with_vectors=True))
    assert index.count() == N_POINTS and "ghost-ü" not in set(index.product_ids())
    index.update_vectors(behavior_updates())  # batched over 16s: every filled point gets its vector
    assert len(index.search("behavior", BEHAVIOR_QUERIES[0], k=N_POINTS)) == len(FILLED)


def test_update_vectors_is_validated_at_the_door(index: VectorIndex) -> None:
    pid = CATALOG.ids[0]
    with pytest.raises(SchemaMismatchError, match=r"'behavior'.*\['image', 'text'\]"):
        index.update_vectors({pid: {"behavior": BEHAVIOR_VECTORS[0]}})  # before add_space
    index.add_space(BEHAVIOR)
    good = behavior_updates([2, 4])
    cases = [
        (SchemaMismatchError, r"'audio'.*\['behavior', 'image', 'text'\]", {"audio": BEHAVIOR_VECTORS[0]}),
        (
            SchemaMismatchError,
            r"'bad-ü'.*'behavior'.*dim=12.*dim=8",
            {"behavior": CATALOG.vectors["image"][0]},
        ),
        (
            InvalidVectorError,
            r"'behavior'.*'bad-ü'.*NaN or inf",
            {"behavior": np.full(12, np.nan, np.float32)},
        ),
        (InvalidVectorError, r"'behavior'.*'bad-ü'.*unit norm", {"behavior": np.ones(12, np.float32)}),
        (InvalidVectorError, r"'bad-ü'.*float", {"behavior": np.eye(12, dtype=np.int64)[0]}),
    ]
    for error, message, bad in cases:
        with pytest.raises(error, match=message):
            index.update_vectors({**good, "bad-ü": bad})
    with pytest.raises(ValueError, match="non-empty"):
        index.update_vectors({pid: {}})
    # Every case was refused before anything was written.
    assert index.search("behavior", BEHAVIOR_QUERIES[0], k=N_POINTS) == []


# --- collections and aliases ----------------------------------------------------------------


def test_collection_lifecycle_errors(store: IndexStore, index: VectorIndex) -> None:
    with pytest.raises(CollectionExistsError, match="products_v1"):
        store.create_collection("products_v1", SPACES)
    with pytest.raises(UnknownCollectionError, match=r"nope.*products_v1"):
        store.open_collection("nope")
    with pytest.raises(UnknownCollectionError):
        store.drop_collection("nope")
    with pytest.raises(ValueError, match="invalid collection name"):
        store.create_collection("../escape", SPACES)
    with pytest.raises(ValueError):
        store.create_collection("empty", [])
    with pytest.raises(ValueError, match="twice"):
        store.create_collection("dup", [SPACES[0], SPACES[0]])
    assert store.list_collections() == ["products_v1"]


def test_alias_create_swap_and_drop(store: IndexStore, index: VectorIndex) -> None:
    v2_spaces = [VectorSpace("image", 8, "img-test/2")]
    v2 = store.create_collection("products_v2", v2_spaces)
    v2.upsert([Record("only-in-v2", {"image": CATALOG.vectors["image"][0]}, {"price": 1.0})])
    assert store.list_collections() == ["products_v1", "products_v2"]

    assert store.get_alias("products") is None
    with pytest.raises(UnknownCollectionError, match="no alias 'products'"):
        store.open("products")
    with pytest.raises(UnknownCollectionError):
        store.set_alias("products", "products_v9")

    store.set_alias("products", "products_v1")
    assert store.get_alias("products") == "products_v1"
    live = store.open("products")
    assert live.name == "products_v1" and live.count() == N_POINTS

    store.set_alias("products", "products_v2")  # the swap
    assert store.get_alias("products") == "products_v2"
    live = store.open("products")
    assert live.name == "products_v2" and live.spaces == {"image": v2_spaces[0]}
    assert live.search("image", CATALOG.vectors["image"][0], k=1)[0].product_id == "only-in-v2"

    with pytest.raises(CollectionAliasedError, match=r"products_v2.*products"):
        store.drop_collection("products_v2")
    store.drop_collection("products_v1")  # no longer aliased: the old version can go
    assert store.list_collections() == ["products_v2"]
    with pytest.raises(UnknownCollectionError):
        store.open_collection("products_v1")


# --- embedded backend only: persistence and single ownership --------------------------------


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_edge_persists_across_close_and_reopen(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EdgeStore(data) as store:
        idx = store.create_collection("products_v1", SPACES)
        idx.upsert(CATALOG.records())
        idx.delete([CATALOG.ids[1]])
        idx.set_payload(CATALOG.ids[2], {"price": 3.5})
        store.set_alias("products", "products_v1")
        query = QUERIES["image"][0]
        before = idx.search("image", query, k=10, filters=Filters(in_stock=True))
        stored = idx.get(CATALOG.ids[:20], with_vectors=True)

    with EdgeStore(data) as store:
        idx = store.open("products")
        assert idx.name == "products_v1" and idx.spaces == {s.name: s for s in SPACES}
        assert idx.count() == N_POINTS - 1
        assert idx.get([CATALOG.ids[2]])[0].payload["price"] == 3.5
        after = idx.get(CATALOG.ids[:20], with_vectors=True)
        assert [r.product_id for r in after] == [r.product_id for r in stored]
        for a, b in zip(after, stored, strict=True):
            assert a.payload == b.payload
            for space in a.vectors:
                np.testing.assert_array_equal(a.vectors[space], b.vectors[space])
        assert idx.search("image", query, k=10, filters=Filters(in_stock=True)) == before


def test_edge_recovers_writes_from_wal_after_a_crash(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EdgeStore(data) as store:
        store.create_collection("c1", SPACES[:1])
    # A process that writes and dies without close() or flush(): the WAL must replay the upsert.
    proc = _run_python(
        f"""
        import os, numpy as np
        from index import EdgeStore, Record
        idx = EdgeStore({str(data)!r}).open_collection("c1")
        v = np.eye(8, dtype=np.float32)
        idx.upsert([Record(f"p{{i}}", {{"image": v[i]}}, {{"price": float(i)}}) for i in range(8)])
        os._exit(0)
        """
    )
    assert proc.returncode == 0, proc.stderr
    with EdgeStore(data) as store:
        idx = store.open_collection("c1")
        assert idx.count() == 8
        assert idx.search("image", np.eye(8, dtype=np.float32)[5], k=1)[0].product_id == "p5"


def test_edge_added_space_persists_across_close_and_reopen(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EdgeStore(data) as store:
        idx = store.create_collection("products_v1", SPACES)
        idx.upsert(CATALOG.records())
        add_behavior(idx)
        before = [idx.search("behavior", q, k=10) for q in BEHAVIOR_QUERIES]
        stored = idx.get(CATALOG.ids, with_vectors=True)
    all_spaces = {**{s.name: s for s in SPACES}, "behavior": BEHAVIOR}
    with EdgeStore(data) as store:
        idx = store.open_collection("products_v1")
        assert idx.spaces == all_spaces
        idx.check_spaces(all_spaces)
        assert [idx.search("behavior", q, k=10) for q in BEHAVIOR_QUERIES] == before
        assert_records_equal(idx.get(CATALOG.ids, with_vectors=True), stored)


def test_edge_added_space_survives_a_crash(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EdgeStore(data) as store:
        store.create_collection("c1", SPACES[:1]).upsert(
            [Record(f"p{i}", {"image": np.eye(8, dtype=np.float32)[i]}) for i in range(8)]
        )
    # add_space + update_vectors, then death without close() or flush(): spaces.json and the WAL hold it.
    proc = _run_python(
        f"""
        import os, numpy as np
        from index import EdgeStore, VectorSpace
        idx = EdgeStore({str(data)!r}).open_collection("c1")
        idx.add_space(VectorSpace("behavior", 4, "beh-test/1"))
        idx.update_vectors({{"p2": {{"behavior": np.eye(4, dtype=np.float32)[1]}}}})
        os._exit(0)
        """
    )
    assert proc.returncode == 0, proc.stderr
    with EdgeStore(data) as store:
        idx = store.open_collection("c1")
        idx.check_spaces({"image": SPACES[0], "behavior": VectorSpace("behavior", 4, "beh-test/1")})
        hits = idx.search("behavior", np.eye(4, dtype=np.float32)[1], k=8)
        assert [h.product_id for h in hits] == ["p2"]
        assert idx.count() == 8


def test_edge_hnsw_on_a_partly_filled_space(tmp_path: Path) -> None:
    with EdgeStore(
        tmp_path / "data", EdgeSettings(full_scan_threshold_kb=1, indexing_threshold_kb=1)
    ) as store:
        idx = store.create_collection("products_v1", SPACES)
        idx.upsert(CATALOG.records())
        add_behavior(idx)
        idx.optimize()
        assert idx.info()["indexed_vectors"] == 2 * N_POINTS + len(FILLED)
        for row in FILLED[::10]:
            hits = idx.search("behavior", BEHAVIOR_VECTORS[row], k=5)
            assert hits[0].product_id == CATALOG.ids[row]
            assert {h.product_id for h in hits} <= set(FILLED_CATALOG.ids)


def test_edge_second_owner_in_process_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    owner = EdgeStore(data)
    owner.create_collection("products_v1", SPACES).upsert(CATALOG.records([0, 1]))
    owner.set_alias("products", "products_v1")
    # The same store hands back its open handle instead of locking itself out.
    assert owner.open("products") is owner.open_collection("products_v1")

    other = EdgeStore(data)
    with pytest.raises(IndexInUseError) as err:
        other.open("products")
    message = str(err.value)
    assert str(data / "collections" / "products_v1") in message and "shopguide serve" in message
    owner.create_collection("products_v0", SPACES)  # open in `owner`, not aliased
    with pytest.raises(IndexInUseError):
        other.drop_collection("products_v0")  # must not delete a folder someone is serving from
    assert "products_v0" in other.list_collections()

    owner.close()
    assert other.open("products").count() == 2  # released on close
    other.close()


def test_edge_second_process_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EdgeStore(data) as owner:
        owner.create_collection("products_v1", SPACES)
        proc = _run_python(
            f"""
            from index import EdgeStore, IndexInUseError
            try:
                EdgeStore({str(data)!r}).open_collection("products_v1")
                print("OPENED")
            except IndexInUseError as exc:
                print("IN_USE", exc)
            """
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("IN_USE"), proc.stdout + proc.stderr
    assert str(data / "collections" / "products_v1") in proc.stdout


def test_edge_hnsw_is_built_and_searched(tmp_path: Path) -> None:
    # Tiny thresholds so 200 points get a real graph (the defaults scan anything under ~10 MB).
    with EdgeStore(
        tmp_path / "data", EdgeSettings(full_scan_threshold_kb=1, indexing_threshold_kb=1)
    ) as store:
        idx = store.create_collection("products_v1", SPACES)
        idx.upsert(CATALOG.records())
        assert idx.info()["indexed_vectors"] == 0
        idx.optimize()
        info = idx.info()
        assert info["indexed_vectors"] == 2 * N_POINTS  # both named vectors are in HNSW
        assert info["payload_indexes"] == sorted(
            ["gender", "masterCategory", "subCategory", "articleType", "baseColour", "price", "in_stock"]
        )
        for row in range(0, N_POINTS, 25):
            assert idx.search("text", CATALOG.vectors["text"][row], k=1)[0].product_id == CATALOG.ids[row]
        flt = FILTER_CASES["combined"]
        hits = idx.search("image", QUERIES["image"][0], k=10, filters=flt)
        assert hits and all(flt.matches(h.payload) for h in hits)


def test_edge_closed_handle_says_so(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "data")
    idx = store.create_collection("c1", SPACES[:1])
    idx.close()
    with pytest.raises(Exception, match="closed"):
        idx.count()
    assert store.open_collection("c1").count() == 0  # reopening after close works
    store.close()


def test_open_store_factory(tmp_path: Path) -> None:
    with open_store(tmp_path / "d") as s:
        assert isinstance(s, EdgeStore)
    from index import ServerStore

    with open_store(qdrant_url=":memory:") as s:
        assert isinstance(s, ServerStore)
    with pytest.raises(ValueError, match="data_dir"):
        open_store()
