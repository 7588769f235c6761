"""Is a GPU workload held at the card's power limit? Runs a command while ``nvidia-smi`` samples the SM clock, board
power and utilisation, then summarises the busy samples.

    python benchmarks/power_sample.py --csv smi.csv -- python -m hybridlm bench configs/hybrid-500m.yaml \\
        --shapes 8x4096 --systems hybridlm

A step held at the limit shows power near it (700 W on an H200) and the SM clock below the ~1.98 GHz the card
reaches unloaded: its speed then follows the joules the step spends as well as its kernels' time. Samples with
utilisation under ``--busy`` (default 95%) are left out, so start-up, compilation and idle time between phases do
not dilute the medians; the whole process is sampled, so run one system and shape per command.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
from pathlib import Path

QUERY = "clocks.sm,power.draw,utilization.gpu"


def parse_samples(lines: list[str]) -> list[tuple[float, float, float]]:
    """(SM clock MHz, power W, utilisation %) per line of ``nvidia-smi --format=csv,noheader,nounits``; lines with
    a field it could not read ("[N/A]", "[Not Supported]") are skipped."""
    samples = []
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            samples.append((float(fields[0]), float(fields[1]), float(fields[2])))
        except ValueError:
            continue
    return samples


def summarize(samples: list[tuple[float, float, float]], busy: float = 95.0) -> dict[str, float] | None:
    """Medians and tails of the samples at or above ``busy`` % utilisation; None when there are none."""
    kept = [s for s in samples if s[2] >= busy]
    if not kept:
        return None
    clocks, powers = sorted(s[0] for s in kept), sorted(s[1] for s in kept)
    return {
        "samples": len(kept),
        "clock_median_mhz": statistics.median(clocks),
        "clock_p10_mhz": clocks[len(clocks) // 10],
        "power_median_w": statistics.median(powers),
        "power_p90_w": powers[9 * len(powers) // 10],
    }


def describe(summary: dict[str, float] | None, busy: float) -> str:
    if summary is None:
        return f"no sample at >= {busy:g}% utilisation"
    return (
        f"{summary['samples']} busy samples (>= {busy:g}%): SM clock median {summary['clock_median_mhz']:.0f} MHz "
        f"(p10 {summary['clock_p10_mhz']:.0f}), power median {summary['power_median_w']:.0f} W "
        f"(p90 {summary['power_p90_w']:.0f})"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", type=Path, default=Path("smi.csv"), help="where the raw samples go")
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--busy", type=float, default=95.0, help="utilisation (%%) a sample needs to count")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to sample after --")
    with args.csv.open("w") as out:
        sampler = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", str(args.interval_ms)],
            stdout=out,
        )
        try:
            sampled = subprocess.Popen(command)
            # a time limit's SIGTERM (gpu_session.sh's `timeout`) stops the command, then the sampler, then reports
            signal.signal(signal.SIGTERM, lambda signum, frame: sampled.terminate())
            rc = sampled.wait()
        finally:
            sampler.terminate()
            sampler.wait()
    print(f"{args.csv}: {describe(summarize(parse_samples(args.csv.read_text().splitlines()), args.busy), args.busy)}")
    return rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's convention


if __name__ == "__main__":
    sys.exit(main())
