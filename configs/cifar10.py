"""rd_keras/configs/cifar10.py (also `--config=cifar10`): this path keeps working."""

from rd_keras.configs.cifar10 import get_config  # noqa: F401
