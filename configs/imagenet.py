"""rd_keras/configs/imagenet.py (also `--config=imagenet`): this path keeps working."""

from rd_keras.configs.imagenet import get_config  # noqa: F401
