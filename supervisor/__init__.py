"""agent-supervisor: a host-level process supervisor with kernel-enforced termination."""

__all__ = ["__version__"]
__version__ = "0.1.0"
