"""Train a plain CNN by Residual Distillation (or one net, supervised, or a fine-tune) as configured.

    rd-keras-train --config=fashion_mnist:smoke --workdir=/tmp/smoke
    rd-keras-train --config=fashion_mnist --workdir=W --config.train.lr=0.05
    python train.py --config=configs/fashion_mnist.py --workdir=W        # the same, in a checkout

`--config` is a config file (`path[:variant]`) or the name of a shipped config (fashion_mnist, cifar10,
cifar100, imagenet, transfer; `name[:variant]`, e.g. cifar10:smoke). `--config.<key>=<value>` overrides any
key, and an unknown key is an error. Rerunning with the same --workdir resumes. See rd_keras/train_lib.py.

Any problem found before training (a flag, a config value, the data, the teacher, a workdir of another
run) ends the program with exit status 1 and one message `error: ...` on stderr (a config diff lists its
keys on the following lines), and writes nothing. `--helpfull` also lists absl's own flags.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rd_keras import configs, train_lib, workdir
from rd_keras.errors import RDError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file `path[:variant]`, or a shipped config `name[:variant]`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the trained models.")
flags.mark_flags_as_required(["config", "workdir"])


def _flag_error(error, argv):
    """One line for a failure to parse the command line; config_flags reports some with a traceback."""
    if isinstance(error, (AttributeError, KeyError)):  # an override naming a key the config lacks
        name = str(error).strip("\"'")
        for arg in argv[1:]:
            key = arg.partition("=")[0].removeprefix("--config.")
            if arg.startswith("--config.") and name in key.split("."):
                return f"{arg}: config.{key} does not exist (every key is listed in rd_keras/configs/common.py)"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


# config_flags reads an override's key path as a Python expression, and `from` is a keyword: this one key
# is taken off the command line here and set after parsing.
_KEYWORD_OVERRIDES = ("transfer.from",)
HELP_FLAGS = {"--help", "-h", "-?", "--helpshort"}


def _take_keyword_overrides(argv):
    """`(argv without --config.transfer.from[=]VALUE, {key: value})`."""
    rest, taken = [], {}
    args = iter(argv)
    for arg in args:
        name, sep, value = arg.partition("=")
        key = name.removeprefix("--config.")
        if name.startswith("--config.") and key in _KEYWORD_OVERRIDES:
            taken[key] = value if sep else next(args, "")
        else:
            rest.append(arg)
    return rest, taken


def _config_files(argv):
    """argv with every `--config[=]SPEC` given as the file it names (`configs.path_of`)."""
    rest = []
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            rest += [arg, configs.path_of(next(args, ""))]
        elif arg.startswith("--config="):
            rest.append("--config=" + configs.path_of(arg.removeprefix("--config=")))
        else:
            rest.append(arg)
    return rest


def _parse(argv, flag_values, config_flag):
    """Parses `argv` into `flag_values`; returns absl's remaining arguments."""
    argv, taken = _take_keyword_overrides(argv)
    argv = _config_files(argv)
    remaining = flag_values(argv)
    config_flag.value.to_dict()  # config_flags defers the error of a file it could not load to a first use
    for key, value in taken.items():
        section, name = key.split(".")
        config_flag.value[section][name] = value
    return remaining


def _parse_flags(argv):
    if HELP_FLAGS & set(argv[1:]):  # absl would print the same and exit with status 1
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    argv = list(argv)  # app.run passes sys.argv itself, which the next line rewrites
    try:
        sys.argv[:] = _config_files(_take_keyword_overrides(argv)[0])  # config_flags reads overrides there
        return _parse(argv, flags.FLAGS, _CONFIG)
    except Exception as e:  # absl, config_flags and the config file itself raise many kinds
        print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
        sys.exit(1)


def resolve_config(argv):
    """The config the command line `argv` (`[program, --config=..., --config.KEY=VALUE, ...]`) trains with,
    parsed exactly as this command parses it, without touching the process's flags. Raises ValueError with
    the one-line message the command would print."""
    argv = list(argv)
    values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True,
        sys_argv=_config_files(_take_keyword_overrides(argv)[0]))
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    try:
        _parse(argv, values, config_flag)
    except Exception as e:  # as in _parse_flags
        raise ValueError(_flag_error(e, argv)) from None
    return config_flag.value


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # absl's default (INFO) floods the progress bar with TF chatter
        logging.set_verbosity(logging.WARNING)
    try:
        train_lib.run(_CONFIG.value, _WORKDIR.value)
    except RDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main():
    """The command line (`rd-keras-train`, `python train.py`)."""
    workdir.code_version()  # the code just imported, before the checkout can change under a long run
    # absl's --help prints the __main__ module's docstring and the flags it counts as that module's own.
    sys.modules["__main__"].__doc__ = __doc__
    for flag in (_CONFIG, _WORKDIR):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag.name])
    app.run(_main, flags_parser=_parse_flags)
