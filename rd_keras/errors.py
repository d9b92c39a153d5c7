"""The errors a user can fix: one base class, `RDError`, so `train.py` (and any caller) catches one type
and prints one `error: <message>` line instead of a traceback. Each subclass also derives from the builtin
it replaced (ValueError, FloatingPointError), so `except ValueError` keeps working.

Message style: name the key, flag or path and the offending value (`config.x=...`, `--flag=...`,
`path: problem`), then say what would work. Every command line prints such an error as one line
`error: <message>` on stderr, without a traceback: `train.py` (exit status 1), and through
`exit_with_error` `python -m rd_keras.bench` and `python -m rd_keras.export` (exit status 2, argparse's).
"""


def exit_with_error(parser, error):
    """Ends an argparse command line on a bad argument value: `error: <message>`, exit status 2."""
    parser.exit(2, f"error: {error}\n")


class RDError(Exception):
    """Base class of every error rd_keras raises for bad input (config, flags, data, files)."""


class ConfigError(RDError, ValueError):
    """A config value that cannot work; raised before anything is written."""


class DataError(RDError, ValueError):
    """Data files or prepared datasets that are missing, corrupt or inconsistent."""


class WorkdirError(RDError, ValueError):
    """The workdir belongs to a different run (or is not a workdir at all)."""


class TeacherError(RDError, ValueError):
    """The pretrained teacher is missing, unreadable, or does not match the config."""


class PretrainedError(RDError, ValueError):
    """An unknown keras.applications name, or weights that do not fit it or the configured data."""


class TransferError(RDError, ValueError):
    """The net to transfer from is missing, unreadable, or cannot be rebuilt for the configured data."""


class FlagError(RDError, ValueError):
    """A command-line value that cannot work; the message quotes it."""


class NonFiniteLossError(RDError, FloatingPointError):
    """A loss (or a weight) became NaN or Inf under `train.nan_policy='stop'`."""


def in_range(value, low, high=float("inf"), *, kinds=(int, float), low_open=False) -> bool:
    """Whether `value` is a number of `kinds` (never a bool) in [low, high], or (low, high] with `low_open`:
    the range check of every numeric setting (train_lib.validate, ResidualDistiller)."""
    return isinstance(value, kinds) and not isinstance(value, bool) and value <= high and (
        value > low if low_open else value >= low)


def interval(low, high=float("inf"), low_open=False) -> str:
    """'[0, 1]' or '(0, inf]', as the errors of `in_range` checks write it."""
    return f"{'(' if low_open else '['}{low}, {high}]"


def require(ok, message):
    """Raises ConfigError(message) unless `ok`: the config checks of `train_lib.validate` and the modes."""
    if not ok:
        raise ConfigError(message)


def require_choice(value, allowed, key):
    require(value in allowed, f"config.{key} must be one of {allowed}, got {value!r}.")


def require_number(value, key, low, high=float("inf"), integer=False, low_open=False):
    ok = in_range(value, low, high, kinds=int if integer else (int, float), low_open=low_open)
    require(ok, f"config.{key} must be {'an integer' if integer else 'a number'} in "
            f"{interval(low, high, low_open)}, got {value!r}.")
