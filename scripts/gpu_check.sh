#!/usr/bin/env bash
# jaxsim on a GPU, end to end, in one command that prints one JSON document.
#
#   scripts/gpu_check.sh                        # a GPU machine with internet (or a warm pip cache)
#   scripts/gpu_check.sh --wheels DIR           # offline: every package from a folder of wheels
#   scripts/gpu_check.sh --inherit-site         # offline, where python3 already has a CUDA JAX
#   scripts/gpu_check.sh --cpu --small          # CPU, this interpreter, small sizes (the test suite's run)
#
# Stages, in order; each runs under its own time limit, cut to what is left of the total budget
# (default 470 s: it ends within 8 minutes). A stage that runs out is killed and listed in
# "timed_out"; the next stages still run in what is left.
#   setup    a fresh venv (--venv, default under the work folder) with the CUDA JAX wheel
#            (--jax-spec, default "jax[cuda12]") and jaxsim's dependencies and test extra, read from
#            pyproject.toml; jaxsim itself is this checkout (PYTHONPATH), so nothing is built.
#            Offline: --wheels DIR (or $JAXSIM_WHEELS) installs with `pip --no-index --find-links DIR`;
#            make DIR where pip reaches PyPI, for the GPU machine's Python version and platform:
#              pip download -d DIR "jax[cuda12]" <the dependencies of pyproject.toml and its test extra>
#            --inherit-site adds the base interpreter's site-packages to the venv (a .pth file), so
#            what it has (a CUDA JAX, say) counts as installed and pip fetches only what is missing;
#            on an offline machine whose python3 has JAX with its CUDA plugin:
#              scripts/gpu_check.sh --inherit-site --jax-spec jax --wheels DIR
#            with DIR holding the wheels of what python3 lacks (hydra-core, omegaconf, ...).
#   probe    the device (JAX platform, device kind, count, memory; nvidia-smi's name and driver),
#            the JAX and jaxlib versions, x64 on, and one int64 add past 2**53 done on the device.
#            Without --cpu, a run whose JAX sees no GPU stops here (the benches at GPU sizes would
#            only time out on a CPU).
#   tests    the tests whose numerics could differ on a GPU (TESTS below): exact int64 nanosecond
#            timestamps against the hand-worked request and the Python oracle, every sweep
#            configuration equal to its own single run (sharded over the local devices, padded
#            chunks), and the exact metric tables.
#   single   scripts/bench.py: the default case (300-request ShareGPT trace, RTX PRO 6000,
#            Llama-3.1-8B), one compiled run, median of --repeats.
#   sweep    scripts/bench.py --sweep N (10,000; --small: 4) in chunks of --sweep-chunk (2,500; 4).
#   scaling  scripts/bench.py --instances 1,4,16 --series strong (--small: 1,2): clusters of N
#            instances serving the default trace.
#
# stdout: the JSON (progress on stderr; --json OUT also writes it to OUT). Keys: ok, mode, device,
# jax, stages ({name: status, rc, wall_s, limit_s}, and the log's last lines when a stage did not
# end ok; status: ok, failed, timed_out, no_time (the budget was spent), not_run (setup or probe
# failed), skipped (no venv wanted)), timed_out, tests ({passed, failed, errors, skipped,
# selected, failures}), single_run, sweep, scaling (the bench JSONs as scripts/bench.py writes
# them: every figure), total_wall_s.
# Exit status 0 when every stage ended ok and every selected test passed, else 1; 2 for bad options.
# Logs and the bench JSONs stay in the work folder (--work, default a new temporary folder).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

# The GPU test subset: numerics a GPU backend could change (int64 time, float latency sums, padding
# under vmap/shard_map), each test small enough to compile in seconds.
TESTS=(
  "tests/test_engine.py::test_worked_check_full_trace_reference_row"  # int64 ns of one request, exact
  "tests/test_engine.py::test_parity_trace_under_kv_pressure"         # 300 requests == the oracle
  "tests/test_engine.py::test_parity_small_workload"                  # 9 scheduler variants == the oracle
  "tests/test_sweep.py"                                               # sweep == single runs, sharded
  "tests/test_metrics.py"                                             # exact tables from int64 times
)
SMALL_TESTS=(
  "tests/test_engine.py::test_worked_check_full_trace_reference_row"
  "tests/test_sweep.py::test_each_configuration_equals_its_single_run[0]"
)

usage() { sed -n '2,40p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; cat <<'EOF'
Options:
  --cpu               run on the CPU (JAX_PLATFORMS=cpu) with this interpreter, no venv (unless --venv)
  --small             small sizes: sweep 4 configurations, clusters of 1 and 2, two tests
  --python PY         base interpreter (default: $PYTHON or python3)
  --venv DIR          the fresh venv (emptied first); default WORK/venv without --cpu
  --no-venv           use the base interpreter as it is (no setup stage)
  --wheels DIR        offline install from DIR (also $JAXSIM_WHEELS)
  --inherit-site      the venv also sees the base interpreter's site-packages
  --jax-spec SPEC     the JAX requirement (default "jax[cuda12]"; --cpu: "jax"; also $JAXSIM_JAX_SPEC)
  --budget S          total seconds (default 470; --cpu --small: 900)
  --sweep-n N         sweep configurations; --sweep-chunk N: configurations per chunk
  --instances LIST    cluster sizes of the scaling bench (default 1,4,16)
  --work DIR          logs and bench JSONs (default: a new temporary folder)
  --json OUT          also write the JSON to OUT
EOF
}

CPU=0; SMALL=0; BASE_PY=${PYTHON:-python3}; VENV=""; NO_VENV=0; WHEELS=${JAXSIM_WHEELS:-}
INHERIT=0; JAX_SPEC=${JAXSIM_JAX_SPEC:-}; BUDGET=""; SWEEP_N=""; SWEEP_CHUNK=""; INSTANCES=""
WORK=""; JSON_OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --small) SMALL=1 ;;
    --python) BASE_PY=$2; shift ;;
    --venv) VENV=$2; shift ;;
    --no-venv) NO_VENV=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --inherit-site) INHERIT=1 ;;
    --jax-spec) JAX_SPEC=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --sweep-n) SWEEP_N=$2; shift ;;
    --sweep-chunk) SWEEP_CHUNK=$2; shift ;;
    --instances) INSTANCES=$2; shift ;;
    --work) WORK=$2; shift ;;
    --json) JSON_OUT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
  echo "gpu_check: --wheels $WHEELS: no such folder" >&2; exit 2
fi
if ! command -v "$BASE_PY" >/dev/null 2>&1; then
  echo "gpu_check: --python $BASE_PY: not found" >&2; exit 2
fi

# Per-stage limits (seconds), cut to what is left of the total. GPU: setup 150 (a CUDA JAX is
# ~3 GB of wheels), the rest sized for one H100/H200 so that all of it fits in 470.
if [ $CPU = 1 ] && [ $SMALL = 1 ]; then
  : "${BUDGET:=900}"; LIM_SETUP=300; LIM_PROBE=60; LIM_TESTS=300; LIM_SINGLE=200; LIM_SWEEP=300; LIM_SCALING=300
else
  : "${BUDGET:=470}"; LIM_SETUP=150; LIM_PROBE=60; LIM_TESTS=110; LIM_SINGLE=45; LIM_SWEEP=150; LIM_SCALING=90
fi
if [ $SMALL = 1 ]; then
  : "${SWEEP_N:=4}" "${SWEEP_CHUNK:=4}" "${INSTANCES:=1,2}"; REPEATS=2; SELECTED=("${SMALL_TESTS[@]}")
else
  : "${SWEEP_N:=10000}" "${SWEEP_CHUNK:=2500}" "${INSTANCES:=1,4,16}"; REPEATS=5; SELECTED=("${TESTS[@]}")
fi
if [ $CPU = 1 ]; then
  : "${JAX_SPEC:=jax}"; export JAX_PLATFORMS=cpu
  [ -z "$VENV" ] && NO_VENV=1
else
  : "${JAX_SPEC:=jax[cuda12]}"
fi
[ -n "$WORK" ] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK" || exit 2
WORK=$(cd "$WORK" && pwd)
[ $NO_VENV = 1 ] && VENV=""
[ $NO_VENV = 0 ] && [ -z "$VENV" ] && VENV="$WORK/venv"
: > "$WORK/stages.tsv"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAXSIM_COMPILE_CACHE=0  # measure compiles, and leave the user's cache alone

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[gpu_check $(elapsed)s] $*" >&2; }

# run_stage NAME LIMIT CMD...: run CMD under min(LIMIT, what is left - 10 s), its output in
# WORK/NAME.log; append "name status rc wall_s limit_s" to WORK/stages.tsv.
run_stage() {
  local name=$1 limit=$2; shift 2
  local left; left=$(awk -v b="$BUDGET" -v e="$(elapsed)" 'BEGIN { printf "%d", b - e - 10 }')
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    log "$name: not run, no time left"
    printf '%s\tno_time\t\t0\t%s\n' "$name" "$limit" >> "$WORK/stages.tsv"; return 1
  fi
  log "$name: up to ${limit} s: $*"
  local t1 rc status; t1=$(elapsed)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1; rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timed_out ;; *) status=failed ;; esac
  local wall; wall=$(awk -v a="$t1" -v b="$(elapsed)" 'BEGIN { printf "%.1f", b - a }')
  log "$name: $status (rc $rc) in ${wall} s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$wall" "$limit" >> "$WORK/stages.tsv"
  [ $status = ok ]
}
# skip_stage NAME STATUS WHY: a stage not run (STATUS skipped: by design; not_run: an earlier one failed)
skip_stage() { printf '%s\t%s\t\t0\t0\n' "$1" "$2" >> "$WORK/stages.tsv"; log "$1: $2 ($3)"; }

setup() {
  set -euo pipefail
  # a fresh venv; where ensurepip is missing (Debian without python3-venv), one without pip that
  # the base interpreter's pip installs into (pip >= 22.3: --python)
  local pip
  if "$BASE_PY" -m venv --clear "$VENV"; then
    pip=("$VENV/bin/python" -m pip)
  else
    "$BASE_PY" -m venv --clear --without-pip "$VENV"
    pip=("$BASE_PY" -m pip --python "$VENV/bin/python")
  fi
  if [ $INHERIT = 1 ]; then
    local purelib; purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$BASE_PY" -c 'import site; print("\n".join(site.getsitepackages()))' > "$purelib/_gpu_check_inherit.pth"
    echo "inherited site-packages:"; cat "$purelib/_gpu_check_inherit.pth"
  fi
  local deps; mapfile -t deps < <("$BASE_PY" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
try:
    import tomllib
    project = tomllib.loads(text)["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["test"]
except ImportError:  # Python 3.10: the two lists are one-line or multi-line string arrays
    deps = []
    for key in ("dependencies", "test"):
        block = re.search(rf"^{key} = \[(.*?)\]", text, re.S | re.M).group(1)
        deps += re.findall(r'"([^"]+)"', block)
print("\n".join(deps))
EOF
)
  local opts=(install --disable-pip-version-check)
  [ -n "$WHEELS" ] && opts+=(--no-index --find-links "$WHEELS")
  echo "pip ${opts[*]} $JAX_SPEC ${deps[*]}"
  "${pip[@]}" "${opts[@]}" "$JAX_SPEC" "${deps[@]}"
}

probe() {
  "$PY" - "$CPU" <<'EOF'
import json, platform, shutil, subprocess, sys
import jax, jaxlib
import jax.numpy as jnp
import jaxsim  # noqa: F401  (turns x64 on, as every jaxsim run does)

devices = jax.devices()
d = devices[0]
big = jnp.asarray(2**53 + 1, jnp.int64)  # a nanosecond count a float64 cannot hold exactly
exact = int(jax.device_get(big + 2)) == 2**53 + 3
out = dict(platform=d.platform, device_kind=d.device_kind, device_count=len(devices),
           devices=[str(x) for x in devices], jax=jax.__version__, jaxlib=jaxlib.__version__,
           python=platform.python_version(), executable=sys.executable,
           x64=bool(jax.config.jax_enable_x64), int64_exact_on_device=exact)
try:
    out["memory_bytes_limit"] = int(d.memory_stats()["bytes_limit"])
except Exception:  # CPU devices have no memory stats
    pass
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    out["nvidia_smi"] = q.stdout.strip().splitlines()
print("PROBE " + json.dumps(out))
if not exact:
    sys.exit("int64 arithmetic on the device is not exact")
if sys.argv[1] != "1" and d.platform != "gpu":
    sys.exit(f"JAX sees no GPU (platform {d.platform!r}): the CUDA wheel or the driver is missing")
EOF
}

# the stage functions run in a child bash under `timeout`
export -f setup probe
export BASE_PY VENV INHERIT ROOT WHEELS JAX_SPEC CPU

log "work folder $WORK; budget ${BUDGET} s; $([ $CPU = 1 ] && echo CPU || echo GPU)$([ $SMALL = 1 ] && echo ', small sizes')"
PY=$BASE_PY
if [ -n "$VENV" ]; then
  if run_stage setup "$LIM_SETUP" bash -c setup; then PY="$VENV/bin/python"; else PY=""; fi
else
  skip_stage setup skipped "the base interpreter $BASE_PY as it is"
fi

export PY
if [ -n "$PY" ] && run_stage probe "$LIM_PROBE" bash -c probe; then
  run_stage tests "$LIM_TESTS" "$PY" -m pytest -v -p no:randomly -p no:cacheprovider "${SELECTED[@]}"
  run_stage single "$LIM_SINGLE" "$PY" scripts/bench.py --repeats "$REPEATS" --json "$WORK/single.json"
  run_stage sweep "$LIM_SWEEP" "$PY" scripts/bench.py --sweep "$SWEEP_N" --chunk-size "$SWEEP_CHUNK" \
    --json "$WORK/sweep.json"
  run_stage scaling "$LIM_SCALING" "$PY" scripts/bench.py --instances "$INSTANCES" --series strong \
    --repeats "$REPEATS" --json "$WORK/scaling.json"
else
  for s in tests single sweep scaling; do skip_stage $s not_run "no working JAX: see the setup or probe stage"; done
fi

# One JSON from the stage table, the probe line, the pytest log and the bench JSONs.
"$BASE_PY" - "$WORK" "$(elapsed)" "$JSON_OUT" "$CPU" "$SMALL" "$VENV" "$WHEELS" "$JAX_SPEC" "$INHERIT" \
  "$BUDGET" "$SWEEP_N" "$SWEEP_CHUNK" "$INSTANCES" "${SELECTED[@]}" <<'EOF'
import json, re, sys
from pathlib import Path

work, total, json_out, cpu, small, venv, wheels, jax_spec, inherit, budget, n, chunk, sizes = sys.argv[1:14]
selected = sys.argv[14:]
work = Path(work)


def tail(name, lines=25):
    p = work / f"{name}.log"
    return p.read_text(errors="replace").splitlines()[-lines:] if p.exists() else []


stages = {}
for line in (work / "stages.tsv").read_text().splitlines():
    name, status, rc, wall, limit = line.split("\t")
    stages[name] = dict(status=status, rc=int(rc) if rc else None, wall_s=float(wall), limit_s=int(limit))
    if status in ("failed", "timed_out"):
        stages[name]["log_tail"] = tail(name)

probe = {}
for line in tail("probe", 200):
    if line.startswith("PROBE "):
        probe = json.loads(line[6:])

tests = dict(passed=0, failed=0, errors=0, skipped=0, selected=selected, failures=[])
if (work / "tests.log").exists():
    # one line per test with -v ("tests/x.py::name[id] PASSED  [ 50%]"): counts survive a timeout
    for m in re.finditer(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b",
                         (work / "tests.log").read_text(errors="replace"), re.M):
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(m[2], "skipped")
        tests[key] += 1
        if key in ("failed", "errors"):
            tests["failures"].append(m[1])


def bench(name):
    p = work / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


out = dict(
    ok=all(s["status"] in ("ok", "skipped") for s in stages.values()) and stages.get("tests", {}).get("status") == "ok"
       and tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0,
    mode=dict(cpu=cpu == "1", small=small == "1", venv=venv or None, wheels=wheels or None,
              jax_spec=jax_spec if venv else None, inherit_site=inherit == "1", budget_s=int(budget),
              sweep_configs=int(n), sweep_chunk=int(chunk), instances=[int(x) for x in sizes.split(",")],
              work=str(work)),
    device=dict((k, probe[k]) for k in ("platform", "device_kind", "device_count", "memory_bytes_limit", "nvidia_smi")
                if k in probe),
    jax=dict((k, probe[k]) for k in ("jax", "jaxlib", "python", "executable", "x64", "int64_exact_on_device")
             if k in probe),
    stages=stages,
    timed_out=[k for k, s in stages.items() if s["status"] == "timed_out"],
    tests=tests,
    single_run=bench("single"),
    sweep=bench("sweep"),
    scaling=bench("scaling"),
    total_wall_s=float(total),
)
text = json.dumps(out, indent=2)
if json_out:
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(text + "\n")
print(text)
sys.exit(0 if out["ok"] else 1)
EOF
