"""``nccl_pairs`` without GPUs: what it says when it cannot run, and its hand-over and deadlines with a stand-in worker.

The NCCL transport itself needs GPUs (``scripts/nccl-pairs-gpu`` runs it on
one); the orchestration it shares with ``tcp_pairs`` is tested in
``tests/agent/test_vet.py``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.support.procs import REPO
from vetd.agent.api import PairSample, Peer
from vetd.plugins.nccl.config import NcclConfig
from vetd.plugins.nccl.pairs import WORKER_ENV, NcclPairEndpoint, unavailable


def test_without_cuda_it_says_why() -> None:
    assert "numpy" in unavailable(NcclConfig(array_backend="numpy"))
    assert unavailable(NcclConfig())  # no CuPy, no GPU on this machine: a reason, never ""


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(WORKER_ENV, "tests.support.pairworker_standin")
    monkeypatch.setenv("STANDIN_DIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return tmp_path


def _pair(config: NcclConfig) -> tuple[PairSample | None, PairSample | None]:
    lead, other = NcclPairEndpoint(config), NcclPairEndpoint(config)
    samples: list[PairSample | None] = [None, None]

    def side(index: int, me: NcclPairEndpoint, peer: NcclPairEndpoint) -> None:
        samples[index] = me.measure(Peer("peer", "127.0.0.1", peer.announce()), 0.1, index == 0, "r0-a-b")

    threads = [threading.Thread(target=side, args=(0, lead, other)), threading.Thread(target=side, args=(1, other, lead))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    lead.close()
    other.close()
    return samples[0], samples[1]


def test_the_lead_hands_its_unique_id_to_the_peer(standin: Path) -> None:
    first, second = _pair(NcclConfig())
    assert first is not None and second is not None
    assert first.gbps == 12.5 and second.gbps == 12.5, (first, second)
    assert (standin / "0").read_text() == (standin / "1").read_text() != ""


@pytest.mark.usefixtures("standin")
def test_a_hung_worker_is_killed_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_HANG", "1")
    first, second = _pair(NcclConfig(pair_overhead=2.0))
    assert first is not None and first.gbps is None and "did not finish in time" in first.error
    assert second is not None and second.gbps is None  # no id ever came, or its worker hung too
