"""A pytest plugin for ``bench_hostile.py``: keeps a copy of every qcow2 image a test opens.

Loaded with ``-p _keep_opened`` (``bench/`` on ``sys.path``) while ``IMAGO_KEEP_OPENED`` names a
directory. ``plugins/qcow2/tests/test_malformed.py`` builds one broken image per refusal rule
inside its tests; this wraps the ways it opens them (``Qcow2.builder_path``, ``imago.open``, and
the address-space-capped child of ``_corpus.open_limited``) so that each image, as it was when
opened, lands in the directory once (by content), named after the test.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

_seen: set[str] = set()


def keep(path: Any) -> None:
    """Copy the file at *path* into the directory, unless the same bytes were kept already."""
    directory = os.environ.get("IMAGO_KEEP_OPENED")
    if not directory or not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return
    digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    if digest in _seen:
        return
    _seen.add(digest)
    test = os.environ.get("PYTEST_CURRENT_TEST", "unknown").split(" ")[0].rpartition("::")[2]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test)[:100]
    shutil.copyfile(path, Path(directory) / f"{len(_seen):04d}-{name}.qcow2")


def pytest_configure(config: Any) -> None:
    """Wrap the opening functions (only when the directory is given)."""
    del config
    if not os.environ.get("IMAGO_KEEP_OPENED"):
        return
    import imago
    from imago_qcow2 import Qcow2

    builder_path = Qcow2.builder_path.__func__  # type: ignore[attr-defined]

    def builder_path_kept(cls: Any, path: Any) -> Any:
        keep(path)
        return builder_path(cls, path)

    Qcow2.builder_path = classmethod(builder_path_kept)  # type: ignore[method-assign,assignment]
    original_open = imago.open

    def open_kept(path: Any, *args: Any, **kwargs: Any) -> Any:
        keep(path)
        return original_open(path, *args, **kwargs)

    imago.open = open_kept  # type: ignore[assignment]


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    """Wrap ``_corpus.open_limited`` of the collected test package (imported by now)."""
    del session, config, items
    import sys

    if not os.environ.get("IMAGO_KEEP_OPENED"):
        return
    for name, module in list(sys.modules.items()):
        if name.endswith("_corpus") and hasattr(module, "open_limited"):
            limited = module.open_limited

            def open_limited_kept(path: Any, *args: Any, _limited: Any = limited, **kwargs: Any) -> Any:
                keep(path)
                return _limited(path, *args, **kwargs)

            module.open_limited = open_limited_kept
