"""The search page in a real browser: uvicorn on loopback, headless Debian Chromium driven by Playwright
types a query (and uploads an image), and the result images are loaded on the page."""
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import expect, sync_playwright

from test_search import train_tiny, write_manifest
from vlp.search.index import build_index
from vlp.search.server import create_app

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian chromium is not installed at "
                                "/usr/bin/chromium (apt-get install -y chromium; .ci/run installs it)")
FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]      # Playwright adds --headless, --no-sandbox
RESULTS = 24                                                    # the page asks for 24 results by default


@pytest.fixture(scope="module")
def server(emoji_tiny, tmp_path_factory):
    """-> (base URL, request paths the server saw, index folder); uvicorn runs in a thread until the end."""
    tmp = tmp_path_factory.mktemp("browser")
    ckpt = train_tiny(emoji_tiny, tmp / "run")
    build_index(ckpt, write_manifest(emoji_tiny, tmp / "data"), tmp / "idx", progress=False)
    app, seen = create_app(tmp / "idx"), []

    @app.middleware("http")
    async def record(request, call_next):
        seen.append(request.url.path)
        return await call_next(request)

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen, tmp / "idx"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)   # a fresh temporary profile
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(15_000)
    page.goto(server[0])
    yield page
    page.close()


def loaded_images(page) -> int:
    """How many result thumbnails the browser has fetched and decoded."""
    return page.eval_on_selector_all(".card.result img", "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")


@pytest.mark.parametrize("query", ["grinning face", "红色的心"])
def test_typed_query_shows_result_images(page, server, tmp_path, query):
    _, seen, _ = server
    seen.clear()
    page.locator("#q").press_sequentially(query)                 # key by key, as a person types
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text(f"{RESULTS} results for “{query}”")
    expect(page.locator(".card.result")).to_have_count(RESULTS)
    page.wait_for_function(f"document.querySelectorAll('.card.result img').length === {RESULTS} && "
                           "[...document.querySelectorAll('.card.result img')].every(i => i.complete)")
    assert loaded_images(page) == RESULTS
    assert "/api/search" in seen and sum(p.startswith("/thumbs/") for p in seen) >= RESULTS
    naturals = page.eval_on_selector_all(".card.result img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(naturals) == RESULTS and min(naturals) > 0
    scores = [float(s) for s in page.locator(".card.result .score span:last-child").all_text_contents()]
    assert scores == sorted(scores, reverse=True)
    # the page shows what the API ranks first: same image, its English caption and its code point
    top = httpx.get(f"{server[0]}/api/search", params={"q": query, "k": RESULTS}).json()["results"][0]
    first = page.locator(".card.result").first
    assert first.locator(".cap").first.inner_text() == top["captions"][0]
    assert top["hex"] in first.locator(".tags").inner_text()
    assert first.locator("img").get_attribute("src") == top["thumbnail"]
    shot = tmp_path / "search.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000                        # thumbnails drawn, not a blank page


def test_image_upload_finds_the_image_and_captions(page, server):
    _, _, index = server
    first = (index / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[0]
    image = Path(json.loads(first)["image"])
    page.locator("#file").set_input_files(str(image))
    expect(page.locator("#status")).to_contain_text(f"{RESULTS} results for {image.name}")
    expect(page.locator(".card.result").first.locator(".score")).to_contain_text("1.000")
    expect(page.locator("#captions li")).to_have_count(RESULTS)
    page.wait_for_function("[...document.querySelectorAll('.card.result img')].every(i => i.complete)")
    assert loaded_images(page) == RESULTS


def test_bad_query_shows_the_servers_message(page):
    page.locator("#q").fill("x" * 300)
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_contain_text("the limit is 256")
    expect(page.locator(".card.result")).to_have_count(0)
