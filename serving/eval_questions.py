"""Attribute queries phrased as shoppers' questions: P@10 of the raw question vs. parsed filters + query."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from index import KEYWORD_FIELDS
from serving.query import QueryParser, singular
from training.catalog import Product, load_catalog
from training.evaluate import attribute_precision, attribute_queries, topk_exact

# {colour} {article} are lower-case catalog values; {article_one} the singular ("formal shoe");
# {article_typo} two letters swapped in its longest word ("formal sheos"), a one-edit typo;
# {gender_word} "men"; {gender_poss} "men's"; {price} a bound above every target product's price, so
# the price phrase is measured without changing the target set (the same question without it is
# measured too).
TEMPLATES = (
    "do you have {colour} {article} for {gender_word}?",
    "show me {gender_poss} {colour} {article} please",
    "i'm looking for a {colour} {article_one} for {gender_word} under {price}",
    "i'm looking for a {colour} {article_one} for {gender_word}",
    "any {colour} {article} for {gender_word} in stock?",
    "do you have {colour} {article_typo} for {gender_word}?",
)
HEAD_TEMPLATE = "do you have {colour} {head} for {gender_word}?"
HEAD_POLICIES = ("family", "category", "semantic")

EncodeQuery = Callable[[list[str]], np.ndarray]  # texts -> (n, d) unit query vectors


def _gender_words(gender: str) -> tuple[str, str]:
    word = gender.lower()
    if word in ("men", "women"):
        return word, f"{word}'s"
    return word, (f"{word}'" if word.endswith("s") else word)


def _phrase(article: str) -> str:
    """'Formal Shoes' -> 'formal shoe': the singular a shopper types after "a"."""
    words = article.lower().split()
    return " ".join([*words[:-1], singular(words[-1])]) if words else ""


def _typo(article: str) -> str:
    """'Formal Shoes' -> 'formal sheos': two neighbouring letters of the longest word swapped."""
    words = article.lower().split()
    longest = max(range(len(words)), key=lambda j: len(words[j]))
    word = words[longest]
    for i in range(len(word) // 2, len(word)):
        if 0 < i and word[i - 1] != word[i] and word[i - 1].isalpha() and word[i].isalpha():
            words[longest] = word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
            break
    return " ".join(words)


def _nice_bound(price: float) -> int:
    """The next round number at or above `price` (a bound a shopper would type)."""
    step = 10 if price < 200 else 100 if price < 2000 else 1000
    return int(math.ceil(price / step) * step)


class PayloadColumns:
    """Payload fields as arrays, so one filter dict becomes a boolean mask over all products at once."""

    def __init__(self, payloads: Sequence[dict]) -> None:
        self.keyword = {
            f: np.array([p.get(f) for p in payloads], dtype=object) for f in KEYWORD_FIELDS
        }  # field -> (n,) values, None where missing
        self.price = np.array(
            [p["price"] if isinstance(p.get("price"), (int, float)) else np.nan for p in payloads], float
        )  # (n,)

    def mask(self, filters: dict) -> np.ndarray:
        """(n,) bool: which payloads pass `filters` with index.Filters semantics (lists any-of, AND
        across fields, a missing field or price fails a filter on it)."""
        keep = np.ones(len(self.price), bool)
        for fld, column in self.keyword.items():
            wanted = filters.get(fld)
            if wanted:
                keep &= np.isin(column, list(wanted))
        with np.errstate(invalid="ignore"):  # nan prices fail both bounds, as a missing price does
            if filters.get("min_price") is not None:
                keep &= self.price >= filters["min_price"]
            if filters.get("max_price") is not None:
                keep &= self.price <= filters["max_price"]
        return keep


def filtered_topk(query_vectors: np.ndarray, candidates: np.ndarray, masks: np.ndarray, k: int) -> np.ndarray:
    """(n_queries, k) indices of the best candidates passing each query's mask; -1 where fewer pass."""
    scores = query_vectors @ candidates.T  # (n_queries, n_candidates)
    scores = np.where(masks, scores, -np.inf)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(part, order, axis=1)
    return np.where(np.take_along_axis(masks, top, axis=1), top, -1)


def parsed_hits(
    questions: Sequence[str],
    relevant: np.ndarray,
    vectors: np.ndarray,
    encode_query: EncodeQuery,
    parser: QueryParser,
    columns: PayloadColumns,
    k: int = 10,
    apply_filters: bool = True,
) -> tuple[np.ndarray, list]:
    """(n_questions,) P@k of parse -> filter -> rank the remainder, and the parses.

    relevant: (n_questions, n_products) bool. apply_filters=False ranks the rewritten query over every
    product: how much of the gain is the rewrite alone."""
    understood = [parser.parse(q) for q in questions]
    # An empty remainder with no filters means nothing was understood: rank the question itself.
    texts = [u.query or q for u, q in zip(understood, questions, strict=True)]
    if apply_filters:
        masks = np.stack([columns.mask(u.filters) for u in understood])  # (n_questions, n_products)
    else:
        masks = np.ones(relevant.shape, bool)
    top = filtered_topk(encode_query(texts), vectors, masks, k)
    hits = np.where(top >= 0, np.take_along_axis(relevant, np.maximum(top, 0), axis=1), False)
    return hits.mean(axis=1), understood


def raw_hits(
    questions: Sequence[str],
    relevant: np.ndarray,
    vectors: np.ndarray,
    encode_query: EncodeQuery,
    k: int = 10,
) -> np.ndarray:
    """(n_questions,) P@k of each question embedded as is over every product (no parsing)."""
    top = topk_exact(encode_query(list(questions)), vectors, k)
    return np.take_along_axis(relevant, top, axis=1).mean(axis=1)


def question_precision(
    products: Sequence[Product],
    vectors: np.ndarray,
    encode_query: EncodeQuery,
    parser: QueryParser,
    k: int = 10,
    templates: Sequence[str] = TEMPLATES,
) -> dict:
    """P@k of attribute combinations asked as questions, raw vs. parsed, plus the template baseline.

    products / vectors: (n, d) unit rows aligned with `products` (the fused vectors in the report).
    A result is relevant when it has the combination's colour, gender and articleType (the same
    relevance as training.evaluate.attribute_precision)."""
    combos = [combo for _, combo in attribute_queries(products)]
    keys = np.array([f"{p.baseColour}|{p.gender}|{p.articleType}" for p in products])
    prices = np.array([p.price for p in products])
    columns = PayloadColumns([p.payload() for p in products])
    result: dict = {"combos": len(combos), "questions": 0, "by_template": {}}
    if not combos:
        return {**result, "raw": float("nan"), "parsed": float("nan"), "template": float("nan")}
    relevant = np.stack([keys == "|".join(c) for c in combos])  # (n_combos, n_products)
    phrases = [" ".join(c) for c in combos]
    result["template"] = attribute_precision(encode_query(phrases), combos, vectors, products, k)
    per_template = []
    exact = 0
    for template in templates:
        questions = []
        for (colour, gender, article), rel in zip(combos, relevant, strict=True):
            gender_word, gender_poss = _gender_words(gender)
            questions.append(
                template.format(
                    colour=colour.lower(),
                    article=article.lower(),
                    article_one=_phrase(article),
                    article_typo=_typo(article),
                    gender_word=gender_word,
                    gender_poss=gender_poss,
                    price=_nice_bound(float(prices[rel].max())),
                )
            )
        raw = raw_hits(questions, relevant, vectors, encode_query, k).mean()
        parsed, understood = parsed_hits(questions, relevant, vectors, encode_query, parser, columns, k)
        rewritten, _ = parsed_hits(
            questions, relevant, vectors, encode_query, parser, columns, k, apply_filters=False
        )
        exact += sum(
            u.filters.get("baseColour") == [c]
            and u.filters.get("gender") == [g]
            and u.filters.get("articleType") == [a]
            for u, (c, g, a) in zip(understood, combos, strict=True)
        )
        row = {"raw": float(raw), "parsed": float(parsed.mean()), "rewritten": float(rewritten.mean())}
        result["by_template"][template] = {**row, "example": questions[0]}
        per_template.append(row)
    result["questions"] = len(combos) * len(templates)
    # every template asks the same combinations: plain means over templates
    for name in ("raw", "parsed", "rewritten"):
        result[name] = float(np.mean([row[name] for row in per_template]))
    result["parsed_exact_filters"] = exact / result["questions"]  # share parsed to exactly the combo
    return result


def article_families(products: Sequence[Product]) -> dict[str, set[str]]:
    """Head noun -> the >= 2 multi-word articleTypes ending in it ("shoes" -> Casual/Formal/Sports Shoes)."""
    heads: dict[str, set[str]] = defaultdict(set)
    for article in {p.articleType for p in products if p.articleType}:
        words = article.lower().split()
        if len(words) >= 2:
            heads[words[-1]].add(article)
    return {head: arts for head, arts in heads.items() if len(arts) >= 2}


def head_noun_precision(
    products: Sequence[Product], vectors: np.ndarray, encode_query: EncodeQuery, k: int = 10
) -> dict:
    """P@k of "{colour} shoes for {gender}"-style questions under each QueryParser head_nouns policy.

    Asked for (colour, gender, family) with >= 10 products of the family ("shoes": Casual / Formal /
    Sports Shoes). What a bare "shoes" should find is a judgement, so two relevances are reported:
    "family" (colour, gender and an articleType of the family) and "subCategory" (colour, gender and
    the subCategory holding most of the family, e.g. Shoes, which also has Heels and Flats)."""
    families = article_families(products)
    family_of = {art: head for head, arts in families.items() for art in arts}
    counts = Counter(
        (p.baseColour, p.gender, family_of[p.articleType])
        for p in products
        if p.baseColour and p.gender and p.articleType in family_of
    )
    asks = sorted(c for c, n in counts.items() if n >= 10)
    result: dict = {"questions": len(asks), "heads": dict(Counter(h for _, _, h in asks))}
    if not asks:
        return result
    sub_of = {
        head: Counter(p.subCategory for p in products if p.articleType in arts).most_common(1)[0][0]
        for head, arts in families.items()
    }
    colour_gender = np.array([f"{p.baseColour}|{p.gender}" for p in products])
    family = np.array([family_of.get(p.articleType or "", "") for p in products])
    sub = np.array([p.subCategory or "" for p in products])
    relevances = {
        "family": np.stack([(colour_gender == f"{c}|{g}") & (family == h) for c, g, h in asks]),
        "subCategory": np.stack([(colour_gender == f"{c}|{g}") & (sub == sub_of[h]) for c, g, h in asks]),
    }
    questions = [
        HEAD_TEMPLATE.format(colour=c.lower(), head=h, gender_word=_gender_words(g)[0]) for c, g, h in asks
    ]
    result["example"] = questions[0]
    heads = np.array([h for _, _, h in asks])
    payloads = [p.payload() for p in products]
    columns = PayloadColumns(payloads)
    parsers = {policy: QueryParser.from_payloads(payloads, head_nouns=policy) for policy in HEAD_POLICIES}
    for name, relevant in relevances.items():
        per_question = {"raw": raw_hits(questions, relevant, vectors, encode_query, k)}
        for policy, parser in parsers.items():
            per_question[policy], _ = parsed_hits(
                questions, relevant, vectors, encode_query, parser, columns, k
            )
        result[f"relevant_{name}"] = {
            **{m: float(v.mean()) for m, v in per_question.items()},
            "by_head": {
                h: {m: float(v[heads == h].mean()) for m, v in per_question.items()}
                for h in sorted(set(heads))
            },
        }
    return result


def run_question_eval(
    catalog_dir: Path, data_dir: Path, limit: int | None = None, progress: bool = False
) -> dict:
    """Question P@10 on a catalog with the default encoders and the eval alignment heads.

    Reuses training.eval_catalog's heads file (keyed by the training ids), so after `shopguide eval
    catalog` it trains nothing and the embedding cache in `data_dir` makes it a minute or two.
    Returns {"question_p10": {"raw", "parsed", "template", "questions", ...}, "head_nouns": {...}}."""
    # training.eval_catalog owns the heads-file key; recomputing it here could silently drift.
    from training.eval_catalog import _eval_heads_file
    from training.vectors import EncoderConfig, Towers, build_product_vectors

    towers = Towers(EncoderConfig())
    catalog = load_catalog(catalog_dir, limit=limit)
    heads_file = _eval_heads_file(data_dir, [p.id for p in catalog.products])
    vectors = build_product_vectors(catalog, data_dir, towers, progress=progress, heads_file=heads_file)

    def encode_query(texts: list[str]) -> np.ndarray:
        return vectors.heads.project_texts(towers.text.encode_texts(texts))

    parser = QueryParser.from_payloads(p.payload() for p in vectors.products)
    return {
        "catalog": str(catalog_dir),
        "products": len(vectors.products),
        "question_p10": question_precision(vectors.products, vectors.fused, encode_query, parser),
        "head_nouns": head_noun_precision(vectors.products, vectors.fused, encode_query),
    }


def print_question_table(result: dict) -> None:
    """The question metrics as a small table (fused vectors)."""
    q = result["question_p10"]
    print(
        f"catalog {result['catalog']}: {result['products']} products, {q['questions']} questions "
        f"({q['combos']} attribute combinations)"
    )
    columns = ("raw", "rewritten", "parsed")
    print(f"{'P@10 (fused)':<74}" + "".join(f"{c:>10}" for c in columns))
    print(f"{'template baseline: {colour} {gender} {articleType}':<74}{q['template']:>10.4f}")
    for template, row in q["by_template"].items():
        print(f"{template:<74}" + "".join(f"{row[c]:>10.4f}" for c in columns))
    print(f"{'all questions':<74}" + "".join(f"{q[c]:>10.4f}" for c in columns))
    print("rewritten: the parsed query without its filters; parsed: filters + parsed query")
    h = result["head_nouns"]
    if h.get("questions"):
        print(f"bare head nouns ({h['questions']} questions, e.g. {h['example']!r}), by head_nouns policy:")
        for name in ("family", "subCategory"):
            row = h[f"relevant_{name}"]
            print(
                f"  relevant = {name:<12}" + ", ".join(f"{m} {row[m]:.4f}" for m in ("raw", *HEAD_POLICIES))
            )
