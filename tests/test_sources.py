"""Model sources (`rd_keras.sources`): a new kind of source is one `Kind` in `sources.KINDS`.

The kind added here is a `.weights.h5` file of our own builder (`model.save_weights`): it carries no
architecture, so only a use with a target (the pretrained teacher, built from the config) can load it.
"""

import os

import numpy as np
import pytest

from rd_keras import architectures, sources, teacher
from rd_keras.errors import ConfigError, TeacherError, TransferError
from tests.test_distill import INFO, setup_for, small_config


def _find_weights_file(path, use):
    if not path.endswith(".weights.h5"):
        return None
    if not os.path.isfile(path):
        raise use.error(f"config.{use.key}={path!r}: file not found.")
    return sources.Source("weights_h5", path)


def _load_weights_file(source, use, target):
    if target is None:
        raise use.error(f"config.{use.key}={source.path!r}: a weights file says nothing of its net's "
                        "architecture; it can only fill in a net built from the config.")
    model = target.build()
    model.load_weights(source.path)
    return model


WEIGHTS_H5 = sources.Kind(_find_weights_file, _load_weights_file)


@pytest.fixture
def weights_kind(monkeypatch):
    monkeypatch.setitem(sources.KINDS, "weights_h5", WEIGHTS_H5)


def test_a_new_kind_of_source_is_one_entry_in_kinds(weights_kind, tmp_path):
    config = small_config(**{"teacher.mode": "pretrained"})
    m = config.model
    saved = architectures.build(m.arch, num_classes=INFO.num_classes, input_shape=INFO.image_shape, width=m.width,
                                stem=m.stem or None)
    path = str(tmp_path / "resnet.weights.h5")
    saved.save_weights(path)
    config.teacher.path = path

    source = teacher.resolve(path)
    assert source == sources.Source("weights_h5", path)
    setup = setup_for(config, source)  # the run's teacher: built from the config, weights from the file
    for a, b in zip(saved.weights, setup.teacher.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert not setup.teacher.trainable

    with pytest.raises(TeacherError, match="file not found"):
        teacher.resolve(str(tmp_path / "missing.weights.h5"))
    with pytest.raises(TransferError, match=r"config.transfer.from='.*resnet.weights.h5': a weights file"):
        sources.load(sources.resolve(path, "", sources.TRANSFER), sources.TRANSFER)


def test_without_the_kind_such_a_file_is_refused_naming_what_works(tmp_path):
    path = tmp_path / "resnet.weights.h5"
    path.write_bytes(b"")
    with pytest.raises(TeacherError, match=r"not a .keras file, a workdir, or a checkpoint prefix"):
        teacher.resolve(str(path))
    with pytest.raises(TransferError, match=r"not a .keras file, a workdir, or keras.applications.<Name>"):
        sources.resolve(str(path), "", sources.TRANSFER)


def test_weights_apply_to_keras_applications_only_and_both_checks_say_so(tmp_path):
    path = str(tmp_path / "t.keras")
    architectures.build("resnet8", num_classes=10, input_shape=(16, 16, 3), width=0.25).save(path)
    message = r"config.teacher.weights='imagenet' applies to keras.applications.<Name> teachers only"
    with pytest.raises(TeacherError, match=message):
        teacher.resolve(path, "imagenet")
    config = small_config(**{"teacher.mode": "pretrained", "teacher.path": path, "teacher.weights": "imagenet"})
    with pytest.raises(ConfigError, match=message):
        sources.check_teacher_config(config)
    # A fine-tune reads transfer.weights for keras.applications sources only and ignores them otherwise.
    assert sources.resolve(path, "imagenet", sources.TRANSFER) == sources.Source("keras", path)


def test_channels_come_from_files_alone(tmp_path):
    path = str(tmp_path / "t.keras")
    architectures.build("resnet8", num_classes=10, input_shape=(16, 16, 1), width=0.25).save(path)
    assert sources.channels(path, sources.TEACHER) == 1
    assert sources.channels(str(tmp_path), sources.TEACHER) is None  # no resnet.keras, checkpoints, config.json
    assert sources.channels("keras.applications.ResNet50", sources.TRANSFER) == 3
    assert sources.channels("", sources.TEACHER) is None
