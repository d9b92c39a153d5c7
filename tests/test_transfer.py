"""Fine-tuning (train.mode="transfer"), the RD student's warm start (model.student_init) and data.classes."""

import glob
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from rd_keras.configs import fashion_mnist
from rd_keras import architectures, data, export, train_lib, transfer
from rd_keras import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "TFDS_DATA_DIR": "/nonexistent",
       "NO_GCE_CHECK": "true", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def smoke_config(**overrides):
    """The smoke config on 128 synthetic 16x16 RGB images: 4 steps per epoch, 2 epochs."""
    config = fashion_mnist.get_config("smoke")
    config.data.update(source="synthetic", name="synthetic", image_size=16, channels=3, synthetic_examples=128,
                       train_subset=0, eval_subset=0, augment="none")
    config.train.update(progress=False, checkpoint_every_steps=3)
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def write_image_folder(root, classes=3, per_class=(8, 4), size=16, channels=3):
    """`root/{train,test}/c<k>/*.png`, RGB (or grayscale: channels=1), class k brighter than class k-1."""
    rng = np.random.default_rng(0)
    shape = (size, size, 3) if channels == 3 else (size, size)
    for split, n in zip(("train", "test"), per_class):
        for k in range(classes):
            os.makedirs(os.path.join(root, split, f"c{k}"))
            for i in range(n):
                pixels = (k + 0.5) * 255 / classes + rng.uniform(-30, 30, shape)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    os.path.join(root, split, f"c{k}", f"{i}.png"))
    return str(root)


def weights_by_layer(model):
    return {layer.name: [w.numpy() for w in layer.weights] for layer in model.layers if layer.weights}


def built(config):
    info = data.DatasetInfo(10, (16, 16, 3), 128, 25, (0.5,) * 3, (0.25,) * 3)
    return train_lib.build_setup(config, info, tf.distribute.get_strategy(), steps_per_epoch=4)


# ----------------------------------------------------------------------------- model.student_init


def test_student_init_teacher_copies_every_shared_layer_and_no_projection():
    setup = built(smoke_config(**{"model.student_init": "teacher"}))
    plain, resnet = weights_by_layer(setup.trained["plain"]), weights_by_layer(setup.trained["resnet"])
    projections = {name for name in resnet if "_proj_" in name}
    assert projections == {"stage2_block1_proj_conv", "stage2_block1_proj_bn", "stage3_block1_proj_conv",
                           "stage3_block1_proj_bn"}
    assert set(plain) == set(resnet) - projections
    for name, weights in plain.items():
        for mine, theirs in zip(weights, resnet[name], strict=True):
            np.testing.assert_array_equal(mine, theirs, err_msg=name)
    # The default keeps the plain net's own random initialisation.
    default = built(smoke_config())
    assert not np.array_equal(default.trained["plain"].get_layer("stem_conv").kernel.numpy(),
                              default.trained["resnet"].get_layer("stem_conv").kernel.numpy())


def test_student_init_into_dirac_convs_keeps_the_teachers_effective_kernel():
    setup = built(smoke_config(**{"model.student_init": "teacher", "model.dirac": True}))
    mine = setup.trained["plain"].get_layer("stage1_block1_conv1")
    np.testing.assert_allclose(mine.effective_kernel().numpy(),
                               setup.trained["resnet"].get_layer("stage1_block1_conv1").kernel.numpy(), atol=0)


def test_student_init_is_validated_quoting_the_value(tmp_path):
    with pytest.raises(train_lib.ConfigError, match=r"model.student_init must be one of \('random', 'teacher'\), "
                                                    r"got 'teachr'"):
        train_lib.run(smoke_config(**{"model.student_init": "teachr"}), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


@pytest.fixture
def deterministic():
    yield
    from tensorflow.python.framework import config as tf_config  # the public API can only turn it on

    tf_config.disable_op_determinism()


def test_resumed_run_does_not_copy_again_and_ends_bitwise_equal(tmp_path, deterministic, monkeypatch):
    calls = []
    original = transfer.copy_shared_weights
    monkeypatch.setattr(transfer, "copy_shared_weights", lambda *a, **k: calls.append(1) or original(*a, **k))
    overrides = {"model.student_init": "teacher", "train.deterministic": True}
    train_lib.run(smoke_config(**overrides), str(tmp_path / "a"))
    assert len(calls) == 1
    assert train_lib.run(smoke_config(**overrides, **{"train.steps_per_run": 5}), str(tmp_path / "b")) is None
    assert len(calls) == 2
    train_lib.run(smoke_config(**overrides), str(tmp_path / "b"))  # resumes at step 5 of 8
    assert len(calls) == 2  # the checkpoint, not the teacher, holds the plain net's weights now
    for name in (wd.PLAIN_FILE, wd.RESNET_FILE):
        a = keras.saving.load_model(str(tmp_path / "a" / name), compile=False).weights
        b = keras.saving.load_model(str(tmp_path / "b" / name), compile=False).weights
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(x.numpy(), y.numpy()), f"{name}: {x.path}"


# ----------------------------------------------------------------------------- data.classes


def test_data_classes_keeps_those_labels_renumbered_in_their_order():
    full = data.raw_examples(smoke_config(), "train", 128)
    images, labels = data.raw_examples(smoke_config(**{"data.classes": (7, 2)}), "train", 128)
    keep = np.isin(full[1], (7, 2))
    np.testing.assert_array_equal(images, full[0][keep])
    np.testing.assert_array_equal(labels, np.where(full[1][keep] == 7, 0, 1))
    assert data.pipelines(smoke_config(**{"data.classes": (7, 2), "data.batch_size": 8}))[2].num_classes == 2


@pytest.mark.parametrize("classes", [(3, 3), (1,), (-1, 2), (1.5, 2)])
def test_data_classes_is_validated_quoting_the_value(classes):
    with pytest.raises(ValueError, match=rf"Received: classes={re.escape(repr(classes))}"):
        data.check_config(smoke_config(**{"data.classes": classes}).data)


def test_data_classes_beyond_the_label_count_is_refused():
    with pytest.raises(ValueError, match=r"below num_classes=10. Received: classes=\(2, 10\)"):
        data.pipelines(smoke_config(**{"data.classes": (2, 10)}))


# ----------------------------------------------------------------------------- transfer


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Finished supervised runs on 10-class synthetic images: a plain net and a ResNet."""
    root = tmp_path_factory.mktemp("sources")
    for role, shortcuts in (("plain", "none"), ("resnet", "all")):
        train_lib.run(smoke_config(**{"train.mode": "supervised", "model.supervised_shortcuts": shortcuts}),
                      str(root / role))
    return root


def transfer_config(source, folder, **overrides):
    from rd_keras.configs import transfer as transfer_config_file

    config = transfer_config_file.get_config("smoke")
    config.transfer["from"] = str(source)
    config.data.data_dir = folder
    config.data.batch_size = 8  # 24 images: 3 steps per epoch, 6 in all
    config.train.progress = False
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def test_transfer_new_head_frozen_stages_unchanged_and_resnet_saved_as_resnet(sources, tmp_path):
    folder = write_image_folder(tmp_path / "images")
    workdir = tmp_path / "ft"
    record = train_lib.run(transfer_config(sources / "resnet", folder, **{"transfer.freeze_stages": 2}), str(workdir))
    assert record["step"] == 6 and os.path.isfile(workdir / wd.RESNET_FILE)
    assert not os.path.exists(workdir / wd.PLAIN_FILE)
    tuned = keras.saving.load_model(str(workdir / wd.RESNET_FILE), compile=False)
    source = keras.saving.load_model(str(sources / "resnet" / wd.RESNET_FILE), compile=False)
    assert tuned.get_layer("logits").units == 3 and source.get_layer("logits").units == 10
    before, after = weights_by_layer(source), weights_by_layer(tuned)
    for name in after:
        index = transfer.stage_index(name)
        if index is not None and index < 2:  # stem and stage 1: frozen, BN statistics included
            for x, y in zip(before[name], after[name], strict=True):
                np.testing.assert_array_equal(x, y, err_msg=name)
    assert not np.array_equal(before["stage2_block1_bn1"][2], after["stage2_block1_bn1"][2])  # moving mean trained
    with open(workdir / wd.CONFIG_FILE) as f:
        assert json.load(f)["run"]["transfer"]["shortcuts"] == "all"


@pytest.fixture(scope="module")
def grayscale_source(tmp_path_factory):
    """A workdir holding a plain net of 1-channel 16x16 images, as a Fashion-MNIST run leaves (untrained: only
    its input matters here)."""
    root = tmp_path_factory.mktemp("grayscale_source")
    net = architectures.build("resnet8", shortcuts="none", input_shape=(16, 16, 1), width=0.25)
    wd.save_model_atomic(net, wd.plain_path(str(root)))
    return root


@pytest.mark.parametrize("net_channels, folder_channels", [(1, 1), (1, 3), (3, 1)])
def test_images_take_the_source_nets_channel_count(sources, grayscale_source, tmp_path, net_channels,
                                                   folder_channels):
    """No data.channels given (configs/transfer.py leaves the default, 3): grayscale PNGs are read as one
    channel for a 1-channel net and made RGB for an RGB net; RGB PNGs are made grayscale for a 1-channel net."""
    folder = write_image_folder(tmp_path / "images", channels=folder_channels)
    source = grayscale_source if net_channels == 1 else sources / "plain"
    workdir = tmp_path / "ft"
    config = transfer_config(source, folder, **{"train.epochs": 1, "train.warmup_epochs": 0.0})
    assert config.data.channels == 3
    record = train_lib.run(config, str(workdir))
    assert record["step"] == 3
    with open(workdir / wd.CONFIG_FILE) as f:
        written = json.load(f)
    assert written["data"]["channels"] == net_channels and written["dataset"]["image_shape"] == [16, 16, net_channels]
    tuned = keras.saving.load_model(str(workdir / wd.PLAIN_FILE), compile=False)
    assert tuple(tuned.input.shape[1:]) == (16, 16, net_channels)
    # The export reads the images the run trained on, from config.json.
    exported_config, _ = export.load_workdir(str(workdir))
    assert data.raw_examples(exported_config, "test", 4)[0].shape == (4, 16, 16, net_channels)


@pytest.mark.parametrize("given, message", [
    ("missing.keras", r"config.transfer.from='.*missing.keras': file not found"),
    ("empty_dir", r"config.transfer.from='.*empty_dir': a directory with neither plain.keras nor resnet.keras"),
    ("not_a_model.txt", r"config.transfer.from='.*not_a_model.txt': not a .keras file, a workdir"),
])
def test_bad_transfer_source_fails_naming_it_before_anything_is_written(tmp_path, given, message):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "not_a_model.txt").write_text("x")
    folder = write_image_folder(tmp_path / "images")
    with pytest.raises(transfer.TransferError, match=message):
        train_lib.run(transfer_config(tmp_path / given, folder), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_transfer_mismatches_fail_before_anything_is_written(sources, tmp_path):
    folder = write_image_folder(tmp_path / "images")
    cases = [({"data.source": "idx", "data.name": "fashion_mnist"}, train_lib.ConfigError,
              r"config.transfer.from='.*plain' takes 3-channel images, but IDX images \(config.data.source='idx'\) "
              r"have 1 channel"),
             ({"transfer.freeze_stages": 5}, transfer.TransferError,
              r"freeze_stages must be an integer in \[0, 4\] for plain8 .*got 5"),
             ({"transfer.freeze_stages": -1}, train_lib.ConfigError, r"transfer.freeze_stages .* got -1"),
             ({"export.enabled": True, "transfer.from": str(sources / "resnet")}, train_lib.ConfigError,
              r"exports plain nets, but config.transfer.from='.*resnet' is a ResNet")]
    cases.append(({"transfer.from": "keras.applications.ResNet50", "transfer.weights": str(tmp_path / "no.h5")},
                  transfer.TransferError, r"config.transfer.from='keras.applications.ResNet50' with "
                                          r"config.transfer.weights='.*no.h5': .*file not found"))
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            train_lib.run(transfer_config(sources / "plain", folder, **overrides), str(tmp_path / "w"))
        assert not os.path.exists(tmp_path / "w"), overrides


@pytest.mark.slow
def test_readme_command_fine_tunes_a_plain_net_on_an_image_folder_and_exports_it(grayscale_source, tmp_path):
    """The README's command, through train.py, a net of grayscale images on a folder of grayscale PNGs (no
    data.channels): train, checkpoint, resume, export of the fine-tuned plain net."""
    folder = write_image_folder(tmp_path / "images", channels=1)
    workdir = str(tmp_path / "ft")
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/transfer.py:smoke",
               f"--workdir={workdir}", f"--config.transfer.from={grayscale_source}",
               f"--config.data.data_dir={folder}", "--config.data.batch_size=8", "--config.train.progress=False"]
    first = subprocess.run([*command, "--config.train.steps_per_run=1"], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopped at step 1 of 6" in first.stdout
    second = subprocess.run([*command, "--config.export.enabled=True", "--config.export.formats=saved_model",
                             "--config.export.quantize=none"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 1 of 6" in second.stdout
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index"))) == [
        "ckpt-3.index", "ckpt-4.index", "ckpt-6.index"]  # epoch ends and every 4 steps, the newest 3 kept
    model = keras.saving.load_model(os.path.join(workdir, wd.PLAIN_FILE), compile=False)
    assert model.name == "plain8" and model.get_layer("logits").units == 3
    assert tuple(model.input.shape[1:]) == (16, 16, 1)
    with open(os.path.join(workdir, "export", "report.json")) as f:
        report = json.load(f)
    assert report["eval"]["examples"] == 12
    assert report["artefacts"]["saved_model"]["top1_agreement"] == 1.0
    assert os.path.isfile(os.path.join(workdir, "export", "saved_model", "plain", "1", "saved_model.pb"))
