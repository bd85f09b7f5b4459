"""KVTuner calibration: search per-layer K/V bit widths under an average-bits budget.

    python -m kvtuner.calibrate --model PATH --budget 4.0 --out preset.yaml

Layers differ in how much key and value precision they need.  This module measures it
and writes a preset the server loads with ``--kvtuner-config`` (KVTuner's format plus a
``_meta`` header):

1. **Reference.**  The model (transformers; GPU when present, else CPU) runs the
   calibration tokens unquantized; its next-token log-probabilities are the reference.
2. **Sensitivity.**  For each layer ``l`` and each candidate ``(kbits, vbits)`` in
   ``{8,4,2} x {8,4,2}``, only layer ``l``'s K and V are quantized and dequantized with
   :mod:`kvtuner.reference` (the oracle of the server's kernels: same groups, rounding and
   float16 scales), and the loss against the reference is measured: the mean KL
   divergence ``KL(ref || quantized)`` of the next-token distributions (``--metric kl``,
   default) or the increase of the mean next-token NLL, i.e. log perplexity ratio
   (``--metric nll``).  Keys are quantized after the rotary embedding, inside the cache
   update, and every token (the new ones too) reads the quantized K/V: the server stores
   every token quantized before attention reads it.
3. **Pruning.**  Per layer, a candidate is dropped when another one has no more bits and
   no more loss (ties: the first in (bits, loss, key bits desc) order is kept).  What is
   left is a strictly decreasing staircase of loss against bits.
4. **Search.**  With the additive model ``loss(assignment) = sum_l loss_l(c_l)``, an exact
   dynamic programme over layers and integer bit totals finds the assignment of least
   predicted loss with ``mean_l (kbits_l + vbits_l) / 2 <= budget``; among equal losses it
   takes the fewest bits, so the result is never dominated under the model.
5. **Check.**  The ``--verify`` (default 8) best assignments of the additive model (an exact
   k-best version of the same programme) are evaluated jointly (all layers quantized at
   once) on the calibration tokens and the one of least measured loss is kept: layers
   interact, which the additive model does not see.  The header records the measured loss
   next to the predicted one.  With ``compare_uniform`` (the CLI always) the uniform
   configurations of the same average width (``K4V2`` and ``K2V4`` at a 3.0 budget) join
   that pool as ``uniform K4V2`` ...: the written preset is never worse on the calibration
   tokens than a same-average uniform one; when a uniform one wins it is what is written, and
   the header (``_meta.search.result``) and the final printed line say so.
6. **Operating point** (``--around NAME``, e.g. ``--around K4V2``).  Step 2 measures each
   layer alone around the unquantized model, which misses how layers interact at low bits.
   With ``--around`` the sensitivity of layer ``l`` for candidate ``c`` is instead the joint
   loss of every layer at the uniform ``NAME`` except layer ``l`` at ``c`` (leave one out
   around the operating point; the entry of ``NAME`` itself is the loss of uniform ``NAME``
   in every layer).  Steps 3-5 run unchanged on that table; the predicted loss of an
   assignment is ``loss(NAME) + sum_l (table[l][c_l] - loss(NAME))``.  The table cache
   records ``around`` and is not reused across settings; the header records it in
   ``_meta.search.around``.

The sensitivity table (the expensive part: ``layers x 9`` forward passes) can be cached
with ``--table PATH`` (it keeps every metric of every run) and reused for other budgets and
for the other metric.  Layers before the first quantized one are replayed from the
reference run, not recomputed.  Per-channel keys (``--axis-key 1``, KIVI; the server's
``--kvtuner-axis-key 1``): each window's keys are quantized per channel over pages of
``--group-size`` tokens, except the newest ``--residual-length`` window (as the server reads a
request of that length, :func:`kvtuner.format.kivi_quantized_len`); values per token.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from kvtuner import reference as ref
from kvtuner.config import KVQuantConfig, KVTunerConfigError, LayerBits, load_preset, write_preset
from kvtuner.format import QUANT_BITS, TensorFormat, kivi_quantized_len

__all__ = [
    "CANDIDATES",
    "QuantMode",
    "Evaluator",
    "CalibResult",
    "fake_quant",
    "bits_of",
    "prune",
    "dominated",
    "search",
    "pareto_front",
    "measure_sensitivity",
    "calibrate",
    "calibration_windows",
    "bundled_text",
    "main",
]

Candidate = tuple[int, int]  # (key bits, value bits)
CANDIDATES: tuple[Candidate, ...] = tuple((k, v) for k in QUANT_BITS for v in QUANT_BITS)
METRICS = ("kl", "nll")
DEFAULT_CALIB = "calib_en.txt"
TABLE_VERSION = 1


class CalibrationError(ValueError):
    """A bad calibration setting; the message is one line."""


# ------------------------------------------------------------------------------ quantizer


@dataclass(frozen=True)
class QuantMode:
    """How K and V are quantized (the server's ``--kvtuner-q-group-size/-asym/-axis-key``)."""

    group_size: int = 64  # -1: the whole head
    asym: bool = False
    axis_key: int = 0  # 0: per-token groups along head_dim; 1: per-channel keys over pages of group_size tokens
    residual_length: int = 0  # per-channel keys: full-precision window (0: one group)
    # 0: every query reads quantized K/V (the strict regime).  N > 0: the server's regime under
    # --chunked-prefill-size N: queries read their own chunk of N tokens in full precision (the
    # new tokens of an extend) and earlier chunks as the pool holds them
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.chunk < 0:
            raise CalibrationError(f"--chunk must be >= 0 tokens, got {self.chunk}")
        if self.axis_key not in (0, 1):
            raise CalibrationError(f"--axis-key must be 0 (per-token) or 1 (per-channel), got {self.axis_key!r}")
        if self.group_size <= 0 and self.group_size != -1:
            raise CalibrationError(f"--group-size must be positive or -1 (whole head), got {self.group_size}")
        if self.axis_key == 1:
            if self.group_size == -1:
                raise CalibrationError("--axis-key 1 groups keys over tokens: give --group-size N (the page size)")
            r = self.residual_length or self.group_size
            if r < self.group_size or r % self.group_size:
                raise CalibrationError(
                    f"--residual-length {r} must be a multiple of --group-size {self.group_size} (at least one group)")
            object.__setattr__(self, "residual_length", r)
            if self.chunk and self.chunk % self.group_size:
                raise CalibrationError(f"--chunk {self.chunk} must be a multiple of --group-size {self.group_size} "
                                       "with --axis-key 1 (chunks end on page boundaries, as in the server)")
        elif self.residual_length:
            raise CalibrationError("--residual-length applies to --axis-key 1 only")

    @property
    def name(self) -> str:
        return "pertoken" if self.axis_key == 0 else "kivi"

    def fmt(self, bits: int, head_dim: int, key: bool = False) -> TensorFormat:
        if key and self.axis_key == 1:
            return TensorFormat(bits, head_dim, self.group_size, self.asym, 1)
        g = head_dim if self.group_size == -1 else self.group_size
        return TensorFormat(bits, head_dim, g, self.asym, 0)

    def as_meta(self) -> dict:
        m = {"name": self.name, "axis_key": self.axis_key, "axis_value": 0,
             "group_size": self.group_size, "asym": self.asym}
        if self.axis_key == 1:
            m["residual_length"] = self.residual_length
        if self.chunk:
            m["chunk"] = self.chunk
        return m


def fake_quant(x: torch.Tensor, bits: int, mode: QuantMode, key: bool = False) -> torch.Tensor:
    """``x [..., D]`` stored and read back through :mod:`kvtuner.reference` (same dtype).

    Per-channel keys (``key`` and ``mode.axis_key == 1``): ``x [..., T, D]`` is one sequence
    per leading index; its first ``kivi_quantized_len(T)`` tokens go through
    :func:`kvtuner.reference.quantize_page` page by page, the newest stay as they are.
    """
    if bits == 16:
        return x
    fmt = mode.fmt(bits, x.shape[-1], key)
    if fmt.per_channel:
        t, d, g = x.shape[-2], x.shape[-1], fmt.group
        nq = kivi_quantized_len(t, g, mode.residual_length)
        if nq == 0:
            return x
        pages = x[..., :nq, :].reshape(-1, nq // g, g, d).reshape(-1, g, d).transpose(0, 1)  # [G, pages, D]
        data, meta = ref.quantize_page(pages, fmt)
        deq = ref.dequantize_page(data, meta, fmt).to(x.dtype).transpose(0, 1)  # [pages, G, D]
        out = x.clone()
        out[..., :nq, :] = deq.reshape(*x.shape[:-2], nq, d)
        return out
    data, meta = ref.quantize(x, fmt)
    return ref.dequantize(data, meta, fmt, torch.float32).to(x.dtype)


def bits_of(c: Candidate) -> int:
    """Bits per K+V element pair of a candidate (twice its average width)."""
    return int(c[0]) + int(c[1])


def cand_name(c: Candidate) -> str:
    return f"K{c[0]}V{c[1]}"


def parse_cand(name: str) -> Candidate:
    k, v = name[1:].split("V")
    return int(k), int(v)


# ------------------------------------------------------------------------- model plumbing


def _model_shape(model) -> tuple[int, int, int]:
    """(num_layers, head_dim, num_kv_heads) of a transformers causal LM."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    n_layers = int(cfg.num_hidden_layers)
    n_heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or n_heads
    return n_layers, int(head_dim), int(kv_heads)


def _quant_cache(model, assignment: Mapping[int, Candidate], mode: QuantMode):
    """A transformers DynamicCache whose update quantizes K (after RoPE) and V of the layers
    in ``assignment`` before they are stored, so every query reads the quantized values; with
    ``mode.chunk`` (the model is then run chunk by chunk) each chunk reads its own K/V as
    computed and the earlier positions quantized."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers
        cache = DynamicCache()
    orig = cache.update

    def strict(key_states, value_states, layer_idx, *args, **kwargs):
        c = assignment.get(layer_idx)
        if c is not None:
            key_states = fake_quant(key_states, c[0], mode, key=True)  # [batch, heads, T, D]
            value_states = fake_quant(value_states, c[1], mode)
        return orig(key_states, value_states, layer_idx, *args, **kwargs)

    def chunked(key_states, value_states, layer_idx, *args, **kwargs):
        # the served regime: the cache keeps full-precision K/V; each chunk's queries read the
        # earlier positions as the pool holds them (fake_quant of the whole prefix, so per-channel
        # pages and the residual window follow the prefix length) and their own chunk as is
        k_all, v_all = orig(key_states, value_states, layer_idx, *args, **kwargs)
        c = assignment.get(layer_idx)
        n_past = k_all.shape[-2] - key_states.shape[-2]
        if c is None or n_past == 0:
            return k_all, v_all
        kp = fake_quant(k_all[..., :n_past, :], c[0], mode, key=True)
        vp = fake_quant(v_all[..., :n_past, :], c[1], mode)
        return torch.cat([kp, key_states], dim=-2), torch.cat([vp, value_states], dim=-2)

    cache.update = chunked if mode.chunk else strict
    return cache


def _decoder_layers(model):
    """The model's list of decoder layers (``model.model.layers`` in transformers), or None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == _model_shape(model)[0]:
        return layers
    return None


@dataclass
class Evaluator:
    """Loss of quantized-KV runs against the unquantized run on fixed token windows.

    Layers before the first quantized one compute exactly what they computed in the
    reference run, so (``reuse_prefix``) their output is replayed from the reference run
    instead of being recomputed: a single-layer sensitivity run costs the layers from that
    layer on.  The result is the same as the full run.
    """

    model: object
    windows: torch.Tensor  # [N, T] token ids
    mode: QuantMode
    batch_size: int = 4
    reuse_prefix: bool = True
    _ref: list = field(default_factory=list, repr=False)
    _hidden: list = field(default_factory=list, repr=False)  # per batch: {layer: output}
    reference_nll: float = float("nan")

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        self.windows = self.windows.to(self.device)
        # chunked runs cannot replay one whole-window layer output, so they run every layer
        self._layers = _decoder_layers(self.model) if self.reuse_prefix and not self.mode.chunk else None
        for ids in self._batches():
            outs: dict = {}
            handles = []
            if self._layers is not None:
                for i, layer in enumerate(self._layers):
                    handles.append(layer.register_forward_hook(
                        lambda mod, inp, out, i=i: outs.__setitem__(i, out)))
            try:
                self._ref.append(self._logprobs(ids, {}))
            finally:
                for h in handles:
                    h.remove()
            self._hidden.append(outs)
        self.reference_nll = self._nll_of(self._ref)

    @property
    def tokens(self) -> int:
        """Positions scored (each window's last token has no next token)."""
        n, t = self.windows.shape
        return n * (t - 1)

    def _batches(self):
        for i in range(0, self.windows.shape[0], self.batch_size):
            yield self.windows[i : i + self.batch_size]

    @torch.no_grad()
    def _logprobs(self, ids: torch.Tensor, assignment: Mapping[int, Candidate],
                  replay: Optional[dict] = None) -> torch.Tensor:
        cache = _quant_cache(self.model, assignment, self.mode)
        first = min(assignment) if assignment else 0
        stubbed = []
        if replay and first > 0 and self._layers is not None:
            # layers < first are not run: each hands on layer first-1's reference output
            # (only the last one's reaches layer `first`)
            out_prev = replay[first - 1]
            for layer in self._layers[:first]:
                layer.forward = lambda *a, _o=out_prev, **k: _o
                stubbed.append(layer)
        try:
            step = self.mode.chunk or ids.shape[1]
            logits = torch.cat([self.model(input_ids=ids[:, s : s + step], past_key_values=cache, use_cache=True).logits
                                for s in range(0, ids.shape[1], step)], dim=1)
        finally:
            for layer in stubbed:
                del layer.forward
        return torch.log_softmax(logits[:, :-1].float(), dim=-1)

    def _nll_of(self, logps: Sequence[torch.Tensor]) -> float:
        tot = 0.0
        for lp, ids in zip(logps, self._batches()):
            tgt = ids[:, 1:].unsqueeze(-1)
            tot += -lp.gather(-1, tgt).sum().item()
        return tot / self.tokens

    @torch.no_grad()
    def evaluate(self, assignment: Mapping[int, Candidate]) -> dict:
        """``{"kl", "nll", "dnll", "ppl", "top1"}``: mean KL(ref || quantized) per token (nats),
        mean NLL, its increase over the reference, perplexity and the fraction of positions
        whose argmax equals the reference's."""
        kl = nll = agree = 0.0
        for lp_ref, ids, hid in zip(self._ref, self._batches(), self._hidden):
            lp = self._logprobs(ids, assignment, hid)
            kl += (lp_ref.exp() * (lp_ref - lp)).sum().item()
            nll += -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum().item()
            agree += (lp.argmax(-1) == lp_ref.argmax(-1)).sum().item()
        n = self.tokens
        return {"kl": kl / n, "nll": nll / n, "dnll": nll / n - self.reference_nll,
                "ppl": math.exp(nll / n), "top1": agree / n}

    def loss(self, assignment: Mapping[int, Candidate], metric: str = "kl") -> float:
        return _loss(self.evaluate(assignment), metric)


# ---------------------------------------------------------------------------- the search


Table = dict  # {layer: {Candidate: loss}}


def measure_sensitivity(
    ev: Evaluator,
    num_layers: int,
    candidates: Sequence[Candidate] = CANDIDATES,
    metric: str = "kl",
    progress: bool = True,
    record: Optional[dict] = None,
    around: Optional[Candidate] = None,
) -> Table:
    """Loss of quantizing one layer at a time, for every layer and candidate.

    ``around``: the other layers are not unquantized but all at the uniform candidate
    ``around`` (leave one out around that operating point); the entry of ``around`` itself
    is the joint loss of uniform ``around`` (measured once).
    ``record``: if given, ``record[layer][candidate]`` gets every metric of that run
    (:meth:`Evaluator.evaluate`), so the table can be reused for another metric.
    """
    from tqdm.auto import tqdm

    table: Table = {}
    base: dict = {}
    base_r = None
    if around is not None:
        around = tuple(around)
        base = {l: around for l in range(num_layers)}
        base_r = ev.evaluate(base)
    with tqdm(total=num_layers * len(candidates), desc="sensitivity", unit="run", disable=not progress) as bar:
        for layer in range(num_layers):
            table[layer] = {}
            for c in candidates:
                if base_r is not None and tuple(c) == around:
                    r = dict(base_r)
                else:
                    r = ev.evaluate({**base, layer: tuple(c)})
                table[layer][tuple(c)] = _loss(r, metric)
                if record is not None:
                    record.setdefault(layer, {})[tuple(c)] = r
                bar.set_postfix_str(f"L{layer} {cand_name(c)}")
                bar.update()
    return table


def _loss(r: Mapping, metric: str) -> float:
    return r["kl"] if metric == "kl" else r["dnll"]


def dominated(c: Candidate, losses: Mapping[Candidate, float]) -> bool:
    """True if another candidate has fewer bits and no more loss, or no more bits and less loss."""
    b, l = bits_of(c), losses[c]
    return any(
        (bits_of(o) < b and lo <= l) or (bits_of(o) <= b and lo < l)
        for o, lo in losses.items()
        if o != c
    )


def prune(losses: Mapping[Candidate, float]) -> list[Candidate]:
    """The non-dominated candidates of one layer, by increasing bits (decreasing loss).

    Of candidates with equal bits and equal loss one is kept (the one with more key bits).
    """
    keep: list[Candidate] = []
    for c in sorted(losses, key=lambda c: (bits_of(c), losses[c], -c[0])):
        if not keep or losses[c] < losses[keep[-1]]:
            keep.append(c)
    return keep


def _budget_units(budget: float, num_layers: int) -> int:
    # mean_l (k + v) / 2 <= budget  <=>  sum_l (k + v) <= 2 * budget * L  (integers)
    return int(math.floor(2.0 * budget * num_layers + 1e-9))


def _dp(table: Table, cap: int):
    """best[b]: least total loss with bit total exactly b (<= cap), with back pointers."""
    layers = sorted(table)
    pruned = [prune(table[l]) for l in layers]
    inf = float("inf")
    best = [0.0] + [inf] * cap
    back: list[list[Optional[tuple[int, Candidate]]]] = []
    for l, cands in zip(layers, pruned):
        new = [inf] * (cap + 1)
        ptr: list[Optional[tuple[int, Candidate]]] = [None] * (cap + 1)
        for b in range(cap + 1):
            if best[b] == inf:
                continue
            for c in cands:
                nb = b + bits_of(c)
                if nb > cap:
                    continue
                v = best[b] + table[l][c]
                if v < new[nb]:
                    new[nb], ptr[nb] = v, (b, c)
        best = new
        back.append(ptr)
    return layers, best, back


def _trace(layers, back, b: int) -> dict[int, Candidate]:
    out: dict[int, Candidate] = {}
    for i in range(len(layers) - 1, -1, -1):
        pb, c = back[i][b]
        out[layers[i]] = c
        b = pb
    return out


def search(table: Table, budget: float) -> tuple[dict[int, Candidate], float]:
    """Assignment of least predicted loss with average bits <= budget (exact, additive model).

    Returns ``(assignment, predicted_loss)``; among assignments of equal predicted loss the
    one with the fewest bits.  Raises :class:`CalibrationError` if no assignment fits.
    """
    n = len(table)
    cap = _budget_units(budget, n)
    layers, best, back = _dp(table, cap)
    feasible = [b for b in range(cap + 1) if best[b] < float("inf")]
    if not feasible:
        lo = min(bits_of(c) for t in table.values() for c in t) / 2
        raise CalibrationError(f"--budget {budget} is below the smallest average width {lo:g}")
    b = min(feasible, key=lambda b: (best[b], b))
    return _trace(layers, back, b), best[b]


def search_k(table: Table, budget: float, k: int) -> list[tuple[dict[int, Candidate], float]]:
    """The ``k`` assignments of least predicted loss within the budget (exact k-best dynamic
    programme over the pruned candidates), best first; ties: fewer bits first."""
    n = len(table)
    cap = _budget_units(budget, n)
    layers = sorted(table)
    cur: dict[int, list] = {0: [(0.0, None)]}
    hist = []
    for l in layers:
        row = table[l]
        cands = prune(row)
        nxt: dict[int, list] = {}
        for b, lst in cur.items():
            for i, (v, _) in enumerate(lst):
                for c in cands:
                    nb = b + bits_of(c)
                    if nb <= cap:
                        nxt.setdefault(nb, []).append((v + row[c], (b, i, c)))
        for nb in nxt:
            nxt[nb] = sorted(nxt[nb], key=lambda e: e[0])[:k]
        hist.append(nxt)
        cur = nxt
    if not cur:
        lo = min(bits_of(c) for t in table.values() for c in t) / 2
        raise CalibrationError(f"--budget {budget} is below the smallest average width {lo:g}")
    finals = sorted(((v, b, i) for b, lst in cur.items() for i, (v, _) in enumerate(lst)),
                    key=lambda e: (e[0], e[1]))[:k]
    out = []
    for v, b, i in finals:
        assign: dict[int, Candidate] = {}
        for li in range(n - 1, -1, -1):
            pb, pi, c = hist[li][b][i][1]
            assign[layers[li]] = c
            b, i = pb, pi
        out.append((assign, v))
    return out


def pareto_front(table: Table) -> list[tuple[float, float, dict[int, Candidate]]]:
    """Every non-dominated (average bits, predicted loss, assignment) of the additive model."""
    n = len(table)
    cap = sum(max(bits_of(c) for c in t) for t in table.values())
    layers, best, back = _dp(table, cap)
    out = []
    for b in range(cap + 1):
        if best[b] < float("inf") and (not out or best[b] < out[-1][1]):
            out.append((b / 2 / n, best[b], _trace(layers, back, b)))
    return out


def refine(ev: "Evaluator", table: Table, assignment: Mapping[int, Candidate], budget: float,
           metric: str = "kl", rounds: int = 2, width: int = 8, progress: bool = True,
           start: Optional[dict] = None) -> tuple[dict[int, Candidate], dict, list]:
    """Measured local search from ``assignment``: each round evaluates, jointly, the ``width``
    moves the table predicts best (one layer changed, or one layer up and another down) that
    keep the budget, and takes the one that measures least if it beats the current assignment;
    stops after ``rounds`` or when no move helps.  The additive model ranks the moves, the
    joint runs decide, so interactions between layers the table cannot see are caught.  Only
    non-dominated per-layer candidates are used.  ``start``: the measured result of
    ``assignment`` if known.  Returns (assignment, measured, history of rounds)."""
    from tqdm.auto import tqdm

    cap = _budget_units(budget, len(table))
    pruned = {l: prune(table[l]) for l in table}
    cur = dict(assignment)
    cur_m = start if start is not None else ev.evaluate(cur)
    history = []
    for r in range(rounds):
        used = sum(bits_of(c) for c in cur.values())
        singles = [(table[l][c] - table[l][cur[l]], bits_of(c) - bits_of(cur[l]), l, c)
                   for l in sorted(pruned) for c in pruned[l] if c != cur[l]]
        moves = [(d, {l: c}) for d, db, l, c in singles if used + db <= cap]
        ups = sorted((m for m in singles if m[1] > 0), key=lambda m: m[0])[: 2 * width]
        downs = sorted((m for m in singles if m[1] < 0), key=lambda m: m[0])[: 2 * width]
        moves += [(u[0] + d[0], {u[2]: u[3], d[2]: d[3]}) for u in ups for d in downs
                  if u[2] != d[2] and used + u[1] + d[1] <= cap]
        moves = sorted(moves, key=lambda m: (m[0], sorted(m[1].items())))[:width]
        best = None
        for pred, mv in tqdm(moves, desc=f"refine round {r + 1}", unit="run", disable=not progress):
            a = {**cur, **mv}
            m = ev.evaluate(a)
            if _loss(m, metric) < _loss(cur_m, metric) and (best is None or _loss(m, metric) < _loss(best[1], metric)):
                best = (a, m, mv, pred)
        history.append({"round": r + 1, "tried": len(moves), "loss_before": _loss(cur_m, metric),
                        "move": None if best is None else {cand_name(c) + f"@{l}": round(best[3], 6)
                                                           for l, c in best[2].items()},
                        "loss_after": _loss(cur_m if best is None else best[1], metric)})
        if best is None:
            break
        cur, cur_m = best[0], best[1]
    return cur, cur_m, history


def average_bits(assignment: Mapping[int, Candidate]) -> float:
    return sum(bits_of(c) for c in assignment.values()) / 2 / len(assignment)


# ------------------------------------------------------------------------ calibration data


def bundled_text(name: str = DEFAULT_CALIB) -> str:
    from importlib import resources

    return resources.files("kvtuner").joinpath("data", name).read_text(encoding="utf-8")


def calibration_windows(ids: Sequence[int], max_tokens: int, seq_len: int, seed: int,
                        bos: Optional[int] = None) -> torch.Tensor:
    """``[N, seq_len]`` windows of ``ids`` covering ``max_tokens`` tokens.

    The text is cut into consecutive chunks (of ``seq_len - 1`` tokens when ``bos`` is
    prepended to each window); when there are more chunks than needed, which ones are used
    is drawn with ``seed``.  Short texts give fewer windows (at least one, possibly shorter).
    """
    step = seq_len - (1 if bos is not None else 0)
    if step <= 0:
        raise CalibrationError(f"--seq-len {seq_len} is too short")
    ids = list(ids)
    n_chunks = len(ids) // step
    if n_chunks == 0:
        if len(ids) < 2:
            raise CalibrationError("calibration text has fewer than 2 tokens")
        chunks = [ids]
    else:
        want = max(1, min(n_chunks, math.ceil(max_tokens / seq_len)))
        g = torch.Generator().manual_seed(seed)
        pick = sorted(torch.randperm(n_chunks, generator=g)[:want].tolist()) if want < n_chunks else range(n_chunks)
        chunks = [ids[i * step : (i + 1) * step] for i in pick]
    if bos is not None:
        chunks = [[bos] + c for c in chunks]
    return torch.tensor(chunks, dtype=torch.long)


# ------------------------------------------------------------------------------- the run


@dataclass
class CalibResult:
    assignment: dict[int, Candidate]
    predicted: float
    measured: dict
    table: Table
    reference_nll: float
    tokens: int
    uniform: dict = field(default_factory=dict)  # name -> evaluate() of same-average uniform configs
    verified: list = field(default_factory=list)  # the jointly checked pool: {source, predicted, measured, ...}
    source: str = "dp"  # what won: "dp" (the additive optimum), "dp#i" (verify pool) or "uniform K4V2"
    around: Optional[str] = None  # the --around operating point of the table, or None (unquantized)
    refined: list = field(default_factory=list)  # refine()'s rounds, when asked for

    @property
    def average_bits(self) -> float:
        return average_bits(self.assignment)

    def layers(self) -> dict[int, LayerBits]:
        return {l: LayerBits(*c) for l, c in sorted(self.assignment.items())}


def calibrate(
    model,
    windows: torch.Tensor,
    budget: float,
    mode: QuantMode = QuantMode(),
    metric: str = "kl",
    candidates: Sequence[Candidate] = CANDIDATES,
    table: Optional[Table] = None,
    progress: bool = True,
    evaluator: Optional[Evaluator] = None,
    compare_uniform: bool = True,
    verify: int = 1,
    around: Optional[Candidate] = None,
    refine_rounds: int = 0,
    refine_width: int = 8,
) -> CalibResult:
    """Sensitivity (unless ``table`` is given), search, and joint check of the result.

    ``verify`` > 1: the ``verify`` best assignments of the additive model are all evaluated
    jointly on the calibration tokens, and the one of least measured loss is returned (the
    additive model ignores interactions between layers; this catches the cases where they
    change the order).  Every one of them is made of non-dominated per-layer choices.

    ``compare_uniform``: the uniform configurations of the same average as the result are
    evaluated too (``uniform``), and with ``verify`` > 1 those at the largest uniform
    average within the budget join the pool (source ``"uniform K4V2"``...); whenever a
    same-average uniform one measures less than the chosen assignment, it is returned
    instead, so the result is never worse than a same-average uniform configuration.

    ``refine_rounds`` > 0: then a measured local search from the result (:func:`refine`);
    it only moves to assignments that measure less, so it never ends worse than the above.

    ``around``: the table is (or is measured as, when ``table`` is None) the leave-one-out
    table around uniform ``around`` (:func:`measure_sensitivity`); predicted losses are then
    ``loss(around) + sum_l (table[l][c_l] - loss(around))``.
    """
    if metric not in METRICS:
        raise CalibrationError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    n_layers, head_dim, _ = _model_shape(model)
    for c in candidates:
        for b in c:
            mode.fmt(b, head_dim)  # group / packing checks
    if around is not None:
        around = tuple(around)
        if around not in [tuple(c) for c in candidates]:
            raise CalibrationError(f"--around {cand_name(around)} is not one of the candidates")
    ev = evaluator or Evaluator(model, windows, mode)
    if table is None:
        table = measure_sensitivity(ev, n_layers, candidates, metric, progress, around=around)
    if sorted(table) != list(range(n_layers)):
        raise CalibrationError(f"sensitivity table has {len(table)} layers, the model has {n_layers}")
    # constant per-layer offset of the leave-one-out table: sum_l table - offset = predicted
    offset = (n_layers - 1) * table[0][around] if around is not None else 0.0

    def predict(a: Mapping[int, Candidate]) -> float:
        return sum(table[l][c] for l, c in a.items()) - offset

    uniform: dict = {}

    def uniform_eval(c: Candidate) -> dict:
        if cand_name(c) not in uniform:
            uniform[cand_name(c)] = ev.evaluate({l: c for l in range(n_layers)})
        return uniform[cand_name(c)]

    verified: list = []
    if verify > 1:
        from tqdm.auto import tqdm

        pool = [(f"dp#{i + 1}", a, p - offset) for i, (a, p) in enumerate(search_k(table, budget, verify))]
        for name, a, p in tqdm(pool, desc="joint check", unit="run", disable=not progress):
            verified.append({"source": name, "assignment": a, "predicted": p, "measured": ev.evaluate(a)})
        if compare_uniform:
            fit = [bits_of(c) for c in candidates if bits_of(c) / 2 <= budget + 1e-9]
            for c in candidates:
                if fit and bits_of(c) == max(fit):
                    a = {l: tuple(c) for l in range(n_layers)}
                    verified.append({"source": f"uniform {cand_name(c)}", "assignment": a,
                                     "predicted": predict(a), "measured": uniform_eval(c)})
        best = min(verified, key=lambda v: _loss(v["measured"], metric))  # first among equals
        assignment, predicted, measured = best["assignment"], best["predicted"], best["measured"]
        source = best["source"]
    else:
        assignment, predicted = search(table, budget)
        predicted -= offset
        measured = ev.evaluate(assignment)
        source = "dp"
    same = {}
    if compare_uniform:
        for c in candidates:
            if bits_of(c) / 2 == average_bits(assignment):
                same[cand_name(c)] = uniform_eval(c)
        # never worse than a same-average uniform configuration (first among equals stays)
        for name, r in same.items():
            if _loss(r, metric) < _loss(measured, metric):
                c = parse_cand(name)
                assignment = {l: c for l in range(n_layers)}
                predicted, measured, source = predict(assignment), r, f"uniform {name}"
    refined: list = []
    if refine_rounds > 0:
        assignment, measured, refined = refine(ev, table, assignment, budget, metric, refine_rounds, refine_width,
                                               progress, start=measured)
        if any(h["move"] for h in refined):
            predicted, source = predict(assignment), f"{source}, refined"
    return CalibResult(assignment, predicted, measured, table, ev.reference_nll, ev.tokens, same, verified,
                       source, cand_name(around) if around is not None else None, refined)


def predicted_bytes(assignment: Mapping[int, Candidate], mode: QuantMode, head_dim: int, kv_heads: int,
                    full_dtype_bytes: int = 2) -> int:
    """Bytes one token takes in the server's pool over all layers (TP 1), data and scales."""
    cfg = KVQuantConfig(dtype="kvtuner", nbits_key=16, nbits_value=16, group_size=mode.group_size,
                        asym=mode.asym, axis_key=mode.axis_key,
                        residual_length=mode.residual_length or mode.group_size,
                        per_layer={l: LayerBits(*c) for l, c in assignment.items()})
    return cfg.bytes_per_token(sorted(assignment), head_dim, kv_heads, full_dtype_bytes)


def table_to_json(table: Table) -> dict:
    return {str(l): {cand_name(c): float(v) for c, v in row.items()} for l, row in sorted(table.items())}


def table_from_json(obj: Mapping) -> Table:
    return {int(l): {parse_cand(k): float(v) for k, v in row.items()} for l, row in obj.items()}


def results_to_json(results: Mapping) -> dict:
    return {str(l): {cand_name(c): {k: float(v) for k, v in r.items()} for c, r in row.items()}
            for l, row in sorted(results.items())}


def load_table(path: str, metric: str = "kl") -> Table:
    """The sensitivity table for ``metric`` from a ``--table`` cache file."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    return {int(l): {parse_cand(k): _loss(r, metric) for k, r in row.items()} for l, row in obj["results"].items()}


# -------------------------------------------------------------------------------- the CLI


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise CalibrationError(f"--dtype must be auto, bfloat16, float16 or float32, got {name!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m kvtuner.calibrate",
        description="Search per-layer KV bit widths under an average-bits budget; write a KVTuner preset.",
    )
    ap.add_argument("--model", required=True, help="transformers model directory (or hub id)")
    ap.add_argument("--budget", type=float, required=True, help="average bits: mean over layers of (kbits + vbits) / 2")
    ap.add_argument("--out", required=True, help="preset to write (.yaml, or .json)")
    ap.add_argument("--calib-file", help="calibration text (default: the bundled kvtuner/data/calib_en.txt)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=64, help="elements per scale group (-1: whole head)")
    ap.add_argument("--asym", action="store_true", help="scale and offset per group (the server's --kvtuner-asym)")
    ap.add_argument("--axis-key", type=int, default=0,
                    help="0: per-token keys; 1: per-channel keys (KIVI) over pages of --group-size tokens")
    ap.add_argument("--residual-length", type=int, default=0,
                    help="--axis-key 1: newest tokens kept in full precision (a multiple of --group-size; 0: one group)")
    ap.add_argument("--metric", choices=METRICS, default="kl",
                    help="kl: KL divergence vs the unquantized model; nll: log perplexity increase")
    ap.add_argument("--chunk", type=int, default=0,
                    help="evaluate as the server with --chunked-prefill-size CHUNK does: each chunk's queries read "
                         "their own tokens in full precision and earlier ones quantized (0: every query reads "
                         "quantized K/V)")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="auto", help="model dtype: auto (bfloat16), bfloat16, float16, float32")
    ap.add_argument("--verify", type=int, default=8,
                    help="evaluate the VERIFY best assignments of the additive model jointly and keep the best "
                         "measured (default 8; 1: the model's optimum); the same-average uniform configurations "
                         "join the check, and one that measures less is written instead")
    ap.add_argument("--around", metavar="NAME",
                    help="measure each layer's sensitivity around the uniform candidate NAME (e.g. K4V2): every "
                         "other layer at NAME instead of unquantized (leave one out around the operating point; "
                         "default: around the unquantized model)")
    ap.add_argument("--refine", type=int, default=0, metavar="ROUNDS",
                    help="after the search, a measured local search of up to ROUNDS rounds (joint runs decide; default 0)")
    ap.add_argument("--refine-width", type=int, default=8, metavar="W", help="moves evaluated per refine round (default 8)")
    ap.add_argument("--table", help="sensitivity table cache (JSON): reused when it matches, written otherwise")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _load_model(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return tok, model.to(device).eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except (CalibrationError, KVTunerConfigError) as e:
        print(f"calibrate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _run(args, argv) -> int:
    t0 = time.time()
    mode = QuantMode(args.group_size, args.asym, args.axis_key, args.residual_length, args.chunk)
    if not (2 <= args.budget <= 8):
        raise CalibrationError(f"--budget must be between 2 and 8 average bits, got {args.budget}")
    if args.max_tokens < 2 or args.seq_len < 2:
        raise CalibrationError("--max-tokens and --seq-len must be at least 2")
    around = None
    if args.around is not None:
        try:
            around = parse_cand(args.around.strip().upper())
        except ValueError:
            around = None
        if around not in CANDIDATES:
            raise CalibrationError(f"--around must name a candidate such as K4V2 "
                                   f"({', '.join(cand_name(c) for c in CANDIDATES)}), got {args.around!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.calib_file:
        try:
            with open(args.calib_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CalibrationError(f"--calib-file {args.calib_file}: cannot read: {e.strerror or e}") from None
        calib_name = os.path.basename(args.calib_file)
    else:
        text, calib_name = bundled_text(), f"kvtuner/data/{DEFAULT_CALIB}"
    device = _pick_device(args.device)
    dtype = _pick_dtype(args.dtype, device)
    tok, model = _load_model(args.model, device, dtype)
    n_layers, head_dim, kv_heads = _model_shape(model)
    if head_dim % (head_dim if args.group_size == -1 else args.group_size):
        raise CalibrationError(f"--group-size {args.group_size} does not divide the model's head_dim {head_dim}")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = calibration_windows(ids, args.max_tokens, args.seq_len, args.seed, tok.bos_token_id)

    ident = {
        "version": TABLE_VERSION, "model": os.path.abspath(args.model) if os.path.isdir(args.model) else args.model,
        "mode": mode.as_meta(), "calibration_sha256": _sha256(text),
        "windows": list(windows.shape), "seed": args.seed, "dtype": str(dtype).replace("torch.", ""),
        "candidates": [cand_name(c) for c in CANDIDATES],
    }
    if around is not None:  # absent otherwise: tables cached without --around stay valid
        ident["around"] = cand_name(around)
    table = None
    if args.table and os.path.exists(args.table):
        with open(args.table, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("identity") == ident and "results" in cached:
            table = load_table(args.table, args.metric)
            print(f"calibrate: reusing the sensitivity table {args.table}", file=sys.stderr)
        else:
            print(f"calibrate: {args.table} was made with other settings; measuring again", file=sys.stderr)
    ev = Evaluator(model, windows, mode)
    if table is None:
        results: dict = {}
        table = measure_sensitivity(ev, n_layers, CANDIDATES, args.metric, not args.no_progress, record=results,
                                    around=around)
        if args.table:
            tmp = f"{args.table}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"identity": ident, "reference_nll": ev.reference_nll, "tokens": ev.tokens,
                           "what": ("per layer and candidate: that layer alone quantized, joint metrics vs the "
                                    "unquantized model (kl, dnll: loss metrics kl / nll)") if around is None else
                                   (f"per layer and candidate: every other layer at {cand_name(around)}, that layer "
                                    "at the candidate; joint metrics vs the unquantized model (kl, dnll: loss "
                                    "metrics kl / nll)"),
                           "results": results_to_json(results)}, f, indent=1)
                f.write("\n")
            os.replace(tmp, args.table)
    if args.verify < 1:
        raise CalibrationError(f"--verify must be at least 1, got {args.verify}")
    if args.refine < 0 or args.refine_width < 1:
        raise CalibrationError(f"--refine must be >= 0 and --refine-width >= 1, got {args.refine} and {args.refine_width}")
    res = calibrate(model, windows, args.budget, mode, args.metric, table=table, evaluator=ev,
                    progress=not args.no_progress, verify=args.verify, around=around,
                    refine_rounds=args.refine, refine_width=args.refine_width)

    bpt = predicted_bytes(res.assignment, mode, head_dim, kv_heads)
    bf16 = n_layers * kv_heads * head_dim * 2 * 2
    key = "kl" if args.metric == "kl" else "dnll"
    meta = {
        "tool": "kvtuner.calibrate",
        "model": os.path.basename(os.path.normpath(args.model)),
        "model_path": args.model,
        "architecture": (getattr(model.config, "architectures", None) or ["?"])[0],
        "num_layers": n_layers, "head_dim": head_dim, "num_kv_heads": kv_heads,
        "mode": mode.as_meta(),
        "server_flags": (f"--kv-cache-dtype kvtuner --kvtuner-config {os.path.basename(args.out)} "
                         f"--kvtuner-q-group-size {mode.group_size}" + (" --kvtuner-asym" if mode.asym else "")
                         + (f" --kvtuner-axis-key 1 --page-size {mode.group_size} --kvtuner-residual-length "
                            f"{mode.residual_length} --max-running-requests N" if mode.axis_key == 1 else "")),
        "budget": args.budget,
        "average_bits": round(res.average_bits, 6),
        "metric": args.metric,
        "calibration": {"data": calib_name, "sha256": _sha256(text), "tokens": res.tokens,
                        "windows": windows.shape[0], "seq_len": int(windows.shape[1])},
        "seed": args.seed,
        "dtype": ident["dtype"], "device": device.type,
        "search": {
            "additive_model": "sum over layers of the single-layer losses" if around is None else
                              (f"loss(uniform {cand_name(around)}) plus the sum over layers of the leave-one-out "
                               f"increases around uniform {cand_name(around)}"),
            "exact_dp": True,
            "joint_check": (f"the {sum(v['source'].startswith('dp') for v in res.verified)} best assignments of "
                            "the additive model evaluated jointly on the calibration tokens"
                            + (" with the same-average uniform configurations"
                               if any(v["source"].startswith("uniform") for v in res.verified) else "")
                            + "; least measured loss kept")
            if res.verified else "the additive model's optimum only",
            "pool": [{"source": v["source"], "average_bits": round(average_bits(v["assignment"]), 6),
                      "predicted": float(v["predicted"]), "measured": float(_loss(v["measured"], args.metric))}
                     for v in res.verified],
        },
        "predicted_loss": float(res.predicted),
        "measured_loss": float(res.measured[key]),
        "measured": {k: float(v) for k, v in res.measured.items()},
        "reference_nll": float(res.reference_nll),
        "uniform_same_average": {n: float(r[key]) for n, r in res.uniform.items()},
        "kv_bytes_per_token": bpt,
        "kv_bytes_per_token_bf16": bf16,
        "capacity_vs_bf16": round(bf16 / bpt, 4),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m kvtuner.calibrate " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if around is not None:
        meta["search"]["around"] = cand_name(around)
    if args.refine:
        meta["search"]["refine"] = {"what": "measured local search from the result above (kvtuner.calibrate.refine): "
                                            "per round the --refine-width moves the table ranks best, jointly "
                                            "evaluated; the best taken if it measures less",
                                    "width": args.refine_width, "rounds": res.refined}
    uniform_won = res.source.startswith("uniform") and not res.source.endswith("refined")
    if uniform_won:
        meta["search"]["result"] = (f"{res.source}: the same-average uniform configuration measured less than "
                                    "every searched assignment and was written instead")
    write_preset(args.out, res.layers(), meta)
    load_preset(args.out)  # what the server will do
    uni = ", ".join(f"uniform {n}: {v:.5f}" for n, v in meta["uniform_same_average"].items())
    print(
        f"calibrate: wrote {args.out}: {n_layers} layers, average {res.average_bits:.3f} bits "
        f"(budget {args.budget:g}), {args.metric} predicted {res.predicted:.5f} measured {meta['measured_loss']:.5f}"
        + (f" ({uni})" if uni else "")
        + (f"; {res.source} won the joint check and was written" if uniform_won else "")
        + (f"; refined in {sum(1 for h in res.refined if h['move'])} move(s)" if res.refined else "")
        + (f", around {cand_name(around)}" if around is not None else "") + f", {time.time() - t0:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
