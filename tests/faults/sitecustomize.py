"""Installs the test faults of ``$CDFKD_TEST_FAULTS`` in every Python process started with
this folder on PYTHONPATH (the tests' Ray workers), once ``cdfkd.methods.base`` and
``cdfkd.runs`` are imported.

Python imports ``sitecustomize`` at start-up; nothing here imports torch or cdfkd
itself, so Ray's own helper processes stay as they are.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys

#: module -> how to patch it once it has been executed
_TARGETS = {
    "cdfkd.methods.base": ("DistillMethod", "step", "wrap_step"),
    "cdfkd.runs": ("RunDir", "save_checkpoint", "wrap_save_checkpoint"),
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, spec: dict) -> None:
        self.spec = spec

    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        found = importlib.machinery.PathFinder.find_spec(name, path)
        if found is None or found.loader is None:
            return found
        loader, spec = found.loader, self.spec
        cls_name, attr, wrapper = _TARGETS[name]

        class _Loader(importlib.abc.Loader):
            def create_module(self, s):
                return loader.create_module(s)

            def exec_module(self, module):
                loader.exec_module(module)
                import cdfkd_faults

                cls = getattr(module, cls_name)
                setattr(cls, attr, getattr(cdfkd_faults, wrapper)(getattr(cls, attr), spec))

        found.loader = _Loader()
        return found


_raw = os.environ.get("CDFKD_TEST_FAULTS")
if _raw:
    sys.meta_path.insert(0, _PatchAfterImport(json.loads(_raw)))
