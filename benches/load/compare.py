#!/usr/bin/env python3
"""Compares keygate with nginx and HAProxy doing the same checks, on one machine, in one run.

It starts a fast upstream (nginx returning a fixed JSON body); nginx and HAProxy
configured as key and allowlist filters like keygate's (per-campaign address lists, the
Authorization header mapped to a campaign, the campaign checked against the path,
identity headers set); and one or more keygate release binaries. It drives each with wrk
in interleaved rounds. Servers run on CPU 0 and wrk on CPU 1 (`taskset`), so the proxies
compete with the upstream, not with the load generator. CPU time per request comes from
/proc/PID/stat of each proxy's processes.

Scenarios: allowed POST with a small JSON body and allowed GET on kept-alive
connections, POST with an unknown key (401), POST with a key whose campaign does not
allow the client (403; wrk cannot choose its source address, so the client is 127.0.0.1
and the key's campaign allows only 127.0.0.2), and allowed POST with a new connection per
request.

With --instructions N, each proxy is then started again under callgrind, and for each
scenario the instructions it executes for N requests from one client are counted (user
space only; the counters are zeroed after a warm-up). This figure does not depend on
machine noise.

Run from the repository root (installs nginx, HAProxy, wrk and valgrind with apt-get
when missing, builds keygate with cargo, stops every process it started):
    python3 benches/load/compare.py --seconds 5 --rounds 3 --instructions 2000
Compare keygate builds side by side with --keygate NAME=PATH, once for each binary.
"""

import argparse
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

UPSTREAM_PORT, NGINX_PORT, HAPROXY_PORT, KEYGATE_PORT = 18080, 18081, 18082, 18083
KEY_A = "key_test_" + "A" * 43
KEY_B = "key_test_" + "B" * 43
BODY = '{"recipient":"+15550100","body":"hello"}'
PATH_A = "/api/v2/campaigns/campaign_a/messages"
PATH_B = "/api/v2/campaigns/campaign_b/messages"
TICKS = os.sysconf("SC_CLK_TCK")

# name: (method, path, key, with body, new connection per request)
SCENARIOS = {
    "post": ("POST", PATH_A, KEY_A, True, False),
    "get": ("GET", PATH_A, KEY_A, False, False),
    "reject_401": ("POST", PATH_A, "key_test_unknown", True, False),
    "reject_403": ("POST", PATH_B, KEY_B, True, False),
    "new_connection": ("POST", PATH_A, KEY_A, True, True),
}
TOOLS = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk", "valgrind": "valgrind",
         "callgrind_control": "valgrind"}


def ensure_tools(keygates):
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if "target/release/keygate" in keygates.values():
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "keygate"], check=True)


def nginx_conf(workdir, name, server_block):
    path = os.path.join(workdir, f"{name}.conf")
    for directory in ("body", "proxy"):
        os.makedirs(os.path.join(workdir, f"{name}-{directory}"), exist_ok=True)
    with open(path, "w") as file:
        # One process without a master, so that callgrind measures the worker itself.
        file.write(f"""
worker_processes 1;
master_process off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    map_hash_bucket_size 128;
    client_body_temp_path {workdir}/{name}-body;
    proxy_temp_path {workdir}/{name}-proxy;
    {server_block}
}}
""")
    return path


def upstream_conf(workdir):
    return nginx_conf(workdir, "upstream", f"""
    server {{
        listen 127.0.0.1:{UPSTREAM_PORT};
        location / {{
            default_type application/json;
            return 201 '{{"id":"message_1","latestStatus":"created"}}';
        }}
    }}""")


def nginx_proxy_conf(workdir):
    return nginx_conf(workdir, "nginx_proxy", f"""
    geo $allowed_a {{ default 0; 127.0.0.1 1; }}
    geo $allowed_b {{ default 0; 127.0.0.2 1; }}
    geo $any_campaign {{ default 0; 127.0.0.1 1; 127.0.0.2 1; }}
    map $http_authorization $campaign {{
        "Bearer {KEY_A}" campaign_a;
        "Bearer {KEY_B}" campaign_b;
        default "";
    }}
    map $campaign $ip_ok {{ campaign_a $allowed_a; campaign_b $allowed_b; default 0; }}
    map $uri $path_campaign {{ ~^/api/v2/campaigns/(?<c>[^/]+) $c; default ""; }}
    map "$campaign:$path_campaign" $campaign_ok {{
        "campaign_a:campaign_a" 1; "campaign_b:campaign_b" 1; default 0;
    }}
    upstream backend {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{NGINX_PORT};
        default_type application/json;
        location / {{
            if ($any_campaign = 0) {{ return 403 '{{"error":{{"code":"invalid_ip_address_used"}}}}'; }}
            if ($campaign = "") {{ return 401 '{{"error":{{"code":"invalid_api_key_provided"}}}}'; }}
            if ($ip_ok = 0) {{ return 403 '{{"error":{{"code":"invalid_ip_address_used"}}}}'; }}
            if ($campaign_ok = 0) {{ return 403 '{{"error":{{"code":"campaign_not_allowed"}}}}'; }}
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Keygate-Campaign $campaign;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}""")


def haproxy_conf(workdir):
    path = os.path.join(workdir, "haproxy.cfg")
    error = 'content-type application/json string \'{"error":{"code":"%s"}}\''
    with open(path, "w") as file:
        # HAProxy 2.6 failed to start with maxconn 20000 on the benchmark machine, because
        # it could not raise its file limit that far.
        file.write(f"""
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend keys
    bind 127.0.0.1:{HAPROXY_PORT}
    acl key_a req.hdr(authorization) -m str "Bearer {KEY_A}"
    acl key_b req.hdr(authorization) -m str "Bearer {KEY_B}"
    acl from_a src 127.0.0.1
    acl from_b src 127.0.0.2
    acl path_a path_reg ^/api/v2/campaigns/campaign_a(/|$)
    acl path_b path_reg ^/api/v2/campaigns/campaign_b(/|$)
    http-request return status 403 {error % "invalid_ip_address_used"} unless from_a or from_b
    http-request return status 401 {error % "invalid_api_key_provided"} unless key_a or key_b
    http-request return status 403 {error % "invalid_ip_address_used"} if key_a !from_a or key_b !from_b
    http-request return status 403 {error % "campaign_not_allowed"} if key_a !path_a or key_b !path_b
    http-request set-header X-Keygate-Campaign campaign_a if key_a
    http-request set-header X-Keygate-Campaign campaign_b if key_b
    http-request set-header X-Forwarded-For %[src]
    default_backend upstream
backend upstream
    http-reuse always
    server upstream 127.0.0.1:{UPSTREAM_PORT}
""")
    return path


def keygate_conf(workdir, port):
    path = os.path.join(workdir, f"keygate-{port}.toml")
    with open(path, "w") as file:
        file.write(f"""environment = "test"
[listen]
proxy = ["127.0.0.1:{port}"]
[upstream]
address = "127.0.0.1:{UPSTREAM_PORT}"
[routes]
campaign_paths = ["/api/v2/campaigns/{{campaign}}"]
[log]
access = false
[[campaigns]]
id = "campaign_a"
allowed_ips = ["127.0.0.1"]
keys = [{{ id = "primary", sha256 = "{hashlib.sha256(KEY_A.encode()).hexdigest()}" }}]
[[campaigns]]
id = "campaign_b"
allowed_ips = ["127.0.0.2"]
keys = [{{ id = "primary", sha256 = "{hashlib.sha256(KEY_B.encode()).hexdigest()}" }}]
""")
    return path


def proxies(workdir, keygates):
    """Returns each proxy under test: name -> (port, command)."""
    targets = {
        "nginx": (NGINX_PORT, ["nginx", "-c", nginx_proxy_conf(workdir)]),
        "haproxy": (HAPROXY_PORT, ["haproxy", "-db", "-f", haproxy_conf(workdir)]),
    }
    for offset, (name, binary) in enumerate(keygates.items()):
        port = KEYGATE_PORT + offset
        targets[name] = (port, [binary, "run", "--config", keygate_conf(workdir, port)])
    return targets


def wrk_script(workdir, name, method, path, key, body, close):
    headers = [f'wrk.headers["Authorization"] = "Bearer {key}"']
    if body:
        headers.append('wrk.headers["Content-Type"] = "application/json"')
        headers.append(f"wrk.body = '{BODY}'")
    if close:
        headers.append('wrk.headers["Connection"] = "close"')
    script = os.path.join(workdir, f"{name}.lua")
    with open(script, "w") as file:
        file.write(f'wrk.method = "{method}"\nwrk.path = "{path}"\n' + "\n".join(headers) + "\n")
    return script


def send_requests(port, scenario, count):
    """Sends `count` requests of a scenario from one client and returns their statuses."""
    method, path, key, body, close = SCENARIOS[scenario]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if close:
        headers["Connection"] = "close"
    statuses = set()
    connection = None
    for _ in range(count):
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request(method, path, body=BODY if body else None, headers=headers)
        response = connection.getresponse()
        response.read()
        statuses.add(response.status)
        if response.will_close:
            connection.close()
            connection = None
    if connection is not None:
        connection.close()
    return statuses


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return total / TICKS


def process_tree(pid):
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [int(child) for child in children]


def wait_port(port, process, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server for port {port} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing answers on port {port}")


def run_wrk(port, script, seconds, connections):
    output = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script,
         f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))

    def latency(label):
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", output).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    return {"requests": requests, "rate": rate, "p50": latency(" 50"), "p99": latency(" 99"),
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0, "socket_errors": errors.group(1) if errors else ""}


class Servers:
    """Starts servers pinned to CPU 0 and stops every one of them on exit."""

    def __init__(self):
        self.processes = []

    def start(self, command, port, prefix=(), seconds=20):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            sys.exit(f"port {port} is already in use by another process")
        except OSError:
            pass
        process = subprocess.Popen(["taskset", "-c", "0", *prefix, *command],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes.append(process)
        wait_port(port, process, seconds)
        return process

    def stop(self, process):
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.processes.remove(process)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for process in list(self.processes):
            self.stop(process)


def load_rounds(servers, targets, workdir, arguments):
    started = {name: servers.start(command, port) for name, (port, command) in targets.items()}
    for scenario in SCENARIOS:
        statuses = {name: send_requests(port, scenario, 1) for name, (port, _) in targets.items()}
        if len({tuple(status) for status in statuses.values()}) != 1:
            sys.exit(f"{scenario}: the proxies return different statuses: {statuses}")
        print(f"{scenario}: every proxy returns {statuses['nginx']}", file=sys.stderr)
    scripts = {name: wrk_script(workdir, name, *spec) for name, spec in SCENARIOS.items()}
    for script in scripts.values():  # warm-up
        for port, _ in targets.values():
            run_wrk(port, script, 1, 8)
    results = {(scenario, name): [] for scenario in SCENARIOS for name in targets}
    for _ in range(arguments.rounds):
        for scenario, script in scripts.items():
            for name, (port, _) in targets.items():
                pids = process_tree(started[name].pid)
                before = cpu_seconds(pids)
                run = run_wrk(port, script, arguments.seconds, arguments.connections)
                run["cpu_us"] = (cpu_seconds(pids) - before) / max(run["requests"], 1) * 1e6
                results[(scenario, name)].append(run)
    for process in started.values():
        servers.stop(process)
    return results


def instruction_counts(servers, targets, workdir, count):
    """Counts the user-space instructions per request of each proxy under callgrind."""
    counts = {}
    for name, (port, command) in targets.items():
        output = os.path.join(workdir, f"callgrind.{name}")
        process = servers.start(command, port, seconds=120, prefix=(
            "valgrind", "--tool=callgrind", "--vgdb=yes", "--trace-children=yes", f"--callgrind-out-file={output}"))
        for scenario in SCENARIOS:
            send_requests(port, scenario, 50)
            subprocess.run(["callgrind_control", "--zero", str(process.pid)], check=True, capture_output=True)
            send_requests(port, scenario, count)
            subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True, capture_output=True)
            dumps = [file for file in os.listdir(workdir) if file.startswith(f"callgrind.{name}.")]
            latest = max(dumps, key=lambda file: int(file.rsplit(".", 1)[1]))
            with open(os.path.join(workdir, latest)) as dump:
                total = int(re.search(r"^summary: (\d+)", dump.read(), re.M).group(1))
            counts[(scenario, name)] = total / count
            print(f"{scenario}: {name}: {total / count:,.0f} instructions per request", file=sys.stderr)
        servers.stop(process)
    return counts


def print_report(results, counts, names):
    def median(runs, field):
        return statistics.median(run[field] for run in runs)

    print("| scenario | target | req/s median (min-max) | ratio to nginx | p50 ms | p99 ms "
          "| CPU µs/req median (min-max) | ratio to nginx | instructions/req | ratio to nginx "
          "| non-2xx | socket errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        base = results[(scenario, "nginx")]
        base_rate, base_cpu = median(base, "rate"), median(base, "cpu_us")
        base_count = counts.get((scenario, "nginx"))
        for name in names:
            runs = results[(scenario, name)]
            rate, cpu = median(runs, "rate"), median(runs, "cpu_us")
            count = counts.get((scenario, name))
            instructions = f"{count:,.0f} | {count / base_count:.2f}" if count and base_count else "- | -"
            print(f"| {scenario} | {name} "
                  f"| {rate:,.0f} ({min(r['rate'] for r in runs):,.0f}-{max(r['rate'] for r in runs):,.0f}) "
                  f"| {rate / base_rate:.2f} | {median(runs, 'p50'):.2f} | {median(runs, 'p99'):.2f} "
                  f"| {cpu:.1f} ({min(r['cpu_us'] for r in runs):.1f}-{max(r['cpu_us'] for r in runs):.1f}) "
                  f"| {cpu / base_cpu:.2f} | {instructions} "
                  f"| {sum(r['non_2xx'] for r in runs)} | {runs[-1]['socket_errors'] or '-'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--instructions", type=int, default=0, metavar="N",
                        help="count instructions over N requests per scenario under callgrind (0: skip)")
    parser.add_argument("--keygate", action="append", metavar="NAME=PATH",
                        help="a keygate binary to compare (default: keygate=target/release/keygate)")
    arguments = parser.parse_args()
    keygates = dict(entry.split("=", 1) for entry in arguments.keygate or ["keygate=target/release/keygate"])
    ensure_tools(keygates)
    with tempfile.TemporaryDirectory() as workdir, Servers() as servers:
        servers.start(["nginx", "-c", upstream_conf(workdir)], UPSTREAM_PORT)
        targets = proxies(workdir, keygates)
        results = load_rounds(servers, targets, workdir, arguments)
        counts = instruction_counts(servers, targets, workdir, arguments.instructions) \
            if arguments.instructions else {}
    print_report(results, counts, list(targets))


if __name__ == "__main__":
    main()
