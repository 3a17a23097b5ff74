"""The errors kftune raises on purpose.

A small family, in the manner of keras-tuner's ``errors.py``: each class also
subclasses the built-in that fits, so callers can catch either. Components map
them to exit codes: the user's mistakes (``InputError``) are not worth a retry,
storage faults may be.
"""


class KftuneError(Exception):
    """Base class of every error kftune raises on purpose."""


class InputError(KftuneError, ValueError):
    """The user gave something kftune cannot use: a bad parameter, spec or dataset.

    The message names the input and says what to do.
    """


class StorageError(KftuneError, RuntimeError):
    """Object storage refused or failed a request (missing bucket, denied access)."""


class ExistsError(KftuneError, FileExistsError):
    """A destination already holds what kftune would write; kftune never overwrites it."""


class DeployError(KftuneError, RuntimeError):
    """The cluster did not serve a version: KServe missing, access denied, or not Ready in time.

    The message says what the cluster answered and what to do; the exported
    version itself is stored and unchanged.
    """


def check_numbers(config, names: tuple[str, ...]) -> None:
    """Refuses a value of ``config`` that is not a number, naming the field.

    A value typed into a form or a YAML file can arrive as text ("0.5"); this
    says so instead of a TypeError from the first comparison that meets it.
    """
    import math

    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"`{name}` must be a number. Received: {name}={value!r}")
        if not math.isfinite(value):
            # nan passes every comparison-free check and trains a NaN loss to the end.
            raise InputError(f"`{name}` must be a finite number. Received: {name}={value!r}")


def check_whole_numbers(config, minimums: dict[str, int | None]) -> None:
    """Refuses a field of ``config`` that is not a whole number at least its minimum (None: any).

    ``True`` is refused too, although Python counts it as 1.
    """
    for name, low in minimums.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            bound = "" if low is None else f" >= {low}"
            raise InputError(f"`{name}` must be a whole number{bound}. Received: {name}={value!r}")


# Exit codes at the component boundary: a user's mistake is not worth a retry.
EXIT_INPUT = 2
EXIT_STORAGE = 3
EXIT_DEPLOY = 4


class user_errors:  # noqa: N801 - used as a context manager, reads like one
    """Turns kftune's own errors into one line on stderr and an exit code.

    A user who gets a parameter wrong sees ``kftune: error: <what and what to
    do>`` at the end of the step's log, not a traceback from deep inside
    TensorFlow. Anything else is a bug or a system fault and keeps its traceback.
    """

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        import sys

        if isinstance(error, InputError | ExistsError):
            print(f"kftune: error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INPUT)
        if isinstance(error, StorageError):
            print(f"kftune: storage error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_STORAGE)
        if isinstance(error, DeployError):
            print(f"kftune: deploy error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_DEPLOY)
        return False
