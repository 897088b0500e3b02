"""Request traces: the flat JSONL format (REFERENCE.md §3.3) and a synthetic generator.

Everything here is host-side numpy. A :class:`~jaxsim.spec.Workload` keeps requests in file-line
order (request id = position in the file, blank lines skipped); the engine sorts by arrival.

Token ids only drive prefix-cache hashing. When a line has ``input_tok_ids`` the request's ids are
``input_tok_ids + output_tok_ids`` (the output part may be absent); without ``input_tok_ids`` the
request has no ids (``None``) and can never hit the prefix cache.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from jaxsim.errors import JaxsimInputError
from jaxsim.spec import Workload

_INT32_MAX = 2**31 - 1
_FLAT_FIELDS = ("input_toks", "output_toks", "arrival_time_ns")


# ------------------------------------------------------------------------------------------------
# JSONL traces
# ------------------------------------------------------------------------------------------------


def _as_int(value, where: str, field: str) -> int:
    """An integer JSON value (integral floats such as ``1.0e6`` are accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JaxsimInputError(where, f"field {field!r} must be an integer, got {value!r}",
                               "write it as a JSON integer")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise JaxsimInputError(where, f"field {field!r} must be an integer, got {value!r}",
                                   "write it as a JSON integer")
        value = int(value)
    return value


def _token_ids(obj: dict, where: str, field: str) -> np.ndarray | None:
    ids = obj.get(field)
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise JaxsimInputError(where, f"field {field!r} must be a list of token ids, got "
                               f"{type(ids).__name__}", "write it as a JSON array of integers")
    try:
        arr = np.asarray(ids, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise JaxsimInputError(where, f"field {field!r} must contain only integers",
                               "write it as a JSON array of integers") from None
    if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX)):
        raise JaxsimInputError(where, f"field {field!r} must be a flat list of token ids in "
                               f"[0, {_INT32_MAX}]", "check the tokenizer output")
    return arr.astype(np.int32)


def iter_jsonl(path: Path):
    """Yield ``(line number, "file:line", object)`` for each non-blank line of a JSONL file,
    with a clear error for a line that is not one JSON object."""
    with Path(path).open(encoding="utf-8-sig") as f:  # (a byte-order mark is not part of line 1)
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise JaxsimInputError(where, f"invalid JSON: {e.msg} (column {e.colno})",
                                       "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise JaxsimInputError(where, f"expected a JSON object, got {type(obj).__name__}",
                                       "each line must be one JSON object")
            yield lineno, where, obj


_SESSION_FIELDS = ("session_id", "arrival_time_ns", "sub_requests")
_SUB_FIELDS = ("input_toks", "output_toks")


def _request(obj: dict, where: str, fields: tuple) -> dict:
    """The checked counts and token ids of one request (a flat line or a sub-request)."""
    vals = {}
    for field in fields:
        if field not in obj:
            raise JaxsimInputError(where, f"missing required field {field!r}",
                                   f"a request needs {', '.join(fields)}")
        vals[field] = _as_int(obj[field], where, field)
    if vals["input_toks"] < 1:
        raise JaxsimInputError(where, f"input_toks must be >= 1, got {vals['input_toks']}",
                               "every request needs a prompt")
    if vals["output_toks"] < 1:
        raise JaxsimInputError(where, f"output_toks must be >= 1, got "
                               f"{vals['output_toks']}", "every request generates at "
                               "least one token")
    if vals.get("arrival_time_ns", 0) < 0:
        raise JaxsimInputError(where, f"arrival_time_ns must be >= 0, got "
                               f"{vals['arrival_time_ns']}", "arrivals are ns from 0")
    in_ids = _token_ids(obj, where, "input_tok_ids")
    out_ids = _token_ids(obj, where, "output_tok_ids")
    vals["ids"] = in_ids if in_ids is None or out_ids is None else np.concatenate([in_ids, out_ids])
    return vals


def _sub_requests(obj: dict, where: str) -> list:
    """The sub-requests of a session line (REFERENCE.md §1.15), each with its tool time."""
    for field in _SESSION_FIELDS:
        if field not in obj:
            raise JaxsimInputError(where, f"missing required field {field!r}",
                                   f"a session line needs {', '.join(_SESSION_FIELDS)}")
    subs = obj["sub_requests"]
    if not isinstance(subs, list) or not subs or not all(isinstance(x, dict) for x in subs):
        raise JaxsimInputError(where, "field 'sub_requests' must be a non-empty list of objects",
                               "each sub-request has input_toks, output_toks and optional "
                               "tool_duration_ns")
    out = []
    for k, sub in enumerate(subs):
        here = f"{where} sub_requests[{k}]"
        vals = _request(sub, here, _SUB_FIELDS)
        vals["tool_ns"] = _as_int(sub.get("tool_duration_ns", 0), here, "tool_duration_ns")
        if vals["tool_ns"] < 0:
            raise JaxsimInputError(here, f"tool_duration_ns must be >= 0, got {vals['tool_ns']}",
                                   "it is the tool call's duration in ns")
        out.append(vals)
    return out


def load_workload(path: str | Path, num_requests: int = 0) -> Workload:
    """Read a JSONL trace: flat request lines and agentic session lines, which may be mixed.

    A session line (REFERENCE.md §1.15: ``session_id``, ``arrival_time_ns``, ``sub_requests``)
    gives one request per sub-request, in order. Sub-request 0 arrives at the session's arrival;
    sub-request i+1 is released when sub-request i finishes plus i's ``tool_duration_ns``.

    Args:
      path: the ``.jsonl`` file; blank lines skipped.
      num_requests: keep the first N requests, sub-requests included (0 = all). Asking for more
        than the file holds is an error. A session cut short keeps its first sub-requests.

    Returns:
      A :class:`Workload` in file order; ``line_numbers`` holds each request's 1-based line.
    """
    path = Path(path)
    if isinstance(num_requests, bool) or not isinstance(num_requests, (int, np.integer)) \
            or num_requests < 0:
        raise JaxsimInputError("num_requests", f"must be an integer >= 0, got {num_requests!r}",
                               "0 loads every request of the file")
    if not path.is_file():
        raise JaxsimInputError(str(path), "workload file not found", "check the path")
    arrival, inp, out, ids, lines, nxt, tool = [], [], [], [], [], [], []
    for lineno, where, obj in iter_jsonl(path):
        if num_requests and len(arrival) >= num_requests:
            break
        if "session_id" in obj or "sub_requests" in obj:
            t0 = _as_int(obj.get("arrival_time_ns", 0), where, "arrival_time_ns")
            if t0 < 0:
                raise JaxsimInputError(where, f"arrival_time_ns must be >= 0, got {t0}", "arrivals are ns from 0")
            reqs = _sub_requests(obj, where)
        else:
            reqs = [_request(obj, where, _FLAT_FIELDS)]
            t0 = reqs[0]["arrival_time_ns"]
        for k, vals in enumerate(reqs):
            if num_requests and len(arrival) >= num_requests:
                break
            if k:  # released by its predecessor, after the predecessor's tool call
                nxt[-1] = len(arrival)
            tool.append(reqs[k - 1]["tool_ns"] if k else 0)
            nxt.append(-1)
            arrival.append(t0)
            inp.append(vals["input_toks"])
            out.append(vals["output_toks"])
            ids.append(vals["ids"])
            lines.append(lineno)
    if not arrival:
        raise JaxsimInputError(str(path), "the workload has no requests",
                               "add request lines or pick another file")
    if num_requests and len(arrival) < num_requests:
        raise JaxsimInputError(str(path), f"has only {len(arrival)} requests, "
                               f"num_requests={num_requests} asked for more",
                               f"set num_requests to at most {len(arrival)} (0 = all)")
    for name, vals in (("input_toks", inp), ("output_toks", out)):
        big = int(np.argmax(vals))
        if vals[big] > _INT32_MAX:
            raise JaxsimInputError(f"{path}:{lines[big]}", f"{name} {vals[big]} is too large",
                                   f"use at most {_INT32_MAX}")
    sessions = any(x >= 0 for x in nxt)
    return Workload(
        arrival_ns=np.asarray(arrival, dtype=np.int64),
        input_toks=np.asarray(inp, dtype=np.int32),
        output_toks=np.asarray(out, dtype=np.int32),
        token_ids=ids,
        source=str(path),
        line_numbers=np.asarray(lines, dtype=np.int64),
        next_in_session=np.asarray(nxt, np.int32) if sessions else None,
        tool_ns=np.asarray(tool, np.int64) if sessions else None,
    )


def describe_request(workload: Workload, i: int) -> str:
    """``file:line`` of request ``i`` when it came from a file, else ``<source> request i``."""
    if workload.line_numbers is not None:
        return f"{workload.source}:{int(workload.line_numbers[i])}"
    return f"{workload.source} request {i}"


def check_context(workload: Workload, max_model_len: int, where: str = "max_model_len") -> None:
    """Raise when a request's ``input + output`` exceeds the model context ``max_model_len``.

    ``where`` names the setting that fixes the limit (e.g. ``model.max_model_len``).
    """
    total = workload.input_toks.astype(np.int64) + workload.output_toks.astype(np.int64)
    bad = np.nonzero(total > int(max_model_len))[0]
    if bad.size:
        i = int(bad[0])
        more = f" ({bad.size} requests in total)" if bad.size > 1 else ""
        raise JaxsimInputError(
            describe_request(workload, i),
            f"request {i} needs {int(total[i])} tokens (input {int(workload.input_toks[i])} + "
            f"output {int(workload.output_toks[i])}) but {where} is {int(max_model_len)}{more}",
            f"raise {where} (up to the model's max_position_embeddings) or drop the request")


def shift_workload(w: Workload, delta_ns: int) -> Workload:
    """The same workload with every arrival moved by ``delta_ns`` (may be negative)."""
    arrival = w.arrival_ns.astype(np.int64) + np.int64(int(delta_ns))
    if arrival.size and arrival.min() < 0:
        raise JaxsimInputError("delta_ns", f"shifting by {delta_ns} ns makes arrivals negative",
                               f"use delta_ns >= {-int(w.arrival_ns.min())}")
    return dataclasses.replace(w, arrival_ns=arrival, source=f"{w.source} shifted {delta_ns} ns")


# ------------------------------------------------------------------------------------------------
# Synthetic workloads
# ------------------------------------------------------------------------------------------------


def _num(spec: dict, key: str, where: str, *, default=None, integer=False, lo=None, lo_open=False):
    if key not in spec or spec[key] is None:
        if default is None:
            raise JaxsimInputError(f"{where}.{key}", "missing", f"set {where}.{key}")
        return default
    v = spec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or math.isnan(v):
        raise JaxsimInputError(f"{where}.{key}", f"must be a number, got {v!r}")
    if integer and (not math.isfinite(v) or float(v) != int(v)):
        raise JaxsimInputError(f"{where}.{key}", f"must be an integer, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise JaxsimInputError(f"{where}.{key}", f"must be {'>' if lo_open else '>='} {lo}, "
                               f"got {v!r}")
    return int(v) if integer else float(v)


_LENGTH_KEYS = {
    "fixed": {"kind", "value"},
    "uniform": {"kind", "min", "max"},
    "lognormal": {"kind", "mean", "sigma", "min", "max"},
    "trace": {"kind", "path", "num_requests"},
}


def _check_length_spec(spec, where: str) -> dict:
    if not isinstance(spec, dict) or "kind" not in spec:
        raise JaxsimInputError(where, f"must be a mapping with a 'kind', got {spec!r}",
                               f"kind is one of {sorted(_LENGTH_KEYS)}")
    kind = spec["kind"]
    if kind not in _LENGTH_KEYS:
        raise JaxsimInputError(f"{where}.kind", f"unknown length distribution {kind!r}",
                               f"use one of {sorted(_LENGTH_KEYS)}")
    # keys of another kind are ignored (a Hydra override of `kind` merges with the old keys)
    extra = sorted(set(spec) - set().union(*_LENGTH_KEYS.values()))
    if extra:
        raise JaxsimInputError(where, f"unknown keys {extra} for kind {kind!r}",
                               f"allowed: {sorted(_LENGTH_KEYS[kind])}")
    return spec


def _trace_lengths(spec: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    if "path" not in spec or not spec["path"]:
        raise JaxsimInputError(f"{where}.path", "missing", "name the JSONL trace to resample")
    n = _num(spec, "num_requests", where, default=0, integer=True, lo=0)
    w = load_workload(spec["path"], n)
    return w.input_toks, w.output_toks


def _sample_lengths(spec: dict, n: int, rng: np.random.Generator, where: str,
                    trace_idx: np.ndarray | None, trace_col: np.ndarray | None) -> np.ndarray:
    kind = spec["kind"]
    if kind == "fixed":
        v = _num(spec, "value", where, integer=True, lo=1)
        return np.full(n, v, dtype=np.int64)
    if kind == "uniform":
        lo = _num(spec, "min", where, integer=True, lo=1)
        hi = _num(spec, "max", where, integer=True, lo=1)
        if hi < lo:
            raise JaxsimInputError(f"{where}.max", f"must be >= {where}.min ({lo}), got {hi}")
        return rng.integers(lo, hi + 1, size=n, dtype=np.int64)
    if kind == "lognormal":
        mean = _num(spec, "mean", where, lo=0, lo_open=True)
        sigma = _num(spec, "sigma", where, lo=0)
        lo = _num(spec, "min", where, default=1, integer=True, lo=1)
        hi = _num(spec, "max", where, default=_INT32_MAX, integer=True, lo=1)
        if hi < lo:
            raise JaxsimInputError(f"{where}.max", f"must be >= {where}.min ({lo}), got {hi}")
        # mean is the mean of the lengths, sigma the std-dev of their log
        mu = math.log(mean) - 0.5 * sigma * sigma
        x = rng.lognormal(mu, sigma, size=n)
        return np.clip(np.rint(x), lo, hi).astype(np.int64)
    # trace: resample the lengths of a JSONL file (indices are shared by input and output when both
    # come from the same file, so their correlation is kept)
    return trace_col[trace_idx].astype(np.int64)


def synthetic_workload(
    num_requests: int,
    rate_rps: float,
    arrival: str = "poisson",
    cv: float = 1.0,
    input_len: dict | None = None,
    output_len: dict | None = None,
    seed: int = 0,
    prefix_len: int = 0,
    prefix_fraction: float = 0.0,
    num_prefixes: int = 1,
    start_ns: int = 0,
    where: str = "synthetic_workload",
) -> Workload:
    """Generate a random workload with ``np.random.default_rng(seed)``.

    Args:
      num_requests: number of requests (>= 1).
      rate_rps: mean arrival rate in requests/s; ``inf`` puts every arrival at ``start_ns``.
      arrival: ``"poisson"`` (exponential gaps) or ``"gamma"`` (gamma gaps with coefficient of
        variation ``cv``: shape ``1/cv**2``; ``cv > 1`` is burstier than Poisson).
      input_len, output_len: length distributions, one of
        ``{"kind": "fixed", "value": n}``, ``{"kind": "uniform", "min": a, "max": b}`` (inclusive),
        ``{"kind": "lognormal", "mean": m, "sigma": s, "min": a, "max": b}`` (``m`` the mean length,
        ``s`` the std-dev of log-length, rounded then clipped to ``[a, b]``, defaults 1 and 2^31-1),
        ``{"kind": "trace", "path": p, "num_requests": 0}`` (resample the lengths of a JSONL; when
        both come from the same file the (input, output) pairs are resampled jointly).
        Defaults: input lognormal mean 512 sigma 0.7 in [1, 4096]; output lognormal mean 256
        sigma 0.7 in [1, 2048].
      prefix_len: length of a shared system prompt; ``prefix_fraction`` of the requests (chosen at
        random) start with it. It is *prepended*: such a request's input is ``prefix_len`` plus its
        sampled length. ``num_prefixes`` > 1 draws that many distinct prompts, picked uniformly.
      start_ns: time of the first possible arrival (the first arrival is one gap later).
      where: prefix of error locations (e.g. ``workload`` for the Hydra group).

    Token ids are random in ``[0, 2^31-1)`` so that only the shared prefixes can hit the cache.
    """
    n = _num({"num_requests": num_requests}, "num_requests", where, integer=True, lo=1)
    rate = _num({"rate_rps": rate_rps}, "rate_rps", where, lo=0, lo_open=True)
    cv = _num({"cv": cv}, "cv", where, lo=0, lo_open=True)
    seed = _num({"seed": seed}, "seed", where, integer=True, lo=0)
    prefix_len = _num({"prefix_len": prefix_len}, "prefix_len", where, integer=True, lo=0)
    frac = _num({"prefix_fraction": prefix_fraction}, "prefix_fraction", where, lo=0)
    num_prefixes = _num({"num_prefixes": num_prefixes}, "num_prefixes", where, integer=True, lo=1)
    start_ns = _num({"start_ns": start_ns}, "start_ns", where, integer=True, lo=0)
    if frac > 1:
        raise JaxsimInputError(f"{where}.prefix_fraction", f"must be in [0, 1], got {frac}")
    if arrival not in ("poisson", "gamma"):
        raise JaxsimInputError(f"{where}.arrival", f"unknown arrival process {arrival!r}",
                               "use 'poisson' or 'gamma'")
    if input_len is None:
        input_len = {"kind": "lognormal", "mean": 512, "sigma": 0.7, "min": 1, "max": 4096}
    if output_len is None:
        output_len = {"kind": "lognormal", "mean": 256, "sigma": 0.7, "min": 1, "max": 2048}
    input_len = _check_length_spec(dict(input_len), f"{where}.input_len")
    output_len = _check_length_spec(dict(output_len), f"{where}.output_len")

    rng = np.random.default_rng(seed)

    # arrivals
    if math.isinf(rate):
        gaps_ns = np.zeros(n)
    elif arrival == "poisson":
        gaps_ns = rng.exponential(1e9 / rate, size=n)
    else:
        shape = 1.0 / (cv * cv)
        gaps_ns = rng.gamma(shape, 1e9 / (rate * shape), size=n)
    arrival_ns = start_ns + np.rint(np.cumsum(gaps_ns)).astype(np.int64)

    # lengths
    traces = {}  # (path, num_requests) -> (input lengths, output lengths, resampled indices)
    cols = {}
    for col, name, spec in ((0, "input_len", input_len), (1, "output_len", output_len)):
        idx = column = None
        if spec["kind"] == "trace":
            key = (str(spec.get("path")), spec.get("num_requests") or 0)
            if key not in traces:
                lens = _trace_lengths(spec, f"{where}.{name}")
                traces[key] = (*lens, rng.integers(0, lens[0].shape[0], size=n))
            column, idx = traces[key][col], traces[key][2]
        cols[name] = _sample_lengths(spec, n, rng, f"{where}.{name}", idx, column)
    inp, out = cols["input_len"], cols["output_len"]

    # shared prefixes
    has_prefix = np.zeros(n, dtype=bool)
    which = np.zeros(n, dtype=np.int64)
    prefixes = []
    if prefix_len > 0 and frac > 0:
        has_prefix = rng.random(n) < frac
        which = rng.integers(0, num_prefixes, size=n)
        prefixes = [rng.integers(0, _INT32_MAX, size=prefix_len, dtype=np.int32)
                    for _ in range(num_prefixes)]
        inp = inp + prefix_len * has_prefix
    if inp.max() > _INT32_MAX or out.max() > _INT32_MAX:
        raise JaxsimInputError(where, "a sampled length exceeds 2^31-1", "lower the length 'max'")

    token_ids = []
    for i in range(n):
        own = rng.integers(0, _INT32_MAX, size=int(inp[i] + out[i]) -
                           (prefix_len if has_prefix[i] else 0), dtype=np.int32)
        token_ids.append(np.concatenate([prefixes[which[i]], own]) if has_prefix[i] else own)

    desc = (f"synthetic(n={n}, rate={rate} rps, {arrival}"
            f"{f' cv={cv}' if arrival == 'gamma' else ''}, seed={seed})")
    return Workload(
        arrival_ns=arrival_ns,
        input_toks=inp.astype(np.int32),
        output_toks=out.astype(np.int32),
        token_ids=token_ids,
        source=desc,
    )
