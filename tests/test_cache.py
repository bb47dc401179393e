"""train's --cache (data/cache.py): items bit-identical to reading the files, built once and reused,
rebuilt when a file changes, one-line errors, and a short run equal to one without the cache."""

from __future__ import annotations

import csv
import logging
import os
import pickle
import shutil
import time

import cv2
import numpy as np
import pytest
import torch

import data.cache as cache_mod
import train_ultimate
from data import Sample, SegDataset, aug_preset, build_cache, build_loader
from core.errors import UserError
from training.config import Config

SIZE = 32


def _write(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), arr), path
    return str(path)


@pytest.fixture()
def samples(tmp_path):
    """Six small samples: JPEG and PNG, grey, 16-bit, a mask of another size, one without mask."""
    rng = np.random.default_rng(0)
    d = tmp_path / "files"
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 12:30] = 255
    out = []
    for i in range(4):
        img = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
        out.append(Sample(_write(d / f"{i}.jpg", img), _write(d / f"{i}_m.png", cv2.resize(mask, (48, 40 + 4 * i))),
                          str(i)))
    out.append(Sample(_write(d / "grey.png", rng.integers(0, 65535, (36, 36), dtype=np.uint16)),
                      _write(d / "grey_m.png", cv2.resize(mask, (18, 18))), "grey"))
    out.append(Sample(_write(d / "nomask.png", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), None, "nomask"))
    return out


def _passes(ds, num_workers, n=2):
    """Two shuffled passes of a seeded loader: every batch as it comes."""
    loader = build_loader(ds, batch_size=4, shuffle=True, num_workers=num_workers, seed=11)
    return [list(loader) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for pass_a, pass_b in zip(a, b):
        assert len(pass_a) == len(pass_b)
        for x, y in zip(pass_a, pass_b):
            assert x.keys() == y.keys()
            for key in x:
                if torch.is_tensor(x[key]):
                    assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
                else:
                    assert x[key] == y[key], key


@pytest.mark.parametrize("train", [True, False])
def test_cached_items_are_bit_identical(samples, tmp_path, train):
    aug = aug_preset("strong") if train else None
    cache = build_cache(samples, SIZE, str(tmp_path / "cache"), num_workers=2)
    plain = SegDataset(samples, SIZE, train=train, aug=aug)
    cached = SegDataset(samples, SIZE, train=train, aug=aug, cache=cache)
    expected = _passes(plain, num_workers=0)
    _assert_same_batches(expected, _passes(cached, num_workers=0))
    _assert_same_batches(expected, _passes(cached, num_workers=2))  # workers open the arrays themselves
    item = cached[5]  # the sample without mask: all zeros, its image's size
    assert item["mask_path"] == "" and item["mask"].sum() == 0 and item["orig_size"].tolist() == [30, 40]
    assert cached[4]["orig_size"].tolist() == [36, 36]


def test_a_worker_gets_the_folder_not_the_arrays(samples, tmp_path):
    cache = build_cache(samples, SIZE, str(tmp_path / "cache"))
    ds = SegDataset(samples, SIZE, train=False, cache=cache)
    ds[0]  # opens the arrays in this process
    assert cache._arrays is not None
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.cache._arrays is None and len(pickle.dumps(ds)) < 10_000
    assert torch.equal(copy[3]["image"], ds[3]["image"])
    assert isinstance(cache._arrays[0], np.memmap)  # read through the page cache, not loaded


def _built(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Cache: built")]


def test_reused_on_a_second_build_and_rebuilt_when_a_file_changes(samples, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="data.cache")
    root = str(tmp_path / "cache")
    first = build_cache(samples, SIZE, root)
    stamp = os.stat(os.path.join(first.folder, "images.npy")).st_mtime_ns
    again = build_cache(samples, SIZE, root)
    assert again.folder == first.folder and len(_built(caplog)) == 1
    assert any(r.getMessage().startswith(f"Cache: reused {first.folder}") for r in caplog.records)
    assert os.stat(os.path.join(first.folder, "images.npy")).st_mtime_ns == stamp
    assert [e for e in os.listdir(root) if e.startswith(".")] == []  # no temporary folder left

    assert build_cache(samples, SIZE + 8, root).folder != first.folder  # another size
    st = os.stat(samples[2].mask)
    os.utime(samples[2].mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: new mtime
    touched = build_cache(samples, SIZE, root)
    assert touched.folder != first.folder and len(_built(caplog)) == 3
    mask = cv2.imread(samples[0].mask, cv2.IMREAD_GRAYSCALE)
    mask[:] = 0
    _write(samples[0].mask, mask)  # new content (and size)
    changed = build_cache(samples, SIZE, root)
    assert changed.folder not in (first.folder, touched.folder) and len(_built(caplog)) == 4
    assert SegDataset(samples, SIZE, train=False, cache=changed)[0]["mask"].sum() == 0


def test_a_same_size_replacement_with_its_old_mtime_is_rebuilt(tmp_path):
    """A file overwritten by other content of the same size, its mtime set back as ``cp -p``,
    ``rsync -a``, ``touch -r`` and archive extraction do: its ctime (set to now by the write and by
    ``utime``) gives a new folder, whose arrays hold the new content."""
    rng = np.random.default_rng(3)
    d = tmp_path / "files"
    bmp = [Sample(_write(d / f"{i}.bmp", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)),
                  _write(d / f"{i}_m.bmp", (rng.random((40, 48)) > 0.5).astype(np.uint8) * 255), str(i))
           for i in range(3)]
    root = str(tmp_path / "cache")
    old = build_cache(bmp, SIZE, root)
    target = bmp[1]
    stats = {p: os.stat(p) for p in (target.image, target.mask)}
    time.sleep(0.05)  # past the file system's timestamp granularity
    _write(target.image, rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    _write(target.mask, (rng.random((40, 48)) > 0.5).astype(np.uint8) * 255)
    for path, st in stats.items():
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        now = os.stat(path)
        assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino), path
    new = build_cache(bmp, SIZE, root)
    assert new.folder != old.folder
    image, mask, size = new.item(1)
    expected = cache_mod.read_resized(target, SIZE)
    assert np.array_equal(image, expected[0]) and np.array_equal(mask, expected[1]) and size == expected[2]
    assert not np.array_equal(mask, old.item(1)[1])  # the old arrays were really stale


def _truncate_images(folder):
    path = os.path.join(folder, "images.npy")
    os.truncate(path, os.path.getsize(path) // 2)


def _remove_masks(folder):
    os.remove(os.path.join(folder, "masks.npy"))


def _damaged(caplog):
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


@pytest.mark.parametrize("damage", [_truncate_images, _remove_masks])
def test_a_damaged_folder_is_rebuilt(samples, tmp_path, caplog, damage):
    """cache.json says complete, an array does not: built again in the same folder, one line naming it."""
    caplog.set_level(logging.INFO, logger="data.cache")
    root = str(tmp_path / "cache")
    folder = build_cache(samples, SIZE, root).folder
    damage(folder)
    rebuilt = build_cache(samples, SIZE, root)
    assert rebuilt.folder == folder and len(_built(caplog)) == 2
    assert len(_damaged(caplog)) == 1 and _damaged(caplog)[0].startswith(f"Cache: {folder} is damaged (")
    for i, sample in enumerate(samples):
        image, mask, size = rebuilt.item(i)
        expected = cache_mod.read_resized(sample, SIZE)
        assert np.array_equal(image, expected[0]) and np.array_equal(mask, expected[1]) and size == expected[2]
    assert build_cache(samples, SIZE, root).folder == folder and len(_built(caplog)) == 2  # reused now


def test_not_enough_space_is_one_line(samples, tmp_path, monkeypatch):
    root = str(tmp_path / "cache")
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(UserError) as e:
        build_cache(samples, SIZE, root)
    msg = str(e.value)
    assert "\n" not in msg and root in msg and "--cache-dir" in msg and "leave out --cache" in msg
    need = cache_mod.cache_bytes(len(samples), SIZE) / 2**20
    assert f"{need:.1f} MiB" in msg and os.listdir(root) == []


def test_an_interrupted_build_leaves_nothing(samples, tmp_path, monkeypatch):
    root = str(tmp_path / "cache")
    calls = []

    def read_then_stop(sample, size):
        calls.append(sample)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(sample, size)

    real = cache_mod.read_resized
    monkeypatch.setattr(cache_mod, "read_resized", read_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_cache(samples, SIZE, root, num_workers=0)
    assert os.listdir(root) == []
    monkeypatch.setattr(cache_mod, "read_resized", real)
    with open(samples[1].image, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(UserError, match="cannot decode image .*1.jpg"):
        build_cache(samples, SIZE, root, num_workers=2)
    assert os.listdir(root) == []


def test_an_unwritable_cache_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"^--cache-dir .*a-file/arrays: .* is a file, not a folder"):
        Config(cache=True, cache_dir=str(blocker / "arrays"), checkpoint_dir=str(tmp_path / "ck")).validate()
    Config(cache=False, cache_dir=str(blocker / "arrays"), checkpoint_dir=str(tmp_path / "ck")).validate()


@pytest.mark.e2e
def test_train_with_cache_matches_a_run_without(tmp_path, monkeypatch, caplog):
    """The built-in demo data (generated under a temporary HOME, where the default --cache-dir is too)."""
    caplog.set_level(logging.INFO)  # pytest's root logger: INFO lines reach train.log as on the command line
    try:
        import matplotlib

        monkeypatch.setenv("MPLCONFIGDIR", matplotlib.get_configdir())  # not a fresh font cache in the new HOME
    except ImportError:
        pass
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args = ["train", "--dataset-path", "demo", "--backbone", "edgenext_xx_small", "--no-pretrained",
            "--img-size", "64", "--epochs", "2", "--stage1-epochs", "1", "--limit-batches", "2",
            "--num-workers", "0", "--device", "cpu", "--no-progress", "--no-curves"]
    arrays = str(tmp_path / "home" / ".cache" / "cod_ultimate" / "arrays")
    runs = {}
    for name, extra in (("plain", []), ("cached", ["--cache"])):
        runs[name] = str(tmp_path / name)
        assert train_ultimate.main([*args, "--checkpoint-dir", runs[name], *extra]) == 0
        assert os.path.isdir(arrays) == (name == "cached")
    rows = {}
    for name, folder in runs.items():
        with open(os.path.join(folder, "metrics.csv")) as f:
            rows[name] = list(csv.DictReader(f))
    assert len(rows["plain"]) == 2 and rows["cached"] == rows["plain"]
    log = open(os.path.join(runs["cached"], "train.log")).read().splitlines()
    assert sum(f"Cache (--cache): the training and validation images and masks at 64 px, as .npy arrays under "
               f"{arrays}" in line for line in log) == 1
    built = [line for line in log if f"Cache: built {arrays}" in line]
    assert len(built) == 2 and "(144 images of 64 px)" in built[0] and "(8 images of 64 px)" in built[1]
    assert sum(f"Cache: reused {arrays}" in line for line in log) == 4  # each stage's two loaders
    assert len(os.listdir(arrays)) == 2  # the test set is read from its files


@pytest.mark.e2e
def test_not_enough_space_stops_train_at_start_up(demo, tmp_path, monkeypatch, capsys):
    """One error line, and the checkpoint folder holds no run: the same command without --cache runs."""
    root = demo(n_train=12, n_test=2, size=64, seed=1)
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    args = ["train", "--dataset-path", root, "--checkpoint-dir", str(tmp_path / "ck"), "--backbone",
            "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--epochs", "1", "--stage1-epochs", "0",
            "--limit-batches", "1", "--num-workers", "0", "--device", "cpu", "--no-progress", "--no-curves"]
    cache_dir = str(tmp_path / "arrays")
    assert train_ultimate.main([*args, "--cache", "--cache-dir", cache_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    need = cache_mod.cache_bytes(12, 64) / 2**20  # the 11 training images and 1 validation image
    assert len(err) == 1 and err[0].startswith(f"error: --cache: the arrays need {need:.1f} MiB but only "
                                               f"0.0 MiB is free in {cache_dir}; pass --cache-dir"), err
    assert os.listdir(cache_dir) == [] and not os.path.exists(tmp_path / "ck" / "config.json")
    monkeypatch.undo()
    assert train_ultimate.main(args) == 0


@pytest.mark.e2e
def test_train_rebuilds_a_truncated_cache(demo, tmp_path, capsys, caplog):
    """The probe's case: images.npy cut short after a run; the next run with --cache says so in one
    line, builds the folder again and trains to the same metrics, with nothing on stderr."""
    caplog.set_level(logging.INFO)  # pytest's root logger: INFO lines reach train.log as on the command line
    cache_dir = str(tmp_path / "arrays")
    args = ["train", "--dataset-path", demo(n_train=12, n_test=2, size=64, seed=1), "--backbone",
            "edgenext_xx_small", "--no-pretrained", "--img-size", "64", "--epochs", "1", "--stage1-epochs", "0",
            "--limit-batches", "1", "--num-workers", "0", "--device", "cpu", "--no-progress", "--no-curves",
            "--cache", "--cache-dir", cache_dir]
    runs = [str(tmp_path / "first"), str(tmp_path / "second")]
    assert train_ultimate.main([*args, "--checkpoint-dir", runs[0]]) == 0
    train = max((os.path.join(cache_dir, d) for d in os.listdir(cache_dir)),
                key=lambda d: os.path.getsize(os.path.join(d, "images.npy")))  # 11 training images, 1 validation
    _truncate_images(train)
    capsys.readouterr()
    assert train_ultimate.main([*args, "--checkpoint-dir", runs[1]]) == 0
    assert capsys.readouterr().err == ""
    log = open(os.path.join(runs[1], "train.log")).read()
    damaged = [line for line in log.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and damaged[0].endswith(
        f" Cache: {train} is damaged (images.npy: mmap length is greater than file size); rebuilding it"), damaged
    assert len(os.listdir(cache_dir)) == 2 and sum("Cache: built" in line for line in log.splitlines()) == 1
    first, second = ([row for row in csv.DictReader(open(os.path.join(r, "metrics.csv")))] for r in runs)
    assert second == first
