"""A keras.applications ResNet-50 as the frozen teacher of its plain twin (plain-50), with fit().

    python examples/pretrained_teacher.py --weights=resnet50.weights.h5 --data_dir=my_images --workdir=W
    python examples/pretrained_teacher.py --smoke --workdir=/tmp/pretrained_teacher    # offline, a few minutes
    rd-keras-export --workdir=W                                                        # ships the plain-50

`--weights`: a local file of keras.applications.ResNet50 with its head (`include_top=True`), saved once where
there is network:

    python -c "import keras; keras.applications.ResNet50(weights='imagenet').save_weights('resnet50.weights.h5')"

The hybrid paths end in the teacher's head, so the data's classes must be the head's, in its order (the
ImageNet weights want the 1000 ImageNet classes; a head fine-tuned on your classes wants those).
`--data_dir`: `my_images/{train,test}/<class>/*.png|jpg`, grayscale or RGB files alike (read as RGB, which
ResNet-50 takes), preprocessed as keras.applications.resnet.preprocess_input does.

The teacher is rebuilt by rd_keras's builder with the file's weights (the same logits as keras.applications)
and stays frozen (`ResidualDistiller`'s default); the plain-50 learns through the hybrid paths, which run its
first stages and the teacher's last ones. `--smoke` downloads nothing: it saves a ResNet-50
of random weights (`weights=None`) with a 3-class head and writes 3 classes of small grayscale PNGs, then
trains one short epoch on 32x32 images: it checks the plumbing, and its numbers mean nothing (a random
teacher's BatchNorm statistics are no teacher's).
"""

import argparse
import dataclasses
import os

import keras
import numpy as np

import rd_keras
from rd_keras import data, pretrained
from rd_keras import workdir as wd
from rd_keras.configs import common

TEACHER = "keras.applications.ResNet50"


def smoke_inputs(root, classes=3, per_class=(8, 4), size=32):
    """A ResNet-50 of random weights with a `classes`-way head, saved to `root/resnet50.weights.h5`, and a
    folder `root/images/{train,test}/c<k>/*.png` of grayscale images, class k brighter than class k-1."""
    os.makedirs(root, exist_ok=True)
    weights = os.path.join(root, "resnet50.weights.h5")
    keras.applications.ResNet50(weights=None, classes=classes).save_weights(weights)
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for k in range(classes):
            folder = os.path.join(root, "images", split, f"c{k}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = (k + 0.5) * 255 / classes + rng.uniform(-40, 40, (size, size, 1))
                keras.utils.save_img(os.path.join(folder, f"{i}.png"), np.clip(pixels, 0, 255).astype(np.uint8),
                                     scale=False)
    return weights, os.path.join(root, "images")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where plain.keras and config.json go")
    parser.add_argument("--weights", help="a local keras.applications.ResNet50 weights file (with its head)")
    parser.add_argument("--data_dir", help="image folder: {train,test}/<class>/*.png|jpg")
    parser.add_argument("--epochs", type=int, default=30, help="default: %(default)s (--smoke: 1)")
    parser.add_argument("--smoke", action="store_true", help="random teacher weights, tiny folder, 1 epoch")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    if args.smoke:
        args.weights, args.data_dir = smoke_inputs(os.path.join(args.workdir, "smoke"))
    elif not (args.weights and args.data_dir):
        parser.error("give --weights and --data_dir (or --smoke)")

    config = common.get_config()
    config.data.update(source="folder", name="folder", data_dir=args.data_dir, channels=3,
                       image_size=32 if args.smoke else 224, augment="none" if args.smoke else "imagenet",
                       batch_size=8 if args.smoke else 64, normalization=pretrained.NORMALIZATION)
    passes, eval_ds, info = data.pipelines(config)
    steps, epochs = passes.batches_per_pass, 1 if args.smoke else args.epochs
    train_ds = passes.one_pass(0)
    for epoch in range(1, epochs):
        train_ds = train_ds.concatenate(passes.one_pass(epoch))

    # The teacher: keras.applications' ResNet-50 rebuilt by our builder, the file's weights copied in. Its
    # plain twin has the same layers without shortcuts.
    teacher = pretrained.load(TEACHER, args.weights, num_classes=info.num_classes, input_shape=info.image_shape)
    student = rd_keras.make_plain(teacher)

    lr = rd_keras.WarmupCosine(0.01, warmup_steps=steps if epochs > 1 else 0, total_steps=epochs * steps)
    distiller = rd_keras.ResidualDistiller(  # teacher_mode="pretrained" (the default): the teacher stays frozen
        teacher, student, blend=rd_keras.BlendSchedule(steps, blend_epochs=epochs, floor=1.0), weight_decay=1e-4)
    distiller.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9, nesterov=True))
    distiller.fit(train_ds, steps_per_epoch=steps, epochs=epochs, validation_data=eval_ds, verbose=2)
    print("plain-50 on the test split:", distiller.evaluate(eval_ds, return_dict=True, verbose=0))

    # What `rd-keras-export --workdir=W` reads: the plain net alone and the data it was trained on.
    wd.save_model_atomic(distiller.student, wd.plain_path(args.workdir))
    wd.write_config(args.workdir, config, dataset=dataclasses.asdict(info))
    print(f"saved {wd.plain_path(args.workdir)}")


if __name__ == "__main__":
    main()
