"""The app in a real browser: Debian's Chromium driven by Playwright (never a downloaded browser).

Walks the three tabs as a person would (plan, load, look at the device map, chat) and saves a
full-page screenshot of each tab into $OPTDEMO_ARTIFACTS (default tests/artifacts/).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_fixtures import RunningApp, running_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000
TABS = ("Configuration", "Device map", "Chat")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run "
        "the browser tests; Playwright's own browser download is never used",
    ),
]


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("OPTDEMO_ARTIFACTS") or Path(__file__).parent / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def app() -> Iterator[RunningApp]:
    with running_app() as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def opened_page(browser, url: str, width: int = 1280, height: int = 900) -> Iterator:
    """A fresh browser context's page at ``url`` (a ``width`` x ``height`` window); fails the test
    on any JavaScript error."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(url, wait_until="domcontentloaded")
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@contextlib.contextmanager
def chat_tab_of(browser, manager) -> Iterator:
    """The Chat tab of an app of its own running ``manager`` (a scripted fake)."""
    with running_app(manager=manager) as running, opened_page(browser, running.url) as page:
        open_tab(page, "Chat")
        yield page


@pytest.fixture
def page(browser, app: RunningApp) -> Iterator:
    with opened_page(browser, app.url) as page:
        yield page


def wait_for_text(page, selector: str, pattern: str) -> str:
    """Wait until the element's text matches ``pattern`` (a case-sensitive regex); return it."""
    from playwright.sync_api import expect

    element = page.locator(selector)
    expect(element).to_have_text(re.compile(pattern), timeout=WAIT_MS)
    return element.inner_text()


def retry(action, check, attempts: int = 4) -> None:
    """Run ``action`` until ``check`` (a Playwright expectation taking a timeout) passes.

    A control inside an accordion that was just opened exists in the DOM a moment before its
    Svelte handlers are attached; a value filled in that moment never reaches the app. So the
    action is repeated a few times, with a short wait each, and a last long one."""
    for _ in range(attempts - 1):
        action()
        try:
            check(3_000)
            return
        except AssertionError:
            continue
    action()
    check(WAIT_MS)


def chat_text(page) -> str:
    """The conversation's text, without a progress timer ("0.2s") shown over it meanwhile."""
    text = page.locator("#od-chatbot").inner_text()
    return "\n".join(line for line in text.splitlines() if not re.fullmatch(r"[\d.]+s|Loading content", line))


def open_tab(page, name: str) -> None:
    from playwright.sync_api import expect

    tab = page.get_by_role("tab", name=name, exact=True)
    tab.click()
    expect(tab).to_have_attribute("aria-selected", "true", timeout=WAIT_MS)


def test_plan_load_map_and_chat(page, app: RunningApp, artifacts: Path) -> None:
    from playwright.sync_api import expect

    for name in TABS:
        expect(page.get_by_role("tab", name=name, exact=True)).to_be_visible()
    assert page.get_by_role("tab").count() == len(TABS)

    # Configuration: the initial plan (tiny-opt, this machine's suggested budget) fits.
    summary = wait_for_text(page, "#od-plan-summary", r"\bfits\b")
    assert "tiny-opt" in summary and "does not fit" not in summary
    assert "No model loaded yet" in page.locator("#od-status").inner_text()
    page.get_by_role("button", name="Load model", exact=True).click()
    status = wait_for_text(page, "#od-status", r"Loaded.*(as planned|differs from the plan)")
    assert "tiny-opt" in status and "CPU" in status
    assert app.service.manager.status().config is not None
    page.screenshot(path=str(artifacts / "configuration.png"), full_page=True)

    # Device map: one block per module, on the CPU, the loaded model drawn as planned.
    open_tab(page, "Device map")
    cpu_blocks = page.locator('#od-devicemap .od-block[data-device="CPU"]')
    expect(cpu_blocks.first).to_be_visible()
    assert cpu_blocks.count() >= 8  # 2 embeddings, 6 layers, the final norm
    layer0 = page.locator('#od-devicemap .od-block[data-module$="layers.0"]')
    assert layer0.count() >= 1
    assert layer0.first.get_attribute("data-device") == "CPU"
    assert "model.decoder.layers.0" in layer0.first.get_attribute("title")
    heading = wait_for_text(page, "#od-map-heading", r"Loaded")
    assert "as planned" in heading or "where the plan put it" in heading
    page.screenshot(path=str(artifacts / "device-map.png"), full_page=True)

    # Chat: greedy decoding, so the built-in model gives its taught answer.
    open_tab(page, "Chat")
    wait_for_text(page, "#od-chat-model", r"tiny-opt")
    page.get_by_text("Generation parameters", exact=True).click()
    number = page.get_by_label("number input for temperature")
    expect(number).to_have_value("0.7")
    retry(
        lambda: page.get_by_label("range slider for temperature").fill("0"),
        lambda timeout: expect(number).to_have_value("0", timeout=timeout),
    )
    message = page.locator("#od-message textarea")
    message.fill("What is the capital of France?")
    message.press("Enter")
    chat = wait_for_text(page, "#od-chatbot", r"tokens/s")
    assert "What is the capital of France?" in chat
    assert "Paris" in chat
    expect(message).to_have_value("")  # the box is cleared after sending
    page.screenshot(path=str(artifacts / "chat.png"), full_page=True)


def test_the_device_map_shows_where_each_replys_time_went(page, app: RunningApp, artifacts: Path) -> None:
    """Open on the Device map, a reply ends: within its refresh the map draws a bar of time under
    every block and the totals above, with the numbers /status gives."""
    from playwright.sync_api import expect

    from optdemo.core.generation import GenerationParams

    wait_for_text(page, "#od-plan-summary", r"\bfits\b")
    page.get_by_role("button", name="Load model", exact=True).click()
    wait_for_text(page, "#od-status", r"Loaded|Reused|is loaded")
    open_tab(page, "Device map")
    wait_for_text(page, "#od-map-heading", r"Loaded")
    manager = app.service.manager
    list(
        manager.stream_completion(
            "The capital of France is", GenerationParams(max_new_tokens=8, temperature=0)
        )
    )
    latest = app.service.status().timing.latest
    expected = {b.name: b.seconds for b in latest.prompt.blocks}
    for block in latest.decode.blocks:
        expected[block.name] += block.seconds
    layer0 = page.locator('#od-devicemap .od-time[data-module="model.decoder.layers.0"]')
    expect(layer0).to_have_attribute("data-seconds", f"{expected['model.decoder.layers.0']:.6f}")
    bars = page.locator("#od-devicemap .od-time")
    assert bars.count() == len(expected) == 10
    assert "s in the latest reply" in layer0.get_attribute("title")
    heading = wait_for_text(page, "#od-map-heading", r"Latest reply")
    assert f"a decode step took {latest.seconds_per_token:.3g} s" in heading
    expect(page.locator("#od-map-timing")).to_be_visible()
    page.screenshot(path=str(artifacts / "device-map-timing.png"), full_page=True)


def test_load_result_message_stays_visible(page) -> None:
    wait_for_text(page, "#od-plan-summary", r"\bfits\b")
    page.get_by_role("button", name="Load model", exact=True).click()
    wait_for_text(page, "#od-status", r"Loaded|Reused|is loaded")
    page.wait_for_timeout(3000)  # let every follow-up event finish
    status = page.locator("#od-status").inner_text()
    assert re.search(r"as planned|differs from the plan|nothing was reloaded", status), status


def test_invalid_budget_shows_a_readable_message(page, artifacts: Path) -> None:
    from playwright.sync_api import expect

    wait_for_text(page, "#od-plan-summary", r"\bfits\b")
    page.get_by_text("Advanced", exact=True).click()
    field = page.get_by_label("max_memory (overrides the sliders)")
    summary_box = page.locator("#od-plan-summary")

    def type_invalid() -> None:
        field.fill("cpu=lots")
        field.blur()

    retry(
        type_invalid,
        lambda timeout: expect(summary_box).to_have_text(re.compile("Cannot plan"), timeout=timeout),
    )
    summary = summary_box.inner_text()
    assert "not a size" in summary
    assert "Traceback" not in summary and "Error:" not in summary
    page.screenshot(path=str(artifacts / "configuration-error.png"), full_page=True)

    # The page still works: tabs switch, and a valid budget plans again.
    for name in ("Device map", "Chat", "Configuration"):
        open_tab(page, name)
    field.fill("cpu=1GiB")
    field.blur()
    summary = wait_for_text(page, "#od-plan-summary", r"\bfits\b")
    assert "Cannot plan" not in summary


def test_a_failed_reply_keeps_the_chat_and_the_message(browser) -> None:
    """An error while chatting (here: the model was unloaded meanwhile, and a visitor of a public
    deployment cannot load one) is said in the conversation, which keeps its earlier turns; the
    unsent message is back in the box; no "Error" badge covers anything (issue #24)."""
    from playwright.sync_api import expect

    with running_app(["--lock-config"]) as app, opened_page(browser, app.url) as page:
        app.service.manager.load(app.service.initial_config())
        open_tab(page, "Chat")
        box = page.locator("#od-message textarea")
        send(page, "What is the capital of France?")
        wait_for_text(page, "#od-chatbot", r"tokens/s")
        first_turns = chat_text(page)
        app.service.manager.unload()
        send(page, "Are you still there?")
        wait_for_text(page, "#od-chatbot", r"Not sent: no model is loaded, and visitors cannot load")
        chat = chat_text(page)
        assert chat.startswith(first_turns) and "Your message is back in the box" in chat
        expect(box).to_have_value("Are you still there?", timeout=WAIT_MS)
        assert "Traceback" not in page.content()
        assert_no_error_shown(page)


def test_offload_field_warns_at_once_about_a_file(page, tmp_path: Path) -> None:
    """Issue #12: a file given as offload folder is flagged as it is typed, naming the full path
    (wrapped, never clipped), before any plan or load."""
    from playwright.sync_api import expect

    a_file = tmp_path / ("a-rather-long-name-for-a-file-" * 4 + "notes.txt")
    a_file.write_text("x")
    wait_for_text(page, "#od-plan-summary", r"\bfits\b")
    info = page.locator("#od-offload-info")
    expect(info).to_have_text(re.compile(r"^\s*Free space at "))
    field = page.get_by_label("Offload folder")
    retry(
        lambda: field.fill(str(a_file)),
        lambda timeout: expect(info).to_have_text(re.compile("is a file, not a folder"), timeout=timeout),
    )
    assert str(a_file) in info.inner_text()
    box = info.bounding_box()
    assert box is not None and box["width"] <= 1280  # wrapped inside the page, not overflowing it
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280


def send(page, text: str) -> None:
    box = page.locator("#od-message textarea")
    box.fill(text)
    box.press("Enter")


def test_a_reload_keeps_the_chat(page, app: RunningApp) -> None:
    """Chats live in the browser (localStorage, through BrowserState): after a reload the
    conversation is back on screen and listed under Saved chats."""
    from playwright.sync_api import expect

    app.service.manager.load(app.service.initial_config())
    open_tab(page, "Chat")
    send(page, "What is the capital of France?")
    wait_for_text(page, "#od-chatbot", r"tokens/s")
    # Saved after the reply (the picker names the chat), then the page is reloaded.
    page.get_by_text("Saved chats (kept in this browser only)").click()
    picker = page.locator("#od-chat-picker input")
    expect(picker).to_have_value("What is the capital of France?", timeout=WAIT_MS)
    before = chat_text(page)
    page.reload(wait_until="domcontentloaded")
    open_tab(page, "Chat")
    wait_for_text(page, "#od-chatbot", r"capital of France")
    assert chat_text(page) == before and "Paris" in before
    page.get_by_text("Saved chats (kept in this browser only)").click()
    expect(page.locator("#od-chat-picker input")).to_have_value("What is the capital of France?")
    # The server keeps no copy: its only chat histories are the API clients' (none here).
    assert not app.service.sessions._histories


def test_theme_toggle_switches_dark_and_light(page) -> None:
    from playwright.sync_api import expect

    toggle = page.locator("#od-theme")
    expect(toggle).to_be_visible()
    dark = page.evaluate("document.body.classList.contains('dark')")
    toggle.click()
    page.wait_for_function(f"document.body.classList.contains('dark') === {str(not dark).lower()}")
    page.reload(wait_until="domcontentloaded")  # the choice is remembered
    page.wait_for_function(f"document.body.classList.contains('dark') === {str(not dark).lower()}")
    page.locator("#od-theme").click()
    page.wait_for_function(f"document.body.classList.contains('dark') === {str(dark).lower()}")


def test_a_message_typed_while_a_reply_streams_is_kept(browser) -> None:
    """Enter pressed while a reply streams does not send and does not clear the box: the message
    stays, a notice says to wait or press Stop, and it sends once the reply has ended."""
    import threading

    from app_fixtures import ScriptedManager
    from playwright.sync_api import expect

    manager = ScriptedManager({"Long": [["One", "One two", "One two three"]], "Next": [["Sure."]]})
    manager.pause = threading.Event()
    with chat_tab_of(browser, manager) as page:
        send(page, "Long")
        wait_for_text(page, "#od-chatbot", r"One")  # streaming, held after its first step
        notice = wait_for_text(page, "#od-chat-notice", r"A reply is on its way")
        assert "Stop" in notice
        send(page, "Next")
        page.wait_for_timeout(1500)
        box = page.locator("#od-message textarea")
        expect(box).to_have_value("Next")
        manager.pause.set()
        wait_for_text(page, "#od-chatbot", r"One two three")
        expect(page.locator("#od-chat-notice")).not_to_contain_text("on its way", timeout=WAIT_MS)
        expect(box).to_have_value("Next")  # still there after the reply ended
        assert manager.histories == [[]]  # it was not sent meanwhile
        box.press("Enter")
        wait_for_text(page, "#od-chatbot", r"Sure\.")
        assert manager.histories[-1] == [("Long", "One two three")]


def test_the_max_new_tokens_sliders_maximum_is_accepted(page, app: RunningApp) -> None:
    """tiny-opt's window is 512 tokens, and the plain transcript's own text and the message take
    some: the slider stops where the prompt leaves off (issue #24: 511 was always refused), and
    its maximum, sent, gets a reply."""
    from playwright.sync_api import expect

    app.service.manager.load(app.service.initial_config())
    open_tab(page, "Chat")
    wait_for_text(page, "#od-chat-model", r"tiny-opt")
    page.get_by_text("Generation parameters", exact=True).click()
    slider = page.get_by_label("range slider for max_new_tokens")
    empty = app.service.max_new_tokens_limit()
    expect(slider).to_have_attribute("max", str(empty))
    assert empty < 511
    question = "What is the capital of France?"
    page.locator("#od-message textarea").fill(question)
    limit = app.service.max_new_tokens_limit(question)
    assert limit < empty
    expect(slider).to_have_attribute("max", str(limit))  # the message's tokens are counted too
    expect(page.get_by_text(f"at most {limit} here: min(512, the model's 512-token window")).to_be_visible()
    number = page.get_by_label("number input for max_new_tokens")
    retry(
        lambda: number.fill(str(limit)),
        lambda timeout: expect(number).to_have_value(str(limit), timeout=timeout),
    )
    page.locator("#od-message textarea").press("Enter")
    chat = wait_for_text(page, "#od-chatbot", r"tokens/s")
    assert "Not sent" not in chat
    assert_no_error_shown(page)


def test_a_refusal_is_said_in_the_chat_and_keeps_the_conversation(browser) -> None:
    """A conversation at --max-history-turns is refused: the refusal is in the conversation, which
    stays on screen; no "Error" badge hides it (issue #24)."""
    from playwright.sync_api import expect

    with running_app(["--max-history-turns", "1"]) as app, opened_page(browser, app.url) as page:
        app.service.manager.load(app.service.initial_config())
        open_tab(page, "Chat")
        send(page, "What is the capital of France?")
        wait_for_text(page, "#od-chatbot", r"tokens/s")
        send(page, "And of Italy?")
        chat = wait_for_text(page, "#od-chatbot", r"Not sent: this conversation has reached the limit")
        assert "What is the capital of France?" in chat and "tokens/s" in chat
        expect(page.locator("#od-message textarea")).to_have_value("And of Italy?")
        assert_no_error_shown(page)


def test_run_on_a_serving_endpoint_shows_its_fields_and_connect(page) -> None:
    from playwright.sync_api import expect

    wait_for_text(page, "#od-plan-summary", r"\bfits\b")
    url = page.get_by_label("Endpoint URL")
    expect(url).to_be_hidden()
    page.get_by_label("a serving endpoint").check()
    expect(url).to_be_visible()
    expect(page.get_by_role("button", name="Connect", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Disconnect", exact=True)).to_be_visible()
    expect(page.get_by_label("Revision")).to_be_hidden()  # the local model's controls give way
    expect(page.get_by_role("button", name="Plan", exact=True)).to_be_hidden()
    url.fill("http://127.0.0.1:9/v1")
    page.get_by_label("Model name").fill("some-model")
    page.get_by_role("button", name="Connect", exact=True).click()
    # The suite runs with HF_HUB_OFFLINE=1: the page says so, and what to do.
    status = wait_for_text(page, "#od-status", r"Could not connect to http://127\.0\.0\.1:9/v1:")
    assert "unset HF_HUB_OFFLINE to use a serving endpoint" in status
    page.get_by_label("this machine").check()
    expect(page.get_by_role("button", name="Load model", exact=True)).to_be_visible()
    expect(url).to_be_hidden()
    expect(page.get_by_label("Revision")).to_be_visible()
    expect(page.get_by_role("button", name="Plan", exact=True)).to_be_visible()


def test_a_waiting_reply_shows_its_place_in_line_and_the_serving_line_counts(browser) -> None:
    """While a reply waits for a place in the batch the notice says where in line it is; the line
    over the chat says how many replies the model writes together and how many wait."""
    import threading

    from app_fixtures import ScriptedManager
    from playwright.sync_api import expect

    from optdemo.core.generation import GenerationUpdate

    waiting = "Waiting for the model: number 1 in line (8 replies being written, at most 8 at once)"

    class Queued(ScriptedManager):
        def stream_completion(
            self, prompt, params, stop_event=None, max_new_tokens_cap=512, cache_scope=None
        ):
            yield GenerationUpdate("", status=waiting)
            self.pause.wait(30)
            yield from super().stream_completion(prompt, params, stop_event, max_new_tokens_cap)

    manager = Queued({"Hello": [["Hi", "Hi there."]]})
    manager.pause = threading.Event()
    manager.engine.counts = lambda: (8, 1)  # type: ignore[method-assign]
    with chat_tab_of(browser, manager) as page:
        wait_for_text(page, "#od-serving", r"Writing 8 replies together \(at most 8 at once\) · 1 waiting")
        send(page, "Hello")
        wait_for_text(page, "#od-chat-notice", re.escape(waiting))
        manager.engine.counts = lambda: (0, 0)  # type: ignore[method-assign]
        manager.pause.set()
        wait_for_text(page, "#od-chatbot", r"Hi there\.")
        expect(page.locator("#od-chat-notice")).not_to_contain_text("Waiting", timeout=WAIT_MS)
        expect(page.locator("#od-serving")).not_to_contain_text("Writing", timeout=WAIT_MS)


def test_admin_sign_in_keeps_the_credential_in_an_httponly_cookie(browser) -> None:
    """Public mode, issue #23: the form's password goes to /optdemo/sign-in only (no Gradio event
    carries it), the credential comes back as an HttpOnly, SameSite=Strict cookie the page's scripts
    cannot read, the admin controls unlock and stay so after a reload, and lock again at sign-out."""
    from playwright.sync_api import expect

    secret = "s3cret-Pa55"
    with (
        running_app(["--lock-config", "--auth", f"admin:{secret}"]) as app,
        opened_page(browser, app.url) as page,
    ):
        posted: list[tuple[str, str]] = []
        page.on("request", lambda r: r.method == "POST" and posted.append((r.url, r.post_data or "")))
        load = page.get_by_role("button", name="Load model", exact=True)
        expect(load).to_be_disabled()
        page.get_by_role("button", name="Admin sign-in").click()
        user, password = page.get_by_label("Username"), page.get_by_label("Password")
        message = page.get_by_text("wrong username or password", exact=False)

        def sign_in(typed: str) -> None:
            user.fill("admin")
            password.fill(typed)
            page.get_by_role("button", name="Sign in", exact=True).click()

        retry(lambda: sign_in("wrong"), lambda timeout: expect(message).to_be_visible(timeout=timeout))
        expect(password).to_have_value("")
        expect(load).to_be_disabled()
        sign_in(secret)
        expect(load).to_be_enabled()
        expect(page.get_by_text("Signed in as admin", exact=False)).to_be_visible()
        expect(password).to_have_value("")
        cookie = {c["name"]: c for c in page.context.cookies()}["optdemo_admin"]
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert "optdemo_admin" not in page.evaluate("document.cookie")
        carried = [url for url, data in posted if secret in data]
        assert carried and all(url.endswith("/optdemo/sign-in") for url in carried), carried
        page.reload(wait_until="domcontentloaded")
        expect(page.get_by_role("button", name="Load model", exact=True)).to_be_enabled()
        page.get_by_role("button", name="Admin sign-in").click()
        page.get_by_role("button", name="Sign out", exact=True).click()
        expect(page.get_by_text("Signed out.", exact=True)).to_be_visible()
        expect(page.get_by_role("button", name="Load model", exact=True)).to_be_disabled()
        assert "optdemo_admin" not in {c["name"] for c in page.context.cookies()}
        assert len(app.service.access.admins) == 0


# ---------------------------------------------------------------------------------- issue 24
# Gradio's red "Error" pill over a failed event's outputs, and its error toast.
ERROR_PILL = '[data-testid="status-tracker"] .error'
ERROR_TOAST = '[data-testid="toast-body"]'


def assert_no_error_shown(page) -> None:
    """Neither Gradio's "Error" pill nor an error toast is on the page."""
    assert page.locator(ERROR_PILL).count() == 0, page.locator(ERROR_PILL).all_inner_texts()
    assert page.locator(ERROR_TOAST).count() == 0, page.locator(ERROR_TOAST).all_inner_texts()


def test_a_first_message_right_after_start_up_gets_a_reply(browser) -> None:
    """Issue #24: right after start-up nothing is loaded and tiny-opt (works offline) is selected;
    the first message loads it and gets a reply, with no toast and no "Error" pill."""
    with running_app() as app, opened_page(browser, app.url) as page:
        assert not app.service.status().loaded
        open_tab(page, "Chat")
        send(page, "What is the capital of France?")
        chat = wait_for_text(page, "#od-chatbot", r"tokens/s")
        assert "What is the capital of France?" in chat
        assert app.service.status().model_id == "optdemo/tiny-opt"
        assert_no_error_shown(page)


def test_saved_chats_say_what_prevents_an_action_and_open_every_pick(browser) -> None:
    """Rename with no chat and an import of text that is not an export say why in the panel;
    picking past chats, the open one included, never fails ("open_chat didn't return enough
    output values")."""
    from app_fixtures import ScriptedManager
    from playwright.sync_api import expect

    manager = ScriptedManager({"First": [["One."]], "Second": [["Two."]]})
    with chat_tab_of(browser, manager) as page:
        page.get_by_text("Saved chats (kept in this browser only)").click()
        message = page.locator("#od-saved-message")
        rename = page.get_by_role("button", name="Rename", exact=True)
        retry(
            rename.click,
            lambda timeout: expect(message).to_have_text(
                re.compile("Nothing to rename yet"), timeout=timeout
            ),
        )
        page.get_by_label("Import: paste an export (JSON or Markdown)").fill("just some notes")
        page.get_by_role("button", name="Import", exact=True).click()
        wait_for_text(page, "#od-saved-message", r"Not imported: no conversation found")
        send(page, "First")
        wait_for_text(page, "#od-chatbot", r"One\.")
        picker = page.locator("#od-chat-picker input")
        expect(picker).to_have_value("First")
        page.get_by_role("button", name="New chat", exact=True).click()
        send(page, "Second")
        wait_for_text(page, "#od-chatbot", r"Two\.")
        expect(picker).to_have_value("Second")
        for title, reply in (("First", "One."), ("First", "One."), ("Second", "Two."), ("Second", "Two.")):
            picker.click()
            page.get_by_role("option", name=title, exact=True).click()
            wait_for_text(page, "#od-chatbot", re.escape(reply))
            expect(picker).to_have_value(title)
        assert_no_error_shown(page)


def test_enter_in_the_ram_box_replans_and_a_reload_shows_the_loaded_configuration(browser) -> None:
    """Typing a CPU RAM budget and pressing Enter re-plans; after loading, a reload and a second
    visitor see that configuration in the form, and the Device map draws no preview above it."""
    from conftest import TINY_TOTAL_BYTES
    from playwright.sync_api import expect

    from optdemo.core.budget import format_bytes

    leaves = re.escape(f"the budget leaves {format_bytes(512 * 2**20 - TINY_TOTAL_BYTES)} next to")
    with running_app() as app, opened_page(browser, app.url) as page:
        wait_for_text(page, "#od-plan-summary", r"\bfits\b")
        ram = page.get_by_label("number input for CPU RAM (GiB)")

        def type_half() -> None:
            ram.fill("0.5")
            ram.press("Enter")

        retry(
            type_half,
            lambda timeout: expect(page.locator("#od-plan-summary")).to_have_text(
                re.compile(leaves), timeout=timeout
            ),
        )
        page.get_by_role("button", name="Load model", exact=True).click()
        wait_for_text(page, "#od-status", r"Loaded.*as planned")
        assert app.service.status().config.max_memory.get("cpu") == 512 * 2**20
        for visitor in (page, None):
            if visitor is None:  # a second visitor, in a browser context of its own
                with opened_page(browser, app.url) as other:
                    check_loaded_form(other)
            else:
                visitor.reload(wait_until="domcontentloaded")
                check_loaded_form(visitor)


def check_loaded_form(page) -> None:
    """The form shows the loaded tiny-opt at 0.5 GiB; the Device map only the loaded map."""
    from playwright.sync_api import expect

    expect(page.get_by_label("number input for CPU RAM (GiB)")).to_have_value("0.5", timeout=WAIT_MS)
    wait_for_text(page, "#od-plan-summary", r"\bfits\b")
    open_tab(page, "Device map")
    wait_for_text(page, "#od-map-heading", r"Loaded")
    page.wait_for_timeout(1000)  # the form's re-plan, should one come, has redrawn the map
    assert "Plan preview" not in page.locator("#od-devicemap").inner_text()
    assert "Plan preview" not in page.locator("#od-map-heading").inner_text()


def test_the_kv_line_says_visitors_are_served_one_at_a_time(page) -> None:
    """At a budget that leaves no room for one full sequence, "fits" no longer stands beside
    "room for 0 such sequences": the plan says what it means."""
    wait_for_text(page, "#od-plan-summary", r"\bfits\b")
    page.get_by_text("Advanced", exact=True).click()
    field = page.get_by_label("max_memory (overrides the sliders)")

    def type_budget() -> None:
        field.fill("cpu=2MiB")
        field.press("Enter")

    from playwright.sync_api import expect

    summary = page.locator("#od-plan-summary")
    retry(
        type_budget,
        lambda timeout: expect(summary).to_have_text(re.compile("one at a time"), timeout=timeout),
    )
    text = summary.inner_text()
    assert "fits, serving one reply at a time" in text and "visitors are served one at a time" in text
    assert "room for 0" not in text


def test_a_quantized_load_shows_its_progress_at_the_top_and_its_format(browser, artifacts: Path) -> None:
    """At 1366x900 the load's progress is on screen without scrolling; the Device map's total
    names the 8-bit format; the first reply says why it is slower; the cache line is read again."""
    from playwright.sync_api import expect

    with running_app() as app, opened_page(browser, app.url, 1366, 900) as page:
        wait_for_text(page, "#od-plan-summary", r"\bfits\b")
        status = page.locator("#od-status")
        box = status.bounding_box()
        assert box is not None and box["y"] + box["height"] <= 900  # above the fold
        page.get_by_label("8bit").check()
        wait_for_text(page, "#od-plan-summary", r"8-bit decoder weights")
        page.get_by_role("button", name="Load model", exact=True).click()
        wait_for_text(page, "#od-status", r"Loaded.*as planned")
        assert page.evaluate("window.scrollY") == 0
        page.screenshot(path=str(artifacts / "quantized-load.png"))
        expect(page.locator("#od-machine")).to_be_visible()
        cache = app.service.conversion_cache().replace("`", "")  # read after the load: not start-up's
        expect(page.locator("#od-cache")).to_contain_text(cache, timeout=WAIT_MS)
        open_tab(page, "Device map")
        legend = wait_for_text(page, "#od-devicemap", r"Total")
        assert "8-bit decoder weights, bfloat16 elsewhere" in legend and "in bfloat16" not in legend
        open_tab(page, "Chat")
        send(page, "What is the capital of France?")
        chat = wait_for_text(page, "#od-chatbot", r"tokens/s")
        assert "first reply after loading: slower while the weights are read from disk" in chat
        assert_no_error_shown(page)


def test_a_typo_in_the_owner_and_a_model_not_offered_are_named(browser) -> None:
    from playwright.sync_api import expect

    with running_app() as app, opened_page(browser, app.url) as page:
        wait_for_text(page, "#od-plan-summary", r"\bfits\b")
        model = page.get_by_label("Model")

        def type_typo() -> None:
            model.fill("facebok/opt-1.3b")
            model.press("Enter")

        summary = page.locator("#od-plan-summary")
        retry(
            type_typo,
            lambda timeout: expect(summary).to_have_text(re.compile("did you mean"), timeout=timeout),
        )
        assert summary.inner_text().endswith("did you mean facebook/opt-1.3b?")
        assert "cannot reach" not in summary.inner_text()
    with running_app(["--lock-config"]) as app, opened_page(browser, app.url) as page:
        wait_for_text(page, "#od-plan-summary", r"\bfits\b")
        model = page.get_by_label("Model")

        def type_other() -> None:
            model.fill("facebook/opt-66b")
            model.press("Enter")

        summary = page.locator("#od-plan-summary")
        retry(
            type_other,
            lambda timeout: expect(summary).to_have_text(re.compile("not offered here"), timeout=timeout),
        )
        assert "this public deployment allows optdemo/tiny-opt" in summary.inner_text()


def test_the_polish_list(browser) -> None:
    """The context line goes with an undone turn; the serving line with a finished completion;
    the tiny model's hint shows only while it answers; no empty glyph box before the notice; the
    sampling sliders have room; a block label is never cut."""
    import threading

    from app_fixtures import ScriptedManager
    from playwright.sync_api import expect

    manager = ScriptedManager({"Hi": [["Hello", "Hello there."]], "Once": [[" upon", " upon a time"]]})
    manager.pause = threading.Event()
    with running_app(manager=manager) as app, opened_page(browser, app.url) as page:
        wait_for_text(page, "#od-plan-summary", r"\bfits\b")
        open_tab(page, "Chat")
        expect(page.locator("#od-tiny-hint")).to_be_visible()  # tiny-opt is selected, nothing else answers
        send(page, "Hi")
        notice = wait_for_text(page, "#od-chat-notice", r"A reply is on its way")
        assert notice.lstrip().startswith("A reply")
        manager.pause.set()
        wait_for_text(page, "#od-context", r"Context: ")
        page.get_by_role("button", name="Undo").click()
        expect(page.locator("#od-context")).to_have_text(re.compile(r"^\s*$"), timeout=WAIT_MS)
        page.get_by_text("Generation parameters", exact=True).click()
        for label in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"):
            box = page.get_by_label(f"range slider for {label}").bounding_box()
            assert box is not None and box["width"] >= 150, (label, box)
        page.get_by_label("Completion").check()
        manager.pause = None
        manager.script["Once"] = [[" upon", " upon a time"]] * 4  # the box may take a try or two

        def generate() -> None:
            page.get_by_label("Prompt").fill("Once")
            page.get_by_role("button", name="Generate", exact=True).click()

        continuation = page.get_by_label("Continuation")
        retry(generate, lambda timeout: expect(continuation).to_have_value(" upon a time", timeout=timeout))
        expect(page.locator("#od-serving")).not_to_contain_text("Writing", timeout=WAIT_MS)
        # Another model selected: the tiny model's hint goes.
        open_tab(page, "Configuration")
        page.get_by_label("Model").fill("opt-350m")
        page.get_by_label("Model").press("Enter")
        wait_for_text(page, "#od-plan-summary", r"opt-350m")
        open_tab(page, "Chat")
        expect(page.locator("#od-tiny-hint")).to_be_hidden(timeout=WAIT_MS)
        open_tab(page, "Device map")
        expect(page.locator('#od-devicemap .od-block[data-module="model.decoder.project_in"]')).to_have_text(
            "in"
        )
        labels = page.locator("#od-devicemap .od-block").all_inner_texts()
        assert "proje" not in labels
        assert_no_error_shown(page)
