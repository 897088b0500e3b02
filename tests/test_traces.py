"""Public trace importers (jaxsim/traces.py) on excerpts of each format (tests/data/traces): the
values read, the shared options (window, cap, sampling, rate, row policies) with their counts, the
errors, the Hydra path, and Mooncake's block ids reaching the prefix cache."""

from pathlib import Path

import numpy as np
import pytest

from jaxsim import simulator
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import Calibration, HardwareConfig, ModelRuntimeConfig, SchedulerConfig
from jaxsim.traces import BlockTokenIds, TraceOptions, block_token_ids, load_trace
from jaxsim.workload import load_workload

from _shared import PROFILES, load_model
from test_config import spec  # Hydra compose + from_hydra

DATA = Path(__file__).parent / "data" / "traces"


def test_azure_datetimes_to_exact_ns_and_the_zero_output_row():
    w = load_trace(DATA / "azure_2023_code.csv", "azure")
    # 18:15:46.6805900 is t = 0; 50.9951690 - 46.6805900 = 4.314579 s; the 0-output row (line 4)
    # is dropped; 18:16:02.5000001 is 15.8194101 s after the first row.
    assert w.arrival_ns.tolist() == [0, 4_314_579_000, 15_819_410_100]
    assert w.input_toks.tolist() == [374, 396, 91] and w.output_toks.tolist() == [44, 109, 23]
    assert w.line_numbers.tolist() == [2, 3, 5] and w.token_ids == [None] * 3
    assert w.import_stats == dict(rows=4, kept=3, zero_dropped=1, zero_clipped=0, long_dropped=0, long_clipped=0,
                                  sampled_out=0)
    clipped = load_trace(DATA / "azure_2023_code.csv", "splitwise", TraceOptions(zero_tokens="clip"))
    assert clipped.output_toks.tolist() == [44, 109, 1, 23] and clipped.import_stats["zero_clipped"] == 1


def test_burstgpt_window_cap_rate_and_row_policies():
    path = DATA / "burstgpt.csv"
    w = load_trace(path, "burstgpt")  # t = 5, 45 (0 output), 118, 119.5 (0 input), 140
    assert w.arrival_ns.tolist() == [0, 113_000_000_000, 135_000_000_000]
    assert w.import_stats["zero_dropped"] == 2
    # window [100, 130) s after the first row: the rows at 113 and 114.5 s; arrivals from its start
    win = load_trace(path, "burstgpt", TraceOptions(start=100, duration=30, zero_tokens="clip", rate_scale=2))
    assert win.arrival_ns.tolist() == [6_500_000_000, 7_250_000_000]  # (113 - 100) / 2, (114.5 - 100) / 2
    assert win.input_toks.tolist() == [417, 1] and win.import_stats["rows"] == 2
    capped = load_trace(path, "burstgpt", TraceOptions(num_requests=2))
    assert capped.input_toks.tolist() == [472, 417]
    long = load_trace(path, "burstgpt", TraceOptions(max_tokens=1000))
    assert long.input_toks.tolist() == [472, 417] and long.import_stats["long_dropped"] == 1
    # clipping cuts the output first (417 + 217 -> 417 + 183), then the prompt (1500 + 700 -> 599 + 1)
    clip = load_trace(path, "burstgpt", TraceOptions(max_tokens=600, over_long="clip"))
    assert list(zip(clip.input_toks.tolist(), clip.output_toks.tolist())) == [(472, 18), (417, 183), (599, 1)]
    assert clip.import_stats["long_clipped"] == 2
    sampled = load_trace(path, "burstgpt", TraceOptions(sample=0.5, seed=3, zero_tokens="clip"))
    assert sampled.num_requests + sampled.import_stats["sampled_out"] == 5
    assert sampled.line_numbers.tolist() == load_trace(path, "burstgpt", TraceOptions(
        sample=0.5, seed=3, zero_tokens="clip")).line_numbers.tolist()  # seeded


def test_vidur_float_noise_and_float_counts():
    w = load_trace(DATA / "vidur.csv", "vidur")
    assert w.arrival_ns.tolist() == [0, 100_000_000, 300_000_000]
    assert w.input_toks.tolist() == [512, 1024, 256] and w.output_toks.tolist() == [128, 64, 256]


def test_mooncake_block_ids_become_shared_token_prefixes():
    w = load_trace(DATA / "mooncake.jsonl", "mooncake", TraceOptions(block_tokens=32))
    assert w.arrival_ns.tolist() == [0, 1_000_000_000, 2_500_000_000]
    a, b, c = w.token_ids
    assert len(a) == 100 and np.array_equal(a[:64], b[:64]) and not np.array_equal(a[64:96], b[64:96])
    # made on access from the block ids (4 bytes per token would not fit a 200,000-row trace)
    assert isinstance(w.token_ids, BlockTokenIds) and len(w.token_ids) == 3 and w.token_ids.max_id == 31_999
    assert np.array_equal(w.token_ids[0], block_token_ids([1, 2, 3, 4], 100, 32, 1))  # file line 1
    assert [len(x) for x in w.token_ids[1:]] == [100, 40]
    assert (a < 32_000).all() and (a >= 0).all() and not np.array_equal(a[:32], c[:32])
    # positions past the listed blocks (or with no hash_ids at all) are the request's own
    assert np.array_equal(block_token_ids([5], 40, 32, 1)[:32], block_token_ids([5], 40, 32, 2)[:32])
    assert not np.array_equal(block_token_ids([5], 40, 32, 1)[32:], block_token_ids([5], 40, 32, 2)[32:])
    assert not np.array_equal(block_token_ids([], 40, 32, 1), block_token_ids([], 40, 32, 2))


def test_time_order_bom_and_utc_offsets(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens\n10,m,5,5\n5,m,5,5\n")
    with pytest.raises(JaxsimInputError, match=r"t.csv:3: rows are not in time order"):
        load_trace(path, "burstgpt")
    path.write_bytes("\ufeffTIMESTAMP,ContextTokens,GeneratedTokens\r\n2024-05-10 00:00:00.009930+00:00,3,4\r\n"
                     "2024-05-10 02:00:01.5+02:00,3,4\r\n".encode())
    assert load_trace(path, "azure").arrival_ns.tolist() == [0, 1_490_070_000]  # 00:00:01.5 UTC


def test_mooncake_prefix_sharing_reaches_the_prefix_cache():
    """B shares A's first two 32-token blocks (64 tokens = 4 cache blocks of 16): B's admission
    hits them; C shares nothing."""
    w = load_trace(DATA / "mooncake.jsonl", "mooncake", TraceOptions(block_tokens=32))
    r = simulator.simulate(w, load_model(), HardwareConfig(num_gpu_blocks=600), SchedulerConfig(max_num_seqs=4),
                           ModelRuntimeConfig(max_model_len=9600), calib=Calibration.none(), profiles_dir=PROFILES,
                           max_slots=8, record_token_times=False)
    assert r.prefix_hit_tokens.tolist() == [0, 64, 0]


@pytest.mark.parametrize("fmt, text, message", [
    ("azure", "TIMESTAMP,Context,GeneratedTokens\n2023-11-16 18:15:46.1,3,4\n",
     r":1: missing column 'ContextTokens' \(did you mean"),
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,3,x\n",
     r":2: GeneratedTokens is not a number: 'x'"),
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n16/11/2023,3,4\n", r":2: TIMESTAMP '16/11/2023' is not"),
    ("burstgpt", "Timestamp,Model,Request tokens,Response tokens\n1,m,2.5,3\n", r":2: Request tokens must be a whole"),
    ("vidur", "arrived_at,num_prefill_tokens,num_decode_tokens\nnan,1,1\n", r":2: arrived_at is not finite"),
    ("mooncake", '{"timestamp": 0, "input_length": 5}\n', r":1: missing 'output_length'"),
    ("mooncake", '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [-1]}\n', r":1: hash_ids must"),
    ("azure", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n', r":1: this is JSON lines, not a CSV "
     r"\(set workload.format=mooncake"),
])
def test_bad_rows_name_the_file_line(tmp_path, fmt, text, message):
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(JaxsimInputError, match=message):
        load_trace(path, fmt)


def test_bad_options_and_formats():
    with pytest.raises(JaxsimInputError, match=r"workload.format: unknown trace format 'burstgtp' \(did you mean 'burstgpt'"):
        load_trace(DATA / "burstgpt.csv", "burstgtp")
    with pytest.raises(JaxsimInputError, match="workload.zero_tokens: unknown policy 'keep'"):
        TraceOptions(zero_tokens="keep")
    with pytest.raises(JaxsimInputError, match=r"no request in the window"):
        load_trace(DATA / "burstgpt.csv", "burstgpt", TraceOptions(start=1000))
    for bad in (dict(duration=float("inf")), dict(seed=-1), dict(sample="0.5"), dict(rate_scale=1e-9)):
        with pytest.raises(JaxsimInputError, match=f"workload.{next(iter(bad))}"):
            TraceOptions(**bad)


def test_hydra_reads_a_public_trace():
    r = spec(["workload.format=burstgpt", f"workload.path={DATA / 'burstgpt.csv'}", "workload.zero_tokens=clip",
              "workload.num_requests=3"])
    assert r.workload.input_toks.tolist() == [472, 1087, 417] and r.workload.output_toks.tolist() == [18, 1, 217]
    with pytest.raises(JaxsimInputError, match=r"workload.sample: must be > 0, got 0"):
        spec(["workload.format=vidur", f"workload.path={DATA / 'vidur.csv'}", "workload.sample=0"])
    with pytest.raises(JaxsimInputError, match=r"workload.sample: applies to the public trace formats only"):
        spec(["workload.sample=0.5"])  # the default format, jaxsim JSONL
    with pytest.raises(JaxsimInputError, match=r"workload.format: vidur.csv is a CSV, read as jaxsim JSONL"):
        spec([f"workload.path={DATA / 'vidur.csv'}"])
    with pytest.raises(JaxsimInputError, match=r"workload.sampel: unknown field \(did you mean 'sample'"):
        spec(["+workload.sampel=0.5"])


def test_a_mooncake_trace_read_as_jsonl_says_so(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n')
    with pytest.raises(JaxsimInputError, match=r"t.jsonl:1: unknown field 'hash_ids' in a flat line \(this looks like "
                                               r"a Mooncake trace: set workload.format=mooncake\)"):
        load_workload(path)


def test_a_trace_row_over_the_context_points_at_max_tokens(tmp_path):
    """over_long acts only with max_tokens: the context error of a public trace says so."""
    from jaxsim.workload import check_context
    path = tmp_path / "t.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens\n1,m,200000,10\n2,m,5,5\n")
    w = load_trace(path, "burstgpt", TraceOptions(over_long="drop"))
    with pytest.raises(JaxsimInputError, match=r"t.csv:2: request 0 needs 200010 tokens .* a public trace drops or clips "
                                               r"such rows with workload.max_tokens"):
        check_context(w, 131_072, "model.max_model_len")
    assert load_trace(path, "burstgpt", TraceOptions(over_long="drop", max_tokens=131_072)).num_requests == 1
