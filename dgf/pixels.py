"""Pixel data for viewers: single frames, rendered frames, and instances in another transfer
syntax (decompressed through pydicom's decoders and the pylibjpeg plugins: JPEG, JPEG 2000,
JPEG-LS, RLE).  ``dgf web`` (WADO-RS) and ``dgf dicom serve`` (C-GET, C-MOVE) use them."""

from __future__ import annotations

import io
from typing import Any

from dgf import errors

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
NATIVE_SYNTAXES = frozenset({IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE})


class NotAcceptable(ValueError):
    """The pixels cannot be given in the form asked for."""


def frame_bytes(ds: Any, index: int) -> bytes:
    """Frame ``index`` (from 0) of a native (uncompressed) dataset, little endian."""
    import numpy as np

    rows, cols = int(ds.Rows), int(ds.Columns)
    spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    if bits == 1:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise NotAcceptable("frames of multi-frame 1-bit pixel data are not served apart.")
        return bytes(ds.PixelData)
    size = rows * cols * spp * bits // 8
    data = bytes(ds.PixelData[index * size:(index + 1) * size])
    if len(data) != size:
        raise errors.NotFound(f"frame {index + 1} is not in the pixel data.")
    if ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE) != EXPLICIT_BE or bits == 8:
        return data
    return np.frombuffer(data, dtype=f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()


def render(ds: Any, index: int, window: tuple[float, float] | None, media: str, quality: int = 90) -> bytes:
    """Frame ``index`` of ``ds`` as an 8-bit JPEG or PNG, through the modality LUT and a linear
    window (the one asked for, else the file's first, else the frame's range)."""
    import numpy as np
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, pixel_array

    arr = pixel_array(ds, index=index)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        values = apply_modality_lut(arr, ds).astype(np.float64)
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            c, w = ds.WindowCenter, ds.WindowWidth
            window = (float(c[0] if ds["WindowCenter"].VM > 1 else c),
                      float(w[0] if ds["WindowWidth"].VM > 1 else w))
        if window is None:
            lo, hi = float(values.min()), float(values.max())
            window = ((lo + hi) / 2, max(hi - lo, 1.0))
        center, width = window
        out = np.clip((values - (center - 0.5)) / max(width - 1, 1) + 0.5, 0, 1) * 255
        if photometric == "MONOCHROME1":
            out = 255 - out
        image = Image.fromarray(out.astype(np.uint8), "L")
    else:
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) * 255 / max(float(arr.max()), 1)).astype(np.uint8)
        image = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG" if media == "image/png" else "JPEG", **({} if media == "image/png" else {"quality": quality}))
    return buf.getvalue()


def transcode(data: bytes, syntax: str) -> bytes:
    """An instance in another native transfer syntax (decompressing when stored compressed)."""
    import pydicom
    from pydicom.filebase import DicomBytesIO

    if syntax not in NATIVE_SYNTAXES:
        raise NotAcceptable(f"instances are not transcoded to {syntax}; ask for transfer-syntax=* "
                               f"or a native syntax.")
    ds = pydicom.dcmread(DicomBytesIO(data))
    stored = ds.file_meta.TransferSyntaxUID
    little = syntax != EXPLICIT_BE
    if stored not in NATIVE_SYNTAXES:
        ds.decompress(generate_instance_uid=False)      # the same instance, another transfer syntax
    elif "PixelData" in ds and stored.is_little_endian != little and int(ds.BitsAllocated) > 8:
        arr = ds.pixel_array                    # values, in this machine's order: written swapped
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<" if little else ">")).tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    out = DicomBytesIO()
    pydicom.dcmwrite(out, ds, implicit_vr=syntax == IMPLICIT_LE, little_endian=little,
                     force_encoding=True)
    return out.getvalue()
