"""Validation cases: a measured vLLM run next to the reference simulator's cluster config.

A case directory is laid out as ``profiles/validation/README.md`` (the team's
``shared/data/validation/README.md``) describes::

    config.json                  the reference's cluster config (REFERENCE.md §3.1)
    vllm/meta.json               engine_kwargs, dataset_path, num_requests, [kv_cache, vllm_version, routing, ...]
    vllm/requests.jsonl          per-request timestamps (§4.2), when measured
    vllm/timeseries.csv          1-s ticks on trace time (row t = [t-1, t) s), the measured columns only
    vllm/timeseries.inst<k>.csv  the same per instance k, when measured
    vllm/summary.json            a `vllm bench serve` result block, when measured

At least one of requests.jsonl, timeseries.csv and summary.json must be there.

:func:`load_case` parses and checks all of it; :func:`engine_settings` says which vLLM engine
settings the case records and which had to be assumed (and why); :func:`case_to_cluster` and
:func:`case_router` turn it into simulator inputs; :func:`compare` scores a simulation against the
measurements (§4.4 unpaired statistics and §4.5 paired errors per request, Diff% per key of
summary.json computed as `vllm bench serve` does, and per time-series column the nMAE over busy
ticks, Pearson correlation, totals, last active tick and final values of cumulative gauges, per
instance and for the cluster); :func:`format_comparison` prints the result. The scoring rules are
those of the validation README's "How to score a case"; the pure functions :func:`score_series`,
:func:`busy_ticks`, :func:`lagged_nmae` and :func:`bench_summary` implement them.
"""

import csv
import dataclasses
import hashlib
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np

from jaxsim import power as power_lib
from jaxsim.cluster_config import check_reference_keys, json_hardware, json_links, power_from_cluster_json, tier_from_cluster_json
from jaxsim.engine.routing import Router
from jaxsim.errors import JaxsimInputError, unknown_key_fix
from jaxsim.metrics import STAT_NAMES, distribution_stats
from jaxsim.model import ModelConfig, dtype_bytes, load_model_config
from jaxsim.spec import HardwareConfig, InstanceSpec, KVTierConfig, LinkConfig, ModelRuntimeConfig, SchedulerConfig, Workload
from jaxsim.workload import check_context, iter_jsonl, load_workload

METRICS = ("ttft", "tpot", "e2e")
# per-request cases: the columns the §4.5 comparison always had
TIMESERIES_COMPARED = ("prompt_throughput", "gen_throughput", "running", "waiting")
# vllm/timeseries*.csv columns (validation README); throughputs are padded with 0, gauges with their last value
THROUGHPUT_COLUMNS = ("prompt_throughput", "gen_throughput")
GAUGE_COLUMNS = ("running", "waiting", "kv_cache_pct", "prefix_hit_pct", "cpu_prefix_hit_pct", "gpu_mem_gib",
                 "cpu_pool_gib", "gpu_power_w", "server_power_w")
TIMESERIES_COLUMNS = ("t",) + THROUGHPUT_COLUMNS + GAUGE_COLUMNS
# gauges that only grow: their final value is reported (kv_cache_pct and gpu_mem_gib too where the
# measured gauge counts cached-but-free blocks, see Case.settings["kv_cache_pct_counts_cached"])
CUMULATIVE_GAUGES = ("prefix_hit_pct", "cpu_prefix_hit_pct", "cpu_pool_gib")
# measured columns the simulator does not produce yet, and why: listed in every comparison
NOT_SIMULATED: dict = {}
# a pulse trace (idle gaps of at least this between arrivals) gets the best-lag nMAE of prompt_throughput
PULSE_GAP_S = 5.0
LAGS = (-1, 0, 1)
_CLOCK_DOMAIN_GAP_S = 100_000.0  # arrival_time (epoch) vs *_ts (monotonic), REFERENCE.md §4.2

# vllm/summary.json (a `vllm bench serve` block): these keys, and <metric>_<stat>_ms for metric in
# ttft, tpot, itl, e2el and stat in mean, median, std, p<N>
SUMMARY_KEYS = ("completed_requests", "duration_s", "input_tokens_total", "output_tokens_total",
                "request_throughput_req_s", "output_throughput_tok_s", "total_token_throughput_tok_s")
_SUMMARY_STAT_RE = re.compile(r"^(ttft|tpot|itl|e2el)_(mean|median|std|p(\d+(?:\.\d+)?))_ms$")
_SUMMARY_EXAMPLES = SUMMARY_KEYS + tuple(f"{m}_{s}_ms" for m in ("ttft", "tpot", "itl", "e2el")
                                         for s in ("mean", "median", "std", "p99"))

# vllm/meta.json top-level keys (validation README); another key is an error naming the nearest
META_KEYS = ("schema_version", "model", "sim_model", "vllm_version", "engine_kwargs", "engine_kwargs_source",
             "kv_cache", "dataset_path", "dataset_path_committed", "dataset_hash", "num_requests", "started_at",
             "finished_at", "tick_seconds", "hardware", "parallelism", "num_instances", "routing", "measured",
             "reference_sim_flags", "power_summary_w", "notes", "alignment", "source", "resolved_config")
KV_CACHE_KEYS = ("num_gpu_blocks", "num_cpu_blocks", "block_size", "gpu_memory_utilization", "enable_prefix_caching",
                 "kv_cache_memory_bytes", "num_kv_tokens", "available_kv_gib", "model_weights_gib")

# vLLM V1 defaults for what a case does not record (REFERENCE.md §4.1: v0.19.0); engine_settings
# says which of them a case had to assume and why
VLLM_DEFAULTS = {
    "enable_chunked_prefill": True,
    "long_prefill_token_threshold": 0,
    "enable_prefix_caching": True,
    "block_size": 16,
    "gpu_memory_utilization": 0.9,
    "scheduler_reserve_full_isl": True,
}
ASYNC_SCHEDULING_SINCE = (0, 14)  # vLLM turned async scheduling on by default in 0.14
LARGE_GPU_GIB = 70  # vLLM's _set_default_args (OpenAI server): >= 70 GiB -> 1024 seqs / 8192 tokens, else 256 / 2048


@dataclasses.dataclass
class Case:
    """A parsed validation case. ``real`` arrays are indexed by request id (= workload line)."""

    case_dir: Path
    name: str
    cluster: dict  # config.json, checked, missing num_npus/tp_size/pp_size filled in
    cluster_path: Path
    meta: dict  # vllm/meta.json
    meta_path: Path
    engine_kwargs: dict
    model: ModelConfig  # the model simulated (meta.json sim_model when given, else model)
    max_model_len: int  # engine_kwargs.max_model_len, or the model's max_position_embeddings
    num_gpu_blocks: int | None  # meta.json kv_cache.num_gpu_blocks when recorded
    workload: Workload
    workload_path: Path
    # measured per request (None without requests.jsonl), index = request id: request_id,
    # input_toks, output_toks, arrival_s (queued_ts when the clocks differ, §4.2), scheduled_s,
    # first_token_s, last_token_s (monotonic seconds) and ttft_ms, tpot_ms, e2e_ms (§4.4)
    real: dict | None
    real_timeseries: dict | None  # columns of vllm/timeseries.csv as float arrays (the cluster)
    real_makespan_s: float | None  # last completion - first arrival (per-request cases)
    real_timeseries_instances: dict = dataclasses.field(default_factory=dict)  # k -> timeseries.inst<k>.csv
    real_summary: dict | None = None  # vllm/summary.json
    settings: dict = dataclasses.field(default_factory=dict)  # engine_settings()
    assumed: list = dataclasses.field(default_factory=list)  # "knob=value: why", for what the case does not record
    tick_s: float = 1.0

    @property
    def instances(self) -> list:
        return [(ni, ii, inst) for ni, node in enumerate(self.cluster["nodes"])
                for ii, inst in enumerate(node["instances"])]

    @property
    def pulse(self) -> bool:
        """The trace comes in pulses (an idle gap of at least :data:`PULSE_GAP_S` between arrivals)."""
        return is_pulse_trace(self.workload.arrival_ns)


def is_pulse_trace(arrival_ns) -> bool:
    """Arrivals in pulses: some gap between consecutive arrivals is at least :data:`PULSE_GAP_S`."""
    a = np.sort(np.asarray(arrival_ns, dtype=np.int64))
    return bool(a.size > 1 and np.diff(a).max() >= PULSE_GAP_S * 1e9)


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise JaxsimInputError(str(path), "file not found",
                               "a validation case needs config.json and vllm/meta.json")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JaxsimInputError(f"{path}:{e.lineno}", f"invalid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise JaxsimInputError(str(path), "expected a JSON object at the top level")
    return obj


class _Checker:
    """Reads typed fields of a JSON document; errors name the file and the JSON path."""

    def __init__(self, path: Path):
        self.path = path

    def err(self, jpath: str, problem: str, fix: str = "") -> JaxsimInputError:
        return JaxsimInputError(f"{self.path}: {jpath}", problem, fix)

    def get(self, obj: dict, key: str, jpath: str, required=True):
        if key not in obj:
            if required:
                raise self.err(jpath, "missing required field", "see REFERENCE.md §3.1")
            return None
        return obj[key]

    def number(self, obj, key, jpath, *, required=True, positive=False, integer=False,
               default=None):
        v = self.get(obj, key, jpath, required)
        if v is None:
            if required:
                raise self.err(jpath, "must be a number, got null")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.err(jpath, f"must be a number, got {v!r}")
        if integer and v != int(v):
            raise self.err(jpath, f"must be an integer, got {v!r}")
        if positive and v <= 0:
            raise self.err(jpath, f"must be > 0, got {v!r}")
        if not positive and v < 0:
            raise self.err(jpath, f"must be >= 0, got {v!r}")
        return int(v) if integer else v

    def number_or_list(self, obj, key, jpath, *, positive):
        v = self.get(obj, key, jpath)
        items = v if isinstance(v, list) else [v]
        if not items:
            raise self.err(jpath, "must be a number or a non-empty list of numbers")
        for j, x in enumerate(items):
            sub = f"{jpath}[{j}]" if isinstance(v, list) else jpath
            self.number({"x": x}, "x", sub, positive=positive)
        return v

    def string(self, obj, key, jpath, *, required=True):
        v = self.get(obj, key, jpath, required)
        if v is None and not required:
            return None
        if not isinstance(v, str) or not v:
            raise self.err(jpath, f"must be a non-empty string, got {v!r}")
        return v

    def mapping(self, obj, key, jpath, *, required=True):
        v = self.get(obj, key, jpath, required)
        if v is None and not required:
            return None
        if not isinstance(v, dict):
            raise self.err(jpath, f"must be a JSON object, got {type(v).__name__}")
        return v

    def array(self, obj, key, jpath):
        v = self.get(obj, key, jpath)
        if not isinstance(v, list):
            raise self.err(jpath, f"must be a JSON array, got {type(v).__name__}")
        return v


def check_cluster_config(cluster: dict, path: Path) -> dict:
    """Check a cluster config (REFERENCE.md §3.1); returns it with num_npus/tp/pp filled in. A key
    the format does not have is an error naming it (``"tp_szie"`` was ignored)."""
    check_reference_keys(cluster, path)
    c = _Checker(path)
    nodes = c.array(cluster, "nodes", "nodes")
    num_nodes = c.number(cluster, "num_nodes", "num_nodes", integer=True, positive=True)
    if num_nodes != len(nodes):
        raise c.err("num_nodes", f"is {num_nodes} but 'nodes' has {len(nodes)} entries",
                    "make them equal")
    c.number_or_list(cluster, "link_bw", "link_bw", positive=True)
    c.number_or_list(cluster, "link_latency", "link_latency", positive=False)
    for ni, node in enumerate(nodes):
        np_ = f"nodes[{ni}]"
        if not isinstance(node, dict):
            raise c.err(np_, "must be a JSON object")
        insts = c.array(node, "instances", f"{np_}.instances")
        n_inst = c.number(node, "num_instances", f"{np_}.num_instances", integer=True,
                          positive=True)
        if n_inst != len(insts):
            raise c.err(f"{np_}.num_instances", f"is {n_inst} but 'instances' has {len(insts)} "
                        "entries", "make them equal")
        cpu = c.mapping(node, "cpu_mem", f"{np_}.cpu_mem")
        c.number(cpu, "mem_size", f"{np_}.cpu_mem.mem_size", positive=True)
        c.number(cpu, "mem_bw", f"{np_}.cpu_mem.mem_bw", positive=True)
        c.number(cpu, "mem_latency", f"{np_}.cpu_mem.mem_latency")
        for ii, inst in enumerate(insts):
            ip = f"{np_}.instances[{ii}]"
            if not isinstance(inst, dict):
                raise c.err(ip, "must be a JSON object")
            c.string(inst, "model_name", f"{ip}.model_name")
            c.string(inst, "hardware", f"{ip}.hardware")
            mem = c.mapping(inst, "npu_mem", f"{ip}.npu_mem")
            c.number(mem, "mem_size", f"{ip}.npu_mem.mem_size", positive=True)
            c.number(mem, "mem_bw", f"{ip}.npu_mem.mem_bw", positive=True)
            c.number(mem, "mem_latency", f"{ip}.npu_mem.mem_latency")
            util = c.number(mem, "mem_util", f"{ip}.npu_mem.mem_util", required=False)
            if util is not None and not 0 < util <= 1:
                raise c.err(f"{ip}.npu_mem.mem_util", f"must be in (0, 1], got {util!r}")
            pd = inst.get("pd_type")
            if pd not in (None, "prefill", "decode"):
                raise c.err(f"{ip}.pd_type", f"must be null, \"prefill\" or \"decode\", got {pd!r}")
            tp = c.number(inst, "tp_size", f"{ip}.tp_size", required=False, integer=True,
                          positive=True)
            pp = c.number(inst, "pp_size", f"{ip}.pp_size", required=False, integer=True,
                          positive=True, default=1)
            npus = c.number(inst, "num_npus", f"{ip}.num_npus", required=False, integer=True,
                            positive=True)
            if tp is None:
                tp = npus // pp if npus is not None else 1
            if npus is None:
                npus = tp * pp
            if npus != tp * pp:
                raise c.err(f"{ip}.num_npus", f"is {npus} but tp_size·pp_size = {tp}·{pp}",
                            "num_npus must equal tp_size * pp_size")
            inst["tp_size"], inst["pp_size"], inst["num_npus"] = tp, pp, npus
    return cluster


# ------------------------------------------------------------------------------------------------
# vllm/ folder
# ------------------------------------------------------------------------------------------------
def _load_real_requests(path: Path, workload: Workload) -> tuple[dict, float]:
    if not path.is_file():
        raise JaxsimInputError(str(path), "file not found", "the case needs vllm/requests.jsonl")
    n = workload.num_requests
    cols = {k: np.full(n, np.nan) for k in ("arrival_time", "queued_ts", "scheduled_ts",
                                             "first_token_ts", "last_token_ts")}
    seen = np.zeros(n, dtype=bool)
    for _, where, obj in iter_jsonl(path):
        rid = obj.get("request_id")
        if not isinstance(rid, str) or not rid.startswith("bench-") \
                or not rid[6:].isdigit():
            raise JaxsimInputError(where, f"request_id must look like 'bench-<i>', got {rid!r}",
                                   "<i> is the workload line index")
        i = int(rid[6:])
        if i >= n:
            # more measured requests than simulated ones: keep the first n
            continue
        if seen[i]:
            raise JaxsimInputError(where, f"duplicate request_id {rid!r}")
        seen[i] = True
        for k in cols:
            v = obj.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise JaxsimInputError(where, f"field {k!r} must be a number, got {v!r}")
            cols[k][i] = v
        for k, ref in (("input_toks", workload.input_toks), ("output_toks",
                                                               workload.output_toks)):
            if k in obj and int(obj[k]) != int(ref[i]):
                raise JaxsimInputError(where, f"{k} is {obj[k]} but workload request {i} has "
                                       f"{int(ref[i])}", "the workload is not the one that "
                                       "was measured; check dataset_path")
    missing = np.nonzero(~seen)[0]
    if missing.size:
        raise JaxsimInputError(str(path), f"no measurement for bench-{int(missing[0])} "
                           f"({missing.size} missing)", "every simulated request needs one; "
                           "lower meta.json num_requests")
    far = np.abs(cols["arrival_time"] - cols["queued_ts"]) > _CLOCK_DOMAIN_GAP_S
    arr = np.where(far, cols["queued_ts"], cols["arrival_time"])
    out = workload.output_toks.astype(np.float64)
    real = {
        "request_id": np.arange(n, dtype=np.int64),
        "input_toks": workload.input_toks.astype(np.int64),
        "output_toks": workload.output_toks.astype(np.int64),
        "arrival_s": arr,
        "scheduled_s": cols["scheduled_ts"],
        "first_token_s": cols["first_token_ts"],
        "last_token_s": cols["last_token_ts"],
        "ttft_ms": (cols["first_token_ts"] - arr) * 1e3,
        "tpot_ms": (cols["last_token_ts"] - cols["first_token_ts"]) / np.maximum(1, out - 1) * 1e3,
        "e2e_ms": (cols["last_token_ts"] - arr) * 1e3,
    }
    makespan = float(cols["last_token_ts"].max() - arr.min())
    return real, makespan




def _load_real_timeseries(path: Path) -> dict:
    """A ``vllm/timeseries*.csv``: ``t`` (1, 2, 3, ... on trace time) and the measured columns of
    :data:`TIMESERIES_COLUMNS` (any subset; a missing column was not measured)."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise JaxsimInputError(f"{path}:1", "empty file", "expected a CSV header starting with t")
        header = [h.strip() for h in header]
        for j, h in enumerate(header):
            if h not in TIMESERIES_COLUMNS:
                raise JaxsimInputError(f"{path}:1", f"unknown column {h!r}", unknown_key_fix(h, TIMESERIES_COLUMNS))
            if h in header[:j]:
                raise JaxsimInputError(f"{path}:1", f"column {h!r} appears twice", "keep one")
        if "t" not in header:
            raise JaxsimInputError(f"{path}:1", "missing column 't'", "the first column is the tick t = 1, 2, ...")
        if len(header) < 2:
            raise JaxsimInputError(f"{path}:1", "no measured column", f"add some of {', '.join(TIMESERIES_COLUMNS[1:])}")
        rows = {c: [] for c in header}
        for lineno, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != len(header):
                raise JaxsimInputError(f"{path}:{lineno}", f"{len(row)} fields, the header has {len(header)}",
                                       "fix or delete the row")
            for c, cell in zip(header, row):
                try:
                    v = float(cell)
                except ValueError:
                    raise JaxsimInputError(f"{path}:{lineno}", f"column {c!r} is not a number: {cell!r}",
                                           "fix or delete the row") from None
                if not math.isfinite(v) or v < 0:
                    raise JaxsimInputError(f"{path}:{lineno}", f"column {c!r} must be a finite number >= 0, got {cell!r}")
                rows[c].append(v)
            expected = len(rows["t"])
            if rows["t"][-1] != expected:
                raise JaxsimInputError(f"{path}:{lineno}", f"t is {rows['t'][-1]:g}, expected {expected}",
                                       "rows are the 1-s ticks t = 1, 2, 3, ... of trace time, none missing")
    if not rows["t"]:
        raise JaxsimInputError(str(path), "no data rows")
    return {c: np.asarray(v, dtype=np.float64) for c, v in rows.items()}


_INSTANCE_TS_RE = re.compile(r"^timeseries\.inst(\d+)\.csv$")


def _load_instance_timeseries(vllm_dir: Path, n_instances: int) -> dict:
    """``timeseries.inst<k>.csv`` files: ``{k: columns}``, k < the number of instances."""
    out = {}
    for p in sorted(vllm_dir.glob("timeseries.*.csv")):
        m = _INSTANCE_TS_RE.match(p.name)
        if not m:
            raise JaxsimInputError(str(p), "unexpected file name", "per-instance series are timeseries.inst<k>.csv, "
                                   "k = 0, 1, ... in config.json's instance order")
        k = int(m.group(1))
        if k >= n_instances:
            raise JaxsimInputError(str(p), f"instance {k}, but config.json has {n_instances} instance(s)",
                                   "k counts config.json's instances from 0")
        out[k] = _load_real_timeseries(p)
    return out


def _load_real_summary(path: Path) -> dict:
    """``vllm/summary.json``: a `vllm bench serve` result block (keys :data:`SUMMARY_KEYS` and
    ``<ttft|tpot|itl|e2el>_<mean|median|std|p<N>>_ms``), numbers only."""
    obj = _read_json(path)
    if not obj:
        raise JaxsimInputError(str(path), "empty summary", "remove the file or add the measured keys")
    out = {}
    for key, v in obj.items():
        if key not in SUMMARY_KEYS and not _SUMMARY_STAT_RE.match(key):
            raise JaxsimInputError(f"{path}: {key}", "unknown summary key",
                                   f"{unknown_key_fix(key, _SUMMARY_EXAMPLES)} (and any <metric>_p<N>_ms)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise JaxsimInputError(f"{path}: {key}", f"must be a finite number >= 0, got {v!r}")
        out[key] = float(v)
    return out


# vLLM engine arguments a case may record: those jaxsim reads, and those it knows change nothing it
# models (logging, seeds, connectors it reports as assumed). vLLM has hundreds more, so another key is
# not an error but a warning with the nearest known name: a typo (max_num_seq) is then not silently ignored.
ENGINE_KWARGS_READ = ("model", "tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size",
                      "enable_expert_parallel", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size",
                      "enable_chunked_prefill", "enable_prefix_caching", "gpu_memory_utilization", "dtype",
                      "kv_cache_dtype", "long_prefill_token_threshold", "scheduler_reserve_full_isl", "enforce_eager",
                      "async_scheduling", "kv_transfer_config")
ENGINE_KWARGS_IGNORED = ("seed", "kv_cache_metrics", "tokenizer", "trust_remote_code", "disable_log_stats", "revision",
                         "download_dir", "served_model_name")


def _warn_unknown_engine_kwargs(ek: dict, meta_path: Path) -> None:
    known = ENGINE_KWARGS_READ + ENGINE_KWARGS_IGNORED
    for key in ek:
        if key not in known:
            warnings.warn(f"{meta_path}: engine_kwargs.{key}: not a vLLM engine argument jaxsim reads; ignored "
                          f"({unknown_key_fix(key, known)})", stacklevel=3)


def version_tuple(version: str | None) -> tuple | None:
    """``"0.13.0rc2.dev79+g8f8fda261"`` -> ``(0, 13, 0)``; None -> None."""
    if version is None:
        return None
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise ValueError(version)
    return tuple(int(x or 0) for x in m.groups())


def _engine_settings(meta: dict, meta_path: Path, cluster: dict, model: ModelConfig) -> tuple[dict, list]:
    """The engine settings the run used: what meta.json records (engine_kwargs, kv_cache,
    resolved_config, routing), config.json's per-instance runtime overrides, else a default named in
    ``assumed`` with its reason. See :func:`engine_settings`."""
    c = _Checker(meta_path)
    ek = meta["engine_kwargs"]
    kv = meta.get("kv_cache") or {}
    resolved = meta.get("resolved_config") or {}
    sections = [resolved.get(s) or {} for s in ("scheduler_config", "cache_config", "model_config")]
    declared_default = {}  # knob -> the case's own words, when meta.json says a value is vLLM's default
    for text in (meta.get("engine_kwargs_source") or {}).get("vllm_default", []) or []:
        declared_default[str(text).split(" ", 1)[0]] = str(text)
    insts = [inst for node in cluster["nodes"] for inst in node["instances"]]
    first = insts[0]
    version = meta.get("vllm_version")
    if version is not None and not isinstance(version, str):
        raise c.err("vllm_version", f"must be a string or null, got {version!r}")
    try:
        vt = version_tuple(version)
    except ValueError:
        raise c.err("vllm_version", f"not a vLLM version: {version!r}", "e.g. \"0.19.0\" or null") from None
    unrecorded = vt is None
    period = ("not recorded; the same group's runs of the period used this (meta.json notes)"
              if unrecorded else None)
    settings = {"vllm_version": version}
    assumed = []
    if unrecorded:
        assumed.append("vllm_version=None: not recorded; every knob below that the case does not record is "
                       "taken from the same group's runs of the period (meta.json notes: vLLM 0.11.1 / 0.13.0rc2 V1)")

    def pick(knob, default, why, *, kv_key=None, inst_key=None):
        """engine_kwargs > meta.json kv_cache > resolved_config > config.json instance > default."""
        v = ek.get(knob)
        if v is not None:
            if knob in declared_default:
                assumed.append(f"{knob}={v!r}: meta.json engine_kwargs_source.vllm_default: {declared_default[knob]}")
            return v
        if kv_key and kv.get(kv_key) is not None:
            return kv[kv_key]
        for sec in sections:
            if sec.get(knob) is not None:
                return sec[knob]
        if inst_key and first.get(inst_key) is not None:
            return first[inst_key]
        assumed.append(f"{knob}={default!r}: {why}")
        return default

    def default_why(text):
        return period if unrecorded else f"not recorded; vLLM {version} default ({text})"

    big = float(first["npu_mem"]["mem_size"]) >= LARGE_GPU_GIB
    gpu = f"{'>=' if big else '<'} {LARGE_GPU_GIB} GiB GPU (config.json npu_mem.mem_size {first['npu_mem']['mem_size']:g})"
    settings["enforce_eager"] = bool(pick("enforce_eager", unrecorded, default_why("CUDA graphs on")))
    async_default = (not unrecorded) and vt >= ASYNC_SCHEDULING_SINCE
    settings["async_scheduling"] = bool(pick(
        "async_scheduling", async_default,
        "not recorded; vLLM's default is off before 0.14, and the version is not recorded: the group's runs of the "
        "period used 0.11.1 / 0.13.0rc2 (meta.json notes)" if unrecorded else
        f"not recorded; vLLM {version} default (async scheduling {'on from' if async_default else 'off before'} 0.14)"))
    settings["block_size"] = int(pick("block_size", 16, default_why("16"), kv_key="block_size", inst_key="block_size"))
    kb = kv.get("block_size")
    if kb is not None and ek.get("block_size") is not None and int(kb) != int(ek["block_size"]):
        raise c.err("kv_cache.block_size", f"is {kb} but engine_kwargs.block_size is {ek['block_size']}",
                    "make them equal")
    settings["enable_prefix_caching"] = bool(pick(
        "enable_prefix_caching", True, "not recorded; vLLM V1 default (prefix caching on)",
        kv_key="enable_prefix_caching", inst_key="enable_prefix_caching"))
    settings["enable_chunked_prefill"] = bool(pick(
        "enable_chunked_prefill", True, "not recorded; vLLM V1 default (chunked prefill on)",
        inst_key="enable_chunked_prefill"))
    settings["long_prefill_token_threshold"] = int(pick(
        "long_prefill_token_threshold", 0, "not recorded; vLLM default (0: off)", inst_key="long_prefill_token_threshold"))
    settings["scheduler_reserve_full_isl"] = bool(pick(
        "scheduler_reserve_full_isl", True, "not recorded; jaxsim's default (vLLM 0.19's: admit only if the whole "
        "prompt fits)" + ("; whether this version reserved the full prompt is not known" if vt is None or vt < (0, 19)
                          else ""), inst_key="reserve_full_isl"))
    settings["max_num_seqs"] = int(pick(
        "max_num_seqs", 1024 if big else 256,
        f"not recorded; vLLM's OpenAI-server default for a {gpu}"
        + (" (vLLM's _set_default_args; the group's Fig 7 runs set 128)" if unrecorded else ""),
        inst_key="max_num_seqs"))
    settings["max_num_batched_tokens"] = int(pick(
        "max_num_batched_tokens", 8192 if big else 2048,
        (period + ", chunked prefill at 2048 tokens; also vLLM's default for a " + gpu) if unrecorded else
        f"not recorded; vLLM's OpenAI-server default for a {gpu}", inst_key="max_num_batched_tokens"))
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        if settings[key] <= 0:
            raise c.err(f"engine_kwargs.{key}", f"must be > 0, got {settings[key]}")
    if "max_model_len" in ek:
        mml = ek["max_model_len"]
        if mml is not None:
            mml = c.number(ek, "max_model_len", "engine_kwargs.max_model_len", integer=True, positive=True)
    else:
        mml = None
        assumed.append(f"max_model_len={model.max_position_embeddings}: not recorded; vLLM default (the model's "
                       "max_position_embeddings)")
    settings["max_model_len"] = int(mml if mml is not None else model.max_position_embeddings)
    util = ek.get("gpu_memory_utilization")
    if util is None:
        util = kv.get("gpu_memory_utilization")
    if util is None:
        util = first["npu_mem"].get("mem_util")
    if util is None:
        util = 0.9
        assumed.append("gpu_memory_utilization=0.9: not recorded; vLLM default")
    elif "gpu_memory_utilization" in declared_default:
        assumed.append(f"gpu_memory_utilization={util!r}: meta.json engine_kwargs_source.vllm_default: "
                       f"{declared_default['gpu_memory_utilization']}")
    settings["gpu_memory_utilization"] = float(util)
    blocks = c.number(kv, "num_gpu_blocks", "kv_cache.num_gpu_blocks", required=False, integer=True, positive=True)
    settings["num_gpu_blocks"] = blocks
    if blocks is None:
        assumed.append(f"num_gpu_blocks=None: not recorded; jaxsim's memory model on config.json's npu_mem "
                       f"({first['npu_mem']['mem_size']:g} GiB x gpu_memory_utilization {float(util):g} - weights)")
    for key in ("dtype", "kv_cache_dtype"):
        v = ek.get(key) or first.get(key)
        if v is None:
            v = "auto"
            assumed.append(f"{key}='auto': not recorded; vLLM default (the model's {model.torch_dtype})")
        settings[key] = str(v)
    settings["tensor_parallel_size"] = int(ek.get("tensor_parallel_size") or first["tp_size"])
    settings["pipeline_parallel_size"] = int(ek.get("pipeline_parallel_size") or first["pp_size"])
    settings["data_parallel_size"] = int(ek.get("data_parallel_size") or 1)

    # several instances: routing, P/D, KV connectors
    roles = [inst.get("pd_type") or "colocated" for inst in insts]
    settings["pd"] = any(r != "colocated" for r in roles)
    tcfg = ek.get("kv_transfer_config") or {}
    if not isinstance(tcfg, dict):
        raise c.err("engine_kwargs.kv_transfer_config", f"must be a JSON object or null, got {tcfg!r}")
    connector = tcfg.get("kv_connector")
    settings["kv_connector"] = connector
    routing = meta.get("routing")
    if routing is not None and not isinstance(routing, str):
        raise c.err("routing", f"must be a string, got {routing!r}")
    n_inst = len(insts) * (settings["data_parallel_size"] if len(insts) == 1 else 1)
    if n_inst == 1:
        settings["routing"] = None
    elif settings["data_parallel_size"] > 1:
        settings["routing"] = "least_loaded"  # vLLM's DP load balancer
    elif settings["pd"]:
        settings["routing"] = "least_loaded"
        n_dec = roles.count("decode")
        if n_dec > 1:
            assumed.append("routing='least_loaded': not recorded; jaxsim's P/D default among the decode instances")
    elif routing and re.search(r"round[ -]?robin", routing, re.I):
        settings["routing"] = "round_robin"
    elif routing and re.search(r"least[ _-]?loaded", routing, re.I):
        settings["routing"] = "least_loaded"
    elif routing:
        raise c.err("routing", f"cannot tell the policy from {routing!r}", "say 'round robin' or 'least loaded'")
    else:
        settings["routing"] = "round_robin"
        assumed.append("routing='round_robin': not recorded; the group's multi-instance client of the period "
                       "alternated requests between the servers (meta.json notes: the Fig 7 MD run)")
    if settings["pd"]:
        if connector is None:
            assumed.append(f"kv_connector=None: P/D KV connector not recorded; jaxsim's layerwise KV hand-off over "
                           f"config.json's link ({cluster['link_bw']} GB/s, {cluster['link_latency']} ns)")
    elif connector is not None:
        if "lmcache" in str(connector).lower():
            # LMCache keeps KV chunks in CPU memory (a local backend, or one cache server that the
            # instances share): jaxsim's CPU KV tier, sized by config.json's cpu_mem.
            shared = len(insts) > 1
            settings["kv_tier"] = {"storage": "cpu", "enable_prefix_sharing": shared}
            assumed.append(f"kv_connector={connector!r}: LMCache's CPU KV pool as jaxsim's CPU KV tier "
                           "(256-token chunks, write-through, LRU; size, bandwidth and latency from config.json "
                           f"cpu_mem){'; one pool shared by the instances (one LMCache server)' if shared else ''}")
        else:
            assumed.append(f"kv_connector={connector!r}: not modelled; simulated without it")
    settings.setdefault("kv_tier", None)  # the KV tier below the GPU (an LMCache connector: CPU), or none
    # vLLM 0.13 with prefix caching counted cached-but-free blocks in its KV gauge (validation README)
    settings["kv_cache_pct_counts_cached"] = bool(vt is not None and vt[:2] == (0, 13) and
                                                  settings["enable_prefix_caching"])
    return settings, assumed


def engine_settings(case: "Case") -> tuple[dict, list]:
    """The vLLM engine settings of a case, and which of them had to be assumed.

    Returns:
      ``(settings, assumed)``. ``settings`` always holds ``vllm_version`` (str or None),
      ``enforce_eager`` (bool), ``async_scheduling`` (bool: recorded, else vLLM's default for the
      version: on from 0.14, off before; off when the version is not recorded), ``block_size``,
      ``enable_prefix_caching``, ``enable_chunked_prefill``, ``long_prefill_token_threshold``,
      ``scheduler_reserve_full_isl``, ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``,
      ``gpu_memory_utilization``, ``num_gpu_blocks`` (None: jaxsim's memory model), ``dtype``,
      ``kv_cache_dtype``, ``tensor_parallel_size``, ``pipeline_parallel_size``, ``data_parallel_size``,
      ``pd`` (prefill/decode instances), ``routing`` (the router policy of a multi-instance case,
      None for one instance), ``kv_connector`` and ``kv_cache_pct_counts_cached`` (the measured
      KV gauge counts cached-but-free blocks: vLLM 0.13 with prefix caching).
      ``assumed``: one ``"knob=value: why"`` per setting the case does not record (or records as
      vLLM's default without printing it), and per recorded feature jaxsim does not model.
      Sources, first found wins: meta.json ``engine_kwargs``, ``kv_cache``, ``resolved_config``,
      config.json's instance runtime overrides, then the default.
    """
    return dict(case.settings), list(case.assumed)


def _check_meta_keys(meta: dict, meta_path: Path) -> None:
    for key in meta:
        if key not in META_KEYS:
            raise JaxsimInputError(f"{meta_path}: {key}", "unknown meta.json key", unknown_key_fix(key, META_KEYS))
    kv = meta.get("kv_cache")
    if kv is not None:
        if not isinstance(kv, dict):
            raise JaxsimInputError(f"{meta_path}: kv_cache", f"must be a JSON object, got {type(kv).__name__}")
        for key in kv:
            if key not in KV_CACHE_KEYS:
                raise JaxsimInputError(f"{meta_path}: kv_cache.{key}", "unknown kv_cache key",
                                       unknown_key_fix(key, KV_CACHE_KEYS))
    sv = meta.get("schema_version")
    if sv is not None and sv not in (1, 2):
        raise JaxsimInputError(f"{meta_path}: schema_version", f"{sv!r} is not a known schema (1 or 2)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_case(case_dir: str | Path, models_dir: str | Path, workloads_dir: str | Path) -> Case:
    """Parse and check a validation case directory.

    ``meta.json``'s ``dataset_path`` is looked up by file name in ``workloads_dir`` (its sha256 must
    be ``dataset_hash`` when given) and its first ``num_requests`` requests (0 or absent = all) are
    loaded; the model config (``sim_model``, else ``model``) comes from ``models_dir``.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise JaxsimInputError(str(case_dir), "validation case directory not found",
                               "point at a folder holding config.json and vllm/")
    cluster_path = case_dir / "config.json"
    cluster = check_cluster_config(_read_json(cluster_path), cluster_path)

    meta_path = case_dir / "vllm" / "meta.json"
    meta = _read_json(meta_path)
    _check_meta_keys(meta, meta_path)
    c = _Checker(meta_path)
    ek = c.mapping(meta, "engine_kwargs", "engine_kwargs")
    _warn_unknown_engine_kwargs(ek, meta_path)
    for key in ("tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size"):
        c.number(ek, key, f"engine_kwargs.{key}", required=False, integer=True, positive=True)
    for key in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
        if ek.get(key) is not None:
            c.number(ek, key, f"engine_kwargs.{key}", integer=True)
    for key in ("enable_expert_parallel", "enable_chunked_prefill", "enable_prefix_caching", "enforce_eager",
                "async_scheduling"):
        if key in ek and not isinstance(ek[key], bool) and ek[key] is not None:
            raise c.err(f"engine_kwargs.{key}", f"must be true or false, got {ek[key]!r}")
    for key in ("dtype", "kv_cache_dtype"):
        v = ek.get(key)
        if v is not None and v != "auto":
            dtype_bytes(v, f"{meta_path}: engine_kwargs.{key}")

    # sim_model: the architecture-identical config to simulate (the measured checkpoint has none)
    sim_model = meta.get("sim_model")
    model_name = sim_model or meta.get("model") or ek.get("model")
    insts = [inst for node in cluster["nodes"] for inst in node["instances"]]
    if not isinstance(model_name, str) or not model_name:
        model_name = insts[0]["model_name"]
    for ni, node in enumerate(cluster["nodes"]):
        for ii, inst in enumerate(node["instances"]):
            if inst["model_name"] != model_name:
                raise JaxsimInputError(
                    f"{cluster_path}: nodes[{ni}].instances[{ii}].model_name",
                    f"is {inst['model_name']!r} but {meta_path} ran {model_name!r}",
                    "the cluster config must describe the measured run")
    model = load_model_config(models_dir, model_name)
    settings, assumed = _engine_settings(meta, meta_path, cluster, model)
    if sim_model and sim_model != meta.get("model"):
        assumed.append(f"model={sim_model!r}: meta.json sim_model (the run served {meta.get('model')!r}, the same "
                       "architecture)")
    n_inst = c.number(meta, "num_instances", "num_instances", required=False, integer=True, positive=True)
    if n_inst is not None and n_inst != len(insts) * (settings["data_parallel_size"] if len(insts) == 1 else 1):
        raise c.err("num_instances", f"is {n_inst} but {cluster_path} lists {len(insts)} instance(s)",
                    "make them agree")
    tick = c.number(meta, "tick_seconds", "tick_seconds", required=False, positive=True, default=1.0)

    ds = c.string(meta, "dataset_path", "dataset_path")
    workload_path = Path(workloads_dir) / Path(ds).name
    if not workload_path.is_file():
        raise c.err("dataset_path", f"{Path(ds).name!r} not found in {workloads_dir}",
                    "copy the measured workload there or fix the workloads directory")
    want = meta.get("dataset_hash")
    if want is not None:
        got = _sha256(workload_path)
        if not isinstance(want, str) or got != want.lower():
            raise c.err("dataset_hash", f"{workload_path} has sha256 {got}, not {want!r}",
                        "the workload is not the one that was measured: copy the measured trace")
    num_requests = c.number(meta, "num_requests", "num_requests", required=False, integer=True,
                            default=0) or 0
    workload = load_workload(workload_path, num_requests)
    check_context(workload, settings["max_model_len"], f"{meta_path}: engine_kwargs.max_model_len")

    vllm_dir = case_dir / "vllm"
    req_path, ts_path, sum_path = vllm_dir / "requests.jsonl", vllm_dir / "timeseries.csv", vllm_dir / "summary.json"
    per_inst = _load_instance_timeseries(vllm_dir, len(insts))
    if per_inst and not ts_path.is_file():
        raise JaxsimInputError(str(ts_path), "file not found", "per-instance series need the cluster's timeseries.csv")
    if not (req_path.is_file() or ts_path.is_file() or sum_path.is_file()):
        raise JaxsimInputError(str(vllm_dir), "no measurement: none of requests.jsonl, timeseries.csv, summary.json",
                               "a case needs at least one of them")
    real, makespan = _load_real_requests(req_path, workload) if req_path.is_file() else (None, None)
    ts = _load_real_timeseries(ts_path) if ts_path.is_file() else None
    summary = _load_real_summary(sum_path) if sum_path.is_file() else None
    return Case(
        case_dir=case_dir, name=case_dir.name, cluster=cluster, cluster_path=cluster_path,
        meta=meta, meta_path=meta_path, engine_kwargs=ek, model=model,
        max_model_len=settings["max_model_len"], num_gpu_blocks=settings["num_gpu_blocks"], workload=workload,
        workload_path=workload_path, real=real, real_timeseries=ts, real_makespan_s=makespan,
        real_timeseries_instances=per_inst, real_summary=summary, settings=settings, assumed=assumed,
        tick_s=float(tick),
    )


def measured_arrival_workload(case: Case) -> Workload:
    """The case's workload driven by the measured arrivals (REFERENCE.md §4.2, optional):
    ``arrival_s - arrival_s[0]`` + the trace's first arrival, in ns. Per-request cases only."""
    if case.real is None:
        raise JaxsimInputError(str(case.case_dir / "vllm" / "requests.jsonl"), "file not found",
                               "measured arrivals need per-request data")
    arr = case.real["arrival_s"]
    ns = np.rint((arr - arr[0]) * 1e9).astype(np.int64) + int(case.workload.arrival_ns[0])
    ns = ns - min(0, int(ns.min()))
    return dataclasses.replace(case.workload, arrival_ns=ns,
                               source=f"{case.workload.source} (measured arrivals)")


# ------------------------------------------------------------------------------------------------
# case -> simulator inputs
# ------------------------------------------------------------------------------------------------


def case_to_spec(case: Case, profiles_dir=None) -> tuple[HardwareConfig, SchedulerConfig, ModelRuntimeConfig]:
    """Simulator inputs of a single-instance case (see :func:`case_to_cluster`)."""
    specs, rt, _ = case_to_cluster(case, profiles_dir)
    if len(specs) != 1:
        raise JaxsimInputError(f"{case.cluster_path}", f"{len(specs)} instances (data parallelism or several "
                               "instances)", "use case_to_cluster and simulate_cluster")
    return specs[0].hw, specs[0].sched, rt


def profile_name(hardware: str, profiles_dir) -> tuple[str, str | None]:
    """The profile folder of config.json's ``hardware`` under ``profiles_dir``: the name itself, or
    ``legacy/<name>`` when only the legacy-format profiles exist (REFERENCE.md §2.8); the second
    value says so (None when the name is used as is, or without ``profiles_dir``)."""
    if profiles_dir is None or (Path(profiles_dir) / hardware).is_dir():
        return hardware, None
    if (Path(profiles_dir) / "legacy" / hardware).is_dir():
        return f"legacy/{hardware}", (f"hardware={hardware!r}: no native profile bundle; the legacy-format profiles "
                                      f"legacy/{hardware} (converted at load time, REFERENCE.md §2.8)")
    return hardware, None


def case_to_cluster(case: Case, profiles_dir=None) -> tuple[list, ModelRuntimeConfig, LinkConfig]:
    """Simulator inputs of a case: ``(list[InstanceSpec], runtime config, links)``.

    Per setting: meta.json's record, then the instance's runtime overrides in config.json, then
    the default :func:`engine_settings` names in ``case.assumed``. The KV block count is meta.json's
    ``kv_cache.num_gpu_blocks`` when recorded (per rank). ``async_scheduling`` follows the engine
    settings (vLLM's default for the version when not recorded). With ``profiles_dir``, a hardware
    name with only legacy profiles maps to ``legacy/<name>`` (:func:`profile_name`).

    ``engine_kwargs.data_parallel_size`` = dp > 1 runs dp engines in one DP group (vLLM's data
    parallelism; wave-synchronised for MoE models): a config.json with one instance is replicated
    dp times, or it lists the dp instances of one ``dp_group``. ``enable_expert_parallel`` spreads
    a MoE model's experts over ``tp * dp`` ranks (else each instance's TP ranks shard them).
    """
    ek = case.engine_kwargs
    dp = int(ek.get("data_parallel_size") or 1)
    insts = case.instances
    if dp > 1:
        if len(insts) == 1:
            insts = [(*insts[0][:2], {**insts[0][2], "dp_group": insts[0][2].get("dp_group") or "dp"})] * dp
        groups = {inst.get("dp_group") for _, _, inst in insts}
        if len(insts) != dp or len(groups) != 1 or None in groups:
            raise JaxsimInputError(f"{case.meta_path}: engine_kwargs.data_parallel_size",
                                   f"dp={dp} but {case.cluster_path} lists {len(insts)} instance(s) in DP groups "
                                   f"{sorted(map(str, groups))}", "list one instance, or dp instances of one dp_group")
    expert_parallel = bool(ek.get("enable_expert_parallel")) and case.model.is_moe
    specs = [_instance_spec(case, ni, ii, inst, dp=dp, expert_parallel=expert_parallel, profiles_dir=profiles_dir)
             for ni, ii, inst in insts]
    s = case.settings
    rt = ModelRuntimeConfig(name=case.model.name, dtype=s["dtype"], kv_cache_dtype=s["kv_cache_dtype"],
                            max_model_len=int(case.max_model_len))
    return specs, rt, _links(case)


def case_kv_tier(case: Case) -> KVTierConfig:
    """The KV tier below the GPU of a case (``engine_settings``' ``kv_tier``: an LMCache connector
    is a CPU tier), its device from config.json's ``cpu_mem``; ``KVTierConfig()`` (none)
    otherwise."""
    t = case.settings.get("kv_tier")
    if not t:
        return KVTierConfig()
    return tier_from_cluster_json(KVTierConfig(**t), case.cluster_path, case.cluster)


def case_power(case: Case) -> "power_lib.PowerConfig | None":
    """The nodes' power blocks of a case's config.json (for the ISPASS power case, the reference
    authors' parameters fitted to its logs), None when it has none."""
    return power_from_cluster_json(case.cluster_path, case.cluster)


def power_columns(series: dict, num_npus: int) -> dict:
    """The simulated counterparts of the measured power columns: ``gpu_power_w`` (one GPU: the NPU
    watts of the cluster / its NPUs; the cases measure GPU 0 of identical GPUs) and
    ``server_power_w`` (the node's wall power: every modelled component). Empty without power."""
    if "power_w" not in series:
        return {}
    return {"gpu_power_w": np.asarray(series["npu_power_w"]) / num_npus, "server_power_w": series["power_w"]}


def case_router(case: Case) -> Router:
    """The router of a multi-instance case (``engine_settings``'s ``routing``: meta.json's routing,
    vLLM's DP load balancer for DP ranks, else the assumed policy)."""
    return Router(case.settings.get("routing") or "least_loaded")


def _links(case: Case) -> LinkConfig:
    bws, lats = case.cluster["link_bw"], case.cluster["link_latency"]
    return json_links(bws if isinstance(bws, list) else [bws], lats if isinstance(lats, list) else [lats])


def _instance_spec(case: Case, ni: int, ii: int, inst: dict, *, dp: int, expert_parallel: bool,
                   profiles_dir=None) -> InstanceSpec:
    ip = f"{case.cluster_path}: nodes[{ni}].instances[{ii}]"
    ek = case.engine_kwargs
    s = case.settings
    tp, pp = inst["tp_size"], inst["pp_size"]
    ek_tp = ek.get("tensor_parallel_size")
    if ek_tp is not None and int(ek_tp) != tp:
        raise JaxsimInputError(f"{ip}.tp_size", f"is {tp} but {case.meta_path} ran "
                               f"tensor_parallel_size {ek_tp}", "make them equal")
    ek_pp = ek.get("pipeline_parallel_size")
    if ek_pp is not None and int(ek_pp) != pp:
        raise JaxsimInputError(f"{ip}.pp_size", f"is {pp} but {case.meta_path} ran "
                               f"pipeline_parallel_size {ek_pp}", "make them equal")

    def pick(ek_key, inst_key):
        """What vLLM ran (engine_kwargs) > this instance's override in config.json > the settings."""
        if ek.get(ek_key) is not None:
            return ek[ek_key]
        if inst_key is not None and inst.get(inst_key) is not None:
            return inst[inst_key]
        return s[ek_key]

    base = HardwareConfig(mem_util=VLLM_DEFAULTS["gpu_memory_utilization"], num_gpu_blocks=case.num_gpu_blocks)
    name, _ = profile_name(inst["hardware"], profiles_dir)
    hw = json_hardware({**inst, "hardware": name}, case.cluster["nodes"][ni]["cpu_mem"], _links(case), base,
                       tp=tp, pp=pp, ep=int(tp) * dp if expert_parallel else int(inst.get("ep_size") or 0))
    recorded_util = ek.get("gpu_memory_utilization", (case.meta.get("kv_cache") or {}).get("gpu_memory_utilization"))
    if recorded_util is not None:  # what vLLM ran beats the config's npu_mem.mem_util
        hw = dataclasses.replace(hw, mem_util=float(recorded_util))
    sched = SchedulerConfig(
        max_num_seqs=int(pick("max_num_seqs", "max_num_seqs")),
        max_num_batched_tokens=int(pick("max_num_batched_tokens", "max_num_batched_tokens")),
        enable_chunked_prefill=bool(pick("enable_chunked_prefill", "enable_chunked_prefill")),
        long_prefill_token_threshold=int(pick("long_prefill_token_threshold", "long_prefill_token_threshold")),
        reserve_full_isl=bool(pick("scheduler_reserve_full_isl", "reserve_full_isl")),
        enable_prefix_caching=bool(pick("enable_prefix_caching", "enable_prefix_caching")),
        block_size=int(pick("block_size", "block_size")),
        async_scheduling=bool(s["async_scheduling"]),
    )
    group = inst.get("dp_group")
    return InstanceSpec(hw, sched, role=inst.get("pd_type") or "colocated", node=ni,
                        dp_group=None if group is None else str(group))


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------


def _diff_pct(real, sim):
    if real is None or sim is None or real == 0 or not math.isfinite(real) or not math.isfinite(sim):
        return None
    return (sim - real) / real * 100.0


def _f(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _sim_ms(sim_table: dict) -> dict:
    for k in ("request_id", "ttft_ns", "tpot_ns", "e2e_ns", "arrival_ns", "end_ns"):
        if k not in sim_table:
            raise JaxsimInputError("sim_table", f"missing column {k!r}",
                                   "pass jaxsim.metrics.request_table(result)")
    return {
        "request_id": np.asarray(sim_table["request_id"]).astype(np.int64),
        "ttft": np.asarray(sim_table["ttft_ns"], dtype=np.float64) / 1e6,
        "tpot": np.asarray(sim_table["tpot_ns"], dtype=np.float64) / 1e6,
        "e2e": np.asarray(sim_table["e2e_ns"], dtype=np.float64) / 1e6,
    }


# --- time series --------------------------------------------------------------------------------


def _is_gauge(column: str) -> bool:
    return column not in THROUGHPUT_COLUMNS


def pad(values, n: int, gauge: bool) -> np.ndarray:
    """``values`` cut or padded to ``n`` rows: throughputs with 0, gauges with their last value
    (0 when empty)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size >= n:
        return a[:n]
    fill = (a[-1] if a.size else 0.0) if gauge else 0.0
    return np.concatenate([a, np.full(n - a.size, fill)])


def busy_ticks(real: dict, n: int) -> np.ndarray:
    """Rows (of ``n``) where the measurement is busy: non-zero prompt or generation throughput, or
    running + waiting > 0, over the columns the measurement has (validation README)."""
    busy = np.zeros(n, dtype=bool)
    for c in THROUGHPUT_COLUMNS:
        if c in real:
            busy |= pad(real[c], n, False) != 0
    queue = [pad(real[c], n, True) for c in ("running", "waiting") if c in real]
    if queue:
        busy |= np.sum(queue, axis=0) > 0
    return busy


def _nmae(a: np.ndarray, b: np.ndarray, busy: np.ndarray):
    """(MAE, nMAE) over the busy rows: mean |b - a|, and that over mean |a| (None when undefined)."""
    if not busy.any():
        return None, None
    mae = float(np.abs(b[busy] - a[busy]).mean())
    denom = float(np.abs(a[busy]).mean())
    return mae, (mae / denom if denom > 0 else None)


def lagged_nmae(real, sim, busy: np.ndarray, lag: int) -> float | None:
    """nMAE over ``busy`` of measured row t against simulated row t + ``lag`` (throughput padding:
    rows outside the simulated series are 0). ``lag = +1``: the measurement runs one row ahead of
    the simulation (a pulse's measured prompt spike one row before the simulated one)."""
    n = busy.shape[0]
    a = pad(real, n, False)
    s = np.asarray(sim, dtype=np.float64)
    idx = np.arange(n) + lag
    inside = (idx >= 0) & (idx < s.size)
    shifted = np.zeros(n)
    shifted[inside] = s[idx[inside]]
    return _nmae(a, shifted, busy)[1]


def _last_active(x: np.ndarray):
    nz = np.nonzero(x > 0)[0]
    return int(nz[-1]) + 1 if nz.size else None


def score_series(real, sim, busy: np.ndarray, column: str, *, cumulative: bool = False, tick_s: float = 1.0,
                 lags: tuple = ()) -> dict:
    """Score one column over rows t = 1 ... len(busy) (the longer of the two series).

    Returns ``{"mae", "nmae"}`` over the busy rows (nMAE = mean |sim - real| / mean |real|),
    ``"corr"`` (Pearson over all rows; None when a side is constant), ``"total_real"`` /
    ``"total_sim"`` (Σ value x tick: tokens, for throughputs; else None), ``"last_tick_real"`` /
    ``"last_tick_sim"`` (last row > 0, for throughputs and running/waiting; else None),
    ``"final_real"`` / ``"final_sim"`` (last row, for cumulative gauges; else None), ``"busy_ticks"``,
    ``"rows"``; with ``lags``, ``"best_lag"`` and ``"best_lag_nmae"`` (:func:`lagged_nmae`, the
    smallest; ties go to the lag nearest 0) and ``"lag_nmae"`` (every lag's).
    """
    n = busy.shape[0]
    gauge = _is_gauge(column)
    a, b = pad(real, n, gauge), pad(sim, n, gauge)
    mae, nmae = _nmae(a, b, busy)
    corr = None
    if n > 1 and a.std() > 0 and b.std() > 0:
        corr = float(np.corrcoef(a, b)[0, 1])
    out = {"mae": mae, "nmae": nmae, "corr": corr, "total_real": None, "total_sim": None,
           "last_tick_real": None, "last_tick_sim": None, "final_real": None, "final_sim": None,
           "busy_ticks": int(busy.sum()), "rows": int(n)}
    if not gauge:
        out["total_real"], out["total_sim"] = float(a.sum() * tick_s), float(b.sum() * tick_s)
    if not gauge or column in ("running", "waiting"):
        out["last_tick_real"], out["last_tick_sim"] = _last_active(a), _last_active(b)
    if cumulative:
        out["final_real"], out["final_sim"] = (float(a[-1]), float(b[-1])) if n else (None, None)
    if lags:
        by_lag = {int(lag): lagged_nmae(real, sim, busy, int(lag)) for lag in lags}
        valid = {k: v for k, v in by_lag.items() if v is not None}
        out["lag_nmae"] = {str(k): v for k, v in by_lag.items()}
        if valid:
            best = min(valid, key=lambda k: (valid[k], abs(k)))
            out["best_lag"], out["best_lag_nmae"] = best, valid[best]
        else:
            out["best_lag"], out["best_lag_nmae"] = None, None
    return out


def _sim_column(column: str, counts_cached: bool) -> str:
    """The simulated series a measured column is compared with."""
    if column == "kv_cache_pct" and counts_cached:
        return "kv_cache_cached_pct"
    return column


def _missing_reason(column: str, counts_cached: bool) -> str:
    if column in NOT_SIMULATED:
        return NOT_SIMULATED[column]
    if column in ("gpu_power_w", "server_power_w"):
        return "the case's config.json has no node power block, so the simulation meters no power"
    if column in ("cpu_prefix_hit_pct", "cpu_pool_gib"):
        return "the case has no CPU KV tier (no LMCache connector recorded), so the simulation has none"
    if column == "prefix_hit_pct":
        return ("the simulation does not record the prefix-cache counters per iteration "
                "(SimResult.iter_prefix_queried / iter_prefix_hits)")
    if column in ("kv_cache_pct", "gpu_mem_gib") and counts_cached:
        return ("the measured gauge counts cached-but-free blocks (vLLM 0.13 with prefix caching); the simulation "
                "does not record them per iteration (SimResult.iter_kv_blocks_cached)")
    return "the simulation has no such series"


def compare_timeseries(real: dict, sim: dict, *, counts_cached: bool = False, pulse: bool = False,
                       tick_s: float = 1.0) -> tuple[dict, dict, dict]:
    """Score every measured column of ``real`` against ``sim`` (rows t = 1 ... max of both).

    ``kv_cache_pct`` is compared with the simulated ``kv_cache_cached_pct`` (pinned + cached blocks)
    when ``counts_cached``; its final value (and gpu_mem_gib's) is then reported, as for the
    cumulative gauges. ``pulse``: ``prompt_throughput`` also gets the best lag in {-1, 0, +1}.

    Returns:
      ``(scores, not_simulated, not_recorded)``: ``{column: score_series(...)}``, ``{column:
      reason}`` for measured columns the simulation lacks, ``{column: reason}`` for columns the
      measurement holds but did not record (kv_cache_pct 0 in every row).
    """
    cols = [c for c in real if c != "t"]
    n = max([len(real["t"])] + [len(np.asarray(sim[c])) for c in sim if c != "t"] if sim else [len(real["t"])])
    busy = busy_ticks(real, n)
    scores, missing, unrecorded = {}, {}, {}
    for c in cols:
        if c == "kv_cache_pct" and not np.any(real[c]):
            unrecorded[c] = "0 in every row: not recorded by this run"
            continue
        sc = _sim_column(c, counts_cached)
        if sc not in sim or (c in NOT_SIMULATED):
            missing[c] = _missing_reason(c, counts_cached)
            continue
        cumulative = c in CUMULATIVE_GAUGES or (counts_cached and c in ("kv_cache_pct", "gpu_mem_gib"))
        lags = LAGS if (pulse and c == "prompt_throughput") else ()
        scores[c] = score_series(real[c], sim[sc], busy, c, cumulative=cumulative, tick_s=tick_s, lags=lags)
    return scores, missing, unrecorded


def gpu_mem_series(series: dict, weights_gib: float, block_gib: float, num_blocks: int, *,
                   counts_cached: bool, instances: int = 1) -> np.ndarray | None:
    """A simulated ``gpu_mem_gib`` as the measured one is defined (weights + KV usage x KV pool):
    ``instances x weights_gib + pct / 100 x num_blocks x block_gib``, the KV usage being the series'
    ``kv_cache_cached_pct`` when the measured gauge counts cached blocks, else ``kv_cache_pct``
    (None when that series is missing). For a cluster pass the summed ``num_blocks`` and the count."""
    col = "kv_cache_cached_pct" if counts_cached else "kv_cache_pct"
    if col not in series:
        return None
    return instances * weights_gib + np.asarray(series[col], dtype=np.float64) / 100 * num_blocks * block_gib


# --- summary.json (vllm bench serve) -------------------------------------------------------------


def _stat(values: np.ndarray, stat: str):
    if values.size == 0:
        return None
    if stat == "mean":
        return float(values.mean())
    if stat == "median":
        return float(np.median(values))
    if stat == "std":
        return float(values.std())
    return float(np.percentile(values, float(stat[1:])))


def bench_summary(sim_table: dict, keys) -> dict:
    """The simulated side of ``vllm/summary.json``'s ``keys``, computed the way `vllm bench serve`
    does: durations from the first request sent (arrival) to the last completion; ``ttft`` and
    ``e2el`` over requests; ``tpot`` per request (E2E - TTFT) / (output - 1) for outputs > 1, then
    the statistic; ``itl`` over all inter-token gaps of all requests (``itl_ns`` lists); ``std`` the
    population standard deviation, ``p<N>`` numpy's linear percentile. Times in ms."""
    arrival = np.asarray(sim_table["arrival_ns"], dtype=np.float64)
    first = np.asarray(sim_table["first_token_ns"], dtype=np.float64)
    end = np.asarray(sim_table["end_ns"], dtype=np.float64)
    out_toks = np.asarray(sim_table["output"], dtype=np.int64)
    in_toks = np.asarray(sim_table["input"], dtype=np.int64)
    n = int(arrival.size)
    duration = float(end.max() - arrival.min()) / 1e9 if n else 0.0
    multi = out_toks > 1
    gaps = [np.asarray(g, dtype=np.float64) for g in sim_table.get("itl_ns", [])]
    values = {
        "ttft": (first - arrival) / 1e6,
        "e2el": (end - arrival) / 1e6,
        "tpot": (end[multi] - first[multi]) / (out_toks[multi] - 1) / 1e6,
        "itl": (np.concatenate(gaps) if gaps else np.zeros(0)) / 1e6,
    }

    def rate(x):
        return x / duration if duration > 0 else None

    fixed = {"completed_requests": float(n), "duration_s": duration, "input_tokens_total": float(in_toks.sum()),
             "output_tokens_total": float(out_toks.sum()), "request_throughput_req_s": rate(n),
             "output_throughput_tok_s": rate(float(out_toks.sum())),
             "total_token_throughput_tok_s": rate(float(in_toks.sum() + out_toks.sum()))}
    out = {}
    for key in keys:
        if key in fixed:
            out[key] = fixed[key]
            continue
        m = _SUMMARY_STAT_RE.match(key)
        if not m:
            raise KeyError(key)
        out[key] = _stat(values[m.group(1)], m.group(2))
    return out


# --- the whole comparison ------------------------------------------------------------------------


def _per_request(case: Case, sim_table: dict) -> tuple[dict, dict]:
    """§4.4 unpaired statistics and §4.5 paired errors (per-request cases)."""
    sim = _sim_ms(sim_table)
    real = {m: case.real[f"{m}_ms"] for m in METRICS}

    stats = {}
    for m in METRICS:
        rs, ss = distribution_stats(real[m]), distribution_stats(sim[m])
        for s in STAT_NAMES:
            stats[f"{m}_{s}"] = {"real": _f(rs[s]), "sim": _f(ss[s]),
                                 "diff_pct": _diff_pct(rs[s], ss[s])}

    paired = {}
    ids = sim["request_id"]
    ok = (ids >= 0) & (ids < case.workload.num_requests)
    for m in METRICS:
        r = real[m][ids[ok]]
        s = sim[m][ok]
        valid = r != 0
        e = (s[valid] - r[valid]) / r[valid] * 100.0
        eid = ids[ok][valid]
        if e.size:
            worst = np.argsort(-np.abs(e), kind="stable")[:5]
            paired[m] = {
                "mean_abs_pct": float(np.abs(e).mean()),
                "median_abs_pct": float(np.median(np.abs(e))),
                "signed_mean_pct": float(e.mean()),
                "worst": [[int(eid[j]), float(e[j])] for j in worst],
            }
        else:
            paired[m] = {"mean_abs_pct": None, "median_abs_pct": None, "signed_mean_pct": None,
                         "worst": []}
    arrival = np.asarray(sim_table["arrival_ns"], dtype=np.int64)
    end = np.asarray(sim_table["end_ns"], dtype=np.int64)
    sim_makespan = float(end.max() - arrival.min()) / 1e9 if end.size else math.nan
    paired["makespan_s"] = {"real": _f(case.real_makespan_s), "sim": _f(sim_makespan),
                            "diff_pct": _diff_pct(case.real_makespan_s, sim_makespan)}
    return stats, paired


def compare(case: Case, sim_table: dict | None = None, sim_timeseries: dict | None = None,
            sim_instances: dict | None = None) -> dict:
    """Score a simulation against the case's measurements; a section is present when the case has
    that kind of measurement (and the simulated side was given).

    Args:
      sim_table: the per-request table of :func:`jaxsim.metrics.request_table` (``request_id``,
        ``ttft_ns``, ``tpot_ns``, ``e2e_ns``, ``arrival_ns``, ``end_ns``; for a summary.json also
        ``first_token_ns``, ``input``, ``output``, ``itl_ns``).
      sim_timeseries: the cluster's series (:func:`jaxsim.metrics.time_series` on trace time,
        ``origin_ns=0``; plus ``gpu_mem_gib`` from :func:`gpu_mem_series` where measured).
      sim_instances: ``{k: series}`` of each instance, for the ``timeseries.inst<k>.csv`` files.

    Returns:
      * ``"stats"`` (requests.jsonl): ``{"<m>_<s>": {"real", "sim", "diff_pct"}}`` for m in
        ttft/tpot/e2e and s in mean/median/p90/p95/p99 (ms; numpy linear percentiles, each side
        over all of its requests);
      * ``"paired"`` (requests.jsonl): ``{m: {"mean_abs_pct", "median_abs_pct", "signed_mean_pct",
        "worst": [[id, err%] x 5]}, "makespan_s": {"real", "sim", "diff_pct"}}`` (requests joined
        on id; those whose measured value is 0 are left out of the ratios);
      * ``"summary"`` (summary.json): ``{key: {"real", "sim", "diff_pct"}}`` (:func:`bench_summary`);
      * ``"timeseries"`` (timeseries.csv): ``{column: score_series(...)}`` (:func:`compare_timeseries`),
        and ``"timeseries_instances"``: ``{"<k>": {column: ...}}`` for the per-instance files;
      * ``"not_simulated"``: ``{column: reason}`` for measured columns without a simulated series
        (``"instance <k>: <column>"`` for per-instance ones), ``"not_recorded"``: columns present
        but not recorded by the run.
      Undefined numbers (division by zero) are None.
    """
    out = {}
    if case.real is not None and sim_table is not None:
        out["stats"], out["paired"] = _per_request(case, sim_table)
    if case.real_summary is not None and sim_table is not None:
        sim = bench_summary(sim_table, case.real_summary)
        out["summary"] = {k: {"real": v, "sim": _f(sim[k]), "diff_pct": _diff_pct(v, sim[k])}
                          for k, v in case.real_summary.items()}
    if case.real_timeseries is not None and sim_timeseries is not None:
        cached = bool(case.settings.get("kv_cache_pct_counts_cached"))
        out["timeseries"], missing, unrecorded = compare_timeseries(
            case.real_timeseries, sim_timeseries, counts_cached=cached, pulse=case.pulse, tick_s=case.tick_s)
        if case.real_timeseries_instances and sim_instances is not None:
            out["timeseries_instances"] = {}
            for k, real in sorted(case.real_timeseries_instances.items()):
                if k not in sim_instances:
                    raise JaxsimInputError("sim_instances", f"no simulated series of instance {k}",
                                           "pass every instance's time_series(result, instance=k)")
                sc, m, u = compare_timeseries(real, sim_instances[k], counts_cached=cached, pulse=case.pulse,
                                              tick_s=case.tick_s)
                out["timeseries_instances"][str(k)] = sc
                missing.update({f"instance {k}: {c}": r for c, r in m.items()})
                unrecorded.update({f"instance {k}: {c}": r for c, r in u.items()})
        out["not_simulated"] = missing
        out["not_recorded"] = unrecorded
    return out


_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "e2e": "Latency"}
_STAT_LABELS = {"mean": "Mean", "median": "Median", "p90": "P90", "p95": "P95", "p99": "P99"}


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:+.1f}%"


def _format_timeseries(title: str, scores: dict) -> list:
    lines = ["", f"{title:<22}{'MAE':>10}{'nMAE':>8}{'corr':>8}{'total real':>13}{'total sim':>12}"
             f"{'last t':>9}{'final real':>12}{'final sim':>11}", "-" * 105]
    for col, v in scores.items():
        total = (f"{_num(v['total_real'], ',.0f'):>13}{_num(v['total_sim'], ',.0f'):>12}"
                 if v["total_real"] is not None else f"{'':>25}")
        last = (f"{_num(v['last_tick_real'], 'd')}/{_num(v['last_tick_sim'], 'd')}"
                if v["last_tick_real"] is not None or v["last_tick_sim"] is not None else "")
        final = (f"{_num(v['final_real'], '.2f'):>12}{_num(v['final_sim'], '.2f'):>11}"
                 if v["final_real"] is not None else "")
        lines.append(f"{col:<22}{_num(v['mae'], '.2f'):>10}{_num(v['nmae'], '.3f'):>8}{_num(v['corr'], '.3f'):>8}"
                     f"{total}{last:>9}{final}")
        if v.get("best_lag") is not None:
            lags = ", ".join(f"{k}: {_num(x, '.3f')}" for k, x in v["lag_nmae"].items())
            lines.append(f"{'':<22}best lag {v['best_lag']:+d}: nMAE {v['best_lag_nmae']:.3f} (lags {lags})")
    return lines


def format_comparison(result: dict) -> str:
    """The §4.6 table (like ``validation/summary.txt``), the paired errors, the summary.json
    Diff%, the time-series scores (cluster, then each instance), what is not simulated and what
    was assumed; each part only when the comparison has it."""
    lines = []
    if result.get("case"):
        lines += [f"Case {result['case']}", ""]
    if "stats" in result:
        lines += [f"{'Metric':<25}{'vLLM':>12}{'Sim':>12}{'Diff%':>10}", "-" * 59]
        for mi, m in enumerate(METRICS):
            if mi:
                lines.append("")
            for s in STAT_NAMES:
                row = result["stats"][f"{m}_{s}"]
                lines.append(f"{_LABELS[m] + ' ' + _STAT_LABELS[s]:<25}{_num(row['real'], '.1f'):>12}"
                             f"{_num(row['sim'], '.1f'):>12}{_pct(row['diff_pct']):>10}")
    if "paired" in result:
        lines += ["", "Paired per-request error (sim vs vLLM, by request id)",
                  f"{'Metric':<10}{'mean|e|%':>10}{'median|e|%':>12}{'signed%':>10}  worst (id: err%)",
                  "-" * 80]
        for m in METRICS:
            p = result["paired"][m]
            worst = ", ".join(f"{i}: {e:+.1f}" for i, e in p["worst"])
            lines.append(f"{_LABELS[m]:<10}{_num(p['mean_abs_pct'], '.1f'):>10}"
                         f"{_num(p['median_abs_pct'], '.1f'):>12}"
                         f"{_num(p['signed_mean_pct'], '+.1f'):>10}  {worst}")
        mk = result["paired"]["makespan_s"]
        lines += ["", f"Makespan: vLLM {_num(mk['real'], '.1f')} s, sim {_num(mk['sim'], '.1f')} s "
                  f"({_pct(mk['diff_pct'])})"]
    if "summary" in result:
        lines += ["", f"{'summary.json (bench serve)':<32}{'vLLM':>12}{'Sim':>12}{'Diff%':>10}", "-" * 66]
        for k, row in result["summary"].items():
            lines.append(f"{k:<32}{_num(row['real'], ',.2f'):>12}{_num(row['sim'], ',.2f'):>12}"
                         f"{_pct(row['diff_pct']):>10}")
    if result.get("timeseries"):
        lines += _format_timeseries("Time series (1 s)", result["timeseries"])
    for k, scores in (result.get("timeseries_instances") or {}).items():
        lines += _format_timeseries(f"Instance {k}", scores)
    if result.get("timeseries") or result.get("not_simulated"):
        lines.append("(MAE and nMAE over busy ticks; last t: last active row, vLLM/sim)")
    if result.get("not_simulated"):
        lines += ["", "Not simulated (measured, no simulated series):"]
        lines += [f"  {c}: {r}" for c, r in result["not_simulated"].items()]
    if result.get("not_recorded"):
        lines += ["", "Not recorded by the run:"]
        lines += [f"  {c}: {r}" for c, r in result["not_recorded"].items()]
    if result.get("assumed"):
        lines += ["", "Assumed (not recorded by the case):"]
        lines += [f"  {a}" for a in result["assumed"]]
    return "\n".join(lines)
