"""Hybrid paths: plain stages 1..i followed by the teacher's remaining stages, sharing the teacher's weights."""

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


def test_one_path_per_stage_boundary(nets):
    teacher, plain, images = nets
    tails = hybrid.teacher_tails(teacher)
    assert len(tails) == architectures.num_stages(teacher) - 1 == 2
    outs = hybrid.hybrid_logits(tails, plain(images, training=False))
    assert [tuple(o.shape) for o in outs] == [(4, CLASSES)] * 2
    assert all(o.dtype == tf.float32 for o in outs)


def test_hybrid_equals_teacher_layers_run_by_hand(nets):
    teacher, plain, images = nets
    plain_out = plain(images, training=False)
    for i, logits in enumerate(hybrid.hybrid_logits(hybrid.teacher_tails(teacher), plain_out), start=1):
        expected = _manual_tail(teacher, plain_out[f"stage{i}"], i)
        np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_tail_on_teacher_features_reproduces_teacher(nets):
    teacher, _, images = nets
    out = teacher(images, training=False)
    for i, tail in enumerate(hybrid.teacher_tails(teacher), start=1):
        np.testing.assert_allclose(tail(out[f"stage{i}"], training=False).numpy(), out["logits"].numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_tails_share_teacher_weights(nets):
    teacher, plain, images = nets
    tails = hybrid.teacher_tails(teacher)
    teacher_ids = {id(v) for v in teacher.weights}
    assert all(id(v) in teacher_ids for tail in tails for v in tail.weights)
    plain_out = plain(images, training=False)
    before = hybrid.hybrid_logits(tails, plain_out)[0].numpy()
    kernel = teacher.get_layer("logits").kernel
    kernel.assign(kernel * 2.0)
    after = hybrid.hybrid_logits(tails, plain_out)[0].numpy()
    assert not np.allclose(before, after)
