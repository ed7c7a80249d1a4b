#!/usr/bin/env python3
"""Helper for benches/vs-qemu.sh (python3 standard library only).

Subcommands:
  writes SEED KIND            qemu-io commands (one per line) on stdout.
                              KIND "dense": a few small writes in every 32 GiB
                              chunk of a 16 TiB disk (so every bitmap data
                              cluster gets allocated) plus 64 large 1-64 GiB
                              ranges.  KIND "vary": 48 random writes of
                              64 KiB..256 MiB anywhere, used to make bitmaps
                              differ from each other.
  report RESULTS HEADER [OUT] Median table from the TSV written by the script
                              (op, bitmaps, tool, run, ms, rss_kb, status),
                              printed and, with OUT, written as Markdown.
"""

import random
import statistics
import sys

KIB = 1024
GIB = 1024 ** 3
DISK = 16 * 1024 ** 4
CHUNK = 32 * GIB  # guest bytes covered by one bitmap data cluster (64 KiB cs+gran)
GRAN = 64 * KIB

# Display order of the operations and their QEMU counterparts.
OPS = [
    ("info", "info --json | qemu-img info --output=json"),
    ("add", "add | qemu-img bitmap --add"),
    ("remove", "remove b0 | qemu-img bitmap --remove"),
    ("disable", "disable b0 | qemu-img bitmap --disable"),
    ("enable", "enable b0 | qemu-img bitmap --enable"),
    ("clear", "clear b0 | qemu-img bitmap --clear"),
    ("merge", "merge b0 b1 | qemu-img bitmap --merge b1"),
    ("merge-empty", "merge e b0 (e new, empty) | qemu-img bitmap --merge b0 e | dd of 32 MiB"),
    ("check", "check | qemu-img check"),
    ("extents", "extents --json b0 | nbdinfo --json --map (qemu-nbd -B b0)"),
]


def writes(seed, kind):
    rnd = random.Random(seed)
    out = []
    if kind == "dense":
        for chunk in range(DISK // CHUNK):
            for _ in range(6):
                length = rnd.randint(1, 64) * GRAN  # 64 KiB .. 4 MiB
                off = chunk * CHUNK + rnd.randrange(0, (CHUNK - length) // GRAN) * GRAN
                out.append((off, length))
        for _ in range(64):
            length = rnd.randint(GIB // GRAN, 64 * GIB // GRAN) * GRAN  # 1 .. 64 GiB
            off = rnd.randrange(0, (DISK - length) // GRAN) * GRAN
            out.append((off, length))
    elif kind == "vary":
        for _ in range(48):
            length = rnd.randint(1, 4096) * GRAN  # 64 KiB .. 256 MiB
            off = rnd.randrange(0, (DISK - length) // GRAN) * GRAN
            out.append((off, length))
    else:
        sys.exit(f"unknown kind {kind}")
    for off, length in out:
        print(f"write -q -z -n {off} {length}")


def fmt_ms(v):
    if v is None:
        return "n/a"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_rss(kb):
    if kb is None:
        return "n/a"
    return f"{kb / 1024:.1f} MiB"


def report(results, header, out=None):
    data = {}  # (op, n, tool) -> list of (ms, rss) ; or "n/a" / "FAIL"
    status = {}
    with open(results) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            op, n, tool, _run, ms, rss, st = line.split("\t")
            key = (op, int(n), tool)
            if st != "ok":
                status[key] = st
                continue
            data.setdefault(key, []).append((float(ms), int(rss)))
    counts = sorted({k[1] for k in list(data) + list(status)})

    def med(key):
        if key in status:
            return None, None, status[key]
        runs = data.get(key)
        if not runs:
            return None, None, "n/a"
        return (statistics.median(r[0] for r in runs),
                max(r[1] for r in runs), len(runs))

    cols = ["operation", "bitmaps", "ours median (ms)", "qemu median (ms)",
            "ratio qemu/ours", "ours peak RSS", "qemu peak RSS", "runs"]
    rows = []
    for op, _desc in OPS:
        for n in counts:
            om, orss, ost = med((op, n, "ours"))
            qm, qrss, qst = med((op, n, "qemu"))
            if (om is None and qm is None and (op, n, "ours") not in status
                    and (op, n, "qemu") not in status):
                continue
            ours = fmt_ms(om) if om is not None else str(ost)
            qemu = fmt_ms(qm) if qm is not None else str(qst)
            ratio = f"{qm / om:.1f}x" if om and qm else "n/a"
            runs = ost if isinstance(ost, int) else (qst if isinstance(qst, int) else "-")
            rows.append([op, str(n), ours, qemu, ratio, fmt_rss(orss), fmt_rss(qrss), str(runs)])

    # Operations timed against a floor (dd writing the same bytes, conv=fsync).
    floors = []
    for op, _desc in OPS:
        for n in counts:
            om, _, _ = med((op, n, "ours"))
            qm, _, _ = med((op, n, "qemu"))
            for floor in ("dd", "dd-new"):
                dm, _, dst = med((op, n, floor))
                if dm is None or not om:
                    continue
                floors.append(
                    f"  {op} ({n} bitmaps): ours {fmt_ms(om)} ms, {floor} {fmt_ms(dm)} ms, "
                    f"ours/{floor} = {om / dm:.2f}"
                    + (f", qemu/{floor} = {qm / dm:.1f}" if qm else "") + f" ({dst} runs)")

    growth = []
    if counts:
        lo, hi = counts[0], counts[-1]
        for op in ("add", "remove", "disable", "enable"):
            a = med((op, lo, "ours"))[0]
            b = med((op, hi, "ours"))[0]
            qa = med((op, lo, "qemu"))[0]
            qb = med((op, hi, "qemu"))[0]
            g = f"{b / a:.2f}" if a and b else "n/a"
            qg = f"{qb / qa:.2f}" if qa and qb else "n/a"
            growth.append(f"  {op:8s} ours_{hi}/ours_{lo} = {g}   (qemu_{hi}/qemu_{lo} = {qg})")

    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    text = [header.rstrip("\n"), ""]
    text.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    text.append("  ".join("-" * w for w in widths))
    for r in rows:
        text.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                              for i, (v, w) in enumerate(zip(r, widths))))
    text.append("")
    text.append("Cost growth of our write commands between "
                f"{counts[0] if counts else '?'} and {counts[-1] if counts else '?'} bitmaps:")
    text.extend(growth)
    if floors:
        text.append("")
        text.append("Against the floor of writing the same bytes (dd bs=64K conv=fsync, same run;")
        text.append("dd: where our merge writes them in a fresh copy, dd-new: to a new file):")
        text.extend(floors)
    print("\n".join(text))

    if out:
        md = ["# qcow2-bitmap vs QEMU", ""]
        for h in header.rstrip("\n").splitlines():
            md.append(f"- {h}" if h.strip() else "")
        md.append("")
        md.append("| " + " | ".join(cols) + " |")
        md.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|")
        for r in rows:
            md.append("| " + " | ".join(r) + " |")
        md.append("")
        md.append("Cost growth of our write commands between "
                  f"{counts[0] if counts else '?'} and {counts[-1] if counts else '?'} bitmaps:")
        md.append("")
        md.extend(f"- {g.strip()}" for g in growth)
        md.append("")
        if floors:
            md.append("Against the floor of writing the same bytes (dd bs=64K conv=fsync, same run; "
                      "dd: where our merge writes them in a fresh copy, dd-new: to a new file):")
            md.append("")
            md.extend(f"- {f.strip()}" for f in floors)
            md.append("")
        with open(out, "w") as f:
            f.write("\n".join(md))


def main(argv):
    if len(argv) >= 3 and argv[0] == "writes":
        writes(int(argv[1]), argv[2])
    elif len(argv) in (3, 4) and argv[0] == "report":
        with open(argv[2]) as f:
            header = f.read()
        report(argv[1], header, argv[3] if len(argv) == 4 else None)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
