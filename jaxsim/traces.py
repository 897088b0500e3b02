"""Public LLM-serving traces, read as they are published (host-side, streaming).

Each format is one reader that yields ``(line, arrival_ns, input_tokens, output_tokens, block_ids)``
rows from the file, one line at a time (a trace of millions of rows is never loaded whole);
:func:`load_trace` applies the options every format shares (a time window, a request cap,
sampling, rate scaling, a policy for zero-length and over-long rows) and builds the
:class:`~jaxsim.spec.Workload`.

| format | file | columns used | time unit |
|---|---|---|---|
| ``azure`` | Azure LLM inference trace 2023 / 2024 CSV | ``TIMESTAMP, ContextTokens, GeneratedTokens`` | datetime |
| ``splitwise`` | the Splitwise paper's traces (the Azure 2023 CSVs) | as ``azure`` | datetime |
| ``burstgpt`` | BurstGPT CSV | ``Timestamp, Request tokens, Response tokens`` | s from the start |
| ``mooncake`` | Mooncake JSONL | ``timestamp, input_length, output_length, hash_ids`` | ms |
| ``vidur`` | Vidur's trace-replay CSV | ``arrived_at, num_prefill_tokens, num_decode_tokens`` | s (float) |
| ``jsonl`` | jaxsim's own JSONL (REFERENCE.md §3.3) | :func:`jaxsim.workload.load_workload` | ns |

Arrivals are relative to the first row of the file (``start`` is measured from it). Only
Mooncake carries prefix identities: its ``hash_ids`` name the prompt's blocks of ``block_tokens``
tokens (512 in the published trace), each id standing for the block's content given everything
before it. They become token ids (a hash of the block id and the position in the block), so two
requests that share leading ids share those tokens exactly and reach the prefix cache; the other
formats carry no ids (no request ever hits the cache).
"""

import csv
import dataclasses
import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from jaxsim.errors import JaxsimInputError, unknown_key_fix
from jaxsim.spec import ARRIVAL_HORIZON_NS, GENERATED_TOKEN_IDS, Workload, check_fields, checked
from jaxsim.workload import iter_jsonl, load_workload

FORMATS = ("jsonl", "azure", "splitwise", "burstgpt", "mooncake", "vidur")
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class TraceOptions:
    """What :func:`load_trace` keeps of a trace, and how it reads it.

    start: seconds after the first row where the window starts. duration: its length (0: to
    the end). num_requests: keep at most this many requests of the window (0: all). sample: keep
    each row with this probability (seeded by ``seed``). rate_scale: arrivals come ``rate_scale``
    times faster (gaps divided by it). zero_tokens: a row with 0 input or 0 output tokens is
    ``drop``-ped or ``clip``-ped to 1 token. max_tokens: a row with more input + output tokens
    (0: no limit) is dropped or has its output (then its input) clipped, by ``over_long`` (a
    limit under 2 tokens holds no request: every row over it is dropped).
    block_tokens: tokens per Mooncake ``hash_ids`` block.
    """

    KEY: ClassVar[str] = "workload"  # its fields are the workload section's (errors at workload.<field>)

    start: float = checked(0.0, lo=0, hi=1e9)
    duration: float = checked(0.0, lo=0, hi=1e9)
    num_requests: int = checked(0, lo=0)
    sample: float = checked(1.0, lo=0, lo_open=True, hi=1)
    seed: int = checked(0, lo=0)
    rate_scale: float = checked(1.0, lo=1e-6, hi=1e9)
    zero_tokens: str = checked("drop", choices=("drop", "clip"), noun="policy", fix="drop or clip")
    max_tokens: int = checked(0, lo=0)
    over_long: str = checked("drop", choices=("drop", "clip"), noun="policy", fix="drop or clip")
    block_tokens: int = checked(512, lo=1)

    def __post_init__(self):
        check_fields(self)


# ------------------------------------------------------------------------------------------------
# Readers: one per format, each yielding (line, arrival_ns, input, output, block_ids | None). Times
# are integers of ns from here on: a date's epoch seconds in float64 lose ~200 ns.
# ------------------------------------------------------------------------------------------------


def _number(text, where: str, column: str, integer: bool):
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise JaxsimInputError(where, f"{column} is not a number: {text!r}") from None
    if not np.isfinite(v):
        raise JaxsimInputError(where, f"{column} is not finite: {text!r}")
    if integer:
        if v != int(v) or v < 0:
            raise JaxsimInputError(where, f"{column} must be a whole number >= 0, got {text!r}")
        return int(v)
    return v


def _csv_rows(path: Path, columns: dict):
    """``(line, {name: text})`` per data row of a CSV whose header has ``columns`` (name -> the
    header to read it from, or a tuple of accepted headers)."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # (a byte-order mark is not part of the header)
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise JaxsimInputError(str(path), "empty file", "a CSV with a header row") from None
        if header and header[0].startswith("{"):
            raise JaxsimInputError(f"{path}:1", "this is JSON lines, not a CSV",
                                   "set workload.format=mooncake (Mooncake's timestamp / input_length / output_length /"
                                   " hash_ids) or jsonl (jaxsim's own)")
        index = {}
        for name, accepted in columns.items():
            accepted = accepted if isinstance(accepted, tuple) else (accepted,)
            hit = [h for h in accepted if h in header]
            if not hit:
                raise JaxsimInputError(f"{path}:1", f"missing column {accepted[0]!r}",
                                       unknown_key_fix(accepted[0], header).replace("known", "columns"))
            index[name] = header.index(hit[0])
        for row in reader:
            if not row or not any(x.strip() for x in row):
                continue
            line = reader.line_num
            if len(row) < len(header):
                raise JaxsimInputError(f"{path}:{line}", f"{len(row)} fields, the header has {len(header)}")
            yield line, {name: row[i].strip() for name, i in index.items()}


def _ns(seconds: float, scale: float = 1e9) -> int:
    """A float time in seconds (or ms with ``scale`` 1e6) as integer ns, to the nearest ns."""
    return int(round(seconds * scale))


def _parse_datetime(text: str, where: str) -> int:
    """ns since the epoch of an Azure ``TIMESTAMP`` (``2023-11-16 18:15:46.6805900``: up to 7
    fractional digits, which ``datetime`` does not take), exactly."""
    text = text.strip()
    offset_s = 0
    if text.endswith("Z"):
        text = text[:-1]
    elif len(text) > 6 and text[-6] in "+-" and text[-3] == ":":  # "+00:00": a UTC offset
        sign = 1 if text[-6] == "+" else -1
        try:
            offset_s = sign * (int(text[-5:-3]) * 3600 + int(text[-2:]) * 60)
        except ValueError:
            raise JaxsimInputError(where, f"TIMESTAMP {text!r} has a bad UTC offset") from None
        text = text[:-6]
    base, _, frac = text.partition(".")
    try:
        t = datetime.datetime.strptime(base, "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise JaxsimInputError(where, f"TIMESTAMP {text!r} is not 'YYYY-MM-DD HH:MM:SS[.fraction]'") from None
    if frac and not frac.isdigit():
        raise JaxsimInputError(where, f"TIMESTAMP {text!r} has a bad fraction")
    frac_ns = int((frac + "000000000")[:9]) if frac else 0  # digits past the 9th are below 1 ns
    return (int(t.timestamp()) - offset_s) * 1_000_000_000 + frac_ns


def _azure(path: Path):
    for line, r in _csv_rows(path, {"t": "TIMESTAMP", "in": "ContextTokens", "out": "GeneratedTokens"}):
        where = f"{path}:{line}"
        yield (line, _parse_datetime(r["t"], where), _number(r["in"], where, "ContextTokens", True),
               _number(r["out"], where, "GeneratedTokens", True), None)


def _burstgpt(path: Path):
    for line, r in _csv_rows(path, {"t": "Timestamp", "in": "Request tokens", "out": "Response tokens"}):
        where = f"{path}:{line}"
        yield (line, _ns(_number(r["t"], where, "Timestamp", False)), _number(r["in"], where, "Request tokens", True),
               _number(r["out"], where, "Response tokens", True), None)


def _vidur(path: Path):
    cols = {"t": "arrived_at", "in": "num_prefill_tokens", "out": "num_decode_tokens"}
    for line, r in _csv_rows(path, cols):
        where = f"{path}:{line}"
        # Vidur writes token counts as floats ("512.0"): whole numbers are accepted as such.
        yield (line, _ns(_number(r["t"], where, "arrived_at", False)),
               _number(r["in"], where, "num_prefill_tokens", True),
               _number(r["out"], where, "num_decode_tokens", True), None)


def _mooncake(path: Path):
    for line, where, obj in iter_jsonl(path):
        for key in ("timestamp", "input_length", "output_length"):
            if key not in obj:
                raise JaxsimInputError(where, f"missing {key!r}")
        ids = obj.get("hash_ids", [])
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63
                                                for x in ids):
            raise JaxsimInputError(where, "hash_ids must be a list of integers in [0, 2^63)")
        yield (line, _ns(_number(obj["timestamp"], where, "timestamp", False), 1e6),
               _number(obj["input_length"], where, "input_length", True),
               _number(obj["output_length"], where, "output_length", True), ids)


_READERS = {"azure": _azure, "splitwise": _azure, "burstgpt": _burstgpt, "vidur": _vidur, "mooncake": _mooncake}


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a well-spread uint64 hash of each entry."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def block_token_ids(block_ids: list, input_tokens: int, block_tokens: int, request: int) -> np.ndarray:
    """The prompt's token ids from its blocks' ids: token k of block j is a hash of (id j, k), so
    equal leading block ids give equal leading tokens. Blocks past the prompt are ignored; prompt
    tokens past the listed blocks hash (``request``, their position) instead, so they are the
    request's own and never shared. Ids are below :data:`jaxsim.spec.GENERATED_TOKEN_IDS` (32,000),
    like the synthetic workloads', so they pass the vocabulary check of every shipped model
    (``jaxsim.planning.check_token_ids`` checks them as any other ids)."""
    n = int(input_tokens)
    pos = np.arange(n, dtype=np.uint64)
    blk = pos // np.uint64(block_tokens)
    ids = np.asarray(block_ids, np.uint64)
    known = blk < np.uint64(len(ids))
    own = _mix(np.uint64(request) << np.uint64(32) | pos) | np.uint64(1 << 63)  # (listed ids are < 2^63)
    key = np.where(known, ids[np.minimum(blk, max(len(ids) - 1, 0))] if len(ids) else own, own)
    h = _mix(_mix(key) ^ (pos % np.uint64(block_tokens)))
    return (h % np.uint64(GENERATED_TOKEN_IDS)).astype(np.int32)


class BlockTokenIds(Sequence):
    """The token ids of a Mooncake trace's requests, made on access from their ``hash_ids``
    (:func:`block_token_ids`): a list of arrays would hold 4 bytes per prompt token (6 GB for
    200,000 Mooncake rows), this holds the block ids. ``ids[i]`` is request i's int32 array, or
    None for a row without ``hash_ids``. Every id is below :data:`max_id` + 1, which lets the
    vocabulary check pass without making them all (``jaxsim.planning.check_token_ids``)."""

    max_id = GENERATED_TOKEN_IDS - 1

    def __init__(self, block_tokens: int):
        self.block_tokens = block_tokens
        self._rows = []  # (block ids as int64 array, prompt tokens, file line) or None

    def append(self, blocks, input_tokens: int, line: int) -> None:
        self._rows.append(None if blocks is None else (np.asarray(blocks, np.uint64), int(input_tokens), int(line)))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        row = self._rows[i]
        return None if row is None else block_token_ids(row[0], row[1], self.block_tokens, row[2])


# ------------------------------------------------------------------------------------------------
# The shared options
# ------------------------------------------------------------------------------------------------


def load_trace(path, fmt: str, opts: TraceOptions = TraceOptions()) -> Workload:
    """Read a public trace of format ``fmt`` (:data:`FORMATS`) with ``opts``.

    Returns a :class:`Workload` in file order (``line_numbers`` are file lines) whose
    ``import_stats`` counts what the options did: rows read in the window, kept, dropped or clipped
    for zero tokens, dropped or clipped for length, sampled out.

    Raises:
        JaxsimInputError: an unknown format, a missing file or column, a bad value (naming the
            file line), or a window with no request.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise JaxsimInputError("workload.format", f"unknown trace format {fmt!r}", unknown_key_fix(fmt, FORMATS))
    if not path.is_file():
        raise JaxsimInputError(str(path), "trace file not found", "check workload.path")
    if fmt == "jsonl":
        return load_workload(path, opts.num_requests)
    rng = np.random.default_rng(opts.seed)
    stats = dict(rows=0, kept=0, zero_dropped=0, zero_clipped=0, long_dropped=0, long_clipped=0, sampled_out=0)
    arrival, inp, out, lines = [], [], [], []
    ids = BlockTokenIds(opts.block_tokens) if fmt == "mooncake" else []
    t_first = None
    start, end = _ns(opts.start), _ns(opts.start + opts.duration) if opts.duration else None
    prev = None
    for line, t, n_in, n_out, blocks in _READERS[fmt](path):
        if t_first is None:
            t_first = t
        if prev is not None and t < prev[0]:  # a window and arrivals relative to the first row need order
            raise JaxsimInputError(f"{path}:{line}", f"rows are not in time order: this row's time is before "
                                   f"line {prev[1]}'s", "sort the trace by its timestamp column")
        prev = (t, line)
        rel = t - t_first
        if rel < start:
            continue
        if end is not None and rel >= end:
            break  # (rows are in time order: nothing later falls in the window)
        stats["rows"] += 1
        if opts.sample < 1.0 and rng.random() >= opts.sample:
            stats["sampled_out"] += 1
            continue
        if n_in == 0 or n_out == 0:
            if opts.zero_tokens == "drop":
                stats["zero_dropped"] += 1
                continue
            stats["zero_clipped"] += 1
            n_in, n_out = max(n_in, 1), max(n_out, 1)
        if opts.max_tokens and n_in + n_out > opts.max_tokens:
            if opts.over_long == "drop" or opts.max_tokens < 2:
                stats["long_dropped"] += 1
                continue
            stats["long_clipped"] += 1
            n_out = max(1, min(n_out, opts.max_tokens - n_in))
            n_in = min(n_in, opts.max_tokens - n_out)
        if max(n_in, n_out) > _INT32_MAX:
            raise JaxsimInputError(f"{path}:{line}", f"{max(n_in, n_out)} tokens is too large",
                                   f"at most {_INT32_MAX}, or set workload.max_tokens")
        at = rel - start if opts.rate_scale == 1 else int(round((rel - start) / opts.rate_scale))
        if at >= ARRIVAL_HORIZON_NS:  # (jaxsim.spec.ARRIVAL_HORIZON_NS: int64 sums must not overflow)
            raise JaxsimInputError(f"{path}:{line}", f"this row arrives {at / 1e9:.4g} s after the window's start, "
                                   "past the 2^62 ns (about 146 years) horizon of the simulator clock",
                                   "raise workload.rate_scale, shorten the window, or fix the timestamp")
        arrival.append(at)
        inp.append(n_in)
        out.append(n_out)
        if fmt == "mooncake":
            ids.append(blocks, n_in, line)
        else:
            ids.append(None)
        lines.append(line)
        if opts.num_requests and len(arrival) >= opts.num_requests:
            break
    stats["kept"] = len(arrival)
    if not arrival:
        raise JaxsimInputError(str(path), f"no request in the window (start {opts.start} s, duration "
                               f"{opts.duration or 'to the end'} s) after the row policies ({stats})",
                               "widen the window, raise workload.sample, or change workload.zero_tokens / "
                               "max_tokens")
    return Workload(arrival_ns=np.asarray(arrival, np.int64),
                    input_toks=np.asarray(inp, np.int32), output_toks=np.asarray(out, np.int32), token_ids=ids,
                    source=str(path), line_numbers=np.asarray(lines, np.int64), import_stats=stats)
