"""The web playground and ``/docs`` in a real browser: Debian's chromium, driven by Playwright.

Every page runs offline: any request that leaves the test server is blocked and fails the
test. The fake model's images are solid colours of (prompt, seed), so a test can tell which
request an image came from; one test runs the real tiny-sd pipeline behind ``diffuser-api serve``.
"""

from __future__ import annotations

import base64
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from diffuser_api.domain import Task
from tests.conftest import LiveServer
from tests.fakes import FakeModel, FakeRunner, colour_of, fake_app, fake_models_app, png_bytes
from tests.servers import ThreadedServer

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# Set to a folder (docs/images) to refresh the README's screenshots.
SCREENSHOTS = os.environ.get("PLAYGROUND_SCREENSHOTS")
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
# Records, in order, each preview shown (an image's src set inside #live) and each result added
# to #results, so a test sees whether a partial image came before the final one.
IMAGE_LOG_SCRIPT = """
document.addEventListener("DOMContentLoaded", () => {
  window.imageLog = [];
  new MutationObserver((records) => {
    for (const record of records) {
      if (record.type === "attributes" && record.target.closest("#live")) window.imageLog.push("partial");
      for (const node of record.addedNodes) {
        if (node.nodeType === 1 && node.closest("#results") && node.querySelector("img")) window.imageLog.push("final");
      }
    }
  }).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ["src"]});
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    """A fresh browser profile (empty local storage) that cannot reach anything but the test
    servers: a page that loads a CDN script, a font or a validator badge fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    blocked: list[str] = []

    def offline(route):
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS or route.request.url.startswith("data:"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", offline)
    context.add_init_script(IMAGE_LOG_SCRIPT)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert blocked == [], "the page tried to load external resources"
    assert errors == [], "the page's scripts raised"


def open_playground(page, server) -> None:
    page.goto(f"{server.base_url}/playground")
    page.wait_for_selector("select[name=model] option", state="attached")


def results(page) -> list[dict]:
    """Each result's pixels (decoded from its data URL) and caption."""
    found = []
    for figure in page.locator("#results figure").all():
        source = figure.locator("img").get_attribute("src")
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        found.append({"image": image, "seed": figure.locator(".seed").inner_text(),
                      "revised_prompt": figure.locator(".revised-prompt").inner_text()})
    return found


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def paint(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse drag over the mask canvas, between points given as fractions of its size."""
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    for step in range(1, 11):
        fraction = step / 10
        x = start[0] + (end[0] - start[0]) * fraction
        y = start[1] + (end[1] - start[1]) * fraction
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
    page.mouse.up()


def test_generate_shows_queue_progress_and_partial_images_before_the_final_ones(tmp_path, page):
    gate = threading.Event()
    runner = FakeRunner(step_delay_s=0.05, gate=gate)
    with ThreadedServer(fake_app(tmp_path, runner)) as server:
        server.wait_ready()
        # Another client's request holds the worker, so the page's request waits in the queue.
        blocker = threading.Thread(target=httpx.post, args=(f"{server.base_url}/v1/images/generations",),
                                   kwargs={"json": {"prompt": "first in line"}, "timeout": 30})
        blocker.start()
        open_playground(page, server)
        page.fill("textarea[name=prompt]", "a red fox")
        page.fill("#size", "64x64")
        page.fill("#num_inference_steps", "8")
        page.fill("#n", "2")
        page.select_option("#partial_images", "2")
        page.click("button[type=submit]")
        page.wait_for_selector("#status:has-text('Queued')")
        assert page.locator("#live progress").count() == 2  # a bar per image
        gate.set()
        page.wait_for_function("document.querySelectorAll('#results img').length === 2")
        blocker.join(30)

    log = page.evaluate("window.imageLog")
    assert "partial" in log and log.index("partial") < log.index("final")
    assert page.inner_text("#status").startswith("Done")
    job = runner.jobs_seen[-1]
    assert job.prompt == "a red fox" and (job.width, job.height, job.steps) == (64, 64, 8)
    shown = results(page)
    assert sorted(result["seed"] for result in shown) == sorted(f"seed {seed}" for seed in job.seeds)
    for result in shown:
        seed = int(result["seed"].split()[1])
        assert result["image"].size == (64, 64)
        assert result["image"].convert("RGB").getpixel((0, 0)) == colour_of("a red fox", seed)
        assert result["revised_prompt"] == "a red fox"


def test_edit_sends_the_mask_painted_with_the_mouse_and_results_can_be_used_as_input(tmp_path, page):
    runner = FakeRunner()
    source = tmp_path / "photo.png"
    source.write_bytes(png_bytes((64, 64), (20, 120, 200)))
    with ThreadedServer(fake_app(tmp_path, runner)) as server:
        server.wait_ready()
        open_playground(page, server)
        page.click("#tab-edit")
        assert page.locator("#mask-editor").is_hidden()  # nothing to paint on yet
        page.set_input_files("#image", str(source))
        page.wait_for_selector("#mask-editor", state="visible")
        page.eval_on_selector("#brush-size", "slider => { slider.value = 48; }")
        # Paint a band across the middle, then erase its left end.
        paint(page, (0.1, 0.5), (0.9, 0.5))
        page.check("input[name=mask_tool][value=erase]")
        paint(page, (0.05, 0.5), (0.3, 0.5))
        page.fill("textarea[name=prompt]", "make it winter")
        page.fill("#size", "64x64")
        page.click("button[type=submit]")
        page.wait_for_selector("#results img")

        job = runner.jobs_seen[-1]
        assert job.task is Task.MASKED_EDIT
        assert job.images[0].convert("RGB").getpixel((32, 32)) == (20, 120, 200)
        # The server's mask (white = repaint) is the band the mouse left transparent.
        assert job.mask.getpixel((45, 32)) == 255  # painted
        assert job.mask.getpixel((5, 32)) == 0  # painted, then erased
        assert job.mask.getpixel((32, 5)) == 0 and job.mask.getpixel((32, 60)) == 0  # never painted
        seed = int(results(page)[0]["seed"].split()[1])

        # Iterative editing: the result becomes the next edit's input.
        page.click("#results button:has-text('Use as input')")
        assert page.get_attribute("#tab-edit", "aria-selected") == "true"
        assert page.locator("#inputs img").count() == 1
        page.click("#mask-invert")  # an empty mask inverted: edit everything
        page.fill("textarea[name=prompt]", "and at night")
        page.click("button[type=submit]")
        page.wait_for_function("document.querySelectorAll('#results img').length === 2")
        job = runner.jobs_seen[-1]
        assert job.images[0].convert("RGB").getpixel((0, 0)) == colour_of("make it winter", seed)
        assert job.mask.getextrema() == (255, 255)


# Hands the page an image file the way a drop or a paste does (Playwright has no native one).
HAND_OVER_FILE = """([kind, data]) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], "given.png", {type: "image/png"}));
    const event = kind === "drop"
        ? new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true})
        : new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true});
    (kind === "drop" ? document.getElementById("dropzone") : document.body).dispatchEvent(event);
}"""


def hand_over(page, kind: str, colour: tuple[int, int, int]) -> None:
    page.evaluate(HAND_OVER_FILE, [kind, base64.b64encode(png_bytes((48, 48), colour)).decode()])


def test_variation_of_a_dropped_or_pasted_image_goes_over_http(tmp_path, page):
    runner = FakeRunner()
    with ThreadedServer(fake_app(tmp_path, runner)) as server:
        server.wait_ready()
        open_playground(page, server)
        page.click("#tab-vary")
        hand_over(page, "drop", (250, 200, 10))
        page.wait_for_selector("#inputs img")
        assert page.locator("textarea[name=prompt]").is_hidden()  # variations take no prompt
        page.fill("#size", "48x48")
        page.click("button[type=submit]")
        page.wait_for_selector("#results img")
        assert runner.jobs_seen[-1].images[0].convert("RGB").getpixel((10, 10)) == (250, 200, 10)

        dropped = page.get_attribute("#inputs img", "src")
        hand_over(page, "paste", (10, 250, 100))  # replaces the one input a variation takes
        page.wait_for_function("(before) => document.querySelector('#inputs img').src !== before", arg=dropped)
        assert page.locator("#inputs img").count() == 1
        page.click("button[type=submit]")
        page.wait_for_function("document.querySelectorAll('#results img').length === 2")
    job = runner.jobs_seen[-1]
    assert job.task is Task.VARIATION
    assert job.images[0].convert("RGB").getpixel((10, 10)) == (10, 250, 100)
    assert results(page)[0]["seed"] == f"seed {job.seeds[0]}"


def test_a_bad_size_shows_the_servers_message_next_to_the_size_field(tmp_path, page):
    with ThreadedServer(fake_app(tmp_path, FakeRunner())) as server:
        server.wait_ready()
        open_playground(page, server)
        page.fill("textarea[name=prompt]", "a fox")
        page.fill("#size", "13x7")
        page.click("button[type=submit]")
        page.wait_for_selector("#size-error:has-text('13x7')")
        assert "multiples of 8" in page.inner_text("#size-error")
        assert page.get_attribute("#size", "aria-invalid") == "true"
        assert page.inner_text("#form-error") == ""
        # A fixed size works, and the error goes away.
        page.fill("#size", "32x32")
        page.click("button[type=submit]")
        page.wait_for_selector("#results img")
        assert page.locator("#size-error").inner_text() == ""


def test_the_page_asks_for_a_key_keeps_it_and_sends_it(tmp_path, page):
    runner = FakeRunner()
    # The second key holds characters no WebSocket subprotocol may: it goes in the query instead.
    with ThreadedServer(fake_app(tmp_path, runner, api_keys=["sk-play", "sk/play=2"])) as server:
        server.wait_ready()
        open_page = page.goto(f"{server.base_url}/playground")
        assert open_page.status == 200  # the page loads without a key
        page.wait_for_selector("#api_key-error:has-text('API key')")
        assert page.evaluate("document.activeElement.id") == "api_key"
        page.fill("#api_key", "sk-wrong")
        page.press("#api_key", "Enter")
        page.wait_for_selector("#api_key-error:has-text('Incorrect API key')")
        page.fill("#api_key", "sk-play")
        page.click("#save-key")
        page.wait_for_selector("select[name=model] option", state="attached")
        assert page.inner_text("#api_key-error") == ""

        page.reload()  # kept in local storage
        page.wait_for_selector("select[name=model] option", state="attached")
        assert page.input_value("#api_key") == "sk-play"
        page.fill("textarea[name=prompt]", "with a key")
        page.click("button[type=submit]")
        page.wait_for_selector("#results img")

        page.fill("#api_key", "sk/play=2")
        page.click("#save-key")
        page.wait_for_selector("select[name=model] option", state="attached")
        page.fill("textarea[name=prompt]", "with the other key")
        page.click("button[type=submit]")
        page.wait_for_function("document.querySelectorAll('#results img').length === 2")
    assert [job.prompt for job in runner.jobs_seen] == ["with a key", "with the other key"]


def test_the_form_shows_only_what_the_chosen_model_can_do(tmp_path, page):
    models = [
        FakeModel("painter", tasks=frozenset({Task.GENERATION}), extras=frozenset({"num_inference_steps", "seed"})),
        FakeModel("collage", tasks=frozenset(Task)),
        FakeModel("retoucher", tasks=frozenset({Task.GENERATION, Task.EDIT})),
    ]
    with ThreadedServer(fake_models_app(tmp_path, models)) as server:
        server.wait_ready()
        open_playground(page, server)
        page.select_option("select[name=model]", "painter")
        assert page.locator("#tab-generate").is_visible()
        assert page.locator("#tab-edit").is_hidden() and page.locator("#tab-vary").is_hidden()
        assert page.locator("#negative_prompt").is_hidden() and page.locator("#guidance_scale").is_hidden()

        page.select_option("select[name=model]", "collage")
        page.click("#tab-edit")
        assert page.locator("#negative_prompt").is_visible() and page.locator("#strength").is_visible()
        assert page.get_attribute("#image", "multiple") is not None
        assert "up to 3" in page.inner_text("#image-legend")
        image = tmp_path / "in.png"
        image.write_bytes(png_bytes((32, 32)))
        page.set_input_files("#image", [str(image), str(image)])
        page.wait_for_function("document.querySelectorAll('#inputs img').length === 2")
        assert page.locator("#mask-editor").is_visible()

        # Keyboard: arrow keys move between the tabs the model has.
        page.focus("#tab-edit")
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.id") == "tab-vary"
        assert page.get_attribute("#tab-vary", "aria-selected") == "true"

        page.select_option("select[name=model]", "retoucher")  # edits, but no mask
        page.click("#tab-edit")
        page.set_input_files("#image", str(image))
        page.wait_for_selector("#inputs img")
        assert page.locator("#mask-editor").is_hidden()
        assert page.get_attribute("#image", "multiple") is None


def test_docs_render_the_image_operations_offline(tmp_path, page):
    with ThreadedServer(fake_app(tmp_path, FakeRunner())) as server:
        server.wait_ready()
        page.goto(f"{server.base_url}/docs")
        for operation in ("generations", "edits", "variations"):
            page.wait_for_selector(f".opblock-summary-path[data-path='/v1/images/{operation}']")
        # The operations open and show their request bodies.
        page.click(".opblock-summary-path[data-path='/v1/images/edits']")
        page.wait_for_selector(".opblock-body select option[value='multipart/form-data']", state="attached")


def test_generate_and_edit_with_the_real_pipeline(tiny_sd_server, page, tmp_path):
    open_playground(page, tiny_sd_server)
    assert "tiny-sd" in page.input_value("select[name=model]")
    page.fill("textarea[name=prompt]", "a lighthouse at dusk, oil painting")
    page.fill("#size", "64x64")
    page.fill("#num_inference_steps", "6")
    page.fill("#seed", "7")
    page.select_option("#partial_images", "2")
    page.click("button[type=submit]")
    page.wait_for_selector("#results img", timeout=120_000)
    log = page.evaluate("window.imageLog")
    assert "partial" in log and log.index("partial") < log.index("final")
    [result] = results(page)
    assert result["image"].size == (64, 64) and result["seed"] == "seed 7"
    screenshot(page, "playground-generate.png")

    page.click("#results button:has-text('Use as input')")
    page.wait_for_selector("#mask-editor", state="visible")
    paint(page, (0.2, 0.3), (0.8, 0.7))
    page.fill("textarea[name=prompt]", "a lighthouse in a storm")
    screenshot(page, "playground-edit.png")
    page.click("button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#results img').length === 2", timeout=120_000)
    assert results(page)[0]["image"].size == (64, 64)


JOB_STORAGE = "diffuser-api.playground.job"


def test_an_async_generation_survives_a_page_reload_and_shows_its_image(tmp_path, page):
    gate = threading.Event()
    runner = FakeRunner(step_delay_s=0.05, gate=gate)
    with ThreadedServer(fake_app(tmp_path, runner, job_poll_s=0.05)) as server:
        server.wait_ready()
        open_playground(page, server)
        page.fill("textarea[name=prompt]", "a slow lighthouse")
        page.fill("#seed", "31")
        page.fill("#num_inference_steps", "6")
        page.check("#async")
        page.click("button[type=submit]")
        page.wait_for_selector("#status:has-text('Job imgjob_')")
        job_id = page.evaluate(f"JSON.parse(localStorage.getItem('{JOB_STORAGE}')).id")
        assert httpx.get(f"{server.base_url}/v1/images/jobs/{job_id}", timeout=10).json()["status"] in (
            "queued", "in_progress")  # held by the gate: the reload comes before any image
        page.reload()
        page.wait_for_selector(f"#status:has-text('Job {job_id}')")  # re-attached from local storage
        assert page.locator("#live progress").count() == 1
        gate.set()
        page.wait_for_selector("#results img")
        [result] = results(page)
        assert result["image"].convert("RGB").getpixel((0, 0)) == colour_of("a slow lighthouse", 31)
        assert result["seed"] == "seed 31"
        assert page.evaluate(f"localStorage.getItem('{JOB_STORAGE}')") is None  # ended: nothing to re-attach
        assert [job.prompt for job in runner.jobs_seen] == ["a slow lighthouse"]  # one job, not a resubmission
        page.reload()
        page.wait_for_selector("select[name=model] option", state="attached")
        assert page.locator("#live progress").count() == 0


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory, tiny_lora) -> Iterator[LiveServer]:
    """``diffuser-api serve`` with tiny-sd and two random LoRAs, and the same weights once more
    as a model without any (described, never loaded, so it costs nothing to serve)."""
    folder = tmp_path_factory.mktemp("playground-loras")
    (folder / "models.yaml").write_text(f"""
models:
  - id: tiny-sd
    defaults: {{steps: 2, size: 64x64}}
    adapters:
      ink: {{source: {tiny_lora("tiny-sd", 1)}}}
      neon: {{source: {tiny_lora("tiny-sd", 2)}, scale: 0.8}}
  - id: plain-sd
    source: tiny-sd
""")
    live = LiveServer(folder, DIFFUSER_MODELS_FILE=str(folder / "models.yaml"), DIFFUSER_JOB_POLL_S="0.1")
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


def test_lora_inputs_show_only_for_a_model_with_adapters_and_are_sent(lora_server, page):
    with page.expect_response("**/v1/models/tiny-sd") as described:
        open_playground(page, lora_server)
    assert [adapter["name"] for adapter in described.value.json()["adapters"]] == ["ink", "neon"]
    page.wait_for_selector("#loras-field", state="visible")
    assert page.locator("#loras input[name=lora]").count() == 2
    assert page.get_attribute("[aria-label='Scale of neon']", "placeholder") == "0.8"  # its default scale
    page.select_option("select[name=model]", "plain-sd")
    page.wait_for_selector("#loras-field", state="hidden")  # no adapters: no LoRA inputs
    page.select_option("select[name=model]", "tiny-sd")
    page.wait_for_selector("#loras-field", state="visible")

    page.fill("textarea[name=prompt]", "a tiny castle")
    page.check("#async")
    page.check("#loras input[value=ink]")
    # A scale beyond DIFFUSER_MAX_LORA_SCALE: the server's refusal shows next to the LoRA field.
    page.fill("[aria-label='Scale of ink']", "5")
    with page.expect_request("**/v1/images/generations") as submitted:
        page.click("button[type=submit]")
    assert submitted.value.post_data_json["loras"] == [{"name": "ink", "scale": 5}]
    page.wait_for_selector("#loras-error:has-text('outside')")
    page.fill("[aria-label='Scale of ink']", "0.5")
    with page.expect_request("**/v1/images/generations") as submitted:
        page.click("button[type=submit]")
    assert submitted.value.post_data_json["loras"] == [{"name": "ink", "scale": 0.5}]
    page.wait_for_selector("#results img", timeout=60_000)  # the job ran with the adapter
