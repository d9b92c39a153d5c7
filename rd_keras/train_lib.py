"""`run(config, workdir)`: Residual Distillation, or supervised training of one net, end to end.

`config.train.mode`:
- "distill": a plain student (`model.student_shortcuts`) learns with hybrid paths through a ResNet teacher
  (`teacher.mode`: "joint" trains it at the same time on its own CE; "pretrained" loads it from
  `teacher.path`, frozen). Saves `plain.keras`, and `resnet.keras` in joint mode. "pretrained" with an
  empty `teacher.path` is the two-phase recipe in one command: phase 1 trains the ResNet alone in
  `W/teacher/` (a workdir of its own, same data and budget), phase 2 distils from it. A run interrupted in
  either phase resumes in that phase.
- "supervised": one net with `model.supervised_shortcuts` ("all": the ResNet, saved as `resnet.keras`,
  usable later as `teacher.path`; "none"/"downsample": the plain baseline, saved as `plain.keras`).
- "transfer": fine-tune the trained net named by `transfer.from` on this config's data, with a new head
  (`rd_keras.transfer`); saved as `plain.keras` or `resnet.keras`, as the source net was.

Each mode is one entry of `MODES`: its config checks, the sources it loads, and the builder of its nets
(`build_setup` adds the optimizers and the steps, the same for every mode).

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

from rd_keras import (architectures, channels, checkpointing, clipping, data, hybrid, losses, pretrained, schedules,
                      sources, steps, teacher, transfer)
from rd_keras import workdir as wd
from rd_keras.defaults import TEACHER_MODES
from rd_keras.errors import ConfigError, in_range, interval  # noqa: F401
from rd_keras.loop import TrainLoop

STUDENT_INITS = ("random", "teacher")
JOINT_UPDATES = ("together", "teacher_first")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16")
NAN_POLICIES = ("stop", "skip")



def _check(ok, message):
    if not ok:
        raise ConfigError(message)


def _choice(value, allowed, key):
    _check(value in allowed, f"config.{key} must be one of {allowed}, got {value!r}.")


def _number(value, key, low, high=float("inf"), integer=False, low_open=False):
    ok = in_range(value, low, high, kinds=int if integer else (int, float), low_open=low_open)
    _check(ok, f"config.{key} must be {'an integer' if integer else 'a number'} in {interval(low, high, low_open)}, "
           f"got {value!r}.")


def validate(config):
    """Checks every value `run` uses, quoting the bad one; touches no file."""
    t, m, d = config.train, config.model, config.distill
    try:
        data.check_config(config.data)
    except ValueError as e:
        raise ConfigError(f"config.data: {e}") from None
    _choice(t.mode, TRAIN_MODES, "train.mode")
    try:
        architectures.get_spec(m.arch)
    except ValueError as e:
        raise ConfigError(f"config.model.arch: {e}") from None
    _number(m.width, "model.width", 0, low_open=True)
    _number(m.dirac_beta, "model.dirac_beta", 0, low_open=True)
    _choice(m.stem, ("", *architectures.STEMS), "model.stem")
    _choice(m.student_shortcuts, ("none", "downsample"), "model.student_shortcuts")
    _choice(m.supervised_shortcuts, architectures.SHORTCUT_MODES, "model.supervised_shortcuts")
    _choice(m.student_init, STUDENT_INITS, "model.student_init")
    _choice(t.strategy, STRATEGIES, "train.strategy")
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.nan_policy, NAN_POLICIES, "train.nan_policy")
    _number(t.epochs, "train.epochs", 1, integer=True)
    _number(t.lr, "train.lr", 0, low_open=True)
    _number(t.momentum, "train.momentum", 0, 1)
    _number(t.weight_decay, "train.weight_decay", 0)
    _number(t.warmup_epochs, "train.warmup_epochs", 0)
    _check(t.warmup_epochs < t.epochs, f"config.train.warmup_epochs={t.warmup_epochs!r} must be less than "
           f"train.epochs={t.epochs!r}.")
    _number(t.seed, "train.seed", 0, integer=True)
    for key, value in (("model.dirac", m.dirac), ("train.nesterov", t.nesterov), ("train.progress", t.progress),
                       ("train.deterministic", t.deterministic), ("train.jit_compile", t.jit_compile),
                       ("train.grad_norms", t.grad_norms), ("distill.normalize", d.normalize)):
        _check(isinstance(value, bool), f"config.{key} must be True or False, got {value!r}.")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _number(t[key], f"train.{key}", 1, integer=True)
    _number(t.steps_per_run, "train.steps_per_run", 0, integer=True)
    _check(isinstance(config.export.enabled, bool),
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


@dataclasses.dataclass(frozen=True)
class Context:
    """What every mode's builder gets: the config, the data's info, the strategy, the schedules' step, and
    the sources (`teacher_source`: a resolved pretrained teacher; `transfer_source`: the loaded net of
    `transfer.from`). `fresh`: no checkpoint will be restored, so initial weights are copied (a resumed run
    gets them from its checkpoint)."""

    config: object
    info: object
    strategy: object
    steps_per_epoch: int
    step: tf.Variable
    loss_cfg: losses.LossConfig
    teacher_source: object = None
    transfer_source: object = None
    fresh: bool = True

    def net(self, shortcuts, **options):
        """The configured net with `shortcuts`, for the data's classes and images. `model.dirac` is a setting
        of the plain student: a ResNet (shortcuts "all", a teacher or a supervised baseline) has plain convs."""
        m, info = self.config.model, self.info
        return architectures.build(m.arch, shortcuts=shortcuts, num_classes=info.num_classes,
                                   input_shape=tuple(info.image_shape), width=m.width, stem=m.stem or None,
                                   dirac=m.dirac and shortcuts != "all", dirac_beta=m.dirac_beta, **options)


@dataclasses.dataclass
class Nets:
    """What a mode's builder returns: the nets it trains and how.

    `trained`: role ("plain", "resnet") -> net, in update order, each with its own optimizer minimising the
    loss term `objectives[i]`; `loss_fn(images, labels)` -> the terms (or a list of such functions, one per
    update, applied one after the other); `diagnosed` and `diagnosed_terms`: the net and the terms
    (label -> term names) of the gradient-norm diagnostics; `extras`: name -> function of the step, logged
    with every step."""

    trained: dict
    objectives: list
    loss_fn: object
    eval_step: object
    diagnosed: object
    diagnosed_terms: dict
    teacher: object = None
    hybrid_points: tuple = ()
    extras: dict = dataclasses.field(default_factory=dict)


def _one_net(ctx, model, role):
    """A net trained alone on its cross-entropy (supervised and transfer modes)."""
    def loss_fn(images, labels):
        return losses.supervised_losses(model, images, labels, ctx.loss_cfg)

    return Nets({role: model}, ["total"], loss_fn, steps.build_eval_step(ctx.strategy, model), model,
                {"ce": ["ce"]})


def _supervised(ctx) -> Nets:
    shortcuts = ctx.config.model.supervised_shortcuts
    return _one_net(ctx, ctx.net(shortcuts), "resnet" if shortcuts == "all" else "plain")


def _transfer(ctx) -> Nets:
    model = transfer.rebuild(ctx.transfer_source, num_classes=ctx.info.num_classes,
                             input_shape=ctx.info.image_shape, copy=ctx.fresh)
    transfer.freeze(model, ctx.config.transfer.freeze_stages)
    return _one_net(ctx, model, transfer.recipe_of(model).role)


def _distill(ctx) -> Nets:
    config, m, d, step = ctx.config, ctx.config.model, ctx.config.distill, ctx.step
    joint = config.teacher.mode == "joint"
    # With a keras.applications teacher, the student takes its layer variant.
    options = {} if joint else sources.build_options(config.teacher.path)
    plain = ctx.net(m.student_shortcuts, **options)
    resnet = ctx.net("all", **options) if joint else teacher.load(
        ctx.teacher_source, model_config=m, num_classes=ctx.info.num_classes, input_shape=ctx.info.image_shape)
    if m.student_init == "teacher" and ctx.fresh:
        transfer.copy_shared_weights(resnet, plain)
    paths = hybrid.build_paths(plain, resnet, d.hybrid_points, d.hybrid_entry)

    def blend(s):
        return schedules.blend_weight(s, steps_per_epoch=ctx.steps_per_epoch, floor=d.blend_floor,
                                      blend_epochs=d.blend_epochs, start_epochs=d.blend_start_epochs)

    def kd_weight(s):
        # A joint teacher is untrained at first: KD on the plain logits starts with the hybrid losses. A
        # pretrained teacher's logits are good from step 0, so KD runs throughout ("KD first, paths later").
        start = int(d.blend_start_epochs * ctx.steps_per_epoch)
        return 1.0 if not (start and joint) else tf.cast(s >= start, tf.float32)

    teacher_first = joint and config.teacher.joint_update == "teacher_first"

    def student_loss_fn(images, labels):
        return losses.distill_losses(paths, resnet, images, labels, blend=blend(step), cfg=ctx.loss_cfg,
                                     joint=joint and not teacher_first, kd_weight=kd_weight(step))

    if teacher_first:  # the teacher's update is applied before the student's forward pass
        trained, objectives = {"resnet": resnet, "plain": plain}, ["teacher_total", "total"]
        loss_fn = [lambda images, labels: losses.teacher_losses(resnet, images, labels, ctx.loss_cfg),
                   student_loss_fn]
    elif joint:
        trained, objectives, loss_fn = {"plain": plain, "resnet": resnet}, ["total", "teacher_total"], student_loss_fn
    else:
        trained, objectives, loss_fn = {"plain": plain}, ["total"], student_loss_fn
    terms = {"plain": ["plain_ce"], "hybrid": [f"hybrid_ce_{i}" for i in range(1, len(paths.points) + 1)],
             "kd": ["logit_kd"] if d.logit_kd_alpha > 0 else []}
    return Nets(trained, objectives, loss_fn, steps.build_eval_step(ctx.strategy, plain, resnet, paths), plain,
                {label: names for label, names in terms.items() if names}, teacher=resnet,
                hybrid_points=paths.points, extras={"blend": blend})


def _check_transfer(config):
    source = config.transfer["from"]
    _check(isinstance(source, str) and source, f"config.train.mode='transfer' needs config.transfer.from: "
           f"a .keras file, a workdir or {pretrained.PREFIX}<Name>, got {source!r}.")
    _number(config.transfer.freeze_stages, "transfer.freeze_stages", 0, integer=True)


def _check_distill(config):
    m, d = config.model, config.distill
    _choice(config.teacher.mode, TEACHER_MODES, "teacher.mode")
    _choice(config.teacher.joint_update, JOINT_UPDATES, "teacher.joint_update")
    _number(d.blend_start_epochs, "distill.blend_start_epochs", 0)
    if config.teacher.mode == "pretrained":
        sources.check_teacher_config(config)
    _number(d.temperature, "distill.temperature", 0, low_open=True)
    _number(d.kd_alpha, "distill.kd_alpha", 0)
    _number(d.logit_kd_alpha, "distill.logit_kd_alpha", 0)
    _number(d.blend_floor, "distill.blend_floor", 0, 1)
    _number(d.blend_epochs, "distill.blend_epochs", 0)
    _number(d.global_clipnorm, "distill.global_clipnorm", 0)
    _number(d.relative_clipnorm, "distill.relative_clipnorm", 0)
    try:
        clipping.check_relative(d.relative_clipnorm)
    except ValueError as e:
        raise ConfigError(f"config.distill.{e}") from None
    _check(d.hybrid_entry in hybrid.ENTRIES,
           f"config.distill.hybrid_entry must be one of {hybrid.ENTRIES}, got {d.hybrid_entry!r}.")
    _check(architectures.get_spec(m.arch).blocks[1:],
           f"config.model.arch={m.arch!r} has one stage: there is no stage boundary for a hybrid path.")
    try:
        points = hybrid.hybrid_points(architectures.block_output_names(m.arch), d.hybrid_points, m.arch)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    if not points:
        _check(d.logit_kd_alpha > 0, f"config.distill.hybrid_points={d.hybrid_points!r} leaves the teacher no "
               f"way to teach: set distill.logit_kd_alpha > 0 (knowledge distillation), got "
               f"{d.logit_kd_alpha!r}, or use train.mode='supervised'.")
        _check(d.kd_alpha == 0, f"config.distill.kd_alpha={d.kd_alpha!r} weights KD on hybrid paths, and "
               f"distill.hybrid_points={d.hybrid_points!r} has none: use distill.logit_kd_alpha for KD on "
               "the plain net's logits.")


def _distill_sources(config, teacher_path):
    if config.teacher.mode != "pretrained":
        return None, None, {}
    source = teacher.resolve(teacher_path, config.teacher.weights)
    # The two-phase recipe's own teacher run.
    return source, None, ({} if config.teacher.path else {"teacher_workdir": teacher_path})


def _transfer_sources(config, teacher_path):
    source = transfer.resolve(config.transfer["from"], config.transfer.weights)
    net = transfer.load(source)
    recipe = transfer.recipe_of(net)
    # Only plain nets are exported: say so now rather than after training.
    _check(recipe.role == "plain" or not config.export.enabled,
           f"config.export.enabled=True exports plain nets, but config.transfer.from="
           f"{config.transfer['from']!r} is a ResNet ({net.name}).")
    return None, net, {"transfer": {"source": source.path, **dataclasses.asdict(recipe)}}


def _no_check(config):
    pass


def _no_sources(config, teacher_path):
    return None, None, {}


@dataclasses.dataclass(frozen=True)
class Mode:
    """One `config.train.mode`: `check(config)` refuses its bad config values (in `validate`, after the
    values every mode uses); `sources(config, teacher_path)` -> (resolved teacher source, loaded transfer
    net, what config.json's `run` records of them), before any data is read; `build(ctx)` -> `Nets`, in
    the strategy's scope. `reads`: the config sections whose values decide what it trains."""

    build: object
    check: object = _no_check
    sources: object = _no_sources
    reads: tuple = ("data", "model", "train")


# config.train.mode -> what it checks, loads and builds: a new mode is new functions and one entry here.
MODES = {"distill": Mode(_distill, _check_distill, _distill_sources, reads=("data", "model", "train", "teacher",
                                                                           "distill")),
         "supervised": Mode(_supervised),
         "transfer": Mode(_transfer, _check_transfer, _transfer_sources, reads=("data", "model", "train",
                                                                               "transfer"))}
TRAIN_MODES = tuple(MODES)


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
    _check(config.data.batch_size % replicas == 0,
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
