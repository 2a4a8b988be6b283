"""Disaggregated serving end to end, with real processes on the embedded model (float32): the
router, prefill workers and decode workers of `pdserve serve --prefill-workers N
--decode-workers M`, KV moved by NIXL and by the ZMQ fallback. 1P1D and 2P2D produce greedy
output token-identical to the colocated server for a mix of short, long and shared-prefix
prompts; the transfer metrics show the bytes moved, and a decode worker's prefix hit shrinks
them to exactly the blocks it lacks."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.server_process import ServerProcess

TRANSPORTS = ["zmq"]
try:
    import nixl  # noqa: F401

    TRANSPORTS.insert(0, "nixl")
except ImportError:  # the fallback is tested either way; NIXL is in the test extra
    pass

COMMON = [
    "--dtype", "float32", "--kv-cache-memory", "96MiB", "--max-num-seqs", "8",
    "--max-model-len", "1024", "--worker-threads", "1", "--enable-debug-endpoints",
]  # fmt: skip
BLOCK = 16
MAX_TOKENS = 12

STORY = (
    "The lighthouse keeper wrote in his log every night. He noted the wind, the height of the "
    "waves, the ships that passed and the birds that rested on the gallery rail. In winter the "
    "storms came from the north and the glass of the lamp room rattled in its frame; in summer "
    "the fog rolled in from the sea and the horn sounded every thirty seconds until dawn. "
)
REPORT = (
    "Quarterly report. Revenue grew in every region except the north, where two stores closed "
    "for renovation. Costs were flat. The board approved a new warehouse near the harbour and "
    "asked for a plan to hire forty people before the end of the year. "
)
PROMPTS = [
    "Hello, my name is",  # short
    "The capital of France is",  # short
    STORY * 3,  # long
    REPORT * 4,  # long
    STORY * 3 + "Question: what did the keeper write about?",  # shares the long prefix
    STORY * 3 + "Question: when did the fog come?",  # shares it too
]


def complete(base_url: str, prompts: list[str]) -> list[dict]:
    """Send every prompt at once (they batch together) and return the responses' choices."""

    def one(prompt: str) -> dict:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "logprobs": 0}  # fmt: skip
        r = httpx.post(base_url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        data = r.json()
        return {"tokens": data["choices"][0]["logprobs"]["tokens"], "usage": data["usage"]}

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def metric(base_url: str, name: str, **labels) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def assert_clean(base_url: str) -> None:
    workers = httpx.get(base_url + "/debug/integrity", timeout=60).json()["workers"]
    for wid, r in workers.items():
        assert r["ok"], (wid, r["error"])
        assert r["num_requests"] == 0 and r["num_free_blocks"] == r["num_blocks"], (wid, r)


@pytest.fixture(scope="module")
def colocated(colocated_outputs):
    """The reference: one worker doing everything (`complete` on a `--num-workers 1` server
    with COMMON's settings, in tests/conftest.py: test_multihost_netns compares with it too)."""
    return colocated_outputs


TOPOLOGIES = {"1P1D": ("1", "1"), "2P2D": ("2", "2")}


@pytest.fixture(
    scope="module", params=[(t, x) for t in TRANSPORTS for x in TOPOLOGIES], ids="-".join
)
def disagg(request):
    transport, topology = request.param
    p, d = TOPOLOGIES[topology]
    args = [*COMMON, "--prefill-workers", p, "--decode-workers", d, "--kv-transport", transport,
            "--disagg-mode", "always"]  # fmt: skip
    with ServerProcess(args) as proc:
        yield proc


def test_greedy_output_matches_the_colocated_server(colocated, disagg):
    got = complete(disagg.base_url, PROMPTS)
    for prompt, ref, out in zip(PROMPTS, colocated, got, strict=True):
        assert out["tokens"] == ref["tokens"], prompt[:40]
        assert out["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    url = disagg.base_url
    assert metric(url, "pdserve:disagg_decision_total", decision="remote_mode") >= len(PROMPTS)
    assert metric(url, "pdserve:kv_transfer_bytes_total") > 0
    assert metric(url, "pdserve:kv_transfer_seconds_count") >= 1
    assert metric(url, "pdserve:kv_transfer_failures_total") == 0
    assert_clean(url)


def test_a_decode_side_prefix_hit_moves_only_the_missing_blocks(disagg):
    url = disagg.base_url
    prompt = "Minutes. " + REPORT * 2 + "Summary for the board:"  # new to every worker
    before = metric(url, "pdserve:kv_transfer_bytes_total")
    cached_before = metric(url, "pdserve:remote_prefill_cached_tokens_total")
    (first,) = complete(url, [prompt])
    moved = metric(url, "pdserve:kv_transfer_bytes_total") - before
    n = first["usage"]["prompt_tokens"]
    blocks = math.ceil(n / BLOCK)
    assert moved > 0 and moved % blocks == 0  # every block of the prompt, the same size each
    bytes_per_block = moved / blocks

    (again,) = complete(url, [prompt])  # both sides now hold the prefix
    assert again["tokens"] == first["tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // BLOCK * BLOCK
    moved_again = metric(url, "pdserve:kv_transfer_bytes_total") - before - moved
    assert moved_again == (blocks - (n - 1) // BLOCK) * bytes_per_block < moved
    # The prefill worker reused its own prefix cache too (it computes less; what it sends is
    # what the decode worker lacks, so its hit cannot shrink the bytes further).
    cached = metric(url, "pdserve:remote_prefill_cached_tokens_total") - cached_before
    assert cached >= (n - 1) // BLOCK * BLOCK
    assert_clean(url)


def test_prompt_logprobs_are_computed_on_the_decode_worker(disagg):
    """A request for prompt logprobs (echo + logprobs) is prefilled where it decodes, even in
    --disagg-mode always: its prompt's logits exist only where the prompt is computed. The
    scores equal the offline engine's and do not change when the prompt is cached there."""
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    url = disagg.base_url
    prompt = "Scores. " + STORY
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
    before = metric(url, "pdserve:disagg_decision_total", decision="local_prompt_logprobs")
    moved = metric(url, "pdserve:kv_transfer_bytes_total")
    got = []
    for _ in range(2):
        r = httpx.post(url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        got.append(r.json()["choices"][0]["logprobs"]["token_logprobs"])
    assert got[0] == got[1]
    assert metric(url, "pdserve:disagg_decision_total", decision="local_prompt_logprobs") == before + 2
    assert metric(url, "pdserve:kv_transfer_bytes_total") == moved
    offline = LLM(dtype="float32", kv_cache_memory="96MiB", max_num_seqs=8, num_threads=1, progress=False)
    ref = offline.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))[0]
    assert got[0][0] is None and len(got[0]) == len(ref.prompt_logprobs) + 1
    for a, b in zip(got[0][1:-1], ref.prompt_logprobs[1:], strict=True):
        assert abs(a - b.logprob) < 1e-4
    assert_clean(url)
