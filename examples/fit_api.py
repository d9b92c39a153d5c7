"""Residual Distillation from your own Keras code: `fit()` a plain-20 on Fashion-MNIST through a ResNet-20,
then export the plain net alone.

    python examples/fit_api.py --workdir=/tmp/fit_api            # ResNet-20 teacher, plain-20 student
    python examples/fit_api.py --workdir=/tmp/fit_api --smoke    # resnet8 x0.25 on 384 images, ~1 minute
    python -m rd_keras.export --workdir=/tmp/fit_api             # the export this script ends with

The numbers (learning rate, m(t), KD, weight decay) are those of the shipped config fashion_mnist, so this run
and `rd-keras-train --config=fashion_mnist` optimise the same objective. The teacher here starts untrained, so
it is trained alongside (`teacher_mode="joint"`); examples/pretrained_teacher.py distils from a trained one,
which stays frozen (the default).
"""

import argparse
import dataclasses
import os

import keras

import rd_keras
from rd_keras import architectures, data, export
from rd_keras import workdir as wd
from rd_keras.configs import fashion_mnist


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where plain.keras, config.json and export/ go")
    parser.add_argument("--smoke", action="store_true", help="resnet8 x0.25, 384 images, 2 epochs")
    args = parser.parse_args(argv)
    config = fashion_mnist.get_config("smoke" if args.smoke else None)
    os.makedirs(args.workdir, exist_ok=True)

    # Data: batches of (normalised float32 images, int32 labels). Pass e of the train split is shuffled
    # and augmented from its own seeds; fit() reads the passes one after the other.
    passes, eval_ds, info = data.pipelines(config)
    steps, epochs = passes.batches_per_pass, config.train.epochs
    train_ds = passes.one_pass(0)
    for epoch in range(1, epochs):
        train_ds = train_ds.concatenate(passes.one_pass(epoch))

    # The teacher ResNet and its plain twin (same stages, no shortcuts).
    m = config.model
    teacher = architectures.build(m.arch, num_classes=info.num_classes, input_shape=info.image_shape,
                                  width=m.width)
    student = rd_keras.make_plain(teacher)

    t, d = config.train, config.distill
    lr = rd_keras.WarmupCosine(t.lr, warmup_steps=int(t.warmup_epochs * steps), total_steps=epochs * steps)
    distiller = rd_keras.ResidualDistiller(
        teacher, student, teacher_mode="joint", hybrid_points=d.hybrid_points,  # an untrained teacher learns too
        blend=rd_keras.BlendSchedule(steps, blend_epochs=d.blend_epochs, floor=d.blend_floor),
        kd_alpha=d.kd_alpha, temperature=d.temperature, weight_decay=t.weight_decay, normalize=d.normalize)

    def sgd():  # one per net: each keeps its own momentum and step counter
        return keras.optimizers.SGD(lr, momentum=t.momentum, nesterov=t.nesterov)

    distiller.compile(optimizer=sgd(), teacher_optimizer=sgd())
    distiller.fit(train_ds, steps_per_epoch=steps, epochs=epochs, validation_data=eval_ds, verbose=2,
                  callbacks=[keras.callbacks.BackupAndRestore(os.path.join(args.workdir, "backup")),
                             keras.callbacks.CSVLogger(os.path.join(args.workdir, "log.csv"))])
    print("plain net on the test split:", distiller.evaluate(eval_ds, return_dict=True, verbose=0))

    # What `python -m rd_keras.export` reads: W/plain.keras (the plain net alone, dict output) and
    # W/config.json (the data it was trained on, to calibrate and judge the exported models).
    wd.save_model_atomic(distiller.student, wd.plain_path(args.workdir))
    wd.write_config(args.workdir, config, dataset=dataclasses.asdict(info))
    report = export.export_workdir(args.workdir, formats="tflite" if args.smoke else export.FORMATS,
                                   quantize="none" if args.smoke else "none,fp16,dynamic,int8",
                                   eval_examples=256 if args.smoke else 1000, progress=False)
    print(export.format_table(report))


if __name__ == "__main__":
    main()
