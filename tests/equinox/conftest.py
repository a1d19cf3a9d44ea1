"""The Equinox tests need equinox (the ``equinox`` extra); without it they are not collected.

The installed distribution is asked, not ``import equinox``: with ``tests/`` on ``sys.path``
this folder itself would be found as a namespace package of that name. (For the same reason
the folder has no ``__init__.py``, and its files have names of their own, ``test_eqx_*``.)
"""

import importlib.metadata

collect_ignore_glob: list[str] = []
try:
  importlib.metadata.version("equinox")
except importlib.metadata.PackageNotFoundError:
  collect_ignore_glob = ["test_*.py"]
