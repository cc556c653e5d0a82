"""A report page in a real headless browser (Chromium from the OS packages): a PNG of it, and which figures loaded.

The page marks each <img> data-loaded="ok" or "failed" when it has loaded (report.py's FIGURE_CHECK); Chromium's
--dump-dom prints the document after its scripts ran, so the marks say what the browser actually decoded.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
IMG = re.compile(r"<img\b[^>]*>")
ATTRIBUTE = re.compile(r'([\w-]+)="([^"]*)"')


@dataclass(frozen=True)
class Page:
    loaded: list[str]  # src of every figure the browser decoded
    failed: list[str]  # ... and of every one it could not
    screenshot: Path | None
    dom: str


def browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _chromium(url: str, *options: str, timeout_s: float) -> str:
    exe = browser()
    if exe is None:
        raise RuntimeError(f"no headless browser found ({', '.join(BROWSERS)}): apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="pf-chromium-") as profile:
        done = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--no-first-run", "--allow-file-access-from-files", f"--user-data-dir={profile}",
                               "--virtual-time-budget=10000", *options, url],
                              capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{exe} exited {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout


def figures(dom: str) -> tuple[list[str], list[str]]:
    """(loaded, failed) image sources from the marks the page's script left in the DOM."""
    loaded, failed = [], []
    for tag in IMG.findall(dom):
        attributes = dict(ATTRIBUTE.findall(tag))
        (loaded if attributes.get("data-loaded") == "ok" else failed).append(attributes.get("src", ""))
    return loaded, failed


def render(page: Path, screenshot: Path | None = None, *, width: int = 1280, height: int = 9000,
           timeout_s: float = 120) -> Page:
    """Load `page` in headless Chromium; with `screenshot`, also save a PNG of its first `height` pixels."""
    url = Path(page).resolve().as_uri()
    dom = _chromium(url, "--dump-dom", timeout_s=timeout_s)
    if screenshot is not None:
        _chromium(url, f"--screenshot={Path(screenshot).resolve()}", f"--window-size={width},{height}",
                  "--hide-scrollbars", timeout_s=timeout_s)
    loaded, failed = figures(dom)
    return Page(loaded, failed, screenshot, dom)
