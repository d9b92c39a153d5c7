"""Tests for rd_keras.export.qat: the tf_keras rebuild of the folded net, QAT in a subprocess (so this Keras 3
process never imports tensorflow_model_optimization), and a full-integer .tflite with sane accuracy."""

import os
import subprocess
import sys

import numpy as np
import pytest

from rd_keras import export
from rd_keras.export.tflite_export import TFLiteRunner
from tests.test_export import FMNIST_DIR, make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(export.__file__))))

pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST_DIR),
                                reason="Debian dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
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
    assert qat["input"]["dtype"] == qat["output"]["dtype"] == "int8" and qat["input"]["scale"] > 0
    runner = TFLiteRunner(qat["path"])
    assert runner.float_tensors() == []
    # A short fine-tune may move the decision boundary, so compare accuracy, not agreement.
    assert keras_entry["accuracy"] > 0.5, "the reference model did not train"
    assert qat["accuracy"] >= keras_entry["accuracy"] - 0.05, (qat, keras_entry)
    probabilities = runner(np.zeros((2, 28, 28, 1), np.float32))
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=0.05)


def test_qat_cli_reports_a_missing_workdir_by_path(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rd_keras.export.qat", f"--workdir={tmp_path / 'nope'}",
                             "--steps=1"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 2 and str(tmp_path / "nope") in result.stderr
    assert "Traceback" not in result.stderr
