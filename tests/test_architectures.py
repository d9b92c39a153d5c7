"""Exact parameter counts, endpoint shapes, and the shortcut switch of the one model builder."""

import math

import keras
import numpy as np
import pytest

from rd_keras import architectures
from rd_keras.dirac import DiracConv2D, dirac_kernel


def _trainable(model):
    return sum(math.prod(v.shape) for v in model.trainable_weights)


def _layer_types(model):
    return {type(layer).__name__ for layer in model.layers}


# CIFAR ResNet-20, 10 classes, projection shortcuts (option B); count_params includes BN moving stats (4/ch):
#   stem   3*3*3*16 + 4*16                                                   =     496
#   stage1 3 blocks x (2*3*3*16*16 + 2*4*16)                                 =  14,208
#   stage2 (3*3*16*32 + 3*3*32*32 + 2*4*32 + 16*32 + 4*32) + 2*(2*9216 + 256) =  52,096
#   stage3 (3*3*32*64 + 3*3*64*64 + 2*4*64 + 32*64 + 4*64) + 2*(2*36864+512)  = 206,592
#   head   64*10 + 10                                                        =     650
# ResNet-56 has 9 blocks a stage. The plain twins drop two projections: 16*32+4*32 + 32*64+4*64 = 2,944.
@pytest.mark.parametrize("arch,resnet,plain", [
    ("resnet20", 274_042, 274_042 - 2_944),
    ("resnet56", 860_026, 860_026 - 2_944),
])
def test_cifar_parameter_counts(arch, resnet, plain):
    assert architectures.build(arch).count_params() == resnet
    assert architectures.build(arch, shortcuts="none").count_params() == plain


def test_resnet50_imagenet_parameter_count():
    # 25,557,032 is the published count (trainable weights, convs without bias, 1000 classes).
    kwargs = dict(num_classes=1000, input_shape=(224, 224, 3))
    resnet = architectures.build("resnet50", **kwargs)
    plain = architectures.build("resnet50", shortcuts="none", **kwargs)
    assert _trainable(resnet) == 25_557_032
    # The plain twin drops the four projection convs and their BN (gamma, beta).
    projections = 64 * 256 + 256 * 512 + 512 * 1024 + 1024 * 2048
    assert _trainable(plain) == 25_557_032 - projections - 2 * (256 + 512 + 1024 + 2048)


@pytest.mark.parametrize("arch", sorted(architectures.SPECS))
def test_boundaries_match_and_plain_has_no_add(arch):
    kwargs = dict(input_shape=(32, 32, 3), width=0.25)
    resnet = architectures.build(arch, **kwargs)
    plain = architectures.build(arch, shortcuts="none", **kwargs)
    names = architectures.endpoint_names(resnet)
    assert names == architectures.endpoint_names(plain)
    assert len(names) == len(architectures.SPECS[arch].blocks) + 1
    for name in names + ["logits"]:
        assert resnet.get_layer(name).output.shape == plain.get_layer(name).output.shape, name
    assert "Add" in _layer_types(resnet)
    assert "Add" not in _layer_types(plain)
    assert not any(layer.name.endswith("_proj_conv") for layer in plain.layers)
    # Same layers otherwise: the plain twin is the ResNet minus adds and projections.
    resnet_core = {l.name for l in resnet.layers if not l.name.endswith(("_add", "_proj_conv", "_proj_bn"))}
    assert resnet_core == {l.name for l in plain.layers}


def test_depth_of_specs():
    assert {name: spec.depth for name, spec in architectures.SPECS.items()} == {
        "resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110,
        "resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}
    # 152 = 6n+2 too, but the name means the ImageNet bottleneck net.
    assert architectures.get_spec("resnet152").block == "bottleneck"


def test_endpoint_shapes_cifar_and_imagenet_stems():
    cifar = architectures.build("resnet20", input_shape=(32, 32, 3))
    assert [tuple(cifar.get_layer(n).output.shape[1:]) for n in architectures.endpoint_names(cifar)] == [
        (32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64)]
    imagenet = architectures.build("resnet50", input_shape=(224, 224, 3), num_classes=1000)
    assert [tuple(imagenet.get_layer(n).output.shape[1:]) for n in architectures.endpoint_names(imagenet)] == [
        (56, 56, 64), (56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)]
    # ResNet-18 with the CIFAR stem keeps 32x32 resolution in stage 1, as in the CIFAR literature.
    small = architectures.build("resnet18", input_shape=(32, 32, 3), stem="cifar")
    assert tuple(small.get_layer("stage1").output.shape[1:]) == (32, 32, 64)
    assert tuple(small.get_layer("stage4").output.shape[1:]) == (4, 4, 512)


def test_downsample_mode_keeps_only_projection_shortcuts():
    model = architectures.build("resnet20", shortcuts="downsample")
    adds = sorted(l.name for l in model.layers if isinstance(l, keras.layers.Add))
    assert adds == ["stage2_block1_add", "stage3_block1_add"]


def test_layer_names_and_outputs():
    model = architectures.build("resnet8", width=0.25, num_classes=7)
    model.get_layer("stage2_block1_conv1")
    model.get_layer("stage2_block1_proj_conv")
    out = model(np.zeros((3, 32, 32, 3), np.float32))
    assert sorted(out) == ["logits", "stage1", "stage2", "stage3", "stem"]
    assert out["logits"].shape == (3, 7)
    assert architectures.classifier(model)(np.zeros((3, 32, 32, 3), np.float32)).shape == (3, 7)


@pytest.mark.parametrize("kwargs,message", [
    (dict(arch="resnet21"), "depth must be 6n+2"),
    (dict(arch="vgg16"), "Unknown architecture 'vgg16'"),
    (dict(arch="resnet20", width=0), "width must be a positive number, got 0"),
    (dict(arch="resnet20", shortcuts="some"), "got 'some'"),
    (dict(arch="resnet20", num_classes=1), "num_classes must be an integer >= 2, got 1"),
    (dict(arch="resnet20", stem="tiny"), "got 'tiny'"),
    (dict(arch="resnet20", input_shape=(32, 32)), "got (32, 32)"),
    (dict(arch="resnet50", bottleneck_stride="2x2"), "got '2x2'"),
    (dict(arch="resnet50", stem_padding="valid"), "got 'valid'"),
    (dict(arch="resnet50", bn_epsilon=0), "bn_epsilon must be a positive number, got 0"),
])
def test_bad_arguments_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError) as err:
        architectures.build(**kwargs)
    assert message in str(err.value)


def test_any_cifar_depth_of_form_6n_plus_2():
    assert architectures.get_spec("resnet14").blocks == (2, 2, 2)


def test_dirac_conv_is_identity_when_beta_is_zero_and_survives_saving(tmp_path):
    model = architectures.build("resnet8", shortcuts="none", width=0.25, dirac=True)
    conv = model.get_layer("stage1_block1_conv2")
    assert isinstance(conv, DiracConv2D)
    conv.beta.assign(np.zeros(conv.filters, np.float32))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, conv.filters)).astype(np.float32)
    np.testing.assert_allclose(conv(x), x, atol=1e-6)
    # The ResNet keeps ordinary convs: its shortcuts already carry the identity.
    resnet = architectures.build("resnet8", width=0.25, dirac=True)
    assert "DiracConv2D" not in _layer_types(resnet)
    path = tmp_path / "plain.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(images)["logits"], model(images)["logits"], atol=1e-6)
    np.testing.assert_array_equal(loaded.get_layer("stage1_block1_conv2").beta.numpy(), 0.0)


@pytest.mark.parametrize("size", [64, 65, 224])
def test_resnet_v1_options_change_layers_not_weights_or_boundary_shapes(size):
    kwargs = dict(input_shape=(size, size, 3), num_classes=1000)
    default = architectures.build("resnet50", **kwargs)
    options = dict(bottleneck_stride="1x1", stem_padding="symmetric", bn_epsilon=1.001e-5)
    for shortcuts in ("all", "none"):
        v1 = architectures.build("resnet50", shortcuts=shortcuts, **kwargs, **options)
        assert architectures.options_of(v1) == options
        assert v1.count_params() == architectures.build("resnet50", shortcuts=shortcuts, **kwargs).count_params()
        for name in architectures.endpoint_names(default):
            assert v1.get_layer(name).output.shape == default.get_layer(name).output.shape, (name, size)
    # v1 strides on the first 1x1 conv, v1.5 on the 3x3; the padding layers exist only when symmetric.
    assert v1.get_layer("stage2_block1_conv1").strides == (2, 2)
    assert v1.get_layer("stage2_block1_conv2").strides == (1, 1)
    assert default.get_layer("stage2_block1_conv2").strides == (2, 2)
    assert v1.get_layer("stem_pad").padding == ((3, 3), (3, 3))
    assert v1.get_layer("stem_bn").epsilon == 1.001e-5
    assert architectures.options_of(default) == dict(
        bottleneck_stride="3x3", stem_padding="same", bn_epsilon=architectures.BN_EPSILON)
    assert "ZeroPadding2D" not in _layer_types(default)


def test_dirac_beta_sets_the_initial_mix_of_identity_and_kernel():
    net = architectures.build("resnet8", shortcuts="none", input_shape=(16, 16, 3), width=0.25, dirac=True,
                              dirac_beta=0.01)
    diracs = [layer for layer in net.layers if isinstance(layer, DiracConv2D)]
    assert len(diracs) == 7  # the stem conv and the two convs of each of the three blocks
    for layer in diracs:
        np.testing.assert_allclose(layer.beta.numpy(), 0.01)
        np.testing.assert_allclose(layer.alpha.numpy(), 1.0)
        kernel, identity = layer.kernel.numpy(), dirac_kernel(layer.kernel_size, *layer.kernel.shape[2:])
        np.testing.assert_allclose(layer.effective_kernel().numpy(), identity + 0.01 * kernel, rtol=1e-6, atol=1e-7)
    resnet = architectures.build("resnet8", shortcuts="all", input_shape=(16, 16, 3), width=0.25, dirac=True,
                                 dirac_beta=0.01)
    assert not any(isinstance(layer, DiracConv2D) for layer in resnet.layers)
    with pytest.raises(ValueError, match="dirac_beta must be a positive number, got 0"):
        architectures.build("resnet8", shortcuts="none", dirac=True, dirac_beta=0)
