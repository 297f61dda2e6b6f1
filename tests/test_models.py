"""Tests for visionrecipe.models: every registered model runs, heads swap, tables add up.

References: torchvision's own models for state dict keys, the seed article's hand
arithmetic for seedcnn's sizes, parameters and MACs.
"""

import math
import sys

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from visionrecipe.errors import VisionRecipeError
from visionrecipe.models import (
    backbone_parameters,
    count_parameters,
    create_model,
    format_layer_table,
    get_head,
    get_spec,
    head_in_features,
    layer_table,
    list_models,
    parse_head,
    pretrained_weights,
    register_model,
    replace_head,
)
from visionrecipe.models import registry
from visionrecipe.models.fastnet import fastnet_widths, init_whitening, patch_covariance

# The seed article's network on 32x32 RGB with 10 classes, parameter by parameter.
SEED_PARAMS_32 = (3 * 64 * 9 + 64) + (64 * 128 * 9 + 128) + (128 * 8 * 8 * 1024 + 1024) + (1024 * 10 + 10)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _test_size(name: str) -> int:
    # ImageNet models at 64: big enough for five stride-2 stages, small enough for CPUs.
    return 64 if get_spec(name).default_image_size == 224 else 32


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward(name):
    size = _test_size(name)
    model = create_model(name, num_classes=7, image_size=size)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    out.logsumexp(1).mean().backward()
    head = get_head(model, get_spec(name).head_path)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_list_models_has_the_built_ins():
    expected = {"seedcnn", "fastnet", "vgg11_bn", "vgg16", "vgg16_bn", "resnet18", "resnet50",
                "resnet18_cifar", "vgg16_cifar"}
    assert expected <= set(list_models())
    assert list_models() == sorted(list_models())


def test_every_model_option_is_a_setting_a_policy_tier_and_a_searchable_parameter():
    from dataclasses import fields

    from visionrecipe.config import MODEL_OPTIONS, ModelConfig
    from visionrecipe.recipes import Tier

    assert set().union(*(get_spec(name).options for name in list_models())) == set(MODEL_OPTIONS)
    for holder in (ModelConfig, Tier):
        assert set(MODEL_OPTIONS) <= {f.name for f in fields(holder)}
    assert ModelConfig(width=0.5, stem=2).options() == {"width": 0.5, "stem": 2}
    assert Tier("fastnet", 128, width=0.5, stem=2).options() == {"width": 0.5, "stem": 2}


# --- seedcnn ------------------------------------------------------------------------------

@pytest.mark.parametrize("size, channels", [(8, 1), (32, 3), (64, 3)])
def test_seedcnn_flatten_size_is_derived(size, channels):
    model = create_model("seedcnn", num_classes=10, in_channels=channels, image_size=size)
    assert model.fc1.in_features == 128 * (size // 4) ** 2
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_seedcnn_parameter_count_matches_hand_computation():
    assert count_parameters(create_model("seedcnn", num_classes=10)) == SEED_PARAMS_32 == 8_475_530


def test_seedcnn_too_small_image_is_a_user_error():
    with pytest.raises(VisionRecipeError, match="at least 4x4"):
        create_model("seedcnn", num_classes=10, image_size=3)


def test_layer_table_matches_hand_computation():
    rows = layer_table("seedcnn", num_classes=10, image_size=32)
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer["features.0"]["type"] == "Conv2d(3, 64, k=3, s=1, p=1)"
    shapes = [(r["layer"], r["output_shape"]) for r in rows]
    assert shapes == [
        ("features.0", [64, 32, 32]), ("features.2", [64, 16, 16]),
        ("features.3", [128, 16, 16]), ("features.5", [128, 8, 8]),
        ("flatten", [8192]), ("fc1", [1024]), ("head", [10]),
    ]
    assert by_layer["features.0"]["macs"] == 32 * 32 * 64 * 3 * 3 * 3
    assert by_layer["features.3"]["macs"] == 16 * 16 * 128 * 64 * 3 * 3
    assert by_layer["fc1"]["macs"] == 8192 * 1024
    assert by_layer["head"]["macs"] == 1024 * 10
    assert by_layer["features.3"]["params"] == 73_856
    assert sum(r["params"] for r in rows) == SEED_PARAMS_32
    text = format_layer_table(rows)
    assert "(32 + 2*1 - 3)/1 + 1 = 32" in text and "(32 + 2*0 - 2)/2 + 1 = 16" in text
    assert text.splitlines()[-1].split()[:2] == ["total", f"{SEED_PARAMS_32:,}"]


@pytest.mark.parametrize("name, options", [("fastnet", {}), ("resnet18_cifar", {}), ("fastnet", {"depth": 5})])
def test_layer_table_totals_equal_count_parameters(name, options):
    rows = layer_table(name, image_size=32, **options)
    model = create_model(name, 10, image_size=32, **options)
    assert sum(r["params"] for r in rows) == count_parameters(model)


# --- heads --------------------------------------------------------------------------------

def test_parse_head():
    assert parse_head("linear") == ("linear", None)
    assert parse_head("mlp:256") == ("mlp", 256)
    for bad in ["mlp", "mlp:0", "mlp:x", "conv", ""]:
        with pytest.raises(VisionRecipeError):
            parse_head(bad)


def _loss_at_init(model, num_classes, size=32, channels=3):
    x = torch.randn(64, channels, size, size)  # zero mean, unit std: a normalised batch
    y = torch.randint(num_classes, (64,))
    return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("name, head", [("seedcnn", "linear"), ("seedcnn", "mlp:64"),
                                        ("fastnet", "mlp:64"), ("resnet18_cifar", "linear")])
def test_replace_head_loss_starts_near_ln_classes(name, head):
    spec = get_spec(name)
    model = create_model(name, num_classes=10)
    new = replace_head(model, spec.head_path, num_classes=5, head=head)
    assert get_head(model, spec.head_path) is new
    assert isinstance(new, nn.Linear if head == "linear" else nn.Sequential)
    assert abs(_loss_at_init(model, 5) - math.log(5)) < 0.2


def test_mlp_head_through_create_model():
    model = create_model("resnet18_cifar", num_classes=10, head="mlp:64")
    head = get_head(model, "fc")
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head_in_features(model, "fc") == 512 and head[-1].out_features == 10
    assert head[-1].bias.abs().sum() == 0


def test_backbone_parameters_are_everything_but_the_head():
    model = create_model("seedcnn", num_classes=10)
    backbone = backbone_parameters(model, "head")
    head_ids = {id(p) for p in model.head.parameters()}
    assert not head_ids & {id(p) for p in backbone}
    assert len(backbone) + len(head_ids) == len(list(model.parameters()))


def test_bad_head_path_is_a_user_error():
    with pytest.raises(VisionRecipeError, match="no module"):
        get_head(create_model("seedcnn", 10), "classifier.6")


# --- torchvision compatibility --------------------------------------------------------------

def _reference(arch):
    with torch.device("meta"):  # keys and shapes only: skip the seconds of weight init
        return getattr(torchvision.models, arch)().state_dict()


@pytest.mark.parametrize("name, arch, differ", [
    ("resnet18", "resnet18", {"fc.weight", "fc.bias"}),
    ("vgg16", "vgg16", {"classifier.6.weight", "classifier.6.bias"}),
    ("resnet18_cifar", "resnet18", {"fc.weight", "fc.bias", "conv1.weight"}),
])
def test_state_dict_keys_match_torchvision(name, arch, differ):
    ours, ref = create_model(name, num_classes=10).state_dict(), _reference(arch)
    assert list(ours) == list(ref)
    assert {k for k in ours if ours[k].shape != ref[k].shape} == differ


def test_vgg16_cifar_features_match_vgg16():
    ours, ref = create_model("vgg16_cifar", num_classes=10).state_dict(), _reference("vgg16")
    features = [k for k in ref if k.startswith("features.")]
    assert all(ours[k].shape == ref[k].shape for k in features)
    assert set(ours) - set(features) == {"classifier.0.weight", "classifier.0.bias"}


@pytest.mark.parametrize("name, first", [("resnet18", "conv1"), ("resnet18_cifar", "conv1"),
                                         ("vgg16_cifar", "features.0")])
def test_single_channel_input(name, first):
    model = create_model(name, num_classes=4, in_channels=1, image_size=32)
    assert model.get_submodule(first).in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_resnet18_cifar_runs_on_8x8():
    model = create_model("resnet18_cifar", num_classes=10, in_channels=1, image_size=8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_pretrained_weights():
    weights = torchvision.models
    assert pretrained_weights("resnet18") == weights.ResNet18_Weights.IMAGENET1K_V1
    assert pretrained_weights("resnet18_cifar") == weights.ResNet18_Weights.IMAGENET1K_V1
    assert pretrained_weights("vgg16") == weights.VGG16_Weights.IMAGENET1K_V1
    assert pretrained_weights("vgg16_cifar") == weights.VGG16_Weights.IMAGENET1K_V1
    assert pretrained_weights("seedcnn") is None and pretrained_weights("fastnet") is None


# --- user errors and the registry -----------------------------------------------------------

def test_unknown_model_suggests_close_names():
    with pytest.raises(VisionRecipeError, match=r"unknown model 'resnt18'; did you mean: resnet18"):
        create_model("resnt18", num_classes=10)


def test_duplicate_registration_raises(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        register_model("seedcnn", head_path="head", family="seedcnn")(lambda *a: None)
    register_model("tiny", head_path="1", family="test")(lambda n, c, s: nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, n)))
    assert create_model("tiny", num_classes=3, image_size=4)(torch.randn(2, 3, 4, 4)).shape == (2, 3)
    with pytest.raises(ValueError):
        register_model("tiny", head_path="0", family="test")(lambda *a: None)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "seedcnn", "num_classes": 10, "width": 2.0}, "no option width"),
    ({"name": "fastnet", "num_classes": 10, "widht": 2.0}, "no option widht"),
    ({"name": "seedcnn", "num_classes": 0}, "num_classes"),
    ({"name": "seedcnn", "num_classes": 10, "head": "mlp"}, "bad head"),
    ({"name": "vgg16", "num_classes": 10, "image_size": 16}, "at least 32x32"),
    ({"name": "fastnet", "num_classes": 10, "depth": 0}, "depth"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(VisionRecipeError, match=message):
        create_model(**kwargs)


def test_missing_timm_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(VisionRecipeError, match="timm is not installed"):
        get_spec("timm:resnet18")


# --- fastnet --------------------------------------------------------------------------------

def test_fastnet_width_and_depth_change_size():
    base = count_parameters(create_model("fastnet", 10))
    assert count_parameters(create_model("fastnet", 10, width=0.5)) < base
    assert count_parameters(create_model("fastnet", 10, depth=4)) > base
    assert fastnet_widths(0.3, 4) == [16, 80, 80, 80]  # 19.2 and 76.8 rounded to multiples of 8


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_fastnet_on_8x8_single_channel(depth):
    model = create_model("fastnet", num_classes=10, in_channels=1, image_size=8, depth=depth)
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)
    out.sum().backward()


def test_fastnet_stem_2_reads_disjoint_patches_and_halves_the_side():
    from visionrecipe.models.fastnet import init_whitening

    plain, strided = (create_model("fastnet", 10, image_size=64, width=0.5, stem=s) for s in (1, 2))
    x = _correlated_images(8, 64)
    assert plain.whiten(x).shape[-1] == 63 and strided.whiten(x).shape[-1] == 32
    init_whitening(strided, x)
    # Lossless: the 12 values of every 2×2 patch come back from its 12 whitened components.
    patches = F.unfold(x, 2, stride=2)  # (N, 12, 32*32)
    whitened = strided.whiten(x)[:, :12].flatten(2) - strided.whiten.bias[:12, None]
    weight = strided.whiten.weight[:12].flatten(1)  # (12, 12), invertible
    assert torch.allclose(torch.linalg.solve(weight, whitened), patches, atol=1e-3)
    assert strided(x).shape == (8, 10)
    with pytest.raises(VisionRecipeError, match="fastnet stem must be one of 1, 2, got 3"):
        create_model("fastnet", 10, stem=3)
    with pytest.raises(VisionRecipeError, match="has no option stem"):
        create_model("seedcnn", 10, stem=2)


def test_fastnet_convs_start_as_identity():
    conv = create_model("fastnet", 10).blocks[0].conv1  # 24 whitened channels in, 64 out
    centre = conv.weight[:24, :, 1, 1]
    assert torch.equal(centre, torch.eye(24))


def _correlated_images(n=48, size=16):
    x = F.avg_pool2d(torch.randn(n, 3, size, size), 3, stride=1, padding=1)  # neighbours agree
    x = torch.einsum("nchw,dc->ndhw", x, torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.7, 0.2, 0.3]]))
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


def _whitened_covariance(model, images):
    half = model.whiten.out_channels // 2  # the second half are the negatives
    out = F.conv2d(images, model.whiten.weight[:half])
    flat = out.permute(0, 2, 3, 1).reshape(-1, half)
    return flat.T @ flat / flat.shape[0]


def test_init_whitening_decorrelates_patches_and_freezes():
    model = create_model("fastnet", num_classes=10)
    images = _correlated_images()
    eye = torch.eye(12)
    before = (_whitened_covariance(model, images) - eye).norm()
    init_whitening(model, images)
    after = (_whitened_covariance(model, images) - eye).norm()
    assert after < 0.1 * before and after < 0.2
    assert not model.whiten.weight.requires_grad
    assert torch.allclose(model.whiten.weight[:12], -model.whiten.weight[12:])
    assert patch_covariance(images).shape == (12, 12)


def test_init_whitening_rejects_wrong_channels():
    with pytest.raises(VisionRecipeError, match="shape"):
        init_whitening(create_model("fastnet", 10), torch.randn(4, 1, 8, 8))


# --- timm (optional) ------------------------------------------------------------------------

def test_timm_models():
    pytest.importorskip("timm")
    spec = get_spec("timm:resnet18")
    assert (spec.head_path, spec.family, spec.default_image_size) == ("fc", "timm", 224)
    model = create_model("timm:resnet18", num_classes=7, in_channels=1, image_size=32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert get_head(model, "fc").bias.abs().sum() == 0  # our head init, not timm's
    assert get_spec("timm:convnext_atto").head_path == "head.fc"
    with pytest.raises(VisionRecipeError, match="unknown timm model"):
        get_spec("timm:resnt18")
    assert "timm:resnet18" not in list_models()
