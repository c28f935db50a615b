"""`treegrpo push`: a finished run to the Hugging Face Hub in one commit (LoRA, model card, samples, reward curve,
recipe, metrics). Importing this module is cheap (no torch, no diffusers): pushing only needs `huggingface_hub`.

Example:

```py
>>> from treegrpo.hub.push import push_run
>>> url = push_run("runs/sd35m_hps", "me/sd35m-hps-treegrpo")  # needs `hf auth login` or HF_TOKEN
```
"""

from __future__ import annotations

import logging
from pathlib import Path

from treegrpo.hub.card import model_card
from treegrpo.hub.summary import LORA_WEIGHT_NAME, REPO_ID, PushError, RunSummary, read_run

logger = logging.getLogger(__name__)


def check_can_push(repo_id: str, *, token: str | None = None) -> str:
    """Fail fast (no network): `repo_id` looks like `user/name` and a token is available. Returns the token.
    The trainer calls this before training when `output.push_to_hub` is set."""
    _check_repo_id(repo_id)
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PushError("not logged in to the Hugging Face Hub: run `hf auth login` with a write token (or set "
                        "HF_TOKEN), then push again.")
    return token


def _check_repo_id(repo_id: str) -> None:
    if not REPO_ID.fullmatch(repo_id or ""):
        raise PushError(f"repo {repo_id!r}: expected a Hub repo id like 'user/name' (or 'org/name').")


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
             token: str | None = None, base_model: str | None = None) -> str:
    """Upload a finished run to the Hub in one commit and return the repo URL.

    Creates `repo_id` if needed (`private` only applies then) and, with `revision`, that branch. Uploads
    `pytorch_lora_weights.safetensors`, a model card (README.md: base model, `base_model_relation: adapter`, how it
    was trained, samples, reward curve, a usage snippet), the sample grids, the reward curve, `recipe.resolved.toml`,
    `metrics.jsonl` and `eval.jsonl`. Pushing again updates all of them. `base_model` names the Hub id of the base
    model when the run used a local folder. Raises `PushError` with what to do.
    """
    _check_repo_id(repo_id)
    summary = read_run(run_dir, base_model=base_model)
    token = check_can_push(repo_id, token=token)
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    card = model_card(summary, repo_id)
    from treegrpo.recipe.loading import dict_to_toml

    files = {"README.md": str(card).encode(), LORA_WEIGHT_NAME: summary.lora_file,
             "recipe.resolved.toml": dict_to_toml(summary.recipe).encode(), **summary.images}
    for log in ("metrics.jsonl", "eval.jsonl"):  # the rollout rewards per epoch; the evaluations (ODE samples)
        if (summary.run_dir / log).is_file():
            files[log] = summary.run_dir / log
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=value if isinstance(value, bytes)
                                     else str(value)) for name, value in files.items()]
    api = HfApi(token=token)
    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=_commit_message(summary), revision=revision)
    except HfHubHTTPError as err:
        raise PushError(_http_message(err, repo_id, api.endpoint)) from None
    except (OSError, ValueError, *_http_library_errors()) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PushError(f"could not push to {api.endpoint}: {first}. Check the network (and HF_ENDPOINT / "
                        "HF_HUB_OFFLINE), then push again.") from None
    return f"{url.rstrip('/')}/tree/{revision}" if revision else url


def _http_library_errors() -> tuple[type[Exception], ...]:
    """The base errors of the HTTP clients huggingface_hub may use (httpx in 1.x, httpx2 in 2.x, requests before):
    connection failures raise these, not `HfHubHTTPError`."""
    import importlib
    import importlib.util

    return tuple(importlib.import_module(name).HTTPError for name in ("httpx", "httpx2", "requests")
                 if importlib.util.find_spec(name) is not None)


def push_after_training(output_dir: str | Path, repo: str, *, token: str | None = None) -> str:
    """`output.push_to_hub`: push the finished run (call on the main process only). Returns the URL; a
    `PushError` says the run itself is complete and how to retry."""
    try:
        url = push_run(output_dir, repo, token=token)
    except PushError as err:
        raise PushError(f"{err} The run itself is complete; retry with `treegrpo push {output_dir} --repo "
                        f"{repo}`.") from None
    logger.info("pushed %s to %s", output_dir, url)
    return url


def _commit_message(summary: RunSummary) -> str:
    values = [m["reward/mean"] for m in summary.metrics if "reward/mean" in m]
    detail = f", reward/mean {values[0]:.4g} -> {values[-1]:.4g}" if values else ""
    return f"treegrpo push: {summary.run_dir.name} ({len(summary.metrics)} epochs{detail})"


def _http_message(err, repo_id: str, endpoint: str) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return (f"the Hub at {endpoint} rejected the token (401): log in again with `hf auth login` using a token "
                "with write access (or fix HF_TOKEN), then push again.")
    if status == 403:
        return (f"no write access to {repo_id} (403): push to your own namespace, or use a token with write access "
                f"to {repo_id.split('/')[0]}.")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"the Hub at {endpoint} refused the push ({status}): {first}"


