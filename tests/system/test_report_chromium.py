"""report.html rendered in headless Chromium (a subprocess): every section in the DOM, a non-blank screenshot.
The page checks that need no browser are in tests/unit/test_report.py."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oocrlab.report import SECTIONS
from tests.helpers import assert_valid_and_self_contained

CHROMIUM = shutil.which("chromium")
# the flags a closed network needs: no background connections that would fail (see the machine notes)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path: Path, *args: str) -> str:
    if CHROMIUM is None:
        if os.environ.get("OOCRLAB_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (.ci/run installs the Debian package) but is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    _, run = tiny_run
    page = run.report_file.read_text(encoding="utf-8")
    assert_valid_and_self_contained(page)
    # loss, distance bands, the country and city choices, against the shuffled control, five probe figures, seven
    # trajectory curves
    assert len(re.findall(r"data:image/png;base64,", page)) == 17
    dom = chromium(tmp_path, "--dump-dom", run.report_file.resolve().as_uri())
    for section in (*SECTIONS, "configuration"):
        assert f'<section id="{section}">' in dom, section
    assert "Not run" not in dom
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", run.report_file.resolve().as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page
