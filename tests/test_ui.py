"""`prvr ui` in front of a real TorchServe (token auth on, the tiny model): its JSON routes over
HTTP, the page in a real headless Chromium (Debian's chromium + chromium-driver through
Selenium), the CLI's refusals, and the demo's short pipeline output with the page's hint.

    PRVR_UI_SCREENSHOT=docs/img/ui.png pytest tests/test_ui.py -k browser   # the README's picture
"""
# No `from __future__ import annotations` here: kfp reads the component's annotations as types.
import contextlib
import fnmatch
import io
import json
import os
import shutil
import threading
import time
import tomllib
from pathlib import Path
from typing import Iterator

import pytest
import requests
import uvicorn

from prvr.cli.app import main as prvr_main
from prvr.client import ApiError, Client, SearchResponse
from prvr.config import default_config
from prvr.demo import pipeline_log, print_ui_hint
from prvr.server import free_port
from prvr.ui import STATIC, create_app
from test_serving import start_serving

REPO = Path(__file__).resolve().parent.parent
SERVE = default_config().serve
CHROMIUM = os.environ.get("PRVR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("PRVR_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
TOP_K = 5


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """The app on uvicorn, on a free loopback port, in a thread of this process."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, text_encoder):
    ts = start_serving(tmp_path_factory, "ts-ui", text_encoder)
    yield ts
    ts.stop()


@pytest.fixture(scope="module")
def api(server):
    with Client(server.inference_url, key_file=server.workdir / "key_file.json") as client:
        yield client


@pytest.fixture(scope="module")
def ui(server):
    """The app as `prvr ui` builds it: the key read from key_file.json (renewed keys followed)."""
    client = Client(server.inference_url, key_file=server.workdir / "key_file.json")
    with running(create_app(client, top_k=TOP_K)) as url:
        yield url


def _refusal(api: Client, body: dict) -> ApiError:
    with pytest.raises(ApiError) as err:
        api.request(body)
    return err.value


# ----------------------------------------------------------------------------- the JSON routes
@pytest.mark.integration
def test_search_route_answers_what_the_api_answers(ui, api):
    r = requests.post(f"{ui}/api/search", json={"query": "a man opens the fridge", "top_k": 3, "alpha": 0.4},
                      timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()["answer"]
    direct = api.search("a man opens the fridge", top_k=3, alpha=0.4)
    assert (answer["model_version"], answer["corpus_size"], answer["top_k"], answer["alpha"]) == \
        (direct.model_version, direct.corpus_size, 3, 0.4)
    hits = answer["results"][0]["hits"]
    assert [h["video_id"] for h in hits] == [h.video_id for h in direct.hits]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in direct.hits], abs=1e-5)
    assert set(answer["timing"]["stages_ms"]) == {"parse", "encode", "score"}
    assert requests.get(f"{ui}/api/info", timeout=10).json() == {"endpoint": api.endpoint, "top_k": TOP_K}


@pytest.mark.integration
@pytest.mark.parametrize("body", [{"query": ""}, {"query": "x", "top_k": 0},
                                  {"query": "x" * (SERVE.max_query_chars + 1)}, {"query": 7},
                                  {"query": "x", "alpha": 2}])
def test_search_route_passes_the_apis_refusal_through(ui, api, body):
    expected = _refusal(api, body)
    r = requests.post(f"{ui}/api/search", json=body, timeout=30)
    assert r.status_code == expected.status == 400
    assert r.json() == {"error": {"status": 400, "kind": "bad_request", "message": expected.message}}


@pytest.mark.integration
@pytest.mark.parametrize("data,message", [(b'{"query": ', "invalid JSON"), (b'{"query": "x", "k": 1}', "only"),
                                          (b'["x"]', "JSON object")])
def test_search_route_refuses_what_the_page_never_sends(ui, data, message):
    r = requests.post(f"{ui}/api/search", data=data, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["kind"] == "ui_bad_request"
    assert message in r.json()["error"]["message"]


@pytest.mark.integration
def test_the_key_never_reaches_the_page(server, ui):
    key = server.keys()["inference"]
    seen = [requests.get(f"{ui}{path}", timeout=10) for path in ("/", "/static/ui.js", "/static/ui.css", "/api/info")]
    seen.append(requests.post(f"{ui}/api/search", json={"query": "a man"}, timeout=30))
    seen.append(requests.post(f"{ui}/api/search", json={"query": ""}, timeout=30))
    assert [r.status_code for r in seen] == [200, 200, 200, 200, 200, 400]
    assert seen[0].headers["content-type"].startswith("text/html") and "<title>prvr" in seen[0].text
    for r in seen:
        assert key not in r.text and "Bearer" not in r.text and "Bearer" not in str(r.headers)


@pytest.mark.integration
def test_a_refused_key_and_an_unreachable_api_are_a_502(server):
    with running(create_app(Client(server.inference_url, key="not-the-key"))) as url:
        r = requests.post(f"{url}/api/search", json={"query": "a man"}, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["kind"] == "InvalidKeyException"
    assert "refused this UI's key" in r.json()["error"]["message"]
    nowhere = f"http://127.0.0.1:{free_port()}"
    with running(create_app(Client(nowhere, retries=0))) as url:
        r = requests.post(f"{url}/api/search", json={"query": "a man"}, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["kind"] == "unreachable"
    assert nowhere in r.json()["error"]["message"]


@pytest.mark.integration
def test_the_ui_follows_a_renewed_key(server):
    """TorchServe's keys expire; its token API writes a new one into key_file.json, and the UI
    (reading the key from that file) keeps answering without a restart."""
    key_file = server.workdir / "key_file.json"
    with running(create_app(Client(server.inference_url, key_file=key_file))) as url:
        assert requests.post(f"{url}/api/search", json={"query": "a man"}, timeout=30).status_code == 200
        old = server.keys()["inference"]
        api_key = json.loads(key_file.read_text())["API"]["key"]
        renew = requests.get(f"{server.management_url}/token", params={"type": "inference"},
                             headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        assert renew.status_code == 200 and server.keys()["inference"] != old
        r = requests.post(f"{url}/api/search", json={"query": "a man"}, timeout=30)
        assert r.status_code == 200, r.text
    stale = requests.post(f"{server.inference_url}/predictions/prvr", json={"query": "a man"},
                          headers={"Authorization": f"Bearer {old}"}, timeout=30)
    assert stale.status_code == 400 and stale.json()["type"] == "InvalidKeyException"


def test_the_page_ships_as_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["prvr"]
    files = sorted(p.relative_to(STATIC.parent).as_posix() for p in STATIC.iterdir())
    assert files == ["ui_static/index.html", "ui_static/ui.css", "ui_static/ui.js"]
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)
    page = (STATIC / "index.html").read_text()
    assert '<script src="/static/ui.js">' in page and "innerHTML" not in (STATIC / "ui.js").read_text()


def test_cli_names_a_missing_key_file(tmp_path, capsys):
    assert prvr_main(["ui", "--workdir", str(tmp_path), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "key_file.json") in err and "prvr serve" in err
    assert prvr_main(["ui", "--serve", str(tmp_path / "nope.mar")]) == 2
    assert "no such archive" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real browser
@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1440,900", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


RECT = "const r = arguments[0].getBoundingClientRect(); return [r.left, r.width];"


def _wait(driver, condition, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def _column(driver, index: int, state: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    def ready(d):
        cols = d.find_elements(By.CSS_SELECTOR, "#columns .column")
        return cols[index] if len(cols) > index and cols[index].get_attribute("data-state") == state else False

    try:
        return _wait(driver, ready)
    except TimeoutException:
        cols = driver.find_elements(By.CSS_SELECTOR, "#columns .column")
        seen = [(c.get_attribute("data-state"), c.find_element(By.CLASS_NAME, "error").text) for c in cols]
        raise AssertionError(f"column {index} never reached {state!r}; columns (state, error): {seen}") from None


def _check_rows(driver, column, expected: SearchResponse) -> None:
    """Rows, scores and bars against the REST answer; each highlight's place on its timeline."""
    from selenium.webdriver.common.by import By

    rows = column.find_elements(By.CSS_SELECTOR, "li.row")
    assert [r.get_attribute("data-video-id") for r in rows] == [h.video_id for h in expected.hits]
    assert [r.find_element(By.CLASS_NAME, "rank").text for r in rows] == [str(i) for i in range(1, TOP_K + 1)]
    scale = max(max(abs(h.clip_score), abs(h.frame_score)) for h in expected.hits)
    for row, hit in zip(rows, expected.hits):
        shown = float(row.get_attribute("data-score"))
        assert shown == pytest.approx(hit.score, abs=1e-5)
        assert row.find_element(By.CLASS_NAME, "score").text == f"{shown:.4f}"
        for part, value in (("clip", hit.clip_score), ("frame", hit.frame_score)):
            bar = row.find_element(By.CSS_SELECTOR, f".bar.{part}")
            fill = bar.find_element(By.TAG_NAME, "span")
            (_, bar_w), (_, fill_w) = driver.execute_script(RECT, bar), driver.execute_script(RECT, fill)
            assert fill_w / bar_w == pytest.approx(abs(value) / scale, abs=1.5 / bar_w)
            assert ("negative" in fill.get_attribute("class")) == (value < 0)
        extent = hit.duration                 # the whole video's length, in the moment's unit
        assert hit.moment.unit == "seconds" and 0 <= hit.moment.start < hit.moment.end <= extent
        assert float(row.get_attribute("data-extent")) == extent
        assert row.find_element(By.CLASS_NAME, "title").text == hit.title
        track_left, track_w = driver.execute_script(RECT, row.find_element(By.CLASS_NAME, "timeline"))
        left, width = driver.execute_script(RECT, row.find_element(By.CLASS_NAME, "moment"))
        assert (left - track_left) / track_w == pytest.approx(hit.moment.start / extent, abs=1.0 / track_w)
        assert width == pytest.approx(max(track_w * (hit.moment.end - hit.moment.start) / extent, 2.0), abs=1.0)
        assert row.find_element(By.CLASS_NAME, "moment-label").text == \
            f"{hit.moment.start:.2f}–{hit.moment.end:.2f} s"


def _shift_enter(driver, box) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(driver).click(box).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()


@pytest.mark.integration
def test_search_compare_and_errors_in_a_browser(ui, api, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    q1, q2 = "a man opens the fridge", "a dog runs across the park"
    browser.get(ui)
    _wait(browser, lambda d: d.find_element(By.ID, "top-k").get_attribute("value") == str(TOP_K))
    assert api.endpoint in browser.find_element(By.ID, "endpoint").text
    box = browser.find_element(By.ID, "query")
    box.send_keys(q1, Keys.ENTER)
    first = _column(browser, 0, "done")
    _check_rows(browser, first, api.search(q1, top_k=TOP_K))
    assert first.find_element(By.CLASS_NAME, "column-query").text == q1

    box.clear()
    box.send_keys(q2)
    _shift_enter(browser, box)                                   # compare: a second column
    second = _column(browser, 1, "done")
    _check_rows(browser, second, api.search(q2, top_k=TOP_K))
    assert "current" in second.get_attribute("class") and "current" not in first.get_attribute("class")
    footer = browser.find_element(By.TAG_NAME, "footer").text
    assert "model v0001" in footer and "corpus 30 videos" in footer and "ms round trip" in footer
    assert "encode" in footer and "Server-Timing" in footer
    picture = os.environ.get("PRVR_UI_SCREENSHOT")
    if picture:                                                  # the README's picture, on request
        browser.save_screenshot(str(Path(picture).resolve()))

    box.clear()
    box.send_keys(Keys.ENTER)                                    # empty: the API's refusal, in place
    _column(browser, 1, "error")
    expected = _refusal(api, {"query": "", "top_k": TOP_K})
    error = second.find_element(By.CLASS_NAME, "error")
    assert error.is_displayed() and error.text == f"400 · bad_request\n{expected.message}"
    assert second.find_elements(By.CSS_SELECTOR, "li.row") == []

    long = "x" * (SERVE.max_query_chars + 1)
    browser.execute_script("arguments[0].value = arguments[1];", box, long)
    _shift_enter(browser, box)
    third = _column(browser, 2, "error")
    expected = _refusal(api, {"query": long, "top_k": TOP_K})
    assert third.find_element(By.CLASS_NAME, "error").text == f"400 · bad_request\n{expected.message}"
    assert first.get_attribute("data-state") == "done" and len(first.find_elements(By.CSS_SELECTOR, "li.row")) == 5
    shot = tmp_path / "ui.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


# ----------------------------------------------------------------------------- the demo's output
@pytest.mark.integration
def test_pipeline_output_goes_to_a_log_with_one_line_per_step(tmp_path):
    import kfp.local
    from kfp import dsl

    @dsl.component(base_image="python:3.11")
    def chatty(text: str) -> str:
        print("executor chatter " * 20)
        return text + "!"

    @dsl.pipeline(name="two-steps")
    def two_steps(text: str = "hi") -> str:
        return chatty(text=chatty(text=text).output).output

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    shown = io.StringIO()
    with pipeline_log(tmp_path / "logs" / "run.log", out=shown) as steps:
        result = two_steps()
    assert result.output == "hi!!"
    lines = shown.getvalue().splitlines()
    assert [s[0] for s in steps.steps] == ["chatty", "chatty-2"] and [s[2] for s in steps.steps] == ["SUCCESS"] * 2
    assert len(lines) == 2 and lines[0].split()[:2] == ["1.", "chatty"] and lines[1].endswith("s  SUCCESS")
    log = (tmp_path / "logs" / "run.log").read_text()
    assert "executor chatter" in log and "Executing task" in log and "executor chatter" not in shown.getvalue()


def test_the_demo_ends_with_the_pages_address(capsys):
    print_ui_hint()
    out = capsys.readouterr().out
    assert "`make ui`" in out and out.rstrip().endswith("http://127.0.0.1:8000/")
    make = (REPO / "Makefile").read_text()
    assert "\nui: $(STAMP)\n" in make and "prvr ui --serve" in make
