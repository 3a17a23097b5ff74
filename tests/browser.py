"""Headless Chromium (Debian's chromium and chromium-driver, driven by selenium) for the report tests.

The network is closed here, so the browser is started with everything that
would reach out turned off, from a fresh profile, and selenium is handed the
driver's path so that its manager never looks for one online.

    python tests/browser.py RUN_FOLDER   # screenshots of every HTML artifact under RUN_FOLDER/screenshots
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTHS = (800, 1280)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")

# What the page reports about itself: does anything stick out past the viewport, are all pictures decoded.
_MEASURE = """
const doc = document.documentElement;
const images = Array.from(document.images);
return {
  viewport: window.innerWidth,
  scroll_width: Math.max(doc.scrollWidth, document.body.scrollWidth),
  height: Math.max(doc.scrollHeight, document.body.scrollHeight),
  images: images.length,
  broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40)),
  external: images.filter(i => !i.src.startsWith('data:')).map(i => i.src),
};
"""


def missing() -> str:
    """Why the browser cannot run here, or '' when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return f"{path} is missing: apt-get install -y chromium chromium-driver (.ci/run does)"
    return ""


class Browser:
    """One headless Chromium for many pages; ``render`` loads a file at a viewport width."""

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self._profile = tempfile.mkdtemp(prefix="kftune-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={self._profile}"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)

    def render(self, page: Path, width: int, screenshot: Path | None = None) -> dict:
        """Loads ``page`` with a ``width`` px viewport; returns the page's measures, saves a full-page PNG."""
        metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        # KFP names artifact files without an extension, which a browser shows as text: a copy named .html.
        copy = Path(self._profile, "page.html")
        shutil.copyfile(page, copy)
        self.driver.get(copy.as_uri())
        measured = self.driver.execute_script(_MEASURE)
        if screenshot is not None:
            shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": measured["height"], "scale": 1}})
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return measured

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def html_artifacts(run_dir: Path) -> list[Path]:
    """Every HTML artifact a run wrote (the files that start as kftune's report pages do)."""
    found = []
    for path in sorted(Path(run_dir).rglob("*")):
        if path.is_file() and "screenshots" not in path.parts and "logs" not in path.parts:
            with open(path, "rb") as f:
                if f.read(15).lower() == b"<!doctype html>":
                    found.append(path)
    return found


def shot_name(run_dir: Path, page: Path, width: int) -> Path:
    relative = page.relative_to(run_dir)
    return Path(run_dir, "screenshots", f"{'.'.join(relative.parts)}-{width}.png")


if __name__ == "__main__":
    import sys

    run = Path(sys.argv[1])
    with Browser() as browser:
        for page in html_artifacts(run):
            for width in WIDTHS:
                print(page.relative_to(run), width, browser.render(page, width, shot_name(run, page, width)))
