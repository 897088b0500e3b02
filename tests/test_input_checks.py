"""Checks at the edge, before any compile (issue 11): arrival times within the 2^62 ns horizon (JSONL
lines, session lines, public traces, and any workload made in Python), token ids within the model's
vocabulary (trace ids, synthetic and Mooncake ids), and a KV cache that holds one ``max_model_len``
request, refused with vLLM's reason for a lone instance and for each instance of a cluster (the
sweep points: tests/test_sweep.py; profile bundles: tests/test_latency.py, test_legacy_profiles.py).

Every test is host-side: the errors come from the loaders or from planning, before the engine
compiles.
"""

import dataclasses
import json

import numpy as np
import pytest

from jaxsim import simulator
from jaxsim.errors import JaxsimInputError
from jaxsim.spec import (ARRIVAL_HORIZON_NS, GENERATED_TOKEN_IDS, HardwareConfig, InstanceSpec, ModelRuntimeConfig,
                         SchedulerConfig, Workload)
from jaxsim.traces import block_token_ids, load_trace
from jaxsim.workload import load_workload, synthetic_workload

from _shared import PROFILES, load_model

SCHED = SchedulerConfig(max_num_seqs=4)
RTX4090 = HardwareConfig(name="RTX4090", mem_size_gb=24)  # 3,400 blocks of 16 tokens for Llama-3.1-8B at util 0.9


def _jsonl(tmp_path, lines) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _prepare(w, hw=HardwareConfig(), rt=ModelRuntimeConfig(), model=None, **kw):
    return simulator.prepare(w, model or load_model(), hw, SCHED, rt, profiles_dir=PROFILES, max_slots=8, **kw)


# ------------------------------------------------------------------------------ arrival horizon
@pytest.mark.parametrize("arrival", [2**63 - 1, ARRIVAL_HORIZON_NS])
def test_jsonl_arrival_past_the_horizon_names_the_line(tmp_path, arrival):
    """An arrival at 2^63-1 ns used to stall the run (int64's largest value stands for "released
    later"); anything from 2^62 ns on is refused at load, naming the line."""
    ok = dict(input_toks=10, output_toks=2, arrival_time_ns=ARRIVAL_HORIZON_NS - 1)
    path = _jsonl(tmp_path, [ok, dict(ok, arrival_time_ns=arrival)])
    with pytest.raises(JaxsimInputError) as e:
        load_workload(path)
    assert e.value.where == f"{path}:2"
    assert e.value.problem == (f"arrival_time_ns {arrival} is past the simulator clock's horizon of 2^62 = "
                               f"{ARRIVAL_HORIZON_NS} ns (about 146 years)")
    assert load_workload(path, 1).arrival_ns.tolist() == [ARRIVAL_HORIZON_NS - 1]  # just under: fine


def test_session_arrival_past_the_horizon_names_the_line(tmp_path):
    session = dict(session_id="s", arrival_time_ns=2**63 - 1, sub_requests=[dict(input_toks=5, output_toks=2)])
    path = _jsonl(tmp_path, [dict(input_toks=10, output_toks=2, arrival_time_ns=0), session])
    with pytest.raises(JaxsimInputError, match="horizon") as e:
        load_workload(path)
    assert e.value.where == f"{path}:2"


def test_public_trace_row_past_the_horizon_names_the_line(tmp_path):
    path = tmp_path / "burst.csv"
    path.write_text("Timestamp,Request tokens,Response tokens\n0,10,5\n5e9,10,5\n")  # 5e9 s: 158 years
    with pytest.raises(JaxsimInputError, match=r"arrives 5e\+09 s after the window's start, past the 2\^62 ns") as e:
        load_trace(path, "burstgpt")
    assert e.value.where == f"{path}:3"


def test_any_workload_is_checked_before_a_run():
    """Workloads made in Python (or rescaled, shifted) are checked by planning, naming the request."""
    w = Workload(np.array([0, 2**63 - 1], np.int64), np.array([10, 10], np.int32), np.array([2, 2], np.int32),
                 [None, None], "made")
    with pytest.raises(JaxsimInputError, match=r"request 1 arrives at 9223372036854775807 ns, outside \[0, 2\^62\)") \
            as e:
        _prepare(w)
    assert e.value.where == "made request 1"
    with pytest.raises(JaxsimInputError, match=r"request 0 arrives at -1 ns"):
        _prepare(dataclasses.replace(w, arrival_ns=np.array([-1, 0], np.int64)))


# ------------------------------------------------------------------------------ vocabulary
def test_token_id_outside_the_vocabulary_names_the_line_and_vocab_size(tmp_path):
    llama = load_model()
    assert llama.vocab_size == 128_256
    ok = dict(input_toks=3, output_toks=2, arrival_time_ns=0, input_tok_ids=[1, 2, 3], output_tok_ids=[4, 5])
    path = _jsonl(tmp_path, [ok, dict(ok, output_tok_ids=[4, 128_256]), ok])
    w = load_workload(path)
    with pytest.raises(JaxsimInputError) as e:
        _prepare(w)
    assert e.value.where == f"{path}:2"
    assert e.value.problem == ("request 1: token id 128256 (output_tok_ids[1]) is outside the vocabulary of "
                               "meta-llama/Llama-3.1-8B (vocab_size 128256: ids 0 to 128255)")
    # the largest id is fine; Qwen3's vocabulary (151,936) takes the other one
    _prepare(load_workload(_jsonl(tmp_path, [ok, dict(ok, output_tok_ids=[4, 128_255])])))
    qwen = load_model("Qwen/Qwen3-32B")
    assert qwen.vocab_size == 151_936
    _prepare(w, model=qwen, hw=HardwareConfig(num_gpu_blocks=3000), rt=ModelRuntimeConfig(max_model_len=40_960))
    # a cluster checks each instance's model
    with pytest.raises(JaxsimInputError, match=r"trace.jsonl:2: request 1: token id 128256"):
        simulator.prepare_cluster(w, qwen, [InstanceSpec(HardwareConfig(num_gpu_blocks=3000), SCHED),
                                            InstanceSpec(HardwareConfig(), SCHED, model=llama)],
                                  rt=ModelRuntimeConfig(max_model_len=40_960), profiles_dir=PROFILES, max_slots=8)


def test_generated_token_ids_are_within_every_shipped_vocabulary():
    """Synthetic and Mooncake ids are drawn below 32,000 (Llama-2/Mistral's vocabulary, the smallest
    of the common families), so the vocabulary check holds for them as for a trace's ids."""
    vocabs = [load_model(m).vocab_size for m in ("meta-llama/Llama-3.1-8B", "Qwen/Qwen3-32B",
                                                 "mistralai/Mixtral-8x7B-v0.1")]
    assert min(vocabs) >= GENERATED_TOKEN_IDS == 32_000
    w = synthetic_workload(20, 5.0, prefix_len=32, prefix_fraction=0.5, seed=3)
    ids = np.concatenate(w.token_ids)
    assert ids.min() >= 0 and ids.max() < GENERATED_TOKEN_IDS and len(np.unique(ids)) > 1000
    simulator.check_token_ids(w, load_model("mistralai/Mixtral-8x7B-v0.1"))
    moon = block_token_ids([3, 99, 2**62], 3 * 512 + 40, 512, request=7)
    assert moon.min() >= 0 and moon.max() < GENERATED_TOKEN_IDS


# ------------------------------------------------------------------------------ KV cache vs max_model_len
def test_kv_cache_smaller_than_one_context_is_refused_with_vllms_reason():
    """vLLM refuses at start-up a KV cache that cannot hold one max_model_len request: an RTX 4090
    (24 GiB, util 0.9) holds 3,400 blocks of Llama-3.1-8B (54,400 tokens), less than its 131,072."""
    w = load_workload(PROFILES / "workloads" / "example_trace.jsonl", 2)
    with pytest.raises(JaxsimInputError) as e:
        _prepare(w, RTX4090)
    assert e.value.where == "model.max_model_len"
    assert e.value.problem == (
        "vLLM refuses this at start-up: to serve at least one request with the model's max seq len (131072), 16.00 "
        "GiB KV cache is needed, which is larger than the available KV cache memory (6.64 GiB: 3400 blocks of 16 "
        "tokens); based on the available memory, the estimated maximum model length is 54400")
    assert e.value.fix == ("try increasing `gpu_memory_utilization` (hardware.mem_util), or decreasing "
                           "`max_model_len` (model.max_model_len, at most 54400)")
    # exactly one context fits; one token more does not
    pl = simulator.plan(w, load_model(), RTX4090, SCHED, ModelRuntimeConfig(max_model_len=54_400),
                        profiles_dir=PROFILES, max_slots=8)
    simulator.check_kv_holds_context([pl], ["model.max_model_len"])
    with pytest.raises(JaxsimInputError, match=r"max seq len \(54401\).*maximum model length is 54400"):
        _prepare(w, RTX4090, ModelRuntimeConfig(max_model_len=54_401))
    # vLLM checks the memory it profiled, before a num_gpu_blocks_override applies: an explicit
    # block count is not refused here (a request it can never hold is, by check_requests_fit)
    pl = simulator.plan(w, load_model(), HardwareConfig(num_gpu_blocks=100), SCHED, profiles_dir=PROFILES, max_slots=8)
    simulator.check_kv_holds_context([pl], ["model.max_model_len"])
    # under TP 2 each rank holds half of every block: the GiB are per rank, the tokens the instance's
    with pytest.raises(JaxsimInputError, match=r"max seq len \(131072\), 8.00 GiB KV cache .*\(2.12 GiB: 2171 blocks"
                                               r".*maximum model length is 34736"):
        _prepare(w, HardwareConfig(tp=2, mem_util=0.1))


def test_each_cluster_instance_must_hold_one_context():
    w = load_workload(PROFILES / "workloads" / "example_trace.jsonl", 2)
    specs = [InstanceSpec(HardwareConfig(), SCHED), InstanceSpec(RTX4090, SCHED)]
    with pytest.raises(JaxsimInputError, match=r"vLLM refuses this at start-up: .*max seq len \(131072\).*estimated "
                                               r"maximum model length is 54400") as e:
        simulator.prepare_cluster(w, load_model(), specs, profiles_dir=PROFILES, max_slots=8)
    assert e.value.where == "cluster.instances[1]"
    rt = ModelRuntimeConfig(max_model_len=32_768)
    plans = [simulator.plan(w, load_model(), s.hw, s.sched, rt, profiles_dir=PROFILES, max_slots=8) for s in specs]
    simulator.check_kv_holds_context(plans, ["cluster.instances[0]", "cluster.instances[1]"])


def test_max_model_len_above_the_models_context_is_refused():
    """vLLM refuses a max_model_len above the model's max_position_embeddings; so does planning
    (for each instance's own model in a cluster), not only the Hydra path."""
    w = load_workload(PROFILES / "workloads" / "example_trace.jsonl", 2)
    qwen = load_model("Qwen/Qwen3-32B")
    with pytest.raises(JaxsimInputError, match=r"model.max_model_len: 40961 is greater than the derived max_model_len "
                                               r"of Qwen/Qwen3-32B \(40960, its max_position_embeddings\)"):
        simulator.prepare_cluster(w, load_model(), [InstanceSpec(HardwareConfig(), SCHED, model=qwen)],
                                  rt=ModelRuntimeConfig(max_model_len=40_961), profiles_dir=PROFILES, max_slots=8)


# ------------------------------------------------------------------------------ sessions
def test_a_session_whose_context_outgrows_the_cache_is_refused_before_the_run(tmp_path):
    """Each turn of an agentic session carries the whole context so far; the third turn here needs
    820 + 4 - 1 tokens of KV, more than the 49 blocks of the cache (50 less vLLM's null block): refused before the
    run (plan_run, no compile), naming the trace line of the session and the blocks on offer."""
    session = {"session_id": "s", "arrival_time_ns": 0, "sub_requests": [
        {"input_toks": 100, "output_toks": 4, "tool_duration_ns": 1000},
        {"input_toks": 400, "output_toks": 4, "tool_duration_ns": 1000},
        {"input_toks": 820, "output_toks": 4}]}
    w = load_workload(_jsonl(tmp_path, [{"input_toks": 10, "output_toks": 2, "arrival_time_ns": 0}, session]))
    assert w.has_sessions and w.num_requests == 4
    with pytest.raises(JaxsimInputError, match=r"trace.jsonl:2: request 3 \(line 2\) can never be scheduled: its KV at "
                                               r"its last decode needs 52 blocks of 16 tokens .* the KV cache holds 49 "
                                               r"blocks \(after vLLM reserves its null block\)"):
        simulator.plan_run(w, load_model(), HardwareConfig(num_gpu_blocks=50), SCHED, profiles_dir=PROFILES,
                           max_slots=8)


# ------------------------------------------------------------------------------ Workload structure
def _w(**kw):
    base = dict(arrival_ns=np.array([0, 10], np.int64), input_toks=np.array([4, 4], np.int32),
                output_toks=np.array([3, 3], np.int32), token_ids=[None, None], source="api")
    return Workload(**{**base, **kw})


@pytest.mark.parametrize("kw, message", [
    (dict(next_in_session=np.array([1, 0]), tool_ns=np.array([0, 0])),
     r"api request 1: request 1 releases request 0: a session's next request must come later"),  # a cycle used to hang
    (dict(next_in_session=np.array([1, -1]), tool_ns=np.array([0, 2**63 - 1])),
     r"request 1: tool_duration_ns 9223372036854775807 is outside \[0, 2\^40\]"),  # overflowed to negative TTFT
    (dict(next_in_session=np.array([1, -1]), tool_ns=np.array([0, -10])), r"tool_duration_ns -10 is outside"),
    (dict(arrival_ns=np.array([0.0, np.nan])), r"Workload.arrival_ns: must hold whole numbers, got nan \(request 1\)"),
    (dict(output_toks=np.array([0, 3], np.int32)), r"api request 0: request 0: output_toks 0 is outside \[1, 2\^31-1\]"),
    (dict(token_ids=[None]), r"Workload.token_ids: has 1 entries for 2 requests"),
    (dict(arrival_ns=np.array([0, 1, 2])), r"Workload.input_toks: must be a 1-D array of one length N"),
])
def test_a_python_built_workload_is_checked_before_the_run(kw, message):
    with pytest.raises(JaxsimInputError, match=message):
        simulator.plan_run(_w(**kw), load_model(), HardwareConfig(), SCHED, profiles_dir=PROFILES, max_slots=8)


def test_jsonl_unknown_fields_float_ids_and_count_mismatches(tmp_path):
    ok = {"input_toks": 3, "output_toks": 2, "arrival_time_ns": 0}
    with pytest.raises(JaxsimInputError, match=r"trace.jsonl:1: unknown field 'arival_time_ns' in a flat line \(did "
                                               r"you mean 'arrival_time_ns'"):
        load_workload(_jsonl(tmp_path, [{"input_toks": 3, "output_toks": 2, "arival_time_ns": 0}]))
    with pytest.raises(JaxsimInputError, match=r"sub_requests\[0\]: unknown field 'tool_ns' in a sub-request line"):
        load_workload(_jsonl(tmp_path, [{"session_id": 1, "arrival_time_ns": 0,
                                         "sub_requests": [dict(input_toks=3, output_toks=2, tool_ns=5)]}]))
    with pytest.raises(JaxsimInputError, match=r"field 'input_tok_ids' must contain only integers"):
        load_workload(_jsonl(tmp_path, [dict(ok, input_tok_ids=[1.5, 2, 3])]))  # used to be cut to 1
    with pytest.warns(UserWarning, match=r"1 request\(s\) whose input_tok_ids / output_tok_ids do not have input_toks "
                                         r"/ output_toks entries \(first: line 2\)"):
        load_workload(_jsonl(tmp_path, [dict(ok, input_tok_ids=[1, 2, 3]), dict(ok, input_tok_ids=[1, 2])]))


def test_engine_delays_are_bounded():
    """A first-token delay of 2^63-1 ns overflowed every token time (the run reported 0 requests)."""
    from jaxsim.spec import Calibration
    with pytest.raises(JaxsimInputError, match=r"^calibration\.first_token_delay_ns: must be <= 1099511627776"):
        Calibration(first_token_delay_ns=2**63 - 1)
