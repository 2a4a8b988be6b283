"""The control-plane wire format: msgpack round trips and version checks."""

from __future__ import annotations

import msgspec
import pytest

from kvcache.events import BlockRemoved, BlockStored, KVEventBatch
from kvcache.transfer import CONNECTOR_VERSION, KVEndpoint, KVLayout
from server.engine.outputs import EngineStats, RequestOutput, RequestTimings, TokenLogprobs
from server.engine.sampling_params import SamplingParams
from server.worker import messages as m

ENDPOINT = KVEndpoint(
    worker_id="d", transport="zmq", version=CONNECTOR_VERSION,
    layout=KVLayout("m", "float32", 16, 2, 2, 8), num_blocks=4, mem_type="DRAM", device_id=0,
    base_addr=0, nixl_metadata=b"\x00\x01", zmq_address="tcp://127.0.0.1:5000",
)  # fmt: skip


def test_round_trip_every_message():
    out = RequestOutput(
        "r-0",
        [5, 6],
        new_logprobs=[TokenLogprobs(5, -0.5, 1, [5, 7], [-0.5, -1.5])],
        finish_reason="length",
        num_prompt_tokens=3,
        num_cached_tokens=2,
        timings=RequestTimings(1.0, 1.5, 2.0, 3.0, 1),
    )
    msgs = [
        m.Hello(worker_id="w", role="both", model_name="x", max_model_len=10, vocab_size=20, pid=3),
        m.StepOutputs(worker_id="w", outputs=[out, RequestOutput("r-1", [1])]),
        m.RequestError(worker_id="w", request_id="r", message="too long"),
        m.Heartbeat(worker_id="w", stats=EngineStats(1, 2, 0.5, 10, 5, 7, 3, 0, 9, 8)),
        m.Goodbye(worker_id="w", reason="bye"),
        m.Hello(
            worker_id="w", role="decode", model_name="x", max_model_len=10, vocab_size=20, pid=3,
            max_num_seqs=8, kv_endpoint=ENDPOINT,
        ),
        m.Reserved(worker_id="w", request_id="r", ok=True, first_block=2, block_ids=[7, 8],
                   lease_s=3.0),
        m.PrefillDone(worker_id="w", outcomes=[m.PrefillOutcome("r", True, 4096, 1, 0.01),
                                               m.PrefillOutcome("s", False, error="aborted")]),
        m.KVEvents(batch=KVEventBatch("w", 3, 1.5, [BlockStored([1, 2], None, [0] * 8, 4),
                                                    BlockRemoved([5])])),
        m.KVSnapshot(worker_id="w", block_hashes=[1, 2], next_seq=4),
        m.PeerRefused(worker_id="w", peer_id="p", message="dtype differs"),
        m.IntegrityReport(worker_id="w", ok=True, num_blocks=10, num_free_blocks=10),
    ]  # fmt: skip
    for msg in msgs:
        assert m.decode_worker_message(m.encode(msg)) == msg
    params = SamplingParams(max_tokens=7, temperature=0.0, stop=["x"], seed=3, logit_bias={5: -100.0, 9: 2.5})
    for msg in [
        m.AddRequest(request_id="r", prompt_token_ids=[1, 2], params=params),
        m.AbortRequests(request_ids=["a", "b"]),
        m.Shutdown(),
        m.ReserveRemote(request_id="r", prompt_token_ids=[1, 2], params=params, lease_s=5.0),
        m.RemotePrefill(request_id="r", prompt_token_ids=[1, 2], params=params,
                        decode_worker="d", first_block=0, block_ids=[3], lease_s=4.0,
                        deadline=1.7e9),
        m.RetryPrefill(request_ids=["r"]),
        m.CancelRemoteKV(request_ids=["r"], writer_gone=True),
        m.AddPeers(endpoints=[ENDPOINT]),
        m.RemovePeer(worker_id="d"),
        m.ResyncKV(),
        m.CheckIntegrity(),
    ]:  # fmt: skip
        assert m.decode_router_message(m.encode(msg)) == msg


def test_other_version_is_refused_with_both_numbers():
    frame = msgspec.msgpack.encode({"type": "abort", "version": 99, "request_ids": ["a"]})
    with pytest.raises(m.ProtocolError, match=f"99.*version {m.PROTOCOL_VERSION}"):
        m.decode_router_message(frame)
    # A future version whose shape changed is still reported as a version problem.
    future = m.PROTOCOL_VERSION + 1
    frame = msgspec.msgpack.encode({"type": "abort", "version": future, "ids": 5})
    with pytest.raises(m.ProtocolError, match=f"version {future}"):
        m.decode_router_message(frame)


def test_garbage_and_wrong_direction_are_refused():
    with pytest.raises(m.ProtocolError):
        m.decode_worker_message(b"\xc1not msgpack")
    with pytest.raises(m.ProtocolError, match="malformed"):
        m.decode_worker_message(m.encode(m.Shutdown()))  # a router message sent to the router
