"""What the agent and the controller both use, in one place.

- :mod:`~vetd.core.protocol`: the wire protocol (msgspec Structs, topics).
- :mod:`~vetd.core.configfile`: reading TOML config, durations, file:line: key errors.
- :mod:`~vetd.core.mqtt`: broker addresses, credentials, full-jitter back-off, the connect-forever loop.
- :mod:`~vetd.core.proc`: a subprocess with a deadline.
- :mod:`~vetd.core.output`: tables for the terminal.
- :mod:`~vetd.core.logs`: structlog set-up.
- :mod:`~vetd.core.cli`: the root ``vetd`` command that the agent, the controller and plugins add to.

Nothing here imports the agent or the controller.
"""

__version__ = "0.1.0"
