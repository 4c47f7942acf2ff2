"""The storefront end to end in real headless Chromium (Playwright, Debian's /usr/bin/chromium) against
the app served by uvicorn on localhost: search, product page, similar modes, clicks, "for you"."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.serving_fixtures import API_KEY, local_backend, shoe_ids, storefront_data_copy

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "storefront"
TIMEOUT_MS = 10_000  # per wait; every step is a DOM condition, never a fixed sleep


@dataclass
class Live:
    base_url: str
    payloads: dict[str, dict]  # product id -> payload
    catalog: Path  # the catalog folder (photos for the photo search)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The app (with an API key, as in production: the browser must do with a visitor token) over the
    tiny catalog plus shoes, served by uvicorn in a background thread on a free localhost port."""
    import uvicorn

    from serving.api import ApiSettings, create_app

    data_dir = storefront_data_copy(tmp_path_factory, "storefront")
    recommender, backend = local_backend(data_dir)
    app = create_app(backend, ApiSettings(api_key=API_KEY))
    # A socket bound here and handed to uvicorn: no window in which another process takes the port.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)  # waiting for a server thread, not for the page
    try:
        payloads = {p["product_id"]: p for p in recommender.payloads()}
        yield Live(f"http://127.0.0.1:{port}", payloads, Path(recommender.manifest["catalog"]))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        recommender.close()


def strip_state(page) -> tuple[list[str], list[str]]:
    """(product ids, shown reasons) of the "for you" strip's cards, in order."""
    cards = page.locator("#for-you .card")
    return cards.evaluate_all("cs => cs.map(c => c.dataset.productId)"), cards.locator(
        ".reason"
    ).all_inner_texts()


def _require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: run `make install` "
            "(it installs Debian's chromium with apt)"
        )


@contextlib.contextmanager
def local_page(outside: list[str]) -> Iterator:
    """A page in headless Chromium that may reach only this machine: any other request is aborted and
    recorded in `outside` (the test asserts it stays empty)."""
    from playwright.sync_api import sync_playwright

    def local_only(route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            context.route("**/*", local_only)
            yield context.new_page()
        finally:
            browser.close()


def test_search_open_click_and_for_you_follows(live: Live) -> None:
    _require_chromium()
    from playwright.sync_api import expect

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    expect.set_options(timeout=TIMEOUT_MS)
    outside: list[str] = []  # requests to anything but this server (there must be none)
    problems: list[str] = []  # console errors and uncaught page errors

    with local_page(outside) as page:
        page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        view = page.locator("#view")
        shots = iter(range(1, 100))

        def shot(name: str) -> None:
            page.screenshot(path=str(ARTIFACTS / f"{next(shots):02d}-{name}.png"), full_page=True)

        def open_product(card) -> str:
            """Click a card; returns its product id once the product page is drawn."""
            product_id = card.get_attribute("data-product-id")
            card.click()
            expect(view).to_have_attribute("data-product-id", product_id)
            expect(view).to_have_attribute("data-state", "ready")
            expect(page.locator(".product h1")).to_have_text(live.payloads[product_id]["title"])
            return product_id

        # 1. The home page: popular products and a cold-start "for you" strip.
        page.goto(f"{live.base_url}/")
        expect(view).to_have_attribute("data-route", "home")
        expect(view).to_have_attribute("data-state", "ready")
        expect(page.locator("#view .grid .card").first).to_be_visible()
        expect(page.locator("#for-you .card").first).to_be_visible()
        expect(page.locator("#filters select[name=baseColour] option[value=Black]")).to_have_count(1)
        cold_ids, cold_reasons = strip_state(page)
        assert cold_reasons and all(re.match(r"^(popular|trending) ", r) for r in cold_reasons), cold_reasons
        page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page
        shot("home")

        # 2. Search "black shoes": typed into the box and submitted.
        page.locator("#search-input").fill("black shoes")
        page.locator("#search-input").press("Enter")
        expect(view).to_have_attribute("data-route", "search")
        expect(view).to_have_attribute("data-state", "ready")
        results = page.locator("#view .grid .card")
        expect(results.first).to_be_visible()
        found = results.evaluate_all("cs => cs.map(c => c.dataset.productId)")
        assert sorted(found, key=int) == shoe_ids("Black"), found  # every black shoe and nothing else
        expect(page.locator(".understood")).to_contain_text("colour Black")
        expect(page.locator(".understood")).to_contain_text("Shoes")
        shot("search-black-shoes")

        # 3. Open the first result: its page, with similar items, in the order the API ranked.
        with page.expect_response(lambda r: "/page?" in r.url) as answered:
            first = open_product(results.first)
        ranked = [m["name"] for m in answered.value.json()["modules"]]
        similar = page.locator("section[data-module=similar]")
        expect(similar.locator(".card").first).to_be_visible()
        assert similar.locator(".card").count() == 8
        shown = page.locator("[data-role=modules] > [data-module]")
        assert shown.evaluate_all("ms => ms.map(m => m.dataset.module)") == ranked
        assert live.payloads[first]["baseColour"] == "Black"
        shot("product")

        # 4. Similar by look only, then back to look and description.
        for mode in ("image", "fused"):
            similar.locator(f".modes button[data-mode={mode}]").click()
            expect(similar).to_have_attribute("data-mode", mode)
            expect(similar).to_have_attribute("data-state", "ready")
            expect(similar.locator(f".modes button[data-mode={mode}]")).to_have_attribute(
                "aria-pressed", "true"
            )
            expect(similar.locator(".card").first).to_be_visible()
            if mode == "image":
                shot("similar-by-image")

        # 5. Two clicks on other products: one from this page's "for you", one from the next page's
        # similar items. Each opens that product's page.
        for_you = page.locator("#for-you")
        expect(for_you.locator(".card").first).to_be_visible()
        before_ids, _ = strip_state(page)
        second = open_product(for_you.locator(f".card:not([data-product-id='{first}'])").first)
        shot("clicked-first")
        others = f":not([data-product-id='{first}']):not([data-product-id='{second}'])"
        third = open_product(page.locator(f"section[data-module=similar] .card{others}").first)
        assert len({first, second, third}) == 3
        shot("clicked-second")

        # 6. Home again (no reload): the strip has changed and says which visit each pick follows.
        drawn = page.locator("#for-you").get_attribute("data-version")
        page.locator("a.brand").click()
        expect(view).to_have_attribute("data-route", "home")
        expect(view).to_have_attribute("data-state", "ready")
        # The strip is re-fetched for the home page (not the last product page's module, moved up).
        expect(page.locator("#for-you")).not_to_have_attribute("data-version", drawn)
        expect(page.locator("#for-you-slot > #for-you")).to_be_visible()
        titles = [live.payloads[pid]["title"] for pid in (first, second, third)]
        follows = re.compile("|".join(re.escape(title) for title in titles))
        expect(page.locator("#for-you .reason").filter(has_text=follows).first).to_be_visible()
        after_ids, after_reasons = strip_state(page)
        assert after_ids != before_ids and after_ids != cold_ids, (before_ids, after_ids)
        assert {second, third}.isdisjoint(after_ids)  # what was just seen is not recommended back
        assert any(r.startswith("similar to ") and follows.search(r) for r in after_reasons), after_reasons
        shot("home-for-you-changed")

        assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
        expect(page.locator("#status")).to_be_hidden()
        visitor = page.evaluate("JSON.parse(localStorage.getItem('shopguide.visitor'))")

    # The server has the visitor's events, in order, with clicks attributed to the responses shown.
    import httpx

    events = httpx.get(f"{live.base_url}/users/{visitor['visitor_id']}/events").json()["events"][::-1]
    assert [(e["type"], e.get("product_id")) for e in events] == [
        ("search", None),
        ("click", first),
        ("view", first),
        ("click", second),
        ("view", second),
        ("click", third),
        ("view", third),
    ]
    assert all(e["request_id"] for e in events if e["type"] == "click")
    assert outside == [], f"the storefront tried to reach other hosts: {outside}"
    assert problems == [], problems


def test_filters_photo_search_and_cart_without_reload(live: Live) -> None:
    """The storefront's other controls: filters narrow the grid, a photo finds its product, and adding
    to the cart updates the page's "for you" in place."""
    _require_chromium()
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    outside: list[str] = []

    def grid_ids(page) -> list[str]:
        return page.locator("#view .grid .card").evaluate_all("cs => cs.map(c => c.dataset.productId)")

    with local_page(outside) as page:
        view = page.locator("#view")
        page.goto(f"{live.base_url}/#/search?q=black+shoes")
        expect(view).to_have_attribute("data-state", "ready")
        page.evaluate("window.__sameDocument = true")

        # A filter from the menu narrows the grid and shows up in the URL and in "understood".
        page.locator("#filters select[name=gender]").select_option("Women")
        expect(page).to_have_url(re.compile(r"gender=Women"))
        expect(view).to_have_attribute("data-state", "ready")
        expect(page.locator(".understood")).to_contain_text("gender Women")
        women = [pid for pid in shoe_ids("Black") if live.payloads[pid]["gender"] == "Women"]
        expect(page.locator("#view .grid .card")).to_have_count(len(women))
        assert sorted(grid_ids(page), key=int) == women
        page.locator("#filters input[name=max_price]").fill("80")
        page.locator("#filters input[name=max_price]").press("Enter")
        expect(page).to_have_url(re.compile(r"max_price=80"))
        cheap = [pid for pid in women if live.payloads[pid]["price"] <= 80]
        expect(page.locator("#view .grid .card")).to_have_count(len(cheap))
        assert sorted(grid_ids(page), key=int) == cheap
        page.screenshot(path=str(ARTIFACTS / "10-filters.png"), full_page=True)
        page.locator("#filters button[type=reset]").click()
        expect(page.locator("#view .grid .card")).to_have_count(len(shoe_ids("Black")))

        # A photo of a product finds that product (or its identical twin) first.
        target = shoe_ids("Brown")[0]
        page.locator("#photo-input").set_input_files(str(live.catalog / "images" / f"{target}.jpg"))
        expect(view).to_have_attribute("data-route", "photo")
        expect(view).to_have_attribute("data-state", "ready")
        photo = live.catalog / "images" / f"{target}.jpg"
        twins = {
            pid
            for pid in live.payloads
            if (live.catalog / "images" / f"{pid}.jpg").read_bytes() == photo.read_bytes()
        }
        assert grid_ids(page)[0] in twins, (grid_ids(page)[:3], twins)
        page.screenshot(path=str(ARTIFACTS / "11-photo-search.png"), full_page=True)

        # Add to cart: the page's "for you" module is re-fetched in place.
        page.locator("#view .grid .card").first.click()
        expect(view).to_have_attribute("data-route", "product")
        expect(view).to_have_attribute("data-state", "ready")
        version = page.locator("#for-you").get_attribute("data-version")
        page.locator("button.add-to-cart").click()
        expect(page.locator("button.add-to-cart")).to_have_text("In your cart")
        expect(page.locator("#for-you")).not_to_have_attribute("data-version", version)
        expect(page.locator("[data-role=modules] #for-you .card").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "12-added-to-cart.png"), full_page=True)
        assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
        expect(page.locator("#status")).to_be_hidden()
    assert outside == [], f"the storefront tried to reach other hosts: {outside}"
