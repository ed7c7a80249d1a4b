#!/usr/bin/env python3
"""Inputs and report of the guest-data cases of benches/vs-qemu.sh (--guest).

python3 standard library only.

Subcommands:
  scattered OUT SIZE NDATA NZERO SEED [L2OUT]
      Writes a qcow2 v3 image (64 KiB clusters, 16-bit refcounts) of SIZE
      bytes directly, without QEMU (qemu-io needs about 5 ms per scattered
      write): NDATA data clusters and NZERO zero clusters (L2 zero flag, no
      host cluster) at distinct seeded random guest clusters. Each data
      cluster holds different bytes (a slice of a random pool at a varying
      offset, stamped with its guest offset). Host layout: header, refcount
      table, refcount blocks, L1, then per L1 entry its L2 table followed by
      its data clusters in guest order. The script runs qemu-img check on it.
      L2OUT gets a copy of all L2 tables back to back: `cat L2OUT` is the
      physical floor of a map (every L2 table read once).
  data OUT MIB SEED KIND
      MIB MiB of non-uniform, nonzero bytes. KIND "random": incompressible
      (slices of a random pool, each 64 KiB stamped with its offset);
      "text": compressible pseudo-text of seeded random words (deflate
      ratio about 3).
  report RESULTS HEADER [OUT]
      Median table from the TSV the script writes (case, tool, run, ms,
      rss_kb, cpu_percent, bytes, status), printed and, with OUT, appended
      as Markdown.
"""

import os
import random
import statistics
import struct
import sys

CB = 16
CS = 1 << CB
L2_ENTRIES = CS // 8
COPIED = 1 << 63
ZERO = 1
REFS_PER_BLOCK = CS // 2  # 16-bit refcounts
POOL = 4 << 20


def pool(rnd):
    return rnd.randbytes(POOL + CS)


def data_cluster(pool_bytes, rnd, stamp):
    at = rnd.randrange(0, POOL)
    b = bytearray(pool_bytes[at:at + CS])
    b[0:8] = struct.pack(">Q", stamp)
    b[8] |= 1  # never all zero
    return b


def scattered(out, size, ndata, nzero, seed, l2out=None):
    if size % CS:
        sys.exit("size must be a multiple of 64 KiB")
    rnd = random.Random(seed)
    nclusters = size // CS
    picked = rnd.sample(range(nclusters), ndata + nzero)
    kinds = {c: "d" for c in picked[:ndata]}
    kinds.update({c: "z" for c in picked[ndata:]})
    by_l1 = {}
    for c in sorted(kinds):
        by_l1.setdefault(c // L2_ENTRIES, []).append(c)
    l1_size = -(-nclusters // L2_ENTRIES)
    l1_clusters = -(-l1_size * 8 // CS)
    payload = len(by_l1) + ndata  # L2 tables + data clusters
    # header + reftable + refblocks + L1 + payload; solve for the refblocks.
    rb = 1
    while True:
        total = 1 + 1 + rb + l1_clusters + payload
        need = -(-total // REFS_PER_BLOCK)
        if need <= rb:
            break
        rb = need
    if rb > CS // 8:
        sys.exit("image too large for one refcount table cluster")
    reftable_off = CS
    refblocks_off = 2 * CS
    l1_off = (2 + rb) * CS
    next_cluster = 2 + rb + l1_clusters

    hdr = bytearray(CS)
    struct.pack_into(
        ">4sIQIIQIIQQIIQQQQII", hdr, 0,
        b"QFI\xfb", 3, 0, 0, CB, size, 0, l1_size, l1_off, reftable_off, 1, 0, 0,
        0, 0, 0, 4, 104)
    # bytes 104..112: header extension end marker (zeros).

    l1 = bytearray(l1_clusters * CS)
    pb = pool(rnd)
    l2f = open(l2out, "wb") if l2out else None
    with open(out, "wb") as f:
        f.truncate(0)
        f.seek(next_cluster * CS)
        for l1i in sorted(by_l1):
            l2_cluster = next_cluster
            next_cluster += 1
            struct.pack_into(">Q", l1, l1i * 8, COPIED | (l2_cluster * CS))
            l2 = bytearray(CS)
            chunks = []
            for c in by_l1[l1i]:
                idx = c % L2_ENTRIES
                if kinds[c] == "z":
                    struct.pack_into(">Q", l2, idx * 8, ZERO)
                else:
                    struct.pack_into(">Q", l2, idx * 8, COPIED | (next_cluster * CS))
                    next_cluster += 1
                    chunks.append(data_cluster(pb, rnd, c * CS))
            f.write(l2)
            f.write(b"".join(chunks))
            if l2f:
                l2f.write(l2)
        total = next_cluster
        refblocks = bytearray(rb * CS)
        for i in range(total):
            struct.pack_into(">H", refblocks, i * 2, 1)
        reftable = bytearray(CS)
        for i in range(rb):
            struct.pack_into(">Q", reftable, i * 8, (2 + i) * CS)
        f.seek(0)
        f.write(hdr)
        f.write(reftable)
        f.write(refblocks)
        f.write(l1)
    if l2f:
        l2f.close()
    print(f"{len(by_l1)} L2 tables, {ndata} data and {nzero} zero clusters, "
          f"{total} host clusters ({total * CS >> 20} MiB)", file=sys.stderr)


def data(out, mib, seed, kind):
    rnd = random.Random(seed)
    if kind == "random":
        pb = pool(rnd)
        with open(out, "wb") as f:
            for i in range(mib * (1 << 20) // CS):
                f.write(data_cluster(pb, rnd, i * CS))
    elif kind == "text":
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
        words = ["".join(rnd.choices(letters, weights, k=rnd.randint(1, 10)))
                 for _ in range(8000)]
        # A 16 MiB pool of text; the output is pool slices at random offsets.
        parts, n = [], 0
        while n < 16 << 20:
            line = " ".join(rnd.choices(words, k=rnd.randint(4, 16))) + ".\n"
            parts.append(line)
            n += len(line)
        text = "".join(parts).encode()
        with open(out, "wb") as f:
            left = mib << 20
            while left:
                n = min(left, rnd.randint(4 << 10, 256 << 10))
                at = rnd.randrange(0, len(text) - n)
                f.write(text[at:at + n])
                left -= n
    else:
        sys.exit(f"unknown kind {kind}")


# ---- report ------------------------------------------------------------------------------
# Cases in display order.
CASES = ["map", "read", "zlib", "zstd"]


def report(results, header, out=None):
    runs = {}  # (case, tool) -> [(ms, rss, cpu, bytes)]
    failed = set()
    with open(results) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            case, tool, _run, ms, rss, cpu, nbytes, st = line.split("\t")
            if st != "ok":
                failed.add((case, tool))
                continue
            runs.setdefault((case, tool), []).append(
                (float(ms), int(rss), float(cpu), int(nbytes)))
    tools = {}
    for case, tool in list(runs) + list(failed):
        tools.setdefault(case, [])
        if tool not in tools[case]:
            tools[case].append(tool)

    def med(case, tool):
        r = runs.get((case, tool))
        if not r:
            return None
        return (statistics.median(x[0] for x in r), max(x[1] for x in r),
                statistics.median(x[2] for x in r), r[0][3], len(r))

    cols = ["case", "tool", "median (ms)", "time / ours", "throughput", "peak RSS",
            "CPU (%P)", "runs"]
    rows = []
    for case in CASES:
        if case not in tools:
            continue
        ours = med(case, "ours")
        for tool in tools[case]:
            m = med(case, tool)
            if m is None:
                rows.append([case, tool, "FAIL", "", "", "", "", "0"])
                continue
            ms, rss, cpu, nbytes, n = m
            ratio = f"{ms / ours[0]:.2f}x" if ours and tool != "ours" else ""
            tput = f"{nbytes / ms / 1e6:.2f} GB/s" if nbytes else ""
            rows.append([case, tool, f"{ms:.1f}" if ms < 100 else f"{ms:.0f}", ratio, tput,
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
        md = ["", "# qcow2-bitmap vs QEMU: guest data", ""]
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
    if len(argv) in (6, 7) and argv[0] == "scattered":
        scattered(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]),
                  argv[6] if len(argv) == 7 else None)
    elif len(argv) == 5 and argv[0] == "data":
        data(argv[1], int(argv[2]), int(argv[3]), argv[4])
    elif len(argv) in (3, 4) and argv[0] == "report":
        with open(argv[2]) as f:
            header = f.read()
        report(argv[1], header, argv[3] if len(argv) == 4 else None)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
