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


_TRAIN_MEASURING_RSS = r"""
import json, sys
from orchestrator.config import load_job
from orchestrator.train.run import run_train

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

config = load_job(sys.argv[1], sys.argv[2:])
before = status("VmRSS:")
summary = run_train(config)
print(json.dumps({"before": before, "peak": status("VmHWM:"), "run_dir": summary.run_dir, "seconds": summary.seconds}))
"""


def train_measuring_rss(spec: str | Path, overrides: list[str], cwd: Path) -> dict:
    """`run_train` of the job in a process of its own: its RSS once the orchestrator is imported
    ("before"), its peak RSS (VmHWM, "peak"), both in bytes, and the summary's run_dir and seconds."""
    import os

    done = subprocess.run(
        [sys.executable, "-c", _TRAIN_MEASURING_RSS, str(spec), *overrides],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=1800, check=False,
    )
    if done.returncode:
        raise RuntimeError(f"training exited {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
