"""The web page in a real browser (issue 6, item 5): headless Chromium, driven by Playwright, uploads images to
a live service and checks that each result appears with its label, probability bars and heat map.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` Python package (never ``playwright
install``); skipped otherwise. The screenshot goes to ``$FAKEPRINT_SCREENSHOT_DIR`` (default: pytest's tmp dir).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import fakeprint
from conftest_service import (  # noqa: F401
    CLASSES,
    encode,
    make_checkpoint,
    one_thread,
    pil_limit_restored,
    random_images,
    running_server,
)
from fakeprint.data.demo import GENERATORS, render
from fakeprint.interfaces.serve import build_service, create_app
from fakeprint.reports.gradcam import GradCAM

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} not found (Debian: apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                               "(pip install playwright; the browser is Debian's chromium, no 'playwright install')")
expect = sync_api.expect


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    # random weights; this seed happens to give varied answers and heat maps on the demo images (a nicer screenshot)
    return make_checkpoint(tmp_path_factory.mktemp("browser"), sharpen=12.0, seed=16,
                           metrics={"val_acc": 0.99},
                           held_out={"accuracy": 0.9412, "split": "internal split: 1250 images", "selection": "last epoch",
                                     "tta": "none", "how": "this model, on images it never trained on"})


@pytest.fixture(scope="module")
def url(run):
    with running_server(create_app(build_service(run))) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    problems: list[str] = []
    # (a 4xx answer to a deliberately bad upload is logged as "Failed to load resource": expected, not a problem)
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
          if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:"))
          else problems.append(f"request to {r.url}"))
    pg.problems = problems
    pg.goto(url + "/")
    yield pg
    context.close()


def _images(folder: Path) -> list[Path]:
    """One image from each of the demo dataset's five synthetic generators."""
    rng = np.random.default_rng(5)
    paths = []
    for k, name in enumerate(GENERATORS):
        paths.append(folder / f"demo-{k}-{name}.png")
        paths[-1].write_bytes(encode(render(k, rng)))
    return paths


def test_upload_shows_label_bars_and_heat_map(page, run, tmp_path, request):
    paths = _images(tmp_path)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    clf = fakeprint.load(run)
    expected = clf.predict(paths)
    cams = GradCAM(clf.model)(clf.to_array(paths), expected.labels).maps

    expect(page.locator("#model .chip.strong")).to_have_text("fpnet_tiny")
    chips = page.locator("#model .chip").all_text_contents()
    # the held-out figure, never the training run's own last-epoch metrics (99%)
    assert "torch backend" in chips and "held-out accuracy 94.1%" in chips and "99" not in chips

    page.set_input_files("#file-input", [str(p) for p in paths] + [str(bad)])
    expect(page.locator(".card.done")).to_have_count(5)
    expect(page.locator(".card.failed")).to_have_count(1)

    for path, lab, probs, cam in zip(paths, expected.labels, expected.probs, cams, strict=True):
        card = page.locator(f'.card.done[data-filename="{path.name}"]')
        assert card.count() == 1
        assert card.locator(".label-text").text_content() == f"Generator {CLASSES[lab]}"
        assert card.get_attribute("data-label") == CLASSES[lab]
        bars = card.locator("li.bar")
        assert bars.count() == 5
        assert card.locator("li.bar.top").get_attribute("data-class") == CLASSES[lab]
        widths = [float(w.rstrip("%")) for w in bars.evaluate_all("els => els.map(e => e.querySelector('.bar-fill').style.width)")]
        np.testing.assert_allclose(widths, probs * 100, atol=1e-3)
        assert card.locator(".confidence").text_content() == f"{probs.max() * 100:.1f}%"
        assert card.locator("img.photo").evaluate("img => img.complete && img.naturalWidth === 100")
        heat = card.locator(".cam-frame img.heat")
        if cam.max() > 0:
            assert heat.is_visible() and card.locator(".cam-frame img.under").is_visible()  # over the image
            assert heat.get_attribute("src").startswith("data:image/png;base64,")
            assert heat.evaluate("img => img.complete && img.naturalWidth === 100 && img.naturalHeight === 100")
            assert 0 < float(heat.evaluate("img => getComputedStyle(img).opacity")) < 1
        else:  # no positive evidence: said in words, not shown as a black square
            assert not heat.is_visible()
            assert card.locator(".cam-frame .placeholder").is_visible()
    assert any(c.max() > 0 for c in cams)  # (so that the heat-map branch above ran)

    failed = page.locator('.card.failed[data-filename="notes.png"]')
    assert "not an image" in failed.locator(".error").text_content()
    assert failed.locator(".photo-frame .placeholder").is_visible()  # no broken-image icon
    summary = page.locator("#summary").text_content()
    assert "5 images classified" in summary and "1 failed" in summary
    counts = {CLASSES[k]: int((expected.labels == k).sum()) for k in set(expected.labels.tolist())}
    for cls, n in counts.items():
        assert f"Generator {cls}: {n}" in summary

    # the cards keep the order the files were given in
    names = page.locator(".card").evaluate_all("els => els.map(e => e.dataset.filename)")
    assert names == [p.name for p in paths] + ["notes.png"]

    # the switch shows the heat map alone (opaque) or over the image; the slider sets its opacity
    shown = page.locator(".card.done .cam-frame:not(.empty) img.heat").first
    page.locator("#cam-toggle").uncheck()
    assert not page.locator(".card.done .cam-frame img.under").first.is_visible()
    assert shown.is_visible() and float(shown.evaluate("img => getComputedStyle(img).opacity")) == 1
    page.locator("#cam-toggle").check()
    page.locator("#cam-opacity").fill("30")
    assert float(shown.evaluate("img => getComputedStyle(img).opacity")) == pytest.approx(0.3)
    page.locator("#cam-opacity").fill("65")

    out_dir = Path(os.environ.get("FAKEPRINT_SCREENSHOT_DIR") or tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / "fakeprint-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")
    assert not page.problems, page.problems


def drop(page, name: str, png: bytes) -> None:
    """Drag and drop one PNG onto the page's drop zone, as a user would."""
    page.evaluate("""async ([name, bytes]) => {
        const file = new File([new Uint8Array(bytes)], name, { type: 'image/png' });
        const dt = new DataTransfer();
        dt.items.add(file);
        const zone = document.querySelector('#drop');
        zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
        zone.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", [name, list(png)])


def test_dropping_a_file_classifies_it(page, run):
    expect(page.locator("#model .chip.strong")).to_have_text("fpnet_tiny")
    png = encode(random_images(1, seed=62)[0])
    expected = fakeprint.load(run).predict(random_images(1, seed=62))
    drop(page, "dropped.png", png)
    page.wait_for_selector('.card.done[data-filename="dropped.png"]')
    assert page.locator(".card.done .label-text").text_content() == f"Generator {CLASSES[expected.labels[0]]}"
    assert page.locator('.card[data-filename="dropped.png"] .resized').count() == 0
    drop(page, "wide.png", encode(random_images(1, seed=63, size=160)[0]))  # not 100x100: the card says so
    expect(page.locator('.card.done[data-filename="wide.png"] .resized')).to_contain_text("resized from 160")
    assert not page.problems, page.problems


def test_a_service_with_an_api_token_asks_for_it_once(browser, run):
    """With a token (the service beyond loopback), the page asks for it at the first 401, keeps it for the tab and
    sends it with every call: the model loads and an upload is classified."""
    asked: list[str] = []
    with running_server(create_app(build_service(run), token="s3cret")) as base:
        context = browser.new_context()
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.on("dialog", lambda d: (asked.append(d.message), d.accept("s3cret")))
        pg.goto(base + "/")
        expect(pg.locator("#model .chip.strong")).to_have_text("fpnet_tiny")
        png = encode(random_images(1, seed=7)[0])
        drop(pg, "tok.png", png)
        pg.wait_for_selector('.card.done[data-filename="tok.png"]')
        context.close()
    assert len(asked) == 1 and "API token" in asked[0]


def test_a_routed_model_says_which_kind_of_file_and_which_member_answered(browser, tmp_path):
    """With ``routed`` each card says whether the file detector took it for a pristine or a re-saved file, and so
    which member answered. (Synthetic images look re-saved to the detector, so the route's threshold is moved to
    send the same file each way.)"""
    png = tmp_path / "image.png"
    png.write_bytes(encode(render(1, np.random.default_rng(8))))
    for threshold, perturbed in ((1.5, False), (0.0, True)):
        service = build_service("routed", cam=False)
        service.classifier.threshold = threshold
        with running_server(create_app(service)) as base:
            context = browser.new_context()
            pg = context.new_page()
            pg.set_default_timeout(60_000)
            pg.goto(base + "/")
            expect(pg.locator("#model .chip.strong")).to_contain_text("routed")
            pg.set_input_files("#file-input", [str(png)])
            note = pg.locator('.card.done[data-filename="image.png"] p.route')
            expect(note).to_have_count(1)
            text, classes = note.text_content(), note.get_attribute("class")
            context.close()
        if perturbed:
            assert "perturbed" in classes and "re-saved" in text and "answered by robust" in text
        else:
            assert "perturbed" not in classes and "as its generator wrote it" in text and "answered by default" in text
