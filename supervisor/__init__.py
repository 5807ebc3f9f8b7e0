"""agent-supervisor: a host-level process supervisor with kernel-enforced termination."""

__all__ = ["DISTRIBUTION", "__version__"]

# The name on PyPI's side ("agent-supervisor" there is someone else's project); the import
# package stays `supervisor` and the commands stay agentctl and agent-supervisord.
DISTRIBUTION = "agent-supervisor-killswitch"


def __getattr__(name: str) -> str:
    # The version is looked up when first asked for, and from the name of the installed
    # distribution's .dist-info directory, which carries it: importlib.metadata (and the email
    # parser it reads METADATA with) would cost agentctl --version more than the rest of it.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    found = _installed_version()
    globals()["__version__"] = found
    return found


def _installed_version() -> str:
    import os
    import sys

    prefix, suffix = DISTRIBUTION.replace("-", "_") + "-", ".dist-info"
    for entry in sys.path:  # the first on the path wins, as it does for importlib.metadata
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for dist_info in names:
            if dist_info.startswith(prefix) and dist_info.endswith(suffix):
                return dist_info[len(prefix):-len(suffix)]
    from importlib.metadata import PackageNotFoundError, version

    try:  # an egg-info or zipped install: the slow, general lookup
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a checkout on sys.path that was never installed
        return "0+unknown"
