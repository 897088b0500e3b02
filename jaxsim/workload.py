"""Request traces: the flat JSONL format (REFERENCE.md §3.3) and the generators: open-loop synthetic
arrivals (one rate or rate stages), closed-loop clients at a fixed concurrency, and shared system
prompts with multi-turn users.

Everything here is host-side numpy. A :class:`~jaxsim.spec.Workload` keeps requests in file-line
order (request id = position in the file, blank lines skipped); the engine sorts by arrival.

Token ids only drive prefix-cache hashing. When a line has ``input_tok_ids`` the request's ids are
``input_tok_ids + output_tok_ids`` (the output part may be absent); without ``input_tok_ids`` the
request has no ids (``None``) and can never hit the prefix cache.
"""

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np

from jaxsim.errors import JaxsimInputError, unknown_key_fix
from jaxsim.spec import ARRIVAL_HORIZON_NS, GENERATED_TOKEN_IDS, Workload

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
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind not in "iu":  # (1.5 would have been cut to 1, true read as 1)
            raise TypeError
        arr = arr.astype(np.int64)
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
_ID_FIELDS = ("input_tok_ids", "output_tok_ids")
# every field a line may have (REFERENCE.md §3.3, §1.15): anything else is a typo, not ignored
_KNOWN = {"flat": _FLAT_FIELDS + _ID_FIELDS, "session": _SESSION_FIELDS,
          "sub_request": _SUB_FIELDS + _ID_FIELDS + ("tool_duration_ns",)}


def _check_keys(obj: dict, where: str, kind: str) -> None:
    unknown = sorted(set(obj) - set(_KNOWN[kind]), key=str)
    if unknown:
        fix = unknown_key_fix(unknown[0], _KNOWN[kind])
        if {"input_length", "hash_ids"} & set(obj):
            fix = "this looks like a Mooncake trace: set workload.format=mooncake"
        raise JaxsimInputError(where, f"unknown field {unknown[0]!r} in a {kind.replace('_', '-')} line", fix)


def _check_horizon(arrival_ns: int, where: str) -> None:
    """An arrival before :data:`jaxsim.spec.ARRIVAL_HORIZON_NS` (2^62 ns, about 146 years): the
    engine adds durations to arrival times in int64 ns (an arrival at 2^63-1 ns used to stall or
    overflow the run)."""
    if arrival_ns >= ARRIVAL_HORIZON_NS:
        raise JaxsimInputError(where, f"arrival_time_ns {arrival_ns} is past the simulator clock's horizon of "
                               f"2^62 = {ARRIVAL_HORIZON_NS} ns (about 146 years)",
                               "arrival times are ns from 0 on the simulator clock")


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
    _check_horizon(vals.get("arrival_time_ns", 0), where)
    in_ids = _token_ids(obj, where, "input_tok_ids")
    out_ids = _token_ids(obj, where, "output_tok_ids")
    # The reference does not check id lengths against the counts (REFERENCE.md §3.3); neither does
    # the engine (the counts rule), but a mismatch is counted and reported by load_workload.
    vals["ids_mismatch"] = (in_ids is not None and len(in_ids) != vals["input_toks"]) or \
        (out_ids is not None and len(out_ids) != vals["output_toks"])
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
        _check_keys(sub, here, "sub_request")
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
    mismatched = []  # lines whose token ids do not have input_toks / output_toks entries
    for lineno, where, obj in iter_jsonl(path):
        if num_requests and len(arrival) >= num_requests:
            break
        if "session_id" in obj or "sub_requests" in obj:
            t0 = _as_int(obj.get("arrival_time_ns", 0), where, "arrival_time_ns")
            if t0 < 0:
                raise JaxsimInputError(where, f"arrival_time_ns must be >= 0, got {t0}", "arrivals are ns from 0")
            _check_horizon(t0, where)
            _check_keys(obj, where, "session")
            reqs = _sub_requests(obj, where)
        else:
            _check_keys(obj, where, "flat")
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
            if vals["ids_mismatch"]:
                mismatched.append(lineno)
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
    if mismatched:
        warnings.warn(f"{path}: {len(mismatched)} request(s) whose input_tok_ids / output_tok_ids do not have "
                      f"input_toks / output_toks entries (first: line {mismatched[0]}); the counts are simulated, "
                      "the ids only key the prefix cache (tokens past the ids are the request's own)", stacklevel=2)
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
            f"raise {where} (up to the model's max_position_embeddings) or drop the request"
            + ("; a public trace drops or clips such rows with workload.max_tokens (and workload.over_long=drop|clip)"
               if workload.import_stats is not None else ""))


def shift_workload(w: Workload, delta_ns: int, where: str = "delta_ns") -> Workload:
    """The same workload with every arrival moved by ``delta_ns`` (may be negative); the arrivals
    must stay in ``[0, ARRIVAL_HORIZON_NS)``. ``where`` names the setting in errors."""
    delta = int(delta_ns)
    lo, hi = int(w.arrival_ns.min()), int(w.arrival_ns.max())
    if lo + delta < 0 or hi + delta >= ARRIVAL_HORIZON_NS:
        raise JaxsimInputError(where, f"shifting by {delta} ns moves arrivals outside [0, 2^62) ns (the trace spans "
                               f"{lo} to {hi} ns)", f"use a value in [{-lo}, {ARRIVAL_HORIZON_NS - 1 - hi}]")
    arrival = w.arrival_ns.astype(np.int64) + np.int64(delta)
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


def length_spec(spec, where: str) -> dict:
    """A checked length distribution: a mapping with a ``kind`` (below), or a whole number ``n``,
    short for ``{"kind": "fixed", "value": n}`` (so ``workload.input_len=1024`` works on the
    command line). ``where`` names the setting in errors (e.g. ``workload.input_len``)."""
    if isinstance(spec, (int, float, np.integer, np.floating)) and not isinstance(spec, bool):
        if not math.isfinite(spec) or spec != int(spec) or spec < 1:
            raise JaxsimInputError(where, f"a fixed length must be a whole number >= 1, got "
                                   f"{spec!r}", f"e.g. {where}=1024")
        return {"kind": "fixed", "value": int(spec)}
    if not isinstance(spec, dict) or "kind" not in spec:
        raise JaxsimInputError(where, f"must be a length (a whole number) or a mapping with a "
                               f"'kind', got {spec!r}",
                               f"e.g. {where}=1024, or a mapping whose kind is one of "
                               f"{sorted(_LENGTH_KEYS)}")
    spec = dict(spec)
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


def _lengths(specs: dict, n: int, rng: np.random.Generator, where: str) -> list:
    """``n`` lengths per checked spec of ``specs`` (name -> spec), in order. Specs that resample the
    same trace share their indices, so e.g. (input, output) pairs of a trace stay paired."""
    traces = {}  # (path, num_requests) -> (input lengths, output lengths, resampled indices)
    out = []
    for col, (name, spec) in enumerate(specs.items()):
        idx = column = None
        if spec["kind"] == "trace":
            key = (str(spec.get("path")), spec.get("num_requests") or 0)
            if key not in traces:
                lens = _trace_lengths(spec, f"{where}.{name}")
                traces[key] = (*lens, rng.integers(0, lens[0].shape[0], size=n))
            column, idx = traces[key][min(col, 1)], traces[key][2]
        out.append(_sample_lengths(spec, n, rng, f"{where}.{name}", idx, column))
    return out


# ------------------------------------------------------------------------------------------------
# Arrival processes: one rate, or stages of rates
# ------------------------------------------------------------------------------------------------

_ARRIVALS = ("poisson", "gamma", "constant")
_STAGE_KEYS = ("rate", "duration")
# Without a request cap, stages may ask for at most this many arrivals (a typo such as a duration in
# ms would otherwise fill the memory).
_MAX_STAGE_ARRIVALS = 10**8


def check_stages(stages, where: str) -> list:
    """Checked rate stages: a non-empty list of ``{"rate": requests/s > 0, "duration": s > 0}``,
    both finite. Errors name the entry, e.g. ``workload.stages[1].rate``."""
    if isinstance(stages, tuple):
        stages = list(stages)
    if not isinstance(stages, list) or not stages:
        raise JaxsimInputError(where, f"must be a non-empty list of {{rate, duration}}, got "
                               f"{stages!r}", f"e.g. {where}=[{{rate:10,duration:60}},"
                               "{rate:20,duration:30}]")
    out = []
    for i, stage in enumerate(stages):
        here = f"{where}[{i}]"
        if not isinstance(stage, dict):
            raise JaxsimInputError(here, f"must be a mapping {{rate, duration}}, got {stage!r}",
                                   "rate in requests/s, duration in s")
        extra = sorted(set(stage) - set(_STAGE_KEYS))
        if extra:
            raise JaxsimInputError(here, f"unknown keys {extra}",
                                   "a stage has rate (requests/s) and duration (s)")
        vals = {}
        for key in _STAGE_KEYS:
            v = _num(stage, key, here, lo=0, lo_open=True)
            if math.isinf(v):
                raise JaxsimInputError(f"{here}.{key}", f"must be finite, got {v}")
            vals[key] = v
        out.append(vals)
    return out


def _gaps_ns(rng: np.random.Generator, arrival: str, rate: float, cv: float, size: int):
    if arrival == "poisson":
        return rng.exponential(1e9 / rate, size=size)
    if arrival == "gamma":
        shape = 1.0 / (cv * cv)
        return rng.gamma(shape, 1e9 / (rate * shape), size=size)
    return np.full(size, 1e9 / rate)


def _stage_arrivals(stages: list, arrival: str, cv: float, rng: np.random.Generator,
                    start_ns: int, cap: int, where: str) -> np.ndarray:
    """Arrival times (float ns) of back-to-back stages from ``start_ns``, at most ``cap`` (0: all)."""
    if not cap:
        expected = sum(s["rate"] * s["duration"] for s in stages)
        if expected > _MAX_STAGE_ARRIVALS:
            raise JaxsimInputError(where, f"the stages make about {expected:.3g} requests",
                                   f"shorten them or cap the count with num_requests (at most "
                                   f"{_MAX_STAGE_ARRIVALS:.0e} uncapped)")
    times, total, t0 = [], 0, float(start_ns)
    for s in stages:
        rate, dur_ns = s["rate"], s["duration"] * 1e9
        if arrival == "constant":
            # floor(rate·duration) arrivals at 1/rate, 2/rate, ... into the stage (the product taken
            # generously so that 10 req/s x 0.3 s is 3 despite rounding)
            k = math.floor(s["rate"] * s["duration"] * (1 + 1e-12))
            if cap:
                k = min(k, cap - total)
            t = t0 + np.arange(1, k + 1) * (1e9 / rate)
        else:
            # a renewal process restarted at the stage's start, cut at its end
            parts, last = [], 0.0
            mean = rate * s["duration"]
            chunk = int(mean + 6 * max(cv, 1.0) * math.sqrt(mean) + 16)
            if cap:
                chunk = min(chunk, 2 * (cap - total) + 16)
            while last <= dur_ns and (not cap or total + sum(map(len, parts)) < cap):
                g = last + np.cumsum(_gaps_ns(rng, arrival, rate, cv, chunk))
                parts.append(g[g <= dur_ns])
                last = float(g[-1])
            t = t0 + np.concatenate(parts)
            if cap:
                t = t[:cap - total]
        times.append(t)
        total += t.shape[0]
        t0 += dur_ns
        if cap and total >= cap:
            break
    return np.concatenate(times)


def _arrival_times(n: int, rate_rps, stages, arrival: str, cv: float, rng: np.random.Generator,
                   start_ns: int, where: str) -> np.ndarray:
    """int64 arrival times: ``n`` at ``rate_rps`` (the first one gap after ``start_ns``), or those
    of the ``stages`` (at most ``n``; 0 = no cap). Exactly one of ``rate_rps`` and ``stages``."""
    if arrival not in _ARRIVALS:
        raise JaxsimInputError(f"{where}.arrival", f"unknown arrival process {arrival!r}",
                               f"use one of {', '.join(repr(a) for a in _ARRIVALS)}")
    if stages is not None:
        if rate_rps is not None:
            raise JaxsimInputError(f"{where}.rate_rps", f"set together with {where}.stages "
                                   f"({rate_rps} requests/s)", f"give one: {where}.rate_rps=null "
                                   "to use the stages")
        t = _stage_arrivals(check_stages(stages, f"{where}.stages"), arrival, cv, rng, start_ns,
                            n, f"{where}.stages")
        if not t.size:
            raise JaxsimInputError(f"{where}.stages", "the stages make no arrivals",
                                   "raise a rate or a duration")
        return np.rint(t).astype(np.int64)
    if rate_rps is None:
        raise JaxsimInputError(f"{where}.rate_rps", "missing",
                               f"set {where}.rate_rps (requests/s) or {where}.stages")
    rate = _num({"rate_rps": rate_rps}, "rate_rps", where, lo=0, lo_open=True)
    if math.isinf(rate):
        return np.full(n, start_ns, dtype=np.int64)
    if arrival == "constant":
        return start_ns + np.rint(np.arange(1, n + 1) * (1e9 / rate)).astype(np.int64)
    return start_ns + np.rint(np.cumsum(_gaps_ns(rng, arrival, rate, cv, n))).astype(np.int64)


def _rate_text(rate_rps, stages, arrival: str, cv: float) -> str:
    how = f"{arrival}{f' cv={cv}' if arrival == 'gamma' else ''}"
    if stages is not None:
        return "stages=" + "+".join(f"{s['rate']:g}rps*{s['duration']:g}s" for s in stages) + \
            f", {how}"
    return f"rate={rate_rps} rps, {how}"


def _random_ids(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random token ids in ``[0, GENERATED_TOKEN_IDS)`` = [0, 32000): valid ids of every shipped
    model (the vocabulary check, ``jaxsim.planning.check_token_ids``, applies to them as to a
    trace's), and two random 16-token blocks are equal with probability 32,000^-16, so only
    deliberately shared tokens hit the prefix cache (:data:`jaxsim.spec.GENERATED_TOKEN_IDS`)."""
    return rng.integers(0, GENERATED_TOKEN_IDS, size=size, dtype=np.int32)


def _chains(next_in_session: np.ndarray, tool_ns: np.ndarray) -> dict:
    """The session arrays of a :class:`Workload` (None when no request releases another, as
    :func:`load_workload` does)."""
    if not np.any(next_in_session >= 0):
        return dict(next_in_session=None, tool_ns=None)
    return dict(next_in_session=next_in_session.astype(np.int32), tool_ns=tool_ns.astype(np.int64))


# ------------------------------------------------------------------------------------------------
# Generators
# ------------------------------------------------------------------------------------------------


def synthetic_workload(
    num_requests: int,
    rate_rps: float | None = None,
    arrival: str = "poisson",
    cv: float = 1.0,
    input_len: dict | int | None = None,
    output_len: dict | int | None = None,
    seed: int = 0,
    prefix_len: int = 0,
    prefix_fraction: float = 0.0,
    num_prefixes: int = 1,
    start_ns: int = 0,
    stages: list | None = None,
    where: str = "synthetic_workload",
) -> Workload:
    """Generate an open-loop random workload with ``np.random.default_rng(seed)``.

    Args:
      num_requests: number of requests (>= 1); with ``stages`` a cap (0 = every arrival of the
        stages).
      rate_rps: mean arrival rate in requests/s; ``inf`` puts every arrival at ``start_ns``.
      arrival: ``"poisson"`` (exponential gaps), ``"gamma"`` (gamma gaps with coefficient of
        variation ``cv``: shape ``1/cv**2``; ``cv > 1`` is burstier than Poisson) or
        ``"constant"`` (gaps of exactly ``1/rate``).
      input_len, output_len: length distributions, one of
        ``{"kind": "fixed", "value": n}`` (or just ``n``),
        ``{"kind": "uniform", "min": a, "max": b}`` (inclusive),
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
      stages: instead of ``rate_rps`` (giving both is an error): back-to-back stages
        ``[{"rate": requests/s, "duration": s}, ...]`` from ``start_ns``. Within a stage the
        ``arrival`` process runs at the stage's rate (restarted at the stage's start): ``constant``
        gives ``floor(rate·duration)`` arrivals at ``1/rate, 2/rate, ...`` into the stage (as
        inference-perf's constant load), ``poisson``/``gamma`` a random count of mean
        ``rate·duration``. Arrivals stop at the end of the last stage or at ``num_requests``.
      where: prefix of error locations (e.g. ``workload`` for the Hydra group).

    Token ids are random in ``[0, 32000)`` (:data:`jaxsim.spec.GENERATED_TOKEN_IDS`: within every
    shipped model's vocabulary) so that only the shared prefixes can hit the cache.
    """
    n = _num({"num_requests": num_requests}, "num_requests", where, integer=True,
             lo=0 if stages is not None else 1)
    cv = _num({"cv": cv}, "cv", where, lo=0, lo_open=True)
    seed = _num({"seed": seed}, "seed", where, integer=True, lo=0)
    prefix_len = _num({"prefix_len": prefix_len}, "prefix_len", where, integer=True, lo=0)
    frac = _num({"prefix_fraction": prefix_fraction}, "prefix_fraction", where, lo=0)
    num_prefixes = _num({"num_prefixes": num_prefixes}, "num_prefixes", where, integer=True, lo=1)
    start_ns = _num({"start_ns": start_ns}, "start_ns", where, integer=True, lo=0)
    if frac > 1:
        raise JaxsimInputError(f"{where}.prefix_fraction", f"must be in [0, 1], got {frac}")
    if input_len is None:
        input_len = {"kind": "lognormal", "mean": 512, "sigma": 0.7, "min": 1, "max": 4096}
    if output_len is None:
        output_len = {"kind": "lognormal", "mean": 256, "sigma": 0.7, "min": 1, "max": 2048}
    input_len = length_spec(input_len, f"{where}.input_len")
    output_len = length_spec(output_len, f"{where}.output_len")

    rng = np.random.default_rng(seed)
    arrival_ns = _arrival_times(n, rate_rps, stages, arrival, cv, rng, start_ns, where)
    n = arrival_ns.shape[0]
    inp, out = _lengths({"input_len": input_len, "output_len": output_len}, n, rng, where)

    # shared prefixes
    has_prefix = np.zeros(n, dtype=bool)
    which = np.zeros(n, dtype=np.int64)
    prefixes = []
    if prefix_len > 0 and frac > 0:
        has_prefix = rng.random(n) < frac
        which = rng.integers(0, num_prefixes, size=n)
        prefixes = [_random_ids(rng, prefix_len) for _ in range(num_prefixes)]
        inp = inp + prefix_len * has_prefix
    if inp.max() > _INT32_MAX or out.max() > _INT32_MAX:
        raise JaxsimInputError(where, "a sampled length exceeds 2^31-1", "lower the length 'max'")

    token_ids = []
    for i in range(n):
        own = _random_ids(rng, int(inp[i] + out[i]) - (prefix_len if has_prefix[i] else 0))
        token_ids.append(np.concatenate([prefixes[which[i]], own]) if has_prefix[i] else own)

    desc = f"synthetic(n={n}, {_rate_text(rate_rps, stages, arrival, cv)}, seed={seed})"
    return Workload(
        arrival_ns=arrival_ns,
        input_toks=inp.astype(np.int32),
        output_toks=out.astype(np.int32),
        token_ids=token_ids,
        source=desc,
    )


def closed_loop_workload(
    num_requests: int,
    concurrency: int,
    input_len: dict | int | None = None,
    output_len: dict | int | None = None,
    seed: int = 0,
    think_time_ns: int = 0,
    start_ns: int = 0,
    where: str = "closed_loop_workload",
) -> Workload:
    """Closed-loop clients at a fixed concurrency, the load of ``vllm bench serve
    --max-concurrency C`` (with its default unlimited request rate).

    ``concurrency`` clients all start at ``start_ns``; client ``c`` sends requests ``c, c + C,
    c + 2C, ...``, each one when its previous one finishes (its last token reaches the client)
    plus ``think_time_ns``. Each client is a session chain (REFERENCE.md §1.15: request ``i``
    releases ``i + C``), so at most ``C`` requests are ever in flight. Every request's
    ``arrival_ns`` is ``start_ns``; the simulated send times are in the result's ``arrival_ns``.

    How this relates to vllm's benchmark: ``vllm bench serve`` guards its requests with a
    semaphore of ``C`` slots and gives the *next request in list order to whichever slot frees
    first*; here request ``i + C`` waits for request ``i`` specifically. With fixed lengths the
    requests are interchangeable (random ids, no prefix hits) and both give the same timeline,
    up to which id is which. With distributed lengths the pairing of lengths to send times
    differs (and with i.i.d. lengths the load is the same in distribution, not per request), and
    at the end of the run the clients that have sent their share stop while others still have
    requests left, so the last ``C`` or so requests see less than ``C`` in flight where vllm keeps
    every slot busy until its list runs out.

    Args:
      num_requests: requests in total (>= 1).
      concurrency: clients (>= 1); more clients than requests is fine (the extra ones send none).
      input_len, output_len: length specs as in :func:`synthetic_workload` (a whole number is a
        fixed length); defaults as there.
      seed: ``np.random.default_rng(seed)`` draws the lengths, then the token ids.
      think_time_ns: ns between a request's finish and its client's next request (>= 0).
      start_ns: when every client sends its first request (>= 0).
      where: prefix of error locations (e.g. ``workload`` for the Hydra group).

    Token ids are random per request (input + output), so no request hits another's prefix, not
    even within a client (each request is a fresh prompt, as in vllm's random dataset).
    """
    n = _num({"num_requests": num_requests}, "num_requests", where, integer=True, lo=1)
    conc = _num({"concurrency": concurrency}, "concurrency", where, integer=True, lo=1)
    seed = _num({"seed": seed}, "seed", where, integer=True, lo=0)
    think = _num({"think_time_ns": think_time_ns}, "think_time_ns", where, integer=True, lo=0)
    start_ns = _num({"start_ns": start_ns}, "start_ns", where, integer=True, lo=0)
    if input_len is None:
        input_len = {"kind": "lognormal", "mean": 512, "sigma": 0.7, "min": 1, "max": 4096}
    if output_len is None:
        output_len = {"kind": "lognormal", "mean": 256, "sigma": 0.7, "min": 1, "max": 2048}
    specs = {"input_len": length_spec(input_len, f"{where}.input_len"),
             "output_len": length_spec(output_len, f"{where}.output_len")}

    rng = np.random.default_rng(seed)
    inp, out = _lengths(specs, n, rng, where)
    if inp.max() > _INT32_MAX or out.max() > _INT32_MAX:
        raise JaxsimInputError(where, "a sampled length exceeds 2^31-1", "lower the length 'max'")
    token_ids = [_random_ids(rng, int(inp[i] + out[i])) for i in range(n)]
    idx = np.arange(n)
    nxt = np.where(idx + conc < n, idx + conc, -1)
    tool = np.where(idx >= conc, think, 0)
    return Workload(
        arrival_ns=np.full(n, start_ns, dtype=np.int64),
        input_toks=inp.astype(np.int32),
        output_toks=out.astype(np.int32),
        token_ids=token_ids,
        source=f"closed_loop(n={n}, concurrency={conc}, think={think} ns, seed={seed})",
        **_chains(nxt, tool),
    )


def shared_prefix_workload(
    num_groups: int,
    num_users_per_group: int,
    system_prompt_len: int,
    question_len: dict | int,
    output_len: dict | int,
    num_turns: int = 1,
    rate_rps: float | None = None,
    stages: list | None = None,
    arrival: str = "poisson",
    cv: float = 1.0,
    think_time_ns: int = 0,
    num_requests: int = 0,
    seed: int = 0,
    start_ns: int = 0,
    where: str = "shared_prefix_workload",
) -> Workload:
    """Shared system prompts with multi-turn users, as inference-perf's shared-prefix data
    generator (``num_groups``, ``num_prompts_per_group``, ``system_prompt_len``,
    ``question_len``, ``output_len``, multi-turn chat).

    Each of ``num_groups`` groups has its own random system prompt of ``system_prompt_len``
    tokens and ``num_users_per_group`` users; each user holds one conversation of ``num_turns``
    turns. Turn ``k``'s prompt is the group's system prompt, then every previous question and
    answer of that user, then a new question; the answer is the request's own output ids. So
    turn ``k``'s token ids start with all of turn ``k-1``'s (prompt and answer): the prefix cache
    can serve the whole history, and users of a group share the system prompt.

    Timing: conversation *starts* are open-loop, from ``rate_rps`` or ``stages`` (see
    :func:`synthetic_workload`; ``rate_rps=inf`` starts them all at ``start_ns``); the users start
    in a random order (groups interleaved). Within a conversation the turns are closed-loop, a
    session chain (REFERENCE.md §1.15): turn ``k+1`` is sent when turn ``k`` finishes plus
    ``think_time_ns`` (a chat user answers after reading the reply). Stages that end before
    every user started leave the rest out. Every turn's ``arrival_ns`` is its conversation's
    start; the simulated send times are in the result's ``arrival_ns``.

    Requests are numbered conversation by conversation (in start order), turns consecutive:
    ``num_groups × num_users_per_group × num_turns`` of them, or the first ``num_requests``
    (> 0; a conversation cut short keeps its first turns).

    Args:
      num_groups, num_users_per_group, num_turns: >= 1.
      system_prompt_len: tokens of each group's system prompt (>= 0).
      question_len, output_len: length specs as in :func:`synthetic_workload`, one draw per
        (user, turn); a ``trace`` spec resamples (input, output) pairs jointly as question and
        answer lengths when both name the same file.
      rate_rps, stages, arrival, cv, start_ns: the conversation starts (exactly one of
        ``rate_rps`` and ``stages``).
      think_time_ns: ns between a turn's finish and the user's next turn (>= 0).
      num_requests: cap on the requests (0 = all).
      seed: ``np.random.default_rng(seed)``: starts, user order, lengths, then token ids.
      where: prefix of error locations (e.g. ``workload`` for the Hydra group).
    """
    groups = _num({"num_groups": num_groups}, "num_groups", where, integer=True, lo=1)
    users = _num({"num_users_per_group": num_users_per_group}, "num_users_per_group", where,
                 integer=True, lo=1)
    turns = _num({"num_turns": num_turns}, "num_turns", where, integer=True, lo=1)
    sys_len = _num({"system_prompt_len": system_prompt_len}, "system_prompt_len", where,
                   integer=True, lo=0)
    cap = _num({"num_requests": num_requests}, "num_requests", where, integer=True, lo=0)
    cv = _num({"cv": cv}, "cv", where, lo=0, lo_open=True)
    think = _num({"think_time_ns": think_time_ns}, "think_time_ns", where, integer=True, lo=0)
    seed = _num({"seed": seed}, "seed", where, integer=True, lo=0)
    start_ns = _num({"start_ns": start_ns}, "start_ns", where, integer=True, lo=0)
    specs = {"question_len": length_spec(question_len, f"{where}.question_len"),
             "output_len": length_spec(output_len, f"{where}.output_len")}

    rng = np.random.default_rng(seed)
    convs = groups * users
    if cap:
        convs = min(convs, -(-cap // turns))
    starts = _arrival_times(convs, rate_rps, stages, arrival, cv, rng, start_ns, where)
    convs = starts.shape[0]
    user = rng.permutation(groups * users)[:convs]  # conversation j is user user[j]
    q_len, o_len = (x.reshape(convs, turns) for x in _lengths(specs, convs * turns, rng, where))
    system = [_random_ids(rng, sys_len) for _ in range(groups)]

    n = convs * turns if not cap else min(cap, convs * turns)
    arrival_ns, inp, out, token_ids, nxt, tool = [], [], [], [], [], []
    for j in range(convs):
        context = system[user[j] // users]
        for k in range(turns):
            if len(inp) == n:
                break
            prompt = np.concatenate([context, _random_ids(rng, int(q_len[j, k]))])
            if prompt.shape[0] > _INT32_MAX:
                raise JaxsimInputError(where, f"turn {k} of a conversation has a "
                                       f"{prompt.shape[0]}-token prompt, over 2^31-1",
                                       "use fewer turns or shorter lengths")
            context = np.concatenate([prompt, _random_ids(rng, int(o_len[j, k]))])
            if k:  # released by the user's previous turn, after the user's think time
                nxt[-1] = len(inp)
            nxt.append(-1)
            tool.append(think if k else 0)
            arrival_ns.append(starts[j])
            inp.append(prompt.shape[0])
            out.append(int(o_len[j, k]))
            token_ids.append(context)
    users_desc = f"{groups}x{users} users, {turns} turns, system={sys_len}"
    return Workload(
        arrival_ns=np.asarray(arrival_ns, dtype=np.int64),
        input_toks=np.asarray(inp, dtype=np.int32),
        output_toks=np.asarray(out, dtype=np.int32),
        token_ids=token_ids,
        source=f"shared_prefix(n={n}, {users_desc}, {_rate_text(rate_rps, stages, arrival, cv)}, "
               f"seed={seed})",
        **_chains(np.asarray(nxt), np.asarray(tool)),
    )
