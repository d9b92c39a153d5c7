"""The workdir: its file layout, `config.json` (and the check that a rerun uses the same config), and
checkpoints that follow the tf.distribute multi-worker rules (only the chief writes into the workdir).

Layout of a workdir `W`:

    W/config.json          the resolved config, plus "dataset" (DatasetInfo) and "run" (derived numbers)
    W/checkpoints/         tf.train.CheckpointManager files, numbered by global step
    W/tensorboard/{train,eval}/
    W/metrics.jsonl        one JSON object per evaluation
    W/plain.keras          the plain net alone; W/resnet.keras the ResNet when one was trained

A process may be killed at any instruction, so every file a resumed run relies on is replaced atomically
(written aside, then renamed): config.json, the checkpoints (tf.train.CheckpointManager writes them aside
and then rewrites its `checkpoint` index atomically), plain.keras and resnet.keras. metrics.jsonl is
appended to, and trimmed back to the restored checkpoint when a run starts (`trim_metrics`).
"""

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLAIN_FILE = "plain.keras"
RESNET_FILE = "resnet.keras"
# Top-level sections of config.json that are derived from the config, not part of it.
DERIVED_SECTIONS = ("dataset", "run")
# Keys a rerun may change without starting a new workdir: they affect bookkeeping or speed, not results.
RESUME_MUTABLE_KEYS = frozenset({
    "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints", "train.steps_per_run",
    "train.progress", "train.strategy", "train.jit_compile", "data.data_dir", "data.manual_dir", "data.cache",
    # What happens after training does not change the training itself.
    "export.enabled", "export.formats", "export.quantize", "export.qat_steps", "export.model_name",
    "export.eval_examples",
})


class WorkdirError(ValueError):
    """The workdir belongs to a different run (or is not a workdir at all)."""


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


def config_diff(old: dict, new) -> dict:
    """{key: (old, new)} for every dotted key whose value differs, ignoring the derived sections."""
    old = {k: v for k, v in old.items() if k not in DERIVED_SECTIONS}
    flat_old, flat_new = _flatten(old), _flatten(_json_tree(new))
    absent = "<absent>"
    keys = sorted(set(flat_old) | set(flat_new))
    pairs = {k: (flat_old.get(k, absent), flat_new.get(k, absent)) for k in keys}
    return {k: (a, b) for k, (a, b) in pairs.items() if a != b}


def check_workdir(workdir: str, config) -> bool:
    """Raises WorkdirError if `workdir` holds a run with another config; returns True if it holds one
    with this config (a resume). Reads only: nothing is created or written."""
    config_path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(config_path):
        if os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
            raise WorkdirError(f"{workdir!r} has {CHECKPOINT_DIR}/ but no {CONFIG_FILE}: not a workdir this "
                               "code can resume. Use a new --workdir.")
        return False
    try:
        with open(config_path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WorkdirError(f"{config_path}: unreadable ({e}). Use a new --workdir.") from None
    diff = {k: v for k, v in config_diff(old, config).items() if k not in RESUME_MUTABLE_KEYS}
    if diff:
        lines = "\n".join(f"  {k}: {a!r} in the workdir, {b!r} now" for k, (a, b) in diff.items())
        raise WorkdirError(f"{workdir!r} holds a run with a different config:\n{lines}\n"
                           "Resuming it would mix two experiments. Use a new --workdir (or the old config). "
                           f"Keys that may change on resume: {sorted(RESUME_MUTABLE_KEYS)}.")
    return True


def write_config(workdir: str, config, **derived):
    """Writes config.json atomically: the config, plus the derived sections (`dataset`, `run`)."""
    unknown = set(derived) - set(DERIVED_SECTIONS)
    if unknown:
        raise ValueError(f"Derived sections must be among {DERIVED_SECTIONS}, got {sorted(unknown)}.")
    tree = {**_json_tree(config), **json.loads(json.dumps(derived))}
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(tree, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def trim_metrics(workdir: str, step: int) -> int:
    """Keeps the records of metrics.jsonl up to `step` (the restored one) and drops any line a kill left
    half-written, so that the records match the checkpoint and a resumed run writes no duplicates.
    Returns how many lines were dropped."""
    path = os.path.join(workdir, METRICS_FILE)
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
        with open(path + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


def save_model_atomic(model, path: str):
    """`model.save(path)` through a temporary file renamed over `path`: a kill never leaves a torn file."""
    partial = path[:-len(".keras")] + ".partial.keras"  # keras insists on the .keras suffix
    model.save(partial)
    os.replace(partial, path)


def weights_digest(models) -> str:
    """sha256 of the weights of `models` in order: equal digests mean bitwise-equal weights (used to show
    that all workers of a distributed run end with the same model)."""
    digest = hashlib.sha256()
    for model in models:
        for weight in model.weights:
            digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def task_name(strategy) -> str:
    """'chief', 'worker:1', ... in a multi-worker cluster; 'single worker' otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "single worker"
    return f"{resolver.task_type}:{resolver.task_id}"


def is_chief(strategy) -> bool:
    """True on the one worker that writes the workdir: the single worker, `chief`, or worker 0 when the
    cluster has no chief (the rule of the tf.distribute multi-worker guide)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


class Checkpointer:
    """tf.train.CheckpointManager over `objects`. The chief writes `workdir/checkpoints`; other workers
    must take part in every save (it is a collective under MultiWorkerMirroredStrategy) but write to a
    temporary directory, removed by `close()`. All workers restore from the chief's directory."""

    def __init__(self, workdir: str, objects: dict, *, chief: bool, max_to_keep: int):
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.directory = os.path.join(workdir, CHECKPOINT_DIR)
        self._scratch = None if chief else tempfile.mkdtemp(prefix="rd_keras_worker_ckpt_")
        self.manager = tf.train.CheckpointManager(self.checkpoint, self._scratch or self.directory,
                                                  max_to_keep=max_to_keep)

    def latest(self):
        return tf.train.latest_checkpoint(self.directory)

    def restore_latest(self):
        """Restores the newest checkpoint if any; returns its path or None."""
        path = self.latest()
        if path:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        return path

    def save(self, step: int) -> str:
        return self.manager.save(checkpoint_number=step)

    def close(self):
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
