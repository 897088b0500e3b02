"""Validation cases: a measured vLLM run next to the reference simulator's cluster config.

A case directory looks like ``profiles/validation/RTXPRO6000-Llama-3.1-8B/``::

    config.json            the reference's cluster config (REFERENCE.md §3.1)
    vllm/meta.json         engine_kwargs, dataset_path, num_requests, [kv_cache.num_gpu_blocks]
    vllm/requests.jsonl    per-request timestamps (§4.2)
    vllm/timeseries.csv    1-s ticks (§4.3)

:func:`load_case` parses and checks all of it, :func:`case_to_cluster` turns it into simulator inputs,
:func:`compare` scores a simulated per-request table (and time series) against the measurements
(§4.4 unpaired statistics, §4.5 paired errors), :func:`format_comparison` prints the result.
"""

import csv
import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np

from jaxsim.cluster_config import check_reference_keys, json_hardware, json_links
from jaxsim.errors import JaxsimInputError, unknown_key_fix
from jaxsim.metrics import STAT_NAMES, distribution_stats
from jaxsim.model import ModelConfig, dtype_bytes, load_model_config
from jaxsim.spec import HardwareConfig, InstanceSpec, LinkConfig, ModelRuntimeConfig, SchedulerConfig, Workload
from jaxsim.workload import check_context, iter_jsonl, load_workload

METRICS = ("ttft", "tpot", "e2e")
TIMESERIES_COMPARED = ("prompt_throughput", "gen_throughput", "running", "waiting")
_REAL_TS_COLUMNS = ("t", "prompt_throughput", "gen_throughput", "running", "waiting",
                    "kv_cache_pct")
_CLOCK_DOMAIN_GAP_S = 100_000.0  # arrival_time (epoch) vs *_ts (monotonic), REFERENCE.md §4.2

# vLLM v0.19.0 defaults for what meta.json does not record (REFERENCE.md §4.1)
VLLM_DEFAULTS = {
    "enable_chunked_prefill": True,
    "long_prefill_token_threshold": 0,
    "enable_prefix_caching": True,
    "block_size": 16,
    "gpu_memory_utilization": 0.9,
    "scheduler_reserve_full_isl": True,
}


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
    model: ModelConfig
    max_model_len: int  # engine_kwargs.max_model_len, or the model's max_position_embeddings
    num_gpu_blocks: int | None  # meta.json kv_cache.num_gpu_blocks when recorded
    workload: Workload
    workload_path: Path
    # measured per request, index = request id: request_id, input_toks, output_toks, arrival_s
    # (queued_ts when the clocks differ, §4.2), scheduled_s, first_token_s, last_token_s (monotonic
    # seconds) and ttft_ms, tpot_ms, e2e_ms (§4.4)
    real: dict
    real_timeseries: dict  # columns of vllm/timeseries.csv as float arrays
    real_makespan_s: float  # last completion - first arrival

    @property
    def instances(self) -> list:
        return [(ni, ii, inst) for ni, node in enumerate(self.cluster["nodes"])
                for ii, inst in enumerate(node["instances"])]


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
    if not path.is_file():
        raise JaxsimInputError(str(path), "file not found", "the case needs vllm/timeseries.csv")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise JaxsimInputError(f"{path}:1", "empty file", "expected a CSV header")
        header = [h.strip() for h in header]
        missing = [c for c in _REAL_TS_COLUMNS if c not in header]
        if missing:
            raise JaxsimInputError(f"{path}:1", f"missing columns {missing}",
                                   f"expected {','.join(_REAL_TS_COLUMNS)}")
        idx = {c: header.index(c) for c in _REAL_TS_COLUMNS}
        rows = {c: [] for c in _REAL_TS_COLUMNS}
        for lineno, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            for c, j in idx.items():
                try:
                    rows[c].append(float(row[j]))
                except (ValueError, IndexError):
                    raise JaxsimInputError(f"{path}:{lineno}", f"column {c!r} is not a number",
                                           "fix or delete the row") from None
    return {c: np.asarray(v, dtype=np.float64) for c, v in rows.items()}


# vLLM engine arguments a case may record: those jaxsim reads, and those it knows change nothing it
# models (logging, eager mode, seeds, connectors). vLLM has hundreds more, so another key is not an
# error but a warning with the nearest known name: a typo (max_num_seq) is then not silently ignored.
ENGINE_KWARGS_READ = ("model", "tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size",
                      "enable_expert_parallel", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size",
                      "enable_chunked_prefill", "enable_prefix_caching", "gpu_memory_utilization", "dtype",
                      "kv_cache_dtype", "long_prefill_token_threshold", "scheduler_reserve_full_isl")
ENGINE_KWARGS_IGNORED = ("seed", "enforce_eager", "kv_cache_metrics", "kv_transfer_config", "tokenizer",
                         "trust_remote_code", "disable_log_stats", "revision", "download_dir", "served_model_name")


def _warn_unknown_engine_kwargs(ek: dict, meta_path: Path) -> None:
    known = ENGINE_KWARGS_READ + ENGINE_KWARGS_IGNORED
    for key in ek:
        if key not in known:
            warnings.warn(f"{meta_path}: engine_kwargs.{key}: not a vLLM engine argument jaxsim reads; ignored "
                          f"({unknown_key_fix(key, known)})", stacklevel=3)


def load_case(case_dir: str | Path, models_dir: str | Path, workloads_dir: str | Path) -> Case:
    """Parse and check a validation case directory.

    ``meta.json``'s ``dataset_path`` is looked up by file name in ``workloads_dir`` and its first
    ``num_requests`` requests (0 or absent = all) are loaded; the model config comes from
    ``models_dir``.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise JaxsimInputError(str(case_dir), "validation case directory not found",
                               "point at a folder holding config.json and vllm/")
    cluster_path = case_dir / "config.json"
    cluster = check_cluster_config(_read_json(cluster_path), cluster_path)

    meta_path = case_dir / "vllm" / "meta.json"
    meta = _read_json(meta_path)
    c = _Checker(meta_path)
    ek = c.mapping(meta, "engine_kwargs", "engine_kwargs")
    _warn_unknown_engine_kwargs(ek, meta_path)
    for key in ("tensor_parallel_size", "data_parallel_size"):
        c.number(ek, key, f"engine_kwargs.{key}", required=False, integer=True, positive=True)
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        c.number(ek, key, f"engine_kwargs.{key}", integer=True)
    for key in ("enable_expert_parallel", "enable_chunked_prefill", "enable_prefix_caching"):
        if key in ek and not isinstance(ek[key], bool) and ek[key] is not None:
            raise c.err(f"engine_kwargs.{key}", f"must be true or false, got {ek[key]!r}")
    for key in ("dtype", "kv_cache_dtype"):
        v = ek.get(key)
        if v is not None and v != "auto":
            dtype_bytes(v, f"{meta_path}: engine_kwargs.{key}")

    model_name = meta.get("model") or ek.get("model")
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

    mml = ek.get("max_model_len")
    if mml is None:
        max_model_len = model.max_position_embeddings
    else:
        max_model_len = c.number(ek, "max_model_len", "engine_kwargs.max_model_len", integer=True,
                                 positive=True)
    kv = c.mapping(meta, "kv_cache", "kv_cache", required=False) or {}
    num_gpu_blocks = c.number(kv, "num_gpu_blocks", "kv_cache.num_gpu_blocks", required=False,
                              integer=True, positive=True)

    ds = c.string(meta, "dataset_path", "dataset_path")
    workload_path = Path(workloads_dir) / Path(ds).name
    if not workload_path.is_file():
        raise c.err("dataset_path", f"{Path(ds).name!r} not found in {workloads_dir}",
                    "copy the measured workload there or fix the workloads directory")
    num_requests = c.number(meta, "num_requests", "num_requests", required=False, integer=True,
                            default=0) or 0
    workload = load_workload(workload_path, num_requests)
    check_context(workload, max_model_len, f"{meta_path}: engine_kwargs.max_model_len")

    real, makespan = _load_real_requests(case_dir / "vllm" / "requests.jsonl", workload)
    ts = _load_real_timeseries(case_dir / "vllm" / "timeseries.csv")
    return Case(
        case_dir=case_dir, name=case_dir.name, cluster=cluster, cluster_path=cluster_path,
        meta=meta, meta_path=meta_path, engine_kwargs=ek, model=model,
        max_model_len=int(max_model_len), num_gpu_blocks=num_gpu_blocks, workload=workload,
        workload_path=workload_path, real=real, real_timeseries=ts, real_makespan_s=makespan,
    )


def measured_arrival_workload(case: Case) -> Workload:
    """The case's workload driven by the measured arrivals (REFERENCE.md §4.2, optional):
    ``arrival_s - arrival_s[0]`` + the trace's first arrival, in ns."""
    arr = case.real["arrival_s"]
    ns = np.rint((arr - arr[0]) * 1e9).astype(np.int64) + int(case.workload.arrival_ns[0])
    ns = ns - min(0, int(ns.min()))
    return dataclasses.replace(case.workload, arrival_ns=ns,
                               source=f"{case.workload.source} (measured arrivals)")


# ------------------------------------------------------------------------------------------------
# case -> simulator inputs
# ------------------------------------------------------------------------------------------------


def case_to_spec(case: Case) -> tuple[HardwareConfig, SchedulerConfig, ModelRuntimeConfig]:
    """Simulator inputs of a single-instance case (see :func:`case_to_cluster`)."""
    specs, rt, _ = case_to_cluster(case)
    if len(specs) != 1:
        raise JaxsimInputError(f"{case.cluster_path}", f"{len(specs)} instances (data parallelism or several "
                               "instances)", "use case_to_cluster and simulate_cluster")
    return specs[0].hw, specs[0].sched, rt


def case_to_cluster(case: Case) -> tuple[list, ModelRuntimeConfig, LinkConfig]:
    """Simulator inputs of a case: ``(list[InstanceSpec], runtime config, links)``.

    Precedence per setting: meta.json ``engine_kwargs`` (what vLLM actually ran) > the instance's
    runtime overrides in config.json > vLLM v0.19.0 defaults (:data:`VLLM_DEFAULTS`). The KV block
    count is meta.json's ``kv_cache.num_gpu_blocks`` when recorded (per rank).

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
    specs = [_instance_spec(case, ni, ii, inst, dp=dp, expert_parallel=expert_parallel) for ni, ii, inst in insts]
    rt = ModelRuntimeConfig(
        name=case.model.name,
        dtype=str(ek.get("dtype") or insts[0][2].get("dtype") or "auto"),
        kv_cache_dtype=str(ek.get("kv_cache_dtype") or insts[0][2].get("kv_cache_dtype") or "auto"),
        max_model_len=int(case.max_model_len),
    )
    return specs, rt, _links(case)


def _links(case: Case) -> LinkConfig:
    bws, lats = case.cluster["link_bw"], case.cluster["link_latency"]
    return json_links(bws if isinstance(bws, list) else [bws], lats if isinstance(lats, list) else [lats])


def _instance_spec(case: Case, ni: int, ii: int, inst: dict, *, dp: int, expert_parallel: bool) -> InstanceSpec:
    ip = f"{case.cluster_path}: nodes[{ni}].instances[{ii}]"
    ek = case.engine_kwargs
    tp, pp = inst["tp_size"], inst["pp_size"]
    ek_tp = ek.get("tensor_parallel_size")
    if ek_tp is not None and int(ek_tp) != tp:
        raise JaxsimInputError(f"{ip}.tp_size", f"is {tp} but {case.meta_path} ran "
                               f"tensor_parallel_size {ek_tp}", "make them equal")
    ek_pp = ek.get("pipeline_parallel_size")
    if ek_pp is not None and int(ek_pp) != pp:
        raise JaxsimInputError(f"{ip}.pp_size", f"is {pp} but {case.meta_path} ran "
                               f"pipeline_parallel_size {ek_pp}", "make them equal")

    def pick(ek_key, inst_key, default_key):
        if ek.get(ek_key) is not None:
            return ek[ek_key]
        if inst_key is not None and inst.get(inst_key) is not None:
            return inst[inst_key]
        return VLLM_DEFAULTS[default_key]

    util = ek.get("gpu_memory_utilization")
    base = HardwareConfig(mem_util=VLLM_DEFAULTS["gpu_memory_utilization"], num_gpu_blocks=case.num_gpu_blocks)
    hw = json_hardware(inst, case.cluster["nodes"][ni]["cpu_mem"], _links(case), base, tp=tp, pp=pp,
                       ep=int(tp) * dp if expert_parallel else int(inst.get("ep_size") or 0))
    if util is not None:  # what vLLM ran beats the config's npu_mem.mem_util
        hw = dataclasses.replace(hw, mem_util=float(util))
    sched = SchedulerConfig(
        max_num_seqs=int(ek["max_num_seqs"]),
        max_num_batched_tokens=int(ek["max_num_batched_tokens"]),
        enable_chunked_prefill=bool(pick("enable_chunked_prefill", "enable_chunked_prefill",
                                         "enable_chunked_prefill")),
        long_prefill_token_threshold=int(pick("long_prefill_token_threshold",
                                              "long_prefill_token_threshold",
                                              "long_prefill_token_threshold")),
        reserve_full_isl=bool(pick("scheduler_reserve_full_isl", "reserve_full_isl",
                                   "scheduler_reserve_full_isl")),
        enable_prefix_caching=bool(pick("enable_prefix_caching", "enable_prefix_caching",
                                        "enable_prefix_caching")),
        block_size=int(pick("block_size", "block_size", "block_size")),
    )
    group = inst.get("dp_group")
    return InstanceSpec(hw, sched, role=inst.get("pd_type") or "colocated", node=ni,
                        dp_group=None if group is None else str(group))


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------


def _diff_pct(real: float, sim: float):
    if real == 0 or not math.isfinite(real) or not math.isfinite(sim):
        return None
    return (sim - real) / real * 100.0


def _f(v):
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


def compare(case: Case, sim_table: dict, sim_timeseries: dict | None = None) -> dict:
    """Score a simulation against the case's measurements.

    Args:
      sim_table: the per-request table of :func:`jaxsim.metrics.request_table` (uses
        ``request_id``, ``ttft_ns``, ``tpot_ns``, ``e2e_ns``, ``arrival_ns``, ``end_ns``).
      sim_timeseries: :func:`jaxsim.metrics.time_series` of the run; ``"timeseries"`` is ``{}``
        when omitted.

    Returns:
      ``{"stats": {"<m>_<s>": {"real", "sim", "diff_pct"}}`` for m in ttft/tpot/e2e and s in
      mean/median/p90/p95/p99 (ms; numpy linear percentiles, each side over all of its requests),
      ``"paired": {m: {"mean_abs_pct", "median_abs_pct", "signed_mean_pct", "worst": [[id, err%]
      × 5]}, "makespan_s": {"real", "sim", "diff_pct"}}`` (requests joined on id; those whose
      measured value is 0 are left out of the ratios), ``"timeseries": {col: {"mae", "corr"}}`` for
      prompt_throughput, gen_throughput, running, waiting (sim bin k against row t = k, the shorter
      series padded with zeros; corr is None when either side is constant).
      Undefined numbers (division by zero) are None.
    """
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

    timeseries = {}
    if sim_timeseries is not None:
        for col in TIMESERIES_COMPARED:
            a = np.asarray(case.real_timeseries[col], dtype=np.float64)
            b = np.asarray(sim_timeseries[col], dtype=np.float64)
            n = max(a.size, b.size)
            a = np.pad(a, (0, n - a.size))
            b = np.pad(b, (0, n - b.size))
            mae = float(np.abs(b - a).mean()) if n else None
            corr = None
            if n > 1 and a.std() > 0 and b.std() > 0:
                corr = float(np.corrcoef(a, b)[0, 1])
            timeseries[col] = {"mae": mae, "corr": corr}
    return {"stats": stats, "paired": paired, "timeseries": timeseries}


_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "e2e": "Latency"}
_STAT_LABELS = {"mean": "Mean", "median": "Median", "p90": "P90", "p95": "P95", "p99": "P99"}


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def format_comparison(result: dict) -> str:
    """The §4.6 table (like ``validation/summary.txt``), then the paired and time-series errors."""
    lines = [f"{'Metric':<25}{'vLLM':>12}{'Sim':>12}{'Diff%':>10}", "-" * 59]
    for mi, m in enumerate(METRICS):
        if mi:
            lines.append("")
        for s in STAT_NAMES:
            row = result["stats"][f"{m}_{s}"]
            diff = "n/a" if row["diff_pct"] is None else f"{row['diff_pct']:+.1f}%"
            lines.append(f"{_LABELS[m] + ' ' + _STAT_LABELS[s]:<25}{_num(row['real'], '.1f'):>12}"
                         f"{_num(row['sim'], '.1f'):>12}{diff:>10}")
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
    mk_diff = "n/a" if mk["diff_pct"] is None else f"{mk['diff_pct']:+.1f}%"
    lines += ["", f"Makespan: vLLM {_num(mk['real'], '.1f')} s, sim {_num(mk['sim'], '.1f')} s "
              f"({mk_diff})"]
    if result.get("timeseries"):
        lines += ["", f"{'Time series (1 s)':<20}{'MAE':>12}{'corr':>10}", "-" * 42]
        for col, v in result["timeseries"].items():
            lines.append(f"{col:<20}{_num(v['mae'], '.2f'):>12}{_num(v['corr'], '.3f'):>10}")
    return "\n".join(lines)
