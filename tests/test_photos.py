"""Photos: any size in (one resize + centre-crop policy everywhere), random-resized crops on the
batch, the photo network and the rule that picks it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from visionrecipe.data import load_dataset
from visionrecipe.data.pil import read_image_array

CLASSES = ("cat", "dog")


def write_mixed_folder(root: Path, per_class: int = 8, seed: int = 0) -> None:
    """PNGs of 20-60 px, both orientations; each class its own colour so a net can learn it."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = rng.integers(20, 61, 2)
            pixels = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
            pixels[..., label] += 120  # cat reddish, dog greenish
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """(folder, run directory, data dir, stderr): the mixed folder trained by `train` with no size flags."""
    base = tmp_path_factory.mktemp("photos")
    folder = base / "mixed"
    write_mixed_folder(folder)
    out, data_dir = base / "run", base / "cache"
    result = run_cli("train", "--data", folder, "--data-dir", data_dir, "--out", out, "--epochs", "1",
                     "--no-progress", "--no-report")
    assert result.returncode == 0, result.stderr[-2000:]
    return folder, out, data_dir, result.stderr


# ---------------------------------------------------------------- 1. any size in, one eval policy

def test_decode_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # 30×20
    Image.fromarray(wide).save(tmp_path / "wide.png")
    # Shorter side already 20: the centre 20×20 is cut out, pixel for pixel (nothing squashed).
    np.testing.assert_array_equal(read_image_array(tmp_path / "wide.png", image_size=20),
                                  wide[:, 5:25].transpose(2, 0, 1))
    # The reference: torchvision's Resize(shorter side) then CenterCrop, where neither rounds.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    with Image.open(tmp_path / "big.png") as img:
        expected = np.asarray(TF.center_crop(TF.resize(img, 20, InterpolationMode.BILINEAR), 20))
    np.testing.assert_array_equal(read_image_array(tmp_path / "big.png", image_size=20),
                                  expected.transpose(2, 0, 1))
    # resize 40, crop 20 (a test size above the crop): the centre half, at twice the scale.
    with Image.open(tmp_path / "big.png") as img:
        expected = np.asarray(TF.center_crop(TF.resize(img, 40, InterpolationMode.BILINEAR), 20))
    np.testing.assert_array_equal(read_image_array(tmp_path / "big.png", image_size=40, crop=20),
                                  expected.transpose(2, 0, 1))


def test_mixed_folder_is_stored_at_its_median_shorter_side(tmp_path, capfd):
    write_mixed_folder(tmp_path / "mixed")
    data = load_dataset(str(tmp_path / "mixed"), data_dir=tmp_path / "cache", progress=False, val_fraction=0)
    size = data.train.images.shape[2]
    shorter = sorted(min(Image.open(p).size) for p in [*data.train.paths, *data.test.paths])
    assert data.train.images.shape[1:] == (3, size, size) and size == shorter[len(shorter) // 2]
    note = capfd.readouterr().err
    assert f"storing each at {size}x{size}" in note and len(note.strip().splitlines()) == 1
    for image, path in zip(data.train.images, data.train.paths):
        np.testing.assert_array_equal(image.numpy(), read_image_array(path, image_size=size))
    # An explicit --image-size wins, and every image is square at it.
    assert load_dataset(str(tmp_path / "mixed"), data_dir=tmp_path / "cache", image_size=24,
                        progress=False).train.images.shape[1:] == (3, 24, 24)


def test_training_evaluate_predict_and_onnx_see_the_same_pixels(mixed_run, tmp_path):
    """Train-time storage, evaluate's data, predict (run dir) and the ONNX path, to the pixel."""
    from visionrecipe.deploy.export import export_model
    from visionrecipe.deploy.onnx_runtime import OnnxClassifier
    from visionrecipe.deploy.predict import TorchClassifier
    from visionrecipe.evaluate.scoring import load_run_dataset

    folder, out, data_dir, _ = mixed_run
    meta = json.loads((out / "model.json").read_text())
    size = meta["input_size"][1]
    assert meta["preprocess"] == {"resize": size, "crop": size}
    trained = load_dataset(str(folder), data_dir=data_dir, progress=False)  # as training stored it
    evaluated = load_run_dataset(out, meta)
    onnx = OnnxClassifier(export_model(out, out=tmp_path / "m.onnx")["path"])
    torch_model = TorchClassifier(out, device="cpu")
    assert onnx.meta["preprocess"] == meta["preprocess"]
    for split in ("train", "test"):
        stored, scored = getattr(trained, split), getattr(evaluated, split)
        assert torch.equal(stored.images, scored.images)
        for image, path in zip(stored.images.numpy(), stored.paths):
            np.testing.assert_array_equal(torch_model.decode(path), image)
            np.testing.assert_array_equal(onnx.decode(path), image)
            np.testing.assert_array_equal(onnx.decode(Path(path).read_bytes(), formats=("PNG",)), image)


# ---------------------------------------------------------------- 2. random-resized crops on the batch

def test_random_boxes_stay_inside_and_follow_scale_and_ratio():
    from visionrecipe.train.augment import random_boxes

    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(4000, 48, 48, 0.35, 4 / 3, g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 48 + 1e-4).all() and (boxes[:, 3] <= 48 + 1e-4).all()
    share = w * h / 48**2
    assert share.min() >= 0.35 - 1e-4 and share.max() <= 1 + 1e-4 and share.std() > 0.1
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    again = random_boxes(4000, 48, 48, 0.35, 4 / 3, torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)  # deterministic for a seed


def test_resized_crops_cut_the_box_exactly_and_mirror_it():
    from visionrecipe.train.augment import resized_crops

    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    boxes = torch.tensor([[2.0, 3.0, 10.0, 11.0], [0.0, 0.0, 16.0, 16.0]])
    out = resized_crops(x, boxes, flip=torch.tensor([False, True]), size=8)
    torch.testing.assert_close(out[0], x[0, :, 3:11, 2:10])  # an 8-px box at 8 px: the pixels themselves
    whole = resized_crops(x[1:], boxes[1:], size=16)
    torch.testing.assert_close(whole[0], x[1])  # the whole image at its size: unchanged
    torch.testing.assert_close(resized_crops(x[1:], boxes[1:], flip=torch.tensor([True]), size=16)[0], x[1].flip(2))


def test_batch_augment_crops_keep_labels_shape_and_use_one_grid_sample(monkeypatch):
    import visionrecipe.train.augment as augment

    n, size = 64, 72
    labels = torch.arange(n) % 4
    colours = torch.tensor([[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]], dtype=torch.uint8)
    images = colours[labels][:, :, None, None].expand(n, 3, size, size).contiguous()
    calls = []
    real = augment.F.grid_sample
    monkeypatch.setattr(augment.F, "grid_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = augment.BatchAugment([0.5] * 3, [0.25] * 3, crop_scale=0.35, flip=True, n_train=n)
    index = torch.arange(n)
    x = batch(images, index, 0, torch.Generator().manual_seed(1))
    assert x.shape == (n, 3, size, size) and len(calls) == 1  # the whole batch in one call
    # Every output is still its own image (its label's colour): crops never mix images up.
    expected = batch.normalise(images)
    torch.testing.assert_close(x.mean((2, 3)), expected.mean((2, 3)), atol=1e-4, rtol=0)
    again = batch(images, index, 0, torch.Generator().manual_seed(1))
    assert torch.equal(x, again)
    # A textured batch: the crops differ from image to image and from the uncropped images.
    textured = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8)
    out = batch(textured, torch.arange(8), 0, torch.Generator().manual_seed(2))
    assert not torch.allclose(out, batch.normalise(textured))


def test_small_images_keep_translate_and_flip(monkeypatch):
    from visionrecipe.config import Config
    from visionrecipe.recipes import PHOTO_MIN_SIZE, RECIPES, resolve_crop_padding, resolve_recipe

    small = resolve_recipe(Config.from_dict({"data": "cifar10"}), image_size=32)
    assert small.model.model == "fastnet" and small.optim.crop_scale == 0 and resolve_crop_padding(small, 32) == 2
    assert (small.optim.lr, small.optim.bias_lr_mult) == (RECIPES["fast"].lr, RECIPES["fast"].bias_lr_mult)
    below = resolve_recipe(Config.from_dict({"data": "x"}), image_size=PHOTO_MIN_SIZE - 1)
    assert below.model.model == "fastnet" and below.optim.crop_scale == 0
    photos = resolve_recipe(Config.from_dict({"data": "x"}), image_size=PHOTO_MIN_SIZE)
    assert photos.model.model == "fastnet" and photos.optim.crop_scale == 0.35
    assert resolve_crop_padding(photos, PHOTO_MIN_SIZE) == 0
    assert (photos.optim.lr, photos.optim.bias_lr_mult) == (RECIPES["fast"].lr, RECIPES["fast"].bias_lr_mult)
    # photonet's own lr and bias multiplier (the recipe's diverged) and crops at any side, unless set
    photonet = resolve_recipe(Config.from_dict({"data": "x", "model": "photonet"}), image_size=64)
    assert (photonet.optim.recipe, photonet.optim.lr, photonet.optim.bias_lr_mult) == ("fast", 0.6, 1.0)
    assert photonet.optim.crop_scale == 0.35
    typed = resolve_recipe(Config.from_dict({"data": "x", "model": "photonet", "lr": 0.2}), image_size=128)
    assert (typed.optim.lr, typed.optim.bias_lr_mult) == (0.2, 1.0)
    chosen = resolve_recipe(Config.from_dict({"data": "x", "model": "seedcnn", "crop_scale": 0.5}), image_size=128)
    assert chosen.model.model == "seedcnn" and chosen.optim.crop_scale == 0.5


# ---------------------------------------------------------------- 3. the network for photos

def test_photonet_downsamples_early_and_takes_width_and_depth():
    from visionrecipe.models import create_model

    model = create_model("photonet", num_classes=5, image_size=128)
    assert model.stem(torch.zeros(1, 3, 128, 128)).shape[2:] == (32, 32)  # stride 4 before the stages
    assert model(torch.zeros(2, 3, 128, 128)).shape == (2, 5)
    wide = create_model("photonet", num_classes=5, width=2.0, depth=2)
    assert wide.head.in_features == 512 and len(wide.stages[0]) == 2
    model.train()
    x = torch.randn(4, 3, 64, 64)
    # Zero-initialised last BatchNorm: every block starts as the identity on its shortcut.
    block = model.stages[0][0]
    features = model.stem(x)
    torch.testing.assert_close(block(features), torch.relu(features))


# ---------------------------------------------------------------- 4. a mixed folder, no flags

def test_mixed_folder_trains_and_predicts_with_no_size_flags(mixed_run):
    folder, out, _, stderr = mixed_run
    assert "storing each at" in stderr and "Traceback" not in stderr
    result = run_cli("predict", out, folder / "cat", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 8 and all("top" in row for row in rows)


def test_photos_are_scored_in_batches_sized_by_pixels():
    """Evaluation scores 500 CIFAR images at once but fewer photos: 500 at 160 px keep 1.6 GB per
    32-channel feature map. The logits do not depend on the batch."""
    from visionrecipe.evaluate.scoring import eval_batch, predict_logits
    from visionrecipe.models import create_model

    assert eval_batch(torch.zeros(1000, 3, 32, 32, dtype=torch.uint8)) == 500
    assert eval_batch(torch.zeros(1000, 3, 64, 64, dtype=torch.uint8)) == 256
    assert eval_batch(torch.zeros(10, 3, 224, 224, dtype=torch.uint8)) == 20
    assert eval_batch(torch.zeros(10, 3, 1024, 1024, dtype=torch.uint8)) == 16  # never fewer
    torch.manual_seed(0)
    model = create_model("fastnet", 3, in_channels=3, image_size=96, width=0.25).eval()
    images = torch.randint(0, 256, (50, 3, 96, 96), dtype=torch.uint8)
    by_pixels = predict_logits(model, images, [0.5] * 3, [0.25] * 3)  # eval_batch: 44 then 6
    one_batch = predict_logits(model, images, [0.5] * 3, [0.25] * 3, batch_size=50)
    assert by_pixels.shape == (50, 3)
    torch.testing.assert_close(by_pixels, one_batch, rtol=1e-4, atol=1e-4)
