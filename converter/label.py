"""``edge-convert label DIR``: a small local web page to sort crops into one folder per class.

The page shows the images lying directly in ``DIR`` (unsorted: what ``edge-daemon collect``
saved for one region) as a grid, and the class sub-folders with how many images each holds.
Click an image (or take the first), then click a class or press its number key: the file moves
into ``DIR/<class>/``, the layout ``edge-convert train`` reads. A new class is one sub-folder
more; undo (``u``) moves the last image back.

It listens on 127.0.0.1 by default. Only requests whose ``Host`` is the address it listens on
are answered (a web page elsewhere cannot reach it through a DNS name of its own), and changes
are only accepted as JSON (which another site's page cannot send here without the browser
asking first, and nothing here says yes), so a page in the same browser cannot sort your files.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from converter.datasets import IMAGE_SUFFIXES
from converter.errors import BadInputError, InputMissingError

log = logging.getLogger(__name__)

CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
#: The most unsorted images the page lists at once (the rest come as these are sorted).
PAGE_SIZE = 500


class Sorter:
    """The folder being sorted: what is unsorted, the classes, and moves that can be undone."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise InputMissingError(f"{root} is not a folder: give the folder of crops to sort")
        self.root = root
        self._lock = threading.Lock()
        self._done: list[tuple[str, str]] = []  # (class, file name) of each move, for undo

    def unsorted(self) -> list[str]:
        """Image files lying directly in the folder, by name."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _plain_file(p) and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )

    def classes(self) -> dict[str, int]:
        """Class sub-folders and how many images each holds."""
        return {
            d.name: sum(1 for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            for d in sorted(self.root.iterdir())
            if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")
        }

    def state(self) -> dict[str, Any]:
        """What the page shows."""
        files = self.unsorted()
        return {
            "folder": self.root.name,
            "unsorted": files[:PAGE_SIZE],
            "unsorted_count": len(files),
            "classes": self.classes(),
            "can_undo": bool(self._done),
        }

    def add_class(self, name: str) -> None:
        """A new class: one sub-folder more."""
        if not CLASS_NAME.match(name):
            raise BadInputError(
                "a class name is 1 to 64 letters, digits, '-' or '_', starting with a letter "
                "or digit"
            )
        (self.root / name).mkdir(exist_ok=True)

    def assign(self, file: str, name: str) -> None:
        """Move an unsorted image into a class's folder."""
        with self._lock:
            if file not in self.unsorted():
                raise BadInputError(f"{file!r} is not an unsorted image here")
            if name not in self.classes():
                raise BadInputError(f"no class {name!r}: add it first")
            target = self.root / name / file
            if target.exists():  # never over another image
                raise BadInputError(f"{name}/{file} exists already: rename one of them")
            (self.root / file).replace(target)
            self._done.append((name, file))

    def undo(self) -> str | None:
        """Move the last sorted image back; its name, or None when there is nothing to undo.
        A last move that cannot be undone (the file moved on since) is said, never skipped
        for an older one."""
        with self._lock:
            if not self._done:
                return None
            name, file = self._done[-1]
            source = self.root / name / file
            if not _plain_file(source) or (self.root / file).exists():
                self._done.pop()
                raise BadInputError(f"{name}/{file} cannot be moved back: it changed since")
            source.replace(self.root / file)
            self._done.pop()
            return file


def _plain_file(path: Path) -> bool:
    """A regular file, not a link (a link could lead out of the folder)."""
    return path.is_file() and not path.is_symlink()


def _handler(sorter: Sorter, allowed_hosts: set[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edge-convert-label"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

        def _host_ok(self) -> bool:
            if self.headers.get("Host", "") in allowed_hosts:
                return True
            self._send(HTTPStatus.FORBIDDEN, b"forbidden host\n", "text/plain")
            return False

        def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, payload: dict[str, Any], status: HTTPStatus = HTTPStatus.OK) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:
            if not self._host_ok():
                return
            path = unquote(self.path.split("?", 1)[0])
            if path == "/":
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/state":
                self._json(sorter.state())
            elif path.startswith("/img/"):
                name = path.removeprefix("/img/")
                if name not in sorter.unsorted():  # a direct child, by its exact name
                    self._send(HTTPStatus.NOT_FOUND, b"no such image\n", "text/plain")
                    return
                kind = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
                self._send(HTTPStatus.OK, (sorter.root / name).read_bytes(), kind)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

        def do_POST(self) -> None:
            if not self._host_ok():
                return
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                self._json({"error": "send JSON"}, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= 4096:
                self._json(
                    {"error": "give a JSON body of at most 4096 bytes"}, HTTPStatus.BAD_REQUEST
                )
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise BadInputError("send a JSON object")
                if self.path == "/api/assign":
                    sorter.assign(str(body.get("file", "")), str(body.get("class", "")))
                elif self.path == "/api/class":
                    sorter.add_class(str(body.get("name", "")))
                elif self.path == "/api/undo":
                    sorter.undo()
                else:
                    self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
                    return
            except (BadInputError, ValueError) as exc:
                self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
                return
            except OSError as exc:
                self._json({"error": f"cannot move the file: {exc.strerror}"}, HTTPStatus.CONFLICT)
                return
            self._json(sorter.state())

    return Handler


def serve(root: Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """The labelling page's server for ``root``, bound and ready (call ``serve_forever``)."""
    sorter = Sorter(root)
    server = ThreadingHTTPServer((host, port), _handler(sorter, set()))
    bound = server.server_address[1]
    names = {host, "localhost", "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {host}
    allowed = {f"{name}:{bound}" for name in names}
    server.RequestHandlerClass = _handler(sorter, allowed)
    return server


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>edge-convert label</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #1d1f21; color: #e8e8e8; }
 header { position: sticky; top: 0; background: #2a2d30; padding: 10px 14px; z-index: 1; }
 h1 { font-size: 16px; margin: 0 0 8px 0; font-weight: 600; }
 #classes button { margin: 0 6px 6px 0; padding: 6px 10px; font-size: 14px; border-radius: 6px;
   border: 1px solid #5a8; background: #244; color: #e8e8e8; cursor: pointer; }
 #classes button .key { color: #9cd; margin-right: 6px; }
 #tools { display: flex; gap: 8px; align-items: center; }
 #tools input { padding: 5px; border-radius: 5px; border: 1px solid #777; background: #111;
   color: #eee; }
 #status { margin-left: auto; font-size: 13px; color: #bbb; }
 #grid { display: flex; flex-wrap: wrap; gap: 8px; padding: 14px; }
 #grid img { width: 112px; height: 112px; object-fit: contain; image-rendering: pixelated;
   background: #000; border: 3px solid transparent; border-radius: 4px; cursor: pointer; }
 #grid img.selected { border-color: #fc4; }
 #message { color: #f88; font-size: 13px; min-height: 1em; }
</style></head>
<body>
<header>
 <h1 id="title">Sort crops</h1>
 <div id="classes"></div>
 <div id="tools">
  <input id="newclass" placeholder="new class name" maxlength="64">
  <button id="add">Add class</button>
  <button id="undo">Undo (u)</button>
  <span id="status"></span>
 </div>
 <div id="message"></div>
</header>
<div id="grid"></div>
<script>
"use strict";
let state = null, selected = null;
async function call(path, body) {
  const options = body === undefined ? {} : {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json();
  document.getElementById("message").textContent = response.ok ? "" : data.error;
  if (response.ok) { state = data; render(); }
}
function render() {
  document.getElementById("title").textContent =
    state.folder + ": " + state.unsorted_count + " unsorted";
  const classes = document.getElementById("classes");
  classes.replaceChildren();
  Object.entries(state.classes).forEach(([name, count], i) => {
    const b = document.createElement("button");
    b.dataset.cls = name;
    const key = document.createElement("span");
    key.className = "key"; key.textContent = i < 9 ? String(i + 1) : "";
    b.append(key, name + " (" + count + ")");
    b.onclick = () => assign(name);
    classes.append(b);
  });
  const grid = document.getElementById("grid");
  grid.replaceChildren();
  if (!state.unsorted.includes(selected)) selected = state.unsorted[0] || null;
  for (const name of state.unsorted) {
    const img = document.createElement("img");
    img.src = "/img/" + encodeURIComponent(name);
    img.alt = name; img.title = name; img.dataset.file = name;
    if (name === selected) img.className = "selected";
    img.onclick = () => { selected = name; render(); };
    grid.append(img);
  }
  document.getElementById("status").textContent = Object.entries(state.classes)
    .map(([n, c]) => n + ": " + c).join(", ");
}
function assign(name) { if (selected) call("/api/assign", {file: selected, class: name}); }
function addClass() {
  const input = document.getElementById("newclass");
  if (input.value.trim()) call("/api/class", {name: input.value.trim()});
  input.value = "";
}
document.getElementById("add").onclick = addClass;
document.getElementById("undo").onclick = () => call("/api/undo", {});
document.getElementById("newclass").onkeydown = e => {
  if (e.key === "Enter") addClass();
  e.stopPropagation();
};
document.onkeydown = e => {
  if (e.key === "u") { call("/api/undo", {}); return; }
  const n = Number(e.key);
  const names = Object.keys(state ? state.classes : {});
  if (n >= 1 && n <= names.length) assign(names[n - 1]);
};
call("/api/state");
</script>
</body></html>
"""
