"""`bench report`: regenerate docs/results.md and its plots from the JSON files the other commands saved.

Reads `<results_dir>/{inference,memory,train_step,accuracy,transfer,exact_inference,exact_memory}.json` (any
that exist; the last two are `bench inference` and `bench memory` runs for the exact-conversion section),
writes `--out` (markdown: machine, budget, date and exact command of every measurement, the tables, and
the comparison with the paper's claims computed from the numbers) and PNG plots under `--img_dir` (matplotlib, Agg):
`accuracy_curves.png`, `grad_norms.png`, `inference.png`, `memory.png`. Nothing is measured here.
"""

from __future__ import annotations

import json
import os

from rd_keras.bench import accuracy_report, exact_report
from rd_keras.bench import common
from rd_keras.bench.common import md_table, provenance

FILES = {"inference": "inference.json", "memory": "memory.json", "train-step": "train_step.json",
         "transfer": "transfer.json", "feature-scale": "feature_scale.json",
         "accuracy": "accuracy.json", **exact_report.FILES}
PAPER = {"speedup": 1.4, "memory_ratio": 1.25, "memory_share": 0.40}


def add_arguments(parser):
    parser.add_argument("--results_dir", default=common.RESULTS_DIR, help="where the JSON files are")
    parser.add_argument("--out", default=os.path.join("docs", "results.md"), help="markdown file to write")
    parser.add_argument("--img_dir", default=os.path.join("docs", "img"), help="where the PNG plots go")


def load(results_dir):
    """{command: payload} for the FILES present, plus every further accuracy study `accuracy_<name>.json`
    under the key `accuracy_<name>`."""
    found = {}
    names = dict(FILES)
    if os.path.isdir(results_dir):
        names.update({f[:-5]: f for f in sorted(os.listdir(results_dir))
                      if f.startswith("accuracy_") and f.endswith(".json")})
    for command, name in names.items():
        path = os.path.join(results_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                found[command] = json.load(f)
    return found


def accuracy_studies(found):
    """The accuracy payloads, main study first: [(key, payload)]."""
    return sorted(((k, v) for k, v in found.items() if k == "accuracy" or k.startswith("accuracy_")),
                  key=lambda kv: (kv[0] != "accuracy", kv[0]))


# ----------------------------------------------------------------------------- sections


def _has_exact(payload):
    """Whether an inference or memory payload has the third row, the exact conversion (older JSON files
    compare the ResNet and the plain net only)."""
    return any("exact" in figure for r in payload["results"]
               for figure in r.get("measurements") or [r["liveness"]["fp32"]])


def inference_section(payload, img):
    exact = _has_exact(payload)
    rows = []
    for r in payload["results"]:
        for m in r["measurements"]:
            latency = m["batch_size"] == 1
            key = "median_ms" if latency else "images_per_s"
            sides = common.SIDES if exact else ("resnet", "plain")
            rows.append([r["pair"], m["runtime"], m["batch_size"], "ms" if latency else "img/s",
                         *(m[side][key] for side in sides), *(m[side]["p90_ms"] for side in sides),
                         m["speedup"], m["paired_speedup"]["median"],
                         f"{m['paired_speedup']['q25']:.2f}–{m['paired_speedup']['q75']:.2f}",
                         *([m["exact_speedup"], m["paired_exact_speedup"]["median"]] if exact else []),
                         min(m[side]["runs"] for side in sides), m.get("load_average")])
    sizes = [[r["pair"], r["params"]["resnet"] / 1e6, r["params"]["plain"] / 1e6,
              r["multiply_adds"]["resnet"] / 1e6, r["multiply_adds"]["plain"] / 1e6, r["multiply_adds"]["ratio"],
              *([r["multiply_adds"]["exact"] / 1e6, r["multiply_adds"]["exact_ratio"]] if exact else [])]
             for r in payload["results"] if "multiply_adds" in r]
    s = payload["settings"]
    names = ["ResNet", "plain", *(["exact"] if exact else [])]
    return "\n\n".join([
        "## Inference speed",
        provenance(payload),
        "What arithmetic alone predicts: the plain twin drops only the projection convs' multiply-adds "
        "(MACs per image); identity shortcuts cost an add and memory traffic, no MACs."
        + (" **exact**: the ResNet's exact conversion (`rd_keras.export.exact`), whose widened convs are "
           "computed dense." if exact else ""),
        md_table(sizes, ["pair", "ResNet params (M)", "plain params (M)", "ResNet MMACs", "plain MMACs",
                         "MAC ratio", *(["exact MMACs", "exact / plain MACs"] if exact else [])]) if sizes else "",
        f"Random weights, BN folded. Batch 1: median latency; batch > 1: images/s from the median batch "
        f"time. Each pair timed interleaved in one process ({s['warmup']} warm-up round(s), then "
        f"{s['min_runs']}–{s['runs']} rounds or {s['budget_s']} s). TFLite: XNNPACK delegate with "
        f"`_t<threads>` threads; Keras and SavedModel: TensorFlow's own thread pool "
        f"({s['tf_intra_op_threads']}). **speedup** = ResNet time / plain time (paper: "
        f"{PAPER['speedup']}x); **paired** = median of the per-round ratios, with its interquartile range; "
        + ("**exact / plain** = exact conversion time / plain time, and its paired median; " if exact else "")
        + f"**load** = the 1-minute load average when the measurement ended (this benchmark itself counts "
        f"about 1-2; more means other processes were competing for the {payload['machine']['cpu_cores']} cores).",
        md_table(rows, ["pair", "runtime", "batch", "unit", *names, *(f"{n} p90 ms" for n in names),
                        "speedup", "paired", "paired IQR", *(["exact / plain", "paired"] if exact else []),
                        "runs", "load"]),
        f"![inference]({img}/inference.png)",
    ])


def memory_section(payload, img):
    from rd_keras.bench import memory as bench_memory

    exact = _has_exact(payload)
    rows = bench_memory.rows(payload["results"])
    if not exact:  # drop the empty exact columns of an older file
        rows = [[*r[:4], *r[5:7]] for r in rows]
    s = payload["settings"]
    return "\n\n".join([
        "## Feature-map memory at inference",
        provenance(payload),
        f"**liveness**: peak bytes of feature maps alive at once in the BN-folded classifier (exact walk, "
        f"conv+ReLU fused as TFLite does), fp32 and int8, batch {s['batch_size']}. **tflite arena**: "
        f"the read-write arena TFLite's planner allocates (feature maps plus kernel scratch such as im2col; "
        f"builtin kernels, 1 thread). **rss**: peak growth of a fresh process's resident memory during its "
        f"first batch-{s['rss_batch']} call (Keras/TF, or LiteRT with XNNPACK, 1 thread); *{bench_memory.BELOW_RESOLUTION}*: "
        f"a growth smaller than the input and output of the net's largest conv, which the call must hold, "
        f"so the call ran in memory the process already held and the reading measures nothing. **two-buffer "
        f"floor**: the largest input+output of a single layer, which no net of this shape sequence can go "
        f"below. ratio = ResNet / plain (paper: {PAPER['memory_ratio']}x); shortcut % = 1 - plain / ResNet "
        f"(paper: ~{PAPER['memory_share']:.0%} for ResNet-50)"
        + ("; exact / plain = the exact conversion's figure / plain." if exact else "."),
        md_table(rows, ["pair", "measure", "ResNet MiB", "plain MiB", *(["exact MiB"] if exact else []), "ratio",
                        "shortcut %", *(["exact / plain"] if exact else [])]),
        f"![memory]({img}/memory.png)",
    ])


def train_step_section(payload):
    rows = []
    for r in payload["results"]:
        for combo in r["combinations"]:
            jit = "on" if combo["jit_compile"] else "off"
            if "skipped" in combo:
                rows.append([combo["precision"], jit, "skipped: " + combo["skipped"][:120].replace("|", "/"),
                             None, None, None, None])
                continue
            for kind, st in combo["steps"].items():
                rows.append([combo["precision"], jit, kind, st["images_per_s"], st["median_ms"], st.get("relative"),
                             st["runs"]])
    r = payload["results"][0]
    return "\n\n".join([
        "## Training step throughput",
        provenance(payload),
        f"{r['pair']} at {tuple(r['input_shape'])}, batch {r['batch_size']}, on the {r['device']}, synthetic "
        f"data, steps built by `rd_keras.distill.build_train_step`. **relative** = step time / supervised "
        f"ResNet step time. `rd_joint` updates plain net and teacher; `rd_pretrained` only the plain net.",
        md_table(rows, ["precision", "XLA", "step", "img/s", "median ms", "relative", "runs"]),
    ])


def claims_section(found):
    """The paper's three numbers next to ours, taken from the largest measured pair."""
    rows = []
    for _, payload in accuracy_studies(found):
        rows += accuracy_report.claim_rows(payload)
    if "inference" in found:
        for r in found["inference"]["results"]:
            if r["resnet"] != "resnet50":
                continue
            for m in r["measurements"]:
                paired = m["paired_speedup"]["median"]
                rows.append(["~1.4x faster", f"ResNet-50 {m['runtime']} batch {m['batch_size']}",
                             f"{PAPER['speedup']}x", f"{m['speedup']:.2f}x (paired {paired:.2f}x)"])
    if "memory" in found:
        for r in found["memory"]["results"]:
            if r["resnet"] != "resnet50":
                continue
            figures = [("liveness fp32", r["liveness"]["fp32"]), ("TFLite arena fp32", r["tflite_arena"]["fp32"]),
                       ("TFLite arena int8", r["tflite_arena"]["int8"])]
            figures += [(f"peak RSS {e} batch {v['batch_size']}", v) for e, v in r["rss"].items()]
            for name, v in figures:
                if v["ratio"] is None:
                    continue
                rows.append(["1.25x less memory, shortcuts ~40%", f"ResNet-50 {name}",
                             f"{PAPER['memory_ratio']}x / {PAPER['memory_share']:.0%}",
                             f"{v['ratio']:.2f}x / {v['shortcut_share']:.0%}"])
    if not rows:
        return ""
    return "\n\n".join(["## The paper's claims against our measurements",
                        md_table(rows, ["claim", "measured on", "paper", "ours"])])


# ----------------------------------------------------------------------------- plots


def plot_inference(payload, path):
    import matplotlib.pyplot as plt
    import numpy as np

    results = payload["results"]
    sides = common.SIDES if _has_exact(payload) else ("resnet", "plain")
    width = 0.8 / len(sides)
    batches = sorted({m["batch_size"] for r in results for m in r["measurements"]})
    fig, axes = plt.subplots(len(batches), len(results), figsize=(4.5 * len(results), 3.8 * len(batches)),
                             squeeze=False)
    for col, r in enumerate(results):
        labels = {"resnet": r["resnet"], "plain": r["plain"], "exact": "exact conversion"}
        for row, batch in enumerate(batches):
            ms = [m for m in r["measurements"] if m["batch_size"] == batch]
            key = "median_ms" if batch == 1 else "images_per_s"
            x = np.arange(len(ms))
            ax = axes[row][col]
            for k, side in enumerate(sides):
                ax.bar(x + (k - (len(sides) - 1) / 2) * width, [m[side][key] for m in ms], width, label=labels[side])
            for i, m in enumerate(ms):
                ax.annotate(f"{m['speedup']:.2f}x", (i, max(m[side][key] for side in sides)),
                            ha="center", va="bottom", fontsize=7)
            ax.set_xticks(x, [m["runtime"] for m in ms], rotation=45, ha="right", fontsize=7)
            ax.set(title=f"{r['pair']} batch {batch}",
                   ylabel="median latency (ms)" if batch == 1 else "images/s")
            ax.legend(fontsize=7)
    fig.suptitle("ResNet vs plain twin (labels: speedup = ResNet time / plain time)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_memory(payload, path):
    import matplotlib.pyplot as plt
    import numpy as np

    from rd_keras.bench import memory as bench_memory

    def number(v):
        return isinstance(v, (int, float))

    # Figures measured on both ResNet and plain net (not a peak RSS below resolution).
    rows = [r for r in bench_memory.rows(payload["results"]) if r[5] is not None]
    sides = [(2, "ResNet"), (3, "plain")] + ([(4, "exact conversion")] if _has_exact(payload) else [])
    width = 0.8 / len(sides)
    pairs = list(dict.fromkeys(r[0] for r in rows))
    measures = list(dict.fromkeys(r[1] for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4.5), squeeze=False)
    for col, pair in enumerate(pairs):
        ax = axes[0][col]
        sel = {r[1]: r for r in rows if r[0] == pair}
        names = [m for m in measures if m in sel]
        x = np.arange(len(names))
        for k, (index, label) in enumerate(sides):
            ax.bar(x + (k - (len(sides) - 1) / 2) * width,
                   [sel[n][index] if number(sel[n][index]) else 0 for n in names], width, label=label)
        for i, n in enumerate(names):
            top = max(sel[n][index] for index, _ in sides if number(sel[n][index]))
            ax.annotate(f"{sel[n][5]:.2f}x", (i, top), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set(title=pair, ylabel="MiB", yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle("Feature-map memory, ResNet vs plain\n(labels: ratio ResNet / plain)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def run(args):
    import matplotlib

    matplotlib.use("Agg")
    found = load(args.results_dir)
    if not found:
        raise common.FlagError(f"--results_dir={args.results_dir!r} holds none of {sorted(FILES.values())}; "
                               "run the other sub-commands with --json there first.")
    os.makedirs(args.img_dir, exist_ok=True)
    img = os.path.relpath(args.img_dir, os.path.dirname(os.path.abspath(args.out)))
    sections = ["# Measured results: Residual Distillation on our models",
                "Generated by `python -m rd_keras.bench report` (`make results`) from "
                f"`{args.results_dir}/*.json`; do not edit by hand. Every number below was measured by the "
                "command shown with it; nothing is taken from the paper except the claims it is compared to."]
    claims = claims_section(found)
    if claims:
        sections.append(claims)
    for key, payload in accuracy_studies(found):
        curves = f"{key}_curves.png"
        accuracy_report.plot_curves(payload, os.path.join(args.img_dir, curves))
        norms = f"{key}_grad_norms.png" if key != "accuracy" else "grad_norms.png"
        norms = norms if accuracy_report.plot_grad_norms(payload, os.path.join(args.img_dir, norms)) else None
        sections.append(accuracy_report.section(payload, img, curves=curves, grad_norms=norms))
    if "inference" in found:
        plot_inference(found["inference"], os.path.join(args.img_dir, "inference.png"))
        sections.append(inference_section(found["inference"], img))
    if "memory" in found:
        plot_memory(found["memory"], os.path.join(args.img_dir, "memory.png"))
        sections.append(memory_section(found["memory"], img))
    exact = exact_report.section(found)
    if exact:
        sections.append(exact)
    if "train-step" in found:
        sections.append(train_step_section(found["train-step"]))
    if "transfer" in found:
        from rd_keras.bench import transfer as bench_transfer

        sections.append(bench_transfer.report_section(found["transfer"]))
    if "feature-scale" in found:
        from rd_keras.bench import feature_scale

        sections.append(feature_scale.report_section(found["feature-scale"]))
    notes = os.path.join(args.results_dir, "notes.md")
    if os.path.isfile(notes):  # hand-written reading of the numbers, kept next to the JSON it discusses
        with open(notes) as f:
            sections.append(f.read().strip())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n\n".join(sections) + "\n")
    print(f"wrote {args.out} and {len(os.listdir(args.img_dir))} file(s) in {args.img_dir}: "
          f"{', '.join(sorted(found))}")
    return {"out": args.out, "sections": sorted(found)}
