"""rd_keras as a library people install: the wheel, in a fresh virtualenv, used from outside the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

import rd_keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each installed command, with a flag its --help must list.
COMMANDS = {"rd-keras-train": "--workdir", "rd-keras-export": "--workdir", "rd-keras-bench": "train-step",
            "rd-keras-serve": "--model_base_path"}


def _run(command, **kwargs):
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def _build_wheel(tmp_path):
    """`pip wheel --no-deps .` of a copy of the sources (the build writes build/ and *.egg-info beside them),
    offline with the pinned setuptools."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for package in ("rd_keras", "rd_keras_serving"):
        shutil.copytree(os.path.join(ROOT, package), src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--wheel-dir", str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").iterdir()
    return wheel


def _fresh_env(tmp_path, wheel):
    """A new virtualenv holding the wheel alone; the pinned dependencies come from this interpreter's
    site-packages through a .pth line (a path added that way has its own .pth files ignored, so the
    checkout's editable install stays out)."""
    env_dir = tmp_path / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    purelib = sysconfig.get_paths()["purelib"]
    site = env_dir / os.path.relpath(purelib, sys.prefix)
    (site / "pinned_dependencies.pth").write_text(purelib + "\n")
    python = env_dir / "bin" / "python"
    # --ignore-installed: the checkout's own editable rd_keras is visible through the .pth line.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
          "--ignore-installed", str(wheel)])
    return env_dir


@pytest.mark.slow  # builds a wheel, makes a virtualenv and trains a smoke run: 60-120 s on 2 busy cores
def test_wheel_installs_and_trains_from_a_shipped_config(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
        names = set(z.namelist())
    assert {"rd_keras", "rd_keras_serving"} <= tops and not tops & {"serving", "configs", "tests", "examples"}
    assert {"rd_keras/configs/fashion_mnist.py", "rd_keras/configs/common.py",
            "rd_keras_serving/models.config"} <= names

    env_dir = _fresh_env(tmp_path, wheel)
    bin_dir, outside = env_dir / "bin", tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    kw = dict(cwd=outside, env=env)

    proc = _run([str(bin_dir / "python"), "-c", "import rd_keras; print(rd_keras.__version__); "
                 "print(rd_keras.__file__)"], **kw)
    version, location = proc.stdout.split()
    assert version == rd_keras.__version__
    assert location.startswith(str(env_dir)), location  # the wheel's copy, not the checkout
    # The declared dependency ranges accept the pinned versions.
    _run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "check"], **kw)

    helps = {name: subprocess.Popen([str(bin_dir / name), "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, **kw) for name in COMMANDS}
    for name, proc in helps.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-3000:])
        assert COMMANDS[name] in out, (name, out)
    workdir = outside / "smoke"
    _run([str(bin_dir / "rd-keras-train"), "--config=fashion_mnist:smoke", f"--workdir={workdir}",
          "--config.train.progress=False"], **kw)
    assert (workdir / "plain.keras").is_file() and (workdir / "resnet.keras").is_file()
    with open(workdir / "metrics.jsonl") as f:
        assert f.read().strip()
