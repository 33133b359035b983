"""Uploads to the Hub: a finished local folder (an export, a generated dataset) goes up as it is.

`push_folder` creates the repository when needed and uploads the folder with `huggingface_hub`, so what is on
the Hub is what was written and checked locally. The token comes from the environment (HF_TOKEN) or
`hf auth login`, the endpoint from HF_ENDPOINT (read at call time); the token is never printed. A failure is
one `MirageError` line that says the local folder is complete.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MirageError
from .folders import MARKER


def push_folder(
    folder,
    repo_id: str,
    *,
    repo_type: str = "model",
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload `folder` to the `repo_type` repo `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi, get_token

    folder = Path(folder)
    where = f"the {'dataset' if repo_type == 'dataset' else 'export'} is complete in {folder}"
    token = get_token()
    if not token:
        raise MirageError(
            f"--push-to-hub {repo_id}: no Hub token (set HF_TOKEN or run `hf auth login`); {where}"
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    what = "dataset" if repo_type == "dataset" else "Mirage model"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            repo_type=repo_type,
            ignore_patterns=[MARKER],  # the local folder's bookkeeping, not the upload's
            commit_message=commit_message or f"Upload {what} ({folder.name}) with mirage-trl",
        )
    except Exception as exc:  # network, auth, permissions: the local folder stays as it is
        first = (str(exc).splitlines() or [""])[0].replace(token, "***")
        raise MirageError(
            f"--push-to-hub {repo_id}: upload failed ({type(exc).__name__}: {first}); {where}"
        ) from None
    return str(getattr(info, "commit_url", info))
