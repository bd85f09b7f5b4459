#!/usr/bin/env python3
"""GPU microbenchmark for the kvtuner kernels (not a test).

Times decode attention for bf16 (SGLang's own triton ``decode_attention_fwd`` and FlashInfer's
paged decode when importable) and our kernel at 16-bit, int8, int4, int2 and K8V4; reports time per call,
bytes moved per call (packed K+V+meta read + q/o), achieved GB/s, fraction of HBM peak
and the ratio vs SGLang bf16 (or vs our 16-bit kernel when SGLang is unavailable).
Also times the store kernel (throughput, and 8k tokens relative to an 8k prefill's
attention through our extend kernel at 16-bit).

    PYTHONPATH=kernels python bench/kernels_bench.py [--quick] [--page 64] [--out results.json]

``--page 64``: the served layout with ``--page-size 64`` (whole pages, values page-transposed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))

from kvtuner.format import TensorFormat  # noqa: E402
from kvtuner.ops import QuantKV, decode_attention, extend_attention, quantize_store  # noqa: E402

try:
    from tqdm import tqdm
except Exception:  # pragma: no cover
    tqdm = None

HBM_PEAK = {"H100": 3.35e12, "H200": 4.8e12, "H20": 4.0e12, "A100": 2.0e12}

# name -> (k bits, v bits); group size and asym from the command line
CONFIGS = {"bf16": (16, 16), "int8": (8, 8), "int4": (4, 4), "int2": (2, 2), "k8v4": (8, 4)}


def hbm_peak(name: str) -> float:
    for key in ("H200", "H100", "H20", "A100"):
        if key in name:
            return HBM_PEAK[key]
    return float("nan")


def git_sha() -> str:
    if os.environ.get("GIT_SHA"):  # the GPU host's git metadata is stale
        return os.environ["GIT_SHA"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return os.environ.get("GIT_SHA", os.environ.get("KVTUNER_GIT_SHA", "unknown"))


def try_sglang():
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd  # type: ignore

        return decode_attention_fwd, None
    except Exception as e:  # noqa: BLE001
        return None, f"unavailable: {type(e).__name__}: {e}"[:300]


def bench_ms(fn, quick: bool) -> float:
    return float(triton.testing.do_bench(fn, warmup=25 if quick else 100, rep=100 if quick else 400, return_mode="median"))


FLUSH_BYTES = 256 << 20  # the L2 flush before each timed replay (triton's do_bench flushes as much)


def _capture(fn):
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream, as ``torch.cuda.graph`` asks), or None
    where it cannot be (a call that syncs or allocates on the host)."""
    stream = torch.cuda.current_stream()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        stream.wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g
    except Exception:  # noqa: BLE001
        torch.cuda.set_stream(stream)  # (a failed capture_end leaves torch.cuda.graph's stream current)
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return None


def _warm_replay(fn, warm: int):
    """``fn`` captured (:func:`_capture`) and replayed ``warm`` times, with the buffer whose zeroing flushes
    the L2 before each timed replay; None where ``fn`` cannot be captured."""
    g = _capture(fn)
    if g is None:
        return None
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(warm):
        g.replay()
    return g, flush


def graph_ms(fn, quick: bool) -> float | None:
    """GPU time of ``fn`` replayed from a CUDA graph, median over replays, the L2 cache flushed (outside the
    graph) before each as :func:`bench_ms` (``triton.testing.do_bench``) flushes it.  ``do_bench`` times an
    eager call, and an eager call's Python and kernel launches run on the CPU while the GPU waits whenever
    they take longer than the flush ahead of them: batch 1 x 1k int4 read 0.116 ms there, for microseconds
    of GPU work.  The server replays decode from CUDA graphs, so this is the time it sees.  None where
    ``fn`` cannot be captured."""
    cap = _warm_replay(fn, 10)
    if cap is None:
        return None
    g, flush = cap
    n = 50 if quick else 200
    start = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        start[i].record()
        g.replay()
        end[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(start, end))
    del g, flush
    return float(times[n // 2])


def parts_from_events(events: list[dict], flush_bytes: int = FLUSH_BYTES) -> dict | None:
    """A replayed call's kernels from a profiler trace (chrome-trace events; ``ts``/``dur`` in us): the
    trace holds L2 flushes (a fill of ``flush_bytes``, recognised by its name or its bytes) each followed by
    one replay.  Returns, averaged over the replays, each kernel's time (``kernels_us``, by name cut at its
    first ``(`` or ``<``), their sum (``busy_us``) and the span from the first kernel's start to the last
    one's end (``span_us``; span - busy = the gaps between the call's kernels).  None without kernel events."""
    ks = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset")),
                key=lambda e: float(e["ts"]))
    if not ks:
        return None

    def is_flush(e: dict) -> bool:
        args = e.get("args") or {}
        return e.get("cat") == "gpu_memset" or int(args.get("bytes", 0) or 0) == flush_bytes or \
            ("fill" in e["name"].lower() and "elementwise" in e["name"].lower())

    groups: list[list[dict]] = [[]]
    for e in ks:
        if is_flush(e):
            groups.append([])
        else:
            groups[-1].append(e)
    groups = [g for g in groups if g]
    if not groups:
        return None
    per: dict[str, float] = {}
    spans = []
    for g in groups:
        spans.append(max(float(e["ts"]) + float(e["dur"]) for e in g) - float(g[0]["ts"]))
        for e in g:
            name = e["name"].split("(")[0].split("<")[0].strip() or e["name"][:60]
            per[name] = per.get(name, 0.0) + float(e["dur"])
    n = len(groups)
    kernels = {k: round(v / n, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
    return {"replays": n, "kernels_us": kernels, "busy_us": round(sum(kernels.values()), 2),
            "span_us": round(sum(spans) / n, 2)}


def graph_parts(fn, n: int = 20) -> dict | None:
    """Where a replayed call's time goes: ``fn`` captured in a CUDA graph, replayed ``n`` times under the
    torch profiler, each replay after an L2 flush as in :func:`graph_ms`; :func:`parts_from_events` of the
    trace.  None where ``fn`` cannot be captured or the trace has no kernels."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    cap = _warm_replay(fn, 5)
    if cap is None:
        return None
    g, flush = cap
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            flush.zero_()
            g.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    del g, flush
    return parts_from_events(events)


def sweep_timer(method: str):
    """The timing function of the sweep scripts (``decode_sweep.py``, ``kivi_decode.py``) and a record of it
    for their JSON: ``graph`` (:func:`graph_ms`, falling back to ``do_bench`` for a call it cannot capture,
    counted) or ``eager`` (``do_bench``, warm-up 25 ms, 150 ms of calls, as before session 36)."""
    record = {"method": method, "eager_fallbacks": 0}

    def timer(fn) -> float:
        if method == "graph":
            t = graph_ms(fn, quick=False)
            if t is not None:
                return t
            record["eager_fallbacks"] += 1
        return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))

    return timer, record


def add_timing_arg(ap) -> None:
    """The sweep scripts' ``--timing`` (the method :func:`sweep_timer` takes)."""
    ap.add_argument("--timing", choices=["graph", "eager"], default="graph",
                    help="graph: each call replayed from a CUDA graph, the L2 flushed before each (as the server runs "
                         "decode; kernels_bench.graph_ms); eager: triton's do_bench of the call (before session 36)")


def fill_pool(kc: QuantKV, vc: QuantKV) -> None:
    s, h = kc.num_slots, kc.num_heads
    chunk = 1 << 18
    for i in range(0, s, chunk):
        n = min(chunk, s - i)
        k = torch.randn(n, h, kc.fmt.head_dim, dtype=torch.bfloat16, device=kc.device)
        v = torch.randn(n, h, vc.fmt.head_dim, dtype=torch.bfloat16, device=kc.device)
        quantize_store(k, v, torch.arange(i, i + n, device=kc.device), kc, vc)


def flashinfer_decode(q, k, v, indptr, idx, hq: int, hkv: int, d: int):
    """FlashInfer's bf16 paged decode over the same pool (page size 1, the same slot indices), set
    up as SGLang's flashinfer backend does (tensor cores from a GQA group of 4 up).  Returns the
    call to time and whether it uses tensor cores."""
    import flashinfer  # type: ignore

    ws = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
    tc = hq // hkv >= 4
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
    last = torch.ones(q.shape[0], dtype=torch.int32, device=q.device)
    w.plan(indptr, idx.to(torch.int32), last, hq, hkv, d, 1, data_type=torch.bfloat16, q_data_type=torch.bfloat16)
    kp, vp = k.view(-1, 1, hkv, d), v.view(-1, 1, hkv, d)
    return (lambda: w.run(q, (kp, vp))), tc


def fill_record(row: dict, max_splits: int) -> None:
    """Under ``KVTUNER_DECODE``'s ``fill`` (decode.py): the resident programs the swapped launches of this head
    layout found (``wave_slots``) and the split floor that gives this row (``fill_splits``)."""
    from kvtuner.ops import decode as D

    if not D._env_tuning().get("fill") or row["config"] == "bf16":
        return
    group = row["hq"] // row["hkv"]
    slots = sorted({v for k, v in D._WAVE_SLOTS.items() if k[3] == group and k[4] == row["hq"]})
    row["wave_slots"] = slots
    if len(slots) == 1:
        blocks = -(-row["hq"] // min(8 if group <= 8 else 16, group))
        row["fill_splits"] = D.fill_splits(slots[0], row["batch"] * blocks, max_splits)


def num_splits_for(batch: int, ctx: int, hq: int, hkv: int, sms: int, max_splits: int, device) -> tuple[int, str]:
    """The split count the server would give these requests: SGLang's own heuristic (its triton
    backend's ``get_num_kv_splits_triton``, what the patched server runs) where importable, else
    one like it in spirit (enough programs to fill the GPU, at least 256 tokens a split)."""
    try:
        from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton  # type: ignore

        seq = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        out = torch.zeros(batch, dtype=torch.int32, device=device)
        get_num_kv_splits_triton[(1,)](out, seq, batch, 1, hq, hkv, max_splits, sms,
                                       MAX_NUM_SEQ=max(256, triton.next_power_of_2(batch)))
        return int(out[0]), "sglang"
    except Exception:  # noqa: BLE001
        want = max(1, math.ceil(2 * sms / max(1, batch * hkv)))
        return int(max(1, min(max_splits, want, math.ceil(ctx / 256)))), "estimate"


def with_page(args, vc: QuantKV, kf: TensorFormat) -> QuantKV:
    """``--page P``: values of packed K/V pools in the transposed-page layout, as the server keeps
    them with ``--page-size P`` (16-bit K or V: token-major, as in the server)."""
    if args.page and kf.quantized and vc.fmt.quantized:
        return QuantKV(vc.data, vc.meta, vc.fmt, args.page)
    return vc


def slot_order(s: int, device, page: int = 0, shuffle: bool = True) -> torch.Tensor:
    """The slots of ``s`` tokens (requests back to back): shuffled or contiguous, or with ``page``
    whole aligned pages, in shuffled or contiguous page order (SGLang's paged allocator)."""
    n = s // page if page else s
    order = torch.randperm(n, device=device) if shuffle else torch.arange(n, device=device)
    if page:
        return (order[:, None] * page + torch.arange(page, device=device)).flatten()
    return order


def decode_case(args, batch, ctx, hq, hkv, d, cfg, sglang_fwd, device, sms):
    kb, vb = CONFIGS[cfg]
    g = args.group
    kf = TensorFormat(kb, d, g if kb != 16 else d, args.asym and kb != 16)
    vf = TensorFormat(vb, d, g if vb != 16 else d, args.asym and vb != 16)
    s = batch * ctx
    k_bytes = s * hkv * kf.bytes_per_token_head()
    v_bytes = s * hkv * vf.bytes_per_token_head()
    if k_bytes + v_bytes > args.mem_budget_gib * 2**30:
        return {"skipped": f"pool {((k_bytes + v_bytes) / 2**30):.1f} GiB > budget"}
    kc = QuantKV.empty(s, hkv, kf, device=device)
    vc = with_page(args, QuantKV.empty(s, hkv, vf, device=device), kf)
    fill_pool(kc, vc)
    idx = slot_order(s, device, args.page, args.shuffle)
    indptr = torch.arange(0, s + 1, ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device=device)
    o = torch.empty(batch, hq, d, dtype=torch.bfloat16, device=device)
    ms = args.max_splits
    ns, ns_from = num_splits_for(batch, ctx, hq, hkv, sms, ms, device)
    logits = torch.empty(batch, hq, ms, d, dtype=torch.float32, device=device)
    lse = torch.empty(batch, hq, ms, dtype=torch.float32, device=device)
    nsplit = torch.full((batch,), ns, dtype=torch.int32, device=device)
    sm = d**-0.5

    def ours():
        return decode_attention(q, kc, vc, o, indptr, idx, logits, lse, nsplit, ms, sm)

    t = bench_ms(ours, args.quick)
    moved = k_bytes + v_bytes + q.numel() * 2 + o.numel() * 2 + idx.numel() * idx.element_size()
    res = {"ms": t, "bytes": moved, "GBps": moved / t / 1e6, "num_kv_splits": ns, "splits_from": ns_from}
    if args.graph:
        tg = graph_ms(ours, args.quick)
        if tg:
            res.update(graph_ms=tg, graph_GBps=moved / tg / 1e6)
        if args.parts:
            res["graph_parts"] = graph_parts(ours)
    if kf.quantized and vf.quantized and os.environ.get("KVTUNER_DECODE", "").strip():
        # a tuned launch (the last replay's output, left in o) against the plain two-stage launch: a merge
        # inside stage 1 (fused) or a dependent stage 2 (pdl) that raced would show here
        o2 = torch.empty_like(o)
        decode_attention(q, kc, vc, o2, indptr, idx, logits, lse, nsplit, ms, sm, pdl=False, fused=False)
        res["vs_plain_max_abs_diff"] = float((o.float() - o2.float()).abs().max())
    if kf.quantized and vf.quantized and args.page >= 64:  # the swapped default launch raises the count to a floor
        from kvtuner.ops.decode import swap_default_warps, swap_min_splits

        w = swap_default_warps(kf, vf, batch, hq, hq // hkv, torch.device(device).index)
        if w:
            res["kvtuner_splits"] = min(ms, max(ns, swap_min_splits(w)))
    sg = None
    if cfg == "bf16" and sglang_fwd is not None:
        def theirs():
            return sglang_fwd(q, kc.data, vc.data, o, indptr, idx, logits, lse, nsplit, ms, sm, 1.0, 1.0)

        try:
            sg = bench_ms(theirs, args.quick)
            res["sglang_ms"] = sg
            if args.graph:
                sgg = graph_ms(theirs, args.quick)
                if sgg:
                    res["sglang_graph_ms"] = sgg
                if args.parts:
                    res["sglang_graph_parts"] = graph_parts(theirs)
        except Exception as e:  # noqa: BLE001
            res["sglang_error"] = f"{type(e).__name__}: {e}"[:300]
    if cfg == "bf16" and args.flashinfer:
        try:
            fn, tc = flashinfer_decode(q, kc.data, vc.data, indptr, idx, hq, hkv, d)
            res["flashinfer_max_abs_diff"] = float((fn().float() - o.float()).abs().max())  # o: the last triton decode (bf16)
            res["flashinfer_ms"] = bench_ms(fn, args.quick)
            fig = graph_ms(fn, args.quick) if args.graph else None
            if fig:
                res["flashinfer_graph_ms"] = fig
            res["flashinfer_tensor_cores"] = tc
        except Exception as e:  # noqa: BLE001
            res["flashinfer_error"] = f"{type(e).__name__}: {e}"[:300]
    del kc, vc, logits
    torch.cuda.empty_cache()
    return res


def store_case(args, device, hkv, d, cfg, scattered=False, **store_kw):
    kb, vb = CONFIGS[cfg]
    g = args.group
    kf = TensorFormat(kb, d, g if kb != 16 else d, args.asym and kb != 16)
    vf = TensorFormat(vb, d, g if vb != 16 else d, args.asym and vb != 16)
    t = 8192
    s = 4 * t
    kc = QuantKV.empty(s, hkv, kf, device=device)
    vc = with_page(args, QuantKV.empty(s, hkv, vf, device=device), kf)
    k = torch.randn(t, hkv, d, dtype=torch.bfloat16, device=device)
    v = torch.randn(t, hkv, d, dtype=torch.bfloat16, device=device)
    # a prefill's slots as the server gives them: with --page, whole pages in shuffled page order
    # (the tokens of a page side by side); without, or ``scattered`` (a decode batch's one token a
    # request, written anywhere), a random permutation
    if scattered or not args.page:
        slots = torch.randperm(s, device=device)[:t]
    else:
        slots = slot_order(s, device, args.page, args.shuffle)[:t]
    ms = bench_ms(lambda: quantize_store(k, v, slots, kc, vc, **store_kw), args.quick)
    moved = 2 * k.numel() * 2 + t * hkv * (kf.bytes_per_token_head() + vf.bytes_per_token_head())
    return {"tokens": t, "ms": ms, "bytes": moved, "GBps": moved / ms / 1e6, "tokens_per_s": t / ms * 1e3}


def prefill_ms(args, device, hq, hkv, d):
    """Our extend kernel at 16-bit, one 8k-token request with no prefix."""
    t = 8192
    f = TensorFormat(16, d, d)
    kc = QuantKV.empty(1, hkv, f, device=device)
    q = torch.randn(t, hq, d, dtype=torch.bfloat16, device=device)
    k = torch.randn(t, hkv, d, dtype=torch.bfloat16, device=device)
    v = torch.randn(t, hkv, d, dtype=torch.bfloat16, device=device)
    o = torch.empty_like(q)
    qo = torch.tensor([0, t], dtype=torch.int32, device=device)
    kvp = torch.tensor([0, 0], dtype=torch.int32, device=device)
    idx = torch.zeros(1, dtype=torch.int64, device=device)
    return bench_ms(lambda: extend_attention(q, k, v, o, kc, kc, qo, kvp, idx, t, d**-0.5), args.quick)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes, short timing")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--group", type=int, default=64, help="group size for quantized formats")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--max-splits", type=int, default=8, help="the most KV splits (the server's --triton-attention-num-kv-splits, default 8)")
    ap.add_argument("--mem-budget-gib", type=float, default=40.0)
    ap.add_argument("--no-flashinfer", dest="flashinfer", action="store_false",
                    help="skip FlashInfer's bf16 decode (its first use JIT-compiles for minutes on a bare host)")
    ap.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="contiguous slots instead of a random permutation")
    ap.add_argument("--page", type=int, default=0,
                    help="slots in whole pages of P (shuffled page order) and, for packed K and V, values in the "
                         "transposed-page layout, as served with --page-size P (a power of two, 16..128)")
    ap.add_argument("--store-only", action="store_true",
                    help="only the store table (and the 8k prefill it is compared with), every store form")
    ap.add_argument("--no-graph", dest="graph", action="store_false",
                    help="skip the CUDA-graph replay timings of decode (graph_ms, sglang_graph_ms, flashinfer_graph_ms)")
    ap.add_argument("--parts", action="store_true",
                    help="also profile 20 graph replays of each decode (graph_parts: each kernel's time, their sum and the "
                         "span from the first kernel's start to the last one's end, so stage 1, stage 2 and the gap "
                         "between them apart)")
    ap.add_argument("--shapes", help="only these BxCTX shapes, comma-separated (e.g. 64x8192; default: the full table)")
    ap.add_argument("--cfgs", help=f"only these configurations, comma-separated (from {', '.join(CONFIGS)})")
    ap.add_argument("--check", action="store_true", help="validate the arguments and exit (no GPU)")
    args = ap.parse_args()
    only_shapes = None
    if args.shapes:
        try:
            only_shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
        except ValueError:
            only_shapes = []
        if not only_shapes or any(len(sh) != 2 for sh in only_shapes):
            ap.error(f"--shapes {args.shapes!r}: BxCTX[,BxCTX...]")
    only_cfgs = args.cfgs.split(",") if args.cfgs else None
    if only_cfgs and any(c not in CONFIGS for c in only_cfgs):
        ap.error(f"--cfgs {args.cfgs!r}: from {', '.join(CONFIGS)}")
    if args.page and (not 16 <= args.page <= 128 or args.page & (args.page - 1)):
        ap.error(f"--page {args.page}: a power of two from 16 to 128")
    if args.parts and not args.graph:
        ap.error("--parts profiles graph replays: drop --no-graph")
    if args.check:
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = "cuda"
    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    peak = hbm_peak(name)
    sglang_fwd, sglang_status = try_sglang()
    try:
        import flashinfer  # type: ignore  # noqa: F401

        fi_status = "bf16 decode timed (flashinfer_ms; no packed-format path)" if args.flashinfer else "importable, not timed (--no-flashinfer)"
    except Exception as e:  # noqa: BLE001
        fi_status = f"unavailable: {type(e).__name__}"

    if args.quick:
        shapes = [(16, 1024), (64, 8192)]
        heads = [(32, 8)]
        cfgs = ["bf16", "int8", "int4", "int2", "k8v4"]
    else:
        shapes = [(b, c) for b in (1, 16, 64, 256) for c in (1024, 8192, 32768)]
        heads = [(32, 8), (28, 4)]
        cfgs = list(CONFIGS)
    shapes = only_shapes or shapes
    cfgs = [c for c in cfgs if c in only_cfgs] if only_cfgs else cfgs
    d = 128
    results = {
        "device": name,
        "sms": sms,
        "hbm_peak_Bps": peak,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_sha": git_sha(),
        "argv": sys.argv,
        "kvtuner_decode_env": os.environ.get("KVTUNER_DECODE", ""),  # launch settings of a tuned run (decode.py)
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sglang": "available" if sglang_fwd is not None else sglang_status,
        "flashinfer": fi_status,
        "group": args.group,
        "asym": args.asym,
        "shuffled_slots": args.shuffle,
        "page": args.page,  # > 0: paged slots, values page-transposed (QuantKV.page)
        "decode": [],
        "store": [],
    }
    jobs = [] if args.store_only else [(b, c, hq, hkv, cfg) for (b, c) in shapes for (hq, hkv) in heads for cfg in cfgs]
    it = tqdm(jobs, desc="decode") if tqdm is not None else jobs
    base, base_graph = {}, {}  # SGLang's bf16 decode per shape: eager and replayed from a CUDA graph
    for b, c, hq, hkv, cfg in it:
        try:
            r = decode_case(args, b, c, hq, hkv, d, cfg, sglang_fwd, device, sms)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            r = {"skipped": f"OOM: {e}"[:200]}
        row = {"batch": b, "ctx": c, "hq": hq, "hkv": hkv, "d": d, "config": cfg, **r}
        fill_record(row, args.max_splits)
        if "ms" in r:
            row["frac_hbm_peak"] = r["GBps"] * 1e9 / peak if peak == peak else None
            if "graph_GBps" in r:
                row["graph_frac_hbm_peak"] = r["graph_GBps"] * 1e9 / peak if peak == peak else None
            key = (b, c, hq, hkv)
            if cfg == "bf16":
                base[key] = r.get("sglang_ms", r["ms"])
                row["baseline"] = "sglang_bf16" if "sglang_ms" in r else "kvtuner_16bit"
                if "sglang_graph_ms" in r:
                    base_graph[key] = r["sglang_graph_ms"]
            if key in base:
                row["speedup_vs_bf16"] = base[key] / r["ms"]
            if key in base_graph and "graph_ms" in r:
                row["graph_speedup_vs_bf16"] = base_graph[key] / r["graph_ms"]
        results["decode"].append(row)
        if tqdm is None:
            print(json.dumps(row), flush=True)

    for hq, hkv in heads:
        pre = prefill_ms(args, device, hq, hkv, d)
        for cfg in cfgs:
            # --store-only with --page: the one-token form against the token tiles, with a prefill's
            # slots and with scattered ones (a decode batch's)
            forms = [("default", {})]
            if args.store_only and args.page:
                forms += [(f"{sc}tile{n}", {"tile": n, "scattered": sc == "sc-"}) for sc in ("", "sc-")
                          for n in (0, 16, 32)]
            for form, kw in forms:
                r = store_case(args, device, hkv, d, cfg, **kw)
                r.update({"hq": hq, "hkv": hkv, "d": d, "config": cfg, "form": form, "prefill_8k_attention_ms": pre,
                          "store_over_prefill_attention": r["ms"] / pre})
                results["store"].append(r)

    # summary
    print(f"# {name}  torch {torch.__version__}  triton {triton.__version__}  sglang: {results['sglang']}")
    print(f"{'B':>4} {'ctx':>6} {'heads':>6} {'cfg':>5} {'ms':>8} {'GB/s':>8} {'%peak':>6} {'x bf16':>7}")
    for r in results["decode"]:
        if "ms" not in r:
            print(f"{r['batch']:>4} {r['ctx']:>6} {r['hq']}/{r['hkv']:<3} {r['config']:>5}  {r['skipped']}")
            continue
        fp = r.get("frac_hbm_peak") or float("nan")
        print(f"{r['batch']:>4} {r['ctx']:>6} {r['hq']:>3}/{r['hkv']:<2} {r['config']:>5} {r['ms']:8.4f} "
              f"{r['GBps']:8.0f} {100 * fp:6.1f} {r.get('speedup_vs_bf16', float('nan')):7.2f}"
              + (f"  graph {r['graph_ms']:.4f} ms {100 * (r.get('graph_frac_hbm_peak') or float('nan')):5.1f}%"
                 f" x bf16 {r.get('graph_speedup_vs_bf16', float('nan')):.2f}" if "graph_ms" in r else "")
              + (f"  (sglang bf16 {r['sglang_ms']:.4f} ms)" if "sglang_ms" in r else "")
              + (f"  (flashinfer bf16 {r['flashinfer_ms']:.4f} ms)" if "flashinfer_ms" in r else ""))
    for r in results["store"]:
        print(f"store {r['hq']}/{r['hkv']} {r['config']:>5} {r['form']:>10}: {r['ms'] * 1e3:8.1f} us for {r['tokens']} tokens, "
              f"{r['GBps']:.0f} GB/s, {100 * r['store_over_prefill_attention']:.2f}% of an 8k prefill's attention "
              f"({r['prefill_8k_attention_ms']:.2f} ms)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
