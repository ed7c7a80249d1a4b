#!/bin/sh
# Seeds fuzz/corpus/<target>/ from the committed fixtures (run from anywhere).
#   image, repair: every fixture image of at most 160 KiB (whole file)
#   header:        the first 4 KiB of every fixture image
#   directory:     each image's bitmap directory, prefixed as the target expects
#                  (cluster_bits u8, virtual size u64, nb_bitmaps u32, offset u64)
#   bits:          no seeds needed (libFuzzer starts from empty input)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fixtures="$here/../fixtures"
mkdir -p "$here/corpus/image" "$here/corpus/repair" "$here/corpus/header" \
    "$here/corpus/directory" "$here/corpus/bits"
python3 - "$fixtures" "$here/corpus" <<'PY'
import glob, os, struct, sys
fixtures, corpus = sys.argv[1], sys.argv[2]
for path in sorted(glob.glob(f"{fixtures}/*.qcow2") + glob.glob(f"{fixtures}/corrupt/*.qcow2")):
    stem = os.path.relpath(path, fixtures).replace("/", "-")
    data = open(path, "rb").read()
    if len(data) <= 160 * 1024:
        for t in ("image", "repair"):
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
for t in image repair header directory bits; do
    echo "$t: $(ls "$here/corpus/$t" | wc -l) files"
done
