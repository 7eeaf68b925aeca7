"""autoscaler: puts Fly.io apps to sleep when idle and wakes and scales them on traffic."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("autoscaler")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+checkout"

__all__ = ["__version__"]
