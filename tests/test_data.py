"""fxprune.training.data (CIFAR-10 without downloads) and fxprune.training.cifar_resnet (the CIFAR ResNet family and
its checkpoints). Tests that need the real data or the shared checkpoint skip, saying why, when
../shared is absent; the rest build tiny fake data sets in tmp_path."""
import importlib.util
import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fxprune.training import data
from fxprune.training.cifar_resnet import (CheckpointError, CifarResNet, cifar_resnet, load_cifar_resnet,
                                  save_cifar_resnet)
from fxprune.training.data import (CIFAR10, CIFAR10_MEAN, CIFAR10_STD, CIFAR10Loader, DataNotFoundError,
                          augment_batch, balanced_subset, calibration_batches, find_cifar10,
                          load_cifar10, normalize)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINT = SHARED / "models" / "cifar_resnet20.pt"
REFERENCE = SHARED / "models" / "cifar_resnet.py"
MEAN, STD = np.asarray(CIFAR10_MEAN, np.float32), np.asarray(CIFAR10_STD, np.float32)


@pytest.fixture(scope="session")
def splits():
    """Both real splits, decoded once (later sessions read fxprune's decoded-array cache)."""
    try:
        find_cifar10()
    except DataNotFoundError as e:
        pytest.skip(f"real CIFAR-10 absent (set FXPRUNE_DATA to run these tests): {e}")
    return {split: load_cifar10(split=split) for split in ("train", "test")}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of a (B, 3, 32, 32) batch: uint8 (B, 3, 32, 32), exactly when it was uint8."""
    u = (x.numpy() * STD[:, None, None] + MEAN[:, None, None]) * 255
    assert np.abs(u - u.round()).max() < 1e-3, "normalised values do not come from uint8 pixels"
    return u.round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Real data

@pytest.mark.parametrize("split,n", [("train", 50_000), ("test", 10_000)])
def test_splits_have_cifar_shapes_dtypes_and_labels(splits, split, n):
    images, labels = splits[split]
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert images[::97].std() > 40, "images look blank"


def test_test_split_is_class_balanced(splits):
    assert np.bincount(splits["test"][1]).tolist() == [1000] * 10


def test_same_seed_and_epoch_give_identical_batches_and_other_epochs_differ(splits):
    def epoch_of(seed, epoch):
        loader = CIFAR10Loader("train", 256, shuffle=True, augment=True, seed=seed, subset=2000)
        loader.set_epoch(epoch)
        return list(loader)

    a, b = epoch_of(3, 1), epoch_of(3, 1)
    assert len(a) == 8 and [len(y) for _, y in a] == [256] * 7 + [208]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    for other in (epoch_of(3, 2), epoch_of(4, 1)):
        assert not torch.equal(a[0][1], other[0][1]), "same order"
        assert not torch.equal(a[0][0], other[0][0]), "same images"

    loader = CIFAR10Loader("train", 500, shuffle=False, augment=True, seed=3, subset=2000)
    first = next(iter(loader))[0]
    assert torch.equal(first, next(iter(loader))[0]), "iterating again without set_epoch must repeat"
    loader.set_epoch(1)
    assert not torch.equal(first, next(iter(loader))[0]), "a new epoch must augment differently"


def test_unaugmented_batches_are_the_normalised_images(splits):
    images, labels = splits["test"]
    x, y = next(iter(CIFAR10Loader("test", 1000)))
    expected = (images[:1000].astype(np.float32) / 255 - MEAN) / STD
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(x.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-5)
    assert torch.equal(y, torch.from_numpy(labels[:1000]))
    assert torch.equal(normalize(images[:1000]), x)


def test_augmentation_only_shifts_and_flips(splits):
    images, _ = splits["test"]
    x, _ = next(iter(CIFAR10Loader("test", 64, augment=True, seed=5)))
    assert x.shape == (64, 3, 32, 32)
    augmented = to_uint8(x)
    padded = np.pad(images[:64].transpose(0, 3, 1, 2), ((0, 0), (0, 0), (4, 4), (4, 4)))
    found = []
    for i in range(64):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if np.array_equal(augmented[i], padded[i, :, dy:dy + 32, dx:dx + 32][:, :, ::-1 if flip else 1])]
        assert matches, f"image {i} is not a shifted/flipped copy of the original"
        found.append(matches[0])
    assert any(flip for _, _, flip in found) and not all(flip for _, _, flip in found)
    assert len({(dy, dx) for dy, dx, _ in found}) > 10, "crop offsets do not vary"


def test_flip_only_augmentation_of_a_known_image():
    image = np.arange(3 * 32 * 32, dtype=np.uint8).reshape(1, 3, 32, 32)  # no horizontal symmetry
    rng = np.random.default_rng(0)
    outcomes = [augment_batch(image.copy(), rng, padding=0) for _ in range(40)]
    flipped = [np.array_equal(o, image[..., ::-1]) for o in outcomes]
    assert all(f or np.array_equal(o, image) for f, o in zip(flipped, outcomes))
    assert 5 < sum(flipped) < 35


def test_normalised_batches_have_zero_mean_unit_std(splits):
    x, _ = next(iter(CIFAR10Loader("train", 5000, shuffle=True, seed=0)))
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    assert torch.all(mean.abs() < 0.05), mean
    assert torch.all((std - 1).abs() < 0.05), std


def test_subset_is_class_balanced_and_seeded(splits):
    labels = splits["train"][1]
    loader = CIFAR10Loader("train", 128, subset=1000, seed=7)
    assert loader.num_samples == 1000 and len(loader) == 8
    assert np.bincount(loader.dataset.labels).tolist() == [100] * 10
    assert np.array_equal(loader.dataset.indices, balanced_subset(labels, 1000, seed=7))
    assert np.array_equal(balanced_subset(labels, 1000, 7), balanced_subset(labels, 1000, 7))
    assert not np.array_equal(balanced_subset(labels, 1000, 7), balanced_subset(labels, 1000, 8))
    odd = balanced_subset(labels, 1005, seed=1)
    assert len(set(odd)) == 1005 and sorted(np.bincount(labels[odd]).tolist()) == [100] * 5 + [101] * 5
    assert len(CIFAR10Loader("train", 128, subset=1000, drop_last=True)) == 7


def test_dataset_items_and_calibration_batches(splits):
    images, labels = splits["test"]
    dataset = CIFAR10("test")
    x, y = dataset[-1]
    assert x.shape == (3, 32, 32) and isinstance(y, int) and y == labels[-1]
    assert torch.equal(x, normalize(images[-1:])[0])
    torch.manual_seed(0)
    augmented = CIFAR10("test", augment=True, subset=100)[0][0]
    assert augmented.shape == (3, 32, 32)
    batches = calibration_batches(3, 64, seed=1)
    assert [tuple(x.shape) for x, _ in batches] == [(64, 3, 32, 32)] * 3
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, calibration_batches(3, 64, seed=1)))
    assert len(set(torch.cat([y for _, y in batches]).tolist())) > 5, "calibration batches are not shuffled"


# --------------------------------------------------------------------------------------------------
# Other sources, errors, cache (fake data; always run)

def write_fake_pickles(root: Path) -> Path:
    """A tiny cifar-10-batches-py: 5 train batches of 2 images, a test batch of one image per class.
    Red = 10 + label, green 100, blue 200, and red pixel (row 0, column 1) = 255."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir()

    def batch(labels):
        rows = np.zeros((len(labels), 3, 32, 32), np.uint8)
        rows[:, 0] = (10 + np.asarray(labels))[:, None, None]
        rows[:, 1], rows[:, 2], rows[:, 0, 0, 1] = 100, 200, 255
        return {b"batch_label": b"fake", b"labels": list(labels), b"data": rows.reshape(len(labels), 3072)}

    for i in range(1, 6):
        with open(directory / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch([2 * i - 2, 2 * i - 1]), f)
    with open(directory / "test_batch", "wb") as f:
        pickle.dump(batch(list(range(10))), f)
    return directory


def test_pickles_directory_loads(tmp_path, monkeypatch):
    directory = write_fake_pickles(tmp_path)
    assert find_cifar10(tmp_path) == find_cifar10(directory) == directory.resolve()
    images, labels = load_cifar10(directory, "test")
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert labels.tolist() == list(range(10))
    assert images[3, 5, 5].tolist() == [13, 100, 200] and images[3, 0, 1, 0] == 255  # CHW rows -> HWC
    train_images, train_labels = load_cifar10(directory, "train")
    assert train_images.shape == (10, 32, 32, 3) and train_labels.tolist() == list(range(10))

    monkeypatch.setenv("FXPRUNE_DATA", str(directory))
    loader = CIFAR10Loader("test", 4, augment=True)
    assert len(loader) == 3 and loader.num_samples == 10
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in loader]
    assert shapes == [((4, 3, 32, 32), (4,))] * 2 + [((2, 3, 32, 32), (2,))]
    x, _ = next(iter(CIFAR10Loader("test", 10)))
    assert to_uint8(x)[3, :, 5, 5].tolist() == [13, 100, 200]


def test_incomplete_pickles_directory_names_the_missing_files(tmp_path):
    directory = write_fake_pickles(tmp_path)
    (directory / "data_batch_4").unlink()
    assert load_cifar10(directory, "test")[0].shape[0] == 10
    with pytest.raises(DataNotFoundError, match="data_batch_4"):
        load_cifar10(directory, "train")


def test_missing_data_raises_a_helpful_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "cifar10_jpeg.npz"
    monkeypatch.setenv("FXPRUNE_DATA", str(missing))
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10(split="test")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in message and "FXPRUNE_DATA" in message and "path=" in message
    assert "does not exist" in message and "never downloads" in message
    with pytest.raises(DataNotFoundError, match="path argument"):
        CIFAR10Loader("test", 10, path=tmp_path)  # an empty directory
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "validation")


def write_fake_npz(path: Path, n: int = 20) -> np.ndarray:
    """A cifar10_jpeg.npz whose test split has n flat-coloured JPEGs; returns their colours."""
    from PIL import Image
    colours = np.random.default_rng(0).integers(0, 256, (n, 3)).astype(np.uint8)
    blobs = []
    for c in colours:
        buffer = io.BytesIO()
        Image.fromarray(np.broadcast_to(c, (32, 32, 3)).copy()).save(buffer, "JPEG", quality=95)
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, test_jpeg=np.concatenate(blobs), test_offsets=offsets,
             test_labels=(np.arange(n) % 10).astype(np.uint8), classes=np.array(data.CIFAR10_CLASSES))
    return colours


def test_npz_is_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    source, cache = tmp_path / "cifar10_jpeg.npz", tmp_path / "cache"
    colours = write_fake_npz(source)
    monkeypatch.setenv("FXPRUNE_CACHE", str(cache))
    images, labels = load_cifar10(tmp_path, "test")
    assert images.shape == (20, 32, 32, 3) and labels.tolist() == [i % 10 for i in range(20)]
    assert np.abs(images.astype(int) - colours[:, None, None].astype(int)).max() <= 4  # JPEG is lossy
    assert len(list(cache.glob("*.npy"))) == 2 and not list(cache.glob("*.tmp"))

    decode = data._decode_npz
    monkeypatch.setattr(data, "_decode_npz", lambda *a: pytest.fail("decoded although cached"))
    again, _ = load_cifar10(source, "test")
    assert np.array_equal(again, images)

    stat = source.stat()  # a modified file is decoded afresh and its stale cache entry removed
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    monkeypatch.setattr(data, "_decode_npz", decode)
    assert np.array_equal(load_cifar10(source, "test")[0], images)
    assert len(list(cache.glob("*.npy"))) == 2

    with pytest.raises(ValueError, match="lacks"):
        load_cifar10(source, "train")  # the fake has no train split


def test_unwritable_cache_falls_back_to_memory(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    write_fake_npz(tmp_path / "cifar10_jpeg.npz")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path / "a_file" / "cache"))  # cannot be created
    monkeypatch.setattr(data, "_MEMORY", {})
    with pytest.warns(RuntimeWarning, match="cannot cache"):
        images, _ = load_cifar10(tmp_path, "test")
    monkeypatch.setattr(data, "_decode_npz", lambda *a: pytest.fail("decoded twice in one process"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(load_cifar10(tmp_path, "test")[0], images)


# --------------------------------------------------------------------------------------------------
# CIFAR ResNet

def test_architecture_matches_the_reference_and_traces():
    if REFERENCE.is_file():
        spec = importlib.util.spec_from_file_location("reference_cifar_resnet", REFERENCE)
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
        for depth in (20, 56):
            ours, theirs = cifar_resnet(depth).state_dict(), reference.CifarResNet(depth).state_dict()
            assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    model = cifar_resnet(20).eval()
    assert isinstance(model, CifarResNet) and sum(p.numel() for p in model.parameters()) == 272_474
    assert "layer2.0.downsample.0.weight" in model.state_dict() and model.layer1[0].downsample is None
    x = torch.randn(2, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), model(x)) and model(x).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21)


def test_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model, path = cifar_resnet(20), tmp_path / "sub" / "r20.pt"
    save_cifar_resnet(model, path, depth=20, test_acc=0.5, epochs=3, note="x")
    loaded, info = load_cifar_resnet(path)
    assert info == {"depth": 20, "test_acc": 0.5, "epochs": 3, "note": "x"} and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
    assert not list(path.parent.glob("*.tmp"))

    with pytest.raises(ValueError, match="fraction"):
        save_cifar_resnet(model, path, 20, 83.9)
    with pytest.raises(ValueError, match="does not fit"):
        save_cifar_resnet(model, path, 32, 0.5)
    with pytest.raises(ValueError, match="plain data"):
        save_cifar_resnet(model, tmp_path / "odd.pt", 20, 0.5, builder=cifar_resnet)
    assert not (tmp_path / "odd.pt").exists()

    torch.save({"weights": model.state_dict()}, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"state_dict": model.state_dict(), "depth": 32, "test_acc": 0.5}, tmp_path / "wrong_depth.pt")
    for name, match in (("other.pt", "expected a dict with 'state_dict'"), ("text.pt", "weights_only"),
                        ("wrong_depth.pt", "missing")):
        with pytest.raises(CheckpointError, match=match):
            load_cifar_resnet(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_cifar_resnet(tmp_path / "absent.pt")


def test_shared_checkpoint_reaches_its_recorded_accuracy(splits):
    if not CHECKPOINT.is_file():
        pytest.skip(f"shared checkpoint absent: {CHECKPOINT}")
    model, info = load_cifar_resnet(CHECKPOINT)
    assert info["depth"] == 20 and 0 < info["test_acc"] <= 1
    # 2,000 class-balanced test images keep this under ~10 s on a busy 2-core CPU; on all 10,000 the
    # measured accuracy equals the recorded 0.8394 exactly (it was 0.843 on this subset).
    loader = CIFAR10Loader("test", 500, subset=2000, seed=0)
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    accuracy = correct / loader.num_samples
    assert abs(accuracy - info["test_acc"]) < 0.02, (accuracy, info["test_acc"])
