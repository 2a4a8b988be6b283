"""KV handoff VRAM -> VRAM over NIXL between two processes on one GPU, as a prefill worker and a
decode worker on the same card use it: every destination block must hold exactly its source
block's bytes (compared as raw bits), every other block must keep its poison, and the payload
must arrive only with the data. Collated regions and the per-page baseline both.

UCX chooses the transport: with UCX_TLS unset it takes `cuda_ipc` for the data and `tcp` for
the notification (seen on an H200, 2026-11-22); a restricted UCX_TLS must keep both
(`cuda_ipc,cuda_copy,tcp` works, `cuda_ipc,cuda_copy,sm` cannot create the agent).
See benchmarks/results/2026-11-22-gpu-nixl-handoff.md.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from kvcache.transfer import KVLayout, create_connector

pytestmark = pytest.mark.gpu

LAYOUT = KVLayout(
    model="m", dtype="bfloat16", block_size=16, num_layers=4, num_kv_heads=2, head_dim=64
)
NUM_BLOCKS = 40
SHAPE = (NUM_BLOCKS, 4, 2, 16, 2, 64)
POISON = -21846  # int16 0xAAAA
SRC = [3, 4, 5, 6, 9, 10, 20, 31]
DST = [30, 31, 32, 12, 13, 14, 2, 0]  # runs break on either side: 5 collated regions
# [3-5]->[30-32], 6->12 (source breaks), [9-10]->[13-14] (destination breaks), 20->2, 31->0


def _receiver(q_out, q_in) -> None:
    kv = torch.empty(SHAPE, dtype=torch.bfloat16, device="cuda")
    kv.view(torch.int16).fill_(POISON)
    conn = create_connector("nixl", "decode-0", kv, LAYOUT)
    q_out.put(conn.endpoint())
    conn.add_peer(q_in.get(timeout=120))
    expected = q_in.get(timeout=120)  # number of requests the sender will push
    got = []
    deadline = time.monotonic() + 60
    while len(got) < expected and time.monotonic() < deadline:
        got += conn.poll_received()
        time.sleep(0.001)
    torch.cuda.synchronize()
    q_out.put([(a.request_id, a.sender_id, a.payload) for a in got])
    q_out.put(kv.view(torch.int16).cpu().numpy().tobytes())
    q_in.get(timeout=120)  # the sender has read the bytes: safe to deregister
    conn.close()


@pytest.mark.parametrize("collated", [True, False], ids=["collated", "per-page"])
def test_nixl_vram_to_vram_two_processes_exact_bytes(collated):
    pytest.importorskip("nixl")
    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(q_out, q_in))
    proc.start()
    try:
        gen = torch.Generator(device="cuda").manual_seed(7)
        bits = torch.randint(-32768, 32768, SHAPE, dtype=torch.int16, device="cuda", generator=gen)
        kv = bits.view(torch.bfloat16)
        conn = create_connector("nixl", "prefill-0", kv, LAYOUT)
        conn.collated = collated
        ep = q_out.get(timeout=120)
        assert ep.mem_type == "VRAM" and conn.endpoint().mem_type == "VRAM"
        conn.add_peer(ep)
        q_in.put(conn.endpoint())
        q_in.put(2)
        conn.send("req-1", SRC, "decode-0", DST, b"first-token:42")
        conn.send("req-empty", [], "decode-0", [], b"all-cached")
        results = []
        deadline = time.monotonic() + 60
        while len(results) < 2 and time.monotonic() < deadline:
            results += conn.poll_sent()
            time.sleep(0.001)
        by_id = {r.request_id: r for r in results}
        assert by_id["req-1"].ok, by_id["req-1"].error
        assert by_id["req-1"].nbytes == len(SRC) * LAYOUT.bytes_per_block
        assert by_id["req-1"].num_descriptors == (5 if collated else len(SRC) * LAYOUT.num_layers)
        assert by_id["req-empty"].ok
        arrivals = sorted(q_out.get(timeout=120))
        assert arrivals == [
            ("req-1", "prefill-0", b"first-token:42"),
            ("req-empty", "prefill-0", b"all-cached"),
        ]
        remote = torch.frombuffer(bytearray(q_out.get(timeout=120)), dtype=torch.int16)
        remote = remote.view(SHAPE)
        local = bits.cpu()
        for s, d in zip(SRC, DST, strict=True):
            assert torch.equal(remote[d], local[s]), f"block {s} -> {d} differs"
        untouched = [b for b in range(NUM_BLOCKS) if b not in DST]
        assert bool((remote[untouched] == POISON).all())
        conn.close()
    finally:
        q_in.put("done")  # lets the receiver deregister and exit, also after a failure
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
