"""Checks that the built docs render their math offline (a CI step after sphinx-build).

    python docs/check_math.py docs/_build

Each page with equations is opened in headless Chromium with the network off; its DOM after
MathJax ran must hold rendered formulas (``mjx-container`` elements), no raw ``\\(`` or ``\\[``
delimiters, and no script loaded from another host. Exit 0 when every page passes, 1 otherwise.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

PAGES = ("accelerated_sgd.html", "adaptive_memory.html", "mada.html", "schedule_free.html")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--virtual-time-budget=20000", "--dump-dom")


def rendered_dom(page: pathlib.Path, chromium: str) -> str:
  with tempfile.TemporaryDirectory() as profile:
    out = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120,
                         check=False)
  return out.stdout


def check(build: pathlib.Path) -> list[str]:
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  if chromium is None:
    return ["chromium is not installed (.ci/run installs Debian's package)"]
  problems = []
  for name in PAGES:
    page = build / name
    remote = re.findall(r'<script[^>]+src="(https?://[^"]+)"', page.read_text())
    dom = rendered_dom(page, chromium)
    formulas, raw = dom.count("<mjx-container"), len(re.findall(r"\\[(\[]", dom))
    print(f"{name}: {formulas} rendered formulas, {raw} raw delimiters, "
          f"{len(remote)} remote scripts")
    if not formulas or raw or remote:
      problems.append(name)
  return problems


if __name__ == "__main__":
  failed = check(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build"))
  if failed:
    print(f"error: math not rendered offline in {', '.join(failed)}", file=sys.stderr)
  sys.exit(1 if failed else 0)
