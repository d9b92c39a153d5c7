"""Which runs of `bench accuracy` need not train again: a workdir holding a finished run, or a row of an
earlier results file (`--reuse_json`) for a run whose workdir is gone, in both cases only when it trained
the settings the run's command gives today (`train_lib.training_settings`). How the flags were spelled and
where the checkout was do not matter; other settings (a budget, a variant, or config defaults that changed
since it trained) are an error naming them, never a silently reused or retrained row.
"""

from __future__ import annotations

import json
import os

from rd_keras.bench import common
from rd_keras import workdir as wd

DONE_FILE = wd.BENCH_RUN_FILE  # written into a workdir when its run finished, with the wall time
_ABSENT = "<absent>"


def finished(run):
    """The done-record of a finished run in the run's workdir, else None (see the module's docstring)."""
    path = os.path.join(run["workdir"], DONE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        done = json.load(f)
    if done.get("returncode") != 0:
        return None
    _refuse_other_settings(_diff(settings_of_workdir(run["workdir"]), settings_now(run["command"][1:])),
                           f"{run['workdir']!r} holds a finished run", f"It ran {done.get('command')}",
                           "remove it, or choose another --out")
    return done


def settings_now(argv) -> dict:
    """The training settings of the train.py command line `argv`, resolved as train.py would."""
    from rd_keras import train_cli, train_lib  # they import TensorFlow: only when there is a run to compare

    try:
        return train_lib.training_settings(train_cli.resolve_config(argv))
    except ValueError as e:
        raise common.FlagError(f"{' '.join(argv)}: {e}") from None


def settings_of_workdir(workdir) -> dict:
    """The training settings of the run in `workdir`, read from its config.json (recorded in each row)."""
    from rd_keras import train_lib

    try:
        with open(wd.config_path(workdir)) as f:
            return train_lib.training_settings(json.load(f))
    except (OSError, ValueError, KeyError) as e:
        raise common.FlagError(f"{workdir!r}: its {wd.CONFIG_FILE} is unreadable ({e!r}); remove the workdir "
                               "or choose another --out.") from None


def _diff(ran, now) -> dict:
    """Keys whose value differs. A key the run recorded under an older name counts under its name now
    (`workdir.RENAMED_KEYS`); a key newer than the run stands at its library default
    (`rd_keras.configs.common`), the value that keeps the behaviour the code had before the key existed."""
    from rd_keras.configs import common as library

    ran = {wd.RENAMED_KEYS.get(key, key): value for key, value in ran.items()}
    newer = wd.flat_config(library.get_config())
    pairs = {key: (ran.get(key, newer.get(key, _ABSENT)), now.get(key, _ABSENT)) for key in sorted({*ran, *now})}
    return {key: pair for key, pair in pairs.items() if pair[0] != pair[1]}


def _refuse_other_settings(diff, what, how, other_ways):
    if diff:
        lines = "\n".join(f"  {key}: {old!r} in the run, {new!r} now" for key, (old, new) in diff.items())
        raise common.FlagError(f"{what} of other settings:\n{lines}\n{how}\nPin those values (--override, or in "
                               f"the --variant) to reuse it, or {other_ways}.")


# ----------------------------------------------------------------------------- rows of earlier results


def read_rows(paths) -> dict:
    """{run name: row} of the finished runs in earlier `bench accuracy --json` files (a later file's row
    wins). A row written before rows recorded their settings cannot be checked, so a file of such rows is
    refused."""
    rows = {}
    for path in paths:
        try:
            with open(path) as f:
                payload = json.load(f)
            results = payload["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise common.FlagError(f"--reuse_json={path!r}: not a results file of bench accuracy ({e!r}).") from None
        kept = {r["name"]: {**r, "reused_from": path} for r in results if not r.get("failed")}
        unrecorded = sorted(name for name, r in kept.items() if "settings" not in r)
        if unrecorded:
            raise common.FlagError(f"--reuse_json={path!r}: rows {unrecorded} record no settings (the file is older "
                                   "than settings in rows), so they cannot be checked against today's; rerun "
                                   "bench accuracy with those workdirs to rewrite it.")
        rows.update(kept)
    return rows


def recorded(run, rows):
    """The row of `rows` that stands for `run`, whose workdir is absent, else None: reused only when it
    trained the settings the run's command gives today."""
    row = rows.get(run["name"])
    if row is None or os.path.exists(run["workdir"]):
        return None
    _refuse_other_settings(_diff(row["settings"], settings_now(run["command"][1:])),
                           f"{row['reused_from']!r} has a row {run['name']!r}", f"It ran {row.get('command')}",
                           "leave out --reuse_json")
    return row
