"""The run directory: every path inside it, config.json (and the check that a rerun uses the same config),
metrics.jsonl trimming, and the one atomic writer. Nothing else spells these names.

Layout of a workdir `W`:

    W/config.json          the resolved config, plus "dataset" (DatasetInfo) and "run" (derived numbers)
    W/checkpoints/         tf.train.CheckpointManager files, numbered by global step (checkpointing.py)
    W/tensorboard/{train,eval}/
    W/metrics.jsonl        one JSON object per evaluation
    W/plain.keras          the plain net alone; W/resnet.keras the ResNet when one was trained
    W/samples.npz          a fixed sample of calibration and test images (rd_keras.samples), so that the
                           export needs no data directory
    W/export/              saved_model/<model_name>/<version>/, tflite/plain_<quant>.tflite,
                           tflite/labels.txt, report.json
    W/bench_run.json       written by `python -m rd_keras.bench accuracy` when the run finished
    W/teacher/             a workdir of its own: the ResNet that `teacher.mode=pretrained` with no
                           `teacher.path` trains first (phase 1 of the two-phase recipe)

A process may be killed at any instruction, so every file a resumed run relies on is replaced atomically
(written aside, then renamed: `write_atomic`, `save_model_atomic`, `publish_dir`): config.json, the
checkpoints (tf.train.CheckpointManager writes them aside and then rewrites its `checkpoint` index
atomically), plain.keras and resnet.keras, the export. metrics.jsonl is appended to, and trimmed back to
the restored checkpoint when a run starts (`trim_metrics`).
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess

import numpy as np

from rd_keras.errors import WorkdirError  # noqa: F401  (raised here, caught by train.py as an RDError)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLAIN_FILE = "plain.keras"
RESNET_FILE = "resnet.keras"
EXPORT_DIR = "export"
SAVED_MODEL_DIR = "saved_model"  # under EXPORT_DIR: <model_name>/<version>/
TFLITE_DIR = "tflite"  # under EXPORT_DIR
REPORT_FILE = "report.json"  # under EXPORT_DIR
LABELS_FILE = "labels.txt"  # under EXPORT_DIR/TFLITE_DIR: one class name a line, beside the .tflite files
SAMPLES_FILE = "samples.npz"
# The arrays of SAMPLES_FILE: uint8 images [n, H, W, C], int32 labels [n], the class names.
SAMPLE_ARRAYS = ("calibration_images", "test_images", "test_labels", "label_names")
TEACHER_DIR = "teacher"  # the phase-1 teacher run of the two-phase pretrained recipe
BENCH_RUN_FILE = "bench_run.json"  # `bench accuracy` marks a finished run with it (its DONE_FILE)
# Top-level sections of config.json that are derived from the config, not part of it.
DERIVED_SECTIONS = ("dataset", "run")
# Keys of config.json renamed since some runs recorded them: {old dotted key: its name now}.
RENAMED_KEYS = {"train.global_clipnorm": "distill.global_clipnorm"}
# Keys a rerun may change without starting a new workdir: they affect bookkeeping or speed, not results.
RESUME_MUTABLE_KEYS = frozenset({
    "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints", "train.steps_per_run",
    "train.progress", "train.strategy", "train.jit_compile", "data.data_dir", "data.manual_dir", "data.cache",
    # What happens after training does not change the training itself.
    "export.enabled", "export.formats", "export.quantize", "export.qat_steps", "export.model_name",
    "export.eval_examples",
})


# --- paths ---------------------------------------------------------------------------------------------

def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS_FILE)


def tensorboard_dir(workdir: str, name: str = "") -> str:
    """`W/tensorboard`, or `W/tensorboard/<name>` (`train`, `eval`)."""
    return os.path.join(workdir, TENSORBOARD_DIR, name) if name else os.path.join(workdir, TENSORBOARD_DIR)


def plain_path(workdir: str) -> str:
    return os.path.join(workdir, PLAIN_FILE)


def resnet_path(workdir: str) -> str:
    return os.path.join(workdir, RESNET_FILE)


def teacher_dir(workdir: str) -> str:
    return os.path.join(workdir, TEACHER_DIR)


def export_dir(workdir: str) -> str:
    return os.path.join(workdir, EXPORT_DIR)


def saved_model_dir(workdir: str, model_name: str) -> str:
    return os.path.join(workdir, EXPORT_DIR, SAVED_MODEL_DIR, model_name)


def tflite_dir(workdir: str) -> str:
    return os.path.join(workdir, EXPORT_DIR, TFLITE_DIR)


def tflite_path(workdir: str, quantize: str) -> str:
    """`W/export/tflite/plain_<quantize>.tflite` (`none`, `fp16`, `dynamic`, `int8`, `qat`)."""
    return os.path.join(tflite_dir(workdir), f"plain_{quantize}.tflite")


def report_path(workdir: str) -> str:
    return os.path.join(workdir, EXPORT_DIR, REPORT_FILE)


def labels_path(workdir: str) -> str:
    return os.path.join(tflite_dir(workdir), LABELS_FILE)


def samples_path(workdir: str) -> str:
    return os.path.join(workdir, SAMPLES_FILE)


def saved_model_file(workdir: str, names=(PLAIN_FILE, RESNET_FILE)):
    """The path of the first of `names` that `workdir` holds (a finished run's saved nets), or None."""
    for name in names:
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            return path
    return None


# --- the atomic writer ---------------------------------------------------------------------------------

def write_atomic(path: str, payload) -> None:
    """Writes `payload` (bytes or str) to `path` through a temporary file renamed over it: readers see the
    old file or the new one, never a partial write. Parent directories are created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    data = payload.encode() if isinstance(payload, str) else payload
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_model_atomic(model, path: str) -> None:
    """`model.save(path)` through a temporary file renamed over `path`: a kill never leaves a torn file."""
    partial = path[:-len(".keras")] + ".partial.keras"  # keras insists on the .keras suffix
    model.save(partial)
    os.replace(partial, path)


def publish_dir(tmp_dir: str, target: str) -> None:
    """Renames the complete directory `tmp_dir` to `target`, which must not exist (never replaced: an
    OSError with EEXIST or ENOTEMPTY says another writer got there first)."""
    os.rename(tmp_dir, target)


# --- the stored samples ---------------------------------------------------------------------------------

def write_samples(workdir: str, **arrays) -> None:
    """Writes SAMPLES_FILE atomically from the arrays named in SAMPLE_ARRAYS (all of them)."""
    if sorted(arrays) != sorted(SAMPLE_ARRAYS):
        raise ValueError(f"{SAMPLES_FILE} holds exactly {SAMPLE_ARRAYS}. Received: {sorted(arrays)}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_atomic(samples_path(workdir), buffer.getvalue())


def read_samples(workdir: str):
    """{name: array} of SAMPLES_FILE, or None for a workdir without one (trained before it existed)."""
    path = samples_path(workdir)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in SAMPLE_ARRAYS}
    except (OSError, KeyError, ValueError) as e:
        raise WorkdirError(f"{path}: unreadable ({e}). Delete it to export from the data directory.") from None
    return arrays


# --- config.json and metrics.jsonl ---------------------------------------------------------------------

def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json_tree(config):
    # Through JSON, as config.json went: tuples become lists, so equal configs compare equal.
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(tree))


def flat_config(config) -> dict:
    """{dotted key: value} of a ConfigDict or of config.json's dict, as config.json stores the values,
    without the derived sections."""
    return _flatten({k: v for k, v in _json_tree(config).items() if k not in DERIVED_SECTIONS})


def config_diff(old: dict, new) -> dict:
    """{key: (old, new)} for every dotted key whose value differs, ignoring the derived sections."""
    flat_old, flat_new = flat_config(old), flat_config(new)
    absent = "<absent>"
    keys = sorted(set(flat_old) | set(flat_new))
    pairs = {k: (flat_old.get(k, absent), flat_new.get(k, absent)) for k in keys}
    return {k: (a, b) for k, (a, b) in pairs.items() if a != b}


def check_workdir(workdir: str, config) -> bool:
    """Raises WorkdirError if `workdir` holds a run with another config; returns True if it holds one
    with this config (a resume). Reads only: nothing is created or written."""
    path = config_path(workdir)
    if not os.path.exists(path):
        if os.path.isdir(checkpoint_dir(workdir)):
            raise WorkdirError(f"{workdir!r} has {CHECKPOINT_DIR}/ but no {CONFIG_FILE}: not a workdir this "
                               "code can resume. Use a new --workdir.")
        return False
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WorkdirError(f"{path}: unreadable ({e}). Use a new --workdir.") from None
    diff = {k: v for k, v in config_diff(old, config).items() if k not in RESUME_MUTABLE_KEYS}
    if diff:
        lines = "\n".join(f"  {k}: {a!r} in the workdir, {b!r} now" for k, (a, b) in diff.items())
        raise WorkdirError(f"{workdir!r} holds a run with a different config:\n{lines}\n"
                           "Resuming it would mix two experiments. Use a new --workdir (or the old config). "
                           f"Keys that may change on resume: {sorted(RESUME_MUTABLE_KEYS)}.")
    return True


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The code that is running: `git describe --always --dirty` of the checkout rd_keras is imported
    from, else the installed package version. Read once per process (train_lib.run asks first thing), so
    that an edit to the checkout while a run trains is not taken for the code it runs."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    try:
        described = subprocess.run(["git", "-C", package_dir, "describe", "--always", "--dirty", "--abbrev=12"],
                                   capture_output=True, text=True, timeout=10)
        if described.returncode == 0 and described.stdout.strip():
            return "git:" + described.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import rd_keras

    return "rd_keras " + getattr(rd_keras, "__version__", "unknown")


def code_versions(workdir: str) -> list:
    """Every code version that trained part of the run in `workdir` (resumes may add one), oldest first;
    [] for a run from before versions were recorded."""
    try:
        with open(config_path(workdir)) as f:
            return list(json.load(f).get("run", {}).get("code_versions", []))
    except (OSError, json.JSONDecodeError):
        return []


def write_config(workdir: str, config, **derived):
    """Writes config.json atomically: the config, plus the derived sections (`dataset`, `run`). The `run`
    section also lists the code versions that trained it (`code_versions`, this one last)."""
    unknown = set(derived) - set(DERIVED_SECTIONS)
    if unknown:
        raise ValueError(f"Derived sections must be among {DERIVED_SECTIONS}, got {sorted(unknown)}.")
    versions = code_versions(workdir)
    if not versions or versions[-1] != code_version():
        versions.append(code_version())
    derived = {**derived, "run": {**derived.get("run", {}), "code_versions": versions}}
    tree = {**_json_tree(config), **json.loads(json.dumps(derived))}
    write_atomic(config_path(workdir), json.dumps(tree, indent=2, sort_keys=True))


def trim_metrics(workdir: str, step: int) -> int:
    """Keeps the records of metrics.jsonl up to `step` (the restored one) and drops any line a kill left
    half-written, so that the records match the checkpoint and a resumed run writes no duplicates.
    Returns how many lines were dropped."""
    path = metrics_path(workdir)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if len(kept) < len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
