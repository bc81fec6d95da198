"""Small, seeded datasets for tests, examples and benchmarks.

Every loader returns :class:`torch.utils.data.TensorDataset` objects with
float32 inputs and int64 labels, and is a pure function of its arguments
(explicit seeds, no global random state).
"""

from __future__ import annotations

import math
import os
import pathlib
import pickle
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._checks import nonnegative_int, positive_float, positive_int

__all__ = [
    "digits",
    "gaussian_mixture",
    "linearly_separable",
    "cifar10",
    "write_fake_cifar10",
    "loader",
]

_SKLEARN_HINT = (
    "robustcompress.data.digits needs scikit-learn (it ships the digits dataset). "
    'Install it with: pip install "robustcompress[examples]"'
)


def _open_fraction(value: Any, name: str) -> float:
    """Return ``float(value)`` if it lies strictly inside (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected {name} to be a real number, but got {name}={value!r}")
    if not (math.isfinite(value) and 0 < value < 1):
        raise ValueError(f"Expected {name} to lie in (0, 1), but got {name}={value!r}")
    return float(value)


def digits(
    test_fraction: float = 0.2, seed: int = 0, image: bool = False
) -> tuple[TensorDataset, TensorDataset]:
    """The scikit-learn 8×8 digits (1797 images, 10 classes), split into train and test.

    Pixels are integers in 0..16 and are scaled as ``x = pixel / 16`` so that
    ``x ∈ [0, 1]``. The split is stratified (each class keeps its share up to
    rounding) and fixed by ``seed``.

    Args:
        test_fraction: share of the samples in the test split, in (0, 1).
        seed: seed of the split (``random_state`` of ``train_test_split``).
        image: return inputs of shape ``(N, 1, 8, 8)`` instead of ``(N, 64)``.

    Returns:
        ``(train, test)``: TensorDatasets of ``(x float32, y int64)``.

    Example:
        >>> train, test = digits(seed=0)
        >>> train.tensors[0].shape, test.tensors[0].shape
        (torch.Size([1437, 64]), torch.Size([360, 64]))
    """
    test_fraction = _open_fraction(test_fraction, "test_fraction")
    seed = nonnegative_int(seed, "seed")
    if not isinstance(image, bool):
        raise TypeError(f"Expected image to be a bool, but got image={image!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(_SKLEARN_HINT) from err

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    shape = (-1, 1, 8, 8) if image else (-1, 64)

    def _ds(xs: np.ndarray, ys: np.ndarray) -> TensorDataset:
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(xs)).reshape(shape),
            torch.from_numpy(np.ascontiguousarray(ys)),
        )

    return _ds(x_tr, y_tr), _ds(x_te, y_te)


def gaussian_mixture(
    n: int = 1000, dim: int = 20, classes: int = 4, separation: float = 3.0, seed: int = 0
) -> TensorDataset:
    """Isotropic Gaussian classes with equidistant means.

    Class ``c`` draws ``x = μ_c + z`` with ``z ~ N(0, I_dim)``. The means are
    ``μ_c = (separation / √2) · q_c`` for orthonormal ``q_1 … q_classes`` (a
    seeded random rotation), so every pair of means lies exactly
    ``‖μ_a − μ_b‖₂ = separation`` apart, measured in noise standard deviations.
    Classes are balanced: their sizes differ by at most one.

    Args:
        n: number of samples, at least ``classes``.
        dim: input dimension, at least ``classes`` (the means must be orthonormal).
        classes: number of classes, at least 2.
        separation: distance between any two class means, > 0.
        seed: seed of the means, the noise and the order of the samples.

    Returns:
        TensorDataset of ``(x float32 (n, dim), y int64 (n,))``.

    Example:
        >>> ds = gaussian_mixture(n=100, dim=8, classes=4)
        >>> ds.tensors[0].shape, torch.bincount(ds.tensors[1]).tolist()
        (torch.Size([100, 8]), [25, 25, 25, 25])
    """
    n = positive_int(n, "n")
    dim = positive_int(dim, "dim")
    classes = positive_int(classes, "classes")
    separation = positive_float(separation, "separation")
    seed = nonnegative_int(seed, "seed")
    if classes < 2:
        raise ValueError(f"Expected classes to be at least 2, but got classes={classes}")
    if dim < classes:
        raise ValueError(
            f"Expected dim >= classes (the class means are orthonormal directions), "
            f"but got dim={dim}, classes={classes}"
        )
    if n < classes:
        raise ValueError(
            f"Expected n >= classes so every class has a sample, but got n={n}, classes={classes}"
        )

    g = torch.Generator().manual_seed(seed)
    # Orthonormal columns from the QR factor of a Gaussian matrix: a random
    # rotation, so the means are not aligned with the coordinate axes.
    q, _ = torch.linalg.qr(torch.randn(dim, classes, generator=g, dtype=torch.float64))
    means = (separation / math.sqrt(2.0)) * q.T  # (classes, dim)
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    x = means[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)
    return TensorDataset(x.to(torch.float32), y.to(torch.int64))


def linearly_separable(
    n: int = 1000, dim: int = 20, margin: float = 0.5, seed: int = 0
) -> tuple[TensorDataset, torch.Tensor]:
    """Two classes split by the hyperplane ``{x : wᵀx = 0}`` with a known margin.

    With a seeded unit vector ``w`` and ``z ~ N(0, I_dim)``, each point is
    ``x = z + s·(margin + δ)·w`` where ``s = sign(wᵀz)`` (``+1`` at 0), so its
    distance to the plane is ``|wᵀx| = |wᵀz| + margin + δ ≥ margin``; the
    label is ``y = 1`` if ``s = +1`` else ``0``. ``δ ≈ 1e-6`` absorbs float32
    rounding, so the bound also holds for the returned float32 ``x`` and ``w``
    (checked in float64).

    Args:
        n: number of samples.
        dim: input dimension.
        margin: lower bound on every point's distance to the plane, > 0.
        seed: seed of ``w`` and of the samples.

    Returns:
        ``(dataset, w)``: TensorDataset of ``(x float32 (n, dim), y int64 (n,))``
        and the unit normal ``w`` (float32, shape ``(dim,)``) of the plane.

    Example:
        >>> ds, w = linearly_separable(n=200, dim=5, margin=0.5)
        >>> x, y = ds.tensors
        >>> bool(((x.double() @ w.double()).abs() >= 0.5).all())
        True
    """
    n = positive_int(n, "n")
    dim = positive_int(dim, "dim")
    margin = positive_float(margin, "margin")
    seed = nonnegative_int(seed, "seed")

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g, dtype=torch.float64)
    w = w / w.norm()
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    side = torch.where(z @ w >= 0, 1.0, -1.0).to(torch.float64)
    # Casting x and w to float32 moves wᵀx by at most ~2·eps32·(‖x‖₂ + 1);
    # pushing each point that much further keeps |wᵀx| >= margin after the cast.
    eps32 = torch.finfo(torch.float32).eps
    slack = 4 * eps32 * (z.norm(dim=1) + margin + 1.0)
    x = z + (side * (margin + slack)).unsqueeze(1) * w
    y = (side > 0).to(torch.int64)
    return TensorDataset(x.to(torch.float32), y), w.to(torch.float32)


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_LABELS = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_CIFAR_LAYOUT = (
    f"<root>/{_CIFAR_DIR}/ holding data_batch_1 ... data_batch_5 and test_batch "
    "(the python version of CIFAR-10, cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, unpacked)"
)
_DRY_RUN_HINT = (
    ". For a dry run without the download, write a tiny random stand-in in the same format with "
    "robustcompress.data.write_fake_cifar10(root)"
)

# The batches are pickles; a pickle can run arbitrary code when loaded, so only
# the few globals that rebuild numpy arrays (and bytes under protocol 2) load.
_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"CIFAR-10 batch refers to {module}.{name}; only numpy arrays, lists, "
                "dicts and bytes are allowed in a CIFAR-10 batch file"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            # Batches pickled under numpy < 2 name numpy.core, which numpy 2 renamed.
            module = "numpy._core." + module.split(".", 2)[2]
        return super().find_class(module, name)


def _cifar_dir(root: str | os.PathLike) -> pathlib.Path:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"Expected root to be a str or os.PathLike, but got root={root!r}")
    root = pathlib.Path(root)
    if (root / _CIFAR_DIR).is_dir():
        return root / _CIFAR_DIR
    batch_files = (root / name for name in _CIFAR_TRAIN + _CIFAR_TEST)
    if root.name == _CIFAR_DIR or any(f.is_file() for f in batch_files):
        return root
    raise FileNotFoundError(
        f"CIFAR-10 not found under root={str(root)!r}: expected {_CIFAR_LAYOUT}; "
        f"neither {str(root / _CIFAR_DIR)!r} nor batch files in root exist{_DRY_RUN_HINT}"
    )


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        # encoding="bytes" is how the CIFAR-10 page says to read these Python 2
        # pickles; keys come back as b"data", b"labels".
        entry = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(entry, dict):
        raise ValueError(f"CIFAR-10 batch {str(path)!r} is not a pickled dict")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    missing = [k for k in ("data", "labels") if k not in entry]
    if missing:
        raise ValueError(f"CIFAR-10 batch {str(path)!r} lacks the keys {missing} (has {sorted(entry)})")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r}: expected data of dtype uint8 and shape (N, 3072), "
            f"but got dtype={data.dtype}, shape={data.shape}"
        )
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r}: expected {data.shape[0]} labels in 0..9, "
            f"but got shape={labels.shape}"
            + (f", range [{labels.min()}, {labels.max()}]" if labels.size else "")
        )
    return data, labels


def cifar10(root: str | os.PathLike, train: bool = True) -> TensorDataset:
    """CIFAR-10 from the python-pickle batches in a local folder (nothing is downloaded).

    Each batch row holds 3072 bytes: 1024 red, then green, then blue, each a
    32×32 image in row-major order, so ``x = row.reshape(3, 32, 32) / 255``.

    Args:
        root: the folder holding ``cifar-10-batches-py/``, or that folder itself.
        train: the 50 000 training images (``data_batch_1..5``) if True, else
            the 10 000 test images (``test_batch``).

    Returns:
        TensorDataset of ``(x float32 (N, 3, 32, 32) in [0, 1], y int64 (N,))``.

    Raises:
        FileNotFoundError: a batch file is missing; the message names it and the
            expected layout.

    Example:
        >>> folder = write_fake_cifar10(tmp_dir, n_per_batch=4)  # doctest: +SKIP
        >>> cifar10(folder, train=False).tensors[0].shape  # doctest: +SKIP
        torch.Size([4, 3, 32, 32])
    """
    if not isinstance(train, bool):
        raise TypeError(f"Expected train to be a bool, but got train={train!r}")
    folder = _cifar_dir(root)
    names = _CIFAR_TRAIN if train else _CIFAR_TEST
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 file(s) {missing} missing in {str(folder)!r}: expected {_CIFAR_LAYOUT}{_DRY_RUN_HINT}"
        )
    parts = [_read_cifar_batch(folder / name) for name in names]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    x = torch.from_numpy(data).reshape(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    return TensorDataset(x, torch.from_numpy(labels))


def write_fake_cifar10(root: str | os.PathLike, n_per_batch: int = 20, seed: int = 0) -> pathlib.Path:
    """Write a tiny random dataset in exactly the CIFAR-10 python-pickle format.

    Creates ``root/cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch``
    (dicts with ``b"batch_label"``, ``b"labels"``, ``b"data"`` uint8 ``(n, 3072)``,
    ``b"filenames"``) and ``batches.meta`` (``b"label_names"``,
    ``b"num_cases_per_batch"``, ``b"num_vis"``), pickled with protocol 2 like
    the originals. For tests and smoke runs of the CIFAR examples.

    Args:
        root: folder to create the dataset in (created if needed).
        n_per_batch: images per batch file.
        seed: seed of pixels and labels.

    Returns:
        The ``cifar-10-batches-py`` folder (``cifar10`` accepts it or ``root``).

    Example:
        >>> folder = write_fake_cifar10(tmp_dir, n_per_batch=4)  # doctest: +SKIP
        >>> len(cifar10(folder, train=True))  # doctest: +SKIP
        20
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"Expected root to be a str or os.PathLike, but got root={root!r}")
    n_per_batch = positive_int(n_per_batch, "n_per_batch")
    seed = nonnegative_int(seed, "seed")
    folder = pathlib.Path(root) / _CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    batches = [(name, f"training batch {i} of 5") for i, name in enumerate(_CIFAR_TRAIN, 1)]
    batches.append((_CIFAR_TEST[0], "testing batch 1 of 1"))
    for b, (name, label) in enumerate(batches):
        dump(
            name,
            {
                b"batch_label": label.encode(),
                b"labels": rng.integers(0, 10, size=n_per_batch).tolist(),
                b"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
                b"filenames": [f"fake_{b}_{i:05d}.png".encode() for i in range(n_per_batch)],
            },
        )
    dump(
        "batches.meta",
        {
            b"num_cases_per_batch": n_per_batch,
            b"label_names": [name.encode() for name in _CIFAR_LABELS],
            b"num_vis": 3072,
        },
    )
    return folder


def loader(
    dataset: Dataset,
    batch_size: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process DataLoader whose order depends only on ``seed``.

    The shuffle draws from its own ``torch.Generator`` seeded with ``seed``, so
    two loaders built with the same arguments yield the same batches, epoch
    after epoch, whatever the global random state.

    Args:
        dataset: a map-style dataset with ``__len__`` (e.g. a TensorDataset), non-empty.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch.
        seed: seed of the shuffle order.
        drop_last: drop the last incomplete batch.

    Returns:
        A ``torch.utils.data.DataLoader``.

    Example:
        >>> train, _ = digits()
        >>> xb, yb = next(iter(loader(train, batch_size=32)))
        >>> xb.shape
        torch.Size([32, 64])
    """
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"Expected dataset to be a map-style torch Dataset with __len__, "
            f"but got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError("Expected dataset to be non-empty, but got len(dataset)=0")
    batch_size = positive_int(batch_size, "batch_size")
    seed = nonnegative_int(seed, "seed")
    for flag, name in ((shuffle, "shuffle"), (drop_last, "drop_last")):
        if not isinstance(flag, bool):
            raise TypeError(f"Expected {name} to be a bool, but got {name}={flag!r}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        num_workers=0,
    )
