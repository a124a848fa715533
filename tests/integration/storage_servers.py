"""Real object-storage endpoints on 127.0.0.1 for the integration tests, and a fault proxy.

* :func:`start_moto` / :func:`start_gcs_emulator`: an S3 (``moto_server``) or GCS
  (``gcp-storage-emulator``) process on a free port, ready when it answers HTTP.
  :meth:`ServerProcess.stop` ends it by its pid and waits until the port is closed.
* :class:`FaultProxy`: a small threaded reverse proxy in front of an S3 endpoint. It
  forwards every request, counts requests and body bytes per category (list, range read,
  write...), and fails a chosen fraction of them the ways object stores do: ``503
  SlowDown``, ``500 InternalError``, a connection reset before any response, or a reset in
  the middle of the response body (after the upstream already acted on the request).
  The first request of every category always fails (with a 500), so a run is guaranteed
  to meet a fault in listing, reading and writing alike; later ones fail at random (seeded).
* :func:`decode_probe` (``python -m tests.integration.storage_servers decode-probe``):
  decodes one recording with the job's decode stage in a fresh process and prints its
  peak RSS, so tests can compare memory for short and long recordings.

Nothing here sleeps to synchronise: readiness and shutdown are polled against a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent

# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_open(port: int, host: str = HOST) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def poll_until(condition: Callable[[], bool], timeout_s: float, what: str,
               interval_s: float = 0.05) -> None:
    """Call ``condition`` until it is true; raise ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(interval_s)


def _http_answers(port: int, path: str = "/") -> bool:
    """Whether an HTTP server on ``port`` returns any response to ``GET path``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


# --------------------------------------------------------------------------- servers


@dataclass
class ServerProcess:
    """An endpoint process this test session started (and must stop).

    Attributes:
        name: ``moto`` or ``gcs``.
        port: the port it listens on (127.0.0.1).
        process: the process.
        log_path: where its stdout and stderr go.
    """

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate the process (by pid), kill it if it lingers, wait for the port to close.

        Raises:
            TimeoutError: the port still accepts connections afterwards.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        poll_until(lambda: not port_is_open(self.port), timeout_s,
                   f"{self.name} port {self.port} to close")


def _start(name: str, argv_for_port: Callable[[int], list[str]], log_dir: Path,
           ready: Callable[[int], bool], timeout_s: float = 30.0,
           attempts: int = 3) -> ServerProcess:
    """Start a server on a free port; retry on another port if it dies at start."""
    log_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(attempts):
        port = free_port()
        log_path = log_dir / f"{name}-{port}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - the child owns it until it exits
        try:
            process = subprocess.Popen(argv_for_port(port), stdout=log_file,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log_file.close()
        server = ServerProcess(name, port, process, log_path)

        def answered(server: ServerProcess = server) -> bool:
            return server.process.poll() is not None or ready(server.port)

        try:
            poll_until(answered, timeout_s, f"{name} on port {port} to answer")
        except TimeoutError:
            server.stop()
            raise
        if process.poll() is None:
            return server
        last_error = log_path.read_text(errors="replace")[-2000:]
        server.stop()
    raise RuntimeError(f"{name} did not start after {attempts} attempts:\n{last_error}")


def start_moto(log_dir: Path) -> ServerProcess:
    """``moto_server`` (S3 and friends, in memory) on a free port of 127.0.0.1."""
    return _start("moto", lambda port: [str(BIN / "moto_server"), "-H", HOST, "-p", str(port)],
                  log_dir, ready=lambda port: _http_answers(port, "/moto-api/"))


def start_gcs_emulator(log_dir: Path) -> ServerProcess:
    """``gcp-storage-emulator`` (in memory) on a free port of 127.0.0.1."""
    return _start(
        "gcs",
        lambda port: [str(BIN / "gcp-storage-emulator"), "start", "-H", HOST, "--port",
                      str(port), "--in-memory"],
        log_dir, ready=lambda port: _http_answers(port, "/storage/v1/b"),
    )


# --------------------------------------------------------------------------- options


def s3_options(endpoint_url: str, key: str = "testing", secret: str = "testing") -> dict[str, Any]:
    """s3fs options for an endpoint (no ``region_name``: see ENV_NOTES §5)."""
    return {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": endpoint_url}}


def gcs_options(endpoint_url: str) -> dict[str, Any]:
    """gcsfs options for the emulator (anonymous)."""
    return {"project": "test", "token": "anon", "endpoint_url": endpoint_url}


# --------------------------------------------------------------------------- fault proxy

# Each category's faults cycle through these, starting with a 500 (which s3fs leaves to
# botocore's retries and, with those off, to the caller's).
FAULT_KINDS: tuple[str, ...] = ("internal", "reset_mid", "slowdown", "reset_before")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect"})
_S3_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


def classify(method: str, target: str, headers: Mapping[str, str]) -> str:
    """What an S3 request does: ``list``, ``range_read``, ``get``, ``head``, ``write``,
    ``copy``, ``delete`` or ``other``."""
    parsed = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    segments = [s for s in parsed.path.split("/") if s]
    lower = {k.lower(): v for k, v in headers.items()}
    if method == "GET":
        if len(segments) <= 1 or "list-type" in query or "prefix" in query:
            return "list"
        return "range_read" if "range" in lower else "get"
    if method == "HEAD":
        return "head"
    if method == "PUT":
        return "copy" if "x-amz-copy-source" in lower else "write"
    if method == "DELETE" or (method == "POST" and "delete" in query):
        return "delete"
    if method == "POST":
        return "write"  # multipart upload create/complete
    return "other"


@dataclass
class ProxyStats:
    """Counters of one proxy since its last :meth:`FaultProxy.reset`.

    Attributes:
        requests: requests received, per category.
        faults: faults injected, per ``(category, kind)``.
        recovered: faulted requests later sent again and answered, per category.
        unrecovered: ``(category, kind, method target)`` of faulted requests never answered
            since. Legitimate only for deletes: a retried recursive delete lists again and
            has nothing to resend when an earlier attempt (or another request) already
            removed the objects.
        body_bytes: response body bytes sent for GETs, per object path.
        gets: GET requests answered, per object path.
        most_at_once: the most requests of a category under way at one time.
    """

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    recovered: collections.Counter[str] = field(default_factory=collections.Counter)
    unrecovered: list[tuple[str, str, str]] = field(default_factory=list)
    body_bytes: collections.Counter[str] = field(default_factory=collections.Counter)
    gets: collections.Counter[str] = field(default_factory=collections.Counter)
    most_at_once: collections.Counter[str] = field(default_factory=collections.Counter)

    def faults_by_category(self) -> dict[str, int]:
        out: collections.Counter[str] = collections.Counter()
        for (category, _), n in self.faults.items():
            out[category] += n
        return dict(out)

    def faults_by_kind(self) -> dict[str, int]:
        out: collections.Counter[str] = collections.Counter()
        for (_, kind), n in self.faults.items():
            out[kind] += n
        return dict(out)


class FaultProxy:
    """Reverse proxy for an S3 endpoint that injects faults and counts traffic.

    Point s3fs at :attr:`url` instead of the endpoint. With ``fault_rate=0`` it only
    counts, which is how tests measure the bytes a job fetches.

    Args:
        upstream_port: the S3 endpoint's port on 127.0.0.1.
        fault_rate: fraction of requests (after each category's first) that fail.
        seed: seed of the fault schedule.
        fail_first: always fail the first request of each category.
    """

    def __init__(self, upstream_port: int, fault_rate: float = 0.0, seed: int = 0,
                 fail_first: bool = True) -> None:
        self.upstream_port = upstream_port
        self.fault_rate = fault_rate
        self.fail_first = fail_first
        # Range reads of objects whose path contains this fail, every time (a 500): an
        # outage of those objects, longer than any retry.
        self.outage: str | None = None
        # Seconds every request waits before it is forwarded: a bucket far away.
        self.latency_s = 0.0
        self._under_way: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = ProxyStats()
        self._pending: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._kind_index: collections.Counter[str] = collections.Counter()
        self._server = ThreadingHTTPServer((HOST, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, name=f"proxy-{self.port}",
                                        daemon=True)
        self._thread.start()
        poll_until(lambda: port_is_open(self.port), 10, f"proxy on port {self.port}")
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and check the port is closed."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        poll_until(lambda: not port_is_open(self.port), 10, f"proxy port {self.port} to close")

    def reset(self, fault_rate: float | None = None, seed: int | None = None) -> None:
        """Zero the counters (and optionally change the fault schedule)."""
        with self._lock:
            self._stats = ProxyStats()
            self._pending.clear()
            self._kind_index.clear()
            if fault_rate is not None:
                self.fault_rate = fault_rate
            if seed is not None:
                self._rng = random.Random(seed)

    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            snap = ProxyStats(
                requests=collections.Counter(self._stats.requests),
                faults=collections.Counter(self._stats.faults),
                recovered=collections.Counter(self._stats.recovered),
                unrecovered=[(category, kind, " ".join(key[:2]))
                             for key, (category, kind) in self._pending.items()],
                body_bytes=collections.Counter(self._stats.body_bytes),
                gets=collections.Counter(self._stats.gets),
                most_at_once=collections.Counter(self._stats.most_at_once),
            )
        return snap

    # ---------------------------------------------------------------- decisions

    def _decide(self, category: str, key: tuple[str, str, str]) -> str | None:
        with self._lock:
            self._stats.requests[category] += 1
            if self.outage and category == "range_read" and self.outage in key[1]:
                self._stats.faults[(category, "outage")] += 1
                return "internal"
            first = self._stats.requests[category] == 1
            if not ((first and self.fail_first) or self._rng.random() < self.fault_rate):
                return None
            # Each category cycles through the kinds, so every kind hits every category.
            kind = FAULT_KINDS[self._kind_index[category] % len(FAULT_KINDS)]
            self._kind_index[category] += 1
            self._stats.faults[(category, kind)] += 1
            self._pending[key] = (category, kind)
            return kind

    def _answered(self, method: str, key: tuple[str, str, str], path: str, body_bytes: int) -> None:
        with self._lock:
            pending = self._pending.pop(key, None)
            if pending is not None:
                self._stats.recovered[pending[0]] += 1
            if method == "GET":
                self._stats.body_bytes[path] += body_bytes
                self._stats.gets[path] += 1

    def _count_partial(self, method: str, path: str, body_bytes: int) -> None:
        if method == "GET":
            with self._lock:
                self._stats.body_bytes[path] += body_bytes

    # ---------------------------------------------------------------- handler

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: tests read counters, not access logs

            def do_GET(self) -> None:
                self._proxy()

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                """Abort the connection with a TCP RST (what a dropped connection looks like)."""
                with contextlib.suppress(OSError):
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()
                self.close_connection = True

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
                      head: bool) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                if body and not head:
                    self.wfile.write(body)

            def _proxy(self) -> None:
                category = classify(self.command, self.path, dict(self.headers.items()))
                with proxy._lock:
                    proxy._under_way[category] += 1
                    most = proxy._stats.most_at_once
                    most[category] = max(most[category], proxy._under_way[category])
                try:
                    if proxy.latency_s:
                        time.sleep(proxy.latency_s)
                    self._serve(category)
                finally:
                    with proxy._lock:
                        proxy._under_way[category] -= 1

            def _serve(self, category: str) -> None:
                method, target = self.command, self.path
                body = self._read_body()
                path = urllib.parse.urlsplit(target).path
                key = (method, target, self.headers.get("Range", ""))
                fault = proxy._decide(category, key)
                if fault == "reset_before":
                    self._reset()
                    return
                if fault in _S3_ERRORS:
                    status, code, message = _S3_ERRORS[fault]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                           f"<Message>{message}</Message><Resource>{path}</Resource>"
                           "<RequestId>fault-proxy</RequestId></Error>").encode()
                    self._send(status, [("Content-Type", "application/xml"),
                                        ("Content-Length", str(len(xml)))], xml,
                               head=method == "HEAD")
                    return
                try:
                    status, reason, headers, payload = self._forward(method, target, body)
                except OSError as err:  # upstream refused: report it as a gateway error
                    msg = f"upstream: {err}".encode()
                    self._send(502, [("Content-Length", str(len(msg)))], msg, method == "HEAD")
                    return
                out_headers = [(k, v) for k, v in headers
                               if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]
                if method == "HEAD":
                    out_headers += [(k, v) for k, v in headers if k.lower() == "content-length"]
                elif status not in (204, 304):
                    out_headers.append(("Content-Length", str(len(payload))))
                if fault == "reset_mid":
                    # The upstream already acted (a PUT is stored, a DELETE done); the client
                    # sees the headers and half the body, then a reset. A response without a
                    # body (most writes, HEAD) is cut inside its headers instead.
                    half = payload[: len(payload) // 2]
                    with contextlib.suppress(OSError):
                        self.send_response(status, reason)
                        if half and method != "HEAD":
                            for name, value in out_headers:
                                self.send_header(name, value)
                            self.end_headers()
                            self.wfile.write(half)
                        else:
                            self.flush_headers()  # the status line and the Server/Date lines
                    proxy._count_partial(method, path, len(half))
                    self._reset()
                    return
                self._send(status, out_headers, payload, head=method == "HEAD")
                proxy._answered(method, key, path, 0 if method == "HEAD" else len(payload))

            def _forward(self, method: str, target: str, body: bytes
                         ) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(HOST, proxy.upstream_port, timeout=60)
                try:
                    conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            conn.putheader(name, value)
                    if body or method in ("PUT", "POST"):
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body if body else None)
                    resp = conn.getresponse()
                    payload = resp.read() if method != "HEAD" else b""
                    if method == "HEAD":
                        resp.read()
                    return resp.status, resp.reason, resp.getheaders(), payload
                finally:
                    conn.close()

        return Handler


# --------------------------------------------------------------------------- helpers


def upload_files(fs: Any, files: Mapping[str, Path], dest: str) -> list[str]:
    """Put local files at ``dest/<relative name>`` on ``fs``; returns the object paths."""
    paths = []
    for rel, local in sorted(files.items()):
        target = f"{dest.rstrip('/')}/{rel}"
        fs.put_file(str(local), target)
        paths.append(target)
    return paths


@contextlib.contextmanager
def running(proxy: FaultProxy) -> Iterator[FaultProxy]:
    """``with running(FaultProxy(...)) as p:`` starts and always stops a proxy."""
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def find_secret(data: bytes, secret: str) -> bool:
    """Whether ``secret`` occurs in ``data`` as UTF-8 (or UTF-16, as some logs write it)."""
    return secret.encode() in data or secret.encode("utf-16-le") in data


# --------------------------------------------------------------------------- decode probe


def _proc_status_kib(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def decode_probe(uri: str, storage_options: Mapping[str, Any], out: IO[str]) -> None:
    """Decode one recording with the job's decode stage; print peak RSS and what it read.

    Runs in a fresh process (see ``main``). Importing the stack (pyarrow, botocore...)
    peaks higher than a decode does, so besides ``ru_maxrss`` (the process's lifetime
    peak) the peak is reset just before decoding and read back after it: ``decode_peak``
    is the highest RSS while decoding, ``before`` the RSS when it started. The decode
    settings are the tiny-BEATs test job's: 16 kHz, 2 s windows, 1 s hop.
    """
    import resource

    from pipeline import storage
    from pipeline.audio import DecodeSettings
    from pipeline.stages import DecodeSpec, decode_recording

    fs, path = storage.url_to_fs(uri, storage_options)
    size = int(fs.size(path))
    spec = DecodeSpec(settings=DecodeSettings(16_000), window_samples=32_000, hop_samples=16_000,
                      tail="pad", min_tail_samples=400, batch_windows=32,
                      storage_options=dict(storage_options))
    windows = 0
    report: dict[str, Any] = {}
    peak_reset = _reset_peak_rss()
    before_kib = _proc_status_kib("VmRSS")
    started = time.perf_counter()
    for batch in decode_recording("probe", uri, path, size, "", spec):
        windows += int((batch["window_index"] >= 0).sum())
        report = next((json.loads(str(m)) for m in batch["meta"] if m), report)
    json.dump({
        "uri": uri, "size_bytes": size, "windows": windows, "report": report,
        "decode_s": round(time.perf_counter() - started, 3),
        "peak_reset": peak_reset,
        "rss_before_kib": before_kib,
        "decode_peak_rss_kib": _proc_status_kib("VmHWM"),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }, out)


def peak_rss_decode_batch(batch: dict[str, Any], spec: Any, out_dir: str) -> Iterator[Any]:
    """``pipeline.stages.decode_batch`` that also records its worker's memory.

    Drop-in for the job's decode UDF (bind ``out_dir`` with ``functools.partial``). For
    each call it writes ``{recording_id, uri, pid, anon_before_kib, anon_peak_kib,
    rss_before_kib, rss_peak_kib}`` to ``out_dir/<recording_id>.json``. ``anon`` is the
    worker's private heap (``RssAnon``), sampled each time Ray Data takes an output: it
    includes what Ray Data buffers from this generator into output blocks, and excludes
    the shared-memory object store pages a worker writes blocks into (which ``VmRSS`` and
    its peak count). Ray workers cannot import ``tests``: register this module with
    ``ray.cloudpickle.register_pickle_by_value``.
    """
    from pipeline.stages import decode_batch

    _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    anon_before = anon_peak = _proc_status_kib("RssAnon")
    try:
        for out in decode_batch(batch, spec):
            yield out
            anon_peak = max(anon_peak, _proc_status_kib("RssAnon"))
    finally:
        rid = str(batch["recording_id"][0])
        record = {"recording_id": rid, "uri": str(batch["uri"][0]), "pid": os.getpid(),
                  "anon_before_kib": anon_before, "anon_peak_kib": anon_peak,
                  "rss_before_kib": rss_before, "rss_peak_kib": _proc_status_kib("VmHWM")}
        Path(out_dir, f"{rid}.json").write_text(json.dumps(record))


_REEXEC = "EMBED_ARCHIVE_PROBE_REEXEC"


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "decode-probe":
        if os.environ.get(_REEXEC) != "1":
            # A process started by a big one (pytest) inherits that process's peak RSS in
            # ru_maxrss, across exec. A grandchild started from this small process does not.
            env = {**os.environ, _REEXEC: "1"}
            return subprocess.run([sys.executable, "-m", __spec__.name, *argv], env=env,
                                  check=False).returncode
        decode_probe(argv[1], json.loads(argv[2]), sys.stdout)
        return 0
    print("usage: python -m tests.integration.storage_servers decode-probe URI OPTIONS_JSON",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

__all__ = ["FAULT_KINDS", "FaultProxy", "ProxyStats", "ServerProcess", "classify",
           "decode_probe", "find_secret", "free_port", "gcs_options", "peak_rss_decode_batch",
           "poll_until",
           "port_is_open", "running", "s3_options", "start_gcs_emulator", "start_moto",
           "upload_files"]
