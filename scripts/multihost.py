"""``multihost``: two hosts behind HAProxy, a rolling upgrade, a drain, a kill -9, under load.

    python scripts/multihost.py [--short] [--plot FILE.png] [--json FILE] [--loopback]

Why: a cluster that outgrows one machine becomes one backend among several behind the load
balancer the user already runs. This scenario shows, end to end and with a real HAProxy,
that the cluster is a first-class backend: the client's real address reaches the handler
(PROXY v2), an upgrade of every host costs no request, a host leaves and rejoins the rotation
without a single error, and a host that dies costs only the requests it had in flight.

How it goes:

1. **Topology.** Four hosts with addresses of their own: ``lb`` (HAProxy), ``a`` and ``b``
   (a cluster each, 2 sync workers), ``client``. As root with iproute2 they are network
   namespaces made here, joined by a bridge in a fifth: 10.200.0.2 (lb), .3 (a), .4 (b),
   .10 (client). Otherwise loopback addresses: 127.0.0.2 (lb, also HAProxy's source address),
   127.0.0.3, 127.0.0.4, and the client on 127.0.0.1.
2. **HAProxy** (Debian's ``haproxy``, installed with apt-get when missing and we are root), in
   TCP mode: ``send-proxy-v2`` to each host, an HTTP health check and an agent-check on each
   host's ``--health`` port, retries with redispatch. Each host's listeners require PROXY v2,
   trusted from the lb's address only (``?proxy=v2``, ``--proxy-allow``). A checkout without
   the PROXY listener runs the rest without it, and says so.
3. **Correctness.** The client asks the ``whoami:Whoami`` handler, through HAProxy, who it is: the
   answer must be the client's own address and port.
4. **Under load** (``loadtest`` in the client's namespace, a new connection per request,
   through HAProxy): upgrade host a (USR2), then b; drain a (``ctl drain``), stop it (TERM,
   ``--drain-delay``), start it again and undrain it; kill -9 b's master and start it again.
   The client's errors are counted per phase: none through the upgrades and the drain, and
   through the kill at most the requests in flight (at most one per connection).
5. **The plot**: per-host requests per second (from each cluster's ``--metrics``, sampled
   four times a second) and the client's errors, with every step marked.
6. **Cleanup**, always (the end, a failure, Ctrl-C, TERM): every process we started ended by
   its pid (INT, then KILL), orphans reaped (we are their subreaper), namespaces deleted.

Exit codes: 0 the scenario passed; 1 it failed (the summary says which check); 2 usage;
3 it cannot run here (no HAProxy and no way to install it): one line saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cluster import ctl, pidfile
from cluster.procfs import alive, become_subreaper, descendants, reap_if_ours

ROOT = Path(__file__).resolve().parent.parent
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_CANNOT = 0, 1, 2, 3
NETNS_ADDRESSES = {"lb": "10.200.0.2", "a": "10.200.0.3", "b": "10.200.0.4",
                   "client": "10.200.0.10"}  # fmt: skip
LOOPBACK_ADDRESSES = {"lb": "127.0.0.2", "a": "127.0.0.3", "b": "127.0.0.4",
                      "client": "127.0.0.1"}  # fmt: skip
CONCURRENCY = 4  # client connections, each with one request in flight
RATE = 400  # requests per second in all (open loop): a steady total that the hosts share, and
# a new connection per request stays well within the ports TIME_WAIT holds (28k per minute)
SAMPLE_EVERY = 0.25  # seconds between scrapes of each host's metrics


class Failed(Exception):
    """A step that did not happen as it should; the message says which."""


class CannotRun(Exception):
    """The scenario cannot run on this machine (exit 3)."""


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``condition`` until it is truthy; Failed naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)  # a polling interval


def run_quiet(argv: list[str]) -> None:
    """A set-up command that must succeed; Failed with its own error line otherwise."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise Failed(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


# ------------------------------------------------------------------------------ topology
@dataclass
class Node:
    """One host: its address, and the namespace its processes run in (None: this one)."""

    name: str
    address: str
    netns: str | None = None

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv


class Topology:
    """The hosts' addresses: network namespaces on a bridge we make (and delete), or
    loopback addresses, which need nothing."""

    def __init__(self, use_netns: bool) -> None:
        self.tag = f"pcmh{os.getpid()}"  # unique per run: runs side by side do not collide
        self.use_netns = use_netns
        addresses = NETNS_ADDRESSES if use_netns else LOOPBACK_ADDRESSES
        self.nodes = {name: Node(name, address, f"{self.tag}-{name}" if use_netns else None)
                      for name, address in addresses.items()}  # fmt: skip
        self.made: list[str] = []  # namespaces to delete

    @staticmethod
    def netns_possible() -> str | None:
        """None if namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "not root"
        if shutil.which("ip") is None:
            return "no iproute2 (ip)"
        return None

    def describe(self) -> str:
        kind = "network namespaces on a bridge" if self.use_netns else "loopback addresses"
        hosts = ", ".join(f"{n.name} {n.address}" for n in self.nodes.values())
        return f"{kind}: {hosts}"

    def up(self) -> None:
        if not self.use_netns:
            return
        switch = f"{self.tag}-sw"
        self._add(switch)
        run_quiet(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
        run_quiet(["ip", "-n", switch, "link", "set", "br0", "up"])
        for node in self.nodes.values():
            assert node.netns is not None
            self._add(node.netns)
            port = f"v{node.name}"  # the bridge's side, in the switch's namespace
            run_quiet(["ip", "-n", switch, "link", "add", "name", port, "type", "veth", "peer",
                       "name", "eth0", "netns", node.netns])  # fmt: skip
            run_quiet(["ip", "-n", switch, "link", "set", port, "master", "br0", "up"])
            run_quiet(["ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev",
                       "eth0"])  # fmt: skip
            run_quiet(["ip", "-n", node.netns, "link", "set", "eth0", "up"])
            run_quiet(["ip", "-n", node.netns, "link", "set", "lo", "up"])
            # Ours to tune: a connection per request leaves many ports in TIME_WAIT.
            run_quiet(node.command(["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                                    "net.ipv4.ip_local_port_range=1024 65000"]))  # fmt: skip

    def _add(self, name: str) -> None:
        run_quiet(["ip", "netns", "add", name])
        self.made.append(name)

    def down(self) -> None:
        """Delete every namespace we made (their veth ends go with them)."""
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made.clear()


def free_port(address: str) -> int:
    """A port free on ``address`` now (loopback mode: runs side by side need their own)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ processes
class Processes:
    """Every process we started, by pid, to end at the end whatever happened."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.popens: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
              stdout: int | None = None) -> subprocess.Popen:  # fmt: skip
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=stdout if stdout is not None else out, stderr=out,
                                    env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
        self.popens.append(proc)
        self.pids.add(proc.pid)
        return proc

    def note(self, pid: int) -> None:
        self.pids.add(pid)

    def end_all(self) -> None:
        """INT to what we started (a master's quick stop: it stops its own workers without
        the --drain-delay a TERM would wait out; HAProxy stops as on TERM), KILL after 5 s
        to whatever is left of them and of what they started, then reap."""
        everyone = set(self.pids)
        for pid in list(everyone):
            everyone.update(descendants(pid))
        for sig, pids, wait in ((signal.SIGINT, set(self.pids), 5.0),
                                (signal.SIGKILL, everyone, 5.0)):  # fmt: skip
            for pid in pids:
                if alive(pid):
                    try:
                        os.kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_still(pid) for pid in pids):
                time.sleep(0.05)  # a polling interval
        for proc in self.popens:
            try:
                proc.wait(1)
            except subprocess.TimeoutExpired:
                pass


def _still(pid: int) -> bool:
    reap_if_ours(pid)
    return alive(pid)


# ------------------------------------------------------------------------------ the hosts
@dataclass
class Ports:
    echo: int
    peer: int
    health: int


@dataclass
class Host:
    """One cluster on one node: started, upgraded, drained, stopped, killed by the scenario."""

    name: str
    node: Node
    ports: Ports
    lb: Node
    workdir: Path
    procs: Processes
    proxy: bool
    drain_delay: float
    masters: list[int] = field(default_factory=list)  # every master pid it ever had

    @property
    def control(self) -> Path:
        return self.workdir / f"{self.name}.ctl"

    @property
    def metrics(self) -> Path:
        return self.workdir / f"{self.name}.metrics"

    @property
    def pidfile(self) -> Path:
        return self.workdir / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def echo_uri(self) -> str:
        return f"tcp://{self.node.address}:{self.ports.echo}"

    def argv(self) -> list[str]:
        proxy = "?proxy=v2" if self.proxy else ""
        address = self.node.address
        argv = [sys.executable, "-m", "cluster", "run", "echo", "-w", "2", "-k", "sync",
                "-b", f"{self.echo_uri}{proxy}",
                "-b", f"tcp://{address}:{self.ports.peer}{proxy}=whoami:Whoami",
                "--health", f"tcp://{address}:{self.ports.health}",
                "--metrics", f"unix:{self.metrics}", "--control", str(self.control),
                "--pidfile", str(self.pidfile), "--name", f"host-{self.name}",
                "--drain-delay", f"{self.drain_delay:g}", "--graceful-timeout", "30"]  # fmt: skip
        if self.proxy:
            argv += ["--proxy-allow", f"{self.lb.address}/32"]
        return self.node.command(argv)

    def start(self, wait: bool = True) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "apps"),
                                                           str(ROOT)])}  # fmt: skip
        proc = self.procs.start(self.argv(), self.log, env)
        self.masters.append(proc.pid)
        if wait:
            self.wait_ready(proc.pid)

    def pid(self) -> int | None:
        return pidfile.read(str(self.pidfile))

    def status(self) -> dict:
        """The master's status from its control socket, asked in this process (polled while
        waiting: a ``cluster ctl`` process per look would cost a Python start each)."""
        try:
            return ctl.ask(str(self.control), {"cmd": "status"}, timeout=2)
        except (ctl.Unreachable, ValueError):
            return {}

    def ask(self, *args: str) -> dict:
        """``cluster ctl --json ARGS``, as the operator types it."""
        done = subprocess.run([sys.executable, "-m", "cluster", "ctl", "--control",
                               str(self.control), "--json", *args], capture_output=True,
                              text=True, timeout=20, cwd=ROOT)  # fmt: skip
        if done.returncode == 3:
            return {"ok": False, "error": done.stderr.strip()}
        return json.loads(done.stdout or "{}")

    def wait_ready(self, pid: int, timeout: float = 40) -> None:
        def ready() -> bool:
            if not alive(pid):
                raise Failed(f"host {self.name}: master {pid} exited; see {self.log}")
            status = self.status()
            return status.get("pid") == pid and status.get("health", {}).get("state") == "ready"

        wait_until(ready, timeout, f"host {self.name} to be ready")

    def upgrade(self) -> None:
        old = self.pid()
        assert old is not None
        os.kill(old, signal.SIGUSR2)
        new = wait_until(lambda: (p := self.pid()) != old and p, 40,
                         f"host {self.name}'s new master")  # fmt: skip
        self.procs.note(int(new))
        self.masters.append(int(new))
        wait_until(lambda: not _still(old), 40, f"host {self.name}'s old master {old} to exit")
        self.wait_ready(int(new))

    def stop(self) -> None:
        pid = self.pid()
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _still(pid), 30, f"host {self.name}'s master {pid} to stop")

    def kill(self) -> None:
        pid = self.pid()
        assert pid is not None
        workers = descendants(pid)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(_still(p) for p in (pid, *workers)), 10,
                   f"host {self.name}'s master and workers to die")  # fmt: skip

    def requests(self) -> dict[str, float] | None:
        """The echo listener's requests so far per live worker, from the metrics (None: no
        answer). Per worker, because during an upgrade either master may answer the shared
        metrics socket, each with its own workers, and a restarted master counts from 0."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(self.metrics))
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return None
        from prometheus_client.parser import text_string_to_metric_families

        body = data.partition(b"\r\n\r\n")[2].decode(errors="replace")
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                labels = sample.labels
                if (sample.name == "cluster_requests_total" and labels.get("worker") != "retired"
                        and labels.get("listener", "").startswith(self.echo_uri)):  # fmt: skip
                    counts[labels["worker"]] = sample.value
        return counts


# ------------------------------------------------------------------------------ HAProxy
def haproxy_config(lb: Node, hosts: list[Host], ports: dict[str, int], stats: Path,
                   proxy: bool, source: bool) -> str:  # fmt: skip
    """The config the scenario runs (and docs/deploy.md shows): TCP mode, PROXY v2 to the
    hosts, HTTP health check and agent-check on each host's --health port, retries that
    redispatch a refused connection to the other host."""
    server_options = (f"check inter 300ms fastinter 200ms downinter 300ms rise 1 fall 2 "
                      f"agent-check agent-inter 300ms weight 100"
                      f"{' send-proxy-v2' if proxy else ''}"
                      f"{f' source {lb.address}' if source else ''}")  # fmt: skip
    lines = [
        "global",
        f"    stats socket {stats} mode 600 level admin",
        "    maxconn 4096",
        "defaults",
        "    mode tcp",
        "    timeout connect 1s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout check 2s",
        "    retries 3",
        "    option redispatch 1",
    ]
    for service in ("echo", "peer"):
        lines += [
            f"frontend {service}",
            f"    bind {lb.address}:{ports[service]}",
            f"    default_backend {service}_hosts",
            f"backend {service}_hosts",
            "    balance roundrobin",
            "    option httpchk GET /ready",
            "    http-check expect status 200",
        ]
        for host in hosts:
            port = host.ports.echo if service == "echo" else host.ports.peer
            lines.append(f"    server {host.name} {host.node.address}:{port} {server_options} "
                         f"port {host.ports.health} agent-port {host.ports.health}")  # fmt: skip
    return "\n".join(lines) + "\n"


def ensure_haproxy() -> str:
    """The haproxy binary, installed from Debian when missing (root only)."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None
    )
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise CannotRun("haproxy is not installed, and installing it needs root and apt-get")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "haproxy"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
        if done.returncode != 0 and argv[1] == "install":
            raise CannotRun(f"apt-get install haproxy failed: {done.stderr.strip()[-200:]}")
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(found):
        raise CannotRun("apt-get install haproxy left no haproxy binary")
    return found


class HAProxy:
    def __init__(self, binary: str, node: Node, config: str, workdir: Path,
                 procs: Processes, stats: Path) -> None:  # fmt: skip
        self.binary, self.node, self.workdir, self.procs, self.stats = (binary, node, workdir,
                                                                        procs, stats)  # fmt: skip
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(config)
        self.log = workdir / "haproxy.log"

    def start(self) -> None:
        check = subprocess.run(self.node.command([self.binary, "-c", "-q", "-f",
                                                  str(self.config_path)]),
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        if check.returncode != 0:
            raise Failed(f"haproxy refused its config: {check.stderr.strip()}")
        self.proc = self.procs.start(self.node.command([self.binary, "-db", "-f",
                                                        str(self.config_path)]), self.log)  # fmt: skip
        wait_until(self.stats.exists, 10, "haproxy's stats socket")

    def servers(self, backend: str = "echo_hosts") -> dict[str, dict[str, str]]:
        """``show stat``: each server's row (status UP/DOWN/DRAIN/MAINT, weight...)."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r.get("pxname") == backend
                and r["svname"] not in ("FRONTEND", "BACKEND")}  # fmt: skip

    def status(self, server: str) -> str:
        row = self.servers().get(server, {})
        return f"{row.get('status', '?')} weight {row.get('weight', '?')}"

    def wait(self, server: str, wanted: Callable[[str, int], bool], what: str,
             timeout: float = 15) -> None:  # fmt: skip
        def seen() -> bool:
            row = self.servers().get(server)
            return bool(row) and wanted(row["status"], int(row["weight"] or 0))

        wait_until(seen, timeout, f"haproxy to see {server} {what}")


# ------------------------------------------------------------------------------ the scenario
class Sampler(threading.Thread):
    """Every host's request count, four times a second, with the master that gave it."""

    def __init__(self, hosts: list[Host]) -> None:
        super().__init__(daemon=True)
        self.hosts = hosts
        self.samples: list[tuple[float, str, dict[str, float] | None]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = time.time()
            for host in self.hosts:
                self.samples.append((now, host.name, host.requests()))
            self.done.wait(SAMPLE_EVERY)

    def rates(self) -> dict[str, list[tuple[float, float]]]:
        """Per host, requests per second between samples: what each worker served since the
        most its count was ever seen at (a worker's count only grows)."""
        found: dict[str, list[tuple[float, float]]] = {}
        best: dict[str, dict[str, float]] = {}
        last: dict[str, float] = {}
        for t, name, counts in self.samples:
            seen = best.setdefault(name, {})
            served = 0.0
            for worker, count in (counts or {}).items():
                served += max(0.0, count - seen.get(worker, 0.0))
                seen[worker] = max(count, seen.get(worker, 0.0))
            if name in last:
                found.setdefault(name, []).append((t, served / max(t - last[name], 1e-6)))
            last[name] = t
        return found

    def served_since(self, name: str, since: float) -> float:
        rates = [(t, r) for t, r in self.rates().get(name, []) if t > since]
        return sum(r for _, r in rates)


@dataclass
class Scenario:
    short: bool
    loopback: bool
    plot: str | None
    json_path: str | None
    workdir: Path
    events: list[tuple[float, str]] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def mark(self, label: str) -> None:
        self.events.append((time.time(), label))
        with open(self.workdir / "events", "a") as out:
            out.write(f"{time.time():.6f} {label}\n")
        print(f"  {time.strftime('%H:%M:%S')} {label}", flush=True)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    def settle(self, seconds: float) -> None:
        time.sleep(seconds)  # load runs meanwhile: the plot shows each step's effect

    def run(self) -> int:
        reason = None if self.loopback else Topology.netns_possible()
        topology = Topology(use_netns=reason is None)
        procs = Processes()
        become_subreaper()  # an upgrade's new master, orphaned, comes to us to reap
        try:
            binary = ensure_haproxy()
            from cluster import listeners

            proxy = "proxy" in getattr(listeners, "BIND_OPTIONS", ())
            print(f"multihost: {topology.describe()}"
                  f"{f' (no namespaces: {reason})' if reason else ''}")  # fmt: skip
            if not proxy:
                print("multihost: this checkout has no PROXY protocol listener (?proxy=v2): "
                      "HAProxy connects plainly and the client-address check is skipped")  # fmt: skip
            try:
                topology.up()
            except Failed as err:  # a container without the rights, say: loopback then
                topology.down()
                topology = Topology(use_netns=False)
                print(f"multihost: cannot make namespaces ({err}); {topology.describe()}")
            return self.scenario(topology, binary, proxy, procs)
        except CannotRun as err:
            print(f"multihost: cannot run here: {err}", file=sys.stderr)
            return EXIT_CANNOT
        except Failed as err:
            self.check("scenario", False, str(err))
            for log in sorted(self.workdir.glob("*.log")):  # what each process said last
                tail = log.read_text(errors="replace").splitlines()[-8:]
                print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr)
            return EXIT_FAIL
        finally:
            procs.end_all()
            topology.down()

    def scenario(self, topology: Topology, binary: str, proxy: bool, procs: Processes) -> int:
        nodes = topology.nodes
        lb, client = nodes["lb"], nodes["client"]
        delay = 1.0 if self.short else 3.0
        hosts = []
        for name in ("a", "b"):
            node = nodes[name]
            ports = (Ports(8000, 8001, 8081) if topology.use_netns else
                     Ports(free_port(node.address), free_port(node.address),
                           free_port(node.address)))  # fmt: skip
            hosts.append(Host(name, node, ports, lb, self.workdir, procs, proxy, delay))
        a, b = hosts
        for host in hosts:
            host.start(wait=False)  # both boot at once
        for host in hosts:
            host.wait_ready(host.masters[-1])
        front = ({"echo": 9000, "peer": 9001} if topology.use_netns else
                 {"echo": free_port(lb.address), "peer": free_port(lb.address)})  # fmt: skip
        stats = self.workdir / "haproxy.stats"
        haproxy = HAProxy(binary, lb, haproxy_config(lb, hosts, front, stats, proxy,
                                                     source=not topology.use_netns),
                          self.workdir, procs, stats)  # fmt: skip
        haproxy.start()
        for host in hosts:
            haproxy.wait(host.name, lambda s, w: s == "UP" and w > 0, "up")
        print(f"multihost: haproxy {lb.address}:{front['echo']} -> a, b: all UP")

        # Correctness: the handler sees the client, not HAProxy.
        seen = self.whoami(client, lb.address, front["peer"])
        if proxy:
            self.check("client address", seen["seen"] == seen["local"],
                       f"the handler saw {seen['seen'][0]}:{seen['seen'][1]}, the client is "
                       f"{seen['local'][0]}:{seen['local'][1]} (HAProxy is {lb.address})")  # fmt: skip
        else:
            print(f"  (no PROXY: the handler saw {seen['seen'][0]}, HAProxy's address)")

        load = self.start_load(client, lb.address, front["echo"], topology.use_netns, procs)
        sampler = Sampler(hosts)
        sampler.start()
        settle = 0.6 if self.short else 3.0
        wait_until(lambda: all(sampler.served_since(h.name, 0) > 0 for h in hosts), 15,
                   "both hosts to serve load")  # fmt: skip
        self.settle(settle)
        self.mark("usr2 a")
        a.upgrade()
        self.settle(settle / 2)
        self.mark("usr2 b")
        b.upgrade()
        self.settle(settle / 2)
        self.mark("drain a")
        a.ask("drain")
        haproxy.wait("a", lambda s, w: s in ("DRAIN", "DOWN", "MAINT") or w == 0, "drained")
        self.settle(settle / 2)
        self.mark("stop a")
        a.stop()
        self.settle(settle / 2)
        self.mark("start a")
        a.start()
        self.mark("undrain a")
        a.ask("undrain")
        haproxy.wait("a", lambda s, w: s == "UP" and w > 0, "back up")
        back = time.time()
        wait_until(lambda: sampler.served_since("a", back) > 0, 10, "host a to serve again")
        self.settle(settle)
        self.mark("kill -9 b")
        b.kill()
        haproxy.wait("b", lambda s, w: s != "UP", "down")
        self.settle(settle / 2)
        self.mark("start b")
        b.start()
        haproxy.wait("b", lambda s, w: s == "UP" and w > 0, "back up")
        back = time.time()
        wait_until(lambda: sampler.served_since("b", back) > 0, 10, "host b to serve again")
        self.settle(settle)
        self.mark("end")
        result = self.end_load(load)
        sampler.done.set()
        sampler.join(5)
        return self.verdict(result, sampler, hosts)

    def whoami(self, client: Node, host: str, port: int) -> dict:
        done = subprocess.run(client.command([sys.executable, __file__, "whoami", host,
                                              str(port)]),
                              capture_output=True, text=True, timeout=30, cwd=ROOT)  # fmt: skip
        if done.returncode != 0:
            raise Failed(f"whoami through haproxy failed: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def start_load(self, client: Node, host: str, port: int, remote: bool,
                   procs: Processes) -> subprocess.Popen:  # fmt: skip
        (self.workdir / "events").write_text("")
        argv = [sys.executable, "-m", "loadtest", f"tcp://{host}:{port}", "--duration", "600",
                "-c", str(CONCURRENCY), "--rate", str(RATE), "--connect", "per-request",
                "--timeout", "5",
                "--json", str(self.workdir / "load.json"), "--events",
                str(self.workdir / "events"), "-q"]  # fmt: skip
        if remote:
            argv += ["--allow-remote", host]
        return procs.start(client.command(argv), self.workdir / "load.log")

    def end_load(self, load: subprocess.Popen) -> dict:
        load.send_signal(signal.SIGINT)  # the load tester stops, reports, writes its JSON
        try:
            load.wait(30)
        except subprocess.TimeoutExpired:
            raise Failed("the load tester did not stop") from None
        path = self.workdir / "load.json"
        if not path.exists():
            raise Failed(
                f"the load tester wrote no result: {(self.workdir / 'load.log').read_text()}"
            )
        return json.loads(path.read_text())

    def verdict(self, result: dict, sampler: Sampler, hosts: list[Host]) -> int:
        times = dict((label, t) for t, label in self.events)
        phases = [("rolling upgrade a, b", times["usr2 a"], times["drain a"]),
                  ("drain, stop, start, undrain a", times["drain a"], times["kill -9 b"]),
                  ("kill -9 b, start b", times["kill -9 b"], times["end"] + 5)]  # fmt: skip
        timeline = result.get("timeline", [])
        before = sum(e["errors"] for e in timeline if e["time"] + e["span"] <= phases[0][1])
        counted = []
        for name, start, end in phases:
            errors = sum(e["errors"] for e in timeline
                         if start < e["time"] + e["span"] <= end or (e["time"] < start < e["time"] + e["span"]
                                                                   and name == phases[-1][0]))  # fmt: skip
            counted.append((name, errors))
        requests = result.get("totals", {}).get("requests", 0)
        summary = result.get("errors", {})
        print(f"multihost: {requests} requests through haproxy, errors by kind {summary}")
        self.check("before the steps", before == 0, f"{before} errors")
        self.check(counted[0][0], counted[0][1] == 0, f"{counted[0][1]} errors (must be 0)")
        self.check(counted[1][0], counted[1][1] == 0, f"{counted[1][1]} errors (must be 0)")
        self.check(counted[2][0], counted[2][1] <= CONCURRENCY,
                   f"{counted[2][1]} errors (at most the {CONCURRENCY} requests in flight)")  # fmt: skip
        for host in hosts:
            self.check(f"host {host.name} served after its restart",
                       sampler.served_since(host.name, times["start " + host.name]) > 0,
                       f"masters {', '.join(map(str, host.masters))}")  # fmt: skip
        if self.plot:
            draw(self.plot, sampler, self.events, timeline, self.short)
            print(f"multihost: plot in {self.plot}")
        if self.json_path:
            Path(self.json_path).write_text(json.dumps({
                "requests": requests, "errors": summary, "phases": counted,
                "events": self.events, "checks": self.checks,
                "rates": sampler.rates()}, indent=1))  # fmt: skip
        failed = [name for name, ok, _ in self.checks if not ok]
        print(f"multihost: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
        return EXIT_FAIL if failed else EXIT_PASS


def draw(path: str, sampler: Sampler, events: list[tuple[float, str]], timeline: list[dict],
         short: bool) -> None:  # fmt: skip
    """Per-host requests per second and the client's errors, every step marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    t0 = events[0][0] - (1.0 if short else 3.0)
    figure, (top, bottom) = pyplot.subplots(2, 1, sharex=True, figsize=(10, 6),
                                            height_ratios=(3, 1))  # fmt: skip
    for (name, points), color in zip(sorted(sampler.rates().items()), ("tab:blue", "tab:orange"),
                                     strict=False):  # fmt: skip
        top.plot([t - t0 for t, _ in points], [r for _, r in points], color=color,
                 label=f"host {name}", linewidth=1.2)  # fmt: skip
    if timeline:
        edges = [e["time"] - t0 for e in timeline] + [
            timeline[-1]["time"] + timeline[-1]["span"] - t0
        ]
        bottom.stairs([e["errors"] for e in timeline], edges, color="tab:red", label="errors")
    for axis in (top, bottom):
        for t, _ in events:
            axis.axvline(t - t0, color="grey", linewidth=0.6, linestyle="--")
    for t, label in events:
        top.annotate(label, (t - t0, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                     fontsize=7, va="top", ha="right")  # fmt: skip
    top.set_title("requests per second per host behind HAProxy (from each cluster's --metrics)",
                  fontsize=9)  # fmt: skip
    top.set_ylabel("requests / s")
    top.set_ylim(bottom=0)
    top.legend(loc="lower left", fontsize=8)
    bottom.set_ylabel("client errors / s")
    bottom.set_xlabel("seconds")
    bottom.set_ylim(bottom=0, top=max([e["errors"] for e in timeline] + [1]) + 1)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def whoami(host: str, port: int) -> int:
    """In the client's namespace: ask ``whoami:Whoami`` through HAProxy who we are (it
    answers ``HOST PORT LINE``)."""
    with socket.create_connection((host, port), timeout=10) as sock, sock.makefile("rb") as answer:
        local = sock.getsockname()[:2]
        sock.sendall(b"who am i?\n")
        data = answer.readline()
    seen_host, seen_port, *_ = data.decode().split() + ["", "0"]
    print(json.dumps({"local": [local[0], local[1]], "seen": [seen_host, int(seen_port)]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["whoami"] and len(argv) == 3:
        return whoami(argv[1], int(argv[2]))
    parser = argparse.ArgumentParser(prog="multihost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the quick version (make test)")
    parser.add_argument("--loopback", action="store_true",
                        help="loopback addresses even where namespaces are possible")  # fmt: skip
    parser.add_argument("--plot", metavar="FILE.png", help="per-host requests per second")
    parser.add_argument("--json", metavar="FILE", help="the numbers, the events and the checks")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="multihost-"))

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the finally blocks clean up

    signal.signal(signal.SIGTERM, stop)
    try:
        return Scenario(args.short, args.loopback, args.plot, args.json, workdir).run()
    except KeyboardInterrupt:
        print("multihost: interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"multihost: logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
