"""evaluate's report.html in a real browser: headless Chromium loads it offline, decodes every image, logs
nothing, and renders it to a PNG (the screenshot path is printed; ``SALAD_MED_SCREENSHOT=path`` keeps it there)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p and Path(p).is_file()),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                                         "(apt-get install chromium chromium-driver)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
# Injected into a *copy* of the report, before its Content-Security-Policy (a meta CSP governs what follows
# it): collects load errors, CSP violations and console.error calls, then, once everything has loaded,
# appends a line with how many images decoded.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message ||
  (e.target && e.target.tagName + ' ' + String(e.target.src || '').slice(0, 48)))), true);
document.addEventListener('securitypolicyviolation', e => window.__errors.push('csp: ' + e.blockedURI));
const __ce = console.error;
console.error = (...a) => { window.__errors.push('console: ' + a.join(' ')); __ce(...a); };
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const d = document.createElement('pre');
  d.textContent = 'PROBE images ' + ok + '/' + imgs.length + ' errors ' + window.__errors.length + ' ' +
                  window.__errors.join(' | ');
  document.body.appendChild(d);
});
</script>"""
PROBE_LINE = re.compile(r"PROBE images (\d+)/(\d+) errors (\d+) ?([^<]*)")


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    if profile.exists():
        shutil.rmtree(profile)
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=15000", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


def load_in_browser(report: Path, work: Path) -> tuple[tuple[int, int, int, str], list[str]]:
    """Open a probed copy of ``report`` -> ((decoded images, images, errors, error text), console lines)."""
    html = report.read_text()
    probed = work / f"probed-{report.name}"
    probed.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    proc = _chromium(probed, work / "profile-dom", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = PROBE_LINE.search(proc.stdout)
    assert found, "the page never finished loading (no probe line in the DOM)"
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return (int(found[1]), int(found[2]), int(found[3]), found[4]), console


def test_probe_catches_broken_pages(tmp_path):
    """The check can fail: a broken image, a network image and a console error are all reported."""
    good = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
    from salad_med.evaluation.report import CSP

    page = tmp_path / "broken.html"
    page.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}">'
                    f'</head><body><img src="{good}"><img src="data:image/png;base64,AAAA">'
                    '<img src="https://example.com/x.png"></body></html>')
    (ok, n, errors, text), console = load_in_browser(page, tmp_path)
    assert (ok, n) == (1, 3) and errors >= 2 and "csp: https://example.com/x.png" in text
    assert any("Content Security Policy" in line for line in console)


def test_report_renders_in_chromium(evaluated, tmp_path):
    _, out = evaluated
    report = out / "report.html"
    (ok, n, errors, text), console = load_in_browser(report, tmp_path)
    assert n >= 30 and ok == n, f"{n - ok} of {n} images not decoded"
    assert errors == 0, text
    assert console == [], console
    # SALAD_MED_SCREENSHOT keeps the picture where pytest's rotating tmp folders will not delete it
    shot = Path(os.environ.get("SALAD_MED_SCREENSHOT") or out / "report-screenshot.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    proc = _chromium(report, tmp_path / "profile-shot", "--window-size=1280,4200", f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 4200)
        colours = im.convert("RGB").resize((64, 210)).getcolors(64 * 210)
    assert colours is not None and len(colours) > 50  # figures and tiles painted, not a blank page
    print(f"\nreport screenshot: {shot}")


def test_compare_page_renders_in_chromium(tmp_path):
    import numpy as np
    import pandas as pd

    from salad_med.evaluation.report import write_compare_report

    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(40, int), np.ones(12, int)]
    curves = {m: pd.DataFrame({"label": y, "raw_score": y * shift + rng.normal(size=y.size)})
              for m, shift in (("salad", 1.5), ("dae", 2.5), ("deep_svdd", 0.3))}
    summary = pd.DataFrame({"method": list(curves), "n_seeds": 1, "auc_mean": [0.85, 0.95, 0.6]})
    page = write_compare_report(tmp_path / "report.html", summary, curves, title="compare",
                                links={"salad": "runs/salad/seed0/eval-test/report.html"})
    (ok, n, errors, text), console = load_in_browser(page, tmp_path)
    assert (ok, n, errors, console) == (3, 3, 0, []), text
