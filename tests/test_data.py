"""Tests of data/: layouts, pairing, odd image/mask files, augmentation, splits, loaders, demo data.

Everything is generated into tmp_path with cv2.imwrite at 32-64 px; the Kvasir test reads the shared
copy by path and is skipped where it is absent.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

import data.demo as demo_mod
from data import (
    AugConfig,
    DatasetIndex,
    Sample,
    SegDataset,
    aug_preset,
    build_loader,
    find_dataset,
    load_image,
    load_mask,
    make_demo_dataset,
    split_train_val,
)
from data.images import resize_mask
from data.transforms import build_augmentation, resize_pair
from core.errors import UserError

KVASIR = "/work/shared/data/kvasir_seg"


# ---------------------------------------------------------------- helpers

def _img(h=40, w=48, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _mask(h=40, w=48):
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 4: w // 2] = 255
    return m


def _write(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), arr), path
    return str(path)


def _pair_folder(img_dir, mask_dir, names, img_ext=".jpg", mask_ext=".png"):
    for i, n in enumerate(names):
        _write(os.path.join(img_dir, n + img_ext), _img(seed=i))
        _write(os.path.join(mask_dir, n + mask_ext), _mask())


CAM = ["COD10K-CAM-1-Aquatic-1-BatFish-2", "COD10K-CAM-2-Terrestrial-23-Cat-1"]
NONCAM = ["COD10K-NonCAM-5-Background-1-Bird-0"]


def _cod10k(root, train="Train", image="Image", gt="GT_Object", test="Test"):
    _pair_folder(os.path.join(root, train, image), os.path.join(root, train, gt), CAM + NONCAM)
    _pair_folder(os.path.join(root, test, image), os.path.join(root, test, gt), CAM[:1] + NONCAM)
    return str(root)


def _sinet(root, tests=("CAMO", "COD10K")):
    _pair_folder(os.path.join(root, "TrainDataset", "Imgs"), os.path.join(root, "TrainDataset", "GT"),
                 ["b", "a", "c"])
    for t in tests:
        _pair_folder(os.path.join(root, "TestDataset", t, "Imgs"), os.path.join(root, "TestDataset", t, "GT"),
                     [f"{t}-1", f"{t}-2"], img_ext=".png")
    return str(root)


def _check_item(item, size):
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, size, size) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["orig_size"].dtype == torch.int64 and item["orig_size"].shape == (2,)
    assert isinstance(item["name"], str) and isinstance(item["image_path"], str)
    assert isinstance(item["mask_path"], str)


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("names", [("Train", "Image", "GT_Object", "Test"), ("train", "image", "GT", "test")])
def test_cod10k_layout_and_cam_filter(tmp_path, names):
    root = _cod10k(tmp_path / "COD10K-v3", *names)
    idx = find_dataset(root)
    assert isinstance(idx, DatasetIndex) and idx.layout == "cod10k"
    assert [s.name for s in idx.train] == sorted(CAM)
    assert list(idx.tests) == ["COD10K"] and [s.name for s in idx.tests["COD10K"]] == CAM[:1]
    s = idx.train[0]
    assert isinstance(s, Sample) and s.image.endswith(s.name + ".jpg") and s.mask.endswith(s.name + ".png")

    every = find_dataset(root, include_noncam=True)
    assert [s.name for s in every.train] == sorted(CAM + NONCAM)
    assert len(every.tests["COD10K"]) == 2

    parent = find_dataset(str(tmp_path))  # the folder holding COD10K-v3/
    assert parent.layout == "cod10k" and parent.train == idx.train


def test_sinet_layout(tmp_path):
    idx = find_dataset(_sinet(tmp_path / "data"))
    assert idx.layout == "sinet"
    assert [s.name for s in idx.train] == ["a", "b", "c"]
    assert list(idx.tests) == ["CAMO", "COD10K"]
    assert [s.name for s in idx.tests["CAMO"]] == ["CAMO-1", "CAMO-2"]
    assert idx.root == str(tmp_path / "data")


def test_sinet_without_test_sets_and_mixed_extensions(tmp_path):
    tr = tmp_path / "TrainDataset"
    for i, (ie, me) in enumerate([(".png", ".png"), (".bmp", ".bmp"), (".tif", ".jpg"), (".jpeg", ".tiff")]):
        _write(tr / "Imgs" / f"x{i}{ie}", _img(seed=i))
        _write(tr / "GT" / f"x{i}{me}", _mask())
    (tr / "Imgs" / ".DS_Store").write_bytes(b"junk")
    (tr / "Imgs" / "notes.txt").write_text("not an image")
    idx = find_dataset(str(tmp_path))
    assert [s.name for s in idx.train] == ["x0", "x1", "x2", "x3"] and idx.tests == {}


def test_missing_mask_names_files_and_folder(tmp_path):
    root = _sinet(tmp_path)
    os.remove(tmp_path / "TrainDataset" / "GT" / "b.png")
    with pytest.raises(UserError) as e:
        find_dataset(root)
    msg = str(e.value)
    assert "b.jpg" in msg and str(tmp_path / "TrainDataset" / "Imgs") in msg and "\n" not in msg


def test_empty_or_unknown_folder(tmp_path):
    with pytest.raises(UserError) as e:
        find_dataset(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and "COD10K" in msg and "SINet" in msg and "demo" in msg
    with pytest.raises(UserError, match="does not exist"):
        find_dataset(str(tmp_path / "nope"))
    (tmp_path / "TrainDataset" / "Imgs").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        find_dataset(str(tmp_path))


def test_only_noncam_and_duplicate_stems(tmp_path):
    a = tmp_path / "a"
    _pair_folder(str(a / "Train" / "Image"), str(a / "Train" / "GT_Object"), NONCAM)
    with pytest.raises(UserError, match="include-noncam"):
        find_dataset(str(a))
    b = _sinet(tmp_path / "b", tests=())
    _write(os.path.join(b, "TrainDataset", "Imgs", "a.png"), _img())
    with pytest.raises(UserError, match="two files named 'a'"):
        find_dataset(b)


# ---------------------------------------------------------------- reading files

def test_load_image_variants(tmp_path):
    rgb = _img(8, 10)
    bgr = rgb[:, :, ::-1]
    assert np.array_equal(load_image(_write(tmp_path / "c.png", bgr)), rgb)
    grey = _img(8, 10, channels=1)
    g = load_image(_write(tmp_path / "g.png", grey))
    assert g.shape == (8, 10, 3) and g.dtype == np.uint8 and np.array_equal(g[:, :, 1], grey)
    rgba = np.dstack([bgr, np.full((8, 10), 7, np.uint8)])
    assert np.array_equal(load_image(_write(tmp_path / "a.png", rgba)), rgb)
    deep = (rgb.astype(np.uint16) * 257)[:, :, ::-1]
    d = load_image(_write(tmp_path / "d.png", deep))
    assert d.dtype == np.uint8 and np.array_equal(d, rgb)
    d16 = load_image(_write(tmp_path / "d.tif", np.full((4, 4), 65535, np.uint16)))
    assert d16.shape == (4, 4, 3) and (d16 == 255).all()


def test_load_mask_variants(tmp_path):
    m = _mask(40, 48)
    truth = (m > 127).astype(np.uint8)
    noisy = cv2.imwrite(str(tmp_path / "n.jpg"), m, [cv2.IMWRITE_JPEG_QUALITY, 40])
    assert noisy
    raw = cv2.imread(str(tmp_path / "n.jpg"), cv2.IMREAD_GRAYSCALE)
    assert len(np.unique(raw)) > 2  # really noisy
    got = load_mask(tmp_path / "n.jpg")
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1} and (got != truth).mean() < 0.02

    m16 = np.where(m > 0, 40000, 100).astype(np.uint16)  # 40000/257 = 156 > 127; 100 -> 0
    assert np.array_equal(load_mask(_write(tmp_path / "m16.png", m16)), truth)
    colour = np.dstack([m, m, m])
    assert np.array_equal(load_mask(_write(tmp_path / "c.png", colour)), truth)

    big = cv2.resize(m, (96, 80), interpolation=cv2.INTER_NEAREST)
    resized = load_mask(_write(tmp_path / "big.png", big), size=(40, 48))
    assert resized.shape == (40, 48) and set(np.unique(resized)) <= {0, 1} and (resized != truth).mean() < 0.02


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    for fn in (load_image, load_mask):
        with pytest.raises(UserError, match="bad.png"):
            fn(bad)
    with pytest.raises(UserError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


# ---------------------------------------------------------------- dataset and augmentation

def _odd_samples(tmp_path):
    """Grey, RGBA, 16-bit images; noisy-JPEG, 16-bit and differently-sized masks."""
    d = tmp_path / "odd"
    out = [
        Sample(_write(d / "grey.png", _img(40, 48, channels=1)), _write(d / "grey_m.png", _mask()), "grey"),
        Sample(_write(d / "rgba.png", _img(40, 48, channels=4)), _write(d / "rgba_m.jpg", _mask()), "rgba"),
        Sample(_write(d / "deep.png", _img(40, 48).astype(np.uint16) * 257),
               _write(d / "deep_m.png", _mask().astype(np.uint16) * 257), "deep"),
        Sample(_write(d / "small.jpg", _img(40, 48)),
               _write(d / "small_m.png", cv2.resize(_mask(), (24, 20), interpolation=cv2.INTER_NEAREST)), "small"),
    ]
    return out


@pytest.mark.parametrize("train,aug", [(False, None), (True, aug_preset("none")), (True, aug_preset("strong"))])
def test_segdataset_outputs(tmp_path, train, aug):
    samples = _odd_samples(tmp_path)
    ds = SegDataset(samples, 32, train=train, aug=aug)
    assert len(ds) == 4
    torch.manual_seed(0)
    for _ in range(3):
        for i, item in enumerate(ds):
            if i == len(ds):
                break
            _check_item(item, 32)
            assert item["orig_size"].tolist() == [40, 48]
            assert item["name"] == samples[i].name and item["mask_path"] == samples[i].mask
            assert 0 < item["mask"].mean() < 1  # the object survives resizing and augmentation


def test_eval_dataset_is_plain_resize(tmp_path):
    samples = _odd_samples(tmp_path)
    item = SegDataset(samples, 40, train=False)[3]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    img = item["image"] * std[:, None, None] + mean[:, None, None]
    expect = cv2.resize(load_image(samples[3].image), (40, 40), interpolation=cv2.INTER_LINEAR)
    assert torch.allclose(img, torch.from_numpy(expect).permute(2, 0, 1).float() / 255, atol=1e-5)
    mask = resize_mask(load_mask(samples[3].mask), (40, 40))
    assert torch.equal(item["mask"][0], torch.from_numpy(mask).float())


def test_sample_without_mask(tmp_path):
    s = Sample(_write(tmp_path / "x.png", _img()), None, "x")
    item = SegDataset([s], 32, train=False)[0]
    assert item["mask_path"] == "" and item["mask"].sum() == 0


def test_augmentation_varies_and_follows_torch_seed(tmp_path):
    ds = SegDataset(_odd_samples(tmp_path)[3:], 32, train=True, aug=aug_preset("strong"))
    torch.manual_seed(1)
    a = [ds[0]["image"] for _ in range(4)]
    torch.manual_seed(1)
    b = [ds[0]["image"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])


def test_aug_presets_and_config():
    assert aug_preset("moderate") == AugConfig()
    assert aug_preset("none").enabled is False
    assert aug_preset("strong").rotate_deg > aug_preset("light").rotate_deg
    p = aug_preset("light")
    p.hflip = 0.0
    assert aug_preset("light").hflip == 0.5  # presets hand out copies
    with pytest.raises(UserError, match="preset"):
        aug_preset("extreme")
    with pytest.raises(UserError, match="hflip"):
        AugConfig(hflip=1.5)


# ---------------------------------------------------------------- split and loader

def test_split_train_val():
    samples = [Sample(f"{i}.jpg", f"{i}.png", str(i)) for i in range(50)]
    tr, va = split_train_val(samples, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40
    assert not set(tr) & set(va) and sorted(tr + va) == sorted(samples)
    assert (tr, va) == split_train_val(samples, 0.2, seed=3)
    assert va != split_train_val(samples, 0.2, seed=4)[1]
    assert tr == [s for s in samples if s in set(tr)]  # input order kept
    assert split_train_val(samples[:2], 0.01, 0)[1] != [] and len(split_train_val(samples[:2], 0.9, 0)[0]) == 1
    assert split_train_val(samples, 0.0, 0) == (samples, [])
    assert split_train_val(samples[:1], 0.5, 0) == (samples[:1], [])
    with pytest.raises(UserError, match="val-split"):
        split_train_val(samples, 1.0, 0)


def _epochs(ds, seed, num_workers, n=2):
    loader = build_loader(ds, batch_size=3, shuffle=True, num_workers=num_workers, seed=seed)
    out = []
    for _ in range(n):
        batches = list(loader)
        out.append((torch.cat([b["image"] for b in batches]), sum((b["name"] for b in batches), [])))
    return out


def test_loader_is_deterministic(tmp_path):
    samples = _odd_samples(tmp_path) * 2
    ds = SegDataset(samples, 32, train=True, aug=aug_preset("strong"))
    torch.manual_seed(123)  # the global RNG must not matter
    a = _epochs(ds, seed=7, num_workers=0)
    torch.manual_seed(456)
    b = _epochs(ds, seed=7, num_workers=0)
    c = _epochs(ds, seed=8, num_workers=0)
    for (xa, na), (xb, nb) in zip(a, b):
        assert torch.equal(xa, xb) and na == nb
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[1][0])  # epochs differ from each other

    loader = build_loader(ds, batch_size=3, shuffle=True, num_workers=0, seed=7)
    loader.set_epoch(5)
    first = torch.cat([x["image"] for x in loader])
    list(loader)
    loader.set_epoch(5)
    assert torch.equal(first, torch.cat([x["image"] for x in loader]))  # epoch 5 depends on (seed, 5) only


def test_loader_gives_the_same_batches_for_any_num_workers(tmp_path):
    ds = SegDataset(_odd_samples(tmp_path) * 2, 32, train=True, aug=aug_preset("strong"))
    main = _epochs(ds, 7, num_workers=0)
    for workers in (1, 2):
        got = _epochs(ds, 7, num_workers=workers)
        for (xa, na), (xb, nb) in zip(main, got):
            assert na == nb and torch.equal(xa, xb), workers
    imgs = main[0][0]
    # no two items share an augmentation (the 8 items are 4 files twice): all 8 images differ
    assert len({tuple(x.flatten()[:64].tolist()) for x in imgs}) == len(imgs)


# ---------------------------------------------------------------- demo data

def _tree_bytes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_demo_is_deterministic(tmp_path):
    kw = dict(n_train=6, n_test=2, size=48)
    a = _tree_bytes(make_demo_dataset(str(tmp_path / "a"), seed=1, **kw))
    b = _tree_bytes(make_demo_dataset(str(tmp_path / "b"), seed=1, **kw))
    c = _tree_bytes(make_demo_dataset(str(tmp_path / "c"), seed=2, **kw))
    assert len(a) == 6 * 2 + 2 * 2 + 1 and a == b
    assert a.keys() == c.keys() and a["TrainDataset/Imgs/train-0000.jpg"] != c["TrainDataset/Imgs/train-0000.jpg"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]  # no temporary folders left behind


def test_demo_masks_and_images(tmp_path):
    idx = find_dataset(make_demo_dataset(str(tmp_path / "d"), n_train=20, n_test=2, size=64))
    cover = []
    for s in idx.train:
        img, mask = load_image(s.image), cv2.imread(s.mask, cv2.IMREAD_UNCHANGED)
        assert img.shape == (64, 64, 3) and mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        cover.append((mask > 0).mean())
        inside, outside = img[mask > 0].mean(0), img[mask == 0].mean(0)
        assert np.abs(inside - outside).max() < 80  # camouflaged: similar colours
    assert 0.04 <= min(cover) and max(cover) <= 0.32


def test_find_dataset_demo_and_cache_reuse(tmp_path, monkeypatch):
    idx = find_dataset("Demo", cache_dir=str(tmp_path), seed=3)
    assert idx.layout == "demo" and list(idx.tests) == ["demo"]
    assert len(idx.train) == 160 and len(idx.tests["demo"]) == 40
    assert idx.root == str(tmp_path / "demo-3-96")
    _check_item(SegDataset(idx.train, 32, train=True)[0], 32)

    def boom(*a, **k):
        raise AssertionError("regenerated instead of reusing the cache")

    monkeypatch.setattr(demo_mod, "demo_pair", boom)
    again = find_dataset("demo", cache_dir=str(tmp_path), seed=3)
    assert again.train == idx.train


def test_demo_refuses_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a generated demo"):
        make_demo_dataset(str(tmp_path / "x"), n_train=2, n_test=1, size=32)
    assert (tmp_path / "x" / "precious.txt").exists()
    old = make_demo_dataset(str(tmp_path / "y"), n_train=2, n_test=1, size=32)
    new = make_demo_dataset(old, n_train=3, n_test=1, size=32)  # other settings: our own folder is replaced
    assert len(find_dataset(new).train) == 3


# ---------------------------------------------------------------- real data

@pytest.mark.skipif(not os.path.isdir(KVASIR), reason="shared Kvasir-SEG copy not present")
def test_kvasir():
    idx = find_dataset(KVASIR)
    assert idx.layout == "sinet" and len(idx.train) == 700
    assert list(idx.tests) == ["Kvasir-val"] and len(idx.tests["Kvasir-val"]) == 101
    item = SegDataset(idx.tests["Kvasir-val"], 64, train=False)[0]
    _check_item(item, 64)
    assert 0 < item["mask"].mean() < 1


CONTAINERS = [  # (extension, dtype, foreground value, exact)
    (".png", np.uint8, 1, True), (".png", np.uint8, 255, True),
    (".png", np.uint16, 1, True), (".png", np.uint16, 255, True), (".png", np.uint16, 65535, True),
    (".jpg", np.uint8, 1, False), (".jpg", np.uint8, 255, False),
]


@pytest.mark.parametrize("ext,dtype,value,exact", CONTAINERS)
def test_masks_binarise_on_their_own_scale(tmp_path, ext, dtype, value, exact):
    """0/1, 0/255 and 0/65535 masks in 8- and 16-bit PNG and JPEG all give their object (0/1 JPEGs and
    16-bit 0/1 PNGs used to read as empty masks)."""
    truth = _ellipse_mask(64, 80, np.random.default_rng(1))
    got = load_mask(_write(tmp_path / f"m{ext}", truth.astype(dtype) * dtype(value)))
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
    if exact:
        assert np.array_equal(got, truth)
    else:  # JPEG (quality 95): ringing at the edge
        assert (got & truth).sum() / (got | truth).sum() > 0.95


def test_zero_one_label_maps_and_faint_noise(tmp_path):
    labels = np.zeros((8, 8), np.uint8)
    labels[2:4, 2:5] = 1  # a lossless label map is exact, however small its object
    for ext in (".png", ".bmp"):
        assert np.array_equal(load_mask(_write(tmp_path / f"m{ext}", labels)), labels)
    rng = np.random.default_rng(0)
    speckle = (rng.random((96, 128)) < 0.05) * rng.integers(1, 4, (96, 128))
    faint = np.clip(np.rint(rng.normal(0.0, 1.0, (96, 128))), 0, 255)  # an empty mask with a noisy background
    for name, noise in [("speckle", speckle), ("faint", faint)]:
        path = _write(tmp_path / f"{name}.jpg", noise.astype(np.uint8))
        assert 1 <= cv2.imread(path, cv2.IMREAD_UNCHANGED).max() <= 7  # read as a 0/1 label map ...
        assert load_mask(path).sum() == 0  # ... whose speckled foreground is not an object


# ---------------------------------------------------------------- mask/image alignment

def _centroid(a):
    w = a.astype(np.float64)
    ys, xs = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    return np.array([(w * ys).sum(), (w * xs).sum()]) / w.sum()


def _ellipse_mask(h, w, rng, span=(0.15, 0.3)):
    """A 0/1 HxW mask of a randomly placed, sized and turned ellipse (sub-pixel centre and axes)."""
    m = np.zeros((h, w), np.uint8)
    centre = (int(rng.uniform(0.35, 0.65) * w * 16), int(rng.uniform(0.35, 0.65) * h * 16))
    axes = (int(rng.uniform(*span) * w * 16), int(rng.uniform(*span) * h * 16))
    cv2.ellipse(m, centre, axes, rng.uniform(0, 180), 0, 360, 1, -1, cv2.LINE_8, 4)
    return m


@pytest.mark.parametrize("src,size", [((120, 150), 96), ((700, 1024), 96), ((768, 1024), 384)])
def test_resized_mask_stays_centred_on_its_object(src, size):
    """The resized mask's centroid is the resized image's object centroid (nearest neighbour was off by
    +0.25..+0.5 px: it samples at floor(x * scale), the bilinear image at pixel centres)."""
    h, w = src
    rng = np.random.default_rng(0)
    offsets = []
    for _ in range(20):
        m = _ellipse_mask(h, w, rng)
        image, mask = resize_pair(np.dstack([m * 200] * 3).astype(np.uint8), m, size)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        offsets.append(_centroid(mask) - _centroid(image[:, :, 0]))
    assert np.abs(np.mean(offsets, axis=0)).max() <= 0.05, np.mean(offsets, axis=0)


def _coloured_shape(seed):
    """A saturated ellipse on a grey (chroma 0) smooth random texture, of random size, and its 0/255 mask."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(90, 220, 2)
    grey = cv2.GaussianBlur(rng.uniform(60.0, 180.0, (h, w)), (0, 0), 3)
    mask = _ellipse_mask(h, w, rng, span=(0.12, 0.25))
    hsv = np.uint8([[[rng.integers(0, 180), 170, 190]]])
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)
    image = np.where(mask[..., None] > 0, colour, grey[..., None])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask * 255


def _object_by_colour(image):
    """The pixels whose chroma (max - min channel) exceeds half the object's: the grey background has none,
    and blending, brightness, contrast, saturation and hue changes keep the object's edge at half chroma."""
    chroma = image.max(axis=2) - image.min(axis=2)
    return chroma > 0.5 * np.percentile(chroma, 99)


@pytest.mark.parametrize("preset", ["none", "light", "moderate", "strong"])
def test_mask_matches_the_object_after_resize_and_augmentation(tmp_path, preset):
    samples = []
    for seed in range(20):
        image, mask = _coloured_shape(seed)
        samples.append(Sample(_write(tmp_path / f"{seed}.png", image[:, :, ::-1]),
                              _write(tmp_path / f"{seed}_m.png", mask), str(seed)))
    ds = SegDataset(samples, 64, train=True, aug=aug_preset(preset))
    ds.reseed(0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    ious = []
    for item in ds:
        if len(ious) == len(ds):
            break
        rgb = (item["image"] * std[:, None, None] + mean[:, None, None]).permute(1, 2, 0).numpy()
        obj, mask = _object_by_colour(rgb), item["mask"][0].numpy() > 0.5
        ious.append((obj & mask).sum() / (obj | mask).sum())
    assert min(ious) > 0.95, [round(float(x), 3) for x in ious]


def test_zoom_keeps_the_aspect_ratio():
    """A square's second moments are the same in every direction, whatever the rotation; only a stretch
    (x and y scaled differently) makes them unequal."""
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 20:44] = 1
    t = build_augmentation(aug_preset("strong"))  # zoom 0.8-1.2: a stretch of up to 1.5
    ratios = []
    for seed in range(20):
        t.set_random_seed(seed)
        obj = t(image=np.dstack([mask * 255] * 3), mask=mask)["mask"] > 0
        ys, xs = np.nonzero(obj)
        ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64)))
        ratios.append(np.sqrt(ev[1] / ev[0]))
    assert max(ratios) < 1.04, [round(float(r), 3) for r in ratios]  # 1.35 when x and y were drawn apart
