#!/usr/bin/env python3
"""Runs the README's "Running a cluster" session as a user would: a loopback Redis Cluster
of three masters and three replicas, two geomatch replicas over it, a ping through one and
a search through the other, with the README's own commands. Checks the answer the README
shows (the user found, at the banded distance shown; the timestamp differs run to run),
then stops everything it started.

Usage: cluster_session.py PATH/TO/geomatch (run from the repository root; needs
redis-server, redis-cli and grpcurl on PATH). Loopback only.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time

SECTION = "## Running a cluster"


def blocks(readme):
    """The fenced blocks of the section, as (language, text)."""
    body = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", body, re.S)


def joined(text):
    """Shell lines with backslash continuations joined."""
    return text.replace("\\\n", " ")


def wait_for(what, check, within=30.0):
    """Polls `check` with a short backoff until it holds; fails naming `what`."""
    deadline = time.monotonic() + within
    delay = 0.05
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    sys.exit(f"cluster session: {what} did not happen within {within:.0f} s")


def split_json(text):
    """The JSON objects printed one after another."""
    decoder, out, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        obj, end = decoder.raw_decode(text, at)
        out.append(json.dumps(obj))
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return out


def quiet(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)


def main():
    binary = sys.argv[1]
    readme = open("README.md", encoding="utf-8").read()
    shells = [text for lang, text in blocks(readme) if lang == "sh"]
    answers = [text for lang, text in blocks(readme) if lang == "json"]
    if len(shells) < 2 or not answers:
        sys.exit("cluster session: the README section lost its setup, calls or answer")
    setup, calls = shells[0], shells[1]
    want = json.loads(answers[0])
    ports = sorted(set(re.findall(r"\b(7\d{3})\b", setup)))
    started = []
    try:
        shutil.rmtree("/tmp/gmc", ignore_errors=True)
        lines = [l for l in joined(setup).splitlines() if l.strip()]
        # The node loop and the cluster creation, as written.
        nodes = "\n".join(l for l in lines if "geomatch" not in l and "cargo build" not in l)
        r = subprocess.run(["bash", "-ec", nodes], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            sys.exit(f"cluster session: setup failed:\n{r.stdout}\n{r.stderr}")
        # Every node agrees the cluster is whole (not just the first one asked).
        def whole():
            for port in ports:
                info = quiet(f"redis-cli -p {port} cluster info").stdout
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
            return True

        wait_for("cluster_state:ok on every node", whole, within=60.0)
        # The two replicas, as written, with the binary under test.
        logs = []
        for line in lines:
            if line.startswith("target/release/geomatch"):
                args = line.rstrip("& ").split()[1:]
                log = tempfile.TemporaryFile()
                logs.append(log)
                started.append(
                    subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=log)
                )
        addrs = re.findall(r"--listen (\S+)", joined(setup))
        for addr, proc, log in zip(addrs, started, logs):

            def serving(a=addr, p=proc, l=log):
                if p.poll() is not None:
                    l.seek(0)
                    sys.exit(f"cluster session: geomatch on {a} exited:\n{l.read().decode()}")
                return "SERVING" in quiet(
                    f"grpcurl -plaintext {a} grpc.health.v1.Health/Check"
                ).stdout

            wait_for(f"geomatch on {addr} serving", serving, within=60.0)
        outputs = []
        for call in [l for l in joined(calls).splitlines() if l.strip()]:
            r = subprocess.run(call, shell=True, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                sys.exit(f"cluster session: {call!r} failed:\n{r.stderr}")
            outputs.append(r.stdout)
        got = json.loads(outputs[-1])
        strip = lambda users: [{k: v for k, v in u.items() if k != "lastSeenMs"} for u in users]
        if strip(got.get("users", [])) != strip(want["users"]):
            sys.exit(f"cluster session: expected {want}, got {got}")
        print(f"ok   a ping through {addrs[0]} is found through {addrs[1]}")
        # Two shakes, one through each replica, sent together as written: both matched,
        # each other's partner, one match id.
        if len(shells) < 3 or len(answers) < 2:
            sys.exit("cluster session: the README section lost its shake calls or answer")
        r = subprocess.run(["bash", "-ec", shells[2]], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            sys.exit(f"cluster session: the shakes failed:\n{r.stderr}")
        got = [json.loads(part) for part in split_json(r.stdout)]
        want = [json.loads(part) for part in split_json(answers[1])]
        same = lambda a: {k: v for k, v in a.items() if k != "matchId"}
        if [same(g) for g in got] != [same(w) for w in want]:
            sys.exit(f"cluster session: expected {want}, got {got}")
        if len({g["matchId"] for g in got}) != 1 or len(got[0]["matchId"]) != 32:
            sys.exit(f"cluster session: the two sides name different matches: {got}")
        print(f"ok   shakes through {addrs[0]} and {addrs[1]} pair with one match id")
        print("2 passed, 0 failed")
    finally:
        for p in started:
            p.terminate()
        for p in started:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        for port in ports:
            quiet(f"redis-cli -p {port} shutdown nosave")
        shutil.rmtree("/tmp/gmc", ignore_errors=True)


if __name__ == "__main__":
    main()
