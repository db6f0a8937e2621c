"""Tests for pyro_bbt.data (MNIST tasks). CPU only; uses a private cache directory."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_bbt import data as D
from pyro_bbt.data import (
    MNIST_FILES,
    SCALINGS,
    ChecksumError,
    Split,
    Task,
    TaskData,
    load_mnist,
    load_task,
    mnist_root,
    parse_digits,
    pixel_permutation,
)

TRAIN_COUNTS = {0: 5923, 1: 6742, 2: 5958, 3: 6131, 4: 5842, 5: 5421, 6: 5918, 7: 6265, 8: 5851, 9: 5949}
TEST_COUNTS = {0: 980, 1: 1135, 2: 1032, 3: 1010, 4: 982, 5: 892, 6: 958, 7: 1028, 8: 974, 9: 1009}
A = (0, 1, 2, 3, 4)
B = (5, 6, 7, 8, 9)


def _round(v: float) -> int:
    return int(math.floor(v + 0.5))


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Point PYRO_BBT_DATA_DIR at a fresh directory so the user's cache is untouched."""
    cache = tmp_path_factory.mktemp("pyro_bbt_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(D.CACHE_ENV_VAR, str(cache))
        yield cache


@pytest.fixture()
def cache_copy(private_cache, tmp_path, monkeypatch) -> Path:
    """A populated copy of the cache, with PYRO_BBT_DATA_DIR pointing at it."""
    mnist_root()  # make sure the private cache is populated
    copy = tmp_path / "cache_copy"
    shutil.copytree(private_cache, copy)
    monkeypatch.setenv(D.CACHE_ENV_VAR, str(copy))
    return copy


def _raw(root: Path) -> Path:
    return root / "MNIST" / "raw"


def _images(split: Split) -> torch.Tensor:
    return split.x.reshape(-1, 28, 28)


# ------------------------------------------------------------------ files / checksums


def test_mnist_root_extracts_verified_files(private_cache):
    root = mnist_root()
    assert root == private_cache
    raw = _raw(root)
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_FILES)  # no temp files left
    for name, sha in MNIST_FILES.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == sha


def test_missing_cached_file_is_reextracted(cache_copy):
    target = _raw(cache_copy) / "t10k-labels-idx1-ubyte"
    target.unlink()
    assert mnist_root() == cache_copy
    assert hashlib.sha256(target.read_bytes()).hexdigest() == MNIST_FILES[target.name]


@pytest.mark.parametrize("damage", ["truncate", "alter"])
@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_corrupted_cache_raises_checksum_error(cache_copy, damage, name):
    path = _raw(cache_copy) / name
    content = bytearray(path.read_bytes())
    if damage == "truncate":
        content = content[: len(content) // 2]
    else:
        content[-1] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(ChecksumError) as info:
        mnist_root()
    err = info.value
    assert isinstance(err, ValueError)
    msg = str(err)
    assert str(path) in msg and MNIST_FILES[name] in msg
    assert hashlib.sha256(bytes(content)).hexdigest() in msg
    assert err.path == path and err.expected == MNIST_FILES[name]
    with pytest.raises(ChecksumError):  # also through the loaders
        load_task(Task())


def test_a_file_found_right_is_hashed_again_only_once_its_stat_changes(cache_copy, monkeypatch):
    """Files older than a second, once verified, are not hashed on the next call; a file altered
    in place, with its mtime put back, is (its ctime moved) and is refused; a file younger than a
    second when hashed is hashed every time (its mtime could still tick over unseen)."""
    hashed = []
    real = D._sha256_file
    monkeypatch.setattr(D, "_sha256_file", lambda path: hashed.append(path.name) or real(path))
    raw = _raw(cache_copy)
    old = [(raw / name, (raw / name).stat()) for name in MNIST_FILES]
    for path, st in old:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))  # 10 s older
    mnist_root()
    assert sorted(hashed) == sorted(MNIST_FILES)
    hashed.clear()
    mnist_root()
    assert hashed == []
    path = raw / "t10k-labels-idx1-ubyte"
    st = path.stat()
    content = bytearray(path.read_bytes())
    content[-1] ^= 0xFF
    path.write_bytes(bytes(content))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ChecksumError):
        mnist_root()
    assert hashed == [path.name]
    young = raw / "t10k-images-idx3-ubyte"
    young.touch()
    content[-1] ^= 0xFF
    path.write_bytes(bytes(content))
    hashed.clear()
    mnist_root()
    mnist_root()
    assert hashed.count(young.name) == 2 and hashed.count(path.name) == 2


def test_explicit_data_dir(cache_copy, tmp_path):
    assert mnist_root(cache_copy) == cache_copy
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="download=True"):
        mnist_root(empty)


def test_load_mnist_shapes_and_copies():
    xtr, ytr, xte, yte = load_mnist()
    assert xtr.shape == (60000, 28, 28) and xtr.dtype == torch.uint8
    assert ytr.shape == (60000,) and ytr.dtype == torch.int64
    assert xte.shape == (10000, 28, 28) and xte.dtype == torch.uint8
    assert yte.shape == (10000,) and yte.dtype == torch.int64
    assert dict(Counter(ytr.tolist())) == TRAIN_COUNTS
    assert dict(Counter(yte.tolist())) == TEST_COUNTS
    xtr.zero_()
    assert load_mnist()[0].any()


def test_the_idx_reader_gives_torchvisions_tensors():
    """MNIST is read from its IDX files directly (torchvision's import costs about 2 s a
    process); the four tensors equal what ``torchvision.datasets.MNIST`` reads from the same files."""
    torchvision_datasets = pytest.importorskip("torchvision.datasets")
    root = str(mnist_root())
    train, test = torchvision_datasets.MNIST(root, train=True), torchvision_datasets.MNIST(root, train=False)
    expected = (train.data, train.targets, test.data, test.targets)
    for ours, theirs in zip(load_mnist(), expected):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@pytest.mark.parametrize("content, needle", [
    (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + bytes(12), "not an IDX file of unsigned bytes"),  # float32 elements
    (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + bytes(3), "not an IDX file of unsigned bytes"),
    (b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(5), r"says shape \(2, 3\) \(6 bytes\), the file holds 5"),
])
def test_the_idx_reader_names_a_file_it_cannot_read(tmp_path, content, needle):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=needle) as error:
        D.read_idx(path)
    assert str(path) in str(error.value)
    good = tmp_path / "good-idx1-ubyte"
    good.write_bytes(b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6)))
    assert D.read_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]


# ------------------------------------------------------------------------- splits


@pytest.mark.parametrize("digits, n_fit, n_test", [(A, 30596, 5139), (B, 29404, 4861)])
def test_counts_per_digit(digits, n_fit, n_test):
    td = load_task(Task(digits=digits))
    assert len(td.train) + len(td.val) == n_fit
    assert len(td.test) == n_test
    train, val = Counter(td.train.y.tolist()), Counter(td.val.y.tolist())
    for k, d in enumerate(digits):
        assert val[k] == _round(0.1 * TRAIN_COUNTS[d])  # ~10 %, stratified
        assert train[k] + val[k] == TRAIN_COUNTS[d]
    assert dict(Counter(td.test.y.tolist())) == {k: TEST_COUNTS[d] for k, d in enumerate(digits)}
    for split in (td.train, td.val, td.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1] == 784
        assert split.y.dtype == torch.int64
    assert td.num_classes == 5 and td.input_dim == 784


@pytest.mark.parametrize("digits", [B, (9, 5, 7)])
def test_label_remap_matches_original_digits(digits):
    _, _, xte, yte = load_mnist()
    td = load_task(Task(digits=digits))
    keep = torch.isin(yte, torch.tensor(digits))
    assert set(td.test.y.tolist()) == set(range(len(digits)))
    assert torch.equal(torch.tensor(digits)[td.test.y], yte[keep])
    # default "blundell" scaling: x = raw / 126, MNIST order kept
    assert torch.equal(td.test.x, xte[keep].reshape(-1, 784).float() / 126)
    counts = Counter(td.train.y.tolist() + td.val.y.tolist())
    assert counts == {k: TRAIN_COUNTS[d] for k, d in enumerate(digits)}


@pytest.mark.parametrize("scaling", SCALINGS)
def test_scalings(scaling):
    _, _, xte, yte = load_mnist()
    raw = xte[torch.isin(yte, torch.tensor(A))].reshape(-1, 784).float()
    expected = {"blundell": raw / 126, "unit": raw / 255, "standardize": (raw / 255 - 0.1307) / 0.3081}
    x = load_task(Task(scaling=scaling)).test.x
    torch.testing.assert_close(x, expected[scaling])


def test_val_split_is_independent_of_seed_and_fraction():
    base = load_task(Task())
    for task in (Task(fraction=0.3), Task(fraction=0.3, seed=7), Task(seed=3)):
        assert torch.equal(load_task(task).val.x, base.val.x)
    other = load_task(Task(split_seed=1))
    assert not torch.equal(other.val.x, base.val.x)
    assert len(other.val) == len(base.val)


def test_fraction_is_stratified_and_seeded():
    full = load_task(Task())
    pool = Counter(full.train.y.tolist())
    td = load_task(Task(fraction=0.1))
    counts = Counter(td.train.y.tolist())
    assert counts == {k: _round(0.1 * pool[k]) for k in range(5)}
    assert torch.equal(load_task(Task(fraction=0.1)).train.x, td.train.x)
    assert not torch.equal(load_task(Task(fraction=0.1, seed=1)).train.x, td.train.x)
    tiny = load_task(Task(fraction=1e-3))  # a handful per class, at least 1
    assert all(c >= 1 for c in Counter(tiny.train.y.tolist()).values())
    assert len(Counter(tiny.train.y.tolist())) == 5


def test_fraction_subsets_are_nested_for_one_seed():
    _, labels, _, _ = load_mnist()
    small, _ = D._split_indices(labels, Task(fraction=0.1))
    big, big_val = D._split_indices(labels, Task(fraction=0.5))
    assert set(small.tolist()) <= set(big.tolist())
    assert not set(big.tolist()) & set(big_val.tolist())


@pytest.mark.parametrize(
    "task, pattern",
    [(Task(fraction=1e-6), r"fraction=1e-06.*digit 0"), (Task(digits=(7,), val_fraction=0.99999), r"val_fraction=0.99999.*digit 7")],
)
def test_fraction_leaving_a_class_empty_raises(task, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_task(task)


# ----------------------------------------------------------------------- transforms


@pytest.mark.parametrize("angle, k", [(90, 1), (180, 2), (-90, 3), (450.0, 1), (360, 0)])
def test_right_angle_rotation_equals_rot90(angle, k):
    base = load_task(Task())
    rot = load_task(Task(rotation=angle))
    for a, b in ((base.train, rot.train), (base.val, rot.val), (base.test, rot.test)):
        assert torch.equal(_images(b), torch.rot90(_images(a), k, dims=(-2, -1)))


def test_bilinear_rotation_direction_and_fill():
    base = load_task(Task()).test
    near = load_task(Task(rotation=89.9)).test  # bilinear path, same direction as rot90
    rot90 = torch.rot90(_images(base), 1, dims=(-2, -1))
    assert (_images(near) - rot90).abs().mean() < 0.02
    assert (_images(near) - torch.rot90(rot90, 2, dims=(-2, -1))).abs().mean() > 0.05
    r45 = _images(load_task(Task(rotation=45)).test)
    assert torch.all(r45[:, 0, 0] == 0)  # corners filled with the (scaled) background


def test_noise_is_seeded_fixed_per_image_and_after_scaling():
    clean = load_task(Task())
    noisy = load_task(Task(noise_std=0.2))  # std in scaled (x / 126) units
    resid = noisy.train.x - clean.train.x
    assert abs(resid.std().item() - 0.2) < 0.005 and abs(resid.mean().item()) < 0.005
    assert abs((noisy.test.x - clean.test.x).std().item() - 0.2) < 0.005
    assert torch.equal(load_task(Task(noise_std=0.2)).train.x, noisy.train.x)
    reseeded = load_task(Task(noise_std=0.2, seed=1))
    assert not torch.equal(reseeded.test.x, noisy.test.x)
    # val (images and noise) is the same for every fraction
    assert torch.equal(load_task(Task(noise_std=0.2, fraction=0.2)).val.x, noisy.val.x)


def test_permutation_is_a_consistent_bijection():
    perm = pixel_permutation(3)
    assert torch.equal(torch.sort(perm).values, torch.arange(784))
    assert torch.equal(pixel_permutation(3), perm)
    assert not torch.equal(pixel_permutation(4), perm)
    inv = torch.argsort(perm)
    base = load_task(Task())
    permuted = load_task(Task(permutation_seed=3))
    for a, b in ((base.train, permuted.train), (base.val, permuted.val), (base.test, permuted.test)):
        assert torch.equal(b.x, a.x[:, perm])
        assert torch.equal(b.x[:, inv], a.x)
        assert torch.equal(a.y, b.y)


def test_pipeline_order_rotate_before_permute():
    base = load_task(Task()).test
    both = load_task(Task(rotation=90, permutation_seed=5)).test
    unpermuted = both.x[:, torch.argsort(pixel_permutation(5))]
    assert torch.equal(unpermuted.reshape(-1, 28, 28), torch.rot90(_images(base), 1, dims=(-2, -1)))


def test_returned_splits_do_not_share_the_cache():
    td = load_task(Task())
    before = td.train.x[0].clone()
    td.train.x.zero_()
    td.test.y.fill_(7)
    again = load_task(Task())
    assert torch.equal(again.train.x[0], before)
    assert again.test.y.max() == 4



def test_limits_keep_the_first_images_of_each_split_as_copies():
    full = load_task(Task())
    cut = load_task(Task(), limit_train=30, limit_eval=20)
    assert (len(cut.train), len(cut.val), len(cut.test)) == (30, 20, 20)
    for part, whole in ((cut.train, full.train), (cut.val, full.val), (cut.test, full.test)):
        assert torch.equal(part.x, whole.x[: len(part)]) and torch.equal(part.y, whole.y[: len(part)])
    cut.train.x.zero_()
    cut.test.y.fill_(7)
    again = load_task(Task())
    assert torch.equal(again.train.x[:30], full.train.x[:30]) and again.test.y.max() == 4
    assert len(load_task(Task(), limit_train=10**9).train) == len(full.train)
    with pytest.raises(ValueError, match="n"):
        load_task(Task(), limit_eval=-1)


# --------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"digits": (0, 10)}, "10"),
        ({"digits": (-1, 2)}, "-1"),
        ({"digits": (3, 3)}, "3"),
        ({"digits": ()}, "()"),
        ({"digits": [1.5]}, "1.5"),
        ({"fraction": 0.0}, "0.0"),
        ({"fraction": 1.5}, "1.5"),
        ({"fraction": -0.2}, "-0.2"),
        ({"fraction": float("nan")}, "nan"),
        ({"rotation": float("inf")}, "inf"),
        ({"rotation": float("nan")}, "nan"),
        ({"noise_std": -0.1}, "-0.1"),
        ({"noise_std": float("inf")}, "inf"),
        ({"noise_std": float("nan")}, "nan"),
        ({"scaling": "bogus"}, "bogus"),
        ({"val_fraction": 1.0}, "1.0"),
        ({"val_fraction": -0.1}, "-0.1"),
        ({"permutation_seed": -1}, "-1"),
        ({"seed": 1.5}, "1.5"),
    ],
)
def test_bad_task_fields_raise(kwargs, shown):
    with pytest.raises(ValueError) as info:
        Task(**kwargs)
    assert shown in str(info.value)
    assert next(iter(kwargs)) in str(info.value) or "digit" in str(info.value)


def test_unknown_scaling_lists_allowed():
    with pytest.raises(ValueError, match="blundell, unit, standardize"):
        Task(scaling="minmax")


def test_task_normalises_fields():
    t = Task(digits=[np.int64(5), 6, 7], rotation=90, fraction=1, name="B")
    assert t.digits == (5, 6, 7) and all(type(d) is int for d in t.digits)
    assert isinstance(t.rotation, float) and isinstance(t.fraction, float)
    assert t == Task(digits=(5, 6, 7), rotation=90.0, name="B") and hash(t) == hash(Task(digits=(5, 6, 7), rotation=90.0, name="B"))
    assert t.num_classes == 3
    assert Task(digits="5-9").digits == B
    with pytest.raises(Exception):
        t.seed = 3  # frozen


@pytest.mark.parametrize(
    "text, expected",
    [("5,6,7,8,9", B), (" 0, 1,2 ,3,4 ", A), ("9 5", (9, 5)), ("5-9", B), ("0-2,7", (0, 1, 2, 7)), ("3", (3,))],
)
def test_parse_digits(text, expected):
    assert parse_digits(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "a,b", "5,,6", "5,6,", "10", "1,1", "5-3", "1.5", "0-9-1", "5;6"])
def test_parse_digits_rejects_junk(text):
    with pytest.raises(ValueError) as info:
        parse_digits(text)
    assert repr(text) in str(info.value)


# ------------------------------------------------------------------------- batches


def _indexed_split(n: int) -> Split:
    return Split(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3), torch.arange(n))


@pytest.mark.parametrize("n, bs", [(103, 10), (100, 10), (5, 16), (1, 1)])
def test_batches_cover_every_example_once(n, bs):
    split = _indexed_split(n)
    batches = list(split.batches(bs, generator=torch.Generator().manual_seed(0)))
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(n))
    assert all(torch.equal(x[:, 0].long(), y) for x, y in batches)  # x and y stay paired
    assert all(len(y) == bs for _, y in batches[:-1]) and 0 < len(batches[-1][1]) <= bs


def test_batches_reproducible_and_options():
    split = _indexed_split(50)

    def order(seed):
        return torch.cat([y for _, y in split.batches(8, generator=torch.Generator().manual_seed(seed))])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    gen = torch.Generator().manual_seed(1)
    first, second = (torch.cat([y for _, y in split.batches(8, generator=gen)]) for _ in range(2))
    assert not torch.equal(first, second)  # a new permutation each epoch
    assert torch.equal(torch.cat([y for _, y in split.batches(8, shuffle=False)]), torch.arange(50))
    dropped = list(split.batches(8, generator=gen, drop_last=True))
    assert len(dropped) == 6 and all(len(y) == 8 for _, y in dropped)
    assert list(Split(torch.empty(0, 3), torch.empty(0, dtype=torch.long)).batches(4)) == []
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            split.batches(bad)


def test_split_helpers():
    split = _indexed_split(20)
    assert len(split) == 20
    sub = split.subset(5)
    assert len(sub) == 5 and torch.equal(sub.y, torch.arange(5))
    assert len(split.subset(100)) == 20
    moved = split.to("cpu")
    assert torch.equal(moved.x, split.x)
    with pytest.raises(ValueError):
        Split(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    td = load_task(Task(digits=(3, 8)))
    assert isinstance(td, TaskData) and td.num_classes == 2 and td.input_dim == 784
    assert set(td.train.subset(200).y.tolist()) == {0, 1}  # MNIST order mixes classes
