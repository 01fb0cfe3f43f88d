"""How the package is layered: CUDA arrays are refused clearly by every public function that
cannot run them, and the modules of topkattn/ import each other in one direction only."""
import ast
import os

import numpy as np
import pytest

import topkattn
from topkattn import _gpu

PACKAGE = os.path.dirname(os.path.abspath(topkattn.__file__))
LEAVES = ("_args", "_errors", "_results")
EXTENSIONS = ("topkattn._core", "topkattn._cuda")  # compiled; _cuda may be absent


class FakeCudaArray:
    """Claims to live on CUDA device 0 through DLPack; holds no data."""
    shape = (4, 4)

    def __dlpack_device__(self):
        return (2, 0)


class FakeCaiArray:
    shape = (4, 4)
    __cuda_array_interface__ = {"shape": (4, 4), "typestr": "<f4", "data": (0, False),
                                "version": 3}


# ----------------------------------------------------------------- CUDA arrays, CPU only

X = np.zeros((2, 4))
Q = np.zeros((2, 3))
KV = np.zeros((5, 3))
CPU_ONLY = [
    ("kl_truncated", "logits", lambda g: topkattn.kl_truncated(g, 1)),
    ("tv_curve", "logits", lambda g: topkattn.tv_curve(g)),
    ("gap_bound", "logits", lambda g: topkattn.gap_bound(g, 1)),
    ("multigap_bound", "logits", lambda g: topkattn.multigap_bound(g, 1)),
    ("block_bound", "block_upper", lambda g: topkattn.block_bound(g, [1], 1.0, 2.0)),
    ("block_bound", "kept_mass", lambda g: topkattn.block_bound([0.0], [1], g, 2.0)),
    ("fit_gaussian", "logits", lambda g: topkattn.fit_gaussian(g)),
    ("entropy", "logits", lambda g: topkattn.entropy(g)),
    ("effective_support", "logits", lambda g: topkattn.effective_support(g, 0.1)),
    ("effective_support", "threshold", lambda g: topkattn.effective_support(X, g)),
    ("norm_cdf", "x", lambda g: topkattn.norm_cdf(g)),
    ("norm_sf", "x", lambda g: topkattn.norm_sf(g)),
    ("norm_ppf", "p", lambda g: topkattn.norm_ppf(g)),
    ("norm_isf", "p", lambda g: topkattn.norm_isf(g)),
    ("gaussian_tail_mass", "sigma", lambda g: topkattn.gaussian_tail_mass(0.1, g)),
    ("gaussian_k_eps", "n", lambda g: topkattn.gaussian_k_eps(g, 1.0, 0.1)),
    ("attention", "Q", lambda g: topkattn.attention(g, KV, KV)),
    ("attention", "mask", lambda g: topkattn.attention(Q, KV, KV, mask=g)),
    ("attention_error", "K", lambda g: topkattn.attention_error(Q, g, KV, k=1)),
    ("attention_matrix_error", "Q", lambda g: topkattn.attention_matrix_error(g, KV, 1)),
    ("dynamic_k", "n", lambda g: topkattn.dynamic_k(g, 1.0, 0.5)),
    ("KeyIndex", "K", lambda g: topkattn.KeyIndex(g)),
    ("certified_search", "q", lambda g: topkattn.certified_search(g, topkattn.KeyIndex(KV),
                                                                  0.1)),
    ("certified_attention", "V", lambda g: topkattn.certified_attention(
        Q, topkattn.KeyIndex(KV), g, 0.1)),
    ("KeyIndex.append", "new_keys", lambda g: topkattn.KeyIndex(KV).append(g)),
]


@pytest.mark.parametrize("fake", [FakeCudaArray, FakeCaiArray])
@pytest.mark.parametrize("func, arg, call", CPU_ONLY, ids=[f"{f}-{a}" for f, a, _ in CPU_ONLY])
def test_cpu_only_functions_refuse_cuda_arrays_by_name(func, arg, call, fake, monkeypatch):
    monkeypatch.setenv(_gpu.ENV_OPT_IN, "1")
    with pytest.raises(TypeError) as exc:
        call(fake())
    msg = str(exc.value)
    assert msg.startswith(f"{arg} is a CUDA array; {func} runs on the CPU only")
    assert f"{arg}.cpu()" in msg


@pytest.mark.parametrize("call", [
    lambda g: topkattn.tail_mass(X, g),
    lambda g: topkattn.k_eps(X, g),
    lambda g: topkattn.topk_attention(Q, KV, KV, k=g),
    lambda g: topkattn.topk_attention(Q, KV, KV, k=1, mask=g),
])
def test_cuda_parameter_next_to_cpu_operands_is_refused(call, monkeypatch):
    monkeypatch.setenv(_gpu.ENV_OPT_IN, "1")
    with pytest.raises(TypeError, match=r"is a CUDA array but .* not; .*\.cpu\(\)"):
        call(FakeCudaArray())


def test_dispatch_keeps_names_and_docs():
    for f in (topkattn.tail_mass, topkattn.kl_truncated, topkattn.topk_attention):
        assert f.__doc__ and f.__name__ in repr(f) and f.__module__.startswith("topkattn.")


# ----------------------------------------------------------------- import structure

def _modules():
    """module name -> (path, is package) for every .py file under topkattn/."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))
            parts = rel[:-3].split(os.sep)
            pkg = parts[-1] == "__init__"
            if pkg:
                parts = parts[:-1]
            out[".".join(parts)] = (os.path.join(root, f), pkg)
    return out


def _targets(node, module, is_pkg, modules):
    """The topkattn modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "topkattn"]
    if node.level == 0:
        base = node.module or ""
        if base.split(".")[0] != "topkattn":
            return []
    else:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in modules or sub in EXTENSIONS else base)
    return out


def _imports(modules):
    """module -> (module-level topkattn imports, [(line, function-level topkattn import)])."""
    result = {}
    for name, (path, is_pkg) in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        top, nested = set(), []

        def visit(node, depth):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    t = _targets(child, name, is_pkg, modules)
                    if depth:
                        nested.extend((child.lineno, x) for x in t)
                    else:
                        top.update(t)
                inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                           ast.ClassDef))
                visit(child, depth + inner)

        visit(tree, 0)
        top.discard(name)
        result[name] = (top & set(modules), nested)
    return result


def test_no_function_level_imports_of_sibling_modules():
    found = [f"{m}:{line} imports {t}" for m, (_, nested) in _imports(_modules()).items()
             for line, t in nested]
    assert not found, found


def test_no_import_cycles():
    graph = {m: top for m, (top, _) in _imports(_modules()).items()}
    state = {}

    def walk(m, path):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                walk(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])


def test_leaf_modules_import_nothing_of_ours():
    imports = _imports(_modules())
    for leaf in LEAVES:
        top, nested = imports[f"topkattn.{leaf}"]
        assert not top and not nested, (leaf, top, nested)


def test_backends_do_not_import_their_callers():
    top, _ = _imports(_modules())["topkattn._gpu"]
    assert top <= {f"topkattn.{m}" for m in LEAVES}, top
