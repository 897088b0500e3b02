"""Reference-mode parity: jaxsim against the reference simulator's outputs of its feature examples.

    python scripts/reference_parity.py                 # every example, one table
    python scripts/reference_parity.py single moe_pp   # some of them
    python scripts/reference_parity.py --data ../shared/data/reference-runs --clusters ../shared/data/cluster-examples

The reference simulator (LLMServingSim 2.0) ran its 19 feature examples on the 10-request
``example_trace.jsonl`` (``tests/data/reference_runs/README.md``: the CSVs, their cluster JSONs, and
where they come from). Each in-scope example is run here in reference mode (``scheduler=reference
calibration=none workload=example cluster=reference_json cluster.json=<its JSON>``), its requests
are joined with the reference's CSV by request id, and the table gives, per example, the number of
requests, the largest |jaxsim - reference| of each per-request metric (ns; ``inst`` counts requests
served on another instance, ``itl`` compares the lists gap by gap, ``len`` when their lengths
differ), the largest relative difference, and a verdict:

* ``exact``: every metric equal to the nanosecond;
* ``within N%``: every value within the example's stated relative tolerance;
* ``deliberate``: differences that jaxsim makes on purpose, each named under the table (a
  reference defect of REFERENCE.md §1.16, or vLLM's behaviour where the reference departs from it);
  ``tests/test_reference_parity.py`` states both values of each and why;
* ``KNOWN GAP``: a difference jaxsim does not intend, named under the table (to be fixed);
* ``not modelled``: jaxsim refuses the configuration (the reason is printed);
* ``DIFFERS``: anything else: a bug to find. The script exits 1 when a verdict is not the one
  the example expects.

The reference's command-line flags become jaxsim settings: ``--enable-prefix-sharing
--prefix-storage CPU`` is the KV tier ``kv_tier=cpu kv_tier.enable_prefix_sharing=true
kv_tier.min_gain=chunk`` (the reference's rule: a tier hit counts in whole chunks) with its device,
capacity, bandwidth and latency, from the cluster JSON's ``cpu_mem``; a JSON's ``placement`` and
``cxl_mem`` (weights on CXL devices) are read as they are. ``--enable-attn-offloading`` is
``hardware.enable_attn_offloading=true`` (the device: the JSON's ``cpu_mem.pim_config``), run in
reference mode (``PIM_REFERENCE``: the reference's own DDR4 fit, prompt-length contexts, the PIM
work after the NPU's prefill attention); ``--enable-sub-batch-interleaving`` is
``hardware.enable_sub_batch_interleaving=true``. Examples whose feature jaxsim does not
model yet are listed with the issue they belong to; one of those whose latencies do not depend on
the feature (a power block that is only logged) is also run with the feature's fields removed.
"""

import argparse
import csv
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data" / "reference_runs"
METRICS = ("inst", "end", "e2e", "queue", "ttft", "tpot", "itl")
# metric -> (reference CSV column, jaxsim request_table column)
_COLUMNS = {"end": ("end_time", "end_ns"), "e2e": ("latency", "e2e_ns"), "queue": ("queuing_delay", "queuing_delay_ns"),
            "ttft": ("TTFT", "ttft_ns"), "tpot": ("TPOT", "tpot_ns")}
LLAMA, QWEN_MOE = "llama3_8b", "qwen3_30b_a3b"

# Why jaxsim differs on purpose (tests/test_reference_parity.py states both values of each).
ROUTE_AT_ARRIVAL = ("routing at arrival: jaxsim routes a request when it arrives, so an idle instance starts it at "
                    "once (vLLM's DP load balancer; README 'Clusters and routing'); the reference routes it at its "
                    "simulator's next event, part-way through another instance's iteration")
PD_HANDOFF = ("P/D hand-off (REFERENCE.md §1.7, §1.16): jaxsim streams the KV to the decode instance the router "
              "picked, overlapping compute, and decodes once the last layer has arrived; the reference sends it to "
              "phantom NPUs, which lengthens the prefill iteration, and hands off at once")
DENSE_DP = ("dense DP (REFERENCE.md §1.16 'DP sync'): jaxsim runs dense DP members as independent engines (vLLM "
            "lock-steps DP ranks only for MoE); the reference lock-steps them")
PP_ARRIVALS = ("PP arrivals: an instance with a batch in flight and nothing else to schedule blocks on its oldest "
               "batch, as vLLM's batch queue does (jaxsim/engine/pipeline.py), so an arrival waits for that batch "
               "to complete and joins the next batch with it; the reference starts it in a batch of its own at "
               "its next simulator event")
MOE_DP_SERIAL = ("MoE DP rounds: jaxsim runs the members of a MoE DP group side by side, a round ending with the "
                 "slowest (REFERENCE.md §1.8); the reference runs the busy members' iterations one after the "
                 "other, so each one's gap is their sum (two one-token decodes: 15.83 ms = 7.92 + 7.92 ms)")
COLLECTIVES = ("collective timing: jaxsim prices each ring step as latency + bytes/bandwidth (REFERENCE.md §1.8); "
               "the reference's ASTRA-sim back end differs by tens of ns per collective (~5% of the bandwidth "
               "term; exact for one token on a dense TP-2 AllReduce)")
EP_LINKS = ("per-dimension links: jaxsim prices EP collectives on the TP link (link_bw[0] = 128 GB/s, 500 ns) even "
            "where the EP group spans the two nodes; the reference runs them hierarchically, the DP dimension on "
            "link_bw[1] = 16 GB/s, 20 us (~38 us more per MoE layer)")

WEIGHT_LOADS = ("weight-load granularity (REFERENCE.md §1.10): jaxsim loads an off-GPU transformer block's weights "
                "as one load and starts the head once the final norm's and the lm_head's are in place "
                "(jaxsim/placement.py); the reference's times equal, to the ns, loads of each weight-bearing "
                "operator on its own (per block two norms, qkv, o, gate_up, down: six device latencies, each load "
                "floored), each operator gated on its own load, so the final norm is off the lm_head's critical "
                "path. With 13 blocks and the lm_head on cxl:3 (the critical device) every reference iteration is "
                "16,198 ns - final_layernorm(T) longer (13.5-13.8 us of 112.8 ms)")

# The reference's --enable-attn-offloading (run.sh.txt) in reference mode: its own DDR4 fit (REFERENCE.md
# §1.11, data here, not in the package: jaxsim derives the coefficients from the INI), decodes priced
# at their prompt length (§1.16), and the PIM work after the NPU's prefill attention (its outputs).
PIM_REFERENCE = ("hardware.enable_attn_offloading=true", "hardware.pim_slope_ns=333.2538",
                 "hardware.pim_intercept_ns=30675.2739", "hardware.pim_context=prompt", "hardware.pim_overlap=false")
PIM_HOST_OPS = ("host operations with PIM (REFERENCE.md §1.11: the PIM memory's aggregate bandwidth and latency "
                "replace cpu_mem's): jaxsim prices the token-id load and the sampled-id store there, floor(13.86 + "
                "40 B / 1638.4 GB/s) = 13 ns each; the reference's times show both in an iteration with PIM work "
                "and only one (13 ns) in an iteration without PIM work or an interleaved one, so those are 13 ns "
                "longer in jaxsim (a known difference, not deliberate)")
PIM_NOTE = ("PIM on DDR4_8GB_3200 (64 channels of 8 GB in 512 GB; 8 per request) in reference mode: the reference's "
            "own fit (333.2538 ns/token, 30,675.2739 ns), prompt-length contexts, PIM after the NPU's prefill "
            "attention; every per-layer PIM time, channel placement and interleaved schedule equal to the ns (the "
            "node's power block is read too: it sets no power cap, so no latency depends on it)")

# The reference's --enable-prefix-sharing --prefix-storage CPU (run.sh.txt): one CPU pool per node,
# shared by its instances, the node's cpu_mem as its device, hits in whole chunks (REFERENCE.md §1.5).
CPU_POOL = ("kv_tier=cpu", "kv_tier.enable_prefix_sharing=true", "kv_tier.min_gain=chunk", "kv_tier.capacity_gb=null",
            "kv_tier.bandwidth_gbps=null", "kv_tier.latency_ns=null")
POOL_NOTE = ("the CPU tier as the reference ran it ({}: 512 GiB at 256 GB/s, 0 ns, 256-token chunks). No request "
             "of this trace reaches 256 tokens (the longest: 22 + 104), so no chunk is written and the pool serves "
             "no hit: the tier changes no latency here, and its deliberate differences (REFERENCE.md §1.16: the "
             "recall source, NPU + tier hits capped at reached - 1, private pools' split capacity) cannot show")


@dataclasses.dataclass(frozen=True)
class Example:
    name: str
    csv: str  # reference output, in the data folder
    cluster: str  # cluster JSON, in the clusters folder
    model: str = LLAMA  # conf/model option
    overrides: tuple = ()  # extra Hydra overrides
    drop: tuple = ()  # JSON keys removed before the run: ("node", key) or ("instance", key)
    # what is expected: "exact"; "tolerance" (relative, per value); "deliberate" (differences REFERENCE.md
    # §1.16 or jaxsim's documented vLLM semantics explain, ``why``); "gap" (a known difference jaxsim does not
    # intend, ``why``); "refused" (jaxsim does not model the configuration yet)
    expect: str = "exact"
    tolerance: float = 0.0
    why: tuple = ()
    note: str = ""


EXAMPLES = [
    Example("single", "example_single_run.csv", "single_node_single_instance.json"),
    Example("multi", "example_multi_run.csv", "single_node_multi_instance.json", expect="deliberate",
            why=(ROUTE_AT_ARRIVAL,)),
    Example("pd", "example_pd_run.csv", "single_node_pd_instance.json", expect="deliberate",
            why=(PD_HANDOFF, ROUTE_AT_ARRIVAL)),
    Example("pp", "example_pp_run.csv", "single_node_pp_instance.json", expect="deliberate",
            why=(PP_ARRIVALS, COLLECTIVES)),
    Example("tp_pp", "example_tp_pp_run.csv", "single_node_tp_pp_instance.json", expect="deliberate",
            why=(PP_ARRIVALS, COLLECTIVES)),
    Example("moe", "example_moe_run.csv", "single_node_moe_single_instance.json", QWEN_MOE, expect="tolerance",
            tolerance=0.01, why=(COLLECTIVES,)),
    Example("moe_pp", "example_moe_pp_run.csv", "single_node_moe_pp_instance.json", QWEN_MOE, expect="deliberate",
            why=(PP_ARRIVALS, COLLECTIVES)),
    Example("dp", "example_dp_run.csv", "single_node_dp_instance.json", expect="deliberate",
            why=(DENSE_DP, ROUTE_AT_ARRIVAL, COLLECTIVES)),
    Example("dp[dp_sync=always]", "example_dp_run.csv", "single_node_dp_instance.json",
            overrides=("cluster.dp_sync=always",), expect="deliberate", why=(ROUTE_AT_ARRIVAL, COLLECTIVES),
            note="the reference's lock-step of dense DP members, on request"),
    Example("moe_dp_tp", "example_moe_dp_tp_run.csv", "single_node_moe_dp_tp_instance.json", QWEN_MOE,
            expect="deliberate", why=(MOE_DP_SERIAL, ROUTE_AT_ARRIVAL, COLLECTIVES)),
    Example("moe_dp_pp", "example_moe_dp_pp_run.csv", "single_node_moe_dp_pp_instance.json", QWEN_MOE,
            expect="refused"),
    Example("moe_dp_tp_pp", "example_moe_dp_tp_pp_run.csv", "single_node_moe_dp_tp_pp_instance.json", QWEN_MOE,
            expect="refused"),
    Example("dual_moe_dp_ep", "example_dual_moe_dp_ep_run.csv", "dual_node_moe_dp_ep_intra_inter_instance.json",
            QWEN_MOE, expect="gap", why=(EP_LINKS, MOE_DP_SERIAL, ROUTE_AT_ARRIVAL)),
    # the memory hierarchy (issue 13): a CPU KV tier, weights on CXL devices
    Example("prefix_cpu_mem_pool", "example_prefix_cpu_mem_pool_run.csv", "single_node_multi_instance.json",
            overrides=CPU_POOL, expect="deliberate", why=(ROUTE_AT_ARRIVAL,),
            note=POOL_NOTE.format("one pool, shared by the node's 2 instances") + "; the reference's CSV is "
                 "byte-identical to example_multi_run.csv"),
    Example("dual_prefix_cpu_mem_pool", "example_dual_prefix_cpu_mem_pool_run.csv", "dual_node_multi_instance.json",
            overrides=CPU_POOL, expect="deliberate", why=(ROUTE_AT_ARRIVAL,),
            note=POOL_NOTE.format("a pool per node, each shared by the node's 2 instances")),
    Example("cxl", "example_cxl_run.csv", "single_node_cxl_instance.json", expect="tolerance", tolerance=0.001,
            why=(WEIGHT_LOADS,),
            note="every weight on CXL devices 0-3 (60 GB/s, 250 ns each). jaxsim leaves these 16.06 GB out of the "
                 "GPU's weight ledger (REFERENCE.md §1.16 'Off-NPU weights'): 44,236 KV blocks where the reference "
                 "keeps the single run's 36,578; the run holds at most a few dozen, so no latency shows it"),
    # PIM attention offload and sub-batch interleaving (issue 14), in reference mode
    Example("pim", "example_pim_run.csv", "single_node_pim_instance.json", overrides=PIM_REFERENCE,
            expect="tolerance", tolerance=1e-5, why=(PIM_HOST_OPS,), note=PIM_NOTE),
    Example("pim_sub_batch", "example_pim_sub_batch_run.csv", "single_node_pim_instance.json",
            overrides=(*PIM_REFERENCE, "hardware.enable_sub_batch_interleaving=true"),
            expect="tolerance", tolerance=2e-5, why=(PIM_HOST_OPS,),
            note="the same, the batch split in two sub-batches whose NPU layers and PIM attention interleave"),
    # power metered (no cap): the latencies are the single run's
    Example("power", "example_power_run.csv", "single_node_power_instance.json",
            note="the node's power block is metered (summary energy, timeseries watts); without a power cap it "
                 "changes no latency, and the reference only logs its energy"),
]

# examples that are not run: (name, reference CSV, why)
NOT_MODELLED = [
    ("moe_dp_ep", "example_moe_dp_ep_run.csv",
     "its input, a SWE-bench agentic trace (swe-bench-qwen3-30b-a3b-50-sps0.2.jsonl), is not in the snapshot: "
     "nothing to run it on"),
]


def read_reference(path) -> dict:
    """``{request id: row}`` of a reference CSV, times as int, ITL as a list of int."""
    rows = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {k: (int(v) if k not in ("model", "ITL") else v) for k, v in r.items()}
            row["ITL"] = json.loads(r["ITL"])
            rows[row["request id"]] = row
    return rows


def _cluster_json(src: Path, drop: tuple, tmp: Path) -> Path:
    if not drop:
        return src
    d = json.loads(src.read_text())
    for node in d["nodes"]:
        for level, key in drop:
            for obj in ([node] if level == "node" else node["instances"]):
                obj.pop(key, None)
    out = Path(tmp) / src.name
    out.write_text(json.dumps(d))
    return out


def run_spec(ex: Example, clusters: Path = DATA / "clusters", tmp=None):
    """The validated run (``jaxsim.config.RunSpec``) of one example, in reference mode."""
    from hydra import compose, initialize_config_dir

    from jaxsim import config as jconfig

    with tempfile.TemporaryDirectory() as own:
        path = _cluster_json(Path(clusters) / ex.cluster, ex.drop, Path(tmp or own))
        overrides = ["scheduler=reference", "calibration=none", "workload=example", "cluster=reference_json",
                     f"cluster.json={path}", f"model={ex.model}", "sim.progress=false", "output_dir=/tmp/unused",
                     *ex.overrides]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return jconfig.from_hydra(compose(config_name="config", overrides=overrides))


def simulate(ex: Example, clusters: Path = DATA / "clusters", tmp=None):
    """jaxsim's ``SimResult`` of one example, in reference mode (every token time recorded)."""
    from jaxsim import simulator

    spec = run_spec(ex, clusters, tmp)
    c = spec.cluster
    return simulator.simulate_cluster(spec.workload, spec.model_config, list(c.instances), c.router, spec.model,
                                      c.links, c.dp_sync, profiles_dir=spec.paths.profiles,
                                      max_slots=spec.sim.max_slots, record_token_times=True, kv_tier=spec.kv_tier,
                                      power=spec.power)


def run_example(ex: Example, clusters: Path = DATA / "clusters", tmp=None) -> dict:
    """jaxsim's per-request table (``jaxsim.metrics.request_table``) of one example."""
    from jaxsim import metrics

    return metrics.request_table(simulate(ex, clusters, tmp))


def compare(table: dict, ref: dict) -> dict:
    """Per metric, the largest |jaxsim - reference| over the requests both have (``inst``: the
    number of requests served on another instance; ``itl``: gap by gap), ``rel``: the largest
    |jaxsim - reference| / reference of a latency (E2E, TTFT, TPOT, each ITL gap; not of the
    queueing delay, often 0, nor of the end time, a clock reading), ``itl_len``: requests whose
    ITL lists differ in length, ``missing``: requests in only one of the two."""
    ids = [int(i) for i in table["request_id"]]
    row_of = {rid: k for k, rid in enumerate(ids)}
    out = {m: 0 for m in METRICS}
    out.update(rel=0.0, itl_len=0, missing=sorted(set(ids) ^ set(ref)), requests=len(set(ids) & set(ref)))

    def diff(mine, theirs, relative=True):
        if relative:
            out["rel"] = max(out["rel"], abs(mine - theirs) / max(abs(theirs), 1))
        return abs(mine - theirs)

    for rid, r in ref.items():
        if rid not in row_of:
            continue
        k = row_of[rid]
        out["inst"] += int(table["instance_id"][k]) != r["instance id"]
        if int(table["arrival_ns"][k]) != r["arrival"]:
            raise ValueError(f"request {rid}: arrival {int(table['arrival_ns'][k])} != the reference's "
                             f"{r['arrival']} (not the same trace)")
        for m, (rc, jc) in _COLUMNS.items():
            out[m] = max(out[m], diff(int(table[jc][k]), r[rc], relative=m in ("e2e", "ttft", "tpot")))
        mine, theirs = [int(x) for x in table["itl_ns"][k]], r["ITL"]
        out["itl_len"] += len(mine) != len(theirs)
        for a, b in zip(mine, theirs):
            out["itl"] = max(out["itl"], diff(a, b))
    return out


def verdict(ex: Example, d: dict | None) -> tuple:
    """``(verdict, as expected)`` of an example's comparison (None: jaxsim refused the configuration)."""
    if d is None:
        return "not modelled (jaxsim refuses it)", ex.expect == "refused"
    if not (d["missing"] or d["itl_len"] or d["inst"] or any(d[m] for m in METRICS)):
        return "exact", ex.expect in ("exact", "tolerance")
    if not (d["missing"] or d["itl_len"] or d["inst"]) and d["rel"] <= ex.tolerance:
        t = ex.tolerance
        return f"within {t:.1%}" if t >= 1e-3 else f"within {t * 100:.3g}%", ex.expect == "tolerance"
    if ex.expect == "deliberate":
        return "deliberate", True
    if ex.expect == "gap":
        return "KNOWN GAP", True
    return "DIFFERS", False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="examples to run (default: all)")
    ap.add_argument("--data", type=Path, default=DATA, help="folder of the reference CSVs")
    ap.add_argument("--clusters", type=Path, default=DATA / "clusters", help="folder of the cluster JSONs")
    args = ap.parse_args(argv)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from jaxsim.errors import JaxsimInputError

    unknown = set(args.names) - {ex.name for ex in EXAMPLES}
    if unknown:
        ap.error(f"unknown example(s) {sorted(unknown)}; known: {[ex.name for ex in EXAMPLES]}")
    chosen = [ex for ex in EXAMPLES if not args.names or ex.name in args.names]
    head = ["example", "reqs", *[f"|d| {m}" for m in METRICS], "max rel", "verdict"]
    lines, unexpected, refusals = [], [], {}
    for ex in chosen:
        try:
            d = compare(run_example(ex, args.clusters), read_reference(args.data / ex.csv))
        except JaxsimInputError as e:
            d, refusals[ex.name] = None, str(e)
        v, ok = verdict(ex, d)
        if not ok:
            unexpected.append(f"{ex.name}: {v}, expected {ex.expect}")
        if d is None:
            cells = [ex.name, "-", *["-"] * len(METRICS), "-", v]
        else:
            cells = [ex.name, str(d["requests"]), *[f"{d[m]:,}" for m in METRICS], f"{d['rel']:.2%}", v]
            if d["itl_len"]:
                cells[-3] += f" (len {d['itl_len']})"
            if d["missing"]:
                cells[-1] += f", missing {d['missing']}"
        lines.append(cells)
        print("  ".join(cells), file=sys.stderr, flush=True)  # progress: each example takes 10-20 s
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    print(fmt(head))
    print("  ".join("-" * w for w in widths))
    for cells in lines:
        print(fmt(cells))
    print("\n|d|: largest |jaxsim - reference| in ns (inst: requests served on another instance); "
          "max rel: largest |jaxsim - reference| / reference of an E2E, TTFT, TPOT or ITL gap")
    reasons = {}
    for ex in chosen:
        for why in ex.why:
            reasons.setdefault(why, []).append(ex.name)
    if reasons:
        print("\nwhy they differ:")
        for why, names in reasons.items():
            print(f"  * {why}\n    ({', '.join(names)})")
    notes = [(ex.name, ex.note) for ex in chosen if ex.note] + list(refusals.items())
    if notes:
        print("\nnotes:")
        for name, text in notes:
            print(f"  {name}: {text}")
    print("\nnot run (not yet modelled, or no input):")
    for name, path, why in NOT_MODELLED:
        print(f"  {name} ({path}): {why}")
    if unexpected:
        print("\nUNEXPECTED:\n  " + "\n  ".join(unexpected))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
