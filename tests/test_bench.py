"""`python -m rd_keras.bench`: every sub-command end to end on ResNet-8 at width 0.25, plus its pure parts.

The sub-commands run in this process (one TensorFlow start-up for all); `accuracy` launches train.py.
No test asserts a duration: only that times are positive and that ratios agree with the numbers they
are made of.
"""

import json
import os

import keras
import numpy as np
import pytest

from rd_keras import bench
from rd_keras.bench import accuracy as bench_accuracy
from rd_keras.bench import accuracy_report, accuracy_reuse
from rd_keras.bench import common as bench_common
from rd_keras.bench import feature_scale
from rd_keras.bench import memory as bench_memory

TINY = ["--archs=resnet8", "--width=0.25", "--quick"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """Where the end-to-end tests leave their JSON, for the report test to read."""
    return tmp_path_factory.mktemp("results")


def _run(args, capsys):
    assert bench.main(args) == 0
    return capsys.readouterr().out


def _load(path):
    with open(path) as f:
        return json.load(f)


def _approx(a, b):
    return a == pytest.approx(b, rel=1e-9)


def test_inference(results_dir, capsys):
    path = results_dir / "inference.json"
    out = _run(["inference", *TINY, f"--json={path}"], capsys)
    assert "speedup" in out and "resnet8/plain8" in out
    payload = _load(path)
    assert payload["command"] == "inference" and payload["machine"]["cpu_cores"] >= 1
    (result,) = payload["results"]
    assert result["params"]["resnet"] > result["params"]["plain"] > 0
    deployed = result["deployed_params"]
    assert deployed["exact"] > deployed["resnet"] > deployed["plain"] > 0
    macs = result["multiply_adds"]
    # ResNet-8 has two projection convs (1x1, stride 2) that its plain twin lacks; its exact conversion
    # widens every block's convs by the channels it carries.
    assert macs["exact"] > macs["resnet"] > macs["plain"] > 0 and _approx(macs["ratio"], macs["resnet"] / macs["plain"])
    assert _approx(macs["exact_ratio"], macs["exact"] / macs["plain"]) and result["exact_convert_s"] > 0
    runtimes = {(m["runtime"], m["batch_size"]) for m in result["measurements"]}
    expected = {"keras", "saved_model", "tflite_fp32_t1", "tflite_fp32_t2", "tflite_int8_t1", "tflite_int8_t2"}
    assert runtimes == {(r, b) for r in expected for b in (1, 4)}
    for m in result["measurements"]:
        for side in ("resnet", "plain", "exact"):
            stats = m[side]
            assert stats["runs"] >= 2
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
            assert _approx(stats["images_per_s"], m["batch_size"] / stats["median_ms"] * 1e3)
        assert m["resnet"]["runs"] == m["plain"]["runs"] == m["exact"]["runs"]  # interleaved rounds
        assert _approx(m["speedup"], m["resnet"]["median_ms"] / m["plain"]["median_ms"])
        assert _approx(m["exact_speedup"], m["exact"]["median_ms"] / m["plain"]["median_ms"])
        for paired in (m["paired_speedup"], m["paired_exact_speedup"]):
            assert paired["q25"] <= paired["median"] <= paired["q75"]
    assert "exact/plain" in out and set(result["tflite_bytes"]["tflite_fp32"]) == {"resnet", "plain", "exact"}


def test_memory(results_dir, capsys):
    path = results_dir / "memory.json"
    out = _run(["memory", *TINY, f"--json={path}"], capsys)
    assert "liveness fp32" in out
    (result,) = _load(path)["results"]
    for dtype in ("fp32", "int8"):
        live = result["liveness"][dtype]
        assert 0 < live["plain"] < live["resnet"]
        # The exact conversion holds a block's input in its carried channels instead of beside the block.
        assert live["exact"] > live["plain"]
        assert _approx(live["ratio"], live["resnet"] / live["plain"])
        assert _approx(live["shortcut_share"], 1 - live["plain"] / live["resnet"])
        assert _approx(live["exact_ratio"], live["exact"] / live["plain"])
        arena = result["tflite_arena"][dtype]
        assert arena["exact"] > arena["plain"] > 0 and arena["resnet"] > 0
    # int8 feature maps are a quarter of fp32 ones, value for value.
    assert result["liveness"]["int8"]["resnet"] * 4 == result["liveness"]["fp32"]["resnet"]
    assert result["liveness"]["plain_two_buffer_bound_fp32"] <= result["liveness"]["fp32"]["plain"]
    (engine,) = result["rss"]
    rss = result["rss"][engine]
    assert engine == "tflite_fp32" and rss["batch_size"] == 8
    for side in ("resnet", "plain", "exact"):
        # A reading is either at least the largest conv's input + output, or below resolution and null.
        if rss[side] is None:
            assert side in rss["below_resolution"] and rss["raw"][side] < rss["floor"][side]
            assert bench_memory.BELOW_RESOLUTION in out
        else:
            assert rss[side] == rss["raw"][side] >= rss["floor"][side] > 0


def test_peak_rss_below_the_largest_conv_is_below_resolution():
    """ResNet-20 int8 at batch 64 grew by 0 bytes in docs/results/memory.json: printed as 0 MiB, it read
    like a result."""
    floors = {"resnet": 2 ** 21, "plain": 2 ** 21, "exact": 2 ** 22}
    figure = bench_memory._rss_figure({"resnet": 0, "plain": 3 * 2 ** 20, "exact": 2 ** 22}, floors, 64)
    assert figure["resnet"] is None and figure["below_resolution"] == ["resnet"]
    assert figure["raw"]["resnet"] == 0 and figure["ratio"] is None and figure["exact_ratio"] == 4 / 3
    live = {"resnet": 1, "plain": 1, "exact": 1, "ratio": 1.0, "shortcut_share": 0.0, "exact_ratio": 1.0}
    result = {"pair": "p", "batch_size": 1, "liveness": {"fp32": live, "int8": live, "plain_two_buffer_bound_fp32": 1},
              "tflite_arena": {"fp32": live, "int8": live}, "rss": {"tflite_int8": figure}}
    (row,) = [r for r in bench_memory.rows([result]) if r[1] == "rss tflite_int8 b64"]
    assert row[2:5] == [bench_memory.BELOW_RESOLUTION, 3.0, 4.0]
    assert bench_memory.BELOW_RESOLUTION in bench_memory.table([result])


def test_memory_floor_is_the_largest_convs_input_and_output():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same"),
                              keras.layers.Conv2D(16, 3, strides=2, padding="same")])
    # conv 1: 8*8*3 in + 8*8*4 out = 448 values; conv 2: 8*8*4 in + 4*4*16 out = 512 values.
    assert bench_memory._conv_floor(model, batch=2, nbytes=4) == 2 * 4 * (8 * 8 * 4 + 4 * 4 * 16)


def test_train_step(results_dir, capsys):
    path = results_dir / "train_step.json"
    out = _run(["train-step", "--arch=resnet8", "--width=0.25", "--quick", "--kinds=resnet,rd_joint,kd",
                "--hybrid_entry=rescale", f"--json={path}"], capsys)
    assert "rd_joint" in out and _load(path)["settings"]["hybrid_entry"] == "rescale"
    (result,) = _load(path)["results"]
    (combo,) = result["combinations"]
    assert combo["precision"] == "float32" and combo["jit_compile"] is False and "skipped" not in combo
    assert set(combo["steps"]) == {"resnet", "rd_joint", "kd"}
    base = combo["steps"]["resnet"]["median_ms"]
    for stats in combo["steps"].values():
        assert stats["median_ms"] > 0 and stats["images_per_s"] > 0
        assert _approx(stats["relative"], stats["median_ms"] / base)


def test_accuracy_plan_same_budget_for_every_run(tmp_path):
    parser = bench.parser_for(["accuracy"])
    args = parser.parse_args(["accuracy", "--epochs=6", "--width=0.5", "--train_subset=10000",
                              "--depths=56,20", f"--out={tmp_path}"])
    budget, runs = bench_accuracy.plan(args)
    assert [r["name"] for r in runs] == [f"d{d}_{k}" for d in (56, 20) for k in bench_accuracy.RUNS]
    # configs/fashion_mnist.py decays the hybrid loss over 20 of its 30 epochs: 2/3 of any shorter run.
    assert budget["epochs"] == 6 and budget["blend_epochs"] == pytest.approx(4.0)
    assert (budget["kd_alpha"], budget["logit_kd_alpha"]) == (0.0, 1.0)  # the recipe's KD is on the plain logits
    for run in runs:
        flags = dict(a[2:].split("=", 1) for a in run["command"][2:])
        assert flags["config.train.epochs"] == "6" and flags["config.model.width"] == "0.5"
        assert flags["config.data.train_subset"] == "10000"
        assert flags["config.model.arch"] == f"resnet{run['depth']}"
        if run["kind"] in ("rd_pretrained", "kd"):
            assert flags["config.teacher.path"] == os.path.join(str(tmp_path), f"d{run['depth']}_resnet")
            assert flags["config.teacher.mode"] == "pretrained"
            assert run["needs"] == f"d{run['depth']}_resnet"
        if run["kind"] == "kd":  # the KD baseline: no hybrid path, KD on the plain logits
            assert flags["config.distill.hybrid_points"] == "none"
            assert flags["config.distill.logit_kd_alpha"] == "1.0"
        else:
            assert "config.distill.hybrid_points" not in flags


def test_accuracy_curves_named_by_split_teacher_time_and_versions():
    validated = [{"epoch": 1, "step": 5, "acc": 0.7, "loss": 0.9, "ce": 1.0},
                 {"epoch": 2, "step": 10, "acc": 0.8, "loss": 0.6, "ce": 0.5, "test_acc": 0.79}]
    c = bench_accuracy.curves(validated)
    assert c["val_acc"] == [0.7, 0.8] and c["val_loss"] == [0.9, 0.6] and "test_acc" not in c
    assert bench_accuracy.curves(validated[:1])["test_acc"] == [0.7]
    # Old files kept validation accuracies under test_acc; the reader takes either.
    assert accuracy_report.eval_curve({"test_acc": [0.5]}) == [0.5]
    assert accuracy_report.eval_curve(c) == [0.7, 0.8]
    results = bench_accuracy.add_teacher_time([
        {"name": "d56_resnet", "wall_s": 600.0, "needs": None, "code_versions": ["git:a"]},
        {"name": "d56_kd", "wall_s": 700.0, "needs": "d56_resnet", "code_versions": ["git:b"]},
        {"name": "d56_plain", "failed": True}])
    assert [r.get("total_wall_s") for r in results] == [600.0, 1300.0, None]
    assert bench_accuracy.version_note(results) == "rows come from 2 code versions: git:a; git:b"
    assert bench_accuracy.version_note(results[:1]) is None


def test_accuracy_table_shows_a_failed_run_beside_finished_ones():
    # A study whose second run was killed printed nothing and wrote no JSON: the failed row was a cell short.
    finished = {"depth": 56, "name": "d56_resnet", "val_acc": 0.81, "test_acc": 0.8, "teacher_acc": None,
                "final_train_ce": 0.45, "wall_s": 600.0, "reused": False}
    lines = bench_accuracy.table([finished, {"depth": 56, "name": "d56_resnet_s1", "failed": True}]).splitlines()
    assert len(lines) == 4 and lines[-1].split()[-1] == "failed" and lines[-2].split()[:4] == ["56", "d56_resnet", "81", "80"]


def test_accuracy_plan_variants_and_seeds(tmp_path):
    parser = bench.parser_for(["accuracy"])
    args = parser.parse_args(["accuracy", "--epochs=2", "--depths=20", "--runs=resnet,plain,rd_joint@1", "--seeds=0,1",
                              "--validation_split=0.1", f"--out={tmp_path}",
                              "--variant=every3:distill.hybrid_points=3,6,distill.normalize=True",
                              "--variant=plain_dirac:run=plain,model.dirac=True",
                              "--variant=pre:run=rd_pretrained,distill.blend_floor=0.1",
                              "--variant=once:distill.normalize=True,seeds=1"])
    budget, runs = bench_accuracy.plan(args)
    names = [r["name"] for r in runs]
    # Seed 0 is the config's own: its runs keep their names and commands (and are reused); seed 1 is new.
    expected = [f"d20_{k}{s}" for s in ("", "_s1") for k in ("resnet", "plain", "every3", "plain_dirac", "pre")]
    # `once` and rd_joint@1 run their own seed only.
    assert names == expected[:5] + ["d20_resnet_s1", "d20_plain_s1", "d20_rd_joint_s1"] + expected[7:] + [
        "d20_once_s1"]
    by_name = {r["name"]: dict(a[2:].split("=", 1) for a in r["command"][2:]) for r in runs}
    every3 = by_name["d20_every3_s1"]
    assert every3["config.distill.hybrid_points"] == "3,6" and every3["config.distill.normalize"] == "True"
    assert every3["config.train.mode"] == "distill" and every3["config.teacher.mode"] == "joint"
    assert every3["config.train.seed"] == every3["config.data.seed"] == "1"
    assert "config.train.seed" not in by_name["d20_every3"] and "config.data.seed" not in by_name["d20_every3"]
    assert every3["config.data.validation_split"] == "0.1"
    plain_dirac = by_name["d20_plain_dirac"]
    assert plain_dirac["config.model.supervised_shortcuts"] == "none" and plain_dirac["config.model.dirac"] == "True"
    pre = next(r for r in runs if r["name"] == "d20_pre_s1")
    assert pre["needs"] == "d20_resnet_s1"
    assert by_name["d20_pre_s1"]["config.teacher.path"] == os.path.join(str(tmp_path), "d20_resnet_s1")
    assert budget["variants"]["pre"] == {"run": "rd_pretrained", "distill.blend_floor": "0.1"}


@pytest.mark.parametrize("variant, message", [
    ("nocolon", "NAME:KEY=VALUE"),
    ("plain:model.dirac=True", "one of the standard runs"),
    ("x:run=teacher", "run must be one of"),
    ("x:model.dirac", "KEY=VALUE"),
])
def test_bad_variants_are_named(variant, message, tmp_path):
    args = bench.parser_for(["accuracy"]).parse_args(["accuracy", f"--variant={variant}", f"--out={tmp_path}"])
    with pytest.raises(bench_common.FlagError, match=message):
        bench_accuracy.plan(args)


def test_aggregate_means_ranges_and_gap_closed():
    def run(kind, seed, test, val, teacher=None):
        return {"depth": 56, "kind": kind, "seed": seed, "test_acc": test, "val_acc": val, "teacher_acc": teacher}

    rows = {r["kind"]: r for r in bench_accuracy.aggregate([
        run("plain", 0, 0.80, 0.81), run("plain", 1, 0.82, 0.83),
        run("rd_joint", 0, 0.86, 0.87, teacher=0.90), run("rd_joint", 1, 0.88, 0.89, teacher=0.92)])}
    assert rows["plain"]["test_acc"] == {"mean": pytest.approx(0.81), "min": 0.80, "max": 0.82, "n": 2}
    # No supervised ResNet run: the joint teachers (mean 0.91) are the ResNet baseline.
    assert rows["rd_joint"]["gap_closed_test_acc"] == pytest.approx((0.87 - 0.81) / (0.91 - 0.81))
    assert "gap_closed_test_acc" not in rows["plain"]


@pytest.mark.skipif(not os.path.exists(FMNIST), reason="Fashion-MNIST IDX files not installed (make data)")
def test_accuracy_smoke(results_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # train.py reads the config path relative to the working directory
    path = results_dir / "accuracy.json"
    out = _run(["accuracy", "--config=configs/fashion_mnist.py:smoke", "--depths=8", "--epochs=1",
                "--train_subset=512", "--runs=resnet,rd_pretrained", "--override=data.eval_subset=256",
                f"--out={tmp_path}/runs", f"--json={path}"], capsys)
    assert "test acc %" in out
    payload = _load(path)
    assert payload["budget"]["epochs"] == 1 and payload["budget"]["train_subset"] == 512
    runs = {r["kind"]: r for r in payload["results"]}
    assert set(runs) == {"resnet", "rd_pretrained"}
    for r in runs.values():
        assert 0 <= r["test_acc"] <= 1 and r["wall_s"] > 0 and r["final_train_ce"] > 0
        assert r["curves"]["epoch"] == [1] and len(r["curves"]["test_acc"]) == 1
    # The pretrained teacher is the ResNet run's saved model: same accuracy on the same eval images.
    assert runs["rd_pretrained"]["teacher_acc"] == pytest.approx(runs["resnet"]["test_acc"])
    # A second invocation reuses the finished workdirs instead of training again.
    out = _run(["accuracy", "--config=configs/fashion_mnist.py:smoke", "--depths=8", "--epochs=1",
                "--train_subset=512", "--runs=resnet,rd_pretrained", "--override=data.eval_subset=256",
                f"--out={tmp_path}/runs"], capsys)
    assert "reused" in out
    # feature-scale on the distilled run: per-point RMS of the teacher's and the plain net's features.
    scale_json = results_dir / "feature_scale.json"
    student = f"{tmp_path}/runs/{runs['rd_pretrained']['name']}"
    out = _run(["feature-scale", f"--workdir={student}", "--images=64", f"--json={scale_json}"], capsys)
    rows = _load(scale_json)["results"]
    assert [r["point"] for r in rows] == ["stage1", "stage2"] and "teacher RMS" in out
    assert all(r["images"] == 64 and r["teacher_rms"] > 0 and r["plain_rms"] > 0 for r in rows)
    from rd_keras import data
    from rd_keras.export import workdir_export
    config, plain = workdir_export.load_workdir(student)
    images = np.concatenate([x.numpy() for x, _ in data.pipelines(config)[1]])[:64]
    stage1 = keras.Model(plain.input, plain.get_layer("stage1").output)(images, training=False)
    assert rows[0]["plain_rms"] == pytest.approx(float(np.sqrt(np.mean(np.square(stage1), (0, 1, 2))).mean()),
                                                 rel=1e-4)
    # With the workdirs gone, the rows of the results file stand in for them, number for number ...
    os.rename(tmp_path / "runs", tmp_path / "gone")
    again = tmp_path / "again.json"
    command = ["accuracy", "--config=configs/fashion_mnist.py:smoke", "--depths=8", "--epochs=1",
               "--train_subset=512", "--runs=resnet,rd_pretrained", "--override=data.eval_subset=256",
               f"--out={tmp_path}/runs", f"--reuse_json={path}"]
    _run([*command, f"--json={again}"], capsys)
    rows = {r["kind"]: r for r in _load(again)["results"]}
    for kind, r in runs.items():
        assert rows[kind]["reused"] and rows[kind]["reused_from"] == str(path)
        assert (rows[kind]["test_acc"], rows[kind]["curves"]) == (r["test_acc"], r["curves"])
        assert rows[kind]["settings"] == r["settings"] and r["settings"]["train.epochs"] == 1
    assert not os.path.exists(tmp_path / "runs")  # nothing trained
    # ... but not for a run of other settings, whose row is refused naming them.
    with pytest.raises(SystemExit) as e:
        bench.main([*command, "--override=train.lr=0.5"])
    assert e.value.code == 2
    assert "has a row 'd8_resnet' of other settings:\n  train.lr: 0.1 in the run, 0.5 now" in capsys.readouterr().err


def test_report(results_dir, tmp_path, capsys):
    present = {p.stem for p in results_dir.glob("*.json")}
    if not present:
        pytest.skip("no sub-command left its JSON")
    out_md, img = tmp_path / "results.md", tmp_path / "img"
    _run(["report", f"--results_dir={results_dir}", f"--out={out_md}", f"--img_dir={img}"], capsys)
    text = out_md.read_text()
    sections = {"inference": ("## Inference speed", "inference.png"),
                "memory": ("## Feature-map memory", "memory.png"),
                "train_step": ("## Training step throughput", None),
                "accuracy": ("## Accuracy", "accuracy_curves.png"),
                "feature_scale": ("## Feature scale at the hybrid points", None)}
    for name in present:
        heading, png = sections[name]
        assert heading in text
        assert f"Command: `python -m rd_keras.bench {name.replace('_', '-')}" in text
        if png:
            assert (img / png).stat().st_size > 0


def test_report_exact_section_has_three_rows_per_pair(results_dir, tmp_path, capsys):
    if not (results_dir / "inference.json").exists() or not (results_dir / "memory.json").exists():
        pytest.skip("the inference and memory tests left no JSON")
    saved = tmp_path / "results"
    saved.mkdir()
    for name in ("inference", "memory"):
        (saved / f"exact_{name}.json").write_text((results_dir / f"{name}.json").read_text())
    out_md = tmp_path / "results.md"
    _run(["report", f"--results_dir={saved}", f"--out={out_md}", f"--img_dir={tmp_path / 'img'}"], capsys)
    text = out_md.read_text()
    section = text[text.index("## The exact conversion against the RD plain net"):]
    assert "Command: `python -m rd_keras.bench inference" in section and "bench memory" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| net ")]
    assert [row.split(" | ")[0] for row in rows] == ["| ResNet", "| RD plain net", "| exact conversion (no training)"]
    assert "the ResNet's, by construction" in rows[2] and "none: converted in" in rows[2]
    inference = _load(saved / "exact_inference.json")["results"][0]
    exact_params = inference["deployed_params"]["exact"] / inference["deployed_params"]["plain"]
    assert f"({exact_params:.2f}x)" in rows[2]


def test_report_without_results_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["report", f"--results_dir={tmp_path}"])
    assert e.value.code == 2 and str(tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize("args, quoted", [
    (["inference", "--archs=resnet7"], "resnet7"),
    (["inference", "--batch_sizes=1,x"], "1,x"),
    (["memory", "--rss_engines=gpu"], "gpu"),
    (["train-step", "--precisions=float8"], "float8"),
    (["accuracy", "--depths=21"], "21"),
    (["accuracy", "--seeds=0,x"], "0,x"),
    (["train-step", "--arch=resnet20", "--hybrid_points=every_k_blocks:0"], "every_k_blocks:0"),
    (["train-step", "--arch=resnet20", "--hybrid_entry=scaled"], "scaled"),
])
def test_bad_flags_are_named(args, quoted, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and quoted in capsys.readouterr().err


def test_channel_rms_is_per_channel():
    x = np.stack([np.full((2, 3, 3), 3.0), np.tile([[[-4.0]], [[4.0]]], (1, 3, 3))], axis=-1)
    np.testing.assert_allclose(feature_scale.channel_rms(x), [3.0, 4.0])


def test_feature_scale_refuses_a_missing_workdir(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["feature-scale", f"--workdir={tmp_path}/nowhere"])
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err


def test_interleaved_alternates_order_and_respects_run_bounds():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench_common.interleaved(fns, warmup=1, min_runs=3, max_runs=3, budget_s=0.0)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B / B A / A B
    assert len(times["a"]) == len(times["b"]) == 3
    stats = bench_common.summarize([0.001, 0.002, 0.003])
    assert stats["median_ms"] == pytest.approx(2.0) and stats["runs"] == 3
    ratio = bench_common.paired_ratio([2.0, 4.0], [1.0, 1.0])
    assert ratio["median"] == pytest.approx(3.0)
    assert bench_common.compare(150, 100) == {"resnet": 150, "plain": 100, "exact": None, "ratio": 1.5,
                                              "shortcut_share": pytest.approx(1 / 3), "exact_ratio": None}
    assert bench_common.compare(150, 100, 300)["exact_ratio"] == 3.0


def test_help_needs_no_tensorflow():
    import subprocess
    import sys

    code = ("import sys; from rd_keras import bench\n"
            "try:\n    bench.main(['report', '--help'])\nexcept SystemExit: pass\n"
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().endswith("False")


def test_multiply_adds_counts_convs_and_dense_by_hand():
    import keras

    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, padding="same")(x)  # 8*8 outputs * 3*3*3 inputs * 4 filters = 6912
    y = keras.layers.Conv2D(2, 1, strides=2)(y)  # 4*4 outputs * 4 inputs * 2 filters = 128
    y = keras.layers.GlobalAveragePooling2D()(y)
    model = keras.Model(x, keras.layers.Dense(5)(y))  # 2 * 5 = 10
    assert bench_common.multiply_adds(model) == 6912 + 128 + 10


def test_accuracy_report_of_a_seeded_study_with_variants(tmp_path):
    def run(kind, seed, test, val, teacher=None, base=None):
        steps = [50, 100]
        train = {"step": steps, "plain_ce" if base else "ce": [1.0, 0.5],
                 **{f"grad_norm/{'plain' if base else 'ce'}/{s}": [0.5, 0.4] for s in ("stem", "stage1", "stage2")}}
        if base:
            train.update({f"grad_norm/hybrid/{s}": [1.0, 0.8] for s in ("stem", "stage1")})
        return {"name": f"d56_{kind}" + (f"_s{seed}" if seed else ""), "depth": 56, "kind": kind,
                "base": base or kind, "seed": seed, "test_acc": test, "val_acc": val, "teacher_acc": teacher,
                "final_train_ce": 0.5, "wall_s": 60.0, "total_wall_s": 180.0 if base == "kd" else 60.0,
                "reused": False, "code_versions": ["git:b" if base == "kd" else "git:a"],
                "curves": {"epoch": [1, 2], "test_acc": [val - 0.1, val], "train_ce": [1.0, 0.5]},
                "train_curves": train}

    results = [run("resnet", 0, 0.90, 0.91), run("resnet", 1, 0.88, 0.89), run("plain", 0, 0.80, 0.81),
               run("plain", 1, 0.78, 0.79), run("best", 0, 0.88, 0.90, 0.9, "rd_joint"),
               run("best", 1, 0.86, 0.88, 0.9, "rd_joint"), run("kdv", 0, 0.865, 0.89, 0.9, "kd"),
               run("kdv", 1, 0.855, 0.87, 0.9, "kd")]
    payload = {"machine": {"date": "d", "cpu": "c", "cpu_cores": 2, "gpus": [], "tensorflow": "t", "keras": "k",
                           "ai_edge_litert": "a", "command": "python -m rd_keras.bench accuracy"},
               "budget": {"config": "c.py", "epochs": 2, "width": 0.5, "train_subset": 0, "batch_size": 128,
                          "lr": 0.1, "warmup_epochs": 1, "blend_epochs": 1.3, "blend_floor": 0.0, "kd_alpha": 0,
                          "data_source": "idx", "overrides": {}, "seeds": [0, 1], "validation_split": 0.1,
                          "variants": {"best": {"run": "rd_joint", "model.dirac": "True"},
                                       "kdv": {"run": "kd", "model.dirac": "True"}}},
               "results": results, "summary": bench_accuracy.aggregate(results)}
    text = accuracy_report.section(payload, "img", curves="c.png", grad_norms="g.png")
    assert "| 56 | variant `best` | 2 | 89.00 (88.00–90.00) | 87.00 (86.00–88.00) |" in text
    assert "| 90 | 80 |" in text  # gap closed: (89 - 80) / (90 - 80) on validation, (87 - 79) / (89 - 79) on test
    assert "- `best`: rd_joint with `model.dirac=True`" in text and "![learning curves](img/c.png)" in text
    assert "the best RD run by validation accuracy, variant `best`, reaches 87.00%" in text
    # Hybrid paths against KD, seed by seed; wall time with the teacher's; code versions named.
    assert ("Depth 56, hybrid paths against KD: variant `best` 87.00% vs variant `kdv` 86.00% (test means); "
            "per seed (same teacher) +1.50, +0.50 points, mean +1.00 over 2 seed(s).") in text
    assert "| 3 |" in text.split("variant `kdv`")[1].split("\n")[0]  # 180 s = 3 min, teacher included
    assert "Code versions of these runs: git:a; git:b (the rows come from different versions)." in text
    assert "to 0.0, KD weight on the hybrid logits (`distill.kd_alpha`) 0 (the config's;" in text  # older JSON
    payload["budget"]["logit_kd_alpha"] = 1.0
    assert ("KD weight on the hybrid logits (`distill.kd_alpha`) 0 and on the plain logits "
            "(`distill.logit_kd_alpha`) 1.0 (the config's; a run kind or variant may set its own)"
            in accuracy_report.section(payload, "img"))
    assert accuracy_report.plot_grad_norms(payload, str(tmp_path / "g.png"))
    accuracy_report.plot_curves(payload, str(tmp_path / "c.png"))
    assert (tmp_path / "g.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0
    # A clipped run logs its step's global norm: not a per-stage norm, so alone it makes no plot.
    for r in results:
        r["train_curves"] = {"step": [50, 100], "grad_norm/step/plain": [2.0, 1.5], "clipped/plain": [1.0, 0.0]}
    assert not accuracy_report.plot_grad_norms(payload, str(tmp_path / "none.png"))


def _finished_run(workdir, flags, ran_flags=None, edit=None):
    """A bench run of `train.py flags` in `workdir`, finished by a run of `ran_flags` (default: the same)
    from another checkout, whose config.json `edit(tree)` may change."""
    from rd_keras import train_cli
    from rd_keras import workdir as wd

    argv = ["/repo/train.py", "--config=configs/fashion_mnist.py", f"--workdir={workdir}", *flags]
    ran = ["/elsewhere/train.py", *argv[1:3], *(flags if ran_flags is None else ran_flags)]
    wd.write_config(str(workdir), train_cli.resolve_config(ran))
    if edit:
        tree = json.loads((workdir / wd.CONFIG_FILE).read_text())
        edit(tree)
        (workdir / wd.CONFIG_FILE).write_text(json.dumps(tree))
    (workdir / accuracy_reuse.DONE_FILE).write_text(json.dumps(
        {"returncode": 0, "wall_s": 1.0, "command": " ".join(["/other/bin/python", *ran])}))
    return {"workdir": str(workdir), "command": ["/venv/bin/python", *argv]}


RD = ["--config.train.mode=distill", "--config.teacher.path=runs/t", "--config.train.epochs=2"]


@pytest.mark.parametrize("config", ["configs/fashion_mnist.py", "configs/cifar10.py"])
def test_accuracy_plan_resnet_and_rd_pretrained_runs_are_the_two_phases_of_the_default_recipe(tmp_path, config):
    # What the study measures as `resnet` + `rd_pretrained` is what one train.py command of the config trains
    # (its teacher phase, then its distillation), setting for setting, so its rows are the default recipe's.
    from rd_keras import train_cli, train_lib

    args = bench.parser_for(["accuracy"]).parse_args(
        ["accuracy", f"--config={config}", "--epochs=2", "--width=0.5", "--depths=20", "--runs=resnet,rd_pretrained",
         f"--out={tmp_path}"])
    _, (resnet, rd) = bench_accuracy.plan(args)
    one_command = train_cli.resolve_config([c for c in rd["command"][1:] if "teacher.path=" not in c])
    assert train_lib.trains_its_teacher(one_command)
    def settings(run_or_config):
        config = train_cli.resolve_config(run_or_config["command"][1:]) if "command" in run_or_config else run_or_config
        return train_lib.training_settings(config)

    assert settings(train_lib.teacher_phase_config(one_command)) == settings(resnet)
    one_command.teacher.path = os.path.join(str(tmp_path), "d20_resnet")
    assert settings(one_command) == settings(rd)


def test_finished_run_is_reused_when_it_trained_the_same_settings_however_the_flags_were_written(tmp_path):
    # Another checkout and interpreter, flags in another order, a default written out, a key that only
    # a resume may change: the same settings.
    run = _finished_run(tmp_path, RD, ran_flags=[*RD[::-1], "--config.distill.temperature=4.0",
                                                 "--config.train.log_every_steps=7"])
    assert accuracy_reuse.finished(run)["wall_s"] == 1.0
    assert accuracy_reuse.finished({**run, "command": [*run["command"], "--config.train.progress=False"]})


def test_finished_run_of_other_settings_is_refused_naming_them(tmp_path):
    run = _finished_run(tmp_path, RD)
    with pytest.raises(bench_common.FlagError, match=r"other settings:\n  train.epochs: 2 in the run, 3 now"):
        accuracy_reuse.finished({**run, "command": [*run["command"], "--config.train.epochs=3"]})
    # Defaults that changed since the run trained (the command alone would read the same).
    run = _finished_run(tmp_path, RD, edit=lambda t: t["distill"].update(logit_kd_alpha=0.0))
    with pytest.raises(bench_common.FlagError, match="distill.logit_kd_alpha: 0.0 in the run, 1.0 now"):
        accuracy_reuse.finished(run)
    # ... reused once the command pins the old value.
    assert accuracy_reuse.finished({**run, "command": [*run["command"], "--config.distill.logit_kd_alpha=0"]})


def test_reuse_ignores_settings_a_run_does_not_use_and_keys_newer_than_it(tmp_path):
    resnet = ["--config.train.mode=supervised", "--config.model.supervised_shortcuts=all"]
    # A ResNet trained alone reads neither the distillation sections nor the Dirac keys of the plain net.
    old_defaults = {"teacher": {"mode": "joint"}, "distill": {"logit_kd_alpha": 0.0}, "model": {"dirac": False}}
    run = _finished_run(tmp_path, resnet, edit=lambda t: [t[s].update(v) for s, v in old_defaults.items()])
    assert accuracy_reuse.finished(run)
    kd = ["--config.train.mode=distill", "--config.teacher.path=runs/t", "--config.distill.hybrid_points=none"]
    (tmp_path / "kd").mkdir()
    run = _finished_run(tmp_path / "kd", kd, edit=lambda t: t["distill"].update(blend_floor=0.0))
    assert accuracy_reuse.finished(run)  # m(t) weighs hybrid paths only
    with pytest.raises(bench_common.FlagError, match="distill.temperature: 4.0 in the run, 2.0 now"):
        accuracy_reuse.finished({**run, "command": [*run["command"], "--config.distill.temperature=2"]})
    # A key the run's config.json predates stands at its library default, which keeps the old behaviour.
    (tmp_path / "new").mkdir()
    run = _finished_run(tmp_path / "new", RD, edit=lambda t: t["distill"].pop("blend_start_epochs"))
    assert accuracy_reuse.finished(run)
    with pytest.raises(bench_common.FlagError, match="distill.blend_start_epochs: 0.0 in the run, 1.0 now"):
        accuracy_reuse.finished({**run, "command": [*run["command"], "--config.distill.blend_start_epochs=1"]})
    # A key recorded under its older name counts under its name now.
    (tmp_path / "renamed").mkdir()
    run = _finished_run(tmp_path / "renamed", RD, edit=lambda t: [t["distill"].pop("global_clipnorm"),
                                                                  t["train"].update(global_clipnorm=2.0)])
    assert accuracy_reuse.finished({**run, "command": [*run["command"], "--config.distill.global_clipnorm=2"]})
    with pytest.raises(bench_common.FlagError, match="distill.global_clipnorm: 2.0 in the run, 0.0 now"):
        accuracy_reuse.finished({**run, "command": [*run["command"], "--config.distill.global_clipnorm=0"]})


def test_reuse_json_refuses_files_it_cannot_check(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"results": [{"name": "d56_resnet", "test_acc": 0.9}, {"name": "x", "failed": True}]}))
    with pytest.raises(bench_common.FlagError, match=r"rows \['d56_resnet'\] record no settings"):
        accuracy_reuse.read_rows([str(old)])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(bench_common.FlagError, match="not a results file of bench accuracy"):
        accuracy_reuse.read_rows([str(tmp_path / "bad.json")])
    # A later file's row wins; failed rows are never reused.
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"results": [{"name": "r", "settings": {}, "test_acc": 0.1},
                                             {"name": "f", "failed": True}]}))
    second.write_text(json.dumps({"results": [{"name": "r", "settings": {}, "test_acc": 0.2}]}))
    rows = accuracy_reuse.read_rows([str(first), str(second)])
    assert set(rows) == {"r"} and rows["r"]["test_acc"] == 0.2 and rows["r"]["reused_from"] == str(second)
