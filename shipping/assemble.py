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

# serves the embedded SOURCES as the package gpt (PACKAGES: its subpackages, such as kernels), ahead of anything
# on sys.path
LOADER = '''import sys, linecache, importlib.abc, importlib.util
class _Core(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "gpt" or (name.startswith("gpt.") and name[4:] in SOURCES):
            return importlib.util.spec_from_loader(name, self, is_package=name == "gpt" or name[4:] in PACKAGES)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        name = module.__name__[4:]
        src = SOURCES.get(name, "")
        path = module.__name__.replace(".", "/") + ("/__init__" if name in PACKAGES else "")
        module.__file__ = fn = "train_gpt.py/" + path + ".py"
        linecache.cache[fn] = (len(src), None, src.splitlines(True), fn)
        exec(compile(src, fn, "exec"), module.__dict__)
sys.meta_path.insert(0, _Core())
'''


def module_file(name: str) -> Path | None:
    """The source of a core module by its dotted name under gpt (``model``, ``kernels``, ``kernels.softcap_ce``)."""
    base = CORE_DIR.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def is_package(name: str) -> bool:
    path = module_file(name)
    return path is not None and path.name == "__init__.py"


def core_imports(name: str) -> set[str]:
    """The core modules one core module imports (relative or as gpt.x, at the top or inside functions), with
    the packages above each (importing gpt.kernels.x runs gpt/kernels/__init__.py first)."""
    tree = ast.parse(module_file(name).read_text())
    package = name.split(".") if is_package(name) else name.split(".")[:-1]  # relative to gpt
    candidates = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:  # from .x import y, from . import x, from ..x
            if node.level - 1 > len(package):
                continue
            base = package[:len(package) - (node.level - 1)]
            mod = base + (node.module.split(".") if node.module else [])
            candidates += [mod] + [mod + [a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gpt":  # from gpt(.x) import
            mod = node.module.split(".")[1:]
            candidates += [mod] + [mod + [a.name] for a in node.names]
        elif isinstance(node, ast.Import):
            candidates += [a.name.split(".")[1:] for a in node.names if a.name.startswith("gpt.")]
    found = set()
    for parts in candidates:
        for i in range(1, len(parts) + 1):
            if module_file(".".join(parts[:i])) is not None:
                found.add(".".join(parts[:i]))
    return found


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
        text = module_file(name).read_text()
        if (name, text) not in _MINIFIED:
            _MINIFIED[(name, text)] = minify(text)
        out[name] = _MINIFIED[(name, text)]
    return out


def program_source(config: dict) -> str:
    """The program before wrapping: the minified modules, the loader, the configs, the call of main."""
    sources = minified_modules()
    packages = sorted(n for n in sources if is_package(n))
    # after a run, leave without destructors: torch.distributed's can deadlock at exit (gpt.training.KEEP_UNTIL_EXIT)
    return (f"SOURCES = {sources!r}\nPACKAGES = {set(packages) or 'set()'!r}\n{LOADER}"
            f"CONFIG = json.loads({json.dumps(config, sort_keys=True, separators=(',', ':'))!r})\n"
            f"if __name__ == '__main__':\n    from gpt.{ENTRY} import main\n    main(CONFIG)\n"
            f"    import logging, os\n    logging.shutdown(); sys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n"
            ).replace("import sys, linecache", "import json, sys, linecache", 1)


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
