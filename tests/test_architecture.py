"""The architecture's rules, checked on the source.

* Tiers import one way: kernels (ops) < glassbrain (shared) < bdh, bsbr, baselines (layers and
  models) < experiments, serve (which nothing imports). The three model packages may use each
  other's public names (`from bdh import BDHAttention`, as MixerLM does), never their
  internals (`from bdh.hf import ...`).
* Launch choices are arguments of a call, never module state that a benchmark or test mutates:
  no public module-level name is bound to a mutable container (dict, list, set: what
  `DF_LAUNCH = {}` style pins were), and no module reads an environment variable at import
  other than TRITON_INTERPRET (which Triton itself reads at import). Private per-process memos
  (`_NAME`, e.g. a cache of device buffers) are not launch choices."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
LIBRARY = ("kernels", "glassbrain", "bdh", "bsbr", "baselines", "serve")
MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict"}


def library_files():
    for pkg in LIBRARY:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(folder, name), ROOT)


def _is_mutable(value) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    if isinstance(value, ast.Call):
        fn = value.func
        name = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", None)
        return name in MUTABLE_CALLS
    return False


def module_level_offences(source: str) -> list[str]:
    found = []
    for node in ast.parse(source).body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        for t in targets:
            if isinstance(t, ast.Name) and not t.id.startswith("_") and t.id != "__all__" \
                    and _is_mutable(value):
                found.append(f"line {node.lineno}: {t.id} is a mutable module-level container")
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef,
                                                            ast.AsyncFunctionDef)) else ():
            if isinstance(sub, ast.Attribute) and sub.attr in ("environ", "getenv") \
                    and isinstance(sub.value, ast.Name) and sub.value.id == "os":
                text = ast.get_source_segment(source, node) or ""
                if "TRITON_INTERPRET" not in text:
                    found.append(f"line {node.lineno}: reads the environment at import")
                break
    return found


def test_the_scan_catches_a_launch_pin():
    assert module_level_offences("DF_LAUNCH: dict = {}\n")
    assert module_level_offences("ROUTING = dict(prec='ieee')\n")
    assert module_level_offences("import os\nMODE = os.environ.get('X', 'a')\n")
    assert not module_level_offences("_MEMO: dict = {}\nMAX = 128\nNAMES = ('a', 'b')\n")
    assert not module_level_offences("import os\nINTERPRET = os.environ.get('TRITON_INTERPRET')\n")


@pytest.mark.parametrize("path", sorted(library_files()))
def test_no_mutable_module_state(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        offences = module_level_offences(f.read())
    assert not offences, f"{path}: " + "; ".join(offences)


# ----------------------------------------------------------------------------- tiers
ALLOWED = {            # package -> our packages it may import
    "kernels": set(),
    "glassbrain": {"kernels"},
    "bdh": {"kernels", "glassbrain"},
    "bsbr": {"kernels", "glassbrain"},
    "baselines": {"kernels", "glassbrain"},
    "serve": {"kernels", "glassbrain", "bdh", "bsbr", "baselines"},
}
OURS = set(ALLOWED) | {"experiments"}


MODEL_PACKAGES = {"bdh", "bsbr", "baselines"}


def imported_modules(source: str) -> set[str]:
    """The modules of ours that ``source`` imports, dotted ("bdh", "bdh.hf"); absolute imports
    only (relative imports stay inside the package)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in OURS}


def tier_offences(own: str, modules: set[str]) -> list[str]:
    bad = []
    for m in sorted(modules):
        top = m.split(".")[0]
        if top == own or top in ALLOWED[own]:
            continue
        if own in MODEL_PACKAGES and top in MODEL_PACKAGES and m == top:
            continue                       # a sibling model package's public names
        bad.append(m)
    return bad


def test_the_tier_scan_sees_imports():
    assert imported_modules("import bdh.hf\nfrom kernels import x\nimport torch\n") == \
        {"bdh.hf", "kernels"}
    assert imported_modules("from .hf import y\n") == set()
    assert tier_offences("baselines", {"bdh", "kernels.bsbr"}) == []
    assert tier_offences("bsbr", {"bdh.hf"}) == ["bdh.hf"]
    assert tier_offences("kernels", {"glassbrain.checks"}) == ["glassbrain.checks"]
    assert tier_offences("bdh", {"experiments"}) == ["experiments"]


@pytest.mark.parametrize("path", sorted(library_files()))
def test_imports_follow_the_tiers(path):
    own = path.split(os.sep)[0]
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        bad = tier_offences(own, imported_modules(f.read()))
    assert not bad, (f"{path} ({own}) imports {bad}: outside its tier (it may import "
                     f"{sorted(ALLOWED[own])}, and a sibling model package's root only)")
