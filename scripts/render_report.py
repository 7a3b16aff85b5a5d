"""Render a run's HTML report in a headless browser and save a screenshot, to check it displays offline.

    python scripts/render_report.py runs/default [--out report.png] [--height 16000]

Needs a Chromium or Chrome binary (`apt install chromium`). The browser runs with networking
disabled, so a report that needed the network would show broken images.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"no headless browser found (tried {', '.join(BROWSERS)}); install one, e.g. `apt install chromium`")


def render(html: Path, out: Path, width: int, height: int) -> Path:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               f"--window-size={width},{height}", f"--screenshot={out.resolve()}", html.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not out.is_file() or out.stat().st_size == 0:
        sys.exit(f"the browser wrote no screenshot to {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default <run_dir>/report_screenshot.png)")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=16000)
    args = ap.parse_args()
    html = args.run_dir / "report.html"
    if not html.is_file():
        sys.exit(f"{html} does not exist; run `pva-sae report --run-dir {args.run_dir}` first")
    out = render(html, args.out or args.run_dir / "report_screenshot.png", args.width, args.height)
    print(f"screenshot: {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
