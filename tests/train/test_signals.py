"""A preempted job (SIGTERM) writes a checkpoint and exits cleanly; resume=auto continues from it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridlm.train import run_train
from hybridlm.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(run_args, tmp_path):
    args = run_args("train.max_steps=100000")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = tmp_path / "run"
    deadline = time.monotonic() + 120
    while not any(r.get("step", 0) >= 3 for r in read_metrics(out)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-3000:]
    assert "stopped by SIGTERM" in log
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = json.loads((out / "checkpoints" / latest / "trainer.json").read_text())["step"]
    assert 3 <= stopped_at < 100000
    assert max(r["step"] for r in read_metrics(out)) == stopped_at  # the checkpoint is the last step taken

    result = run_train(None, [*args, "resume=auto", f"train.max_steps={stopped_at + 2}"])
    assert result["step"] == stopped_at + 2
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, stopped_at + 3))
