"""A tokenize artifact as downstream stages see it: vocabulary, shard paths, tokenizer file.

Kept apart from the tokenize stage's own code so that a change in how documents are tokenized changes
downstream keys only through the tokenize artifact's key, not through their code digests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from artifacts import Artifact


class DatasetError(ValueError):
    pass


@dataclass
class Dataset:
    """A tokenize artifact seen from downstream stages."""

    artifact: Artifact
    info: dict

    @classmethod
    def open(cls, artifact: Artifact) -> "Dataset":
        if artifact.stage != "tokenize":
            raise DatasetError(f"artifact {artifact.key} is a {artifact.stage} artifact, not tokenize")
        return cls(artifact, json.loads(artifact.file("dataset.json").read_text()))

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    @property
    def bos_id(self) -> int:
        return self.info["bos_id"]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.artifact.file(n) for n in self.info["shards"][split]]

    @property
    def tokenizer_path(self) -> Path:
        return self.artifact.file(self.info["tokenizer_file"])

    def val_stream(self, max_tokens: int = 0):
        """(val tokens, UTF-8 bytes of the scored targets tokens[1:]) by the tokenizer's piece table."""
        import sentencepiece as spm
        from gpt.bpb import piece_tables, token_bytes
        from gpt.shards import load_split
        tokens = load_split(self.shard_paths("val"))
        if max_tokens:
            tokens = tokens[:max_tokens]
        tables = piece_tables(spm.SentencePieceProcessor(model_file=str(self.tokenizer_path)))
        return tokens, int(token_bytes(tokens[1:], tables, prev=tokens[:-1]).sum())
