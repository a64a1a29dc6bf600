"""DICOM handling: raw element walker, PS3.15 Annex E de-identification, XML header, identity."""
