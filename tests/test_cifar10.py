"""CIFAR-10 as an image folder: the configs/cifar10.py path on a small stratified subset of the shared JPEG
archive (../shared/data/cifar10-jpeg.tar.gz beside the project; skipped without it)."""

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from rd_keras import data, defaults
from rd_keras.configs import cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = {"train": 40, "test": 10}


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """The first PER_CLASS[split] files of every class folder of the archive, unpacked (the layout kept)."""
    if not os.path.isfile(ARCHIVE):
        pytest.skip(f"{ARCHIVE} is absent")
    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(ARCHIVE) as tar:
        wanted = []
        for member in tar:
            parts = member.name.lstrip("./").split("/")
            if member.isfile() and len(parts) == 3 and int(parts[2].split(".")[0]) < PER_CLASS[parts[0]]:
                wanted.append(member)
        tar.extractall(root, members=wanted, filter="data")
    return str(root)


def test_cifar10_folder_pipeline(cifar_folder):
    config = cifar10.get_config()
    config.data.data_dir = cifar_folder
    config.data.validation_split = 0.25
    config.data.batch_size = 50
    assert sorted(os.listdir(os.path.join(cifar_folder, "train"))) == list(CLASSES)
    passes, eval_ds, info = data.pipelines(config)
    assert (info.num_classes, info.image_shape, info.train_examples, info.eval_examples) == (10, (32, 32, 3), 300, 100)
    assert (info.mean, info.std) == defaults.CIFAR_STATS["cifar10"]
    val_labels = np.concatenate([y.numpy() for _, y in eval_ds])
    np.testing.assert_array_equal(np.bincount(val_labels, minlength=10), [10] * 10)
    first = next(iter(passes.one_pass(0)))
    assert first[0].shape == (50, 32, 32, 3) and len(set(first[1].numpy())) >= 8  # every batch mixes classes
    images, labels = data.raw_examples(config, "test", 100)
    assert images.dtype == np.uint8 and np.bincount(labels, minlength=10).tolist() == [10] * 10
    # Real photographs, decoded right: per-channel means near CIFAR-10's (not 0 or 255, nor BGR-swapped).
    means = images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(means, defaults.CIFAR_STATS["cifar10"][0], atol=0.06)
    assert means[2] < means[0]  # blue below red, as in the data set


def test_cifar10_config_without_data_dir_names_the_key(tmp_path):
    config = cifar10.get_config()
    with pytest.raises(data.DataError, match=r"needs config.data.data_dir.*Received: data_dir=''"):
        data.pipelines(config)


@pytest.mark.slow
def test_train_py_runs_the_cifar10_recipe_offline(cifar_folder, tmp_path):
    """`train.py --config=configs/cifar10.py` at smoke size with the default recipe's two phases: the ResNet
    trained first in W/teacher, then the plain net by RD + KD from it, frozen."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/cifar10.py:smoke",
           f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={cifar_folder}", "--config.data.train_subset=0",
           "--config.data.eval_subset=0", "--config.data.validation_split=0.2", "--config.teacher.mode=pretrained",
           "--config.model.dirac=True", "--config.distill.logit_kd_alpha=1.0", "--config.train.progress=False"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "TFDS_DATA_DIR": "/nonexistent"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "w" / "teacher" / "resnet.keras")
    assert os.path.isfile(tmp_path / "w" / "plain.keras")
    last = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["test_acc"] <= 1 and 0 < last["test_teacher_acc"] <= 1  # the one final test evaluation
    assert last["epoch"] == 2 and last["step"] == 2 * (320 // 32)  # smoke: 2 epochs of the 400 - 80 images
