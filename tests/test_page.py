"""The chat page (mpitpi/static/chat.*) in a real headless Chromium, driven by selenium through
the system chromedriver, against a 2-rank server on a tiny model started with --api-key: the
key, the settings, a streamed answer equal to the API's, the spinner, Stop, Regenerate,
markdown with model HTML escaped, conversations kept across reloads, switching and deleting
them, a wrong key."""
import json
import os
import shutil
import time
import urllib.request
from urllib.parse import quote

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from test_server import Server

KEY = "page-test-key"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"   # Debian's (.ci/run)
# a chat template for the tiny test model, whose tokenizer has none
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
MARKDOWN = ("Some **bold** text and `inline` code.\n\n```python\nprint(1 < 2)\n```\n\n"
            "<script>window.pwned = 1</script>\n\n"
            "An <img src=x onerror=\"window.pwned = 2\"> and [a link](javascript:window.pwned=3)."
            "\n\n![leak](http://127.0.0.1:9/leak.png)")


@pytest.fixture(scope="module")
def server(textmodel, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatmodel")
    shutil.copytree(textmodel[0], folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    s = Server(2, ["--api-key", KEY], model=str(folder))
    yield s
    s.kill()


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.path.exists(path), (f"{path} is missing. Fix: apt-get install chromium "
                                      f"chromium-driver (.ci/run does)")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1100,800"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield d
    d.quit()


def wait(browser, until, timeout: float = 30):
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda d: until())


def find(browser, css: str) -> list:
    return browser.find_elements(By.CSS_SELECTOR, css)


def page(browser, server, storage: dict | None = None) -> None:
    """Open the page with localStorage holding exactly ``storage``."""
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear(); for (const [k, v] of Object.entries("
                           "arguments[0])) localStorage.setItem(k, v);", storage or {})
    browser.refresh()
    wait(browser, lambda: browser.execute_script("return document.readyState") == "complete")


def stored(browser) -> list[dict]:
    return json.loads(browser.execute_script(
        "return localStorage.getItem('mpitpi.conversations') || '[]'"))


def idle(browser) -> bool:
    return browser.find_element(By.ID, "stop").get_attribute("disabled") is not None


def ask(browser, text: str) -> None:
    """Send ``text`` and wait until its answer (or error) is complete."""
    before = len(find(browser, ".msg.assistant .meta, .msg.error"))
    browser.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
    wait(browser, lambda: len(find(browser, ".msg.assistant .meta, .msg.error")) > before
         and idle(browser))


def test_static_files_are_an_allow_list_served_without_the_key(server):
    status, headers, body = server.exchange("GET", "/static/chat.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"/v1/chat/completions" in body
    status, headers, _ = server.exchange("GET", "/static/chat.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    for path in ("/static/VENDORED.md", "/static/../server.py", "/static/%2e%2e/server.py",
                 "/static/", "/static/chat.html/x"):
        assert server.request("GET", path)[0] == 404, path
    assert server.request("GET", "/v1/models")[0] == 401


def test_the_key_a_streamed_answer_regenerate_and_a_reload(server, browser):
    page(browser, server)
    shown = browser.find_element(By.ID, "model")
    wait(browser, lambda: "API key needed" in shown.text)
    browser.find_element(By.ID, "gear").click()
    browser.find_element(By.ID, "key").send_keys(KEY, Keys.TAB)   # TAB: a change event
    status, models = server.request("GET", "/v1/models", headers={
        "Authorization": f"Bearer {KEY}"})
    wait(browser, lambda: shown.text == models["data"][0]["id"])
    for field, value in (("temperature", "0"), ("max-tokens", "12"), ("system", "Be brief.")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.execute_script("""window.spinners = 0; new MutationObserver(ms => ms.forEach(m =>
        m.addedNodes.forEach(n => { if (n.classList && n.classList.contains('spinner'))
        window.spinners++; }))).observe(document.getElementById('log'),
        {childList: true, subtree: true});""")
    ask(browser, "hello world")
    assert browser.execute_script("return window.spinners") == 1 and not find(browser, ".spinner")
    assert not find(browser, ".msg.error")
    status, api = server.request("POST", "/v1/chat/completions", {
        "model": shown.text, "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "hello world"}],
        "temperature": 0, "max_tokens": 12}, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200, api
    answer = api["choices"][0]["message"]["content"]
    [conv] = stored(browser)
    assert conv["title"] == "hello world"
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("user", "hello world"), ("assistant", answer)]
    shown_answer = find(browser, ".msg.assistant .body")[-1].text
    assert answer.strip() and shown_answer.strip()
    assert "12 tokens" in find(browser, ".msg.assistant .meta")[-1].text

    browser.find_element(By.ID, "regen").click()   # temperature 0: the same answer again
    wait(browser, lambda: idle(browser) and find(browser, ".msg.assistant .meta"))
    assert browser.execute_script("return window.spinners") == 2
    [again] = stored(browser)
    assert [m["content"] for m in again["messages"]] == ["hello world", answer]

    browser.refresh()
    wait(browser, lambda: len(find(browser, ".msg")) == 2)
    assert [e.text for e in find(browser, ".msg.user")] == ["hello world"]
    assert find(browser, ".msg.assistant .body")[0].text == shown_answer
    assert [e.text for e in find(browser, "#convs .open")] == ["hello world"]


def test_stop_aborts_the_request(server, browser):
    page(browser, server, {"mpitpi.apiKey": KEY})
    browser.execute_cdp_cmd("Network.enable", {})   # an answer that takes 3 s to start
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": False, "latency": 3000, "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        browser.find_element(By.ID, "input").send_keys("hello", Keys.ENTER)
        wait(browser, lambda: find(browser, ".spinner"))
        browser.find_element(By.ID, "stop").click()
        wait(browser, lambda: idle(browser), timeout=2)
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    assert not find(browser, ".spinner") and not find(browser, ".msg.assistant")
    assert [m["role"] for m in stored(browser)[0]["messages"]] == ["user"]
    assert browser.find_element(By.ID, "send").is_enabled()
    assert browser.find_element(By.ID, "regen").is_enabled()   # the question can be asked again


def test_markdown_renders_and_model_html_is_shown_as_text(server, browser):
    conv = {"id": "md", "title": "markdown", "messages": [
        {"role": "user", "content": "<b>hi</b> **not markdown**"},
        {"role": "assistant", "content": MARKDOWN}, {"role": "user", "content": "more"},
        {"role": "assistant", "content": "Cut short:\n```\nstill open"}]}
    page(browser, server, {"mpitpi.conversations": json.dumps([conv]), "mpitpi.current": "md"})
    wait(browser, lambda: find(browser, ".msg.assistant .body strong"))
    body = find(browser, ".msg.assistant .body")[0]
    assert body.find_element(By.CSS_SELECTOR, "strong").text == "bold"
    assert body.find_element(By.CSS_SELECTOR, "p code").text == "inline"
    assert body.find_element(By.CSS_SELECTOR, "pre code").text == "print(1 < 2)"
    assert "<script>window.pwned = 1</script>" in body.text
    assert '<img src=x onerror="window.pwned = 2">' in body.text
    assert not body.find_elements(By.CSS_SELECTOR, "script, img")
    link, image = body.find_elements(By.CSS_SELECTOR, "a")
    assert link.text == "a link" and link.get_attribute("href") is None
    assert image.text == "leak" and image.get_attribute("href") == "http://127.0.0.1:9/leak.png"
    assert browser.execute_script("return window.pwned") is None
    assert find(browser, ".msg.user")[0].text == "<b>hi</b> **not markdown**"
    cut = find(browser, ".msg.assistant .body")[1]   # a max_tokens cut inside a code block
    assert cut.find_element(By.CSS_SELECTOR, "pre code").text == "still open"


def test_conversations_switch_start_anew_and_delete(server, browser):
    convs = [{"id": i, "title": f"chat {i}", "messages": [
        {"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"*{i}*"}]}
        for i in ("a", "b")]
    page(browser, server, {"mpitpi.conversations": json.dumps(convs), "mpitpi.current": "a"})
    texts = lambda: [e.text for e in find(browser, ".msg")]   # noqa: E731
    assert texts() == ["question a", "a"] and find(browser, ".msg.assistant em")
    find(browser, "#convs .open")[1].click()
    assert texts() == ["question b", "b"]
    assert find(browser, "#convs li.current .open")[0].text == "chat b"
    browser.find_element(By.ID, "new").click()
    assert texts() == [] and not find(browser, "#convs li.current")
    assert browser.find_element(By.ID, "regen").get_attribute("disabled") is not None
    find(browser, "#convs .delete")[0].click()
    browser.switch_to.alert.dismiss()           # asked first: nothing deleted
    assert len(stored(browser)) == 2
    find(browser, "#convs .delete")[0].click()
    browser.switch_to.alert.accept()
    assert [c["id"] for c in stored(browser)] == ["b"]
    assert [e.text for e in find(browser, "#convs .open")] == ["chat b"]


def test_a_wrong_key_is_an_error_that_opens_the_settings(server, browser):
    page(browser, server, {"mpitpi.apiKey": "wrong"})
    wait(browser, lambda: "API key needed" in browser.find_element(By.ID, "model").text)
    assert not browser.find_element(By.ID, "settings").is_displayed()
    ask(browser, "hello")
    [error] = find(browser, ".msg.error")
    assert "wrong API key" in error.text and "Settings" in error.text
    assert browser.find_element(By.ID, "settings").is_displayed()
    assert browser.find_element(By.ID, "key").get_attribute("value") == "wrong"


def test_a_question_in_the_address_waits_for_the_user(server, browser):
    """/?q=... fills the input and sends nothing: a link from another site must not ask
    with this browser's key. The page carries a content security policy."""
    page(browser, server, {"mpitpi.key": KEY})
    browser.get(server.url + "/?q=" + quote("Hello there"))
    wait(browser, lambda: browser.find_element(By.ID, "input").get_attribute("value"))
    assert browser.find_element(By.ID, "input").get_attribute("value") == "Hello there"
    assert "?q" not in browser.current_url
    time.sleep(1)
    assert not find(browser, ".msg") and stored(browser) == []
    with urllib.request.urlopen(server.url + "/", timeout=30) as r:
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
