"""`bench transfer`: do RD-trained plain nets transfer to new classes as well as their ResNets?

Source: one RD run (`teacher.mode=joint`) of depth `--depth` on Fashion-MNIST's `--source_classes`
(`data.classes`), giving ResNet-D (the joint teacher, trained on its own cross-entropy alone) and plain-D
(the RD student). With `plain` in `--runs`, also plain-D trained alone on the same classes (no RD).

Target: `--target_train` training and `--target_test` test images of the other classes
(`--target_classes`, Fashion-MNIST's train and test splits), written as a PNG image folder under
`--out/target`. Each source net is fine-tuned on it by `train.py --config=configs/transfer.py`
(`train.mode=transfer`: new head, every other weight copied, `--ft_epochs` at `--ft_lr`); with `scratch`
in `--runs`, ResNet-D and plain-D are also trained on the target from random weights (same epochs, lr 0.1)
to show what the source training is worth.

Reported: every net's test accuracy on the source classes and, after fine-tuning, on the target folder's
test split (the final epoch, nothing chosen on it), wall times, and the whole budget. Every run is a
train.py command in its own workdir under `--out`; a finished one is reused, not retrained.
"""

from __future__ import annotations

import json
import os

import numpy as np

from rd_keras.bench import accuracy as bench_accuracy
from rd_keras import workdir as wd
from rd_keras.bench import common, runner

FMNIST_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
RUNS = ("rd", "plain", "scratch")
# Fashion-MNIST's pixel statistics: the target folder holds Fashion-MNIST images, so the fine-tuned nets
# see the normalisation their source run used.
MEAN, STD = (0.2860,), (0.3530,)
# Linear warm-up over this share of every run, so that short budgets keep a warm-up and a decay.
WARMUP_SHARE = 0.1


def add_arguments(parser):
    parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX files")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR-style depth 6n+2 (default: %(default)s)")
    parser.add_argument("--width", type=float, default=0.5, help="channel multiplier (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="source training epochs (default: %(default)s)")
    parser.add_argument("--train_subset", type=int, default=0,
                        help="first N source-class training images; 0 = all, ~30,000 (default: %(default)s)")
    parser.add_argument("--source_classes", default="0,1,2,3,4", help="default: %(default)s")
    parser.add_argument("--target_classes", default="5,6,7,8,9", help="default: %(default)s")
    parser.add_argument("--target_train", type=int, default=500, help="target training images (default: %(default)s)")
    parser.add_argument("--target_test", type=int, default=1000, help="target test images (default: %(default)s)")
    parser.add_argument("--ft_epochs", type=int, default=10, help="fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--ft_lr", type=float, default=0.01, help="fine-tuning learning rate (default: %(default)s)")
    parser.add_argument("--freeze_stages", type=int, default=0, help="transfer.freeze_stages (default: 0)")
    parser.add_argument("--runs", default=",".join(RUNS), help="subset of %(default)s")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every source run (repeatable), e.g. train.steps_per_run=30")
    parser.add_argument("--out", default="runs/transfer", help="image folder and one workdir per run under here")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def _classes(text, flag):
    classes = common.parse_ints(text, flag, minimum=0)
    if len(set(classes)) != len(classes) or len(classes) < 2 or max(classes) > 9:
        raise common.FlagError(f"{flag} must be at least two distinct labels in 0..9, got {text!r}.")
    return classes


def check(args):
    source, target = _classes(args.source_classes, "--source_classes"), _classes(args.target_classes, "--target_classes")
    if set(source) & set(target):
        raise common.FlagError(f"--source_classes={args.source_classes!r} and --target_classes="
                               f"{args.target_classes!r} must be disjoint.")
    if args.depth < 8 or (args.depth - 2) % 6:
        raise common.FlagError(f"--depth must be 6n+2 (8, 14, 20, ...), got {args.depth!r}.")
    for flag in ("width", "epochs", "target_train", "target_test", "ft_epochs", "ft_lr"):
        common.check_positive(getattr(args, flag), f"--{flag}")
    common.check_positive(args.train_subset, "--train_subset", allow_zero=True)
    common.check_positive(args.freeze_stages, "--freeze_stages", allow_zero=True)
    runs = common.parse_choices(args.runs, "--runs", RUNS)
    if "rd" not in runs:
        raise common.FlagError(f"--runs must include rd (the ResNet and the RD plain net), got {args.runs!r}.")
    return source, target, runs


# ----------------------------------------------------------------------------- the target image folder


def write_target_folder(root, data_dir, classes, n_train, n_test):
    """The first `n_train` (`n_test`) images of `classes` from the train (test) split as
    `root/{train,test}/<k>_<name>/<index>.png`, k the position in `classes`, so sorted folder names keep
    that order. Returns {split: count}. An existing complete folder is kept."""
    from PIL import Image

    from rd_keras import data

    done = os.path.join(root, "done.json")
    wanted = {"classes": classes, "train": n_train, "test": n_test, "data_dir": data_dir}
    if os.path.isfile(done):
        with open(done) as f:
            if json.load(f) == wanted:
                return {"train": n_train, "test": n_test}
        raise common.FlagError(f"{root!r} holds a target folder of other settings; remove it or choose another --out.")
    counts = {}
    for split, n, stem in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = data.read_idx(os.path.join(data_dir, f"{stem}-images-idx3-ubyte.gz"), 3)
        labels = data.read_idx(os.path.join(data_dir, f"{stem}-labels-idx1-ubyte.gz"), 1)
        chosen = np.flatnonzero(np.isin(labels, classes))[:n]
        if len(chosen) < n:
            raise common.FlagError(f"--target_{split}={n}: the {split} split has only {len(chosen)} images of "
                                   f"classes {classes}.")
        for k, label in enumerate(classes):
            os.makedirs(os.path.join(root, split, f"{k}_{FMNIST_NAMES[label]}"), exist_ok=True)
        for i in chosen:
            k = classes.index(int(labels[i]))
            Image.fromarray(images[i]).save(os.path.join(root, split, f"{k}_{FMNIST_NAMES[labels[i]]}", f"{i:05d}.png"))
        counts[split] = len(chosen)
    with open(done, "w") as f:
        json.dump(wanted, f)
    return counts


# ----------------------------------------------------------------------------- the runs


def plan(args, source, target, runs):
    """One dict per train.py run, sources before the fine-tunes that need them."""
    out, arch = args.out, f"resnet{args.depth}"
    folder = os.path.join(out, "target")
    overrides = dict(bench_accuracy._parse_override(o) for o in args.override)
    src = {"data.classes": tuple(source), "data.data_dir": args.data_dir, "model.arch": arch,
           "model.width": args.width, "train.epochs": args.epochs, "data.train_subset": args.train_subset,
           "distill.blend_epochs": 2 / 3 * args.epochs,  # the share of configs/fashion_mnist.py (20 of 30)
           "train.warmup_epochs": WARMUP_SHARE * args.epochs,
           "train.progress": False, **overrides}
    tgt = {"data.data_dir": folder, "data.channels": 1, "data.mean": MEAN, "data.std": STD,
           "train.epochs": args.ft_epochs, "train.warmup_epochs": WARMUP_SHARE * args.ft_epochs,
           "train.progress": False}
    plans = [("src_rd", None, "configs/fashion_mnist.py", {**src, "train.mode": "distill", "teacher.mode": "joint"})]
    if "plain" in runs:
        plans.append(("src_plain", None, "configs/fashion_mnist.py",
                      {**src, "train.mode": "supervised", "model.supervised_shortcuts": "none"}))
    # (name, source run, file in it)
    fine_tunes = [("resnet", "src_rd", wd.RESNET_FILE), ("plain_rd", "src_rd", wd.PLAIN_FILE)]
    if "plain" in runs:
        fine_tunes.append(("plain", "src_plain", wd.PLAIN_FILE))
    for name, needs, file in fine_tunes:
        plans.append((f"ft_{name}", needs, "configs/transfer.py",
                      {**tgt, "transfer.from": os.path.join(out, needs, file), "train.lr": args.ft_lr,
                       "transfer.freeze_stages": args.freeze_stages}))
    if "scratch" in runs:
        for name, shortcuts in (("resnet", "all"), ("plain", "none")):
            plans.append((f"scratch_{name}", None, "configs/transfer.py",
                          {**tgt, "train.mode": "supervised", "model.arch": arch, "model.width": args.width,
                           "model.supervised_shortcuts": shortcuts, "train.lr": 0.1}))
    return [{"name": name, "needs": needs, "workdir": os.path.join(out, name),
             "command": runner.train_command(config, os.path.join(out, name), flags)}
            for name, needs, config, flags in plans]


def _final(workdir):
    return bench_accuracy.read_metrics(workdir)[-1]


def summarize(runs, done):
    """Rows: each net with its source-class accuracy and its accuracy on the target after fine-tuning."""
    by_name = {r["name"]: r for r in runs}
    rows = []
    for name, source_run, key in (("resnet", "src_rd", "teacher_acc"), ("plain_rd", "src_rd", "plain_acc"),
                                  ("plain", "src_plain", "acc"), ("scratch_resnet", None, None),
                                  ("scratch_plain", None, None)):
        run = by_name.get(name if name.startswith("scratch") else f"ft_{name}")
        if run is None:
            continue
        row = {"net": name, "run": run["name"], "workdir": run["workdir"]}
        if run["name"] not in done or (source_run and source_run not in done):
            rows.append({**row, "failed": True})
            continue
        last = _final(run["workdir"])
        row.update(target_test_acc=last["acc"], wall_s=done[run["name"]]["wall_s"],
                   reused=done[run["name"]]["reused"], command=done[run["name"]]["command"],
                   target_curve=[r["acc"] for r in bench_accuracy.read_metrics(run["workdir"])])
        if source_run:
            row.update(source_test_acc=_final(by_name[source_run]["workdir"])[key],
                       source_wall_s=done[source_run]["wall_s"])
        rows.append(row)
    return rows


def _pct(value):
    return None if value is None else 100 * value


def table(rows) -> str:
    labels = {"resnet": "ResNet (RD run's joint teacher)", "plain_rd": "plain + RD", "plain": "plain (alone)",
              "scratch_resnet": "ResNet from scratch on target", "scratch_plain": "plain from scratch on target"}
    body = [[labels[r["net"]], _pct(r.get("source_test_acc")), _pct(r.get("target_test_acc")),
             None if r.get("failed") else r["wall_s"] / 60, "failed" if r.get("failed") else ""] for r in rows]
    return common.format_table(body, ["net", "source-class test acc %", "target test acc %", "fine-tune min", ""])


def run(args):
    load_at_start = common.load_average()
    source, target, runs = check(args)
    counts = write_target_folder(os.path.join(args.out, "target"), args.data_dir, target, args.target_train,
                                 args.target_test)
    planned = plan(args, source, target, runs)
    done, failed = runner.execute(planned, 1)
    rows = summarize(planned, done)
    budget = {"depth": args.depth, "width": args.width, "source_epochs": args.epochs,
              "source_train_subset": args.train_subset, "source_classes": source, "target_classes": target,
              "target_train": counts["train"], "target_test": counts["test"], "ft_epochs": args.ft_epochs,
              "ft_lr": args.ft_lr, "freeze_stages": args.freeze_stages, "scratch_lr": 0.1,
              "warmup_share": WARMUP_SHARE, "batch_size_source": 128, "batch_size_target": 32,
              "overrides": args.override, "runs": runs}
    payload = {"command": "transfer", "machine": common.machine(args.argv, load_at_start), "budget": budget,
               "results": rows, "runs": {r["name"]: r["command"] for r in planned}}
    print(f"budget: source depth {args.depth}, width {args.width}, {args.epochs} epochs on classes {source} "
          f"(train_subset {args.train_subset}, 0 = all); target classes {target}: {counts['train']} train / "
          f"{counts['test']} test images, {args.ft_epochs} fine-tune epochs at lr {args.ft_lr}, freeze_stages "
          f"{args.freeze_stages}")
    print(table(rows))
    if args.json:
        common.write_json(args.json, payload)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return payload


# ----------------------------------------------------------------------------- docs/results.md


def report_section(payload) -> str:
    """The "Transfer" section of docs/results.md (`bench report`), read off the numbers."""
    b, rows = payload["budget"], {r["net"]: r for r in payload["results"] if not r.get("failed")}
    labels = {"resnet": "ResNet (the RD run's joint teacher)", "plain_rd": "plain + RD", "plain": "plain alone",
              "scratch_resnet": "ResNet, random init", "scratch_plain": "plain, random init"}
    body = [[labels[name], _pct(r.get("source_test_acc")), _pct(r["target_test_acc"]), r["wall_s"] / 60]
            for name, r in rows.items()]
    lines = [
        "## Transfer: do RD plain nets fine-tune as well as ResNets?",
        common.provenance(payload),
        f"Source: ResNet-{b['depth']} and plain-{b['depth']} (width {b['width']}) trained {b['source_epochs']} "
        f"epochs on Fashion-MNIST classes {b['source_classes']} (first {b['source_train_subset'] or 'all'} of "
        f"their training images; source accuracy on their 5,000 test images): one RD run with a joint teacher "
        f"gives both, plus plain-{b['depth']} trained alone. Target: classes {b['target_classes']}, "
        f"{b['target_train']} training and {b['target_test']} test images written as a PNG folder; each net "
        f"fine-tuned by `train.mode=transfer` for {b['ft_epochs']} epochs at lr {b['ft_lr']} (new head, "
        f"freeze_stages {b['freeze_stages']}); random-init rows train the same nets on the target alone (lr "
        f"{b['scratch_lr']}). Target accuracy after the last epoch; nothing was chosen on the test images.",
        common.md_table(body, ["net", "source test acc %", "target test acc %", "target run, wall min"]),
    ]
    if "resnet" in rows and "plain_rd" in rows:
        gap = 100 * (rows["plain_rd"]["target_test_acc"] - rows["resnet"]["target_test_acc"])
        verdict = "ahead of" if gap > 0 else "behind"
        lines.append(f"At this budget the RD plain net transfers {abs(gap):.1f} points {verdict} its ResNet on the "
                     "target classes. One seed and a small budget: differences of a few points are within "
                     "run-to-run noise.")
    tuned = [r["target_test_acc"] for name, r in rows.items() if not name.startswith("scratch")]
    scratch = [r["target_test_acc"] for name, r in rows.items() if name.startswith("scratch")]
    if tuned and scratch:
        helped = max(tuned) > max(scratch)
        lines.append(f"Fine-tuned nets reach {100 * min(tuned):.1f}-{100 * max(tuned):.1f}%, nets trained on the "
                     f"target alone {100 * min(scratch):.1f}-{100 * max(scratch):.1f}%: at this budget the source "
                     + ("training helped." if helped else "training did not help, so this run does not separate "
                        "how well plain and ResNet features transfer; a longer source training is needed for that."))
    return "\n\n".join(lines)
