"""Several trainings in one set of DeepSpeed-launched ranks (a launcher start costs seconds on CPU).

Usage (from test_distributed.py): ``deepspeed --num_gpus 2 dist_worker.py RUNS_JSON RESULTS_JSON`` where
RUNS_JSON maps a run name to its override list; rank 0 writes each run's final metrics to RESULTS_JSON.
"""

import json
import sys
from pathlib import Path

import torch

from hybridlm.train import run_train


def main() -> None:
    runs_path, results_path = (a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    results = {name: run_train(None, overrides) for name, overrides in json.loads(Path(runs_path).read_text()).items()}
    if torch.distributed.get_rank() == 0:
        Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
