"""`visionrecipe push RUN REPO_ID`: a trained run as a Hugging Face Hub model repository.

    push("runs/digits", "me/digits-seedcnn")                 # weights, model.json, README.md, model.onnx
    push("runs/digits", "me/digits", private=True, onnx=False, api=FakeApi())   # tests pass their own api

What goes up is staged in a temporary folder first (`staged_files` lists it): model.safetensors and
model.json as the run has them, README.md = the run's model card (deploy/card.py, written when the
run has none yet) and, unless onnx=False, model.onnx exported and verified by deploy/export.py.
Then HfApi.create_repo(exist_ok=True) and one upload_folder commit. The token, endpoint and
HF_HUB_OFFLINE are huggingface_hub's own (`hf auth login`, HF_TOKEN, HF_ENDPOINT); a missing token,
offline mode or a refused request is one line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from visionrecipe.errors import VisionRecipeError
from visionrecipe.rundir import MODEL_META, trained_run

WEIGHTS = "model.safetensors"
CARD = "README.md"  # the Hub shows a repository's README.md as its model card
ONNX = "model.onnx"


def stage(run_dir: Path, folder: Path, onnx: bool = True) -> list[str]:
    """Copy (or export) what a push uploads into `folder`; returns the file names."""
    from visionrecipe.deploy.card import CARD as RUN_CARD, write_model_card

    for name in (WEIGHTS, MODEL_META):
        shutil.copy2(run_dir / name, folder / name)
    card = run_dir / RUN_CARD
    shutil.copy2(card if card.is_file() else write_model_card(run_dir), folder / CARD)
    if onnx:
        from visionrecipe.deploy.export import export_model

        export_model(run_dir, format="onnx", out=folder / ONNX)
    return sorted(p.name for p in folder.iterdir())


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 - a lazy attribute of the package otherwise
    except ImportError:
        raise VisionRecipeError("push needs huggingface_hub: pip install 'visionrecipe[hub]'") from None
    return huggingface_hub


def push(run_dir: str | Path, repo_id: str, *, private: bool = False, onnx: bool = True, api=None) -> dict:
    """Create (or reuse) `repo_id` on the Hub and upload the run's files in one commit; returns
    {"url", "repo_id", "files", "private"}. `api`: an HfApi or anything with its create_repo and
    upload_folder (tests record the calls)."""
    hub = _hub()
    run_dir = trained_run(run_dir)
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise VisionRecipeError(f"repo id {repo_id!r}: expected NAME or OWNER/NAME")
    if hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise VisionRecipeError("HF_HUB_OFFLINE is set: push needs the network (unset it to upload)")
    api = api if api is not None else hub.HfApi()
    if not (getattr(api, "token", None) or hub.get_token()):
        raise VisionRecipeError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token that may write)")
    with tempfile.TemporaryDirectory(prefix="visionrecipe-push-") as tmp:
        files = stage(run_dir, Path(tmp), onnx=onnx)
        try:
            repo = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
            api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=tmp, repo_type="model",
                              commit_message=f"visionrecipe push of {run_dir.name}")
        except Exception as exc:  # HTTP errors (httpx or requests), offline mode, a refused token
            lines = str(exc).strip().splitlines()
            raise VisionRecipeError(f"push to {repo_id} failed: {lines[0] if lines else type(exc).__name__}") from None
    return {"url": str(repo), "repo_id": getattr(repo, "repo_id", repo_id), "files": files, "private": private}
