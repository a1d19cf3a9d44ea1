"""Code-shape figures for the package: longest function, private cross-module imports.

Usage: python .ci/metrics.py [package_dir]   (default: regjax)

"Private cross-module use" counts, per importing file, each distinct private
name (leading underscore) taken from another regjax module: `from regjax.a
import _b`, or `a._b` where `a` is a regjax module imported under that name.
Importing a private *module* (`from regjax import _checks`) is allowed: such
modules are the package's internal API; reaching into another module's
private names is not.
"""

from __future__ import annotations

import ast
import pathlib
import sys


def functions(tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def _is_docstring(node) -> bool:
  return (
    isinstance(node, ast.Expr)
    and isinstance(getattr(node, "value", None), ast.Constant)
    and (isinstance(node.value.value, str))
  )


def private_uses(tree, module: str):
  aliases = {}
  uses = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("regjax"):
      for a in node.names:
        is_module = pathlib.Path(*f"{node.module}.{a.name}".split(".")).with_suffix(".py").exists()
        if a.name.startswith("_") and node.module != module and not is_module:
          uses.add(f"{node.module}.{a.name}")
        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("regjax"):
          aliases[a.asname or a.name] = a.name
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
    ):
      target = aliases[node.value.id]
      if target != module:
        uses.add(f"{target}.{node.attr}")
  return uses


def main(root: str = "regjax") -> None:
  longest = []
  private = []
  for path in sorted(pathlib.Path(root).rglob("*.py")):
    tree = ast.parse(path.read_text())
    module = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
    for fn in functions(tree):
      lines = fn.end_lineno - fn.lineno + 1
      doc = fn.body[0] if fn.body and _is_docstring(fn.body[0]) else None
      code = lines - (doc.end_lineno - doc.lineno + 1 if doc else 0)
      longest.append((lines, code, f"{path}:{fn.lineno} {fn.name}"))
    private += [(str(path), u) for u in sorted(private_uses(tree, module))]
  longest.sort(reverse=True)
  print("longest functions (lines; lines without the docstring):")
  for n, code, where in longest[:5]:
    print(f"  {n:4d} {code:4d}  {where}")
  print("longest without docstrings:")
  for n, code, where in sorted(longest, key=lambda r: -r[1])[:5]:
    print(f"  {n:4d} {code:4d}  {where}")
  print(f"private cross-module uses: {len(private)}")
  for path, use in private:
    print(f"  {path}: {use}")


if __name__ == "__main__":
  main(*sys.argv[1:])
