"""Train a plain CNN by Residual Distillation (or one net, supervised) as configured.

    python train.py --config=configs/fashion_mnist.py:smoke --workdir=/tmp/smoke
    python train.py --config=configs/fashion_mnist.py --workdir=W --config.train.lr=0.05

`--config` is a Python config file (`path[:variant]`); `--config.<key>=<value>` overrides any key, and an
unknown key is an error. Rerunning with the same --workdir resumes. See rd_keras/train_lib.py.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rd_keras import checkpointing, data, loop, teacher, train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, `path[:variant]`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the trained models.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # absl's default (INFO) floods the progress bar with TF chatter
        logging.set_verbosity(logging.WARNING)
    try:
        train_lib.run(_CONFIG.value, _WORKDIR.value)
    except (train_lib.ConfigError, checkpointing.WorkdirError, teacher.TeacherError, data.DataError,
            loop.NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
