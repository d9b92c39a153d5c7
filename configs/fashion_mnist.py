"""rd_keras/configs/fashion_mnist.py (also `--config=fashion_mnist`): this path keeps working."""

from rd_keras.configs.fashion_mnist import get_config  # noqa: F401
