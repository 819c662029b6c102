#!/usr/bin/env python3
"""Compares keygate with nginx doing the same checks, on one machine, in one run.

It starts a fast upstream (nginx returning a fixed JSON body), nginx configured as a key
and allowlist filter like keygate's (`geo` allowlists, a `map` from Authorization to
campaign, the campaign checked against the path, identity headers set), and keygate in
release mode, then drives each with wrk in interleaved rounds. Servers run on CPU 0 and
wrk on CPU 1 (`taskset`), so the proxies compete with the upstream, not with the load
generator. CPU time per request comes from /proc/PID/stat of the proxy's processes.

Scenarios: allowed POST with a small JSON body and allowed GET on kept-alive
connections, POST with an unknown key (401), POST with a key whose campaign does not
allow the client (403; wrk cannot choose its source address, so the client is 127.0.0.1
and the key's campaign allows only 127.0.0.2), and allowed POST with a new connection per
request.

Run from the repository root (installs nginx and wrk with apt-get when missing, builds
keygate with cargo, stops every process it started):
    python3 benches/load/compare.py --seconds 5 --rounds 3
"""

import argparse
import hashlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

UPSTREAM_PORT, NGINX_PORT, KEYGATE_PORT = 18080, 18081, 18083
KEY_A = "key_test_" + "A" * 43
KEY_B = "key_test_" + "B" * 43
BODY = '{"recipient":"+15550100","body":"hello"}'
PATH_A = "/api/v2/campaigns/campaign_a/messages"
PATH_B = "/api/v2/campaigns/campaign_b/messages"
TICKS = os.sysconf("SC_CLK_TCK")

SCENARIOS = {
    "post": ("POST", PATH_A, KEY_A, True, False),
    "get": ("GET", PATH_A, KEY_A, False, False),
    "reject_401": ("POST", PATH_A, "key_test_unknown", True, False),
    "reject_403": ("POST", PATH_B, KEY_B, True, False),
    "new_connection": ("POST", PATH_A, KEY_A, True, True),
}


def ensure_tools():
    missing = [tool for tool in ("nginx", "wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light", "wrk"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "keygate"], check=True)


def nginx_conf(workdir, name, server_block):
    path = os.path.join(workdir, f"{name}.conf")
    with open(path, "w") as file:
        file.write(f"""
worker_processes 1;
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


def configs(workdir):
    upstream = nginx_conf(workdir, "upstream", f"""
    server {{
        listen 127.0.0.1:{UPSTREAM_PORT};
        location / {{
            default_type application/json;
            return 201 '{{"id":"message_1","latestStatus":"created"}}';
        }}
    }}""")
    proxy = nginx_conf(workdir, "nginx_proxy", f"""
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
    keygate = os.path.join(workdir, "keygate.toml")
    with open(keygate, "w") as file:
        file.write(f"""environment = "test"
[listen]
proxy = ["127.0.0.1:{KEYGATE_PORT}"]
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
    return upstream, proxy, keygate


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


def status_of(port, method, path, key, body):
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request(method, path, body=BODY if body else None,
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    status = connection.getresponse().status
    connection.close()
    return status


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


def wait_port(port):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode == 0:
            return
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    arguments = parser.parse_args()
    ensure_tools()
    processes = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in ("upstream-body", "upstream-proxy", "nginx_proxy-body", "nginx_proxy-proxy"):
            os.makedirs(os.path.join(workdir, name))
        upstream_conf, proxy_conf, keygate_conf = configs(workdir)
        try:
            for command in (["nginx", "-c", upstream_conf], ["nginx", "-c", proxy_conf],
                            ["target/release/keygate", "run", "--config", keygate_conf]):
                processes.append(subprocess.Popen(["taskset", "-c", "0", *command],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for port in (UPSTREAM_PORT, NGINX_PORT, KEYGATE_PORT):
                wait_port(port)
            targets = {"nginx": (NGINX_PORT, processes[1].pid), "keygate": (KEYGATE_PORT, processes[2].pid)}
            scripts = {name: wrk_script(workdir, name, *spec) for name, spec in SCENARIOS.items()}
            for name, (method, path, key, body, _) in SCENARIOS.items():
                statuses = {target: status_of(port, method, path, key, body) for target, (port, _) in targets.items()}
                if len(set(statuses.values())) != 1:
                    sys.exit(f"{name}: nginx and keygate answer differently: {statuses}")
                print(f"{name}: both answer {statuses['nginx']}", file=sys.stderr)
            for name, script in scripts.items():  # warm-up
                for target, (port, _) in targets.items():
                    run_wrk(port, script, 1, 8)
            results = {(scenario, target): [] for scenario in SCENARIOS for target in targets}
            for _ in range(arguments.rounds):
                for scenario, script in scripts.items():
                    for target, (port, pid) in targets.items():
                        pids = process_tree(pid)
                        before = cpu_seconds(pids)
                        run = run_wrk(port, script, arguments.seconds, arguments.connections)
                        run["cpu_us"] = (cpu_seconds(pids) - before) / max(run["requests"], 1) * 1e6
                        results[(scenario, target)].append(run)
        finally:
            for process in processes:
                process.send_signal(signal.SIGINT if process is processes[-1] else signal.SIGQUIT)
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()

    print(f"| scenario | target | req/s median (min-max) | ratio to nginx | p50 ms | p99 ms | CPU us/req | ratio to nginx | non-2xx | socket errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        base = results[(scenario, "nginx")]
        base_rate = statistics.median(r["rate"] for r in base)
        base_cpu = statistics.median(r["cpu_us"] for r in base)
        for target in ("nginx", "keygate"):
            runs = results[(scenario, target)]
            rate = statistics.median(r["rate"] for r in runs)
            cpu = statistics.median(r["cpu_us"] for r in runs)
            print(f"| {scenario} | {target} | {rate:,.0f} ({min(r['rate'] for r in runs):,.0f}-{max(r['rate'] for r in runs):,.0f}) "
                  f"| {rate / base_rate:.2f} | {statistics.median(r['p50'] for r in runs):.2f} "
                  f"| {statistics.median(r['p99'] for r in runs):.2f} | {cpu:.1f} | {cpu / base_cpu:.2f} "
                  f"| {sum(r['non_2xx'] for r in runs)} | {runs[-1]['socket_errors'] or '-'} |")


if __name__ == "__main__":
    main()
