"""`captioner serve` under load on loopback, against `captioner caption --batch-size 32` on the same photos.

Writes N photos (scenes of the built-in world as JPEGs), then, each in its own process:
- `captioner caption FILES --batch-size 32 --json`: its wall time, and its captions, which every good answer
  of the server must equal;
- in this process, what that command runs after start-up: `Captioner.caption_files` at batch size 32 (the
  batch rate the server is held to), and `Captioner.caption` on one photo at a time (the latency a lone
  client is held to);
- `captioner serve` on 127.0.0.1 with 1, 8 and 32 clients (threads, one keep-alive connection each, one photo
  per POST /v1/caption): images/s, p50/p99 latency, the server's peak RSS, and the batches it formed.
With --soak N: N requests from 32 clients, 10 % of them bad (a truncated JPEG, a text file, a decompression
bomb, a 30 MB upload, a wrong parameter), checking zero 5xx, each refusal's status and exact line, each good
caption against the CLI's, and the server's RSS in the first and last quarter of the requests.
Every loop is bounded in requests and in seconds; only 127.0.0.1 is contacted.

    python benchmarks/bench_serve.py --model /tmp/serve_run
    python benchmarks/bench_serve.py --model /tmp/serve_run --soak 2000 --threads 1   # a shared, busy machine

On a machine whose cores other work is using, give --threads 1 (as CAPTIONER_BENCH_THREADS=1 elsewhere): two
OpenMP threads that wait on a descheduled partner crawl, and they crawl at random, so no comparison holds.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "captioner-bench-boundary"
LIMIT_MB = 20  # the server's default upload cap


# ----------------------------------------------------------------------------- inputs


def make_photos(folder: Path, n: int, size: int) -> list[Path]:
    """N scenes of the built-in world (what `captioner data synth` writes) saved as JPEG, quality 90."""
    from captioner.data.synthetic import write_synthetic

    scenes = folder / "scenes"
    write_synthetic(scenes, n, split="test", image_size=size)
    photos = folder / "photos"
    photos.mkdir()
    paths = []
    for png in sorted((scenes / "images").iterdir()):
        path = photos / f"{png.stem}.jpg"
        Image.open(png).convert("RGB").save(path, quality=90)
        paths.append(path)
    return paths


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """One file as a multipart/form-data body, and its content type."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


# ----------------------------------------------------------------------------- the references


def cli_captions(run: str, paths: list[Path], batch_size: int) -> tuple[dict[str, str], float]:
    """`captioner caption` on the photos in one run: {file name: caption}, and its wall time with start-up."""
    command = [sys.executable, "-m", "captioner", "caption", *map(str, paths), "--model", run, "--json",
               "--batch-size", str(batch_size), "--device", "cpu", "--precision", "fp32"]
    start = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {Path(r["image"]).name: r["caption"] for r in records}, time.perf_counter() - start


def library_rates(run: str, paths: list[Path], batch_size: int) -> tuple[float, float]:
    """What `captioner caption` does after start-up, timed in this process: images/s of `caption_files` at
    `batch_size` (its loader and workers as the command uses them), and the median seconds of
    `Captioner.caption` on one photo (the latency a lone client is held to)."""
    from captioner.api import Captioner, DecodeSettings

    captioner = Captioner.load(run, device="cpu", precision="fp32")
    captioner.caption_files(paths[:batch_size], DecodeSettings(), batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    captioner.caption_files(paths, DecodeSettings(), batch_size=batch_size)
    rate = len(paths) / (time.perf_counter() - start)
    times = []
    for path in paths[:32]:
        start = time.perf_counter()
        captioner.caption(path)
        times.append(time.perf_counter() - start)
    return rate, statistics.median(times)


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "captioner", "serve", "--model", run, "--port", str(port), "--device", "cpu",
               "--precision", "fp32", *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/healthz")[0] == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not start; see {log}")


def request(port: int, method: str, path: str, body: bytes = b"", content_type: str = "",
            connection: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one request, on `connection` or a fresh one."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": content_type} if content_type else {}
    conn.request(method, path, body=body or None, headers=headers)
    answer = conn.getresponse()
    data = answer.read()
    if connection is None:
        conn.close()
    return answer.status, json.loads(data) if data else {}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the server has used so far (all its threads, and its model process's)."""
    seconds = 0.0
    for process in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    return seconds


def memory(pid: int) -> dict[str, int]:
    """The server's resident set now and at its peak (VmRSS, VmHWM), in MiB, summed over it and its children
    (the model process): the peaks' sum, an upper bound of the peak of the sum."""
    total = {"VmRSS": 0, "VmHWM": 0}
    for process in [pid, *children(pid)]:
        status = Path(f"/proc/{process}/status")
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue  # a child that just ended
        for key in total:
            total[key] += int(fields[key].split()[0]) // 1024
    return total


def children(pid: int) -> list[int]:
    """The process's descendants (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found + [grandchild for child in found for grandchild in children(child)]


# ----------------------------------------------------------------------------- load


@dataclass
class Job:
    """One request to send and what its answer must be."""

    path: str
    body: bytes
    content_type: str
    check: Callable[[int, dict], str | None]  # None when the answer is right, else what is wrong


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (requests done, MiB) samples


def drive(port: int, jobs: list[Job], clients: int, seconds: float, pid: int) -> Outcome:
    """Send the jobs from `clients` threads (each its own connection) until done or out of time."""
    outcome, lock = Outcome(), threading.Lock()
    queue = iter(enumerate(jobs))
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                item = next(queue, None)
            if item is None:
                break
            _, job = item
            start = time.perf_counter()
            try:
                status, answer = request(port, "POST", job.path, job.body, job.content_type, conn)
            except (OSError, http.client.HTTPException) as err:
                status, answer = 0, {"error": f"{type(err).__name__}: {err}"}
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = time.perf_counter() - start
            problem = job.check(status, answer)
            with lock:
                outcome.latencies.append(elapsed)
                outcome.statuses.append(status)
                if problem:
                    outcome.problems.append(problem)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        outcome.rss.append((len(outcome.statuses), memory(pid)["VmRSS"]))
        time.sleep(0.25)
    for t in threads:
        t.join()
    return outcome


def good_job(path: Path, expected: dict[str, str]) -> Job:
    body, content_type = multipart(path.name, path.read_bytes())

    def check(status: int, answer: dict) -> str | None:
        if status != 200:
            return f"{path.name}: {status} {answer}"
        got = answer["results"][0]["caption"]
        return None if got == expected[path.name] else f"{path.name}: server {got!r} != cli {expected[path.name]!r}"

    return Job("/v1/caption", body, content_type, check)


def bad_jobs(folder: Path) -> list[Job]:
    """The five kinds of bad request, each with the status and the exact line it must get."""
    from captioner.data.images import load_image
    from captioner.errors import ImageError

    def reason(name: str, data: bytes) -> str:
        (folder / name).write_bytes(data)
        try:
            load_image(folder / name)
        except ImageError as err:
            return f"{name}: {err.reason}"
        raise AssertionError(f"{name} should not load")

    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo, "JPEG")
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")
    files = {"cut.jpg": photo.getvalue()[:2000], "notes.txt": b"not a photo\n", "bomb.png": bomb.getvalue()}
    jobs = [expect("/v1/caption", *multipart(name, data), 400, reason(name, data)) for name, data in files.items()]
    big = bytes(30 * 2**20)
    too_large = f"upload too large: the limit is {LIMIT_MB} MB per request"
    jobs.append(expect("/v1/caption", big, "image/jpeg", 413, too_large))
    jobs.append(expect("/v1/caption?beam=0", *multipart("a.jpg", photo.getvalue()), 422,
                       "beam: Input should be greater than or equal to 1"))
    return jobs


def expect(path: str, body: bytes, content_type: str, status: int, line: str) -> Job:
    def check(got: int, answer: dict) -> str | None:
        if (got, answer.get("error")) == (status, line):
            return None
        return f"{path}: wanted {status} {line!r}, got {got} {answer}"

    return Job(path, body, content_type, check)


# ----------------------------------------------------------------------------- reports


def summary(outcome: Outcome, seconds: float) -> dict:
    ms = sorted(t * 1000 for t in outcome.latencies)
    return {"requests": len(ms), "images_per_s": round(len(ms) / seconds, 1),
            "p50_ms": round(ms[len(ms) // 2], 1), "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1),
            "5xx": sum(s >= 500 or s == 0 for s in outcome.statuses), "problems": len(outcome.problems)}


def load_levels(port: int, pid: int, paths: list[Path], expected: dict[str, str], args: argparse.Namespace) -> dict:
    results = {}
    for clients in args.clients:
        jobs = [good_job(paths[i % len(paths)], expected) for i in range(max(args.requests, 8 * clients))]
        health = request(port, "GET", "/healthz")[1]
        server_cpu, client_cpu, start = cpu_seconds(pid), time.process_time(), time.perf_counter()
        outcome = drive(port, jobs, clients, args.seconds, pid)
        row = summary(outcome, time.perf_counter() - start)
        # Where the two cores went: the server's CPU (model thread and the rest) and these client threads'.
        done, after = max(len(outcome.statuses), 1), request(port, "GET", "/healthz")[1]
        row["server_cpu_ms_per_image"] = round((cpu_seconds(pid) - server_cpu) / done * 1e3, 2)
        row["client_cpu_ms_per_image"] = round((time.process_time() - client_cpu) / done * 1e3, 2)
        batches = max(after["batches"] - health["batches"], 1)
        row["mean_batch"] = round((after["images"] - health["images"]) / batches, 1)
        row["server_peak_rss_mb"] = memory(pid)["VmHWM"]
        row["first_problems"] = outcome.problems[:3]
        results[clients] = row
        print(f"{clients:>3} clients: {row}", flush=True)
    return results


def soak(port: int, pid: int, paths: list[Path], expected: dict[str, str], folder: Path, n: int,
         seconds: float) -> dict:
    bad = bad_jobs(folder)
    jobs = [bad[(i // 10) % len(bad)] if i % 10 == 9 else good_job(paths[i % len(paths)], expected) for i in range(n)]
    start = time.perf_counter()
    outcome = drive(port, jobs, 32, seconds, pid)
    row = summary(outcome, time.perf_counter() - start)
    done = len(outcome.statuses)
    first = [m for k, m in outcome.rss if k <= done / 4] or [outcome.rss[0][1]]
    last = [m for k, m in outcome.rss if k >= 3 * done / 4] or [outcome.rss[-1][1]]
    row.update(bad=sum(1 for i in range(done) if i % 10 == 9), statuses=dict(sorted(
        {s: outcome.statuses.count(s) for s in set(outcome.statuses)}.items())),
        rss_first_quarter_mb=round(statistics.mean(first)), rss_last_quarter_mb=round(statistics.mean(last)),
        first_problems=outcome.problems[:5])
    row["rss_growth"] = round(row["rss_last_quarter_mb"] / row["rss_first_quarter_mb"] - 1, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory to serve")
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="side of the photos")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=1024, help="requests per level (a steady state at 32 clients)")
    parser.add_argument("--seconds", type=float, default=60, help="time limit per level")
    parser.add_argument("--soak", type=int, default=0, help="requests of the soak (0: none)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("CAPTIONER_BENCH_THREADS", 2)))
    parser.add_argument("--serve-args", default="", help="more options for `captioner serve`, e.g. '--in-process'")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server and the CLI inherit it
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_photos(folder, args.photos, args.size)
        expected, cli_seconds = cli_captions(args.model, paths, 32)
        batch_rate, latency = library_rates(args.model, paths, 32)
        print(f"captioner caption --batch-size 32: {cli_seconds:.1f} s for {len(paths)} photos with start-up, "
              f"{batch_rate:.1f} images/s after it; Captioner.caption on one photo: {latency * 1000:.1f} ms",
              flush=True)
        port = free_port()
        server = start_server(args.model, port, folder / "server.log", args.serve_args.split())
        try:
            results = {"cli_seconds": round(cli_seconds, 1), "batch_images_per_s": round(batch_rate, 1),
                       "library_one_ms": round(latency * 1000, 1),
                       "threads": args.threads, "photos": args.photos, "size": args.size,
                       "levels": load_levels(port, server.pid, paths, expected, args)}
            # the same in-process figures again: on a shared machine the load drifts, and this brackets it
            after = library_rates(args.model, paths, 32)
            results.update(batch_images_per_s_after=round(after[0], 1), library_one_ms_after=round(after[1] * 1000, 1))
            print(f"after the levels: {after[0]:.1f} images/s in batches, {after[1] * 1000:.1f} ms for one", flush=True)
            if args.soak:
                results["soak"] = soak(port, server.pid, paths, expected, folder, args.soak, max(args.seconds, 600))
                print(f"soak: {results['soak']}", flush=True)
            results["health"] = request(port, "GET", "/healthz")[1]
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
