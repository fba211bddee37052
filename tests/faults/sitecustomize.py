"""Installs the test faults of ``$CDFKD_TEST_FAULTS`` in every Python process started with
this folder on PYTHONPATH (the tests' Ray workers), once ``cdfkd.methods.base`` is imported.

Python imports ``sitecustomize`` at start-up; nothing here imports torch or cdfkd
itself, so Ray's own helper processes stay as they are.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys

_TARGET = "cdfkd.methods.base"


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, spec: dict) -> None:
        self.spec = spec

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        found = importlib.machinery.PathFinder.find_spec(name, path)
        if found is None or found.loader is None:
            return found
        loader, spec = found.loader, self.spec

        class _Loader(importlib.abc.Loader):
            def create_module(self, s):
                return loader.create_module(s)

            def exec_module(self, module):
                loader.exec_module(module)
                from cdfkd_faults import wrap_step

                module.DistillMethod.step = wrap_step(module.DistillMethod.step, spec)

        found.loader = _Loader()
        return found


_raw = os.environ.get("CDFKD_TEST_FAULTS")
if _raw:
    sys.meta_path.insert(0, _PatchAfterImport(json.loads(_raw)))
