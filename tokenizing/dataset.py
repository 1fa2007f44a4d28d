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

    @property
    def transform(self) -> str:
        """The text transform the documents were tokenized through (artifacts from before transforms: none)."""
        return self.info.get("transform", "none")

    def transform_ids(self) -> tuple[list[int], int]:
        """The transform's operator token ids and its escape id (-1: none) in this artifact's tokenizer."""
        import sentencepiece as spm
        from tokenizing import transforms
        sp = spm.SentencePieceProcessor(model_file=str(self.tokenizer_path))
        return transforms.operator_ids(sp, transforms.get(self.transform))

    def val_token_bytes(self):
        """The tokenize stage's byte sidecar: original UTF-8 bytes per val token (uint16, BOS 0)."""
        import numpy as np
        return np.load(self.artifact.file("val_token_bytes.npy"))

    def val_stream(self, max_tokens: int = 0):
        """(val tokens, UTF-8 bytes of the scored targets tokens[1:]): by the tokenizer's piece table, or with a
        transform the original bytes of the sidecar."""
        import sentencepiece as spm
        from gpt.bpb import piece_tables, token_bytes
        from gpt.shards import load_split
        tokens = load_split(self.shard_paths("val"))
        if max_tokens:
            tokens = tokens[:max_tokens]
        if self.transform != "none":
            return tokens, int(self.val_token_bytes()[1:len(tokens)].astype("int64").sum())
        tables = piece_tables(spm.SentencePieceProcessor(model_file=str(self.tokenizer_path)))
        return tokens, int(token_bytes(tokens[1:], tables, prev=tokens[:-1]).sum())
