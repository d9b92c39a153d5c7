"""Hybrid paths: plain stages 1..i followed by the teacher's remaining stages, sharing the teacher's weights."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from rd_keras import architectures, hybrid

ARCH, WIDTH, SHAPE, CLASSES = "resnet8", 0.25, (16, 16, 3), 10


@pytest.fixture
def nets():
    teacher = architectures.build(ARCH, shortcuts="all", num_classes=CLASSES, input_shape=SHAPE, width=WIDTH)
    plain = architectures.build(ARCH, shortcuts="none", num_classes=CLASSES, input_shape=SHAPE, width=WIDTH)
    images = tf.random.stateless_normal((4, *SHAPE), seed=(1, 2))
    return teacher, plain, images


def _manual_tail(teacher, x, start_stage):
    """The teacher after `stage{start_stage}`, layer by layer from the naming contract of architectures."""
    spec = architectures.get_spec(ARCH)
    layer = teacher.get_layer
    for i in range(start_stage + 1, len(spec.blocks) + 1):
        for j in range(1, spec.blocks[i - 1] + 1):
            prefix = f"stage{i}_block{j}"
            y = layer(f"{prefix}_relu1")(layer(f"{prefix}_bn1")(layer(f"{prefix}_conv1")(x), training=False))
            y = layer(f"{prefix}_bn2")(layer(f"{prefix}_conv2")(y), training=False)
            names = {lyr.name for lyr in teacher.layers}
            shortcut = x
            if f"{prefix}_proj_conv" in names:
                shortcut = layer(f"{prefix}_proj_bn")(layer(f"{prefix}_proj_conv")(x), training=False)
            out_name = f"stage{i}" if j == spec.blocks[i - 1] else f"{prefix}_out"
            x = layer(out_name)(layer(f"{prefix}_add")([shortcut, y]))
    return layer("logits")(layer("pool")(x))


def _stage_paths(plain, teacher):
    return hybrid.build_paths(plain, teacher, "stages")


def test_one_path_per_stage_boundary(nets):
    teacher, plain, images = nets
    paths = _stage_paths(plain, teacher)
    assert paths.points == ("stage1", "stage2")
    assert len(paths.tails) == architectures.num_stages(teacher) - 1 == 2
    outs = paths.logits(paths.taps(images, training=False))
    assert [tuple(o.shape) for o in outs] == [(4, CLASSES)] * 2
    assert all(o.dtype == tf.float32 for o in outs)


def test_hybrid_equals_teacher_layers_run_by_hand(nets):
    teacher, plain, images = nets
    paths = _stage_paths(plain, teacher)
    plain_out = paths.taps(images, training=False)
    for i, logits in enumerate(paths.logits(plain_out), start=1):
        expected = _manual_tail(teacher, plain_out[f"stage{i}"], i)
        np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_tail_on_teacher_features_reproduces_teacher(nets):
    teacher, _, images = nets
    out = teacher(images, training=False)
    for i, tail in enumerate(hybrid.teacher_tails(teacher, ["stage1", "stage2"]), start=1):
        np.testing.assert_allclose(tail(out[f"stage{i}"], training=False).numpy(), out["logits"].numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_tails_share_teacher_weights(nets):
    teacher, plain, images = nets
    paths = _stage_paths(plain, teacher)
    teacher_ids = {id(v) for v in teacher.weights}
    assert all(id(v) in teacher_ids for tail in paths.tails for v in tail.weights)
    assert {id(v) for v in paths.taps.weights} == {id(v) for v in plain.weights}
    plain_out = paths.taps(images, training=False)
    before = paths.logits(plain_out)[0].numpy()
    kernel = teacher.get_layer("logits").kernel
    kernel.assign(kernel * 2.0)
    after = paths.logits(plain_out)[0].numpy()
    assert not np.allclose(before, after)


# ----------------------------------------------------------------------------- hybrid points

RESNET20_BLOCKS = architectures.block_output_names("resnet20")


def test_block_output_names_match_the_built_layers():
    net = architectures.build("resnet20", shortcuts="none", input_shape=SHAPE, width=WIDTH)
    assert hybrid.block_outputs(net) == RESNET20_BLOCKS
    assert len(RESNET20_BLOCKS) == 9
    assert RESNET20_BLOCKS[:4] == ["stage1_block1_out", "stage1_block2_out", "stage1", "stage2_block1_out"]


@pytest.mark.parametrize("spec, expected", [
    ("stages", ["stage1", "stage2"]),
    ("every_k_blocks:1", RESNET20_BLOCKS[:-1]),
    ("every_k_blocks:3", ["stage1", "stage2"]),
    ("every_k_blocks:2", ["stage1_block2_out", "stage2_block1_out", "stage2", "stage3_block2_out"]),
    ("1, 5,3", ["stage1_block1_out", "stage1", "stage2_block2_out"]),
    ("none", []),
])
def test_hybrid_points(spec, expected):
    assert hybrid.hybrid_points(RESNET20_BLOCKS, spec, "resnet20") == expected


@pytest.mark.parametrize("spec, message", [
    ("every_k_blocks:0", "positive integer K. Received: hybrid_points='every_k_blocks:0'"),
    ("every_k_blocks:9", "gives no hybrid path"),
    ("0,3", "must be in 1..8"),
    ("9", "must be in 1..8"),
    ("blocks", "must be 'stages', 'every_k_blocks:K', 'none' or a comma-separated list"),
])
def test_bad_hybrid_points_are_refused(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hybrid.hybrid_points(RESNET20_BLOCKS, spec, "resnet20")


def test_paths_inside_a_stage_equal_the_teacher_run_from_that_block(nets):
    teacher, plain, images = nets  # resnet8: one block per stage, so build resnet20 nets here
    teacher = architectures.build("resnet20", shortcuts="all", num_classes=CLASSES, input_shape=SHAPE,
                                  width=WIDTH)
    plain = architectures.build("resnet20", shortcuts="none", num_classes=CLASSES, input_shape=SHAPE,
                                width=WIDTH)
    paths = hybrid.build_paths(plain, teacher, "2,4")
    assert paths.points == ("stage1_block2_out", "stage2_block1_out")
    out = paths.taps(images, training=False)
    np.testing.assert_allclose(out["logits"].numpy(), plain(images, training=False)["logits"].numpy(),
                               rtol=1e-6, atol=1e-6)
    # Fed the teacher's own features at a point, a path gives the teacher's logits.
    own = keras.Model(teacher.input, [teacher.get_layer(p).output for p in paths.points])(images, training=False)
    reference = teacher(images, training=False)["logits"].numpy()
    for feature, tail in zip(own, paths.tails):
        np.testing.assert_allclose(tail(feature, training=False).numpy(), reference, rtol=1e-5, atol=1e-5)
    # And fed the plain features, the hybrid logits differ from the teacher's.
    assert not np.allclose(paths.logits(out)[0].numpy(), reference, atol=1e-3)


# ----------------------------------------------------------------------------- entry into the tails


def test_rescale_matches_each_channels_rms_and_keeps_zeros():
    plain = tf.nn.relu(tf.random.stateless_normal((4, 5, 5, 3), seed=(3, 4)))
    teacher = 7.0 * tf.nn.relu(tf.random.stateless_normal((4, 5, 5, 3), seed=(5, 6))) + 1.0
    out = hybrid.rescale(plain, teacher).numpy()
    rms = lambda x: np.sqrt(np.mean(np.square(x), axis=(0, 1, 2)))  # noqa: E731
    np.testing.assert_allclose(rms(out), rms(teacher.numpy()), rtol=1e-4)
    np.testing.assert_array_equal(out == 0, plain.numpy() == 0)
    np.testing.assert_allclose(hybrid.rescale(3.0 * plain, teacher).numpy(), out, rtol=1e-5)  # size-free


def test_rescaled_entry_feeds_each_tail_the_rescaled_plain_features(nets):
    teacher, plain, images = nets
    paths = hybrid.build_paths(plain, teacher, "stages", entry="rescale")
    out = paths.taps(images, training=False)
    with pytest.raises(ValueError, match="need the teacher's features"):
        paths.logits(out)
    own = teacher(images, training=False)
    found = paths.teacher_outputs(teacher, images)
    # One teacher call gives both the scales and the KD targets: its logits are the teacher's.
    np.testing.assert_array_equal(found["logits"].numpy(), own["logits"].numpy())
    direct_paths = hybrid.build_paths(plain, teacher, "stages")
    assert direct_paths.teacher_outputs(teacher, images).keys() == own.keys()  # the direct entry: the teacher
    direct = direct_paths.logits(out)
    for i, (logits, tail) in enumerate(zip(paths.logits(out, found), paths.tails), start=1):
        expected = tail(hybrid.rescale(out[f"stage{i}"], own[f"stage{i}"]), training=False)
        np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
        assert not np.allclose(logits.numpy(), direct[i - 1].numpy(), atol=1e-3)
    with tf.GradientTape() as tape:  # the hybrid gradient still reaches the plain net's first stage
        loss = tf.add_n([tf.reduce_sum(x) for x in paths.logits(paths.taps(images, training=True), found)])
    grads = tape.gradient(loss, [v for v in plain.trainable_variables if v.path.startswith("stage1_")])
    assert grads and all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


def test_unknown_entry_is_refused(nets):
    teacher, plain, _ = nets
    with pytest.raises(ValueError, match="hybrid_entry='scaled'"):
        hybrid.build_paths(plain, teacher, "stages", entry="scaled")
