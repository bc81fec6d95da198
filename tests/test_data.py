"""Tests for robustcompress.data: seeded datasets, the CIFAR-10 reader and the loader."""

import pickle
import struct
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from robustcompress.data import (
    cifar10,
    digits,
    gaussian_mixture,
    linearly_separable,
    loader,
    write_fake_cifar10,
)


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range(digits_data):
    train, test = digits_data
    x_tr, y_tr = train.tensors
    x_te, y_te = test.tensors
    assert x_tr.shape == (1437, 64) and x_te.shape == (360, 64)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert y_tr.shape == (1437,) and y_te.shape == (360,)
    both = torch.cat([x_tr, x_te])
    assert both.min() == 0 and both.max() == 1
    # pixels are 0..16 divided by 16: exact multiples of 1/16
    assert torch.equal(both * 16, (both * 16).round())
    assert set(torch.cat([y_tr, y_te]).unique().tolist()) == set(range(10))


def test_digits_split_is_a_partition_of_sklearn_digits(digits_data):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ref = torch.from_numpy(np.concatenate([bunch.data / 16.0, bunch.target[:, None]], 1))
    train, test = digits_data
    ours = torch.cat(
        [torch.cat([t.tensors[0].double(), t.tensors[1][:, None].double()], 1) for t in (train, test)]
    )
    # same multiset of (image, label) rows: sort rows lexicographically and compare
    def sort_rows(m):
        for col in reversed(range(m.shape[1])):
            m = m[torch.argsort(m[:, col], stable=True)]
        return m

    assert torch.equal(sort_rows(ours), sort_rows(ref))


def test_digits_image_shape_matches_flat():
    train_img, test_img = digits(seed=3, image=True)
    train, test = digits(seed=3)
    assert train_img.tensors[0].shape == (1437, 1, 8, 8)
    assert torch.equal(train_img.tensors[0].reshape(-1, 64), train.tensors[0])
    assert torch.equal(test_img.tensors[1], test.tensors[1])


@pytest.mark.parametrize("test_fraction", [0.1, 0.2, 0.5])
def test_digits_split_is_stratified(test_fraction):
    train, test = digits(test_fraction=test_fraction, seed=1)
    counts_all = torch.bincount(torch.cat([train.tensors[1], test.tensors[1]]), minlength=10)
    counts_test = torch.bincount(test.tensors[1], minlength=10)
    expected = counts_all.double() * test_fraction
    assert (counts_test.double() - expected).abs().max() <= 1.0
    assert len(test) == pytest.approx(1797 * test_fraction, abs=1)


def test_digits_deterministic_under_seed_and_differs_across_seeds(digits_data):
    a_train, a_test = digits(seed=0)
    assert torch.equal(a_train.tensors[0], digits_data[0].tensors[0])
    assert torch.equal(a_test.tensors[1], digits_data[1].tensors[1])
    b_train, _ = digits(seed=1)
    assert not torch.equal(a_train.tensors[0], b_train.tensors[0])


def test_digits_missing_sklearn_names_the_extra(monkeypatch):
    # None in sys.modules makes the import raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"robustcompress\[examples\]"):
        digits()


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"test_fraction": 0.0}, ValueError),
        ({"test_fraction": 1.0}, ValueError),
        ({"test_fraction": -0.2}, ValueError),
        ({"test_fraction": float("nan")}, ValueError),
        ({"test_fraction": "0.2"}, TypeError),
        ({"seed": -1}, ValueError),
        ({"seed": 1.5}, ValueError),
        ({"image": 1}, TypeError),
    ],
)
def test_digits_bad_arguments(kwargs, err):
    name = next(iter(kwargs))
    with pytest.raises(err, match=name):
        digits(**kwargs)


# ----------------------------------------------------------------------------- synthetic


@given(
    n=st.integers(2, 300),
    classes=st.integers(2, 6),
    extra_dim=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_gaussian_mixture_balanced_and_typed(n, classes, extra_dim, seed):
    n = max(n, classes)
    ds = gaussian_mixture(n=n, dim=classes + extra_dim, classes=classes, seed=seed)
    x, y = ds.tensors
    assert x.shape == (n, classes + extra_dim) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=classes)
    assert counts.numel() == classes
    assert counts.max() - counts.min() <= 1


def test_gaussian_mixture_means_are_separation_apart():
    sep = 4.0
    x, y = gaussian_mixture(n=24000, dim=10, classes=3, separation=sep, seed=5).tensors
    means = torch.stack([x[y == c].double().mean(0) for c in range(3)])
    dists = torch.pdist(means)
    # each empirical mean has per-coordinate std 1/sqrt(8000) ≈ 0.011
    assert torch.allclose(dists, torch.full_like(dists, sep), atol=0.08)
    # noise is unit-variance around each mean
    resid = x.double() - means[y]
    assert resid.var(0).sub(1).abs().max() < 0.05


def test_gaussian_mixture_determinism():
    a = gaussian_mixture(seed=2).tensors
    b = gaussian_mixture(seed=2).tensors
    c = gaussian_mixture(seed=3).tensors
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@given(
    n=st.integers(1, 400),
    dim=st.integers(1, 64),
    margin=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_linearly_separable_margin_holds(n, dim, margin, seed):
    ds, w = linearly_separable(n=n, dim=dim, margin=margin, seed=seed)
    x, y = ds.tensors
    assert x.dtype == torch.float32 and w.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (n, dim) and w.shape == (dim,)
    w64 = w.double()
    signed = (x.double() @ w64) / w64.norm()
    assert signed.abs().min() >= margin  # exact, no tolerance: checked on the returned float32 data
    # labels are the side of the plane
    assert torch.equal(y, (signed > 0).long())
    assert w64.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_linearly_separable_margin_is_tight_and_both_classes_present():
    ds, w = linearly_separable(n=1000, dim=20, margin=0.5, seed=0)
    x, y = ds.tensors
    dist = (x.double() @ w.double()).abs()
    assert 0.5 <= dist.min() < 0.5 + 0.05
    assert 300 < int(y.sum()) < 700


def test_linearly_separable_determinism():
    (a, wa), (b, wb) = linearly_separable(seed=4), linearly_separable(seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(wa, wb)
    _, wc = linearly_separable(seed=5)
    assert not torch.equal(wa, wc)


@pytest.mark.parametrize(
    "fn, kwargs, err",
    [
        (gaussian_mixture, {"n": 0}, ValueError),
        (gaussian_mixture, {"classes": 1}, ValueError),
        (gaussian_mixture, {"dim": 3, "classes": 4}, ValueError),
        (gaussian_mixture, {"n": 3, "classes": 4}, ValueError),
        (gaussian_mixture, {"separation": 0.0}, ValueError),
        (gaussian_mixture, {"separation": "3"}, TypeError),
        (gaussian_mixture, {"seed": -3}, ValueError),
        (linearly_separable, {"n": -1}, ValueError),
        (linearly_separable, {"dim": 2.0}, ValueError),
        (linearly_separable, {"margin": 0}, ValueError),
        (linearly_separable, {"margin": float("inf")}, ValueError),
    ],
)
def test_synthetic_bad_arguments(fn, kwargs, err):
    with pytest.raises(err, match="|".join(kwargs)):
        fn(**kwargs)


# ----------------------------------------------------------------------------- CIFAR-10

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def _raw(folder, name):
    with open(folder / name, "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_fake_cifar10_has_the_real_file_format(tmp_path):
    folder = write_fake_cifar10(tmp_path, n_per_batch=7, seed=1)
    assert folder == tmp_path / "cifar-10-batches-py"
    for name in TRAIN_FILES + ["test_batch"]:
        entry = _raw(folder, name)
        assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert isinstance(entry[b"data"], np.ndarray)
        assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (7, 3072)
        assert isinstance(entry[b"labels"], list) and len(entry[b"labels"]) == 7
        assert all(isinstance(v, int) and 0 <= v < 10 for v in entry[b"labels"])
        assert isinstance(entry[b"batch_label"], bytes) and len(entry[b"filenames"]) == 7
    meta = _raw(folder, "batches.meta")
    assert meta[b"label_names"][0] == b"airplane" and len(meta[b"label_names"]) == 10
    assert meta[b"num_vis"] == 3072


@pytest.mark.parametrize("use_inner_folder", [False, True])
def test_cifar10_round_trips_what_was_written(tmp_path, use_inner_folder):
    folder = write_fake_cifar10(tmp_path, n_per_batch=6, seed=2)
    root = folder if use_inner_folder else tmp_path
    for train, names in ((True, TRAIN_FILES), (False, ["test_batch"])):
        x, y = cifar10(root, train=train).tensors
        raw = [_raw(folder, n) for n in names]
        data = np.concatenate([r[b"data"] for r in raw])
        labels = sum((r[b"labels"] for r in raw), [])
        assert x.shape == (6 * len(names), 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.tolist() == labels
        assert 0 <= x.min() and x.max() <= 1
        back = (x * 255).round().to(torch.uint8)
        # channel-major layout: first 1024 bytes are red, row by row
        assert torch.equal(back[:, 0].reshape(-1, 1024), torch.from_numpy(data[:, :1024]))
        assert torch.equal(back.reshape(len(y), -1), torch.from_numpy(data))


def _python2_batch(data: bytes, n: int, labels: list) -> bytes:
    """A batch pickled the way the original files were (Python 2 cPickle, protocol 2,
    numpy < 2): ``numpy.core.multiarray`` globals and byte strings (SHORT_BINSTRING)."""
    assert len(data) == n * 3072 and n < 256 and all(0 <= v < 256 for v in labels)
    out = b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02"
    out += b"cnumpy\nndarray\nq\x03K\x00\x85U\x01b\x87Rq\x04(K\x01K" + bytes([n])
    out += b"M\x00\x0c\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06"
    out += b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
    out += b"T" + struct.pack("<i", len(data)) + data + b"tbU\x06labelsq\x07]q\x08("
    out += b"".join(b"K" + bytes([v]) for v in labels) + b"eu."
    return out


def test_cifar10_reads_python2_numpy1_pickles(tmp_path):
    folder = write_fake_cifar10(tmp_path, n_per_batch=2)
    data = bytes(np.random.default_rng(0).integers(0, 256, 2 * 3072, dtype=np.uint8))
    (folder / "test_batch").write_bytes(_python2_batch(data, 2, [3, 7]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy.core deprecation noise either
        x, y = cifar10(folder, train=False).tensors
    assert y.tolist() == [3, 7]
    expected = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    assert torch.equal((x * 255).round().to(torch.uint8).flatten(), expected)


def test_fake_cifar10_is_seeded(tmp_path):
    a = write_fake_cifar10(tmp_path / "a", n_per_batch=3, seed=0)
    b = write_fake_cifar10(tmp_path / "b", n_per_batch=3, seed=0)
    c = write_fake_cifar10(tmp_path / "c", n_per_batch=3, seed=1)
    xa, xb, xc = (cifar10(f, train=False).tensors[0] for f in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_cifar10_missing_file_names_it_and_the_layout(tmp_path):
    folder = write_fake_cifar10(tmp_path, n_per_batch=2)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3.*cifar-10-batches-py"):
        cifar10(tmp_path, train=True)
    assert len(cifar10(tmp_path, train=False)) == 2  # the test split is still whole


def test_cifar10_empty_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data_batch_1.*test_batch"):
        cifar10(tmp_path / "nowhere")


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    folder = write_fake_cifar10(tmp_path, n_per_batch=2)

    marker = tmp_path / "created_by_unpickling"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="open"):
        cifar10(folder, train=False)
    assert not marker.exists()


def test_cifar10_rejects_malformed_batches(tmp_path):
    folder = write_fake_cifar10(tmp_path, n_per_batch=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match="3072"):
        cifar10(folder, train=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f, protocol=2)
    with pytest.raises(ValueError, match="labels"):
        cifar10(folder, train=False)


def test_cifar10_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="root"):
        cifar10(3)
    with pytest.raises(TypeError, match="train"):
        cifar10(tmp_path, train="yes")
    with pytest.raises(ValueError, match="n_per_batch"):
        write_fake_cifar10(tmp_path, n_per_batch=0)


# ----------------------------------------------------------------------------- loader


def _ds(n=50):
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))


def _order(dl, epochs=2):
    return [torch.cat([yb for _, yb in dl]).tolist() for _ in range(epochs)]


def test_loader_order_depends_only_on_seed():
    ds = _ds()
    torch.manual_seed(123)
    a = _order(loader(ds, batch_size=8, seed=7))
    torch.manual_seed(999)  # the global state must not matter
    b = _order(loader(ds, batch_size=8, seed=7))
    c = _order(loader(ds, batch_size=8, seed=8))
    assert a == b
    assert a != c
    assert a[0] != a[1]  # reshuffled every epoch
    for epoch in a:  # every sample once per epoch
        assert sorted(epoch) == list(range(50))


def test_loader_no_shuffle_and_drop_last():
    ds = _ds(50)
    batches = [yb for _, yb in loader(ds, batch_size=8, shuffle=False, drop_last=True)]
    assert len(batches) == 6 and all(len(b) == 8 for b in batches)
    assert torch.cat(batches).tolist() == list(range(48))
    assert len(loader(ds, batch_size=8)) == 7


@pytest.mark.parametrize(
    "args, kwargs, err, name",
    [
        ((torch.zeros(3),), {}, TypeError, "dataset"),
        ((TensorDataset(torch.zeros(0, 2)),), {}, ValueError, "dataset"),
        ((_ds(),), {"batch_size": 0}, ValueError, "batch_size"),
        ((_ds(),), {"seed": -1}, ValueError, "seed"),
        ((_ds(),), {"shuffle": 1}, TypeError, "shuffle"),
        ((_ds(),), {"drop_last": None}, TypeError, "drop_last"),
    ],
)
def test_loader_bad_arguments(args, kwargs, err, name):
    with pytest.raises(err, match=name):
        loader(*args, **kwargs)
