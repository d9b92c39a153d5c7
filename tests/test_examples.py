"""examples/pretrained_teacher.py and examples/transfer.py in their smoke form (examples/fit_api.py: see
test_distiller.py)."""

import json
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The installed rd_keras; no network (a download would fail at once on the dead proxy).
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "http_proxy": "http://127.0.0.1:9",
       "https_proxy": "http://127.0.0.1:9"}


def run_example(name, workdir):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), "--smoke", f"--workdir={workdir}"],
                          cwd=workdir.parent, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(workdir / "config.json") as f:
        return json.load(f), keras.saving.load_model(workdir / "plain.keras", compile=False)


@pytest.mark.slow  # a ResNet-50 and a plain-50 traced in one graph: 1-3 minutes on 2 busy cores
def test_pretrained_teacher_example_distils_a_plain_50_from_a_resnet_50_weights_file(tmp_path):
    config, plain = run_example("pretrained_teacher.py", tmp_path / "w")
    assert os.path.isfile(tmp_path / "w" / "smoke" / "resnet50.weights.h5")  # made with weights=None
    assert plain.name == "plain50" and not any(layer.name.endswith("_add") for layer in plain.layers)
    # The smoke folder holds grayscale PNGs; ResNet-50 takes RGB, so they were read as RGB.
    assert tuple(plain.input.shape[1:]) == (32, 32, 3) and config["dataset"]["image_shape"] == [32, 32, 3]
    assert plain.get_layer("logits").units == 3 and config["data"]["normalization"] == "caffe"


@pytest.mark.slow  # a fashion_mnist:smoke run, then the fine-tune and its export: 1-2 minutes
def test_transfer_example_fine_tunes_a_finished_run_on_grayscale_pngs_and_exports_it(tmp_path):
    workdir = tmp_path / "w"
    config, plain = run_example("transfer.py", workdir)
    source = keras.saving.load_model(workdir / "smoke" / "source" / "plain.keras", compile=False)
    assert source.get_layer("logits").units == 10 and plain.get_layer("logits").units == 3
    assert plain.name == source.name and tuple(plain.input.shape[1:]) == (28, 28, 1)
    assert config["data"]["channels"] == 1 and config["dataset"]["num_classes"] == 3
    with open(workdir / "export" / "report.json") as f:
        artefacts = json.load(f)["artefacts"]
    assert artefacts["tflite_none"]["top1_agreement"] >= 0.95
