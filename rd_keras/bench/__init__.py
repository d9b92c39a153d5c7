"""Measurement: `python -m rd_keras.bench inference | memory | train-step | accuracy | transfer | report`.

The command line is `rd_keras.bench.cli` (`main`, `parser_for`, re-exported here); each sub-command is one
module of this package with `add_arguments(parser)` and `run(args)`. `liveness` is the feature-map memory
model (liveness walk, TFLite arena, peak RSS). Importing this package does not import TensorFlow.
"""

from rd_keras.bench.cli import COMMANDS, main, parser_for

__all__ = ["COMMANDS", "main", "parser_for"]
