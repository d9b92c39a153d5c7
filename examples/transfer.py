"""Fine-tune a finished run's net on a folder of your own images, from Keras code, then export it.

    python examples/transfer.py --source=W --data_dir=my_images --workdir=W2
    python examples/transfer.py --smoke --workdir=/tmp/transfer     # offline, a few minutes
    rd-keras-export --workdir=W2                                   # what the script ends with

`--source`: a workdir of this project (its plain.keras, else resnet.keras) or one of those files.
`--data_dir`: `my_images/{train,test}/<class>/*.png|jpg` (class names sorted give the labels); the files may
be grayscale or RGB: they are read with the channel count the source net takes.

The net is rebuilt by rd_keras's builder for the folder's image size and classes: a new classifier head, every
other weight copied (`rd_keras.transfer`); `--freeze_stages=k` keeps the first k stages as they were, the
stem counting as one. Learning rate, epochs and augmentation are those of the shipped config `transfer`,
which the trainer runs as `rd-keras-train --config=transfer --config.transfer.from=W
--config.data.data_dir=my_images --workdir=W2`. `--smoke` first trains the `fashion_mnist:smoke` run as the source, then
fine-tunes it on PNGs of three Fashion-MNIST classes written from the IDX files.
"""

import argparse
import dataclasses
import os

import keras
import numpy as np
from PIL import Image

import rd_keras
from rd_keras import architectures, data, export, train_lib, transfer
from rd_keras import workdir as wd
from rd_keras.configs import fashion_mnist
from rd_keras.configs import transfer as transfer_config

FMNIST_CLASSES = {5: "sandal", 7: "sneaker", 9: "boot"}  # the smoke folder's classes


def smoke_inputs(root):
    """Trains `fashion_mnist:smoke` into `root/source` and writes 32 train and 16 test PNGs of each class of
    FMNIST_CLASSES to `root/images`; returns both paths."""
    source = os.path.join(root, "source")
    config = fashion_mnist.get_config("smoke")
    config.train.progress = False
    train_lib.run(config, source)  # resumes, or returns at once, when rerun
    images_dir = os.path.join(root, "images")
    for split, stem, n in (("train", "train", 32), ("test", "t10k", 16)):
        images = data.read_idx(os.path.join(config.data.data_dir, f"{stem}-images-idx3-ubyte.gz"), 3)
        labels = data.read_idx(os.path.join(config.data.data_dir, f"{stem}-labels-idx1-ubyte.gz"), 1)
        for label, name in FMNIST_CLASSES.items():
            folder = os.path.join(images_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in np.flatnonzero(labels == label)[:n]:
                Image.fromarray(images[i]).save(os.path.join(folder, f"{i:05d}.png"))  # grayscale
    return source, images_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the fine-tuned net, config.json and export/ go")
    parser.add_argument("--source", help="a finished run (workdir) or its plain.keras / resnet.keras")
    parser.add_argument("--data_dir", help="image folder: {train,test}/<class>/*.png|jpg")
    parser.add_argument("--freeze_stages", type=int, default=0,
                        help="leading stages kept frozen, the stem counting as one (default: 0)")
    parser.add_argument("--smoke", action="store_true", help="train a smoke source, fine-tune on 96 PNGs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.source, args.data_dir = smoke_inputs(os.path.join(args.workdir, "smoke"))
    elif not (args.source and args.data_dir):
        parser.error("give --source and --data_dir (or --smoke)")

    source = transfer.load(transfer.resolve(args.source))
    config = transfer_config.get_config("smoke" if args.smoke else None)
    config.data.data_dir = args.data_dir
    config.data.channels = source.input.shape[-1]  # grayscale or RGB files, read as the source net takes them
    if args.smoke:
        config.data.batch_size = 8
    passes, eval_ds, info = data.pipelines(config)
    steps, epochs = passes.batches_per_pass, config.train.epochs
    train_ds = passes.one_pass(0)
    for epoch in range(1, epochs):
        train_ds = train_ds.concatenate(passes.one_pass(epoch))

    # The source net rebuilt for these images and classes: a new head, every other weight copied.
    model = transfer.rebuild(source, num_classes=info.num_classes, input_shape=info.image_shape)
    transfer.freeze(model, args.freeze_stages)
    t = config.train
    lr = rd_keras.WarmupCosine(t.lr, warmup_steps=int(t.warmup_epochs * steps), total_steps=epochs * steps)
    classifier = architectures.classifier(model)  # the same layers, the logits alone
    classifier.compile(optimizer=keras.optimizers.SGD(lr, momentum=t.momentum, nesterov=t.nesterov,
                                                      weight_decay=t.weight_decay),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    classifier.fit(train_ds, steps_per_epoch=steps, epochs=epochs, validation_data=eval_ds, verbose=2)

    # A fine-tuned plain net is what rd_keras.export ships; a ResNet is saved as resnet.keras.
    plain = transfer.recipe_of(model).role == "plain"
    wd.save_model_atomic(model, wd.plain_path(args.workdir) if plain else wd.resnet_path(args.workdir))
    wd.write_config(args.workdir, config, dataset=dataclasses.asdict(info))
    if plain:
        report = export.export_workdir(args.workdir, formats="tflite" if args.smoke else export.FORMATS,
                                       quantize="none" if args.smoke else "none,int8", progress=False)
        print(export.format_table(report))


if __name__ == "__main__":
    main()
