"""Convert NVIDIA AIConfigurator's vLLM 0.19.0 operator tables into the compact files jaxsim ships.

Build-time only (needs pyarrow); the run-time reader :mod:`jaxsim.operator_db` reads the result
with the standard library and numpy. Source: ``../shared/data/operator-db/aiconfigurator/``
(ai-dynamo/aiconfigurator ``aic-core/src/aiconfigurator_core/systems/``, snapshot 095f58a,
Apache-2.0). Output: ``profiles/operator-db/<system>/`` per system (h100_sxm, h200_sxm, b200_sxm,
gb200, rtx_pro_6000_server) plus the LICENSE and a provenance README one level up.

Kept (everything else is dropped; the README written here lists it):

* ``gemm.csv.gz``: ``gemm_dtype,m,n,k,time_us`` for gemm_dtype bfloat16 and fp8 (per-tensor).
* ``context_attention.csv.gz`` / ``generation_attention.csv.gz``: attn_dtype bfloat16,
  kv_cache_dtype bfloat16 and fp8, window_size 0 (full attention; gb200's tables have no
  window_size column and are all full attention), one kernel per system and KV dtype
  (``vllm_flash_attn`` where the system has it for that KV dtype, else ``vllm_flashinfer``: the
  native RTX PRO 6000 bundles time vLLM's FlashAttention backend; on that GPU the FP8-KV rows are
  FlashInfer's only).
* ``moe.csv.gz``: kernel ``vllm_fused_moe``, moe_dtype bfloat16 and fp8, distribution balanced.
* ``allreduce.csv``: vLLM's custom all-reduce (bfloat16; eager and graph backends).
* ``nccl.csv``: the newest NCCL version's table (all ops, half precision).
* ``spec.yaml``: the system's spec sheet, verbatim.

Rows with the same key (the source has them: e.g. 3,264 in h100's context table) are merged into
their median; the README reports how many and how far apart they were. Times are written in µs
with 6 significant digits. Files are written byte-reproducibly (sorted rows, gzip mtime 0).

Usage: ``python scripts/import_operator_db.py [--src DIR] [--out profiles/operator-db]``.
"""

import argparse
import collections
import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

SYSTEMS = ("h100_sxm", "h200_sxm", "b200_sxm", "gb200", "rtx_pro_6000_server")
SNAPSHOT = "095f58a"
REPO = "https://github.com/ai-dynamo/aiconfigurator (aic-core/src/aiconfigurator_core/systems/)"
V = "vllm/0.19.0"


def _read(path: Path) -> dict:
    t = pq.read_table(path).to_pydict()
    n = len(t["latency"])
    if "window_size" not in t:
        t["window_size"] = [0] * n
    return t


def _merge(t: dict, keep, keys: tuple, stats: dict, name: str) -> list:
    """Rows ``(key..., time_us)`` for rows where ``keep(row)``; duplicate keys -> median (recorded)."""
    groups = collections.defaultdict(list)
    cols = [t[k] for k in keys]
    for i in range(len(t["latency"])):
        if keep(i):
            groups[tuple(c[i] for c in cols)].append(float(t["latency"][i]) * 1000.0)  # ms -> us
    dup = [v for v in groups.values() if len(v) > 1]
    spread = [max(v) / min(v) - 1.0 for v in dup]
    stats[name] = {"rows": len(groups), "duplicate_keys": len(dup),
                   "dup_spread_p50": float(np.median(spread)) if dup else 0.0,
                   "dup_spread_max": float(max(spread)) if dup else 0.0}
    return sorted((k + (float(np.median(v)),) for k, v in groups.items()), key=lambda r: tuple(map(str, r[:1])) + r[1:-1])


def _csv_text(header: tuple, rows: list) -> str:
    out = io.StringIO()
    out.write(",".join(header) + "\n")
    for r in rows:
        out.write(",".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in r) + "\n")
    return out.getvalue()


def _write(path: Path, text: str) -> None:
    data = text.encode()
    if path.suffix == ".gz":
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
            g.write(data)
        data = buf.getvalue()
    path.write_bytes(data)


def convert(src: Path, out: Path, system: str) -> dict:
    d = src / "data" / system
    dst = out / system
    dst.mkdir(parents=True, exist_ok=True)
    stats: dict = {}

    g = _read(d / "gemm" / V / "gemm_perf.parquet")
    rows = _merge(g, lambda i: g["gemm_dtype"][i] in ("bfloat16", "fp8"), ("gemm_dtype", "m", "n", "k"), stats, "gemm")
    _write(dst / "gemm.csv.gz", _csv_text(("gemm_dtype", "m", "n", "k", "time_us"), rows))

    akeys = ("kv_cache_dtype", "batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim")
    for name, extra in (("context_attention", ()), ("generation_attention", ("step",))):
        a = _read(d / "attention" / V / f"{name}_perf.parquet")
        held = set(zip(a["kernel_source"], a["kv_cache_dtype"]))
        kernel = {kv: "vllm_flash_attn" if ("vllm_flash_attn", kv) in held else "vllm_flashinfer"
                  for kv in ("bfloat16", "fp8")}
        stats[f"{name}_kernel"] = "kv bf16: {bfloat16}, kv fp8: {fp8}".format(**kernel)
        keep = (lambda i, a=a, kernel=kernel: a["attn_dtype"][i] == "bfloat16" and a["kv_cache_dtype"][i] in kernel
                and a["kernel_source"][i] == kernel[a["kv_cache_dtype"][i]] and int(a["window_size"][i]) == 0)
        rows = _merge(a, keep, akeys + extra, stats, name)
        _write(dst / f"{name}.csv.gz", _csv_text(akeys + extra + ("time_us",), rows))

    m = _read(d / "moe" / V / "moe_perf.parquet")
    mkeys = ("moe_dtype", "num_tokens", "hidden_size", "inter_size", "topk", "num_experts", "moe_tp_size", "moe_ep_size")
    rows = _merge(m, lambda i: m["kernel_source"][i] == "vllm_fused_moe" and m["moe_dtype"][i] in ("bfloat16", "fp8")
                  and m["distribution"][i] == "balanced", mkeys, stats, "moe")
    _write(dst / "moe.csv.gz", _csv_text(mkeys + ("time_us",), rows))

    c = _read(d / "comm" / V / "custom_allreduce_perf.parquet")
    rows = _merge(c, lambda i: c["allreduce_dtype"][i] == "bfloat16", ("backend", "num_gpus", "message_size"),
                  stats, "allreduce")
    _write(dst / "allreduce.csv", _csv_text(("backend", "num_gpus", "message_size", "time_us"), rows))

    versions = sorted((p.name for p in (d / "comm" / "nccl").iterdir() if p.is_dir()),
                      key=lambda s: tuple(int(x) for x in s.split(".")))
    newest = versions[-1]
    stats["nccl_version"] = newest
    n = _read(d / "comm" / "nccl" / newest / "nccl_perf.parquet")
    rows = _merge(n, lambda i: n["nccl_dtype"][i] == "half", ("op_name", "num_gpus", "message_size"), stats, "nccl")
    _write(dst / "nccl.csv", _csv_text(("op_name", "num_gpus", "message_size", "time_us"), rows))

    shutil.copyfile(src / f"{system}.yaml", dst / "spec.yaml")
    return stats


README_HEAD = """# operator-db/: NVIDIA AIConfigurator's measured vLLM operator tables, converted

Written by `python scripts/import_operator_db.py` (do not edit by hand; rerunning it gives identical files).
Read at run time by `jaxsim/operator_db.py` (hardware `h100`, `h200`, `b200`, `gb200`, `rtxpro6000_opdb`),
which builds a profile bundle for any shipped model and TP degree from these tables.

Source: {repo}, snapshot {snap}, via `../shared/data/operator-db/aiconfigurator/` (Apache License 2.0,
`LICENSE.aiconfigurator` here). All source latencies are milliseconds; the files here hold **microseconds**
(`time_us`, 6 significant digits).

Per system (`h100_sxm`, `h200_sxm`, `b200_sxm`, `gb200`, `rtx_pro_6000_server`):

| file | columns | kept from the source |
|---|---|---|
| `gemm.csv.gz` | `gemm_dtype,m,n,k,time_us` | `gemm/vllm/0.19.0/gemm_perf.parquet`, gemm_dtype bfloat16 and fp8 (dropped: fp8_block, nvfp4) |
| `context_attention.csv.gz` | `kv_cache_dtype,batch_size,isl,num_heads,num_key_value_heads,head_dim,time_us` | attn_dtype bfloat16, kv bfloat16/fp8, window_size 0, one kernel per KV dtype (below) |
| `generation_attention.csv.gz` | same plus `step` | same filter; context length = isl + step |
| `moe.csv.gz` | `moe_dtype,num_tokens,hidden_size,inter_size,topk,num_experts,moe_tp_size,moe_ep_size,time_us` | kernel vllm_fused_moe, moe_dtype bfloat16/fp8, distribution balanced (dropped: power_law_*, int4/fp4 kernels) |
| `allreduce.csv` | `backend,num_gpus,message_size,time_us` | `comm/vllm/0.19.0/custom_allreduce_perf.parquet` (bfloat16; message_size in elements) |
| `nccl.csv` | `op_name,num_gpus,message_size,time_us` | the newest `comm/nccl/<version>/` table, nccl_dtype half |
| `spec.yaml` | | `<system>.yaml` verbatim (peak FLOP/s, memory bandwidth/capacity, links; its empirical factors are the vendor tool's) |

Dropped entirely: MLA, sparse, linear and encoder attention (models jaxsim does not have), older NCCL tables.
Rows with the same key in the source are merged into their median.

| system | kernel (context / generation) | NCCL | rows gemm / ctx / gen / moe | duplicate keys merged (ctx / gen / moe), max spread |
|---|---|---|---|---|
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--src", type=Path, default=root.parent / "shared" / "data" / "operator-db" / "aiconfigurator")
    ap.add_argument("--out", type=Path, default=root / "profiles" / "operator-db")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    lines = [README_HEAD.format(repo=REPO, snap=SNAPSHOT)]
    for s in SYSTEMS:
        st = convert(a.src, a.out, s)
        spread = max(st[k]["dup_spread_max"] for k in ("context_attention", "generation_attention", "moe"))
        lines.append(f"| {s} | {st['context_attention_kernel']} / {st['generation_attention_kernel']} | "
                     f"{st['nccl_version']} | {st['gemm']['rows']} / {st['context_attention']['rows']} / "
                     f"{st['generation_attention']['rows']} / {st['moe']['rows']} | "
                     f"{st['context_attention']['duplicate_keys']} / {st['generation_attention']['duplicate_keys']} / "
                     f"{st['moe']['duplicate_keys']}, {spread:.1%} |\n")
        print(s, {k: v for k, v in st.items()})
    _write(a.out / "README.md", "".join(lines))
    shutil.copyfile(a.src / "LICENSE.aiconfigurator", a.out / "LICENSE.aiconfigurator")


if __name__ == "__main__":
    main()
