import itertools
import shutil

import numpy as np
import pytest
import torch
from helpers import write_dicom
from PIL import Image

from echocare_core.data.ontology import load_ontology
from echocare_core.data.pretrain import (
    AugmentConfig,
    MaskGenerator,
    PathTable,
    PretrainDataset,
    ShardedSampler,
    build_index,
    collate_skipping,
)


@pytest.fixture(scope="module")
def ontology():
    return load_ontology()


def test_path_table_round_trip():
    items = ["a.png", "dir/ü/b.dcm", "", "x" * 300]
    table = PathTable.from_strings(items)
    assert len(table) == 4 and [table[i] for i in range(4)] == items
    assert table.data.dtype == np.uint8 and table.offsets.dtype == np.int64


def test_index_from_manifest_and_plain_folder(pretrain_data, ontology, tmp_path):
    index = build_index(pretrain_data, ontology)
    rows = sum(len((p / "manifest.csv").read_text().splitlines()) - 1 for p in pretrain_data)
    assert len(index) == rows and index.anatomy.dtype == np.int32
    assert (index.anatomy == -1).any() and (index.anatomy >= 0).any()  # some images carry no label
    plain = tmp_path / "plain" / "nested"
    plain.mkdir(parents=True)
    for src in sorted((pretrain_data[0] / "images").iterdir())[:3]:
        shutil.copy(src, plain / src.name)
    (plain / "notes.txt").write_text("not an image")
    folder_index = build_index([tmp_path / "plain"], ontology)
    assert len(folder_index) == 3 and (folder_index.anatomy == -1).all()


def test_bad_anatomy_label_names_file_row_and_fix(tmp_path, ontology):
    (tmp_path / "manifest.csv").write_text("image,anatomy\na.png,Neck/Thyroid\nb.png,Neck/Thyroidd\n")
    with pytest.raises(ValueError, match=r"manifest.csv, row 3, column 'anatomy'.*Did you mean 'Neck/Thyroid'"):
        build_index([tmp_path], ontology)
    (tmp_path / "manifest.csv").write_text(f"image\nsub/a.png\n{tmp_path / 'abs.png'}\n")
    index = build_index([tmp_path], ontology)
    assert [index.paths[i] for i in range(2)] == [str(tmp_path / "sub" / "a.png"), str(tmp_path / "abs.png")]
    with pytest.raises(FileNotFoundError, match="not-there"):
        build_index([tmp_path / "not-there"], ontology)
    (tmp_path / "manifest.csv").write_text("path\na.png\n")
    with pytest.raises(ValueError, match="missing required column 'image'"):
        build_index([tmp_path], ontology)


def test_mask_generator_ratio_and_grid():
    gen = MaskGenerator(img_size=64, mask_patch_size=16, model_patch_size=4, ratio=0.5)
    mask = gen(np.random.default_rng(0))
    assert mask.shape == (16, 16) and mask.mean() == 0.5
    assert (mask.reshape(4, 4, 4, 4).std(axis=(1, 3)) == 0).all()  # whole mask patches
    with pytest.raises(ValueError, match="mask_patch_size=10"):
        MaskGenerator(64, 10, 4, 0.5)


def _dataset(index, augment=AugmentConfig(), min_nonzero=1000):
    return PretrainDataset(
        index,
        img_size=64,
        channels=1,
        masks=MaskGenerator(64, 16, 4, 0.5),
        augment_cfg=augment,
        scale=(0.5, 0.5),
        frame_step=10,
        min_nonzero=min_nonzero,
        seed=1,
    )


def test_corrupt_and_near_empty_images_are_skipped_not_fatal(tmp_path, ontology, pretrain_data):
    shutil.copy(sorted((pretrain_data[0] / "images").iterdir())[0], tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    ds = _dataset(build_index([tmp_path], ontology))
    batch = collate_skipping([ds[0, i] for i in range(len(ds))])
    assert batch["image"].shape == (1, 1, 64, 64)
    kinds = sorted((k, p.rsplit("/", 1)[-1]) for k, p, _ in batch["skipped"])
    assert kinds == [("near-empty", "black.png"), ("unreadable", "broken.png")]
    assert collate_skipping([ds[0, i] for i in range(len(ds)) if "skip" in ds[0, i]])["image"] is None


def test_samples_are_deterministic_per_epoch_and_normalised(pretrain_data, ontology):
    ds = _dataset(build_index(pretrain_data, ontology))
    a, b = ds[0, 5], ds[0, 5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["token_mask"], b["token_mask"])
    assert a["image"].min() >= -1.0 and a["image"].max() <= 1.0
    assert not torch.equal(ds[1, 5]["image"], a["image"])


def test_multiframe_dicom_uses_every_kth_frame(tmp_path, ontology):
    frames = np.stack([np.full((64, 64), 8 * (i + 1), np.uint8) for i in range(25)])  # frame i has value 8(i+1)
    write_dicom(tmp_path / "clip.dcm", frames, NumberOfFrames=25)
    index = build_index([tmp_path], ontology, frame_step=10)
    assert len(index) == 3 and len(index.paths) == 1  # frames 0, 10 and 20 are samples of their own
    ds = _dataset(index, augment=None)
    seen = [round(float(ds[0, i]["image"].mean()) * 0.5 * 255 + 0.5 * 255) // 8 - 1 for i in range(3)]
    assert seen == [0, 10, 20]


def test_sampler_shards_by_rank_and_resumes_anywhere():
    ranks = [ShardedSampler(103, r, 2, seed=4) for r in range(2)]
    streams = [list(itertools.islice(s, 153)) for s in ranks]  # three epochs of 51 per rank
    for epoch in range(3):
        shares = [[i for e, i in s if e == epoch] for s in streams]
        assert len(shares[0]) == len(shares[1]) == 51 and not set(shares[0]) & set(shares[1])
    assert [i for e, i in streams[0] if e == 0] != [i for e, i in streams[0] if e == 1]
    ranks[0].start_at(70)  # mid-way through the second epoch
    assert list(itertools.islice(ranks[0], 83)) == streams[0][70:]
