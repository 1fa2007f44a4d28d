"""The code that ships with an artifact, and its exact byte count.

The shipped program is the shipped modules concatenated in dependency order (their relative imports
removed), minified (docstrings and comments dropped by an AST round trip), compressed with lzma and
wrapped in a two-line self-extracting stub, as the records do. The stub's bytes are the code bytes
that count towards the 16,000,000-byte cap.
"""

from __future__ import annotations

import ast
import base64
import lzma
import re
from pathlib import Path

from artifacts.runner import AST_LOCK

from gpt import bpb, distributed, model, quant, scoring, shards, shipped_eval, ttt  # noqa: F401  the shipped modules: in quantize's code digest

CORE_DIR = Path(__file__).resolve().parent.parent / "gpt"
# dependency order: each module only uses names defined by those before it
SHIPPED_MODULES = ("shards", "bpb", "quant", "model", "scoring", "ttt", "distributed", "shipped_eval")
_RELATIVE_IMPORT = re.compile(r"^from \.[\w.]* import \(?[\w, \n]*\)?$", re.M)


def assemble_source(modules: tuple[str, ...] = SHIPPED_MODULES) -> str:
    """One readable Python file holding the shipped modules."""
    parts = ["from __future__ import annotations\n"]
    for name in modules:
        src = (CORE_DIR / f"{name}.py").read_text()
        src = src.replace("from __future__ import annotations\n", "")
        src = _RELATIVE_IMPORT.sub("", src)
        src = src.replace('\nif __name__ == "__main__":\n    main()\n', "\n") if name != modules[-1] else src
        parts.append(f"# ---- {name}.py ----\n{src.strip()}\n")
    return "\n".join(parts)


def minify(source: str) -> str:
    """Drop docstrings and comments (ast.unparse keeps code only); behaviour is unchanged."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def wrap(source: str) -> str:
    """A self-extracting stub: lzma + base85, exec'd with __name__ preserved."""
    packed = base64.b85encode(lzma.compress(source.encode(), preset=9 | lzma.PRESET_EXTREME)).decode()
    return f'import lzma,base64\nexec(lzma.decompress(base64.b85decode("{packed}")))\n'


_CACHE: dict[str, tuple[str, str]] = {}


def shipped_code() -> tuple[str, str]:
    """(readable source, the wrapped program that ships).

    Built once per process and source text, under a lock: quantize tasks run in parallel threads (the sweep
    flow), and CPython 3.11's AST constructor is not safe to use from several threads at once.
    """
    with AST_LOCK:  # the project's one parsing lock: code digests parse under it too
        src = assemble_source()
        if src not in _CACHE:
            _CACHE[src] = (src, wrap(minify(src)))
        return _CACHE[src]
