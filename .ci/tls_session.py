#!/usr/bin/env python3
"""Runs the README's "Securing geomatch" commands as written against a release build:
makes the test certificates, starts geomatch with mutual TLS, and checks with grpcurl and
Python's grpcio that a call with the client certificate is answered and one without, with
an expired certificate or with one from another CA is refused, and that plaintext gets
nothing; then, with tokens and the authz file, that health is open, each caller may call
exactly what its line allows (PERMISSION_DENIED naming the method elsewhere) and an unknown
token is UNAUTHENTICATED; last, that a certificate rotated in place reaches new connections
while a WatchNearby stream opened before the rotation keeps receiving events.

Usage: tls_session.py <path to geomatch binary>. Needs openssl and grpcurl on PATH; grpcio
is installed with pip if missing. Loopback only.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

SECTION = "## Securing geomatch"


def blocks(readme):
    body = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [text for lang, text in re.findall(r"```(\w+)\n(.*?)```", body, re.S) if lang == "sh"]


def joined(text):
    return text.replace("\\\n", " ")


def main():
    binary = os.path.abspath(sys.argv[1])
    readme = open("README.md", encoding="utf-8").read()
    shells = blocks(readme)
    if len(shells) < 3:
        sys.exit("tls session: the README section lost its certificate, start or call blocks")
    certs, start, calls = shells[0], shells[1], shells[2]
    workdir = "/tmp/gm-tls"
    shutil.rmtree(workdir, ignore_errors=True)
    server = None
    try:
        r = subprocess.run(["bash", "-ec", certs], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            sys.exit(f"tls session: making certificates failed:\n{r.stderr}")
        args = joined(start).strip().rstrip("&").split()[1:]
        log = tempfile.TemporaryFile()
        server = subprocess.Popen([binary, *args], cwd=workdir, stdout=subprocess.DEVNULL, stderr=log)
        addr = re.search(r"--listen (\S+)", start).group(1)
        ok = "-cacert ca.pem -cert backend.pem -key backend.key"
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                log.seek(0)
                sys.exit(f"tls session: geomatch exited:\n{log.read().decode()}")
            r = subprocess.run(f"grpcurl {ok} {addr} grpc.health.v1.Health/Check", shell=True,
                               cwd=workdir, capture_output=True, text=True, timeout=30)
            if "SERVING" in r.stdout:
                break
            if time.monotonic() > deadline:
                sys.exit(f"tls session: geomatch never served TLS:\n{r.stderr}")
            time.sleep(0.2)
        lines = [l for l in joined(calls).splitlines() if l.strip()]
        mtls_lines = lines
        passed = 0
        # The first call, with the client certificate: answered with a cell.
        r = subprocess.run(lines[0], shell=True, cwd=workdir, capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or "cell" not in json.loads(r.stdout):
            sys.exit(f"tls session: {lines[0]!r} failed:\n{r.stdout}{r.stderr}")
        print("ok   a call with the client certificate is answered")
        passed += 1
        # The second, without one: refused.
        r = subprocess.run(lines[1], shell=True, cwd=workdir, capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            sys.exit(f"tls session: {lines[1]!r} was answered without a client certificate")
        print("ok   a call without a client certificate is refused")
        passed += 1
        # An expired client certificate, and one from another CA: refused.
        others = """
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=old -keyout old.key -out old.csr
openssl x509 -req -in old.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days -1 -out old.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=other-ca -keyout other-ca.key -out other-ca.pem
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=backend -keyout foreign.key -out foreign.csr
openssl x509 -req -in foreign.csr -CA other-ca.pem -CAkey other-ca.key -CAcreateserial -days 30 -extfile backend.ext -out foreign.pem
"""
        subprocess.run(["bash", "-ec", others], cwd=workdir, check=True, capture_output=True, timeout=60)
        for name in ["old", "foreign"]:
            bad = lines[0].replace("-cert backend.pem -key backend.key", f"-cert {name}.pem -key {name}.key")
            r = subprocess.run(bad, shell=True, cwd=workdir, capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                sys.exit(f"tls session: the {name} client certificate was accepted")
        print("ok   an expired client certificate and one from another CA are refused")
        passed += 1
        # Plaintext to the TLS port: nothing.
        r = subprocess.run(f"grpcurl -plaintext -max-time 5 {addr} list", shell=True,
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            sys.exit("tls session: plaintext was served on the TLS port")
        print("ok   plaintext gets nothing")
        passed += 1
        # grpcio, as the README says.
        try:
            import grpc  # noqa: F401
            from grpc_health.v1 import health_pb2  # noqa: F401
        except ImportError:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", "grpcio", "grpcio-health-checking"],
                           check=True, timeout=600)
        probe = f"""
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
read = lambda f: open(f, "rb").read()
def check(creds):
    ch = grpc.secure_channel("{addr}", creds)
    try:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    except grpc.RpcError as e:
        return str(e.code())
print(check(grpc.ssl_channel_credentials(read("ca.pem"), read("backend.key"), read("backend.pem"))))
print(check(grpc.ssl_channel_credentials(read("ca.pem"))))
"""
        r = subprocess.run([sys.executable, "-c", probe], cwd=workdir, capture_output=True, text=True, timeout=60)
        out = r.stdout.split()
        if out[:1] != ["1"] or len(out) < 2 or out[1] == "1":
            sys.exit(f"tls session: grpcio got {out}:\n{r.stderr[-500:]}")
        print("ok   grpcio: served with the client certificate, refused without")
        passed += 1
        # Tokens and the authz file, as written.
        if len(shells) < 5:
            sys.exit("tls session: the README section lost its authz blocks")
        setup, authz_calls = shells[3], shells[4]
        setup_lines = [l for l in joined(setup).splitlines() if l.strip()]
        files = "\n".join(l for l in setup_lines if not l.startswith("target/release/geomatch"))
        subprocess.run(["bash", "-ec", files], cwd=workdir, check=True, timeout=30)
        start_line = next(l for l in setup_lines if l.startswith("target/release/geomatch"))
        auth_addr = re.search(r"--listen (\S+)", start_line).group(1)
        authed = subprocess.Popen([binary, *start_line.rstrip("& ").split()[1:]], cwd=workdir,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Health needs no token (grpcio's stub: grpcurl would need reflection, which
            # follows the authz file).
            health = f"""
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
ch = grpc.secure_channel("{auth_addr}", grpc.ssl_channel_credentials(open("ca.pem", "rb").read()))
try:
    print(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status)
except grpc.RpcError as e:
    print(e.code())
"""
            deadline = time.monotonic() + 60
            while subprocess.run([sys.executable, "-c", health], cwd=workdir, capture_output=True,
                                 text=True, timeout=30).stdout.strip() != "1":
                if authed.poll() is not None or time.monotonic() > deadline:
                    sys.exit("tls session: geomatch with auth never served health without a token")
                time.sleep(0.2)
            print("ok   health is open without a token")
            passed += 1
            lines = [l for l in joined(authz_calls).splitlines() if l.strip()]
            r = subprocess.run(lines[0], shell=True, cwd=workdir, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                sys.exit(f"tls session: the operator's search failed:\n{r.stdout}{r.stderr}")
            print("ok   the operator may search")
            passed += 1
            r = subprocess.run(lines[1], shell=True, cwd=workdir, capture_output=True, text=True, timeout=30)
            out = r.stdout + r.stderr
            if r.returncode == 0 or "PermissionDenied" not in out or "UpdateLocation" not in out:
                sys.exit(f"tls session: the operator's ping was not refused by name:\n{out}")
            print("ok   the operator may not ping: PERMISSION_DENIED naming the method")
            passed += 1
            backend = lines[1].replace("tok-operator", "tok-backend")
            r = subprocess.run(backend, shell=True, cwd=workdir, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                sys.exit(f"tls session: the backend's ping failed:\n{r.stdout}{r.stderr}")
            print("ok   the backend may ping")
            passed += 1
            wrong = lines[0].replace("tok-operator", "tok-nobody")
            r = subprocess.run(wrong, shell=True, cwd=workdir, capture_output=True, text=True, timeout=30)
            if r.returncode == 0 or "Unauthenticated" not in r.stdout + r.stderr:
                sys.exit(f"tls session: an unknown token was not UNAUTHENTICATED:\n{r.stdout}{r.stderr}")
            print("ok   an unknown token is UNAUTHENTICATED")
            passed += 1
        finally:
            authed.terminate()
            authed.wait(timeout=15)
        # Rotation: a WatchNearby stream opened now survives; new connections get the new
        # certificate (from a new CA) without a restart.
        watcher = subprocess.run(mtls_lines[0].replace('"user_id":"alice"', '"user_id":"watcher"'),
                                 shell=True, cwd=workdir, capture_output=True, text=True, timeout=30)
        if watcher.returncode != 0:
            sys.exit(f"tls session: the watcher's ping failed:\n{watcher.stderr}")
        watch = subprocess.Popen(
            f"grpcurl {ok} -d '{{\"user_id\":\"watcher\",\"radius_m\":1000}}' {addr} geomatch.v1.Nearby/WatchNearby",
            shell=True, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = watch.stdout.readline()
            while first and "SNAPSHOT_END" not in first:
                first = watch.stdout.readline()
            rotate = """
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=new-ca -keyout new-ca.key -out new-ca.pem
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=server -keyout new-server.key -out new-server.csr
openssl x509 -req -in new-server.csr -CA new-ca.pem -CAkey new-ca.key -CAcreateserial -days 30 -extfile server.ext -out new-server.pem
mv new-server.key server.key && mv new-server.pem server.pem
"""
            subprocess.run(["bash", "-ec", rotate], cwd=workdir, check=True, capture_output=True, timeout=60)
            new_ok = ok.replace("-cacert ca.pem", "-cacert new-ca.pem")
            deadline = time.monotonic() + 15
            while "SERVING" not in subprocess.run(f"grpcurl {new_ok} {addr} grpc.health.v1.Health/Check",
                                                  shell=True, cwd=workdir, capture_output=True,
                                                  text=True, timeout=30).stdout:
                if time.monotonic() > deadline:
                    sys.exit("tls session: the rotated certificate was not served within 15 s")
                time.sleep(0.2)
            near = mtls_lines[0].replace("-cacert ca.pem", "-cacert new-ca.pem").replace('"user_id":"alice"', '"user_id":"near"')
            r = subprocess.run(near, shell=True, cwd=workdir, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                sys.exit(f"tls session: a call with the new certificate failed:\n{r.stderr}")
            seen = ""
            deadline = time.monotonic() + 15
            while '"near"' not in seen and time.monotonic() < deadline:
                line = watch.stdout.readline()
                if not line:
                    break
                seen += line
            if '"near"' not in seen:
                sys.exit(f"tls session: the stream opened before the rotation saw nothing after it:\n{seen}")
            print("ok   a rotated certificate reaches new connections; an open WatchNearby lives on")
            passed += 1
        finally:
            watch.kill()
            watch.wait()
        print(f"{passed} passed, 0 failed")
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
