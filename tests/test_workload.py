"""Workload loading, context checks and the generators (synthetic, closed-loop, shared-prefix,
rate stages); no JAX but one small closed-loop simulation (one compile)."""

import json

import numpy as np
import pytest

from jaxsim.errors import JaxsimInputError
from jaxsim.workload import (check_context, closed_loop_workload, length_spec, load_workload, shared_prefix_workload,
                             shift_workload, synthetic_workload)

from _shared import TRACE as SHAREGPT, WORKLOADS

EXAMPLE = WORKLOADS / "example_trace.jsonl"


def _write(tmp_path, lines, name="w.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


GOOD = {"input_toks": 4, "output_toks": 2, "arrival_time_ns": 10}


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def test_example_trace():
    w = load_workload(EXAMPLE)
    assert w.num_requests == 10
    assert w.arrival_ns.dtype == np.int64
    assert w.input_toks.dtype == np.int32 and w.output_toks.dtype == np.int32
    assert int(w.arrival_ns[0]) == 46926808
    assert (int(w.input_toks[0]), int(w.output_toks[0])) == (10, 70)
    ids0 = w.token_ids[0]
    assert ids0.shape == (80,)
    np.testing.assert_array_equal(ids0, np.arange(1, 81))
    # ids of request 1: the input ids followed by the output ids
    first = json.loads(EXAMPLE.read_text().splitlines()[1])
    np.testing.assert_array_equal(w.token_ids[1], first["input_tok_ids"] + first["output_tok_ids"])
    np.testing.assert_array_equal(w.line_numbers, np.arange(1, 11))
    assert w.source == str(EXAMPLE)


def test_sharegpt_totals_and_num_requests():
    w = load_workload(SHAREGPT)
    assert w.num_requests == 300
    # the validation time series sums to exactly these totals (REFERENCE.md §4.3)
    assert int(w.input_toks.sum()) == 257239
    assert int(w.output_toks.sum()) == 195753
    w5 = load_workload(SHAREGPT, num_requests=5)
    assert w5.num_requests == 5
    np.testing.assert_array_equal(w5.input_toks, w.input_toks[:5])


def test_num_requests_too_many(tmp_path):
    with pytest.raises(JaxsimInputError, match="has only 10 requests"):
        load_workload(EXAMPLE, num_requests=11)
    with pytest.raises(JaxsimInputError, match="num_requests"):
        load_workload(EXAMPLE, num_requests=-1)


def test_blank_lines_and_missing_ids(tmp_path):
    p = _write(tmp_path, ["", GOOD, "   ", {**GOOD, "input_tok_ids": [1, 2, 3, 4]},
                          {**GOOD, "input_tok_ids": [1, 2, 3, 4], "output_tok_ids": [9, 9]}])
    w = load_workload(p)
    assert w.num_requests == 3
    np.testing.assert_array_equal(w.line_numbers, [2, 4, 5])
    assert w.token_ids[0] is None
    np.testing.assert_array_equal(w.token_ids[1], [1, 2, 3, 4])
    np.testing.assert_array_equal(w.token_ids[2], [1, 2, 3, 4, 9, 9])


@pytest.mark.parametrize("bad, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"output_toks": 2, "arrival_time_ns": 0}, "missing required field 'input_toks'"),
    ({"input_toks": 2, "arrival_time_ns": 0}, "missing required field 'output_toks'"),
    ({"input_toks": 2, "output_toks": 2}, "missing required field 'arrival_time_ns'"),
    ({**GOOD, "arrival_time_ns": -5}, "arrival_time_ns must be >= 0"),
    ({**GOOD, "input_toks": 1.5}, "'input_toks' must be an integer"),
    ({**GOOD, "input_toks": "7"}, "'input_toks' must be an integer"),
    ({**GOOD, "output_toks": True}, "'output_toks' must be an integer"),
    ({**GOOD, "output_toks": 0}, "output_toks must be >= 1"),
    ({**GOOD, "input_toks": 0}, "input_toks must be >= 1"),
    ({**GOOD, "input_toks": -3}, "input_toks must be >= 1"),
    ({**GOOD, "input_tok_ids": [1, "a"]}, "'input_tok_ids' must contain only integers"),
    ({**GOOD, "input_tok_ids": 5}, "'input_tok_ids' must be a list"),
    ({**GOOD, "output_tok_ids": [-1]}, "'output_tok_ids' must be a flat list of token ids"),
])
def test_malformed_lines_name_the_file_line(tmp_path, bad, message):
    # line 1 good, line 2 blank, line 3 bad: the error names the real line 3
    p = _write(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(JaxsimInputError, match=message) as e:
        load_workload(p)
    assert str(e.value).startswith(f"{p}:3:")


def test_integral_float_is_accepted(tmp_path):
    w = load_workload(_write(tmp_path, [{**GOOD, "arrival_time_ns": 1.5e9}]))
    assert int(w.arrival_ns[0]) == 1_500_000_000


SESSION = {"session_id": "s0", "arrival_time_ns": 50,
           "sub_requests": [{"input_toks": 3, "output_toks": 2, "tool_duration_ns": 700},
                            {"input_toks": 5, "output_toks": 1, "input_tok_ids": [1, 2, 3, 4, 5]},
                            {"input_toks": 6, "output_toks": 4}]}


def test_session_lines_mixed_with_flat_lines(tmp_path):
    w = load_workload(_write(tmp_path, [GOOD, SESSION, GOOD]))
    # one request per sub-request, in file order: 0 flat, 1-3 the session, 4 flat
    assert w.input_toks.tolist() == [4, 3, 5, 6, 4]
    assert w.next_in_session.tolist() == [-1, 2, 3, -1, -1]
    # tool time of the predecessor: 2 follows 1 after 1's 700 ns tool call; 3 follows 2 at once
    assert w.tool_ns.tolist() == [0, 0, 700, 0, 0]
    assert w.arrival_ns.tolist() == [10, 50, 50, 50, 10]
    assert w.released.tolist() == [False, False, True, True, False]
    assert w.line_numbers.tolist() == [1, 2, 2, 2, 3]
    assert w.token_ids[2].tolist() == [1, 2, 3, 4, 5] and w.token_ids[1] is None
    # a session cut by num_requests keeps its first sub-requests
    cut = load_workload(_write(tmp_path, [GOOD, SESSION, GOOD]), num_requests=3)
    assert cut.next_in_session.tolist() == [-1, 2, -1]
    # flat traces carry no session arrays
    assert load_workload(_write(tmp_path, [GOOD, GOOD])).next_in_session is None


@pytest.mark.parametrize("sub, match", [
    ({"input_toks": 3}, "sub_requests\\[1\\]: missing required field 'output_toks'"),
    ({"input_toks": 3, "output_toks": 2, "tool_duration_ns": -1}, "sub_requests\\[1\\]: tool_duration_ns must be >= 0"),
])
def test_bad_sub_request_names_line_and_index(tmp_path, sub, match):
    bad = {**SESSION, "sub_requests": [SESSION["sub_requests"][0], sub]}
    p = _write(tmp_path, [GOOD, bad])
    with pytest.raises(JaxsimInputError, match=match) as e:
        load_workload(p)
    assert str(e.value).startswith(f"{p}:2")
    with pytest.raises(JaxsimInputError, match="'sub_requests' must be a non-empty list"):
        load_workload(_write(tmp_path, [{**SESSION, "sub_requests": []}]))


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(JaxsimInputError, match="not found"):
        load_workload(tmp_path / "nope.jsonl")
    with pytest.raises(JaxsimInputError, match="no requests"):
        load_workload(_write(tmp_path, ["", ""]))


# ---------------------------------------------------------------------------------------------
# context check, shift
# ---------------------------------------------------------------------------------------------


def test_check_context(tmp_path):
    p = _write(tmp_path, [GOOD, "", {**GOOD, "input_toks": 90, "output_toks": 20}])
    w = load_workload(p)
    check_context(w, 110, "model.max_model_len")  # exactly at the limit is fine
    with pytest.raises(JaxsimInputError) as e:
        check_context(w, 109, "model.max_model_len")
    msg = str(e.value)
    assert msg.startswith(f"{p}:3:")
    assert "110 tokens (input 90 + output 20)" in msg and "model.max_model_len is 109" in msg


def test_check_context_synthetic_names_request():
    w = synthetic_workload(3, 1.0, input_len={"kind": "fixed", "value": 50},
                           output_len={"kind": "fixed", "value": 10})
    with pytest.raises(JaxsimInputError, match="request 0"):
        check_context(w, 59)


def test_shift_workload():
    w = load_workload(EXAMPLE)
    s = shift_workload(w, 86_400 * 10**9)
    np.testing.assert_array_equal(s.arrival_ns - w.arrival_ns, 86_400 * 10**9)
    np.testing.assert_array_equal(s.input_toks, w.input_toks)
    assert s.token_ids is w.token_ids
    back = shift_workload(s, -86_400 * 10**9)
    np.testing.assert_array_equal(back.arrival_ns, w.arrival_ns)
    lo, hi = int(w.arrival_ns.min()), int(w.arrival_ns.max())
    with pytest.raises(JaxsimInputError, match=rf"^delta_ns: shifting by {-lo - 1} ns moves arrivals outside \[0, "
                                               rf"2\^62\) ns .*\(use a value in \[{-lo}, {2**62 - 1 - hi}\]\)"):
        shift_workload(w, -lo - 1)
    with pytest.raises(JaxsimInputError, match=r"^workload\.shift_ns: shifting by 9223372036854775807 ns"):
        shift_workload(w, 2**63 - 1, "workload.shift_ns")  # used to say "negative" for an overflow


# ---------------------------------------------------------------------------------------------
# synthetic generator
# ---------------------------------------------------------------------------------------------

FIXED = {"kind": "fixed", "value": 4}
ONE = {"kind": "fixed", "value": 1}


def test_synthetic_reproducible():
    kw = dict(input_len={"kind": "lognormal", "mean": 100, "sigma": 0.5, "min": 2, "max": 400},
              output_len={"kind": "uniform", "min": 1, "max": 50}, prefix_len=32,
              prefix_fraction=0.5)
    a = synthetic_workload(50, 5.0, seed=7, **kw)
    b = synthetic_workload(50, 5.0, seed=7, **kw)
    c = synthetic_workload(50, 5.0, seed=8, **kw)
    for x, y in ((a.arrival_ns, b.arrival_ns), (a.input_toks, b.input_toks),
                 (a.output_toks, b.output_toks)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.token_ids, b.token_ids):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.arrival_ns, c.arrival_ns)
    assert a.line_numbers is None and a.source.startswith("synthetic(")
    for i in range(a.num_requests):
        assert a.token_ids[i].shape == (int(a.input_toks[i]) + int(a.output_toks[i]),)
        assert a.token_ids[i].dtype == np.int32


@pytest.mark.parametrize("arrival, cv", [("poisson", 1.0), ("gamma", 1.0), ("gamma", 2.0),
                                         ("gamma", 0.5)])
def test_synthetic_rate_and_cv(arrival, cv):
    n, rate = 20000, 10.0
    w = synthetic_workload(n, rate, arrival=arrival, cv=cv, input_len=FIXED, output_len=ONE,
                           seed=1)
    gaps = np.diff(np.concatenate([[0], w.arrival_ns])) / 1e9
    assert np.all(gaps >= 0)
    # mean gap 1/rate; its standard error is cv/(rate·sqrt(n)) -> 5 sigma
    assert abs(gaps.mean() - 1 / rate) < 5 * cv / (rate * np.sqrt(n))
    assert abs(n / (w.arrival_ns[-1] / 1e9) - rate) / rate < 0.05
    assert abs(gaps.std() / gaps.mean() - cv) / cv < 0.06


def test_synthetic_infinite_rate():
    w = synthetic_workload(5, float("inf"), input_len=FIXED, output_len=ONE, start_ns=123)
    np.testing.assert_array_equal(w.arrival_ns, 123)


def test_synthetic_lengths():
    n = 4000
    w = synthetic_workload(n, 1.0, input_len={"kind": "uniform", "min": 3, "max": 9},
                           output_len={"kind": "lognormal", "mean": 200, "sigma": 0.6}, seed=3)
    assert w.input_toks.min() == 3 and w.input_toks.max() == 9
    assert abs(w.output_toks.mean() - 200) / 200 < 0.05
    clipped = synthetic_workload(n, 1.0, input_len=FIXED, output_len={
        "kind": "lognormal", "mean": 200, "sigma": 1.0, "min": 50, "max": 300}, seed=3)
    assert clipped.output_toks.min() == 50 and clipped.output_toks.max() == 300
    assert set(np.unique(synthetic_workload(10, 1.0, input_len=FIXED, output_len=ONE)
                         .input_toks)) == {4}


def test_synthetic_trace_resampling():
    trace = {"kind": "trace", "path": str(SHAREGPT)}
    src = load_workload(SHAREGPT)
    pairs = set(zip(src.input_toks.tolist(), src.output_toks.tolist()))
    w = synthetic_workload(500, 10.0, input_len=trace, output_len=trace, seed=2)
    # both lengths come from the same file: (input, output) pairs are resampled jointly
    assert set(zip(w.input_toks.tolist(), w.output_toks.tolist())) <= pairs
    w2 = synthetic_workload(500, 10.0, input_len=trace, output_len=FIXED, seed=2)
    assert set(w2.input_toks.tolist()) <= set(src.input_toks.tolist())


def test_synthetic_prefix_sharing():
    n, plen = 400, 64
    w = synthetic_workload(n, 10.0, input_len=FIXED, output_len=ONE, prefix_len=plen,
                           prefix_fraction=0.25, seed=5)
    has = w.input_toks == 4 + plen
    assert set(np.unique(w.input_toks)) == {4, 4 + plen}
    assert abs(has.mean() - 0.25) < 0.07
    idx = np.nonzero(has)[0]
    ref = w.token_ids[idx[0]][:plen]
    for i in idx:
        np.testing.assert_array_equal(w.token_ids[i][:plen], ref)
    # the rest of the ids are random: no two requests share their first 4 non-prefix ids
    starts = {tuple(w.token_ids[i][plen if has[i] else 0:][:4].tolist()) for i in range(n)}
    assert len(starts) == n
    two = synthetic_workload(200, 10.0, input_len=FIXED, output_len=ONE, prefix_len=16,
                             prefix_fraction=1.0, num_prefixes=2, seed=1)
    assert len({tuple(ids[:16].tolist()) for ids in two.token_ids}) == 2


@pytest.mark.parametrize("kwargs, where", [
    (dict(rate_rps=0.0), "synthetic_workload.rate_rps"),
    (dict(rate_rps=-1.0), "synthetic_workload.rate_rps"),
    (dict(num_requests=0), "synthetic_workload.num_requests"),
    (dict(arrival="weird"), "synthetic_workload.arrival"),
    (dict(arrival="gamma", cv=0.0), "synthetic_workload.cv"),
    (dict(prefix_fraction=1.5), "synthetic_workload.prefix_fraction"),
    (dict(input_len={"kind": "zipf"}), "synthetic_workload.input_len.kind"),
    (dict(input_len={"kind": "lognormal", "mean": 10, "sigma": -1}),
     "synthetic_workload.input_len.sigma"),
    (dict(input_len={"kind": "lognormal", "sigma": 1}), "synthetic_workload.input_len.mean"),
    (dict(output_len={"kind": "uniform", "min": 5, "max": 2}),
     "synthetic_workload.output_len.max"),
    (dict(output_len={"kind": "fixed", "value": 0}), "synthetic_workload.output_len.value"),
    (dict(output_len={"kind": "fixed", "valu": 3}), "synthetic_workload.output_len"),
    (dict(input_len={"kind": "trace", "path": "/nonexistent.jsonl"}), "/nonexistent.jsonl"),
])
def test_synthetic_errors(kwargs, where):
    args = dict(num_requests=3, rate_rps=1.0, input_len=FIXED, output_len=ONE)
    args.update(kwargs)
    with pytest.raises(JaxsimInputError) as e:
        synthetic_workload(**args)
    assert str(e.value).startswith(where)


# ---------------------------------------------------------------------------------------------
# benchmark generators: closed-loop clients, length shorthand, rate stages, shared prefixes
# ---------------------------------------------------------------------------------------------


def _hydra(overrides):
    from hydra import compose, initialize_config_dir

    from _shared import CONF
    from jaxsim.config import from_hydra

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return from_hydra(compose("config", overrides=list(overrides))).workload


def _first_block_distinct(w, start=0):
    """No two requests share their first 16 ids from ``start`` on (so no prefix-cache hit)."""
    heads = {tuple(ids[start:start + 16].tolist()) for ids in w.token_ids}
    return len(heads) == w.num_requests


def test_closed_loop_chains():
    w = closed_loop_workload(7, 3, input_len=5, output_len=2, think_time_ns=100, start_ns=50,
                             seed=4)
    # client c sends c, c+3, c+6: each request releases the one 3 later, after the think time
    assert w.next_in_session.tolist() == [3, 4, 5, 6, -1, -1, -1]
    assert w.tool_ns.tolist() == [0, 0, 0, 100, 100, 100, 100]
    assert w.released.tolist() == [False] * 3 + [True] * 4
    assert w.arrival_ns.tolist() == [50] * 7  # every client starts at start_ns
    assert w.input_toks.tolist() == [5] * 7 and w.output_toks.tolist() == [2] * 7
    assert all(ids.shape == (7,) and ids.dtype == np.int32 for ids in w.token_ids)
    assert _first_block_distinct(w)  # random ids: no hits, not even within a client
    again = closed_loop_workload(7, 3, input_len=5, output_len=2, think_time_ns=100, start_ns=50,
                                 seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(w.token_ids, again.token_ids))
    # as many clients as requests (or more): all sent at once, no chains
    wide = closed_loop_workload(3, 5, input_len=5, output_len=2)
    assert wide.next_in_session is None and wide.arrival_ns.tolist() == [0, 0, 0]
    lens = closed_loop_workload(50, 4, input_len={"kind": "uniform", "min": 3, "max": 9},
                                output_len=2, seed=1)
    assert lens.input_toks.min() == 3 and lens.input_toks.max() == 9


def test_length_shorthand():
    assert length_spec(1024, "w") == {"kind": "fixed", "value": 1024}
    assert length_spec(8.0, "w") == {"kind": "fixed", "value": 8}
    assert synthetic_workload(3, 1.0, input_len=7, output_len=2).input_toks.tolist() == [7, 7, 7]
    # the command line: a scalar replaces the option's length mapping
    w = _hydra(["workload=closed_loop", "workload.concurrency=8", "workload.input_len=1024",
                "workload.output_len=128", "workload.num_requests=200"])
    assert w.num_requests == 200 and set(w.input_toks.tolist()) == {1024}
    assert set(w.output_toks.tolist()) == {128}
    assert w.next_in_session[:3].tolist() == [8, 9, 10] and w.next_in_session[192] == -1
    s = _hydra(["workload=synthetic_poisson", "workload.input_len=33", "workload.output_len=5"])
    assert set(s.input_toks.tolist()) == {33} and set(s.output_toks.tolist()) == {5}
    # and a mapping still replaces a scalar
    u = _hydra(["workload=closed_loop", "workload.input_len={kind:uniform,min:2,max:4}"])
    assert set(u.input_toks.tolist()) == {2, 3, 4}


@pytest.mark.parametrize("override, message", [
    ("workload.input_len=abc", "workload.input_len: must be a length (a whole number) or a "
                               "mapping with a 'kind', got 'abc'"),
    ("workload.input_len=0", "workload.input_len: a fixed length must be a whole number >= 1"),
    ("workload.output_len=2.5", "workload.output_len: a fixed length must be a whole number"),
    ("workload.input_len={kind:fixed,valu:3}", "workload.input_len: unknown keys ['valu']"),
    ("workload.input_len={kind:zipf}", "workload.input_len.kind: unknown length distribution"),
    ("workload.input_len=null", "workload.input_len: missing length distribution"),
    ("workload.concurrency=0", "workload.concurrency: must be >= 1"),
    ("workload.num_requests=0", "workload.num_requests: must be >= 1"),
    ("workload.think_time_ns=-1", "workload.think_time_ns: must be >= 0"),
])
def test_closed_loop_config_errors(override, message):
    with pytest.raises(JaxsimInputError) as e:
        _hydra(["workload=closed_loop", override])
    assert str(e.value).startswith(message)


def test_constant_stages_exact_times():
    stages = [{"rate": 10, "duration": 0.3}, {"rate": 2, "duration": 1}]
    w = synthetic_workload(0, stages=stages, arrival="constant", input_len=4, output_len=1,
                           start_ns=1000)
    # floor(rate·duration) arrivals at 1/rate, 2/rate, ... into each stage (10 x 0.3 s is 3
    # despite rounding); stage 2 starts at 0.3 s
    assert w.arrival_ns.tolist() == [1000 + 100_000_000, 1000 + 200_000_000, 1000 + 300_000_000,
                                     1000 + 800_000_000, 1000 + 1_300_000_000]
    assert "stages=10rps*0.3s+2rps*1s" in w.source
    capped = synthetic_workload(4, stages=stages, arrival="constant", input_len=4, output_len=1)
    assert capped.arrival_ns.tolist() == [100_000_000, 200_000_000, 300_000_000, 800_000_000]
    # one constant rate: gaps of exactly 1/rate
    assert synthetic_workload(3, 4.0, arrival="constant", input_len=4, output_len=1
                              ).arrival_ns.tolist() == [250_000_000, 500_000_000, 750_000_000]


def test_poisson_stages_counts():
    stages = [{"rate": 100, "duration": 10}, {"rate": 20, "duration": 10}]
    w = synthetic_workload(0, stages=stages, input_len=4, output_len=1, seed=3)
    t = w.arrival_ns
    assert np.all(np.diff(t) >= 0) and t[0] > 0 and t[-1] <= 20 * 10**9
    first = int((t <= 10 * 10**9).sum())
    second = w.num_requests - first
    # Poisson counts of mean 1000 and 200: within 5 standard deviations
    assert abs(first - 1000) < 5 * 1000 ** 0.5 and abs(second - 200) < 5 * 200 ** 0.5
    again = synthetic_workload(0, stages=stages, input_len=4, output_len=1, seed=3)
    np.testing.assert_array_equal(t, again.arrival_ns)  # a fixed seed: the same arrivals
    capped = synthetic_workload(50, stages=stages, input_len=4, output_len=1, seed=3)
    np.testing.assert_array_equal(capped.arrival_ns, t[:50])
    # through Hydra, with the one-rate default cleared
    h = _hydra(["workload=synthetic_poisson", "workload.rate_rps=null", "workload.num_requests=0",
                "workload.arrival=constant", "workload.stages=[{rate:10,duration:2},{rate:20,duration:1}]"])
    assert h.num_requests == 40 and h.arrival_ns[[0, 19, 20, 39]].tolist() == [
        100_000_000, 2_000_000_000, 2_050_000_000, 3_000_000_000]


@pytest.mark.parametrize("stages, where, message", [
    ([], "x.stages", "must be a non-empty list"),
    (5, "x.stages", "must be a non-empty list"),
    ([5], "x.stages[0]", "must be a mapping"),
    ([{"rate": 1, "duration": 1}, {"rate": 0, "duration": 1}], "x.stages[1].rate", "must be > 0"),
    ([{"rate": 1, "duration": 1}, {"rate": 1}], "x.stages[1].duration", "missing"),
    ([{"rate": "fast", "duration": 1}], "x.stages[0].rate", "must be a number"),
    ([{"rate": float("inf"), "duration": 1}], "x.stages[0].rate", "must be finite"),
    ([{"rate": 1, "duration": 1, "burst": 2}], "x.stages[0]", "unknown keys ['burst']"),
    ([{"rate": 0.1, "duration": 1}], "x.stages", "the stages make no arrivals"),
    ([{"rate": 1e6, "duration": 1e6}], "x.stages", "the stages make about 1e+12 requests"),
])
def test_stage_errors(stages, where, message):
    with pytest.raises(JaxsimInputError) as e:
        synthetic_workload(0, stages=stages, arrival="constant", input_len=4, output_len=1,
                           where="x")
    assert str(e.value).startswith(f"{where}: {message}")


def test_rate_errors():
    with pytest.raises(JaxsimInputError, match=r"^x.rate_rps: set together with x.stages"):
        synthetic_workload(5, 1.0, stages=[{"rate": 1, "duration": 1}], input_len=4, output_len=1,
                           where="x")
    with pytest.raises(JaxsimInputError, match=r"^x.rate_rps: missing"):
        shared_prefix_workload(1, 1, 4, 4, 4, where="x")
    with pytest.raises(JaxsimInputError, match=r"^x.arrival: unknown arrival process 'burst'"):
        synthetic_workload(5, 1.0, arrival="burst", input_len=4, output_len=1, where="x")
    with pytest.raises(JaxsimInputError) as e:
        _hydra(["workload=shared_prefix", "workload.stages=[{rate:1,duration:5},{rate:-1,duration:1}]"])
    assert str(e.value).startswith("workload.stages[1].rate: must be > 0, got -1")
    with pytest.raises(JaxsimInputError) as e:
        _hydra(["workload=synthetic_poisson", "workload.stages=[{rate:1,duration:5}]"])
    assert str(e.value).startswith("workload.rate_rps: set together with workload.stages")


SP = dict(num_groups=2, num_users_per_group=3, system_prompt_len=32, question_len=5,
          output_len=4, num_turns=3, think_time_ns=7, seed=2)


def test_shared_prefix_prompts():
    w = shared_prefix_workload(**SP, stages=[{"rate": 1, "duration": 6}], arrival="constant")
    assert w.num_requests == 18
    # conversations in start order, turns consecutive: each turn releases the next after the
    # think time; every turn carries its conversation's start (1 s, 2 s, ... )
    assert w.next_in_session.tolist() == sum(([3 * j + 1, 3 * j + 2, -1] for j in range(6)), [])
    assert w.tool_ns.tolist() == [0, 7, 7] * 6
    assert w.arrival_ns.tolist() == [(j + 1) * 10**9 for j in range(6) for _ in range(3)]
    # turn k: system prompt + k earlier (question + answer) + a new question
    assert w.input_toks.tolist() == [37, 46, 55] * 6 and w.output_toks.tolist() == [4] * 18
    for i in range(18):
        assert w.token_ids[i].shape == (int(w.input_toks[i]) + int(w.output_toks[i]),)
        if i % 3:  # turn k's ids start with turn k-1's prompt and answer
            prev = w.token_ids[i - 1]
            np.testing.assert_array_equal(w.token_ids[i][:prev.shape[0]], prev)
    # two groups of three users: two system prompts, three conversations each, no shared ids
    systems = {}
    for j in range(6):
        systems.setdefault(tuple(w.token_ids[3 * j][:32].tolist()), []).append(j)
    assert sorted(len(v) for v in systems.values()) == [3, 3]
    a, b = (set(s) for s in systems)
    assert not a & b
    # each user's questions are its own: past the system prompt, conversations share nothing
    heads = {tuple(w.token_ids[3 * j][32:48].tolist()) for j in range(6)}
    assert len(heads) == 6
    assert "2x3 users, 3 turns, system=32" in w.source


def test_shared_prefix_caps_and_rates():
    # a cap cuts the last conversation after its first turns
    c = shared_prefix_workload(**SP, rate_rps=float("inf"), num_requests=7, start_ns=9)
    assert c.num_requests == 7 and c.next_in_session.tolist() == [1, 2, -1, 4, 5, -1, -1]
    assert c.arrival_ns.tolist() == [9] * 7  # rate inf: every conversation starts at once
    # stages that end early leave users out
    s = shared_prefix_workload(**SP, stages=[{"rate": 1, "duration": 2}], arrival="constant")
    assert s.num_requests == 6
    one = shared_prefix_workload(**{**SP, "num_turns": 1}, rate_rps=2.0, arrival="constant")
    assert one.next_in_session is None and one.num_requests == 6
    assert one.arrival_ns.tolist() == [500_000_000 * (j + 1) for j in range(6)]
    h = _hydra(["workload=shared_prefix", "workload.num_turns=2", "workload.question_len=9"])
    assert h.num_requests == 64 and h.input_toks[:2].tolist() == [1009, 1009 + 100 + 9]


@pytest.mark.slow  # a compile of its own; the chains are checked host-side above, their release in the engine by
# tests/test_disagg.py::test_sessions_release_on_finish_and_hit_their_context
def test_closed_loop_simulation_keeps_concurrency():
    """A closed loop of 2 clients and 6 requests: each request is sent when its client's previous
    one finishes (+ think time) and at most 2 are ever in flight."""
    from jaxsim import simulator
    from jaxsim.spec import HardwareConfig, SchedulerConfig

    from _shared import PROFILES, load_model

    w = closed_loop_workload(6, 2, input_len=40, output_len=3, think_time_ns=1_000_000)
    res = simulator.simulate(w, load_model(), HardwareConfig(num_gpu_blocks=600),
                             SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024),
                             profiles_dir=PROFILES, max_slots=8)
    arrival, finish = np.asarray(res.arrival_ns), np.asarray(res.finish_ns)
    assert arrival[:2].tolist() == [0, 0]
    for i in range(4):
        assert arrival[i + 2] == finish[i] + 1_000_000
    assert np.all(finish > arrival)
    in_flight = [int(((arrival <= t) & (finish > t)).sum()) for t in arrival]
    assert max(in_flight) == 2
