"""The documentation site: every ```python block of docs/ runs on its own, and the nav lists every
page.

Each block runs in a fresh namespace (its own imports and data, as a reader copies it), under a
per-block time limit; the test id names the page and the block, e.g.
``test_docs_block[guides/noise.md#0]``. A block that must not run is fenced as ```text or
```bash instead. The strict site build (``mkdocs build --strict``) runs in scripts/check.sh.
"""

import contextlib
import os
import pathlib
import re
import signal
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"

# Seconds a block may take before it fails: well over the "well under 10 s" each block is
# written for, so that a loaded CI machine does not fail it, yet a hang ends.
BLOCK_LIMIT_S = float(os.environ.get("REGJAX_DOCS_BLOCK_LIMIT_S", "60"))

_FENCE = re.compile(r"^( *)```python[^\n]*\n(.*?)^\1```[ \t]*$", flags=re.S | re.M)


def pages() -> list[pathlib.Path]:
  return sorted(DOCS.rglob("*.md"))


def python_blocks(text: str) -> list[str]:
  """The code of every ```python fence (indented fences, e.g. in a list, are dedented)."""
  blocks = []
  for match in _FENCE.finditer(text):
    indent = len(match.group(1))
    lines = match.group(2).splitlines(keepends=True)
    pad = " " * indent
    blocks.append("".join(line[indent:] if line.startswith(pad) else line for line in lines))
  return blocks


def _cases():
  for page in pages():
    rel = page.relative_to(DOCS).as_posix()
    for i, code in enumerate(python_blocks(page.read_text(encoding="utf-8"))):
      yield pytest.param(rel, code, id=f"{rel}#{i}")


@contextlib.contextmanager
def _time_limit(seconds: float, what: str):
  """Raise TimeoutError in the block after `seconds` (SIGALRM; main thread on POSIX only)."""
  usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
  if not usable:
    yield
    return

  def on_alarm(signum, frame):
    raise TimeoutError(f"{what} ran for more than {seconds:g} s")

  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("page", "code"), list(_cases()))
def test_docs_block(page, code, record_property):
  what = f"docs/{page}"
  namespace = {"__name__": "__docs__"}
  start = time.perf_counter()
  with _time_limit(BLOCK_LIMIT_S, what):
    exec(compile(code, what, "exec"), namespace)
  record_property("seconds", round(time.perf_counter() - start, 3))


GUIDES = ("noise", "structured", "weights", "batchnorm", "diagnostics", "equinox")


@pytest.mark.parametrize("guide", GUIDES)
def test_every_guide_has_an_example(guide):
  page = DOCS / "guides" / f"{guide}.md"
  assert page.exists(), page
  assert python_blocks(page.read_text(encoding="utf-8")), f"{page} has no ```python block"


def nav_pages(config_text: str) -> list[str]:
  """The .md paths of mkdocs.yml's nav (its `Title: path.md` entries and bare `- path.md`)."""
  nav = config_text.split("\nnav:\n", 1)[1]
  nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]  # up to the next top-level key
  return re.findall(r"^\s*-\s*(?:[^\n]*?:\s+)?([\w./-]+\.md)\s*$", nav, flags=re.M)


def test_nav_lists_every_page_once():
  listed = nav_pages(MKDOCS.read_text(encoding="utf-8"))
  assert len(listed) == len(set(listed)), "a page is in the nav twice"
  on_disk = {page.relative_to(DOCS).as_posix() for page in pages()}
  assert on_disk - set(listed) == set(), "pages missing from mkdocs.yml's nav"
  assert set(listed) - on_disk == set(), "nav entries without a page"


def test_python_blocks_are_found():
  text = "a\n```python\nx = 1\n```\n\n  ```python\n  y = 2\n  ```\n```text\nz\n```\n"
  assert python_blocks(text) == ["x = 1\n", "y = 2\n"]
  nav = (
    "site_name: s\nnav:\n  - Home: index.md\n  - A:\n      - b/c.md\n      - D: d.md\nplugins: []\n"
  )
  assert nav_pages(nav) == ["index.md", "b/c.md", "d.md"]


def test_api_reference_lists_every_public_name():
  import types

  import regjax

  api = DOCS / "api"
  documented = set(re.findall(r"^::: regjax\.(\w+)\s*$", (api / "functions.md").read_text(), re.M))
  names = {n for n in regjax.__all__ if not isinstance(getattr(regjax, n), types.ModuleType)}
  assert names - documented == set(), "regjax.__all__ names missing from docs/api/functions.md"
  assert documented - names == set(), "docs/api/functions.md documents names not in __all__"
  for module in ("linen", "nnx", "equinox", "diagnostics", "random"):
    text = (api / f"{module}.md").read_text()
    assert re.search(rf"^::: regjax\.{module}\s*$", text, re.M), module


def test_griffe_extension_reads_rest_as_markdown():
  pytest.importorskip("griffe")  # the docs extra
  import importlib.util

  spec = importlib.util.spec_from_file_location("griffe_rst", DOCS / "api" / "griffe_rst.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  text = "See :func:`regjax.dropout` and :class:`~flax.nnx.Rngs`, :mod:`a <regjax.nnx>`.\n"
  assert module.markdown_of(text) == "See `regjax.dropout` and `Rngs`, `regjax.nnx`.\n"
  assert module.markdown_of("Before this::\n\n    y = x\n") == "Before this:\n\n    y = x\n"
  assert module.markdown_of("Like so ::\n  ::\n") == "Like so\n"
  grouped = "Args:\n  a, b,\n    c: as in f.\n  d: the d,\n    e.\n"
  joined = "Args:\n  a,\u2009b,\u2009c: as in f.\n  d: the d,\n    e.\n"
  assert module.markdown_of(grouped) == joined
