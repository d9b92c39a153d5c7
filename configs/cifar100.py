"""Residual Distillation on CIFAR-100: plain-56 student, ResNet-56 teacher (tensorflow-datasets 'cifar100').

    python train.py --config=configs/cifar100.py --workdir=workdirs/cifar100
    python train.py --config=configs/cifar100.py:smoke --workdir=/tmp/cifar100_smoke

The dataset must be prepared in the tfds data dir (`tfds build cifar100`), or pass
--config.data.download=True on a machine with network access.
"""

import importlib.util
import os


def load_common():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
    spec = importlib.util.spec_from_file_location("rd_keras_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    common = load_common()
    config = common.get_config()
    config.data.source = "tfds"
    config.data.name = "cifar100"
    config.data.data_dir = ""  # the tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    config.data.download = False
    config.data.augment = "cifar"  # pad 4 + random 32x32 crop + flip
    config.model.arch = "resnet56"
    config.data.batch_size = 128
    config.train.lr = 0.1
    config.train.epochs = 200
    config.train.weight_decay = 5e-4
    config.distill.blend_epochs = 150.0
    if arg == "smoke":
        common.smoke(config)
    elif arg is not None:
        raise ValueError(f"Unknown config variant {arg!r}: expected 'smoke' or none.")
    return config
