"""The eval loop: score the val stream, with or without score-first test-time training, on one or many ranks
(shipped code: the shipped program runs this same loop).

Legal by construction: every adaptation step runs after the targets it trains on were scored and
recorded, and no target is scored twice, so a target's score depends only on the artifact and the tokens
before it (with lora_warm_a: before it in the eval's order, see lora). The one exception is asked for by name:
sgd with order=pre_score (PR #281's original) trains on the val stream before scoring it, and the compliance
stage FAILs it from the log. Each step is logged as it happens
({"event": "score"|"adapt", "start", "end"}, target indices, half-open) for the compliance stage to replay.

  none    windows (sliding or not, documents isolated or not) split over ranks batch by batch
  sgd     the stream in chunks of ``chunk_tokens`` targets: score the chunk (its windows split over
          ranks), then ``epochs`` passes of momentum SGD on all weights over the chunk's targets, the
          sequences of each step split over ranks and the gradients all-reduced; a cosine learning rate
          over the chunks. Every rank holds the same weights, so N ranks compute what one would (up to
          float rounding): chunks are sequential, only the work inside a chunk is spread.
  lora    per-document LoRA adapters (q, k, v, out, MLP fc and proj), reset at each document: the document
          is scored ``lora_chunk`` targets at a time (each with up to seq_len tokens of its own context), and
          after each chunk but the last the adapters take one AdamW step on it. Documents are independent,
          so they are split over ranks and adapted ``lora_docs`` at a time (longest first). lora_layout=record
          puts the adapters where the 1.0611 record does (one set per layer call on q, k, v, o and the MLP),
          lora_head adds one on the output projection, lora_warm_a keeps A from one group of documents to
          the next on a rank (B is zeroed): a document's scores then also depend on the documents that rank
          adapted on before it in its segment (all scored before; by time, not stream, order).
  phased  lora, plus global momentum SGD of all weights on every document scored so far, at ``phases``
          document boundaries evenly spread over the first ``phase_docs`` documents. The documents between
          two boundaries are split over ranks; the global steps are data-parallel (gradients all-reduced),
          so all ranks score the next documents with the same weights.

Several ranks write one merged timeline: each event carries the number of shared-weight updates done
before it; an update waits for every rank (its gradient all-reduce), so sorting by that count, shared
updates last, is an order in which the events really happened.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .scoring import (document_spans, kept_logits, make_batches, padded_len, score_batches, stream_windows,
                      window_tensors)

TTT_METHODS = ("none", "sgd", "lora", "phased")
LORA_LAYOUTS = ("linears", "record")
TTT_ORDERS = ("score_first", "pre_score")
LORA_COMPILE = ("off", "static", "dynamic")


@dataclass(frozen=True)
class TTTConfig:
    method: str = "none"        # none | sgd | lora | phased (see stages/ttt.py)
    chunk_tokens: int = 32768   # sgd: targets scored, then trained on, per chunk (records: 32768)
    epochs: int = 3             # sgd: passes over each chunk after scoring it (records: 3)
    lr: float = 0.002           # sgd: peak learning rate, cosine-decayed over the chunks
    momentum: float = 0.9       # sgd and the global phases
    batch_seqs: int = 32        # sgd and the global phases: sequences of seq_len per step, over all ranks
    grad_clip: float = 1.0      # sgd and the global phases: clip of the global gradient norm (0 = off)
    lora_rank: int = 8          # lora: adapter rank (records: 80-96 on 8x H100)
    lora_alpha: float = 16.0    # lora: the adapters' output is scaled by alpha / rank
    lora_lr: float = 0.001      # lora: AdamW learning rate (records: 1e-4 at rank 96)
    lora_betas: str = "0.9,0.999"  # lora: AdamW betas
    lora_wd: float = 0.0        # lora: AdamW decoupled weight decay
    lora_chunk: int = 48        # lora: targets scored, then adapted on, per step within a document (records: 48)
    lora_docs: int = 64         # lora: documents adapted side by side in one batch (records: 64)
    phase_docs: int = 2000      # phased: the leading documents over which the global phases run (records: 2000-2500)
    phases: int = 3             # phased: global SGD passes, at evenly spaced boundaries of those documents
    phase_lr: float = 0.001     # phased: peak learning rate of each pass, cosine-decayed over its steps
    phase_epochs: int = 1       # phased: passes over the scored documents at each boundary
    seed: int = 0               # LoRA A initialisation
    # lora and phased: where the adapters sit. linears: one on each of q, k, v, out, MLP fc and proj of every block,
    # shared by all the calls of that block (recurrence). record (the 1.0611 record's): one set per layer *call*
    # (17 calls over 11 blocks with its loop), on q, k and v (reading the attention's normed input), o (reading that
    # same input, added to the attention's output) and the whole MLP (reading its normed input, added to its output)
    lora_layout: str = "linears"
    # lora: one more adapter, on the output projection: reads the final hidden state, adds to the logits before
    # the softcap (records: on)
    lora_head: bool = False
    # lora: keep A from one document group to the next of a rank (only B is zeroed, AdamW starts afresh), drawn
    # anew at each global phase; off: A drawn from ``seed`` for every group (records: on, TTT_WARM_START_A=1)
    lora_warm_a: bool = False
    # lora and phased, on CUDA: the adapted forward run by torch.compile (hooks and all). off: eager, padded to
    # power-of-two lengths with every row; static: compiled, one graph per padded length; dynamic: one graph for
    # every length (as the 1.0611 record compiles its TTT forward), so windows keep their exact length and finished
    # documents leave the batch. Same scores up to float rounding. The CPU always runs eager and exact.
    lora_compile: str = "off"
    # pre_score is PR #281's original order, kept only so that it can be reproduced and refused: ``epochs`` passes
    # over the whole val stream, then everything is scored; the scores then depend on the targets themselves
    order: str = "score_first"  # sgd: score_first (each chunk scored, then trained on) | pre_score (compliance FAILs it)

    def __post_init__(self):
        if self.method not in TTT_METHODS:
            raise ValueError(f"ttt.method must be one of {', '.join(TTT_METHODS)}, not {self.method!r}")
        if min(self.chunk_tokens, self.epochs, self.batch_seqs, self.lora_rank, self.lora_chunk, self.lora_docs,
               self.phases, self.phase_epochs) < 1:
            raise ValueError("ttt: chunk_tokens, epochs, batch_seqs, lora_rank, lora_chunk, lora_docs, phases and "
                             "phase_epochs must be >= 1")
        for name in ("lr", "momentum", "grad_clip", "lora_alpha", "lora_lr", "lora_wd", "phase_lr", "phase_docs"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")) or name == "momentum" and v >= 1:
                raise ValueError(f"ttt.{name} must be a finite number >= 0{' and < 1' * (name == 'momentum')}, not {v!r}")
        try:
            betas = [float(b) for b in self.lora_betas.split(",")]
        except ValueError:
            betas = []
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"ttt.lora_betas must be two numbers in [0, 1) like 0.9,0.999, not {self.lora_betas!r}")
        if self.lora_layout not in LORA_LAYOUTS:
            raise ValueError(f"ttt.lora_layout must be one of {', '.join(LORA_LAYOUTS)}, not {self.lora_layout!r}")
        if self.lora_compile not in LORA_COMPILE:
            raise ValueError(f"ttt.lora_compile must be one of {', '.join(LORA_COMPILE)}, not {self.lora_compile!r}")
        if self.order not in TTT_ORDERS:
            raise ValueError(f"ttt.order must be one of {', '.join(TTT_ORDERS)}, not {self.order!r}")
        if self.order == "pre_score" and self.method != "sgd":
            raise ValueError(f"ttt.order=pre_score is the sgd method's (PR #281), not {self.method!r}'s")
        for name in ("lora_head", "lora_warm_a"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"ttt.{name} must be true or false, not {getattr(self, name)!r}")


class EvalBudgetError(RuntimeError):
    """The eval would run past its time budget."""


LORA_TARGETS = re.compile(r"blocks\.\d+\.(attn\.(q|k|v|out)|mlp\.(fc|proj))")
# lora_layout=record: q, k and v (linears), o (the attention module: its input to its output) and the MLP module
RECORD_TARGETS = re.compile(r"blocks\.(\d+)\.(attn(\.[qkv])?|mlp)")


def layer_calls(model) -> list[int]:
    """The block of each layer call of one forward, in execution order (recurrence repeats some)."""
    if hasattr(model, "looped_layers") and hasattr(model, "cfg"):
        return model.looped_layers(model.cfg, getattr(model, "recurrence_active", False))
    return list(range(len(model.blocks)))


def _fans(module) -> tuple[int, int]:
    """(inputs, outputs) of a targeted module: a linear layer, an attention (q's input, out's output) or an MLP."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    first, last = (module.q, module.out) if hasattr(module, "out") else (module.fc, module.proj)
    return first.in_features, last.out_features


class LoRA:
    """Rank-r adapters, one per batch row, added through forward hooks (the model is not changed; ``remove``
    detaches them, ``attach`` puts them back). Rows start from the same A and B = 0: the model's own output,
    whatever came before.

    ``linears`` layout: one adapter per targeted linear layer, used by every call of it. ``record`` layout: one
    per layer call (slot): each targeted module counts its calls within a forward (``begin`` zeroes the counts,
    ``end`` checks each module ran once per call of the layer plan) and its c-th call takes its c-th adapter, the
    one of slot ``slots[c]`` (the index of that call in execution order). ``lora_head``: one more adapter on the
    output projection; ``model.project`` is shadowed on the instance by the model's own head_logits, plus the
    adapter's output, then the model's own softcap."""

    def __init__(self, model, rows: int, cfg: TTTConfig, device):
        self.cfg, self.device = cfg, device
        self.targets: list[tuple[str, torch.nn.Module, list]] = []  # (name, module, slots; [None]: every call)
        calls = layer_calls(model) if cfg.lora_layout == "record" else []
        for name, m in model.named_modules():
            if cfg.lora_layout == "linears" and LORA_TARGETS.fullmatch(name):
                self.targets.append((name, m, [None]))
            elif cfg.lora_layout == "record" and (match := RECORD_TARGETS.fullmatch(name)):
                self.targets.append((name, m, [k for k, i in enumerate(calls) if i == int(match.group(1))]))
        self.first = [sum(len(t[2]) for t in self.targets[:i]) for i in range(len(self.targets))]
        self.names = [name if k is None else f"{name}@{k}" for name, _, slots in self.targets for k in slots]
        self.fans = [_fans(m) for _, m, slots in self.targets for _ in slots]
        if cfg.lora_head:
            self.names.append("head")
            self.fans.append((model.embed.embedding_dim, model.embed.num_embeddings))
        self.A = [torch.nn.Parameter(a.to(device).expand(rows, -1, -1).clone()) for a in self._draw()]
        self.B = [torch.nn.Parameter(torch.zeros(rows, cfg.lora_rank, fo, device=device)) for _, fo in self.fans]
        self.scale = cfg.lora_alpha / cfg.lora_rank
        self.rows: torch.Tensor | None = None  # the adapter rows of the batch's rows (None: all, in order)
        self.calls = [0] * len(self.targets)  # each target's calls in the current forward
        self.kept = None  # the head's view of the batch: (row, column) of each kept position, width, rows
        self.hooks: list = []
        self.attach(model)

    def _draw(self) -> list:
        """A's initial matrices, (inputs, rank) each: uniform in +-1/sqrt(inputs), from ``seed``."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        return [(torch.rand(fi, self.cfg.lora_rank, generator=g) * 2 - 1) / math.sqrt(fi) for fi, _ in self.fans]


    def _delta(self, j: int, x: torch.Tensor) -> torch.Tensor:
        A, B = (self.A[j], self.B[j]) if self.rows is None else (self.A[j][self.rows], self.B[j][self.rows])
        return (x @ A.to(x.dtype)) @ B.to(x.dtype) * self.scale

    def _hook(self, t: int):
        first, slots, name = self.first[t], self.targets[t][2], self.targets[t][0]
        if slots == [None]:
            return lambda module, inputs, out: out + self._delta(first, inputs[0])

        def add(module, inputs, out):
            c = self.calls[t]
            if c >= len(slots):
                raise RuntimeError(f"LoRA: {name} ran more than its {len(slots)} call(s) in one forward (begin() not "
                                   f"called, or the recurrence switched after the adapters were made)")
            self.calls[t] = c + 1
            return out + self._delta(first + c, inputs[0])
        return add

    def _head_delta(self, h: torch.Tensor) -> torch.Tensor:
        """The head adapter's output for kept hidden states h (N, dim), row-major: per row, through (rows, width)."""
        if self.kept is None:
            raise RuntimeError("LoRA head: begin(keep) must name the kept positions before the forward")
        row, col, width, n = self.kept
        H = h.new_zeros(n, width, h.size(-1)).index_put((row, col), h)
        return self._delta(len(self.A) - 1, H)[row, col]

    def attach(self, model) -> None:
        self.hooks = [m.register_forward_hook(self._hook(t)) for t, (_, m, _) in enumerate(self.targets)]
        if self.cfg.lora_head:
            raw, softcap = model.head_logits, model.softcap  # the model's own head, split at the softcap
            shadowed = model.__dict__.get("project")
            model.project = lambda h: softcap(raw(h) + self._head_delta(h).float())
            self.hooks.append(_Unshadow(model, "project", shadowed))

    def begin(self, keep: torch.Tensor | None = None) -> None:
        """Before each forward: the call counts start again; ``keep`` (rows, T, on the CPU) marks the positions
        whose hidden states reach the head, in the row-major order of kept_logits."""
        self.calls = [0] * len(self.targets)
        if self.cfg.lora_head:
            row, col = keep.nonzero()[:, 0], (keep.cumsum(1) - 1)[keep]
            self.kept = (row.to(self.device), col.to(self.device), max(int(keep.sum(1).max()), 1), keep.shape[0])

    def end(self) -> None:
        """After each forward: every per-call target ran once for each call of the layer plan."""
        for (name, _, slots), c in zip(self.targets, self.calls):
            if slots != [None] and c != len(slots):
                raise RuntimeError(f"LoRA: {name} ran {c} time(s) in a forward, the layer plan has {len(slots)}")
        self.kept = None

    def reset(self) -> None:
        """For the next group of documents: B = 0; A kept (lora_warm_a) or drawn again as at construction."""
        with torch.no_grad():
            for B in self.B:
                B.zero_()
            if not self.cfg.lora_warm_a:
                for A, a in zip(self.A, self._draw()):
                    A.copy_(a.to(A.device).expand_as(A))
        self.rows = None

    def params(self) -> list:
        return self.A + self.B

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


class _Unshadow:
    """Undoes an instance attribute shadowing a method (a hook handle's ``remove``)."""

    def __init__(self, obj, name: str, previous):
        self.obj, self.name, self.previous = obj, name, previous

    def remove(self) -> None:
        if self.previous is None:
            self.obj.__dict__.pop(self.name, None)
        else:
            self.obj.__dict__[self.name] = self.previous


class EvalLoop:
    """One rank's share of an eval; ``run`` returns the merged result on every rank."""

    def __init__(self, model, tokens: np.ndarray, seq_len: int, stride: int, batch_seqs: int, device,
                 doc_isolation: bool, bos_id: int, ttt: TTTConfig, budget_s: float = 0.0, on_budget: str = "fail",
                 spent_s: float = 0.0, progress=None, solo: bool = False, fixed: bool | None = None):
        if ttt.method in ("lora", "phased") and not doc_isolation:
            raise ValueError(f"ttt.method={ttt.method} adapts per document: it needs doc_isolation")
        self.model, self.ttt, self.device = model, ttt, torch.device(device)
        self.seq_len, self.batch_seqs = seq_len, batch_seqs
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # the world size that sizes SGD's per-rank batches; solo (the warm-up): this rank does all the work
        # with the real batch shapes, alone (no dealing to ranks, no collectives)
        self.shape_world, self.solo = self.world, solo
        if solo:
            self.rank, self.world = 0, 1
        self.tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        self.n = len(tokens) - 1
        self.spans = document_spans(tokens, bos_id) if doc_isolation else None
        self.bos_id = bos_id
        self.windows = stream_windows(len(tokens), seq_len, stride, self.spans)
        # fixed shapes (on CUDA unless told): compiled kernels are reused
        self.fixed = self.device.type == "cuda" if fixed is None else fixed
        if self.fixed and hasattr(torch._dynamo.config, "recompile_limit"):
            # scoring, LoRA and SGD batches use up to ~15 shapes; past the limit FlexAttention would run uncompiled
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.nll = np.zeros(self.n)
        self.count = np.zeros(self.n, dtype=np.int32)
        self.events: list[tuple] = []
        self.updates = 0  # shared-weight updates so far (the same on every rank)
        self.seconds = {"score": 0.0, "adapt": 0.0}
        self.positions = 0  # batch positions LoRA's forwards computed (context and padding included): its real work
        self.budget_s, self.on_budget, self.spent_s = budget_s, on_budget, spent_s
        self.stopped: dict | None = None
        self.progress = progress
        self.warm_lora: LoRA | None = None  # lora_warm_a: this rank's adapters, carried from group to group

    # --- bookkeeping ------------------------------------------------------------------------------------------
    def log(self, kind: str, lo: int, hi: int, shared: bool = False) -> None:
        if self.ttt.method != "none" and (not shared or self.rank == 0):
            self.events.append((self.updates, int(shared), len(self.events), kind, int(lo), int(hi)))

    def scored(self, windows: list) -> None:
        for _, _, a, b in sorted(windows, key=lambda w: w[2]):
            self.count[a:b] += 1
            self.log("score", a, b)
        if self.progress is not None:
            self.progress(sum(b - a for _, _, a, b in windows))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def over_budget(self, done: int, total: int, collective: bool) -> bool:
        """Whether the projected eval time (time spent before the loop + the loop's pace so far) passes the
        budget; with on_budget = fail, raise instead."""
        if self.budget_s <= 0 or self.stopped is not None:
            return False
        elapsed = time.perf_counter() - self.t0
        projected = self.spent_s + elapsed * total / max(done, 1) if done < total else 0.0
        if collective and self.world > 1:
            t = torch.tensor([projected], dtype=torch.float64, device=self.comm_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            projected = float(t.item())
        if projected <= self.budget_s or not done:
            return False
        msg = (f"eval would take about {projected:.0f} s, over its {self.budget_s:.0f} s budget ({done / total:.0%} "
               f"of this rank's targets done after {elapsed:.0f} s + {self.spent_s:.0f} s before the loop)")
        if self.on_budget == "fail":
            raise EvalBudgetError(msg + ": set eval.on_budget=stop to finish without further adaptation")
        self.stopped = {"rank": self.rank, "done_fraction": round(done / total, 4),
                        "projected_seconds": round(projected, 1)}
        return True

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")

    # --- scoring ---------------------------------------------------------------------------------------------------
    def score(self, windows: list, shard: bool = True) -> None:
        """Score windows with the current weights; batches are dealt to ranks in turn (``shard``), or the
        windows are this rank's own already."""
        t = time.perf_counter()
        batches = make_batches(windows, self.seq_len, self.batch_seqs, self.fixed)
        batches = batches[self.rank::self.world] if shard else batches
        score_batches(self.model, self.tokens, batches, self.device, self.nll, self.scored)
        self.seconds["score"] += time.perf_counter() - t

    def windows_in(self, lo: int, hi: int) -> list:
        """The windows clipped to targets lo..hi-1 (a window cut by a chunk edge scores its two parts with the
        weights of their own chunks)."""
        i = bisect.bisect_right(self._ends, lo)
        j = bisect.bisect_left(self._starts, hi)
        return [(s, n, max(a, lo), min(b, hi)) for s, n, a, b in self.windows[i:j]]

    @contextlib.contextmanager
    def rows_are_documents(self, yes: bool):
        """With documents isolated, the scoring windows and LoRA's rows each hold one document (a row's only BOS is
        its first token), so the model need not isolate within a row; SGD's sequences cross documents and do.
        (A test double has no such switch.)"""
        model = self.model
        # documents are cut at the eval's BOS; a model that isolates at another token would see other documents
        same_bos = getattr(getattr(model, "cfg", None), "bos_id", None) == self.bos_id
        if self.spans is None or not hasattr(model, "rows_are_documents") or not same_bos:
            yield
            return
        before, model.rows_are_documents = model.rows_are_documents, yes
        try:
            yield
        finally:
            model.rows_are_documents = before

    # --- shared-weight SGD ------------------------------------------------------------------------------------------
    def sgd_steps(self, lo: int, hi: int, opt, lr_at, epochs: int) -> None:
        """Momentum SGD on targets lo..hi-1 in seq_len sequences, each step's sequences split over ranks and
        its gradient all-reduced: every rank takes the same step."""
        with self.rows_are_documents(False):  # stream sequences: several documents a row
            self._sgd_steps(lo, hi, opt, lr_at, epochs)

    def _sgd_steps(self, lo: int, hi: int, opt, lr_at, epochs: int) -> None:
        L, params = self.seq_len, [p for g in opt.param_groups for p in g["params"]]
        seqs = [(s, min(L, hi - s)) for s in range(lo, hi, L)]
        steps = [seqs[i:i + self.ttt.batch_seqs] for i in range(0, len(seqs), self.ttt.batch_seqs)]
        k = 0
        for _ in range(epochs):
            for step in steps:
                t = time.perf_counter()
                opt.zero_grad(set_to_none=False)
                # this rank's share; solo, every rank's share in turn (the same shapes, gradients summed)
                shares = ([step[r::self.shape_world] for r in range(self.shape_world)] if self.solo
                          else [step[self.rank::self.world]])
                for mine in shares:
                    if not mine:
                        continue
                    T = padded_len(max(n for _, n in mine), L, self.fixed)
                    rows = -(-self.ttt.batch_seqs // self.shape_world) if self.fixed else len(mine)
                    seqs = [(s, n, s, s + n) for s, n in mine]
                    x, y, keep = (v.to(self.device) for v in window_tensors(self.tokens, T, rows, seqs))
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                        logits = kept_logits(self.model, x, keep)
                    loss = F.cross_entropy(logits, y[keep], reduction="sum") / sum(n for _, n in step)
                    loss.backward()
                if self.world > 1:
                    for p in params:  # a rank without sequences in this step adds zeros
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    flat = torch.cat([p.grad.reshape(-1) for p in params])
                    dist.all_reduce(flat)
                    i = 0
                    for p in params:
                        p.grad.copy_(flat[i:i + p.numel()].view_as(p.grad))
                        i += p.numel()
                if self.ttt.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, self.ttt.grad_clip)
                for g in opt.param_groups:
                    g["lr"] = lr_at(k)
                opt.step()
                self.sync()
                self.log("adapt", step[0][0], step[-1][0] + step[-1][1], shared=True)
                self.updates += 1
                self.seconds["adapt"] += time.perf_counter() - t
                k += 1

    # --- the variants ------------------------------------------------------------------------------------------------
    def run_plain(self) -> None:
        self.score(self.windows)

    def run_sgd(self) -> None:
        C = self.ttt.chunk_tokens
        chunks = [(lo, min(lo + C, self.n)) for lo in range(0, self.n, C)]
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.ttt.lr, momentum=self.ttt.momentum)
        if self.ttt.order == "pre_score":  # train on val, then score it: illegal, logged as it happens for compliance
            for c, (lo, hi) in enumerate(chunks):
                lr = self.ttt.lr * 0.5 * (1 + math.cos(math.pi * c / len(chunks)))
                self.sgd_steps(lo, hi, opt, lambda k: lr, self.ttt.epochs)
            self.score(self.windows)
            return
        for c, (lo, hi) in enumerate(chunks):
            self.score(self.windows_in(lo, hi))
            # the last chunk is scored only: nothing after it would use the adapted weights
            if self.stopped is None and c < len(chunks) - 1:
                lr = self.ttt.lr * 0.5 * (1 + math.cos(math.pi * c / len(chunks)))
                self.sgd_steps(lo, hi, opt, lambda k: lr, self.ttt.epochs)
                self.over_budget(hi, self.n, collective=True)

    def doc_targets(self, d: int) -> tuple[int, int]:
        a, b = self.spans[d]
        return a, min(b, self.n)

    def run_docs(self) -> None:
        """lora and phased: documents split over ranks, global phases at document boundaries."""
        nd, cfg = len(self.spans), self.ttt
        bounds = []
        if cfg.method == "phased":
            prefix = min(cfg.phase_docs, nd)
            bounds = sorted({round(prefix * (i + 1) / cfg.phases) for i in range(cfg.phases)} - {0})
        cuts = [0] + [b for b in bounds if b < nd] + [nd]
        size = [b - a for a, b in map(self.doc_targets, range(nd))]
        # each segment's documents, longest first, dealt to ranks in turn
        mine = [[d for d in sorted(range(cuts[p], cuts[p + 1]), key=lambda d: (-size[d], d))[self.rank::self.world]
                 if size[d] > 0] for p in range(len(cuts) - 1)]
        total, done = sum(size[d] for seg in mine for d in seg), 0
        for p, docs in enumerate(mine):
            self.warm_lora = None  # lora_warm_a: A drawn anew for each segment (the record: after each global phase)
            for g in range(0, len(docs), cfg.lora_docs):
                group = docs[g:g + cfg.lora_docs]
                if self.stopped is None:
                    self.lora_group(group)
                else:  # out of time: the rest is scored with the current weights, no adapters
                    self.score([w for d in group for w in self.windows_in(*self.doc_targets(d))], shard=False)
                done += sum(size[d] for d in group)
                self.over_budget(done, total, collective=False)
            if cuts[p + 1] in bounds:
                lo, hi = 0, self.doc_targets(cuts[p + 1] - 1)[1]
                steps = math.ceil(math.ceil((hi - lo) / self.seq_len) / cfg.batch_seqs) * cfg.phase_epochs
                params = list(self.model.parameters())
                opt = torch.optim.SGD(params, lr=cfg.phase_lr, momentum=cfg.momentum)
                self.sgd_steps(lo, hi, opt, lambda k: cfg.phase_lr * 0.5 * (1 + math.cos(math.pi * k / steps)),
                               cfg.phase_epochs)

    def lora_group(self, group: list[int]) -> None:
        """Score-then-adapt, chunk by chunk, for a batch of documents with one adapter row each."""
        cfg, C, L = self.ttt, self.ttt.lora_chunk, self.seq_len
        # padded (power-of-two lengths, every row) only for kernels compiled per shape; exact otherwise
        mode = lora_compile_mode(cfg, self.device)
        dynamic = mode == "dynamic"
        exact = not self.fixed or dynamic
        # adapter rows: one per document, or always lora_docs where shapes are fixed (parameters' shapes are static
        # in a dynamic graph too)
        rows = cfg.lora_docs if self.fixed or dynamic else len(group)
        hidden = lora_hidden(self.model, mode)
        spans = [self.doc_targets(d) for d in group]
        n_steps = max(math.ceil((b - a) / C) for a, b in spans)
        base = list(self.model.parameters())
        for p in base:
            p.requires_grad_(False)
        if cfg.lora_warm_a and self.warm_lora is not None:  # A as the last group left it, B = 0
            lora = self.warm_lora
            lora.reset()
            lora.attach(self.model)
        else:
            lora = LoRA(self.model, cfg.lora_docs if cfg.lora_warm_a else rows, cfg, self.device)
            self.warm_lora = lora if cfg.lora_warm_a else None
        b1, b2 = (float(v) for v in cfg.lora_betas.split(","))
        opt = torch.optim.AdamW(lora.params(), lr=cfg.lora_lr, betas=(b1, b2), weight_decay=cfg.lora_wd)
        try:
            for k in range(n_steps):
                t = time.perf_counter()
                # row r: up to seq_len tokens of its document, ending at its k-th chunk's end (none once done)
                wins = []
                for a, b in spans:
                    lo, hi = a + k * C, min(a + (k + 1) * C, b)
                    wins.append((max(a, hi - L), hi - max(a, hi - L), lo, hi) if lo < b else (0, 0, 0, 0))
                # adapt on the chunk just scored, except a document's last one (nothing after it to help)
                train = [lo < hi < b for (_, _, lo, hi), (_, b) in zip(wins, spans)]
                T = padded_len(max(w[1] for w in wins), L, not exact)
                if not exact:  # every row, done or not: one shape per length
                    batch = window_tensors(self.tokens, T, rows, wins)
                else:  # only the documents still going
                    active = [r for r, w in enumerate(wins) if w[1]]
                    batch_wins = [wins[r] for r in active]
                    if dynamic and len(active) == 1 and rows > 1:
                        # a batch of one would specialise the dynamic graph (a compile in the loop): an empty row,
                        # on an adapter row no document of this step uses, goes with it (nothing scored, no gradient)
                        active.append(1 - min(active[0], 1))
                        batch_wins.append((0, 0, 0, 0))
                    lora.rows = torch.tensor(active, device=self.device)
                    batch = window_tensors(self.tokens, T, len(active), batch_wins)
                x, y, keep = (v.to(self.device) for v in batch)
                self.positions += x.numel()
                lora.begin(batch[2])  # the per-call counts start again; the head learns each position's row
                # dynamic: with gradients even when nothing trains (a document group's last step), as the record
                # does: a gradient-free forward would be a second graph to compile
                with torch.set_grad_enabled(any(train) or dynamic), \
                        torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    logits = kept_logits(self.model, x, keep, hidden)
                lora.end()
                tgt = y[keep]
                nll = F.cross_entropy(logits.detach().double(), tgt, reduction="none").cpu().numpy()
                i = 0
                for _, _, lo, hi in wins:
                    self.nll[lo:hi] = nll[i:i + hi - lo]
                    i += hi - lo
                self.scored([w for w in wins if w[1]])
                t2 = time.perf_counter()
                self.seconds["score"] += t2 - t
                if any(train):
                    weight = torch.cat([torch.full((hi - lo,), 1.0 / (hi - lo) if tr else 0.0)
                                        for (_, _, lo, hi), tr in zip(wins, train) if hi > lo]).to(self.device)
                    opt.zero_grad()
                    (F.cross_entropy(logits, tgt, reduction="none") * weight).sum().backward()
                    opt.step()
                    self.sync()
                    for (_, _, lo, hi), tr in zip(wins, train):
                        if tr:
                            self.log("adapt", lo, hi)
                self.seconds["adapt"] += time.perf_counter() - t2
        finally:
            lora.remove()
            for p in base:
                p.requires_grad_(True)

    # --- the whole loop -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self._starts = [w[2] for w in self.windows]
        self._ends = [w[3] for w in self.windows]
        self.model.eval()
        graphs_before = _compiled_graphs()
        self.t0 = time.perf_counter()
        with self.rows_are_documents(True):
            {"none": self.run_plain, "sgd": self.run_sgd, "lora": self.run_docs, "phased": self.run_docs}[self.ttt.method]()
        busy = time.perf_counter() - self.t0
        compiled = _compiled_graphs() - graphs_before
        nll, count = self.nll, self.count
        if self.world > 1:  # each target was scored on one rank: a float64 sum gathers them exactly
            both = torch.from_numpy(np.stack([nll, count.astype(np.float64)])).to(self.comm_device)
            dist.all_reduce(both)
            nll, count = both[0].cpu().numpy(), both[1].cpu().numpy()
        loop = time.perf_counter() - self.t0  # every rank holds every score: the clock stops
        if not (count == 1).all():
            bad = int(np.flatnonzero(count != 1)[0])
            raise RuntimeError(f"target {bad} was scored {int(count[bad])} times: the eval plan is broken")
        stats = [loop, busy, self.seconds["adapt"]]
        events, stopped = [(*e[:2], 0, *e[2:]) for e in self.events], [self.stopped]
        if self.world > 1:  # the longest clock; TTT seconds from the busiest rank (the others wait for it)
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (stats, self.events, self.stopped, compiled))
            stats = [max(g[0][0] for g in gathered), *max((g[0] for g in gathered), key=lambda v: v[1])[1:]]
            compiled = max(g[3] for g in gathered)  # any rank's compile held every rank up
            events = [(*e[:2], r, *e[2:]) for r, g in enumerate(gathered) for e in g[1]]
            stopped = [g[2] for g in gathered]
        loop, _, adapt = stats
        return {"nll": nll, "events": merge_events(events), "loop_seconds": loop, "ttt_seconds": adapt,
                "score_seconds": loop - adapt, "budget_stop": next((s for s in stopped if s), None),
                "adapt_steps": sum(1 for e in events if e[4] == "adapt"), "graphs_compiled_in_loop": compiled,
                "lora_positions": self.positions}


_COMPILED_HIDDEN: dict = {}
# lora_compile runs on CUDA only: on the CPU, inductor's C++ build costs minutes and the eager forward is as fast.
# Tests switch it on for the CPU with a backend that builds nothing (aot_eager: dynamo's graphs, run eagerly).
COMPILE_ON_CPU = False
COMPILE_BACKEND = "inductor"


def lora_compile_mode(cfg: TTTConfig, device: torch.device) -> str:
    """The lora_compile that applies on this device (off on the CPU unless a test asks)."""
    return cfg.lora_compile if device.type == "cuda" or COMPILE_ON_CPU else "off"


def lora_hidden(model, mode: str):
    """The model's hidden-state forward for LoRA's batches: its own (off), or torch.compile's of the model's class
    method, made once per mode and class and shared by every loop and model copy (the warm-up's graphs serve the
    timed loop; the hooks and the model are inputs the graphs guard on)."""
    if mode == "off":
        return model.hidden
    key = (type(model), mode, COMPILE_BACKEND)
    if key not in _COMPILED_HIDDEN:
        _COMPILED_HIDDEN[key] = torch.compile(type(model).hidden, dynamic=mode == "dynamic", backend=COMPILE_BACKEND)
    fn = _COMPILED_HIDDEN[key]
    return lambda x: fn(model, x)


def _compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a compile inside a timed loop costs its clock)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, TypeError):
        return 0


def merge_events(events: list[tuple]) -> list[dict]:
    """One timeline from every rank's (updates, shared, rank, index, kind, start, end): by shared-update count,
    shared updates after the rest; consecutive events of one kind over adjacent targets joined."""
    out: list[dict] = []
    for *_, kind, lo, hi in sorted(events, key=lambda e: e[:4]):
        if out and out[-1]["event"] == kind and out[-1]["end"] == lo:
            out[-1]["end"] = hi
        else:
            out.append({"event": kind, "start": lo, "end": hi})
    return out


def warm_up_tokens(vocab_size: int, bos_id: int, n_tokens: int, seq_len: int, per_length: int = 1) -> np.ndarray:
    """Random tokens (never val data) laid out in documents that reach every batch shape the eval can use:
    ``per_length`` documents of each padded window length (128, 256, ... seq_len) for the scoring batches and,
    with per_length = lora_docs, one LoRA group per length (a group's last, gradient-free step has the
    length of its longest document; lora_compile=dynamic needs only two of each, see warm_up), one of 2 * seq_len + 64 tokens (in place of one seq_len document) for
    full sliding windows, their tails and LoRA's growing windows, then random documents up to ``n_tokens``
    (SGD's chunks). A shape first met inside the timed loop would compile there."""
    rng = np.random.default_rng(0)
    classes, p = [], min(128, seq_len)
    while True:
        classes.append(p)
        if p >= seq_len:
            break
        p = min(2 * p, seq_len)
    lengths = [p for p in classes for _ in range(per_length)]
    lengths[-1] = 2 * seq_len + 64
    fixed_part = sum(lengths)
    total = max(n_tokens, fixed_part + 1)
    tokens = rng.integers(0, vocab_size, size=total)
    tokens[tokens == bos_id] = (bos_id + 1) % vocab_size
    tokens[np.cumsum([0] + lengths)] = bos_id  # the last one opens the random tail
    rest = total - fixed_part
    if rest > seq_len:
        tokens[fixed_part + rng.choice(rest, size=rest // seq_len, replace=False)] = bos_id
    return tokens


def warm_up(model, vocab_size: int, bos_id: int, n_tokens: int, ttt: TTTConfig, **loop_args) -> float:
    """Run the same loop on ``warm_up_tokens`` with a copy of the model, so CUDA start-up and kernel
    compilation happen before the clock starts; the seconds it took. Every rank runs all of it (solo):
    dealt to ranks, the few warm-up batches would leave most ranks with shapes still to compile. With
    per-document TTT a plain scoring pass follows: past its budget the eval scores the rest that way."""
    t = time.perf_counter()
    per_doc = ttt.method in ("lora", "phased")
    # a graph per padded length and batch needs a full group of each length; lora_compile=dynamic's one graph needs
    # two documents of each (batches of one document specialise)
    dynamic = lora_compile_mode(ttt, torch.device(loop_args["device"])) == "dynamic"
    per_length = (2 if dynamic else ttt.lora_docs) if per_doc else 1
    tokens = warm_up_tokens(vocab_size, bos_id, n_tokens, loop_args["seq_len"], per_length)
    # SGD and phased TTT change the weights: they warm up on a copy (LoRA removes its adapters when done)
    warm = copy.deepcopy(model) if ttt.method in ("sgd", "phased") else model
    for method_cfg in [ttt] + ([TTTConfig()] if per_doc else []):
        EvalLoop(warm, tokens, bos_id=bos_id, ttt=method_cfg, solo=True, **loop_args).run()
    return time.perf_counter() - t
