"""Helpers the tests share (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage

PATIENT = "Doe^Jane^Secret"


def write_dicom(
    path: Path,
    arr: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
    **elements: object,
) -> Path:
    """Write ``arr`` as an Explicit VR Little Endian DICOM file (Part 10 format)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    multi = arr.ndim == 4 or (arr.ndim == 3 and photometric.startswith("MONO"))
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    ds.PatientName = PATIENT
    ds.PatientID = "ID-12345"
    ds.set_pixel_data(arr, photometric, bits_stored)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path
