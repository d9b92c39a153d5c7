"""The fit() API: ResidualDistiller's step equals the trainer's, callbacks, resume through BackupAndRestore,
MirroredStrategy, mixed precision, make_plain and the pair check, the schedules, the example script."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from rd_keras import architectures, data, distiller, schedules, train_lib, twins
from rd_keras.configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE, CLASSES, BATCH = (16, 16, 3), 10, 8
INFO = data.DatasetInfo(CLASSES, SHAPE, 64, 16, (0.5,) * 3, (0.25,) * 3)
STEPS_PER_EPOCH = INFO.train_examples // BATCH
NET = dict(num_classes=CLASSES, input_shape=SHAPE, width=0.25)


def small_config(**overrides):
    """rd_keras/configs/common.py shrunk to resnet8 x0.25 on 16x16 images; overrides: {"train.lr": 0.1}."""
    config = common.smoke(common.get_config())
    config.data.update(source="synthetic", name="synthetic", image_size=16, channels=3, batch_size=BATCH,
                       synthetic_examples=INFO.train_examples, augment="none")
    config.train.update(warmup_epochs=0.5, epochs=2, grad_norms=False)
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def batch(seed=0, size=BATCH):
    images = tf.random.stateless_normal((size, *SHAPE), seed=(seed, 1))
    labels = tf.random.stateless_uniform((size,), seed=(seed, 2), maxval=CLASSES, dtype=tf.int32)
    return images, labels


def dataset(batches, size=BATCH):
    """`batches` distinct batches, repeated forever (fit is given steps_per_epoch)."""
    parts = [batch(seed, size) for seed in range(batches)]
    images, labels = tf.concat([p[0] for p in parts], 0), tf.concat([p[1] for p in parts], 0)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(size).repeat()


def schedules_of(config):
    t, d = config.train, config.distill
    lr = schedules.WarmupCosine(t.lr, int(t.warmup_epochs * STEPS_PER_EPOCH), t.epochs * STEPS_PER_EPOCH)
    return lr, schedules.BlendSchedule(STEPS_PER_EPOCH, d.blend_epochs, d.blend_floor)


def make_distiller(config, teacher_mode="joint", **kwargs):
    """A distiller with the config's numbers, compiled with the trainer's optimizer settings."""
    lr, blend = schedules_of(config)
    teacher = architectures.build("resnet8", **NET)
    student = twins.make_plain(teacher)
    d = distiller.ResidualDistiller(teacher, student, teacher_mode=teacher_mode, blend=blend,
                                    hybrid_entry=config.distill.hybrid_entry,
                                    kd_alpha=config.distill.kd_alpha, temperature=config.distill.temperature,
                                    weight_decay=config.train.weight_decay, normalize=config.distill.normalize)

    def sgd():
        return keras.optimizers.SGD(lr, momentum=config.train.momentum, nesterov=config.train.nesterov)

    d.compile(optimizer=sgd(), teacher_optimizer=sgd() if teacher_mode == "joint" else None, **kwargs)
    return d


def weights(model):
    return [v.numpy().copy() for v in model.weights]


# ----------------------------------------------------------------------------- the step itself


@pytest.mark.parametrize("entry", ["direct", "rescale"])
def test_train_step_equals_the_trainer_step(entry):
    config = small_config(**{"distill.kd_alpha": 0.5, "distill.normalize": True, "distill.hybrid_entry": entry})
    setup = train_lib.build_setup(config, INFO, tf.distribute.get_strategy(), STEPS_PER_EPOCH)
    d = make_distiller(config)
    d.student.set_weights(setup.trained["plain"].get_weights())
    d.teacher.set_weights(setup.trained["resnet"].get_weights())
    totals = []
    for seed in range(2):  # the second step also uses the momentum slots and a later m(t) and lr
        images, labels = batch(seed)
        theirs = setup.train_step(iter(tf.data.Dataset.from_tensors((images, labels))))
        ours = d.train_step((images, labels))
        totals.append((float(theirs["total"]), float(theirs["teacher_ce"])))
        np.testing.assert_allclose(float(ours["blend"]), float(theirs["blend"]), rtol=1e-6)
        np.testing.assert_allclose(float(ours["learning_rate"]), float(theirs["lr"]), rtol=1e-6)
        # The logged losses are running means over the epoch's steps.
        np.testing.assert_allclose(float(ours["loss"]), np.mean([t for t, _ in totals]), rtol=1e-5)
        np.testing.assert_allclose(float(ours["teacher_loss"]), np.mean([c for _, c in totals]), rtol=1e-5)
    assert float(theirs["blend"]) < 1.0 and float(theirs["lr"]) > 0
    for role, model in (("plain", d.student), ("resnet", d.teacher)):
        for ours_v, theirs_v in zip(model.weights, setup.trained[role].weights):
            assert ours_v.path == theirs_v.path
            np.testing.assert_allclose(ours_v.numpy(), theirs_v.numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{role}: {ours_v.path}")
    assert int(d.optimizer.iterations.numpy()) == int(d.teacher_optimizer.iterations.numpy()) == 2
    assert d.get_config()["hybrid_entry"] == entry
    assert distiller.ResidualDistiller.from_config(d.get_config()).paths.entry == entry


def test_mixed_float16_step_is_finite_and_loss_scaled():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        d = make_distiller(small_config(**{"distill.kd_alpha": 0.5}))
        assert isinstance(d.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(d.teacher_optimizer, keras.optimizers.LossScaleOptimizer)
        assert d.student.get_layer("stage1_block1_conv1").compute_dtype == "float16"
        before = weights(d.student)
        for seed in range(2):
            logs = d.train_step(batch(seed))
        assert all(math.isfinite(float(v)) for v in logs.values()), logs
        assert any(not np.array_equal(a, b) for a, b in zip(before, weights(d.student)))
    finally:
        keras.mixed_precision.set_global_policy(previous)


# ----------------------------------------------------------------------------- fit, callbacks, evaluate


def test_fit_with_callbacks_pretrained_teacher_and_evaluate(tmp_path):
    config = small_config(**{"distill.kd_alpha": 0.0})
    d = make_distiller(config, teacher_mode="pretrained", metrics=["sparse_categorical_crossentropy"])
    frozen = weights(d.teacher)
    assert not d.teacher.trainable_variables and d.teacher_optimizer is None
    val = dataset(2).take(2)
    history = d.fit(dataset(4), steps_per_epoch=4, epochs=2, validation_data=val, verbose=0, callbacks=[
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_accuracy", mode="max",
                                        save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=5),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.TensorBoard(str(tmp_path / "tb"))])
    logs = history.history
    assert {"loss", "plain_loss", "accuracy", "hybrid_1_accuracy", "hybrid_2_accuracy", "hybrid_1_loss",
            "blend", "learning_rate", "sparse_categorical_crossentropy", "val_loss", "val_accuracy",
            "val_hybrid_1_accuracy", "val_hybrid_2_accuracy", "val_teacher_accuracy"} <= set(logs)
    assert "teacher_loss" not in logs and "kd_1" not in logs  # pretrained, kd_alpha = 0
    # The last step of epoch 2 is step 7: m(t) and the learning rate logged are that step's.
    lr, blend = schedules_of(config)
    assert logs["blend"][-1] == pytest.approx(float(blend(7)), rel=1e-6)
    assert logs["learning_rate"][-1] == pytest.approx(float(lr(7)), rel=1e-6)
    for a, b in zip(frozen, weights(d.teacher)):  # kernels and BN statistics alike
        np.testing.assert_array_equal(a, b)

    # evaluate: the plain net's accuracy and cross-entropy, computed here by hand.
    result = d.evaluate(val, return_dict=True, verbose=0)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in val])
    images, labels = np.concatenate(images), np.concatenate(labels)
    logits = d.student(images, training=False)["logits"].numpy()
    assert result["accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == labels)))
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits).numpy().mean()
    assert result["loss"] == pytest.approx(float(ce), rel=1e-5)
    assert logs["val_accuracy"][-1] == pytest.approx(result["accuracy"])

    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[-1]["val_accuracy"]) == pytest.approx(result["accuracy"])
    assert any(name.startswith("events.out") for _, _, names in os.walk(tmp_path / "tb") for name in names)
    restored = keras.saving.load_model(tmp_path / "best.keras")
    assert isinstance(restored, distiller.ResidualDistiller) and restored.teacher_mode == "pretrained"
    assert restored.blend.get_config() == blend.get_config()
    best = int(np.argmax(logs["val_accuracy"]))
    assert int(restored.optimizer.iterations.numpy()) == 4 * (best + 1)


def test_default_teacher_is_frozen_and_a_trained_resnet_comes_out_bitwise_unchanged():
    """As keras.distillation.Distiller, the teacher is trained already and frozen unless asked otherwise: a
    trained ResNet, given with no teacher_mode, is bit for bit the same after fit(), BN statistics included,
    while the student learns."""
    teacher = architectures.build("resnet8", **NET)
    resnet = architectures.classifier(teacher)  # the same layers, logits only: trained the Keras way
    resnet.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    resnet.fit(dataset(2), steps_per_epoch=2, epochs=1, verbose=0)
    trained = weights(teacher)
    moving_means = [v.numpy() for v in teacher.non_trainable_variables if "moving_mean" in v.path]
    assert moving_means and all(np.any(m != 0) for m in moving_means)  # training moved them off their init
    student = twins.make_plain(teacher)
    d = distiller.ResidualDistiller(teacher, student, blend=0.5, kd_alpha=0.5)
    d.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    assert d.teacher_mode == "pretrained" and d.teacher_optimizer is None and not teacher.trainable_variables
    untrained_student = weights(student)
    history = d.fit(dataset(4), steps_per_epoch=4, epochs=1, verbose=0)
    assert "teacher_loss" not in history.history
    for before, after in zip(trained, weights(teacher)):
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(a, b) for a, b in zip(untrained_student, weights(student)))


class _Interrupt(keras.callbacks.Callback):
    """Records each batch's m(t), learning rate and step; raises after `stop_at` batches of this run."""

    def __init__(self, stop_at=None):
        super().__init__()
        self.stop_at, self.seen = stop_at, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((int(self.model.optimizer.iterations.numpy()) - 1, float(logs["blend"]),
                          float(logs["learning_rate"])))
        if self.stop_at is not None and len(self.seen) == self.stop_at:
            raise RuntimeError("interrupted")


def test_backup_and_restore_continues_blend_and_learning_rate(tmp_path):
    config = small_config(**{"train.epochs": 3, "distill.blend_epochs": 2.0})
    lr, blend = schedules_of(config)
    steps, epochs = STEPS_PER_EPOCH, 3
    first = make_distiller(config, run_eagerly=True)
    at_epoch_end = []
    snapshot = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: at_epoch_end.append(
        (weights(first.student), weights(first.teacher))))
    interrupt = _Interrupt(stop_at=steps + 3)  # in the middle of the second epoch
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(dataset(steps), steps_per_epoch=steps, epochs=epochs, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path)), snapshot, interrupt])
    assert [s for s, _, _ in interrupt.seen] == list(range(steps + 3))

    # A new process would build a fresh distiller: fresh weights, untouched optimizers.
    keras.utils.set_random_seed(1)
    second = make_distiller(config, run_eagerly=True)
    resumed = _Interrupt()
    check = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: restored.append(
        (weights(second.student), weights(second.teacher), int(second.optimizer.iterations.numpy()),
         int(second.teacher_optimizer.iterations.numpy()))))
    restored = []
    history = second.fit(dataset(steps), steps_per_epoch=steps, epochs=epochs, verbose=0,
                         callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path)), check, resumed])
    # BackupAndRestore saves at epoch ends: the rerun starts from the end of the first epoch.
    student, teacher, step, teacher_step = restored[0]
    assert step == teacher_step == steps
    for ours, theirs in zip(student + teacher, at_epoch_end[0][0] + at_epoch_end[0][1]):
        np.testing.assert_array_equal(ours, theirs)
    assert len(history.history["loss"]) == epochs - 1
    assert [s for s, _, _ in resumed.seen] == list(range(steps, epochs * steps))
    for step, m, rate in resumed.seen:  # every step's m(t) and learning rate as an uninterrupted run's
        assert m == pytest.approx(float(blend(step)), rel=1e-6) and rate == pytest.approx(float(lr(step)), rel=1e-6)
    assert resumed.seen[0][1] < interrupt.seen[0][1]  # m(t) did not restart at 1
    assert resumed.seen[-1][1] == pytest.approx(config.distill.blend_floor)
    assert int(second.optimizer.iterations.numpy()) == epochs * steps


# ----------------------------------------------------------------------------- MirroredStrategy

MIRRORED_SCRIPT = textwrap.dedent("""
    import os
    import sys
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from test_distiller import BATCH, batch, make_distiller, small_config

    # Seeded like the in-process tests (conftest): with some random inits a pre-activation sits within rounding
    # of zero, a ReLU flips between the two runs and one weight differs by ~1e-4 (found at seed 1, 1 init in 12).
    keras.utils.set_random_seed(0)
    config = small_config(**{"distill.kd_alpha": 0.5})
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with mirrored.scope():
        multi = make_distiller(config)
    single = make_distiller(config)
    single.set_weights(multi.get_weights())

    # Both halves of each global batch are the same images: per-replica BatchNorm statistics then equal the
    # global batch's, so one device and two replicas must compute the same updates.
    halves = [batch(seed) for seed in range(2)]
    images = tf.concat([tf.concat([h[0]] * 2, 0) for h in halves], 0)
    labels = tf.concat([tf.concat([h[1]] * 2, 0) for h in halves], 0)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2 * BATCH)
    multi_logs = multi.fit(ds, epochs=1, verbose=0, validation_data=ds).history
    single_logs = single.fit(ds, epochs=1, verbose=0, validation_data=ds).history
    for k in ("loss", "plain_loss", "accuracy", "hybrid_1_loss", "teacher_loss", "blend", "learning_rate",
              "val_loss", "val_accuracy", "val_hybrid_2_accuracy", "val_teacher_accuracy"):
        np.testing.assert_allclose(multi_logs[k], single_logs[k], rtol=1e-4, err_msg=k)
    for role in ("student", "teacher"):
        for v, w in zip(getattr(multi, role).weights, getattr(single, role).weights):
            copies = [c.numpy() for c in v.value.values]
            assert len(copies) == 2
            np.testing.assert_array_equal(copies[0], copies[1], err_msg="replicas differ: " + v.path)
            np.testing.assert_allclose(copies[0], w.numpy(), rtol=1e-4, atol=1e-5, err_msg=v.path)
    assert int(multi.optimizer.iterations.numpy()) == 2
    print("MIRRORED_OK", {k: round(v[-1], 5) for k, v in multi_logs.items()}, flush=True)
    os._exit(0)  # TensorFlow's teardown can hang a loaded machine past the timeout after the result is printed
""")


@pytest.mark.slow  # a fresh interpreter and graph tracing: 25-115 s on 2 busy cores
def test_mirrored_two_replicas_match_single_device(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(script), ROOT, os.path.join(ROOT, "tests")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "MIRRORED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


# ----------------------------------------------------------------------------- pairs and arguments


def test_make_plain_rebuilds_the_twin_of_a_saved_resnet(tmp_path):
    resnet = architectures.build("resnet8", **NET)
    resnet.save(tmp_path / "resnet.keras")
    loaded = keras.saving.load_model(tmp_path / "resnet.keras", compile=False)
    expected = architectures.build("resnet8", shortcuts="none", **NET)
    for source in (resnet, loaded):
        plain = twins.make_plain(source)
        assert plain.name == "plain8"
        assert [(w.path, w.shape) for w in plain.weights] == [(w.path, w.shape) for w in expected.weights]
    bottleneck = architectures.build("resnet50", num_classes=7, input_shape=(32, 32, 3), width=0.0625,
                                     bottleneck_stride="1x1")
    assert twins.builder_arguments(bottleneck) == {
        "arch": "resnet50", "num_classes": 7, "input_shape": (32, 32, 3), "stem": "imagenet", "width": 0.0625,
        **architectures.options_of(bottleneck)}
    assert architectures.options_of(bottleneck)["bottleneck_stride"] == "1x1"
    downsample = twins.make_plain(bottleneck, shortcuts="downsample")
    assert any(layer.name.endswith("_proj_conv") for layer in downsample.layers)
    with pytest.raises(ValueError, match="'all'"):
        twins.make_plain(resnet, shortcuts="all")
    with pytest.raises(ValueError, match="has no layer named 'stem_conv'"):
        twins.make_plain(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="logits")]))


def test_mismatched_pairs_and_bad_arguments_name_the_value():
    teacher = architectures.build("resnet8", **NET)
    wide = architectures.build("resnet8", shortcuts="none", **{**NET, "width": 0.5})
    with pytest.raises(ValueError, match=r"Stage 'stage1' has shape \(None, 16, 16, 4\) in the teacher "
                                         r"'resnet8' but \(None, 16, 16, 8\) in the student 'plain8'"):
        distiller.ResidualDistiller(teacher, wide)
    other_input = architectures.build("resnet8", shortcuts="none", **{**NET, "input_shape": (32, 32, 3)})
    with pytest.raises(ValueError, match=r"Stage 'input' has shape \(None, 16, 16, 3\).*\(None, 32, 32, 3\)"):
        distiller.ResidualDistiller(teacher, other_input)
    # Any functional pair works when the names and shapes agree; a missing stage is named.
    x = keras.Input(SHAPE)
    h = keras.layers.Conv2D(4, 3, padding="same", name="stage1")(x)
    logits = keras.layers.Dense(CLASSES, name="logits")(keras.layers.GlobalAveragePooling2D()(h))
    with pytest.raises(ValueError, match="Hybrid point 'stage2' of the teacher 'resnet8' is missing"):
        distiller.ResidualDistiller(teacher, keras.Model(x, {"stage1": h, "logits": logits}, name="tiny"))
    student = twins.make_plain(teacher)
    for kwargs, quoted in ((dict(teacher_mode="frozen"), "teacher_mode='frozen'"), (dict(blend=1.5), "blend=1.5"),
                           (dict(temperature=0), "temperature=0"), (dict(kd_alpha=-1), "kd_alpha=-1"),
                           (dict(hybrid_points="7"), "hybrid_points='7'")):
        with pytest.raises(ValueError, match=quoted):
            distiller.ResidualDistiller(teacher, student, **kwargs)
    with pytest.raises(ValueError, match="same one twice"):
        distiller.ResidualDistiller(teacher, teacher)
    joint = distiller.ResidualDistiller(teacher, student, teacher_mode="joint")
    with pytest.raises(ValueError, match="loss='mse'"):
        joint.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="own optimizer"):
        sgd = keras.optimizers.SGD()
        joint.compile(optimizer=sgd, teacher_optimizer=sgd)
    joint.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))  # the teacher gets a fresh copy
    assert joint.teacher_optimizer is not joint.optimizer
    assert joint.teacher_optimizer.get_config() == joint.optimizer.get_config()
    frozen = distiller.ResidualDistiller(teacher, student, teacher_mode="pretrained")
    assert not teacher.trainable_variables
    with pytest.raises(ValueError, match="teacher_optimizer=<"):
        frozen.compile(optimizer="sgd", teacher_optimizer=keras.optimizers.SGD())
    with pytest.raises(ValueError, match="no trainable"):
        distiller.ResidualDistiller(teacher, student, teacher_mode="joint")


def test_schedule_objects_serialise_and_match_the_functions():
    blend = schedules.BlendSchedule(steps_per_epoch=10, blend_epochs=4, floor=0.2)
    lr = schedules.WarmupCosine(base_lr=0.4, warmup_steps=4, total_steps=24)
    for schedule, function, kw in ((blend, schedules.blend_weight, dict(steps_per_epoch=10, blend_epochs=4, floor=0.2)),
                                   (lr, schedules.warmup_cosine_lr, dict(base_lr=0.4, warmup_steps=4, total_steps=24))):
        copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
        assert type(copy) is type(schedule) and copy.get_config() == schedule.get_config()
        for step in (0, 3, 14, 20, 40):
            assert float(copy(tf.constant(step, tf.int64))) == pytest.approx(function(step, **kw), abs=1e-6)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        schedules.BlendSchedule(0, 1.0)
    with pytest.raises(ValueError, match="1.5"):
        schedules.BlendSchedule(10, 1.0, floor=1.5)
    with pytest.raises(ValueError, match="base_lr=-1"):
        schedules.WarmupCosine(-1, 0, 10)


# ----------------------------------------------------------------------------- the example


@pytest.mark.slow  # a fresh interpreter and graph tracing: 25-115 s on 2 busy cores
def test_example_script_smoke(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}  # rd_keras: the installed one
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "fit_api.py"), "--smoke",
                           f"--workdir={workdir}"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    plain = keras.saving.load_model(workdir / "plain.keras", compile=False)
    assert plain.name == "plain8" and not any(layer.name.endswith("_add") for layer in plain.layers)
    with open(workdir / "export" / "report.json") as f:
        report = json.load(f)
    artefacts = report["artefacts"]
    assert {"keras", "tflite_none"} <= set(artefacts)
    assert artefacts["tflite_none"]["top1_agreement"] >= 0.95
    assert 0.0 <= artefacts["keras"]["accuracy"] <= 1.0
