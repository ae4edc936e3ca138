"""The drawing page at / in a real browser: Debian's chromium and chromium-driver, driven by Selenium.

Real MNIST test digits are drawn stroke by stroke onto the canvas with a mouse and with a finger; the
digit the page shows must be the model's answer for the 28x28 input the page shows, and that input must be
the MNIST framing of what is on the canvas. Without a browser the tests are skipped and say why, except
where MNIST_REQUIRE_BROWSER=1 (CI sets it, having installed the browser): there they fail.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc

from helpers import wait_for

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
PAD, SIDE, BOX = 280, 28, 20  # as in serving/http/page/index.html


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing = f"{CHROMIUM} or {CHROMEDRIVER} missing: apt-get install chromium chromium-driver"
        if os.environ.get("MNIST_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=820,560",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def open_page(browser, running) -> None:
    browser.get(f"http://127.0.0.1:{running.server.http_port}/")
    wait_for(lambda: browser.execute_script("return document.getElementById('model').options.length") > 0,
             what="the model list")  # fmt: skip


def strokes_of(digit: np.ndarray, threshold: int = 96) -> list[list[tuple[int, int]]]:
    """The digit as a person might colour it in: one horizontal stroke per run of ink in each row, in canvas
    coordinates (ten canvas pixels per MNIST pixel)."""
    strokes = []
    for y, row in enumerate(digit >= threshold):
        x = 0
        while x < SIDE:
            if row[x]:
                start = x
                while x < SIDE and row[x]:
                    x += 1
                strokes.append([(10 * start + 5, 10 * y + 5), (10 * (x - 1) + 5, 10 * y + 5)])
            x += 1
    return strokes


def draw(browser, strokes: list[list[tuple[int, int]]], pointer: str = "mouse") -> None:
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    canvas = browser.find_element("id", "pad")
    kind = interaction.POINTER_TOUCH if pointer == "touch" else interaction.POINTER_MOUSE
    actions = ActionBuilder(browser, mouse=PointerInput(kind, pointer), duration=0)
    for stroke in strokes:
        x, y = stroke[0]
        actions.pointer_action.move_to(canvas, x - PAD // 2, y - PAD // 2).pointer_down()
        for x, y in stroke[1:]:
            actions.pointer_action.move_to(canvas, x - PAD // 2, y - PAD // 2)
        actions.pointer_action.pointer_up()
    actions.perform()


def settled(browser) -> dict:
    """What the page shows once its last request has been answered."""
    wait_for(
        lambda: browser.execute_script("return document.getElementById('result').ariaBusy") == "false",
        what="the page's last prediction",
    )
    return browser.execute_script(
        """
        const red = (id, n) => Array.from(document.getElementById(id).getContext('2d')
            .getImageData(0, 0, n, n).data.filter((_, i) => i % 4 === 0));
        return {
            digit: document.getElementById('digit').textContent,
            input: red('input', 28),
            canvas: red('pad', 280),
            bars: Array.from(document.querySelectorAll('#bars li'), li => Number(li.ariaValueNow)),
            latency: document.getElementById('latency').textContent,
            status: document.getElementById('status').textContent,
        };
        """
    )


def mnist_framing(canvas: np.ndarray) -> np.ndarray:
    """The page's rule in numpy: the ink's bounding box area-averaged to fit 20x20 (aspect kept), placed
    with its centre of mass at pixel (14, 14) of 28x28."""
    ys, xs = np.nonzero(canvas)
    top, left = ys.min(), xs.min()
    h, w = ys.max() - top + 1, xs.max() - left + 1
    scale = BOX / max(w, h)
    th, tw = max(1, int(np.floor(h * scale + 0.5))), max(1, int(np.floor(w * scale + 0.5)))

    def overlap(n: int, size: int) -> np.ndarray:  # [size, n]: how much of source pixel j output i covers
        step = n / size
        starts = np.arange(size)[:, None] * step
        j = np.arange(n)[None, :]
        return np.clip(np.minimum(j + 1, starts + step) - np.maximum(j, starts), 0, None)

    crop = canvas[top : top + h, left : left + w].astype(np.float64)
    small = overlap(h, th) @ crop @ overlap(w, tw).T / ((h / th) * (w / tw))
    mass = small.sum()
    cy = (small.sum(1) * np.arange(th)).sum() / mass
    cx = (small.sum(0) * np.arange(tw)).sum() / mass
    oy, ox = int(np.floor(SIDE / 2 - cy + 0.5)), int(np.floor(SIDE / 2 - cx + 0.5))
    out = np.zeros((SIDE, SIDE), np.uint8)
    for y in range(th):
        for x in range(tw):
            if 0 <= y + oy < SIDE and 0 <= x + ox < SIDE:
                out[y + oy, x + ox] = int(np.floor(small[y, x] + 0.5))
    return out


def model_answer(running, pixels: np.ndarray, token: str = "") -> np.ndarray:
    tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 1, 28, 28])
    request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[pixels.tobytes()])
    with running.channel() as channel:
        response = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=10, metadata=[("authorization", f"Bearer {token}")] if token else None
        )
    return np.frombuffer(response.raw_output_contents[0], "<f4")


def clear(browser) -> None:
    browser.find_element("id", "clear").click()
    wait_for(lambda: settled(browser)["digit"] == "", what="a cleared page")


def test_drawn_mnist_digits_get_the_models_answer(browser, server, mnist, tmp_path) -> None:
    open_page(browser, server)
    drawn, right = 0, 0
    for i, pointer in zip(range(6), ["mouse", "touch"] * 3, strict=True):
        digit, label = mnist.test_images[i], int(mnist.test_labels[i])
        draw(browser, strokes_of(digit), pointer)
        shown = settled(browser)
        page_input = np.array(shown["input"], np.uint8).reshape(SIDE, SIDE)
        canvas = np.array(shown["canvas"], np.uint8).reshape(PAD, PAD)
        assert np.abs(page_input.astype(int) - mnist_framing(canvas)).max() <= 1, (
            f"digit {i} framed otherwise"
        )
        probabilities = model_answer(server, page_input)
        assert shown["digit"] == str(probabilities.argmax()), (i, shown["digit"], probabilities)
        np.testing.assert_allclose(shown["bars"], probabilities, atol=1e-4)
        assert "server" in shown["latency"] and shown["status"] == ""
        drawn, right = drawn + 1, right + (shown["digit"] == str(label))
        clear(browser)
    # The framing is MNIST's: colouring in real test digits gives the model what it was trained on.
    assert right >= 5, f"{right} of {drawn} drawn digits recognised"
    screenshot = tmp_path / "page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 1000


def test_keyboard_undo_and_clear(browser, server, mnist) -> None:
    open_page(browser, server)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    strokes = strokes_of(mnist.test_images[0])
    draw(browser, strokes)
    full = settled(browser)
    draw(browser, [[(20, 260), (260, 260)]])  # a stray line along the bottom
    assert settled(browser)["canvas"] != full["canvas"]
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()
    undone = settled(browser)
    assert undone["canvas"] == full["canvas"] and undone["digit"] == full["digit"]
    ActionChains(browser).send_keys(Keys.ESCAPE).perform()
    wait_for(lambda: settled(browser)["digit"] == "", what="Escape to clear the page")
    assert not any(settled(browser)["canvas"]) and not any(settled(browser)["bars"])
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('label, [aria-label]'), "
        "e => e.ariaLabel || e.textContent)"
    )
    assert any("Token" in text for text in labels) and any("Model" in text for text in labels)


def test_the_page_asks_for_the_token_and_uses_it(browser, start_server, repo, tmp_path, mnist) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("page-s3cret")
    running = start_server(repo, auth_token_file=token_file)
    browser.get(f"http://127.0.0.1:{running.server.http_port}/")
    status = browser.find_element("id", "status")
    wait_for(lambda: "401" in status.text, what="the page to say it needs the token")
    field = browser.find_element("id", "token")
    field.send_keys("page-s3cret\t")  # the change event fires when the field loses focus
    wait_for(lambda: browser.execute_script("return document.getElementById('model').options.length") > 0,
             what="the model list, with the token")  # fmt: skip
    draw(browser, strokes_of(mnist.test_images[1]))
    shown = settled(browser)
    page_input = np.array(shown["input"], np.uint8).reshape(SIDE, SIDE)
    answer = model_answer(running, page_input, "page-s3cret")
    assert shown["digit"] == str(answer.argmax()) and shown["status"] == ""
    browser.execute_script("sessionStorage.clear()")
