"""Which tests of an xdist session run on one worker, and the scheduler that keeps them there (``--dist loadgroup``).

A module-scoped fixture is one because it is costly: a broker the tests may stop, a 3-node cluster, a schema
registry, a wheel built with pip. Under xdist each worker that runs a test using it makes its own; so the tests
that use one form a group, sent to one worker as a whole, which makes it once (as a run without xdist does). The
group is the fixture's name, not its module's: modules with a fixture of one name (``own_broker``, ``cluster``)
run on one worker, module after module, so at most one such server of each name runs at a time (on 2 cores,
two 3-node clusters and three brokers started at once took minutes and broke the tests' timing). An
``xdist_group`` mark groups the same way. pytest-xdist's own ``loadgroup`` scheduler learns the groups from node
ids it rewrites on the workers, which pytest 9.2 no longer allows: it silently stops grouping (pytest-xdist issue
1386). So the workers write the groups into the session's folder (the controller names it, tests/conftest.py),
and :class:`GroupScheduling` reads them there once every worker has collected.

Workers call :func:`write_groups` from their collection hook; the controller's scheduler runs on its main thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

GROUPS = "groups.json"  # in the session's folder: {node id: group} for the tests that have one


def group_of(item: pytest.Item) -> str | None:
    """The item's group: its ``xdist_group`` names and the names of the module-scoped fixtures it uses, or None."""
    names = {str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
             for mark in item.iter_markers("xdist_group")}
    info = getattr(item, "_fixtureinfo", None)
    for fixture, defs in (info.name2fixturedefs.items() if info is not None else ()):
        if defs and defs[-1].scope == "module":
            names.add(fixture)
    return "+".join(sorted(names)) or None


def write_groups(root: Path, items: list[pytest.Item]) -> None:
    """Write the groups of ``items`` for the controller (every worker writes the same; the last rename wins)."""
    groups = {item.nodeid: group for item in items if (group := group_of(item)) is not None}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{GROUPS}.{os.getpid()}"
    tmp.write_text(json.dumps(groups))
    tmp.replace(root / GROUPS)


class GroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with the groups the workers wrote: a group is one unit of work (bigger units
    first), every other test a unit of its own."""

    def __init__(self, config: pytest.Config, log: Any, root: Callable[[], Path]) -> None:
        super().__init__(config, log)
        self._root = root
        self._groups: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._groups is None:  # first called once every worker has collected, so has written the file
            path = self._root() / GROUPS
            self._groups = json.loads(path.read_text()) if path.exists() else {}
        return self._groups.get(nodeid, nodeid)
