"""The worker loop over a real ZMQ socket pair with the real engine and model (in-process; the
loop runs in a thread and owns the engine until it exits)."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from server.engine.engine import EngineConfig, EngineCore
from server.engine.sampling_params import SamplingParams
from server.worker import messages as m
from server.worker.loop import WorkerLoop


@pytest.fixture(scope="module")
def engine(share_loaded_models):
    return EngineCore(EngineConfig(kv_cache_memory="16MiB", max_num_seqs=8, progress=False))


class Harness:
    """The router end: a ROUTER socket talking to one WorkerLoop thread."""

    def __init__(self, engine: EngineCore, address: str) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(address)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, b"w0")
        self.dealer.connect(address)
        hello = m.Hello(
            worker_id="w0", role="both", model_name=engine.model_name, max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size, pid=0,
        )  # fmt: skip
        self.loop = WorkerLoop(engine, self.dealer, hello, heartbeat_interval=0.2)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def send(self, msg) -> None:
        self.router.send_multipart([b"w0", m.encode(msg)])

    def recv(self, timeout: float = 60.0):
        assert self.router.poll(int(timeout * 1000)), "worker sent nothing"
        ident, frame = self.router.recv_multipart()
        assert ident == b"w0"
        return m.decode_worker_message(frame)

    def collect(self, until, timeout: float = 120.0) -> list:
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.recv(deadline - time.monotonic())
            got.append(msg)
            if until(msg, got):
                return got
        raise AssertionError("timed out")

    def close(self) -> None:
        self.send(m.Shutdown())
        self.collect(lambda msg, _: isinstance(msg, m.Goodbye))
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.router.close(0)
        self.dealer.close(0)
        self.ctx.term()


@pytest.fixture
def harness(engine, tmp_path):
    h = Harness(engine, f"ipc://{tmp_path}/ctl.sock")
    yield h
    h.close()
    engine.check_integrity()
    assert engine.stats().kv_cache_usage == 0.0


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_handshake_batched_outputs_and_heartbeats(harness, engine):
    hello = harness.recv()
    assert isinstance(hello, m.Hello) and hello.max_model_len == engine.max_model_len
    prompt = engine.tokenizer.encode("The capital of France is")
    for i in range(3):
        harness.send(m.AddRequest(request_id=f"r{i}", prompt_token_ids=prompt, params=greedy(4)))
    finished: set[str] = set()
    tokens: dict[str, list[int]] = {}
    frames = []

    def done(msg, _):
        if isinstance(msg, m.StepOutputs):
            frames.append(len(msg.outputs))
            for out in msg.outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    finished.add(out.request_id)
                    assert out.timings is not None and out.num_prompt_tokens == len(prompt)
        return finished == {"r0", "r1", "r2"}

    got = harness.collect(done)
    assert max(frames) > 1, "outputs of one step must travel as one frame"
    assert all(len(t) == 4 for t in tokens.values())
    assert tokens["r0"] == tokens["r1"] == tokens["r2"]  # greedy, same prompt
    # Falling idle sends stats at once; they show nothing running.
    beat = harness.collect(
        lambda msg, _: isinstance(msg, m.Heartbeat) and msg.stats.num_running == 0
    )[-1]
    assert beat.stats.kv_cache_usage == 0.0 and beat.stats.generation_tokens >= 12
    assert any(isinstance(x, m.StepOutputs) for x in got)


def test_abort_stops_output_and_frees_blocks(harness, engine):
    harness.recv()  # Hello
    prompt = engine.tokenizer.encode("Once upon a time")
    harness.send(m.AddRequest(request_id="long", prompt_token_ids=prompt, params=greedy(200)))
    harness.collect(lambda msg, _: isinstance(msg, m.StepOutputs))
    harness.send(m.AbortRequests(request_ids=["long", "unknown-id"]))
    beat = harness.collect(
        lambda msg, _: isinstance(msg, m.Heartbeat) and msg.stats.num_running == 0
    )[-1]
    assert beat.stats.kv_cache_usage == 0.0 and beat.stats.num_waiting == 0
    assert "long" not in harness.loop.live


def test_refused_request_gets_an_error_message(harness, engine):
    harness.recv()  # Hello
    too_long = [1] * (engine.max_model_len + 1)
    harness.send(m.AddRequest(request_id="big", prompt_token_ids=too_long, params=greedy(1)))
    err = harness.collect(lambda msg, _: isinstance(msg, m.RequestError))[-1]
    assert err.request_id == "big" and str(engine.max_model_len) in err.message
    harness.send(
        m.AddRequest(
            request_id="bad", prompt_token_ids=[1, 2], params=SamplingParams(temperature=-1.0)
        )
    )
    err = harness.collect(lambda msg, _: isinstance(msg, m.RequestError))[-1]
    assert err.request_id == "bad" and "temperature" in err.message
