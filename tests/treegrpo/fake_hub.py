"""A loopback fake of the Hugging Face Hub for offline tests: the few routes huggingface_hub 2.4 uses to create a
repo, commit files and download them (stdlib `http.server` on 127.0.0.1, threaded, files in a temp folder).

Point a process at it with `HF_ENDPOINT=hub.url` (set before huggingface_hub is imported) and a token from
`hub.tokens`. Model repos only; regular (non-LFS) uploads only: the preupload route answers `uploadMode: "regular"`,
so even large files travel base64-encoded inside the commit.

Example:

```py
>>> with FakeHub(tmp_path) as hub:
...     env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token}
...     ...  # run `treegrpo push` in a subprocess with env, then read hub.file("user/repo", "README.md")
```
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"
ROUTES = [  # (method, pattern, handler name); first match wins
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("POST", rf"/api/models/{REPO}/preupload/{REV}", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/{REV}", "commit"),
    ("POST", rf"/api/models/{REPO}/branch/{REV}", "create_branch"),
    ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/models/{REPO}/revision/{REV}", "model_info"),
    ("GET", rf"/api/models/{REPO}", "model_info"),
    ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
]


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch → commit sha
    commits: dict[str, dict[str, str]] = field(default_factory=dict)  # commit sha → {path: blob sha}


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """The fake Hub: `url`, `token` (valid, user `user`), `requests` (method, path) seen, `repos`, and `file()` to
    read what was committed."""

    def __init__(self, root: Path, tokens: dict[str, str] | None = None):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = tokens or {"hf_fake_write_token": "user"}
        self.token = next(iter(self.tokens))
        self.repos: dict[str, Repo] = {}
        self.gated: set[str] = set()  # repo ids whose licence the caller has not accepted (403 GatedRepo)
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- reading what was committed (tests) -------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, str]:
        repo = self._repo(repo_id)
        return dict(repo.commits[self._commit(repo, revision)])

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return (self.root / "blobs" / self.files(repo_id, revision)[path]).read_bytes()

    # ---- state ------------------------------------------------------------------------------------------------------
    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _commit(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _user(self, headers, *, required: bool) -> str | None:
        auth = headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        if token is not None and token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        if required and token is None:
            raise HubError(401, "You must be authenticated to access this resource")
        return self.tokens.get(token) if token else None

    def _readable(self, repo_id: str, headers) -> Repo:
        user = self._user(headers, required=False)
        if repo_id in self.gated:
            raise HubError(403, f"Access to model {repo_id} is restricted. You must have access to it and be "
                                "authenticated to access it. Please log in.", "GatedRepo")
        repo = self._repo(repo_id)
        if repo.private and user != repo_id.split("/")[0]:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, headers) -> Repo:
        user = self._user(headers, required=True)
        repo = self._repo(repo_id)
        if user != repo_id.split("/")[0]:
            raise HubError(403, f"You don't have the rights to create a commit in {repo_id}")
        return repo

    # ---- routes: each returns (status, json body or bytes, extra headers) -------------------------------------------
    def create_repo(self, req, body):
        user = self._user(req.headers, required=True)
        data = json.loads(body)
        repo_id = f"{data.get('organization') or user}/{data['name']}"
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {repo_id}")
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        sha = self._new_commit_sha(repo_id, {})
        self.repos[repo_id] = Repo(private=data.get("visibility") == "private" or bool(data.get("private")),
                                   branches={"main": sha}, commits={sha: {}})
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def validate_yaml(self, req, body):
        content = json.loads(body)["content"]
        if content.startswith("---") and content.count("\n---") < 1:
            return 400, {"error": "YAML front matter is not closed"}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def whoami(self, req, body):
        user = self._user(req.headers, required=True)
        token = {"displayName": "test", "role": "write"}
        return 200, {"type": "user", "name": user, "auth": {"type": "access_token", "accessToken": token}}, {}

    def agent_harnesses(self, req, body):  # huggingface_hub's user-agent registry: empty = detection off
        return 200, {"standardEnvVars": [], "harnesses": {}}, {}

    def preupload(self, req, body, repo, rev):
        files = self.files(repo, rev) if rev in self._writable(repo, req.headers).branches else {}
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
                  for f in json.loads(body)["files"]]
        return 200, {"files": answer, "commitOid": self._repo(repo).branches.get(rev)}, {}

    def commit(self, req, body, repo, rev):
        state = self._writable(repo, req.headers)
        tree = dict(state.commits[self._commit(state, rev)])
        summary = ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                    value["content"].encode()
                tree[value["path"]] = self._store(data)
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                tree = {p: s for p, s in tree.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"the fake hub does not support {key!r} operations (LFS, copies)")
        sha = self._new_commit_sha(repo, tree, summary)
        state.commits[sha] = tree
        state.branches[rev] = sha
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo}/commit/{sha}",
                     "commitMessage": summary, "pullRequestUrl": None}, {}

    def create_branch(self, req, body, repo, rev):
        state = self._writable(repo, req.headers)
        if rev in state.branches:
            return 409, {"error": f"Reference refs/heads/{rev} already exists"}, {}
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        state.branches[rev] = self._commit(state, start)
        return 200, {}, {}

    def model_info(self, req, body, repo, rev="main"):
        state = self._readable(repo, req.headers)
        sha = self._commit(state, rev)
        siblings = [{"rfilename": p} for p in sorted(state.commits[sha])]
        return 200, {"id": repo, "modelId": repo, "sha": sha, "private": state.private, "siblings": siblings,
                     "tags": [], "downloads": 0, "likes": 0, "author": repo.split("/")[0]}, {}

    def tree(self, req, body, repo, rev, path=None):
        state = self._readable(repo, req.headers)
        files = state.commits[self._commit(state, rev)]
        prefix = (path or "").strip("/")
        entries = []
        for name in sorted(files):
            if prefix and not name.startswith(prefix + "/"):
                continue
            blob = self.root / "blobs" / files[name]
            entries.append({"type": "file", "path": name, "oid": files[name], "size": blob.stat().st_size})
        return 200, entries, {}

    def resolve(self, req, body, repo, rev, path):
        state = self._readable(repo, req.headers)
        sha = self._commit(state, rev)
        if path not in state.commits[sha]:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        blob = state.commits[sha][path]
        data = (self.root / "blobs" / blob).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob}"', "Content-Type": "application/octet-stream"}
        return 200, data, headers

    def _store(self, data: bytes) -> str:
        sha = git_blob_sha(data)
        (self.root / "blobs" / sha).write_bytes(data)
        return sha

    def _new_commit_sha(self, repo: str, tree: dict, summary: str = "") -> str:
        seed = json.dumps([repo, sorted(tree.items()), summary, sum(len(r.commits) for r in self.repos.values())])
        return hashlib.sha1(seed.encode()).hexdigest()


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _dispatch(self):
            path = unquote(urlsplit(self.path).path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            hub.requests.append((self.command, path))
            route = next(((name, m) for method, pattern, name in ROUTES
                          if method == self.command and (m := re.fullmatch(pattern, path))), None)
            if route is None:
                return self._send(404, {"error": f"fake hub: no route for {self.command} {path}"}, {})
            name, match = route
            try:
                with hub.lock:
                    kwargs = {k: v for k, v in match.groupdict().items() if v is not None}
                    status, payload, headers = getattr(hub, name)(self, body, **kwargs)
            except HubError as err:
                headers = {"X-Error-Code": err.code} if err.code else {}
                status, payload = err.status, {"error": err.message}
                headers["X-Error-Message"] = err.message
            self._send(status, payload, headers)

        def _send(self, status, payload, headers):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            if not isinstance(payload, bytes):
                self.send_header("Content-Type", "application/json")
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_HEAD = _dispatch

    return Handler
