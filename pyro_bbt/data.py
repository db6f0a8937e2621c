"""MNIST tasks for transfer / continual learning (split, rotated, noisy, permuted MNIST).

Data source
-----------
By default the MNIST copy embedded in the package (``pyro_bbt/mnist_data/*.gz``) is
used: :func:`mnist_root` decompresses it once into a cache directory
(``$PYRO_BBT_DATA_DIR``, default ``~/.cache/pyro_bbt``) with the layout that
``torchvision.datasets.MNIST(root)`` expects (``<root>/MNIST/raw/<idx files>``) and
checks the sha256 of every decompressed file on every call. Nothing is downloaded
unless a ``data_dir`` is given together with ``download=True``.

Pipeline of :func:`load_task`
-----------------------------
1. Read the raw MNIST tensors (uint8 images, int64 labels) from the IDX files.
2. Keep the images whose label is in ``task.digits`` and remap labels:
   ``task.digits[k] -> k``.
3. Carve a validation split out of MNIST's *training* images, stratified per digit
   (``round(val_fraction * n_digit)`` images per digit), chosen by ``split_seed``
   only, so it is the same for every ``seed`` and ``fraction``.
4. Subsample the remaining training images to ``fraction``, stratified per digit
   (``round(fraction * n_digit)`` per digit, an error if that is 0), chosen by
   ``seed``. For one ``seed`` the subsets are nested: a smaller fraction keeps a
   subset of a larger one's images.
   Every split keeps MNIST's original order of images (so ``Split.subset`` mixes
   classes).
5. Transform every image of every split (train, val and test alike), in this order:

   a. rotate by ``rotation`` degrees counter-clockwise (the direction of
      ``torch.rot90(k=1, dims=(-2, -1))``); multiples of 90 use ``torch.rot90``
      (exact), other angles bilinear interpolation with zero fill (the raw
      background value, since this happens before scaling);
   b. scale (``SCALINGS``): ``"blundell"`` ``x / 126`` (Blundell et al. 2015, the
      default), ``"unit"`` ``x / 255``, ``"standardize"``
      ``(x / 255 - 0.1307) / 0.3081`` (global MNIST train mean / std);
   c. add Gaussian noise of std ``noise_std`` (in scaled units); the noise of an
      image depends only on ``seed`` and the image's index in its MNIST file, so it
      is fixed per image (independent of ``fraction``, ``digits`` or the split);
   d. permute the 784 pixels with :func:`pixel_permutation(permutation_seed)
      <pixel_permutation>` (``x_new[:, j] = x_flat[:, perm[j]]``), the same
      permutation for every split;
   e. flatten to ``(n, 784)`` float32.

Processed tasks are cached in-process (keyed by the frozen :class:`Task` and the data
root); :func:`load_task` and :func:`load_mnist` hand out copies, so callers may modify
the returned tensors freely.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import math
import numbers
import operator
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SCALINGS",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "ChecksumError",
    "Split",
    "Task",
    "TaskData",
    "clear_cache",
    "load_mnist",
    "load_task",
    "mnist_root",
    "parse_digits",
    "pixel_permutation",
]

SCALINGS: tuple[str, ...] = ("blundell", "unit", "standardize")
"""Allowed values of :attr:`Task.scaling` (see the module docstring)."""

MNIST_MEAN = 0.1307
"""Mean pixel value of the MNIST training images scaled to [0, 1]."""
MNIST_STD = 0.3081
"""Std of the pixel values of the MNIST training images scaled to [0, 1]."""

MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
"""sha256 of each decompressed MNIST IDX file."""

CACHE_ENV_VAR = "PYRO_BBT_DATA_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/pyro_bbt")
IMAGE_SIDE = 28
INPUT_DIM = IMAGE_SIDE * IMAGE_SIDE
_N_TRAIN_MNIST = 60_000
_N_TEST_MNIST = 10_000
_HASH_CHUNK = 1 << 20
_NOISE_CHUNK = 8192
# Processed tasks kept per process: the five tasks of a split sequence, which every unit of the
# sequence loads in turn (with 4, each load missed); a task is at most ~230 MB (all ten digits).
_TASK_CACHE_SIZE = 6


class ChecksumError(ValueError):
    """A decompressed MNIST file does not have the expected sha256."""

    def __init__(self, path: str | Path, expected: str, actual: str, hint: str = "") -> None:
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        msg = f"sha256 mismatch for {self.path}: expected {expected}, got {actual}"
        super().__init__(msg + (f". {hint}" if hint else ""))


# --------------------------------------------------------------------------- files


def _sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _cache_dir() -> Path:
    """The cache root: ``$PYRO_BBT_DATA_DIR`` or ``~/.cache/pyro_bbt``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_CACHE_DIR.expanduser()


def _raw_dir(root: Path) -> Path:
    """Where torchvision's MNIST looks for the IDX files under ``root``."""
    return root / "MNIST" / "raw"


def _extract_embedded(name: str, target: Path) -> None:
    """Decompress the packaged ``<name>.gz`` to ``target`` atomically, checking sha256.

    Writes to a temporary file in ``target``'s directory and only moves it into place
    (``os.replace``) once its checksum is right, so ``target`` is never partial.
    """
    source = importlib.resources.files(__package__).joinpath("mnist_data", name + ".gz")
    if not source.is_file():
        raise FileNotFoundError(
            f"embedded MNIST file {name}.gz is missing from the pyro_bbt package "
            "(was it installed without its package data?); pass data_dir= instead"
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, source.open("rb") as raw, gzip.GzipFile(fileobj=raw) as gz:
            for block in iter(lambda: gz.read(_HASH_CHUNK), b""):
                h.update(block)
                out.write(block)
        actual = h.hexdigest()
        if actual != MNIST_FILES[name]:
            raise ChecksumError(
                f"{source} (decompressed)",
                MNIST_FILES[name],
                actual,
                "the package's embedded copy is damaged; reinstall pyro_bbt",
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache files are ordinary data
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Files this process has hashed and found right, by their ``os.stat`` identity: a file whose
# device, inode, size, mtime and ctime are unchanged is not hashed again.
_VERIFIED: dict[Path, tuple[int, ...]] = {}
# Only a file older than this when hashed is remembered ("racily clean", as git calls it):
# file times advance in ticks of a few ms, so a file rewritten within a tick of its last write
# can keep its mtime; one hashed a second after its last write cannot be rewritten in that tick.
_VERIFIED_MIN_AGE_S = 1.0


def _stat_identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _verify_raw_dir(raw: Path) -> None:
    """Check the sha256 of every MNIST file in ``raw``; raise :class:`ChecksumError`.

    A file this process has already found right is hashed again only if its ``os.stat``
    identity (device, inode, size, mtime, ctime) changed since; see ``_VERIFIED``."""
    for name, expected in MNIST_FILES.items():
        path = raw / name
        identity = _stat_identity(path)
        if _VERIFIED.get(path) == identity:
            continue
        started = time.time()
        actual = _sha256_file(path)
        if actual != expected:
            _VERIFIED.pop(path, None)
            raise ChecksumError(
                path, expected, actual, "delete the file to have it extracted or downloaded again"
            )
        if started - identity[3] / 1e9 >= _VERIFIED_MIN_AGE_S and _stat_identity(path) == identity:
            _VERIFIED[path] = identity


def mnist_root(data_dir: str | Path | None = None, download: bool = False) -> Path:
    """Return a torchvision MNIST root directory with verified files.

    Args:
        data_dir: ``None`` (default) uses the copy embedded in the package: its ``.gz``
            files are decompressed (once, atomically) into
            ``<cache>/MNIST/raw/`` where ``<cache>`` is ``$PYRO_BBT_DATA_DIR`` or
            ``~/.cache/pyro_bbt``, and ``<cache>`` is returned. Otherwise ``data_dir`` is
            the torchvision root itself (files in ``<data_dir>/MNIST/raw/``).
        download: only with ``data_dir``: let torchvision download missing files into
            it. Ignored for the embedded copy.

    Every call checks the sha256 of the four decompressed files (~0.06 s), unless this
    process found a file right before and its ``os.stat`` identity has not changed since.

    Raises:
        ChecksumError: a file has the wrong sha256 (the message names the file, the
            expected and the actual digest).
        FileNotFoundError: ``data_dir`` lacks the files and ``download`` is false.
    """
    if data_dir is None:
        root = _cache_dir()
        raw = _raw_dir(root)
        try:
            raw.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(
                f"cannot create the MNIST cache {raw} ({e}); set {CACHE_ENV_VAR} to a writable directory"
            ) from e
        for name in MNIST_FILES:
            if not (raw / name).is_file():
                _extract_embedded(name, raw / name)
    else:
        root = Path(data_dir).expanduser()
        raw = _raw_dir(root)
        missing = [n for n in MNIST_FILES if not (raw / n).is_file()]
        if missing and download:
            from torchvision.datasets import MNIST

            MNIST(str(root), train=True, download=True)  # fetches all four files
            missing = [n for n in MNIST_FILES if not (raw / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"MNIST files {missing} not found in {raw}; pass download=True, "
                "or data_dir=None to use the copy embedded in pyro_bbt"
            )
    _verify_raw_dir(raw)
    return root


IDX_TYPES = {0x08: np.uint8}  # the IDX element types MNIST uses (0x08: unsigned byte)


def read_idx(path: Path) -> np.ndarray:
    """The array in an IDX file (LeCun's format, the one MNIST ships in): two zero bytes, a
    type byte (``0x08``: uint8), a byte ``d`` for the number of dimensions, ``d`` big-endian
    uint32 sizes, then the elements in row-major order. ``ValueError`` naming the file for
    anything else (a wrong header, another type, a size that does not match the file's length)."""
    data = path.read_bytes()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES or data[3] == 0:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()!r}; expected 0000 08 <dims>)")
    dims = data[3]
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(dims))
    if len(data) != header + math.prod(shape):
        raise ValueError(f"{path}: the IDX header says shape {shape} ({math.prod(shape)} bytes), the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=IDX_TYPES[data[2]], offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _read_mnist(root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw MNIST tensors read from the IDX files under ``root`` (cached; never modify in place).
    Read directly (:func:`read_idx`), not through ``torchvision.datasets.MNIST``, whose import
    alone takes about 2 s (it imports ``torch._dynamo``); the tensors are the same
    (``tests/test_data.py``)."""
    raw = _raw_dir(Path(root))

    def images_and_labels(prefix: str) -> tuple[Tensor, Tensor]:
        return (torch.from_numpy(read_idx(raw / f"{prefix}-images-idx3-ubyte").copy()),
                torch.from_numpy(read_idx(raw / f"{prefix}-labels-idx1-ubyte").astype(np.int64)))

    return (*images_and_labels("train"), *images_and_labels("t10k"))


def _resolved_root(data_dir: str | Path | None, download: bool) -> str:
    """Verified MNIST root as a resolved path string (the in-process cache key)."""
    return str(mnist_root(data_dir, download).resolve())


def load_mnist(
    data_dir: str | Path | None = None, download: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load MNIST as ``(train_images, train_labels, test_images, test_labels)``.

    Images are uint8 ``(60000, 28, 28)`` / ``(10000, 28, 28)``, labels int64. The
    tensors are read once per root and cached in-process; each call returns fresh
    copies. ``data_dir`` and ``download`` are as in :func:`mnist_root`.
    """
    return tuple(t.clone() for t in _read_mnist(_resolved_root(data_dir, download)))  # type: ignore[return-value]


# --------------------------------------------------------------------------- tasks


def _check_int(value: object, what: str, minimum: int | None = None) -> int:
    """``value`` as an int (no bools, no floats), optionally ``>= minimum``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value!r}")
    return out


def _check_real(value: object, what: str) -> float:
    """``value`` as a float (no bools, no strings)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {value!r}")
    return float(value)


def _check_digits(digits: object) -> tuple[int, ...]:
    """Normalise ``digits`` to a non-empty tuple of distinct ints in 0-9."""
    if isinstance(digits, str):
        return parse_digits(digits)
    try:
        items = list(digits)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"digits must be a sequence of ints 0-9, got {digits!r}") from None
    if not items:
        raise ValueError(f"digits must not be empty, got {digits!r}; allowed: distinct ints 0-9")
    out = []
    for d in items:
        try:
            d = _check_int(d, "each digit")
        except ValueError:
            raise ValueError(f"digits must be ints 0-9, got {d!r} in {digits!r}") from None
        if not 0 <= d <= 9:
            raise ValueError(f"digit {d!r} in digits {digits!r} is outside the allowed range 0-9")
        if d in out:
            raise ValueError(f"digit {d!r} is repeated in digits {digits!r}; digits must be distinct")
        out.append(d)
    return tuple(out)


_DIGIT_TOKEN = re.compile(r"^(\d)(?:-(\d))?$")


def parse_digits(text: str) -> tuple[int, ...]:
    """Parse a digit list such as ``"5,6,7,8,9"``, ``"5 6 7"`` or ``"5-9"``.

    Tokens are separated by commas and/or whitespace; a token is a digit or an
    inclusive ascending range ``a-b``. The result must be non-empty, distinct, 0-9.

    Raises:
        ValueError: naming ``text`` if it is not such a list.
    """
    if not isinstance(text, str):
        raise ValueError(f"digits text must be a string, got {text!r}")
    tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not tokens or re.search(r",\s*,|^\s*,|,\s*$", text):
        raise ValueError(f"cannot parse digits from {text!r}; expected e.g. '5,6,7,8,9' or '5-9'")
    digits: list[int] = []
    for tok in tokens:
        m = _DIGIT_TOKEN.match(tok)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(
                f"cannot parse digits from {text!r}: bad token {tok!r}; expected e.g. '5,6,7,8,9' or '5-9'"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        digits.extend(range(lo, hi + 1))
    try:
        return _check_digits(digits)
    except ValueError as e:
        raise ValueError(f"bad digits {text!r}: {e}") from None


@dataclass(frozen=True)
class Task:
    """A classification task over a subset of MNIST digits, with optional shifts.

    Attributes:
        digits: the digits in the task; ``digits[k]`` gets label ``k``. A list or a
            string (see :func:`parse_digits`) is normalised to a tuple of ints.
        fraction: fraction of the (post-validation) training images kept, stratified
            per digit, chosen by ``seed``; in ``(0, 1]``.
        seed: drives the ``fraction`` subsample and the pixel noise.
        rotation: angle in degrees, counter-clockwise, applied to every image.
        noise_std: std of additive Gaussian pixel noise (after scaling), >= 0.
        permutation_seed: if not ``None``, pixels are permuted by
            :func:`pixel_permutation` of this seed (permuted MNIST).
        scaling: one of :data:`SCALINGS`.
        val_fraction: fraction of MNIST's training images of each digit held out for
            validation, chosen by ``split_seed``; in ``[0, 1)``.
        split_seed: seed of the validation split (independent of ``seed``).
        name: free-form label (e.g. ``"A"``); part of equality.

    Raises:
        ValueError: for an invalid field, naming the value and what is allowed.
    """

    digits: tuple[int, ...] = (0, 1, 2, 3, 4)
    fraction: float = 1.0
    seed: int = 0
    rotation: float = 0.0
    noise_std: float = 0.0
    permutation_seed: int | None = None
    scaling: str = "blundell"
    val_fraction: float = 0.1
    split_seed: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("digits", _check_digits(self.digits))
        fraction = _check_real(self.fraction, "fraction")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        set_("fraction", fraction)
        set_("seed", _check_int(self.seed, "seed", minimum=0))
        rotation = _check_real(self.rotation, "rotation")
        if not math.isfinite(rotation):
            raise ValueError(f"rotation must be a finite number of degrees, got {self.rotation!r}")
        set_("rotation", rotation)
        noise_std = _check_real(self.noise_std, "noise_std")
        if not (math.isfinite(noise_std) and noise_std >= 0.0):
            raise ValueError(f"noise_std must be finite and >= 0, got {self.noise_std!r}")
        set_("noise_std", noise_std)
        if self.permutation_seed is not None:
            set_("permutation_seed", _check_int(self.permutation_seed, "permutation_seed", minimum=0))
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; allowed: {', '.join(SCALINGS)}")
        val_fraction = _check_real(self.val_fraction, "val_fraction")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        set_("val_fraction", val_fraction)
        set_("split_seed", _check_int(self.split_seed, "split_seed", minimum=0))
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(digits)``)."""
        return len(self.digits)


@dataclass(eq=False)
class Split:
    """Inputs and labels of one split.

    Attributes:
        x: float32 ``(n, 784)``, fully transformed (see the module docstring).
        y: int64 ``(n,)``, remapped labels ``0 .. num_classes - 1``.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Split needs x of shape (n, d) and y of shape (n,), got {tuple(self.x.shape)} "
                f"and {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of ``(x, y)`` minibatches covering every example once.

        With ``shuffle`` the order is one ``torch.randperm`` drawn from ``generator``
        (the global RNG if ``None``) when this method is called; without it batches
        are contiguous views in order. ``drop_last`` drops a final short batch.
        """
        batch_size = _check_int(batch_size, "batch_size", minimum=1)
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        if not shuffle:
            return ((self.x[i : i + batch_size], self.y[i : i + batch_size]) for i in range(0, stop, batch_size))
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device).to(self.x.device)
        return (
            (self.x[idx], self.y[idx])
            for idx in (order[i : i + batch_size] for i in range(0, stop, batch_size))
        )

    def to(self, device: torch.device | str) -> "Split":
        """A copy of this split on ``device`` (tensors are shared if already there)."""
        return Split(self.x.to(device), self.y.to(device))

    def subset(self, n: int) -> "Split":
        """The first ``n`` examples (views; fewer if the split is shorter)."""
        n = _check_int(n, "n", minimum=0)
        return Split(self.x[:n], self.y[:n])

    def clone(self) -> "Split":
        """A copy that shares no memory with this split."""
        return Split(self.x.clone(), self.y.clone())


@dataclass(eq=False)
class TaskData:
    """The train / validation / test splits of a :class:`Task`."""

    task: Task
    train: Split
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        """Number of classes of the task."""
        return self.task.num_classes

    @property
    def input_dim(self) -> int:
        """Number of input features (784)."""
        return int(self.train.x.shape[1])

    def to(self, device: torch.device | str) -> "TaskData":
        """The same task data with every split on ``device``."""
        return TaskData(self.task, self.train.to(device), self.val.to(device), self.test.to(device))


# ----------------------------------------------------------------- task processing


def _derived_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across runs and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def pixel_permutation(seed: int) -> Tensor:
    """The pixel permutation of permuted MNIST for ``seed``: ``randperm(784)`` int64.

    Drawn from ``torch.Generator().manual_seed(seed)``; a task applies it as
    ``x[:, perm]``, so ``x[:, torch.argsort(perm)]`` undoes it.
    """
    return torch.randperm(INPUT_DIM, generator=_generator(_check_int(seed, "seed", minimum=0)))


def _round_half_up(value: float) -> int:
    """Round to the nearest int, halves up (not banker's rounding)."""
    return int(math.floor(value + 0.5))


def _shuffled(indices: Tensor, *seed_parts: object) -> Tensor:
    """``indices`` in a random order fixed by ``seed_parts``."""
    return indices[torch.randperm(len(indices), generator=_generator(_derived_seed(*seed_parts)))]


def _split_indices(labels: Tensor, task: Task) -> tuple[Tensor, Tensor]:
    """MNIST training indices of the task's train and val splits (sorted).

    Per digit: the val images are chosen by ``split_seed`` alone; the train images are
    a ``fraction`` of the rest chosen by ``seed`` (nested across fractions).
    """
    train_parts, val_parts = [], []
    for d in task.digits:
        idx = torch.nonzero(labels == d).flatten()
        idx = _shuffled(idx, "val", task.split_seed, d)
        n_val = _round_half_up(task.val_fraction * len(idx))
        val_parts.append(idx[:n_val])
        pool = torch.sort(idx[n_val:]).values
        if len(pool) == 0:
            raise ValueError(
                f"val_fraction={task.val_fraction!r} leaves digit {d} with no training example"
            )
        n_keep = _round_half_up(task.fraction * len(pool))
        if n_keep < 1:
            raise ValueError(
                f"fraction={task.fraction!r} leaves digit {d} with no training example "
                f"({len(pool)} available); use a fraction >= {0.5 / len(pool):.3g}"
            )
        train_parts.append(_shuffled(pool, "fraction", task.seed, d)[:n_keep])
    return torch.sort(torch.cat(train_parts)).values, torch.sort(torch.cat(val_parts)).values


def _rotate(images: Tensor, angle: float) -> Tensor:
    """Rotate float ``(n, 28, 28)`` images counter-clockwise by ``angle`` degrees."""
    if angle % 90.0 == 0.0:
        k = int(angle // 90.0) % 4
        return torch.rot90(images, k, dims=(-2, -1)) if k else images
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import rotate

    out = rotate(images.unsqueeze(1), angle, interpolation=InterpolationMode.BILINEAR)
    return out.squeeze(1)


def _scale(images: Tensor, scaling: str) -> Tensor:
    """Scale raw 0-255 float pixels as named by ``scaling`` (in place)."""
    if scaling == "blundell":
        return images.div_(126.0)
    if scaling == "unit":
        return images.div_(255.0)
    if scaling == "standardize":
        return images.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    raise ValueError(f"unknown scaling {scaling!r}; allowed: {', '.join(SCALINGS)}")


def _pixel_noise(indices: Tensor, total: int, seed: int, source: str) -> Tensor:
    """Standard normal ``(len(indices), 28, 28)`` noise fixed per MNIST image.

    The noise of image ``i`` of the MNIST file ``source`` is row ``i`` of one stream of
    ``total`` images drawn (in chunks) from a generator seeded by ``(seed, source)``.
    """
    gen = _generator(_derived_seed("noise", seed, source))
    out = torch.empty(len(indices), IMAGE_SIDE, IMAGE_SIDE)
    for start in range(0, total, _NOISE_CHUNK):
        stop = min(start + _NOISE_CHUNK, total)
        chunk = torch.randn(stop - start, IMAGE_SIDE, IMAGE_SIDE, generator=gen)
        rows = torch.nonzero((indices >= start) & (indices < stop)).flatten()
        out[rows] = chunk[indices[rows] - start]
    return out


def _transform(images: Tensor, indices: Tensor, total: int, source: str, task: Task) -> Tensor:
    """Rotate -> scale -> noise -> permute -> flatten ``images`` (uint8, n x 28 x 28).

    ``indices`` are the images' positions in the MNIST file ``source`` (of ``total``
    images); they fix the per-image noise.
    """
    x = images.to(torch.float32)
    if task.rotation:
        x = _rotate(x, task.rotation)
    x = _scale(x.contiguous(), task.scaling)
    if task.noise_std > 0.0:
        x = x.add_(_pixel_noise(indices, total, task.seed, source), alpha=task.noise_std)
    x = x.reshape(len(x), INPUT_DIM)
    if task.permutation_seed is not None:
        x = x[:, pixel_permutation(task.permutation_seed)]
    return x.contiguous()


def _remap(labels: Tensor, digits: tuple[int, ...]) -> Tensor:
    """Map original digit labels to ``0 .. len(digits) - 1`` in the order of ``digits``."""
    lut = torch.full((10,), -1, dtype=torch.int64)
    lut[list(digits)] = torch.arange(len(digits))
    return lut[labels]


@functools.lru_cache(maxsize=_TASK_CACHE_SIZE)
def _load_task_cached(task: Task, root: str) -> TaskData:
    """Build the task's splits from the MNIST files at ``root`` (cached; never mutate)."""
    train_images, train_labels, test_images, test_labels = _read_mnist(root)
    train_idx, val_idx = _split_indices(train_labels, task)
    fit_idx = torch.cat([train_idx, val_idx])  # transform train and val in one pass
    fit_x = _transform(train_images[fit_idx], fit_idx, _N_TRAIN_MNIST, "train", task)
    fit_y = _remap(train_labels[fit_idx], task.digits)
    n_train = len(train_idx)
    test_idx = torch.nonzero(torch.isin(test_labels, torch.tensor(task.digits))).flatten()
    test_x = _transform(test_images[test_idx], test_idx, _N_TEST_MNIST, "test", task)
    return TaskData(
        task,
        train=Split(fit_x[:n_train], fit_y[:n_train]),
        val=Split(fit_x[n_train:], fit_y[n_train:]),
        test=Split(test_x, _remap(test_labels[test_idx], task.digits)),
    )


def load_task(
    task: Task,
    data_dir: str | Path | None = None,
    download: bool = False,
    *,
    limit_train: int | None = None,
    limit_eval: int | None = None,
) -> TaskData:
    """Load the train / val / test splits of ``task`` (see the module docstring).

    Results are cached in-process (the last few tasks per data root); the returned
    splits are copies, so callers may modify them. ``data_dir`` / ``download`` are as
    in :func:`mnist_root`. ``limit_train`` keeps the first ``limit_train`` training
    images, ``limit_eval`` the first ``limit_eval`` validation and test images (``None``:
    all); only what is kept is copied.

    Raises:
        ValueError: ``task.fraction`` leaves a digit with no training example; a limit is
            not an integer >= 0.
        ChecksumError, FileNotFoundError: see :func:`mnist_root`.
    """
    if not isinstance(task, Task):
        raise ValueError(f"load_task needs a Task, got {task!r}")
    cached = _load_task_cached(task, _resolved_root(data_dir, download))

    def copy(split: Split, limit: int | None) -> Split:
        return (split if limit is None else split.subset(limit)).clone()

    return TaskData(task, copy(cached.train, limit_train), copy(cached.val, limit_eval), copy(cached.test, limit_eval))


def clear_cache() -> None:
    """Drop the in-process caches of raw MNIST tensors, processed tasks and verified files."""
    _VERIFIED.clear()
    _load_task_cached.cache_clear()
    _read_mnist.cache_clear()
