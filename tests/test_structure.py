"""The layout's promises (README, "Layout"): each version's equations are one pair of functions that
every path calls, one function decides the path, and the package's imports have no circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import rwkv_hf  # noqa: F401
from rwkv_hf.modeling import modeling_rwkv4, modeling_rwkv5, modeling_rwkv6, modeling_rwkv7
from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD
from rwkv_hf.testing import build_model, make_state_dict

SRC = Path(__file__).resolve().parents[1] / "src"
MATH = {"4": (modeling_rwkv4, modeling_rwkv4), "5.2": (modeling_rwkv5, modeling_rwkv4),
        "6": (modeling_rwkv6, modeling_rwkv6), "7": (modeling_rwkv7, modeling_rwkv7)}


def _imports(tree: ast.AST, module: str, is_package: bool, known: set) -> set:
    """Every module of the package that `module` imports, at the top or inside a function."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != module}


def test_no_import_circles():
    files = {}
    for f in (SRC / "rwkv_hf").rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = f
    graph = {m: _imports(ast.parse(f.read_text()), m, f.name == "__init__.py", set(files)) for m, f in files.items()}
    # depth-first search for a path back to where it started
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == [], circles


def test_only_rwkv_paths_reads_the_path_settings():
    """wkv_mode, cuda_graph_decode, compile_decode, triton_decode and fla's presence are read in one place."""
    settings = {"wkv_mode", "cuda_graph_decode", "compile_decode", "triton_decode", "HAVE_FLA"}
    readers = set()
    for f in (SRC / "rwkv_hf").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            read = (isinstance(node, ast.Attribute) and node.attr in settings) or (
                isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr" and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in settings)
            if read:
                readers.add(f.name)
    # (the config defines them; the benchmarks and tests set them)
    assert readers <= {"rwkv_paths.py", "configuration_rwkv_base.py"}, readers


@pytest.mark.parametrize("version", list(MATH))
def test_every_path_calls_the_versions_functions(version, monkeypatch):
    """The modules' forward (a prompt) and a decode step (one token per row: `rwkv_decode.model_step`,
    which the compiled and captured steps run too) both compute the version's `time_mix` and
    `channel_mix`, once per layer; replace one and both paths change."""
    model = build_model(make_state_dict(version, n_layer=2, n_embd=64, seed=3))
    att_module, ffn_module = MATH[version]
    calls = []
    for module, name in ((att_module, "time_mix"), (ffn_module, "channel_mix")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _r=real: calls.append((_n, a[1].shape[1])) or _r(*a))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
        assert sorted(calls) == [("channel_mix", 4)] * 2 + [("time_mix", 4)] * 2
        calls.clear()
        model(torch.tensor([[9]]), cache=cache, use_cache=True)  # a decode step
        assert sorted(calls) == [("channel_mix", 1)] * 2 + [("time_mix", 1)] * 2
        monkeypatch.setattr(att_module, "time_mix", lambda p, x, shift, *a, **k: (torch.zeros_like(x), x[:, -1], a[0], a[1]))
        zero = model(torch.tensor([[9]]), cache=cache.clone(), use_cache=True).logits
        through_modules = model(torch.tensor([[9, 9]]), cache=cache.clone(), use_cache=True).logits[:, :1]
    assert torch.allclose(zero, through_modules, atol=1e-5)
