"""`run(config, workdir)`: Residual Distillation, or supervised training of one net, end to end.

`validate` checks the config, `build_setup` builds the nets of `config.train.mode` (`rd_keras.modes`: what
each mode trains, checks and loads) with their optimizers and steps, and `run` trains them. "distill" with
`teacher.mode="pretrained"` and an empty `teacher.path` is the two-phase recipe in one command: phase 1
trains the ResNet alone in `W/teacher/` (a workdir of its own, same data and budget), phase 2 distils from
it. A run interrupted in either phase resumes in that phase.

The workdir layout is in `rd_keras.workdir`. Rerunning the same command resumes from the newest
checkpoint: schedules are functions of the restored global step, so they continue where they stopped, and
the train stream restarts at the batch that step reached (`data.TrainPasses`), so with
`train.deterministic=True` an interrupted and resumed run ends with the same weights as an uninterrupted one.
"""

import copy
import dataclasses
import os

import keras
import tensorflow as tf

from rd_keras import architectures, channels, checkpointing, clipping, data, losses, schedules, steps
from rd_keras import workdir as wd
from rd_keras.errors import ConfigError, require, require_choice, require_number
from rd_keras.loop import TrainLoop
from rd_keras.modes import MODES, STUDENT_INITS, TRAIN_MODES, Context

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # bfloat16 needs no loss scaling
NAN_POLICIES = ("stop", "skip")


def validate(config):
    """Checks every value `run` uses, quoting the bad one; touches no file."""
    t, m, d = config.train, config.model, config.distill
    try:
        data.check_config(config.data)
    except ValueError as e:
        raise ConfigError(f"config.data: {e}") from None
    require_choice(t.mode, TRAIN_MODES, "train.mode")
    try:
        architectures.get_spec(m.arch)
    except ValueError as e:
        raise ConfigError(f"config.model.arch: {e}") from None
    require_number(m.width, "model.width", 0, low_open=True)
    require_number(m.dirac_beta, "model.dirac_beta", 0, low_open=True)
    require_choice(m.stem, ("", *architectures.STEMS), "model.stem")
    require_choice(m.student_shortcuts, ("none", "downsample"), "model.student_shortcuts")
    require_choice(m.supervised_shortcuts, architectures.SHORTCUT_MODES, "model.supervised_shortcuts")
    require_choice(m.student_init, STUDENT_INITS, "model.student_init")
    require_choice(t.strategy, STRATEGIES, "train.strategy")
    require_choice(t.precision, PRECISIONS, "train.precision")
    require_choice(t.nan_policy, NAN_POLICIES, "train.nan_policy")
    require_number(t.epochs, "train.epochs", 1, integer=True)
    require_number(t.lr, "train.lr", 0, low_open=True)
    require_number(t.momentum, "train.momentum", 0, 1)
    require_number(t.weight_decay, "train.weight_decay", 0)
    require_number(t.warmup_epochs, "train.warmup_epochs", 0)
    require(t.warmup_epochs < t.epochs, f"config.train.warmup_epochs={t.warmup_epochs!r} must be less than "
           f"train.epochs={t.epochs!r}.")
    require_number(t.seed, "train.seed", 0, integer=True)
    for key, value in (("model.dirac", m.dirac), ("train.nesterov", t.nesterov), ("train.progress", t.progress),
                       ("train.deterministic", t.deterministic), ("train.jit_compile", t.jit_compile),
                       ("train.grad_norms", t.grad_norms), ("distill.normalize", d.normalize)):
        require(isinstance(value, bool), f"config.{key} must be True or False, got {value!r}.")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        require_number(t[key], f"train.{key}", 1, integer=True)
    require_number(t.steps_per_run, "train.steps_per_run", 0, integer=True)
    require(isinstance(config.export.enabled, bool),
           f"config.export.enabled must be True or False, got {config.export.enabled!r}.")
    if config.export.enabled:
        from rd_keras import export  # deployment is imported only by runs that export

        e = config.export
        try:
            export.parse_options(e.formats, e.quantize, model_name=e.model_name, qat_steps=e.qat_steps,
                                 eval_examples=e.eval_examples)
        except ValueError as err:
            raise ConfigError(f"config.export: {err}") from None
    MODES[t.mode].check(config)


def make_strategy(name):
    """'auto': MultiWorkerMirrored when TF_CONFIG is set, Mirrored on several GPUs, else the default."""
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            name = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    return {"default": tf.distribute.get_strategy, "mirrored": tf.distribute.MirroredStrategy,
            "multi_worker": tf.distribute.MultiWorkerMirroredStrategy}[name]()


@dataclasses.dataclass
class Setup:
    """Everything the loop drives: trained models by role ("plain", "resnet"), the RD teacher (None when
    supervised), steps and checkpointed state."""

    trained: dict
    teacher: object
    train_step: object
    eval_step: object
    checkpoint_objects: dict
    step: tf.Variable
    epoch: tf.Variable
    hybrid_points: tuple = ()  # layer names where the hybrid paths start (distillation only)


def _optimizer(config, lr_fn):
    opt = keras.optimizers.SGD(learning_rate=lr_fn, momentum=config.train.momentum,
                               nesterov=config.train.nesterov)
    if config.train.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


# Keys that weigh the hybrid paths only: with distill.hybrid_points="none" (KD alone) they change nothing.
_HYBRID_PATH_KEYS = ("distill.blend_epochs", "distill.blend_floor", "distill.kd_alpha", "distill.normalize",
                     "distill.hybrid_entry")


def training_settings(config) -> dict:
    """{dotted key: value} of the settings that decide what `config` (a ConfigDict, or config.json's dict)
    trains: the sections its mode reads, less the keys a resume may change, the Dirac keys of a ResNet
    trained alone (`Context.net` gives it plain convs) and the hybrid-path weights of a run without hybrid
    paths. Two configs with equal settings train the same run: the benchmarks reuse a finished run on that
    ground, whatever defaults the keys it leaves out have."""
    flat = wd.flat_config(config)
    mode = flat["train.mode"]
    unused = set(wd.RESUME_MUTABLE_KEYS)
    if mode == "supervised" and flat.get("model.supervised_shortcuts") == "all":
        unused |= {"model.dirac", "model.dirac_beta"}
    if mode == "distill" and flat.get("distill.hybrid_points") == "none":
        unused |= set(_HYBRID_PATH_KEYS)
    return {key: value for key, value in flat.items() if key.split(".")[0] in MODES[mode].reads and key not in unused}


def build_setup(config, info, strategy, steps_per_epoch, teacher_source=None, transfer_source=None, fresh=True):
    """Models (by the builder of `config.train.mode`, `MODES[...].build`), optimizers (built, so their slots exist
    before the first distributed step) and steps. Call inside `strategy.scope()`. `transfer_source` is the
    loaded net of `transfer.from`; `fresh` says that no checkpoint will be restored, so initial weights are
    copied (a resumed run gets them from its checkpoint)."""
    t = config.train
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    warmup_steps = int(t.warmup_epochs * steps_per_epoch)

    def lr_fn(s=step):  # keras calls it without arguments: the current global step
        return schedules.warmup_cosine_lr(s, base_lr=t.lr, warmup_steps=warmup_steps,
                                          total_steps=t.epochs * steps_per_epoch)

    loss_cfg = losses.LossConfig(global_batch_size=config.data.batch_size, weight_decay=t.weight_decay,
                                 temperature=config.distill.temperature, kd_alpha=config.distill.kd_alpha,
                                 logit_kd_alpha=config.distill.logit_kd_alpha,
                                 normalize=config.distill.normalize)
    nets = MODES[t.mode].build(Context(config, info, strategy, steps_per_epoch, step, loss_cfg, teacher_source,
                                 transfer_source, fresh))
    extras = {"lr": lr_fn, **nets.extras}
    trained = nets.trained
    # One optimizer per trained net: each applies only its own net's gradients. Only the distilled plain
    # student is clipped: a teacher (joint, or the recipe's first phase) trains as the ResNet alone does.
    d = config.distill
    clip = (clipping.NormClip(d.global_clipnorm, d.relative_clipnorm, name="plain_clip")
            if t.mode == "distill" and (d.global_clipnorm or d.relative_clipnorm) else None)
    if clip is not None:
        extras.update(clip.metrics("plain"))
    updates = [steps.Update(objective, _optimizer(config, lr_fn), model.trainable_variables,
                            clip if role == "plain" else None)
               for objective, (role, model) in zip(nets.objectives, trained.items())]
    for u in updates:
        u.optimizer.build(u.variables)
    train_step = steps.build_train_step(
        strategy, nets.loss_fn, updates, step=step, nan_skip=t.nan_policy == "skip", jit_compile=t.jit_compile,
        state_variables=[v for model in trained.values() for v in model.non_trainable_variables],
        extras_fn=lambda s: {k: f(s) for k, f in extras.items()},
        grad_norms=steps.GradNorms(nets.diagnosed.trainable_variables, nets.diagnosed_terms)
        if t.grad_norms else None)
    objects = {"step": step, "epoch": epoch, **trained,
               **{f"{role}_optimizer": u.optimizer for role, u in zip(trained, updates)},
               **({"plain_clip": clip} if clip is not None else {})}
    return Setup(trained, nets.teacher, train_step, eval_step=nets.eval_step, checkpoint_objects=objects,
                 step=step, epoch=epoch, hybrid_points=nets.hybrid_points)


def _distribute(strategy, ds):
    # Shard by example: the in-memory sources have no files to shard by.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(ds.with_options(options))


def teacher_phase_config(config):
    """The config of phase 1 of the two-phase recipe: the ResNet twin of `config`'s student trained alone
    (supervised, all shortcuts, no Dirac convs, no export), with the same data, budget and seed."""
    phase = copy.deepcopy(config)
    phase.train.mode = "supervised"
    phase.model.supervised_shortcuts = "all"
    phase.model.dirac = False
    phase.export.enabled = False
    return phase


def trains_its_teacher(config) -> bool:
    """Whether `config` is the two-phase recipe: a pretrained teacher with no `teacher.path`."""
    return config.train.mode == "distill" and config.teacher.mode == "pretrained" and not config.teacher.path


def run(config, workdir):
    """Trains as configured; returns the final evaluation dict (None when stopped early by
    `train.steps_per_run` or SIGTERM, after saving a checkpoint)."""
    validate(config)
    channels.adopt(config)  # data.channels from the net the run starts from, before config.json is compared
    resuming = wd.check_workdir(workdir, config)
    teacher_path = config.teacher.path
    if trains_its_teacher(config):
        teacher_path = wd.teacher_dir(workdir)
        phase = teacher_phase_config(config)
        wd.check_workdir(teacher_path, phase)
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow call.
    strategy = make_strategy(config.train.strategy)
    if trains_its_teacher(config) and not wd.saved_model_file(teacher_path, (wd.RESNET_FILE,)):
        print(f"phase 1 of 2: training the teacher ResNet in {teacher_path}", flush=True)
        if _train(phase, teacher_path, strategy) is None:
            return None
        print(f"phase 2 of 2: distilling from {wd.resnet_path(teacher_path)}", flush=True)
    return _train(config, workdir, strategy, teacher_path, resuming)


def _train(config, workdir, strategy, teacher_path="", resuming=None):
    """One training run in `workdir` (a phase of `run`)."""
    if resuming is None:
        resuming = wd.check_workdir(workdir, config)
    teacher_source, transfer_source, derived = MODES[config.train.mode].sources(config, teacher_path)
    fresh = tf.train.latest_checkpoint(wd.checkpoint_dir(workdir)) is None
    replicas = strategy.num_replicas_in_sync
    require(config.data.batch_size % replicas == 0,
           f"config.data.batch_size={config.data.batch_size} must be divisible by the {replicas} replicas.")
    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        passes, eval_ds, info = data.pipelines(config)
    except data.DataError:
        raise
    except ValueError as e:  # a config.data value that does not fit the data (batch size, statistics)
        raise ConfigError(f"config.data: {e}") from None
    steps_per_epoch = passes.batches_per_pass

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.train.precision)
    try:
        with strategy.scope():
            setup = build_setup(config, info, strategy, steps_per_epoch, teacher_source, transfer_source, fresh)
        chief = checkpointing.is_chief(strategy)
        if chief:
            os.makedirs(workdir, exist_ok=True)
            wd.write_config(
                workdir, config, dataset=dataclasses.asdict(info),
                run={"steps_per_epoch": steps_per_epoch, "total_steps": config.train.epochs * steps_per_epoch,
                     "num_replicas": replicas, "strategy": type(strategy).__name__, "resumed": resuming,
                     **derived})
        loop = TrainLoop(config, workdir, setup, strategy=strategy, chief=chief, steps_per_epoch=steps_per_epoch,
                         num_eval_examples=info.eval_examples, eval_split=info.eval_split)
        test_data = None
        if info.eval_split == "validation":
            test_data = _distribute(strategy, data.test_dataset(config, info)[0])

        def train_data(step):  # from global step `step` to the end of its epoch
            return _distribute(strategy, passes.one_pass(step // steps_per_epoch, step % steps_per_epoch))

        record = loop.run(train_data, _distribute(strategy, eval_ds), test_data)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    if record is not None and chief and config.export.enabled and "plain" in setup.trained:
        _export(config, workdir)
    return record


def _export(config, workdir):
    """The same export as `python -m rd_keras.export --workdir=W`, as configured in `config.export`."""
    from rd_keras import export

    e = config.export
    report = export.export_workdir(workdir, formats=e.formats, quantize=e.quantize, qat_steps=e.qat_steps,
                                   model_name=e.model_name, eval_examples=e.eval_examples,
                                   progress=config.train.progress)
    print(export.format_table(report), flush=True)
