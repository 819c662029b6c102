#!/usr/bin/env python3
"""Measures how long a config reload takes, from the change on disk to the new table
serving requests, and the peak memory of keygate during the reload.

For each table size it writes a config with that many campaigns (3 keys and, by default,
20 networks each), starts the release keygate binary and the stand-in SMS API on loopback, then
replaces the file several times (a rename, as editors and Kubernetes do). Each new
version swaps one key of one campaign (with --change-all, one key of every campaign); the
time is taken until a request with the new key is accepted. Peak memory is VmHWM, reset with /proc/PID/clear_refs before each
reload, against VmRSS measured just before it.

Run from the repository root after `cargo build --release --bin keygate --example sms_api`:
    python3 benches/load/reload.py --campaigns 1000 100000 --networks 20
"""

import argparse
import hashlib
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

KEYGATE = "target/release/keygate"
STAND_IN = "target/release/examples/sms_api"
CLIENT_IP = "127.0.0.10"
ROUNDS = 5
DEADLINE_SECONDS = 60


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def key_of(campaign, key):
    return f"key_test_{campaign * 3 + key:043d}"


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def write_config(path, campaigns, networks_per_campaign, proxy_port, upstream_port, swapped_key, change_all=False):
    """Writes the config; `swapped_key` is the key that replaces campaign 0's key 0. With
    `change_all`, key 0 of every other campaign is replaced too, by a key derived from
    `swapped_key`, so that no campaign is the same as in the previous version."""
    lines = [
        'environment = "test"',
        "[listen]",
        f'proxy = ["127.0.0.1:{proxy_port}"]',
        "[upstream]",
        f'address = "127.0.0.1:{upstream_port}"',
        "[log]",
        "access = false",
        "[routes]",
        'campaign_paths = ["/api/v2/campaigns/{campaign}"]',
    ]
    for campaign in range(campaigns):
        networks = [f'"{CLIENT_IP}"'] if campaign == 0 else []
        base = 0x0A000000 + campaign * 32
        for index in range(networks_per_campaign - len(networks)):
            address = base + index * 2
            networks.append('"%d.%d.%d.%d"' % (address >> 24, (address >> 16) & 255, (address >> 8) & 255, address & 255))
        lines.append("[[campaigns]]")
        lines.append(f'id = "campaign_{campaign:08d}"')
        lines.append(f"allowed_ips = [{', '.join(networks)}]")
        for key in range(3):
            if (campaign, key) == (0, 0):
                token = swapped_key
            elif key == 0 and change_all:
                token = f"{swapped_key}-{campaign}"
            else:
                token = key_of(campaign, key)
            lines.append("[[campaigns.keys]]")
            lines.append(f'id = "key-{key}"')
            lines.append(f'sha256 = "{sha256(token)}"')
    temporary = path + ".tmp"
    with open(temporary, "w") as file:
        file.write("\n".join(lines) + "\n")
    return temporary


def status_with(port, key):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(CLIENT_IP, 0))
    body = b'{"recipient":"+15550100"}'
    connection.request(
        "POST",
        "/api/v2/campaigns/campaign_00000000/messages",
        body=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    status = connection.getresponse().status
    connection.close()
    return status


def memory_kib(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found")


def wait_for(condition, what):
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def measure(campaigns, networks_per_campaign, change_all, workdir):
    proxy_port, upstream_port = free_port(), free_port()
    path = os.path.join(workdir, f"keygate-{campaigns}.toml")
    os.replace(write_config(path, campaigns, networks_per_campaign, proxy_port, upstream_port, key_of(0, 0)), path)
    size_mib = os.path.getsize(path) / 2**20
    processes = []
    try:
        processes.append(subprocess.Popen([STAND_IN, f"127.0.0.1:{upstream_port}"], stderr=subprocess.DEVNULL))
        log = open(os.path.join(workdir, f"keygate-{campaigns}.log"), "w")
        started = time.monotonic()
        keygate = subprocess.Popen([KEYGATE, "run", "--config", path], stdout=log, stderr=log)
        processes.append(keygate)
        wait_for(lambda: port_open(proxy_port) and port_open(upstream_port), "keygate to listen")
        start_seconds = time.monotonic() - started
        assert status_with(proxy_port, key_of(0, 0)) == 201

        latencies, peaks, steadies = [], [], []
        previous = key_of(0, 0)
        for round_index in range(ROUNDS):
            new_key = f"key_test_round{round_index:038d}"
            temporary = write_config(path, campaigns, networks_per_campaign, proxy_port, upstream_port, new_key, change_all)
            # Let the stand-in and keygate settle after the previous reload.
            time.sleep(1.0)
            steadies.append(memory_kib(keygate.pid, "VmRSS"))
            with open(f"/proc/{keygate.pid}/clear_refs", "w") as clear:
                clear.write("5")
            changed = time.monotonic()
            os.replace(temporary, path)
            wait_for(lambda: status_with(proxy_port, new_key) == 201, "the new key")
            latencies.append(time.monotonic() - changed)
            peaks.append(memory_kib(keygate.pid, "VmHWM"))
            assert status_with(proxy_port, previous) == 401
            previous = new_key
        return {
            "campaigns": campaigns,
            "file_mib": size_mib,
            "start_seconds": start_seconds,
            "latencies": latencies,
            "steady_mib": [kib / 1024 for kib in steadies],
            "peak_mib": [kib / 1024 for kib in peaks],
        }
    finally:
        for process in processes:
            process.send_signal(signal.SIGINT)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaigns", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--networks", type=int, default=20, help="allowlist entries per campaign, 1 or more")
    parser.add_argument(
        "--change-all",
        action="store_true",
        help="change a key of every campaign in each version, not only of the first",
    )
    arguments = parser.parse_args()
    for binary in (KEYGATE, STAND_IN):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} is missing; run: cargo build --release --bin keygate --example sms_api")
    with tempfile.TemporaryDirectory() as workdir:
        for campaigns in arguments.campaigns:
            result = measure(campaigns, arguments.networks, arguments.change_all, workdir)
            latencies = result["latencies"]
            ratio = [peak / steady for peak, steady in zip(result["peak_mib"], result["steady_mib"])]
            print(
                f"campaigns={campaigns} networks={arguments.networks} change_all={arguments.change_all} file={result['file_mib']:.1f}MiB start={result['start_seconds']:.2f}s "
                f"reload_s(min/median/max)={min(latencies):.3f}/{statistics.median(latencies):.3f}/{max(latencies):.3f} "
                f"steady_rss_mib(min/median)={min(result['steady_mib']):.1f}/{statistics.median(result['steady_mib']):.1f} "
                f"peak_rss_mib(min/median/max)={min(result['peak_mib']):.1f}/{statistics.median(result['peak_mib']):.1f}/{max(result['peak_mib']):.1f} "
                f"peak/steady(max)={max(ratio):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
