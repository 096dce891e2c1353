"""vetd agent: the node-side daemon, its plugin system and the wire protocol."""

__version__ = "0.1.0"
