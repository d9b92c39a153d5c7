"""rd_keras.export.exact: a ResNet converted into a shortcut-free net gives the ResNet's logits.

Every net gets randomised BatchNorm statistics and conv biases (freshly built ones are identities, which
would hide a wrong fold, a wrong Dirac tap or a lost bias); the ResNet-20/56/50 checks run on real
Fashion-MNIST test images and skip when the data is absent. No test reaches the network.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from rd_keras import architectures, data, pretrained
from rd_keras.export import exact, folding, saved_model_export, tflite_export

FMNIST = "/usr/share/datasets/fashion-mnist"
TEST_IMAGES = os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")
# Layers a shortcut-free deployment net may hold.
PLAIN_LAYERS = (keras.layers.InputLayer, keras.layers.Conv2D, keras.layers.ReLU, keras.layers.ZeroPadding2D,
                keras.layers.MaxPooling2D, keras.layers.GlobalAveragePooling2D, keras.layers.Dense)


def randomise(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            layer.set_weights([rng.uniform(0.5, 1.5, shapes[0]), rng.normal(0, 0.1, shapes[1]),
                               rng.normal(0, 0.1, shapes[2]), rng.uniform(0.5, 1.5, shapes[3])])
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and layer.use_bias:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype("float32")])
    return model


def fashion_mnist(n, size=28, rgb=False):
    """The first `n` test images, normalised with the dataset's statistics, optionally resized and grey
    repeated into RGB."""
    if not os.path.exists(TEST_IMAGES):
        pytest.skip(f"Fashion-MNIST not found at {FMNIST}")
    images = data.read_idx(TEST_IMAGES, 3)[:n, :, :, None]
    (mean,), (std,) = data.KNOWN_STATS["fashion_mnist"]
    x = (images.astype(np.float32) / 255.0 - mean) / std
    if size != 28:
        x = tf.image.resize(x, (size, size)).numpy()
    return np.repeat(x, 3, axis=-1) if rgb else x


def relative_error(reference, got):
    return float(np.abs(reference - got).max() / np.abs(reference).max())


def check_plain(converted, resnet):
    """No Add, BN or projection left; only the layers of a plain chain; returns the parameter counts."""
    kinds = {type(layer) for layer in converted.layers}
    assert all(issubclass(kind, PLAIN_LAYERS) for kind in kinds), kinds
    assert not any(isinstance(layer, keras.layers.Add) for layer in converted.layers)
    assert not any(layer.name.endswith("_proj_conv") for layer in converted.layers)
    assert all(layer.use_bias for layer in converted.layers if isinstance(layer, keras.layers.Conv2D))
    counts = {"resnet": resnet.count_params(), "exact": converted.count_params()}
    print(f"{resnet.name}: {counts['resnet']:,} parameters, its exact conversion {counts['exact']:,} "
          f"({counts['exact'] / counts['resnet']:.2f}x)")
    return counts


@pytest.mark.parametrize("arch", ["resnet20", "resnet56"])
def test_cifar_resnets_convert_exactly_on_real_images(arch, record_property):
    x = fashion_mnist(64)
    resnet = randomise(architectures.build(arch, input_shape=(28, 28, 1)))
    converted = exact.convert(resnet)
    error = relative_error(resnet(x, training=False)["logits"].numpy(), converted(x).numpy())
    assert error < 1e-5, error
    counts = check_plain(converted, resnet)
    record_property("parameters", counts)
    # Identity blocks carry their C input channels next to C features; 2 of 3 stages open with a
    # projection block, which carries its C/2 input channels.
    assert counts["exact"] > counts["resnet"]


def test_keras_applications_resnet50_converts_exactly_on_real_images(record_property):
    x = fashion_mnist(8, size=64, rgb=True)
    source = randomise(keras.applications.ResNet50(weights=None, classes=10, input_shape=(64, 64, 3),
                                                   classifier_activation=None))
    ours = pretrained.convert(source, "resnet50", input_shape=(64, 64, 3))
    converted = exact.convert(ours)
    error = relative_error(source(x, training=False).numpy(), converted(x).numpy())
    assert error < 1e-5, error
    record_property("parameters", check_plain(converted, source))


@pytest.mark.parametrize("kwargs, shape", [
    ({"arch": "resnet8"}, (30, 30, 1)),  # stage 3 strides over an odd 15x15 input
    ({"arch": "resnet50", "width": 0.25}, (72, 72, 3)),  # v1.5: stride on the 3x3, odd 9x9 and 5x5 inputs
    ({"arch": "resnet50", "width": 0.25, **pretrained.OPTIONS}, (72, 72, 3)),  # v1: stride on the first 1x1
    ({"arch": "resnet18", "width": 0.25, "stem_padding": "symmetric"}, (40, 40, 3)),
])
def test_strides_paddings_and_both_bottleneck_variants(kwargs, shape):
    resnet = randomise(architectures.build(input_shape=shape, **kwargs))
    converted = exact.convert(resnet)
    x = np.random.default_rng(1).standard_normal((4, *shape)).astype(np.float32)
    assert relative_error(resnet(x, training=False)["logits"].numpy(), converted(x).numpy()) < 1e-5
    check_plain(converted, resnet)


def test_downsample_net_loses_its_projections_and_plain_net_is_unchanged():
    x = np.random.default_rng(1).standard_normal((4, 32, 32, 3)).astype(np.float32)
    for shortcuts in ("downsample", "none"):
        net = randomise(architectures.build("resnet8", shortcuts=shortcuts))
        converted = exact.convert(net)
        assert relative_error(net(x, training=False)["logits"].numpy(), converted(x).numpy()) < 1e-5
        check_plain(converted, net)
    # A plain net has nothing to carry: its conversion is its BN fold.
    assert converted.count_params() == folding.fold(architectures.classifier(net)).count_params()


def test_widths_follow_the_carried_channels():
    converted = exact.convert(randomise(architectures.build("resnet8")))
    out = {layer.name: layer.filters for layer in converted.layers if isinstance(layer, keras.layers.Conv2D)}
    assert out["stage1_block1_conv1"] == 16 + 16  # identity block: C features + C carried
    assert out["stage2_block1_conv1"] == 32 + 16  # projection block: its 16 input channels carried
    assert out["stage2_block1_conv2"] == 32  # the last conv merges the carry back


def test_converted_net_exports_to_saved_model_and_tflite(tmp_path):
    x = np.random.default_rng(1).standard_normal((4, 28, 28, 1)).astype(np.float32)
    converted = exact.convert(randomise(architectures.build("resnet20", input_shape=(28, 28, 1))))
    expected = tf.nn.softmax(converted(x)).numpy()
    runner = tflite_export.TFLiteRunner(tflite_export.convert(converted, (28, 28, 1), "none"))
    np.testing.assert_allclose(runner(x), expected, atol=1e-5)
    assert runner.float_tensors()  # a float model: the int8 path is covered by the bench
    archive = saved_model_export.build_archive(converted, (28, 28, 1), (0.5,), (0.25,))
    archive.write_out(str(tmp_path / "sm"), verbose=False)
    signature = tf.saved_model.load(str(tmp_path / "sm")).signatures["predict_preprocessed"]
    np.testing.assert_allclose(signature(images=tf.constant(x))["probabilities"].numpy(), expected, atol=1e-5)


def _one_block_net(stem_relu=True, inner=None):
    """A one-block ResNet named as `architectures.build` names its layers, with a chosen stem ending and
    inner activation."""
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="stem_bn")(L.Conv2D(4, 3, padding="same", use_bias=False, name="stem_conv")(inputs))
    x = L.ReLU(name="stem")(x) if stem_relu else L.Activation("linear", name="stem")(x)
    y = L.BatchNormalization(name="stage1_block1_bn1")(
        L.Conv2D(4, 3, padding="same", use_bias=False, name="stage1_block1_conv1")(x))
    y = (inner or L.ReLU)(name="stage1_block1_relu1")(y)
    y = L.BatchNormalization(name="stage1_block1_bn2")(
        L.Conv2D(4, 3, padding="same", use_bias=False, name="stage1_block1_conv2")(y))
    y = L.ReLU(name="stage1")(L.Add(name="stage1_block1_add")([x, y]))
    logits = L.Dense(3, name="logits")(L.GlobalAveragePooling2D(name="pool")(y))
    return keras.Model(inputs, {"stem": x, "stage1": y, "logits": logits})


def test_refuses_what_it_cannot_carry():
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    net = _one_block_net()
    assert relative_error(net(x)["logits"].numpy(), exact.convert(net)(x).numpy()) < 1e-5
    with pytest.raises(ValueError, match="does not come from a ReLU.*'stem'"):
        exact.convert(_one_block_net(stem_relu=False))  # a negative input would not pass the ReLUs
    with pytest.raises(ValueError, match=r"\['stage1_block1_relu1'\] are not plain ReLUs"):
        exact.convert(_one_block_net(inner=lambda name: keras.layers.ReLU(max_value=6.0, name=name)))
