"""rd_keras/configs/transfer.py (also `--config=transfer`): this path keeps working."""

from rd_keras.configs.transfer import get_config  # noqa: F401
