"""Fine-tuning: start a model from published or earlier weights, and freeze its backbone a while.

    size = pretrained_image_size(cfg, spec)     # decode size the weights expect (None: data's own)
    preprocessing = load_initial_weights(model, cfg, spec, num_classes, classes)  # {"mean", "std", ...}
    freezer = backbone_freezer(model, cfg, spec.head_path)                          # None unless freezing
    freezer.apply(epoch)                        # after model.train(), at every epoch start

``--weights`` is ``imagenet`` (torchvision's published weights, or timm's for ``timm:<name>``,
downloaded once into torch hub's cache as torchvision does; their mean/std and input size come
along), a run directory (same or related architecture; its mean/std and input size come along),
a ``.safetensors`` file, or a state dict (``.pth``/``.pt``/``.bin``/``.ckpt``) read with
``torch.load(weights_only=True)``. The README section "Fine-tuning" has the user's view.

What counts as a fit: every backbone tensor of the model must be in the weights with its shape,
after undoing ``state_dict`` nesting and ``module.``/``model.``/``_orig_mod.`` prefixes. Two
exceptions: a stem (the first conv) for another input-channel count is adapted, and a stem of
another shape (resnet18_cifar's 3x3 against ImageNet's 7x7) starts fresh, with a warning;
BatchNorm's ``num_batches_tracked`` counters may be absent. Anything else missing or misshapen is
an error: a silently random backbone is the worst way for a fine-tune to fail. The head is kept
only when its keys and shapes fit and, for a run, its classes, head kind and task are the same.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from visionrecipe.errors import VisionRecipeError
from visionrecipe.system import log

IMAGENET = "imagenet"
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Where training scripts nest the weights inside a checkpoint, most common first.
NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Wrappers that prefix every key: DataParallel/DDP, Lightning modules, torch.compile.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "net.")
SHOW_KEYS = 3  # keys named in a warning or error before "..."


# --- where the weights come from -------------------------------------------------------------
def fetch_pretrained(url: str, filename: str) -> Path:
    """The local copy of a published checkpoint in torch hub's checkpoints folder, downloaded once.

    torchvision's ``weights.get_state_dict()`` uses the same file; offline, this raises URLError.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"downloading {url} to {path}")
        # Writes to a temporary file and renames, so an interrupted download leaves nothing behind.
        torch.hub.download_url_to_file(url, str(path), progress=True)
    return path


@dataclass
class Published:
    """A published checkpoint and the preprocessing it was trained with."""

    url: str
    filename: str
    mean: list[float]
    std: list[float]
    image_size: int
    timm_name: str | None = None  # set for timm models: their weights go through timm's loader
    hub_repo: str | None = None  # on the Hugging Face Hub: fetched by huggingface_hub (its cache, token, mirror)


def published_weights(spec) -> Published:
    """The ImageNet checkpoint for a registry or timm model; a one-line error if there is none."""
    if spec.family == "timm":
        return _published_timm(spec.name.split(":", 1)[1])
    from visionrecipe.models import list_models, pretrained_weights

    weights = pretrained_weights(spec.name)
    if weights is None:
        have = [n for n in list_models() if pretrained_weights(n) is not None]
        raise VisionRecipeError(f"{spec.name} has no published ImageNet weights (models with them: "
                                f"{', '.join(have)}, or timm:<name>); use --weights RUN_DIR or FILE")
    transforms = weights.transforms()
    return Published(url=weights.url, filename=os.path.basename(weights.url), mean=list(transforms.mean),
                     std=list(transforms.std), image_size=int(transforms.crop_size[0]))


def _published_timm(name: str) -> Published:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url) or cfg.custom_load:
        raise VisionRecipeError(f"timm model {name} has no published weights visionrecipe can load")
    if cfg.hf_hub_id:  # timm prefers the Hub too; its files there are timm-format safetensors
        hub_file = cfg.hf_hub_filename or "model.safetensors"
        return Published(url=f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{hub_file}", filename=hub_file,
                         mean=list(cfg.mean), std=list(cfg.std), image_size=int(cfg.input_size[-1]), timm_name=name,
                         hub_repo=cfg.hf_hub_id)
    return Published(url=cfg.url, filename=os.path.basename(cfg.url), mean=list(cfg.mean), std=list(cfg.std),
                     image_size=int(cfg.input_size[-1]), timm_name=name)


def _download(published: Published) -> Path:
    if published.hub_repo:
        return _download_from_hub(published)
    try:
        return fetch_pretrained(published.url, published.filename)
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise VisionRecipeError(
            f"cannot download the pretrained weights ({reason}): fetch {published.url} and save it as "
            f"{folder / published.filename} (or pass --weights PATH_TO_THAT_FILE)") from None


def _download_from_hub(published: Published) -> Path:
    """The file from the Hugging Face Hub through huggingface_hub, as timm itself fetches it: its cache
    (HF_HOME), token, mirror (HF_ENDPOINT) and offline mode (HF_HUB_OFFLINE=1: the cache or an error)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(published.hub_repo, published.filename))
    except Exception as exc:  # offline, not cached, not found, no access: huggingface_hub has many types
        reason = " ".join(str(exc).split())[:200]
        raise VisionRecipeError(
            f"cannot fetch {published.filename} of {published.hub_repo} from the Hugging Face Hub "
            f"({type(exc).__name__}: {reason}); connect, set HF_ENDPOINT to a mirror, or pass --weights "
            "PATH_TO_THAT_FILE") from None


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a weights-only PyTorch file, unwrapped to the state dict."""
    if path.suffix == ".safetensors":
        from visionrecipe.models.checkpoint import read_weights

        return read_weights(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise VisionRecipeError(
            f"{path} needs unpickling arbitrary Python objects, which visionrecipe refuses; save a plain "
            "state dict (torch.save(model.state_dict(), ...)) or a .safetensors file") from None
    except Exception as exc:  # a zip, a pickle, a text file: torch raises many types
        raise VisionRecipeError(f"{path} is not a readable PyTorch state-dict file ({type(exc).__name__})") from None
    return extract_state_dict(obj, str(path))


def extract_state_dict(obj, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, descending into ``{"state_dict": {...}}``-style nesting."""
    for _ in range(len(NESTING_KEYS)):
        if not isinstance(obj, dict):
            break
        here = sum(isinstance(v, torch.Tensor) for v in obj.values())
        inner = [obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), dict)
                 and sum(isinstance(v, torch.Tensor) for v in obj[k].values()) > here]
        if not inner:
            break
        obj = inner[0]
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise VisionRecipeError(f"{source} holds no tensors (expected a state dict of a model)")
    return tensors


def _model_files(weights: str) -> tuple[Path, dict | None]:
    """(weights file, the run's model.json or None) for a --weights path; errors name what is wrong."""
    from visionrecipe.rundir import read_model_meta

    path = Path(weights).expanduser()
    if not path.exists():
        raise VisionRecipeError(f"--weights {weights}: no such file or run directory (or write 'imagenet')")
    if path.is_dir():
        if not (path / "model.safetensors").is_file() or not (path / "model.json").is_file():
            raise VisionRecipeError(f"--weights {weights}: not a run directory (model.safetensors and "
                                    "model.json expected)")
        return path / "model.safetensors", read_model_meta(path / "model.json")
    if path.suffix == ".safetensors":  # with a .json beside it, a visionrecipe model file
        meta = path.with_suffix(".json")
        return path, read_model_meta(meta) if meta.is_file() else None
    if path.suffix in STATE_DICT_SUFFIXES:
        return path, None
    raise VisionRecipeError(f"--weights {weights}: expected imagenet, a run directory, a .safetensors file or "
                            f"a state dict ({', '.join(STATE_DICT_SUFFIXES)})")


def pretrained_image_size(cfg, spec) -> int | None:
    """The square size the weights were trained at, to decode the data at when --image-size is unset.

    ImageNet: the model's own default size (32 for the CIFAR variants) or the weights' crop size;
    a run: its input size; a bare state dict: None (the data's own size). Called before the data
    is decoded, it also makes sure the weights are there (ImageNet's are downloaded now).
    """
    if cfg.model.weights == IMAGENET:
        published = published_weights(spec)
        _download(published)
        return spec.default_image_size or published.image_size
    meta = _model_files(cfg.model.weights)[1]
    return int(meta["input_size"][1]) if meta else None


# --- matching keys -----------------------------------------------------------------------------
def strip_prefixes(state: dict[str, torch.Tensor], own_keys) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.``, ``_orig_mod.``, ...): one every key has and no model key
    has, or one whose removal makes more keys match the model. Repeated, for nested wrappers."""
    own_keys = set(own_keys)

    def hits(candidate: dict) -> int:
        return sum(k in own_keys for k in candidate)

    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if not any(k.startswith(prefix) for k in state):
                continue
            stripped = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
            wraps_all = all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own_keys)
            if wraps_all or hits(stripped) > hits(state):
                state, changed = stripped, True
    return state


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first-conv weight for ``channels`` inputs from one for another count (as timm adapts).

    One channel: the sum over the source's (a grey image is R = G = B). More: the source's
    channels repeated and scaled so the response to a constant image keeps its size.
    """
    source = weight.shape[1]
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-channels // source)
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (source / channels)


def _stem_keys(own: dict[str, torch.Tensor], head_path: str) -> tuple[str | None, str | None]:
    """(weight, bias) keys of the first conv: the first 4-D weight outside the head."""
    for key, tensor in own.items():
        if key.endswith(".weight") and tensor.ndim == 4 and not key.startswith(head_path + "."):
            bias = key[: -len("weight")] + "bias"
            return key, bias if bias in own else None
    return None, None


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:SHOW_KEYS]) + (", ..." if len(keys) > SHOW_KEYS else "")


@dataclass
class Fit:
    """How a state dict maps onto a model: what to load and what was left or changed."""

    load: dict[str, torch.Tensor]
    head_loaded: bool
    unexpected: list[str]
    adapted: list[str]
    reinitialised: list[str]


def match_state(model: nn.Module, state: dict[str, torch.Tensor], head_path: str, *, source: str,
                keep_head: bool = True) -> Fit:
    """Check ``state`` against the model by the rule in the module docstring; raise on a misfit."""
    own = model.state_dict()
    state = strip_prefixes(state, own)
    head_prefix = head_path + "."
    own_head = [k for k in own if k.startswith(head_prefix)]
    their_head = [k for k in state if k.startswith(head_prefix)]
    head_loaded = (keep_head and bool(own_head) and sorted(own_head) == sorted(their_head)
                   and all(state[k].shape == own[k].shape for k in own_head))
    stem_weight, stem_bias = _stem_keys(own, head_path)
    load = {k: state[k] for k in own_head} if head_loaded else {}
    missing, wrong, adapted, reinitialised = [], [], [], []
    for key, tensor in own.items():
        if key.startswith(head_prefix):
            continue
        if key not in state:
            if not key.endswith("num_batches_tracked"):  # older checkpoints lack the counters
                missing.append(key)
            continue
        theirs = state[key]
        if theirs.shape == tensor.shape:
            load[key] = theirs
        elif key == stem_weight and theirs.ndim == 4 and theirs.shape[0] == tensor.shape[0] \
                and theirs.shape[2:] == tensor.shape[2:]:
            load[key] = adapt_input_channels(theirs, tensor.shape[1])
            adapted.append(f"{key} ({theirs.shape[1]} -> {tensor.shape[1]} input channels)")
        elif key in (stem_weight, stem_bias):
            reinitialised.append(f"{key} ({list(theirs.shape)} in the weights, {list(tensor.shape)} here)")
        else:
            wrong.append(f"{key} ({list(theirs.shape)} in the weights, {list(tensor.shape)} here)")
    if reinitialised:  # a fresh stem keeps its own bias too
        load.pop(stem_weight, None)
        load.pop(stem_bias, None)
    if missing or wrong:
        parts = [f"{len(missing)} backbone tensor(s) missing: {_first(missing)}"] if missing else []
        parts += [f"{len(wrong)} of the wrong shape: {_first(wrong)}"] if wrong else []
        raise VisionRecipeError(f"{source} does not fit {type(model).__name__} ({'; '.join(parts)}); a different "
                                "architecture or options? (the backbone would be left randomly initialised)")
    unexpected = [k for k in state if k not in own and not k.startswith(head_prefix)]
    return Fit(load, head_loaded, unexpected, adapted, reinitialised)


def apply_fit(model: nn.Module, fit: Fit, source: str, num_classes: int) -> None:
    """Copy the matched tensors into the model and say in a few lines what happened."""
    with torch.no_grad():
        model.load_state_dict(fit.load, strict=False)  # copy_ casts dtypes (fp16 checkpoints)
    head = "its head too" if fit.head_loaded else f"a new head for {num_classes} classes"
    log(f"initial weights: {len(fit.load)} tensors from {source}; {head}")
    if fit.unexpected:
        log(f"warning: {len(fit.unexpected)} tensor(s) in {source} are not used by this model: "
            f"{_first(fit.unexpected)}")
    for note in fit.adapted:
        log(f"note: adapted the stem {note}")
    if fit.reinitialised:
        log(f"warning: the stem does not fit and starts from scratch: {_first(fit.reinitialised)}")


# --- the entry point the trainer calls --------------------------------------------------------------
def load_source(cfg, spec, channels: int) -> tuple[str, dict[str, torch.Tensor], dict | None, dict]:
    """(name, tensors, the run's model.json or None, preprocessing) of the weights ``cfg.model.weights`` names."""
    weights = cfg.model.weights
    if weights == IMAGENET:
        published = published_weights(spec)
        path = _download(published)
        state = read_state_file(path)
        if published.timm_name:
            state = _timm_state(published.timm_name, state, channels)
        mean, std = _per_channel(published.mean, channels), _per_channel(published.std, channels)
        return f"ImageNet weights {published.filename}", state, None, {"mean": mean, "std": std,
                                                                        "init_weights": IMAGENET}
    weights_path, meta = _model_files(weights)
    if meta is not None:
        _check_architecture(meta, cfg, weights)
    state = read_state_file(weights_path)
    preprocessing: dict = {"init_weights": str(Path(weights).expanduser())}
    if meta is not None and len(meta.get("mean", [])) == channels:
        preprocessing.update(mean=meta["mean"], std=meta["std"])
    return str(weights), state, meta, preprocessing


def load_initial_weights(model: nn.Module, cfg, spec, num_classes: int, classes: list[str] | None = None,
                         resume_dir: Path | None = None) -> dict:
    """Load ``cfg.model.weights`` into ``model`` (built with a fresh head); return meta updates.

    ``classes``, the data's class names, decide whether a run's head is kept: only for the same
    classes, head kind and task. Without them a head is kept whenever its shapes fit. On resume
    (``resume_dir``) the weights come from state.pt and the preprocessing from the run's last.json,
    so the source need not exist any more.
    """
    last = Path(resume_dir) / "last.json" if resume_dir is not None else None
    if last is not None and last.is_file():
        from visionrecipe.rundir import read_model_meta

        meta = read_model_meta(last)
        return {k: meta[k] for k in ("mean", "std", "init_weights") if k in meta}
    own = model.state_dict()
    stem, _ = _stem_keys(own, spec.head_path)
    channels = own[stem].shape[1] if stem else 3
    name, state, meta, preprocessing = load_source(cfg, spec, channels)
    keep_head = cfg.model.weights != IMAGENET  # ImageNet's head is for ImageNet's labels
    if meta is not None and classes is not None:
        keep_head = (list(meta.get("classes", [])) == list(classes) and meta.get("head", "linear") == cfg.model.head
                     and meta.get("task", "multiclass") == cfg.model.task)
    fit = match_state(model, state, spec.head_path, source=name, keep_head=keep_head)
    apply_fit(model, fit, name, num_classes)
    return preprocessing


def _check_architecture(meta: dict, cfg, weights: str) -> None:
    """A run's weights fit the same model, or one built on the same torchvision network."""
    from visionrecipe.models.torchvision_models import TORCHVISION_ARCH

    theirs, ours = meta.get("architecture"), cfg.model.model
    related = TORCHVISION_ARCH.get(theirs) is not None and TORCHVISION_ARCH.get(theirs) == TORCHVISION_ARCH.get(ours)
    if theirs != ours and not related:
        raise VisionRecipeError(f"--weights {weights} holds a {theirs} model, which --model {ours} cannot load; "
                                f"use --model {theirs}")
    options = cfg.model.options()
    if theirs == ours and meta.get("model_options", {}) != options:
        flags = " ".join(f"--{k} {v}" for k, v in meta.get("model_options", {}).items()) or "no --width/--depth"
        raise VisionRecipeError(f"--weights {weights} was trained with {flags}; give the same options")


def _timm_state(name: str, state: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """timm's own loader on the downloaded tensors: its key filters and input-channel adaptation."""
    import timm

    # The pretrained class count keeps the published head, which match_state then judges.
    source = timm.create_model(name, pretrained=True, in_chans=channels,
                               pretrained_cfg_overlay={"state_dict": state, "source": ""})
    return source.state_dict()


def _per_channel(values: list[float], channels: int) -> list[float]:
    """RGB statistics for a model fed ``channels`` channels (one: their mean, as the stem is summed)."""
    if channels == len(values):
        return list(values)
    if channels == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(channels)]


# --- freezing ------------------------------------------------------------------------------------
class BackboneFreezer:
    """Freezes the backbone for the first ``unfreeze_after`` epochs (all of them when None).

    Frozen means no gradients and BatchNorm in eval mode: its running statistics are the
    pretrained ones and a few small batches must not overwrite them. The optimizer holds every
    parameter from the start (frozen ones just have no grad), so unfreezing and resume need no
    new param groups.
    """

    def __init__(self, model: nn.Module, head_path: str, unfreeze_after: int | None):
        head_prefix = head_path + "."
        # Parameters the model itself keeps fixed (fastnet's whitening) stay fixed after unfreezing.
        self.params = [p for n, p in model.named_parameters() if not n.startswith(head_prefix) and p.requires_grad]
        self.norms = [m for n, m in model.named_modules()
                      if not (n + ".").startswith(head_prefix) and isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.unfreeze_after = unfreeze_after
        self.frozen: bool | None = None

    def apply(self, epoch: int) -> None:
        """Set the state for 0-based ``epoch``; call after ``model.train()``, which resets BatchNorm."""
        frozen = self.unfreeze_after is None or epoch < self.unfreeze_after
        for param in self.params:
            param.requires_grad_(not frozen)
        if frozen:
            for norm in self.norms:
                norm.eval()
        if self.frozen and not frozen:
            log(f"epoch {epoch + 1}: backbone unfrozen")
        self.frozen = frozen


def backbone_freezer(model: nn.Module, cfg, head_path: str) -> BackboneFreezer | None:
    """A freezer when --freeze-backbone or --unfreeze-after asks for one, else None."""
    if not cfg.model.freeze_backbone and cfg.model.unfreeze_after is None:
        return None
    return BackboneFreezer(model, head_path, cfg.model.unfreeze_after)
