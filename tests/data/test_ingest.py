"""`echocare-data ingest` and `card` on DICOM files made here with pydicom: identifying tags and burned-in text
never reach the dataset, the scan sector does, cine loops are sampled and deduplicated, near-empty frames and
corrupt files are dropped with a reason."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydicom import dcmread, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from echocare_core.cli.data import main as data_main
from echocare_core.data.contract import read_manifest, verify_dataset
from echocare_core.data.ingest import IngestSettings, data_card, ingest, load_secret, pseudonym
from echocare_core.synthetic.ultrasound import generate_image

IDENTIFYING = (
    "DOE",
    "JANE",
    "ROE",
    "RICHARD",
    "MRN4711",
    "MRN0815",
    "19610203",
    "ACC998877",
    "ELSEWHERE",
    "OPERATORX",
    "REFERRERY",
)
OFFSET = (40, 70)  # where the 128 x 128 scan sits in the 220 x 260 screen


def _scan(seed: int) -> np.ndarray:
    return generate_image(np.random.default_rng(seed), 128, "cardiac_sector").image


def _screen(scan: np.ndarray, rgb: bool = False) -> np.ndarray:
    """What the scanner exports: the scan on a black screen with the patient's name burned in above it, a ruler
    on its right, an ID in the empty corner beside the sector (inside its bounding box), and a colour bar."""
    screen = Image.new("RGB" if rgb else "L", (260, 220), 0)
    y, x = OFFSET
    screen.paste(Image.fromarray(scan).convert(screen.mode), (x, y))
    draw = ImageDraw.Draw(screen)
    white = (255, 255, 255) if rgb else 255
    draw.text((4, 4), "DOE^JANE 19610203 MRN4711", fill=white)
    draw.text((x + 2, y + 2), "MRN4711", fill=white)  # in the sector's box, outside the fan
    for tick in range(y, y + 128, 8):
        draw.line([(x + 140, tick), (x + 146, tick)], fill=white)
    if rgb:
        for row in range(100):
            draw.line([(240, 60 + row), (250, 60 + row)], fill=(255 - 2 * row, 0, 2 * row))
    return np.asarray(screen)


def _dicom(path, frames, photometric="MONOCHROME2", patient=("DOE^JANE", "MRN4711"), data_type=1, jpeg=False):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    arr = np.asarray(frames)
    ds.set_pixel_data(arr, photometric, 8)
    ds.SOPClassUID = uid.UltrasoundMultiFrameImageStorage if len(frames) > 1 else uid.UltrasoundImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        uid.generate_uid(),
        uid.generate_uid(),
        uid.generate_uid(),
    )
    ds.Modality = "US"
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate, ds.AccessionNumber, ds.StudyDate = "19610203", "ACC998877", "20260101"
    ds.InstitutionName, ds.OperatorsName, ds.ReferringPhysicianName = "St Elsewhere", "OPERATORX", "REFERRERY"
    ds.Manufacturer, ds.ManufacturerModelName, ds.TransducerData = "Acme", "US-9", ["C5-1", "abdomen"]
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.TransducerFrequency = 1, data_type, 5000
    ds.SequenceOfUltrasoundRegions = [region]
    if jpeg:  # JPEG baseline, YBR_FULL_422, as many scanners export
        parts = []
        for frame in arr.reshape(-1, *arr.shape[-3:]):
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, "JPEG", quality=95)
            parts.append(buf.getvalue())
        ds.PixelData = encapsulate(parts)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
        ds.PhotometricInterpretation, ds.LossyImageCompression = "YBR_FULL_422", "01"
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    src = tmp_path_factory.mktemp("archive") / "DOE^JANE MRN4711"  # folder names carry identifiers too
    src.mkdir()
    _dicom(src / "still.dcm", [_screen(_scan(1))])
    a, b = _screen(_scan(2)), _screen(_scan(3))
    _dicom(src / "cine.dcm", [a] * 20 + [b] * 10)  # frames 0, 10, 20 sampled; 10 repeats 0
    _dicom(src / "doppler.dcm", [_screen(_scan(4), rgb=True)], "RGB", ("ROE^RICHARD", "MRN0815"), data_type=2)
    _dicom(src / "jpeg.dcm", [_screen(_scan(5), rgb=True)], "RGB", ("ROE^RICHARD", "MRN0815"), jpeg=True)
    tiny = np.zeros((220, 260), np.uint8)
    tiny[100:120, 100:120] = np.random.default_rng(6).integers(20, 200, (20, 20))  # 400 pixels of "scan"
    _dicom(src / "empty.dcm", [tiny])
    _dicom(src / "broken.dcm", [_screen(_scan(7))])
    data = (src / "broken.dcm").read_bytes()
    (src / "broken.dcm").write_bytes(data[: len(data) // 2])
    (src / "notes.txt").write_text("DOE^JANE called back")
    (src / ".DS_Store").write_bytes(b"\0" * 64)  # system files are not even looked at
    return src


def _log(result):
    with result.log.open() as f:
        return {(r["source"].split("/")[-1], r["frame"]): r["outcome"] for r in csv.DictReader(f)}


def _row(result, source, frame=""):
    """The manifest row of what `source` (a file name) became."""
    name = _log(result)[(source, frame)].removeprefix("kept as ")
    (row,) = [r for r in read_manifest(result.out)[1] if r["image"] == name]
    return row


@pytest.fixture(scope="module")
def ingested(archive, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    secret, made = load_secret(root / "site.secret")
    assert made and (root / "site.secret").stat().st_mode & 0o777 == 0o600
    return ingest(archive, root / "dataset", secret), secret


def test_no_identifying_string_reaches_the_dataset(ingested):
    result, _ = ingested
    for path in result.out.rglob("*"):
        text = path.relative_to(result.out).as_posix().upper()
        assert not any(s in text for s in IDENTIFYING), path
        if path.is_file():
            data = path.read_bytes().upper()
            assert not any(s.encode() in data for s in IDENTIFYING), path
            if path.suffix == ".png":
                assert not Image.open(path).info  # no text chunks
    assert verify_dataset(result.out).ok


def test_the_sector_is_kept_and_burned_in_text_around_it_is_gone(ingested):
    result, _ = ingested
    first = np.asarray(Image.open(result.out / _row(result, "still.dcm")["image"]))
    scan = _scan(1)
    ys, xs = np.nonzero(scan)
    assert abs(first.shape[0] - (ys.max() - ys.min() + 1)) <= 3 and abs(first.shape[1] - (xs.max() - xs.min() + 1)) <= 3
    assert 0.95 < np.count_nonzero(first) / np.count_nonzero(scan) < 1.02  # the fan, and nothing else
    assert not first[:12, :45].any()  # the ID written beside the fan, inside its box
    assert first.max() < 250 or np.count_nonzero(first >= 250) < 20  # no ruler or text left
    doppler = np.asarray(Image.open(result.out / _row(result, "doppler.dcm")["image"]))
    assert doppler.ndim == 3 and doppler.shape[0] < 140 and doppler.shape[1] < 140  # colour bar cut away


def test_cine_sampling_dedup_near_empty_and_corrupt_files_are_counted_and_logged(ingested):
    result, _ = ingested
    assert result.images == 5 and result.files == 7  # still, 2 of 3 cine frames, doppler, jpeg (not .DS_Store)
    assert result.dropped == {"near-duplicate": 1, "near-empty": 1, "unreadable": 2}
    log = _log(result)
    assert log[("cine.dcm", "frame 10")] == "near-duplicate of a frame kept for the same patient"
    assert log[("cine.dcm", "frame 20")].startswith("kept as images/")
    assert log[("empty.dcm", "")] == "near-empty (< 1000 non-zero pixels)"
    assert log[("broken.dcm", "")].startswith("unreadable:") and "truncated" in log[("broken.dcm", "")]
    assert log[("notes.txt", "")].startswith("unreadable: not an image")
    assert result.log.parent == result.out.parent  # beside the dataset, not in it: it names source files
    assert result.log.stat().st_mode & 0o777 == 0o600


def test_pseudonyms_are_stable_per_patient_and_device_fields_are_kept(ingested, archive, tmp_path):
    result, secret = ingested
    rows = read_manifest(result.out)[1]
    jane, richard = pseudonym(secret, "PatientID:MRN4711"), pseudonym(secret, "PatientID:MRN0815")
    assert [
        _row(result, *k)["patient"]
        for k in (("still.dcm",), ("cine.dcm", "frame 0"), ("cine.dcm", "frame 20"), ("doppler.dcm",), ("jpeg.dcm",))
    ] == [jane] * 3 + [richard] * 2
    again = ingest(archive, tmp_path / "again", secret)
    assert [r["patient"] for r in read_manifest(again.out)[1]] == [r["patient"] for r in rows]
    other = ingest(archive, tmp_path / "other", b"another site's secret")
    assert not {r["patient"] for r in read_manifest(other.out)[1]} & {r["patient"] for r in rows}
    still = _row(result, "still.dcm")
    assert {k: still[k] for k in ("manufacturer", "model", "transducer", "frequency_mhz", "modality")} == {
        "manufacturer": "Acme",
        "model": "US-9",
        "transducer": "C5-1",
        "frequency_mhz": "5",
        "modality": "b-mode",
    }
    assert _row(result, "doppler.dcm")["modality"] == "doppler"


def test_the_data_card_has_counts_only(ingested, capsys):
    result, secret = ingested
    card = data_card(result.out)
    assert card["samples"] == 5 and card["patients"] == 2 and card["devices"] == {"Acme US-9": 5}
    assert card["modalities"] == {"b-mode": 4, "doppler": 1} and sum(card["splits"].values()) == 5
    text = str(card)
    assert pseudonym(secret, "PatientID:MRN4711") not in text and "images/" not in text
    assert data_main(["card", str(result.out), "--json", str(result.out.parent / "card.json")]) == 0
    assert "b-mode 4, doppler 1" in capsys.readouterr().out
    assert json.loads((result.out.parent / "card.json").read_text()) == card


def test_bad_input_is_refused_with_exit_code_2_and_nothing_written(archive, tmp_path, capsys):
    secret = ["--secret", str(tmp_path / "s.secret")]
    assert data_main(["ingest", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), *secret]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert data_main(["ingest", str(archive), "--out", str(tmp_path / "taken"), *secret]) == 2
    assert "exists" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ingest makes pretrain or classification"):
        IngestSettings(task="segmentation")
    (tmp_path / "short.secret").write_bytes(b"123")
    (tmp_path / "short.secret").chmod(0o600)
    assert (
        data_main(["ingest", str(archive), "--out", str(tmp_path / "y"), "--secret", str(tmp_path / "short.secret")])
        == 2
    )
    (tmp_path / "open.secret").write_bytes(b"0123456789abcdef")
    assert (
        data_main(["ingest", str(archive), "--out", str(tmp_path / "y"), "--secret", str(tmp_path / "open.secret")])
        == 2
    )
    assert "chmod 600" in capsys.readouterr().err
    assert data_main(["ingest", str(archive), "--out", str(tmp_path / "y"), *secret, "--task", "classification"]) == 2
    assert "needs the class folders listed" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))
    assert not (tmp_path / "s.secret").exists()  # usage errors are found before the secret is made


def test_plain_images_in_class_folders_make_a_classification_dataset(tmp_path):
    for i, label in enumerate(("benign", "benign", "malignant")):
        folder = tmp_path / "src" / label / f"case_{i}"
        folder.mkdir(parents=True)
        Image.fromarray(_screen(_scan(10 + i))).save(folder / "scan.png")
    (tmp_path / "src" / "loose.png").write_bytes((tmp_path / "src" / "benign" / "case_0" / "scan.png").read_bytes())
    (tmp_path / "src" / "DOE^JANE").mkdir()  # a folder that is not a listed class: never a label
    Image.fromarray(_screen(_scan(13))).save(tmp_path / "src" / "DOE^JANE" / "scan.png")
    Image.fromarray(_screen(_scan(14))).save(tmp_path / "src" / "benign" / "case_0" / "second.png")
    settings = IngestSettings(task="classification", classes=("benign", "malignant"))
    result = ingest(tmp_path / "src", tmp_path / "cls", b"0123456789abcdef", settings)
    rows = read_manifest(result.out)[1]
    assert [r["label"] for r in rows] == ["benign", "benign", "benign", "malignant"]
    assert len({r["patient"] for r in rows}) == 3  # one folder per patient below the class folders
    assert result.dropped == {"not in a class folder": 2} and verify_dataset(result.out).ok
    assert "DOE" not in (result.out / "dataset.yaml").read_text() + (result.out / "manifest.csv").read_text()
    flat = ingest(tmp_path / "src" / "benign" / "case_0", tmp_path / "flat", b"0123456789abcdef")
    assert len({r["patient"] for r in read_manifest(flat.out)[1]}) == 2  # files at the top: one patient each
    assert all(r["manufacturer"] == r["modality"] == "" for r in rows)  # no DICOM header: nothing known


def test_a_video_is_sampled_and_a_missing_pixel_handler_is_named(tmp_path):
    import av

    src = tmp_path / "src"
    src.mkdir()
    frames = [_screen(_scan(20), rgb=True)] * 10 + [_screen(_scan(21), rgb=True)] * 10
    with av.open(str(src / "loop.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 260, 220, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    _dicom(src / "jpegls.dcm", [_screen(_scan(22))])
    ds = dcmread(src / "jpegls.dcm")
    ds.file_meta.TransferSyntaxUID = uid.JPEGLSLossless  # no decoder for it in this environment
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 64])
    ds.save_as(src / "jpegls.dcm")
    result = ingest(src, tmp_path / "out", b"0123456789abcdef")
    log = _log(result)
    assert [log[("loop.mp4", f"frame {i}")][:7] for i in (0, 10)] == ["kept as"] * 2 and result.images == 2
    assert "JPEG-LS Lossless" in log[("jpegls.dcm", "")] and "pip install" in log[("jpegls.dcm", "")]


def test_in_a_cine_static_marks_go_and_moving_bright_anatomy_stays_and_a_bad_header_is_logged(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    frames = []
    for i in range(3):
        screen = _screen(_scan(30 + i)).copy()
        y, x = OFFSET
        screen[y + 90 : y + 94, x + 60 : x + 64] = 255  # a caliper mark that stays put inside the fan
        screen[y + 70 : y + 74, x + 50 + 4 * i : x + 54 + 4 * i] = 255  # a bright reflector that moves
        frames.append(screen)
    _dicom(src / "loop.dcm", frames * 10)  # frames 0, 10, 20 sampled: 0, 1, 2 of the cycle
    still = _screen(_scan(33)).copy()
    still[OFFSET[0] + 90 : OFFSET[0] + 94, OFFSET[1] + 60 : OFFSET[1] + 64] = 255  # in a still: kept (could be anatomy)
    _dicom(src / "still.dcm", [still])
    _dicom(src / "bad.dcm", [_screen(_scan(34))])
    ds = dcmread(src / "bad.dcm")
    del ds.SequenceOfUltrasoundRegions[0].TransducerFrequency
    ds.SequenceOfUltrasoundRegions[0].add_new(0x00186030, "LO", "5k00")  # written with a wrong VR, as some are
    ds.save_as(src / "bad.dcm")
    result = ingest(src, tmp_path / "out", b"0123456789abcdef", IngestSettings(dedup_bits=-1))
    log = _log(result)
    assert "unreadable DICOM header (ValueError" in log[("bad.dcm", "")]
    scan = _scan(30)
    top, left = np.nonzero(scan)[0].min(), np.nonzero(scan)[1].min()
    first = np.asarray(Image.open(result.out / _row(result, "loop.dcm", "frame 0")["image"]))
    assert not first[90 - top : 94 - top, 60 - left : 64 - left].any()  # the static mark is blanked
    assert (first[70 - top : 74 - top, 50 - left : 54 - left] == 255).all()  # the moving reflector is not
    kept = np.asarray(Image.open(result.out / _row(result, "still.dcm")["image"]))
    assert (kept == 255).sum() >= 16
