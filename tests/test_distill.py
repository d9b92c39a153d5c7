"""The RD step: gradient paths, frozen and joint teachers, schedules, KD, NaN skip, MirroredStrategy, mixed
precision."""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from rd_keras import architectures, clipping, data, distill, hybrid, schedules, steps, teacher, train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE, CLASSES, BATCH = (16, 16, 3), 10, 8
INFO = data.DatasetInfo(CLASSES, SHAPE, 64, 16, (0.5,) * 3, (0.25,) * 3)
STEPS_PER_EPOCH = INFO.train_examples // BATCH


def small_config(**overrides):
    """configs/common.py shrunk to resnet8 x0.25 on 16x16 synthetic images; overrides: {"train.lr": 0.1}."""
    path = os.path.join(ROOT, "configs", "common.py")
    spec = importlib.util.spec_from_file_location("common_for_tests", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    config = common.smoke(common.get_config())
    config.data.update(source="synthetic", name="synthetic", image_size=16, channels=3, batch_size=BATCH,
                       synthetic_examples=INFO.train_examples, augment="none", train_subset=0, eval_subset=0)
    config.train.update(warmup_epochs=0.0, epochs=2)
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def batch(seed=0):
    images = tf.random.stateless_normal((BATCH, *SHAPE), seed=(seed, 1))
    labels = tf.random.stateless_uniform((BATCH,), seed=(seed, 2), maxval=CLASSES, dtype=tf.int32)
    return images, labels


def one_batch_iterator(images, labels):
    return iter(tf.data.Dataset.from_tensors((images, labels)).repeat())


def setup_for(config, teacher_source=None):
    return train_lib.build_setup(config, INFO, tf.distribute.get_strategy(), STEPS_PER_EPOCH, teacher_source)


def snapshot(model):
    return {v.path: v.numpy().copy() for v in model.weights}


# ----------------------------------------------------------------------------- gradient paths


def test_hybrid_losses_reach_plain_early_stages_through_the_teacher():
    setup = setup_for(small_config(**{"distill.kd_alpha": 0.5}))
    plain, resnet = setup.trained["plain"], setup.trained["resnet"]
    images, labels = batch()
    setup.train_step(one_batch_iterator(images, labels))  # one joint RD step first
    paths = hybrid.build_paths(plain, resnet)

    def kernels(stage):
        return [v for v in plain.trainable_variables if v.path.startswith(f"{stage}_") and v.path.endswith("kernel")]

    stage1, stage3 = kernels("stage1"), kernels("stage3")
    assert stage1 and stage3

    def hybrid_only_grads(cut):
        with tf.GradientTape() as tape:
            out = dict(paths.taps(images, training=True))
            if cut:  # treat the plain features as constants: the only path left is through nothing
                out = {k: tf.stop_gradient(v) for k, v in out.items()}
            logits = paths.logits(out)
            loss = tf.add_n([tf.reduce_mean(distill.cross_entropy(labels, h)) for h in logits])
        return tape.gradient(loss, stage1 + stage3)

    grads = hybrid_only_grads(cut=False)
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads[:len(stage1)])
    assert all(g is None for g in grads[len(stage1):])  # the plain stage3 lies past every boundary
    assert all(g is None for g in hybrid_only_grads(cut=True))

    # The same through the real objective, with the teacher frozen by nothing but the variable lists:
    # total - plain CE - weight decay is the blended hybrid + KD part.
    cfg = distill.LossConfig(global_batch_size=BATCH, kd_alpha=0.5)
    with tf.GradientTape() as tape:
        terms = distill.distill_losses(paths, resnet, images, labels, blend=1.0, cfg=cfg, joint=False)
        hybrid_part = terms["total"] - terms["plain_ce"] - terms["weight_decay"]
    assert {"hybrid_ce_1", "hybrid_ce_2", "kd_1", "kd_2"} <= set(terms)
    grads = tape.gradient(hybrid_part, stage1 + stage3)
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads[:len(stage1)])
    for g in grads[len(stage1):]:  # plain CE enters and leaves the difference: zero up to rounding
        np.testing.assert_allclose(g.numpy(), 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- teacher updates


def test_pretrained_teacher_is_bitwise_unchanged(tmp_path):
    source = architectures.build("resnet8", num_classes=CLASSES, input_shape=SHAPE, width=0.25)
    source(tf.zeros((1, *SHAPE)), training=True)
    source.save(tmp_path / "resnet.keras")
    config = small_config(**{"teacher.mode": "pretrained", "teacher.path": str(tmp_path),
                             "distill.kd_alpha": 0.5})
    setup = setup_for(config, teacher.resolve(config.teacher.path))
    assert list(setup.trained) == ["plain"] and "resnet" not in setup.checkpoint_objects
    assert not setup.teacher.trainable_variables
    for a, b in zip(setup.teacher.weights, source.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    before_teacher, before_plain = snapshot(setup.teacher), snapshot(setup.trained["plain"])
    iterator = one_batch_iterator(*batch())
    for _ in range(2):
        terms = setup.train_step(iterator)
    assert "teacher_ce" not in terms and math.isfinite(float(terms["total"]))
    after = snapshot(setup.teacher)
    assert before_teacher.keys() == after.keys()
    for path in before_teacher:  # kernels, BN gamma/beta and BN moving statistics alike
        np.testing.assert_array_equal(before_teacher[path], after[path], err_msg=path)
    changed = snapshot(setup.trained["plain"])
    assert any(not np.array_equal(before_plain[k], changed[k]) for k in before_plain)


def test_pretrained_teacher_mismatch_names_both(tmp_path):
    architectures.build("resnet8", num_classes=CLASSES, input_shape=SHAPE, width=0.5).save(tmp_path / "t.keras")
    config = small_config(**{"teacher.mode": "pretrained", "teacher.path": str(tmp_path / "t.keras")})
    with pytest.raises(teacher.TeacherError, match=r"(?s)stem width 8.*stem width 4"):
        setup_for(config, teacher.resolve(config.teacher.path))
    with pytest.raises(teacher.TeacherError, match="not found"):
        teacher.resolve(str(tmp_path / "missing.keras"))


def test_joint_teacher_update_equals_its_own_supervised_step():
    images, labels = batch()
    joint = setup_for(small_config(**{"distill.kd_alpha": 0.5}))
    supervised = setup_for(small_config(**{"train.mode": "supervised", "model.supervised_shortcuts": "all"}))
    copy = supervised.trained["resnet"]
    copy.set_weights(joint.teacher.get_weights())
    for _ in range(2):  # the second step also exercises the momentum slots
        joint_terms = joint.train_step(one_batch_iterator(images, labels))
        supervised_terms = supervised.train_step(one_batch_iterator(images, labels))
    np.testing.assert_allclose(float(joint_terms["teacher_ce"]), float(supervised_terms["ce"]), rtol=1e-5)
    for a, b in zip(joint.teacher.weights, copy.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_teacher_first_student_learns_through_the_updated_teacher(tmp_path):
    """teacher.joint_update=teacher_first: the teacher takes its own supervised step, then the student takes
    exactly the step a pretrained-teacher run would take from that updated (frozen) teacher."""
    images, labels = batch()
    first = setup_for(small_config(**{"distill.kd_alpha": 0.5, "teacher.joint_update": "teacher_first"}))
    supervised = setup_for(small_config(**{"train.mode": "supervised", "model.supervised_shortcuts": "all"}))
    supervised.trained["resnet"].set_weights(first.teacher.get_weights())
    plain_before = first.trained["plain"].get_weights()
    terms = first.train_step(one_batch_iterator(images, labels))
    supervised_terms = supervised.train_step(one_batch_iterator(images, labels))
    np.testing.assert_allclose(float(terms["teacher_ce"]), float(supervised_terms["ce"]), rtol=1e-5)
    for a, b in zip(first.teacher.weights, supervised.trained["resnet"].weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    # The student's step from the teacher as it is now, frozen.
    first.teacher.save(tmp_path / "resnet.keras")
    config = small_config(**{"distill.kd_alpha": 0.5, "teacher.mode": "pretrained",
                             "teacher.path": str(tmp_path / "resnet.keras")})
    frozen = setup_for(config, teacher.resolve(config.teacher.path))
    frozen.trained["plain"].set_weights(plain_before)
    frozen_terms = frozen.train_step(one_batch_iterator(images, labels))
    np.testing.assert_allclose(float(terms["total"]), float(frozen_terms["total"]), rtol=1e-5)
    for a, b in zip(first.trained["plain"].weights, frozen.trained["plain"].weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    # Checkpointed optimizers keep their roles.
    assert first.checkpoint_objects["resnet_optimizer"] is not first.checkpoint_objects["plain_optimizer"]


def test_delayed_start_keeps_hybrid_and_kd_terms_out_until_it():
    kw = dict(steps_per_epoch=10, blend_epochs=4, floor=0.2, start_epochs=1.5)
    assert schedules.blend_weight(0, **kw) == schedules.blend_weight(14, **kw) == 0.0
    assert schedules.blend_weight(15, **kw) == pytest.approx(1.0)
    assert schedules.blend_weight(35, **kw) == pytest.approx(0.6)  # half-way through the decay after the start
    for step in (0, 14, 15, 35, 99):
        assert float(schedules.blend_weight(tf.constant(step, tf.int64), **kw)) == pytest.approx(
            schedules.blend_weight(step, **kw), abs=1e-6)
    config = small_config(**{"distill.kd_alpha": 0.0, "distill.logit_kd_alpha": 1.0,
                             "distill.blend_start_epochs": 1.0})
    setup = setup_for(config)
    images, labels = batch()
    terms = setup.train_step(one_batch_iterator(images, labels))  # step 0 < one epoch: student CE alone
    assert float(terms["blend"]) == 0.0
    np.testing.assert_allclose(float(terms["total"]), float(terms["plain_ce"] + terms["weight_decay"]), rtol=1e-6)
    setup.step.assign(STEPS_PER_EPOCH)
    terms = setup.train_step(one_batch_iterator(images, labels))
    assert float(terms["blend"]) == pytest.approx(1.0)
    assert float(terms["total"]) > float(terms["plain_ce"] + terms["weight_decay"] + terms["logit_kd"]) - 1e-6


def test_delayed_start_with_a_pretrained_teacher_keeps_kd_from_step_0(tmp_path):
    """KD first, hybrid paths later: the frozen teacher's logits are good from the start."""
    source = architectures.build("resnet8", num_classes=CLASSES, input_shape=SHAPE, width=0.25)
    source(tf.zeros((1, *SHAPE)), training=True)
    source.save(tmp_path / "resnet.keras")
    config = small_config(**{"teacher.mode": "pretrained", "teacher.path": str(tmp_path), "distill.kd_alpha": 0.0,
                             "distill.logit_kd_alpha": 1.0, "distill.blend_start_epochs": 1.0})
    setup = setup_for(config, teacher.resolve(config.teacher.path))
    images, labels = batch()
    terms = setup.train_step(one_batch_iterator(images, labels))
    assert float(terms["blend"]) == 0.0 and float(terms["logit_kd"]) > 0
    np.testing.assert_allclose(float(terms["total"]),
                               float(terms["plain_ce"] + terms["weight_decay"] + terms["logit_kd"]), rtol=1e-6)
    setup.step.assign(STEPS_PER_EPOCH)
    terms = setup.train_step(one_batch_iterator(images, labels))
    assert float(terms["blend"]) == pytest.approx(1.0)
    hybrid = sum(float(v) for k, v in terms.items() if k.startswith("hybrid_ce_"))
    np.testing.assert_allclose(float(terms["total"]), float(terms["plain_ce"] + terms["weight_decay"]
                                                            + terms["logit_kd"]) + hybrid, rtol=1e-5)


# ----------------------------------------------------------------------------- schedules and KD


def test_blend_schedule():
    kw = dict(steps_per_epoch=10, blend_epochs=4, floor=0.2)
    assert schedules.blend_weight(0, **kw) == pytest.approx(1.0)
    assert schedules.blend_weight(20, **kw) == pytest.approx(0.6)  # half-way: floor + (1 - floor) / 2
    assert schedules.blend_weight(10, **kw) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert schedules.blend_weight(40, **kw) == pytest.approx(0.2)
    assert schedules.blend_weight(1000, **kw) == pytest.approx(0.2)
    assert schedules.blend_weight(5, steps_per_epoch=10, blend_epochs=0, floor=0.3) == pytest.approx(0.3)
    for step in (0, 7, 20, 33, 40, 99):  # tensors and Python numbers agree
        assert float(schedules.blend_weight(tf.constant(step, tf.int64), **kw)) == pytest.approx(
            schedules.blend_weight(step, **kw), abs=1e-6)
    with pytest.raises(ValueError, match="1.5"):
        schedules.blend_weight(0, steps_per_epoch=10, blend_epochs=1, floor=1.5)


def test_lr_schedule_warmup_then_cosine():
    kw = dict(base_lr=0.4, warmup_steps=4, total_steps=24)
    assert [schedules.warmup_cosine_lr(s, **kw) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert schedules.warmup_cosine_lr(4, **kw) == pytest.approx(0.4)
    assert schedules.warmup_cosine_lr(14, **kw) == pytest.approx(0.2)
    assert schedules.warmup_cosine_lr(24, **kw) == pytest.approx(0.0)
    assert float(schedules.warmup_cosine_lr(tf.constant(14, tf.int64), **kw)) == pytest.approx(0.2)


def test_kd_term_matches_hand_computation():
    teacher_logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
    student_logits = np.array([[1.0, 1.0, 0.0], [1.0, -2.0, 0.5]], np.float32)
    temperature = 2.0

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher_logits / temperature), softmax(student_logits / temperature)
    expected = temperature ** 2 * (p * np.log(p / q)).sum(-1)
    got = distill.kd_loss(teacher_logits, student_logits, temperature).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.allclose(distill.kd_loss(teacher_logits, teacher_logits, temperature).numpy(), 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- NaN policy, mixed precision


def test_nan_skip_changes_nothing():
    setup = setup_for(small_config(**{"train.nan_policy": "skip"}))
    models = list(setup.trained.values())
    before = [snapshot(m) for m in models]
    images, labels = batch()
    poisoned = tf.tensor_scatter_nd_update(images, [[0, 0, 0, 0]], [float("nan")])
    terms = setup.train_step(one_batch_iterator(poisoned, labels))
    assert float(terms["skipped"]) == 1.0
    for model, old in zip(models, before):
        new = snapshot(model)
        for path in old:
            np.testing.assert_array_equal(old[path], new[path], err_msg=path)
    terms = setup.train_step(one_batch_iterator(images, labels))
    assert float(terms["skipped"]) == 0.0 and int(setup.step.numpy()) == 2


def _one_linear_step(optimizer, clipnorm, poison=1.0, nan_skip=False):
    """w after one step of SGD(lr=1) from w = 0 on loss = poison * sum(w * x): the gradient is x, norm 5."""
    w = keras.Variable(np.zeros(3, np.float32))
    x = tf.constant([3.0, 4.0, 0.0])
    optimizer.build([w])
    train_step = steps.build_train_step(
        tf.distribute.get_strategy(), lambda images, labels: {"total": poison * tf.reduce_sum(w * x)},
        [steps.Update("total", optimizer, [w], clipping.NormClip(clipnorm) if clipnorm else None)],
        step=tf.Variable(0, dtype=tf.int64),
        nan_skip=nan_skip)
    terms = train_step(one_batch_iterator(*batch()))
    return w.numpy(), terms


@pytest.mark.parametrize("clipnorm, expected", [(0.0, [-3.0, -4.0, 0.0]), (10.0, [-3.0, -4.0, 0.0]),
                                                (1.0, [-0.6, -0.8, 0.0]), (2.5, [-1.5, -2.0, 0.0])])
def test_global_clipnorm_scales_the_gradient_down_to_the_norm(clipnorm, expected):
    w, _ = _one_linear_step(keras.optimizers.SGD(1.0), clipnorm)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    # With a loss scale, the norm is of the unscaled gradient: the same update.
    scaled, _ = _one_linear_step(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1.0)), clipnorm)
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)


def test_global_clipnorm_clips_the_student_not_the_joint_teacher():
    clip = 1e-3
    config = small_config(**{"distill.global_clipnorm": clip})
    setup = setup_for(config)
    before = {role: [v.numpy().copy() for v in m.trainable_variables] for role, m in setup.trained.items()}
    terms = setup.train_step(one_batch_iterator(*batch()))
    lr = float(terms["lr"])
    # The logs say the step was clipped, and from which norm.
    assert float(terms["clipped/plain"]) == 1.0 and float(terms["grad_norm/step/plain"]) > 100 * clip
    assert "plain_clip" in setup.checkpoint_objects

    def moved(role):
        return math.sqrt(sum(float(np.sum((v.numpy() - b) ** 2))
                             for v, b in zip(setup.trained[role].trainable_variables, before[role])))

    # SGD's first step from zero momentum moves the weights by lr * gradient, Nesterov's by (1 + momentum) times that.
    step = lr * (1 + config.train.momentum if config.train.nesterov else 1)
    assert step > 0
    np.testing.assert_allclose(moved("plain"), step * clip, rtol=1e-3)
    assert moved("resnet") > 100 * step * clip


def test_global_clipnorm_keeps_nan_gradients_for_the_skip():
    w, terms = _one_linear_step(keras.optimizers.SGD(1.0), 1.0, poison=float("nan"), nan_skip=True)
    assert float(terms["skipped"]) == 1.0
    np.testing.assert_array_equal(w, np.zeros(3))


def _clipped_norm(clip, scale):
    """The global norm of `clip` applied to the gradient (3, 4) * scale (norm 5 * scale) on one device."""
    grads = clip(tf.distribute.get_replica_context(), [tf.constant([3.0, 4.0]) * scale, None])
    assert grads[1] is None
    return float(tf.linalg.global_norm(grads[:1]))


def test_relative_clipnorm_caps_a_jump_at_a_multiple_of_the_running_mean():
    clip = clipping.NormClip(relative=3.0)
    assert [_clipped_norm(clip, 1.0) for _ in range(3)] == pytest.approx([5.0] * 3)  # ordinary steps pass
    assert float(clip.last_clipped) == 0.0
    assert _clipped_norm(clip, 10.0) == pytest.approx(15.0, rel=1e-5)  # a 10x jump: 3 x the mean of 5
    assert float(clip.last_norm) == pytest.approx(50.0) and float(clip.last_clipped) == 1.0
    # The mean takes the clipped norm (15), not the spike's 50: bias-corrected EMA of 5, 5, 5, 15.
    weights = [0.01 * 0.99 ** k for k in (3, 2, 1, 0)]
    mean = sum(w * n for w, n in zip(weights, (5, 5, 5, 15))) / sum(weights)
    assert float(clip.cap()) == pytest.approx(3 * mean, rel=1e-5)
    assert _clipped_norm(clip, 2.0) == pytest.approx(10.0)  # under the cap again
    before = float(clip.cap())
    assert math.isnan(_clipped_norm(clip, float("nan")))  # stays non-finite for the NaN policy...
    assert float(clip.cap()) == before  # ... and leaves the mean alone


def test_relative_clipnorm_leaves_the_first_step_to_the_fixed_cap():
    assert _clipped_norm(clipping.NormClip(relative=1.5), 100.0) == pytest.approx(500.0)  # no mean yet
    both = clipping.NormClip(global_clipnorm=4.0, relative=1.5)
    assert _clipped_norm(both, 1.0) == pytest.approx(4.0)  # the fixed cap holds from the first step
    assert _clipped_norm(both, 2.0) == pytest.approx(4.0)  # the smaller cap: 4 < 1.5 x 4
    assert _clipped_norm(both, 0.6) == pytest.approx(3.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"relative": 1.0}, r"relative_clipnorm must be 0 \(off\) or > 1: .* got 1.0"),
    ({"relative": -2.0}, "relative_clipnorm must be a finite number >= 0 .* got -2.0"),
    ({"global_clipnorm": float("inf")}, "global_clipnorm must be a finite number >= 0 .* got inf"),
    ({}, "NormClip needs global_clipnorm > 0 or relative_clipnorm > 1; both are 0"),
])
def test_norm_clip_refuses_bad_caps(kwargs, message):
    with pytest.raises(ValueError, match=message):
        clipping.NormClip(**kwargs)


@pytest.mark.parametrize("precision, compute_dtype, loss_scaled", [
    ("mixed_float16", "float16", True),
    # bfloat16 keeps float32's exponent range: no loss scale.
    ("mixed_bfloat16", "bfloat16", False),
])
def test_mixed_precision_step_is_finite(precision, compute_dtype, loss_scaled):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        setup = setup_for(small_config(**{"train.precision": precision, "distill.kd_alpha": 0.5,
                                          "distill.hybrid_entry": "rescale", "distill.logit_kd_alpha": 1.0}))
        optimizers = [v for k, v in setup.checkpoint_objects.items() if k.endswith("_optimizer")]
        assert len(optimizers) == 2
        assert all(isinstance(o, keras.optimizers.LossScaleOptimizer) == loss_scaled for o in optimizers)
        plain = setup.trained["plain"]
        assert plain.get_layer("stage1_block1_conv1").compute_dtype == compute_dtype
        assert plain.get_layer("logits").compute_dtype == "float32"
        before = snapshot(plain)
        iterator = one_batch_iterator(*batch())
        for _ in range(2):
            terms = setup.train_step(iterator)
        assert all(math.isfinite(float(v)) for v in terms.values()), terms
        assert any(not np.array_equal(before[k], v) for k, v in snapshot(plain).items())
    finally:
        keras.mixed_precision.set_global_policy(previous)


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
    from rd_keras import train_lib
    from test_distill import BATCH, INFO, STEPS_PER_EPOCH, batch, small_config

    keras.utils.set_random_seed(0)
    config = small_config(**{"distill.kd_alpha": 0.5, "data.batch_size": 2 * BATCH,
                             "distill.global_clipnorm": float(sys.argv[3]),
                             "distill.relative_clipnorm": float(sys.argv[4])})
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    with mirrored.scope():
        multi = train_lib.build_setup(config, INFO, mirrored, STEPS_PER_EPOCH)
    single = train_lib.build_setup(config, INFO, tf.distribute.get_strategy(), STEPS_PER_EPOCH)
    for role in ("plain", "resnet"):
        single.trained[role].set_weights(multi.trained[role].get_weights())
    if float(sys.argv[4]):
        # A running norm of 0.04, as if after many small steps: the relative cap binds from the first step.
        for setup in (multi, single):
            setup.checkpoint_objects["plain_clip"].mean_sum.assign(0.04)
            setup.checkpoint_objects["plain_clip"].mean_weight.assign(1.0)

    # Both halves of the global batch are the same images: per-replica BatchNorm statistics then equal the
    # global-batch statistics, so one device and two replicas must compute the same update.
    half_images, half_labels = batch()
    images, labels = tf.concat([half_images] * 2, 0), tf.concat([half_labels] * 2, 0)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    multi_iter = iter(mirrored.experimental_distribute_dataset(dataset))
    single_iter = iter(dataset)
    for _ in range(2):
        multi_terms = multi.train_step(multi_iter)
        single_terms = single.train_step(single_iter)
    for k in single_terms:
        np.testing.assert_allclose(float(multi_terms[k]), float(single_terms[k]), rtol=1e-4, err_msg=k)
    for role in ("plain", "resnet"):
        for v, w in zip(multi.trained[role].weights, single.trained[role].weights):
            copies = [c.numpy() for c in v.value.values]
            assert len(copies) == 2
            np.testing.assert_array_equal(copies[0], copies[1], err_msg="replicas differ: " + v.path)
            np.testing.assert_allclose(copies[0], w.numpy(), rtol=1e-4, atol=1e-5, err_msg=v.path)
    assert 0 <= float(multi_terms["train_acc"]) <= 1
    clipped = float(sys.argv[3]) or float(sys.argv[4])
    assert float(multi_terms.get("clipped/plain", 0.0)) == (1.0 if clipped else 0.0), multi_terms
    print("MIRRORED_OK", {k: round(float(v), 5) for k, v in multi_terms.items()}, flush=True)
    # Everything is checked and printed: leave without the interpreter's teardown, where TensorFlow's thread
    # pools after a MirroredStrategy over virtual CPU devices can hang on a loaded machine.
    os._exit(0)
""")


# A clip norm well under the gradient's: the factor must come from the summed gradient, not each replica's.
# A relative cap, started from a small running norm, binds the same way and keeps its running mean in
# variables every replica updates alike.
@pytest.mark.parametrize("clipnorm, relative", [("0.0", "0.0"), ("0.05", "0.0"), ("0.0", "1.01")])
def test_mirrored_two_replicas_match_single_device(tmp_path, clipnorm, relative):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(script), ROOT, os.path.join(ROOT, "tests"), clipnorm, relative],
                          env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "MIRRORED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


# ----------------------------------------------------------------------------- loss scale and diagnostics


def test_normalize_divides_the_ce_terms_by_the_number_of_paths():
    setup = setup_for(small_config(**{"distill.kd_alpha": 0.0}))
    plain, resnet = setup.trained["plain"], setup.trained["resnet"]
    paths = hybrid.build_paths(plain, resnet)
    images, labels = batch()
    summed, averaged = (distill.distill_losses(paths, resnet, images, labels, blend=0.5, joint=False,
                                               cfg=distill.LossConfig(global_batch_size=BATCH, weight_decay=1e-3,
                                                                      normalize=n))
                        for n in (False, True))
    ce = summed["plain_ce"] + 0.5 * (summed["hybrid_ce_1"] + summed["hybrid_ce_2"])
    np.testing.assert_allclose(float(summed["total"]), float(ce + summed["weight_decay"]), rtol=1e-6)
    np.testing.assert_allclose(float(averaged["total"]), float(ce / 3 + summed["weight_decay"]), rtol=1e-6)
    assert float(summed["weight_decay"]) > 0


def test_grad_norms_per_stage_show_where_each_loss_reaches():
    config = small_config(**{"distill.kd_alpha": 0.0, "train.log_every_steps": 2, "train.grad_norms": True})
    setup = setup_for(config)
    images, labels = batch()
    plain = setup.trained["plain"]
    first = setup.train_step(one_batch_iterator(images, labels))  # not a diagnostic step: no norms
    assert not any(k.startswith("grad_norm/") for k in first)
    bn_before = [v.numpy() for v in plain.non_trainable_variables]
    second = setup.train_step(one_batch_iterator(images, labels), diagnose=True)
    keys = {k for k in second if k.startswith("grad_norm/")}
    assert keys == {f"grad_norm/{src}/{part}" for src in ("plain", "hybrid")
                    for part in ("stem", "stage1", "stage2", "stage3", "logits")}
    for part in ("stem", "stage1", "stage2", "stage3", "logits"):
        assert float(second[f"grad_norm/plain/{part}"]) > 0
    # Hybrid paths leave the plain net at stage2 at the latest: its stage3 and classifier get nothing.
    for part in ("stem", "stage1", "stage2"):
        assert float(second[f"grad_norm/hybrid/{part}"]) > 0
    assert float(second["grad_norm/hybrid/stage3"]) == float(second["grad_norm/hybrid/logits"]) == 0.0
    # The measurement put the BN statistics back: they moved by the step's own forward pass only.
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(bn_before, plain.non_trainable_variables))


def test_grad_norms_do_not_change_training():
    """A diagnostic must not change training: the same steps with and without measurements end with the
    same weights and BN statistics, bit for bit."""
    finals = []
    for diagnose in (False, True):
        keras.utils.set_random_seed(0)
        setup = setup_for(small_config(**{"distill.kd_alpha": 0.0, "train.grad_norms": True}))
        for i in range(3):
            images, labels = batch(seed=i)
            setup.train_step(one_batch_iterator(images, labels), diagnose=diagnose)
        finals.append([v.numpy() for model in setup.trained.values() for v in model.weights])
    assert len(finals[0]) == len(finals[1])
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a, b)


def test_kd_baseline_without_hybrid_paths():
    """hybrid_points=none + logit_kd_alpha: CE(plain) + alpha * T^2 KL(teacher || plain), no hybrid term."""
    config = small_config(**{"distill.kd_alpha": 0.0, "distill.hybrid_points": "none",
                             "distill.logit_kd_alpha": 0.5})
    setup = setup_for(config)
    plain, resnet = setup.trained["plain"], setup.trained["resnet"]
    paths = hybrid.build_paths(plain, resnet, "none")
    assert paths.points == () and paths.tails == ()
    images, labels = batch()
    cfg = distill.LossConfig(global_batch_size=BATCH, weight_decay=1e-3, logit_kd_alpha=0.5, temperature=3.0)
    terms = distill.distill_losses(paths, resnet, images, labels, blend=0.7, cfg=cfg, joint=False)
    assert not any(k.startswith(("hybrid_ce_", "kd_")) for k in terms)
    # The plain net runs in training mode inside the step: compare against the taps' own forward.
    student = paths.taps(images, training=True)["logits"]
    expected_kd = tf.reduce_mean(distill.kd_loss(resnet(images, training=False)["logits"], student, 3.0))
    np.testing.assert_allclose(float(terms["logit_kd"]), float(expected_kd), rtol=1e-5)
    np.testing.assert_allclose(float(terms["total"]), float(terms["plain_ce"] + 0.5 * terms["logit_kd"]
                                                          + terms["weight_decay"]), rtol=1e-6)
    # One training step runs, and evaluation reports no hybrid accuracies.
    out = setup.train_step(one_batch_iterator(images, labels))
    assert np.isfinite(float(out["total"])) and "logit_kd" in out


@pytest.mark.parametrize("overrides, message", [
    ({"distill.hybrid_points": "none"}, "set distill.logit_kd_alpha > 0"),
    ({"distill.hybrid_points": "none", "distill.logit_kd_alpha": 1.0, "distill.kd_alpha": 0.5},
     "use distill.logit_kd_alpha"),
    ({"distill.logit_kd_alpha": -1.0}, "config.distill.logit_kd_alpha must be a number"),
    ({"teacher.joint_update": "student_first"}, "config.teacher.joint_update must be one of"),
    ({"distill.blend_start_epochs": -1}, "config.distill.blend_start_epochs must be a number"),
    ({"distill.hybrid_entry": "scaled"}, "config.distill.hybrid_entry must be one of .* got 'scaled'"),
])
def test_kd_settings_are_checked(overrides, message):
    config = small_config(**{"distill.kd_alpha": 0.0, **overrides})
    with pytest.raises(train_lib.ConfigError, match=message):
        train_lib.validate(config)


def test_rescaled_entry_trains_and_reports_hybrid_accuracy():
    """distill.hybrid_entry='rescale' through the trainer: the hybrid terms use the rescaled features (they
    differ from the direct entry's on the same weights), and a step updates the plain net."""
    images, labels = batch()
    terms = {}
    for entry in ("direct", "rescale"):
        tf.keras.utils.set_random_seed(0)
        setup = setup_for(small_config(**{"distill.kd_alpha": 0.0, "distill.hybrid_entry": entry}))
        before = snapshot(setup.trained["plain"])
        terms[entry] = setup.train_step(one_batch_iterator(images, labels))
        after = snapshot(setup.trained["plain"])
        assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert float(terms["direct"]["plain_ce"]) == pytest.approx(float(terms["rescale"]["plain_ce"]), rel=1e-5)
    assert float(terms["direct"]["hybrid_ce_1"]) != pytest.approx(float(terms["rescale"]["hybrid_ce_1"]), rel=1e-3)
    assert all(math.isfinite(float(v)) for v in terms["rescale"].values())
