"""The accuracy part of `bench report`: tables, verdicts and plots from a `bench accuracy --json` file.

Runs are grouped by (depth, run name) over seeds: the tables give mean and range, the share of the
plain-vs-ResNet gap each run closed, and (with a validation split) the validation numbers that choose
between variants next to the test numbers reported once. Two plots: learning curves, and the per-stage
gradient norms of the plain net that show why a deep plain net trains slowly and what the hybrid paths add.
"""

from __future__ import annotations

from rd_keras.bench.common import md_table, provenance

RUN_LABELS = {"resnet": "ResNet (supervised)", "plain": "plain (supervised)", "rd_joint": "plain + RD (joint teacher)",
              "rd_pretrained": "plain + RD (pretrained teacher)", "kd": "plain + KD (pretrained teacher)"}


def eval_curve(curves):
    """The per-epoch accuracy curve of a run's `curves`, whichever split it was evaluated on. Files written
    before the curves were named by split kept validation accuracies under `test_acc`."""
    return curves.get("val_acc") or curves["test_acc"]


def _pct(x):
    return None if x is None else 100 * x


def label(kind):
    return RUN_LABELS.get(kind, f"variant `{kind}`")


def _spread(stat):
    if not stat:
        return None
    if stat["n"] == 1:
        return f"{100 * stat['mean']:.2f}"
    return f"{100 * stat['mean']:.2f} ({100 * stat['min']:.2f}–{100 * stat['max']:.2f})"


def _summary(payload):
    # Files written before seeds and variants existed carry no summary: every run is its own group.
    if "summary" in payload:
        return payload["summary"]
    from rd_keras.bench.accuracy import aggregate
    return aggregate(payload["results"])


def kd_weights(budget):
    """The KD weights of a study's config; `logit_kd_alpha` is recorded since it became a recipe default."""
    text = f"KD weight on the hybrid logits (`distill.kd_alpha`) {budget['kd_alpha']}"
    if "logit_kd_alpha" in budget:
        text += f" and on the plain logits (`distill.logit_kd_alpha`) {budget['logit_kd_alpha']}"
    return text


def section(payload, img, curves="accuracy_curves.png", grad_norms="grad_norms.png"):
    """The markdown section of one accuracy study; `curves` and `grad_norms` name its plots in `img` (None:
    no gradient-norm plot)."""
    b = payload["budget"]
    validated = bool(b.get("validation_split"))
    summary = sorted(_summary(payload), key=lambda r: -r["depth"])
    rows = [[r["depth"], label(r["kind"]), len(r["seeds"]), _spread(r.get("val_acc")) if validated else None,
             _spread(r.get("test_acc")), _spread(r.get("teacher_acc")),
             _pct(r.get("gap_closed_val_acc")) if validated else None, _pct(r.get("gap_closed_test_acc")),
             r["total_wall_s"]["mean"] / 60 if r.get("total_wall_s") else None]
            for r in summary]
    header = ["depth", "run", "seeds", "val acc %", "test acc %", "teacher test acc %", "gap closed % (val)",
              "gap closed % (test)", "wall min, teacher's included (mean)"]
    runs = [[r["depth"], r["name"], r.get("seed", 0), "failed" if r.get("failed") else _pct(r.get("val_acc")),
             _pct(r.get("test_acc")), _pct(r.get("teacher_acc")), r.get("final_train_ce"),
             None if r.get("failed") else r["wall_s"] / 60] for r in payload["results"]]
    variants = b.get("variants") or {}
    subset = "all" if not b["train_subset"] else f"the first {b['train_subset']:,}"
    held_out = (f" {b['validation_split']:.2%} of them held out as the validation split (the learning curves "
                "and every choice between variants use it; the test split is evaluated once, at the end of "
                "each run)" if validated else "")
    depths = ", ".join(str(d) for d in sorted({r["depth"] for r in summary}, reverse=True))
    parts = [
        f"## Accuracy at depth {depths}: can RD make a plain net match its ResNet? "
        f"({', '.join(dict.fromkeys(r['kind'] for r in summary))})",
        provenance(payload),
        f"Budget: {b['epochs']} epochs on {subset} training images{held_out}, width {b['width']}, batch "
        f"{b['batch_size']}, lr {b['lr']} (warm-up {b['warmup_epochs']} epoch, cosine), hybrid-loss decay "
        f"over {b['blend_epochs']:.3g} epochs to {b['blend_floor']}, {kd_weights(b)} (the config's; a run "
        f"kind or variant may set its own); data "
        f"`{b['data_source']}` from `{b['config']}`"
        + (f", overrides {b['overrides']}" if b["overrides"] else "")
        + f". Seeds {b.get('seeds', [0])}: means with the range over seeds in brackets. **gap closed** = "
          "(run - plain alone) / (ResNet alone - plain alone), from the means; where there is no supervised "
          "ResNet run, the joint RD runs' teachers (each trained on its own cross-entropy only) stand in.",
        md_table(rows, header),
    ]
    if variants:
        parts.append("Variants (config overrides on top of the named run):\n\n" + "\n".join(
            f"- `{name}`: {v['run']} with " + ", ".join(f"`{k}={val}`" for k, val in v.items() if k != "run")
            for name, v in variants.items()))
    versions = sorted({" + ".join(r.get("code_versions") or ["unrecorded"]) for r in payload["results"]
                       if not r.get("failed")})
    parts += ["Every run:", md_table(runs, ["depth", "run", "seed", "val acc %", "test acc %",
                                             "teacher test acc %", "final train CE", "wall min"]),
              f"Code versions of these runs: {'; '.join(versions)}"
              + (" (the rows come from different versions)." if len(versions) > 1 else "."),
              "\n".join(f"- {v}" for v in verdicts(summary) + paired_comparisons(payload)),
              f"![learning curves]({img}/{curves})"]
    if grad_norms:
        parts.append(f"![gradient norms per stage]({img}/{grad_norms})")
    return "\n\n".join(parts)


def verdicts(summary):
    """One sentence per depth: the gap, and how far the best RD run (by validation, else test) closed it."""
    out = []
    for depth in sorted({r["depth"] for r in summary}, reverse=True):
        rows = {r["kind"]: r for r in summary if r["depth"] == depth}
        resnet = rows.get("resnet", {}).get("test_acc") or rows.get("rd_joint", {}).get("teacher_acc")
        plain = rows.get("plain", {}).get("test_acc")
        if not resnet or not plain:
            out.append(f"Depth {depth}: a ResNet or plain baseline is missing, so no gap can be computed.")
            continue
        rd = [r for k, r in rows.items() if k not in ("resnet", "plain") and r.get("test_acc")]
        text = (f"Depth {depth}: plain-{depth} alone is {100 * (resnet['mean'] - plain['mean']):.2f} points "
                f"behind ResNet-{depth} (test, means)")
        if rd:
            key = "val_acc" if all(r.get("val_acc") for r in rd) else "test_acc"
            best = max(rd, key=lambda r: r[key]["mean"])
            text += (f"; the best RD run by {'validation' if key == 'val_acc' else 'test'} accuracy, "
                     f"{label(best['kind'])}, reaches {100 * best['test_acc']['mean']:.2f}% on the test split "
                     f"({100 * (best['test_acc']['mean'] - resnet['mean']):+.2f} vs the ResNet")
            if best.get("gap_closed_test_acc") is not None:
                text += f", {100 * best['gap_closed_test_acc']:.0f}% of the gap closed"
            text += ")"
        out.append(text + ".")
    return out


def paired_comparisons(payload):
    """Per depth, the best hybrid-path run against the best KD run (each chosen by validation accuracy, with
    the variants' base runs telling which is which), compared seed by seed: both of a seed distil from the
    same teacher, so the per-seed difference removes the teacher's share of the spread."""
    bases = {name: v["run"] for name, v in (payload["budget"].get("variants") or {}).items()}
    summary = _summary(payload)
    out = []
    for depth in sorted({r["depth"] for r in summary}, reverse=True):
        rows = [r for r in summary if r["depth"] == depth and r.get("test_acc")]
        key = "val_acc" if all(r.get("val_acc") for r in rows) else "test_acc"

        def best(kinds):
            chosen = [r for r in rows if bases.get(r["kind"], r["kind"]) in kinds]
            return max(chosen, key=lambda r: r[key]["mean"]) if chosen else None

        rd, kd = best(("rd_pretrained", "rd_joint")), best(("kd",))
        if not rd or not kd:
            continue
        runs = {(r["kind"], r.get("seed", 0)): r for r in payload["results"]
                if r["depth"] == depth and not r.get("failed")}
        diffs = [100 * (runs[(rd["kind"], s)]["test_acc"] - runs[(kd["kind"], s)]["test_acc"])
                 for s in sorted(set(rd["seeds"]) & set(kd["seeds"]))]
        text = (f"Depth {depth}, hybrid paths against KD: {label(rd['kind'])} "
                f"{100 * rd['test_acc']['mean']:.2f}% vs {label(kd['kind'])} {100 * kd['test_acc']['mean']:.2f}% "
                f"(test means)")
        if diffs:
            text += (f"; per seed (same teacher) {', '.join(f'{d:+.2f}' for d in diffs)} points, mean "
                     f"{sum(diffs) / len(diffs):+.2f} over {len(diffs)} seed(s)")
        out.append(text + ".")
    return out


def claim_rows(payload):
    """Rows of the claims table: each depth's runs against its ResNet, test accuracy means."""
    rows = []
    summary = _summary(payload)
    for depth in sorted({r["depth"] for r in summary}, reverse=True):
        by_kind = {r["kind"]: r for r in summary if r["depth"] == depth and r.get("test_acc")}
        resnet = by_kind.get("resnet")
        if not resnet:
            continue
        for kind, r in by_kind.items():
            if kind != "resnet":
                rows.append(["same accuracy", f"plain-{depth} {kind} vs ResNet-{depth}", "≈ 0 points",
                             f"{100 * (r['test_acc']['mean'] - resnet['test_acc']['mean']):+.2f} points"])
    return rows


# ----------------------------------------------------------------------------- plots


def plot_curves(payload, path):
    """Per depth: evaluation accuracy per epoch (validation split when there is one) and the trained net's
    training cross-entropy per log point, one line per run."""
    import matplotlib.pyplot as plt

    results = [r for r in payload["results"] if not r.get("failed")]
    depths = sorted({r["depth"] for r in results}, reverse=True)
    split = "validation" if payload["budget"].get("validation_split") else "test"
    fig, axes = plt.subplots(2, len(depths), figsize=(6 * len(depths), 7.5), squeeze=False)
    for col, depth in enumerate(depths):
        colors = {}
        for r in (r for r in results if r["depth"] == depth):
            c = r["curves"]
            color = colors.setdefault(r["kind"], f"C{len(colors) % 10}")
            first = sum(1 for x in results if x["depth"] == depth and x["kind"] == r["kind"]
                        and x.get("seed", 0) < r.get("seed", 0)) == 0
            name = label(r["kind"]) if first else None
            axes[0][col].plot(c["epoch"], [100 * a for a in eval_curve(c)], marker="o", color=color,
                              label=name)
            train = r.get("train_curves") or {}
            ce = train.get("plain_ce") or train.get("ce")
            if ce:
                axes[1][col].plot(train["step"], ce, color=color, label=name, lw=1)
            else:
                axes[1][col].plot(c["epoch"], c["train_ce"], marker="o", color=color, label=name)
        axes[0][col].set(title=f"depth {depth}: {split} accuracy", xlabel="epoch", ylabel="%")
        axes[1][col].set(title=f"depth {depth}: training cross-entropy of the trained net",
                         xlabel="step" if any(r.get("train_curves") for r in results) else "epoch", ylabel="CE",
                         yscale="log")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    b = payload["budget"]
    fig.suptitle(f"{b['config']}: {b['epochs']} epochs, width {b['width']}, train subset "
                 f"{b['train_subset'] or 'all'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grad_norms(payload, path):
    """For the deepest depth, first seed: per-stage gradient norm of the trained net over training. Solid:
    its own cross-entropy; dashed: the hybrid paths' cross-entropies (RD runs)."""
    import matplotlib.pyplot as plt

    sources = (("plain", "-"), ("ce", "-"), ("hybrid", "--"), ("kd", ":"))

    def per_stage(tag):  # grad_norm/<source>/<stage>; not the clipped step's global norm, grad_norm/step/<net>
        return tag.startswith("grad_norm/") and tag.split("/")[1] in dict(sources)

    results = [r for r in payload["results"] if not r.get("failed") and any(
        per_stage(k) for k in r.get("train_curves", {}))]
    if not results:
        return False
    depth = max(r["depth"] for r in results)
    chosen = {}
    for r in sorted(results, key=lambda r: r.get("seed", 0)):
        if r["depth"] == depth:
            chosen.setdefault(r["kind"], r)
    # The supervised baselines, the standard RD run and the best other run by validation (else test) accuracy.
    others = [r for k, r in chosen.items() if k not in RUN_LABELS]
    key = "val_acc" if all(r.get("val_acc") is not None for r in others) else "test_acc"
    best = max(others, key=lambda r: r[key]) if others else None
    chosen = {k: r for k, r in chosen.items() if k in RUN_LABELS or r is best}
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.5 * len(chosen), 4), squeeze=False, sharey=True)
    for ax, (kind, r) in zip(axes[0], chosen.items()):
        t = r["train_curves"]
        stages = sorted({k.split("/")[2] for k in t if per_stage(k)}, key=lambda s: (s != "stem", s == "logits", s))
        for i, stage in enumerate(stages):
            for source, style in sources:
                values = t.get(f"grad_norm/{source}/{stage}")
                if values:
                    points = [(s, v) for s, v in zip(t["step"], values) if v is not None]
                    ax.plot(*zip(*points), style, color=f"C{i}", lw=1,
                            label=f"{stage} ({'hybrid' if source == 'hybrid' else 'own CE'})")
        ax.set(title=label(kind), xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set(ylabel="gradient norm")
    fig.suptitle(f"depth {depth}: per-stage gradient norm of the trained net (seed {min(chosen.values(), key=lambda r: r.get('seed', 0)).get('seed', 0)})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
