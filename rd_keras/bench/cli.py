"""Measure the paper's three claims on our models: same accuracy, faster inference, less feature-map memory.

    python -m rd_keras.bench inference   [--archs=resnet20,resnet56,resnet18,resnet50] [--json=F]
    python -m rd_keras.bench memory      [--archs=...] [--json=F]
    python -m rd_keras.bench train-step  [--arch=resnet56] [--json=F]
    python -m rd_keras.bench accuracy    [--epochs=5 --width=0.5 --train_subset=10000] [--out=runs/acc]
    python -m rd_keras.bench transfer    [--depth=20 --width=0.5 --epochs=2] [--out=runs/transfer] [--json=F]
    python -m rd_keras.bench feature-scale --workdir=W [--workdir=...] [--json=F]
    python -m rd_keras.bench report      (docs/results/*.json -> docs/results.md and docs/img/*.png)

Every sub-command prints a table and, with `--json`, writes every number with the machine, the settings
and the command line. `<sub-command> --help` says what each number means.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Sub-command -> module; each module has `add_arguments(parser)` and `run(args)`. Modules are imported
# only when their command runs, so `report` and `--help` start without loading TensorFlow.
COMMANDS = {
    "inference": "rd_keras.bench.inference",
    "memory": "rd_keras.bench.memory",
    "train-step": "rd_keras.bench.train_step",
    "accuracy": "rd_keras.bench.accuracy",
    "transfer": "rd_keras.bench.transfer",
    "feature-scale": "rd_keras.bench.feature_scale",
    "report": "rd_keras.bench.report",
}


def _module(command):
    return importlib.import_module(COMMANDS[command])


def parser_for(argv):
    parser = argparse.ArgumentParser(prog="python -m rd_keras.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    # Only the chosen sub-command's module is imported to add its flags.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for command in COMMANDS:
        if command == chosen:
            module = _module(command)
            p = sub.add_parser(command, help=module.__doc__.splitlines()[0], description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(p)
        else:
            sub.add_parser(command, help=f"see `{command} --help`")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser_for(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded with the results, so every number comes with the command that made it
    if args.command is None:
        parser.print_help()
        return 2
    from rd_keras.errors import FlagError, exit_with_error

    try:
        _module(args.command).run(args)
    except FlagError as e:
        # Bad flag values: one line naming the value, not a traceback.
        exit_with_error(parser, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
