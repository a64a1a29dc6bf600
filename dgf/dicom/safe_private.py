"""Safe private attributes (PS3.15 E.3.10, the Retain Safe Private Option), as data.

``data/safe_private.json`` lists, per private creator and group, the elements (the low byte of the
element number) known to hold no identity: scan geometry, acquisition and reconstruction
parameters.  Everything else private is removed even with the option on.

Source: the PixelMed toolkit's ``ClinicalTrialsAttributes.isSafePrivateAttribute`` (BSD-style
licence), written by the editor of PS3.15's Table E.3.10-1 and the most complete machine-readable
form of it we could reach; the standard publishes the table only as a document.  The list is a
subset of the table's rows, so the option keeps less than the standard allows, never more.

Regenerate from the Debian package ``libpixelmed-java`` (needs a JDK for ``javap``)::

    python -m dgf.dicom.safe_private /usr/share/java/pixelmed.jar dgf/dicom/data/safe_private.json

The method is a chain of comparisons (group, creator, element in block) compiled to JVM bytecode;
:func:`extract` runs that bytecode on every (group, creator, element) it mentions and records
where it answers true.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import lru_cache
from importlib import resources
from typing import Any

CLASS = "com.pixelmed.dicom.ClinicalTrialsAttributes"
METHODS = {"elements": "isSafePrivateAttribute(java.lang.String, com.pixelmed.dicom.AttributeTag)",
           "sequences": "isSafePrivateSequenceAttribute(java.lang.String, com.pixelmed.dicom.AttributeTag)"}


@lru_cache(maxsize=1)
def table() -> dict[tuple[str, int], frozenset[int]]:
    """(creator, group) -> elements in block that are safe (elements and sequences alike: a safe
    sequence is kept and its items are de-identified like any other)."""
    data = json.loads(resources.files("dgf.dicom").joinpath("data/safe_private.json").read_text())
    out: dict[tuple[str, int], set[int]] = {}
    for kind in ("elements", "sequences"):
        for creator, groups in data[kind].items():
            for group, elems in groups.items():
                out.setdefault((creator, int(group, 16)), set()).update(int(e, 16) for e in elems)
    return {k: frozenset(v) for k, v in out.items()}


def is_safe(creator: str | None, tag: int) -> bool:
    if creator is None:
        return False
    elems = table().get((creator, tag >> 16))
    return elems is not None and (tag & 0xFF) in elems


# --------------------------------------------------------------------------------------------
# Regeneration from PixelMed's bytecode

_INSN = re.compile(r"^\s*(\d+): (\w+)\s*([^/]*?)\s*(?://\s*(?:String|Method)\s+(.*))?$")


def _code(jar: str, method: str) -> list[tuple[int, str, str, str]]:
    text = subprocess.run(["javap", "-c", "-p", "-classpath", jar, CLASS], check=True,
                          capture_output=True, text=True).stdout
    start = text.index(method)
    body = text[start:text.index("\n\n", start)]
    out = []
    for line in body.splitlines()[2:]:
        m = _INSN.match(line)
        if m:
            out.append((int(m[1]), m[2], m[3].strip().rstrip(","), m[4] or ""))
    return out


def _run(code: list[tuple[int, str, str, str]], creator: str, group: int, elem: int | None) -> bool:
    """Interpret the small subset of JVM instructions the method uses.  Locals: 0 creator,
    1 tag, 2 result, 3 group, 4 element, 5 element & 0xFF.  With ``elem`` None: whether the
    method gets as far as looking at the element (the group and creator matched)."""
    at = {off: i for i, (off, *_rest) in enumerate(code)}
    local: dict[int, Any] = {0: creator, 1: "tag"}
    stack: list[Any] = []
    i = 0
    for _ in range(100_000):
        off, op, arg, note = code[i]
        i += 1
        if op.startswith("iconst_"):
            stack.append(int(op[7:]))
        elif op in ("bipush", "sipush"):
            stack.append(int(arg))
        elif op.startswith(("istore", "iload", "aload")):
            n = int(op.rsplit("_", 1)[1]) if "_" in op else int(arg)
            if op.startswith("istore"):
                local[n] = stack.pop()
            elif n == 5 and elem is None:
                return True
            else:
                stack.append(local[n])
        elif op == "ldc":
            stack.append(note)
        elif op == "iand":
            b, a = stack.pop(), stack.pop()
            stack.append(a & b)
        elif op == "invokevirtual":
            if "isPrivateCreator" in note:
                stack.pop()
                stack.append(0)
            elif "getGroup" in note:
                stack.pop()
                stack.append(group)
            elif "getElement" in note:
                stack.pop()
                stack.append(0x1000 | (elem or 0))
            elif "String.equals" in note:
                b, a = stack.pop(), stack.pop()
                stack.append(int(a == b))
            else:
                raise ValueError(f"unexpected call at {off}: {note}")
        elif op in ("ifeq", "ifne"):
            v = stack.pop()
            if (v == 0) == (op == "ifeq"):
                i = at[int(arg)]
        elif op.startswith("if_icmp"):
            b, a = stack.pop(), stack.pop()
            taken = {"eq": a == b, "ne": a != b, "lt": a < b, "gt": a > b, "le": a <= b, "ge": a >= b}[op[7:]]
            if taken:
                i = at[int(arg)]
        elif op == "goto":
            i = at[int(arg)]
        elif op == "ireturn":
            return bool(stack.pop())
        else:
            raise ValueError(f"unexpected instruction at {off}: {op}")
    raise ValueError("the method did not return")


def extract(jar: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, method in METHODS.items():
        code = _code(jar, method)
        creators = sorted({note for _, op, _, note in code if op == "ldc"})
        groups = sorted({int(code[k + 1][2]) for k in range(len(code) - 2)
                         if code[k][1] == "iload_3" and code[k + 1][1] in ("bipush", "sipush")})
        found: dict[str, dict[str, list[str]]] = {}
        for creator in creators:
            for group in groups:
                if not _run(code, creator, group, None):
                    continue
                elems = [f"{e:02X}" for e in range(256) if _run(code, creator, group, e)]
                if elems:
                    found.setdefault(creator, {})[f"{group:04X}"] = elems
        out[kind] = found
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m dgf.dicom.safe_private PIXELMED_JAR OUT.json", file=sys.stderr)
        return 2
    jar, dest = argv
    data = {"source": "PixelMed toolkit (libpixelmed-java, BSD-style licence), "
                      f"{CLASS}.isSafePrivateAttribute and isSafePrivateSequenceAttribute; "
                      "a subset of DICOM PS3.15 Table E.3.10-1 Safe Private Attributes",
            "jar": jar.rsplit("/", 1)[-1], **extract(jar)}
    with open(dest, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
    n = sum(len(e) for g in data["elements"].values() for e in g.values())
    print(f"{len(data['elements'])} creators, {n} safe elements -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
