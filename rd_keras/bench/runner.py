"""Runs `train.py` commands for the benchmarks: each in its own workdir (its log in `train.log`), at most
`parallel` at once, a run that needs another (a student its teacher) started once that one has finished.
A finished run leaves `DONE_FILE` (exit status, wall time, command) in its workdir; a workdir without it
is an interrupted run and is refused rather than overwritten. `bench accuracy` and `bench transfer` plan
their runs; this module only runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from rd_keras import workdir as wd
from rd_keras.bench import accuracy_reuse, common

DONE_FILE = accuracy_reuse.DONE_FILE
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_command(config, workdir, flags) -> list:
    """The `train.py` command line of one run: `--config`, `--workdir` and one `--config.KEY=VALUE` per flag."""
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in flags.items())]


def _start(run):
    if os.path.exists(run["workdir"]):
        raise common.FlagError(f"{run['workdir']!r} exists but holds no finished run ({DONE_FILE}); remove it "
                               "or choose another --out.")
    os.makedirs(run["workdir"])
    log = open(os.path.join(run["workdir"], "train.log"), "w")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    proc = subprocess.Popen(run["command"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    return proc, log, time.perf_counter()


def execute(runs, parallel, rows=None):
    """Runs what is not finished yet, at most `parallel` at once; returns ({name: done-record}, failed names).
    A run whose workdir is absent is taken from `rows` (`accuracy_reuse.read_rows`) when one stands for it."""
    done = {}
    pending = []
    for run in runs:
        record = accuracy_reuse.finished(run)
        if record is not None:
            done[run["name"]] = {**record, "reused": True}
            continue
        row = accuracy_reuse.recorded(run, rows or {})
        if row is not None:
            done[run["name"]] = {"row": row, "reused": True}
        else:
            pending.append(run)
    active = {}
    bar = common.progress(range(len(pending)), "training runs")
    failed = []
    # SIGTERM becomes SystemExit, so the `finally` below stops the runs this process started.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        _schedule(pending, active, done, failed, parallel, bar)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for run, proc, log, _ in active.values():
            proc.terminate()  # its workdir stays unfinished: remove it before rerunning (see _start)
            proc.wait()
            log.close()
        bar.close()
    return done, failed


def _schedule(pending, active, done, failed, parallel, bar):
    while pending or active:
        for run in list(pending):
            ready = run["needs"] is None or run["needs"] in done
            blocked = run["needs"] in failed
            if blocked:
                pending.remove(run)
                failed.append(run["name"])
            elif ready and len(active) < parallel:
                pending.remove(run)
                active[run["name"]] = (run, *_start(run))
        time.sleep(0.5)
        for name, (run, proc, log, start) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            record = {"returncode": proc.returncode, "wall_s": time.perf_counter() - start,
                      "command": " ".join(run["command"]), "parallel": parallel}
            wd.write_atomic(os.path.join(run["workdir"], DONE_FILE), json.dumps(record, indent=1))
            del active[name]
            bar.update(1)
            if proc.returncode == 0:
                done[name] = {**record, "reused": False}
            else:
                failed.append(name)
                print(f"run {name} failed (exit {proc.returncode}); log: {run['workdir']}/train.log",
                      file=sys.stderr)
