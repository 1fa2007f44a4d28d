"""SentencePiece BPE training with the settings of the challenge's official tokenizers, and the vocab check.

The official fineweb_1024_bpe.model records these trainer settings in its own proto: BPE, byte fallback,
nmt_nfkc normalisation without a dummy prefix, split digits, character coverage 0.999, a soft vocab
limit, and ids pad/bos/eos/unk = 0/1/2/3. Everything else is SentencePiece's default (in particular
max_sentence_length 4192 bytes: longer documents are left out of training, as in the official run).

    python -m stages.tokenize --set tokenizer=train --set sp_vocab_size=4096 --set sp_train_docs=100000
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .docs import DataError
from gpt.shards import MAX_VOCAB

OFFICIAL_TRAINER = dict(
    model_type="bpe", byte_fallback=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
    split_digits=True, character_coverage=0.999, hard_vocab_limit=False,
    pad_id=0, bos_id=1, eos_id=2, unk_id=3,
)
MIN_VOCAB = 4 + 256  # the four special pieces and the 256 byte-fallback pieces


def check_vocab(vocab_size: int, what: str = "tokenizer") -> None:
    """Shard ids are uint16: refuse vocabularies that do not fit."""
    if vocab_size > MAX_VOCAB:
        raise DataError(f"{what} has {vocab_size} pieces; shard token ids are uint16 (at most {MAX_VOCAB} pieces)")
    if vocab_size <= 0:
        raise DataError(f"{what} has no pieces")


def train_sentencepiece(texts: Iterable[str], out: Path, vocab_size: int, max_doc_bytes: int = 4192,
                        threads: int = 0, user_symbols: tuple[str, ...] = ()) -> dict:
    """Train a BPE model on ``texts`` and write it to ``out`` (atomically); return what it was trained on.

    ``user_symbols``: characters that must each be one piece, never merged (a text transform's operators; they
    take the ids after pad/bos/eos/unk, as in the records' CaseOps tokenizer)."""
    import sentencepiece as spm
    check_vocab(vocab_size, "the requested tokenizer")
    if vocab_size < MIN_VOCAB + len(user_symbols):
        raise DataError(f"sp_vocab_size={vocab_size} is too small: byte fallback alone needs {MIN_VOCAB} pieces"
                        + (f", and the transform's operators {len(user_symbols)} more" if user_symbols else ""))
    stats = {"docs": 0, "bytes": 0, "docs_too_long": 0}

    def counted() -> Iterable[str]:
        for text in texts:
            n = len(text.encode("utf-8"))
            stats["docs"] += 1
            stats["bytes"] += n
            stats["docs_too_long"] += n > max_doc_bytes
            yield text

    proto = _Writer()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(), model_writer=proto, vocab_size=vocab_size,
            max_sentence_length=max_doc_bytes, num_threads=threads or os.cpu_count() or 1,
            minloglevel=1, **OFFICIAL_TRAINER, **({"user_defined_symbols": list(user_symbols)} if user_symbols else {}))
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed on {stats['docs']} documents: {e}") from None
    if stats["docs"] == 0:
        raise DataError("no training documents to train the tokenizer on")
    part = out.with_name(out.name + ".part")
    part.write_bytes(proto.data)
    os.replace(part, out)
    return stats


class _Writer:
    """The model_writer SentencePiece hands the serialized model to."""

    data = b""

    def write(self, data: bytes) -> None:
        self.data = data
