"""A local stand-in for the Hugging Face Hub (127.0.0.1, a free port) for the interop tests:
the revision and tree APIs and HEAD/GET of resolve URLs with the headers huggingface_hub reads
(X-Repo-Commit, X-Linked-Etag, X-Linked-Size, ETag), LFS files redirected to a storage URL.
The fault cases are tested in C++ against tests/mock_hub.cpp; here both clients meet one
server so that each can read what the other wrote into the cache."""

import hashlib
import http.server
import json
import pathlib
import threading
import urllib.parse


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class MockHub:
    def __init__(self):
        self.repos = {}  # repo_id -> {"commit": str, "files": {path: bytes}, "lfs": set}
        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        # Storage on another host name, as on the real Hub (clients follow same-host redirects).
        self.storage = f"http://localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def add_folder(self, repo_id: str, commit: str, folder: pathlib.Path, prefix: str):
        repo = self.repos.setdefault(repo_id, {"commit": commit, "files": {}, "lfs": set()})
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                path = f"{prefix}/{f.relative_to(folder).as_posix()}" if prefix else f.relative_to(folder).as_posix()
                repo["files"][path] = f.read_bytes()
                if f.suffix in (".safetensors", ".model"):
                    repo["lfs"].add(path)

    def _reply(self, h, status, headers=(), body=b"", head=False):
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, status, code, message, head, extra=()):
        body = json.dumps({"error": message}).encode()
        self._reply(h, status, [("X-Error-Code", code), ("X-Error-Message", message), *extra], body, head)

    def _serve(self, h, head):
        self.requests.append((h.command, h.path))
        url = urllib.parse.urlsplit(h.path)
        seg = url.path.strip("/").split("/")
        if seg[:2] == ["api", "models"] and len(seg) >= 5:
            repo_id = f"{seg[2]}/{seg[3]}"
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._error(h, 401, "RepoNotFound", "Repository not found", head)
            rev = urllib.parse.unquote(seg[5]) if len(seg) > 5 else ""
            if rev not in ("main", repo["commit"]):
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            if seg[4] == "revision":
                body = {"id": repo_id, "sha": repo["commit"], "siblings": [{"rfilename": p} for p in repo["files"]]}
            else:  # tree/<rev>[/<folder>]
                folder = urllib.parse.unquote("/".join(seg[6:]))
                body = []
                for p, data in repo["files"].items():
                    if folder and not p.startswith(folder + "/"):
                        continue
                    e = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
                    if p in repo["lfs"]:
                        e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    body.append(e)
            return self._reply(h, 200, [("Content-Type", "application/json")], json.dumps(body).encode(), head)
        if len(seg) >= 5 and seg[2] == "resolve":
            repo_id = f"{seg[0]}/{seg[1]}"
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._error(h, 401, "RepoNotFound", "Repository not found", head)
            rev, path = urllib.parse.unquote(seg[3]), urllib.parse.unquote("/".join(seg[4:]))
            if rev not in ("main", repo["commit"]):
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            data = repo["files"].get(path)
            if data is None:
                return self._error(h, 404, "EntryNotFound", "Entry not found", head, [("X-Repo-Commit", repo["commit"])])
            if path in repo["lfs"]:
                sha = hashlib.sha256(data).hexdigest()
                return self._reply(h, 302, [("X-Repo-Commit", repo["commit"]), ("X-Linked-Etag", f'"{sha}"'),
                                            ("X-Linked-Size", str(len(data))), ("ETag", f'"{git_blob_sha1(sha.encode())}"'),
                                            ("Location", f"{self.storage}/storage/{repo_id}/{sha}")], b"", head)
            return self._reply(h, 200, [("X-Repo-Commit", repo["commit"]), ("ETag", f'"{git_blob_sha1(data)}"')], data, head)
        if seg[0] == "storage" and len(seg) == 4:
            repo = self.repos.get(f"{seg[1]}/{seg[2]}", {"files": {}})
            for data in repo["files"].values():
                if hashlib.sha256(data).hexdigest() == seg[3]:
                    return self._reply(h, 200, [("Accept-Ranges", "bytes")], data, head)
        return self._error(h, 404, "NotFound", "no route", head)
