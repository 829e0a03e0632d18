"""Start and stop a real Flower deployment on 127.0.0.1: a SuperLink, SuperNodes, ``flwr`` CLI calls.

Every process is started in its own session with the test's private environment, and stopped by PID: its
process group first, then any process still carrying the test's private ``FLWR_HOME`` (the SuperExec,
ServerApp and ClientApp processes the SuperLink and SuperNodes start). TLS material (a CA, a server
certificate for ``IP:127.0.0.1``, SuperNode key pairs in OpenSSH form) is made with ``cryptography``.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from simulation_helpers import kill_with_env

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "simulations" / "configs" / "smoke.toml"
HOST = "127.0.0.1"


def executable(name: str) -> str:
    """A console script of this Python's environment (``flwr``, ``flower-superlink``, ``ray``), found without PATH."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def process_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``extra``, and this Python's scripts first on PATH (the SuperLink and
    SuperNodes start ``flwr-serverapp`` / ``flwr-clientapp`` by name)."""
    env = {**os.environ, **extra}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def smoke_run_config(overrides: Mapping[str, object]) -> str:
    """The smoke config with ``overrides`` as one ``flwr run --run-config`` string (``key=value …``)."""

    def flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, object]:
        flat: dict[str, object] = {}
        for k, v in table.items():
            flat |= flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v}
        return flat

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f"'{v}'" if isinstance(v, str) else repr(v)

    flat = flatten(tomllib.loads(SMOKE.read_text())) | dict(overrides)
    return " ".join(f"{k}={value(v)}" for k, v in flat.items())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    """Poll ``predicate`` every 0.2 s; raise ``TimeoutError`` naming ``what`` (and the log's tail) if it stays false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"{what} not within {timeout:.0f} s\n{tail}")


@dataclass
class Processes:
    """The processes of one test; :meth:`stop_all` ends them (and their children) by PID."""

    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen:
        """Start ``cmd`` in a new session (its own process group), output to ``logs/<name>.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("w") as fh:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=process_env({**self.env, **env}), stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        kill_with_env("FLWR_HOME", self.env["FLWR_HOME"])  # SuperExec, ServerApp, ClientApp processes


def flwr_cli(args: list[str], env: Mapping[str, str], timeout: float, log: Path | None = None) -> tuple[int, str]:
    """Run ``flwr ARGS`` in the repository root; ``(exit code, output)``, exit code 124 after ``timeout``.

    ``flwr run --stream`` can exit 0 although the run failed: callers check what the run wrote.
    """
    try:
        proc = subprocess.run([executable("flwr"), *args], cwd=REPO, env=process_env(env), capture_output=True,
                              text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, out = 124, _text(err.stdout) + _text(err.stderr) + f"\n[flwr {args[0]}: killed after {timeout:.0f} s]"
    if log is not None:
        log.write_text(out)
    return code, out


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def superlink_cmd(port: int, tls: TlsFiles | None = None, node_auth: bool = False) -> list[str]:
    """``flower-superlink`` serving every API (Fleet, Control, Runtime) on ``127.0.0.1:port``; no ``uv sync``."""
    cmd = [executable("flower-superlink"), "--host", HOST, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    return cmd + (["--enable-supernode-auth"] if node_auth else [])


def supernode_cmd(superlink_port: int, port: int, partition: int, partitions: int, tls: TlsFiles | None = None,
                  private_key: Path | None = None, max_retries: int | None = None) -> list[str]:
    """``flower-supernode`` for data partition ``partition`` (its ClientApp runtime API on ``port``)."""
    cmd = [executable("flower-supernode"), "--superlink", f"{HOST}:{superlink_port}", "--port", str(port),
           "--node-config", f"partition-id={partition} num-partitions={partitions}"]
    cmd += ["--insecure"] if tls is None else ["--root-certificates", str(tls.ca_cert)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def write_connection(flwr_home: Path, name: str, port: int, tls: TlsFiles | None = None) -> None:
    """A SuperLink connection ``name`` in ``$FLWR_HOME/config.toml`` (what ``flwr run . <name>`` uses)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{HOST}:{port}"']
    lines += ["insecure = true"] if tls is None else [f'root-certificates = "{tls.ca_cert}"']
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls(directory: Path) -> TlsFiles:
    """A self-signed CA and a server certificate it signed for ``IP:127.0.0.1`` (SAN), valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("devft test CA")).issuer_name(name("devft test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(name(HOST)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address(HOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return files


def make_node_keys(directory: Path, stem: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH form (what ``ssh-keygen -t ecdsa -b 384`` writes): ``(private, public)``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / stem, directory / f"{stem}.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ) + b"\n")
    return private, public
