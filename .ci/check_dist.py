"""Check the release artifacts, and the wheel once installed.

Usage (as .ci/run does):
  python .ci/check_dist.py archives DIST      the sdist and the wheel in DIST hold what they
                                              should (and nothing of tests/, docs/, examples/)
  python -I .ci/check_dist.py installed [--equinox]
                                              run from outside the repository, in a venv where
                                              the wheel is installed: regjax imports from that
                                              venv's site-packages and works

The archives check needs only the standard library, so it runs in any venv.
"""

from __future__ import annotations

import email
import pathlib
import re
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _version() -> str:
  text = (ROOT / "regjax" / "__init__.py").read_text()
  return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def check_archives(dist: pathlib.Path) -> None:
  version = _version()
  sdists = list(dist.glob("regjax-*.tar.gz"))
  wheels = list(dist.glob("regjax-*.whl"))
  assert [p.name for p in sdists] == [f"regjax-{version}.tar.gz"], sdists
  assert [p.name for p in wheels] == [f"regjax-{version}-py3-none-any.whl"], wheels

  with tarfile.open(sdists[0]) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
  for need in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "PKG-INFO"):
    assert need in names, f"sdist lacks {need}"
  for need in ("regjax/__init__.py", "regjax/py.typed", "regjax/linen/__init__.py"):
    assert need in names, f"sdist lacks {need}"
  for top in ("tests", "docs", "examples", "benchmarks", "runs", "scripts", ".ci"):
    assert not any(n == top or n.startswith(top + "/") for n in names), f"sdist has {top}/"

  with zipfile.ZipFile(wheels[0]) as whl:
    names = set(whl.namelist())
    info = f"regjax-{version}.dist-info"
    metadata = email.message_from_bytes(whl.read(f"{info}/METADATA"))
  # Every package under regjax/ in the tree is in the wheel.
  for init in sorted((ROOT / "regjax").rglob("__init__.py")):
    rel = init.relative_to(ROOT).as_posix()
    assert rel in names, f"wheel lacks {rel}"
  for need in ("regjax/py.typed", f"{info}/licenses/LICENSE"):
    assert need in names, f"wheel lacks {need}"
  assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
  assert metadata["Version"] == version
  assert metadata["License-Expression"] == "Apache-2.0"
  assert metadata.get_all("License-File") == ["LICENSE"]
  extras = set(metadata.get_all("Provides-Extra"))
  assert {"equinox", "docs", "test", "examples"} <= extras, extras
  print(f"archives ok: {sdists[0].name}, {wheels[0].name} ({len(names)} files)")


def check_installed(equinox: bool) -> None:
  import regjax

  where = pathlib.Path(regjax.__file__).resolve()
  assert "site-packages" in where.parts, f"regjax imported from {where}, not an installed wheel"
  assert where.parent != ROOT / "regjax", f"regjax imported from the source tree: {where}"
  assert (where.parent / "py.typed").is_file()
  assert regjax.__version__ == _version(), (regjax.__version__, _version())

  import jax
  import jax.numpy as jnp
  from flax import nnx

  import regjax.linen
  import regjax.nnx

  key = jax.random.key(0)
  x = jnp.ones((8, 4))
  y = regjax.dropout(x, 0.5, key=key)
  assert y.shape == x.shape and set(jnp.unique(y).tolist()) <= {0.0, 2.0}
  y, _ = regjax.batch_norm(x, regjax.init_batch_stats(4))
  layer = regjax.linen.Dropout(0.5, deterministic=False)
  out = layer.apply({}, x, rngs={"dropout": key})
  assert out.shape == x.shape
  out = regjax.nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))(x)
  assert out.shape == x.shape
  names = [*regjax.__all__, *regjax.linen.__all__, *regjax.nnx.__all__]
  if equinox:
    import regjax.equinox

    assert regjax.equinox.__all__
    names += regjax.equinox.__all__
  print(f"installed ok: regjax {regjax.__version__} from {where.parent}, {len(names)} names")


def main(argv: list[str]) -> None:
  if argv[:1] == ["archives"] and len(argv) == 2:
    check_archives(pathlib.Path(argv[1]))
  elif argv[:1] == ["installed"] and argv[1:] in ([], ["--equinox"]):
    check_installed(equinox=argv[1:] == ["--equinox"])
  else:
    sys.exit(__doc__)


if __name__ == "__main__":
  main(sys.argv[1:])
