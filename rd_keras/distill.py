"""Residual Distillation's two halves, by job: `rd_keras.losses` (the loss terms and the objectives of the
supervised, joint-teacher and RD steps) and `rd_keras.steps` (the distributed training step with its NaN
skip, BatchNorm sync and gradient-norm diagnostics, the evaluation step, the loop's cross-replica helpers).

This module keeps `from rd_keras import distill` working for code written against it: every name below is
one of those two modules' own.
"""

from rd_keras.losses import (LossConfig, accuracy, cross_entropy, distill_losses, kd_loss,  # noqa: F401
                             l2_penalty, supervised_losses, teacher_losses)
from rd_keras.steps import (SUM, GradNorms, Update, build_cross_replica_sum, build_eval_step,  # noqa: F401
                            build_train_step, evaluate, is_diagnostic_step, is_loss_scaled, scale_loss, stage_of)
