"""Tests for rd_keras.export, folding, saved_model_export and tflite_export, on small workdirs trained here
on real Fashion-MNIST: folding is exact, the SavedModel and every .tflite agree with the Keras model,
versions are atomic and never overwritten, and TF's own saved_model_cli can read and run the export."""

import ast
import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from rd_keras import architectures, data, export
from rd_keras import defaults
from rd_keras import workdir as wd
from rd_keras.export import folding, saved_model_export, tflite_export
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


def make_workdir(path, *, width=0.25, train_examples=512, epochs=1, shortcuts="none", dirac=False):
    """A finished training workdir as the trainer leaves it: config.json (with its `dataset` section,
    written by the trainer's own writer) and plain.keras, trained with model.fit so BN statistics are
    real."""
    config = ml_collections.ConfigDict({
        "data": defaults.data_config(),
        "model": {"arch": "resnet8", "width": width, "stem": "", "student_shortcuts": shortcuts,
                  "dirac": dirac},
    })
    config.data.update(augment="none", train_subset=train_examples, batch_size=64)
    train_ds, _, info = data.datasets(config)
    model = architectures.build("resnet8", shortcuts=shortcuts, width=width, dirac=dirac,
                                input_shape=info.image_shape, num_classes=info.num_classes)
    classifier = architectures.classifier(model)
    classifier.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.fit(train_ds, epochs=epochs, verbose=0, shuffle=False)  # the pipeline shuffles
    os.makedirs(path, exist_ok=True)
    wd.write_config(str(path), config, dataset=dataclasses.asdict(info))
    model.save(os.path.join(path, "plain.keras"))
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
    assert report["eval"] == {"split": "test", "examples": 200}
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
    again = export.export_workdir(workdir, formats="saved_model", eval_examples=16, progress=False)
    assert again["artefacts"]["saved_model"]["version"] == 2
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


def test_tflite_variants_follow_their_input_contracts(workdir, report):
    images, _ = test_images(workdir, 64)
    expected = keras_probabilities(workdir, images)
    info = export.dataset_info(export.load_workdir(workdir)[0])
    normalised = data.normalize(images, info.mean, info.std).numpy()
    for quant in ("none", "fp16", "dynamic", "int8"):
        entry = report["artefacts"][f"tflite_{quant}"]
        assert entry["path"].endswith(f"export/tflite/plain_{quant}.tflite")
        assert (entry["signature_inputs"], entry["signature_outputs"]) == (["images"], ["probabilities"])
        runner = TFLiteRunner(entry["path"])
        probabilities = runner(normalised)
        if quant == "int8":
            assert entry["input"]["dtype"] == entry["output"]["dtype"] == "int8"
            assert entry["input"]["scale"] > 0 and runner.float_tensors() == []
        else:
            assert entry["input"]["dtype"] == "float32" and "scale" not in entry["input"]
        if quant == "none":
            np.testing.assert_array_equal(probabilities.argmax(-1), expected.argmax(-1))
            assert np.abs(probabilities - expected).max() < 1e-4
            assert entry["top1_agreement"] == 1.0 and entry["max_abs_prob_diff"] < 1e-4
    sizes = {q: report["artefacts"][f"tflite_{q}"]["size_bytes"] for q in ("none", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["none"]


def test_uint8_io_shifts_the_zero_point_only(workdir):
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


def test_int8_agrees_with_a_really_trained_model(tmp_path):
    workdir = make_workdir(tmp_path / "real", width=0.5, train_examples=10_000, epochs=2)
    report = export.export_workdir(workdir, formats="tflite", quantize="int8", eval_examples=500,
                                   calibration_examples=256, progress=False)
    keras_accuracy = report["artefacts"]["keras"]["accuracy"]
    int8 = report["artefacts"]["tflite_int8"]
    assert keras_accuracy > 0.7, "the reference model did not train"
    assert int8["top1_agreement"] >= 0.95
    assert int8["accuracy"] >= keras_accuracy - 0.03


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
                                    "qat"])
def test_no_serving_package_and_tfmot_only_lazily_in_qat(module):
    with open(os.path.join(os.path.dirname(export.__file__), f"{module}.py")) as f:
        tree = ast.parse(f.read())
    top_level = set(_imports(ast.Module(
        body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])))
    every = set(_imports(tree))
    assert not any(name == "rd_keras_serving" or name.startswith("rd_keras_serving.") for name in every)
    assert "tensorflow_model_optimization" not in top_level
    assert ("tensorflow_model_optimization" in every) == (module == "qat")
