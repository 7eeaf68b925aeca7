"""autoscaler: puts Fly.io apps to sleep when idle and wakes and scales them on traffic."""

import signal as _signal

__all__ = ["HELD_SIGNALS", "__version__"]

HELD_SIGNALS = frozenset({_signal.SIGHUP, _signal.SIGUSR2, _signal.SIGTERM, _signal.SIGINT})
"""What the `autoscaler` command holds back from its first line (autoscaler.__main__, and
cli.main when called itself), and `autoscaler run` until it has handlers for them: Service.run
and the supervisor of ``run --workers`` let them through once theirs are in place. Their
default actions would end it (SIGHUP, SIGUSR2, SIGTERM), or raise KeyboardInterrupt out of
whatever runs (SIGINT)."""

__version__: str  # looked up on first use (below)


def __getattr__(name: str) -> str:
    """``__version__``, from the installed metadata on first use: importlib.metadata costs
    tens of milliseconds, which every command paid before its own code ran (and `autoscaler
    run` before it could hold back SIGHUP: cli.main)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("autoscaler")
    except PackageNotFoundError:  # running from a checkout without an install
        found = "0.0.0+checkout"
    globals()["__version__"] = found
    return found
