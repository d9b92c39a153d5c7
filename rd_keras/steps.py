"""The distributed steps: one training step for any set of (objective, optimizer, variables) updates under
`strategy.run` (loss scaling, the NaN skip, BatchNorm statistics kept in sync with a skipped update, the
gradient-norm diagnostics in their own function), the evaluation step and the cross-replica helpers the
loop uses. The loss terms they minimise are in `rd_keras.losses`.

Every step works with any tf.distribute strategy: the losses are per-replica shares of the global mean, and
the optimizer sums the replicas' gradients.
"""

import dataclasses

import keras
import tensorflow as tf

from rd_keras import architectures
from rd_keras.losses import accuracy, cross_entropy

SUM = tf.distribute.ReduceOp.SUM


@dataclasses.dataclass(frozen=True)
class Update:
    """One optimizer minimising `terms[objective]` w.r.t. `variables`; with a `clip` (a
    `clipping.NormClip`) the gradient is scaled down to its cap when its global norm is larger."""

    objective: str
    optimizer: keras.optimizers.Optimizer
    variables: list
    clip: object = None


def is_loss_scaled(optimizer):
    """Whether `optimizer` scales the loss (mixed precision): its gradients are unscaled when applied."""
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def scale_loss(optimizer, loss):
    """`loss` as `optimizer` wants it differentiated: scaled by a LossScaleOptimizer, else as is."""
    return optimizer.scale_loss(loss) if is_loss_scaled(optimizer) else loss


def _all_finite(tensors):
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t is not None])


def _apply_if(finite, apply_fn, grads):
    """Runs `apply_fn(grads)` on every replica iff `finite` (equal on all replicas). Optimizers all-reduce
    inside `apply`, so the branch is taken in cross-replica context, as keras' LossScaleOptimizer does;
    `grads` goes through `merge_call` so that each replica applies its own gradients."""
    def cross_replica(strategy, finite, grads):
        first = strategy.experimental_local_results(finite)[0]
        tf.cond(first, lambda: strategy.extended.call_for_each_replica(apply_fn, args=(grads,)), lambda: None)

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(finite, grads))


def stage_of(variable) -> str:
    """The part of a built net a variable belongs to: `stem`, `stage{i}` or `logits` (from its layer name)."""
    return architectures.part_of(variable.path.split("/")[-2] if "/" in variable.path else "")


def is_diagnostic_step(step, every):
    """Whether the step numbered `step` (before its increment) measures gradient norms: the last step
    before each log point, so that every logged interval carries exactly one measurement."""
    return (step + 1) % every == 0


@dataclasses.dataclass(frozen=True)
class GradNorms:
    """Per-stage gradient norms of some loss terms w.r.t. one net's variables.

    `sources` maps a label to the term names summed into it, e.g. {"plain": ["plain_ce"], "hybrid":
    ["hybrid_ce_1", "hybrid_ce_2"]}: the norm of d(sum)/d(variables of stage s) is reported as
    `grad_norm/{label}/{s}`. The norm is of each replica's gradient on its own batch, averaged over
    replicas (on one device: the gradient of the batch). Unweighted by m(t), so that the plain and hybrid
    sources can be compared as the blend decays."""

    variables: list
    sources: dict

    def measure(self, tape, terms, scale):
        by_stage = {}
        for v in self.variables:
            by_stage.setdefault(stage_of(v), []).append(v)
        out = {}
        for label, names in self.sources.items():
            # A list of targets: their gradients are summed (a sum op built here would be off the tape).
            grads = tape.gradient([terms[n] for n in names], self.variables)
            squares = {}
            for v, g in zip(self.variables, grads):
                if g is not None:
                    squares.setdefault(stage_of(v), []).append(tf.reduce_sum(tf.square(tf.cast(g, tf.float32))))
            for stage in sorted(by_stage):
                total = tf.add_n(squares[stage]) if stage in squares else tf.constant(0.0)
                out[f"grad_norm/{label}/{stage}"] = scale * tf.sqrt(total)
        return out


def build_train_step(strategy, loss_fn, updates, *, step, state_variables=(), nan_skip=False,
                     jit_compile=False, extras_fn=None, grad_norms=None):
    """`train_step(iterator, diagnose=False) -> dict of scalars`, doing one update of every `Update`.

    `loss_fn(images, labels)` returns per-replica terms (see `distill_losses`), and every update's gradient
    comes from that one forward pass. A list of loss functions, one per update, runs them in order instead:
    each update is applied before the next forward pass (a joint teacher updated before its student, as the
    paper's official code does); with `nan_skip`, each such phase is skipped on its own. `state_variables` (BN moving
    statistics) are averaged across replicas after the forward pass: keras 3 updates each replica's copy
    on its own, and without this the replicas' statistics drift apart. With `nan_skip`, a step whose losses
    or gradients are not all finite changes nothing (weights, optimizer slots, BN statistics) and reports
    `skipped=1`. `extras_fn(step)` adds unreduced scalars (learning rate, blend). `step` is incremented.

    With `grad_norms` (a `GradNorms`) and `diagnose=True`, the step also reports its `grad_norm/...` values,
    measured on the step's own batch right after the update by a separate function that restores the BN
    statistics it touched. The update itself runs the same graph either way, so a diagnostic never changes
    training: a run with diagnostics ends with the same weights, bit for bit, as one without.
    """
    if not updates:
        raise ValueError("build_train_step needs at least one Update.")
    if callable(loss_fn):
        phases = [(loss_fn, list(updates))]
    elif len(loss_fn) == len(updates):
        phases = [(fn, [u]) for fn, u in zip(loss_fn, updates)]
    else:
        raise ValueError(f"build_train_step needs one loss function, or one per update ({len(updates)}), "
                         f"got {len(loss_fn)}.")
    state_variables = list(state_variables)
    sync_state = strategy.num_replicas_in_sync > 1

    def forward_backward_of(fn, phase_updates):
        @tf.function(jit_compile=jit_compile)
        def forward_backward(images, labels):
            with tf.GradientTape(persistent=len(phase_updates) > 1) as tape:
                terms = fn(images, labels)
                objectives = [scale_loss(u.optimizer, terms[u.objective]) for u in phase_updates]
            return terms, [tape.gradient(obj, u.variables) for obj, u in zip(objectives, phase_updates)]

        return forward_backward

    steps = [(forward_backward_of(fn, us), us) for fn, us in phases]

    def run_phase(ctx, forward_backward, phase_updates, images, labels):
        terms, grads = forward_backward(images, labels)

        def apply(grads):
            for u, g in zip(phase_updates, grads):
                if u.clip is not None:
                    g = u.clip(tf.distribute.get_replica_context(), g,
                               u.optimizer.dynamic_scale if is_loss_scaled(u.optimizer) else None)
                u.optimizer.apply(g, u.variables)

        finite = tf.constant(True)
        if nan_skip:
            # Loss-scaled grads may overflow legitimately; LossScaleOptimizer skips those updates itself.
            checked = list(terms.values()) + [
                g for u, gs in zip(phase_updates, grads) if not is_loss_scaled(u.optimizer) for g in gs]
            bad = ctx.all_reduce(SUM, 1.0 - tf.cast(_all_finite(checked), tf.float32))
            finite = tf.equal(bad, 0.0)
            if all(is_loss_scaled(u.optimizer) for u in phase_updates):
                apply(grads)
            else:
                _apply_if(finite, apply, grads)
        else:
            apply(grads)
        return terms, finite

    def replica_step(images, labels):
        ctx = tf.distribute.get_replica_context()
        before = [tf.identity(v) for v in state_variables] if nan_skip else None
        terms, finite = {}, tf.constant(True)
        for forward_backward, phase_updates in steps:
            phase_terms, phase_finite = run_phase(ctx, forward_backward, phase_updates, images, labels)
            terms.update(phase_terms)
            finite = tf.logical_and(finite, phase_finite) if len(steps) > 1 else phase_finite
        if state_variables and (sync_state or nan_skip):
            # tf.identity places each read on this replica's device: all_reduce needs a device to
            # reduce to, and a bare read of a multi-worker variable has none.
            values = [tf.identity(v) for v in state_variables]
            if sync_state:
                values = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, values)
            if nan_skip:
                values = [tf.where(finite, new, old) for new, old in zip(values, before)]
            for v, value in zip(state_variables, values):
                v.assign(value)
        return terms, 1.0 - tf.cast(finite, tf.float32)

    @tf.function
    def update(iterator, keep_batch):
        images, labels = next(iterator)
        terms, skipped = strategy.run(replica_step, args=(images, labels))
        out = {k: strategy.reduce(SUM, v, axis=None) for k, v in terms.items()}
        if nan_skip:
            out["skipped"] = strategy.reduce(tf.distribute.ReduceOp.MEAN, skipped, axis=None)
        if extras_fn is not None:
            out.update(extras_fn(step))
        step.assign_add(1)
        return out, ((images, labels) if keep_batch else None)

    def all_terms(images, labels):
        terms = {}
        for fn, _ in phases:
            terms.update(fn(images, labels))
        return terms

    measure = None if grad_norms is None else _build_grad_norm_measure(strategy, all_terms, grad_norms,
                                                                       state_variables)

    def train_step(iterator, diagnose=False):
        if measure is None or not diagnose:
            return update(iterator, False)[0]
        out, batch = update(iterator, True)
        return {**out, **measure(*batch)}

    return train_step


def _build_grad_norm_measure(strategy, loss_fn, grad_norms, state_variables):
    """A tf.function `measure(images, labels) -> {grad_norm/...: replica mean}`. Its forward pass runs in
    training mode, as the step's does, and the BN statistics it moves are put back."""
    # Each replica's terms are its share of the global mean: rescale to its own batch's gradient.
    scale = float(strategy.num_replicas_in_sync)

    def replica_measure(images, labels):
        saved = [tf.identity(v) for v in state_variables]
        with tf.GradientTape(persistent=True) as tape:
            terms = loss_fn(images, labels)
        norms = grad_norms.measure(tape, terms, scale)
        with tf.control_dependencies(list(norms.values())):
            for v, value in zip(state_variables, saved):
                v.assign(value)
        return norms

    @tf.function
    def measure(images, labels):
        norms = strategy.run(replica_measure, args=(images, labels))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in norms.items()}

    return measure


def build_eval_step(strategy, model, teacher=None, paths=None):
    """A tf.function `eval_step(distributed_batch) -> dict of sums over the global batch`: `count`,
    `correct` and `ce` of `model`, plus `teacher_correct` and `hybrid_correct_{i}` when a teacher and its
    `hybrid.HybridPaths` are given."""
    def replica_step(images, labels):
        out = (model if paths is None else paths.taps)(images, training=False)
        sums = {"count": tf.cast(tf.shape(labels)[0], tf.float32),
                "correct": tf.reduce_sum(accuracy(labels, out["logits"])),
                "ce": tf.reduce_sum(cross_entropy(labels, out["logits"]))}
        if teacher is not None:
            found = paths.teacher_outputs(teacher, images)
            sums["teacher_correct"] = tf.reduce_sum(accuracy(labels, found["logits"]))
            for i, logits in enumerate(paths.logits(out, found), start=1):
                sums[f"hybrid_correct_{i}"] = tf.reduce_sum(accuracy(labels, logits))
        return sums

    @tf.function
    def eval_step(batch):
        sums = strategy.run(replica_step, args=batch)
        return {k: strategy.reduce(SUM, v, axis=None) for k, v in sums.items()}

    return eval_step


def build_cross_replica_sum(strategy):
    """A tf.function `cross_sum(values) -> the float64 vector `values` summed over all replicas of all
    workers`, for host-side decisions every worker must take alike (stop now? same checkpoint?). A
    collective: every worker calls it at the same point of the run."""
    @tf.function
    def cross_sum(values):
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(SUM, per_replica, axis=None)

    return cross_sum


def evaluate(eval_step, distributed_dataset):
    """Runs `eval_step` over the dataset: {"acc", "loss", and with a teacher "teacher_acc", "hybrid_acc"}."""
    totals = {}
    for batch in distributed_dataset:
        for k, v in eval_step(batch).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count", 0.0)
    if not count:
        raise ValueError("The evaluation dataset is empty.")
    result = {"acc": totals["correct"] / count, "loss": totals["ce"] / count}
    if "teacher_correct" in totals:
        result["teacher_acc"] = totals["teacher_correct"] / count
        paths = sum(k.startswith("hybrid_correct_") for k in totals)
        result["hybrid_acc"] = [totals[f"hybrid_correct_{i}"] / count for i in range(1, paths + 1)]
    return result
