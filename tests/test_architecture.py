"""The house rules, file to file, read from the code's own imports (every import, also those inside functions).

    gpt/          the core that ships in train_gpt.py: the standard library, torch, numpy, triton and optional
                  accelerators, compressors and the tokenizer library; nothing of the pipeline
    tokenizing/   tokenize's libraries; runtime/ process helpers; shipping/ the shipped program's assembly:
                  the core and the store, never a stage, golf or flows
    artifacts/    the store, the stage runner, config parsing, the torchrun worker entry: runtime and the
                  core's standard-library modules (disk errors) only
    reporting/    the run report's page (the compliance stage writes it, golf report too): the store, the core,
                  tokenizing's Dataset; never a stage, golf or flows
    stages/       exactly the six stages; none imports another stage, golf or flows
    flows/        Prefect wiring: the config, the DAG, the stages and the store, never the CLI
    golf/cli.py   the top: nothing imports it

and no import circle anywhere. This test is the rules' home: README's Layout section describes them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from artifacts.runner import _parse_imports

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gpt", "tokenizing", "runtime", "shipping", "reporting", "stages", "artifacts", "golf", "flows")
STAGE_MODULES = {"stages.tokenize", "stages.train", "stages.average", "stages.quantize", "stages.evaluate",
                 "stages.compliance"}
CORE_THIRD_PARTY = {"torch", "numpy", "triton", "flash_attn", "flash_attn_interface", "brotli", "zstandard",
                    "sentencepiece", "tqdm"}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(p)] = p
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules, other top-level packages) that a file imports, anywhere in it (read as the code
    digest reads them: artifacts.runner's parser)."""
    found = _parse_imports(path, name)
    project, other = set(), set()
    for m in found:
        while m and m not in known and "." in m:
            m = m.rpartition(".")[0]
        if m in known:
            if m != name:
                project.add(m)
        else:
            other.add(m.split(".")[0])
    return project, other


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = project_files()
    edges, third = {}, {}
    for name, path in known.items():
        edges[name], third[name] = imports_of(name, path, known)
    return edges, third


def top(m: str) -> str:
    return m.split(".")[0]


def test_the_core_imports_nothing_of_the_pipeline():
    edges, third = graph()
    bad = []
    for m, deps in edges.items():
        if top(m) != "gpt":
            continue
        bad += [f"{m} -> {d}" for d in deps if top(d) != "gpt"]
        bad += [f"{m} -> {t} (third party)" for t in third[m] - STDLIB - CORE_THIRD_PARTY]
    assert not bad, bad


def test_stages_are_exactly_the_six_and_none_imports_another_stage_golf_or_flows():
    edges, _ = graph()
    modules = {m for m in edges if top(m) == "stages" and m != "stages"}
    assert modules == STAGE_MODULES
    bad = [f"{m} -> {d}" for m in modules for d in edges[m]
           if d in STAGE_MODULES or top(d) in ("golf", "flows")]
    assert not bad, bad


def test_libraries_and_the_store_stay_below_the_stages():
    edges, _ = graph()
    below = {"tokenizing": {"gpt", "artifacts", "tokenizing"}, "runtime": {"gpt", "runtime"},
             "shipping": {"gpt", "artifacts", "shipping", "runtime"}, "artifacts": {"artifacts", "runtime", "gpt"},
             "reporting": {"reporting", "artifacts", "gpt", "tokenizing"}}
    bad = [f"{m} -> {d}" for m, deps in edges.items() if top(m) in below for d in deps if top(d) not in below[top(m)]]
    assert not bad, bad
    # the store reads only standard-library modules of the core (the disk-error rules): `golf artifacts` stays light
    _, third = graph()
    heavy = [f"{m} -> {d} ({', '.join(sorted(third[d] - STDLIB))})" for m, deps in edges.items()
             if top(m) == "artifacts" for d in deps if top(d) == "gpt" and third[d] - STDLIB]
    assert not heavy, heavy


def test_flows_never_import_the_cli_and_nothing_imports_the_cli():
    edges, _ = graph()
    bad = [f"{m} -> golf.cli" for m, deps in edges.items() if "golf.cli" in deps and m != "golf.__main__"]
    assert not bad, bad
    bad = [f"{m} -> {d}" for m, deps in edges.items() if top(m) == "flows" for d in deps
           if top(d) not in ("flows", "golf", "stages", "artifacts", "shipping")]
    assert not bad, bad


def test_no_import_circle_file_to_file():
    edges, _ = graph()
    # a package's __init__ re-exporting its own modules is not a circle of the house: drop edges to a parent package
    deps = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in edges.items()}
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(deps[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(deps):
        if v not in index:
            strongconnect(v)
    assert not cycles, cycles
