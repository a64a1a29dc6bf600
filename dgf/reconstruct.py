"""Reconstruction near the data: FDK as map-reduce over the sites that hold the projections
(``Client.recon``, ``dgf recon``); only partial volumes travel."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dgf import errors
from dgf.reports import Meter, Progress, UploadReport
from dgf.transport import run_parallel
from dgf.types import HEADER_XATTR
from dgf.upload import BATCH

if TYPE_CHECKING:
    from dgf.client import Client

log = logging.getLogger("dgf.reconstruct")

#: Seconds a site may compute one partial reconstruction before it is named as hung.
RECON_WAIT_S = 3600.0


@dataclasses.dataclass
class ReconResult:
    volume: Any  # numpy float32 [z, y, x]
    geometry: Any
    paths: list[str]
    seconds: float
    sites: list[str]



class Reconstruction:
    """Reconstruction for one client."""

    def __init__(self, client: Client) -> None:
        self.client = client


    def recon_import(self, projections: Any, geometry: Any, to: str,
                     patient: dict[str, str] | None = None, progress: Progress | None = None) -> UploadReport:
        """Store a projection stack (n, nv, nu) with its geometry as a DICOM projection series
        under ``to``, de-identified like any upload and spread over the sites by instance."""
        from dgf.dicom.projections import projection_series

        files = projection_series(projections, geometry, patient)
        report = UploadReport()
        for i in range(0, len(files), BATCH):
            items: list[tuple[str, bytes | None]] = [(f"projection {j + 1}", files[j])
                                                     for j in range(i, min(len(files), i + BATCH))]
            prepared, caps = self.client.uploads._prepare(items, to, None, report, spread=True)
            self.client.uploads._store(prepared, caps, report, False, Meter(progress, {n: 1 for n, _ in items}),
                        [n for n, _ in items], check=False)
        return report

    def recon(self, series: str, out: str, shape: tuple[int, int, int] | None = None,
              window: str = "hann", progress: Callable[[str], None] | None = None,
              replace: bool = False) -> ReconResult:
        """FDK of the projection series under ``series``, map-reduce over the sites that hold it.

        Each site filters and back-projects its own projections (verb ``recon.partial``) and
        returns a partial volume; only those travel.  A site that fails has its share redone
        from another replica, or the reconstruction stops with a message naming it.  The sum is
        stored under ``out`` as a CT series with its provenance (``user.dgf.provenance`` and the
        series' DGF RECON block).  An ``out`` that holds files is refused unless ``replace``;
        then the old files are removed once the new series is stored.  The slices inherit the
        identity of the projections (an identified download puts the patient back)."""
        import numpy as np
        from lxml import etree

        from dgf.conebeam import Geometry
        from dgf.dicom.projections import CREATOR, volume_series

        t0 = time.perf_counter()
        try:
            old = self.client.stat(out)
        except errors.NotFound:
            old = None
        if old is not None and not old.is_dir:
            raise errors.AlreadyExists(f"--out {out} is a file; name a directory for the reconstruction.")
        old_files = [st.path for st in self.client.ls(out) if not st.is_dir] if old is not None else []
        if old_files and not replace:
            raise errors.AlreadyExists(f"{out} already holds {len(old_files)} file(s) (an earlier "
                                       "reconstruction?); choose another --out, or pass --replace.")
        rows = self.client.find("/DicomHeader[PositionerPrimaryAngle]", series,
                         show=["PositionerPrimaryAngle", "InstanceNumber", "PatientID", "StudyInstanceUID",
                               "FrameOfReferenceUID", "SeriesInstanceUID", "SpecificCharacterSet"])
        if not rows:
            raise errors.NotFound(f"no projection instances under {series}; import them with 'dgf recon import'.")
        rows.sort(key=lambda r: int(r["values"]["InstanceNumber"] or 0))
        header = etree.fromstring(self.client.getxattr(rows[0]["path"], HEADER_XATTR))
        block = [e.text for e in header.iter("PrivateElement")
                 if e.get("creator") == CREATOR and e.get("tag", "").endswith("10")]
        if not block:
            raise errors.InvalidDicom(f"{rows[0]['path']} has no {CREATOR} geometry block.")
        shared = json.loads(block[0] or "{}")["geometry"]
        shared["angles_deg"] = [float(r["values"]["PositionerPrimaryAngle"]) for r in rows]
        if shape is not None:
            fov = [n * d for n, d in zip(shared["volume_shape"], shared["voxel_size"])]
            shared["volume_shape"] = list(shape)
            shared["voxel_size"] = [f / n for f, n in zip(fov, shape)]
            shared["volume_origin"] = None
        g = Geometry.from_dict(shared)
        from dgf.reader import ObjectRef

        resolved = self.client.downloads.resolve([r["path"] for r in rows])
        refs = {ref.path: ref for ref in ObjectRef.all_of(resolved)}
        # A sealed projection is reconstructed on a trusted site only, which is sent its key.
        where = {path: (ref.key, [s for s in ref.sites if ref.env is None or not self.client._site_info[s].untrusted])
                 for path, ref in refs.items()}
        seals = {ref.key: [base64.b64encode(ref.env.key).decode(), ref.env.salt.hex(), ref.env.size]
                 for ref in refs.values() if ref.env is not None}
        stuck = [path for path, (_, sites) in where.items() if not sites]
        if stuck:
            raise errors.UsageError(f"{stuck[0]} (and {len(stuck) - 1} more) is held only on untrusted sites, which "
                                    "cannot reconstruct; give its directory a copy on a trusted site ('dgf admin "
                                    "replicas set', then 'dgf fsck --repair').")
        jobs: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            jobs.setdefault(where[r["path"]][1][0], []).append(i)
        nx, ny, nz = g.volume_shape
        volume = np.zeros((nz, ny, nx), dtype=np.float32)
        lock = threading.Lock()
        failed: dict[str, tuple[list[int], str]] = {}
        worked: set[str] = set()                 # the sites whose partial volumes were summed

        def run(site: str, indices: list[int]) -> Callable[[], None]:
            def go() -> None:
                keys = [where[rows[i]["path"]][0] for i in indices]
                try:
                    if progress:
                        progress(f"site {site}: back-projecting {len(keys)} projections")
                    sealed = {k: seals[k] for k in keys if k in seals}
                    result, payload = self.client.site_link(site).call(
                        "recon.partial", resolved["caps"][site], wait_s=RECON_WAIT_S, keys=keys,
                        indices=indices, geometry=json.loads(g.to_json()), window=window,
                        **({"seals": sealed} if sealed else {}))
                    if list(result.get("shape") or []) != [nz, ny, nx] or len(payload) != nx * ny * nz * 4:
                        raise errors.ServerError(f"site {site} returned a partial volume of the wrong shape.")
                    part = np.frombuffer(payload, dtype=np.float32).reshape(nz, ny, nx)
                except errors.DgfError as exc:
                    self.client._drop_link(site, exc)
                    with lock:
                        failed[site] = (indices, str(exc))
                    return
                with lock:
                    np.add(volume, part, out=volume)
                    worked.add(site)
                if progress:
                    progress(f"site {site}: done")
            return go

        pending = jobs
        for attempt in range(1, 3):
            failed.clear()
            run_parallel(run(s, idx) for s, idx in pending.items())
            if not failed:
                break
            retry: dict[str, list[int]] = {}
            for site, (indices, why) in failed.items():
                for i in indices:
                    others = [s for s in where[rows[i]["path"]][1] if s != site]
                    if len(others) < attempt:
                        raise errors.TransportError(
                            f"site {site} failed during reconstruction ({why}); {len(indices)} of its "
                            "projections have no other replica, so the result would be incomplete.")
                    retry.setdefault(others[attempt - 1], []).append(i)
            pending = retry
        if failed:
            # The retry failed too: a sum without those projections is not a reconstruction.
            site, (indices, why) = sorted(failed.items())[0]
            raise errors.TransportError(
                f"site {site} failed during reconstruction ({why}) and no replica could stand in for "
                f"its {len(indices)} projections; nothing was stored.")
        values = rows[0]["values"]
        provenance = {"source_series": series, "source_series_uid": values.get("SeriesInstanceUID", ""),
                      "algorithm": "FDK (dgf, numpy)", "filter": window, "projections": len(rows),
                      "sites": sorted(worked), "geometry": json.loads(g.to_json())}
        files = volume_series(volume, g, provenance, {
            "PatientID": values.get("PatientID", ""), "PatientName": values.get("PatientID", ""),
            "StudyInstanceUID": values.get("StudyInstanceUID", ""),
            "FrameOfReferenceUID": values.get("FrameOfReferenceUID", ""),
            "SpecificCharacterSet": values.get("SpecificCharacterSet") or ""})
        report = UploadReport()
        items: list[tuple[str, bytes | None]] = [(f"slice {j + 1}", f) for j, f in enumerate(files)]
        prepared, caps = self.client.uploads._prepare(items, out, None, report,
                                       options=dataclasses.replace(self.client.upload_options(), derived=True))
        source_key = where[rows[0]["path"]][0]
        for p in prepared:
            p.xattrs = {"user.dgf.provenance": json.dumps(provenance)}
            p.derived_from = source_key
        self.client.uploads._store(prepared, caps, report, False)
        if report.failed:
            raise errors.DgfError(f"the reconstruction could not be stored: {report.failed[0].reason}")
        for path in sorted(set(old_files) - set(report.paths)):
            self.client.rm(path)
        return ReconResult(volume, g, report.paths, time.perf_counter() - t0, sorted(worked))

