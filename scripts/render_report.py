"""Render a run's HTML report in headless Chromium, check it, and save a full-page screenshot.

    python scripts/render_report.py runs/default [--out report.png] [--docs docs/images/report_screenshot.png]

Optionally (``--write``) writes the report first (``pva-sae report``). The browser runs offline (networking
disabled), so a report that needed the network shows broken images. Checks, in the browser, that the
summary box is there and not empty, that every image decoded (natural width > 0) and that no section is
empty (each h2 is followed by text, a table or a figure before the next h2); exits 1 naming each failure,
0 when all pass. ``--docs`` also writes a small copy of the top of the page (for the documentation).

Needs a Chromium or Chrome binary (`apt-get install chromium`); Pillow for ``--docs``.
"""

from __future__ import annotations

import argparse
import html as html_lib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "chrome")
MAX_HEIGHT_PX = 32000  # Chromium's screenshot limit is about 2^15 px per side

CHECK_JS = """<script>
window.addEventListener('load', () => {
  const problems = [];
  const imgs = [...document.images];
  imgs.forEach((img, i) => {
    if (!img.complete || img.naturalWidth === 0) problems.push(`image ${i + 1} (${img.alt}) did not load`);
  });
  const heads = [...document.querySelectorAll('h2')];
  heads.forEach(h => {
    let node = h.nextElementSibling, content = false;
    while (node && node.tagName !== 'H2') {
      if (node.tagName !== 'H3' && (node.textContent.trim() || node.querySelector('img'))) { content = true; break; }
      node = node.nextElementSibling;
    }
    if (!content) problems.push(`section '${h.textContent}' is empty`);
  });
  const box = document.querySelector('.summary');
  if (!box) problems.push('no summary box');
  else if (!box.querySelector('li')) problems.push('the summary box has no finding');
  const out = document.createElement('pre');
  out.id = 'pva-check';
  out.textContent = JSON.stringify({problems, images: imgs.length, sections: heads.map(h => h.textContent),
                                    height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"no headless browser found (tried {', '.join(BROWSERS)}); install one, e.g. `apt-get install chromium`")


def _browser(args: list[str], profile: str) -> subprocess.CompletedProcess:
    cmd = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=180)


def check(html: Path, width: int) -> dict:
    """Load a copy of the page with the check script; the script's verdict, read from the dumped DOM."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "check.html"
        probe.write_text(html.read_text(encoding="utf-8").replace("</body>", CHECK_JS + "</body>"), encoding="utf-8")
        dom = _browser([f"--window-size={width},1000", "--virtual-time-budget=10000", "--dump-dom",
                        probe.as_uri()], str(Path(tmp) / "profile")).stdout
    found = re.search(r"<pre id=\"pva-check\">(.*?)</pre>", dom, re.DOTALL)
    if not found:
        return {"problems": ["the check script did not run (no result in the page)"], "height": 0}
    return json.loads(html_lib.unescape(found.group(1)))


def screenshot(html: Path, out: Path, width: int, height: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        _browser([f"--window-size={width},{height}", f"--screenshot={out.resolve()}", html.resolve().as_uri()],
                 profile)
    if not out.is_file() or out.stat().st_size == 0:
        sys.exit(f"the browser wrote no screenshot to {out}")
    return out


def docs_copy(shot: Path, dest: Path, top_px: int, width_px: int, colors: int = 96) -> Path:
    """The top ``top_px`` of the screenshot, scaled to ``width_px`` and reduced to a palette (small PNG)."""
    from PIL import Image

    with Image.open(shot) as img:
        top = img.crop((0, 0, img.width, min(top_px, img.height)))
        scaled = top.resize((width_px, round(top.height * width_px / top.width)), Image.LANCZOS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        scaled.convert("RGB").quantize(colors=colors).save(dest, optimize=True)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default <run_dir>/report_screenshot.png)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--write", action="store_true", help="write the report first (pva-sae report)")
    ap.add_argument("--docs", type=Path, default=None, help="also write a small PNG of the top of the page here")
    ap.add_argument("--docs-top", type=int, default=2600, help="page pixels kept in the --docs copy")
    ap.add_argument("--docs-width", type=int, default=900, help="width of the --docs copy in pixels")
    args = ap.parse_args()
    html = args.run_dir / "report.html"
    if args.write:
        subprocess.run([sys.executable, "-m", "pva_sae.cli", "report", "--run-dir", str(args.run_dir)], check=True)
    if not html.is_file():
        sys.exit(f"{html} does not exist; run `pva-sae report --run-dir {args.run_dir}` first")
    verdict = check(html, args.width)
    height = min(max(int(verdict.get("height") or 0), 800) + 40, MAX_HEIGHT_PX)
    out = screenshot(html, args.out or args.run_dir / "report_screenshot.png", args.width, height)
    print(f"screenshot: {out} ({out.stat().st_size} bytes, {args.width}x{height} px); "
          f"{verdict.get('images', 0)} images, sections: {', '.join(verdict.get('sections', []))}")
    if args.docs:
        small = docs_copy(out, args.docs, args.docs_top, args.docs_width)
        print(f"documentation copy: {small} ({small.stat().st_size} bytes)")
    for problem in verdict["problems"]:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if verdict["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
