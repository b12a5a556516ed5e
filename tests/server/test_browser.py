"""The web UI as a person uses it: headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by Selenium against the in-process server. Skipped, with the reason, only where chromium
is not installed (`make test` installs it)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from optimized_sd.pipelines.diffusion import GenerationRequest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TIMEOUT = 300  # seconds for one generation on a loaded CI machine; every wait is bounded

pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="the browser tests need Debian's chromium and chromium-driver (`make test` installs them)",
    ),
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),  # gradio's queue on pandas 3
]


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [test] extra")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1200",
        "--no-proxy-server",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def wait_for(condition, what: str, timeout: float = TIMEOUT, interval: float = 0.05):
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout`."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (NoSuchElementException, StaleElementReferenceException):
            value = None
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def type_into(driver, selector: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field = css(driver, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.BACKSPACE)
    field.send_keys(text)
    field.send_keys(Keys.TAB)  # gradio commits number fields on blur


def open_ui(driver, server) -> None:
    driver.get(server.url + "/")
    wait_for(lambda: css(driver, "#txt2img-generate").is_displayed(), "the page to load")


def fill_form(driver, tab: str, prompt: str, seed: int, steps: int, size: int = 64) -> None:
    type_into(driver, f"#{tab}-prompt textarea", prompt)
    type_into(driver, f"#{tab}-steps input[type=number]", str(steps))
    type_into(driver, f"#{tab}-width input[type=number]", str(size))
    type_into(driver, f"#{tab}-height input[type=number]", str(size))
    type_into(driver, f"#{tab}-seed input[type=number]", str(seed))


def progress_state(driver, tab: str) -> tuple[str, int]:
    bar = css(driver, f"#{tab}-progress .osd-progress")
    return bar.get_attribute("data-state"), int(bar.get_attribute("data-percent"))


def progress_job(driver, tab: str) -> str:
    return css(driver, f"#{tab}-progress .osd-progress").get_attribute("data-job")


def generate_and_watch(driver, tab: str) -> set[int]:
    """Press Generate and record the progress bar's percentages until the new job is done."""
    before = progress_job(driver, tab)
    css(driver, f"#{tab}-generate").click()
    seen: set[int] = set()

    def finished() -> bool:
        # The job first: a state read after it is that job's (read the other way round, a finished
        # earlier bar's state could be paired with the new job's id when a render lands in between).
        job = progress_job(driver, tab)
        state, percent = progress_state(driver, tab)
        seen.add(percent)
        return job != before and state in ("done", "error", "interrupted", "cancelled")

    wait_for(finished, f"the {tab} job to finish")
    return seen


def gallery_image(driver, tab: str) -> Image.Image:
    source = wait_for(lambda: css(driver, f"#{tab}-gallery img").get_attribute("src"), "a gallery image")
    return Image.open(io.BytesIO(requests.get(source, timeout=30).content))


def test_txt2img_in_the_browser(browser, server, reference_pipe):
    open_ui(browser, server)
    fill_form(browser, "txt2img", "a lighthouse at dusk", seed=1234, steps=20)
    seen = generate_and_watch(browser, "txt2img")
    assert progress_state(browser, "txt2img") == ("done", 100)
    assert any(0 < p < 100 for p in seen), f"the progress bar never showed a step in between: {sorted(seen)}"
    assert "seed 1234" in css(browser, "#txt2img-gallery").text
    parameters = css(browser, "#txt2img-parameters textarea").get_attribute("value")
    assert parameters.startswith("a lighthouse at dusk\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 64x64")
    assert "unet" in css(browser, "#txt2img-memory textarea").get_attribute("value")
    assert css(browser, "#txt2img-preview img").get_attribute("src")  # the live latent preview stays after the run
    shown = gallery_image(browser, "txt2img")
    assert shown.info.get("parameters") == parameters  # the served PNG (the download) carries the metadata
    expected = reference_pipe.generate(
        GenerationRequest(prompts=["a lighthouse at dusk"], steps=20, scale=7.0, sampler="euler_a", seed=1234, height=64, width=64)
    )
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected.images[0]))
    if os.environ.get("OSD_UI_SCREENSHOT"):  # docs/ui.png is made this way
        browser.save_screenshot(os.environ["OSD_UI_SCREENSHOT"])
    css(browser, "#txt2img-seed-random").click()
    wait_for(lambda: css(browser, "#txt2img-seed input[type=number]").get_attribute("value") == "-1", "the seed to become random")
    css(browser, "#txt2img-seed-reuse").click()
    wait_for(lambda: css(browser, "#txt2img-seed input[type=number]").get_attribute("value") == "1234", "the last seed to come back")


def test_img2img_upload_in_the_browser(browser, server, tmp_path):
    open_ui(browser, server)
    click_tab(browser, "img2img")
    wait_for(lambda: css(browser, "#img2img-generate").is_displayed(), "the img2img tab")
    css(browser, "#img2img-generate").click()  # no image yet: a message, not a stack trace
    error = wait_for(lambda: css(browser, "#img2img-error .osd-error").text, "the missing-image message")
    assert "needs an init image" in error and "Traceback" not in error
    picture = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(picture)
    css(browser, "#img2img-init input[type=file]").send_keys(str(picture))
    wait_for(lambda: css(browser, "#img2img-init img").get_attribute("src"), "the uploaded image to show")
    fill_form(browser, "img2img", "an oil painting", seed=99, steps=6)
    generate_and_watch(browser, "img2img")
    assert progress_state(browser, "img2img")[0] == "done", css(browser, "#img2img-error").text
    assert "seed 99" in css(browser, "#img2img-gallery").text
    assert "Denoising strength: 0.75" in css(browser, "#img2img-parameters textarea").get_attribute("value")


def draw_stroke(driver, canvas, offsets: list[tuple[int, int]]) -> None:
    """A mouse drag through `offsets` (CSS pixels from the canvas's centre), as a person paints."""
    from selenium.webdriver.common.action_chains import ActionChains

    x0, y0 = offsets[0]
    chain = ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold()
    for (x, y), (px, py) in zip(offsets[1:], offsets, strict=False):
        chain = chain.move_by_offset(x - px, y - py)
    chain.release().perform()


def test_inpaint_draw_a_mask_in_the_browser(browser, server, tmp_path):
    open_ui(browser, server)
    click_tab(browser, "inpaint")
    wait_for(lambda: css(browser, "#inpaint-generate").is_displayed(), "the inpaint tab")
    css(browser, "#inpaint-generate").click()  # no image yet: a message, not a stack trace
    error = wait_for(lambda: css(browser, "#inpaint-error .osd-error").text, "the missing-image message")
    assert "inpaint needs an image" in error and "Traceback" not in error
    picture = tmp_path / "init.png"
    init = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(init).save(picture)
    css(browser, "#inpaint-editor input[type=file]").send_keys(str(picture))
    canvas = wait_for(lambda: css(browser, "#inpaint-editor .pixi-target canvas"), "the editor's canvas")
    fill_form(browser, "inpaint", "a red door", seed=31, steps=4)
    css(browser, "#inpaint-generate").click()  # an image but nothing painted yet
    wait_for(lambda: "nothing to repaint" in css(browser, "#inpaint-error").text, "the empty-mask message")
    # A horizontal stroke through the middle: the canvas shows the 64 px image centred and zoomed in,
    # so +-60 CSS pixels about the centre stay on the image.
    draw_stroke(browser, canvas, [(-60, 0), (-20, 2), (20, -2), (60, 0)])
    generate_and_watch(browser, "inpaint")
    assert progress_state(browser, "inpaint")[0] == "done", css(browser, "#inpaint-error").text
    assert "seed 31" in css(browser, "#inpaint-gallery").text
    assert "Denoising strength: 0.75" in css(browser, "#inpaint-parameters textarea").get_attribute("value")
    got = np.asarray(gallery_image(browser, "inpaint").convert("RGB"))
    assert got.shape == init.shape
    far = np.r_[0:8, 56:64]  # rows well away from the stroke and its 4-pixel blur: the upload's own pixels
    assert np.array_equal(got[far], init[far])
    assert not np.array_equal(got[28:36], init[28:36])  # the painted band was repainted


def click_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]"):
        if button.text.strip() == name:
            button.click()
            return
    pytest.fail(f"no {name} tab")


def test_cancel_stops_the_job_in_the_browser(browser, server):
    open_ui(browser, server)
    fill_form(browser, "txt2img", "never finished", seed=5, steps=150)
    css(browser, "#txt2img-generate").click()
    wait_for(lambda: progress_state(browser, "txt2img")[1] > 0, "the first steps")
    css(browser, "#txt2img-cancel").click()
    wait_for(lambda: progress_state(browser, "txt2img")[0] == "interrupted", "the job to stop")
    state, percent = progress_state(browser, "txt2img")
    assert percent < 100
    assert "interrupted after step" in css(browser, "#txt2img-progress").text


def test_a_waiting_job_shows_its_place_in_the_queue(browser, server):
    import threading

    box: dict = {}
    long_job = {"prompt": "hogging the device", "steps": 400, "width": 64, "height": 64}
    api_call = threading.Thread(
        target=lambda: box.setdefault("r", requests.post(f"{server.url}/sdapi/v1/txt2img", json=long_job, timeout=TIMEOUT))
    )
    api_call.start()
    try:
        progress = f"{server.url}/sdapi/v1/progress"
        wait_for(lambda: requests.get(progress, timeout=30).json()["state"]["sampling_step"] > 0, "the API job to run")
        open_ui(browser, server)
        fill_form(browser, "txt2img", "waiting my turn", seed=8, steps=3)
        css(browser, "#txt2img-generate").click()
        wait_for(lambda: "1st in the queue" in css(browser, "#txt2img-progress").text, "the queue position")
        assert progress_state(browser, "txt2img") == ("waiting", 0)
    finally:
        requests.post(f"{server.url}/sdapi/v1/interrupt", timeout=30)
        api_call.join(TIMEOUT)
    assert box["r"].status_code == 200
    wait_for(lambda: progress_state(browser, "txt2img")[0] == "done", "the waiting job to run after the interrupt")
    assert "seed 8" in css(browser, "#txt2img-gallery").text
