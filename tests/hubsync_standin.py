"""A local stand-in for the Hugging Face Hub's HTTP API: just what huggingface_hub 0.3x-2.x calls for
create_repo, file_exists, upload_folder (regular, non-LFS files), snapshot_download and
hf_hub_download, and whoami. It binds 127.0.0.1; tests point huggingface_hub at it through the
``endpoint`` argument or ``huggingface_hub.constants.ENDPOINT``. Repos live in memory.

Routes (the Hub's own): POST /api/repos/create, POST /api/validate-yaml,
POST /api/{type}s/{repo}/preupload/{rev}, POST /api/{type}s/{repo}/commit/{rev} (NDJSON),
GET /api/{type}s/{repo}[/revision/{rev}], GET /api/{type}s/{repo}/tree/{rev},
HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}, GET /api/whoami-v2.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    def __init__(self, user: str = "me"):
        self.user = user
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}  # (type, id) -> path -> bytes
        self.commits: list[dict[str, Any]] = []
        self.log: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def send(
                self,
                status: int,
                payload: Any = b"",
                headers: dict[str, str] | None = None,
                head: bool = False,
            ) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def do_HEAD(self) -> None:  # noqa: N802
                outer.route(self, "HEAD")

            def do_GET(self) -> None:  # noqa: N802
                outer.route(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                outer.route(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> None:
        self.repos[(repo_type, repo_id)] = dict(files)

    @staticmethod
    def sha(files: dict[str, bytes]) -> str:
        digest = hashlib.sha1()
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path] + b"\0")
        return digest.hexdigest()

    def route(self, h: Any, method: str) -> None:
        path = unquote(urlparse(h.path).path)
        self.log.append((method, h.path))
        head = method == "HEAD"

        def not_found(code: str = "RepoNotFound") -> None:
            h.send(404, {"error": code}, {"X-Error-Code": code}, head)

        if method == "GET" and path == "/api/whoami-v2":
            return h.send(200, {"name": self.user, "type": "user"})
        if method == "POST" and path == "/api/validate-yaml":
            h.body()
            return h.send(200, {"errors": [], "warnings": []})
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(h.body())
            key = (
                body.get("type") or "model",
                f"{body.get('organization') or self.user}/{body['name']}",
            )
            if key in self.repos:
                return h.send(
                    409,
                    {
                        "error": "You already created this repo",
                        "url": f"{self.url}/{key[0]}s/{key[1]}",
                    },
                )
            self.repos[key] = {}
            return h.send(200, {"url": f"{self.url}/{key[0]}s/{key[1]}"})
        m = re.fullmatch(r"/api/(dataset|model)s/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
        if method == "POST" and m:
            key = (m[1], m[2])
            if key not in self.repos:
                return not_found()
            body = h.body()
            if m[3] == "preupload":
                files = json.loads(body)["files"]
                return h.send(
                    200,
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in files
                        ]
                    },
                )
            files = dict(self.repos[key])
            header: dict[str, Any] = {}
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
            self.repos[key] = files
            self.commits.append(
                {"repo": key, "summary": header.get("summary"), "files": sorted(files)}
            )
            sha = self.sha(files)
            return h.send(
                200,
                {
                    "commitUrl": f"{self.url}/{m[1]}s/{m[2]}/commit/{sha}",
                    "commitOid": sha,
                    "pullRequestUrl": None,
                },
            )
        m = re.fullmatch(r"/api/(dataset|model)s/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if method == "GET" and m:
            files = self.repos.get((m[1], m[2]))
            if files is None:
                return not_found()
            return h.send(200, {"id": m[2], "sha": self.sha(files), "private": False,
                                "siblings": [{"rfilename": p} for p in sorted(files)]})  # fmt: skip
        m = re.fullmatch(r"/api/(dataset|model)s/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if method == "GET" and m:
            files = self.repos.get((m[1], m[2]))
            if files is None:
                return not_found()
            return h.send(
                200,
                [
                    {"type": "file", "path": p, "size": len(d), "oid": git_blob_id(d)}
                    for p, d in sorted(files.items())
                ],
            )
        m = re.fullmatch(r"/(?:(dataset)s/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            files = self.repos.get((m[1] or "model", m[2]))
            if files is None:
                return not_found()
            if m[4] not in files:
                return not_found("EntryNotFound")
            data = files[m[4]]
            headers = {
                "X-Repo-Commit": self.sha(files),
                "ETag": f'"{git_blob_id(data)}"',
                "Content-Type": "application/octet-stream",
            }
            return h.send(200, data, headers, head)
        return h.send(
            404,
            {"error": f"the stand-in does not know {method} {path}"},
            {"X-Error-Code": "RepoNotFound"},
            head,
        )
