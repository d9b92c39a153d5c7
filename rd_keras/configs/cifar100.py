"""Residual Distillation on CIFAR-100: plain-56 student, ResNet-56 teacher (tensorflow-datasets 'cifar100').

    python train.py --config=configs/cifar100.py --workdir=workdirs/cifar100
    python train.py --config=configs/cifar100.py:smoke --workdir=/tmp/cifar100_smoke

The dataset must be prepared in the tfds data dir (`tfds build cifar100`), or pass
--config.data.download=True on a machine with network access.
"""

from rd_keras.configs import common


def get_config(arg=None):
    return common.cifar("cifar100", arg)
