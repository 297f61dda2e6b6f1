"""Fine-tuning: weights from a run, a state-dict file or ImageNet; key matching; freezing.

All offline: the ImageNet download is replaced by a local file saved under the expected name,
and everything from there on is the real code path.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from visionrecipe.train import finetune

from visionrecipe import train
from visionrecipe.config import Config
from visionrecipe.recipes import resolve_recipe
from visionrecipe.errors import VisionRecipeError
from visionrecipe.models import create_model, get_spec, pretrained_weights


def write_digits(folder: Path, digits, n_train: int, n_test: int, seed: int = 0) -> Path:
    """sklearn's digits as PNG files in folder/train/<class>/ and folder/test/<class>/."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.rint(data.images * 255 / 16).astype(np.uint8)
    rng = np.random.default_rng(seed)
    for digit in digits:
        rows = rng.permutation(np.flatnonzero(data.target == digit))
        for part, chosen in (("train", rows[:n_train]), ("test", rows[n_train:n_train + n_test])):
            (folder / part / str(digit)).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(pixels[i]).save(folder / part / str(digit) / f"{i}.png")
    return folder


def write_blobs(folder: Path, size: int = 32, per_class: int = 6) -> Path:
    """Two classes of colour images (reddish, bluish) in train/ and test/."""
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for c, name in enumerate(("red", "blue")):
            (folder / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                image[..., 0 if c == 0 else 2] += 150
                Image.fromarray(image).save(folder / part / name / f"{i}.png")
    return folder


def settings(tmp_path: Path, **more) -> dict:
    return dict(progress=False, report=False, data_dir=str(tmp_path / "cache"), **more)


def config_for(**values) -> Config:
    return resolve_recipe(Config.from_dict(values))


# --- transfer on real data ----------------------------------------------------------------------
def test_finetuning_from_digits_0_to_4_beats_scratch_on_5_to_9(tmp_path):
    """20 images per class of digits 5–9, 3 epochs: a seedcnn started from a 0–4 run beats one from scratch.

    The digits are decoded at 16x16, where the standard recipe's 2-pixel translations make learning
    from 100 images slow; at the native 8x8 a linear model on raw pixels already reaches ~95%, and
    there is nothing left for transfer to add.
    """
    source = write_digits(tmp_path / "low", range(5), n_train=100, n_test=20)
    target = write_digits(tmp_path / "high", range(5, 10), n_train=20, n_test=60)
    pretrained = tmp_path / "runs" / "low"
    digits = settings(tmp_path, flip=False)  # a mirrored digit is another shape (or none)
    train(data=str(source), model="seedcnn", image_size=16, epochs=5, out=str(pretrained), **digits)
    scores = {"scratch": [], "finetuned": []}
    for seed in range(5):  # the mean over seeds: 90 training images make single runs noisy
        for name, init in (("scratch", {"image_size": 16}), ("finetuned", {"weights": str(pretrained)})):
            run = train(data=str(target), model="seedcnn", epochs=3, batch_size=16, seed=seed, **init,
                        out=str(tmp_path / "runs" / f"{name}-{seed}"), **digits)
            scores[name].append(run.evaluate()["accuracy"])
    scratch, finetuned = np.mean(scores["scratch"]), np.mean(scores["finetuned"])
    assert finetuned >= scratch + 0.05, scores
    meta = json.loads((tmp_path / "runs" / "finetuned-0" / "model.json").read_text())
    low_meta = json.loads((pretrained / "model.json").read_text())
    assert meta["init_weights"] == str(pretrained) and meta["input_size"] == [3, 16, 16]  # the run's size
    assert meta["mean"] == low_meta["mean"] and meta["classes"] == [str(d) for d in range(5, 10)]


# --- a torchvision state-dict file ----------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory) -> tuple[Path, dict]:
    """torchvision's vgg16 (random init) saved as DataParallel would: every key under `module.`."""
    import torchvision

    state = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path, state


def test_vgg16_state_dict_loads_backbone_and_gets_new_head(vgg16_file):
    path, state = vgg16_file
    model = create_model("vgg16", num_classes=2, image_size=32)
    cfg = config_for(model="vgg16", weights=str(path))
    preprocessing = finetune.load_initial_weights(model, cfg, get_spec("vgg16"), 2)
    loaded = model.state_dict()
    backbone = [k for k in state if not k.startswith("classifier.6.")]
    assert all(torch.equal(loaded[k], state[k]) for k in backbone)
    assert loaded["classifier.6.weight"].shape == (2, 4096)
    assert loaded["classifier.6.weight"].std() == pytest.approx(0.01, rel=0.1)  # the fresh head's init
    assert "mean" not in preprocessing  # a bare state dict brings no preprocessing


def test_finetune_run_from_vgg16_file(vgg16_file, tmp_path, capsys):
    """End to end through train(): vgg16_cifar shares vgg16's features; its classifier.0 is the head."""
    path, state = vgg16_file
    data = write_blobs(tmp_path / "blobs")
    run = train(data=str(data), model="vgg16_cifar", weights=str(path), epochs=1, batch_size=4,
                out=str(tmp_path / "run"), **settings(tmp_path))
    out = capsys.readouterr().out
    assert "not used by this model" in out and "classifier.3.weight" in out  # vgg16's extra FC layers
    meta = run.meta
    assert meta["classes"] == ["blue", "red"] and meta["input_size"] == [3, 32, 32]
    assert len(run.metrics) == 1 and (run.path / "eval.json").is_file()


@pytest.mark.slow
def test_finetune_full_vgg16_from_file(vgg16_file, tmp_path):
    path, _ = vgg16_file
    run = train(data=str(write_blobs(tmp_path / "blobs")), model="vgg16", weights=str(path), epochs=1,
                batch_size=4, out=str(tmp_path / "run"), **settings(tmp_path))
    assert run.meta["classes"] == ["blue", "red"]


def test_run_weights_with_a_new_mlp_head_and_a_run_of_another_model(tmp_path):
    data = write_digits(tmp_path / "digits", range(3), n_train=20, n_test=5)
    source = train(data=str(data), model="seedcnn", epochs=1, out=str(tmp_path / "source"), **settings(tmp_path))
    saved = source.path / "model.safetensors"
    from visionrecipe.models.checkpoint import read_weights

    state = read_weights(saved)
    model = create_model("seedcnn", 3, image_size=8, head="mlp:32")
    cfg = config_for(model="seedcnn", head="mlp:32", weights=str(source.path))
    preprocessing = finetune.load_initial_weights(model, cfg, get_spec("seedcnn"), 3, classes=["0", "1", "2"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if not k.startswith("head."))
    assert isinstance(model.head, torch.nn.Sequential) and model.head[-1].out_features == 3
    assert preprocessing["mean"] == source.meta["mean"]
    from visionrecipe.data import load_dataset
    from visionrecipe.evaluate.scoring import predict_logits

    # The fresh head on trained features still starts at chance: loss about ln(classes).
    images = load_dataset(str(data), data_dir=tmp_path / "cache", progress=False).train
    logits = predict_logits(model, images.images, preprocessing["mean"], preprocessing["std"])
    assert abs(float(torch.nn.functional.cross_entropy(logits, images.labels)) - np.log(3)) < 0.1
    with pytest.raises(VisionRecipeError, match="holds a seedcnn model.*use --model seedcnn"):
        finetune.load_initial_weights(create_model("fastnet", 3, image_size=8),
                                      config_for(model="fastnet", weights=str(source.path)), get_spec("fastnet"), 3)


def test_pickled_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "whole-model.pt"
    torch.save(create_model("seedcnn", 3, image_size=8), path)  # pickles the module object itself
    cfg = config_for(model="seedcnn", weights=str(path))
    with pytest.raises(VisionRecipeError, match="unpickling") as info:
        finetune.load_initial_weights(create_model("seedcnn", 3, image_size=8), cfg, get_spec("seedcnn"), 3)
    assert "\n" not in str(info.value)


def test_wrong_architecture_is_an_error_not_a_random_backbone(tmp_path):
    path = tmp_path / "seedcnn.safetensors"
    from safetensors.torch import save_file

    save_file(create_model("seedcnn", 3, image_size=8).state_dict(), str(path))
    cfg = config_for(model="fastnet", weights=str(path))
    with pytest.raises(VisionRecipeError, match="backbone tensor.* missing"):
        finetune.load_initial_weights(create_model("fastnet", 3, image_size=8), cfg, get_spec("fastnet"), 3)


def test_bad_weights_paths_fail_before_any_data_is_read(tmp_path):
    for weights, message in ((str(tmp_path / "nope.pth"), "no such file"), (str(tmp_path), "not a run directory")):
        cfg = config_for(model="seedcnn", weights=weights)
        with pytest.raises(VisionRecipeError, match=message):
            finetune.pretrained_image_size(cfg, get_spec("seedcnn"))
    with pytest.raises(VisionRecipeError, match="no published ImageNet weights"):
        finetune.pretrained_image_size(config_for(model="seedcnn", weights="imagenet"), get_spec("seedcnn"))


def test_prefixes_and_nesting_are_unwrapped():
    own = create_model("seedcnn", 3, image_size=8).state_dict()
    nested = {"model": {f"_orig_mod.module.{k}": v for k, v in own.items()}, "step": 5}
    state = finetune.strip_prefixes(finetune.extract_state_dict(nested, "x"), own)
    assert sorted(state) == sorted(own)


def test_stem_adapted_to_one_channel_matches_grey_rgb_input():
    """A grey image through the summed stem = the same image as R=G=B through the RGB stem."""
    rgb = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    grey = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
    grey.weight.data = finetune.adapt_input_channels(rgb.weight.data, 1)
    x = torch.rand(2, 1, 6, 6)
    torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)))


# --- ImageNet, offline ------------------------------------------------------------------------------
@pytest.fixture
def fake_imagenet(tmp_path, monkeypatch):
    """resnet18 random weights saved under torchvision's file name; the download returns that file."""
    import torchvision

    weights = pretrained_weights("resnet18")
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "hub" / Path(weights.url).name
    path.parent.mkdir()
    torch.save(state, path)
    fetched = []

    def fetch(url, filename):
        fetched.append((url, filename))
        return path

    monkeypatch.setattr(finetune, "fetch_pretrained", fetch)
    return SimpleNamespace(state=state, fetched=fetched, weights=weights)


def test_imagenet_weights_load_with_their_preprocessing(fake_imagenet):
    model = create_model("resnet18", num_classes=4, image_size=64)
    cfg = config_for(model="resnet18", weights="imagenet")
    preprocessing = finetune.load_initial_weights(model, cfg, get_spec("resnet18"), 4)
    assert fake_imagenet.fetched == [(fake_imagenet.weights.url, Path(fake_imagenet.weights.url).name)]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in fake_imagenet.state.items() if not k.startswith("fc."))
    assert model.fc.out_features == 4
    assert preprocessing["mean"] == [0.485, 0.456, 0.406] and preprocessing["std"] == [0.229, 0.224, 0.225]
    assert finetune.pretrained_image_size(cfg, get_spec("resnet18")) == 224
    assert finetune.pretrained_image_size(config_for(model="resnet18_cifar", weights="imagenet"),
                                          get_spec("resnet18_cifar")) == 32


def test_imagenet_finetune_run_keeps_weights_preprocessing(fake_imagenet, tmp_path, capsys):
    """resnet18_cifar: every ImageNet tensor fits but the 7x7 stem, which starts fresh (a warning)."""
    run = train(data=str(write_blobs(tmp_path / "blobs")), model="resnet18_cifar", weights="imagenet",
                epochs=1, batch_size=4, freeze_backbone=True, out=str(tmp_path / "run"), **settings(tmp_path))
    assert "stem does not fit" in capsys.readouterr().out
    meta = run.meta
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["input_size"] == [3, 32, 32]
    assert meta["init_weights"] == "imagenet"
    assert json.loads((run.path / "eval.json").read_text())["num_images"] == 12


def test_weights_imagenet_alone_is_transfer_first(fake_imagenet, tmp_path, capsys):
    """--weights imagenet without --model: resnet18 at the weights' side and normalisation, the head alone
    for the first epoch, then everything with the backbone at a tenth of the rate."""
    cfg = config_for(weights="imagenet")
    assert (cfg.model.model, cfg.model.unfreeze_after, cfg.model.backbone_lr_mult) == ("resnet18", 1, 0.1)
    assert cfg.model.freeze_backbone and cfg.optim.recipe == "standard"
    assert config_for(weights="imagenet", unfreeze_after=0).model.freeze_backbone is False  # 0: never frozen
    assert config_for(weights="imagenet", backbone_lr_mult=1.0).model.backbone_lr_mult == 1.0  # given: kept
    assert config_for(model="seedcnn").model.backbone_lr_mult == 1.0  # from scratch: one rate
    run = train(data=str(write_blobs(tmp_path / "blobs", size=40, per_class=4)), weights="imagenet", epochs=2,
                batch_size=4, image_size=40, out=str(tmp_path / "run"), **settings(tmp_path))
    assert "epoch 2: backbone unfrozen" in capsys.readouterr().out
    assert run.meta["architecture"] == "resnet18" and run.meta["mean"] == [0.485, 0.456, 0.406]
    loaded = load_file(str(run.path / "last.safetensors"))  # after epoch 2 (the best may be epoch 1's)
    # the backbone moved in epoch 2, at a tenth of the rate: one AdamW step of lr 1e-3 × 0.1 × the schedule
    # moves a weight by about 5e-5 (at the full rate, 5e-4)
    moved = (loaded["conv1.weight"] - fake_imagenet.state["conv1.weight"]).abs().max()
    assert 0 < moved < 2e-4


def test_offline_imagenet_is_one_line_naming_url_and_folder(monkeypatch):
    def offline(url, filename):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(finetune, "fetch_pretrained", offline)
    cfg = config_for(model="vgg16", weights="imagenet")
    with pytest.raises(VisionRecipeError) as info:
        finetune.load_initial_weights(create_model("vgg16", 2, image_size=32), cfg, get_spec("vgg16"), 2)
    message = str(info.value)
    url = pretrained_weights("vgg16").url
    assert "\n" not in message and url in message and "--weights" in message
    assert str(Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name) in message


def test_timm_imagenet_weights_go_through_timm_loader(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    path = tmp_path / "resnet10t.safetensors"
    save_file(state, str(path))
    import huggingface_hub

    fetched = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename: fetched.append((repo_id, filename)) or str(path))
    monkeypatch.setattr(finetune, "fetch_pretrained", lambda url, filename: pytest.fail("timm weights via torch hub"))
    model = create_model("timm:resnet10t", num_classes=3, in_channels=1)
    cfg = config_for(model="timm:resnet10t", weights="imagenet")
    preprocessing = finetune.load_initial_weights(model, cfg, get_spec("timm:resnet10t"), 3)
    loaded = model.state_dict()
    stem = "conv1.0.weight"  # summed over RGB for the grey input, by timm's adapt_input_conv
    torch.testing.assert_close(loaded[stem], state[stem].sum(1, keepdim=True))
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != stem and not k.startswith("fc."))
    assert len(preprocessing["mean"]) == 1 and model.fc.out_features == 3
    assert fetched == [(timm.models.get_pretrained_cfg("resnet10t").hf_hub_id, "model.safetensors")]


def test_timm_weights_offline_and_not_cached_is_one_line(tmp_path):
    """The real huggingface_hub in offline mode with an empty cache: a one-line error, no traceback."""
    pytest.importorskip("timm")
    from conftest import run_cli

    result = run_cli("train", "--data", "digits", "--model", "timm:resnet10t", "--weights", "imagenet",
                     "--out", tmp_path / "run", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    message = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr and not (tmp_path / "run").exists()
    assert message.startswith("error: cannot fetch model.safetensors of timm/resnet10t")
    assert "Hugging Face Hub" in message and "HF_ENDPOINT" in message


# --- freezing -----------------------------------------------------------------------------------
def test_frozen_backbone_keeps_weights_and_batchnorm_stats_then_unfreezes(tmp_path):
    from visionrecipe.train.loop import Trainer

    data = write_digits(tmp_path / "digits", range(3), n_train=30, n_test=5)
    cfg = Config.from_dict(settings(tmp_path, data=str(data), model="fastnet", width=0.25, epochs=2, batch_size=16,
                                    unfreeze_after=1, ema=False, out=str(tmp_path / "run")))
    trainer = Trainer(cfg)
    trainer.setup()
    assert trainer.cfg.model.freeze_backbone  # implied by --unfreeze-after

    def backbone():
        return {k: v.clone() for k, v in trainer.model.state_dict().items() if not k.startswith("head.")}

    def head():
        return trainer.model.head.weight.detach().clone()

    before, head_before = backbone(), head()
    trainer.run_epoch()
    after_frozen = backbone()
    assert all(torch.equal(before[k], after_frozen[k]) for k in before)  # weights and running stats
    assert not torch.equal(head_before, head())
    trainer.run_epoch()
    changed = [k for k in before if not torch.equal(after_frozen[k], backbone()[k])]
    assert "blocks.0.conv1.weight" in changed and "blocks.0.norm1.running_mean" in changed
    assert "whiten.weight" not in changed  # fastnet keeps its whitening fixed, frozen or not


def test_resume_of_a_finetune_needs_no_source_and_matches_an_uninterrupted_run(tmp_path):
    """Unfreezing mid-run and resume: the optimizer held the frozen parameters all along."""
    import shutil

    from visionrecipe.models.checkpoint import read_weights
    from visionrecipe.train.loop import resume

    data = write_digits(tmp_path / "digits", range(3), n_train=30, n_test=5)
    common = settings(tmp_path, data=str(data), model="seedcnn", epochs=3, batch_size=16, deterministic=True,
                      flip=False, unfreeze_after=1)
    source = tmp_path / "source"
    train(data=str(data), model="seedcnn", epochs=1, out=str(source), **settings(tmp_path))
    whole = train(weights=str(source), out=str(tmp_path / "whole"), **common)

    class Stop(Exception):
        pass

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train(weights=str(source), out=str(tmp_path / "cut"), on_epoch=stop_after_two, **common)
    shutil.rmtree(source)  # resume must not need the weights it started from
    resumed = resume(tmp_path / "cut")
    assert resumed.meta["mean"] == whole.meta["mean"] and len(resumed.metrics) == 3
    a, b = read_weights(whole.path / "last.safetensors"), read_weights(resumed.path / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
