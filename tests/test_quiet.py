"""No false alarms: loading the bundled models prints no warning (a newcomer reads one as "broken")."""

from __future__ import annotations

import subprocess
import sys


def test_loading_the_bundled_clip_and_unet_prints_no_warning():
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from dclip_ray.models import load_clip, load_unet\n"
            "load_clip('toy_clip'); load_unet('toy_shapes')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr
