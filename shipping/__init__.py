"""The shipped program's assembly: the core's modules concatenated, minified and wrapped into the code whose
bytes count against the cap (quantize counts them; submit writes them)."""
