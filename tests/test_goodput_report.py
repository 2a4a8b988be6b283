"""benchmarks/goodput_report.py: percentiles, goodput search, ratios, markdown, CLI (CPU, fast)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import goodput_report as gr

STRICT = {"name": "strict", "ttft_ms": 500, "tpot_ms": 30}
RELAXED = {"name": "relaxed", "ttft_ms": 2000, "tpot_ms": 100}
SLOS = [STRICT, RELAXED]


def point(config, workload, rate, ttft, tpot=10.0, n=10, fails=0, duration=10.0, server=None):
    """n requests with the same TTFT/TPOT (so every percentile equals them) plus ``fails`` failed."""
    reqs = [
        {"ok": True, "ttft_ms": ttft, "tpot_ms": tpot, "e2e_ms": ttft + 99 * tpot}
        | {"prompt_tokens": 3000, "output_tokens": 100, "cls": "long"}
        for _ in range(n)
    ]
    reqs += [{"ok": False, "ttft_ms": 0.0, "tpot_ms": 0.0, "output_tokens": 0}] * fails
    return {
        "config": config,
        "workload": workload,
        "rate": rate,
        "num_prompts": n + fails,
        "duration_s": duration,
        "completed": n,
        "failed": fails,
        "requests": reqs,
        "server": server or {"kv_bytes": 0, "transfers": 0, "transfer_seconds": 0.0},
    }


def make_raw(points):
    return {
        "benchmark": "goodput",
        "date": "2026-11-22T0412Z",
        "machine": "NVIDIA H200 x2, torch 2.11.0+cu130",
        "commit": "abc1234",
        "command": "python benchmarks/bench_goodput.py --rates 1,2,3",
        "model": "random:llama-3.1-8b",
        "gpus": 2,
        "slos": SLOS,
        "configs": [
            {"name": "colocated", "label": "2 x both", "flags": ["--num-workers", "2"]},
            {"name": "disagg", "label": "1P1D always", "flags": ["--disagg-mode", "always"]},
            {
                "name": "conditional",
                "label": "1P1D cond",
                "flags": ["--disagg-mode", "conditional"],
            },
        ],
        "workloads": [
            {"name": "long", "description": "prompt 2048-8192 tokens uniform, output 64-256"},
            {"name": "chat", "description": "ShareGPT-like lengths"},
            {"name": "mix", "description": "both"},
        ],
        "points": points,
    }


def sweep(config, workload, ttfts, tpots=None, **kw):
    tpots = tpots or [10.0] * len(ttfts)
    return [
        point(config, workload, float(i + 1), t, p, **kw)
        for i, (t, p) in enumerate(zip(ttfts, tpots, strict=True))
    ]


def gp(points, slo=STRICT):
    return gr.goodput([gr.point_stats(p, SLOS) for p in points], slo)


def test_percentile_matches_numpy_linear():
    assert gr.percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert gr.percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)  # pos 2.7
    assert gr.percentile([10, 20, 30], 25) == pytest.approx(15.0)
    assert gr.percentile([1, 2, 3, 4], 0) == 1 and gr.percentile([1, 2, 3, 4], 100) == 4
    assert gr.percentile([7.0], 99) == 7.0
    assert math.isnan(gr.percentile([], 50))
    values = [float(x * x % 17) for x in range(23)]
    np = pytest.importorskip("numpy")
    for q in (1, 37.5, 90, 99):
        assert gr.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_point_stats_attainment_and_transfer():
    p = point("disagg", "long", 2.0, 100.0, n=4, fails=1, duration=5.0)
    p["requests"][0]["ttft_ms"] = 600.0  # misses strict, meets relaxed
    p["requests"][1]["tpot_ms"] = 50.0  # misses strict, meets relaxed
    p["server"] = {
        "kv_bytes": 2e9,
        "transfers": 4,
        "transfer_seconds": 0.5,
        "decisions": {"remote_long": 4},
    }
    s = gr.point_stats(p, SLOS)
    assert (s.completed, s.failed) == (4, 1)
    assert s.attained == {"strict": pytest.approx(2 / 5), "relaxed": pytest.approx(4 / 5)}
    assert s.good_rps == {
        "strict": pytest.approx(2.0 * 2 / 5),
        "relaxed": pytest.approx(2.0 * 4 / 5),
    }
    assert s.meets_p90 == {"strict": False, "relaxed": False}  # a failed request
    assert s.ttft_p50 == pytest.approx(100.0) and s.ttft_p90 == pytest.approx(450.0)
    assert s.transfer_ms == pytest.approx(125.0)
    assert s.transfer_gbps == pytest.approx(4.0)
    assert s.transfer_share == pytest.approx(0.5 / 0.9)  # TTFTs sum to 900 ms
    assert s.kv_gb == pytest.approx(2.0) and s.decisions == {"remote_long": 4}


def test_single_token_requests_have_no_tpot():
    p = point("colocated", "chat", 1.0, 100.0, tpot=20.0, n=2)
    p["requests"].append({"ok": True, "ttft_ms": 100.0, "tpot_ms": 0.0, "output_tokens": 1})
    s = gr.point_stats(p, SLOS)
    assert s.tpot_p50 == pytest.approx(20.0)
    assert s.attained["strict"] == pytest.approx(1.0)


def test_goodput_all_pass_is_censored():
    g = gp(sweep("colocated", "long", [100, 200, 300]))
    assert (g.max_rate, g.interpolated, g.censored, g.points) == (3.0, 3.0, True, 3)


def test_goodput_pass_pass_fail_interpolates():
    # r = 0.4, 0.8, 1.8 -> crossing at 2 + (1 - 0.8) / (1.8 - 0.8) = 2.2
    g = gp(sweep("colocated", "long", [200, 400, 900]))
    assert (g.max_rate, g.censored) == (2.0, False)
    assert g.interpolated == pytest.approx(2.2)
    # TPOT-limited: r = max(400/500, 60/30) = 2.0 -> 2 + 0.2 / 1.2
    g = gp(sweep("colocated", "long", [200, 400, 400], [10, 10, 60]))
    assert g.interpolated == pytest.approx(2 + 0.2 / 1.2)
    # the same sweep under the relaxed SLO never fails
    g = gp(sweep("colocated", "long", [200, 400, 900]), RELAXED)
    assert (g.max_rate, g.interpolated, g.censored) == (3.0, 3.0, True)


def test_goodput_first_point_fails():
    g = gp(sweep("colocated", "long", [600, 700]))
    assert (g.max_rate, g.interpolated, g.censored) == (0.0, 0.0, False)


def test_goodput_failed_request_fails_point():
    pts = sweep("colocated", "long", [100, 100])
    pts[1] = point("colocated", "long", 2.0, 100.0, fails=1)
    g = gp(pts)
    # latencies stay in SLO: no crossing, so no credit beyond the last passing rate
    assert (g.max_rate, g.interpolated, g.censored) == (1.0, 1.0, False)


def test_goodput_ignores_pass_after_fail_and_sorts():
    pts = sweep("colocated", "long", [100, 1000, 100])  # r = 1/3 (TPOT 10/30), 2.0, 1/3
    g = gp(list(reversed(pts)))
    assert (g.max_rate, g.censored) == (1.0, False)
    assert g.interpolated == pytest.approx(1 + (2 / 3) / (5 / 3))  # = 1.4


def test_goodput_empty_sweep():
    g = gr.goodput([], STRICT)
    assert (g.max_rate, g.interpolated, g.censored, g.points) == (0.0, 0.0, False, 0)


def study_raw():
    kv = {
        "kv_bytes": 3e9,
        "transfers": 10,
        "transfer_seconds": 0.2,
        "decisions": {"remote_mode": 10},
    }
    return make_raw(
        sweep("colocated", "long", [200, 400, 900])  # strict 2.2, relaxed >= 3
        + sweep("disagg", "long", [100, 200, 300], server=kv)  # >= 3
        + sweep("conditional", "long", [100, 250])  # >= 2
        + sweep("colocated", "chat", [600])  # strict 0, relaxed >= 1
        + sweep("disagg", "chat", [100, 200])  # >= 2
        + sweep("conditional", "chat", [100, 200])  # >= 2
        + sweep("colocated", "mix", [100])  # disagg and conditional not run
    )


def test_summarize_goodput_and_ratios():
    summary = gr.summarize(study_raw())
    assert summary.workloads == ["long", "chat", "mix"]
    assert summary.goodput[("long", "colocated", "strict")].interpolated == pytest.approx(2.2)
    assert summary.per_gpu[("long", "colocated", "strict")] == pytest.approx(1.1)
    assert summary.per_gpu[("long", "disagg", "relaxed")] == pytest.approx(1.5)
    assert summary.conditionals == ["conditional"]
    long_strict = summary.ratios[("long", "strict")]
    assert long_strict.disagg_vs_colocated.value == pytest.approx(3 / 2.2)
    assert long_strict.vs_best_fixed["conditional"].value == pytest.approx(2 / 3)
    assert long_strict.disagg_vs_colocated.bound == "lower bound"  # disagg censored, colocated not
    assert long_strict.vs_best_fixed["conditional"].bound == "both censored: undetermined"
    chat_relaxed, long_relaxed = (
        summary.ratios[("chat", "relaxed")],
        summary.ratios[("long", "relaxed")],
    )
    assert chat_relaxed.disagg_vs_colocated.bound == "both censored: undetermined"
    assert long_relaxed.disagg_vs_colocated.bound == "both censored: undetermined"
    assert long_relaxed.disagg_vs_colocated.value == pytest.approx(1.0)
    chat = summary.ratios[("chat", "strict")]
    assert chat.disagg_vs_colocated.value is None  # colocated goodput is 0
    assert chat.vs_best_fixed["conditional"].value == pytest.approx(1.0)
    assert chat_relaxed.disagg_vs_colocated.value == pytest.approx(2.0)
    mix = summary.ratios[("mix", "strict")]
    assert (mix.disagg_vs_colocated.value, mix.vs_best_fixed["conditional"].value) == (None, None)
    assert ("mix", "disagg", "strict") not in summary.goodput


def _line(md, prefix):
    hits = [ln for ln in md.splitlines() if ln.startswith(prefix)]
    assert len(hits) == 1, (prefix, hits)
    return hits[0]


def test_markdown_tables_and_verdicts():
    raw = study_raw()
    md = gr.markdown(raw, gr.summarize(raw), ["x-goodput.png", "x-cdf.png"], raw_names=["x.json"])
    for text in (
        "Machine: NVIDIA H200 x2",
        "Commit: abc1234",
        "Command: `python benchmarks/bench_goodput.py --rates 1,2,3`",
        "`--disagg-mode always`",
        "ShareGPT-like lengths",
        "TTFT p90 <= 500 ms and TPOT p90 <= 30 ms",
        "![x-goodput](x-goodput.png)",
        "![x-cdf](x-cdf.png)",
        "Raw data: `x.json`",
    ):
        assert text in md
    row = _line(md, "| long     | colocated")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["long", "colocated", "2.20", "1.10", "2", ">=3.00", ">=1.50", "3"]
    assert _line(md, "| chat     | colocated").split("|")[5].strip() == "none"
    assert "not run" in _line(md, "| mix      | disagg")
    header = [c.strip() for c in _line(md, "| workload | SLO").strip("|").split("|")]
    assert header == ["workload", "SLO", "disagg / colocated", "conditional / best fixed"]
    ratio = [c.strip() for c in _line(md, "| long     | strict").strip("|").split("|")]
    assert ratio == ["long", "strict", "1.36x", "0.67x"]
    hit = _line(md, "- disagg per GPU >= 1.3x colocated on long (strict)")
    assert "1.36x" in hit and "**met**" in hit and "(lower bound:" in hit
    assert "**MISSED**" in _line(md, "- disagg per GPU >= 1.3x colocated on long (relaxed)")
    assert "**MISSED**" in _line(
        md, "- conditional >= the better fixed mode (within 10%) on long (strict)"
    )
    assert "**met**" in _line(
        md, "- conditional >= the better fixed mode (within 10%) on chat (strict)"
    )
    assert "n/a" in _line(md, "- conditional >= the better fixed mode (within 10%) on mix (strict)")
    per_point = _line(md, "| disagg      | long     | 1 ")
    assert "10/0" in per_point and "100 / 100 / 100" in per_point and "remote_mode 10" in per_point
    assert "3.00" in per_point and "15.0" in per_point  # 3 GB moved, 15 GB/s
    assert md.count("(written after the run)") == 1 and "## Analysis" in md
    assert "TODO" not in md and "TBD" not in md


def test_common_rate():
    raw = study_raw()
    assert gr.common_rate(raw, "long") == 2.0
    assert gr.common_rate(raw, "chat") == 1.0
    assert gr.common_rate(raw, "nope") is None


def test_cli_writes_report_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    raw_path = tmp_path / "2026-11-22-goodput.json"
    raw_path.write_text(json.dumps(study_raw()))
    out = tmp_path / "out"
    assert gr.main([str(raw_path), "--out-dir", str(out)]) == 0
    md = (out / "2026-11-22-goodput.md").read_text()
    for name in ("2026-11-22-goodput-goodput.png", "2026-11-22-goodput-cdf.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    printed = capsys.readouterr().out
    assert "| long     | colocated   | 2.20" in printed and "disagg / colocated" in printed


BOTH = {"name": "conditional-both", "label": "2 x both cond", "flags": ["--num-workers", "2"]}
SINGLE = {"name": "single", "label": "1 x both", "flags": ["--num-workers", "1"], "gpus": 1}


def variants_raw():
    raw = make_raw(
        sweep("colocated", "long", [200, 400, 900])  # strict 2.2, relaxed >= 3
        + sweep("disagg", "long", [100, 200, 300])  # >= 3: the best fixed mode
        + sweep("conditional", "long", [100, 250])  # >= 2
        + sweep("conditional-both", "long", [100, 200, 300, 1000])  # strict 3 + 0.4 / 1.4
        + sweep("single", "long", [100] * 5)  # >= 5, more than any fixed mode, but not one
        + sweep("colocated", "chat", [100])
        + sweep("disagg", "chat", [100])
        + sweep("conditional-both", "chat", [600])  # strict 0, relaxed >= 1
    )
    raw["configs"] += [BOTH, SINGLE]
    return raw


def test_conditional_variants_against_best_fixed_mode():
    summary = gr.summarize(variants_raw())
    assert summary.configs == ["colocated", "disagg", "conditional", "conditional-both", "single"]
    assert summary.conditionals == ["conditional", "conditional-both"]
    strict = summary.ratios[("long", "strict")].vs_best_fixed
    both_strict = 3 + 0.4 / 1.4
    assert strict["conditional-both"].value == pytest.approx(both_strict / 3)  # not / 5 (single)
    assert strict["conditional-both"].bound == "upper bound"  # disagg censored at 3
    assert strict["conditional"].value == pytest.approx(2 / 3)
    relaxed = summary.ratios[("long", "relaxed")].vs_best_fixed
    assert relaxed["conditional-both"].value == pytest.approx(4 / 3)
    chat = summary.ratios[("chat", "strict")].vs_best_fixed
    assert chat["conditional-both"].value == 0.0 and chat["conditional"].value is None
    assert summary.ratios[("chat", "relaxed")].vs_best_fixed["conditional-both"].value == 1.0
    assert summary.per_gpu[("long", "single", "strict")] == pytest.approx(5.0)  # its own one GPU


def test_markdown_has_a_column_and_verdicts_per_conditional_variant():
    raw = variants_raw()
    md = gr.markdown(raw, gr.summarize(raw), [])
    header = [c.strip() for c in _line(md, "| workload | SLO").strip("|").split("|")]
    assert header[2:] == [
        "disagg / colocated",
        "conditional / best fixed",
        "conditional-both / best fixed",
    ]
    ratio = [c.strip() for c in _line(md, "| long     | strict").strip("|").split("|")]
    assert ratio == ["long", "strict", "1.36x", "0.67x", "1.10x"]
    ratio = [c.strip() for c in _line(md, "| chat     | strict").strip("|").split("|")]
    assert ratio == ["chat", "strict", "1.00x", "n/a", "0.00x"]
    both = _line(md, "- conditional-both >= the better fixed mode (within 10%) on long (strict)")
    assert "1.10x -- **met**" in both and "(upper bound:" in both
    cond = _line(md, "- conditional >= the better fixed mode (within 10%) on long (strict)")
    assert "0.67x -- **MISSED**" in cond
    both = _line(md, "- conditional-both >= the better fixed mode (within 10%) on chat (strict)")
    assert "0.00x -- **MISSED**" in both
    verdicts = [ln for ln in md.splitlines() if " >= the better fixed mode " in ln]
    assert len(verdicts) == 2 * 3 * 2  # variants x workloads x SLOs
    single = [c.strip() for c in _line(md, "| long     | single").strip("|").split("|")]
    assert single[2:5] == [">=5.00", ">=5.00", "5"]
    assert "- single (1 x both): `--num-workers 1`" in md


def split_study():
    """Two runs of one study: colocated + disagg, then the conditional variants and disagg @ 3."""
    a = make_raw(
        sweep("colocated", "long", [200, 400, 900]) + sweep("disagg", "long", [100, 200, 300])
    )
    a["configs"] = a["configs"][:2]
    a["workloads"] = [{"name": "long", "description": "long prompts", "rates": [1.0, 2.0, 3.0]}]
    a["command"] = "python benchmarks/bench_goodput.py --configs colocated,disagg"
    b = make_raw(
        sweep("conditional", "long", [100, 250])
        + sweep("conditional-both", "long", [100, 200, 300, 1000])
        + sweep("single", "chat", [100])
        + [point("disagg", "long", 3.0, 900.0)]  # re-measured: r = 1.8 now
    )
    b["configs"] = [*b["configs"][1:], BOTH, SINGLE]
    b["workloads"] = [
        {"name": "long", "description": "long prompts", "rates": [2.0, 3.0, 4.0]},
        {"name": "chat", "description": "chat", "rates": [1.0]},
    ]
    b |= {"date": "2026-11-22T0600Z", "commit": "def5678"}
    b["command"] = "python benchmarks/bench_goodput.py --configs conditional,conditional-both"
    return a, b


def test_merge_unites_configs_workloads_and_points(capsys):
    a, b = split_study()
    merged = gr.merge_raws([a, b], ["a.json", "b.json"])
    names = [c["name"] for c in merged["configs"]]
    assert names == ["colocated", "disagg", "conditional", "conditional-both", "single"]
    assert [(w["name"], w["rates"]) for w in merged["workloads"]] == [
        ("long", [1.0, 2.0, 3.0, 4.0]),
        ("chat", [1.0]),
    ]
    assert (merged["date"], merged["commit"]) == ("2026-11-22T0412Z", "abc1234, def5678")
    assert merged["commands"] == [a["command"], b["command"]]
    assert len(merged["points"]) == 3 + 3 + 2 + 4 + 1  # the disagg point @ 3 once
    err = capsys.readouterr().err
    assert "warning: b.json: disagg long at 3 req/s measured again" in err
    assert err.count("warning") == 1
    summary = gr.summarize(merged)
    disagg = summary.goodput[("long", "disagg", "strict")]  # >= 3 with a.json's point
    assert disagg.interpolated == pytest.approx(2 + 0.6 / 1.4) and not disagg.censored
    # disagg 2.43 beats colocated 2.2: the best fixed mode, no longer censored
    both = summary.ratios[("long", "strict")].vs_best_fixed["conditional-both"]
    assert both.value == pytest.approx((3 + 0.4 / 1.4) / (2 + 0.6 / 1.4)) and both.bound == ""
    assert len(a["configs"]) == 2 and a["workloads"][0]["rates"] == [1.0, 2.0, 3.0]  # unchanged


def test_merge_of_one_file_keeps_it():
    raw = study_raw()
    merged = gr.merge_raws([raw], ["x.json"])
    assert merged["commands"] == [raw["command"]] and merged["commit"] == "abc1234"
    assert merged["configs"] == raw["configs"] and merged["workloads"] == raw["workloads"]
    assert merged["points"] == raw["points"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model", "random:smollm2-135m"),
        ("machine", "NVIDIA H200 x1, torch 2.11.0+cu130"),
        ("gpus", 1),
        ("slos", [STRICT]),
    ],
)
def test_merge_refuses_another_study(key, value):
    a, b = split_study()
    b[key] = value
    with pytest.raises(ValueError, match=f"b.json and a.json are not one study: {key} "):
        gr.merge_raws([a, b], ["a.json", "b.json"])


def test_merge_refuses_changed_config_or_workload():
    a, b = split_study()
    b["configs"][0] = b["configs"][0] | {"flags": ["--disagg-mode", "conditional"]}  # disagg
    with pytest.raises(ValueError, match="b.json: disagg has flags"):
        gr.merge_raws([a, b], ["a.json", "b.json"])
    a, b = split_study()
    b["workloads"][0]["length_scale"] = 0.5
    with pytest.raises(ValueError, match="b.json: long has length_scale 0.5"):
        gr.merge_raws([a, b], ["a.json", "b.json"])


def test_cli_merges_files_into_prefix(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = split_study()
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    prefix = tmp_path / "out" / "goodput-all"
    assert gr.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(prefix)]) == 0
    md = (tmp_path / "out" / "goodput-all.md").read_text()
    for name in ("goodput-all-goodput.png", "goodput-all-cdf.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    lines = md.splitlines()
    i = lines.index("Commands (one run per raw file, in order):")
    assert lines[i + 1 : i + 5] == ["", f"- `{a['command']}`", f"- `{b['command']}`", ""]
    assert not any(ln.startswith("Command: ") for ln in lines)
    assert "Raw data: `a.json`, `b.json`" in md and "Commit: abc1234, def5678" in md
    assert "conditional-both / best fixed" in md
    assert "measured again" in capsys.readouterr().err


def test_cli_merge_errors(tmp_path, capsys):
    a, b = split_study()
    b["model"] = "random:smollm2-135m"
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, raw in zip(paths, (a, b), strict=True):
        path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as e:
        gr.main([*map(str, paths), "--out", str(tmp_path / "m")])
    assert "cannot merge" in str(e.value.code) and "not one study: model" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        gr.main(list(map(str, paths)))  # no --out
    assert e.value.code == 2 and "several raw files need --out PREFIX" in capsys.readouterr().err
    assert not list(tmp_path.glob("m*"))


def test_cli_one_file_with_out_prefix(tmp_path):
    pytest.importorskip("matplotlib")
    raw_path = tmp_path / "raw.json"
    raw_path.write_text(json.dumps(variants_raw()))
    assert gr.main([str(raw_path), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "Raw data: `raw.json`" in md and "](report-goodput.png)" in md
    assert (tmp_path / "report-cdf.png").exists()


def test_slo_sweep_shows_where_a_tight_tpot_slo_favours_disaggregation():
    # colocated: fast first tokens, decode slowed by prefills (TPOT 14 ms); disagg: slower
    # first tokens (TTFT 800 ms), decode steady at 7 ms
    raw = make_raw(
        sweep("colocated", "long", [300, 300, 300], [14, 14, 14])
        + sweep("disagg", "long", [800, 800, 800], [7, 7, 7])
    )
    raw["workloads"] = raw["workloads"][:1]
    raw["configs"] = raw["configs"][:2]
    lines = gr.slo_sweep_table(raw, gr.summarize(raw))
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
        "workload", "TTFT / TPOT SLO (p90 ms)", "colocated", "disagg", "disagg / colocated"
    ]  # fmt: skip
    rows = {r[1]: r[2:] for r in ([c.strip() for c in ln.split("|")[1:-1]] for ln in lines[2:])}
    assert len(rows) == len(gr.SWEEP_TTFT_MS) * len(gr.SWEEP_TPOT_MS)
    # TTFT 500 ms: disagg never meets it; TPOT 12 ms: colocated never does
    assert rows["500 / 30"] == [">=3.0", "0.0", "0.00x (upper bound)"]
    assert rows["2000 / 12"] == ["0.0", ">=3.0", "n/a"]
    assert rows["2000 / 15"] == [">=3.0", ">=3.0", "1.00x (both censored: undetermined)"]
