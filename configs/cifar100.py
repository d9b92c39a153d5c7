"""rd_keras/configs/cifar100.py (also `--config=cifar100`): this path keeps working."""

from rd_keras.configs.cifar100 import get_config  # noqa: F401
