"""vetd agent: the node-side daemon and its plugin system (plugins use :mod:`vetd.agent.api`)."""

from vetd.core import __version__

__all__ = ["__version__"]
