"""Host-side metrics from a :class:`~jaxsim.spec.SimResult` (REFERENCE.md §5). numpy only.

* :func:`request_table` — one row per finished request (columns :data:`REQUEST_COLUMNS`).
* :func:`summarize` — the run summary dict.
* :func:`time_series` — 1-s bins with the columns of vLLM's ``timeseries.csv``.
* :func:`write_outputs` — ``requests.parquet`` (or ``.csv``), ``summary.json``, ``timeseries.csv``,
  ``config.yaml``; what else is written is an :class:`OutputOptions`.
"""

import csv
import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
from tabulate import tabulate

from jaxsim import power
from jaxsim.spec import SimResult, check_fields, checked

REQUEST_COLUMNS = (
    "request_id", "instance_id", "input", "output", "arrival_ns", "first_scheduled_ns",
    "first_token_ns", "end_ns", "queuing_delay_ns", "ttft_ns", "tpot_ns", "e2e_ns",
    "itl_mean_ns", "itl_median_ns", "itl_p99_ns", "itl_max_ns", "prefix_hit_tokens",
    "num_preemptions", "recomputed_tokens", "itl_ns",
)
# P/D runs add, per request: the prefill instance, the KV bytes handed over, and the wait between
# the end of the prefill and the arrival of the last KV layer at the decode instance.
PD_COLUMNS = ("prefill_instance_id", "kv_transfer_bytes", "kv_wait_ns")
# With a power model: each request's share of the dynamic NPU energy of the iterations that
# scheduled it, by its tokens in each (J; jaxsim.engine.power.request_npu_joules).
ENERGY_COLUMNS = ("npu_energy_j",)
TIMESERIES_COLUMNS = ("t", "prompt_throughput", "gen_throughput", "running", "waiting",
                      "kv_cache_pct")
# the reference simulator's per-request CSV header (REFERENCE.md §5)
REFERENCE_COLUMNS = ("instance id", "request id", "model", "input", "output", "arrival",
                     "end_time", "latency", "queuing_delay", "TTFT", "TPOT", "ITL")
STAT_NAMES = ("mean", "median", "p90", "p95", "p99")
NS_PER_S = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What :func:`write_outputs` writes besides ``summary.json``, ``timeseries.csv`` and ``config.yaml``.

    requests_format: the per-request table as ``parquet`` (needs pyarrow), ``csv``, or ``auto``
      (Parquet when pyarrow is installed: a 200,000-request run wrote 1.3 GB of CSV, most of it
      digits that Parquet stores as int64 columns).
    itl_lists: add the ``itl_ns`` column (each request's list of inter-token gaps, ns), the
      largest part of the table; the ITL statistics columns are always written.
    reference_csv: also write ``requests_reference.csv`` in the reference simulator's format
      (REFERENCE.md §5), for tools that read its output.
    """

    KEY: ClassVar[str] = "output"

    requests_format: str = checked("auto", choices=("auto", "parquet", "csv"), noun="format",
                                   fix="auto, parquet or csv")
    itl_lists: bool = False
    reference_csv: bool = False

    def __post_init__(self):
        check_fields(self)
        if self.requests_format == "parquet" and not _have_pyarrow():
            from jaxsim.errors import JaxsimInputError

            raise JaxsimInputError("output.requests_format", "parquet needs the pyarrow package, which is not installed",
                                   "run `pip install pyarrow`, or use auto or csv")

    def requests_file(self) -> str:
        """``requests.parquet`` or ``requests.csv``."""
        parquet = self.requests_format == "parquet" or (self.requests_format == "auto" and _have_pyarrow())
        return "requests.parquet" if parquet else "requests.csv"


def _have_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def _i64(x) -> np.ndarray:
    return np.asarray(x).astype(np.int64)


def distribution_stats(values) -> dict:
    """mean / median / p90 / p95 / p99 of ``values`` (numpy linear percentiles); NaN when empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {k: math.nan for k in STAT_NAMES}
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p90": float(np.percentile(v, 90)),
        "p95": float(np.percentile(v, 95)),
        "p99": float(np.percentile(v, 99)),
    }


def _finished(result: SimResult) -> np.ndarray:
    """Mask of the requests that finished (the engine marks the others with a negative time)."""
    return (_i64(result.finish_ns) >= 0) & (_i64(result.first_token_ns) >= 0)


def _token_times(result: SimResult, i: int) -> np.ndarray:
    offsets = _i64(result.token_offsets)
    if offsets.shape[0] <= i + 1:
        return np.zeros(0, dtype=np.int64)
    return _i64(result.token_times_ns[offsets[i]:offsets[i + 1]])


def request_table(result: SimResult) -> dict:
    """Per-request table, one row per finished request, ordered by (instance, request id).

    Times in ns. ``ttft = first_token - arrival``, ``e2e = end - arrival``,
    ``tpot = (e2e - ttft) // (output - 1)`` (0 when output is 1), ``queuing_delay =
    first_scheduled - arrival``; ``itl_ns`` holds, per row, the int64 array of gaps between the
    request's token emissions (empty when token times were not recorded; the ``itl_*`` statistics
    are then NaN, as they are for single-token requests).

    Returns:
      ``{column: np.ndarray}`` for every name in :data:`REQUEST_COLUMNS` except ``itl_ns``, which is
      a list of arrays; and :data:`PD_COLUMNS` for a P/D run (-1 / 0 for requests not handed off).
    """
    done = np.nonzero(_finished(result))[0]
    inst = _i64(result.instance)[done]
    order = np.lexsort((done, inst))
    ids = done[order]

    arrival = _i64(result.arrival_ns)[ids]
    first_sched = _i64(result.first_scheduled_ns)[ids]
    first_tok = _i64(result.first_token_ns)[ids]
    end = _i64(result.finish_ns)[ids]
    output = _i64(result.output_toks)[ids]
    ttft = first_tok - arrival
    e2e = end - arrival
    tpot = np.where(output > 1, (e2e - ttft) // np.maximum(output - 1, 1), 0)

    itls = []
    itl_stats = np.full((ids.shape[0], 4), np.nan)
    for row, i in enumerate(ids):
        gaps = np.diff(_token_times(result, int(i)))
        itls.append(gaps)
        if gaps.size:
            itl_stats[row] = (gaps.mean(), np.median(gaps), np.percentile(gaps, 99), gaps.max())

    pd = {}
    if result.prefill_instance is not None:
        handed = _i64(result.prefill_instance)[ids] >= 0
        pd = {"prefill_instance_id": _i64(result.prefill_instance)[ids],
              "kv_transfer_bytes": _i64(result.kv_transfer_bytes)[ids],
              "kv_wait_ns": np.where(handed, _i64(result.kv_ready_ns)[ids] - _i64(result.prefill_end_ns)[ids], 0)}
    return {
        **pd,
        "request_id": ids.astype(np.int64),
        "instance_id": _i64(result.instance)[ids],
        "input": _i64(result.input_toks)[ids],
        "output": output,
        "arrival_ns": arrival,
        "first_scheduled_ns": first_sched,
        "first_token_ns": first_tok,
        "end_ns": end,
        "queuing_delay_ns": first_sched - arrival,
        "ttft_ns": ttft,
        "tpot_ns": tpot,
        "e2e_ns": e2e,
        "itl_mean_ns": itl_stats[:, 0],
        "itl_median_ns": itl_stats[:, 1],
        "itl_p99_ns": itl_stats[:, 2],
        "itl_max_ns": itl_stats[:, 3],
        "prefix_hit_tokens": _i64(result.prefix_hit_tokens)[ids],
        "num_preemptions": _i64(result.num_preemptions)[ids],
        "recomputed_tokens": _i64(result.recomputed_tokens)[ids],
        **({} if result.request_npu_energy_j is None else
           {"npu_energy_j": np.asarray(result.request_npu_energy_j, np.float64)[ids]}),
        "itl_ns": itls,
    }


def _jsonable(v):
    """numpy scalars/arrays -> plain Python; NaN/inf -> None (strict JSON)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return v if math.isfinite(v) else None
    return v


def summarize(result: SimResult, table: dict | None = None) -> dict:
    """Run summary (REFERENCE.md §5) as a flat dict of plain Python values.

    Keys: ``requests``, ``unfinished_requests``, ``makespan_ns``, ``makespan_s``,
    ``total_input_tokens``, ``total_generated_tokens``, ``preemptions``, ``recomputed_tokens``,
    ``request_throughput_rps``, ``prompt_throughput_tps``, ``generation_throughput_tps``,
    ``total_throughput_tps``, ``{ttft,tpot,itl,e2e}_ms_{mean,median,p90,p95,p99}``,
    ``prefix_cache_requested_tokens``, ``prefix_cache_hit_tokens``, ``prefix_cache_hit_ratio``,
    ``kv_num_blocks``, ``kv_block_size``, ``kv_num_tokens``, ``kv_peak_usage_pct``, ``iterations``;
    then every entry of ``result.stats`` (a stats key that collides with one above is stored as
    ``stats_<key>``).

    The makespan is the last completion minus the first arrival (of all requests); throughputs
    divide the finished requests' tokens by it. ITL statistics are over all gaps of all requests.
    """
    if table is None:
        table = request_table(result)
    n = int(table["request_id"].shape[0])
    arrival_all = _i64(result.arrival_ns)
    if n:
        makespan_ns = int(table["end_ns"].max() - arrival_all.min())
    else:
        makespan_ns = 0
    makespan_s = makespan_ns / NS_PER_S
    tot_in = int(table["input"].sum())
    tot_out = int(table["output"].sum())

    def rate(x):
        return x / makespan_s if makespan_s > 0 else math.nan

    s = {
        "requests": n,
        "unfinished_requests": int(arrival_all.shape[0] - n),
        "makespan_ns": makespan_ns,
        "makespan_s": makespan_s,
        "total_input_tokens": tot_in,
        "total_generated_tokens": tot_out,
        "preemptions": int(table["num_preemptions"].sum()),
        "recomputed_tokens": int(table["recomputed_tokens"].sum()),
        "request_throughput_rps": rate(n),
        "prompt_throughput_tps": rate(tot_in),
        "generation_throughput_tps": rate(tot_out),
        "total_throughput_tps": rate(tot_in + tot_out),
    }
    all_gaps = (np.concatenate(table["itl_ns"]) if table["itl_ns"] else np.zeros(0))
    for name, values in (("ttft", table["ttft_ns"]), ("tpot", table["tpot_ns"]),
                         ("itl", all_gaps), ("e2e", table["e2e_ns"])):
        for k, v in distribution_stats(np.asarray(values, dtype=np.float64) / 1e6).items():
            s[f"{name}_ms_{k}"] = v
    hit = int(table["prefix_hit_tokens"].sum())
    s["prefix_cache_requested_tokens"] = tot_in
    s["prefix_cache_hit_tokens"] = hit
    s["prefix_cache_hit_ratio"] = hit / tot_in if tot_in else 0.0
    num_blocks = int(result.num_blocks)
    used = _i64(cluster_gauge(result, result.iter_kv_blocks_used))
    s["kv_num_blocks"] = num_blocks
    s["kv_block_size"] = int(result.block_size)
    s["kv_num_tokens"] = num_blocks * int(result.block_size)
    stats = getattr(result, "stats", None) or {}
    unrecorded = stats.get("iteration_rows") == "not recorded"  # simulate(record_iterations=False)
    # (a run without iteration rows has no KV gauge: NaN, not a peak of 0)
    s["kv_peak_usage_pct"] = (float(used.max()) / num_blocks * 100 if used.size and num_blocks
                              else math.nan if unrecorded else 0.0)
    s["iterations"] = int(stats["iterations"]) if unrecorded else int(np.asarray(result.iter_end_ns).shape[0])
    if getattr(result, "memory", None) and np.asarray(result.iter_end_ns).size:
        # peaks and means over the run's 1-s ticks (the last value for cumulative hit rates)
        ts = time_series(result, timeseries_interval(result))
        s["memory"] = {c: ({"final": float(ts[c][-1])} if c.endswith("_pct") else
                           {"peak": float(ts[c].max()), "mean": float(ts[c].mean())} if not c.endswith(
                               ("write_gib", "recall_gib")) else {"total": float(ts[c].sum())})
                       for c in MEMORY_COLUMNS if c in ts}
    if getattr(result, "power", None) and n:
        s["energy"] = energy_summary(result, table, int(arrival_all.min()), int(table["end_ns"].max()))
    for k, v in (result.stats or {}).items():
        s[f"stats_{k}" if k in s else str(k)] = v
    return _jsonable(s)


def energy_summary(result: SimResult, table: dict, t0_ns: int, t_end_ns: int) -> dict:
    """The run's energy over ``[t0_ns, t_end_ns]`` (the makespan: first arrival to last
    completion): joules by component (:data:`jaxsim.power.COMPONENTS`) and in total, average and
    peak power (the peak over the run's 1-s ticks, the last one cut at the last completion),
    joules per output token and per finished request, output tokens per joule, each node's
    joules, and the nodes without a power block (``unmodelled_nodes``: left out of the joules and
    watts, which are then the modelled nodes'; the per-token and per-request ratios are NaN, their
    tokens being the whole cluster's); per request, the mean of each request's
    share of the dynamic NPU energy (``request_npu_energy_j_mean``; ``npu_energy_j`` in the
    per-request table)."""
    e = power.energy(result.power, t0_ns, t_end_ns)
    tokens = int(table["output"].sum())
    nbins = max(int(-(-(t_end_ns - t0_ns) // NS_PER_S)), 1)
    peak = power.power_series(result, 1.0, t0_ns, nbins, t_end_ns).get("power_w")
    total = e["total_j"]
    # with an unmodelled node the tokens cannot be set against the joules: those ratios are NaN
    per = math.nan if e["unmodelled_nodes"] else total
    return dict(joules={c: e["joules"][c] for c in power.COMPONENTS}, total_j=total, average_w=e["average_w"],
                peak_w=float(np.max(peak)) if peak is not None else math.nan,
                j_per_output_token=per / tokens if tokens else math.nan,
                j_per_request=per / len(table["output"]) if len(table["output"]) else math.nan,
                output_tokens_per_j=tokens / per if per > 0 else math.nan,
                request_npu_energy_j_mean=float(np.mean(table["npu_energy_j"])) if "npu_energy_j" in table else None,
                nodes=[{"node": d["node"], "modelled": d["modelled"], "total_j": sum(d["joules"].values()),
                        "joules": d["joules"], **({"unmodelled_components": d["unmodelled"]} if d["modelled"] else {})}
                       for d in e["nodes"]],
                unmodelled_nodes=e["unmodelled_nodes"], duration_s=e["duration_s"])


def cluster_gauge(result: SimResult, values, group_of=None) -> np.ndarray:
    """A per-iteration gauge as the cluster total: at each row (rows are in end-time order), the
    sum over instances of each one's latest value (0 before its first iteration). For a single
    instance, the values themselves. ``group_of`` [instance]: instances that show one shared gauge
    (a KV-tier pool, ``memory["tier_pool_of"]``), counted once: the latest value any of them showed."""
    values = np.asarray(values)
    inst = result.iter_instance
    if inst is None:
        return values
    group = np.asarray(inst) if group_of is None else np.asarray(group_of)[np.asarray(inst)]
    total = np.zeros(values.shape, np.int64)
    rows = np.arange(values.shape[0])
    for i in np.unique(group):
        mine = np.where(group == i, rows, -1)
        latest = np.maximum.accumulate(mine)  # this instance's last row at or before each row
        total += np.where(latest >= 0, values[np.maximum(latest, 0)], 0).astype(np.int64)
    return total


# A longer run is binned coarser by write_outputs (summary: timeseries_interval_s): 10^6 1-s bins
# are 11.6 days of simulated time; an arrival far in the future (a trace's outlier) would
# otherwise ask for one row per second up to it (2^62 ns: 146 years, ~34 GiB of bins).
MAX_TIMESERIES_BINS = 1_000_000


def timeseries_interval(result: SimResult, interval_s: float = 1.0) -> float:
    """``interval_s``, or the smallest whole multiple of it that keeps the run's time series within
    :data:`MAX_TIMESERIES_BINS` bins."""
    end, arrival = _i64(result.iter_end_ns), _i64(result.arrival_ns)
    if end.size == 0 or arrival.size == 0:
        return interval_s
    span_ns = max(int(end.max()) - int(arrival.min()), 0)
    bins = span_ns // int(round(interval_s * NS_PER_S)) + 1  # as time_series counts them
    return interval_s * max(1, -(-bins // MAX_TIMESERIES_BINS))


def time_series(result: SimResult, interval_s: float = 1.0, *, instance: int | None = None,
                origin_ns: int | None = None, num_blocks: int | None = None, until_ns: int | None = None) -> dict:
    """Per-interval series with the columns of vLLM's ``timeseries.csv``.

    Bin k (``t = k``, 1-based) covers ``[t0 + (k-1)·Δ, t0 + k·Δ)`` with ``t0`` = ``origin_ns``, or
    the first arrival when None (a validation case's rows are on trace time, ``origin_ns=0``).
    An iteration belongs to the bin in which it ends. Throughputs are that bin's prompt / generated
    tokens per second, with prompt tokens counted as vLLM logs them: a request's whole prompt in the
    bin of its first token, once (``prompt_computed_throughput``: the prompt tokens of the
    iterations ending in the bin, ``iter_prompt_tokens``: the prefill tokens they computed, chunks
    and recomputation after preemptions included, plus each prompt's prefix-cache hits in the
    iteration of its first token); ``running``, ``waiting`` and ``kv_cache_pct`` (pinned blocks /
    num_blocks × 100) are the gauges of the last iteration ending in the bin, carried forward through empty bins
    (0 before the first iteration). Bins run up to the one holding the last iteration (or the last
    first token, when its output delay carries it past that).

    When the result carries them (``getattr``; engines that do not record them leave them out):
    ``prefix_hit_pct`` = cumulative prefix-cache hit tokens / queried tokens × 100 at the bin's
    last iteration (``iter_prefix_hits`` / ``iter_prefix_queried``; for a cluster, from the summed
    counters; 0 before anything was queried), and ``kv_cache_cached_pct`` = (pinned + cached-but-free
    blocks, ``iter_kv_blocks_cached``) / num_blocks × 100, what vLLM 0.13's gauge with prefix
    caching showed.

    Args:
      instance: only this instance's iteration rows (a cluster run's ``iter_instance``): its own
        series, binned on the same clock; None = the cluster (gauges summed over instances).
        ``num_blocks`` is then that instance's KV capacity (the result holds the cluster's total):
        pass it, or it is taken as an even share of ``result.num_blocks``.
      num_blocks: the KV capacity the percentages divide by (default ``result.num_blocks``).
      until_ns: bins run at least up to the one holding this time (gauges carried forward, no
        tokens), e.g. the end of a measurement.

    With a power model (``result.power``), the cluster's series (``instance`` None) also has the
    watts of :func:`jaxsim.power.power_series`: ``power_w`` and ``<component>_power_w``, and per
    node ``node<n>_...`` when there are several.

    Returns:
      ``{column: np.ndarray}`` for :data:`TIMESERIES_COLUMNS` (``t`` float, counts int64), plus the
      optional columns above.
    """
    if not (math.isfinite(interval_s) and interval_s * NS_PER_S >= 1):
        raise ValueError(f"time_series: interval_s must be a positive number of seconds (>= 1 ns), got {interval_s!r}")
    interval_ns = int(round(interval_s * NS_PER_S))
    end = _i64(result.iter_end_ns)
    arrival = _i64(result.arrival_ns)
    empty = {c: np.zeros(0, dtype=np.float64) for c in TIMESERIES_COLUMNS}
    if end.size == 0 or arrival.size == 0:
        return empty
    rows = np.arange(end.shape[0])
    nb = int(result.num_blocks) if num_blocks is None else int(num_blocks)
    inst = result.iter_instance
    if instance is not None:
        if inst is None:
            if instance != 0:
                raise ValueError(f"time_series: instance {instance} of a single-instance result")
        else:
            n_inst = int(np.max(inst)) + 1 if inst.size else 1
            if not 0 <= instance < n_inst:
                raise ValueError(f"time_series: instance {instance} not in 0..{n_inst - 1}")
            rows = np.nonzero(np.asarray(inst) == instance)[0]
            if num_blocks is None:
                nb = int(result.num_blocks) // n_inst
    if rows.size == 0:
        return empty
    single = instance is not None or inst is None
    end = end[rows]
    t0 = int(arrival.min()) if origin_ns is None else int(origin_ns)
    k = np.maximum((end - t0) // interval_ns, 0)  # 0-based bin of each iteration
    # vLLM's logged prompt throughput counts a request's prompt once, when its first token comes
    # out (v1 IterationStats.update_from_output adds prompt_len while the request is prefilling):
    # chunks are not spread over ticks, recomputation after a preemption is not counted (the real
    # runs' prompt series total exactly their trace's input tokens). The first token's instance
    # is the prefill instance under P/D.
    first = _i64(result.first_token_ns)
    served = (first > 0) & (first >= arrival)
    if instance is not None and inst is not None:
        pre = getattr(result, "prefill_instance", None)
        emitter = np.asarray(result.instance) if pre is None else np.where(np.asarray(pre) >= 0, pre, result.instance)
        served &= emitter == instance
    kf = np.maximum((first[served] - t0) // interval_ns, 0)
    # A first token reaches the client first_token_delay_ns after its iteration: it may fall in a
    # later bin than the last iteration's.
    nbins = int(max(k.max(), kf.max() if kf.size else 0)) + 1
    if until_ns is not None:
        nbins = max(nbins, int(max(until_ns - 1 - t0, 0) // interval_ns) + 1)
    prompt = np.bincount(kf, weights=_i64(result.input_toks)[served], minlength=nbins)
    computed = np.bincount(k, weights=_i64(result.iter_prompt_tokens)[rows], minlength=nbins)
    gen = np.bincount(k, weights=_i64(result.iter_gen_tokens)[rows], minlength=nbins)

    # index of the last iteration ending in or before each bin (iterations are in time order)
    order = np.argsort(end, kind="stable")
    last_rank = np.full(nbins, -1, dtype=np.int64)
    np.maximum.at(last_rank, k[order], np.arange(order.shape[0]))
    last_rank = np.maximum.accumulate(last_rank)
    last = np.where(last_rank >= 0, order[np.maximum(last_rank, 0)], -1)

    def per_row(values):
        """A per-iteration gauge on the selected rows: the instance's own values, or the cluster's."""
        values = np.asarray(values)
        return values[rows] if single else cluster_gauge(result, values)

    def gauge(x, dtype):
        x = np.asarray(x).astype(dtype)
        return np.where(last >= 0, x[np.maximum(last, 0)], 0).astype(dtype)

    def pct(blocks):
        return blocks / nb * 100 if nb else np.zeros(nbins)

    used = gauge(per_row(result.iter_kv_blocks_used), np.float64)
    out = {
        "t": np.arange(1, nbins + 1, dtype=np.float64) * interval_s,
        "prompt_throughput": prompt / interval_s,
        "gen_throughput": gen / interval_s,
        "prompt_computed_throughput": computed / interval_s,
        "running": gauge(per_row(result.iter_running), np.int64),
        "waiting": gauge(per_row(result.iter_waiting), np.int64),
        "kv_cache_pct": pct(used),
    }
    queried, hits = getattr(result, "iter_prefix_queried", None), getattr(result, "iter_prefix_hits", None)
    if queried is not None and hits is not None:
        q = gauge(per_row(queried), np.float64)
        h = gauge(per_row(hits), np.float64)
        out["prefix_hit_pct"] = np.divide(h * 100, q, out=np.zeros(nbins), where=q > 0)
    cached = getattr(result, "iter_kv_blocks_cached", None)
    if cached is not None:
        out["kv_cache_cached_pct"] = pct(used + gauge(per_row(cached), np.float64))
    out.update(_memory_columns(result, rows, single, instance, gauge, per_row, nbins))
    if getattr(result, "power", None) and instance is None:
        # the run's window: to the last completion (the summary's energy), or to until_ns
        last = max(int(end.max()), int(_i64(result.finish_ns).max()))
        out.update(power.power_series(result, interval_s, t0, nbins, last if until_ns is None else until_ns))
    return out


def _memory_columns(result: SimResult, rows, single: bool, instance, gauge, per_row, nbins: int) -> dict:
    """The memory series of :func:`time_series` (when the result carries ``memory``):
    ``gpu_mem_gib`` (weights + activation reserve + KV blocks in use, all the GPUs of the
    instance or cluster) and, with a KV tier of storage S (cpu | cxl): ``S_prefix_hit_pct``
    (cumulative tier hit tokens / prefix-cache queried tokens x 100), ``S_pool_gib`` (bytes its
    pools hold: an instance's own pool, or every pool of the cluster once), ``S_write_gib`` and
    ``S_recall_gib`` (bytes copied down to / recalled from it in the bin)."""
    mem = getattr(result, "memory", None)
    if not mem:
        return {}
    out = {}
    inst = result.iter_instance
    inst_rows = np.zeros(np.asarray(result.iter_end_ns).shape[0], np.int64) if inst is None else np.asarray(inst)
    static, kvb = np.asarray(mem["gpu_static_bytes"]), np.asarray(mem["kv_block_bytes"])
    used_bytes = np.asarray(result.iter_kv_blocks_used).astype(np.int64) * kvb[inst_rows]
    base = static[instance or 0] if single else static.sum()
    out["gpu_mem_gib"] = (base + gauge(per_row(used_bytes), np.float64)) / 2**30
    storage = mem.get("tier_storage")
    if not storage or getattr(result, "iter_tier_hits", None) is None:
        return out
    chunk = np.asarray(mem["tier_chunk_bytes"])[inst_rows]
    pool_of = mem["tier_pool_of"]

    def pool_series(values):
        values = np.asarray(values).astype(np.int64) * chunk
        return gauge(values[rows] if single else cluster_gauge(result, values, pool_of), np.float64)

    q = gauge(per_row(result.iter_prefix_queried), np.float64)
    h = gauge(per_row(result.iter_tier_hits), np.float64)
    out[f"{storage}_prefix_hit_pct"] = np.divide(h * 100, q, out=np.zeros(nbins), where=q > 0)
    out[f"{storage}_pool_gib"] = pool_series(result.iter_tier_resident) / 2**30
    out[f"{storage}_write_gib"] = np.diff(pool_series(result.iter_tier_written), prepend=0.0) / 2**30
    recalled = np.asarray(result.iter_tier_recalled).astype(np.int64) * chunk
    out[f"{storage}_recall_gib"] = np.diff(gauge(per_row(recalled), np.float64), prepend=0.0) / 2**30
    return out


def _cell(v):
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(v) else repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def _request_columns(table: dict, itl_lists: bool) -> list:
    cols = list(REQUEST_COLUMNS[:-1]) + (["itl_ns"] if itl_lists else [])
    return cols + [c for c in PD_COLUMNS + ENERGY_COLUMNS if c in table]


def write_request_csv(table: dict, path: str | Path, itl_lists: bool = True) -> None:
    """``requests.csv`` with :data:`REQUEST_COLUMNS` (``itl_ns``, a JSON list, only with
    ``itl_lists``; NaN as empty), then :data:`PD_COLUMNS` when the table has them."""
    cols = _request_columns(table, itl_lists)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in range(table["request_id"].shape[0]):
            w.writerow([json.dumps(table[c][r].tolist()) if c == "itl_ns" else _cell(table[c][r]) for c in cols])


def write_request_parquet(table: dict, path: str | Path, itl_lists: bool = True) -> None:
    """The columns of :func:`write_request_csv` as a Parquet file (int64 / float64 columns, NaN
    kept; ``itl_ns`` a list<int64> column). Needs pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = _request_columns(table, itl_lists)
    data = {c: (pa.array([x.tolist() for x in table[c]], type=pa.list_(pa.int64())) if c == "itl_ns"
                else pa.array(np.asarray(table[c]))) for c in cols}
    pq.write_table(pa.table(data), path)


def write_reference_csv(table: dict, path: str | Path, model_name: str) -> None:
    """The reference simulator's header (spaces in names, ITL a stringified list)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(REFERENCE_COLUMNS)
        for r in range(table["request_id"].shape[0]):
            w.writerow([
                int(table["instance_id"][r]), int(table["request_id"][r]), model_name,
                int(table["input"][r]), int(table["output"][r]), int(table["arrival_ns"][r]),
                int(table["end_ns"][r]), int(table["e2e_ns"][r]),
                int(table["queuing_delay_ns"][r]), int(table["ttft_ns"][r]),
                int(table["tpot_ns"][r]), str(table["itl_ns"][r].tolist()),
            ])


# Optional columns of timeseries.csv, after TIMESERIES_COLUMNS, when the series has them: the GPU
# prefix-cache hit rate and the memory over time (time_series' memory columns; S = the KV tier's
# storage, cpu or cxl).
MEMORY_COLUMNS = ("prefix_hit_pct", "gpu_mem_gib") + tuple(f"{s}_{c}" for s in ("cpu", "cxl")
                                          for c in ("prefix_hit_pct", "pool_gib", "write_gib", "recall_gib"))


def write_timeseries_csv(series: dict, path: str | Path) -> None:
    """``timeseries.csv`` formatted like vLLM's (``t`` and throughputs as floats), then the memory
    columns the series has (:data:`MEMORY_COLUMNS`) and its power columns (``*power_w``: an
    unmodelled node's are empty), 4 decimals."""
    extra = [c for c in MEMORY_COLUMNS if c in series] + [c for c in series if c.endswith("power_w")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TIMESERIES_COLUMNS + tuple(extra))
        for r in range(series["t"].shape[0]):
            w.writerow([
                float(series["t"][r]), float(series["prompt_throughput"][r]),
                float(series["gen_throughput"][r]), int(series["running"][r]),
                int(series["waiting"][r]), round(float(series["kv_cache_pct"][r]), 4),
            ] + [_cell4(series[c][r]) for c in extra])


def _cell4(v):
    v = float(v)
    return round(v, 4) if math.isfinite(v) else ""


def write_outputs(result: SimResult, out_dir: str | Path, config_dict: dict | None = None,
                  model_name: str | None = None, interval_s: float = 1.0, extra: dict | None = None,
                  options: OutputOptions = OutputOptions()) -> dict:
    """Write the per-request table (``options.requests_file()``: ``requests.parquet`` or
    ``requests.csv``), ``summary.json`` and ``timeseries.csv`` into ``out_dir``.

    Also ``config.yaml`` when ``config_dict`` (a plain, resolved dict) is given, and
    ``requests_reference.csv`` (the reference simulator's header and model column, ``model_name``)
    when ``options.reference_csv``. ``extra``: entries added to the summary (e.g. a public trace's
    ``workload_import`` counts). The time series has ``interval_s`` bins, or coarser ones when the
    run spans more than :data:`MAX_TIMESERIES_BINS` of them (``timeseries_interval_s`` in the summary).

    A cluster also gets ``timeseries.inst<k>.csv`` per instance (same columns, same bins).

    Returns:
      The summary dict (as written to ``summary.json``); its ``outputs`` entry lists the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = request_table(result)
    files = [options.requests_file(), "summary.json", "timeseries.csv"]
    # A cluster: each instance's own series too (timeseries.inst<k>.csv, as the validation cases lay
    # out measured ones): its gauges, KV usage over its own blocks, its GPU memory and tier pool.
    n_inst = 1 if result.iter_instance is None else int(np.max(result.iter_instance, initial=0)) + 1
    if n_inst > 1:
        files += [f"timeseries.inst{k}.csv" for k in range(n_inst)]
    if options.reference_csv:
        files.append("requests_reference.csv")
    if config_dict is not None:
        files.append("config.yaml")
    interval_s = timeseries_interval(result, interval_s)
    summary = {**summarize(result, table), **(extra or {}), "timeseries_interval_s": interval_s, "outputs": files}
    writer = write_request_parquet if files[0].endswith(".parquet") else write_request_csv
    writer(table, out / files[0], itl_lists=options.itl_lists)
    if options.reference_csv:
        if model_name is None:
            raise ValueError("write_outputs: options.reference_csv needs model_name (the reference's model column)")
        write_reference_csv(table, out / "requests_reference.csv", model_name)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_timeseries_csv(time_series(result, interval_s), out / "timeseries.csv")
    blocks = (result.memory or {}).get("num_blocks")
    for k in range(n_inst if n_inst > 1 else 0):
        series = time_series(result, interval_s, instance=k, origin_ns=int(np.min(_i64(result.arrival_ns))),
                             num_blocks=None if blocks is None else int(blocks[k]))
        write_timeseries_csv(series, out / f"timeseries.inst{k}.csv")
    if config_dict is not None:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(_jsonable(config_dict), sort_keys=False))
    return summary


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1e6 else f"{v:,.1f}"
    return str(v)


def format_summary(summary: dict) -> str:
    """A readable multi-table rendering of :func:`summarize`'s dict."""
    s = summary
    used = set()

    def take(*keys):
        rows = []
        for k in keys:
            if k in s:
                used.add(k)
                rows.append((k, _fmt(s[k])))
        return rows

    parts = []
    overview = take("requests", "unfinished_requests", "makespan_s", "total_input_tokens",
                    "total_generated_tokens", "preemptions", "recomputed_tokens",
                    "request_throughput_rps", "prompt_throughput_tps",
                    "generation_throughput_tps", "total_throughput_tps", "iterations")
    parts.append(tabulate(overview, headers=("Run", "value"), tablefmt="simple",
                          disable_numparse=True, colalign=("left", "right")))
    lat_rows = []
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        keys = [f"{name}_ms_{k}" for k in STAT_NAMES]
        used.update(keys)
        lat_rows.append([label] + [_fmt(s.get(k)) for k in keys])
    parts.append(tabulate(lat_rows, headers=("Latency (ms)",) + STAT_NAMES, tablefmt="simple",
                          disable_numparse=True, colalign=("left",) + ("right",) * 5))
    cache = take("prefix_cache_requested_tokens", "prefix_cache_hit_tokens",
                 "prefix_cache_hit_ratio", "kv_num_blocks", "kv_block_size", "kv_num_tokens",
                 "kv_peak_usage_pct")
    parts.append(tabulate(cache, headers=("KV cache", "value"), tablefmt="simple",
                          disable_numparse=True, colalign=("left", "right")))
    if isinstance(s.get("energy"), dict):
        used.add("energy")
        e = s["energy"]
        rows = [(f"{c} (J)", _fmt(v)) for c, v in e["joules"].items()]
        rows += [(k, _fmt(e.get(k))) for k in ("total_j", "average_w", "peak_w", "j_per_output_token", "j_per_request",
                                              "output_tokens_per_j")]
        if e.get("unmodelled_nodes"):
            rows.append(("unmodelled nodes", ", ".join(str(n) for n in e["unmodelled_nodes"])))
        parts.append(tabulate(rows, headers=("Energy", "value"), tablefmt="simple", disable_numparse=True,
                              colalign=("left", "right")))
    used.add("makespan_ns")
    rest = [(k, _fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v))
            for k, v in s.items() if k not in used]
    if rest:
        parts.append(tabulate(rest, headers=("Other", "value"), tablefmt="simple",
                              disable_numparse=True, colalign=("left", "right")))
    return "\n\n".join(parts)
