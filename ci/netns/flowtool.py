#!/usr/bin/env python3
"""ci/netns/flowtool.py: K plain TCP flows, one listening port each, and their rates.

    flowtool.py serve --bind ADDR --port BASE --flows K [--seconds T] [--warmup W] [--timeout S]
    flowtool.py send  --to ADDR   --port BASE --flows K  --seconds T  [--timeout S]
    flowtool.py run   --prefix PREFIX --from HOST --to HOST --port BASE --flows K [--seconds T]
                      [--warmup W] [--timeout S]

`serve` listens on ports BASE .. BASE+K-1 (one listening socket per flow, so that each flow
has its own listening port: that is the port ci/netns/flowcap.sh classifies flows by), prints
`ready` once all of them listen, accepts one connection on each, counts the bytes each one
receives, and when the sender is done prints one JSON object:

    {"flows": K, "seconds": S, "mbit": [per-flow Mbit/s], "total_mbit": sum}

The rates are measured by the receiver over the steady part only: from WARMUP seconds after
the last flow connected (default 1.0 s, which skips TCP slow start and the shapers' initial
bursts) to the moment the first flow ended. 1 Mbit/s = 10^6 bit/s.

`send` connects flow i to port BASE+i (source ports are the kernel's ephemeral ones), sends
zeros on every flow for T seconds, then closes them.

`run` does both across the namespace hosts of ci/netns/hosts.sh: `serve` in PREFIX-TO (on the
address `hosts.sh addr TO` gives), then `send` in PREFIX-FROM once it is ready, and prints the
server's JSON object with "from" and "to" added. Data goes FROM -> TO.

Every blocking step has a deadline (--timeout, default 30 s, on top of T for the transfer):
a listener nobody connects to, a peer that stops reading, a connection that cannot be made.
Errors are printed as `flowtool: ...` and exit with status 1; bad arguments exit with 2.
Plain Python 3 (standard library), no other dependency.
"""

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

CHUNK = 256 * 1024


def fail(msg):
    print(f"flowtool: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def serve(args):
    listeners = []
    for i in range(args.flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((args.bind, args.port + i))
        except OSError as e:
            fail(f"cannot listen on {args.bind}:{args.port + i}: {e}")
        s.listen(1)
        s.settimeout(args.timeout)
        listeners.append(s)
    print("ready", flush=True)

    conns = []
    for i, s in enumerate(listeners):
        try:
            c, _ = s.accept()
        except socket.timeout:
            fail(f"no connection on port {args.port + i} within {args.timeout} s")
        s.close()
        conns.append(c)
    connected = time.monotonic()

    counts = [0] * args.flows
    ended = [None] * args.flows
    errors = []

    def receive(i, c):
        # The sender stops after --seconds: allow that plus the timeout for silence.
        c.settimeout(args.timeout)
        buf = bytearray(CHUNK)
        try:
            while True:
                n = c.recv_into(buf)
                if n == 0:
                    break
                counts[i] += n
        except OSError as e:
            errors.append(f"flow {i} (port {args.port + i}): {e}")
        ended[i] = time.monotonic()
        c.close()

    threads = [threading.Thread(target=receive, args=(i, c), daemon=True) for i, c in enumerate(conns)]
    for t in threads:
        t.start()

    start = connected + args.warmup
    deadline = connected + args.seconds + args.timeout
    t0 = b0 = None
    last = None
    while True:
        time.sleep(0.05)
        now = time.monotonic()
        if any(e is not None for e in ended):
            break
        if now > deadline:
            fail(f"flows still running {args.seconds + args.timeout} s after they connected")
        sample = (now, list(counts))
        if t0 is None and now >= start:
            t0, b0 = sample
        last = sample
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if errors:
        fail("; ".join(errors))
    if t0 is None or last is None or last[0] - t0 < 0.5:
        fail(f"the flows ended before a steady period of 0.5 s after the {args.warmup} s warm-up: "
             f"send for longer (--seconds)")
    t1, b1 = last
    secs = t1 - t0
    mbit = [(b1[i] - b0[i]) * 8 / secs / 1e6 for i in range(args.flows)]
    print(json.dumps({"flows": args.flows, "seconds": round(secs, 3),
                      "mbit": [round(m, 1) for m in mbit], "total_mbit": round(sum(mbit), 1)}),
          flush=True)


def send(args):
    conns = []
    for i in range(args.flows):
        try:
            c = socket.create_connection((args.to, args.port + i), timeout=args.timeout)
        except OSError as e:
            fail(f"cannot connect to {args.to}:{args.port + i}: {e}")
        conns.append(c)
    end = time.monotonic() + args.seconds
    errors = []

    def pump(i, c):
        data = memoryview(bytes(CHUNK))
        try:
            while time.monotonic() < end:
                c.sendall(data)
        except OSError as e:
            errors.append(f"flow {i} (port {args.port + i}): {e}")
        c.close()

    threads = [threading.Thread(target=pump, args=(i, c), daemon=True) for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + args.timeout)
    if any(t.is_alive() for t in threads):
        fail(f"a flow could not finish sending within {args.timeout} s after the {args.seconds} s")
    if errors:
        fail("; ".join(errors))


def run(args):
    here = os.path.dirname(os.path.abspath(__file__))
    hosts_sh = os.path.join(here, "hosts.sh")
    addr = subprocess.run([hosts_sh, "addr", args.to], capture_output=True, text=True, timeout=10)
    if addr.returncode != 0:
        fail(f"--to {args.to}: {addr.stderr.strip()}")
    addr = addr.stdout.strip()
    me = [sys.executable, os.path.abspath(__file__)]
    common = ["--port", str(args.port), "--flows", str(args.flows), "--seconds", str(args.seconds),
              "--timeout", str(args.timeout)]
    server = subprocess.Popen(["ip", "netns", "exec", f"{args.prefix}-{args.to}", *me, "serve",
                               "--bind", addr, "--warmup", str(args.warmup), *common],
                              stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([server.stdout], [], [], args.timeout)
        line = server.stdout.readline() if ready else ""
        if line.strip() != "ready":
            fail(f"the receiver in {args.prefix}-{args.to} did not get ready within {args.timeout} s"
                 f" (it said {line.strip()!r})")
        budget = args.seconds + 2 * args.timeout
        try:
            sent = subprocess.run(["ip", "netns", "exec", f"{args.prefix}-{args.fr}", *me, "send",
                                   "--to", addr, *common], timeout=budget)
        except subprocess.TimeoutExpired:
            fail(f"the sender in {args.prefix}-{args.fr} did not finish within {budget} s")
        if sent.returncode != 0:
            fail(f"the sender in {args.prefix}-{args.fr} failed (exit {sent.returncode})")
        try:
            out, _ = server.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            fail(f"the receiver in {args.prefix}-{args.to} did not report within {args.timeout} s")
        if server.returncode != 0:
            fail(f"the receiver in {args.prefix}-{args.to} failed (exit {server.returncode})")
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            fail(f"the receiver's report is not JSON: {out!r}")
        result["from"], result["to"] = args.fr, args.to
        print(json.dumps(result), flush=True)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "send", "run"):
        q = sub.add_parser(name)
        if name == "run":
            q.add_argument("--prefix", required=True)
            q.add_argument("--from", dest="fr", required=True, help="sending host (h1, h2, h3)")
            q.add_argument("--to", required=True, help="receiving host")
        else:
            q.add_argument("--bind" if name == "serve" else "--to", required=True)
        q.add_argument("--port", type=int, required=True, help="first port (flow i uses port + i)")
        q.add_argument("--flows", type=int, required=True)
        q.add_argument("--seconds", type=float, default=5.0)
        q.add_argument("--timeout", type=float, default=30.0)
        if name != "send":
            q.add_argument("--warmup", type=float, default=1.0)
    args = p.parse_args()
    if not 1 <= args.flows <= 256:
        p.error("--flows must be 1..256")
    if not 1 <= args.port or args.port + args.flows - 1 > 65535:
        p.error("--port .. --port + --flows - 1 must lie in 1..65535")
    if args.seconds <= 0 or args.timeout <= 0:
        p.error("--seconds and --timeout must be positive")
    if args.cmd != "send" and args.warmup < 0:
        p.error("--warmup must not be negative")
    {"serve": serve, "send": send, "run": run}[args.cmd](args)


if __name__ == "__main__":
    main()
