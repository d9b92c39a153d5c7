"""Tests for rd_keras.export.qat: the tf_keras rebuild of the folded net, QAT in a subprocess (so this Keras 3
process never imports tensorflow_model_optimization), and a full-integer .tflite with sane accuracy."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from rd_keras import export, samples
from rd_keras.export import metadata
from rd_keras.export.tflite_export import TFLiteRunner
from tests.test_export import FMNIST_DIR, make_workdir, run_on_pixels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(export.__file__))))

pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST_DIR),
                                reason="Debian dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    keras.utils.set_random_seed(0)  # a module fixture is built before the per-test seed is set
    return make_workdir(tmp_path_factory.mktemp("qat"), width=0.25, train_examples=8192, epochs=1,
                        shortcuts="downsample", dirac=True)


@pytest.mark.slow
def test_qat_export_gives_a_full_integer_model_with_sane_accuracy(workdir):
    report = export.export_workdir(workdir, formats="tflite", quantize="int8", qat_steps=40,
                                   eval_examples=500, calibration_examples=128, progress=False)
    assert "tensorflow_model_optimization" not in sys.modules  # QAT ran in its own process
    keras_entry, qat = report["artefacts"]["keras"], report["artefacts"]["tflite_qat"]
    assert qat["path"] == os.path.join(workdir, "export", "tflite", "plain_qat.tflite")
    assert (qat["signature_inputs"], qat["signature_outputs"]) == (["images"], ["probabilities"])
    # uint8 pixels in, the input quantiser held at the normalisation (as the post-training int8 file's).
    int8 = report["artefacts"]["tflite_int8"]
    assert qat["input"]["dtype"] == "uint8" and qat["output"]["dtype"] == "int8"
    assert (qat["input"]["scale"], qat["input"]["zero_point"]) == (int8["input"]["scale"], int8["input"]["zero_point"])
    runner = TFLiteRunner(qat["path"])
    assert runner.float_tensors() == [] and runner.takes_pixels
    record = metadata.read(qat["path"])
    assert record["quantization"] == "qat" and record["labels"] == list(samples.KNOWN_LABELS["fashion_mnist"])
    # A short fine-tune may move the decision boundary, so compare accuracy, not agreement.
    assert keras_entry["accuracy"] > 0.5, "the reference model did not train"
    assert qat["accuracy"] >= keras_entry["accuracy"] - 0.05, (qat, keras_entry)
    probabilities = runner(np.zeros((2, 28, 28, 1), np.uint8))
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=0.05)


@pytest.mark.slow
def test_qat_of_a_per_channel_normalised_net_starts_with_the_normalize_conv(tmp_path):
    # torch normalisation (ImageNet mean/std per channel). Not caffe: its inputs reach +-150, and the folded
    # stem (no BN left) then takes gradients that QAT's default learning rate cannot survive.
    workdir = make_workdir(tmp_path / "rgb", source="synthetic", image_size=16, channels=3, normalization="torch",
                           synthetic_examples=1024, train_examples=0, epochs=5, lr=0.01)
    report = export.export_workdir(workdir, formats="tflite", quantize="none", qat_steps=20, eval_examples=200,
                                   progress=False)
    keras_entry, qat = report["artefacts"]["keras"], report["artefacts"]["tflite_qat"]
    assert (qat["input"]["dtype"], qat["input"]["scale"], qat["input"]["zero_point"]) == ("uint8", 1.0, 0)
    runner = TFLiteRunner(qat["path"])
    assert runner.float_tensors() == [] and runner.op_names()[:2] == ["QUANTIZE", "CONV_2D"]
    assert keras_entry["accuracy"] > 0.5, "the reference model did not train"
    assert qat["accuracy"] >= keras_entry["accuracy"] - 0.05, (qat, keras_entry)
    stored = samples.examples(export.load_workdir(workdir)[0], workdir, test_examples=200, calibration_examples=0,
                              num_classes=10)
    assert np.mean(run_on_pixels(qat["path"], stored.test_images) == stored.test_labels) == qat["accuracy"]


def test_qat_cli_reports_a_missing_workdir_by_path(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rd_keras.export.qat", f"--workdir={tmp_path / 'nope'}",
                             "--steps=1"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 2 and str(tmp_path / "nope") in result.stderr
    assert "Traceback" not in result.stderr
