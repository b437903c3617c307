"""Tests for `seqrank.data.download` against a local in-memory HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from seqrank.data import download as dl
from seqrank.data.download import DownloadError, RemoteFile, download, download_file, main

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class ServerState:
    """What the test server serves and how it misbehaves; records every request."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[dict[str, str | None]] = field(default_factory=list)
    cut_after: int | None = None  # send this many body bytes, then drop the connection
    cuts_left: int = 0  # how many responses get cut
    ignore_range: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    state: ServerState  # set on a per-server subclass

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state = self.state
        with state.lock:
            state.requests.append({"path": self.path, "range": self.headers.get("Range")})
            cut = state.cut_after if state.cuts_left > 0 else None
            if cut is not None:
                state.cuts_left -= 1
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        size = len(body)
        range_header = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = min(end, size - 1)
            chunk = body[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            chunk = body
            self.send_response(200)
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if cut is not None and cut < len(chunk):
            self.wfile.write(chunk[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(chunk)


@dataclass
class Server:
    state: ServerState
    base: str

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)
    state = ServerState(files={"/files/data.bin": PAYLOAD})
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield Server(state=state, base=f"http://{host}:{port}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _remote(server: Server, **kwargs: object) -> RemoteFile:
    return RemoteFile(url=server.url("/files/data.bin"), filename="data.bin", **kwargs)  # type: ignore[arg-type]


def _fetch(remote: RemoteFile, dest: Path, **kwargs: object) -> Path:
    opts: dict[str, object] = {"progress": False, "timeout": 5, "chunk_size": 16_384}
    opts.update(kwargs)
    return download_file(remote, dest, **opts)  # type: ignore[arg-type]


def test_full_download_verifies_size_and_sha(server: Server, tmp_path: Path) -> None:
    path = _fetch(_remote(server, size=len(PAYLOAD), sha256=SHA), tmp_path, progress=True)
    assert path == tmp_path / "data.bin"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "data.bin.part").exists()
    assert server.state.requests == [{"path": "/files/data.bin", "range": None}]


def test_unpinned_download_checks_content_length_and_prints_sha(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _fetch(_remote(server), tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert SHA in capsys.readouterr().err


def test_resume_existing_part(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "data.bin.part"
    part.write_bytes(PAYLOAD[:123_457])
    path = _fetch(_remote(server, sha256=SHA), tmp_path)
    assert server.state.requests[0]["range"] == "bytes=123457-"
    assert len(server.state.requests) == 1
    assert path.read_bytes() == PAYLOAD
    assert not part.exists()


def test_complete_part_accepted_on_416(server: Server, tmp_path: Path) -> None:
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    path = _fetch(_remote(server), tmp_path)
    assert server.state.requests[0]["range"] == f"bytes={len(PAYLOAD)}-"
    assert path.read_bytes() == PAYLOAD


def test_cut_connection_is_resumed_by_retry(server: Server, tmp_path: Path) -> None:
    server.state.cut_after = 100_000
    server.state.cuts_left = 1
    path = _fetch(_remote(server, size=len(PAYLOAD), sha256=SHA), tmp_path, retries=2)
    assert path.read_bytes() == PAYLOAD
    ranges = [r["range"] for r in server.state.requests]
    assert ranges[0] is None
    assert len(ranges) == 2
    assert ranges[1] is not None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 100_000


def test_final_name_absent_while_incomplete(server: Server, tmp_path: Path) -> None:
    server.state.cut_after = 50_000
    server.state.cuts_left = 1
    with pytest.raises(DownloadError, match="data.bin"):
        _fetch(_remote(server, sha256=SHA), tmp_path, retries=0)
    assert not (tmp_path / "data.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin.part"]
    assert 0 < (tmp_path / "data.bin.part").stat().st_size <= 50_000
    # A later call resumes the kept part and completes.
    path = _fetch(_remote(server, sha256=SHA), tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.state.requests[-1]["range"] is not None


def test_checksum_mismatch_deletes_part(server: Server, tmp_path: Path) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DownloadError) as info:
        _fetch(_remote(server, sha256=wrong), tmp_path)
    message = str(info.value)
    assert "data.bin" in message
    assert wrong in message
    assert SHA in message
    assert not (tmp_path / "data.bin").exists()
    assert not (tmp_path / "data.bin.part").exists()


def test_size_mismatch_deletes_part(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        _fetch(_remote(server, size=len(PAYLOAD) + 1), tmp_path)
    message = str(info.value)
    assert "data.bin" in message
    assert str(len(PAYLOAD) + 1) in message
    assert str(len(PAYLOAD)) in message
    assert list(tmp_path.iterdir()) == []


def test_server_ignoring_range_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    server.state.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(b"garbage that must not survive" * 100)
    path = _fetch(_remote(server, sha256=SHA), tmp_path)
    assert server.state.requests[0]["range"] is not None
    assert path.read_bytes() == PAYLOAD


def test_present_file_is_skipped_without_request(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data.bin").write_bytes(PAYLOAD)
    path = _fetch(_remote(server, size=len(PAYLOAD), sha256=SHA), tmp_path)
    assert path == tmp_path / "data.bin"
    assert server.state.requests == []
    assert "already present" in capsys.readouterr().err


def test_mismatching_present_file_is_replaced(server: Server, tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(b"stale")
    path = _fetch(_remote(server, sha256=SHA), tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert len(server.state.requests) == 1


def test_http_error_raises_download_error(server: Server, tmp_path: Path) -> None:
    remote = RemoteFile(url=server.url("/files/missing.bin"), filename="missing.bin")
    with pytest.raises(DownloadError, match="missing.bin"):
        _fetch(remote, tmp_path)
    assert not (tmp_path / "missing.bin").exists()


def test_mirror_env_redirects_registry(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = dl.REGISTRY["electro"].files
    for remote in files:
        server.state.files[f"/mirror/amazon/{remote.filename}"] = remote.filename.encode() * 1000
    monkeypatch.setenv(dl.MIRROR_ENV, server.url("/mirror/amazon/"))
    resolved = dl.resolve_files("electro")
    assert [r.url for r in resolved] == [server.url(f"/mirror/amazon/{r.filename}") for r in files]
    paths = download("electro", tmp_path, progress=False)
    assert [p.name for p in paths] == [r.filename for r in files]
    for path in paths:
        assert path.read_bytes() == path.name.encode() * 1000
    # The registry itself keeps the upstream URLs.
    assert all(r.url.startswith(dl.AMAZON_2014_BASE) for r in files)


def test_registry_urls() -> None:
    base = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
    assert [f.url for f in dl.REGISTRY["electro"].files] == [
        base + "reviews_Electronics_5.json.gz",
        base + "meta_Electronics.json.gz",
    ]
    assert [f.url for f in dl.REGISTRY["clothing"].files] == [
        base + "reviews_Clothing_Shoes_and_Jewelry_5.json.gz",
        base + "meta_Clothing_Shoes_and_Jewelry.json.gz",
    ]
    assert dl.REGISTRY["taobao"].files == ()
    assert dl.REGISTRY["taobao"].manual_files == ("UserBehavior.csv",)


def test_cli_taobao_requires_manual_placement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["taobao", "--dest", str(tmp_path), "--no-progress"]) == 2
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert "UserBehavior.csv" in text
    assert "manually" in text
    assert str(tmp_path.resolve()) in text


def test_cli_taobao_present_file_succeeds(tmp_path: Path) -> None:
    (tmp_path / "UserBehavior.csv").write_text("1,2,3,pv,1511544070\n")
    assert main(["taobao", "--dest", str(tmp_path)]) == 0


def test_cli_list(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("electro", "clothing", "taobao"):
        assert name in out


def test_cli_unknown_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["movielens"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "electro" in err and "clothing" in err and "taobao" in err


def test_cli_download_with_mirror(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for remote in dl.REGISTRY["clothing"].files:
        server.state.files[f"/m/{remote.filename}"] = b"x" * 10
    monkeypatch.setenv(dl.MIRROR_ENV, server.url("/m"))
    assert main(["clothing", "--dest", str(tmp_path), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        r.filename for r in dl.REGISTRY["clothing"].files
    )
