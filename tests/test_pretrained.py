"""keras.applications teachers rebuilt by our builder: same logits, refused weights, preprocessing, RD run.

Every model is built with `weights=None` and its weights saved here: no test reaches the network.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from rd_keras.configs import fashion_mnist
from rd_keras import architectures, data, export, pretrained, teacher, train_lib
from rd_keras import defaults


def randomise(model, seed=0):
    """Non-trivial conv biases and BN statistics (freshly built ones are 0 and 1, which would hide a wrong
    bias fold or epsilon); kernels keep their initialisation so the activations stay finite."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype("float32")])
        elif isinstance(layer, keras.layers.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            layer.set_weights([rng.uniform(0.5, 1.5, shapes[0]), rng.normal(0, 0.1, shapes[1]),
                               rng.normal(0, 0.1, shapes[2]), rng.uniform(0.5, 1.5, shapes[3])])
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype("float32")])
    return model


def saved(model, path):
    model.save_weights(str(path))
    return str(path)


@pytest.fixture(scope="module")
def resnet50_10(tmp_path_factory):
    """A keras.applications ResNet50 with a 10-class head and randomised statistics, and its weights file."""
    source = randomise(keras.applications.ResNet50(weights=None, classes=10, classifier_activation=None))
    return source, saved(source, tmp_path_factory.mktemp("weights") / "resnet50_10.weights.h5")


def _max_rel_diff(theirs, ours):
    return float(np.abs(theirs - ours).max() / np.abs(theirs).max())


@pytest.mark.slow  # about a minute each at 224x224 on 2 CPU cores; the 64x64 test below is the fast check
@pytest.mark.parametrize("name", ["ResNet50", "ResNet101"])
def test_converted_teacher_gives_the_keras_applications_logits(name, tmp_path):
    source = randomise(getattr(keras.applications, name)(weights=None, classifier_activation=None))
    path = saved(source, tmp_path / f"{name}.weights.h5")
    ours = pretrained.load(f"keras.applications.{name}", path, num_classes=1000)
    images = np.random.default_rng(1).uniform(-2, 2, (2, 224, 224, 3)).astype("float32")
    theirs = source(images, training=False).numpy()
    assert np.abs(theirs).max() > 0.1  # a real signal, not a net that outputs zeros
    assert _max_rel_diff(theirs, ours(images, training=False)["logits"].numpy()) < 1e-4
    assert ours.name == pretrained.APPLICATIONS[name]
    assert architectures.options_of(ours) == pretrained.OPTIONS
    # The plain twin (same builder, no shortcuts) meets the converted teacher at every stage boundary.
    plain = pretrained.convert(source, pretrained.APPLICATIONS[name], shortcuts="none")
    for endpoint in architectures.endpoint_names(ours):
        assert plain.get_layer(endpoint).output.shape == ours.get_layer(endpoint).output.shape, endpoint
    assert not any(isinstance(layer, keras.layers.Add) for layer in plain.layers)
    if name == "ResNet50":
        # The v1 options are what make it exact: the same weights in the default (v1.5) variant differ.
        default = architectures.build("resnet50", num_classes=1000, input_shape=(224, 224, 3))
        default.set_weights(ours.get_weights())
        assert _max_rel_diff(theirs, default(images, training=False)["logits"].numpy()) > 1e-2


def test_the_class_count_is_read_from_the_weights_file_and_any_input_size_works(resnet50_10):
    source, path = resnet50_10
    assert pretrained.check_weights("keras.applications.ResNet50", path) == 10
    ours = pretrained.load("ResNet50", path, input_shape=(64, 64, 3))
    images = np.random.default_rng(2).uniform(-2, 2, (2, 64, 64, 3)).astype("float32")
    # keras.applications itself runs at 64x64 too (global pooling): the same weights give the same logits.
    small = keras.applications.ResNet50(weights=None, classes=10, classifier_activation=None,
                                        input_shape=(64, 64, 3))
    small.set_weights(source.get_weights())
    assert _max_rel_diff(small(images).numpy(), ours(images)["logits"].numpy()) < 1e-4


def test_legacy_h5_weights_as_keras_downloads_them_load_too(resnet50_10, tmp_path):
    # keras.applications' ImageNet files are legacy HDF5 (arrays under layer names), which Keras 3 reads but
    # only writes through its legacy module.
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
    import h5py

    source, _ = resnet50_10
    path = str(tmp_path / "resnet50_10.h5")
    with h5py.File(path, "w") as f:
        legacy.save_weights_to_hdf5_group(f, source)
    ours = pretrained.load("keras.applications.ResNet50", path, num_classes=10)
    images = np.random.default_rng(4).uniform(-2, 2, (1, 224, 224, 3)).astype("float32")
    assert _max_rel_diff(source(images).numpy(), ours(images)["logits"].numpy()) < 1e-4


def test_weights_of_another_architecture_are_refused_naming_both(resnet50_10, tmp_path):
    _, path = resnet50_10
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.check_weights("keras.applications.ResNet101", path)
    message = str(err.value)
    assert "keras.applications.ResNet101" in message and "the layout of keras.applications.ResNet50" in message
    assert repr(path) in message
    other = saved(keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35),
                  tmp_path / "mobilenet.weights.h5")
    with pytest.raises(pretrained.PretrainedError, match="no keras.applications ResNet v1"):
        pretrained.check_weights("keras.applications.ResNet50", other)
    notop = saved(keras.applications.ResNet50(weights=None, include_top=False), tmp_path / "notop.weights.h5")
    with pytest.raises(pretrained.PretrainedError, match="without its classifier head"):
        pretrained.check_weights("keras.applications.ResNet50", notop)


@pytest.mark.parametrize("path, weights, message", [
    ("keras.applications.ResNet18", "imagenet", r"Unknown keras.applications teacher 'keras.applications.ResNet18'"),
    ("keras.applications.ResNet50", "", r"config.teacher: 'keras.applications.ResNet50' needs weights: 'imagenet'"),
    ("keras.applications.ResNet50", "/nonexistent/r50.weights.h5", r"'/nonexistent/r50.weights.h5': file not found"),
    ("keras.applications.ResNet50", "r50.keras", r"weights='r50.keras': expected 'imagenet' or a file ending"),
])
def test_bad_teacher_names_and_weights_are_quoted(path, weights, message):
    with pytest.raises(teacher.TeacherError, match=message):
        teacher.resolve(path, weights)


def test_imagenet_download_failure_says_how_to_work_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    with pytest.raises(pretrained.PretrainedError, match=r"could not get the ImageNet weights.*save_weights"):
        pretrained.source_model("keras.applications.ResNet50", "imagenet", 1000)


def test_caffe_and_torch_normalisation_match_keras_applications():
    images = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3)).astype("uint8")
    for mode in ("caffe", "torch"):
        cfg = defaults.data_config()
        cfg.normalization = mode
        mean, std, order = data._stats(cfg, 3)
        expected = keras.applications.imagenet_utils.preprocess_input(images.astype("float32"), mode=mode)
        np.testing.assert_allclose(data.normalize(images, mean, std, order), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(  # the ResNets' own preprocess_input is the caffe mode
        data.normalize(images, *data.CAFFE_STATS, "bgr"),
        keras.applications.resnet.preprocess_input(images.astype("float32")), rtol=1e-5, atol=1e-4)
    cfg = defaults.data_config()
    cfg.normalization, cfg.mean, cfg.std = "caffe", (0.5,), (0.25,)
    with pytest.raises(ValueError, match=r"apply to normalization='dataset' only.*Received: mean=\(0.5,\)"):
        data.check_config(cfg)
    cfg.normalization, cfg.mean, cfg.std = "imagenet", (), ()
    with pytest.raises(ValueError, match=r"Received: normalization='imagenet'"):
        data.check_config(cfg)


def rd_config(weights, **overrides):
    """A few RD steps with a ResNet-50 teacher from keras.applications on 64x64 synthetic RGB images."""
    config = fashion_mnist.get_config("smoke")
    values = {"data.source": "synthetic", "data.name": "synthetic", "data.image_size": 64, "data.channels": 3,
              "data.num_classes": 10, "data.synthetic_examples": 40, "data.train_subset": 0,
              "data.eval_subset": 0, "data.batch_size": 4, "data.normalization": "caffe",
              "model.arch": "resnet50", "model.width": 1.0, "train.epochs": 1, "train.warmup_epochs": 0.0,
              "train.progress": False, "train.checkpoint_every_steps": 4, "train.grad_norms": False,
              "teacher.mode": "pretrained", "teacher.path": "keras.applications.ResNet50",
              "teacher.weights": weights, **overrides}
    for key, value in values.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.mark.parametrize("overrides, error, message", [
    ({"data.num_classes": 5}, teacher.TeacherError,
     r"has a 10-class head, the data has 5 classes"),
    ({"data.normalization": "dataset"}, train_lib.ConfigError,
     r"config.data.normalization='dataset' but the teacher needs 'caffe'"),
    ({"model.arch": "resnet101"}, train_lib.ConfigError,
     r"config.model.arch='resnet101' but the teacher needs 'resnet50'"),
    ({"teacher.path": "keras.applications.ResNet101"}, teacher.TeacherError,
     r"holds another network.*\n  weights .*the layout of keras.applications.ResNet50\n  teacher keras.applications"
     r".ResNet101"),
    # Synthetic and folder data are made RGB for the teacher; IDX images cannot be.
    ({"data.source": "idx", "data.name": "fashion_mnist"}, train_lib.ConfigError,
     r"config.teacher.path='keras.applications.ResNet50' takes 3-channel images, but IDX images"),
])
def test_a_teacher_that_does_not_fit_fails_before_anything_is_written(resnet50_10, tmp_path, overrides, error,
                                                                         message):
    if overrides.get("teacher.path", "").endswith("ResNet101"):
        overrides = {**overrides, "model.arch": "resnet101"}
    workdir = str(tmp_path / "new")
    with pytest.raises(error, match=message):
        train_lib.run(rd_config(resnet50_10[1], **overrides), workdir)
    assert not os.path.exists(workdir)


@pytest.mark.slow
def test_rd_with_a_keras_applications_teacher_trains_checkpoints_and_exports(resnet50_10, tmp_path):
    workdir = str(tmp_path / "rd")
    config = rd_config(resnet50_10[1], **{"export.enabled": True, "export.quantize": "none",
                                          "export.eval_examples": 8})
    record = train_lib.run(config, workdir)
    assert record["step"] == 10 and np.isfinite(record["loss"])  # 40 images, batch 4, one epoch
    assert len(record["hybrid_acc"]) == 3  # a hybrid path from each of ResNet-50's first three stages
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith("ckpt-10")
    assert not os.path.exists(os.path.join(workdir, "resnet.keras"))  # a pretrained teacher is not saved
    plain = keras.saving.load_model(os.path.join(workdir, "plain.keras"), compile=False)
    assert architectures.options_of(plain) == pretrained.OPTIONS  # the teacher's twin, layer for layer
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["dataset"]["channel_order"] == "bgr"
    report = json.load(open(os.path.join(workdir, "export", "report.json")))
    assert report["data"]["channel_order"] == "bgr"
    for artefact in ("saved_model", "tflite_none"):
        assert report["artefacts"][artefact]["top1_agreement"] == 1.0, artefact
        assert report["artefacts"][artefact]["max_abs_prob_diff"] < 1e-3, artefact
    # Served from uint8 RGB pixels, it equals the plain net on keras.applications' own preprocessing.
    images, _ = data.raw_examples(config, "test", 4)
    serve = tf.saved_model.load(report["artefacts"]["saved_model"]["path"]).signatures["serving_default"]
    served = serve(images=tf.constant(images))["probabilities"].numpy()
    logits = architectures.classifier(plain)(keras.applications.resnet.preprocess_input(images.astype("float32")))
    np.testing.assert_allclose(served, tf.nn.softmax(logits).numpy(), atol=1e-4)
    assert export.dataset_info(export.load_workdir(workdir)[0]).channel_order == "bgr"
