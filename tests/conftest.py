"""Shared fixtures: a tiny generated catalog (photos drawn with PIL) and the real dataset path."""

from __future__ import annotations

import csv
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from training.catalog import DATASETS_DIR  # noqa: E402 - after the offline switches

DATASETS = DATASETS_DIR
FASHION = DATASETS / "fashion-catalog"
# Ports for the servers tests start: below the kernel's ephemeral range (32768-60999 by default), where
# Ray's GCS, raylet and agents take theirs by binding port 0, and above Ray's worker range (10002-19999).
# A port picked in the ephemeral range was free when picked and could be Ray's by the time the proxy
# bound it ("Failed to bind to address", seen in CI).
SERVER_PORTS = (20000, 32000)
_GIVEN_PORTS: set[int] = set()  # never the same port twice: callers bind theirs only later


def free_port() -> int:
    """A free TCP port on 127.0.0.1 in SERVER_PORTS, for a server a test starts."""
    for _ in range(200):
        port = random.randint(*SERVER_PORTS)
        if port in _GIVEN_PORTS:
            continue
        _GIVEN_PORTS.add(port)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken: try another
                continue
            return port
    raise RuntimeError(f"no free port in {SERVER_PORTS} after 200 tries")


HEADER = [
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
]
COLOURS = {"Red": (220, 30, 30), "Blue": (30, 60, 220), "Green": (30, 160, 60)}
# articleType -> (masterCategory, subCategory, shape drawn on the photo)
ARTICLES = {
    "Handbags": ("Accessories", "Bags", "square"),
    "Watches": ("Accessories", "Watches", "circle"),
    "Tshirts": ("Apparel", "Topwear", "triangle"),
}


def run_killed_on_third_upsert(body: str) -> subprocess.CompletedProcess:
    """Run `body` (Python, with Path, EdgeStore and training.ingest imported) in a child process whose
    third index upsert batch (of 16 points) kills it with SIGKILL: a crash mid-write, for real."""
    prelude = textwrap.dedent("""
        import os, signal
        from pathlib import Path
        import training.ingest
        from index import EdgeStore
        from index.edge import EdgeIndex
        training.ingest.UPSERT_BATCH = 16
        real, calls = EdgeIndex.upsert, []
        def upsert(self, records):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, records)
        EdgeIndex.upsert = upsert
    """)
    script = prelude + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def draw_product(path: Path, colour: tuple[int, int, int], shape: str, jitter: int) -> None:
    """A 96x128 'product photo': a coloured shape on white, slightly moved per product."""
    image = Image.new("RGB", (96, 128), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x0, y0 = 18 + jitter, 30 + jitter
    box = (x0, y0, x0 + 56, y0 + 56)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(x0 + 28, y0), (x0, y0 + 56), (x0 + 56, y0 + 56)], fill=colour)
    image.save(path, quality=90)


def make_catalog(root: Path, per_combo: int = 4, extra_rows: list[list[str]] | None = None) -> Path:
    """Write products.csv + images/ for every (colour, article, gender) combination."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    pid = 100
    for colour, rgb in COLOURS.items():
        for article, (master, sub, shape) in ARTICLES.items():
            for gender in ("Men", "Women"):
                for j in range(per_combo):
                    pid += 1
                    draw_product(root / "images" / f"{pid}.jpg", rgb, shape, jitter=j * 3)
                    rows.append(
                        [
                            str(pid),
                            gender,
                            master,
                            sub,
                            article,
                            colour,
                            "Summer",
                            "2012",
                            "Casual",
                            f"Brand{j} {gender} {colour} {article[:-1]}",
                        ]
                    )
    with (root / "products.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(rows + (extra_rows or []))
    return root


@pytest.fixture
def tiny_catalog(tmp_path: Path) -> Path:
    """72 products: 3 colours x 3 article types x 2 genders x 4."""
    return make_catalog(tmp_path / "catalog")


@pytest.fixture
def fashion_catalog() -> Path:
    if not (FASHION / "products.csv").is_file():
        pytest.skip(f"real dataset not found at {FASHION} (set SHOPGUIDE_DATASETS to its parent folder)")
    return FASHION
