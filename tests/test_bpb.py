"""The BPB formula against independent references written here with plain loops."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

from gpt.bpb import bits_per_byte, piece_tables, token_bytes
from gpt.model import GPT, ModelConfig
from gpt.scoring import score_stream, window_plan
from stages.tokenize import EMBEDDED_DOCS, EMBEDDED_TOKENIZER


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(EMBEDDED_TOKENIZER))


def reference_piece_bytes(sp, token: int, prev: int | None) -> int:
    """The challenge's rule, one token at a time, straight from the piece string."""
    if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
        return 0
    if sp.is_byte(token):
        return 1
    piece = sp.id_to_piece(token)
    n = len((piece[1:] if piece.startswith("\u2581") else piece).encode("utf-8"))
    prev_is_boundary = prev is None or sp.is_control(prev) or sp.is_unknown(prev) or sp.is_unused(prev)
    if piece.startswith("\u2581") and not prev_is_boundary:
        n += 1
    return n


def test_tables_match_the_rule_token_by_token(sp):
    tables = piece_tables(sp)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, sp.vocab_size(), size=3000)
    seq[::50] = 1  # BOS now and then
    got = token_bytes(seq[1:], tables, prev=seq[:-1])
    want = [reference_piece_bytes(sp, int(t), int(p)) for p, t in zip(seq[:-1], seq[1:])]
    assert got.tolist() == want


def test_bytes_equal_the_decoded_text_of_real_documents(sp):
    """Per document, the counted bytes are exactly the UTF-8 bytes of the text it decodes to."""
    tables = piece_tables(sp)
    with open(EMBEDDED_DOCS) as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(200), f)]
    bos = sp.bos_id()
    for text in docs:
        ids = [bos] + sp.encode(text)
        counted = int(token_bytes(np.array(ids[1:]), tables, prev=np.array(ids[:-1])).sum())
        assert counted == len(sp.decode(ids[1:]).encode("utf-8"))


def test_bare_space_piece_and_byte_fallback(sp):
    tables = piece_tables(sp)
    space_id = sp.piece_to_id("\u2581")
    assert space_id == 939  # the official sp1024 has the bare '▁' piece
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(tables[0][i] == 1 for i in byte_ids)
    # '▁' after a normal token is one byte (the space); after BOS it is zero
    normal = sp.encode("hello")[-1]
    assert token_bytes(np.array([space_id]), tables, prev=np.array([normal]))[0] == 1
    assert token_bytes(np.array([space_id]), tables, prev=np.array([1]))[0] == 0


def reference_bpb(model: GPT, tokens: list[int], seq_len: int, sp) -> float:
    """Independent: one window at a time, log-softmax by hand, bytes by the per-token rule."""
    nll_sum, n_bytes = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_len):
        chunk = tokens[start:start + seq_len + 1]
        x = torch.tensor([chunk[:-1]])
        with torch.no_grad():
            logits = model.logits(x)[0].double()
        for i in range(len(chunk) - 1):
            row = logits[i]
            m = row.max().item()
            logz = m + math.log(sum(math.exp(v - m) for v in row.tolist()))
            nll_sum += logz - row[chunk[i + 1]].item()
            n_bytes += reference_piece_bytes(sp, chunk[i + 1], chunk[i])
    return nll_sum / math.log(2) / n_bytes


def random_model(seed: int) -> GPT:
    """A small GPT with random weights everywhere (zero-initialised projections would make tests trivial)."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def document_stream(sp, n_docs: int, cut: int | None = None) -> list[int]:
    """[BOS] + ids of the first n_docs bundled documents, each cut to ``cut`` ids when given."""
    with open(EMBEDDED_DOCS) as f:
        texts = [json.loads(next(f))["text"] for _ in range(n_docs)]
    tokens = []
    for t in texts:
        tokens += [1] + sp.encode(t)[:cut]
    return tokens


def test_val_bpb_matches_a_plain_loop_reference(sp):
    model = random_model(0)
    tokens = document_stream(sp, 3)
    tokens = tokens[:700]
    nll = score_stream(model, np.array(tokens), seq_len=128, stride=0, batch_seqs=4)
    n_bytes = int(token_bytes(np.array(tokens[1:]), piece_tables(sp), prev=np.array(tokens[:-1])).sum())
    got = bits_per_byte(nll.sum(), n_bytes)
    want = reference_bpb(model, tokens, 128, sp)
    assert abs(got - want) / want < 1e-9


def reference_isolated_bpb(model: GPT, tokens: list[int], seq_len: int, stride: int, sp, bos: int = 1) -> float:
    """Independent: documents cut at BOS by hand; target j of a document starting at a is predicted from
    tokens[s..j], s = a + k * stride with the smallest k that fits j - s < seq_len; one forward per s."""
    starts = [i for i, t in enumerate(tokens) if t == bos]
    ends = starts[1:] + [len(tokens) - 1]
    nll_sum, n_bytes = 0.0, 0
    for a, last in zip(starts, ends):  # targets a..last-1 predict tokens a+1..last (the next BOS included)
        by_start: dict[int, list[int]] = {}
        for j in range(a, last):
            k = max(0, -(-(j - a - seq_len + 1) // stride))
            by_start.setdefault(a + k * stride, []).append(j)
        for s, targets in by_start.items():
            with torch.no_grad():
                logits = model.logits(torch.tensor([tokens[s:targets[-1] + 1]]))[0].double()
            for j in targets:
                row = logits[j - s].tolist()
                m = max(row)
                nll_sum += m + math.log(sum(math.exp(v - m) for v in row)) - row[tokens[j + 1]]
                n_bytes += reference_piece_bytes(sp, tokens[j + 1], tokens[j])
    return nll_sum / math.log(2) / n_bytes


def test_isolated_sliding_val_bpb_matches_a_per_document_plain_loop(sp):
    model = random_model(1)
    tokens = document_stream(sp, 6, cut=150)  # documents longer and shorter than a window
    nll = score_stream(model, np.array(tokens), seq_len=96, stride=32, batch_seqs=3, doc_isolation=True)
    n_bytes = int(token_bytes(np.array(tokens[1:]), piece_tables(sp), prev=np.array(tokens[:-1])).sum())
    got = bits_per_byte(nll.sum(), n_bytes)
    want = reference_isolated_bpb(model, tokens, 96, 32, sp)
    assert abs(got - want) / want < 1e-9
    # and isolation is real: the stream scored without it differs
    assert not np.allclose(nll, score_stream(model, np.array(tokens), seq_len=96, stride=32))


def test_sliding_windows_score_every_target_once():
    for n, L, s in [(1000, 128, 64), (1000, 128, 0), (129, 128, 32), (50, 128, 64), (1001, 100, 7)]:
        covered = np.zeros(n - 1, dtype=int)
        for start, length, first in window_plan(n, L, s):
            assert length <= L and first >= 0
            covered[start + first:start + length] += 1
            if start > 0 and s:
                assert first >= min(L - s, length) or start + length == n - 1
        assert (covered == 1).all(), (n, L, s)


def test_sliding_window_context_lowers_nll_and_is_causal(sp):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=1024, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=2)).eval()
    tokens = np.random.default_rng(1).integers(2, 1024, size=600)
    full = score_stream(model, tokens, 64, 16)
    changed = tokens.copy()
    changed[400:] = 5
    partial = score_stream(model, changed, 64, 16)
    # targets up to position 399 (nll index 398) never see the changed tokens
    assert np.array_equal(full[:399], partial[:399])
    assert not np.array_equal(full[399:], partial[399:])


def test_bits_per_byte_refuses_zero_bytes():
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
