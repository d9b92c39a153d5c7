"""Shared test set-up: quiet TensorFlow, CPU only, and small deterministic seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# tfds must never reach the network in tests.
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-dir")
os.environ.setdefault("NO_GCE_CHECK", "true")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import keras

    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()
