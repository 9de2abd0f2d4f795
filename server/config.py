"""`ServeConfig`: every `monaserve serve` option, its default and its help, written once.

The command line (`--help` shows each default) and the `MONASERVE_<FLAG>` environment variables are made
from these fields (`adapters.config_args`); the server's parts take their settings from here.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from monaserve.adapters.bank import MonaKernel
from monaserve.adapters.config_args import option
from monaserve.adapters.swin import BackboneOptions, resolve_device

MiB = 2**20

REPLICA_HEADER = "X-Monaserve-Replica"
"""The header of every response naming the replica that made it (`ServeConfig.replica`)."""


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: those it may run on, fewer under a container's CPU quota (cgroup v2)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return cores
    return cores if quota == "max" else max(1, min(cores, math.ceil(int(quota) / int(period))))


def shared_memory_room(folder: Path = Path("/dev/shm")) -> int:
    """Bytes free in the shared memory that front ends' arenas are made in (0 where there is none)."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


@dataclass
class ServeConfig(BackboneOptions):
    """Every `monaserve serve` option (each also read from `MONASERVE_<NAME>`)."""

    # the device
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    # listening
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = option(8000, "port to listen on")
    grpc_port: int = option(8001, "port of the Open Inference Protocol's gRPC service, on --host (0: off)")
    replica_id: str | None = option(None, "this replica's name in responses and metrics (default: host:port)")
    log_level: Literal["debug", "info", "warning", "error"] = option("info", "log level")
    access_log: bool = option(True, "log one line per request (off: leave it to the load balancer, for speed)")
    access_log_probes: bool = option(False, "log health probes (/health/*, /v2/health/*) in the access log too")
    http: Literal["httptools", "h11"] = option("httptools", "HTTP/1.1 parser: httptools (C) or h11 (pure Python)")
    # processes
    workers: int | None = option(
        None,
        "front-end processes that accept HTTP, decode and post-process, all feeding one engine process "
        "(1: a single process; default: 1 up to 3 cores, else half the cores, at most 8)",
    )
    arena_mb: float = option(128.0, "shared memory (in /dev/shm) per front-end process for its images in flight, with --workers 2 or more")
    # the store and the demo
    store: str = option("var/adapters", "adapter store: a directory, or an fsspec URL such as s3://bucket/prefix")
    catalog_refresh_s: float = option(10.0, "re-read the store this often (0: only on a miss)")
    preload: str = option("", "tasks to load at start-up: 'all' or a comma-separated list")
    demo: bool = option(False, "train the shapes demo tasks into the store first, where they are missing (the server listens meanwhile)")
    demo_data: Path = option(Path("var/demo-data"), "where --demo writes its training images")
    demo_steps: int = option(100, "training steps of each --demo task (more steps, better demo adapters)")
    # adapters on the device
    gpu_slots: int = option(16, "adapter slots on the device")
    gpu_adapter_mb: float | None = option(None, "device memory budget for adapters (default: slots only)")
    cpu_cache_mb: float = option(1024.0, "CPU cache of loaded packages")
    # batching and compiling
    max_batch: int = option(32, "images per engine batch; batches are padded to a power of two below it, or to it")
    compile: bool | None = option(
        None,
        "torch.compile the batched forward, one graph per batch size and input size, compiled before ready "
        "(CUDA graphs on CUDA); default: on on CUDA, off on the CPU (minutes to compile, little gained)",
    )
    mona_kernel: MonaKernel = option(
        "torch", "how the adapters compute: torch ops, or fused Triton kernels (CUDA; not the default until a GPU benchmark shows it wins)"
    )
    compile_cache: Path = option(Path("var/compile-cache"), "where compiled graphs are kept, so that a restart does not compile again")
    max_delay_ms: float = option(5.0, "longest wait for a batch to fill")
    max_queue: int = option(512, "images waiting before requests get 503")
    request_timeout_s: float = option(30.0, "per-request deadline (504 after it)")
    decode_threads: int = option(4, "threads that decode and prepare images")
    jpeg_decode: Literal["auto", "device", "pillow"] = option(
        "auto", "where JPEGs decode: on the engine's device (nvJPEG on CUDA), or with Pillow on the CPU; auto: the device if a GPU"
    )
    # access
    admin_token: str | None = option(None, "bearer token for /v1/adapters (prefer MONASERVE_ADMIN_TOKEN)")
    insecure_admin: bool = option(False, "serve the admin routes without a token")
    api_token: str | None = option(None, "bearer token for inference routes (prefer MONASERVE_API_TOKEN; default: open)")
    cors_origins: str = option("", "comma-separated origins allowed to call from browsers (default: none)")
    # limits on what clients send
    max_image_bytes: int = option(20 * MiB, "bytes of one encoded image")
    max_image_pixels: int = option(40_000_000, "pixels of one image as stored")
    max_request_pixels: int = option(100_000_000, "pixels of all images of one request together")
    max_images_per_request: int = option(64, "images in one request (413 past it)")
    max_request_mb: float = option(64.0, "body limit of inference requests")
    max_body_buffer_mb: float = option(
        256.0, "request bodies held in memory at once, all requests together (past it: 503 with Retry-After)"
    )
    max_response_mb: float = option(64.0, "largest answer one request may get")
    # connections
    max_connections: int = option(2048, "open connections; past it, requests get 503 (kept below the descriptor limit)")
    header_timeout_s: float = option(10.0, "a request's headers must arrive within this")
    body_timeout_s: float = option(
        30.0, "longest wait for the next part of a request body, and the window --body-min-rate is measured over"
    )
    body_min_rate: float = option(1024.0, "bytes/s a request body must average over each --body-timeout-s window (0: off)")
    keep_alive_s: float = option(75.0, "idle keep-alive connections close after this (above a load balancer's 60 s)")
    drain_delay_s: float = option(0.0, "on SIGTERM, stay up this long with readiness false")

    @property
    def front_ends(self) -> int:
        """Front-end processes: --workers, else a share of the cores this process may run on, as many as
        /dev/shm has arenas for; one where several cannot work (--jpeg-decode device, --port 0)."""
        if self.workers is not None:
            return self.workers
        if self.jpeg_decode == "device" or self.port == 0:
            return 1
        share = max(1, min(8, usable_cores() // 2))
        fit = shared_memory_room() // int(self.arena_mb * MiB)
        return share if fit >= share else 1 if fit < 2 else fit

    @property
    def compiled(self) -> bool:
        """--compile, else whether the engine runs on CUDA."""
        return resolve_device(self.device).type == "cuda" if self.compile is None else self.compile

    @property
    def replica(self) -> str:
        """This replica's name: --replica-id, else host:port."""
        return self.replica_id or f"{socket.gethostname()}:{self.port}"

    def check(self) -> None:
        """Refuse settings that cannot be meant: a replica name no header can carry, a device torch does not know,
        empty tokens, and limits that are not positive."""
        if not (self.replica.isascii() and self.replica.isprintable()):
            raise ValueError(f"--replica-id {self.replica!r} must be printable ASCII: it is sent as a response header")
        try:
            resolve_device(self.device)
        except RuntimeError:
            raise ValueError(f"--device {self.device!r} is not a device: give auto, cpu, cuda or cuda:N") from None
        for flag, token in (
            ("--admin-token (MONASERVE_ADMIN_TOKEN)", self.admin_token),
            ("--api-token (MONASERVE_API_TOKEN)", self.api_token),
        ):
            if token is not None and not token.strip():
                raise ValueError(f"{flag} is set but empty: give a token (e.g. `openssl rand -hex 32`) or leave it unset")
        limits = (
            "max_request_pixels",
            "max_images_per_request",
            "max_request_mb",
            "max_body_buffer_mb",
            "max_response_mb",
            "max_connections",
            "header_timeout_s",
            "body_timeout_s",
            "request_timeout_s",
            "keep_alive_s",
            "decode_threads",
            "arena_mb",
            "demo_steps",
        )
        if self.mona_kernel == "triton":
            self._check_triton()
        if self.front_ends < 1:
            raise ValueError(f"--workers must be 1 or more, got {self.front_ends}")
        if self.front_ends > 1:
            self._check_front_ends()
        for name in limits:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.body_min_rate < 0:
            raise ValueError(f"--body-min-rate must be 0 (off) or positive, got {self.body_min_rate}")
        if not 0 <= self.grpc_port <= 65535 or self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"--grpc-port must be 0 (off) or a port other than --port's, got {self.grpc_port}")

    def _check_triton(self) -> None:
        """`--mona-kernel triton` needs Triton, and a GPU (the CPU runs Triton only under its test interpreter)."""
        if importlib.util.find_spec("triton") is None:
            raise ValueError("--mona-kernel triton needs Triton: install torch's CUDA build (it brings Triton) or use --mona-kernel torch")
        if resolve_device(self.device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--mona-kernel triton needs --device cuda (elsewhere Triton only runs under TRITON_INTERPRET=1, for tests)")

    def _check_front_ends(self) -> None:
        """What several front ends need: a port of their own choosing, CPU decoding, /dev/shm for their arenas."""
        count = self.front_ends
        if self.jpeg_decode == "device":
            raise ValueError("--jpeg-decode device needs --workers 1: front-end processes decode on the CPU, not on the engine's device")
        if self.port == 0:
            raise ValueError(f"--workers {count} needs a fixed --port: each front end binds the same one")
        need, room = count * int(self.arena_mb * MiB), shared_memory_room()
        if room < need:
            raise ValueError(
                f"--workers {count} needs {need >> 20} MiB of /dev/shm for its arenas ({count} x --arena-mb {self.arena_mb:g}), "
                f"{room >> 20} MiB are free: give /dev/shm more room (docker run --shm-size 1g; in Kubernetes an emptyDir "
                "with medium: Memory at /dev/shm) or lower --arena-mb or --workers"
            )
