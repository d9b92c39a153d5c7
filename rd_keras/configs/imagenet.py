"""Residual Distillation on ImageNet (ILSVRC-2012): plain-50 student, ResNet-50 teacher.

    python train.py --config=configs/imagenet.py --workdir=workdirs/imagenet \
        --config.data.manual_dir=/path/to/imagenet/tars
    python train.py --config=configs/imagenet.py:smoke --workdir=/tmp/imagenet_smoke

tensorflow-datasets 'imagenet2012' needs the official tar files in `data.manual_dir` to prepare once
(`data.download=True` then runs the preparation; it downloads nothing). The teacher is keras.applications'
ResNet-50 with ImageNet weights, which Keras downloads; offline, save them once elsewhere and pass
`--config.teacher.weights=/path/to/resnet50.weights.h5` (README: Start from a pretrained ResNet).
"""

from rd_keras.configs import common


def get_config(arg=None):
    config = common.get_config()
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.data_dir = ""
    config.data.manual_dir = ""
    config.data.download = False
    config.data.image_size = 224
    config.data.augment = "imagenet"  # random-resized crop + flip; eval: resize 256, centre crop 224
    config.data.batch_size = 256
    config.data.cache = False  # does not fit in memory
    config.model.arch = "resnet50"
    config.model.stem = "imagenet"
    config.train.lr = 0.1
    config.train.epochs = 90
    config.train.warmup_epochs = 5.0
    config.train.weight_decay = 1e-4
    config.train.precision = "mixed_float16"
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 5000
    config.distill.blend_epochs = 60.0
    # The default recipe (common.recipe) with keras.applications' ImageNet ResNet-50 as the frozen teacher
    # (its own preprocessing; Keras downloads the weights, or give a local file in teacher.weights), and
    # the downsampling projections kept in the student, as the paper's ImageNet plain-50.
    common.recipe(config)
    config.teacher.path = "keras.applications.ResNet50"
    config.teacher.weights = "imagenet"
    config.data.normalization = "caffe"
    config.model.student_shortcuts = "downsample"
    if arg == "smoke":
        common.smoke(config)
        config.model.arch = "resnet18"  # ImageNet depths have an ImageNet stem; resnet8 is CIFAR-style
        config.data.image_size = 64
        config.train.precision = "float32"
        config.data.normalization = "dataset"
    elif arg is not None:
        raise ValueError(f"Unknown config variant {arg!r}: expected 'smoke' or none.")
    return config
