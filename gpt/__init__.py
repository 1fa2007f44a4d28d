"""The core: everything that ships in the submission's train_gpt.py (model, optimizer, kernels, shard reading,
the training loop, averaging, quantization and the weights codec, scoring, test-time training).

It imports only the standard library, torch, numpy, sentencepiece and optional accelerators and compressors,
never the pipeline (artifacts, stages, tokenizing, runtime, shipping, golf, flows), so its modules can be
concatenated into one file. This file imports nothing: a stage's code digest covers it.
"""
