"""`bench accuracy`: does RD let a plain net match its ResNet? The paper's core experiment, by `train.py`.

For each depth D in `--depths` five runs, identical budget and schedule (`--epochs`, `--width`,
`--train_subset` on top of `--config`), each `train.py` in its own workdir under `--out`:

- `resnet`: ResNet-D trained alone (`train.mode=supervised`, shortcuts "all");
- `plain`: plain-D trained alone (shortcuts "none"): the gap RD has to close;
- `rd_joint`: plain-D trained by RD, the ResNet teacher trained alongside (`teacher.mode=joint`);
- `rd_pretrained`: plain-D trained by RD from the frozen ResNet of the `resnet` run (`teacher.mode=pretrained`);
- `kd`: the knowledge-distillation baseline: plain-D trained on CE + T^2 KL(teacher || plain) from the same
  frozen ResNet, no hybrid path (`distill.hybrid_points=none`, `distill.logit_kd_alpha=1`).

`--variant NAME:KEY=VALUE,...` (repeatable) adds a run `NAME` with those config overrides on top of one of
the five runs above, chosen by the key `run` (default `rd_joint`): e.g. `--variant
dirac:model.dirac=True` or `--variant plain_dirac:run=plain,model.dirac=True`; the key `seeds` (e.g.
`seeds=0,1`) gives a variant its own seeds. `--seeds 0,1` repeats every other
run with `train.seed` and `data.seed` set to each seed (runs of the config's own seed keep their plain
names, others get `_s<seed>`); the summary gives each run's mean and spread.

With `--validation_split F` every run evaluates on the last fraction F of the training images while it
trains (the learning curves, and the numbers to choose variants by) and on the test split once, at its end.

Reported per run: test (and validation) accuracy of the trained net (the plain net for RD runs; RD runs
also give their teacher's), the final epoch's mean training cross-entropy of that net, wall time, and the
learning curves read from each workdir's metrics.jsonl (`curves.val_acc` per epoch with a validation split,
`curves.test_acc` without), the code versions that trained it, and for runs from a pretrained teacher the
total wall time including the teacher's training (`total_wall_s`). The hybrid-loss decay `distill.blend_epochs` keeps
the config's fraction of the run when `--epochs` shortens it. A workdir holding a finished run is reused,
not retrained, when it trained the same settings (`train_lib.training_settings` of its config.json against
what the run's command resolves to today); a finished run of other settings, such as one trained before a
config default changed, is refused with the keys that differ, so a study command pins what it measures.
Each row records those settings, so `--reuse_json F` (an earlier `--json` of the study) stands in for
workdirs that are gone: a study grows by seeds on another machine and the report still has every row
(`rd_keras/bench/accuracy_reuse.py`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

from rd_keras.bench import accuracy_reuse, common, runner
from rd_keras import workdir as wd

RUNS = ("resnet", "plain", "rd_joint", "rd_pretrained", "kd")
FROM_TEACHER = ("rd_pretrained", "kd")  # runs that distil from the frozen ResNet of the `resnet` run


def add_arguments(parser):
    parser.add_argument("--config", default="configs/fashion_mnist.py",
                        help="trainer config, path[:variant] (default: %(default)s, offline IDX Fashion-MNIST)")
    parser.add_argument("--depths", default="56,20", help="CIFAR-style depths 6n+2 (default: %(default)s)")
    parser.add_argument("--runs", default=",".join(RUNS),
                        help="subset of %(default)s; KIND@S runs KIND with seed S only (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's (full budget)")
    parser.add_argument("--width", type=float, default=None, help="default: the config's")
    parser.add_argument("--train_subset", type=int, default=None,
                        help="first N training images; 0 = all (default: the config's)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="an extra run NAME: config overrides on top of the run named by the key `run` "
                             "(default rd_joint); repeatable")
    parser.add_argument("--seeds", default="0", help="train.seed and data.seed of every run (default: %(default)s)")
    parser.add_argument("--validation_split", type=float, default=0.0,
                        help="evaluate on this last fraction of the training images; test once at the end "
                             "(default: 0, evaluate on the test split)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config override, passed as --config.KEY=VALUE to every run (repeatable)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at once; > 1 shares the machine, so wall times grow (default: 1)")
    parser.add_argument("--out", default="runs/accuracy", help="one workdir per run under here")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--reuse_json", action="append", default=[], metavar="PATH",
                        help="an earlier --json of this command: a run whose workdir is absent takes its row "
                             "there, when it trained the same settings (repeatable; may be the --json file)")


def load_config(spec):
    """The ConfigDict of `path[:variant]`, loaded the way train.py does, to read the budget it implies."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise common.FlagError(f"--config: no such file {path!r}.")
    module_spec = importlib.util.spec_from_file_location("rd_keras_bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(variant or None)
    except ValueError as e:
        raise common.FlagError(f"--config={spec!r}: {e}") from None


def _parse_override(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise common.FlagError(f"--override must be KEY=VALUE, got {text!r}.")
    return key.strip(), value.strip()


def parse_variant(text):
    """`NAME:KEY=VALUE,...` -> (name, base run, {key: value}). A value may hold commas (a list of blocks):
    the text splits only before `KEY=`."""
    name, sep, body = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name) or not body:
        raise common.FlagError(f"--variant must be NAME:KEY=VALUE,... with NAME of letters, digits and _, "
                               f"got {text!r}.")
    if name in RUNS:
        raise common.FlagError(f"--variant name {name!r} is one of the standard runs {RUNS}; choose another.")
    overrides = dict(_parse_override(part) for part in re.split(r",(?=[\w.]+=)", body))
    base = overrides.pop("run", "rd_joint")
    if base not in RUNS:
        raise common.FlagError(f"--variant {name}: run must be one of {RUNS}, got {base!r}.")
    if "seeds" in overrides:
        overrides["seeds"] = common.parse_ints(overrides["seeds"], f"--variant {name}: seeds", minimum=0)
    return name, base, overrides


def plan(args):
    """(budget, runs): the resolved budget and one dict per run, in an order that respects dependencies."""
    config = load_config(args.config)
    depths = common.parse_ints(args.depths, "--depths", minimum=8)
    for depth in depths:
        if (depth - 2) % 6:
            raise common.FlagError(f"--depths: {depth} is not 6n+2 (8, 14, 20, 26, ...); got {args.depths!r}.")
    # `KIND@S` runs KIND with seed S only (one seed of a run that others repeat over --seeds).
    own_seeds = {}
    for item in str(args.runs).split(","):
        kind, at, seed = item.strip().partition("@")
        if at:
            own_seeds[kind] = common.parse_ints(seed, f"--runs={args.runs!r}: {kind}@", minimum=0)
    kinds = common.parse_choices(",".join(k.split("@")[0] for k in str(args.runs).split(",")), "--runs", RUNS)
    for kind in FROM_TEACHER:
        if kind in kinds and "resnet" not in kinds:
            raise common.FlagError(f"--runs={args.runs!r}: {kind} needs the resnet run as its teacher.")
    epochs = config.train.epochs if args.epochs is None else args.epochs
    width = config.model.width if args.width is None else args.width
    subset = config.data.train_subset if args.train_subset is None else args.train_subset
    common.check_positive(epochs, "--epochs")
    common.check_positive(width, "--width")
    common.check_positive(subset, "--train_subset", allow_zero=True)
    common.check_positive(args.parallel, "--parallel")
    seeds = common.parse_ints(args.seeds, "--seeds", minimum=0)
    if not 0 <= args.validation_split < 1:
        raise common.FlagError(f"--validation_split must be in [0, 1), got {args.validation_split!r}.")
    variants = [parse_variant(v) for v in args.variant]
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        raise common.FlagError(f"--variant names must differ, got {names}.")
    if any(base in FROM_TEACHER for _, base, _ in variants) and "resnet" not in kinds:
        raise common.FlagError(f"A variant of {' or '.join(FROM_TEACHER)} needs the resnet run (--runs) as its "
                               "teacher.")
    blend_epochs = config.distill.blend_epochs * epochs / config.train.epochs
    overrides = dict(_parse_override(o) for o in args.override)
    budget = {"config": args.config, "epochs": epochs, "width": width, "train_subset": subset,
              "eval_subset": config.data.eval_subset, "batch_size": config.data.batch_size,
              "lr": config.train.lr, "warmup_epochs": config.train.warmup_epochs,
              "blend_epochs": blend_epochs, "blend_floor": config.distill.blend_floor,
              "kd_alpha": config.distill.kd_alpha, "logit_kd_alpha": config.distill.logit_kd_alpha,
              "data_source": config.data.source,
              "overrides": overrides, "seeds": seeds, "validation_split": args.validation_split,
              "variants": {name: {"run": base, **{k: v for k, v in o.items() if k != "seeds"}}
                           for name, base, o in variants}}
    common_flags = {"train.epochs": epochs, "model.width": width, "data.train_subset": subset,
                    "distill.blend_epochs": blend_epochs, "train.progress": False, **overrides}
    if args.validation_split:
        common_flags["data.validation_split"] = args.validation_split
    per_kind = {
        "resnet": {"train.mode": "supervised", "model.supervised_shortcuts": "all"},
        "plain": {"train.mode": "supervised", "model.supervised_shortcuts": "none"},
        "rd_joint": {"train.mode": "distill", "teacher.mode": "joint"},
        "rd_pretrained": {"train.mode": "distill", "teacher.mode": "pretrained"},
        "kd": {"train.mode": "distill", "teacher.mode": "pretrained", "distill.hybrid_points": "none",
               "distill.logit_kd_alpha": 1.0},
    }
    entries = [(kind, kind, {"seeds": own_seeds[kind]} if kind in own_seeds else {}) for kind in RUNS
               if kind in kinds] + variants
    runs = []
    for depth in depths:
        for seed in seeds:
            # The config's own seed keeps the plain names and commands, so its finished runs are reused
            # when more seeds are added later.
            own = seed == config.train.seed == config.data.seed
            suffix = "" if own else f"_s{seed}"
            seed_flags = {} if own else {"train.seed": seed, "data.seed": seed}
            for name, base, extra in entries:
                extra = dict(extra)
                if seed not in extra.pop("seeds", seeds):
                    continue
                workdir = os.path.join(args.out, f"d{depth}_{name}{suffix}")
                flags = {**common_flags, "model.arch": f"resnet{depth}", **per_kind[base], **seed_flags}
                teacher_run = f"d{depth}_resnet{suffix}" if base in FROM_TEACHER else None
                if teacher_run:
                    flags["teacher.path"] = os.path.join(args.out, teacher_run)
                flags.update(extra)
                command = runner.train_command(args.config, workdir, flags)
                runs.append({"name": f"d{depth}_{name}{suffix}", "depth": depth, "kind": name, "base": base,
                             "seed": seed, "workdir": workdir, "command": command, "needs": teacher_run})
    return budget, runs


# ----------------------------------------------------------------------------- reading the results


def read_metrics(workdir):
    path = wd.metrics_path(workdir)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_train_scalars(workdir):
    """Per log point, the training scalars the run wrote to TensorBoard (`tensorboard/train`): {"step": [...],
    tag: [...]} for the losses, accuracy, learning rate, blend weight and `grad_norm/...` tags."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    events = event_accumulator.EventAccumulator(wd.tensorboard_dir(workdir, "train"),
                                                size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    by_step = {}
    for tag in events.Tags()["tensors"]:
        for e in events.Tensors(tag):
            by_step.setdefault(e.step, {})[tag] = float(tensor_util.make_ndarray(e.tensor_proto))
    steps = sorted(by_step)
    tags = sorted({t for values in by_step.values() for t in values})
    return {"step": steps, **{t: [by_step[s].get(t) for s in steps] for t in tags}}


def curves(records):
    """Learning curves of a run: per evaluation, the trained net's accuracy and loss on the split it was
    evaluated on while training (`val_acc`/`val_loss` with a validation split, else `test_acc`/`test_loss`),
    its train CE, and for RD runs the teacher's accuracy and the hybrid paths' accuracies."""
    distill = "plain_ce" in records[0]
    split = "val" if "test_acc" in records[-1] else "test"
    out = {"epoch": [r["epoch"] for r in records], "step": [r["step"] for r in records],
           f"{split}_acc": [r["acc"] for r in records], f"{split}_loss": [r["loss"] for r in records],
           "train_ce": [r.get("plain_ce" if distill else "ce") for r in records],
           "train_total": [r.get("total") for r in records]}
    if distill:
        out["teacher_acc"] = [r.get("teacher_acc") for r in records]
        out["hybrid_acc"] = [r.get("hybrid_acc") for r in records]
    return out


def summarize_run(run, done):
    """One run's numbers. With a validation split, `test_acc` (and `teacher_acc`) come from the one test
    evaluation at the end, `val_acc` and the curves from the validation split."""
    entry = {"name": run["name"], "depth": run["depth"], "kind": run["kind"], "base": run.get("base", run["kind"]),
             "seed": run.get("seed", 0), "workdir": run["workdir"], "needs": run.get("needs")}
    if run["name"] not in done:
        return {**entry, "failed": True}
    if "row" in done[run["name"]]:  # from an earlier results file: its numbers, today's name for the workdir
        return {**done[run["name"]]["row"], **entry, "reused": True}
    records = read_metrics(run["workdir"])
    c, last = curves(records), records[-1]
    validated = "test_acc" in last
    entry.update(test_acc=last["test_acc"] if validated else last["acc"],
                 val_acc=last["acc"] if validated else None, final_train_ce=c["train_ce"][-1],
                 wall_s=done[run["name"]]["wall_s"], reused=done[run["name"]]["reused"],
                 command=done[run["name"]]["command"], code_versions=wd.code_versions(run["workdir"]),
                 teacher_acc=last.get("test_teacher_acc" if validated else "teacher_acc"),
                 teacher_val_acc=last.get("teacher_acc") if validated else None, curves=c,
                 train_curves=read_train_scalars(run["workdir"]),
                 settings=accuracy_reuse.settings_of_workdir(run["workdir"]))
    return entry


def add_teacher_time(results):
    """`total_wall_s` of every run: its own wall time, plus its teacher's for runs from a pretrained one."""
    by_name = {r["name"]: r for r in results}
    for r in results:
        if r.get("failed"):
            continue
        teacher = by_name.get(r.get("needs") or "")
        r["total_wall_s"] = r["wall_s"] + (teacher["wall_s"] if teacher and not teacher.get("failed") else 0.0)
    return results


def version_note(results) -> str | None:
    """A line naming the code versions behind the rows when they differ (None when all agree)."""
    versions = sorted({" + ".join(r.get("code_versions") or ["unrecorded"]) for r in results
                       if not r.get("failed")})
    if len(versions) < 2:
        return None
    return f"rows come from {len(versions)} code versions: " + "; ".join(versions)


def aggregate(results):
    """Per (depth, run kind) over seeds: mean, min and max of the test and validation accuracies (and the
    teacher's), and the share of the plain-vs-ResNet gap closed by the mean (against the same depth's
    `plain` and `resnet` means, or the joint teachers' when there is no resnet run)."""
    groups = {}
    for r in results:
        if not r.get("failed"):
            groups.setdefault((r["depth"], r["kind"]), []).append(r)
    rows = []
    for (depth, kind), rs in groups.items():
        row = {"depth": depth, "kind": kind, "seeds": [r.get("seed", 0) for r in rs]}
        for key in ("test_acc", "val_acc", "teacher_acc", "teacher_val_acc", "total_wall_s"):
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                row[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                            "n": len(values)}
        rows.append(row)
    for row in rows:
        same = {r["kind"]: r for r in rows if r["depth"] == row["depth"]}
        for split, teacher_key in (("test_acc", "teacher_acc"), ("val_acc", "teacher_val_acc")):
            plain = same.get("plain", {}).get(split)
            resnet = same.get("resnet", {}).get(split) or same.get("rd_joint", {}).get(teacher_key)
            if plain and resnet and row.get(split) and resnet["mean"] != plain["mean"] and row["kind"] not in (
                    "plain", "resnet"):
                row[f"gap_closed_{split}"] = (row[split]["mean"] - plain["mean"]) / (resnet["mean"] - plain["mean"])
    return rows


def _pct(value):
    return None if value is None else 100 * value


def table(results) -> str:
    rows = []
    for r in results:
        if r.get("failed"):
            rows.append([r["depth"], r["name"], None, None, None, None, None, None, "failed"])
            continue
        rows.append([r["depth"], r["name"], _pct(r.get("val_acc")), 100 * r["test_acc"], _pct(r["teacher_acc"]),
                     r["final_train_ce"], r["wall_s"] / 60, r.get("total_wall_s", r["wall_s"]) / 60,
                     "reused" if r["reused"] else ""])
    header = ["depth", "run", "val acc %", "test acc %", "teacher test acc %", "final train CE", "wall min",
              "+ teacher min", ""]
    return common.format_table(rows, header)


def summary_table(rows) -> str:
    def spread(stat):
        return "" if not stat else f"{100 * stat['mean']:.2f} ({100 * stat['min']:.2f}-{100 * stat['max']:.2f})"

    def minutes(stat):
        return None if not stat else stat["mean"] / 60

    body = [[r["depth"], r["kind"], len(r["seeds"]), spread(r.get("val_acc")), spread(r.get("test_acc")),
             _pct(r.get("gap_closed_val_acc")), _pct(r.get("gap_closed_test_acc")), minutes(r.get("total_wall_s"))]
            for r in rows]
    header = ["depth", "run", "seeds", "val acc % mean (min-max)", "test acc % mean (min-max)",
              "gap closed % (val)", "gap closed % (test)", "total wall min (mean)"]
    return common.format_table(body, header)


def run(args):
    load_at_start = common.load_average()
    budget, runs = plan(args)
    done, failed = runner.execute(runs, args.parallel, accuracy_reuse.read_rows(args.reuse_json))
    results = add_teacher_time([summarize_run(r, done) for r in runs])
    summary = aggregate(results)
    payload = {"command": "accuracy", "machine": common.machine(args.argv, load_at_start), "budget": budget,
               "settings": {"parallel": args.parallel, "out": args.out, "reuse_json": args.reuse_json},
               "results": results, "summary": summary}
    if args.json:  # first: the finished runs are on record whatever printing does
        common.write_json(args.json, payload)
    print(f"budget: {budget['epochs']} epochs, width {budget['width']}, train_subset {budget['train_subset']} "
          f"(0 = all), batch {budget['batch_size']}, validation_split {budget['validation_split']}, "
          f"config {budget['config']}")
    print(table(results))
    print(summary_table(summary))
    note = version_note(results)
    if note:
        print(note)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return payload
