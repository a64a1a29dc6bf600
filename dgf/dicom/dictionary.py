"""pydicom's data dictionary (PS3.6), without the rest of pydicom.

Importing anything from pydicom runs its package ``__init__``, which imports numpy, requests and
its pixel plugins (found through ``importlib.metadata``): 0.18 s of CPU here, a third of what a
one-file ``dgf_up`` costs, although de-identifying and checking objects (``dgf.dicom.raw``)
needs only the table.  The table is one generated module of plain literals,
``pydicom/_dicom_dict.py``, so it is loaded by itself when pydicom is not imported yet, under
pydicom's own name for it: a process that imports pydicom later (a site deriving XML headers)
then finds the table loaded and holds it once.  When pydicom is imported already, or its layout
ever changes, pydicom's own module is used.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_NAME = "pydicom._dicom_dict"


def _table() -> ModuleType | Any:
    if "pydicom" not in sys.modules:
        spec = importlib.util.find_spec("pydicom")      # locates the package, runs nothing
        origin = Path(spec.origin).parent / "_dicom_dict.py" if spec is not None and spec.origin else None
        if origin is not None and origin.is_file():
            table = importlib.util.spec_from_file_location(_NAME, origin)
            if table is not None and table.loader is not None:
                module = importlib.util.module_from_spec(table)
                table.loader.exec_module(module)
                if hasattr(module, "DicomDictionary") and hasattr(module, "RepeatersDictionary"):
                    sys.modules.setdefault(_NAME, module)     # what pydicom's datadict imports
                    return module
    from pydicom import datadict

    return datadict


_source = _table()

#: Tag -> (VR, VM, name, retired, keyword), as ``pydicom.datadict.DicomDictionary``.
DicomDictionary: dict[int, tuple[str, str, str, str, str]] = _source.DicomDictionary
#: Masked tags of repeating groups ('60xx0010') -> the same tuples.
RepeatersDictionary: dict[str, tuple[str, str, str, str, str]] = _source.RepeatersDictionary
