"""train.py end to end: workdir contents, resume, config overrides and checks, NaN stop, SIGTERM."""

import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from rd_keras import architectures, data, loop, teacher, train_lib
from rd_keras import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("fashion_mnist", "cifar10", "cifar100", "imagenet")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
# No network: tfds has no data dir, and any proxy-aware client is sent to a closed port.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "TFDS_DATA_DIR": "/nonexistent",
       "NO_GCE_CHECK": "true", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
       "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
REQUIRED_METRICS = {"step", "epoch", "plain_acc", "teacher_acc", "hybrid_acc", "loss", "plain_ce",
                    "hybrid_ce_1", "hybrid_ce_2", "kd_1", "kd_2", "teacher_ce", "weight_decay", "total", "blend",
                    "lr"}


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def train(workdir, *flags, config="configs/fashion_mnist.py:smoke", cwd=ROOT):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}", f"--workdir={workdir}", *flags]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def listing(path):
    return sorted((os.path.relpath(p, path), os.stat(p).st_mtime_ns, os.stat(p).st_size)
                  for p in glob.glob(os.path.join(path, "**"), recursive=True))


def tags(event_dir):
    files = glob.glob(os.path.join(event_dir, "events.out.tfevents.*"))
    assert files, f"no event file in {event_dir}"
    return {v.tag for f in files for e in tf.compat.v1.train.summary_iterator(f) for v in e.summary.value}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke config run in two invocations of 12 steps each: the second one resumes and finishes."""
    if not os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST not installed in {FMNIST_DIR} (make data)")
    workdir = str(tmp_path_factory.mktemp("smoke") / "w")
    first = train(workdir, "--config.train.steps_per_run=12")
    # Export settings may change on resume: the run that finishes also exports (config.export).
    second = train(workdir, "--config.train.steps_per_run=12", "--config.export.enabled=True",
                   "--config.export.quantize=none", "--config.export.eval_examples=200")
    return workdir, first, second


def test_finished_run_exports_when_configured(smoke):
    workdir, first, second = smoke
    assert os.path.isfile(os.path.join(workdir, "export", "saved_model", "plain", "1", "saved_model.pb"))
    assert os.path.isfile(os.path.join(workdir, "export", "tflite", "plain_none.tflite"))
    with open(os.path.join(workdir, "export", "report.json")) as f:
        report = json.load(f)
    # The SavedModel and the fp32 .tflite agree with the Keras model on every one of the 200 test images.
    artefacts = report["artefacts"]
    assert artefacts["saved_model"]["top1_agreement"] == 1.0 and artefacts["saved_model"]["max_abs_prob_diff"] < 1e-5
    assert artefacts["tflite_none"]["top1_agreement"] == 1.0
    assert "saved_model" in second.stdout  # the accuracy table is printed


def test_finished_run_keeps_samples_and_its_rerun_writes_no_new_version(smoke, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(smoke[0], workdir)
    stored = wd.read_samples(workdir)  # the export's images, kept so that W exports without the data
    assert stored["calibration_images"].shape == (256, 28, 28, 1) and stored["calibration_images"].dtype == np.uint8
    assert len(stored["test_images"]) == len(stored["test_labels"]) == 1000
    version_dir = os.path.join(workdir, "export", "saved_model", "plain", "1")
    before = listing(version_dir)
    # The same command as the run that finished (`make demo` run twice): same weights, no new version.
    rerun = train(workdir, "--config.train.steps_per_run=12", "--config.export.enabled=True",
                  "--config.export.quantize=none", "--config.export.eval_examples=200")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "saved_model: version 1 already holds these weights" in rerun.stdout and "up to date" in rerun.stdout
    assert os.listdir(os.path.dirname(version_dir)) == ["1"] and listing(version_dir) == before


def test_make_demo_passes_fmnist_dir_to_train_py():
    made = subprocess.run(["make", "-n", "demo", "FMNIST_DIR=/data/elsewhere"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    command = next(line for line in made.stdout.replace("\\\n", "").splitlines() if "train.py" in line)
    assert '--config.data.data_dir="/data/elsewhere"' in command and "--config=configs/fashion_mnist.py:demo" in command


def test_bad_export_option_fails_before_training(tmp_path):
    proc = train(str(tmp_path / "w"), "--config.export.enabled=True", "--config.export.quantize=int4")
    assert proc.returncode == 1
    assert "config.export" in proc.stderr and "quantize='int4'" in proc.stderr
    assert not os.path.exists(tmp_path / "w")


def test_smoke_run_writes_the_workdir(smoke):
    workdir, first, second = smoke
    for proc in (first, second):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("config.json", "metrics.jsonl", "plain.keras", "resnet.keras", "checkpoints/checkpoint"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    assert config["model"]["arch"] == "resnet8" and config["dataset"]["image_shape"] == [28, 28, 1]
    assert config["run"]["steps_per_epoch"] == 12 and config["run"]["total_steps"] == 24
    assert {"plain_ce", "hybrid_ce_1", "hybrid_ce_2", "kd_1", "teacher_ce", "total", "lr", "blend"} <= tags(
        os.path.join(workdir, "tensorboard", "train"))
    assert {"plain_acc", "teacher_acc", "hybrid_acc_stage1", "hybrid_acc_stage2", "loss"} <= tags(
        os.path.join(workdir, "tensorboard", "eval"))
    final_line = next(line for line in second.stdout.splitlines() if line.startswith('{"final"'))
    final = json.loads(final_line)["final"]
    assert final["step"] == 24 and len(final["hybrid_acc"]) == 2


def test_second_invocation_resumes(smoke):
    workdir, first, second = smoke
    assert "stopped at step 12 of 24" in first.stdout
    assert "resumed from step 12" in second.stdout and "resumed" not in first.stdout
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [12, 24] and [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert REQUIRED_METRICS <= set(r), REQUIRED_METRICS - set(r)
        assert len(r["hybrid_acc"]) == 2 and 0 <= r["plain_acc"] <= 1
    assert records[1]["blend"] < records[0]["blend"]  # the schedule continued from the restored step


def test_plain_keras_is_the_plain_net_alone(smoke):
    workdir, _, _ = smoke
    model = keras.saving.load_model(os.path.join(workdir, "plain.keras"), compile=False)
    reference = architectures.build("resnet8", shortcuts="none", num_classes=10, input_shape=(28, 28, 1),
                                    width=0.25)
    assert model.name == reference.name == "plain8"

    def signature(m):
        return [(w.path, tuple(w.shape)) for w in m.weights]

    assert signature(model) == signature(reference)
    assert not [w.path for w in model.weights if "_proj_" in w.path]
    resnet = keras.saving.load_model(os.path.join(workdir, "resnet.keras"), compile=False)
    assert len(resnet.weights) > len(model.weights)


def test_changed_config_is_refused_and_workdir_untouched(smoke):
    workdir, _, _ = smoke
    before = listing(workdir)
    proc = train(workdir, "--config.train.lr=0.2", "--config.train.log_every_steps=3")
    assert proc.returncode != 0
    assert "train.lr: 0.1 in the workdir, 0.2 now" in proc.stderr  # the override reached the config
    assert "log_every_steps" not in proc.stderr.split("Keys that may change")[0]  # whitelisted
    assert listing(workdir) == before


def test_unknown_config_key_fails_from_any_cwd(tmp_path):
    proc = train(str(tmp_path / "w"), "--config.nonexistent=1", cwd=str(tmp_path),
                 config=os.path.join(ROOT, "configs", "fashion_mnist.py:smoke"))
    assert proc.returncode != 0 and "nonexistent" in proc.stderr
    assert not os.path.exists(tmp_path / "w")


def test_transfer_from_on_the_command_line_reaches_the_trainer(tmp_path):
    """`from` is a Python keyword, so train.py takes --config.transfer.from off the command line itself; the
    value must survive app.run, which hands the parser sys.argv itself."""
    missing = str(tmp_path / "no_such_source")
    proc = train(str(tmp_path / "w"), f"--config.transfer.from={missing}", config="configs/transfer.py:smoke")
    assert proc.returncode == 1
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and missing in error[0], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load_and_validate(name):
    for arg in (None, "smoke", *(("demo",) if name == "fashion_mnist" else ())):
        config = load_config(name, arg)
        train_lib.validate(config)
    assert load_config(name, "smoke").model.arch in ("resnet8", "resnet18")
    with pytest.raises(ValueError, match="bogus"):
        load_config(name, "bogus")


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_default_to_the_chosen_recipe(name):
    """Every config's default: a frozen pretrained teacher, Dirac convs near identity, m(t) = 1, KD on the
    plain logits, the rescaled entry into the teacher's tails and the student's gradient clipped at 3x its
    running norm (the recipe chosen on validation at depths 20, 56 and 110); its own ResNet trained first
    unless a teacher is named, and unclipped."""
    config = load_config(name)
    d = config.distill
    assert (config.teacher.mode, config.model.dirac, config.model.dirac_beta, d.blend_floor, d.logit_kd_alpha,
            d.hybrid_points, d.hybrid_entry, d.global_clipnorm, d.relative_clipnorm) == (
        "pretrained", True, 0.1, 1.0, 1.0, "stages", "rescale", 0.0, 3.0)
    if name == "imagenet":
        assert config.teacher.path == "keras.applications.ResNet50" and config.data.normalization == "caffe"
    else:
        assert train_lib.trains_its_teacher(config)
    smoke = load_config(name, "smoke")  # one phase, plain convs: a smoke run checks plumbing in seconds
    assert (smoke.teacher.mode, smoke.model.dirac, smoke.distill.logit_kd_alpha) == ("joint", False, 0.0)


def test_dirac_convs_belong_to_the_plain_student_only():
    from rd_keras.dirac import DiracConv2D

    for mode, expected in (("all", False), ("none", True)):
        config = synthetic_config(**{"train.mode": "supervised", "model.supervised_shortcuts": mode,
                                     "model.dirac": True})
        setup = train_lib.build_setup(config, data.DatasetInfo(10, (16, 16, 3), 64, 16, (0.5,) * 3, (0.25,) * 3),
                                      tf.distribute.get_strategy(), 2)
        (net,) = setup.trained.values()
        assert any(isinstance(layer, DiracConv2D) for layer in net.layers) is expected, mode


# ----------------------------------------------------------------------------- in-process runs


def synthetic_config(**overrides):
    config = load_config("fashion_mnist", "smoke")
    config.data.update(source="synthetic", name="synthetic", image_size=16, channels=3, synthetic_examples=128,
                       train_subset=0, eval_subset=0, augment="none")
    config.train.progress = False
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.mark.parametrize("key, value, message", [
    ("train.nan_policy", "maybe", "'maybe'"),
    ("model.arch", "resnet9", "6n\\+2"),
    ("teacher.joint_update", "later", "'later'"),
    ("distill.global_clipnorm", -1.0, "distill.global_clipnorm must be a number .*got -1.0"),
    ("distill.relative_clipnorm", 0.5, r"distill.relative_clipnorm must be 0 \(off\) or > 1: .*got 0.5"),
])
def test_bad_config_fails_before_touching_the_workdir(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        train_lib.run(synthetic_config(**{key: value}), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_missing_teacher_path_is_named(tmp_path):
    config = synthetic_config(**{"teacher.mode": "pretrained", "teacher.path": str(tmp_path / "nope")})
    with pytest.raises(teacher.TeacherError, match="nope"):
        train_lib.run(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_teacher_from_keras_file_and_checkpoint_agree(tmp_path):
    source = str(tmp_path / "resnet_run")
    config = synthetic_config(**{"train.mode": "supervised"})
    train_lib.run(config, source)
    kw = dict(model_config=config.model, num_classes=10, input_shape=(16, 16, 3))
    from_file = teacher.load(teacher.resolve(source), **kw)
    prefix = os.path.join(source, wd.CHECKPOINT_DIR, "ckpt-8")  # the last one: same weights
    from_checkpoint = teacher.load(teacher.resolve(prefix), **kw)
    for a, b in zip(from_file.weights, from_checkpoint.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    os.remove(os.path.join(source, wd.RESNET_FILE))  # now it looks like an unfinished run
    assert teacher.resolve(source) == teacher.TeacherSource(
        "checkpoint", prefix, os.path.join(source, wd.CONFIG_FILE))
    config.model.width = 0.5
    with pytest.raises(teacher.TeacherError, match=r"width: 0.25 vs 0.5"):
        teacher.load(teacher.resolve(prefix), **kw)


def test_nan_stop_names_step_and_term_and_keeps_finite_checkpoints(tmp_path):
    workdir = str(tmp_path / "w")
    config = synthetic_config(**{"train.lr": 1e30, "train.checkpoint_every_steps": 1,
                                 "train.log_every_steps": 1})
    with pytest.raises(loop.NonFiniteLossError, match=r"Non-finite (loss|weights) at step \d+") as err:
        train_lib.run(config, workdir)
    assert "nan_policy" in str(err.value)
    latest = tf.train.latest_checkpoint(os.path.join(workdir, wd.CHECKPOINT_DIR))
    if latest:  # the last checkpoint written before the failure holds only finite numbers
        reader = tf.train.load_checkpoint(latest)
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.isfinite(value).all(), name
    assert not os.path.exists(os.path.join(workdir, wd.PLAIN_FILE))


def test_sigterm_checkpoints_then_exits(tmp_path, monkeypatch):
    workdir = str(tmp_path / "w")
    flush = loop.TrainLoop._flush
    sent = []

    def flush_then_sigterm(self):
        flush(self)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop.TrainLoop, "_flush", flush_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        train_lib.run(synthetic_config(**{"train.checkpoint_every_steps": 1000}), workdir)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous
    latest = tf.train.latest_checkpoint(os.path.join(workdir, wd.CHECKPOINT_DIR))
    assert latest and re.search(r"ckpt-(\d+)$", latest).group(1) == "4"  # the first log point of smoke
