"""The processes a benchmark starts: the sandbox, a Prefect server and the measured pipeline.

Every server listens on 127.0.0.1 only. Each process is started with its own pid, so CPU
time and memory are measured per process with psutil and ``/proc``, and each is stopped by
that pid.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120.0
_SANDBOX_URL = re.compile(r"Sandbox listening on (http://127\.0\.0\.1:\d+)")
_SAMPLE_INTERVAL_S = 0.05


class BenchmarkError(RuntimeError):
    """A benchmark process failed to start or exited with an error."""


def cli_command(*arguments: str) -> list[str]:
    """Return the command line of the ``terralayr-etl`` script installed beside this interpreter."""
    return [str(Path(sys.executable).with_name("terralayr-etl")), *arguments]


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds a running process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class _Server:
    """A server subprocess with its log files; stop it with ``stop`` or as a context manager."""

    def __init__(self, command: list[str], env: dict[str, str], log_dir: Path, name: str):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self.name = name
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def check_running(self) -> None:
        if self.process.poll() is not None:
            tail = self.stderr_path.read_text(errors="replace")[-2000:]
            raise BenchmarkError(f"the {self.name} process exited with status {self.process.returncode}: {tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class SandboxProcess(_Server):
    """``terralayr-etl sandbox`` on a free 127.0.0.1 port, serving a synthetic organisation."""

    def __init__(
        self, *, virtual_assets: int, latency_ms: float, env: dict[str, str], log_dir: Path, cache_mb: float = 0
    ):
        command = cli_command(
            "sandbox",
            "--host", LOOPBACK,
            "--port", "0",
            "--latency-ms", f"{latency_ms:g}",
            "--virtual-assets", str(virtual_assets),
            "--cache-mb", f"{cache_mb:g}",
        )  # fmt: skip
        super().__init__(command, env, log_dir, f"sandbox-{virtual_assets}")
        self.base_url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        # The sandbox prints its URL after the socket listens, so requests queue from then on.
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_running()
            match = _SANDBOX_URL.search(self.stdout_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            time.sleep(0.05)
        self.stop()
        raise BenchmarkError(f"the sandbox printed no URL within {START_TIMEOUT_S:g} s; see {self.stderr_path}")


class PrefectServer(_Server):
    """``prefect server start`` on a free 127.0.0.1 port with its own PREFECT_HOME.

    One server for all runs plays the part of a deployment's server, so each pipeline run
    skips the temporary server that Prefect starts for a process without PREFECT_API_URL.
    """

    def __init__(self, *, home: Path, env: dict[str, str], log_dir: Path):
        self.port = free_port()
        server_env = {**env, "PREFECT_HOME": str(home)}
        server_env.pop("PREFECT_API_URL", None)
        prefect = Path(sys.executable).with_name("prefect")
        command = [str(prefect), "server", "start", "--host", LOOPBACK, "--port", str(self.port)]
        super().__init__(command, server_env, log_dir, "prefect-server")
        self.api_url = f"http://{LOOPBACK}:{self.port}/api"
        self._wait_until_healthy()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_running()
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise BenchmarkError(f"the Prefect server did not respond within {START_TIMEOUT_S:g} s; see {self.stderr_path}")


@dataclass(frozen=True)
class MeasuredRun:
    """Wall time, CPU time and peak memory of one finished process."""

    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    """The kernel's high-water mark of the process's resident set (VmHWM), children excluded."""
    stdout: str
    stderr: str
    rss_samples: list[tuple[float, float]]
    """(Unix time, resident set in MB) every 50 ms, to place the peak in a stage of the run."""


def run_measured(command: list[str], *, env: dict[str, str], log_dir: Path, name: str) -> MeasuredRun:
    """Run ``command`` to completion and measure it.

    The peak RSS is the last VmHWM read before the process exited, sampled every 50 ms. VmHWM
    only grows, so only growth in the final 50 ms could be missed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path = log_dir / f"{name}.out"
    stderr_path = log_dir / f"{name}.err"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
        sampler = _HighWaterSampler(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall_s = time.perf_counter() - started
        sampler.stop()
    process.returncode = os.waitstatus_to_exitcode(status)
    return MeasuredRun(
        returncode=process.returncode,
        wall_s=wall_s,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=sampler.peak_kb / 1024,
        stdout=stdout_path.read_text(errors="replace"),
        stderr=stderr_path.read_text(errors="replace"),
        rss_samples=sampler.samples,
    )


class _HighWaterSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self._status_path = Path(f"/proc/{pid}/status")
        self._stopped = threading.Event()
        self.peak_kb = 0
        self.samples: list[tuple[float, float]] = []

    def run(self) -> None:
        while not self._stopped.is_set():
            self._sample()
            self._stopped.wait(_SAMPLE_INTERVAL_S)

    def _sample(self) -> None:
        try:
            text = self._status_path.read_text()
        except OSError:
            return
        match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
        if match:
            self.peak_kb = max(self.peak_kb, int(match.group(1)))
        current = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        if current:
            self.samples.append((time.time(), int(current.group(1)) / 1024))

    def stop(self) -> None:
        self._stopped.set()
        self.join()
