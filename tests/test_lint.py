"""The tree passes the lint that pyproject.toml configures ([tool.ruff]): unused names, imports out
of order, zips of unequal lengths, closures over loop variables, and the like; and the library's
public functions carry type hints."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "mtl", "scripts", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def _public_functions(tree: ast.Module):
    """Module-level functions and the methods of module-level classes whose names (and whose
    class's) do not start with an underscore; dunders such as __init__ and __call__ count."""
    def public(name: str) -> bool:
        return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))

    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and public(node.name):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and public(node.name):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and public(item.name):
                    yield f"{node.name}.{item.name}", item


def test_public_functions_have_type_hints():
    # The project's style: public functions have type hints. Ruff's ANN rules cannot tell a public
    # function from a closure inside one (a jitted step's loss_fn), so the rule is checked here.
    missing = []
    for path in sorted((ROOT / "mtl").rglob("*.py")):
        for name, fn in _public_functions(ast.parse(path.read_text(), str(path))):
            args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs,
                    *(a for a in (fn.args.vararg, fn.args.kwarg) if a is not None)]
            bare = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
            if fn.returns is None and fn.name != "__init__":
                bare.append("return")
            if bare:
                missing.append(f"{path.relative_to(ROOT)}:{fn.lineno} {name}: {', '.join(bare)}")
    assert not missing, "public functions without type hints:\n" + "\n".join(missing)
