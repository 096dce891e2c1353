"""``[plugins.tcp_pairs]``: the TCP stream probe's streams, duration and deadlines."""

from __future__ import annotations

from typing import Annotated

import msgspec

from vetd.agent.api import Duration


class TcpPairsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Parallel TCP streams per direction (iperf3 ``-P``): one stream rarely fills a fast link.
    streams: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    #: How long each direction of a pair is measured (iperf3 ``-t``). A round lasts about this long.
    seconds: Duration = Duration(3.0)
    #: Bytes per write, in KiB (iperf3's ``-l`` default for TCP: 128 KiB).
    write_kib: Annotated[int, msgspec.Meta(ge=1, le=16384)] = 128
    #: TCP port the probe listens on; 0: any free port (it is announced through the rendezvous).
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    #: A peer that does not accept a connection within this is a failed measurement.
    connect_timeout: Duration = Duration(5.0)
