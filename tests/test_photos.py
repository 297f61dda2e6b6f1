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
