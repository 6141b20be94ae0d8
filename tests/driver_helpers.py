"""Running a `python -m orchestrator` driver in a subprocess and signalling it mid-run."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stopped_by_a_signal(command: list[str], metrics: Path, after_step: int, number: int) -> tuple[int, str]:
    """Start `command` (a `train` driver), send it signal `number` once metrics.jsonl records
    step `after_step`, and return its exit code and output."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would block the driver
        process = subprocess.Popen([sys.executable, "-m", "orchestrator", *command], cwd=ROOT, stdout=log, stderr=log, text=True)
        deadline, sent = time.monotonic() + 300, False
        try:
            while time.monotonic() < deadline and process.poll() is None and not sent:
                if metrics.exists() and any(json.loads(line)["step"] >= after_step for line in metrics.read_text().splitlines() if line):
                    process.send_signal(number)
                    sent = True
                time.sleep(0.05)
            process.wait(timeout=120)  # the stop is one step and one checkpoint away
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.seek(0)
        stderr = log.read()
    assert sent, f"the run ended before step {after_step} was logged (exit {process.returncode}):\n{stderr[-3000:]}"
    return process.returncode, stderr
