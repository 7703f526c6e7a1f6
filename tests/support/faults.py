"""Proxies on 127.0.0.1 in front of the moto server, for S3 faults with the server itself (and its state) intact.

`FaultyS3Proxy` answers some requests itself with S3's throttling (503 SlowDown) or an internal error (500), the way
a busy store does, and forwards the rest unchanged. `CuttingProxy` works below HTTP: it cuts connections part-way
through a request body, or goes down altogether, as a server that dies mid-PUT does.

It speaks just enough HTTP/1.1 for the S3 clients here (boto3 and pyarrow's AWS C++ SDK): keep-alive, bodies by
Content-Length or chunked, HEAD without a body. Every request it fails is counted, so a test can show that the
faults happened and the job still ended complete.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading

SLOW_DOWN = (503, "SlowDown", "Please reduce your request rate.")
INTERNAL = (500, "InternalError", "We encountered an internal error. Please try again.")


def _read_line(stream) -> bytes:
    line = stream.readline(65537)
    if not line:
        raise ConnectionError("closed")
    return line


def _read_head(stream) -> tuple[bytes, list[tuple[str, str]]]:
    start = _read_line(stream)
    headers = []
    while (line := _read_line(stream)) not in (b"\r\n", b"\n"):
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return start, headers


def _read_body(stream, headers: list[tuple[str, str]]) -> bytes:
    """The body as it was framed (chunked bodies keep their chunk lines)."""
    fields = {k.lower(): v for k, v in headers}
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line = _read_line(stream)
            body += size_line
            if int(size_line.split(b";")[0].strip(), 16) == 0:
                while (trailer := _read_line(stream)) not in (b"\r\n", b"\n"):
                    body += trailer
                return body + b"\r\n"
            body += stream.read(int(size_line.split(b";")[0].strip(), 16) + 2)
    length = int(fields.get("content-length", "0"))
    return stream.read(length) if length else b""


def _read_response(stream, method: str) -> tuple[bytes, list[tuple[str, str]], bytes]:
    start, headers = _read_head(stream)
    status = start.split(b" ", 2)[1]
    if method == "HEAD" or status in (b"204", b"304"):
        return start, headers, b""
    return start, headers, _read_body(stream, headers)


def _frame(start: bytes, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)
    return start + head + b"\r\n" + body


class FaultyS3Proxy:
    """`fail_first` requests, then every `fail_every`-th one, are answered with an S3 error instead of forwarded."""

    def __init__(self, upstream: str, fail_first: int = 0, fail_every: int = 0, error=SLOW_DOWN) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.fail_first, self.fail_every, self.error = fail_first, fail_every, error
        self.lock = threading.Lock()
        self.requests = 0
        self.failed = 0
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.rfile, self.wfile)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _should_fail(self) -> bool:
        with self.lock:
            self.requests += 1
            fail = self.requests <= self.fail_first or (self.fail_every and self.requests % self.fail_every == 0)
            self.failed += bool(fail)
            return bool(fail)

    def _serve(self, rfile, wfile) -> None:
        upstream = None
        try:
            while True:
                start, headers = _read_head(rfile)
                if any(k.lower() == "expect" for k, _ in headers):  # boto3 waits for "100 Continue" to send a body
                    wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    wfile.flush()
                    headers = [(k, v) for k, v in headers if k.lower() != "expect"]
                body = _read_body(rfile, headers)
                if self._should_fail():
                    wfile.write(self._error_response())
                    wfile.flush()
                    continue
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    upstream_r = upstream.makefile("rb")
                upstream.sendall(_frame(start, headers, body))
                wfile.write(_frame(*_read_response(upstream_r, start.split(b" ", 1)[0].decode())))
                wfile.flush()
        except (ConnectionError, OSError, ValueError, IndexError):
            pass
        finally:
            if upstream is not None:
                upstream.close()

    def _error_response(self) -> bytes:
        status, code, message = self.error
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>phi2sum-test</RequestId></Error>").encode()
        reason = "Slow Down" if status == 503 else "Internal Server Error"
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        return _frame(f"HTTP/1.1 {status} {reason}\r\n".encode(), headers, body)


class CuttingProxy:
    """A TCP proxy in front of the S3 server that can cut connections after some request bytes (the server going
    away while a PUT body is on the wire) while the server itself, and so its state, stays up."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.lock = threading.Lock()
        self.down = False  # refuse every new connection (reset at once)
        self.cut_after: int | None = None  # cut a connection once this many request bytes went through
        self.cuts_left = 0  # how many more connections to cut (-1: all)
        self.cuts = 0
        self.puts = 0  # PUT requests seen
        self.down_at_put: int | None = None  # go down when this PUT starts (earlier ones went through)
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def go_down(self) -> None:
        """The server is gone: open connections are reset and new ones refused."""
        with self.lock:
            self.down = True
            for sock in self.open:
                _reset(sock)
            self.open.clear()

    def close(self) -> None:
        self.go_down()
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self.lock:
            if self.down:
                return _reset(client)
            limit = None
            if self.cut_after is not None and self.cuts_left != 0:
                limit, self.cuts_left = self.cut_after, self.cuts_left - 1
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            return _reset(client)
        with self.lock:
            self.open += [client, upstream]
        threading.Thread(target=self._pump, args=(client, upstream, limit, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None, request: bool = False) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if request and data.startswith(b"PUT /"):
                    with self.lock:
                        self.puts += 1
                        down = self.down_at_put is not None and self.puts >= self.down_at_put
                    if down:
                        self.go_down()
                        return
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[:limit - sent])
                    with self.lock:
                        self.cuts += 1
                    _reset(src)
                    _reset(dst)
                    return
                dst.sendall(data)
                sent += len(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _reset(src)
            _reset(dst)


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        sock.close()
    except OSError:
        pass
