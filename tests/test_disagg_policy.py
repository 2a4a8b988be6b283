"""The disaggregation decision, one factor at a time (pure function, deterministic)."""

from __future__ import annotations

import json
import random

import pytest

from router.disagg_policy import DisaggConfig, WorkerSnapshot, decide

BS = 16
CFG = DisaggConfig()


def W(wid, role="decode", running=0, waiting=0, kv=0.0, hit=0, max_seqs=64, backlog=0):  # noqa: N802
    return WorkerSnapshot(wid, role, running, waiting, kv, hit, max_seqs, backlog)


def run(prompt_tokens, decode, prefill, cfg=CFG, seed=0):
    return decide(prompt_tokens, BS, decode, prefill, cfg, random.Random(seed))


def test_a_both_workers_decodes_do_not_count_as_its_prefill_queue():
    # two `both` workers: d1 decodes 200 requests, d0 has 3000 prompt tokens to prefill; a
    # long prompt decoded on d0 is prefilled on d1 (its prefill queue is empty)
    ws = [W("d0", "both", backlog=3000), W("d1", "both", running=200)]
    d = run(4000, ws, ws)
    assert (d.decode_worker, d.prefill_worker, d.decision) == ("d0", "d1", "remote_long")
    busy = [W("d0", "both", backlog=3000),
            W("d1", "both", running=200, waiting=CFG.prefill_queue_saturation)]  # fmt: skip
    assert run(4000, busy, busy).decision == "local_saturated"


def test_a_both_worker_takes_a_prompt_only_when_it_starts_clearly_sooner_there():
    slack = CFG.remote_prefill_slack_tokens
    even = [W("d0", "both"), W("d1", "both")]
    assert run(4000, even, even).decision == "local_sooner"  # no ping-pong when balanced
    # d0 (fewer running) decodes; d1's backlog is exactly `slack` smaller: it prefills
    ws = [W("d0", "both", backlog=slack + 100), W("d1", "both", running=100, backlog=100)]
    assert run(4000, ws, ws)[1:3] == ("d1", "remote_long")
    ws = [W("d0", "both", backlog=slack + 99), W("d1", "both", running=100, backlog=100)]
    assert run(4000, ws, ws)[1:3] == (None, "local_sooner")


def test_decode_worker_prefers_prefix_hits():
    d = run(1600, [W("d0"), W("d1", hit=50)], [W("p0", "prefill")])
    assert d.decode_worker == "d1"


def test_decode_worker_prefers_fewer_running_and_waiting():
    assert run(32, [W("d0", running=10), W("d1", running=2)], []).decode_worker == "d1"
    assert run(32, [W("d0", waiting=3), W("d1", running=4)], []).decode_worker == "d1"


def test_decode_worker_avoids_full_kv_cache():
    assert run(32, [W("d0", kv=0.95), W("d1", kv=0.1)], []).decode_worker == "d1"


def test_hits_outweigh_load_only_up_to_their_value():
    # 100 blocks of hit beat 20 running requests, but not 200
    assert run(1600, [W("d0", running=20, hit=100), W("d1")], []).decode_worker == "d0"
    assert run(1600, [W("d0", running=200, hit=100), W("d1")], []).decode_worker == "d1"


def test_ties_break_by_injected_rng_reproducibly():
    ws = [W("d0"), W("d1"), W("d2")]
    picks = {run(32, ws, [], seed=s).decode_worker for s in range(20)}
    assert len(picks) > 1  # ties are spread...
    assert run(32, ws, [], seed=7) == run(32, ws, [], seed=7)  # ...deterministically


def test_short_prompt_prefills_locally():
    d = run(200, [W("d0")], [W("p0", "prefill")])
    assert (d.prefill_worker, d.decision) == (None, "local_short")


def test_long_prompt_prefills_remotely():
    d = run(4000, [W("d0")], [W("p0", "prefill")])
    assert (d.prefill_worker, d.decision) == ("p0", "remote_long")


def test_decode_worker_prefers_the_smaller_prefill_backlog():
    # 3200 queued tokens = 200 blocks of prefill ahead, outweighing 10 running requests
    d = run(32, [W("d0", backlog=3200), W("d1", running=10)], [])
    assert d.decode_worker == "d1"


def test_long_prompt_prefills_where_its_first_token_comes_sooner():
    slack = CFG.remote_prefill_slack_tokens
    # the prefill worker's backlog within the slack of the decode worker's: remote
    d = run(4000, [W("d0", backlog=1000)], [W("p0", "prefill", backlog=1000 + slack)])
    assert (d.prefill_worker, d.decision) == ("p0", "remote_long")
    # one token more: the decode worker would be done sooner itself
    d = run(4000, [W("d0", backlog=1000)], [W("p0", "prefill", backlog=1001 + slack)])
    assert (d.prefill_worker, d.decision) == (None, "local_sooner")
    assert d.inputs["prefill_backlog_tokens"] == 1001 + slack
    # a prefix hit on the prefill worker counts as work it need not do
    d = run(4000, [W("d0", backlog=1000)], [W("p0", "prefill", backlog=1001 + slack, hit=1)])
    assert d.decision == "remote_long"


def test_prefix_hit_on_decode_worker_makes_a_long_prompt_short():
    d = run(4000, [W("d0", hit=240)], [W("p0", "prefill")])  # 4000 - 3840 = 160 left
    assert d.decision == "local_short" and d.inputs["tokens_left"] == 160


def test_saturated_prefill_queue_keeps_prefill_local():
    d = run(4000, [W("d0")], [W("p0", "prefill", waiting=CFG.prefill_queue_saturation)])
    assert (d.prefill_worker, d.decision) == (None, "local_saturated")


def test_busy_decode_worker_sends_even_short_prompts_remote():
    d = run(200, [W("d0", running=60, max_seqs=64)], [W("p0", "prefill")])
    assert d.decision == "remote_decode_busy"
    d = run(200, [W("d0", waiting=1)], [W("p0", "prefill")])
    assert d.decision == "remote_decode_busy"


def test_no_prefill_worker_means_local():
    assert run(4000, [W("d0")], []).decision == "local_no_prefill"


def test_prefill_worker_by_hits_and_queue():
    d = run(4000, [W("d0")], [W("p0", "prefill", hit=10), W("p1", "prefill", hit=100)])
    assert d.prefill_worker == "p1"
    d = run(4000, [W("d0")], [W("p0", "prefill", waiting=2, hit=10), W("p1", "prefill")])
    assert d.prefill_worker == "p1"  # a queue of 2 costs more than 10 blocks of hit


def test_a_both_worker_never_prefills_for_itself_remotely():
    both = W("b0", "both")
    d = run(4000, [both], [both])
    assert d.decision == "local_no_prefill"


def test_modes_always_and_never():
    always = DisaggConfig(mode="always")
    assert run(20, [W("d0")], [W("p0", "prefill")], always).decision == "remote_mode"
    never = DisaggConfig(mode="never")
    assert run(8000, [W("d0")], [W("p0", "prefill")], never).decision == "local_mode"


def test_no_decode_worker_is_an_error():
    with pytest.raises(ValueError, match="no decode-capable worker"):
        run(10, [], [W("p0", "prefill")])


def test_config_file(tmp_path):
    path = tmp_path / "disagg.json"
    path.write_text(json.dumps({"local_prefill_max_tokens": 64, "mode": "conditional"}))
    cfg = DisaggConfig.from_file(path)
    assert run(200, [W("d0")], [W("p0", "prefill")], cfg).decision == "remote_long"
    path.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        DisaggConfig.from_file(path)
