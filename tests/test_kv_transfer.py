"""KV connectors with the real transports: NIXL (UCX, DRAM) and the ZMQ fallback, between two
processes, as a prefill worker and a decode worker use them."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from kvcache.transfer import IncompatiblePeerError, KVLayout, collate, create_connector
from kvcache.transfer.collate import Region, per_page

LAYOUT = KVLayout(
    model="m", dtype="float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8
)
SHAPE = (32, 3, 2, 4, 2, 8)
BPB = LAYOUT.bytes_per_block

TRANSPORTS = ["zmq"]
try:
    import nixl  # noqa: F401

    TRANSPORTS.insert(0, "nixl")
except ImportError:  # the fallback must be tested either way; NIXL is in the test extra
    pass


def test_collate_pairs_runs_on_both_sides():
    assert collate([4, 5, 6], [10, 11, 12], 100) == [Region(400, 1000, 300)]
    # a break on either side starts a new region
    assert collate([4, 5, 6], [10, 11, 20], 100) == [Region(400, 1000, 200), Region(600, 2000, 100)]
    assert collate([4, 7], [1, 2], 100) == [Region(400, 100, 100), Region(700, 200, 100)]
    assert collate([], [], 100) == []
    with pytest.raises(ValueError):
        collate([1], [], 100)
    assert len(per_page([4, 5, 6], [10, 11, 12], 300, 3)) == 9


def _receiver(transport: str, q_out, q_in) -> None:
    kv = torch.zeros(SHAPE)
    conn = create_connector(transport, "decode-0", kv, LAYOUT)
    q_out.put(conn.endpoint())
    sender_ep = q_in.get()
    conn.add_peer(sender_ep)
    got = []
    import time

    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        got += conn.poll_received()
        time.sleep(0.005)
    q_out.put([(a.request_id, a.sender_id, a.payload) for a in got])
    q_out.put(kv.numpy().tobytes())  # plain bytes: no shared-memory handles across exit
    conn.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_process_transfer_writes_exactly_the_reserved_blocks(transport):
    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(transport, q_out, q_in))
    proc.start()
    try:
        kv = torch.randn(SHAPE)
        conn = create_connector(transport, "prefill-0", kv, LAYOUT)
        assert conn.transport == transport
        conn.add_peer(q_out.get(timeout=60))
        q_in.put(conn.endpoint())
        src, dst = [3, 4, 5, 9], [20, 21, 22, 7]
        conn.send("req-1", src, "decode-0", dst, b"first-token:42")
        conn.send("req-empty", [], "decode-0", [], b"all-cached")
        results = []
        import time

        deadline = time.monotonic() + 30
        while len(results) < 2 and time.monotonic() < deadline:
            results += conn.poll_sent()
            time.sleep(0.005)
        by_id = {r.request_id: r for r in results}
        assert by_id["req-1"].ok and by_id["req-1"].nbytes == 4 * BPB
        assert by_id["req-1"].num_descriptors == 2  # [3,4,5]->[20,21,22] collated, 9->7 alone
        assert by_id["req-empty"].ok and by_id["req-empty"].nbytes == 0
        arrivals = sorted(q_out.get(timeout=60))
        assert arrivals == [
            ("req-1", "prefill-0", b"first-token:42"),
            ("req-empty", "prefill-0", b"all-cached"),
        ]
        remote = torch.frombuffer(bytearray(q_out.get(timeout=60)), dtype=torch.float32).view(SHAPE)
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(remote[d], kv[s])
        untouched = [b for b in range(SHAPE[0]) if b not in dst]
        assert torch.count_nonzero(remote[untouched]) == 0
        conn.close()
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_handshake_refuses_mismatched_layouts(transport):
    a = create_connector(transport, "a", torch.zeros(SHAPE), LAYOUT)
    other = KVLayout(
        model="other", dtype="float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8
    )
    b = create_connector(transport, "b", torch.zeros(SHAPE), other)
    with pytest.raises(IncompatiblePeerError, match="model: 'm' here vs 'other' there"):
        a.add_peer(b.endpoint())
    with pytest.raises(KeyError):
        a.send("r", [1], "b", [1], b"")
    a.close()
    b.close()


def test_block_ids_are_range_checked():
    a = create_connector("zmq", "a", torch.zeros(SHAPE), LAYOUT)
    b = create_connector("zmq", "b", torch.zeros(SHAPE), LAYOUT)
    a.add_peer(b.endpoint())
    with pytest.raises(ValueError, match="destination block ids"):
        a.send("r", [1], "b", [99], b"")
    with pytest.raises(ValueError, match="source block ids"):
        a.send("r", [-1], "b", [1], b"")
    a.close()
    b.close()


def test_zmq_receiver_writes_nothing_for_a_request_that_ended():
    """The ZMQ receiver writes the KV itself, so a late sender's data for a request that ended
    (its blocks possibly reused) is dropped, not written; the arrival is still reported."""
    a = create_connector("zmq", "a", torch.randn(SHAPE), LAYOUT)
    kv = torch.zeros(SHAPE)
    b = create_connector("zmq", "b", kv, LAYOUT)
    a.add_peer(b.endpoint())
    a.send("ended", [1, 2], "b", [3, 4], b"late")
    a.send("waiting", [5], "b", [6], b"on time")
    got = []
    import time

    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        got += b.poll_received(accept=lambda rid: rid == "waiting")
    assert sorted(x.request_id for x in got) == ["ended", "waiting"]
    assert torch.count_nonzero(kv[[3, 4]]) == 0
    assert torch.equal(kv[6], a.kv_cache[5])
    a.close()
    b.close()


def test_nixl_progress_thread_only_for_gpu_caches(monkeypatch):
    """NIXL's progress thread busy-polls a core: CPU workers go without it (their transfers
    progress when polled, as every NIXL test here shows); the env var decides when set."""
    from kvcache.transfer.nixl_connector import progress_thread

    cpu_cache = torch.zeros(4)
    monkeypatch.delenv("PDSERVE_NIXL_PROGRESS_THREAD", raising=False)
    assert progress_thread(cpu_cache) is False
    monkeypatch.setenv("PDSERVE_NIXL_PROGRESS_THREAD", "1")
    assert progress_thread(cpu_cache) is True
    if torch.cuda.is_available():
        gpu_cache = torch.zeros(4, device="cuda")
        monkeypatch.setenv("PDSERVE_NIXL_PROGRESS_THREAD", "0")
        assert progress_thread(gpu_cache) is False
        monkeypatch.delenv("PDSERVE_NIXL_PROGRESS_THREAD")
        assert progress_thread(gpu_cache) is True
