"""The tokenize stage's libraries: document readers, parallel encoding, published-shard import and download,
SentencePiece training, and ``Dataset``, the reader of a tokenize artifact that the other stages use.
They import the core (the shard format, byte counting) and the store, never a stage.
"""
