"""Faults a long run must survive: kills (SIGKILL, SIGTERM), NaN losses, bad input; plus property-based
checks of the preprocessing and of the dev server's JSON request decoding.

Training runs use the Fashion-MNIST smoke config on small synthetic (or written-here IDX) data. The
process-level tests start train.py as users do; the others call `train_lib.run` in this process, which
builds every object afresh, restores from disk and re-seeds, exactly as a new process would.
docs/reliability.md maps each guarantee to its test here.
"""

import base64
import glob
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rd_keras.configs import fashion_mnist
from rd_keras import data, loop, teacher, train_lib
from rd_keras import workdir as wd
from rd_keras_serving import json_codec
from rd_keras_serving.registry import RequestError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No network and no GPU for the child processes (tfds would otherwise retry the network for minutes).
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "TFDS_DATA_DIR": "/nonexistent",
       "NO_GCE_CHECK": "true", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
# 256 synthetic 16x16 RGB images, batch 32: 8 steps per epoch, augmented (so exact resume must also
# reproduce the augmentation), with checkpoints every 3 steps, i.e. mostly in the middle of an epoch.
SYNTHETIC = {"data.source": "synthetic", "data.name": "synthetic", "data.image_size": 16, "data.channels": 3,
             "data.synthetic_examples": 256, "data.train_subset": 0, "data.eval_subset": 0,
             "data.augment": "cifar", "train.progress": False, "train.checkpoint_every_steps": 3}
STEPS_PER_EPOCH = 8


def smoke_config(**overrides):
    """configs/fashion_mnist.py:smoke with `SYNTHETIC`, then `overrides` ({"train.lr": 0.1, ...})."""
    config = fashion_mnist.get_config("smoke")
    for key, value in {**SYNTHETIC, **overrides}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def flags_for(overrides):
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def train_cmd(workdir, overrides):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/fashion_mnist.py:smoke",
            f"--workdir={workdir}", *flags_for({**SYNTHETIC, **overrides})]


def listing(path):
    """Every file and folder under `path` with its mtime and size: equal listings = untouched."""
    return sorted((os.path.relpath(p, path), os.stat(p).st_mtime_ns, os.stat(p).st_size)
                  for p in glob.glob(os.path.join(path, "**"), recursive=True))


def latest_step(workdir):
    latest = tf.train.latest_checkpoint(os.path.join(workdir, wd.CHECKPOINT_DIR))
    return int(re.search(r"ckpt-(\d+)$", latest).group(1)) if latest else None


def checkpoint_values(prefix):
    """Every value of the training state in a checkpoint (not the checkpoint's own bookkeeping)."""
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name not in ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")}


def model_weights(path):
    return [w.numpy() for w in keras.saving.load_model(path, compile=False).weights]


def assert_bitwise_equal(a, b, what):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{what}: tensor {i} differs"


@pytest.fixture
def deterministic():
    """Lets a test turn on op determinism (train.deterministic=True) and turns it off afterwards."""
    yield
    from tensorflow.python.framework import config as tf_config  # the public API can only turn it on

    tf_config.disable_op_determinism()


# ----------------------------------------------------------------------------- exact resume


def test_any_pass_position_is_rebuilt_exactly():
    passes, _, _ = data.pipelines(smoke_config())

    def images(ds):
        return [x.numpy() for x, _ in ds]

    full = images(passes.one_pass(1))
    assert len(full) == STEPS_PER_EPOCH
    for skip in (1, 5, STEPS_PER_EPOCH - 1):
        assert_bitwise_equal(images(passes.one_pass(1, skip)), full[skip:], f"pass 1 from batch {skip}")
    assert not np.array_equal(images(passes.one_pass(0))[0], full[0])  # each pass has its own order
    with pytest.raises(ValueError, match=f"Received: epoch=1, skip_batches={STEPS_PER_EPOCH}"):
        passes.one_pass(1, STEPS_PER_EPOCH)


# The recipe clips at a fixed norm; a relative clip just over the running norm binds on many steps, and its
# running mean is training state too.
@pytest.mark.parametrize("clip", [{}, {"distill.relative_clipnorm": 1.01}], ids=["recipe_clip", "relative_clip"])
def test_resume_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, deterministic, capsys, clip):
    uninterrupted, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    settings = {"train.deterministic": True, **clip}
    train_lib.run(smoke_config(**settings), uninterrupted)
    # Stop 3 steps into the second epoch, then rerun the same command.
    assert train_lib.run(smoke_config(**settings, **{"train.steps_per_run": 11}), resumed) is None
    assert latest_step(resumed) == 11
    train_lib.run(smoke_config(**settings), resumed)
    assert "resumed from step 11 of 16 (1 epochs done, 3 steps into the next)" in capsys.readouterr().out

    for name in (wd.PLAIN_FILE, wd.RESNET_FILE):
        assert_bitwise_equal(model_weights(os.path.join(resumed, name)),
                             model_weights(os.path.join(uninterrupted, name)), name)
    # The whole training state agrees too: optimizer slots and iterations, BN statistics, step, epoch.
    a = checkpoint_values(os.path.join(uninterrupted, wd.CHECKPOINT_DIR, "ckpt-16"))
    b = checkpoint_values(os.path.join(resumed, wd.CHECKPOINT_DIR, "ckpt-16"))
    assert a.keys() == b.keys()
    assert any("plain_optimizer" in k for k in a) and any("resnet_optimizer" in k for k in a)
    assert any("plain_clip/mean_sum" in k for k in a)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    with open(os.path.join(resumed, wd.METRICS_FILE)) as f:
        assert [json.loads(line)["step"] for line in f] == [8, 16]


def test_two_phase_recipe_trains_its_teacher_first_and_resumes_in_either_phase(tmp_path, capsys):
    """teacher.mode=pretrained with no teacher.path: phase 1 trains the ResNet in W/teacher, phase 2
    distils from it; a stop in either phase resumes in that phase."""
    workdir = str(tmp_path / "w")
    recipe = {"teacher.mode": "pretrained", "teacher.path": "", "model.dirac": True, "model.dirac_beta": 0.1}
    assert train_lib.run(smoke_config(**recipe, **{"train.steps_per_run": 5}), workdir) is None
    out = capsys.readouterr().out
    assert "phase 1 of 2" in out and "phase 2 of 2" not in out
    assert latest_step(wd.teacher_dir(workdir)) == 5 and not os.path.exists(wd.config_path(workdir))
    # Finishes phase 1 (11 more steps), then stops phase 2 after 14 of its 16.
    assert train_lib.run(smoke_config(**recipe, **{"train.steps_per_run": 14}), workdir) is None
    out = capsys.readouterr().out
    assert "resumed from step 5 of 16" in out and "phase 2 of 2" in out
    assert os.path.isfile(wd.resnet_path(wd.teacher_dir(workdir))) and latest_step(workdir) == 14
    record = train_lib.run(smoke_config(**recipe), workdir)
    out = capsys.readouterr().out
    assert "phase 1 of 2" not in out and "resumed from step 14 of 16" in out
    assert record is not None and 0 <= record["plain_acc"] <= 1
    assert os.path.isfile(wd.plain_path(workdir)) and not os.path.exists(wd.resnet_path(workdir))
    with open(wd.config_path(wd.teacher_dir(workdir))) as f:
        phase1 = json.load(f)
    assert phase1["train"]["mode"] == "supervised" and phase1["model"]["supervised_shortcuts"] == "all"
    assert phase1["model"]["dirac"] is False and phase1["train"]["seed"] == smoke_config().train.seed
    with open(wd.config_path(workdir)) as f:
        assert json.load(f)["run"]["teacher_workdir"] == wd.teacher_dir(workdir)


def test_metrics_are_trimmed_back_to_the_restored_checkpoint(tmp_path):
    path = tmp_path / wd.METRICS_FILE
    records = [json.dumps({"step": s, "acc": 0.5}) for s in (8, 16, 24)]
    # A kill can leave a record written after the newest checkpoint, and half a line.
    path.write_text("\n".join(records) + '\n{"step": 32, "ac')
    assert wd.trim_metrics(str(tmp_path), 16) == 2
    assert path.read_text() == "\n".join(records[:2]) + "\n"
    assert wd.trim_metrics(str(tmp_path), 16) == 0  # nothing more to drop: file left as is


def test_sigterm_saves_the_current_step_and_the_rerun_resumes_from_it(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    # Long enough to be running when the signal comes; no periodic checkpoints, so the one after the
    # signal can only come from the SIGTERM handler (or an epoch end).
    overrides = {"train.epochs": 50, "train.checkpoint_every_steps": 10_000}
    proc = subprocess.Popen(train_cmd(workdir, overrides), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        while latest_step(workdir) is None and proc.poll() is None:  # training is under way
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    saved = int(re.search(r"SIGTERM: checkpoint saved at step (\d+)", out).group(1))
    assert latest_step(workdir) == saved and saved < 50 * STEPS_PER_EPOCH

    # The same command again (here in this process, to save a TensorFlow start-up), for one step.
    train_lib.run(smoke_config(**overrides, **{"train.steps_per_run": 1}), workdir)
    assert f"resumed from step {saved} of {50 * STEPS_PER_EPOCH}" in capsys.readouterr().out
    assert latest_step(workdir) == saved + 1


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    overrides = {"train.deterministic": True, "train.epochs": 3}
    total = 3 * STEPS_PER_EPOCH
    uninterrupted, killed = str(tmp_path / "a"), str(tmp_path / "b")

    def start(workdir):
        return subprocess.Popen(train_cmd(workdir, overrides), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    reference, victim = start(uninterrupted), start(killed)
    try:
        # SIGKILL as soon as a checkpoint exists in the middle of an epoch after the first one.
        while victim.poll() is None:
            step = latest_step(killed)
            if step and step > STEPS_PER_EPOCH and step % STEPS_PER_EPOCH:
                victim.kill()
                break
            time.sleep(0.02)
        victim.communicate(timeout=300)
        assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
        out_a, err_a = reference.communicate(timeout=600)
    finally:
        reference.kill()
        victim.kill()
    assert reference.returncode == 0, err_a[-3000:]
    step = latest_step(killed)
    assert step % STEPS_PER_EPOCH and step < total

    rerun = subprocess.run(train_cmd(killed, overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {step} of {total}" in rerun.stdout

    def digest(out):
        return re.search(r"final weights sha256=(\w+)", out).group(1)

    assert digest(rerun.stdout) == digest(out_a)
    for name in (wd.PLAIN_FILE, wd.RESNET_FILE):
        assert_bitwise_equal(model_weights(os.path.join(killed, name)),
                             model_weights(os.path.join(uninterrupted, name)), name)

    def evaluations(workdir):  # train-loss means cover only the steps of one process; evaluations all
        with open(os.path.join(workdir, wd.METRICS_FILE)) as f:
            return [{k: r[k] for k in ("step", "acc", "teacher_acc", "hybrid_acc", "loss")}
                    for r in map(json.loads, f)]

    assert evaluations(killed) == evaluations(uninterrupted)


# ----------------------------------------------------------------------------- NaN and Inf

# An absurd learning rate: the first update leaves huge but finite weights (checkpointed at step 1), and
# the losses of step 1 overflow.
EXPLODING = {"train.lr": 1e30, "train.checkpoint_every_steps": 1, "train.log_every_steps": 1}


def test_nan_stop_names_step_and_terms_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "w")
    config = smoke_config(**EXPLODING)
    with pytest.raises(loop.NonFiniteLossError) as err:
        train_lib.run(config, workdir)
    message = str(err.value)
    bad_step = int(re.match(r"Non-finite loss at step (\d+): ", message).group(1))
    assert "plain_ce=nan" in message and "train.nan_policy='stop'" in message
    # The newest checkpoint is the state before the bad step, and finite.
    assert latest_step(workdir) == bad_step
    values = checkpoint_values(os.path.join(workdir, wd.CHECKPOINT_DIR, f"ckpt-{bad_step}"))
    floats = {k: v for k, v in values.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}
    assert floats and all(np.isfinite(v).all() for v in floats.values())
    assert not os.path.exists(os.path.join(workdir, wd.PLAIN_FILE))
    # Rerunning meets the same NaN and stops again, leaving the good checkpoint as it was.
    before = listing(os.path.join(workdir, wd.CHECKPOINT_DIR))
    with pytest.raises(loop.NonFiniteLossError, match=f"Non-finite loss at step {bad_step}: "):
        train_lib.run(config, workdir)
    assert listing(os.path.join(workdir, wd.CHECKPOINT_DIR)) == before


def test_nan_skip_drops_exactly_the_bad_updates_and_finishes(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    record = train_lib.run(smoke_config(**EXPLODING, **{"train.nan_policy": "skip",
                                                       "train.keep_checkpoints": 100}), workdir)
    assert record["step"] == 2 * STEPS_PER_EPOCH
    skipped = [int(s) for s in re.findall(r"step (\d+): update skipped, non-finite \[[^]]*'plain_ce'",
                                          capsys.readouterr().out)]
    assert skipped
    # A skipped step changes nothing but the step counter: no weight, optimizer slot or BN statistic.
    for step in skipped:
        before, after = (checkpoint_values(os.path.join(workdir, wd.CHECKPOINT_DIR, f"ckpt-{s}"))
                         for s in (step, step + 1))
        changed = [k for k in before if not np.array_equal(before[k], after[k])]
        assert all(k.startswith(("step/", "epoch/")) for k in changed), (step, changed)
    for name in (wd.PLAIN_FILE, wd.RESNET_FILE):
        assert all(np.isfinite(w).all() for w in model_weights(os.path.join(workdir, name)))


# ----------------------------------------------------------------------------- bad input


def write_idx_dataset(root, n_train=64, n_test=32):
    """Tiny Fashion-MNIST-style IDX files (28x28, 10 classes)."""
    rng = np.random.default_rng(0)
    os.makedirs(root)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))),
                            ("labels-idx1", rng.integers(0, 10, n))):
            header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(
                d.to_bytes(4, "big") for d in array.shape)
            with open(os.path.join(root, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return str(root)


def idx_overrides(data_dir):
    """A supervised ResNet-8 on the IDX files: a finished workdir, and a pretrained teacher."""
    return {"data.source": "idx", "data.name": "fashion_mnist", "data.data_dir": data_dir,
            "data.train_subset": 0, "data.eval_subset": 0, "data.augment": "none", "train.epochs": 1,
            "train.warmup_epochs": 0.0, "train.mode": "supervised", "train.progress": False}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    data_dir = write_idx_dataset(root / "idx")
    workdir = str(root / "run")
    config = fashion_mnist.get_config("smoke")
    for key, value in idx_overrides(data_dir).items():
        section, name = key.split(".")
        config[section][name] = value
    train_lib.run(config, workdir)
    return workdir, data_dir


def _teacher_of_another_arch(run, data_dir):
    return {"train.mode": "distill", "teacher.mode": "pretrained",
            "teacher.path": os.path.join(run, wd.RESNET_FILE), "model.arch": "resnet20"}


def _teacher_of_another_class_count(run, data_dir):
    # The same images, 5 classes: the checkpointed ResNet has 10 outputs.
    return {"train.mode": "distill", "teacher.mode": "pretrained",
            "teacher.path": os.path.join(run, "checkpoints", "ckpt-2"),
            "data.source": "synthetic", "data.name": "synthetic", "data.image_size": 28, "data.channels": 1,
            "data.num_classes": 5, "data.synthetic_examples": 64}


# (id, overrides given the finished run, target, error, message). target "finished": the bad config is
# the finished run's config with one key changed, run on that workdir (it must stay byte-for-byte and
# mtime-identical); "new": a workdir that must not come into existence.
BAD_INPUT = [
    ("arch_resnet21", lambda run, d: {"model.arch": "resnet21"}, "finished", train_lib.ConfigError,
     r"resnet21.*6n\+2"),
    ("width_0", lambda run, d: {"model.width": 0.0}, "finished", train_lib.ConfigError,
     r"config.model.width must be a number in \(0, inf\], got 0.0"),
    ("batch_size_0", lambda run, d: {"data.batch_size": 0}, "finished", train_lib.ConfigError,
     r"config.data: .*Received: batch_size=0"),
    ("idx_dir_missing", lambda run, d: {"data.data_dir": d + "-moved"}, "finished", data.DataError,
     r"-moved/train-images-idx3-ubyte\[.gz\]: IDX file not found"),
    ("corrupt_config_json", lambda run, d: {}, "finished", wd.WorkdirError,
     r"config.json: unreadable"),
    ("tfds_unknown_name", lambda run, d: {"data.source": "tfds", "data.name": "fashion_mnistt",
                                          "data.data_dir": d}, "new", data.DataError,
     r"Unknown tensorflow-datasets name 'fashion_mnistt'"),
    ("teacher_other_arch", _teacher_of_another_arch, "new", teacher.TeacherError,
     r"teacher .*resnet\.keras: resnet8.*\n  config.model wants resnet20"),
    ("teacher_other_class_count", _teacher_of_another_class_count, "new", teacher.TeacherError,
     r"num_classes: 10 vs 5"),
]


@pytest.mark.parametrize("name, overrides, target, error, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_fails_before_anything_is_written(finished_run, tmp_path, name, overrides, target, error,
                                                    message):
    run, data_dir = finished_run
    config = fashion_mnist.get_config("smoke")
    for key, value in {**idx_overrides(data_dir), **overrides(run, data_dir)}.items():
        section, key_name = key.split(".")
        config[section][key_name] = value
    if target == "finished":
        workdir = run
        if name == "corrupt_config_json":  # e.g. a disk that filled up while another tool wrote it
            workdir = str(tmp_path / "copy")
            subprocess.run(["cp", "-a", run, workdir], check=True)
            with open(os.path.join(workdir, wd.CONFIG_FILE), "r+") as f:
                f.truncate(100)
        before = listing(workdir)
    else:
        workdir = str(tmp_path / "new")
    with pytest.raises(error, match=message):
        train_lib.run(config, workdir)
    if target == "finished":
        assert listing(workdir) == before
    else:
        assert not os.path.exists(workdir)


@pytest.mark.slow
def test_command_line_errors_are_one_line_and_touch_nothing(finished_run, tmp_path):
    """As users see them: exit status 1, one `error: ...` message on stderr, no traceback, workdir as it
    was."""
    run, data_dir = finished_run
    same = flags_for(idx_overrides(data_dir))
    teacher_flags = flags_for({**idx_overrides(data_dir), **_teacher_of_another_arch(run, data_dir)})
    # Other refusals take the same path to stderr (train.py prints every such error as one message).
    cases = {  # name: (flags, workdir, expected text of the error)
        "unknown_key": ([*same, "--config.train.nesterov_momentum=0.9"], run,
                        "config.train.nesterov_momentum does not exist"),
        "bad_variant": (["--config=configs/fashion_mnist.py:smok"], run, "Unknown config variant 'smok'"),
        "idx_dir_missing": ([*same, f"--config.data.data_dir={data_dir}-moved"], run, "IDX file not found"),
        "teacher_other_arch": (teacher_flags, str(tmp_path / "new"), "does not match the config"),
    }
    before = listing(run)
    procs = {name: subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                                     "--config=configs/fashion_mnist.py:smoke", f"--workdir={workdir}", *flags],
                                    cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (flags, workdir, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        # TensorFlow's own C++ start-up lines also go to stderr; ours start with "error:".
        ours = [line for line in err.splitlines() if not re.match(r"(WARNING: All log messages|[IWE]\d{4} )",
                                                                      line)]
        assert proc.returncode == 1 and "Traceback" not in err, (name, err[-2000:])
        # One message: it may go on over a few lines (a config diff lists every key), but only once.
        assert ours and ours[0].startswith("error: "), (name, ours)
        assert sum(line.startswith("error:") for line in ours) == 1, (name, ours)
        assert cases[name][2] in "\n".join(ours), (name, ours)
    assert listing(run) == before
    assert not os.path.exists(tmp_path / "new")


# ----------------------------------------------------------------------------- preprocessing properties


@settings(max_examples=40, deadline=None)
@given(pixels=st.lists(st.integers(0, 255), min_size=1, max_size=24),
       stats=st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.05, 2.0)), min_size=1, max_size=3))
def test_normalize_is_the_documented_affine_map_and_invertible(pixels, stats):
    channels = len(stats)
    mean, std = tuple(m for m, _ in stats), tuple(s for _, s in stats)
    images = np.resize(np.asarray(pixels, np.uint8), (1, len(pixels), 1, channels))
    out = data.normalize(images, mean, std).numpy()
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out, (images / 255.0 - np.asarray(mean)) / np.asarray(std), rtol=1e-5, atol=1e-5)
    # uint8 and the same values as floats give the same result; the map is invertible back to the pixels.
    np.testing.assert_array_equal(data.normalize(images.astype(np.float32), mean, std).numpy(), out)
    restored = np.round((out * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255.0)
    np.testing.assert_array_equal(restored, images)


@settings(max_examples=30, deadline=None)
@given(mean=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=3),
       std=st.lists(st.floats(-1.0, 0.0), min_size=1, max_size=3))
def test_normalize_refuses_bad_statistics_quoting_them(mean, std):
    with pytest.raises(ValueError, match="Received: "):
        data.normalize(np.zeros((1, 2, 2, 1), np.uint8), tuple(mean), tuple(std))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(1, 40), width=st.integers(1, 40), channels=st.sampled_from([1, 3]),
       size=st.integers(1, 32), style=st.sampled_from(data.AUGMENTS), value=st.integers(0, 255))
def test_eval_transform_keeps_a_constant_image_constant(height, width, channels, size, style, value):
    """Any resize or centre crop of a flat image is that flat image at the new size: no borders, offsets
    or overflow, whatever the aspect ratio."""
    image = np.full((height, width, channels), value, np.uint8)
    out = data.eval_transform(image, size, style).numpy()
    assert out.shape == (size, size, channels) and out.dtype == np.uint8
    assert (out == value).all()


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 16), channels=st.sampled_from([1, 3]), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([np.uint8, np.float32]))
def test_eval_transform_passes_images_at_the_target_size_through_untouched(size, channels, seed, dtype):
    images = np.random.default_rng(seed).integers(0, 256, (2, size, size, channels)).astype(dtype)
    for style in ("none", "cifar"):
        out = data.eval_transform(images, size, style).numpy()
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(data.eval_transform(images, None).numpy(), images)


# ----------------------------------------------------------------------------- request decoding properties

SPECS = {
    "uint8_image": {"images": tf.TensorSpec([None, 2, 2], tf.uint8)},
    "float": {"x": tf.TensorSpec([None], tf.float32)},
    "string": {"s": tf.TensorSpec([None], tf.string)},
    "two_inputs": {"a": tf.TensorSpec([None], tf.int64), "b": tf.TensorSpec([None], tf.bool)},
}
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=4))
_json_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["images", "x", "s", "a", "b", "b64", "instances", "inputs",
                                     "signature_name"]), inner, max_size=3)), max_leaves=16)


@settings(max_examples=400, deadline=None)
@given(body=_json_values, spec_name=st.sampled_from(sorted(SPECS)))
def test_any_json_body_decodes_to_the_signature_dtypes_or_is_refused(body, spec_name):
    """Whatever JSON arrives, decoding gives arrays of exactly the signature's dtypes or a RequestError
    (HTTP 400), never another exception (which the server would report as an internal error)."""
    specs = SPECS[spec_name]
    raw = json.dumps(body).encode()
    try:
        _, fmt, payload = json_codec.parse_predict_body(raw)
        arrays = json_codec.decode_inputs(fmt, payload, specs)
    except RequestError as e:
        assert e.message
        return
    assert set(arrays) == set(specs)
    for key, array in arrays.items():
        expected = object if specs[key].dtype == tf.string else specs[key].dtype.as_numpy_dtype
        assert isinstance(array, np.ndarray) and array.dtype == np.dtype(expected), (key, array)


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=64))
def test_any_bytes_as_a_body_are_parsed_or_refused(body):
    try:
        json_codec.parse_predict_body(body)
    except RequestError:
        pass


@pytest.mark.parametrize("depth", [65, 900])
@pytest.mark.parametrize("spec_name", ["string", "float"])
def test_deeply_nested_requests_are_refused_not_crashed(depth, spec_name):
    leaf = '"a"' if spec_name == "string" else "1"
    body = '{"instances": ' + "[" * depth + leaf + "]" * depth + "}"
    with pytest.raises(RequestError):
        _, fmt, payload = json_codec.parse_predict_body(body.encode())
        json_codec.decode_inputs(fmt, payload, SPECS[spec_name])


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.binary(max_size=8), st.text(max_size=8)), min_size=1, max_size=5),
       row=st.booleans())
def test_strings_and_b64_round_trip(values, row):
    """Text travels as JSON strings, bytes as {"b64": ...}; both decode to the same bytes, and bytes that
    are not UTF-8 come back as {"b64": ...}."""
    encoded = [{"b64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v for v in values]
    expected = [v if isinstance(v, bytes) else v.encode() for v in values]
    body = {"instances": encoded} if row else {"inputs": {"s": encoded}}
    _, fmt, payload = json_codec.parse_predict_body(json.dumps(body).encode())
    decoded = json_codec.decode_inputs(fmt, payload, SPECS["string"])["s"]
    assert decoded.tolist() == expected
    reply = json.loads(json.dumps(json_codec.encode_predict_response(fmt, {"s": decoded})))
    returned = reply["predictions"] if row else reply["outputs"]
    assert [base64.b64decode(r["b64"]) if isinstance(r, dict) else r.encode() for r in returned] == expected
