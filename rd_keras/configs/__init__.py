"""The shipped configs: Python files whose `get_config(arg)` returns an ml_collections.ConfigDict.

`--config` names one by its file (`configs/fashion_mnist.py:smoke` in a checkout, which re-exports these) or,
wherever rd_keras is installed, by its name (`fashion_mnist:smoke`); `path_of` turns a name into the file.
"""

import os

NAMES = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "transfer")


def path_of(spec: str) -> str:
    """`path[:variant]` for the `--config` value `spec`: an existing file as given, else the file of the
    shipped config `spec` names. Raises ValueError quoting `spec` when it is neither."""
    path, sep, variant = spec.partition(":")
    if os.path.isfile(path):
        return spec
    if path in NAMES:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{path}.py") + sep + variant
    raise ValueError(f"--config={spec!r}: no such file, and not the name of a shipped config "
                     f"({', '.join(NAMES)}; a variant follows a colon, e.g. fashion_mnist:smoke).")
