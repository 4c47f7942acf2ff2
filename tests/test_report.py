"""`shopguide report`: every section from small generated inputs, and a clear page when inputs are missing."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index import EdgeStore, Record, VectorSpace
from serving.cli import main
from tests.bench.bench_serve import latency_histogram
from training.report import check_loop_rows, pca_2d, write_simulate_loop

CATEGORIES = {"Apparel": ("Tshirts", "Shirts"), "Footwear": ("Casual Shoes",), "Accessories": ("Watches",)}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _catalog_eval() -> dict:
    return {
        "catalog": "tiny",
        "products": 72,
        "heldout_products": 14,
        "attribute_queries": 5,
        "encoders": {"image": "efficientnet_lite0/1", "text": "minilm_l6_v2/1"},
        "similar_p10_articleType": {
            "random": 0.0671,
            "raw_cnn": 0.7614,
            "raw_title": 0.8217,
            "image": 0.8054,
            "text": 0.9027,
            "fused": 0.9161,
        },
        "similar_p10_subCategory": {
            "random": 0.2495,
            "raw_cnn": 0.9314,
            "raw_title": 0.9315,
            "image": 0.9474,
            "text": 0.9784,
            "fused": 0.9823,
        },
        "title_to_image_r10_by_mode": {"random": 0.0042, "image": 0.6655},
        "attribute_query_p10_by_mode": {"image": 0.6063, "text": 0.9478, "fused": 0.9436},
    }


def _questions_eval() -> dict:
    return {
        "catalog": "tiny",
        "products": 72,
        "question_p10": {
            "combos": 5,
            "questions": 10,
            "template": 0.944,
            "by_template": {
                "do you have {colour} {article} for {gender}?": {
                    "raw": 0.71,
                    "parsed": 0.998,
                    "rewritten": 0.93,
                },
                "show me {gender_poss} {colour} {article} please": {
                    "raw": 0.78,
                    "parsed": 0.996,
                    "rewritten": 0.94,
                },
            },
            "raw": 0.7461,
            "parsed": 0.9971,
            "rewritten": 0.9335,
            "parsed_exact_filters": 0.989,
        },
        "head_nouns": {"questions": 0},
    }


def _sequence_eval() -> dict:
    def row(hr10: float) -> dict:
        return {"HR@5": hr10 * 0.7, "NDCG@5": hr10 * 0.5, "HR@10": hr10, "NDCG@10": hr10 * 0.58,
                "HR@20": hr10 * 1.4, "NDCG@20": hr10 * 0.68}  # fmt: skip

    return {
        "dataset_name": "Beauty",
        "model": "data/seq/beauty",
        "users": 22363,
        "items": 12101,
        "protocol": "leave-one-out",
        "index_recall_at_10": 0.991,
        "index_recall_users": 1000,
        "rows": {"GRU (ours)": row(0.0769), "item-CF": row(0.0640), "popularity": row(0.0130)},
        "published": {
            "S3-Rec": {
                "HR@5": 0.0387,
                "NDCG@5": 0.0244,
                "HR@10": 0.0647,
                "NDCG@10": 0.0327,
                "HR@20": 0.0994,
                "NDCG@20": 0.0414,
            },
            "BERT4Rec": {
                "HR@5": None,
                "NDCG@5": None,
                "HR@10": 0.0347,
                "NDCG@10": 0.0170,
                "HR@20": None,
                "NDCG@20": None,
            },
        },  # fmt: skip
    }


def _loop_rows() -> list[dict]:
    rows = []
    for strategy, ctr, gini in (("popularity", 0.02, 0.9), ("gru", 0.05, 0.6)):
        for day in range(7):
            rows.append(
                {
                    "strategy": strategy,
                    "day": day,
                    "ctr": round(ctr + 0.002 * day, 4),
                    "cvr": 0.1,
                    "coverage": 0.05 if strategy == "popularity" else 0.3,
                    "gini": gini,
                }
            )
    return rows


def _serve_bench(with_histograms: bool) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for endpoint, median in (("similar", 12.0), ("feed", 18.0), ("image_search", 55.0)):
        for concurrency in (1, 8):
            ms = rng.lognormal(np.log(median * concurrency**0.8), 0.25, size=200)  # (200,)
            row = {
                "endpoint": endpoint,
                "concurrency": concurrency,
                "requests": 200,
                "errors": 0,
                "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2),
                "throughput_rps": 76.0 if endpoint == "similar" and concurrency == 1 else 50.0,
                "throughput_vs_healthz": 0.747,
            }
            if with_histograms:
                row["histogram_ms"] = latency_histogram(ms)
            rows.append(row)
    return {"benchmark": "serve", "when": "2026-11-29T17:35:44", "machine": {"cpus": 2},
            "server": "ray serve", "index": {"products": 11433}, "rows": rows,
            "targets": {"similar_p99_target_ms": 20}}  # fmt: skip


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _make_index(data_dir: Path, products: int = 60) -> None:
    """A tiny embedded index: fused vectors clustered by masterCategory, behind the `products` alias."""
    rng = np.random.default_rng(0)
    centres = {master: rng.normal(size=8) * 3 for master in CATEGORIES}
    records = []
    for i in range(products):
        master = list(CATEGORIES)[i % len(CATEGORIES)]
        article = CATEGORIES[master][i % len(CATEGORIES[master])]
        vector = _unit(centres[master] + rng.normal(size=8))
        records.append(Record(f"p{i}", {"fused": vector}, {"masterCategory": master, "articleType": article}))
    store = EdgeStore(data_dir / "index")
    try:
        index = store.create_collection("products_t", [VectorSpace("fused", 8, "test/1")])
        index.upsert(records)
        store.set_alias("products", "products_t")
    finally:
        store.close()


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    results, bench, data = tmp_path / "results", tmp_path / "bench-results", tmp_path / "data"
    _write_json(results / "eval.json", _catalog_eval())
    _write_json(results / "questions.json", _questions_eval())
    _write_json(results / "seq_beauty.json", _sequence_eval())
    write_simulate_loop(results / "simulate_loop.json", _loop_rows(), seed=0, shoppers=50)
    _write_json(bench / "serve.json", _serve_bench(with_histograms=True))
    _make_index(data)
    return {"results": results, "bench": bench, "data": data, "out": tmp_path / "report"}


def _run(paths: dict[str, Path], *extra: str) -> int:
    return main(
        ["report", "--out", str(paths["out"]), "--results", str(paths["results"]),
         "--bench-results", str(paths["bench"]), "--data-dir", str(paths["data"]), *extra]
    )  # fmt: skip


def _section(page: str, anchor: str) -> str:
    """The HTML of one section, from its heading to the next one, with entities unescaped."""
    start = page.index(f'<h2 id="{anchor}">')
    end = page.find("<h2 ", start + 1)
    return html.unescape(page[start : end if end > 0 else None])


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_report_with_every_input(inputs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert _run(inputs) == 0
    console = capsys.readouterr().out
    assert "report: catalog quality" in console and "wrote" in console and "0 missing input(s)" in console
    page = (inputs["out"] / "index.html").read_text(encoding="utf-8")

    # Every <img> is a relative PNG in the report folder, and a valid one; nothing external.
    images = re.findall(r'<img src="([^"]+)"', page)
    assert set(images) == {
        "catalog_quality.png",
        "sequences_seq_beauty.png",
        "simulator_curves.png",
        "latency_serve.png",
        "product_map.png",
    }
    for name in images:
        _assert_png(inputs["out"] / name)
    assert "http://" not in page and "https://" not in page and "<script" not in page

    assert "None: every section had its input." in page
    catalog = _section(page, "catalog")
    assert "<b>0.916</b>" in catalog and "0.761" in catalog and "<b>0.665</b>" in catalog  # best per row bold
    assert "<b>0.948</b>" in catalog and "0.944" in catalog  # attribute queries: text beats fused
    assert "Shopper questions" in catalog and "<b>0.997</b>" in catalog and "98.9%" in catalog
    sequences = _section(page, "sequences")
    assert "Beauty" in sequences and "<b>0.0769</b>" in sequences and "S3-Rec (S3-Rec paper)" in sequences
    assert "0.0647" in sequences and "0.9910" in sequences  # published row, index recall
    simulator = _section(page, "simulator")
    assert "popularity" in simulator and "<b>0.056</b>" in simulator  # gru's mean CTR, the best
    assert "<b>0.600</b>" in simulator and "shoppers 50" in simulator  # lowest Gini is best
    latency = _section(page, "latency")
    assert "image_search" in latency and "76.0" in latency and "predates" not in latency
    product_map = _section(page, "map")
    assert "60 of 60 products" in product_map and "products_t" in product_map
    inputs_list = _section(page, "inputs")
    for path in (
        "eval.json",
        "questions.json",
        "seq_beauty.json",
        "simulate_loop.json",
        "serve.json",
        "index",
    ):
        assert path in inputs_list


def test_report_without_inputs_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = {"results": tmp_path / "none", "bench": tmp_path / "none", "data": tmp_path / "none"}
    paths["out"] = tmp_path / "report"
    assert _run(paths) == 0
    assert "missing:" in capsys.readouterr().out
    page = (paths["out"] / "index.html").read_text(encoding="utf-8")
    expected = {
        "catalog": ("shopguide eval catalog", "shopguide eval questions"),
        "sequences": ("shopguide eval sequences",),
        "simulator": ("shopguide simulate loop", "make loop"),
        "latency": ("make bench", "serve.json"),
        "map": ("shopguide ingest", "alias `products`"),
    }
    missing_list = _section(page, "missing")
    for anchor, phrases in expected.items():
        section = _section(page, anchor)
        assert "Missing:" in section, anchor
        for phrase in phrases:
            assert phrase in section and phrase in missing_list, (anchor, phrase)
    assert "<img" not in page and list(paths["out"].glob("*.png")) == []
    assert not (tmp_path / "none").exists()  # looking for the index did not create one


def test_an_index_in_use_and_an_old_benchmark_are_stated(inputs: dict[str, Path]) -> None:
    _write_json(inputs["bench"] / "serve.json", _serve_bench(with_histograms=False))
    owner = EdgeStore(inputs["data"] / "index")
    owner.open("products")  # this store holds the shard's lock, like a running `shopguide serve`
    try:
        assert _run(inputs) == 0
    finally:
        owner.close()
    page = (inputs["out"] / "index.html").read_text(encoding="utf-8")
    product_map = _section(page, "map")
    assert "in use by another process" in product_map and "run the report again" in product_map
    latency = _section(page, "latency")
    assert "predates them" in latency and "76.0" in latency  # the table is still there
    assert not (inputs["out"] / "product_map.png").exists()


def test_unreadable_inputs_cost_their_section_only(inputs: dict[str, Path]) -> None:
    (inputs["results"] / "eval.json").write_text("{not json")
    _write_json(inputs["results"] / "questions.json", {"catalog": "tiny"})  # an older or foreign file
    _write_json(inputs["results"] / "simulate_loop.json", {"rows": [{"strategy": "gru", "day": 0}]})
    assert _run(inputs) == 0
    page = (inputs["out"] / "index.html").read_text(encoding="utf-8")
    catalog = _section(page, "catalog")
    assert "is unreadable" in catalog and "KeyError" in catalog
    assert "lacks ['ctr', 'cvr', 'coverage', 'gini']" in _section(page, "simulator")
    assert "<b>0.0769</b>" in _section(page, "sequences")  # the other sections are whole


def test_an_unwritable_output_folder_is_an_error(
    inputs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    inputs["out"].write_text("a file, not a folder")
    assert _run(inputs) == 2
    assert "cannot write the report to" in capsys.readouterr().err


def test_map_subsamples_with_a_fixed_seed(inputs: dict[str, Path]) -> None:
    assert _run(inputs, "--map-points", "25") == 0
    first = _section((inputs["out"] / "index.html").read_text(encoding="utf-8"), "map")
    assert "25 of 60 products" in first and "seed 0" in first
    assert _run(inputs, "--map-points", "25") == 0
    assert _section((inputs["out"] / "index.html").read_text(encoding="utf-8"), "map") == first


def test_simulate_loop_rows_are_checked() -> None:
    rows = _loop_rows()
    assert check_loop_rows(rows) is rows
    with pytest.raises(ValueError, match=r"row 0: ctr must be a number in \[0, 1\], got 1.5"):
        check_loop_rows([{**rows[0], "ctr": 1.5}])
    with pytest.raises(ValueError, match="a second row for strategy 'popularity' day 0"):
        check_loop_rows([rows[0], rows[0]])
    with pytest.raises(ValueError, match="day must be an int"):
        check_loop_rows([{**rows[0], "day": "monday"}])


def test_pca_finds_the_direction_of_largest_variance() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(500, 3)) * np.array([10.0, 1.0, 0.1])  # (500, 3), spread mostly along x
    projected, explained = pca_2d(points)
    assert projected.shape == (500, 2)
    assert abs(np.corrcoef(projected[:, 0], points[:, 0])[0, 1]) > 0.99
    assert explained[0] > 0.95 and explained.sum() <= 1.0
