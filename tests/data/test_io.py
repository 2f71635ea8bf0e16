"""Tests for echocare_core.data.io: every file is written to tmp_path, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import PATIENT
from helpers import write_dicom as _write_dicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UltrasoundImageStorage,
    generate_uid,
)

from echocare_core.data import io
from echocare_core.data.io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    count_frames,
    is_image_file,
    nonzero_pixels,
    read_clip,
    read_image,
    sampled_frames,
)


def _gradient(h: int = 32, w: int = 48) -> np.ndarray:
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) % 256).astype(np.uint8)


def _write_j2k_garbage(path: Path) -> Path:
    """A file that claims JPEG 2000 but carries raw (non-J2K) encapsulated bytes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = PATIENT
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([bytes(range(256))])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- helpers


def test_sampled_frames() -> None:
    assert sampled_frames(25, 10) == [0, 10, 20]
    assert sampled_frames(1) == [0]
    assert sampled_frames(0) == []
    assert sampled_frames(5, 1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="step"):
        sampled_frames(10, 0)


def test_nonzero_pixels() -> None:
    img = np.zeros((3, 4, 5), np.uint8)
    img[0, 0, 0] = 1
    img[2, 0, 0] = 9  # same pixel, another channel: counted once
    img[1, 3, 4] = 7
    assert nonzero_pixels(img) == 2
    assert nonzero_pixels(img[1]) == 1
    with pytest.raises(ValueError, match="shape"):
        nonzero_pixels(np.zeros(4, np.uint8))


def test_is_image_file(tmp_path: Path) -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"} == IMAGE_SUFFIXES
    assert is_image_file(tmp_path / "A.PNG")  # suffix only, need not exist
    assert is_image_file(tmp_path / "b.Dicom")
    assert not is_image_file(tmp_path / "notes.txt")
    dicom = _write_dicom(tmp_path / "IM0001", _gradient())
    assert is_image_file(dicom)
    uid_named = _write_dicom(tmp_path / "1.2.840.113619.2", _gradient())
    assert is_image_file(uid_named)
    other = tmp_path / "README"
    other.write_bytes(b"x" * 200)
    assert not is_image_file(other)
    img = read_image(dicom)  # sniffed as DICOM, not handed to Pillow
    assert img.shape == (1, 32, 48)


# --------------------------------------------------------------------------- Pillow


def test_png_8bit_gray(tmp_path: Path) -> None:
    arr = _gradient()
    Image.fromarray(arr).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.dtype == np.uint8 and img.shape == (1, 32, 48)
    np.testing.assert_array_equal(img[0], arr)
    assert img.flags.writeable and img.flags.c_contiguous
    img3 = read_image(tmp_path / "g.png", channels=3)
    assert img3.shape == (3, 32, 48)
    np.testing.assert_array_equal(img3[2], arr)
    assert count_frames(tmp_path / "g.png") == 1


def test_png_16bit_is_min_max_scaled(tmp_path: Path) -> None:
    arr = np.linspace(1000, 5000, 32 * 48).reshape(32, 48).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.dtype == np.uint8 and img.shape == (1, 32, 48)
    assert img.min() == 0 and img.max() == 255
    assert np.all(np.diff(img[0].ravel().astype(int)) >= 0)  # order kept


def test_jpg_rgb_to_gray_and_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = 200  # flat red: JPEG keeps it almost exact
    Image.fromarray(rgb).save(tmp_path / "c.JPG", quality=95)
    gray = read_image(tmp_path / "c.JPG")
    assert gray.shape == (1, 32, 48)
    assert abs(int(np.median(gray)) - round(200 * 0.299)) <= 3  # luminance, not mean
    col = read_image(tmp_path / "c.JPG", channels=3)
    assert col.shape == (3, 32, 48)
    assert abs(int(np.median(col[0])) - 200) <= 3 and np.median(col[1]) <= 3


def test_bmp_and_tiff(tmp_path: Path) -> None:
    arr = _gradient()
    Image.fromarray(arr).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "a.bmp")[0], arr)
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "a.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif")[0], arr)
    arr16 = (arr.astype(np.uint16) * 100).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "a16.tiff")
    img16 = read_image(tmp_path / "a16.tiff")
    assert img16.max() == 255 and img16.min() == 0


def test_palette_and_rgba_png(tmp_path: Path) -> None:
    arr = _gradient()
    Image.fromarray(arr).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png", channels=3).shape == (3, 32, 48)
    rgba = np.dstack([np.stack([arr] * 3, -1), np.full_like(arr, 128)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png")[0], arr)


def test_truncated_png_and_missing_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="not found"):
        count_frames(tmp_path / "nope.dcm")


def test_bad_arguments(tmp_path: Path) -> None:
    Image.fromarray(_gradient()).save(tmp_path / "g.png")
    with pytest.raises(ValueError, match="channels"):
        read_image(tmp_path / "g.png", channels=2)
    with pytest.raises(ValueError, match="frame_step"):
        read_image(tmp_path / "g.png", frame_step=0)
    with pytest.raises(ValueError, match="frame_pick"):
        read_image(tmp_path / "g.png", frame_pick=1.0)


# --------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2_8bit(tmp_path: Path) -> None:
    arr = _gradient()
    path = _write_dicom(tmp_path / "m2.dcm", arr)
    img = read_image(path)
    assert img.dtype == np.uint8 and img.shape == (1, 32, 48)
    np.testing.assert_array_equal(img[0], arr)
    assert read_image(path, channels=3).shape == (3, 32, 48)
    assert count_frames(path) == 1


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    arr = _gradient()
    path = _write_dicom(tmp_path / "m1.dcm", arr, "MONOCHROME1")
    np.testing.assert_array_equal(read_image(path)[0], 255 - arr)


def test_dicom_16bit_window(tmp_path: Path) -> None:
    arr = np.array([[0, 1000, 1500, 2000, 4095]] * 4, dtype=np.uint16)
    path = _write_dicom(tmp_path / "w.dcm", arr, bits_stored=12, WindowCenter=1500, WindowWidth=1001)
    row = read_image(path)[0, 0]
    assert row[0] == 0 and row[1] == 0  # at/below the window floor
    assert 120 <= row[2] <= 135  # the centre maps to mid-grey
    assert row[3] == 255 and row[4] == 255  # above the window
    # Without a window the full range is min-max scaled.
    path = _write_dicom(tmp_path / "nw.dcm", arr, bits_stored=12)
    row = read_image(path)[0, 0]
    assert row[0] == 0 and row[4] == 255 and 0 < row[1] < row[2] < row[3] < 255


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    item = Dataset()
    item.add_new(0x00283002, "US", [400, 0, 16])  # LUTDescriptor: 400 entries from 0, 16 bit
    item.add_new(0x00283006, "US", list(range(0, 4000, 10)))  # LUTData
    arr = np.array([[0, 100, 200, 300]] * 4, dtype=np.uint16)
    path = _write_dicom(tmp_path / "lut.dcm", arr, bits_stored=12, VOILUTSequence=Sequence([item]))
    np.testing.assert_array_equal(read_image(path)[0, 0], [0, 85, 170, 255])


def test_dicom_without_file_meta(tmp_path: Path) -> None:
    ds = Dataset()
    ds.set_pixel_data(_gradient(), "MONOCHROME2", 8)
    del ds.file_meta  # bare Implicit VR dataset, no preamble: read with force=True
    dcmwrite(tmp_path / "bare.dcm", ds, implicit_vr=True, little_endian=True)
    np.testing.assert_array_equal(read_image(tmp_path / "bare.dcm")[0], _gradient())


def test_dicom_unsupported_photometric(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "hsv.dcm", _gradient(), PhotometricInterpretation="HSV")
    with pytest.raises(ImageReadError, match="photometric interpretation 'HSV'"):
        read_image(path)


def test_dicom_rgb_and_ybr_full(tmp_path: Path) -> None:
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 120, 250
    img = read_image(_write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"), channels=3)
    np.testing.assert_array_equal(img, rgb.transpose(2, 0, 1))
    gray = read_image(tmp_path / "rgb.dcm")
    assert gray.shape == (1, 32, 48)
    assert abs(int(gray[0, 0, 0]) - round(0.299 * 10 + 0.587 * 120 + 0.114 * 250)) <= 1
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    back = read_image(_write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"), channels=3)
    assert np.abs(back.astype(int) - rgb.transpose(2, 0, 1)).max() <= 2


def test_dicom_multiframe_pick(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 8), 10 * i + 1, np.uint8) for i in range(25)])  # value 10*i+1
    path = _write_dicom(tmp_path / "cine.dcm", frames)
    assert count_frames(path) == 25

    def picked(**kw: object) -> int:
        img = read_image(path, frame_step=10, **kw)
        assert img.shape == (1, 8, 8)
        return (int(img[0, 0, 0]) - 1) // 10

    assert picked() == 0
    assert picked(frame_pick=0.0) == 0
    assert picked(frame_pick=0.5) == 10
    assert picked(frame_pick=0.99) == 20
    assert (int(read_image(path, frame_step=1, frame_pick=0.5)[0, 0, 0]) - 1) // 10 == 12


def test_j2k_without_handler_names_syntax_and_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_j2k_garbage(tmp_path / "j2k.dcm")
    # Hide whatever J2K plugin is installed (Pillow/OpenJPEG here) so pydicom sees
    # none; the plugins it lists as missing (pylibjpeg, gdcm) stay listed.
    monkeypatch.setattr(get_decoder(JPEG2000), "_available", {})
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    msg = str(info.value)
    assert "JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)" in msg
    assert "pylibjpeg-openjpeg" in msg and "python-gdcm" in msg and "pip install" in msg
    assert PATIENT not in msg and "Doe" not in msg


def test_j2k_corrupt_with_handler_installed(tmp_path: Path) -> None:
    path = _write_j2k_garbage(tmp_path / "j2k.dcm")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    msg = str(info.value)
    assert "1.2.840.10008.1.2.4.91" in msg and "j2k.dcm" in msg
    assert PATIENT not in msg and "Doe" not in msg


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_dicom_message_has_no_patient_data(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "t.dcm", _gradient())
    data = path.read_bytes()
    path.write_bytes(data[:-500])  # cut into the pixel data
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert "t.dcm" in str(info.value) and PATIENT not in str(info.value)
    (tmp_path / "u.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "u.dcm")
    assert "Doe" not in str(info.value)


# --------------------------------------------------------------------------- clips


def _numbered_frames(n: int) -> np.ndarray:
    return np.stack([np.full((6, 10), i, np.uint8) for i in range(n)])  # frame i holds value i


def test_read_clip_picks_evenly_spaced_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_dicom(tmp_path / "cine.dcm", _numbered_frames(25))
    decoded: list[list[int]] = []
    real = io.iter_pixels

    def spy(*args: object, indices: list[int], **kwargs: object) -> object:
        decoded.append(list(indices))
        return real(*args, indices=indices, **kwargs)

    monkeypatch.setattr(io, "iter_pixels", spy)
    clip = read_clip(path, frames=4)
    assert clip.shape == (4, 1, 6, 10) and clip.dtype == np.uint8
    assert clip[:, 0, 0, 0].tolist() == [3, 9, 15, 21]  # floor((t + 0.5) * 25 / 4)
    assert decoded == [[3, 9, 15, 21]]  # only those frames were decoded
    decoded.clear()
    assert read_clip(path, frames=25)[:, 0, 0, 0].tolist() == list(range(25))
    assert read_clip(path, channels=3, frames=2).shape == (2, 3, 6, 10)
    short = _write_dicom(tmp_path / "short.dcm", _numbered_frames(5))
    decoded.clear()
    assert read_clip(short, frames=8)[:, 0, 0, 0].tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    assert decoded == [[0, 1, 2, 3, 4]]  # each frame once


def test_read_clip_of_a_still_image_repeats_it(tmp_path: Path) -> None:
    Image.fromarray(_gradient()).save(tmp_path / "g.png")
    clip = read_clip(tmp_path / "g.png", frames=5)
    assert clip.shape == (5, 1, 32, 48)
    assert all((frame[0] == _gradient()).all() for frame in clip)
    one = read_clip(_write_dicom(tmp_path / "one.dcm", _gradient()), channels=3, frames=3)
    assert one.shape == (3, 3, 32, 48) and (one == _gradient()).all()
    assert read_image(tmp_path / "one.dcm").shape == (1, 32, 48)


def test_read_clip_errors_name_the_file_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frames"):
        read_clip(tmp_path / "any.dcm", frames=0)
    with pytest.raises(ValueError, match="channels"):
        read_clip(tmp_path / "any.dcm", channels=2)
    with pytest.raises(ImageReadError, match="not found"):
        read_clip(tmp_path / "nope.dcm")
    path = _write_dicom(tmp_path / "cut.dcm", _numbered_frames(20) + 100)
    path.write_bytes(path.read_bytes()[:-200])  # the last frames are missing
    with pytest.raises(ImageReadError) as info:
        read_clip(path, frames=20)
    msg = str(info.value)
    assert "cut.dcm" in msg and PATIENT not in msg and "Doe" not in msg and "119" not in msg
