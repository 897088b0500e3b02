"""Profile a model's operators on the local JAX device and write a jaxsim profile bundle.

    python scripts/profile.py hardware=CPU model=meta-llama/Llama-3.1-8B            # width 4, default grid
    python scripts/profile.py hardware=CPU model=meta-llama/Llama-3.1-8B grid=tiny width=8 repeats=3
    python scripts/profile.py hardware=H200local model=Qwen/Qwen3-32B width=1 out=profiles   # on a GPU
    python scripts/profile.py hardware=CPU model=meta-llama/Llama-3.1-8B compare=rtx_pro_6000_server

Keys (``key=value``, each at most once; an unknown key is an error):
  hardware  the bundle's hardware name (a folder under ``out``; required)
  model     ``org/name`` of a config in ``<profiles>/models`` (required)
  tp        tensor-parallel degree of the per-rank shapes (default 1)
  width     width reduction: hidden, intermediate, heads and vocabulary divided by it, head_dim kept
            (default 4 for a CPU, 1 on a GPU/TPU; recorded as ``engine_effective.hf_overrides``)
  grid      default | tiny (jaxsim.profiler.GRIDS)
  repeats   timed runs per point (default 3); warmup: untimed runs before them (default 1)
  variant   bf16 | fp16 | fp32 (default bf16)
  out       where the bundle goes (default ``out/profiles``); ``architectures/`` and ``models/``
            are copied there and ``workloads/`` linked when missing, so the folder is a
            ``paths.profiles`` of its own
  profiles  where the model configs and architectures come from (default the project's profiles/)
  compare   an operator-DB system (e.g. ``rtx_pro_6000_server``, ``h200_sxm``): after profiling
            (or instead of it, with ``profile=false`` on an existing bundle), print the median and
            p90 relative error of the GEMM and attention rows against that system's tables
  profile   true | false (default true): false only compares an existing bundle

Simulate with the bundle (its hardware has no conf/hardware YAML: take any and rename it):
    python scripts/run.py paths.profiles=out/profiles hardware.name=CPU workload=example
A bundle profiled at reduced width is named in the run summary's approximations.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxsim.errors import JaxsimInputError, unknown_key_fix  # noqa: E402

KEYS = ("hardware", "model", "tp", "width", "grid", "repeats", "warmup", "variant", "out", "profiles",
        "compare", "profile")
REQUIRED = ("hardware", "model")


def parse_args(argv) -> dict:
    """``key=value`` arguments as a dict of strings; errors name the argument and what to do."""
    args = {}
    for a in argv:
        if "=" not in a:
            raise JaxsimInputError(a, "expected key=value", f"keys: {', '.join(KEYS)}")
        key, value = a.split("=", 1)
        key = key.strip().lstrip("+")
        if key not in KEYS:
            raise JaxsimInputError(key, "unknown key", unknown_key_fix(key, KEYS))
        if key in args:
            raise JaxsimInputError(key, "given twice", "give each key once")
        args[key] = value.strip()
    for key in REQUIRED:
        if key not in args:
            raise JaxsimInputError(key, "missing", f"e.g. {key}=" + ("CPU" if key == "hardware" else
                                                                     "meta-llama/Llama-3.1-8B"))
    return args


def _int(args, key, default, lo):
    text = args.get(key)
    if text is None:
        return default
    try:
        v = int(text)
    except ValueError:
        raise JaxsimInputError(key, f"{text!r} is not a whole number") from None
    if v < lo:
        raise JaxsimInputError(key, f"must be >= {lo}, got {v}")
    return v


def _bool(args, key, default):
    text = args.get(key)
    if text is None:
        return default
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise JaxsimInputError(key, f"{text!r} is not true or false")
    return text.lower() in ("true", "1", "yes")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = parse_args(argv)
        import jax

        from jaxsim import profiler
        from jaxsim.model import load_model_config

        src = Path(args.get("profiles", ROOT / "profiles"))
        model = load_model_config(src / "models", args["model"])
        on_cpu = jax.devices()[0].platform == "cpu"
        width = _int(args, "width", 4 if on_cpu else 1, 1)
        tp = _int(args, "tp", 1, 1)
        variant = args.get("variant", "bf16")
        out = Path(args.get("out", ROOT / "out" / "profiles"))
        base = out / args["hardware"] / model.name / variant
        if _bool(args, "profile", True):
            print(f"profiling {model.name} (width {width}, tp {tp}, grid {args.get('grid', 'default')}) on "
                  f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
            t0 = time.perf_counter()
            base = profiler.profile_model(model, args["hardware"], out, tp=tp, width=width,
                                          grid=args.get("grid", "default"), repeats=_int(args, "repeats", 3, 1),
                                          warmup=_int(args, "warmup", 1, 0), variant=variant, profiles_src=src)
            print(f"total wall time {time.perf_counter() - t0:.1f} s")
        elif not (base / f"tp{tp}").is_dir():
            raise JaxsimInputError(str(base / f"tp{tp}"), "no such bundle to compare", "profile it first")
        if "compare" in args:
            import yaml

            meta = yaml.safe_load((base / "meta.yaml").read_text()) or {}
            small, _ = profiler.reduced_model(model, int(meta.get("width", width)))  # the width profiled
            cmp = profiler.compare_with_operator_db(base, args["compare"], small, tp=tp)
            print(profiler.format_comparison(cmp, args["compare"]))
    except JaxsimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
