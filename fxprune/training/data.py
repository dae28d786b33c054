"""CIFAR-10 for fine-tuning, calibration and accuracy checks. Nothing here ever downloads.

Two on-disk sources are understood:
  - `cifar10_jpeg.npz` (the shared data set, see ../shared/data/README.md): every image as JPEG
    bytes, decoded with Pillow. Decoding all 60,000 takes about 10 s, so the decoded uint8 arrays are
    cached as .npy files (see `cache_dir`) and later loads take a fraction of a second;
  - the standard python-pickle release, a `cifar-10-batches-py` directory (data_batch_1..5,
    test_batch). These are plain arrays already and are not cached. Pickles can run code when
    loaded: use only copies you trust.

`find_cifar10(path)` says where the data is: an explicit `path`, else the environment variable
FXPRUNE_DATA (the library has no default location). Each may name the .npz
file, a directory holding it, or a pickles directory (or the directory holding
`cifar-10-batches-py`, as torchvision lays it out).

    images, labels = load_cifar10(split="test")        # uint8 (N, 32, 32, 3), int64 (N,)
    train = CIFAR10Loader("train", 128, shuffle=True, augment=True, seed=0)
    for epoch in range(epochs):
        train.set_epoch(epoch)                          # new order and augmentation each epoch
        for x, y in train: ...                          # float32 (B, 3, 32, 32) normalised, int64 (B,)

Batches are assembled in numpy on uint8 arrays (gather, pad, crop, flip) and converted to float
once per batch. That is single-threaded on purpose: torch's thread pool makes such small ops slower,
not faster, on a busy CPU, and a full augmented epoch of batches costs about half a second this way."""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..cache import CACHE_ENV, cache_dir as fxprune_cache_dir
from ..errors import FxPruneError

PathLike = Union[str, "os.PathLike[str]"]
Subset = Union[None, int, Sequence[int], np.ndarray]

NPZ_NAME = "cifar10_jpeg.npz"
PICKLES_DIR_NAME = "cifar-10-batches-py"
DATA_ENV = "FXPRUNE_DATA"
SPLITS = ("train", "test")
NUM_CLASSES = 10
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Per-channel mean and std (0-1 scale) of the original CIFAR-10 train split, the values quoted
# throughout the literature and the ones the shared checkpoints were trained with: keep them so those
# checkpoints evaluate as recorded. All 50,000 train images of the JPEG copy measure
# (0.4913, 0.4821, 0.4465) / (0.2452, 0.2428, 0.2606) (JPEG smooths a little), so with these
# constants that split normalises to mean 0.000 and std 0.993-0.997 per channel.
# (The JPEG train split is stored sorted by class: any 10,000 consecutive images are far from these.)
CIFAR10_MEAN: Tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

PADDING = 4  # the standard augmentation: zero-pad 4 pixels, random 32x32 crop, random horizontal flip

# Independent random streams derived from one user seed (numpy SeedSequence entropy [seed, ..., tag]),
# so that, e.g., choosing a subset does not change when shuffling draws more numbers.
_SUBSET_STREAM, _EPOCH_STREAM = 0x5B5E7, 0xE90C4
_CACHE_VERSION = "v1"  # bump when the cache layout changes: old files are then simply ignored

# uint8 -> normalised float in one multiply-add: (x / 255 - mean) / std = x * scale + shift
_SCALE = (1.0 / (255.0 * np.asarray(CIFAR10_STD, np.float32))).astype(np.float32)[:, None, None]
_SHIFT = (-np.asarray(CIFAR10_MEAN, np.float32) / np.asarray(CIFAR10_STD, np.float32)).astype(np.float32)[:, None, None]


class DataNotFoundError(FxPruneError, FileNotFoundError):
    """CIFAR-10 is not where it was looked for. The message lists each place tried and how to point
    fxprune at the data (pass `path=` or set FXPRUNE_DATA); nothing is downloaded."""


# --------------------------------------------------------------------------------------------------
# Locating the data

def find_cifar10(path: Optional[PathLike] = None) -> Path:
    """The CIFAR-10 source to read: a `cifar10_jpeg.npz` file or a `cifar-10-batches-py` directory.

    Looks at `path` if given, else at $FXPRUNE_DATA; the library has no default location of its own
    (the repository's tests and benchmarks point FXPRUNE_DATA at ../shared/data). A place that is
    given but unusable is an error, not a reason to look elsewhere, so a typo in FXPRUNE_DATA never
    silently selects other data.

    Raises DataNotFoundError (a FileNotFoundError) naming what was tried."""
    if path is not None:
        origin, candidate = "path argument", Path(path).expanduser()
    elif os.environ.get(DATA_ENV):
        origin, candidate = f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser()
    else:
        raise DataNotFoundError(
            f"CIFAR-10: no location given. Pass path=... or set {DATA_ENV}=... to a {NPZ_NAME} file, a directory "
            f"containing it, or a {PICKLES_DIR_NAME} directory (data_batch_1..5, test_batch). fxprune never "
            f"downloads data.")
    found, why = _resolve_source(candidate)
    if found is not None:
        return found
    raise DataNotFoundError(
        f"CIFAR-10 not found. Tried the {origin}: {candidate} ({why}).\n"
        f"Point fxprune at the data: pass path=... or set {DATA_ENV}=... to a {NPZ_NAME} file, a "
        f"directory containing it, or a {PICKLES_DIR_NAME} directory (data_batch_1..5, test_batch). "
        "fxprune never downloads data.")


def _resolve_source(candidate: Path) -> Tuple[Optional[Path], str]:
    """(source, "") when `candidate` is or holds CIFAR-10, else (None, why not)."""
    if candidate.is_file():
        if candidate.suffix == ".npz":
            return candidate.resolve(), ""
        return None, "a file, but not a .npz"
    if candidate.is_dir():
        if (candidate / NPZ_NAME).is_file():
            return (candidate / NPZ_NAME).resolve(), ""
        for directory in (candidate, candidate / PICKLES_DIR_NAME):
            if _is_pickles_dir(directory):
                return directory.resolve(), ""
        return None, f"a directory without {NPZ_NAME}, test_batch/data_batch_1 or {PICKLES_DIR_NAME}/"
    return None, "does not exist"


def _is_pickles_dir(directory: Path) -> bool:
    # Recognise the layout by either marker; missing files are reported by name when loading.
    return directory.is_dir() and ((directory / "test_batch").is_file() or (directory / "data_batch_1").is_file())


# --------------------------------------------------------------------------------------------------
# Loading whole splits

def load_cifar10(path: Optional[PathLike] = None, split: str = "train",
                 cache: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """One split as numpy arrays: images uint8 (N, 32, 32, 3) RGB, labels int64 (N,) in 0..9.

    `path` as for `find_cifar10`. With `cache` (the default) decoded JPEGs are read from and written
    to `cache_dir()`, keyed by the source file's path, size and modification time, so a changed file
    is decoded afresh. If the cache cannot be written a warning says so and the decoded arrays are
    kept in memory for the rest of the process instead. The arrays returned are the caller's own."""
    _check_split(split)
    source = find_cifar10(path)
    if source.is_dir():
        return _load_pickles(source, split)
    if not cache:
        return _decode_npz(source, split)
    key = _cache_key(source, split)
    if key in _MEMORY:  # only filled when the disk cache was unusable
        images, labels = _MEMORY[key]
        return images.copy(), labels.copy()
    hit = _read_cache(key)
    if hit is not None:
        return hit
    images, labels = _decode_npz(source, split)
    if not _write_cache(key, images, labels):
        _MEMORY[key] = (images.copy(), labels.copy())
    return images, labels


def cache_dir() -> Path:
    """Where decoded arrays are cached: fxprune's cache folder (fxprune/cache.py)."""
    return Path(fxprune_cache_dir())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


def _decode_npz(source: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Decode every JPEG of one split of a cifar10_jpeg.npz (about 8 s for the train split)."""
    try:
        from PIL import Image
    except ImportError as e:  # Pillow comes with matplotlib and torchvision; say what is missing
        raise ImportError(f"decoding {source.name} needs Pillow (pip install Pillow)") from e
    try:
        archive = np.load(source)
    except Exception as e:  # not a zip, truncated, ...: name the file rather than numpy's internals
        raise ValueError(f"{source} is not a readable .npz file ({e})") from e
    with archive:
        wanted = [f"{split}_jpeg", f"{split}_offsets", f"{split}_labels"]
        missing = [k for k in wanted if k not in archive.files]
        if missing:
            raise ValueError(f"{source} is not a {NPZ_NAME}: it lacks {missing} (has {archive.files})")
        jpeg, offsets, labels = (archive[k] for k in wanted)
    n = len(labels)
    if len(offsets) != n + 1:
        raise ValueError(f"{source}: {split}_offsets has {len(offsets)} entries, expected {n + 1}")
    images = np.empty((n, 32, 32, 3), np.uint8)
    buffer = memoryview(jpeg)  # slicing a memoryview does not copy the bytes
    for i in range(n):
        with Image.open(io.BytesIO(buffer[offsets[i]:offsets[i + 1]])) as image:
            if image.size != (32, 32):
                raise ValueError(f"{source}: {split} image {i} is {image.size[0]}x{image.size[1]}, not 32x32")
            images[i] = np.asarray(image.convert("RGB"))
    return images, _checked_labels(labels, source)


def _load_pickles(directory: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read the python-pickle release: each file a dict with b"data" (N, 3072 uint8, CHW) and b"labels"."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise DataNotFoundError(f"{directory} looks like {PICKLES_DIR_NAME} but lacks {missing} needed for the "
                                f"{split} split; pass path= or set {DATA_ENV} to a complete copy")
    data, labels = [], []
    for name in names:
        with open(directory / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the release was pickled by Python 2
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"{directory / name} is not a CIFAR-10 batch (keys {sorted(batch)})")
        data.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"]))
    images = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))  # stored CHW; return HWC
    return images, _checked_labels(np.concatenate(labels), directory)


def _checked_labels(labels: np.ndarray, source: Path) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{source}: labels outside 0..{NUM_CLASSES - 1}")
    return labels


# --------------------------------------------------------------------------------------------------
# The decoded-array cache

_MEMORY: dict = {}  # cache key -> (images, labels), used only when the disk cache cannot be written


def _cache_key(source: Path, split: str) -> str:
    # Size and mtime detect a replaced or modified file; the path hash keeps two different files
    # that happen to agree on both apart.
    stat = source.stat()
    where = hashlib.sha1(str(source).encode()).hexdigest()[:10]
    return f"cifar10-{_CACHE_VERSION}-{where}-{split}-{stat.st_size}-{stat.st_mtime_ns}"


def _cache_files(key: str) -> Tuple[Path, Path]:
    directory = cache_dir()
    return directory / f"{key}.images.npy", directory / f"{key}.labels.npy"


def _read_cache(key: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    images_file, labels_file = _cache_files(key)
    if not (images_file.is_file() and labels_file.is_file()):
        return None
    try:
        images, labels = np.load(images_file), np.load(labels_file)
    except (OSError, ValueError):  # truncated or foreign file: decode again and overwrite it
        return None
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or labels.shape != (len(images),):
        return None
    return images, labels.astype(np.int64, copy=False)


def _write_cache(key: str, images: np.ndarray, labels: np.ndarray) -> bool:
    """Write both arrays, each to a temporary file renamed into place, so a concurrent reader or an
    interrupted writer never sees half a file. False (with a warning) when that is impossible."""
    images_file, labels_file = _cache_files(key)
    try:
        images_file.parent.mkdir(parents=True, exist_ok=True)
        for target, array in ((labels_file, labels), (images_file, images)):  # images last: presence marks done
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except OSError as e:
        warnings.warn(f"fxprune: cannot cache decoded CIFAR-10 in {images_file.parent} ({e}); decoded "
                      f"arrays are kept in memory for this process only. Set {CACHE_ENV} to a writable "
                      f"directory to avoid decoding again next time.", RuntimeWarning, stacklevel=3)
        return False
    _remove_stale(key)
    return True


def _remove_stale(key: str) -> None:
    # Entries for the same file and split with another size/mtime can never be read again: 180 MB each.
    prefix = key.rsplit("-", 2)[0] + "-"
    for old in cache_dir().glob(prefix + "*.npy"):
        if not old.name.startswith(key + "."):
            try:
                old.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------------
# Subsets, augmentation, normalisation

def balanced_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `n` examples, n // 10 per class (the remainder goes one each to classes
    drawn at random), chosen at random with `seed`. The same labels, n and seed give the same subset."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = np.bincount(labels, minlength=NUM_CLASSES)[classes]
    if not 0 < n <= len(labels):
        raise ValueError(f"subset must be in 1..{len(labels)}, not {n}")
    rng = np.random.default_rng([_check_seed(seed), _SUBSET_STREAM])
    per_class = np.full(len(classes), n // len(classes))
    per_class[rng.choice(len(classes), n % len(classes), replace=False)] += 1
    if np.any(per_class > counts):
        raise ValueError(f"cannot draw a class-balanced subset of {n}: a class has only {counts.min()} examples")
    chosen = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, per_class)]
    return np.sort(np.concatenate(chosen))


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, not {seed!r}")
    return int(seed)


def _select(labels: np.ndarray, subset: Subset, seed: int) -> np.ndarray:
    if subset is None:
        return np.arange(len(labels))
    if isinstance(subset, (int, np.integer)):
        return balanced_subset(labels, int(subset), seed)
    indices = np.asarray(subset, dtype=np.int64)
    if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(labels))):
        raise ValueError(f"subset indices must be a 1-d sequence in 0..{len(labels) - 1}")
    return indices


def augment_batch(images: np.ndarray, rng: np.random.Generator, padding: int = PADDING) -> np.ndarray:
    """The standard CIFAR augmentation, in place on uint8 images (B, 3, H, W): zero-pad by `padding`,
    crop back to H x W at a random offset, flip horizontally with probability 1/2 (one draw per image).
    Returns `images`."""
    n, _, h, w = images.shape
    padded = np.zeros((n, images.shape[1], h + 2 * padding, w + 2 * padding), np.uint8)
    padded[:, :, padding:padding + h, padding:padding + w] = images
    dy, dx = rng.integers(0, 2 * padding + 1, size=(2, n))
    flip = rng.integers(0, 2, size=n).astype(bool)
    for i in range(n):  # a slice copy per image beats one big fancy-index gather by ~5x
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        images[i] = crop[:, :, ::-1] if flip[i] else crop
    return images


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, 32, 32, 3), as `load_cifar10` returns them, to the model's input: float32
    (N, 3, 32, 32), scaled to 0-1 and normalised with CIFAR10_MEAN / CIFAR10_STD."""
    return _normalize_chw(np.ascontiguousarray(np.asarray(images, np.uint8).transpose(0, 3, 1, 2)))


def _normalize_chw(images: np.ndarray) -> torch.Tensor:
    x = images.astype(np.float32)
    x *= _SCALE
    x += _SHIFT
    return torch.from_numpy(x)


# --------------------------------------------------------------------------------------------------
# Dataset and loader

class CIFAR10(torch.utils.data.Dataset):
    """One split as a torch Dataset of (float32 (3, 32, 32) normalised, int label).

    `subset`: None (all), an int n (a class-balanced subset chosen with `seed`, see
    `balanced_subset`) or explicit indices. With `augment`, each item is randomly cropped and flipped
    using torch's global generator, so torch.manual_seed and DataLoader workers seed it as usual.
    For training on CPU prefer `CIFAR10Loader`, which builds whole batches much faster.

    Attributes: `images` uint8 (N, 3, 32, 32) numpy, `labels` int64 (N,), `indices` (into the split)."""

    classes = CIFAR10_CLASSES

    def __init__(self, split: str = "train", path: Optional[PathLike] = None, augment: bool = False,
                 subset: Subset = None, seed: int = 0):
        _check_split(split)
        self.split, self.augment, self.seed = split, augment, _check_seed(seed)
        images, labels = load_cifar10(path, split)
        self.indices = _select(labels, subset, self.seed)
        if subset is not None:
            images = images[self.indices]
        # Channels-first once, here, so that every batch is a plain gather.
        self.images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        self.labels = labels[self.indices]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        image = self.images[i][None].copy()  # a batch of one, ours to augment in place
        if self.augment:
            seed = int(torch.randint(0, 2 ** 62, ()))  # from torch's generator: seeded per worker
            augment_batch(image, np.random.default_rng(seed))
        return _normalize_chw(image)[0], int(self.labels[i])


class CIFAR10Loader:
    """Batches of one split: iterate for (x float32 (B, 3, 32, 32) normalised, y int64 (B,)).

    Deterministic: the order (with `shuffle`) and the augmentation (with `augment`) depend only on
    `seed` and the epoch set by `set_epoch(e)` (0 at first). Iterating twice without set_epoch gives
    the same batches again, as with torch's DistributedSampler: call set_epoch every epoch.
    `subset`: as for `CIFAR10` (an int n is a fixed class-balanced subset drawn with `seed`).
    `len(loader)` is the number of batches, `loader.num_samples` the number of examples."""

    def __init__(self, split: str = "train", batch_size: int = 128, shuffle: bool = False,
                 augment: bool = False, seed: int = 0, subset: Subset = None, drop_last: bool = False,
                 path: Optional[PathLike] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.dataset = CIFAR10(split, path=path, subset=subset, seed=seed)
        self.split, self.batch_size, self.shuffle, self.augment = split, batch_size, shuffle, augment
        self.seed, self.drop_last, self.epoch = self.dataset.seed, drop_last, 0

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffling and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.num_samples / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch, _EPOCH_STREAM])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        images, labels = self.dataset.images, self.dataset.labels
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = images[idx]  # fancy indexing copies: augmenting in place leaves the data untouched
            if self.augment:
                augment_batch(x, rng)
            yield _normalize_chw(x), torch.from_numpy(labels[idx])


def calibration_batches(n_batches: int, batch_size: int = 128, seed: int = 0,
                        path: Optional[PathLike] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """`n_batches` batches of distinct train images, drawn at random with `seed`, not augmented: for
    importance estimation, BatchNorm recalibration and the like."""
    loader = CIFAR10Loader("train", batch_size, shuffle=True, augment=False, seed=seed, drop_last=True, path=path)
    if not 0 < n_batches <= len(loader):
        raise ValueError(f"n_batches must be in 1..{len(loader)} for batch_size {batch_size}, not {n_batches}")
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n_batches:
            break
    return batches
