#!/usr/bin/env python3
"""Runs README.md's grpcurl session against a fresh release geomatch and checks the answers.

Usage: readme_session.py PATH/TO/geomatch

Starts the server on free ports (gRPC and metrics), runs every `$ ` command between the
README's session markers (a trailing `&` runs it in the background; its output is checked
with the next command's), compares each answer line by line (`<...>` in the README matches
any text), scrapes /metrics once for the documented series, then stops the server with
SIGTERM and expects a clean exit. Exits non-zero on the first mismatch.
"""

import json
import re
import signal
import subprocess
import sys
import urllib.request

README_ADDR = "127.0.0.1:50051"
METRIC_SERIES = [
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_handling_seconds_bucket",
    "geomatch_indexed_users",
    "geomatch_occupied_cells",
    "geomatch_waiting_shakes",
    "geomatch_pings_total",
    "geomatch_searches_total",
    "geomatch_clears_total",
    "geomatch_shake_matches_total",
    "geomatch_shake_no_matches_total",
    "geomatch_rejections_total",
    "geomatch_pings_rejected_total",
    "geomatch_watches_opened_total",
    "geomatch_watches",
    "geomatch_accepted_handling_seconds_bucket",
]


def session_steps(readme):
    block = readme.split("<!-- session:begin -->")[1].split("<!-- session:end -->")[0]
    block = block.split("```console")[1].split("```")[0]
    steps = []
    for line in block.splitlines():
        if line.startswith("$ "):
            cmd = line[2:].strip()
            background = cmd.endswith(" &")
            steps.append({"cmd": cmd[:-2] if background else cmd, "bg": background, "want": []})
        elif steps:
            steps[-1]["want"].append(line)
    for s in steps:
        while s["want"] and not s["want"][-1].strip():
            s["want"].pop()
    return steps


def line_matches(want, got):
    parts = re.split(r"<[^<>]*>", want)
    pattern = ".+".join(re.escape(p) for p in parts)
    return re.fullmatch(pattern, got) is not None


def start_server(binary):
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--shake-window", "2s", "--log-format", "json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    addrs = {}
    while len(addrs) < 2:
        line = proc.stderr.readline()
        if not line:
            sys.exit(f"server exited before listening (code {proc.wait()})")
        try:
            fields = json.loads(line).get("fields", {})
        except json.JSONDecodeError:
            print("server: " + line.rstrip())
            continue
        msg = fields.get("message", "")
        if msg.endswith(" listening"):
            addrs[msg.split()[0]] = fields["addr"]
    return proc, addrs["gRPC"], addrs["metrics"]


def run(cmd, addr, background=False):
    cmd = cmd.replace(README_ADDR, addr)
    p = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if background:
        return p
    out, _ = p.communicate(timeout=30)
    return out


def main():
    binary = sys.argv[1]
    steps = session_steps(open("README.md").read())
    if not steps:
        sys.exit("no session found in README.md")
    proc, addr, metrics_addr = start_server(binary)
    failures = 0
    try:
        pending = []
        for step in steps:
            if step["bg"]:
                pending.append(run(step["cmd"], addr, background=True))
                continue
            out = run(step["cmd"], addr)
            for p in pending:
                out += p.communicate(timeout=30)[0]
            pending = []
            got = out.rstrip("\n").splitlines()
            want = step["want"]
            ok = len(got) == len(want) and all(line_matches(w, g) for w, g in zip(want, got))
            print(("ok   " if ok else "FAIL ") + step["cmd"][:110])
            if not ok:
                failures += 1
                print("  wanted:\n    " + "\n    ".join(want))
                print("  got:\n    " + "\n    ".join(got))
        body = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10).read().decode()
        for series in METRIC_SERIES:
            present = any(l.startswith(series) for l in body.splitlines())
            print(("ok   " if present else "FAIL ") + f"/metrics has {series}")
            failures += 0 if present else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    if code != 0:
        print(f"FAIL server exited with {code} on SIGTERM")
        failures += 1
    checks = sum(1 for s in steps if not s["bg"]) + len(METRIC_SERIES) + 1
    print(f"{checks - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
