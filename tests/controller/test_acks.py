"""The controller's acks to agents: ranges per node, and the request to send again."""

from __future__ import annotations

from vetd.controller.acks import Acks
from vetd.core.protocol import AckRange, Result


def result(node: str, seq: int, session: str = "s1") -> Result:
    return Result(cluster="alps", node=node, session=session, seq=seq, ts=1.0, check="c", status="pass")


def test_committed_messages_fold_into_ranges_and_a_resend_request_rides_along() -> None:
    acks = Acks("ctl")
    acks.committed([result("nid001", seq) for seq in (1, 2, 3, 5)] + [result("nid001", 1, "s0")])
    acks.resend("alps", "nid001")
    acks.resend("alps", "nid002")  # online before the controller subscribed, nothing stored yet
    by_node = {ack.node: ack for ack in acks.take()}
    assert by_node["nid001"].ranges == [AckRange("s1", 1, 3), AckRange("s1", 5, 5), AckRange("s0", 1, 1)]
    assert by_node["nid001"].resend and by_node["nid002"].resend and by_node["nid002"].ranges == []
    assert acks.take() == []  # taken once
    acks.committed([result("nid001", 6)])
    assert [ack.resend for ack in acks.take()] == [False]
