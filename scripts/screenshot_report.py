#!/usr/bin/env python3
"""Open an HTML report in headless Chromium and save a screenshot (the report's real-browser check).

Usage: python scripts/screenshot_report.py REPORT.html OUT.png [--width 1280] [--height 2400]

Uses the first of chromium, chromium-browser, chromium-headless-shell, google-chrome on PATH (Debian:
``apt-get install chromium``). Networking is disabled for the page (``--proxy-server`` to a closed
port), so the screenshot also proves that the report needs nothing from the network. Exit code 0 and the
PNG written, or 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")


def find_browser() -> str | None:
    """The first headless-capable Chromium on PATH, or None."""
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def screenshot(html: str, out: str, width: int = 1280, height: int = 2400, timeout: float = 90.0) -> str:
    """Render ``html`` (a local file) at ``width`` x ``height`` CSS pixels and write the PNG ``out``."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); Debian: apt-get install chromium")
    page = Path(html).resolve()
    if not page.is_file():
        raise RuntimeError(f"{html}: no such file")
    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    with tempfile.TemporaryDirectory(prefix="dclip-chromium-") as profile:
        cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--user-data-dir={profile}", "--no-first-run",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network for the page
               f"--window-size={width},{height}", f"--screenshot={target}", "--virtual-time-budget=5000",
               page.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HOME": profile})
    if not target.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{browser} wrote no screenshot (exit {proc.returncode}): {' | '.join(tail)}")
    return str(target)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse ``argv`` and take the screenshot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", help="the report's HTML file")
    ap.add_argument("out", help="PNG file to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args(argv)
    try:
        print(screenshot(args.html, args.out, args.width, args.height))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
