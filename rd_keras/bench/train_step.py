"""`bench train-step`: training throughput (images/s) of the RD step against ordinary supervised steps.

Steps, all built by `rd_keras.steps.build_train_step` (the trainer's builder) on the same synthetic batch:

- `resnet`: the supervised ResNet step (what training the teacher alone costs);
- `plain`: the supervised plain-net step (the baseline RD is meant to beat in accuracy);
- `rd_joint`: the RD step with the teacher trained alongside (plain forward + one backward through every
  hybrid path + the teacher's own supervised update);
- `rd_pretrained`: the RD step with a frozen teacher (no teacher update; gradients still flow through its
  later stages into the plain net);
- `kd`: knowledge distillation from the frozen teacher, no hybrid path (plain forward and backward + one
  teacher forward): the baseline RD is compared with;
- `rd_kd`: `rd_pretrained` plus that KD term on the plain logits.

Each runs with and without XLA (`jit_compile`) and under each `--precisions` Keras dtype policy;
`mixed_float16` steps use a `LossScaleOptimizer`, as the trainer does. Each (precision, XLA) combination
runs in its own process, its steps timed interleaved round by round. A combination that fails, or does not
finish within `--timeout_s` (CPUs without float16 arithmetic emulate it, very slowly), is reported as
skipped with the reason. `relative` = step time / the `resnet` step time of the same combination (> 1:
costlier than training the ResNet alone).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time

import numpy as np

from rd_keras import defaults
from rd_keras.bench import common

KINDS = ("resnet", "plain", "rd_joint", "rd_pretrained", "kd", "rd_kd")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT = ("off", "on")
# The trainer's defaults (rd_keras.defaults, as in configs/common.py): SGD with Nesterov momentum and L2 decay.
LR, MOMENTUM, NESTEROV, WEIGHT_DECAY = defaults.LR, defaults.MOMENTUM, defaults.NESTEROV, defaults.WEIGHT_DECAY


def add_arguments(parser):
    parser.add_argument("--arch", default="resnet56", help="ResNet/plain pair (default: %(default)s)")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (default: 1.0)")
    parser.add_argument("--image_size", type=int, default=None, help="override the native input size")
    parser.add_argument("--batch_size", type=int, default=128, help="global batch (default: %(default)s)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="subset of %(default)s")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="subset of %(default)s")
    parser.add_argument("--jit", default=",".join(JIT), help="XLA off, on, or both (default: %(default)s)")
    parser.add_argument("--kd_alpha", type=float, default=0.0,
                        help="KD weight of the RD steps; > 0 adds a teacher forward (default: 0, the trainer's)")
    parser.add_argument("--hybrid_points", default="stages",
                        help="where the RD steps' hybrid paths start: stages, every_k_blocks:K or a list of "
                             "block numbers (default: %(default)s, one path per stage boundary)")
    parser.add_argument("--hybrid_entry", default="direct",
                        help="how plain features enter the teacher tails: direct or rescale (which needs a "
                             "teacher forward, the one KD makes when it is on) (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="most timed rounds (default: %(default)s)")
    parser.add_argument("--min_runs", type=int, default=3, help="fewest timed rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds after the tracing step (default: %(default)s)")
    parser.add_argument("--budget_s", type=float, default=20.0,
                        help="seconds of timed rounds per combination once --min_runs are done "
                             "(default: %(default)s)")
    parser.add_argument("--timeout_s", type=float, default=420.0,
                        help="a combination still running after this long is stopped and reported as "
                             "skipped (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="for tests: batch 16, float32 without XLA, 2 runs, no warm-up round")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def _settings(args):
    if args.quick:
        args.batch_size, args.precisions, args.jit = 16, "float32", "off"
        args.runs, args.min_runs, args.warmup, args.budget_s = 2, 2, 0, 0.0
    settings = {
        "batch_size": int(common.check_positive(args.batch_size, "--batch_size")),
        "kinds": common.parse_choices(args.kinds, "--kinds", KINDS),
        "precisions": common.parse_choices(args.precisions, "--precisions", PRECISIONS),
        "jit": common.parse_choices(args.jit, "--jit", JIT),
        "kd_alpha": float(common.check_positive(args.kd_alpha, "--kd_alpha", allow_zero=True)),
        "runs": int(common.check_positive(args.runs, "--runs")),
        "min_runs": int(common.check_positive(args.min_runs, "--min_runs")),
        "warmup": int(common.check_positive(args.warmup, "--warmup", allow_zero=True)),
        "budget_s": float(common.check_positive(args.budget_s, "--budget_s", allow_zero=True)),
        "timeout_s": float(common.check_positive(args.timeout_s, "--timeout_s")),
        "hybrid_points": args.hybrid_points,
        "hybrid_entry": args.hybrid_entry,
        "quick": bool(args.quick),
        "optimizer": {"name": "SGD", "lr": LR, "momentum": MOMENTUM, "nesterov": NESTEROV,
                      "weight_decay": WEIGHT_DECAY},
    }
    if settings["min_runs"] > settings["runs"]:
        raise common.FlagError(f"--min_runs ({args.min_runs!r}) must not exceed --runs ({args.runs!r}).")
    return settings


def _optimizer(precision):
    import keras

    opt = keras.optimizers.SGD(learning_rate=LR, momentum=MOMENTUM, nesterov=NESTEROV)
    return keras.optimizers.LossScaleOptimizer(opt) if precision == "mixed_float16" else opt


def build_step(kind, pair, settings, precision, jit):
    """A zero-argument callable running one `kind` training step; models built under `precision`."""
    import tensorflow as tf

    from rd_keras import hybrid, losses, steps

    batch = settings["batch_size"]
    rng = np.random.default_rng(0)
    images = rng.standard_normal([batch, *pair.input_shape], np.float32)
    labels = rng.integers(0, pair.num_classes, batch, dtype=np.int32)
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    strategy = tf.distribute.get_strategy()
    cfg = losses.LossConfig(global_batch_size=batch, weight_decay=WEIGHT_DECAY, kd_alpha=settings["kd_alpha"])
    step = tf.Variable(0, dtype=tf.int64, trainable=False)

    if kind in ("resnet", "plain"):
        model = pair.build("all" if kind == "resnet" else "none")
        trained = [model]
        updates = [steps.Update("total", _optimizer(precision), model.trainable_variables)]

        def loss_fn(x, y):
            return losses.supervised_losses(model, x, y, cfg)
    else:
        joint = kind == "rd_joint"
        plain, teacher = pair.build("none"), pair.build("all")
        paths = hybrid.build_paths(plain, teacher, hybrid.NONE if kind == "kd" else settings["hybrid_points"],
                                   settings["hybrid_entry"])
        if kind in ("kd", "rd_kd"):
            cfg = dataclasses.replace(cfg, logit_kd_alpha=1.0)
        trained = [plain, teacher] if joint else [plain]
        updates = [steps.Update("total", _optimizer(precision), plain.trainable_variables)]
        if joint:
            updates.append(steps.Update("teacher_total", _optimizer(precision), teacher.trainable_variables))
        blend = tf.constant(1.0)  # m(t): its value does not change the work done

        def loss_fn(x, y):
            return losses.distill_losses(paths, teacher, x, y, blend=blend, cfg=cfg, joint=joint)
    for u in updates:
        u.optimizer.build(u.variables)
    state = [v for m in trained for v in m.non_trainable_variables]
    train_step = steps.build_train_step(strategy, loss_fn, updates, step=step, state_variables=state,
                                        jit_compile=jit)
    return lambda: float(train_step(iterator)["total"])  # float(): wait for the step's result


def _combination_child(pair, settings, precision, jit):
    """Runs in a spawned process: builds and times every kind under one (precision, jit)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one tf.function per kind is intended: no retracing warnings
    keras.mixed_precision.set_global_policy(precision)
    steps, first = {}, {}
    for kind in settings["kinds"]:
        steps[kind] = build_step(kind, pair, settings, precision, jit)
        t0 = time.perf_counter()
        steps[kind]()  # traces (and with XLA compiles): not timed as a step
        first[kind] = time.perf_counter() - t0
        if first[kind] > settings["timeout_s"] / 2:
            # The other steps and the timed rounds cannot fit: give up now, with the one number measured.
            raise TimeoutError(f"the first call (tracing + one step) of the {kind!r} step took "
                               f"{first[kind]:.0f} s; too slow to time within --timeout_s={settings['timeout_s']:g}")
    times = common.interleaved(steps, warmup=settings["warmup"], min_runs=settings["min_runs"],
                               max_runs=settings["runs"], budget_s=settings["budget_s"],
                               desc=f"{precision} jit={'on' if jit else 'off'}")
    return times, first


def bench_combination(pair, settings, precision, jit):
    """Times every kind under one (precision, jit) in a fresh process; a dict per kind, or the reason it
    was skipped. A fresh process per combination keeps one dtype policy's or XLA's caches from
    affecting the next, and lets a combination that runs far too slowly be stopped."""
    base = {"precision": precision, "jit_compile": jit}
    # spawn, not fork: TensorFlow's runtime does not survive a fork.
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # leaving the block stops the child
        try:
            times, first = pool.apply_async(_combination_child, (pair, settings, precision, jit)).get(
                timeout=settings["timeout_s"])
        except multiprocessing.TimeoutError:
            return {**base, "skipped": f"did not finish within --timeout_s={settings['timeout_s']:g} s "
                                       f"(tracing, compiling and {settings['min_runs']} rounds of every step)"}
        except Exception as e:  # an unsupported precision or XLA on this device: say so, keep the rest
            return {**base, "skipped": f"{type(e).__name__}: {e}"[:500]}
        pool.close()  # a clean exit, so no semaphore is left for the resource tracker to complain about
        pool.join()
    out = {**base, "steps": {}}
    for kind, seconds in times.items():
        stats = common.summarize(seconds)
        stats["images_per_s"] = settings["batch_size"] / (stats["median_ms"] / 1e3)
        stats["first_call_s"] = first[kind]
        out["steps"][kind] = stats
    if "resnet" in out["steps"]:
        reference = out["steps"]["resnet"]["median_ms"]
        for stats in out["steps"].values():
            stats["relative"] = stats["median_ms"] / reference
    return out


def table(result) -> str:
    rows = []
    for combo in result["combinations"]:
        jit = "on" if combo["jit_compile"] else "off"
        if "skipped" in combo:
            rows.append([combo["precision"], jit, "(skipped)", None, None, None, None, combo["skipped"][:60]])
            continue
        for kind, s in combo["steps"].items():
            rows.append([combo["precision"], jit, kind, s["images_per_s"], s["median_ms"], s["p90_ms"],
                         s.get("relative"), s["runs"]])
    header = ["precision", "jit", "step", "img/s", "median ms", "p90 ms", "relative", "runs"]
    return (f"{result['pair']} batch {result['batch_size']}; relative = step time / resnet step time\n"
            + common.format_table(rows, header))


def run(args):
    import tensorflow as tf

    load_at_start = common.load_average()
    settings = _settings(args)
    pairs = common.parse_pairs(args.arch, args.width, args.image_size)
    if len(pairs) != 1:
        raise common.FlagError(f"--arch must name one architecture, got {args.arch!r}.")
    pair = pairs[0]
    from rd_keras import architectures, hybrid
    try:
        hybrid.hybrid_points(architectures.block_output_names(args.arch), args.hybrid_points, args.arch)
    except ValueError as e:
        raise common.FlagError(f"--hybrid_points: {e}") from None
    if args.hybrid_entry not in hybrid.ENTRIES:
        raise common.FlagError(f"--hybrid_entry must be one of {hybrid.ENTRIES}, got {args.hybrid_entry!r}.")
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    combos = [(p, j == "on") for p in settings["precisions"] for j in settings["jit"]]
    results = [bench_combination(pair, settings, p, j) for p, j in common.progress(combos, "combinations")]
    result = {**pair.describe(), "batch_size": settings["batch_size"], "device": device, "combinations": results}
    payload = {"command": "train-step", "machine": common.machine(args.argv, load_at_start), "settings": settings,
               "results": [result]}
    print(table(result))
    if args.json:
        common.write_json(args.json, payload)
    return payload
