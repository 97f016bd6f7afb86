"""The import direction of the two Python packages (issue 23): each
subpackage imports only those below it, so the architecture can be read
from the folders. A walk over every ``import`` statement, nothing more.

kgpu_helper, top to bottom: cli; bench and serve (siblings: neither
imports the other); rings; services; cuda and native (siblings).
kgpu_testbed: cli; demo; the package's own face (its __init__, which
re-exports the harness's Testbed); harness. kgpu_testbed imports nothing
of kgpu_helper, and of kgpu_testbed only kgpu_helper's cli imports (for
``kgpu testbed`` and ``kgpu demo``).
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: package -> (folder, {layer: rank}); a module may import its own layer
#: and any layer of a lower rank, nothing else. The package's own
#: __init__ (layer "") sits where its imports put it.
PACKAGES = {
    "kgpu_helper": ("helper", {
        "cli": 6, "bench": 5, "serve": 5, "rings": 4, "services": 3,
        "cuda": 2, "native": 2, "": 1}),
    "kgpu_testbed": ("testbed", {
        "cli": 4, "demo": 3, "": 2, "harness": 1}),
}
#: the only imports from one package into the other
CROSS = {("kgpu_helper", "cli"): {("kgpu_testbed", "cli")}}


def layer_of(package, parts):
    """The layer of module ``package.parts...``: its first part when that
    names a layer (a subpackage, or a top-level module such as
    kgpu_testbed.cli), else "" (the package itself)."""
    layers = PACKAGES[package][1]
    return parts[0] if parts and parts[0] in layers else ""


def imports(path, module):
    """The absolute names a file imports (relative ones resolved against
    ``module``, the dotted name of the file)."""
    tree = ast.parse(open(path).read(), path)
    base = module.split(".")
    if not path.endswith("__init__.py"):
        base = base[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base[:len(base) - node.level + 1]
                name = ".".join(up + ([node.module] if node.module else []))
            else:
                name = node.module
            # "from pkg import sub": sub may be a module of pkg
            for a in node.names:
                yield f"{name}.{a.name}"


def violations(root=ROOT):
    """Every import that goes up, sideways between siblings, or across
    packages where CROSS does not allow it, as readable lines."""
    bad = []
    for pkg, (folder, layers) in PACKAGES.items():
        top = os.path.join(root, folder)
        for dirpath, _, files in os.walk(top):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, top)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                src = layer_of(pkg, rel)
                module = ".".join([pkg] + rel)
                for name in imports(path, module):
                    parts = name.split(".")
                    dst_pkg = parts[0]
                    if dst_pkg not in PACKAGES:
                        continue
                    dst = layer_of(dst_pkg, parts[1:])
                    if dst_pkg != pkg:
                        if (dst_pkg, dst) not in CROSS.get((pkg, src), ()):
                            bad.append(f"{module} imports {name}: "
                                       f"{pkg} may not import {dst_pkg}")
                        continue
                    if dst == src:
                        continue
                    if layers[dst] >= layers[src]:
                        bad.append(f"{module} ({src or pkg}) imports {name} "
                                   f"({dst or pkg}): not below it")
    return bad


def test_every_import_goes_down():
    assert violations() == []


def test_every_subpackage_has_a_place():
    """A new subpackage must be given a layer before it can be used."""
    for pkg, (folder, layers) in PACKAGES.items():
        top = os.path.join(ROOT, folder)
        for d in sorted(os.listdir(top)):
            if os.path.exists(os.path.join(top, d, "__init__.py")):
                assert d in layers, f"{pkg}.{d} has no layer in PACKAGES"


def test_each_subpackage_says_what_it_holds():
    for pkg, (folder, layers) in PACKAGES.items():
        for layer in layers:
            init = os.path.join(ROOT, folder, layer, "__init__.py")
            if not os.path.exists(init):
                continue  # a module (kgpu_testbed.cli), not a package
            doc = ast.get_docstring(ast.parse(open(init).read()))
            assert doc and len(doc) > 80, f"{init} has no docstring"
            if layer:
                assert "import" in doc.lower(), \
                    f"{init}: its docstring says nothing of what it may import"


@pytest.mark.parametrize("src,dst,line", [
    ("helper/rings/x.py", "from kgpu_helper.serve import daemon",
     "kgpu_helper.rings.x (rings) imports kgpu_helper.serve.daemon"),
    ("helper/serve/x.py", "import kgpu_helper.bench.ring",
     "kgpu_helper.serve.x (serve) imports kgpu_helper.bench.ring"),
    ("helper/cuda/x.py", "from ..native import build",
     "kgpu_helper.cuda.x (cuda) imports kgpu_helper.native.build"),
    ("testbed/harness/x.py", "from kgpu_testbed.demo import fio",
     "kgpu_testbed.harness.x (harness) imports kgpu_testbed.demo.fio"),
    ("testbed/demo/x.py", "from kgpu_helper.rings import abi",
     "kgpu_testbed.demo.x imports kgpu_helper.rings.abi"),
])
def test_an_upward_import_is_caught(tmp_path, src, dst, line):
    """The walk itself: a tree with one bad import gives one line."""
    for pkg, (folder, layers) in PACKAGES.items():
        for layer in layers:
            d = tmp_path / folder / layer
            d.mkdir(parents=True, exist_ok=True)
            (d / "__init__.py").write_text("")
    (tmp_path / src).write_text(dst + "\n")
    bad = violations(str(tmp_path))
    assert len(bad) == 1 and bad[0].startswith(line), bad
