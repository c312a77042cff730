"""``raypets serve``: one real ``raypets serve`` process per module (its own local Ray and Serve), real HTTP requests,
its page driven in a real headless Chromium, then Ctrl+C; and the CLI's errors and ``serve_config.yaml`` without Ray.

The server's masks are compared with the files ``raypets predict --masks`` writes for the same images, byte for byte.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import free_ports, ray_checkpoint_folder, save_image
from PIL import Image

from raypets.cli import main
from raypets.inference import overlay

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("RAYPETS_CHROMIUM") or REPO / ".ci" / "cache" / "chromium")
SIZE = 32
# name -> (height, width, mode): sizes other than the network's; an RGBA PNG (repaired to RGB) and a JPEG
IMAGES = {"cat.jpg": (40, 56, "RGB"), "dog.png": (50, 30, "RGBA")}
START_TIMEOUT_S, STOP_TIMEOUT_S = 180, 60
CLASSES = ["pet", "background", "border"]


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _request(url: str, data: bytes | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, or of a POST of ``data``; an HTTP error status is returned too."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _health(server: dict) -> dict:
    status, _, body = _request(f"{server['url']}/healthz")
    assert status == 200
    return json.loads(body)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _log_tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-30:])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A Ray checkpoint (``ckpt``) and two images (``in``) of sizes other than the network's."""
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    for name, (height, width, mode) in IMAGES.items():
        save_image(root / "in" / name, rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode=mode)
    ray_checkpoint_folder(root / "ckpt", epoch=1, seed=0)
    return root


@pytest.fixture(scope="module")
def starting(inputs):
    """``raypets serve`` started in a process group of its own, as a terminal starts it (not waited for: the first
    test runs predict meanwhile); ``url``, ``port``, ``process``, ``log``. The last test stops it with Ctrl+C;
    stopped here (then killed) if it still runs."""
    port = free_ports(1)[0]
    log = inputs / "serve.log"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "raypets.cli", "serve", "--checkpoint", str(inputs / "ckpt"), "--port", str(port),
               "--size", str(SIZE), "--cpu"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "process": process, "log": log,
           "deadline": time.monotonic() + START_TIMEOUT_S}
    for sig, wait in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGKILL, 10)):
        if process.poll() is None:
            os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(wait)


@pytest.fixture
def server(starting) -> dict:
    """``starting``'s server once it says it serves (the application answers by then)."""
    while b"Ctrl+C stops" not in starting["log"].read_bytes():
        process, log = starting["process"], starting["log"]
        assert process.poll() is None, f"raypets serve exited with {process.returncode}:\n{_log_tail(log)}"
        assert time.monotonic() < starting["deadline"], f"raypets serve not ready in time:\n{_log_tail(log)}"
        time.sleep(0.5)
    return starting


@pytest.mark.ray
def test_masks_are_the_pixels_predict_writes_also_when_batched(starting, inputs, tmp_path, ray_local, request):
    code, printed, _ = _cli("predict", "--checkpoint", str(inputs / "ckpt"), str(inputs / "in"), str(tmp_path / "out"),
                            "--size", str(SIZE), "--masks", "--workers", "1", "--no-progress")
    assert code == 0, printed
    server = request.getfixturevalue("server")  # waits for it only now: it started while predict ran
    expected = {name: (tmp_path / "out" / "masks" / Path(name).with_suffix(".png")).read_bytes() for name in IMAGES}
    # Twelve requests at once: the replica batches them (max batch 16), and each still gets its own image's mask.
    before = _health(server)
    names = list(IMAGES) * 6
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda name: _request(f"{server['url']}/segment",
                                                      (inputs / "in" / name).read_bytes()), names))
    for name, (status, kind, body) in zip(names, answers, strict=True):
        assert (status, kind) == (200, "image/png"), body[:200]
        height, width, _ = IMAGES[name]
        assert _png_pixels(body).shape == (height, width)
        np.testing.assert_array_equal(_png_pixels(body), _png_pixels(expected[name]))
        assert body == expected[name]  # the same encoder: the same file, byte for byte
    assert len(np.unique(_png_pixels(expected["cat.jpg"]))) > 1  # a real mask, not one class everywhere
    after = _health(server)
    assert after["images"] - before["images"] == len(names)
    assert after["forward_passes"] - before["forward_passes"] < len(names)  # some passes took several images


@pytest.mark.ray
def test_json_gives_the_class_fractions_and_the_mask(server, inputs):
    image = (inputs / "in" / "dog.png").read_bytes()
    status, kind, body = _request(f"{server['url']}/segment?format=json", image)
    assert (status, kind) == (200, "application/json")
    answer = json.loads(body)
    mask = _png_pixels(base64.b64decode(answer["mask_png"]))
    assert (answer["height"], answer["width"]) == mask.shape == IMAGES["dog.png"][:2]
    assert answer["repair"] == "RGBA converted to RGB"
    assert list(answer["classes"]) == CLASSES
    counts = np.bincount(mask.ravel(), minlength=len(CLASSES))
    assert [answer["classes"][name] for name in CLASSES] == pytest.approx(counts / mask.size)
    _, _, png = _request(f"{server['url']}/segment", image)
    np.testing.assert_array_equal(_png_pixels(png), mask)


@pytest.mark.ray
def test_a_body_that_is_no_usable_image_is_a_400_with_one_line_and_serving_goes_on(server, inputs):
    truncated = (inputs / "in" / "dog.png").read_bytes()[:200]
    cases = {b"": "empty file", b"not an image at all": "not an image file", truncated: "truncated image data"}
    for body, reason in cases.items():
        status, kind, answer = _request(f"{server['url']}/segment", body)
        assert (status, kind.split(";")[0]) == (400, "text/plain")
        assert answer.decode() == f"{reason}\n"
    status, _, answer = _request(f"{server['url']}/segment?format=xml", (inputs / "in" / "cat.jpg").read_bytes())
    assert status == 400 and answer.decode() == "unknown format 'xml'; choose png or json\n"
    status, kind, _ = _request(f"{server['url']}/segment", (inputs / "in" / "cat.jpg").read_bytes())
    assert (status, kind) == (200, "image/png")
    assert server["process"].poll() is None


@pytest.mark.ray
def test_healthz_and_the_page_are_served(server):
    health = _health(server)
    assert health["status"] == "ok" and health["images"] >= health["forward_passes"] > 0
    assert (health["classes"], health["size"], health["max_batch"], health["device"]) == (CLASSES, [SIZE, SIZE], 16,
                                                                                          "cpu")
    status, kind, page = _request(f"{server['url']}/")
    assert status == 200 and kind.startswith("text/html")
    assert b'type="file"' in page and b"segment?format=json" in page
    assert b"http://" not in page and b"https://" not in page  # self-contained: nothing fetched from elsewhere


def _chromium_driver():
    """Selenium's Chrome driver on ``.ci/chromium``'s Chromium, headless; fail under ``.ci/run`` (which sets
    RAYPETS_CHROMIUM_REQUIRED) when it is missing, else skip with the way to get it."""
    binaries = [CHROMIUM / "bin" / "chromium", CHROMIUM / "bin" / "chromedriver"]
    missing = [str(path) for path in binaries if not os.access(path, os.X_OK)]
    if missing:
        give_up = pytest.fail if os.environ.get("RAYPETS_CHROMIUM_REQUIRED") else pytest.skip
        give_up(f"the page test needs a Chromium and chromedriver: missing {', '.join(missing)}; `.ci/chromium` "
                f"downloads them (apt-get download) into {CHROMIUM}, and `.ci/run` calls it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(binaries[0])
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(binaries[1])))


@pytest.mark.ray
def test_the_page_shows_a_dropped_photo_with_its_mask_overlaid_and_the_fractions(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = np.random.default_rng(3).integers(0, 256, (36, 44, 3), dtype=np.uint8)
    path = save_image(tmp_path / "photo.png", photo)  # lossless: the browser decodes the very pixels
    status, _, body = _request(f"{server['url']}/segment?format=json", path.read_bytes())
    assert status == 200
    answer = json.loads(body)
    mask = _png_pixels(base64.b64decode(answer["mask_png"]))
    expected = overlay(photo, mask, CLASSES.index("background"))  # as predict's --overlays
    assert (expected != photo).any()  # some pixels are tinted: the overlay is visible

    driver = _chromium_driver()
    try:
        driver.get(f"{server['url']}/")
        driver.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#fractions tr"))
        rows = driver.find_elements(By.CSS_SELECTOR, "#fractions tr")
        shown = {row.find_elements(By.TAG_NAME, "td")[1].text: row.find_elements(By.TAG_NAME, "td")[2].text
                 for row in rows}
        assert shown == {name: f"{100 * share:.1f} %" for name, share in answer["classes"].items()}
        assert driver.find_element(By.ID, "status").text == "photo.png: 44×36"
        canvas = driver.execute_script(
            "const view = document.getElementById('view');"
            "return [view.width, view.height, view.hidden,"
            "        Array.from(view.getContext('2d').getImageData(0, 0, view.width, view.height).data)];")
    finally:
        driver.quit()
    width, height, hidden, rgba = canvas
    assert (width, height, hidden) == (44, 36, False)
    np.testing.assert_array_equal(np.array(rgba, np.uint8).reshape(36, 44, 4)[..., :3], expected)


def test_serve_config_yaml_deploys_the_builder_with_valid_settings():
    from ray.serve.schema import ServeDeploySchema

    import raypets.stages.serve as serve_stage

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve_config.yaml").read_text()))
    (application,) = config.applications
    module, name = application.import_path.split(":")
    assert (module, name) == ("raypets.stages.serve", "app")
    deployment = serve_stage.app(application.args)._bound_deployment  # what `serve deploy` builds from the file
    assert deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 1}
    assert deployment._deployment_config.autoscaling_config.max_replicas == application.args["replicas"] == 16
    assert deployment.max_ongoing_requests == 2 * application.args["max_batch"]


def test_cli_mistakes_are_one_error_line_before_any_ray_work(inputs, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # local Ray: the port is checked here
    code, _, err = _cli("serve", "--checkpoint", str(inputs / "nothing"))
    assert code == 2 and err == f"raypets: error: {inputs / 'nothing'}: checkpoint does not exist\n"
    code, _, err = _cli("serve", "--checkpoint", str(inputs / "ckpt"), "--max-batch", "0")
    assert code == 2 and err == "raypets: error: --max-batch must be at least 1, got 0\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = _cli("serve", "--checkpoint", str(inputs / "ckpt"), "--port", str(port))
    assert code == 2 and err.startswith(f"raypets: error: cannot serve at 127.0.0.1:{port}: ") and err.count("\n") == 1


@pytest.mark.ray
def test_ctrl_c_shuts_serve_down_and_exits_cleanly(server):
    """Last of the server's tests: Ctrl+C in a terminal signals the whole process group (Ray's own processes too)."""
    process = server["process"]
    os.killpg(process.pid, signal.SIGINT)
    started = time.monotonic()
    assert process.wait(STOP_TIMEOUT_S) == 0, _log_tail(server["log"])
    log = server["log"].read_text(errors="replace")
    assert "raypets serve: stopped" in log and "Traceback" not in log
    assert time.monotonic() - started < STOP_TIMEOUT_S and not _listening(server["port"])
