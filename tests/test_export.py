"""Tests for rd_keras.export, folding, saved_model_export and tflite_export, on small workdirs trained here
on real Fashion-MNIST: folding is exact, the SavedModel and every .tflite agree with the Keras model,
versions are atomic and never overwritten, and TF's own saved_model_cli can read and run the export."""

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from rd_keras import architectures, data, export, samples
from rd_keras import defaults
from rd_keras import workdir as wd
from rd_keras.export import folding, metadata, pixels, saved_model_export, tflite_export
from rd_keras.dirac import DiracConv2D
from rd_keras.export.tflite_export import TFLiteRunner

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST_DIR),
                                reason="Debian dataset-fashion-mnist not installed")



def _unfolded_layers(model):
    """Names of the BatchNormalization and DiracConv2D layers left in `model` (empty when fully folded)."""
    return [layer.name for layer in model.layers
            if isinstance(layer, (keras.layers.BatchNormalization, DiracConv2D))]


def make_workdir(path, *, width=0.25, train_examples=512, epochs=1, shortcuts="none", dirac=False,
                 store_samples=True, lr=0.05, **data_fields):
    """A finished training workdir as the trainer leaves it: config.json (with its `dataset` section,
    written by the trainer's own writer), plain.keras, trained with model.fit so BN statistics are
    real, and (unless `store_samples=False`, a workdir from before them) samples.npz. `data_fields`
    override config.data (Fashion-MNIST by default)."""
    config = ml_collections.ConfigDict({
        "data": defaults.data_config(),
        "model": {"arch": "resnet8", "width": width, "stem": "", "student_shortcuts": shortcuts,
                  "dirac": dirac},
    })
    config.data.update(augment="none", train_subset=train_examples, batch_size=64, **data_fields)
    train_ds, _, info = data.datasets(config)
    model = architectures.build("resnet8", shortcuts=shortcuts, width=width, dirac=dirac,
                                input_shape=info.image_shape, num_classes=info.num_classes)
    classifier = architectures.classifier(model)
    classifier.compile(keras.optimizers.SGD(lr, momentum=0.9),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.fit(train_ds, epochs=epochs, verbose=0, shuffle=False)  # the pipeline shuffles
    os.makedirs(path, exist_ok=True)
    wd.write_config(str(path), config, dataset=dataclasses.asdict(info))
    model.save(os.path.join(path, "plain.keras"))
    if store_samples:
        samples.store(config, str(path), info.num_classes)
    return str(path)


def keras_probabilities(workdir, images):
    config, model = export.load_workdir(workdir)
    info = export.dataset_info(config)
    logits = architectures.classifier(model)(data.normalize(images, info.mean, info.std), training=False)
    return tf.nn.softmax(logits).numpy()


def test_images(workdir, n):
    return data.raw_examples(export.load_workdir(workdir)[0], "test", n)


test_images.__test__ = False  # a helper, not a test


def tree_hash(path):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def report(workdir):
    return export.export_workdir(workdir, eval_examples=200, calibration_examples=64, progress=False)


def test_report_json_and_table(workdir, report):
    with open(os.path.join(workdir, "export", "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(report))
    assert list(report["artefacts"]) == ["keras", "saved_model", "tflite_none", "tflite_fp16",
                                         "tflite_dynamic", "tflite_int8"]
    assert report["eval"] == {"split": "test", "examples": 200, "images": os.path.join(workdir, "samples.npz"),
                              "calibration_examples": 64}
    assert report["fold"]["max_abs_logit_diff"] < 1e-4
    assert report["artefacts"]["saved_model"]["top1_agreement"] == 1.0
    table = export.format_table(report)
    assert all(name in table for name in report["artefacts"])


# ----------------------------------------------------------------------------- folding


def _randomise(model, rng):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.3, beta.shape),
                               rng.normal(0, 0.3, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
        if isinstance(layer, DiracConv2D):
            layer.alpha.assign(rng.normal(1.0, 0.2, layer.alpha.shape))
            layer.beta.assign(rng.normal(0.5, 0.2, layer.beta.shape))


@pytest.mark.parametrize("shortcuts,dirac", [("none", False), ("none", True), ("downsample", True)])
def test_fold_is_exact_and_removes_bn_and_dirac(shortcuts, dirac):
    rng = np.random.default_rng(0)
    model = architectures.build("resnet8", shortcuts=shortcuts, width=0.25, dirac=dirac,
                                input_shape=(28, 28, 1))
    _randomise(model, rng)
    classifier = architectures.classifier(model)
    folded = folding.fold(classifier)
    assert _unfolded_layers(folded) == []
    assert not any(isinstance(layer, (keras.layers.BatchNormalization, DiracConv2D))
                   for layer in folded.layers)
    assert all(layer.use_bias for layer in folded.layers if isinstance(layer, keras.layers.Conv2D))
    assert sum(isinstance(layer, keras.layers.Add) for layer in folded.layers) == \
        sum(isinstance(layer, keras.layers.Add) for layer in classifier.layers)
    x = rng.normal(size=(8, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(folded(x).numpy(), classifier(x, training=False).numpy(), atol=1e-4)


def test_fold_keeps_the_dict_outputs_of_the_full_model():
    model = architectures.build("resnet8", shortcuts="none", width=0.25, input_shape=(28, 28, 1))
    _randomise(model, np.random.default_rng(1))
    folded = folding.fold(model)
    x = np.random.default_rng(2).normal(size=(2, 28, 28, 1)).astype(np.float32)
    expected, got = model(x, training=False), folded(x)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=1e-4)


def test_fold_of_a_mixed_precision_net_computes_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = architectures.build("resnet8", shortcuts="none", width=0.25, dirac=True,
                                    input_shape=(28, 28, 1))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    _randomise(model, np.random.default_rng(3))
    classifier = architectures.classifier(model)
    folded, reference = folding.fold(classifier), folding.float32_copy(classifier)
    assert {layer.dtype_policy.name for layer in folded.layers + reference.layers} == {"float32"}
    assert _unfolded_layers(reference)  # the reference keeps BN and Dirac
    x = np.random.default_rng(4).normal(size=(4, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(folded(x).numpy(), reference(x).numpy(), atol=1e-4)
    np.testing.assert_allclose(folded(x).numpy(), classifier(x, training=False).numpy(), atol=0.1)


# ----------------------------------------------------------------------------- SavedModel


def test_saved_model_matches_keras(workdir, report):
    images, _ = test_images(workdir, 64)
    expected = keras_probabilities(workdir, images)
    loaded = tf.saved_model.load(report["artefacts"]["saved_model"]["path"])
    assert set(loaded.signatures) == {"serving_default", "predict_preprocessed"}
    served = loaded.signatures["serving_default"](images=tf.constant(images))
    assert served["probabilities"].dtype == tf.float32 and served["classes"].dtype == tf.int64
    assert np.abs(served["probabilities"].numpy() - expected).max() < 1e-5
    np.testing.assert_array_equal(served["classes"].numpy(), expected.argmax(-1))
    info = export.dataset_info(export.load_workdir(workdir)[0])
    normalised = data.normalize(images, info.mean, info.std)
    preprocessed = loaded.signatures["predict_preprocessed"](images=normalised)
    assert np.abs(preprocessed["probabilities"].numpy() - expected).max() < 1e-5


def test_saved_model_holds_only_the_folded_plain_variables(workdir, report):
    loaded = tf.saved_model.load(report["artefacts"]["saved_model"]["path"])
    folded = folding.fold(architectures.classifier(export.load_workdir(workdir)[1]))
    names = sorted(v.name.split(":")[0] for v in loaded.variables)
    assert names == sorted(w.path for w in folded.weights)
    assert not any(word in name for name in names for word in ("bn", "moving", "teacher", "resnet"))


def test_warmup_requests_are_real_serving_default_requests(report):
    from tensorflow_serving.apis import prediction_log_pb2

    path = report["artefacts"]["saved_model"]["path"]
    records = list(tf.data.TFRecordDataset(os.path.join(path, saved_model_export.WARMUP_FILE)))
    assert len(records) == len(saved_model_export.WARMUP_BATCH_SIZES)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert (request.model_spec.name, request.model_spec.signature_name) == ("plain", "serving_default")
        images = tf.make_ndarray(request.inputs["images"])
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1) and images.max() > 0
        assert serve(images=tf.constant(images))["classes"].shape == (len(images),)


def test_new_export_is_next_version_and_never_touches_old_ones(workdir, report, monkeypatch):
    model_dir = os.path.dirname(report["artefacts"]["saved_model"]["path"])
    assert saved_model_export.existing_versions(model_dir) == [1]
    before = tree_hash(os.path.join(model_dir, "1"))
    # The same weights again: the newest version is up to date, nothing is written.
    same = export.export_workdir(workdir, formats="saved_model", eval_examples=16, progress=False)
    assert same["artefacts"]["saved_model"]["version"] == 1 and same["artefacts"]["saved_model"]["up_to_date"]
    assert saved_model_export.existing_versions(model_dir) == [1]
    again = export.export_workdir(workdir, formats="saved_model", eval_examples=16, progress=False,
                                  new_version=True)
    assert again["artefacts"]["saved_model"]["version"] == 2 and not again["artefacts"]["saved_model"]["up_to_date"]
    assert tree_hash(os.path.join(model_dir, "1")) == before
    open(os.path.join(model_dir, "3"), "w").close()  # a stray file named like the next version
    folded = folding.fold(architectures.classifier(export.load_workdir(workdir)[1]))
    images, _ = test_images(workdir, 8)

    def write():
        return saved_model_export.export_version(
            folded, model_dir, image_shape=(28, 28, 1), mean=(0.5,), std=(0.25,), warmup_images=images,
            model_name="plain")

    assert write() == (4, os.path.join(model_dir, "4"))
    assert os.path.isfile(os.path.join(model_dir, "3")) and os.path.getsize(os.path.join(model_dir, "3")) == 0

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saved_model_export, "write_warmup", fail)
    with pytest.raises(OSError, match="disk full"):
        write()
    assert sorted(os.listdir(model_dir)) == ["1", "2", "3", "4"]  # no 5, no .tmp-*
    assert tree_hash(os.path.join(model_dir, "1")) == before


def test_saved_model_cli_shows_both_signatures_and_runs_serving_default(workdir, report, tmp_path):
    path = report["artefacts"]["saved_model"]["path"]
    images, _ = test_images(workdir, 16)
    np.save(tmp_path / "images.npy", images)
    # Both CLI calls start TensorFlow (~10 s each): run them side by side.
    show = subprocess.Popen([SAVED_MODEL_CLI, "show", "--all", "--dir", path], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    run = subprocess.Popen([SAVED_MODEL_CLI, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
                            "serving_default", "--inputs", f"images={tmp_path / 'images.npy'}",
                            "--outdir", str(tmp_path / "out")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    listing, (_, run_errors) = show.communicate(timeout=120)[0], run.communicate(timeout=120)
    assert show.returncode == 0 and run.returncode == 0, run_errors[-2000:]
    for name, dtype in (("serving_default", "DT_UINT8"), ("predict_preprocessed", "DT_FLOAT")):
        section = listing.split(f"signature_def['{name}']")[1].split("signature_def[")[0]
        inputs = section.split("output(s)")[0]
        assert "inputs['images']" in inputs and inputs.count("inputs[") == 1 and dtype in inputs
        assert "outputs['probabilities']" in section and "outputs['classes']" in section
    classes = np.load(tmp_path / "out" / "classes.npy")
    np.testing.assert_array_equal(classes, keras_probabilities(workdir, images).argmax(-1))


# ----------------------------------------------------------------------------- TFLite


def run_on_pixels(path, images):
    """The top-1 classes of a .tflite fed raw uint8 `images` through ai_edge_litert, with no
    preprocessing at all: the file has to normalise them itself."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    detail = interpreter.get_input_details()[0]
    assert detail["dtype"] == np.uint8
    interpreter.resize_tensor_input(detail["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).argmax(-1)


def test_tflite_variants_follow_their_input_contracts(workdir, report):
    images, _ = test_images(workdir, 64)
    expected = keras_probabilities(workdir, images)
    info = export.dataset_info(export.load_workdir(workdir)[0])
    scale, zero_point = 1 / (255 * info.std[0]), round(255 * info.mean[0])  # Fashion-MNIST: 73
    for quant in ("none", "fp16", "dynamic", "int8"):
        entry = report["artefacts"][f"tflite_{quant}"]
        assert entry["path"].endswith(f"export/tflite/plain_{quant}.tflite")
        assert (entry["signature_inputs"], entry["signature_outputs"]) == (["images"], ["probabilities"])
        assert entry["input"]["dtype"] == "uint8" and entry["input"]["normalised"] is False
        runner = TFLiteRunner(entry["path"])
        assert runner.takes_pixels
        probabilities = runner(images)
        if quant == "int8":
            # The input quantiser is the normalisation: uint8 pixels, no op before the first conv but the
            # integer uint8 -> int8 requantisation, no float tensor anywhere.
            assert entry["output"]["dtype"] == "int8" and entry["float_tensors"] == 0
            assert entry["input"]["scale"] == pytest.approx(scale, rel=1e-6)
            assert entry["input"]["zero_point"] == zero_point
            assert runner.float_tensors() == [] and runner.op_names()[:2] == ["QUANTIZE", "CONV_2D"]
        else:
            assert entry["output"]["dtype"] == "float32" and "scale" not in entry["input"]
            assert "CAST" in runner.op_names()  # uint8 -> float, then the normalisation
        if quant == "none":
            np.testing.assert_array_equal(probabilities.argmax(-1), expected.argmax(-1))
            assert np.abs(probabilities - expected).max() < 1e-4
            assert entry["top1_agreement"] == 1.0 and entry["max_abs_prob_diff"] < 1e-4
    sizes = {q: report["artefacts"][f"tflite_{q}"]["size_bytes"] for q in ("none", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["none"]
    with pytest.raises(ValueError, match="dtype=float32"):
        TFLiteRunner(report["artefacts"]["tflite_none"]["path"])(images.astype(np.float32))


def test_uint8_io_shifts_the_zero_point_only(workdir):
    # The bare conversion (normalised input, what the bench times): io_type sets input and output.
    config, model = export.load_workdir(workdir)
    info = export.dataset_info(config)
    folded = folding.fold(architectures.classifier(model))
    images, _ = test_images(workdir, 64)
    normalised = data.normalize(images, info.mean, info.std).numpy()
    runners = {io: TFLiteRunner(tflite_export.convert(folded, info.image_shape, "int8", normalised, io))
               for io in tflite_export.IO_TYPES}
    contracts = {io: runner.input_contract()["input"] for io, runner in runners.items()}
    assert contracts["uint8"]["dtype"] == "uint8"
    assert contracts["uint8"]["zero_point"] == contracts["int8"]["zero_point"] + 128
    assert contracts["uint8"]["scale"] == pytest.approx(contracts["int8"]["scale"])
    top1 = {io: runner(normalised).argmax(-1) for io, runner in runners.items()}
    assert np.mean(top1["uint8"] == top1["int8"]) >= 0.95
    with pytest.raises(ValueError, match="io_type='int16'"):
        tflite_export.convert(folded, info.image_shape, "int8", normalised, "int16")


def test_metadata_reads_back_labels_input_and_normalisation(workdir, report):
    labels_file = os.path.join(workdir, "export", "tflite", "labels.txt")
    with open(labels_file) as f:
        labels = f.read().splitlines()
    assert labels == list(samples.KNOWN_LABELS["fashion_mnist"]) == report["data"]["labels"]
    for quant in ("none", "fp16", "dynamic", "int8"):
        entry = report["artefacts"][f"tflite_{quant}"]
        record = metadata.read(entry["path"])
        assert record["format"] == metadata.FORMAT and record["quantization"] == quant
        assert record["labels"] == labels and record["labels_file"] == "labels.txt"
        assert record["input"] == {**record["input"], "name": "images", "dtype": "uint8", "shape": [-1, 28, 28, 1],
                                   "layout": "NHWC", "color_space": "grayscale", "value_range": [0, 255],
                                   "normalised": False}
        norm = record["normalisation"]
        assert norm["inside_model"] and norm["channel_order"] == "rgb"
        assert (norm["mean"], norm["std"]) == (report["data"]["mean"], report["data"]["std"])
        assert ("quantisation" in norm["implementation"]) == (quant == "int8")
        assert record["output"]["name"] == "probabilities" and record["output"]["shape"] == [-1, 10]
        assert record["output"]["dtype"] == entry["output"]["dtype"]
    # Writing again replaces the record; the other entries (the converter's) stay.
    with open(report["artefacts"]["tflite_int8"]["path"], "rb") as f:
        payload = f.read()
    again = metadata.write(payload, {"input": {"normalised": True}, "labels": ["x"]})
    assert metadata.read(again)["labels"] == ["x"] and metadata.read(payload)["labels"] == labels
    from ai_edge_litert import schema_py_generated as schema

    names = lambda b: sorted(schema.Model.GetRootAs(b, 0).Metadata(i).Name().decode()  # noqa: E731
                             for i in range(schema.Model.GetRootAs(b, 0).MetadataLength()))
    assert names(again) == names(payload) and metadata.METADATA_NAME in names(payload)
    assert len(names(payload)) > 1  # the converter's min_runtime_version / CONVERSION_METADATA kept


def test_every_tflite_fed_raw_pixels_keeps_the_keras_accuracy(tmp_path):
    # A workdir from before samples.npz (and before data.split_seed): the images come from the data directory.
    workdir = make_workdir(tmp_path / "real", width=0.5, train_examples=10_000, epochs=2, store_samples=False)
    with open(wd.config_path(workdir)) as f:
        old = json.load(f)
    del old["data"]["split_seed"]
    wd.write_atomic(wd.config_path(workdir), json.dumps(old))
    report = export.export_workdir(workdir, formats="tflite", eval_examples=500, calibration_examples=256,
                                   progress=False)
    assert report["eval"]["images"] == f"data directory {FMNIST_DIR}"
    images, labels = test_images(workdir, 500)
    keras_accuracy = report["artefacts"]["keras"]["accuracy"]
    assert keras_accuracy > 0.7, "the reference model did not train"
    keras_top1 = keras_probabilities(workdir, images).argmax(-1)
    for quant, min_agreement, max_loss in (("none", 1.0, 0.0), ("fp16", 0.99, 0.01), ("dynamic", 0.98, 0.02),
                                           ("int8", 0.95, 0.03)):
        entry = report["artefacts"][f"tflite_{quant}"]
        top1 = run_on_pixels(entry["path"], images)
        accuracy = float(np.mean(top1 == labels))
        assert np.mean(top1 == keras_top1) >= min_agreement, quant
        assert accuracy >= keras_accuracy - max_loss, (quant, accuracy, keras_accuracy)
        assert accuracy == entry["accuracy"]  # the report measured the same thing
    table = export.format_table(report)
    assert "uint8 raw pixels" in table and "vs keras" in table


@pytest.fixture(scope="module")
def bgr_workdir(tmp_path_factory):
    """A colour net trained with caffe normalisation (BGR, per-channel mean), on synthetic images."""
    keras.utils.set_random_seed(0)  # a module fixture is built before the per-test seed is set
    return make_workdir(tmp_path_factory.mktemp("bgr"), source="synthetic", image_size=16, channels=3,
                        normalization="caffe", synthetic_examples=1024, train_examples=0, epochs=5, lr=0.01)


def test_per_channel_and_bgr_normalisation_inside_the_tflite(bgr_workdir):
    report = export.export_workdir(bgr_workdir, formats="saved_model,tflite", quantize="none,int8",
                                   eval_examples=200, calibration_examples=128, progress=False)
    artefacts = report["artefacts"]
    assert report["data"]["channel_order"] == "bgr" and len(set(report["data"]["mean"])) == 3
    assert artefacts["keras"]["accuracy"] > 0.5, "the reference model did not train"
    stored = samples.examples(export.load_workdir(bgr_workdir)[0], bgr_workdir, test_examples=200,
                              calibration_examples=0, num_classes=10)
    images, labels = stored.test_images, stored.test_labels
    served = tf.saved_model.load(artefacts["saved_model"]["path"]).signatures["serving_default"]
    served_top1 = served(images=tf.constant(images))["classes"].numpy()
    # The float file reverses the channels and normalises exactly as the SavedModel does.
    assert artefacts["tflite_none"]["max_abs_prob_diff"] < 1e-4
    np.testing.assert_array_equal(run_on_pixels(artefacts["tflite_none"]["path"], images), served_top1)
    # The int8 file: pixels in unchanged (scale 1, zero point 0) to the `normalize` conv, all integer.
    int8 = artefacts["tflite_int8"]
    assert (int8["input"]["scale"], int8["input"]["zero_point"]) == (1.0, 0)
    runner = TFLiteRunner(int8["path"])
    assert runner.float_tensors() == [] and runner.op_names()[:3] == ["QUANTIZE", "CONV_2D", "CONV_2D"]
    assert "conv named normalize" in metadata.read(int8["path"])["normalisation"]["implementation"]
    assert int8["top1_agreement"] >= 0.95 and int8["accuracy"] >= artefacts["keras"]["accuracy"] - 0.03
    assert np.mean(run_on_pixels(int8["path"], images) == labels) == int8["accuracy"]


def test_normalisation_conv_and_input_quantiser_equal_normalize():
    rng = np.random.default_rng(5)
    model = architectures.build("resnet8", shortcuts="downsample", width=0.25, input_shape=(8, 8, 3))
    _randomise(model, rng)
    folded = folding.fold(architectures.classifier(model))
    images = rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    for norm in (pixels.Normalisation((0.1, 0.5, 0.9), (0.2, 0.3, 0.4), "bgr"),
                 pixels.Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        assert not norm.uniform
        expected = folded(norm.normalize(images)).numpy()
        got = norm.pixel_model(folded)(images.astype(np.float32)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)
        np.testing.assert_allclose(norm.from_normalised(norm.normalize(images).numpy()), images, atol=1e-3)
        assert norm.input_quantization() == (1.0, 0)
    grey = pixels.Normalisation((0.286,), (0.353,))
    scale, zero_point = grey.input_quantization()
    assert grey.uniform and zero_point == 73 and scale == pytest.approx(1 / (255 * 0.353))
    # Dequantising a pixel is normalising it, up to the zero point's rounding (0.07 of a pixel level here).
    assert grey.pixel_error() == pytest.approx(0.07, abs=1e-6)
    np.testing.assert_allclose((np.arange(256) - zero_point) * scale,
                               grey.normalize(np.arange(256, dtype=np.uint8)).numpy(), atol=0.5 * scale)
    with pytest.raises(ValueError, match="shape=\\(1, 1, 1, 1\\)"):
        pixels.with_extremes(np.zeros((1, 1, 1, 1), np.uint8))


# ----------------------------------------------------------------------------- stored samples


def test_export_without_the_data_directory_uses_the_stored_samples(tmp_path, capsys):
    data_dir = tmp_path / "fashion-mnist"
    shutil.copytree(FMNIST_DIR, data_dir)
    trained = make_workdir(tmp_path / "trained", data_dir=str(data_dir))
    config = export.load_workdir(trained)[0]
    stored = wd.read_samples(trained)
    first_test, first_labels = data.raw_examples(config, "test", defaults.EVAL_EXAMPLES)
    np.testing.assert_array_equal(stored["test_images"], first_test)
    np.testing.assert_array_equal(stored["test_labels"], first_labels)
    np.testing.assert_array_equal(stored["calibration_images"],
                                  data.raw_examples(config, "train", defaults.CALIBRATION_EXAMPLES)[0])
    shutil.rmtree(data_dir)
    copy = str(tmp_path / "copied")
    shutil.copytree(trained, copy)
    export.main([f"--workdir={copy}", "--quantize=none,int8", "--eval_examples=200",
                 "--calibration_examples=64", "--no_progress"])
    out = capsys.readouterr().out
    assert f"stored samples {os.path.join(copy, 'samples.npz')}" in out and "data directory is not read" in out
    with open(os.path.join(copy, "export", "report.json")) as f:
        report = json.load(f)
    assert report["eval"] == {"split": "test", "examples": 200, "images": os.path.join(copy, "samples.npz"),
                              "calibration_examples": 64}
    assert set(report["artefacts"]) == {"keras", "saved_model", "tflite_none", "tflite_int8"}
    assert report["artefacts"]["tflite_none"]["top1_agreement"] == 1.0
    assert report["artefacts"]["keras"]["accuracy"] == float(np.mean(
        keras_probabilities(copy, first_test[:200]).argmax(-1) == first_labels[:200]))
    # More images than the sample holds need the data directory: the error says both.
    with pytest.raises(SystemExit):
        export.main([f"--workdir={copy}", "--format=tflite", "--quantize=none", "--eval_examples=2000"])
    err = capsys.readouterr().err
    assert "IDX file not found" in err and "holds 1000 test and 256 calibration images; asked for 2000" in err


# ----------------------------------------------------------------------------- CLI and errors


def test_cli_prints_table_and_writes_report(workdir, capsys):
    export.main([f"--workdir={workdir}", "--format=tflite", "--quantize=none", "--eval_examples=32",
                 "--no_progress"])
    out = capsys.readouterr().out
    assert "tflite_none" in out and "report.json" in out
    with open(os.path.join(workdir, "export", "report.json")) as f:
        assert list(json.load(f)["artefacts"]) == ["keras", "tflite_none"]


@pytest.mark.parametrize("args,message", [
    (["--quantize=none,int4"], "quantize='none,int4'"),
    (["--format=onnx"], "formats='onnx'"),
    (["--qat_steps=-1"], "qat_steps=-1"),
    (["--model_name=../x"], "model_name='../x'"),
    (["--qat_steps=5", "--format=saved_model"], "qat_steps=5"),
    (["--qat_learning_rate=0"], "qat_learning_rate=0.0"),
])
def test_cli_rejects_bad_values_quoting_them(tmp_path, capsys, args, message):
    # Values are checked before the workdir is even read.
    with pytest.raises(SystemExit) as exit_info:
        export.main([f"--workdir={tmp_path}", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_workdir_or_model_names_the_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export.main([f"--workdir={tmp_path / 'nope'}"])
    assert str(tmp_path / "nope") in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "plain.keras")):
        export.export_workdir(str(tmp_path))


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("module", ["__init__", "workdir_export", "folding", "saved_model_export", "tflite_export",
                                    "pixels", "metadata", "qat"])
def test_no_serving_package_and_tfmot_only_lazily_in_qat(module):
    with open(os.path.join(os.path.dirname(export.__file__), f"{module}.py")) as f:
        tree = ast.parse(f.read())
    top_level = set(_imports(ast.Module(
        body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])))
    every = set(_imports(tree))
    assert not any(name == "rd_keras_serving" or name.startswith("rd_keras_serving.") for name in every)
    assert "tensorflow_model_optimization" not in top_level
    assert ("tensorflow_model_optimization" in every) == (module == "qat")
