"""Goodput report: analysis of the raw JSON that ``bench_goodput.py`` writes.

Definitions (latencies in ms, rates in requests/s):

- TTFT: time to first token. TPOT: per request, (e2e - TTFT) / (output_tokens - 1). Requests with
  output_tokens <= 1 have no TPOT: they are left out of the TPOT percentiles and meet any TPOT SLO.
- Percentiles are over the ok requests of a point, interpolated linearly (numpy's default).
- A request is *good* under an SLO when it succeeded with TTFT <= slo.ttft_ms and TPOT <= slo.tpot_ms.
  ``attained`` = good / all requests of the point (failed ones included); ``good_rps`` = the
  offered rate x attained (not good / the run's wall time: a short point's drain would dominate).
- A point *meets* an SLO when its p90 TTFT and p90 TPOT are within it and no request failed.
- Goodput (the DistServe sense): ``max_rate`` is the highest measured rate that meets the SLO with
  every lower measured rate meeting it too (the first failure ends the search; 0 when the lowest
  rate fails). ``interpolated`` refines it where the limiting ratio
  r = max(p90 TTFT / slo TTFT, p90 TPOT / slo TPOT) crosses 1, linearly between the last passing and
  the first failing point. ``censored``: every measured rate passed, so the goodput is at least the
  highest rate measured (the sweep did not find the limit).
- Per GPU = goodput / the config's "gpus" (raw["gpus"] where a config does not say).
- Ratios: disagg / colocated, and for each conditional variant (a config named conditional*, e.g.
  conditional and conditional-both) variant / the best fixed mode, max(colocated, disagg): other
  configs (single) are shown but are no fixed mode.
- Several raw files of one study (configs run in separate calls, say) merge into one report: see
  ``merge_raws``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DISAGG_TARGET = 1.3  # disagg per GPU >= 1.3x colocated ...
DISAGG_TARGET_WORKLOAD = "long"  # ... on the long-prompt workload
CONDITIONAL_TOLERANCE = 0.9  # conditional >= the better fixed mode, within 10%
CONDITIONAL_PREFIX = "conditional"  # configs named so are conditional variants
FIXED_MODES = ("colocated", "disagg")  # the best fixed mode is the better of these
STUDY_KEYS = ("benchmark", "model", "machine", "gpus", "engine_flags", "slos")  # equal to merge
SLO_STYLES = ("-", "--", "-.")  # strict solid, relaxed dashed; dotted is the y = x guide
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per config, with its colour

Raw = Mapping[str, Any]
Slo = Mapping[str, Any]


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation as numpy's default; nan when empty."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _has_tpot(req: Mapping[str, Any]) -> bool:
    return int(req.get("output_tokens", 2)) > 1


def _ok_values(point: Mapping[str, Any], key: str) -> list[float]:
    """``key`` (ttft_ms or tpot_ms) of the point's ok requests; TPOT only where it is defined."""
    reqs = [r for r in point.get("requests", []) if r.get("ok")]
    return [float(r[key]) for r in reqs if key != "tpot_ms" or _has_tpot(r)]


@dataclass
class PointStats:
    config: str
    workload: str
    rate: float
    completed: int
    failed: int
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_p50: float
    tpot_p90: float
    tpot_p99: float
    attained: dict[str, float]  # per SLO name: good / all requests
    meets_p90: dict[str, bool]  # per SLO name
    good_rps: dict[str, float]  # per SLO name: offered rate x attained
    kv_gb: float
    transfer_ms: float  # mean per transfer
    transfer_gbps: float
    transfer_share: float  # transfer seconds / sum of TTFT seconds
    decisions: dict[str, int]

    def limit_ratio(self, slo: Slo) -> float:
        """max(p90 TTFT / SLO, p90 TPOT / SLO); inf with no ok request, TPOT term 0 if undefined."""
        ttft = math.inf if math.isnan(self.ttft_p90) else self.ttft_p90 / slo["ttft_ms"]
        tpot = 0.0 if math.isnan(self.tpot_p90) else self.tpot_p90 / slo["tpot_ms"]
        return max(ttft, tpot)


def point_stats(point: Mapping[str, Any], slos: Sequence[Slo]) -> PointStats:
    """Latency percentiles, SLO attainment and KV transfer figures of one (config, workload, rate)."""
    reqs = point.get("requests", [])
    ok = [r for r in reqs if r.get("ok")]
    failed = max(int(point.get("failed", 0)), len(reqs) - len(ok))
    completed = int(point.get("completed", len(ok)))
    total = max(len(reqs), completed + failed)
    ttft, tpot = _ok_values(point, "ttft_ms"), _ok_values(point, "tpot_ms")
    server = point.get("server") or {}
    transfers = int(server.get("transfers", 0))
    t_sec = float(server.get("transfer_seconds", 0.0))
    kv_bytes = float(server.get("kv_bytes", 0.0))
    ttft_sec = sum(ttft) / 1000.0
    stats = PointStats(
        config=point["config"],
        workload=point["workload"],
        rate=float(point["rate"]),
        completed=completed,
        failed=failed,
        **{f"ttft_p{q}": percentile(ttft, q) for q in (50, 90, 99)},
        **{f"tpot_p{q}": percentile(tpot, q) for q in (50, 90, 99)},
        attained={},
        meets_p90={},
        good_rps={},
        kv_gb=kv_bytes / 1e9,
        transfer_ms=t_sec / transfers * 1000.0 if transfers else 0.0,
        transfer_gbps=kv_bytes / t_sec / 1e9 if t_sec > 0 else 0.0,
        transfer_share=t_sec / ttft_sec if transfers and ttft_sec > 0 else 0.0,
        decisions={str(k): int(v) for k, v in (server.get("decisions") or {}).items()},
    )
    for slo in slos:
        name = slo["name"]
        good = sum(
            1 for r in ok if r["ttft_ms"] <= slo["ttft_ms"] and r["tpot_ms"] <= slo["tpot_ms"]
        )
        stats.attained[name] = good / total if total else 0.0
        stats.good_rps[name] = stats.rate * stats.attained[name]
        stats.meets_p90[name] = total > 0 and failed == 0 and stats.limit_ratio(slo) <= 1.0
    return stats


@dataclass
class Goodput:
    slo: str
    max_rate: float
    interpolated: float
    censored: bool
    points: int  # measured rates


def goodput(stats_list: Sequence[PointStats], slo: Slo) -> Goodput:
    """The SLO-sustaining rate of one sweep (see the module docstring)."""
    pts = sorted(stats_list, key=lambda s: s.rate)
    name = slo["name"]
    first_fail = next((i for i, s in enumerate(pts) if not s.meets_p90[name]), None)
    if first_fail is None:
        top = pts[-1].rate if pts else 0.0
        return Goodput(name, top, top, bool(pts), len(pts))
    if first_fail == 0:
        return Goodput(name, 0.0, 0.0, False, len(pts))
    last, fail = pts[first_fail - 1], pts[first_fail]
    r0, r1 = last.limit_ratio(slo), fail.limit_ratio(slo)
    interp = last.rate  # failed requests with latencies in SLO: no crossing to interpolate
    if r1 > 1.0:
        interp += (1.0 - r0) / (r1 - r0) * (fail.rate - last.rate)
    return Goodput(name, last.rate, interp, False, len(pts))


@dataclass
class Ratio:
    value: float | None  # None when either goodput is missing or the denominator is 0
    bound: str  # "" or, with censored goodput behind it, "lower bound" / "upper bound" / ...


@dataclass
class Ratios:
    disagg_vs_colocated: Ratio
    vs_best_fixed: dict[str, Ratio]  # per conditional variant: it / max(colocated, disagg)


def _bound(num: Goodput | None, den: Goodput | None) -> str:
    """What a ratio of two goodputs is when either is censored (only a lower bound itself)."""
    key = (num is not None and num.censored, den is not None and den.censored)
    names = {(True, False): "lower bound", (False, True): "upper bound"}
    return names.get(key, "both censored: undetermined" if all(key) else "")


@dataclass
class Summary:
    gpus: int
    workloads: list[str]
    configs: list[str]
    stats: dict[tuple[str, str], list[PointStats]]  # (workload, config)
    goodput: dict[tuple[str, str, str], Goodput]  # (workload, config, slo)
    per_gpu: dict[tuple[str, str, str], float]  # interpolated goodput / gpus
    conditionals: list[str]  # the conditional variants among configs
    ratios: dict[tuple[str, str], Ratios]  # (workload, slo)


def _names(raw: Raw, key: str, point_key: str) -> list[str]:
    names = [str(x["name"]) for x in raw.get(key, [])]
    for p in raw.get("points", []):
        if p[point_key] not in names:
            names.append(p[point_key])
    return names


def _div(num: Goodput | None, den: Goodput | None) -> float | None:
    """num / den of interpolated goodputs; None when either is missing or den is 0."""
    if num is None or den is None or den.interpolated <= 0:
        return None
    return num.interpolated / den.interpolated


def _ratio(num: Goodput | None, den: Goodput | None) -> Ratio:
    return Ratio(_div(num, den), _bound(num, den))


def summarize(raw: Raw) -> Summary:
    """Point stats, goodput per (workload, config, SLO) and the mode ratios per (workload, SLO)."""
    gpus = int(raw.get("gpus", 1))
    workloads, configs = _names(raw, "workloads", "workload"), _names(raw, "configs", "config")
    stats: dict[tuple[str, str], list[PointStats]] = {}
    for p in raw.get("points", []):
        stats.setdefault((p["workload"], p["config"]), []).append(point_stats(p, raw["slos"]))
    for pts in stats.values():
        pts.sort(key=lambda s: s.rate)
    gp = {
        (w, c, slo["name"]): goodput(pts, slo)
        for (w, c), pts in stats.items()
        for slo in raw["slos"]
    }
    conditionals = [c for c in configs if c.startswith(CONDITIONAL_PREFIX)]
    ratios: dict[tuple[str, str], Ratios] = {}
    for w in workloads:
        for slo in raw["slos"]:
            col, dis = (gp.get((w, c, slo["name"])) for c in FIXED_MODES)
            best = max(col, dis, key=lambda g: g.interpolated) if col and dis else None
            ratios[(w, slo["name"])] = Ratios(
                _ratio(dis, col),
                {c: _ratio(gp.get((w, c, slo["name"])), best) for c in conditionals},
            )
    # a config's own GPU count where the raw file records it ("single" runs on one)
    config_gpus = {str(c["name"]): int(c.get("gpus", gpus)) for c in raw.get("configs", [])}
    per_gpu = {k: g.interpolated / config_gpus.get(k[1], gpus) for k, g in gp.items()}
    return Summary(gpus, workloads, configs, stats, gp, per_gpu, conditionals, ratios)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _lat(s: PointStats, kind: str) -> str:
    """'p50 / p90 / p99' of ttft or tpot, in whole ms."""
    vals = [getattr(s, f"{kind}_p{q}") for q in (50, 90, 99)]
    return " / ".join("-" if math.isnan(v) else f"{v:.0f}" for v in vals)


def goodput_table(raw: Raw, summary: Summary) -> list[str]:
    header = ["workload", "config"]
    for slo in raw["slos"]:
        n = slo["name"]
        header += [f"{n} goodput req/s", f"{n} per GPU", f"{n} max passing rate"]
    rows = []
    for w in summary.workloads:
        for c in summary.configs:
            row = [w, c]
            for slo in raw["slos"]:
                g = summary.goodput.get((w, c, slo["name"]))
                if g is None:
                    row += ["not run", "-", "-"]
                    continue
                pre = ">=" if g.censored else ""
                per_gpu = summary.per_gpu[(w, c, slo["name"])]
                row += [f"{pre}{g.interpolated:.2f}", f"{pre}{per_gpu:.2f}"]
                row.append(f"{g.max_rate:g}" if g.max_rate > 0 else "none")
            rows.append(row)
    return _table(header, rows)


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def ratio_table(raw: Raw, summary: Summary) -> list[str]:
    rows = [
        [w, slo["name"], _x(r.disagg_vs_colocated.value)]
        + [_x(r.vs_best_fixed[c].value) for c in summary.conditionals]
        for w in summary.workloads
        for slo in raw["slos"]
        for r in [summary.ratios[(w, slo["name"])]]
    ]
    header = ["workload", "SLO", "disagg / colocated"]
    return _table(header + [f"{c} / best fixed" for c in summary.conditionals], rows)


def _verdict(r: Ratio, threshold: float) -> str:
    if r.value is None:
        return "n/a (a config is missing or a denominator goodput is 0)"
    note = f" ({r.bound}: a goodput behind it is censored)" if r.bound else ""
    return f"{r.value:.2f}x -- **{'met' if r.value >= threshold else 'MISSED'}**{note}"


def target_lines(raw: Raw, summary: Summary) -> list[str]:
    lines = []
    for slo in raw["slos"]:
        r = summary.ratios.get((DISAGG_TARGET_WORKLOAD, slo["name"]))
        if r is not None:
            v = _verdict(r.disagg_vs_colocated, DISAGG_TARGET)
            lines.append(
                f"- disagg per GPU >= {DISAGG_TARGET}x colocated on {DISAGG_TARGET_WORKLOAD} "
                f"({slo['name']}): {v}"
            )
    for c in summary.conditionals:
        for w in summary.workloads:
            for slo in raw["slos"]:
                r = summary.ratios[(w, slo["name"])].vs_best_fixed[c]
                v = _verdict(r, CONDITIONAL_TOLERANCE)
                lines.append(
                    f"- {c} >= the better fixed mode (within 10%) on {w} ({slo['name']}): {v}"
                )
    return lines


def _point_row(s: PointStats, slos: Sequence[str]) -> list[str]:
    decisions = ", ".join(f"{k} {v}" for k, v in sorted(s.decisions.items())) or "-"
    row = [s.config, s.workload, f"{s.rate:g}", f"{s.completed}/{s.failed}"]
    row += [_lat(s, "ttft"), _lat(s, "tpot"), *(f"{100 * s.attained[n]:.0f}%" for n in slos)]
    row += [f"{s.kv_gb:.2f}", f"{s.transfer_gbps:.1f}", f"{s.transfer_ms:.1f}"]
    return [*row, f"{100 * s.transfer_share:.1f}%", decisions]


def point_table(raw: Raw, summary: Summary) -> list[str]:
    slos = [s["name"] for s in raw["slos"]]
    header = ["config", "workload", "rate", "done/failed", "TTFT ms p50/p90/p99"]
    header += ["TPOT ms p50/p90/p99"]
    header += [f"attained {n}" for n in slos]
    header += ["KV GB moved", "KV GB/s", "mean transfer ms", "transfer share", "decisions"]
    rows = [
        _point_row(s, slos)
        for w in summary.workloads
        for c in summary.configs
        for s in summary.stats.get((w, c), [])
    ]
    return _table(header, rows)


def _command_lines(commands: Sequence[str]) -> list[str]:
    """One ``Command:`` line, or with several runs a list of their commands (blank lines around)."""
    if len(commands) == 1:
        return [f"Command: `{commands[0]}`"]
    return ["Commands (one run per raw file, in order):", "", *(f"- `{c}`" for c in commands), ""]


# The SLO grid of the sensitivity table: where, if anywhere, disaggregation pays on this
# hardware, recomputed from the same runs (nothing is re-measured).
SWEEP_TTFT_MS = (500.0, 2000.0)
SWEEP_TPOT_MS = (8.0, 10.0, 12.0, 15.0, 20.0, 30.0)


def _gp_cell(g: Goodput) -> str:
    return f"{'>=' if g.censored else ''}{g.interpolated:.1f}"


def slo_sweep_table(raw: Raw, summary: Summary) -> list[str]:
    """Goodput (req/s, cluster) of every config under each SLO of the grid, per workload, with
    disagg / colocated."""
    configs = summary.configs
    rows = []
    for w in summary.workloads:
        for ttft in SWEEP_TTFT_MS:
            for tpot in SWEEP_TPOT_MS:
                slo: Slo = {"name": "sweep", "ttft_ms": ttft, "tpot_ms": tpot}
                gps = {}
                for c in configs:
                    pts = [
                        point_stats(p, [slo])
                        for p in raw.get("points", [])
                        if p["workload"] == w and p["config"] == c
                    ]
                    if pts:
                        gps[c] = goodput(pts, slo)
                ratio = _ratio(gps.get("disagg"), gps.get("colocated"))
                rows.append(
                    [w, f"{ttft:g} / {tpot:g}"]
                    + [_gp_cell(gps[c]) if c in gps else "-" for c in configs]
                    + [
                        _x(ratio.value)
                        + (f" ({ratio.bound})" if ratio.bound and ratio.value is not None else "")
                    ]
                )
    header = ["workload", "TTFT / TPOT SLO (p90 ms)", *configs, "disagg / colocated"]
    return _table(header, rows)


def markdown(
    raw: Raw, summary: Summary, plot_files: Sequence[str], raw_names: Sequence[str] = ()
) -> str:
    """The self-contained results file; only the Analysis section is left to fill in by hand."""
    out = [
        f"# Goodput: colocated vs disaggregated vs conditional ({raw.get('date', '?')})",
        "",
        f"Machine: {raw.get('machine', '?')}",
        f"Commit: {raw.get('commit', '?')}",
        *_command_lines(raw.get("commands", [raw.get("command", "?")])),
        f"Model: {raw.get('model', '?')}, {summary.gpus} GPUs per cluster",
    ]
    out += [f"Raw data: {', '.join(f'`{n}`' for n in raw_names)}"] if raw_names else []
    out += ["", "## Configurations", ""]
    out += [
        f"- {c['name']} ({c.get('label', '')}): `{' '.join(c.get('flags', []))}`"
        for c in raw.get("configs", [])
    ]
    out += ["", "## Workloads", ""]
    out += [f"- {w['name']}: {w.get('description', '')}" for w in raw.get("workloads", [])]
    out += ["", "## SLOs and goodput", ""]
    out += [
        f"- {s['name']}: TTFT p90 <= {s['ttft_ms']:g} ms and TPOT p90 <= {s['tpot_ms']:g} ms"
        for s in raw["slos"]
    ]
    out += [
        "",
        "A run at one Poisson rate meets an SLO when its p90 TTFT and p90 TPOT are within it and no "
        "request failed. Goodput is the highest measured rate that meets the SLO with every lower "
        "rate meeting it too, refined by linear interpolation of r = max(p90 TTFT / SLO TTFT, "
        "p90 TPOT / SLO TPOT) to where r crosses 1 between the last passing and the first failing "
        "rate. `>=` marks a censored goodput: every measured rate passed, so the limit lies above "
        "the sweep. Per GPU divides by the cluster's GPUs. A request is good when it succeeded "
        "within both thresholds; `attained` is good / all requests of the run. Requests with one "
        "output token have no TPOT. A ratio over a censored goodput is only a bound (noted by the "
        "verdict). Transfer share = KV transfer seconds / the sum of the run's TTFTs.",
        "",
        "## Goodput",
        "",
        *goodput_table(raw, summary),
        "",
        "## Ratios and targets",
        "",
        *ratio_table(raw, summary),
        "",
        *target_lines(raw, summary),
        "",
        "## Goodput across SLOs (sensitivity, from the same runs)",
        "",
        "Goodput in req/s for the whole cluster under a grid of p90 SLOs, computed the same way "
        "as above from the same requests (nothing re-measured): where, on this hardware, each "
        "mode pays.",
        "",
        *slo_sweep_table(raw, summary),
        "",
        "## Per rate",
        "",
        *point_table(raw, summary),
        "",
        "## Plots",
        "",
    ]
    out += [f"![{Path(f).stem}]({f})" for f in plot_files] or ["(no plots: matplotlib missing)"]
    out += ["", "## Analysis", "", "(written after the run)", ""]
    return "\n".join(out)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _marker(config_index: int) -> str:
    return MARKERS[config_index % len(MARKERS)]


def _label(raw: Raw, config: str) -> str:
    label = next((c.get("label") for c in raw.get("configs", []) if c["name"] == config), None)
    return f"{config} ({label})" if label else config


def plot_goodput_vs_rate(
    raw: Raw, stats: Mapping[tuple[str, str], Sequence[PointStats]], path: Path | str
) -> None:
    """Good requests/s against offered rate: a subplot per workload, a colour per config."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    workloads, configs = _names(raw, "workloads", "workload"), _names(raw, "configs", "config")
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4.4), squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        top = 0.0
        for ci, c in enumerate(configs):
            pts = sorted(stats.get((w, c), []), key=lambda s: s.rate)
            if not pts:
                continue
            xs = [s.rate for s in pts]
            top = max(top, xs[-1])
            for si, slo in enumerate(raw["slos"]):
                ys = [s.good_rps[slo["name"]] for s in pts]
                ax.plot(xs, ys, SLO_STYLES[si % 3], color=f"C{ci}", marker=_marker(ci), ms=4)
        ax.plot([0, top], [0, top], ":", color="grey", lw=1)
        ax.set(
            title=w,
            xlabel="offered rate (req/s)",
            ylabel="rate x fraction of requests good (req/s)",
        )
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=f"C{i}", marker=_marker(i), label=_label(raw, c))
        for i, c in enumerate(configs)
    ]
    handles += [
        Line2D([], [], color="k", ls=SLO_STYLES[i % 3], label=f"{s['name']} SLO")
        for i, s in enumerate(raw["slos"])
    ]
    handles.append(Line2D([], [], color="grey", ls=":", label="all requests good (y = x)"))
    fig.tight_layout()
    ncol = min(len(handles), 2 * len(workloads))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=ncol)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the bounding box takes in the legend
    plt.close(fig)


def common_rate(raw: Raw, workload: str) -> float | None:
    """The highest rate that every config which ran ``workload`` measured."""
    rates: dict[str, set[float]] = {}
    for p in raw.get("points", []):
        if p["workload"] == workload:
            rates.setdefault(p["config"], set()).add(round(float(p["rate"]), 6))
    common = set.intersection(*rates.values()) if rates else set()
    return max(common) if common else None


def _point_at(raw: Raw, workload: str, config: str, rate: float | None) -> Mapping[str, Any] | None:
    for p in raw.get("points", []) if rate is not None else []:
        if (p["workload"], p["config"], round(float(p["rate"]), 6)) == (workload, config, rate):
            return p
    return None


def plot_latency_cdfs(raw: Raw, path: Path | str) -> None:
    """TTFT and TPOT CDFs per workload (rows), one line per config, at the common top rate."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    workloads, configs = _names(raw, "workloads", "workload"), _names(raw, "configs", "config")
    fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 3.6 * len(workloads)), squeeze=False)
    for row, w in zip(axes, workloads, strict=True):
        rate = common_rate(raw, w)
        at = f"at {rate:g} req/s" if rate is not None else "(no rate common to all configs)"
        for ax, key, name in zip(row, ("ttft_ms", "tpot_ms"), ("TTFT", "TPOT"), strict=True):
            for ci, c in enumerate(configs):
                point = _point_at(raw, w, c, rate)
                xs = sorted(_ok_values(point, key)) if point else []
                if xs:
                    ys = [(i + 1) / len(xs) for i in range(len(xs))]
                    style = {"color": f"C{ci}", "marker": _marker(ci), "ms": 4}
                    marks = {"markevery": max(1, len(xs) // 6), "label": _label(raw, c)}
                    ax.step(xs, ys, where="post", **style, **marks)
            for si, slo in enumerate(raw["slos"]):
                ax.axvline(
                    slo[key], color="grey", ls=SLO_STYLES[si % 3], lw=1, label=f"{slo['name']} SLO"
                )
            if key == "ttft_ms":
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set(
                title=f"{w}: {name} CDF {at}", xlabel=f"{name} (ms)", ylabel="fraction of requests"
            )
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _merge_named(
    into: list[dict[str, Any]], items: Iterable[Mapping[str, Any]], same: str, source: str
) -> None:
    """Add configs or workloads to ``into`` by name. One already there must agree on ``same``
    (a config's flags, a workload's length scale); a workload's rates are united."""
    known = {x["name"]: x for x in into}
    for item in items:
        old = known.get(item["name"])
        if old is None:
            known[item["name"]] = dict(item)
            into.append(known[item["name"]])
        elif old.get(same) != item.get(same):
            raise ValueError(
                f"{source}: {item['name']} has {same} {item.get(same)!r}, an earlier file "
                f"{old.get(same)!r}"
            )
        elif "rates" in item:
            old["rates"] = sorted({*old.get("rates", []), *item["rates"]})


def merge_raws(raws: Sequence[Raw], sources: Sequence[str]) -> dict[str, Any]:
    """One study from the raw files of its runs (``sources`` names them in messages).

    Metadata (date, machine, ...) is the first file's, ``commands`` lists every file's command and
    ``commit`` every distinct commit. Configs, workloads and points are united; a (config,
    workload, rate) point in two files keeps the later one, with a warning on stderr. ValueError
    when the files are not one study: a value of STUDY_KEYS, a config's flags or a workload's
    length scale differs.
    """
    first = raws[0]
    merged = dict(first) | {"configs": [], "workloads": []}
    merged["commands"] = [str(r.get("command", "?")) for r in raws]
    merged["commit"] = ", ".join(dict.fromkeys(str(r.get("commit", "?")) for r in raws))
    points: dict[tuple[str, str, float], Mapping[str, Any]] = {}
    for raw, source in zip(raws, sources, strict=True):
        for key in STUDY_KEYS:
            if raw.get(key) != first.get(key):
                raise ValueError(
                    f"{source} and {sources[0]} are not one study: {key} {raw.get(key)!r} "
                    f"vs {first.get(key)!r}"
                )
        _merge_named(merged["configs"], raw.get("configs", []), "flags", source)
        _merge_named(merged["workloads"], raw.get("workloads", []), "length_scale", source)
        for p in raw.get("points", []):
            key = (p["config"], p["workload"], round(float(p["rate"]), 6))
            if key in points:
                print(
                    f"warning: {source}: {key[0]} {key[1]} at {key[2]:g} req/s measured again, "
                    "keeping this one",
                    file=sys.stderr,
                )
            points[key] = p
    merged["points"] = list(points.values())
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Goodput report (markdown + plots) from raw JSON.")
    ap.add_argument(
        "raw",
        type=Path,
        nargs="+",
        help="raw JSON written by bench_goodput.py; several (runs of one study) are merged",
    )
    where = ap.add_mutually_exclusive_group()
    where.add_argument(
        "--out-dir",
        type=Path,
        default=RESULTS,
        help="one raw file: write OUT_DIR/STEM.md, STEM-goodput.png and STEM-cdf.png, STEM the "
        "raw file's name less .json",
    )
    where.add_argument(
        "--out",
        type=Path,
        help="output prefix: write PREFIX.md, PREFIX-goodput.png and PREFIX-cdf.png (needed "
        "with several raw files)",
    )
    args = ap.parse_args(argv)
    if args.out is None and len(args.raw) > 1:
        ap.error("several raw files need --out PREFIX")
    prefix: Path = args.out or args.out_dir / args.raw[0].stem
    try:
        raw = merge_raws([json.loads(p.read_text()) for p in args.raw], list(map(str, args.raw)))
    except ValueError as e:
        raise SystemExit(f"goodput_report: cannot merge: {e}") from None
    summary = summarize(raw)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    stem = prefix.name
    plots: list[str] = []
    try:
        plot_goodput_vs_rate(raw, summary.stats, prefix.parent / f"{stem}-goodput.png")
        plot_latency_cdfs(raw, prefix.parent / f"{stem}-cdf.png")
        plots = [f"{stem}-goodput.png", f"{stem}-cdf.png"]
    except ImportError as e:
        print(f"no plots: {e}", file=sys.stderr)
    md_path = prefix.parent / f"{stem}.md"
    md_path.write_text(markdown(raw, summary, plots, raw_names=[p.name for p in args.raw]))
    print("\n".join([*goodput_table(raw, summary), "", *ratio_table(raw, summary)]))
    print(f"\nwrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
