"""Roofline of the Pallas kernels against their naive XLA paths, for gpt-oss-20b and gpt-oss-120b (analytic).

For each kernel and case this counts the HBM bytes moved and the FLOPs, for the Pallas kernel and for the naive
XLA path it replaces, and predicts time = max(bytes / HBM bandwidth, FLOPs / peak) on an H100 (the Triton
kernels) and a TPU v5e (the Mosaic kernels). Nothing runs on an accelerator: the "measured" column says so.

Model (every shape comes from `ModelConfig`; the tile sizes are the kernels' defaults):
- Bytes are compulsory HBM traffic: each operand read once, each result written once, caches perfect. Copies
  that the kernels' wrappers make (even/odd split of x, TPU transposes, padding) are counted with the kernel.
  Re-fetches of a tile from HBM by several grid steps (x once per N tile in the MoE kernel, K/V once per query
  block and query head in flash attention) are not: they are served by L2 (GPU) or the pipeline (TPU).
- MoE grouped matmul (mlp1 with the fused SwiGLU, mlp2): the kernel reads each routed expert's MXFP4 weights
  (4 bits + one 8-bit scale per 32 = 4.25 bits a weight) once. Routed experts: E (1 - (1 - k/E)^tokens) in
  expectation (uniform routing; all E for a prefill). The naive path dequantizes those experts to bf16 in HBM
  (read 4.25 bits, write 16) and a dense grouped matmul reads the copy (16). Activations in bf16; outputs in
  float32 as both paths write them; the naive mlp1 writes the [rows, 2I] pre-activation and reads it back for the
  SwiGLU. Useful FLOPs 2 x rows x N x K; the kernel issues whole row tiles per (row tile, expert) work item.
- Prefill attention: the flash kernel computes the key blocks that meet the causal band (blocks 64 on GPU, 128
  on TPU); the naive path (`attention_xla`) materializes the [heads, T, T] float32 scores: written once, read
  three times (max, sum, normalise), bf16 probabilities written and read by the PV product. FLOPs 4 x head_dim
  per (query, key, head) computed.
- Decode attention: one query per row against the KV cache (full layers: `context` slots; sliding layers: the
  ring of `sliding_window` slots). K/V and their int32 positions are read once; the naive path adds the scores
  round trip. `attention_xla` never repeats K/V over the GQA group; a Hugging Face style `repeat_kv` would add a
  written and a read copy G times the K/V (reported apart).
- Whole model: per layer attention + mlp1 + mlp2 + the rest (dense bf16 projections, router, MoE dispatch and
  combine, KV-cache writes; the same on both paths), plus embedding and the unembedding (vocab x hidden bf16)
  for the last position of each row. Times add up op by op (each op bounded on its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from gptoss_jax.config import MXFP4_BLOCK, ModelConfig

BF16, F32, I32 = 2, 4, 4  # bytes
MXFP4 = (4 + 8 / MXFP4_BLOCK) / 8  # bytes a weight: a 4-bit code plus an 8-bit scale shared by 32
# Naive softmax traffic per score: f32 written, read for max, sum and normalise; bf16 P written, read by PV.
SCORE_BYTES = F32 + 3 * F32 + BF16 + BF16
BACKENDS = ("gpu", "tpu")

# Kernel defaults (kernels/moe_pallas.py `_TILES`, `_row_tile`; kernels/attention_pallas.py).
MOE_TILE_M = {"gpu": 64, "tpu": 128}
FLASH_BLOCK = {"gpu": 64, "tpu": 128}
DECODE_GPU_BLOCK_K, DECODE_GPU_SPLITS, DECODE_GPU_MIN_ROWS = 64, 4, 16
DECODE_TPU_BLOCK_K, DECODE_TPU_ROW_ALIGN = 512, 8


def measured_note() -> str:
    """What the measured column says: this script only predicts, and here there is nothing to measure on."""
    import jax  # already loaded by gptoss_jax

    if jax.default_backend() == "cpu":
        return "not available here (no accelerator in this environment)"
    return f"not measured (analytic script; a {jax.default_backend()} is present: time the kernels separately)"



@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    backend: str  # which kernel flavour runs there
    hbm_bytes_per_s: float
    flops_per_s: float  # dense bf16
    hbm_bytes: float


DEVICES = (Device("H100", "gpu", 3.35e12, 989e12, 80e9), Device("TPU v5e", "tpu", 819e9, 197e12, 16e9))


@dataclasses.dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.flops + other.flops)

    def time(self, dev: Device) -> tuple[float, str]:
        mem, comp = self.bytes / dev.hbm_bytes_per_s, self.flops / dev.flops_per_s
        return (mem, "mem") if mem >= comp else (comp, "flop")


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel call: what the Pallas kernel moves and issues per backend, and the naive XLA path's cost."""
    kernel: dict[str, Cost]
    naive: Cost
    useful_flops: float


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    new_tokens: int  # per row: the prompt (prefill) or 1 (decode)
    context: int  # decode: KV-cache slots of a full layer (the new token included); 0 for a prefill

    @property
    def decode(self) -> bool:
        return self.context > 0

    @property
    def tokens(self) -> int:
        return self.batch * self.new_tokens


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


# ---- MoE grouped matmul --------------------------------------------------------------------------------------


def expected_experts(cfg: ModelConfig, tokens: int) -> float:
    """Distinct experts among `tokens` x top-k uniform draws (k distinct per token)."""
    E, k = cfg.num_experts, cfg.experts_per_token
    return E * (1 - (1 - k / E) ** tokens)


def moe_issued_rows(rows: int, experts: float, num_experts: int, backend: str) -> float:
    """Rows the kernel multiplies: whole tm-row tiles, one per (row tile, expert) work item, at most
    tiles + experts - 1 of them (an expert's rows straddle a tile boundary). tm is the mean rows per expert, at
    most the default tile (`_row_tile`)."""
    want = min(MOE_TILE_M[backend], -(-rows // num_experts), rows)
    tm = max(16, _next_pow2(want)) if backend == "gpu" else _round_up(want, 8)
    return (-(-rows // tm) + max(experts, 1.0) - 1) * tm


def moe_ops(cfg: ModelConfig, tokens: int) -> list[tuple[str, Op, dict]]:
    d, inter = cfg.hidden_size, cfg.intermediate_size
    rows = tokens * cfg.experts_per_token
    experts = expected_experts(cfg, tokens)
    ops = []
    for name, n, k, fused in (("mlp1+swiglu", 2 * inter, d, True), ("mlp2", d, inter, False)):
        weights = experts * n * k
        bias = experts * n * BF16
        x = rows * k * BF16
        y = rows * (n // 2 if fused else n) * F32
        # Kernel: x is read, split into even/odd halves (written) and those are read; weights stay MXFP4.
        kernel_bytes = weights * MXFP4 + bias + 3 * x + y
        # Naive: dequantize (read MXFP4, write bf16), the matmul reads bf16; SwiGLU a separate pass over 2I.
        naive_bytes = weights * (MXFP4 + 2 * BF16) + bias + x + y + (2 * rows * n * F32 if fused else 0)
        useful = 2 * rows * n * k
        kernel = {b: Cost(kernel_bytes, 2 * moe_issued_rows(rows, experts, cfg.num_experts, b) * n * k)
                  for b in BACKENDS}
        ops.append((name, Op(kernel, Cost(naive_bytes, useful), useful),
                    {"rows": rows, "N": n, "K": k, "experts_read": experts}))
    return ops


# ---- attention -----------------------------------------------------------------------------------------------


def visited_block_pairs(T: int, window: int, block: int) -> int:
    """(query block, key block) pairs the flash kernel computes: `_key_blocks` of attention_pallas.py."""
    pairs = 0
    for i in range(-(-T // block)):
        q0 = i * block
        hi = (q0 + block - 1) // block + 1
        lo = max(q0 - window + 1, 0) // block if window else 0
        pairs += hi - lo
    return pairs


def band_scores(T: int, window: int) -> int:
    """(query, key) pairs inside the causal band: what attention actually needs."""
    if not window:
        return T * (T + 1) // 2
    return sum(min(i + 1, window) for i in range(T))


def prefill_attention_op(cfg: ModelConfig, T: int, window: int) -> tuple[Op, dict]:
    Hq, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = T * Hq * hd * BF16  # also the size of o
    kv = 2 * T * Hkv * hd * BF16
    per_score = 4 * hd * Hq  # QK^T and PV, 2 flops each per head dim, over all query heads
    kernel, computed = {}, {}
    for b in BACKENDS:
        blk = FLASH_BLOCK[b]
        computed[b] = visited_block_pairs(T, window, blk) * blk * blk
        io = 2 * q + kv
        # GPU also writes the log-sum-exp; TPU (splash) wraps q (scaled), k, v and o in transposes.
        io += T * Hq * F32 if b == "gpu" else 2 * (2 * q + kv)
        kernel[b] = Cost(io, computed[b] * per_score)
    naive_scores = T * T * Hq
    # o: the PV product writes f32 [B, K, G, T, H]; the transpose back reads it and writes bf16.
    naive_bytes = q + kv + naive_scores * SCORE_BYTES + T * Hq * hd * (2 * F32 + BF16)
    useful = band_scores(T, window) * per_score
    extra = {"T": T, "window": window, "scores_band": band_scores(T, window) * Hq,
             "scores_kernel": {b: computed[b] * Hq for b in BACKENDS}, "scores_naive": naive_scores,
             "flash_block": dict(FLASH_BLOCK), "naive_scores_buffer_bytes": naive_scores * (F32 + BF16)}
    return Op(kernel, Cost(naive_bytes, T * T * per_score), useful), extra


def decode_attention_op(cfg: ModelConfig, batch: int, slots: int) -> tuple[Op, dict]:
    Hq, Hkv, hd, G = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.q_per_kv
    per_slot = Hkv * hd * BF16 * 2 + I32  # K and V of every kv head, and the slot's position
    cache = batch * slots * per_slot
    q = batch * Hq * hd * BF16
    kernel = {}
    # GPU: rows of a kv head padded to >= 16; slots cut into at most 4 splits, no more than whole 64-slot blocks,
    # and padded to whole blocks (a copy when padded).
    rows = max(DECODE_GPU_MIN_ROWS, _next_pow2(G))
    splits = max(1, min(DECODE_GPU_SPLITS, slots // DECODE_GPU_BLOCK_K))
    padded = splits * _round_up(-(-slots // splits), DECODE_GPU_BLOCK_K)
    pad_copy = cache + batch * padded * per_slot if padded != slots else 0
    partials = batch * Hkv * splits * rows * (hd + 1) * F32  # o and lse per split, merged in XLA
    kernel["gpu"] = Cost(pad_copy + batch * padded * per_slot + q + 2 * partials + q,
                         4 * batch * padded * hd * rows * Hkv)
    # TPU: all kv heads in one block-diagonal product [Hkv*rows, Hkv*hd]: Hkv times the useful FLOPs.
    rows = _round_up(G, DECODE_TPU_ROW_ALIGN)
    block = slots if slots <= DECODE_TPU_BLOCK_K else DECODE_TPU_BLOCK_K
    padded = _round_up(slots, block)
    pad_copy = cache + batch * padded * per_slot if padded != slots else 0
    wide = batch * (Hkv * rows) * (Hkv * hd)  # block-diagonal query in, f32 output out
    kernel["tpu"] = Cost(pad_copy + batch * padded * per_slot + wide * (BF16 + 2 * F32) + q,
                         4 * batch * padded * (Hkv * rows) * (Hkv * hd))
    scores = batch * Hq * slots
    useful = 4 * batch * slots * hd * Hq
    naive = Cost(q + cache + scores * SCORE_BYTES + batch * Hq * hd * (2 * F32 + BF16), useful)
    kv = batch * slots * Hkv * hd * BF16 * 2
    extra = {"batch": batch, "slots": slots, "kv_bytes": kv,
             "naive_repeat_kv_bytes": naive.bytes + 2 * G * kv}  # a G-fold copy written, then read instead
    return Op(kernel, naive, useful), extra


# ---- the rest of the model (the same on both paths) ----------------------------------------------------------


def dense_layer_cost(cfg: ModelConfig, tokens: int) -> Cost:
    """A layer's non-kernel work: qkv / out projections, router, sinks, norms (bf16 weights read once), their
    activations, the MoE dispatch (gather rows, cast mlp1's f32 output, combine) and the KV-cache write."""
    d, qkv, E = cfg.hidden_size, cfg.qkv_size, cfg.num_experts
    attn = cfg.num_attention_heads * cfg.head_dim
    rows = tokens * cfg.experts_per_token
    matrices = qkv * d + d * attn + E * d
    params = matrices + qkv + d + E + cfg.num_attention_heads + 2 * d
    acts = tokens * ((d + qkv + attn + d + d) * BF16 + E * F32)
    dispatch = tokens * d * BF16 + rows * d * BF16 + rows * cfg.intermediate_size * (F32 + BF16) \
        + rows * d * F32 + tokens * d * BF16
    kv_write = tokens * 2 * cfg.num_key_value_heads * cfg.head_dim * BF16
    return Cost(params * BF16 + acts + dispatch + kv_write, 2 * tokens * matrices)


def embed_unembed_cost(cfg: ModelConfig, tokens: int, logits_rows: int) -> Cost:
    V, d = cfg.vocab_size, cfg.hidden_size
    return Cost(2 * tokens * d * BF16 + V * d * BF16 + logits_rows * (d * BF16 + V * F32), 2 * logits_rows * V * d)


def weight_bytes(cfg: ModelConfig) -> float:
    """Checkpoint bytes: MXFP4 experts, everything else bf16 (matches docs/spec.md's checkpoint sizes)."""
    d, inter, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    experts = E * (2 * inter * d + d * inter) * MXFP4 + E * (2 * inter + d) * BF16
    per_layer = experts + dense_layer_cost(cfg, 0).bytes
    return cfg.num_hidden_layers * per_layer + 2 * cfg.vocab_size * d * BF16 + d * BF16


def kv_cache_bytes(cfg: ModelConfig, batch: int, length: int) -> float:
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * BF16
    return sum(batch * per_token * (min(length, cfg.layer_window(i)) or length)
               for i in range(cfg.num_hidden_layers))


# ---- assembling rows -----------------------------------------------------------------------------------------


def predictions(op: Op) -> dict:
    out = {}
    for dev in DEVICES:
        (tk, bk), (tn, bn) = op.kernel[dev.backend].time(dev), op.naive.time(dev)
        out[dev.name] = {"kernel_s": tk, "kernel_bound": bk, "naive_s": tn, "naive_bound": bn}
    return out


def op_row(model: str, case: Case, name: str, op: Op, extra: dict) -> dict:
    return {"model": model, "case": case.name, "op": name, **extra,
            "kernel": {b: dataclasses.asdict(c) for b, c in op.kernel.items()},
            "naive": dataclasses.asdict(op.naive), "useful_flops": op.useful_flops,
            "predicted": predictions(op), "measured": None}


def case_ops(cfg: ModelConfig, case: Case) -> tuple[list[tuple[int, str, Op, dict]], Cost]:
    """(layer count, name, op, extra) for every kernel call of a forward step, and the non-kernel cost."""
    ops = []
    windows = [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)]
    for window in sorted(set(windows), reverse=True):
        count = windows.count(window)
        label = f"sliding {window}" if window else "full"
        if case.decode:
            slots = min(case.context, window) if window else case.context
            op, extra = decode_attention_op(cfg, case.batch, slots)
        else:
            op, extra = prefill_attention_op(cfg, case.new_tokens, window)
        ops.append((count, label, op, extra))
    for name, op, extra in moe_ops(cfg, case.tokens):
        ops.append((cfg.num_hidden_layers, name, op, extra))
    rest = Cost(0, 0)
    for window in windows:
        rest = rest + dense_layer_cost(cfg, case.tokens)
        if case.decode and window:  # kvcache._write rebuilds the whole ring (a select): read and write K and V
            rest = rest + Cost(2 * decode_attention_op(cfg, case.batch, window)[1]["kv_bytes"], 0)
    return ops, rest + embed_unembed_cost(cfg, case.tokens, case.batch)


def whole_model_row(model: str, cfg: ModelConfig, case: Case) -> dict:
    ops, rest = case_ops(cfg, case)
    kernel_bytes = {b: rest.bytes + sum(n * op.kernel[b].bytes for n, _, op, _ in ops) for b in BACKENDS}
    naive_bytes = rest.bytes + sum(n * op.naive.bytes for n, _, op, _ in ops)
    useful = rest.flops + sum(n * op.useful_flops for n, _, op, _ in ops)
    weights = weight_bytes(cfg)
    cache = kv_cache_bytes(cfg, case.batch, case.context or case.new_tokens)
    # Naive transients: one layer's dequantized bf16 experts, and the largest score buffer (scores + P).
    experts = expected_experts(cfg, case.tokens)
    naive_transient = experts * 3 * cfg.hidden_size * cfg.intermediate_size * BF16 + max(
        (extra.get("naive_scores_buffer_bytes", 0) for _, _, _, extra in ops), default=0)
    pred = {}
    for dev in DEVICES:
        tk = rest.time(dev)[0] + sum(n * op.kernel[dev.backend].time(dev)[0] for n, _, op, _ in ops)
        tn = rest.time(dev)[0] + sum(n * op.naive.time(dev)[0] for n, _, op, _ in ops)
        done = case.batch if case.decode else case.tokens  # tokens produced (decode) or consumed (prefill)
        pred[dev.name] = {"kernel_s": tk, "naive_s": tn, "kernel_tokens_per_s": done / tk,
                          "naive_tokens_per_s": done / tn, "fits_kernel": weights + cache <= dev.hbm_bytes,
                          "fits_naive": weights + cache + naive_transient <= dev.hbm_bytes}
    return {"model": model, "case": case.name, "kernel_bytes": kernel_bytes, "naive_bytes": naive_bytes,
            "useful_flops": useful, "non_kernel": dataclasses.asdict(rest), "weight_bytes": weights,
            "kv_cache_bytes": cache, "naive_transient_bytes": naive_transient, "predicted": pred,
            "measured": None}


def build(args) -> dict:
    cases = [Case(f"prefill_{t // 1024}k" if t % 1024 == 0 else f"prefill_{t}", 1, t, 0) for t in args.prefill] \
        + [Case(f"decode_b{b}", b, 1, args.context) for b in args.decode_batches]
    models = {"gpt-oss-20b": ModelConfig.gpt_oss_20b(), "gpt-oss-120b": ModelConfig.gpt_oss_120b()}
    out = {"moe": [], "attention_prefill": [], "attention_decode": [], "whole_model": []}
    for model, cfg in models.items():
        for case in cases:
            ops, _ = case_ops(cfg, case)
            for count, name, op, extra in ops:
                table = "moe" if name.startswith("mlp") else \
                    "attention_decode" if case.decode else "attention_prefill"
                out[table].append(op_row(model, case, name, op, {"layers": count, **extra}))
            out["whole_model"].append(whole_model_row(model, cfg, case))
    out["meta"] = {
        "devices": [dataclasses.asdict(d) for d in DEVICES], "decode_context": args.context,
        "cases": [dataclasses.asdict(c) for c in cases], "mxfp4_bytes_per_weight": MXFP4,
        "naive_score_bytes": SCORE_BYTES, "moe_tile_m": MOE_TILE_M, "flash_block": FLASH_BLOCK,
        "models": {m: {"layers": c.num_hidden_layers, "experts": c.num_experts, "weight_bytes": weight_bytes(c)}
                   for m, c in models.items()},
        "measured": measured_note(), "doc": __doc__}
    return out


# ---- Markdown ------------------------------------------------------------------------------------------------


def _t(seconds: float, bound: str | None = None) -> str:
    text = f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms" if seconds < 1 \
        else f"{seconds:.2f} s"
    return f"{text} ({bound})" if bound else text


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def _pair(values: dict, fmt) -> str:
    a, b = (fmt(values[k]) for k in BACKENDS)
    return a if a == b else f"{a} / {b}"


def _times(row: dict) -> list[str]:
    cells = []
    for dev in DEVICES:
        p = row["predicted"][dev.name]
        cells += [_t(p["kernel_s"], p["kernel_bound"]), _t(p["naive_s"], p["naive_bound"])]
    return cells


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _merge_models(cells: list[list[str]]) -> list[list[str]]:
    """Rows equal but for the model (attention: both models have the same heads) become one row."""
    merged: dict[tuple, list[str]] = {}
    for row in cells:
        key = tuple(row[1:])
        if key in merged:
            merged[key][0] += ", " + row[0].removeprefix("gpt-oss-")
        else:
            merged[key] = [row[0].removeprefix("gpt-oss-")] + row[1:]
    return list(merged.values())


def _time_headers() -> list[str]:
    return [f"{d.name} {path}" for d in DEVICES for path in ("kernel", "naive")]


def markdown(res: dict) -> str:
    meta = res["meta"]
    dev_text = "; ".join(f"{d['name']}: {d['hbm_bytes_per_s'] / 1e12:.3g} TB/s HBM, "
                         f"{d['flops_per_s'] / 1e12:.0f} TFLOP/s dense bf16, {d['hbm_bytes'] / 1e9:.0f} GB"
                         for d in meta["devices"])
    sizes = ", ".join(f"{m}: {v['layers']} layers, {v['experts']} experts, weights {v['weight_bytes'] / 1e9:.2f} GB"
                      for m, v in meta["models"].items())
    note = meta["measured"]
    prompts = " and ".join(f"{c['new_tokens']:,}" for c in meta["cases"] if not c["context"])
    out = ["# Kernel roofline: Pallas kernels against the naive XLA paths", "",
           "Analytic (`experiments/bench_kernels.py`; the model is in its docstring). Predicted time = "
           "max(bytes / bandwidth, FLOPs / peak), marked (mem) or (flop) by the bound that sets it. "
           "H100 runs the Triton kernels, TPU v5e the Mosaic ones; where they differ a cell reads GPU / TPU.", "",
           f"- Devices: {dev_text}.", f"- Models: {sizes}.",
           f"- Cases: prefill batch 1 of {prompts} tokens; "
           f"decode one token per row at batch {', '.join(str(c['batch']) for c in meta['cases'] if c['context'])}"
           f" with {meta['decode_context']} tokens of context in the cache.",
           f"- Measured: {meta['measured']}. No number below was measured.", "",
           "## 1. MoE grouped matmul, one layer", "",
           f"- Weights: MXFP4, {meta['mxfp4_bytes_per_weight'] * 8:.2f} bits a weight, read once per routed "
           "expert by the kernel. Naive: the routed experts dequantized to bf16 in HBM (read 4.25 bits, write 16) "
           "and read again by a dense grouped matmul (16): 36.25 bits a weight.",
           "- Experts read: E (1 - (1 - 4/E)^tokens) (uniform routing); a prefill reads them all.",
           "- Activations: x bf16 (the kernel path reads it, writes its even/odd halves, reads those: 3 passes); "
           "outputs float32 as both paths write them. The naive mlp1 writes the [rows, 5760] pre-activation and "
           "reads it back for the SwiGLU; the kernel fuses it.",
           f"- FLOPs: useful 2 x rows x N x K. Issued: the kernel multiplies whole row tiles (GPU {MOE_TILE_M['gpu']},"
           f" TPU {MOE_TILE_M['tpu']} rows at most; the mean rows per expert below that) per (row tile, expert)"
           " item, at most "
           "tiles + experts - 1 items; the kernel's time uses these. The naive path is an ideal ragged matmul at "
           "the useful FLOPs (this favours it where both are compute-bound).",
           "- Not counted: x re-read once per N tile (served by L2 / the pipeline), dispatch and combine "
           "(whole-model line), the dequantize arithmetic.", ""]
    cells = []
    for r in res["moe"]:
        k, n = r["kernel"]["gpu"]["bytes"], r["naive"]["bytes"]
        cells.append([r["model"].removeprefix("gpt-oss-"), r["case"], r["op"], f"{r['rows']:,}",
                      f"{r['experts_read']:.1f}", _mb(k), _mb(n), f"{n / k:.2f}x", f"{r['useful_flops'] / 1e9:,.1f}",
                      _pair({b: r["kernel"][b]["flops"] for b in BACKENDS}, lambda x: f"{x / 1e9:,.1f}"),
                      *_times(r), note])
    out += _table(["model", "case", "matmul", "rows", "experts read", "kernel MB", "naive MB", "naive/kernel",
                   "GFLOP useful", "GFLOP issued GPU / TPU", *_time_headers(), "measured"], cells)

    out += ["", "## 2. Attention prefill, one layer (batch 1)", "",
            f"- Kernel: flash attention over key blocks that meet the causal band; blocks of {FLASH_BLOCK['gpu']} "
            f"(GPU) and {FLASH_BLOCK['tpu']} (TPU, splash) queries x keys, the kernels' defaults. A sliding layer "
            "(window 128) visits 3 (GPU) / 2 (TPU) key blocks per query block, a full layer the lower triangle.",
            "- Kernel bytes: q, k, v read and o written once, bf16 (+ GPU log-sum-exp f32; + TPU transposes of q, "
            "k, v, o around splash). K/V blocks re-fetched per query block come from L2 / VMEM and are not counted.",
            f"- Naive (`attention_xla`): float32 scores for all T x T pairs of every head: written, read for max, "
            f"sum and normalise, bf16 P written and read by PV: {SCORE_BYTES} bytes a score. Masked pairs are "
            "computed too. The score buffer (scores f32 + P bf16) must fit in HBM.",
            "- FLOPs: 4 x head_dim per (query, key, head) computed: the band (block granularity) for the kernel, "
            "T x T for the naive path. Softmax exponentials not counted.", ""]
    cells = []
    for r in res["attention_prefill"]:
        cells.append([r["model"], f"{r['T']:,}", r["op"], f"{r['scores_band'] / 1e6:,.1f}",
                      _pair(r["scores_kernel"], lambda x: f"{x / 1e6:,.1f}"), f"{r['scores_naive'] / 1e6:,.1f}",
                      _pair({b: r["kernel"][b]["bytes"] for b in BACKENDS}, _mb), _mb(r["naive"]["bytes"]),
                      f"{r['naive_scores_buffer_bytes'] / 1e9:,.1f}",
                      _pair({b: r["kernel"][b]["flops"] for b in BACKENDS}, lambda x: f"{x / 1e9:,.1f}"),
                      f"{r['naive']['flops'] / 1e9:,.1f}", *_times(r), note])
    out += _table(["model", "T", "layer", "M scores in band", "M scores kernel GPU / TPU", "M scores naive",
                   "kernel MB GPU / TPU", "naive MB", "naive score buffer GB", "GFLOP kernel GPU / TPU",
                   "GFLOP naive", *_time_headers(), "measured"], _merge_models(cells))

    out += ["", f"## 3. Decode attention, one layer (one query per row, {meta['decode_context']} tokens of context)",
            "",
            f"- Slots: full layers read the whole cache ({meta['decode_context']} slots), sliding layers the ring "
            "of 128. The cache holds exactly `context` slots (max_len = context, the new token included). K/V bf16 "
            "and an int32 position per slot, read once.",
            f"- GPU kernel: query rows of a kv head padded to {DECODE_GPU_MIN_ROWS} (2x the FLOPs of 8 heads); "
            f"slots cut into up to {DECODE_GPU_SPLITS} splits of whole {DECODE_GPU_BLOCK_K}-slot blocks, padded by "
            "a copy when they do not fill them (the 128-slot ring takes 2 splits, unpadded). TPU kernel: all 8 kv heads in one "
            f"block-diagonal product (8x the useful FLOPs), slot blocks of {DECODE_TPU_BLOCK_K}.",
            f"- Naive (`attention_xla`): the same K/V read once (it groups query heads, never repeats K/V) plus "
            f"the scores round trip ({SCORE_BYTES} bytes a score). The column \"naive + repeat_kv\" models a "
            "Hugging Face style path that materializes K/V repeated over the GQA group of 8 (a copy written and "
            "read: + 16x the K/V bytes).", ""]
    cells = []
    for r in res["attention_decode"]:
        cells.append([r["model"], str(r["batch"]), r["op"], f"{r['slots']:,}", _mb(r["kv_bytes"]),
                      _pair({b: r["kernel"][b]["bytes"] for b in BACKENDS}, _mb), _mb(r["naive"]["bytes"]),
                      _mb(r["naive_repeat_kv_bytes"]), f"{r['useful_flops'] / 1e9:,.2f}",
                      _pair({b: r["kernel"][b]["flops"] for b in BACKENDS}, lambda x: f"{x / 1e9:,.2f}"),
                      *_times(r), note])
    out += _table(["model", "batch", "layer", "slots", "K/V MB", "kernel MB GPU / TPU", "naive MB",
                   "naive + repeat_kv MB", "GFLOP useful", "GFLOP issued GPU / TPU", *_time_headers(),
                   "measured"], _merge_models(cells))

    out += ["", "## 4. Whole model, one forward step", "",
            "- Sum over layers of attention (sliding on even layers, full on odd) + mlp1 + mlp2 from the tables "
            "above, plus the non-kernel work shared by both paths: qkv / out projections, router, sinks and norms "
            "(bf16 weights read once), their activations, MoE dispatch and combine, KV-cache writes (decode: "
            "the ring's select rewrites all 128 slots), the "
            "embedding gather and the unembedding (vocab x hidden bf16 read once; logits of the last position of "
            "each row). Times add op by op.",
            "- tokens/s: prompt tokens / prefill time; batch / step time for decode.",
            "- Fits: weights + KV cache on one device (kernel); plus one layer's dequantized bf16 experts and the "
            "largest score buffer (naive). A model that does not fit one device needs several: the times are "
            "then per device-equivalent of bandwidth.", ""]
    cells = []
    for r in res["whole_model"]:
        fits = []
        for dev in DEVICES:
            p = r["predicted"][dev.name]
            fits.append(f"{dev.name} {'yes' if p['fits_kernel'] else 'no'} / {'yes' if p['fits_naive'] else 'no'}")
        times = [_t(r["predicted"][d.name][k]) for d in DEVICES for k in ("kernel_s", "naive_s")]
        rates = [f"{r['predicted'][d.name]['kernel_tokens_per_s']:,.0f} / "
                 f"{r['predicted'][d.name]['naive_tokens_per_s']:,.0f}" for d in DEVICES]
        cells.append([r["model"].removeprefix("gpt-oss-"), r["case"],
                       _pair(r["kernel_bytes"], lambda x: f"{x / 1e9:,.2f}"), f"{r['naive_bytes'] / 1e9:,.2f}",
                       f"{r['useful_flops'] / 1e12:,.2f}", *times, *rates, "; ".join(fits), note])
    out += _table(["model", "case", "kernel GB GPU / TPU", "naive GB", "TFLOP useful", *_time_headers(),
                   *[f"{d.name} tok/s kernel / naive" for d in DEVICES], "fits kernel / naive", "measured"], cells)
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 32768],
                        help="prompt lengths for the batch-1 prefill cases (default 4096,32768)")
    parser.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64],
                        help="batch sizes for the decode cases (default 1,64)")
    parser.add_argument("--context", type=int, default=4096,
                        help="tokens already in the KV cache for the decode cases (default 4096)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results",
                        help="folder for bench_kernels.json and bench_kernels.md (default experiments/results)")
    args = parser.parse_args(argv)
    if args.context < 1:
        parser.error("--context must be >= 1")
    res = build(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_kernels.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "bench_kernels.md").write_text(markdown(res))
    print(f"wrote {args.out / 'bench_kernels.json'} and {args.out / 'bench_kernels.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
