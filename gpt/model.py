"""The GPT of the challenge's records, in one file: config, layers, forward, loss.

Baseline features: tied embeddings, grouped-query attention with RMS-normed q/k, rotary embeddings
(optionally on part of each head), a learned per-head query gain, relu^2 MLP with a width multiplier,
per-channel residual scales, a learned mix with the input embedding, U-Net style skip connections,
and a tanh logit softcap.
Record-class features, each off by default: leaky-relu(0.5)^2, 1/sqrt(layer+1) input scaling, XSA,
a BOS-masked SmearGate, a sparse per-head attention output gate, orthogonal initialisation, depth
recurrence over a span of layers (run 2 or more times, with the U-Net skips re-paired over the looped
sequence), gated skips, parallel attention/MLP lanes in late layers (one shared stream, or two lanes
averaged at the end), a hashed bigram embedding, attention isolated per document, NTK-aware RoPE base
scaling and muP-scaled orthogonal output projections (PR #281's).

This module is also shipped with the artifact, so it depends on torch alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024      # must match the tokenizer; 0 = take it from the dataset
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4       # grouped-query attention: heads share K/V in groups
    mlp_mult: float = 2.0       # MLP hidden width = mlp_mult * model_dim
    mlp_activation: str = "relu2"  # relu2 | leaky_relu2 (leaky slope 0.5, then squared; records: -0.002 bpb)
    rope_base: float = 10000.0
    # a sequence longer than rope_ntk_len rotates with the base raised to base * (T / rope_ntk_len) ** (dims / (dims - 2)),
    # so the lowest frequency still spans it
    rope_ntk_len: int = 0       # NTK-aware RoPE: past this many tokens the base grows (0 = off; PR #281: 1024)
    rope_dims: int = 0          # rotary dims per head (0 = the whole head); records use 16 of 64
    qk_gain_init: float = 1.5   # initial per-head query gain (records: 5.0)
    logit_softcap: float = 30.0  # 0 disables
    tied_embed_init_std: float = 0.005
    unet_skips: bool = True     # first half of the layers feeds the second half, mirrored
    ln_scale: bool = False      # scale each block's normed inputs by 1/sqrt(layer + 1)
    xsa: bool = False           # remove from each head's output its component along the token's own value
    smear_gate: bool = False    # add a gated copy of the previous token's embedding (never across BOS)
    recur_start: int = -1       # first layer of a span that is run again when recurrence is active (-1 = none)
    recur_end: int = -1         # last layer of that span (inclusive); records: 3..5
    recur_passes: int = 2       # how many times the span runs when recurrence is active (the 1.0611 record: 3)
    # U-Net skips under recurrence. False: only first visits take part (encoder = layers below num_layers // 2).
    # True (the records): the looped layer sequence itself is cut in half, every call of the first half feeds
    # one call of the second, mirrored (11 layers, 3-5 x3: 17 calls, 8 skips)
    recur_resplit: bool = False
    skip_gates: bool = False    # a skip is lerp(w * skip, x, sigmoid(g)) with g zero-initialised (records), not x + w * skip
    parallel_from: int = -1     # from this layer on, attention and MLP read in parallel (-1 = never)
    # 1: both read the same normed stream and add to it together. 2 (the records, from layer 8 of 11: decoder calls
    # only; earlier layers work too, and a one-stream layer after two-lane ones takes their mean): two lanes, attention reads
    # lane 0 (mixed with x0), the MLP reads lane 1, each output is added to both lanes with learned weights,
    # each lane's residual is scaled by a learned lambda (init parallel_resid_init), and the model's output
    # is the mean of the lanes; skips feed lane 0
    parallel_lanes: int = 1
    parallel_resid_init: float = 1.1
    # sparse attention output gate: each head's output times sigmoid(scale * w_h . x[:dims]), x the block's normed
    # input, w zero-initialised (so 0.5 at first): a per-token, per-head volume knob (records: 12 dims, scale 0.5)
    attn_gate_dims: int = 0     # 0 = off
    attn_gate_scale: float = 1.0
    orthogonal_init: bool = False  # Q, K, V and the MLP's input matrix start orthogonal (gain 1), as in the records
    # the attention's and the MLP's output projections start orthogonal times 1/sqrt(2 * num_layers) instead of zero,
    # so each block adds a small, full-rank update from step 0
    mup_out_init: bool = False  # muP output scaling of the output projections' init (PR #281's lineage)
    # the order of the initial draws, which decides the weights a seed gives (same statistics either way):
    # "official": every Linear draws its default init as it is built, the embedding's N(0, std) last (the official
    # baseline, draw for draw); "record": the 1.0611 record script's, whose matrices live in banks that draw nothing
    # when built: the embedding, then each layer's Q, K, V, then every layer's MLP input, all orthogonal, every
    # starting value then rounded to bf16 as the script's GPU build does (needs orthogonal_init, zero output projections)
    init_order: str = "official"
    bigram_buckets: int = 0     # hashed (previous, current) token-pair embedding table size (0 = off)
    bigram_dim: int = 128       # width of that table, projected to model_dim
    doc_isolation: bool = False  # attention never crosses a BOS token (document start)
    bos_id: int = 1             # the token that starts every document

    def __post_init__(self):
        for name, low in (("vocab_size", 0), ("num_layers", 1), ("model_dim", 1), ("num_heads", 1), ("num_kv_heads", 1),
                          ("rope_dims", 0), ("rope_ntk_len", 0), ("bigram_buckets", 0), ("bigram_dim", 1), ("bos_id", 0),
                          ("recur_passes", 2), ("attn_gate_dims", 0)):
            if type(getattr(self, name)) is not int or getattr(self, name) < low:
                raise ValueError(f"{name} must be an integer >= {low}, not {getattr(self, name)!r}")
        for name in ("mlp_mult", "rope_base", "qk_gain_init", "logit_softcap", "tied_embed_init_std",
                     "parallel_resid_init", "attn_gate_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and abs(v) < float("inf") and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {v!r}")
        if self.mlp_mult * self.model_dim < 1 or self.rope_base <= 0:
            raise ValueError(f"mlp_mult {self.mlp_mult} and rope_base {self.rope_base} must be > 0")
        if self.vocab_size and self.bos_id >= self.vocab_size:
            raise ValueError(f"bos_id {self.bos_id} is not a token of the vocabulary of {self.vocab_size}")
        if not -1 <= self.parallel_from < self.num_layers:
            raise ValueError(f"parallel_from {self.parallel_from} must be -1 (never) or a layer 0..{self.num_layers - 1}")
        if self.parallel_lanes not in (1, 2):
            raise ValueError(f"parallel_lanes must be 1 (a shared stream) or 2 (two lanes), not {self.parallel_lanes!r}")
        if self.attn_gate_dims > self.model_dim:
            raise ValueError(f"attn_gate_dims {self.attn_gate_dims} is more than model_dim {self.model_dim}")
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        if head_dim % 2 or self.rope_dims % 2 or self.rope_dims > head_dim:
            raise ValueError(f"rope_dims {self.rope_dims} must be even and at most the head dim {head_dim}")
        if type(self.mup_out_init) is not bool:
            raise ValueError(f"mup_out_init must be true or false, not {self.mup_out_init!r}")
        if self.init_order not in ("official", "record"):
            raise ValueError(f"init_order must be official or record, not {self.init_order!r}")
        if self.init_order == "record" and (not self.orthogonal_init or self.mup_out_init or self.bigram_buckets):
            raise ValueError("init_order=record draws the record script's model: it needs orthogonal_init=true, "
                             "mup_out_init=false and no bigram table")
        if self.mlp_activation not in ("relu2", "leaky_relu2"):
            raise ValueError(f"mlp_activation must be relu2 or leaky_relu2, not {self.mlp_activation!r}")
        if (self.recur_start < 0) != (self.recur_end < 0) or self.recur_end >= self.num_layers \
                or self.recur_start > self.recur_end:
            raise ValueError(f"recurrence span {self.recur_start}..{self.recur_end} is not a span of the "
                             f"{self.num_layers} layers (set both, or both to -1)")

    @property
    def has_recurrence(self) -> bool:
        return self.recur_start >= 0


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """A bias-free linear layer whose fp32 weights are cast to the activations' dtype at use."""

    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False, draw: bool = True):
        # draw=False: no default init drawn (zeros until init_weights draws it), as the record script's banks
        object.__setattr__(self, "_draw", draw)
        super().__init__(fan_in, fan_out, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def reset_parameters(self) -> None:
        if self._draw:
            super().reset_parameters()
        else:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, rope_dims: int, base: float, ntk_len: int = 0):
        super().__init__()
        self.dims, self.base, self.ntk_len = rope_dims or head_dim, base, ntk_len
        self.register_buffer("inv_freq", self.frequencies(base), persistent=False)

    def frequencies(self, base: float, device=None) -> Tensor:
        return 1.0 / base ** (torch.arange(0, self.dims, 2, dtype=torch.float32, device=device) / self.dims)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate the first ``dims`` channels of x (B, H, T, D); leave the rest as they are."""
        T = x.size(-2)
        t = torch.arange(T, device=x.device, dtype=torch.float32)
        inv_freq = self.inv_freq
        if self.ntk_len and T > self.ntk_len:  # NTK-aware: a larger base for a longer sequence (T is static)
            base = self.base * (T / self.ntk_len) ** (self.dims / max(self.dims - 2, 1))
            inv_freq = self.frequencies(base, x.device)  # built on the device: no host copy per call
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        rot, rest = x[..., : self.dims], x[..., self.dims:]
        a, b = rot[..., : self.dims // 2], rot[..., self.dims // 2:]
        rotated = torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1)
        return torch.cat([rotated, rest], dim=-1) if rest.numel() else rotated


# --- attention with or without document isolation -------------------------------------------------
def document_ids(idx: Tensor, bos_id: int) -> Tensor:
    """(B, T) index of the document each position belongs to (a BOS starts a new one)."""
    return torch.cumsum((idx == bos_id).to(torch.int32), dim=1)


# flash-attn's variable-length attention, best first: FA3 (Hopper), FA4 (CuTe DSL; SM90 and SM100 kernels, pip wheels
# only), FA2. All three take (q, k, v, cu_seqlens_q=, cu_seqlens_k=, max_seqlen_q=, max_seqlen_k=, causal=)
FLASH_VARLEN_MODULES = ("flash_attn_interface", "flash_attn.cute", "flash_attn")


FLASH_VARLEN_ERRORS: dict = {}  # module -> why it would not import (e.g. FA4's cutlass not on the path)


def find_flash_varlen():
    """The first of FLASH_VARLEN_MODULES that imports and has ``flash_attn_varlen_func``, or None. FA4 comes
    wrapped as torch.library ops (fa4_varlen) when its interface has the entry points they call."""
    import importlib
    for module in FLASH_VARLEN_MODULES:
        try:
            found = getattr(importlib.import_module(module), "flash_attn_varlen_func")
        except Exception as e:  # missing, or installed against another CUDA/torch: FlexAttention serves instead
            FLASH_VARLEN_ERRORS[module] = f"{type(e).__name__}: {e}"  # for the log line, when it is installed
            continue
        if module == "flash_attn.cute":
            try:
                interface = _fa4_interface()
                if callable(interface._flash_attn_fwd) and callable(interface._flash_attn_bwd):
                    return fa4_varlen
            except (ImportError, AttributeError):  # another FA4 layout: its own function, traced as it is
                pass
        return found
    return None


# FA4's public function is a torch.autograd.Function whose forward JIT-compiles CuTe kernels in Python: dynamo
# cannot trace it, so inside the compiled model it would break the graph at every attention call (17 a step
# with the loop). As opaque ops with fake (shape-only) versions, the compiled graph calls it like any aten op.
# The ops hold no state of their own: each call looks FA4's interface up in sys.modules, so a second copy of this
# module (which re-registers the ops, replacing the first copy's) calls the same kernels.
def _fa4_interface():
    import importlib
    return importlib.import_module("flash_attn.cute.interface")


@torch.library.custom_op("golf::fa4_varlen_fwd", mutates_args=())
def _fa4_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> tuple[Tensor, Tensor]:
    out, lse = _fa4_interface()._flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                                max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True,
                                                return_lse=True)[:2]
    return out.contiguous(), lse.contiguous()


@_fa4_forward.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):  # out (tokens, heads, Dv) in q's dtype; lse (heads, tokens) in float32
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("golf::fa4_varlen_bwd", mutates_args=())
def _fa4_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                  max_seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _fa4_interface()._flash_attn_bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse, causal=True,
                                                  cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                                  max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fa4_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen):  # contiguous, as the op returns them; grouped K/V heads
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # get summed gradients: K/V's shape


def _fa4_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen = max_seqlen


def _fa4_grad(ctx, dout, _dlse):  # lse is returned for the backward only: nothing downstream differentiates it
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _fa4_backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None


_fa4_forward.register_autograd(_fa4_grad, setup_context=_fa4_setup_context)


def fa4_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """FA4's varlen attention with flash-attn's calling convention, for the one case golf uses: causal, the same
    documents on the query and key side."""
    if not causal or max_seqlen_q != max_seqlen_k:  # (cu_seqlens_k is cu_seqlens_q: the model passes one tensor)
        raise ValueError("fa4_varlen: only causal self-attention over one cu_seqlens is wrapped")
    return _fa4_forward(q, k, v, cu_seqlens_q, int(max_seqlen_q))[0]


_FLASH_VARLEN: list = []  # [function or None], looked up once


def varlen_attention_for(device: torch.device):
    """The varlen kernel to isolate documents with on this device: flash-attn's on CUDA when installed."""
    if device.type != "cuda":
        return None
    if not _FLASH_VARLEN:
        _FLASH_VARLEN.append(find_flash_varlen())
    return _FLASH_VARLEN[0]


class DocumentMask:
    """How attention is restricted for one batch: plain causal, or causal within each document.

    Isolated documents on CUDA: flash-attn's varlen kernel when installed (every row of the batch cut into
    its documents, packed end to end, ``cu_seqlens`` marking where each starts), else FlexAttention's
    block-sparse mask (built once per batch, shared by all layers); on the CPU a dense boolean mask for SDPA
    (fine for its short sequences).
    """

    def __init__(self, idx: Tensor | None = None, bos_id: int = 1, isolate: bool = False, varlen=None,
                 varlen_dtype: torch.dtype = torch.bfloat16):
        self.isolate = isolate and idx is not None
        self.block_mask = None
        self.dense = None
        self.varlen, self.cu_seqlens, self.max_seqlen, self.varlen_dtype = None, None, 0, varlen_dtype
        if not self.isolate:
            return
        B, T = idx.shape
        if varlen is not None:
            # a document starts at each BOS and at each row's first position (rows never see each other)
            starts = idx == bos_id
            starts[:, 0] = True
            first = starts.reshape(-1).nonzero().squeeze(1)
            end = torch.full((1,), B * T, dtype=first.dtype, device=idx.device)
            self.cu_seqlens = torch.cat([first, end]).to(torch.int32)
            # an upper bound is all the kernel needs; the row length keeps it one constant for torch.compile
            # (the true maximum would be a new integer, so a recompile, on nearly every batch)
            self.max_seqlen = T
            self.varlen = varlen
            return
        docs = document_ids(idx, bos_id)
        if idx.is_cuda:
            from torch.nn.attention.flex_attention import create_block_mask

            def mask_mod(b, h, q, kv):
                return (q >= kv) & (docs[b, q] == docs[b, kv])
            self.block_mask = create_block_mask(mask_mod, B, None, T, T, device=idx.device)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            self.dense = (docs[:, :, None] == docs[:, None, :]) & causal  # (B, T, T)


PLAIN_CAUSAL = DocumentMask()


@torch.compiler.disable
def document_mask(idx: Tensor, bos_id: int, isolate: bool) -> DocumentMask:
    """Built outside any compiled graph (a graph break when the model is compiled).

    flash-attn takes bf16/fp16 only: it serves under a half-precision autocast (training, scoring); a float32
    forward (e.g. GPTQ's calibration) isolates documents through FlexAttention instead."""
    kind = idx.device.type
    half = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in (torch.bfloat16, torch.float16)
    varlen = varlen_attention_for(idx.device) if isolate and half else None
    return DocumentMask(idx, bos_id, isolate, varlen, torch.get_autocast_dtype(kind) if half else torch.bfloat16)


_flex = None


def flex_attention(q, k, v, block_mask, enable_gqa):
    """FlexAttention must run compiled to be fast: inlined when the caller is being compiled, else
    through a compiled wrapper of its own."""
    global _flex
    from torch.nn.attention.flex_attention import flex_attention as fa
    if torch.compiler.is_compiling():
        return fa(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _flex is None:
        _flex = torch.compile(fa, dynamic=False)
    return _flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.kv = cfg.num_heads, cfg.num_kv_heads
        self.d = cfg.model_dim // cfg.num_heads
        draw = cfg.init_order == "official"
        self.q = Linear(cfg.model_dim, self.h * self.d, draw=draw)
        self.k = Linear(cfg.model_dim, self.kv * self.d, draw=draw)
        self.v = Linear(cfg.model_dim, self.kv * self.d, draw=draw)
        self.out = Linear(self.h * self.d, cfg.model_dim, zero_init=True, draw=draw)
        self.q_gain = nn.Parameter(torch.full((self.h,), cfg.qk_gain_init))
        self.rotary = Rotary(self.d, cfg.rope_dims, cfg.rope_base, cfg.rope_ntk_len)
        self.xsa = cfg.xsa
        self.gate_dims, self.gate_scale = cfg.attn_gate_dims, cfg.attn_gate_scale
        if self.gate_dims:  # a plain parameter, not a Linear: Adam trains it with the scalars, never Muon or LoRA
            self.gate_w = nn.Parameter(torch.zeros(self.h, self.gate_dims))

    def forward(self, x: Tensor, mask: DocumentMask) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, self.d).transpose(1, 2)
        v_tokens = self.v(x).view(B, T, self.kv, self.d)
        v = v_tokens.transpose(1, 2)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        gqa = self.kv != self.h
        if mask.varlen is not None:  # flash-attn on the packed documents, (tokens, heads, D) in and out
            # one half dtype for all three: autocast leaves rms_norm's output (q, k) in float32, and unlike
            # SDPA and FlexAttention, flash-attn does not cast for itself
            dt = mask.varlen_dtype
            y = mask.varlen(q.transpose(1, 2).reshape(B * T, self.h, self.d).to(dt),
                            k.transpose(1, 2).reshape(B * T, self.kv, self.d).to(dt),
                            v_tokens.reshape(B * T, self.kv, self.d).to(dt),
                            cu_seqlens_q=mask.cu_seqlens, cu_seqlens_k=mask.cu_seqlens,
                            max_seqlen_q=mask.max_seqlen, max_seqlen_k=mask.max_seqlen, causal=True)
            y = (y[0] if isinstance(y, tuple) else y).view(B, T, self.h, self.d)  # some FA3 builds add the LSE
        else:
            if mask.block_mask is not None:
                y = flex_attention(q, k, v, mask.block_mask, gqa)
            elif mask.dense is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense[:, None], enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            y = y.transpose(1, 2)  # (B, T, H, D): the attention kernels' own memory order, so a free view
        if self.xsa:
            # XSA: drop the part of each head's output that points along the token's own value vector. Heads
            # grouped by their KV head (h // group, as GQA maps them), in token-major order: no copy of v per
            # head and no transposed reads (the (B, H, T, D) form of this took ~10% of a record step).
            yg = y.reshape(B, T, self.kv, self.h // self.kv, self.d)
            vn = F.normalize(v_tokens, dim=-1).unsqueeze(3)
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(B, T, self.h, self.d)
        if self.gate_dims:
            g = torch.sigmoid(self.gate_scale * F.linear(x[..., : self.gate_dims], self.gate_w.to(x.dtype)))
            y = y * g.unsqueeze(-1).to(y.dtype)
        return self.out(y.reshape(B, T, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        draw = cfg.init_order == "official"
        self.fc = Linear(cfg.model_dim, hidden, draw=draw)
        self.proj = Linear(hidden, cfg.model_dim, zero_init=True, draw=draw)
        self.leaky = cfg.mlp_activation == "leaky_relu2"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        act_fn = getattr(self, "act_fn", None)  # the train stage's fused leaky-relu^2 kernel, when it picks one
        if act_fn is not None and self.leaky:
            return self.proj(act_fn(h))
        h = F.leaky_relu(h, 0.5) if self.leaky else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        # learned mix of the running residual with the input embedding x0
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim)]))
        self.in_scale = (layer + 1) ** -0.5 if cfg.ln_scale else 1.0
        self.parallel = 0 <= cfg.parallel_from <= layer
        self.two_lanes = self.parallel and cfg.parallel_lanes == 2
        if self.two_lanes:
            # lane_resid[k] scales lane k's residual; lane_post[j, k] weighs output j (0 attention, 1 MLP) into lane k
            self.lane_resid = nn.Parameter(torch.full((2,), float(cfg.parallel_resid_init)))
            self.lane_post = nn.Parameter(torch.ones(2, 2))

    def forward(self, x: Tensor, x0: Tensor, mask: DocumentMask) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.in_scale
        a = self.attn_scale.to(x.dtype) * self.attn(h, mask)
        if self.parallel:  # both lanes read the same input and add to the stream together
            return x + a + self.mlp_scale.to(x.dtype) * self.mlp(h)
        x = x + a
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.in_scale)

    def forward_lanes(self, lane0: Tensor, lane1: Tensor, x0: Tensor, mask: DocumentMask) -> tuple[Tensor, Tensor]:
        """The two-lane parallel block: attention reads lane 0 mixed with x0, the MLP reads lane 1 as it is."""
        mix = self.resid_mix.to(lane0.dtype)
        a = self.attn_scale.to(lane0.dtype) * self.attn(rms_norm(mix[0] * lane0 + mix[1] * x0) * self.in_scale, mask)
        m = self.mlp_scale.to(lane1.dtype) * self.mlp(rms_norm(lane1) * self.in_scale)
        r, post = self.lane_resid.to(lane0.dtype), self.lane_post.to(lane0.dtype)
        return (r[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                r[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


class SmearGate(nn.Module):
    """x_t += lambda * sigmoid(w . x_t[:12]) * x_{t-1}, except where token t starts a document.

    The BOS mask matters: without it the first token of a document would see the last token of the
    previous one, a cross-document leak (a record was audited for exactly this).
    """

    def __init__(self, dim: int, bos_id: int, gate_dims: int = 12):
        super().__init__()
        self.gate_dims = min(gate_dims, dim)
        self.gate = nn.Linear(self.gate_dims, 1, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.lam = nn.Parameter(torch.zeros(1))
        self.bos_id = bos_id

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        keep = (idx != self.bos_id).unsqueeze(-1).to(x.dtype)
        g = torch.sigmoid(F.linear(x[..., : self.gate_dims], self.gate.weight.to(x.dtype)))
        return x + self.lam.to(x.dtype) * g * prev * keep


class BigramHash(nn.Module):
    """An embedding of the hashed (previous token, token) pair; a BOS hashes with no previous token."""

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_id: int):
        super().__init__()
        self.buckets, self.bos_id = buckets, bos_id
        self.table = nn.Embedding(buckets, dim)
        nn.init.normal_(self.table.weight, std=0.01)
        self.proj = Linear(dim, model_dim, zero_init=True)

    def forward(self, idx: Tensor) -> Tensor:
        prev = F.pad(idx[:, :-1], (1, 0), value=0)
        prev = torch.where(idx == self.bos_id, torch.zeros_like(prev), prev)
        h = (prev * 1_000_003 + idx) % self.buckets
        return self.proj(self.table(h))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.n_encoder = cfg.num_layers // 2 if cfg.unet_skips else 0
        n_skips = min(self.n_encoder, cfg.num_layers - self.n_encoder)
        if cfg.unet_skips and cfg.recur_resplit and cfg.has_recurrence:  # the looped sequence's halves
            n_calls = len(self.looped_layers(cfg, True))
            n_skips = min(n_calls // 2, n_calls - n_calls // 2)
        self.skip_weights = nn.Parameter(torch.ones(n_skips, cfg.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(n_skips, cfg.model_dim)) if cfg.skip_gates else None
        self.smear = SmearGate(cfg.model_dim, cfg.bos_id) if cfg.smear_gate else None
        self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, cfg.model_dim, cfg.bos_id) \
            if cfg.bigram_buckets else None
        self.init_weights()
        # whether the recurrence span runs twice; training switches it on part-way, inference keeps it on
        self.recurrence_active = cfg.has_recurrence
        # set by the eval while every batch row holds one document (isolated windows, LoRA TTT's rows): a row's
        # isolating mask is then the causal one, so the mask is not built (FlexAttention's block mask, built per
        # forward outside any graph, cost more than the attention; plain causal SDPA takes its place)
        self.rows_are_documents = False

    def init_weights(self) -> None:
        """The draws that replace the modules' default init, made after every module is built.

        The order matters at a given seed: the official scripts build all modules first (each Linear draws its
        default init as it is made) and draw the embedding's N(0, std) last, so golf does too. With the embedding
        drawn before the blocks, every block matrix was another sample than the official's at the same seed
        (correlation 0.001: golf was in effect another seed; BENCHMARKS.md, "What the step-20 gap is")."""
        cfg = self.cfg
        nn.init.normal_(self.embed.weight, std=cfg.tied_embed_init_std)
        if cfg.init_order == "record":  # the record's banks: Q, K, V layer by layer, then the MLP inputs
            for block in self.blocks:
                for linear in (block.attn.q, block.attn.k, block.attn.v):
                    nn.init.orthogonal_(linear.weight, gain=1.0)
            for block in self.blocks:
                nn.init.orthogonal_(block.mlp.fc.weight, gain=1.0)
            # the script builds its model in bf16 and returns the matrices and scalars to fp32 after: every starting
            # value is a bf16 one (the lanes' 1.1 starts at 1.1015625)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(p.to(torch.bfloat16).to(p.dtype))
        elif cfg.orthogonal_init:
            for block in self.blocks:
                for linear in (block.attn.q, block.attn.k, block.attn.v, block.mlp.fc):
                    nn.init.orthogonal_(linear.weight, gain=1.0)
        if cfg.mup_out_init:
            with torch.no_grad():
                for block in self.blocks:
                    for linear in (block.attn.out, block.mlp.proj):
                        nn.init.orthogonal_(linear.weight, gain=1.0)
                        linear.weight.mul_((2 * cfg.num_layers) ** -0.5)

    @staticmethod
    def looped_layers(cfg: ModelConfig, active: bool) -> list[int]:
        """The layers in execution order: the recurring span runs recur_passes times in a row when active."""
        if not (active and cfg.has_recurrence):
            return list(range(cfg.num_layers))
        span = list(range(cfg.recur_start, cfg.recur_end + 1))
        return list(range(cfg.recur_start)) + span * cfg.recur_passes + list(range(cfg.recur_end + 1, cfg.num_layers))

    def layer_order(self) -> list[tuple[int, bool]]:
        """(layer, first visit) in execution order."""
        seen, order = set(), []
        for i in self.looped_layers(self.cfg, self.recurrence_active):
            order.append((i, i not in seen))
            seen.add(i)
        return order

    def layer_plan(self) -> list[tuple[int, bool, int]]:
        """(layer, pushes its output as a skip, index of the skip it takes first or -1), in execution order.

        Skips pair LIFO: the last output pushed feeds the first decoder call that takes one."""
        if not self.cfg.unet_skips:
            return [(i, False, -1) for i in self.looped_layers(self.cfg, self.recurrence_active)]
        if self.cfg.recur_resplit:  # halves of the (looped) sequence; without recurrence the same as below
            calls = self.looped_layers(self.cfg, self.recurrence_active)
            half = len(calls) // 2
            return [(i, k < half, k - half if half <= k < half + len(self.skip_weights) else -1)
                    for k, i in enumerate(calls)]
        plan = []
        for i, first in self.layer_order():
            j = i - self.n_encoder
            plan.append((i, first and i < self.n_encoder, j if first and 0 <= j < len(self.skip_weights) else -1))
        return plan

    def add_skip(self, x: Tensor, j: int, skip: Tensor) -> Tensor:
        w = self.skip_weights[j].to(x.dtype)
        if self.skip_gates is None:
            return x + w * skip
        return torch.lerp(w * skip, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    def hidden(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            # the residual stream lives in the autocast dtype (bf16), as in the records: half the bytes
            x = x.to(torch.get_autocast_dtype("cuda"))
        if self.bigram is not None:
            x = x + self.bigram(idx).to(x.dtype)
        if self.smear is not None:
            x = self.smear(x, idx)
        x = rms_norm(x)
        x0 = x
        # only an isolating mask needs building (outside the compiled graph); plain causal needs nothing
        isolate = self.cfg.doc_isolation and not self.rows_are_documents
        mask = document_mask(idx, self.cfg.bos_id, True) if isolate else PLAIN_CAUSAL
        skips, lane1 = [], None  # lane1: the MLP lane once two-lane parallel layers begin (x is lane 0)
        for i, push, j in self.layer_plan():
            block = self.blocks[i]
            if block.two_lanes and lane1 is None:  # the lanes split before the first one's skip (lane 0's alone)
                lane1 = x
            if j >= 0 and skips:  # a decoder call: take the mirrored encoder output
                x = self.add_skip(x, j, skips.pop())
            if block.two_lanes:
                x, lane1 = block.forward_lanes(x, lane1, x0, mask)
            else:
                if lane1 is not None:  # a one-stream layer after two-lane ones: they merge first
                    x, lane1 = 0.5 * (x + lane1), None
                x = block(x, x0, mask)
            if push:
                skips.append(x)
        if lane1 is not None:
            x = 0.5 * (x + lane1)
        return rms_norm(x)

    def head_logits(self, h: Tensor) -> Tensor:
        """float32 logits before the softcap: the tied embedding as the output head (TTT's head adapter adds here)."""
        return F.linear(h, self.embed.weight.to(h.dtype)).float()

    def softcap(self, logits: Tensor) -> Tensor:
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def project(self, h: Tensor) -> Tensor:
        """float32 logits from final hidden states (..., model_dim); scoring projects only the positions it scores."""
        return self.softcap(self.head_logits(h))

    def logits(self, idx: Tensor) -> Tensor:
        return self.project(self.hidden(idx))

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy (nats) of predicting ``targets`` from ``idx``, both (B, T).

        ``self.loss_fn(h, embed_weight, targets, softcap)``, when a trainer sets one, replaces the plain
        logits + cross-entropy (the train stage plugs in a fused version; inference never needs it).
        """
        assert idx.shape == targets.shape, (idx.shape, targets.shape)
        loss_fn = getattr(self, "loss_fn", None)
        if loss_fn is not None:
            h = self.hidden(idx)
            return loss_fn(h.reshape(-1, h.size(-1)), self.embed.weight, targets.reshape(-1), self.cfg.logit_softcap)
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def token_nll(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood in nats, shape (B, T); the softmax is taken in float64 so
        that sums over millions of tokens are exact to ~1e-12 relative."""
        logits = self.logits(idx).double()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               reduction="none").view(targets.shape)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int, recurrence: bool = False) -> float:
    """Training FLOPs per token: 6 x matrix parameters + attention scores (forward + backward)."""
    d = cfg.model_dim
    kv_dim = d // cfg.num_heads * cfg.num_kv_heads
    layers = len(GPT.looped_layers(cfg, recurrence))
    per_layer = d * d * 2 + d * kv_dim * 2 + 2 * d * int(cfg.mlp_mult * d)
    matrix = layers * per_layer + cfg.vocab_size * d
    attn = layers * 2 * seq_len * d  # causal: half of the 4*T*d of QK^T and AV
    return 6 * matrix + 3 * attn
