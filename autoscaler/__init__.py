"""autoscaler: puts Fly.io apps to sleep when idle and wakes and scales them on traffic."""

__all__ = ["__version__"]

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
