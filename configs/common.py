"""rd_keras/configs/common.py, for config files that import `configs.common`."""

from rd_keras.configs.common import cifar, get_config, smoke  # noqa: F401
