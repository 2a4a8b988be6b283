"""The control-plane wire format: msgpack round trips and version checks."""

from __future__ import annotations

import msgspec
import pytest

from server.engine.outputs import EngineStats, RequestOutput, RequestTimings, TokenLogprobs
from server.engine.sampling_params import SamplingParams
from server.worker import messages as m


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
    ]
    for msg in msgs:
        assert m.decode_worker_message(m.encode(msg)) == msg
    params = SamplingParams(max_tokens=7, temperature=0.0, stop=["x"], seed=3)
    for msg in [
        m.AddRequest(request_id="r", prompt_token_ids=[1, 2], params=params),
        m.AbortRequests(request_ids=["a", "b"]),
        m.Shutdown(),
    ]:
        assert m.decode_router_message(m.encode(msg)) == msg


def test_other_version_is_refused_with_both_numbers():
    frame = msgspec.msgpack.encode({"type": "abort", "version": 99, "request_ids": ["a"]})
    with pytest.raises(m.ProtocolError, match="99.*version 1"):
        m.decode_router_message(frame)
    # A future version whose shape changed is still reported as a version problem.
    frame = msgspec.msgpack.encode({"type": "abort", "version": 2, "ids": 5})
    with pytest.raises(m.ProtocolError, match="version 2"):
        m.decode_router_message(frame)


def test_garbage_and_wrong_direction_are_refused():
    with pytest.raises(m.ProtocolError):
        m.decode_worker_message(b"\xc1not msgpack")
    with pytest.raises(m.ProtocolError, match="malformed"):
        m.decode_worker_message(m.encode(m.Shutdown()))  # a router message sent to the router
