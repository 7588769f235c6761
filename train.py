"""Pretrain a hybrid model: ``python train.py CONFIG [key=value ...]``.

Runs the same on one process and under a launcher (deepspeed, torchrun; see launch/). The
DeepSpeed launcher appends ``--local_rank=N``, which is ignored here (LOCAL_RANK is in the environment).
"""

import sys

from hybridlm.config import ConfigError
from hybridlm.train import TrainingDiverged, run_train


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--local_rank")]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    config, overrides = (None, args) if "=" in args[0] else (args[0], args[1:])
    try:
        run_train(config, overrides)
    except ConfigError as e:  # bad input (DataError included): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
