"""Pixel data for viewers: single frames, rendered frames, and instances in another transfer
syntax (decompressed through pydicom's decoders and the pylibjpeg plugins: JPEG, JPEG 2000,
JPEG-LS, RLE).  ``dgf web`` (WADO-RS) and ``dgf dicom serve`` (C-GET, C-MOVE) use them."""

from __future__ import annotations

import io
import math
from typing import Any

from dgf import errors

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
NATIVE_SYNTAXES = frozenset({IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE})


#: The most bytes of pixel values one request decodes: the frames asked for, or a whole
#: instance to transcode.  A compressed frame decodes to the size its header declares, and JPEG
#: 2000 packs a blank 4096 x 4096 frame into 300 bytes: a 300 KB instance can declare 32 GB.
DECODE_MAX = 1 << 30
#: The most pixels of one rendered frame (rendering holds ~20 bytes a pixel).
RENDER_MAX = 1 << 25


class NotAcceptable(ValueError):
    """The pixels cannot be given in the form asked for."""


def frame_size(ds: Any) -> int:
    """Bytes of one decoded frame, as the header declares it."""
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    spp, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 8)
    return rows * cols * spp * ((bits + 7) // 8)


def frame_count(ds: Any) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def check_decode(ds: Any, frames: int, what: str, instead: str) -> None:
    """Refuse to decode ``frames`` frames of ``ds`` past :data:`DECODE_MAX` bytes, before any
    is decoded; ``instead`` says what the caller may ask for."""
    size = frame_size(ds) * frames
    if size > DECODE_MAX:
        raise NotAcceptable(f"{what} would decode to {size} bytes, more than the {DECODE_MAX} this "
                            f"server decodes for one request; {instead}.")


def decoded_frames(ds: Any, indices: list[int]) -> list[bytes]:
    """Frames ``indices`` (from 0) of a compressed dataset, decoded, little endian: only those
    frames are decoded (one frame of a whole-slide image is not thousands)."""
    import numpy as np
    from pydicom.pixels import pixel_array

    check_decode(ds, len(indices), f"{len(indices)} frame(s) of {frame_size(ds)} bytes",
                 "ask for transfer-syntax=* to receive them as stored")
    if int(ds.get("BitsAllocated") or 8) == 1:                  # packed bits: one frame at most
        check_decode(ds, frame_count(ds), "the instance", "ask for transfer-syntax=*")
        ds.decompress(generate_instance_uid=False)
        return [frame_bytes(ds, i) for i in indices]
    out = []
    for i in indices:
        arr = pixel_array(ds, index=i)
        out.append(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
    return out


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


def render(ds: Any, index: int, window: tuple[float, float] | None, media: str, quality: int = 90,
           viewport: tuple[int, int] | None = None, enlarge: bool = True) -> bytes:
    """Frame ``index`` of ``ds`` as an 8-bit JPEG or PNG, through the modality LUT and a linear
    window (the one asked for, else the file's first, else the frame's range); with a
    ``viewport`` (width, height), scaled to fill as much of it as the frame's aspect allows
    (without ``enlarge``, only ever made smaller)."""
    import numpy as np
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, pixel_array

    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * cols > RENDER_MAX:
        raise NotAcceptable(f"a frame of {cols} x {rows} pixels is larger than this server renders "
                            f"({RENDER_MAX} pixels); fetch the frame itself.")
    check_decode(ds, 1, "the frame", "fetch the frame as stored")
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
    if viewport is not None:
        scale = min(viewport[0] / image.width, viewport[1] / image.height, math.inf if enlarge else 1.0)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
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
        check_decode(ds, frame_count(ds), "the instance", "ask for it as stored")
        ds.decompress(generate_instance_uid=False)      # the same instance, another transfer syntax
    elif "PixelData" in ds and stored.is_little_endian != little and int(ds.BitsAllocated) > 8:
        arr = ds.pixel_array                    # values, in this machine's order: written swapped
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<" if little else ">")).tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    out = DicomBytesIO()
    pydicom.dcmwrite(out, ds, implicit_vr=syntax == IMPLICIT_LE, little_endian=little,
                     force_encoding=True)
    return out.getvalue()
