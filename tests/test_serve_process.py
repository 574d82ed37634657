"""`captioner serve` as a real process on 127.0.0.1: it answers, and SIGTERM lets an in-flight request finish.

The request is made in flight deterministically: its headers and half its body are sent, then SIGTERM,
then the rest of the body. The server must answer it with a caption, refuse new connections, and exit.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from .test_reliability import save_tiny_run  # noqa: E402

START_TIMEOUT = 120  # seconds for the process to import torch and load the model on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET on a fresh connection: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return parse(read_all(s))


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def wait_ready(process: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{process.stderr.read().decode()}")
        try:
            if get(port, "/healthz", timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not answer /healthz in time")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    run = save_tiny_run(tmp_path / "run")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--model", str(run), "--port", str(port),
                                "--device", "cpu", "--precision", "fp32"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        wait_ready(process, port)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_sigterm_finishes_the_request_in_flight_then_exits(server: tuple[subprocess.Popen, int]) -> None:
    process, port = server
    body = photo()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /v1/caption?max_len=5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:1000])
        time.sleep(0.5)  # the server has the headers: the request is in flight
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # shutting down now, and waiting for this request
        with pytest.raises(OSError):
            get(port, "/healthz", timeout=2.0)  # no new connections while it drains
        s.sendall(body[1000:])
        status, answer = parse(read_all(s))
    assert status == 200, answer
    assert json.loads(answer)["results"][0]["image"] == "upload"
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    log = process.stderr.read().decode()
    assert "Traceback" not in log and "Finished server process" in log


def test_ctrl_c_stops_the_server_and_its_model_process(server: tuple[subprocess.Popen, int]) -> None:
    """Ctrl-C reaches the whole foreground group: the model process waits for the server to stop it."""
    process, port = server
    spawned = children(process.pid)  # the model process, and multiprocessing's resource tracker
    assert any("spawn_main" in Path(f"/proc/{pid}/cmdline").read_text() for pid in spawned)
    assert get(port, "/v1/caption")[0] == 405  # up and answering
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=30) in (0, -signal.SIGINT)
    log = process.stderr.read().decode()
    assert "Traceback" not in log and "Finished server process" in log
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in spawned)  # no orphan left behind


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """The process's child processes (Linux /proc)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").glob("*") for c in (task / "children").read_text().split()]
