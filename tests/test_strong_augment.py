"""TrivialAugment, MixUp and CutMix on the device (train/strong_augment.py), their soft-target loss,
the flags through config.yaml, and exact resume with them on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from visionrecipe.cli import main
from visionrecipe.config import Config, load_config
from visionrecipe.train import strong_augment
from visionrecipe.train.augment import BatchAugment
from visionrecipe.train.strong_augment import OP_INDEX, OPS, apply_ops, mix_batch, trivial_augment
from visionrecipe.train.tasks import cross_entropy

from conftest import assert_interrupted_run_resumes_exactly, metrics_without_timing


def images(n=6, channels=3, height=13, width=17, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, height, width), generator=g, dtype=torch.uint8)


def run_op(name: str, x: torch.Tensor, magnitudes) -> torch.Tensor:
    """Every image of x through the op `name`, image i at magnitudes[i]."""
    return apply_ops(x.float(), torch.full((len(x),), OP_INDEX[name]), torch.tensor(magnitudes, dtype=torch.float32))


def torchvision_op(name: str, image: torch.Tensor, m: float) -> torch.Tensor:
    """torchvision's TrivialAugmentWide op (v2 _apply_image_or_video_transform), default fill and nearest."""
    if name in ("shear_x", "shear_y"):
        shear = [math.degrees(math.atan(m)), 0.0] if name == "shear_x" else [0.0, math.degrees(math.atan(m))]
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])
    if name in ("translate_x", "translate_y"):
        shift = [int(m), 0] if name == "translate_x" else [0, int(m)]
        return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
    calls = {"rotate": lambda: TF.rotate(image, angle=m), "brightness": lambda: TF.adjust_brightness(image, 1 + m),
             "color": lambda: TF.adjust_saturation(image, 1 + m), "contrast": lambda: TF.adjust_contrast(image, 1 + m),
             "sharpness": lambda: TF.adjust_sharpness(image, 1 + m), "posterize": lambda: TF.posterize(image, int(m)),
             "solarize": lambda: TF.solarize(image, 255.0 * m), "autocontrast": lambda: TF.autocontrast(image),
             "equalize": lambda: TF.equalize(image), "identity": lambda: image}
    return calls[name]()


SIGNED = [0.3, -0.99, 0.5, 0.0, 0.66, -0.2]
MAGNITUDES = {"identity": [0] * 6, "shear_x": SIGNED, "shear_y": SIGNED, "translate_x": [3, -5, 7.9, 0, -1, 16],
              "translate_y": [3, -5, 7.9, 0, -1, 16], "rotate": [4.5, -90, 90, 135, -30, 12.3],
              "brightness": SIGNED, "color": SIGNED, "contrast": SIGNED, "sharpness": SIGNED,
              "posterize": [8, 7, 6, 4, 3, 2], "solarize": [1.0, 0.5, 0.0, 0.3, 0.9, 0.1],
              "autocontrast": [0] * 6, "equalize": [0] * 6}
GEOMETRIC = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate"}


# ------------------------------------------------------------------------------ TrivialAugment
@pytest.mark.parametrize("name", [name for name, _, _ in OPS])
def test_each_op_matches_torchvision_on_uint8_images(name):
    """Within 2 grey levels (torchvision floors the grey and truncates to uint8; we stay float). A
    geometric op may differ where a pixel centre falls exactly between two source pixels (nearest's
    tie, decided by rounding): at most 1% of the pixels."""
    x = images(height=21, width=23) // 2 + 40  # mid-grey levels, over 255 pixels: equalize and autocontrast act
    ours = run_op(name, x, MAGNITUDES[name])
    reference = torch.stack([torchvision_op(name, image, m) for image, m in zip(x, MAGNITUDES[name])]).float()
    differ = (ours - reference).abs() > 2
    assert differ.float().mean() <= (0.01 if name in GEOMETRIC else 0.0), f"{name}: {int(differ.sum())} levels differ"
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert (ours != x.float()).any() or name == "identity"


@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_at_every_bin_keeps_shape_dtype_and_range(channels):
    x = torch.rand(31, channels, 9, 11, generator=torch.Generator().manual_seed(1)) * 255  # not whole levels
    table, signed = strong_augment.magnitude_table()
    for i, (name, _, is_signed) in enumerate(OPS):
        for sign in (1, -1) if is_signed else (1,):
            out = apply_ops(x, torch.full((31,), i), table[i] * sign)  # the 31 bins, one per image
            assert out.shape == x.shape and out.dtype == x.dtype, name
            assert out.min() >= 0 and out.max() <= 255, name


@pytest.mark.parametrize("name", ["identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
                                  "brightness", "color", "contrast", "sharpness", "posterize"])
def test_the_neutral_magnitude_leaves_the_image(name):
    """Bin 0 of each signed op (factor 1, no move) and posterize at 8 bits are the identity."""
    x = images(4)
    neutral = 8 if name == "posterize" else 0
    assert torch.equal(run_op(name, x, [neutral] * 4), x.float())


def test_equalize_flat_and_one_channel_images_as_torchvision():
    """A flat channel is left alone (PIL's step 0); a grey image is equalised on its one channel."""
    x = torch.cat([images(3, channels=1, height=10, width=10), torch.full((1, 1, 10, 10), 77, dtype=torch.uint8)])
    ours = run_op("equalize", x, [0] * 4)
    assert torch.equal(ours, TF.equalize(x).float())
    assert torch.equal(ours[3], x[3].float())


def test_trivial_augment_is_a_function_of_the_generator():
    x = images(64).float()
    first = trivial_augment(x, torch.Generator().manual_seed(5))
    again = trivial_augment(x, torch.Generator().manual_seed(5))
    other = trivial_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_a_batch_runs_each_op_once_on_its_group(monkeypatch):
    """No loop over images: 256 images, one grid_sample for the geometric ones, each pixel op called
    once with all of its images, and the images that drew identity come back untouched."""
    n = 256
    x = images(n, height=12, width=12).float()
    expected_ops = torch.randint(len(OPS), (n,), generator=torch.Generator().manual_seed(3))  # the first draw
    calls = {}

    def counting(name, fn):
        def wrapped(part, *args, **kwargs):
            calls.setdefault(name, []).append(len(part))
            return fn(part, *args, **kwargs)
        return wrapped

    for name, fn in list(strong_augment.PIXEL_OPS.items()):
        monkeypatch.setitem(strong_augment.PIXEL_OPS, name, counting(name, fn))
    monkeypatch.setattr(strong_augment.F, "grid_sample", counting("grid_sample", F.grid_sample))
    out = trivial_augment(x, torch.Generator().manual_seed(3))

    counts = torch.bincount(expected_ops, minlength=len(OPS))
    assert calls.pop("grid_sample") == [int(counts[1:6].sum())]
    assert calls == {name: [int(counts[OP_INDEX[name]])] for name in strong_augment.PIXEL_OPS}
    identity = expected_ops == OP_INDEX["identity"]
    assert identity.any() and torch.equal(out[identity], x[identity])
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 255


def test_batch_augment_applies_trivial_augment_before_normalising():
    x = images(32, height=8, width=8)
    mean, std = [0.5] * 3, [0.25] * 3
    plain = BatchAugment(mean, std)
    strong = BatchAugment(mean, std, auto_augment="trivial")
    index = torch.arange(32)
    expected = plain.normalise(trivial_augment(x.float(), torch.Generator().manual_seed(9)))
    assert torch.allclose(strong(x, index, 0, torch.Generator().manual_seed(9)), expected)
    assert torch.allclose(plain(x, index, 0, torch.Generator().manual_seed(9)), plain.normalise(x))


# ------------------------------------------------------------------------------ MixUp and CutMix
def distinct_batch(n=8, classes=10, side=6):
    """Image i is the constant i (every pixel of a pair differs) and its label i % classes."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, side, side).clone()
    return x, torch.arange(n) % classes


def test_mixup_blends_image_i_with_image_n_minus_1_minus_i_and_targets_alike():
    x, y = distinct_batch()
    mixed, soft = mix_batch(x, y, 10, mixup=0.4, generator=torch.Generator().manual_seed(0))
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    share = float(soft[0, 0])  # image 0 keeps share λ of itself, takes 1 - λ of image 7
    assert 0 < share < 1 and share != 0.5
    for i in range(8):
        j = 7 - i
        assert torch.allclose(mixed[i], x[i] * share + x[j] * (1 - share))
        assert soft[i, y[i]] == pytest.approx(share) and soft[i, y[j]] == pytest.approx(1 - share)


def test_cutmix_pastes_one_box_and_its_lambda_is_the_area_kept():
    x, y = distinct_batch(side=16)
    shares = set()
    for seed in range(20):
        mixed, soft = mix_batch(x, y, 10, cutmix=1.0, generator=torch.Generator().manual_seed(seed))
        pasted = mixed != x  # where image i shows image N-1-i
        assert torch.equal(pasted, pasted[:1].expand_as(pasted))  # the same box in every image
        assert torch.equal(mixed[pasted], x.flip(0)[pasted])
        kept = 1 - pasted[0, 0].float().mean().item()
        assert soft[0, y[0]] == pytest.approx(kept) and soft[0, y[7]] == pytest.approx(1 - kept)
        assert torch.allclose(soft.sum(1), torch.ones(8))
        shares.add(round(kept, 3))
    assert len(shares) > 5  # the boxes vary


def test_mixup_and_cutmix_together_pick_one_per_batch_and_mix_prob_skips_batches():
    x, y = distinct_batch(side=16)
    kinds = []
    for seed in range(40):
        mixed, soft = mix_batch(x, y, 10, mixup=0.2, cutmix=1.0, generator=torch.Generator().manual_seed(seed))
        changed = mixed != x
        kinds.append("none" if not changed.any() else "mixup" if changed.all() else "cutmix")
    assert 10 <= kinds.count("mixup") <= 30 and 10 <= kinds.count("cutmix") <= 30
    mixed, soft = mix_batch(x, y, 10, mixup=0.2, prob=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed, x) and torch.equal(soft, F.one_hot(y, 10).float())


def test_multilabel_targets_mix_as_multi_hot_rows():
    x, _ = distinct_batch(4)
    multi_hot = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    _, soft = mix_batch(x, multi_hot, 3, mixup=0.4, generator=torch.Generator().manual_seed(0))
    share = float(soft[0, 0])  # class 0: in image 0, not in image 3
    assert torch.allclose(soft, multi_hot * share + multi_hot.flip(0) * (1 - share))


# ------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_soft_target_loss_equals_the_class_index_loss_on_one_hot_rows(smoothing, weighted):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 1, 4, 2, 2, 1, 0, 1, 3, 1])
    weight = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.25], dtype=torch.float64) if weighted else None
    hard = F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
    soft = cross_entropy(logits, F.one_hot(y, 5).double(), weight=weight, label_smoothing=smoothing)
    assert torch.allclose(soft, hard)
    assert torch.equal(cross_entropy(logits, y, weight=weight, label_smoothing=smoothing), hard)


def test_soft_target_loss_smooths_once_as_timm_does():
    """timm smooths the one-hots, then mixes, then takes SoftTargetCrossEntropy: the same number as
    mixing the plain one-hots and letting the loss smooth them."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    share, smoothing = 0.7, 0.1
    one_hot = F.one_hot(y, 4).double()
    smoothed = one_hot * (1 - smoothing) + smoothing / 4
    timm = (-(smoothed * share + smoothed.flip(0) * (1 - share)) * logits.log_softmax(1)).sum(1).mean()
    ours = cross_entropy(logits, one_hot * share + one_hot.flip(0) * (1 - share), label_smoothing=smoothing)
    assert torch.allclose(ours, timm)


# ------------------------------------------------------------------------------ through a run
def test_digits_run_with_strong_augmentation_writes_the_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--data-dir", str(tmp_path / "cache"), "--model", "seedcnn",
                 "--epochs", "2", "--auto-augment", "trivial", "--mixup", "0.2", "--cutmix", "1.0",
                 "--mix-prob", "0.8", "--no-progress", "--no-report", "--out", str(out)]) == 0
    cfg = load_config(out / "config.yaml")
    assert (cfg.optim.auto_augment, cfg.optim.mixup, cfg.optim.cutmix, cfg.optim.mix_prob) == ("trivial", 0.2, 1.0, 0.8)
    assert len(metrics_without_timing(out)) == 2
    assert (out / "model.safetensors").exists()


def test_auto_augment_defaults_to_none_and_mix_prob_is_checked(tmp_path, capsys):
    from visionrecipe.train.build import resolve

    assert resolve(Config.from_dict({"data": "digits"}), "cpu").optim.auto_augment == "none"
    code = main(["train", "--data", "digits", "--data-dir", str(tmp_path / "cache"), "--mixup", "0.2",
                 "--mix-prob", "1.5", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: invalid value for mix_prob: 1.5 (must be in [0, 1])"]
    assert main(["train", "--auto-augment", "rand", "--out", str(tmp_path / "run")]) == 2


def test_resume_with_trivial_augment_and_mixup_matches_an_uninterrupted_run(tmp_path):
    """Interrupted mid-epoch and resumed, a run with --auto-augment trivial --mixup 0.2 ends with the
    weights of one that was not: every draw follows the step's seed."""
    settings = {"data": "digits", "data_dir": str(tmp_path / "cache"), "model": "seedcnn", "epochs": 2,
                "batch_size": 64, "auto_augment": "trivial", "mixup": 0.2, "cutmix": 1.0, "deterministic": True,
                "progress": False, "report": False}
    def interrupted(killed):
        state = torch.load(killed / "state.pt", map_location="cpu", weights_only=True)
        assert (state["epoch"], state["position"]) == (1, 1)  # stopped one step into epoch 2

    assert_interrupted_run_resumes_exactly(settings, tmp_path, before_resume=interrupted)
