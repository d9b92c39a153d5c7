"""Residual Distillation on Fashion-MNIST (IDX files of Debian's dataset-fashion-mnist package).

    python train.py --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
    python train.py --config=configs/fashion_mnist.py:demo --workdir=workdirs/demo    # ~10 min, 2 CPU cores

The default recipe (common.recipe): the ResNet-20 is trained first in W/teacher, then the plain-20 distils
from it, frozen (one command, two phases; rerunning it resumes either phase).
    python train.py --config=configs/fashion_mnist.py:smoke --workdir=/tmp/smoke     # < 1 min
"""

from rd_keras.configs import common


def get_config(arg=None):
    config = common.get_config()
    config.data.source = "idx"
    config.data.name = "fashion_mnist"
    config.data.data_dir = "/usr/share/datasets/fashion-mnist"
    config.data.num_classes = 10
    config.data.augment = "cifar"  # pad-crop + flip
    config.model.arch = "resnet20"
    config.train.epochs = 30
    config.distill.blend_epochs = 20.0
    common.recipe(config)
    if arg == "smoke":
        common.smoke(config)
    elif arg == "demo":
        config.model.width = 0.5
        config.data.train_subset = 25_600
        config.train.epochs = 4
        config.train.warmup_epochs = 0.2
        config.train.log_every_steps = 20
        config.train.checkpoint_every_steps = 200
        config.export.enabled = True  # SavedModel + fp32/int8 .tflite, with the accuracy table
    elif arg is not None:
        raise ValueError(f"Unknown config variant {arg!r}: expected 'smoke', 'demo' or none.")
    return config
