"""Clipping the plain student's gradient by its global norm, at a fixed norm (`distill.global_clipnorm`)
and/or at a multiple of the norm's running mean (`distill.relative_clipnorm`).

Why relative: a loss spike of the hybrid paths shows as a 10-50x jump of the gradient norm within a few
steps (docs/results/notes.md). A fixed cap that catches it must sit near the ordinary norm, and the ordinary
norm grows with depth and width: the cap that removed a depth-56 spike binds on ordinary depth-110 steps and
slows them. A cap at a multiple of the running mean follows each net's own scale, so it can stay far above
ordinary steps and still stop a jump.

The norm is that of the gradient summed over replicas (one all-reduce, only with more than one replica),
so every replica scales its share by the same factor and two replicas train exactly as one device (keras'
own `global_clipnorm` clips each replica's share by itself); it is unscaled by the loss scale under mixed
precision. Non-finite gradients stay non-finite, for the NaN skip or the loss scale to see, and leave the
running mean alone.
"""

import math

import tensorflow as tf

SUM = tf.distribute.ReduceOp.SUM
DECAY = 0.99  # of the running mean: it follows about the last 100 steps


def _nonnegative(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 = off), got {value!r}.")
    return float(value)


def check_relative(relative):
    """Raises ValueError unless `relative` is 0 (off) or > 1 (the one rule for `distill.relative_clipnorm`)."""
    if 0 < relative <= 1:
        raise ValueError(f"relative_clipnorm must be 0 (off) or > 1: a cap at or below the running mean of the "
                         f"norm binds on about every other step, got {relative!r}.")


class NormClip(tf.Module):
    """Scales a gradient down to a global norm cap when larger: `global_clipnorm` (> 0), or `relative`
    times the running mean of the norms of the steps taken so far (> 1), or the smaller of the two.

    The running mean is an exponential moving average (decay 0.99, bias-corrected) of each applied step's
    norm after clipping, so a spike does not raise the cap it is measured against; the first step has no
    mean yet and is capped by `global_clipnorm` only. Its variables are checkpointed with the run (a
    resumed run clips as the uninterrupted one). `metrics()` gives the last step's norm before clipping and
    whether it was clipped (1.0) or not, for the training logs. Create it inside the strategy's scope.
    """

    def __init__(self, global_clipnorm=0.0, relative=0.0, name="norm_clip"):
        super().__init__(name=name)
        self.global_clipnorm = _nonnegative(global_clipnorm, "global_clipnorm")
        self.relative = _nonnegative(relative, "relative_clipnorm")
        check_relative(self.relative)
        if not (self.global_clipnorm or self.relative):
            raise ValueError("NormClip needs global_clipnorm > 0 or relative_clipnorm > 1; both are 0.")

        def variable(name):
            # Every replica computes the same value from the summed gradient: keep the first's.
            return tf.Variable(0.0, trainable=False, name=name,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

        self.mean_sum = variable("mean_sum")  # EMA of the clipped norms, not bias-corrected
        self.mean_weight = variable("mean_weight")  # 1 - DECAY^steps: its bias correction
        self.last_norm = variable("last_norm")
        self.last_clipped = variable("last_clipped")

    def cap(self):
        """The norm a gradient is clipped to now (inf when nothing binds yet)."""
        cap = tf.constant(self.global_clipnorm or math.inf)
        if self.relative:
            running = tf.math.divide_no_nan(self.mean_sum, self.mean_weight)
            cap = tf.where(self.mean_weight > 0, tf.minimum(cap, self.relative * running), cap)
        return cap

    def __call__(self, ctx, grads, loss_scale=None):
        """This replica's share `grads` (None entries allowed), scaled so that the whole gradient, summed
        over the replicas of `ctx` and divided by `loss_scale` when given, has a norm of at most `cap()`."""
        present = [g for g in grads if g is not None]
        whole = ctx.all_reduce(SUM, present) if ctx.num_replicas_in_sync > 1 else present
        norm = tf.linalg.global_norm([tf.cast(g, tf.float32) for g in whole])
        if loss_scale is not None:
            norm = norm / tf.cast(loss_scale, tf.float32)
        cap = self.cap()
        # A zero or NaN norm keeps the factor at 1; an infinite one gives 0, and 0 * inf = NaN.
        factor = tf.where(norm > cap, cap / norm, 1.0)
        self.last_norm.assign(norm)
        self.last_clipped.assign(tf.cast(norm > cap, tf.float32))
        if self.relative:
            finite = tf.math.is_finite(norm)
            taken = tf.where(finite, tf.minimum(norm, cap), 0.0)
            self.mean_sum.assign(tf.where(finite, DECAY * self.mean_sum + (1 - DECAY) * taken, self.mean_sum))
            self.mean_weight.assign(tf.where(finite, DECAY * self.mean_weight + (1 - DECAY), self.mean_weight))
        return [None if g is None else g * tf.cast(factor, g.dtype) for g in grads]

    def metrics(self, net="plain"):
        """{name: fn(step)} of the scalars to log: `grad_norm/step/<net>`, the global norm before clipping
        (a diagnostic: outside the NaN policy, as a loss-scale overflow makes it infinite), and
        `clipped/<net>`, 1.0 when the step was clipped (logged means: the fraction of steps clipped)."""
        return {f"grad_norm/step/{net}": lambda _step: tf.identity(self.last_norm),
                f"clipped/{net}": lambda _step: tf.identity(self.last_clipped)}
