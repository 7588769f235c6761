"""benchmarks/power_sample.py: reading nvidia-smi's samples and summarising the busy ones; the command it wraps
runs and its exit code comes back (with a stand-in for nvidia-smi, so no GPU is needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def power(load_benchmark):
    return load_benchmark("power_sample")


def test_samples_skip_fields_nvidia_smi_could_not_read(power):
    lines = ["1980, 650.5, 100", "[N/A], 700.0, 99", "1700, [Not Supported], 98", "", "345, 80.1, 0"]
    assert power.parse_samples(lines) == [(1980.0, 650.5, 100.0), (345.0, 80.1, 0.0)]


def test_summary_counts_busy_samples_only(power):
    busy = [(1600.0 + 10 * i, 600.0 + i, 100.0) for i in range(20)]  # clocks 1600..1790, power 600..619
    idle = [(345.0, 80.0, 0.0)] * 50
    summary = power.summarize(busy + idle, busy=95.0)
    assert summary["samples"] == 20
    assert summary["clock_median_mhz"] == 1695.0 and summary["clock_p10_mhz"] == 1620.0
    assert summary["power_median_w"] == 609.5 and summary["power_p90_w"] == 618.0
    assert power.summarize(idle, busy=95.0) is None
    assert "no sample" in power.describe(None, 95.0)


def _fake_nvidia_smi(tmp_path: Path) -> dict[str, str]:
    """An environment whose nvidia-smi prints two samples, then waits to be stopped, as the real one loops."""
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '1700, 690.0, 100'\necho '1710, 688.0, 99'\nexec sleep 30\n")
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}


def test_wraps_the_command_and_returns_its_exit_code(tmp_path):
    env, csv = _fake_nvidia_smi(tmp_path), tmp_path / "smi.csv"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/power_sample.py"), "--csv", str(csv), "--",
         sys.executable, "-c", "import time, sys; time.sleep(0.5); sys.exit(3)"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "2 busy samples" in done.stdout and "SM clock median 1705 MHz" in done.stdout
    assert "power median 689 W" in done.stdout


def test_a_time_limit_stops_the_command_and_the_sampler_and_still_reports(tmp_path):
    env, csv = _fake_nvidia_smi(tmp_path), tmp_path / "smi.csv"
    wrapper = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks/power_sample.py"), "--csv", str(csv), "--",
         sys.executable, "-c", "import time; time.sleep(60)"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (csv.exists() and csv.read_text().count("\n") >= 2):  # the sampler has started
        assert time.monotonic() < deadline and wrapper.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)  # the wrapped command has started by now
    wrapper.send_signal(signal.SIGTERM)  # what `timeout` sends
    out, _ = wrapper.communicate(timeout=20)  # returns well before the command's 60 s: it was stopped
    assert wrapper.returncode == 128 + signal.SIGTERM
    assert "2 busy samples" in out
