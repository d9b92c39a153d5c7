"""Residual Distillation on CIFAR-10: plain-56 student, ResNet-56 teacher (tensorflow-datasets 'cifar10').

    python train.py --config=configs/cifar10.py --workdir=workdirs/cifar10
    python train.py --config=configs/cifar10.py:smoke --workdir=/tmp/cifar10_smoke

The dataset must be prepared in the tfds data dir (`tfds build cifar10`), or pass
--config.data.download=True on a machine with network access.
"""

from rd_keras.configs import common


def get_config(arg=None):
    return common.cifar("cifar10", arg)
