#!/bin/sh
# Seeds fuzz/corpus/<target>/ from the committed fixtures (run from anywhere).
#   image, repair: every fixture image of at most 160 KiB (whole file)
#   header:        the first 4 KiB of every fixture image
#   directory:     each image's bitmap directory, prefixed as the target expects
#                  (cluster_bits u8, virtual size u64, nb_bitmaps u32, offset u64)
#   bits:          no seeds needed (libFuzzer starts from empty input)
#   guest:         the image seeds, plus small images made now with qemu-img and
#                  qemu-io (data, zero, deflate and zstd compressed, extended L2,
#                  version 2, 4 KiB and 16 KiB clusters) when QEMU is installed
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fixtures="$here/../fixtures"
mkdir -p "$here/corpus/image" "$here/corpus/repair" "$here/corpus/header" \
    "$here/corpus/directory" "$here/corpus/bits" "$here/corpus/guest"
python3 - "$fixtures" "$here/corpus" <<'PY'
import glob, os, struct, sys
fixtures, corpus = sys.argv[1], sys.argv[2]
for path in sorted(glob.glob(f"{fixtures}/*.qcow2") + glob.glob(f"{fixtures}/corrupt/*.qcow2")):
    stem = os.path.relpath(path, fixtures).replace("/", "-")
    data = open(path, "rb").read()
    if len(data) <= 160 * 1024:
        for t in ("image", "repair", "guest"):
            open(f"{corpus}/{t}/{stem}", "wb").write(data)
    open(f"{corpus}/header/{stem}", "wb").write(data[:4096])
    (version,) = struct.unpack(">I", data[4:8])
    (cluster_bits,) = struct.unpack(">I", data[20:24])
    (size,) = struct.unpack(">Q", data[24:32])
    if version < 3:
        continue
    (hlen,) = struct.unpack(">I", data[100:104])
    at, end = hlen, 1 << cluster_bits
    while at + 8 <= end:
        kind, length = struct.unpack(">II", data[at:at + 8])
        if kind == 0:
            break
        if kind == 0x23852875 and length == 24:
            nb, _, dsize, doff = struct.unpack(">IIQQ", data[at + 8:at + 32])
            body = data[doff:doff + min(dsize, 65536)]
            prefix = struct.pack(">BQIQ", cluster_bits, size, nb, doff)
            open(f"{corpus}/directory/{stem}", "wb").write(prefix + body)
        at += 8 + (length + 7) // 8 * 8
PY
if command -v qemu-img >/dev/null && command -v qemu-io >/dev/null; then
    tmp=$(mktemp -d)
    head -c 16384 /dev/urandom | od -An -v -tx1 | tr -d ' \n' | head -c 8192 >"$tmp/src"
    seed() { # name, create options, qemu-io commands...
        name=$1 opts=$2
        shift 2
        qemu-img create -q -f qcow2 -o "$opts" "$tmp/$name.qcow2" 2M
        for c in "$@"; do set -- "$@" -c "$c"; shift; done
        qemu-io "$@" "$tmp/$name.qcow2" >/dev/null
        cp "$tmp/$name.qcow2" "$here/corpus/guest/qemu-$name"
    }
    seed std cluster_size=4096 'write -P 1 0 4k' 'write -z 4k 4k' \
        'write -c -P 2 8k 4k' "write -c -s $tmp/src 12k 4k" 'write -P 3 1M 8k'
    seed ext cluster_size=16384,extended_l2=on 'write -P 1 0 1k' 'write -z 2k 1k' \
        'write -c -P 2 16k 16k' 'write -z 32k 16k'
    seed zstd cluster_size=4096,compression_type=zstd 'write -c -P 4 0 4k' \
        'write -P 5 4k 4k' "write -c -s $tmp/src 8k 4k"
    seed v2 cluster_size=4096,compat=0.10 'write -P 6 0 8k' 'write -P 7 1M 4k'
    rm -r "$tmp"
else
    echo "qemu-img/qemu-io not found: guest has the fixture seeds only"
fi
for t in image repair header directory bits guest; do
    echo "$t: $(ls "$here/corpus/$t" | wc -l) files"
done
