"""What each `config.train.mode` trains, checks and loads: one `Mode` per entry of `MODES`.

- "distill": a plain student (`model.student_shortcuts`) learns with hybrid paths through a ResNet teacher
  (`teacher.mode`: "joint" trains it at the same time on its own CE; "pretrained" loads it from
  `teacher.path`, frozen). Saves `plain.keras`, and `resnet.keras` in joint mode.
- "supervised": one net with `model.supervised_shortcuts` ("all": the ResNet, saved as `resnet.keras`,
  usable later as `teacher.path`; "none"/"downsample": the plain baseline, saved as `plain.keras`).
- "transfer": fine-tune the trained net named by `transfer.from` on this config's data, with a new head
  (`rd_keras.transfer`); saved as `plain.keras` or `resnet.keras`, as the source net was.

A mode's builder gets a `Context` and returns `Nets`; `train_lib.build_setup` adds the optimizers and the
steps, the same for every mode.
"""

import dataclasses

import tensorflow as tf

from rd_keras import (architectures, clipping, hybrid, losses, pretrained, schedules, sources, steps, teacher,
                      transfer)
from rd_keras.defaults import TEACHER_MODES
from rd_keras.errors import ConfigError, require, require_choice, require_number

STUDENT_INITS = ("random", "teacher")
JOINT_UPDATES = ("together", "teacher_first")


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
    require(isinstance(source, str) and source, f"config.train.mode='transfer' needs config.transfer.from: "
           f"a .keras file, a workdir or {pretrained.PREFIX}<Name>, got {source!r}.")
    require_number(config.transfer.freeze_stages, "transfer.freeze_stages", 0, integer=True)


def _check_distill(config):
    m, d = config.model, config.distill
    require_choice(config.teacher.mode, TEACHER_MODES, "teacher.mode")
    require_choice(config.teacher.joint_update, JOINT_UPDATES, "teacher.joint_update")
    require_number(d.blend_start_epochs, "distill.blend_start_epochs", 0)
    if config.teacher.mode == "pretrained":
        sources.check_teacher_config(config)
    require_number(d.temperature, "distill.temperature", 0, low_open=True)
    require_number(d.kd_alpha, "distill.kd_alpha", 0)
    require_number(d.logit_kd_alpha, "distill.logit_kd_alpha", 0)
    require_number(d.blend_floor, "distill.blend_floor", 0, 1)
    require_number(d.blend_epochs, "distill.blend_epochs", 0)
    require_number(d.global_clipnorm, "distill.global_clipnorm", 0)
    require_number(d.relative_clipnorm, "distill.relative_clipnorm", 0)
    try:
        clipping.check_relative(d.relative_clipnorm)
    except ValueError as e:
        raise ConfigError(f"config.distill.{e}") from None
    require(d.hybrid_entry in hybrid.ENTRIES,
           f"config.distill.hybrid_entry must be one of {hybrid.ENTRIES}, got {d.hybrid_entry!r}.")
    require(architectures.get_spec(m.arch).blocks[1:],
           f"config.model.arch={m.arch!r} has one stage: there is no stage boundary for a hybrid path.")
    try:
        points = hybrid.hybrid_points(architectures.block_output_names(m.arch), d.hybrid_points, m.arch)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    if not points:
        require(d.logit_kd_alpha > 0, f"config.distill.hybrid_points={d.hybrid_points!r} leaves the teacher no "
               f"way to teach: set distill.logit_kd_alpha > 0 (knowledge distillation), got "
               f"{d.logit_kd_alpha!r}, or use train.mode='supervised'.")
        require(d.kd_alpha == 0, f"config.distill.kd_alpha={d.kd_alpha!r} weights KD on hybrid paths, and "
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
    require(recipe.role == "plain" or not config.export.enabled,
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
