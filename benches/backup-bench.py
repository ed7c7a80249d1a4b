#!/usr/bin/env python3
"""Inputs, QEMU driver and report of the backup cases of benches/vs-qemu.sh (--backup).

python3 standard library only.

Subcommands:
  writes SEED SPREAD CONTIG_AT CONTIG_MIB NSCATTER
      qemu-io commands (one per line) on stdout: CONTIG_MIB MiB of contiguous
      writes at byte CONTIG_AT (64 MiB per command), then NSCATTER 64 KiB
      writes at distinct seeded random 64 KiB-aligned offsets below SPREAD
      that miss the contiguous range. Each command writes its own byte
      pattern (-P 1..255).
  qemu-backup SRC BITMAP TARGET
      QEMU's offline incremental backup (backup-anchors.md section 3.2):
      qemu-storage-daemon with SRC opened read-only, QMP blockdev-add of
      TARGET (a qcow2 already created with its backing file) and
      blockdev-backup sync=bitmap bitmap-mode=never, waits for the job,
      blockdev-del (which flushes the target), quit, waits for the daemon to
      exit. The daemon is this script's child, so GNU time on the script
      reports the larger of the two peak RSS values. Exit 1 if the job fails.
  report RESULTS HEADER [OUT]
      Median table from the TSV the script writes (case, tool, run, ms,
      rss_kb, cpu_percent, bytes, status), printed and, with OUT, appended
      as Markdown. Ratios are time / the case's first tool ("ours").
"""

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CS = 1 << 16


def writes(seed, spread, contig_at, contig_mib, nscatter):
    rnd = random.Random(seed)
    out = []
    pat = 0
    step = 64 << 20
    left = contig_mib << 20
    at = contig_at
    while left > 0:
        n = min(step, left)
        pat = pat % 255 + 1
        out.append(f"write -q -P {pat} {at} {n}")
        at += n
        left -= n
    lo, hi = contig_at // CS, (contig_at + (contig_mib << 20) + CS - 1) // CS
    picked = set()
    nclusters = spread // CS
    while len(picked) < nscatter:
        c = rnd.randrange(nclusters)
        if lo <= c < hi or c in picked:
            continue
        picked.add(c)
    for c in sorted(picked, key=lambda _: rnd.random()):
        pat = pat % 255 + 1
        out.append(f"write -q -P {pat} {c * CS} 64k")
    sys.stdout.write("\n".join(out) + "\n")


class Qmp:
    def __init__(self, sock):
        self.s = sock
        self.buf = b""
        self.events = []
        self.next_id = 0

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise SystemExit("qemu-backup: QMP socket closed")
            self.buf += chunk
        ln, self.buf = self.buf.split(b"\n", 1)
        return json.loads(ln)

    def execute(self, cmd, **args):
        self.next_id += 1
        msg = {"execute": cmd, "id": self.next_id}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            v = self.line()
            if v.get("id") == self.next_id:
                if "error" in v:
                    raise SystemExit(f"qemu-backup: {cmd}: {v['error']}")
                return v.get("return")
            if "event" in v:
                self.events.append(v)

    def event(self, pred, timeout=600):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if pred(e):
                    return self.events.pop(i)
            self.s.settimeout(max(0.1, deadline - time.monotonic()))
            v = self.line()
            if "event" in v:
                self.events.append(v)


def qemu_backup(src, bitmap, target):
    d = tempfile.mkdtemp(prefix="qsd-")
    sock_path, pidfile = os.path.join(d, "qmp.sock"), os.path.join(d, "qsd.pid")
    p = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=srcf,filename={src},read-only=on",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf,read-only=on",
        "--chardev", f"socket,id=m0,path={sock_path},server=on,wait=off",
        "--monitor", "chardev=m0", "--pidfile", pidfile,
    ], stdout=subprocess.DEVNULL)
    s = None
    for _ in range(2000):
        if p.poll() is not None:
            raise SystemExit(f"qemu-backup: qemu-storage-daemon exited ({p.returncode})")
        if os.path.exists(pidfile):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock_path)
                break
            except OSError:
                s.close()
                s = None
        time.sleep(0.002)
    if s is None:
        p.kill()
        raise SystemExit("qemu-backup: no QMP socket")
    q = Qmp(s)
    q.line()  # greeting
    q.execute("qmp_capabilities")
    q.execute("blockdev-add", **{"driver": "qcow2", "node-name": "tgt",
                                "file": {"driver": "file", "filename": target}})
    q.execute("blockdev-backup", **{"job-id": "j0", "device": "src", "target": "tgt",
                                   "sync": "bitmap", "bitmap": bitmap,
                                   "bitmap-mode": "never"})
    done = q.event(lambda e: e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"))
    q.event(lambda e: e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == "null")
    err = done.get("data", {}).get("error")
    q.execute("blockdev-del", **{"node-name": "tgt"})
    try:
        q.execute("quit")
    except SystemExit:
        pass
    _, status, ru = os.wait4(p.pid, 0)
    s.close()
    for f in (sock_path, pidfile):
        if os.path.exists(f):
            os.unlink(f)
    os.rmdir(d)
    if done["event"] != "BLOCK_JOB_COMPLETED" or err:
        raise SystemExit(f"qemu-backup: job failed: {done}")
    print(f"qemu-backup: job len {done['data'].get('len')}, qemu-storage-daemon peak RSS "
          f"{ru.ru_maxrss} KiB, exit status {status}", file=sys.stderr)


# ---- report ------------------------------------------------------------------------------
CASES = ["backup-disk", "backup-tmpfs", "restore-disk", "scale-tmpfs"]


def report(results, header, out=None):
    runs, failed, order = {}, set(), {}
    with open(results) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            case, tool, _run, ms, rss, cpu, nbytes, st = line.split("\t")
            order.setdefault(case, [])
            if tool not in order[case]:
                order[case].append(tool)
            if st != "ok":
                failed.add((case, tool))
                continue
            runs.setdefault((case, tool), []).append(
                (float(ms), int(rss), float(cpu), int(nbytes)))

    def med(case, tool):
        r = runs.get((case, tool))
        if not r:
            return None
        ms = [x[0] for x in r]
        return (statistics.median(ms), min(ms), max(ms), max(x[1] for x in r),
                statistics.median(x[2] for x in r), r[0][3], len(r))

    cols = ["case", "tool", "median (ms)", "min-max (ms)", "time / ours", "throughput",
            "peak RSS", "CPU (%P)", "runs"]
    rows = []
    for case in CASES + [c for c in order if c not in CASES]:
        if case not in order:
            continue
        ours = med(case, order[case][0])
        for tool in order[case]:
            m = med(case, tool)
            if m is None:
                rows.append([case, tool, "FAIL", "", "", "", "", "", "0"])
                continue
            ms, lo, hi, rss, cpu, nbytes, n = m
            ratio = f"{ms / ours[0]:.2f}x" if ours and tool != order[case][0] else ""
            tput = f"{nbytes / ms / 1e6:.2f} GB/s" if nbytes else ""
            rows.append([case, tool, f"{ms:.0f}", f"{lo:.0f}-{hi:.0f}", ratio, tput,
                         f"{rss / 1024:.1f} MiB", f"{cpu:.0f}%", str(n)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    text = [header.rstrip("\n"), ""]
    text.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    text.append("  ".join("-" * w for w in widths))
    for r in rows:
        text.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                              for i, (v, w) in enumerate(zip(r, widths))))
    print("\n".join(text))
    if out:
        md = ["", "# qcow2-bitmap vs QEMU: backup and restore", ""]
        md.extend(f"- {h}" if h.strip() else "" for h in header.rstrip("\n").splitlines())
        md.append("")
        md.append("| " + " | ".join(cols) + " |")
        md.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|")
        md.extend("| " + " | ".join(r) + " |" for r in rows)
        md.append("")
        mode = "a" if os.path.exists(out) else "w"
        with open(out, mode) as f:
            f.write("\n".join(md))


def main(argv):
    if len(argv) == 6 and argv[0] == "writes":
        writes(int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]))
    elif len(argv) == 4 and argv[0] == "qemu-backup":
        qemu_backup(argv[1], argv[2], argv[3])
    elif len(argv) in (3, 4) and argv[0] == "report":
        with open(argv[2]) as f:
            header = f.read()
        report(argv[1], header, argv[3] if len(argv) == 4 else None)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
