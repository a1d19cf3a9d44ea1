"""A griffe extension for the API reference: the docstrings' reST markup, read as Markdown.

regjax's docstrings are Google style with two reST habits that Markdown would print as they
are: cross-reference roles (``:func:`regjax.batch_norm```, ``:class:`~flax.nnx.Rngs```) and
the ``::`` that introduces an indented literal block. A role becomes a code span of its
target (``~`` keeps the last component, ``title <target>`` the target); a ``::`` at the end
of a line becomes ``:`` (a `` ::`` goes), and a line that is only ``::`` goes. The indented
block after it is already a Markdown code block. An Args entry that names several
parameters over several lines ("a, b,\n  c: as in ...") is joined into one line, which the
Google parser reads as one entry named "a, b, c" (with thin spaces). Loaded by mkdocs.yml
(mkdocstrings' ``extensions`` option); the source files are not changed.
"""

import re
from typing import Any

import griffe

# An Args/Attributes entry naming several parameters over several lines ("a, b,\n  c: as in
# ..."), which the Google parser cannot read: its lines are joined into one.
_NAMES_LINE = re.compile(r"^( *)\w+(?:, *\w+)*,$")
# Such an entry's names ("a, b, c: ..."): the parser would read "a," as the name and "b, c"
# as its type, so the spaces become thin spaces (U+2009), which it does not split on.
_NAMES_ENTRY = re.compile(r"^( *)(\w+(?:, *\w+)+):")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`([^`]+)`")


def _target(text: str) -> str:
  text = text.strip()
  if text.endswith(">") and "<" in text:  # `title <target>`
    text = text[text.rindex("<") + 1 : -1]
  if text.startswith("~"):
    text = text[1:].rsplit(".", 1)[-1]
  return text


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(" ")) if line.strip() else -1


def markdown_of(docstring: str) -> str:
  """The docstring with reST roles as code spans, ``::`` markers as ``:`` (or removed) and
  multi-line lists of parameter names on one line."""
  text = _ROLE.sub(lambda m: f"`{_target(m.group(1))}`", docstring)
  lines: list[str] = []
  for line in text.split("\n"):
    if lines and _NAMES_LINE.match(lines[-1]) and _indent(line) > _indent(lines[-1]):
      lines[-1] += " " + line.strip()
      continue
    if line.strip() == "::":
      continue
    if line.endswith(" ::"):  # reST: "text ::" prints "text"
      line = line[:-3]
    elif line.endswith("::"):  # "text::" prints "text:"
      line = line[:-1]
    lines.append(line)
  lines = [
    _NAMES_ENTRY.sub(lambda m: m.group(1) + re.sub(r", *", ",\u2009", m.group(2)) + ":", line)
    for line in lines
  ]
  return "\n".join(lines)


class RestToMarkdown(griffe.Extension):
  """Rewrites every docstring with :func:`markdown_of` before mkdocstrings parses it."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is not None:
      obj.docstring.value = markdown_of(obj.docstring.value)
