"""The identity vault: patient identity sealed at rest, one data key per patient.

Identity records are sealed with AES-GCM under the patient's data key (the object key is the
associated data, so a record cannot be moved to another object); data keys are wrapped by the
key-encryption key derived from the vault key file.  Destroying a patient's data key erases that
patient (crypto-erasure).  Pseudonyms come from the keyed HMAC in :class:`dgf.crypto.VaultKeys`.
"""

from __future__ import annotations

import os
import threading

from dgf import crypto, errors
from metaserver.engine import MetaEngine
from metaserver.vaultkey import VaultSource


class Vault:
    def __init__(self, engine: MetaEngine, keys: crypto.VaultKeys) -> None:
        self.engine = engine
        self.keys = keys
        self._data_keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def data_key(self, patient: str, create: bool) -> bytes:
        with self._lock:
            key = self._data_keys.get(patient)
        if key is not None:
            return key
        wrapped = self.engine.patient_key(patient)
        if wrapped is None:
            if not create:
                raise errors.NotFound("no identity is held for this patient (erased or never uploaded).")
            wrapped = self.engine.add_patient_key(patient, self.keys.wrap(os.urandom(32), patient.encode()))
        key = self.keys.unwrap(wrapped, patient.encode())
        with self._lock:
            self._data_keys[patient] = key
        return key

    def ensure_keys(self, patients: set[str]) -> None:
        """Make sure each patient has a data key, creating the missing ones in one transaction."""
        with self._lock:
            missing = sorted(p for p in patients if p not in self._data_keys)
        if not missing:
            return
        stored = self.engine.patient_keys(missing)
        new = {p: self.keys.wrap(os.urandom(32), p.encode()) for p in missing if p not in stored}
        self.engine.add_patient_keys(new)
        stored = self.engine.patient_keys(missing)  # a concurrent upload's key wins, consistently
        with self._lock:
            for p, wrapped in stored.items():
                self._data_keys[p] = self.keys.unwrap(wrapped, p.encode())

    def seal(self, patient: str, object_key: str, record: bytes) -> bytes:
        return crypto.seal(self.data_key(patient, create=True), record, object_key.encode())

    def open(self, object_key: str) -> bytes | None:
        found = self.engine.identity(object_key)
        if found is None:
            return None
        patient, wrapped, sealed = found
        key = self.keys.unwrap(wrapped, patient.encode())
        return crypto.unseal(key, sealed, object_key.encode())

    def rotate(self, source: VaultSource) -> int:
        """Replace the key-encryption key: the new key is written beside the old, every data
        key is re-wrapped in one transaction, then the new key takes the old one's place (a
        metaserver stopped in between finishes it at start).  Pseudonyms do not change."""
        import os as _os

        if source.env is not None:
            raise errors.UsageError(f"the vault key comes from {source.describe()}, which this server cannot "
                                    "rewrite; use a key file to rotate.")
        new = crypto.VaultKeys(self.keys.secret, _os.urandom(64))
        nxt = source.path.with_name(source.path.name + ".next")
        crypto.write_private(nxt, source.encode(new, source.passphrase))
        old = self.keys
        n = self.engine.rewrap_patient_keys(lambda wrapped, label: new.wrap(old.unwrap(wrapped, label), label),
                                            new.kek_id)
        _os.replace(nxt, source.path)
        self.keys = new
        return n

    def study_keys(self, wanted: dict[str, str], create: bool) -> dict[str, tuple[str, bytes]]:
        """(patient, data key) of studies ``{study: patient}`` (objects sealed for untrusted sites),
        each wrapped by its patient's data key; with ``create``, missing ones are made.  A study
        recorded for another patient is refused: a key seals one patient's objects."""
        stored = self.engine.study_keys(sorted(wanted))
        for study, (patient, _) in stored.items():
            if wanted[study] and wanted[study] != patient:
                raise errors.PermissionDenied(f"study {study[:40]} belongs to another patient in this archive; "
                                              "its key was not released.")
        missing = sorted(s for s in wanted if s not in stored)
        if missing and create:
            self.ensure_keys({wanted[s] for s in missing})
            self.engine.add_study_keys({s: (wanted[s], crypto.seal(self.data_key(wanted[s], create=False),
                                                                   os.urandom(32), b"study\0" + s.encode()))
                                        for s in missing})
            stored = self.engine.study_keys(sorted(wanted))   # a concurrent upload's key wins
        out = {}
        for study, (patient, wrapped) in stored.items():
            try:
                key = self.data_key(patient, create=False)
            except errors.NotFound:
                continue                           # the patient was erased: so is the study key
            out[study] = (patient, crypto.unseal(key, wrapped, b"study\0" + study.encode()))
        return out

    def erase(self, patient: str) -> int:
        with self._lock:
            self._data_keys.pop(patient, None)
        return self.engine.erase_patient(patient)
