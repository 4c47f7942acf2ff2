"""Catalog loader for the `products.csv` + `images/<id>.jpg` format, with per-product error reports."""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The shared datasets folder: $SHOPGUIDE_DATASETS, else ../shared/datasets beside the checkout.
DATASETS_DIR = Path(
    os.environ.get("SHOPGUIDE_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)
DEFAULT_CATALOG = DATASETS_DIR / "fashion-catalog"

REQUIRED_COLUMNS = ("id", "productDisplayName")
ATTRIBUTE_COLUMNS = (
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
)
MISSING = {"", "na", "n/a", "nan", "null", "none"}

# Typical price (in the catalog's currency) by masterCategory; derived prices scatter around these.
BASE_PRICE = {
    "Apparel": 40.0,
    "Accessories": 35.0,
    "Footwear": 70.0,
    "Personal Care": 15.0,
    "Free Items": 5.0,
    "Sporting Goods": 30.0,
    "Home": 25.0,
}
IN_STOCK_RATE = 0.85  # share of products derived as in stock


@dataclass(frozen=True)
class Product:
    """One catalog product. Attribute values are None when missing in the source."""

    id: str
    title: str
    image_path: Path
    price: float
    in_stock: bool
    gender: str | None = None
    masterCategory: str | None = None  # noqa: N815 - catalog column names, kept verbatim
    subCategory: str | None = None  # noqa: N815
    articleType: str | None = None  # noqa: N815
    baseColour: str | None = None  # noqa: N815
    season: str | None = None
    year: int | None = None
    usage: str | None = None

    def payload(self) -> dict:
        """The fields stored beside the vectors in the index (filters work on these)."""
        out = {"title": self.title, "price": self.price, "in_stock": self.in_stock}
        for col in ATTRIBUTE_COLUMNS:
            value = getattr(self, col)
            if value is not None:
                out[col] = value
        return out

    def document(self) -> str:
        """The product's text for the text encoder: title plus the attributes a shopper searches by."""
        attrs = [self.gender, self.baseColour, self.articleType, self.subCategory, self.usage]
        return f"{self.title}. " + " ".join(a for a in attrs if a)


@dataclass(frozen=True)
class Skipped:
    """A product that could not be used, and why (reported, never fatal)."""

    product_id: str  # "<row N>" when the row has no usable id
    reason: str


@dataclass
class Catalog:
    """The usable products (in file order) and the ones skipped with reasons."""

    root: Path
    products: list[Product]
    skipped: list[Skipped] = field(default_factory=list)

    def by_id(self) -> dict[str, Product]:
        return {p.id: p for p in self.products}


def _unit_hash(seed: int, product_id: str, salt: str) -> float:
    """A uniform number in [0, 1) from (seed, product id, salt): stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}:{salt}:{product_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def derive_price(product_id: str, master_category: str | None, seed: int = 0) -> float:
    """Deterministic price: BASE_PRICE[masterCategory] x a log-normal factor (sigma 0.5) from a hash.

    The source catalog has no prices; this makes price filters testable. Same (seed, id) -> same price.
    """
    u1 = max(_unit_hash(seed, product_id, "price-a"), 1e-12)
    u2 = _unit_hash(seed, product_id, "price-b")
    normal = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)  # Box-Muller
    base = BASE_PRICE.get(master_category or "", 30.0)
    return round(max(1.0, base * math.exp(0.5 * normal)), 2)


def derive_in_stock(product_id: str, seed: int = 0) -> bool:
    """Deterministic stock flag: in stock with probability IN_STOCK_RATE, from a hash of (seed, id)."""
    return _unit_hash(seed, product_id, "stock") < IN_STOCK_RATE


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in MISSING else value


def _parse_bool(value: str) -> bool | None:
    v = value.strip().lower()
    if v in {"1", "true", "yes", "y", "t"}:
        return True
    if v in {"0", "false", "no", "n", "f"}:
        return False
    return None


def iter_rows(csv_path: Path) -> Iterator[tuple[int, dict[str, str | None] | None, str | None]]:
    """(line number, row, error) for each data row; a malformed row yields an error, not an exception."""
    with csv_path.open(newline="", encoding="utf-8-sig", errors="strict") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            return
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing required column(s) {missing}; header is {header}")
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                yield reader.line_num, None, f"malformed row: {exc}"
                continue
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                yield reader.line_num, None, f"malformed row: {len(values)} fields, header has {len(header)}"
                continue
            yield reader.line_num, dict(zip(header, values, strict=True)), None


def load_catalog(root: str | Path = DEFAULT_CATALOG, limit: int | None = None, seed: int = 0) -> Catalog:
    """Read `root/products.csv` and check `root/images/<id>.jpg`; bad products go to `skipped`.

    `price` and `in_stock` columns are used when present and valid; otherwise they are derived from
    `seed` (see derive_price / derive_in_stock). `limit` keeps the first N usable products.
    """
    root = Path(root)
    csv_path = root / "products.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"no products.csv in {root} (expected the catalog format in README.md)")
    products: list[Product] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for line, row, error in iter_rows(csv_path):
        if limit is not None and len(products) >= limit:
            break
        if error is not None:
            skipped.append(Skipped(f"<line {line}>", error))
            continue
        pid = _clean(row.get("id"))
        if pid is None:
            skipped.append(Skipped(f"<line {line}>", "empty id"))
            continue
        if pid in seen:
            skipped.append(Skipped(pid, f"duplicate id (line {line}); the first row is kept"))
            continue
        title = _clean(row.get("productDisplayName"))
        if title is None:
            skipped.append(Skipped(pid, "empty title"))
            continue
        image_path = root / "images" / f"{pid}.jpg"
        if not image_path.is_file():
            skipped.append(Skipped(pid, f"missing image {image_path.name}"))
            continue
        if image_path.stat().st_size == 0:
            skipped.append(Skipped(pid, f"empty image file {image_path.name}"))
            continue
        attrs = {col: _clean(row.get(col)) for col in ATTRIBUTE_COLUMNS}
        year = attrs.pop("year")
        try:
            year_int = int(float(year)) if year is not None else None
        except ValueError:
            year_int = None  # a bad optional field is treated as missing, like NA
        price = derive_price(pid, attrs["masterCategory"], seed)
        raw_price = _clean(row.get("price"))
        if raw_price is not None:
            try:
                price = float(raw_price)
                if not math.isfinite(price) or price < 0:
                    raise ValueError
            except ValueError:
                skipped.append(Skipped(pid, f"bad price {raw_price!r}"))
                continue
        in_stock = derive_in_stock(pid, seed)
        raw_stock = _clean(row.get("in_stock"))
        if raw_stock is not None:
            parsed = _parse_bool(raw_stock)
            if parsed is None:
                skipped.append(Skipped(pid, f"bad in_stock {raw_stock!r} (use true/false)"))
                continue
            in_stock = parsed
        seen.add(pid)
        products.append(
            Product(
                id=pid,
                title=title,
                image_path=image_path,
                price=price,
                in_stock=in_stock,
                year=year_int,
                **attrs,
            )
        )
    return Catalog(root=root, products=products, skipped=skipped)
