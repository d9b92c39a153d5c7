"""Fine-tune a trained net (plain or ResNet) on your own images: new classifier head, all else copied.

    python train.py --config=configs/transfer.py --workdir=W2 --config.transfer.from=W \\
        --config.data.data_dir=my_images
    python train.py --config=configs/transfer.py --workdir=W2 --config.transfer.from=W/plain.keras \\
        --config.data.source=tfds --config.data.name=cifar10 --config.data.data_dir=
    python train.py --config=configs/transfer.py:smoke --workdir=/tmp/ft --config.transfer.from=W \\
        --config.data.data_dir=my_images

`my_images/{train,test}/<class>/*.png|jpg` (class names sorted give the labels); `transfer.from` is a
`plain.keras` or `resnet.keras`, a workdir of this project (its plain.keras, else resnet.keras), or
`keras.applications.<Name>`. The images take the source net's channel count (grayscale or RGB files alike).
`--config.transfer.freeze_stages=2` keeps the stem and stage 1 frozen. The fine-tuned plain net is saved as
`W2/plain.keras`, so `--config.export.enabled=True` (or `python -m rd_keras.export --workdir=W2`) ships it.
"""

from rd_keras.configs import common


def get_config(arg=None):
    config = common.get_config()
    config.train.mode = "transfer"
    config.data.source = "folder"
    config.data.name = "folder"
    config.data.data_dir = ""  # required: the image folder
    config.data.augment = "cifar"  # pad-crop + flip; small data sets need it most
    config.data.batch_size = 32  # a few hundred images make only a few steps per epoch at 128
    config.data.shuffle_buffer = 10_000
    # A pretrained body needs a smaller step than training from scratch (0.1), and fewer epochs.
    config.train.lr = 0.01
    config.train.epochs = 20
    config.train.warmup_epochs = 1.0
    config.train.weight_decay = 5e-4
    config.train.log_every_steps = 10
    config.train.checkpoint_every_steps = 200
    config.transfer.freeze_stages = 0
    if arg == "smoke":
        config.train.epochs = 2
        config.train.warmup_epochs = 0.5
        config.train.log_every_steps = 2
        config.train.checkpoint_every_steps = 4
    elif arg is not None:
        raise ValueError(f"Unknown config variant {arg!r}: expected 'smoke' or none.")
    return config
