"""Every notebook in notebooks/ runs, without a Jupyter kernel, and shows what it claims.

The code cells of each ``.ipynb`` are executed in order in one namespace, from the repository root,
with matplotlib on the Agg backend (notebooks find the repository root from the working
directory, so they run from the root or from notebooks/). IPython magics (lines starting with
``%`` or ``!``) are skipped. Notebooks are committed executed: every code cell has run, in order.
Per-notebook checks then assert real values from the namespace.

Compile budget: colocated_vs_disaggregated compiles twice (the co-located and the P/D cluster
loop, ~15-18 s each on a 2-core CPU); every other run reuses them.
cpu_kv_tier compiles once (one cluster loop with a CPU tier) and reuses it for its 15 runs (same
workload, instances and chunk size; only the tier's capacity, bandwidth and sharing differ).
power_and_pim compiles four times: one sweep loop per design (GPU only, PIM offload, PIM + sub-batch
interleaving: the PIM flags are static; the five loads of a design share it), whose GPU-only loop
the power-cap sweep reuses (the cap is a value), and one single run (the energy by component).
hardware_comparison compiles once: one sweep over 12 hardware options of three latency sources, two
loads and the what-if part's bandwidth (hardware and mem_bw_gbs are values of the compiled loop).
design_search compiles twice: the search's 10-point call (every step, the two noise measurements and
the held-out re-simulation reuse it) and the grid's one 242-point call.
"""

import json
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from _shared import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code_cells(path: Path) -> list:
    nb = json.loads(path.read_text())
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def run_notebook(path: Path) -> dict:
    """Execute the code cells of ``path`` in one namespace; returns the namespace."""
    ns = {"__name__": "__main__", "__file__": str(path)}
    for i, cell in enumerate(_code_cells(path)):
        src = "".join(cell["source"])
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        exec(compile(src, f"{path.name}[code cell {i}]", "exec"), ns)  # noqa: S102
    return ns


@pytest.fixture
def notebook_env(monkeypatch):
    import matplotlib.pyplot as plt
    matplotlib.use("Agg", force=True)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))  # a notebook may add the repository root
    yield
    plt.close("all")


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_executed(path):
    counts = [c.get("execution_count") for c in _code_cells(path)]
    assert all(isinstance(n, int) for n in counts), f"{path.name}: not every code cell has run"
    assert counts == sorted(counts), f"{path.name}: cells were run out of order"


def _check_colocated_vs_disaggregated(ns: dict):
    from matplotlib.figure import Figure

    n = ns["N_REQUESTS"]
    results, summaries, designs = ns["results"], ns["summaries"], ns["DESIGNS"]
    pd_designs = ns["PD_DESIGNS"]
    assert len(pd_designs) >= 1 and len(results) == len(designs) * len(ns["LOADS"])
    kv_token_bytes = 2 * ns["MODEL"].kv_dim * ns["MODEL"].num_layers * 2  # K+V, bf16
    assert kv_token_bytes == ns["KV_TOKEN_BYTES"] == 131_072

    for (name, s), res in results.items():
        # every request finished, in every design and load
        assert summaries[name, s]["requests"] == n and summaries[name, s]["unfinished_requests"] == 0, (name, s)
        assert np.all(res.finish_ns > res.first_token_ns) and np.all(res.first_token_ns > res.arrival_ns)
        roles = [spec.role for spec in designs[name]]
        if name not in pd_designs:
            assert res.prefill_instance is None and set(roles) == {"colocated"}
            continue
        # every request prefilled on the prefill instance, finished on a decode instance
        prefill = roles.index("prefill")
        assert res.stats["prefills_per_instance"] == [n if i == prefill else 0 for i in range(len(roles))], (name, s)
        assert all(roles[i] == "decode" for i in set(res.instance.tolist())), (name, s)
        # KV conserved through the hand-off: the whole prompt, for every request never preempted
        ok = res.num_preemptions == 0
        np.testing.assert_array_equal(res.kv_transfer_bytes[ok], res.input_toks[ok].astype(np.int64) * kv_token_bytes)
        assert np.all(res.kv_transfer_bytes >= res.input_toks.astype(np.int64) * kv_token_bytes)
        assert np.all(res.kv_ready_ns > res.prefill_end_ns)

    pd_main, pd_after = ns["pd_main"], ns["pd_after"]
    if pd_main.stats["preemptions"] == 0:
        assert pd_main.stats["kv_transfer_bytes"] == int(pd_main.input_toks.sum()) * kv_token_bytes
    # the table's numbers are the per-request ones
    table = ns["tables"][pd_designs[0], ns["BASE_LOAD"]]
    assert summaries[pd_designs[0], ns["BASE_LOAD"]]["ttft_ms_p99"] == pytest.approx(
        np.percentile(table["ttft_ns"] / 1e6, 99))
    # layer-wise streaming overlaps the transfer with the prefill: it waits less than sending after it
    assert 0 < pd_main.stats["kv_transfer_wait_ms"]["mean"] < pd_after.stats["kv_transfer_wait_ms"]["mean"]
    assert np.all(ns["first_itl"] > 0)

    # plots: a TTFT CDF and a TPOT CDF per design, the KV-wait histograms, latency against load
    for fig in (ns["fig_cdf"], ns["fig_load"]):
        assert isinstance(fig, Figure) and len(fig.axes) == 3
    ttft_ax, tpot_ax, kv_ax = ns["fig_cdf"].axes
    assert len(ttft_ax.lines) == len(tpot_ax.lines) == len(designs)
    assert len(kv_ax.patches) > 0
    assert all(len(ax.lines) >= len(designs) for ax in ns["fig_load"].axes)
    # the conclusions are computed, and name a design for each metric
    lines = ns["conclusions"]
    assert any("TTFT p99" in line and any(d in line for d in designs) for line in lines)
    assert any("TPOT p99" in line and any(d in line for d in designs) for line in lines)


def _check_cpu_kv_tier(ns: dict):
    from matplotlib.figure import Figure

    n, results, m = ns["N_REQUESTS"], ns["results"], ns["m"]
    caps, bws, sharing = ns["CAPACITIES"], ns["BANDWIDTHS"], ns["SHARING_CAPS"]
    # the runs of every sweep, all with every request finished
    assert {("none", 0), ("burst", 0)} | {("shared", c) for c in caps} | {("private", c) for c in sharing} \
        | {("bw", b) for b in bws} <= set(results)
    chunk_bytes = 256 * 131_072  # a 256-token chunk of Llama-3.1-8B KV in bf16
    for key, res in results.items():
        assert m[key]["finished"] == n and m[key]["unfinished"] == 0, key
        # prefix hits split exactly into the GPU's and the CPU tier's (counted once per request)
        tier = res.stats["kv_tier"]
        assert res.stats["prefix_hit_tokens"] + tier["hit_tokens"] == int(res.prefix_hit_tokens.sum()), key
        assert tier["hit_tokens"] <= tier["recalled_chunks"] * 256, key  # a straddling chunk is read whole
        for p in tier["pools"].values():  # chunks conserved, no pool over capacity
            assert p["written_chunks"] - p["evicted_chunks"] == p["resident_chunks"] <= p["capacity_chunks"], key
        assert int(np.max(res.iter_tier_resident)) <= max(p["capacity_chunks"] for p in tier["pools"].values())
        assert m[key]["recall_gib"] == pytest.approx(tier["recalled_chunks"] * chunk_bytes / 2**30), key
    # "no tier": an empty pool that serves nothing
    for key in (("none", 0), ("burst", 0)):
        assert results[key].stats["kv_tier"]["hit_tokens"] == 0
        assert [p["capacity_chunks"] for p in results[key].stats["kv_tier"]["pools"].values()] == [0]
    # a shared pool holds the node's capacity; private pools half each
    for c in sharing:
        assert [p["capacity_chunks"] for p in m["shared", c]["pools"].values()] == [c * 2**30 // chunk_bytes]
        assert [p["capacity_chunks"] for p in m["private", c]["pools"].values()] == [c * 2**30 // 2 // chunk_bytes] * 2
    # the GPU cache cannot keep every prefix, so a large enough shared pool raises the hit rate and
    # cuts the median TTFT; the recall is on the critical path: the slowest link gives the worst TTFT
    none, top = m["none", 0], m["shared", caps[-1]]
    assert none["cpu_hit"] == 0 and top["cpu_hit"] > 0.1 and top["hit"] > none["hit"] + 0.1
    assert top["ttft_p50"] < none["ttft_p50"]
    assert m["bw", bws[0]]["ttft_p50"] > m["bw", bws[-1]]["ttft_p50"]
    assert m["bw", bws[0]]["ttft_p99"] > m["bw", bws[-1]]["ttft_p99"]
    assert top["hit"] <= ns["REUSABLE"] + 0.01  # never above what an unbounded cache could serve
    # the same node memory serves more from a shared pool than from private ones (round-robin routing)
    assert m["shared", sharing[-1]]["cpu_hit"] > m["private", sharing[-1]]["cpu_hit"]
    # at saturation, the saved prefill is throughput
    assert m["burst", caps[-1]]["rps"] > m["burst", 0]["rps"]

    # plots: hits / TTFT / compute against capacity, TTFT and throughput against bandwidth, sharing
    for fig, k in ((ns["fig_capacity"], 4), (ns["fig_bandwidth"], 2), (ns["fig_sharing"], 3)):
        assert isinstance(fig, Figure) and len(fig.axes) == k  # fig_capacity: 3 panels + a twin axis
    hits_ax, ttft_ax = ns["fig_capacity"].axes[:2]
    assert len(hits_ax.lines) >= 3 and len(ttft_ax.lines) == 2
    assert all(len(line.get_xdata()) == len(caps) + 1 for line in ttft_ax.lines)
    assert len(ns["fig_bandwidth"].axes[0].lines) == 4
    assert len(ns["fig_sharing"].axes[0].lines) == 2
    # the conclusions are computed and cover capacity, bandwidth, sharing and saturation
    text = "\n".join(ns["conclusions"])
    for word in ("Capacity", "TTFT p50 beats", "TTFT p99", "Sharing", "saturation"):
        assert word in text, word


def _check_power_and_pim(ns: dict):
    from matplotlib.figure import Figure

    n, loads, designs, rows = ns["N_REQUESTS"], ns["LOADS"], ns["DESIGNS"], ns["rows"]
    caps, cap_loads, cap_rows, npu = ns["CAPS"], ns["CAP_LOADS"], ns["cap_rows"], ns["NPU"]
    out_tokens = int(ns["WORKLOAD"].output_toks.sum())
    assert list(designs) == ["GPU only", "PIM offload", "PIM + sub-batch"] and len(loads) == 5
    assert not designs["GPU only"].enable_attn_offloading and designs["PIM offload"].enable_attn_offloading
    assert designs["PIM + sub-batch"].enable_sub_batch_interleaving
    # three sweep loops: one per design (PIM flags are static); the cap sweep reuses the GPU-only one
    assert ns["_run_batch_compiles"] == 3
    # every point ran to the end; its energy columns agree with each other and with its makespan
    for r in [r for d in designs for r in rows[d].values()] + list(cap_rows.values()):
        assert r["status"] == "ok" and r["finished"] == n, r
        assert r["energy_j"] > 0 and 0 < r["npu_energy_j"] < r["energy_j"]
        assert r["j_per_output_token"] == pytest.approx(r["energy_j"] / out_tokens, rel=1e-12)
        assert r["output_tokens_per_j"] == pytest.approx(out_tokens / r["energy_j"], rel=1e-12)
        assert r["avg_power_w"] == pytest.approx(r["energy_j"] / r["makespan_s"], rel=1e-9)
    # decode attention moves to PIM: both PIM designs' TPOT differs from GPU only's at every load (DDR4 PIM
    # is slower than this GPU's memory); interleaving pays every weight twice at the lightest load and
    # hides PIM behind the other half at the heaviest
    gpu, off, sub = (rows[d] for d in designs)
    for s in loads:
        assert off[s]["tpot_mean_ms"] > gpu[s]["tpot_mean_ms"] and sub[s]["tpot_mean_ms"] > gpu[s]["tpot_mean_ms"], s
    assert sub[loads[0]]["tpot_mean_ms"] > 1.15 * off[loads[0]]["tpot_mean_ms"]
    assert sub[loads[-1]]["tpot_mean_ms"] < off[loads[-1]]["tpot_mean_ms"]

    # the single run: its energy is its sweep point's; by hand, PIM from the INI (64 DDR4 channels in 512 GB:
    # 623 mW idle each, 3,803 mW peak while PIM works) and memory = the channels' idle power + 6 pJ/bit of PIM I/O
    d, e = ns["detail"], ns["ENERGY"]
    assert e["total_j"] == pytest.approx(rows[ns["DETAIL_DESIGN"]][ns["DETAIL_LOAD"]]["energy_j"], rel=1e-9)
    assert sum(e["joules"].values()) == pytest.approx(e["total_j"], rel=1e-12)
    assert ns["PIM_PLAN"].num_channels == 64 and (ns["DEV"].idle_power_mw, ns["DEV"].peak_power_mw) == (623, 3803)
    pim_s = d.iter_pim_ns.sum() / 1e9
    assert pim_s > 0 and e["joules"]["pim"] == pytest.approx((3.803 - 0.623) * pim_s, rel=1e-9)
    assert ns["ALWAYS_ON_W"]["memory"] == pytest.approx(64 * 0.623)
    pim_io_j = 6.0 * 8e-12 * d.iter_pim_io_bytes.sum()  # the block's dram.energy_per_bit, pJ
    assert e["joules"]["memory"] == pytest.approx(64 * 0.623 * e["duration_s"] + pim_io_j, rel=1e-9)
    decode = (d.iter_prompt_tokens == 0) & (d.iter_gen_tokens > 0)
    assert decode.sum() > 0 and np.all(d.iter_pim_ns[decode] > 0) and np.all(d.iter_pim_ns[d.iter_gen_tokens == 0] == 0)
    # the GPU's busy time (active power) leaves out its wait for PIM results
    duration = d.iter_end_ns - d.iter_start_ns
    assert np.all(d.iter_busy_ns <= duration) and np.all((d.iter_busy_ns + d.iter_pim_ns)[decode] <= duration[decode])

    # power caps from the active power down to half of it: a cap at the active power changes nothing; a
    # tighter one lowers the average power, raises TPOT and raises tokens per joule
    assert caps[0] == npu.active_power and caps[-1] == npu.active_power / 2
    assert ns["STRETCH"][caps[-1]] == pytest.approx(((caps[-1] - npu.idle_power) / (npu.active_power - npu.idle_power))
                                                    ** (-1 / 3))
    for s in cap_loads:
        assert cap_rows[caps[0], s]["energy_j"] == rows["GPU only"][s]["energy_j"]
        assert cap_rows[caps[0], s]["tpot_mean_ms"] == rows["GPU only"][s]["tpot_mean_ms"]
        col = {k: [cap_rows[c, s][k] for c in caps] for k in ("avg_power_w", "tpot_mean_ms", "output_tokens_per_j")}
        assert all(a > b for a, b in zip(col["avg_power_w"], col["avg_power_w"][1:])), s
        assert all(a < b for a, b in zip(col["tpot_mean_ms"], col["tpot_mean_ms"][1:])), s
        assert all(a < b for a, b in zip(col["output_tokens_per_j"], col["output_tokens_per_j"][1:])), s

    # plots: latency and J/token against load, the energy breakdown, the cap sweep
    for fig, k in ((ns["fig_load"], 3), (ns["fig_energy"], 2), (ns["fig_cap"], 3)):
        assert isinstance(fig, Figure) and len(fig.axes) == k
    ttft_ax, tpot_ax, j_ax = ns["fig_load"].axes
    assert len(ttft_ax.lines) == len(tpot_ax.lines) == 2 * len(designs) and len(j_ax.lines) == len(designs)
    assert all(len(line.get_xdata()) == len(loads) for line in j_ax.lines)
    assert len(ns["fig_energy"].axes[0].patches) == sum(j > 0 for j in e["joules"].values())
    assert len(ns["fig_energy"].axes[1].patches) == 2 * len(designs)
    assert all(len(ax.lines) >= len(cap_loads) for ax in ns["fig_cap"].axes)
    # the conclusions are computed and cover the designs, energy per token, PIM power and the caps
    text = "\n".join(ns["conclusions"])
    for word in ("GPU only", "Sub-batch interleaving", "J per output token", "The PIM itself", "Power cap"):
        assert word in text, word


def _check_hardware_comparison(ns: dict):
    from matplotlib.figure import Figure

    n, at, bw, load, burst = ns["N_REQUESTS"], ns["at"], ns["bw"], ns["LOAD"], ns["BURST"]
    parts, options, source, result = ns["PARTS"], ns["OPTIONS"], ns["SOURCE"], ns["result"]
    assert list(parts) == ["RTX 4090", "RTX PRO 6000", "H100", "H200", "B200", "what-if H100 2xBW"]
    # every option at both loads, and the bandwidth sweep, in one sweep call and one compile
    assert len(options) == 12 and len(result.rows) == 2 * len(options) + len(ns["BANDWIDTHS"])
    assert result.num_groups == 1 and ns["_run_batch_compiles"] == 1
    for r in result.rows:
        assert r["status"] == "ok" and r["finished"] == n, r
        # output tokens/s = the trace's output tokens over first arrival to last completion (one GPU per point)
        assert r["output_tok_s"] == pytest.approx(ns["OUTPUT_TOKENS"] / r["makespan_s"], rel=1e-12)
    # each option priced by the source its form says: a native bundle folder, a converted system, a spec sheet
    native, opdb = {"rtx4090", "rtxpro6000"}, {"h100", "h200", "b200", "rtxpro6000_opdb"}
    for opt in options:
        want = "profiles" if opt in native else "operator-db" if opt in opdb else "roofline"
        assert (opt in native | opdb) != opt.startswith("roofline_"), opt
        assert source[opt] == at[opt, load]["latency_model"] == at[opt, burst]["latency_model"] == want, opt
    assert {r["latency_model"] for r in bw.values()} == {"roofline"}
    # 24 GiB x 0.9 less 16.06 GB of bf16 weights: 3,400 blocks of 16 tokens x 131,072 bytes (conf/hardware/rtx4090.yaml)
    assert ns["KV_TOKENS"]["rtx4090"] == 54_400 and all(ns["KV_TOKENS"][o] > 400_000 for o in options
                                                        if ns["HW"][o].mem_size_gb >= 80)
    # the 4090 runs out of KV at the comparison load: preempts, misses the SLO; nothing with >= 80 GB preempts
    assert at["rtx4090", load]["preemptions"] > 0 and at["rtx4090", load]["slo_attainment"] < 0.5
    assert all(at[o, s]["preemptions"] == 0 for o in options for s in (load, burst) if ns["HW"][o].mem_size_gb >= 80)
    # decode is bandwidth-bound: TPOT p99 follows the parts' bandwidth, saturation throughput the reverse
    real = ["rtx4090", "rtxpro6000", "h100", "h200", "b200"]
    assert [ns["SHEET"][ns["PART_OF"][o]].mem_bw_gbs for o in real] == [1008, 1792, 3350, 4800, 7700]
    tpot99 = [at[o, load]["tpot_p99_ms"] for o in real]
    sat = [at[o, burst]["output_tok_s"] for o in real]
    assert all(a > b for a, b in zip(tpot99, tpot99[1:])) and all(a < b for a, b in zip(sat, sat[1:]))
    # the what-if part (2x bandwidth, half the FLOP/s) against the H100 sheet: faster decode, slower prefill
    w, h = at["roofline_whatif_h100_2xbw", load], at["roofline_h100", load]
    assert w["tpot_mean_ms"] < 0.8 * h["tpot_mean_ms"] and w["ttft_p99_ms"] > h["ttft_p99_ms"]
    # the bandwidth knob at the sheet's own 6,700 GB/s reproduces the what-if row exactly; TPOT falls with
    # bandwidth, and doubling the bandwidth never halves it (compute and fixed costs remain)
    same = {k: v for k, v in bw[6700.0].items() if k not in ("config", "mem_bw_gbs")}
    assert same == {k: v for k, v in w.items() if k != "config"}
    bws = sorted(bw)
    assert all(bw[a]["tpot_mean_ms"] > bw[b]["tpot_mean_ms"] for a, b in zip(bws, bws[1:]))
    doubled = [b for b in bws if 2 * b in bw]
    assert len(doubled) >= 3 and all(bw[2 * b]["tpot_mean_ms"] > bw[b]["tpot_mean_ms"] / 2 for b in doubled)
    # the sources agree as the prose says: roofline within 10% of the operator database's TPOT mean on the
    # data-centre parts; slower than the native RTX 4090 bundle (as its leave-one-hardware-out error's sign);
    # the converted RTX PRO 6000 bundle within 10% of the native one's TPOT mean
    for part in ("h100", "h200", "b200"):
        assert abs(at[f"roofline_{part}", load]["tpot_mean_ms"] / at[part, load]["tpot_mean_ms"] - 1) < 0.10, part
    assert at["roofline_rtx4090", load]["tpot_mean_ms"] > at["rtx4090", load]["tpot_mean_ms"]
    assert ns["ROOFLINE_FIT"]["iteration_loho"]["per_bundle"]["RTX4090 meta-llama/Llama-3.1-8B tp1"]["signed_median"] > 0
    assert abs(ns["OPDB_VS_NATIVE"]["tpot_mean_ms"]) < 0.10
    for part, opt, _, r, s, q in ns["cross"]:  # the cross-source table's ratios are the rows'
        ref = ns["REFERENCE"][part]
        assert q["tpot_mean"] == r["tpot_mean_ms"] / at[ref, load]["tpot_mean_ms"] and r is at[opt, load]
        assert q["saturation"] == s["output_tok_s"] / at[ref, burst]["output_tok_s"]

    # plots: throughput / TTFT / TPOT per part, the sources side by side, TPOT and TTFT against bandwidth
    for fig, k in ((ns["fig_compare"], 3), (ns["fig_sources"], 2), (ns["fig_bw"], 2)):
        assert isinstance(fig, Figure) and len(fig.axes) == k
    assert len(ns["fig_compare"].axes[0].patches) == 2 * len(parts)
    assert all(len(ax.patches) == len(parts) for ax in ns["fig_compare"].axes[1:])
    assert len(ns["fig_sources"].axes[0].patches) == len(ns["cross"])
    assert all(len(line.get_xdata()) == len(bws) for line in ns["fig_bw"].axes[0].lines[:3])
    # the conclusions are computed and cover the SLO, saturation, the sources and the what-if part
    text = "\n".join(ns["conclusions"])
    for word in ("SLO", "Saturation throughput", "Roofline against", "Converted operator database", "what-if part",
                 "Bandwidth sweep"):
        assert word in text, word


def _check_design_search(ns: dict):
    from matplotlib.figure import Figure

    prices, seeds, result, best = ns["PRICES"], ns["SEEDS"], ns["result"], ns["best"]
    guarded, plain, size = ns["GUARDED"], ns["PROBLEM"], ns["SIZE"]
    assert ns["_run_batch_compiles"] <= 2  # the search's call size and the grid's (0-1 when already compiled)
    assert size == len(seeds) * (2 * ns["SEARCH_KW"]["num_directions"] + 1) == 10  # no anchor: value-only knobs
    # every call of one size: the steps and the two noise measurements (mid-way and after the last step)
    assert result.evaluations == result.calls * size and result.calls == ns["STEPS"] + 2
    sims = [r["simulations"] for r in result.rows]
    assert sims == sorted(sims) and sims[-1] + size == result.evaluations  # no polish: no integer knob
    for r in result.rows:  # the logged cost is the price formula by hand
        assert r["objective"] == pytest.approx(sum(p * r["values"][k] for k, p in prices.items()), rel=1e-12)
    # the guard band: margin = z sqrt(2) std / |bound|, target = bound (1 - margin), std the larger of the
    # two measured spreads (the mid-way one alone: the band of the search's second half)
    for c, cm in zip(guarded.constraints, ns["MID"].constraints):
        v = result.noise[c.metric]
        std = v["std"]
        assert std == max(v["std_mid"], v["std_end"]) and 0 < std < math.inf
        assert c.margin == pytest.approx(min(0.5, ns["GUARD_Z"] * math.sqrt(2) * std / c.bound))
        assert cm.margin == pytest.approx(min(0.5, ns["GUARD_Z"] * math.sqrt(2) * v["std_mid"] / c.bound))
        assert c.target == pytest.approx(c.bound * (1 - c.margin)) and c.target < c.bound
    # the answer is re-picked under the final band: the cheapest logged design that meets it (re-judged here)
    final_ok = [r for r in result.rows if all(r["metrics"][c.metric] <= c.target for c in guarded.constraints)]
    assert [r["feasible"] for r in result.rows] == [any(r is f for f in final_ok) for r in result.rows]
    assert best.objective == min(r["objective"] for r in final_ok)
    # the answer meets the guarded bounds on the search's seeds, and the grid's optimum is the cheapest
    # grid design that does (re-judged here from the grid's pooled metrics)
    assert best.feasible and all(best.metrics[c.metric] <= c.target for c in guarded.constraints)
    levels, designs, metrics = ns["GRID_LEVELS"], ns["grid_designs"], ns["grid_metrics"]
    assert len(designs) == levels ** 2 and ns["grid_sims"] == levels ** 2 * len(seeds) == 242
    ok = [all(m[c.metric] <= c.target for c in guarded.constraints) for m in metrics]
    grid_opt = min(sum(p * v[k] for k, p in prices.items()) for v, f in zip(designs, ok) if f)
    assert ns["grid_best"].objective == pytest.approx(grid_opt, rel=1e-12)
    gap = 100 * (best.objective / grid_opt - 1)
    assert gap == pytest.approx(ns["gap_pct"]) and gap <= 3.0  # within a few % of the grid (or cheaper)
    assert result.evaluations < ns["grid_sims"]  # with fewer simulations
    # the plain-bound grid optimum is at most as costly, and fails the held-out pairs at least as often
    held = ns["held"]
    assert ns["grid_best_plain"].objective <= ns["grid_best"].objective
    assert held["grid, plain bounds"]["pairs_ok"] <= held["grid, guarded bounds"]["pairs_ok"]
    # the mid-way band alone answers a cheaper design, which fails held-out pairs at least as often
    mid = ns["mid_only"]
    assert mid.objective <= best.objective and held["search, mid-way band only"]["pairs_ok"] <= held["search"]["pairs_ok"]
    for h in held.values():  # disjoint pairs of held-out traces, judged by the plain bounds
        assert len(h["pairs"]) == len(ns["HELDOUT_SEEDS"]) // len(seeds)
        assert h["pairs_ok"] == np.mean([all(m[c.metric] <= c.bound for c in plain.constraints) for m in h["pairs"]])
        # the 95% Clopper-Pearson interval by its definition: P(X >= k | lo) = P(X <= k | hi) = 2.5%
        (lo, hi), k, m_ = h["ci"], h["k"], len(h["pairs"])
        assert k == round(h["pairs_ok"] * m_) and lo <= h["pairs_ok"] <= hi
        cdf = lambda j, p: sum(math.comb(m_, i) * p ** i * (1 - p) ** (m_ - i) for i in range(j + 1))  # noqa: E731
        assert (lo == 0.0) if k == 0 else 1 - cdf(k - 1, lo) == pytest.approx(0.025, rel=1e-6)
        assert (hi == 1.0) if k == m_ else cdf(k, hi) == pytest.approx(0.025, rel=1e-6)
        if k == m_:  # by hand: P(X >= m | p) = p^m
            assert lo == pytest.approx(0.025 ** (1 / m_))
    # the landscape: more bandwidth lowers TPOT P99 and more compute lowers TTFT P99 everywhere in the box
    tp = np.array([m["tpot_p99_ms"] for m in metrics]).reshape(levels, levels)  # [tflops, bandwidth]
    tt = np.array([m["ttft_p99_ms"] for m in metrics]).reshape(levels, levels)
    assert np.all(tp[:, -1] < tp[:, 0]) and np.all(tt[-1, :] < tt[0, :])
    # plots: the landscape (+ its colour bar) with the accepted path, and the objective against simulations
    fig, prog = ns["fig_landscape"], ns["fig_progress"]
    assert isinstance(fig, Figure) and len(fig.axes) == 2 and isinstance(prog, Figure) and len(prog.axes) == 1
    path = [line for line in fig.axes[0].lines if line.get_label() == "search: accepted path"]
    assert len(path) == 1 and len(path[0].get_xdata()) == sum(r["accepted"] for r in result.rows)
    text = "\n".join(ns["conclusions"])
    for word in ("Cheapest part found", "Search against the grid", "Guard band", "held-out"):
        assert word in text, word


CHECKS = {"colocated_vs_disaggregated.ipynb": _check_colocated_vs_disaggregated,
          "cpu_kv_tier.ipynb": _check_cpu_kv_tier, "power_and_pim.ipynb": _check_power_and_pim,
          "hardware_comparison.ipynb": _check_hardware_comparison, "design_search.ipynb": _check_design_search}


# The P/D notebook compiles three cluster designs (~55 s on 2 cores): it runs with `-m slow`; the P/D
# engine paths it drives are covered at small shapes by tests/test_disagg.py. The CPU KV tier notebook
# compiles one cluster loop and runs it 15 times (~50-60 s): `-m slow` too; tests/test_kv_tier.py
# covers the tier's engine paths at small shapes. The power and PIM notebook compiles three sweep
# loops and a single run (~80 s): `-m slow`; tests/test_power.py, test_pim.py and test_sweep.py cover
# its pieces at small shapes. The hardware comparison notebook runs one sweep of 31 points over 12
# hardware options (~80-90 s, most of it the compile): `-m slow`; tests/test_sweep.py covers hardware of
# every source and the mem_bw_gbs knob in one call at small shapes. The design search notebook runs the
# search (its two noise measurements included), an 11 x 11 grid and the held-out checks of four answers
# (~60-110 s on 2 shared cores, two compiles): `-m slow`; tests/test_search.py covers the search's pieces with fake evaluators.
SLOW_NOTEBOOKS = ("colocated_vs_disaggregated.ipynb", "cpu_kv_tier.ipynb", "power_and_pim.ipynb",
                  "hardware_comparison.ipynb", "design_search.ipynb")


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_NOTEBOOKS else p
                                  for p in NOTEBOOKS], ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, notebook_env):
    from jaxsim.engine import cluster
    before = cluster.run_batch._cache_size()
    ns = run_notebook(path)
    ns["_run_batch_compiles"] = cluster.run_batch._cache_size() - before  # sweep loops it compiled
    check = CHECKS.get(path.name)
    if check is not None:
        check(ns)
