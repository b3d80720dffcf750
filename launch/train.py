"""``accelerate launch [--config_file launch/<name>.yaml] launch/train.py --config configs/<name>.yaml``.

The same arguments as ``accel-trainer fit`` (a first argument ``fit``, ``validate`` or
``test`` picks another subcommand). Every launched process runs this file; the Trainer
joins them into one process group.
"""

import sys

from accel_trainer.cli import RUN_COMMANDS, main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in RUN_COMMANDS:
        args = ["fit", *args]
    sys.exit(main(args))
