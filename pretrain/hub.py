"""``medfm export --push-to-hub ORG/NAME``: upload a release folder to the Hugging Face Hub with ``huggingface_hub``.

The folder already has a Hub repo's layout (``model.safetensors``, ``config.json`` in timm's hub format, a
``README.md`` model card with ``ModelCardData`` front matter), so it is uploaded as it is, in one commit.
The repo is created private unless asked otherwise; the token is ``token``, else ``$HF_TOKEN`` or the one
``hf auth login`` stored.
"""

from __future__ import annotations

from pathlib import Path

from medfm.pretrain.errors import ReleaseError
from medfm.pretrain.weights import CONFIG_NAME, WEIGHTS_NAME

RELEASE_FILES = (WEIGHTS_NAME, CONFIG_NAME, "README.md")


class PushError(ReleaseError):
    """A release that could not be uploaded (offline, refused token, a Hub error); the message says which."""


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id that is not ORG/NAME before anything is written or sent."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--push-to-hub {repo_id!r}: expected ORG/NAME")


def push_release(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the release folder's files; returns the commit's URL."""
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    missing = [name for name in RELEASE_FILES if not (folder / name).is_file()]
    if missing:
        raise PushError(f"{folder} is not a release folder (missing {', '.join(missing)}): write it with medfm export")
    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise PushError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set (the release is written in {folder})")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=list(RELEASE_FILES),
            commit_message=commit_message or f"medfm release from {folder.name}",
        )
    except Exception as err:  # the Hub's HTTP errors, the HTTP client's network errors, offline mode
        raise PushError(f"cannot push {folder} to {repo_id}: {type(err).__name__}: {err}") from err
    return str(commit.commit_url)
