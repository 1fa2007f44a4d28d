"""train_gpt.py: the program that ships with an artifact, and its exact byte count.

The program is the core package's modules that ``gpt.program`` reaches (found by their imports, lazy ones too),
each minified (docstrings and comments dropped by an AST round trip) and embedded as a string behind a small
module loader that serves them as the package ``gpt`` (so relative imports, dataclasses and tracebacks work as
they do from disk), then the run's resolved configs as data (``CONFIG``) and the call of ``gpt.program.main``.
The whole is compressed with lzma and wrapped in a two-line self-extracting stub, as the records do. The stub's
bytes are the code bytes that count towards the 16,000,000-byte cap: the quantize stage counts them and
``golf submit`` ships them as train_gpt.py.
"""

from __future__ import annotations

import ast
import base64
import json
import lzma
from pathlib import Path

from artifacts.runner import AST_LOCK

from gpt import program  # noqa: F401  the shipped modules (all that it imports): in quantize's code digest

CORE_DIR = Path(__file__).resolve().parent.parent / "gpt"
ENTRY = "program"

# serves the embedded SOURCES as the package gpt, ahead of anything on sys.path
LOADER = '''import sys, linecache, importlib.abc, importlib.util
class _Core(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "gpt" or (name.startswith("gpt.") and name[4:] in SOURCES):
            return importlib.util.spec_from_loader(name, self, is_package=name == "gpt")
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        src = SOURCES.get(module.__name__[4:], "")
        module.__file__ = fn = "train_gpt.py/" + module.__name__.replace(".", "/") + ".py"
        linecache.cache[fn] = (len(src), None, src.splitlines(True), fn)
        exec(compile(src, fn, "exec"), module.__dict__)
sys.meta_path.insert(0, _Core())
'''


def core_imports(name: str) -> set[str]:
    """The core modules one core module imports (relative or as gpt.x, at the top or inside functions)."""
    tree = ast.parse((CORE_DIR / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y, from . import x
            found.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gpt."):
            found.add(node.module[4:])
        elif isinstance(node, ast.ImportFrom) and node.module == "gpt":  # from gpt import x
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name[4:] for a in node.names if a.name.startswith("gpt."))
    return {m.split(".")[0] for m in found if (CORE_DIR / f"{m.split('.')[0]}.py").exists()}


def shipped_modules(entry: str = ENTRY) -> list[str]:
    """Every core module the entry reaches, sorted (the loader imports them on demand, so order is free)."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(core_imports(name))
    return sorted(seen)


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


_MINIFIED: dict[tuple[str, str], str] = {}


def minified_modules() -> dict[str, str]:
    """Each shipped module minified, once per process and source text (a sweep assembles many programs)."""
    out = {}
    for name in shipped_modules():
        text = (CORE_DIR / f"{name}.py").read_text()
        if (name, text) not in _MINIFIED:
            _MINIFIED[(name, text)] = minify(text)
        out[name] = _MINIFIED[(name, text)]
    return out


def program_source(config: dict) -> str:
    """The program before wrapping: the minified modules, the loader, the configs, the call of main."""
    sources = minified_modules()
    return (f"SOURCES = {sources!r}\n{LOADER}"
            f"CONFIG = json.loads({json.dumps(config, sort_keys=True, separators=(',', ':'))!r})\n"
            f"if __name__ == '__main__':\n    from gpt.{ENTRY} import main\n    main(CONFIG)\n").replace(
        "import sys, linecache", "import json, sys, linecache", 1)


def wrap(source: str) -> str:
    """A self-extracting stub: lzma + base85, exec'd with __name__ (and __file__) preserved."""
    packed = base64.b85encode(lzma.compress(source.encode(), preset=9 | lzma.PRESET_EXTREME)).decode()
    return f'import lzma,base64\nexec(lzma.decompress(base64.b85decode("{packed}")))\n'


_CACHE: dict[str, tuple[str, str]] = {}


def shipped_code(config: dict | None = None) -> tuple[str, str]:
    """(the program unwrapped, the wrapped train_gpt.py that ships) for a run's configs: a dict with train,
    average, quantize, eval (each a config as a dict; a missing one runs with its defaults) and data (the
    dataset's and tokenizer's names under ./data).

    Built once per process, source text and config, under a lock: quantize tasks run in parallel threads (the
    sweep flow), and CPython 3.11's AST constructor is not safe to use from several threads at once."""
    config = config or {"train": {}, "quantize": {}, "data": {"dataset": "fineweb10B_sp1024",
                                                             "tokenizer": "fineweb_1024_bpe.model"}}
    with AST_LOCK:  # the project's one parsing lock: code digests parse under it too
        src = program_source(config)
        if src not in _CACHE:
            _CACHE[src] = (src, wrap(src))
        return _CACHE[src]
