"""agent-supervisor: a host-level process supervisor with kernel-enforced termination."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["DISTRIBUTION", "__version__"]

# The name on PyPI's side ("agent-supervisor" there is someone else's project); the import
# package stays `supervisor` and the commands stay agentctl and agent-supervisord.
DISTRIBUTION = "agent-supervisor-killswitch"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
