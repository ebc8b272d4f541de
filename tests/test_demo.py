"""`ciserver demo` plays the whole story and prints it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import free_port


def test_demo_plays_the_story(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CISERVER_")}
    env["CISERVER_SERVER__STATE_DIR"] = str(tmp_path / "state")
    r = subprocess.run([sys.executable, "-m", "ciserver", "demo", "--exit", "--port",
                        str(free_port()), "--state-dir", str(tmp_path / "demo")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for step in ("1. The organizer", "2. Three fans", "3. They answer", "4. The organizer edits",
                 "5. The organizer cancels", "6. The report"):
        assert step in out
    assert out.count("got a personal invite") == 3
    report = [line.split() for line in out.splitlines() if "@fans.example" in line
              and line.startswith("   Knicks")]
    answers = {(r[3], r[4]) for r in report if r[2] == "Celtics"}
    assert answers == {("ana@fans.example", "Y"), ("ben@fans.example", "M"),
                       ("cleo@fans.example", "N")}
    assert "The demo smarthost kept 16 messages" in out
