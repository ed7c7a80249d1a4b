#!/usr/bin/env bash
# Wall time and peak RSS of qcow2-bitmap against QEMU's tools on the same images.
#
# Builds 16 TiB qcow2 images (64 KiB clusters) with 1, 8 and 32 dense 64 KiB-granularity
# bitmaps (every one of the 512 bitmap data clusters allocated, ~12% of the disk dirty, a few
# thousand extents, bitmaps differing from each other), then times each operation of ours and
# of QEMU alternately on the same image state (a fresh synced copy per run for write commands;
# copying is not timed) and prints medians.
#
# Usage: benches/vs-qemu.sh [--quick] [--keep] [--out FILE] [--runs N] [--cap SECONDS]
#                           [--tmpdir DIR] [--ops "OP..."] [--counts "N..."]
#   --quick        1 and 8 bitmaps only, median of 3
#   --ops "OP..."  only these operations (default: info add remove disable enable clear merge
#                  merge-empty check extents); enable needs disable, which then runs untimed
#   --counts "N.." only images with these numbers of dense bitmaps (default 1 8 32, --quick 1 8)
#   --keep         keep the temp dir (images, raw results)
#   --out FILE     also write the table as Markdown to FILE
#   --runs N       measured runs per tool and operation (default 5, --quick 3)
#   --cap SECONDS  stop adding runs to an (operation, bitmaps) pair once its measured runs took
#                  this long in total (at least one run is always made; 0 = no cap, default)
#   --tmpdir DIR   where the temp dir goes (default $TMPDIR or /tmp); needs < 15 GiB
#   --images-only  build the images (img1/img8/img32.qcow2), keep them, time nothing (profiling)
#   --guest        only the guest-data cases (see "guest data" below): map --json against
#                  qemu-img map on a 16 TiB image with 100k data + 20k zero clusters scattered,
#                  guest reads against cat, compressed reads against qemu-img convert
#   --guest-read-mib N  MiB of contiguous data for the guest-read case (default 2048)
#   --backup       only the backup cases (see "backups" below): incremental backup against
#                  QEMU's offline blockdev-backup and a copy+fsync floor, on disk and tmpfs;
#                  restore of a 3-link chain against qemu-img convert -O qcow2 + sync; 1 TiB
#                  against 16 TiB with the same dirty set
#   --backup-dirty-mib N  MiB of dirty data (half contiguous, half 64 KiB scattered; default 2048)
#   --backup-shm DIR  the tmpfs for the tmpfs cases (default /dev/shm; "" skips them)
#
# merge-empty: `merge IMG e b0` where e is a new empty bitmap (added by qemu-img) and b0 dense:
# 512 new data clusters (32 MiB). Also timed against the floor of writing the same 32 MiB with
# `dd if=B0 bs=64K conv=fsync` (B0 = b0's serialized data, extracted once, page cache warm):
# "dd" writes them where our merge puts them (one run of clusters) in a fresh synced copy of the
# image, like the runs of the two tools (a sparse copy: the writes fill holes); "dd-new" writes
# them to a new file.
# Env: QCOW2_BITMAP=path skips the cargo build; CARGO_TARGET_DIR (default /tmp/target-vsq).
#
# Needs qemu-img, qemu-io, qemu-nbd, nbdinfo (Debian libnbd-bin), GNU time (/usr/bin/time),
# python3. QEMU rewrites every bitmap on each read-write open/close, so with 32 dense bitmaps
# one qemu-img bitmap call writes ~1 GiB: a full run takes a long time on slow disks.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
helper="$here/vs-qemu-report.py"

quick=0 keep=0 images_only=0 out="" runs="" cap=0 tmpbase="${TMPDIR:-/tmp}" only_ops="" only_counts=""
guest=0 guest_read_mib=2048
backup=0 backup_dirty_mib=2048 backup_shm=/dev/shm
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --keep) keep=1 ;;
        --images-only) images_only=1; keep=1 ;;
        --guest) guest=1 ;;
        --guest-read-mib) guest_read_mib=$2; shift ;;
        --backup) backup=1 ;;
        --backup-dirty-mib) backup_dirty_mib=$2; shift ;;
        --backup-shm) backup_shm=$2; shift ;;
        --out) out=$2; shift ;;
        --out=*) out=${1#--out=} ;;
        --runs) runs=$2; shift ;;
        --cap) cap=$2; shift ;;
        --tmpdir) tmpbase=$2; shift ;;
        --ops) only_ops=$2; shift ;;
        --counts) only_counts=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "vs-qemu: unknown option $1" >&2; exit 1 ;;
    esac
    shift
done
if [ "$quick" = 1 ]; then counts=(1 8); runs=${runs:-3}; else counts=(1 8 32); runs=${runs:-5}; fi
[ -n "$only_counts" ] && read -r -a counts <<<"$only_counts"
all_ops=(info add remove disable enable clear merge merge-empty check extents)
ops=("${all_ops[@]}")
[ -n "$only_ops" ] && read -r -a ops <<<"$only_ops"
for op in "${ops[@]}"; do
    [[ " ${all_ops[*]} " == *" $op "* ]] || { echo "vs-qemu: unknown operation $op" >&2; exit 1; }
done
[ -n "$out" ] && out=$(realpath -m "$out")

die() { echo "vs-qemu: FATAL: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

for t in qemu-img qemu-io qemu-nbd nbdinfo python3; do
    command -v "$t" >/dev/null || die "$t not found (nbdinfo: apt-get install -y libnbd-bin)"
done
if [ ! -x /usr/bin/time ]; then
    log "installing GNU time"
    apt-get install -y time >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y time >/dev/null; }
fi
/usr/bin/time -f %M true 2>/dev/null || die "/usr/bin/time is not GNU time"

# ---- our binary --------------------------------------------------------------------------
if [ -n "${QCOW2_BITMAP:-}" ]; then
    ours=$QCOW2_BITMAP
else
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-vsq}
    log "cargo build --release (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$repo" && cargo build --release --quiet --bin qcow2-bitmap) || die "cargo build failed"
    ours=$CARGO_TARGET_DIR/release/qcow2-bitmap
fi
[ -x "$ours" ] || die "$ours missing"
# The commit the binary was built from (recorded now: others may commit during a long run).
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$repo" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || commit="$commit (+ uncommitted changes in src/)"
have_check=0
"$ours" check --help >/dev/null 2>&1 && have_check=1

# ---- temp dir ----------------------------------------------------------------------------
tmp=$(mktemp -d "$tmpbase/vs-qemu.XXXXXX")
cleanup() {
    local rc=$?
    if [ "$keep" = 1 ]; then echo "vs-qemu: kept $tmp" >&2; else rm -rf "$tmp"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
results=$tmp/results.tsv
errors=$tmp/errors.txt
: >"$results"; : >"$errors"

# ---- image construction (untimed; QEMU only, flushes off since nothing is measured) ------
# qemu-img bitmap on an image, without fdatasync (cache.no-flush): build steps only.
qbm() { # qbm IMG BITMAP ACTION...
    local img=$1 bm=$2; shift 2
    qemu-img bitmap --image-opts "$@" \
        "driver=qcow2,file.driver=file,file.filename=$img,cache.no-flush=on" "$bm" \
        >/dev/null 2>"$tmp/qbm.err" \
        || die "build: qemu-img bitmap $* $img $bm: $(cat "$tmp/qbm.err")"
}
qio() { # qio IMG < commands
    qemu-io -t unsafe -f qcow2 "$1" >"$tmp/qio.out" 2>&1 || die "build: qemu-io $1: $(tail -3 "$tmp/qio.out")"
    if grep -qi 'error\|failed' "$tmp/qio.out"; then die "build: qemu-io $1: $(grep -i -m3 'error\|failed' "$tmp/qio.out")"; fi
}

build_image() { # build_image IMG NBITMAPS
    local img=$1 n=$2 groups k g
    qemu-img create -q -f qcow2 -o cluster_size=64k "$img" 16T
    for ((k = 0; k < n; k++)); do qbm "$img" "b$k" --add -g 64K; done
    # Variation while the bitmaps are still sparse (cheap QEMU rewrites): bitmap k is in group
    # k % groups; group g records vary-writes 0..g. So b0 lacks what b1 has (merge has work).
    groups=$(( n < 4 ? n : 4 ))
    for ((g = 0; g < groups; g++)); do
        python3 "$helper" writes $((1000 + g)) vary | qio "$img"
        if ((g < groups - 1)); then
            for ((k = g; k < n; k += groups)); do qbm "$img" "b$k" --disable; done
        fi
    done
    for ((k = 0; k < n; k++)); do
        if (( k % groups < groups - 1 )); then qbm "$img" "b$k" --enable; fi
    done
    # Dense phase, every bitmap enabled: every 32 GiB chunk gets writes, plus large ranges.
    python3 "$helper" writes 42 dense | qio "$img"
    sync "$img"
    qemu-img check -q "$img" || die "build: qemu-img check $img failed"
}

# ---- measurement -------------------------------------------------------------------------
now_ns() { date +%s%N; }
# run_timed TOOL OP N RUN CMD... : runs CMD under GNU time, appends a result row.
# RUN = w for the warm-up (not recorded). Sets $last_ms. A failing command records FAIL.
run_timed() {
    local tool=$1 op=$2 n=$3 run=$4; shift 4
    local t0 t1 rc=0 rss
    last_rc=0
    t0=$(now_ns)
    /usr/bin/time -f %M -o "$tmp/rss" "$@" >/dev/null 2>"$tmp/stderr" || rc=$?
    t1=$(now_ns)
    last_ms=$(( (t1 - t0) / 1000 ))
    last_ms=$(printf '%d.%03d' $((last_ms / 1000)) $((last_ms % 1000)))
    rss=$(tail -1 "$tmp/rss")
    last_rc=$rc
    if [ "$rc" != 0 ]; then
        printf '%s (%s bitmaps, exit %s): %s\n    %s\n' "$tool/$op" "$n" "$rc" "$*" \
            "$(head -c 2000 "$tmp/stderr")" >>"$errors"
        log "FAILED ($tool $op, $n bitmaps, exit $rc): $* -- $(head -c 300 "$tmp/stderr")"
        printf '%s\t%s\t%s\t%s\t0\t0\tFAIL\n' "$op" "$n" "$tool" "$run" >>"$results"
        return 1
    fi
    if [ "$run" != w ]; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\tok\n' "$op" "$n" "$tool" "$run" "$last_ms" "$rss" >>"$results"
    fi
}

# Command lines; %IMG% is replaced by the image of the run.
ours_cmd() { # ours_cmd OP IMG
    case $1 in
        info) echo "$ours info --json $2" ;;
        add) echo "$ours add $2 new" ;;
        remove) echo "$ours remove $2 b0" ;;
        disable) echo "$ours disable $2 b0" ;;
        enable) echo "$ours enable $2 b0" ;;
        clear) echo "$ours clear $2 b0" ;;
        merge) echo "$ours merge $2 b0 b1" ;;
        merge-empty) echo "$ours merge $2 e b0" ;;
        check) echo "$ours check $2" ;;
        extents) echo "$ours extents --json $2 b0" ;;
    esac
}
qemu_cmd() {
    case $1 in
        info) echo "qemu-img info --output=json $2" ;;
        add) echo "qemu-img bitmap --add $2 new" ;;
        remove) echo "qemu-img bitmap --remove $2 b0" ;;
        disable) echo "qemu-img bitmap --disable $2 b0" ;;
        enable) echo "qemu-img bitmap --enable $2 b0" ;;
        clear) echo "qemu-img bitmap --clear $2 b0" ;;
        merge) echo "qemu-img bitmap --merge b1 $2 b0" ;;
        merge-empty) echo "qemu-img bitmap --merge b0 $2 e" ;;
        check) echo "qemu-img check $2" ;;
        extents) echo "nbdinfo --json --map=qemu:dirty-bitmap:b0 -- [ qemu-nbd -r -f qcow2 -B b0 $2 ]" ;;
    esac
}
is_write() { case $1 in add|remove|disable|enable|clear|merge|merge-empty) return 0 ;; esac; return 1; }

# One run of one tool. For write commands the image is a fresh synced copy of $base.
# Leaves the result image in $tmp/run-TOOL.qcow2 when KEEP_RESULT=1.
one_run() { # one_run TOOL OP N RUN BASE
    local tool=$1 op=$2 n=$3 run=$4 base=$5 img cmd argv
    if [ "$tool" = dd ]; then
        # The floor: the same 32 MiB written with one fsync where our merge writes them,
        # in a fresh synced copy.
        img=$tmp/run-dd.qcow2
        rm -f "$img"
        cp --reflink=auto --sparse=always "$base" "$img"
        sync "$img"
        run_timed dd "$op" "$n" "$run" dd if="$tmp/b0.bin" of="$img" bs=64K seek="$dd_seek" conv=notrunc,fsync status=none || true
        rm -f "$img"
        return
    fi
    if [ "$tool" = dd-new ]; then
        rm -f "$tmp/run-dd.out"
        sync
        run_timed dd-new "$op" "$n" "$run" dd if="$tmp/b0.bin" of="$tmp/run-dd.out" bs=64K conv=fsync status=none || true
        rm -f "$tmp/run-dd.out"
        return
    fi
    if is_write "$op"; then
        img=$tmp/run-$tool.qcow2
        rm -f "$img"
        cp --reflink=auto --sparse=always "$base" "$img"
        sync "$img"   # the copy's dirty pages must not be flushed by the timed command's fsync
    else
        img=$base
    fi
    if [ "$tool" = ours ]; then cmd=$(ours_cmd "$op" "$img"); else cmd=$(qemu_cmd "$op" "$img"); fi
    read -r -a argv <<<"$cmd"   # split on blanks, no globbing (paths have no spaces)
    run_timed "$tool" "$op" "$n" "$run" "${argv[@]}" || true
}

measure_op() { # measure_op OP N BASE
    local op=$1 n=$2 base=$3 i spent=0 first second
    local tools=(ours qemu)
    [ "$op" = merge-empty ] && tools=(ours qemu dd dd-new)
    if [ "$op" = check ] && [ "$have_check" = 0 ]; then
        printf 'check\t%s\tours\t-\t0\t0\tn/a\n' "$n" >>"$results"
        tools=(qemu)
    fi
    if [ "$op" = merge ] && [ "$n" -lt 2 ]; then
        printf 'merge\t%s\tours\t-\t0\t0\tn/a\nmerge\t%s\tqemu\t-\t0\t0\tn/a\n' "$n" "$n" >>"$results"
        return
    fi
    log "$op, $n bitmaps: warm-up"
    if [ "$op" = merge-empty ]; then
        # Where our merge puts e's 512 new data clusters (one run): dd's destination.
        one_run ours "$op" "$n" w "$base"
        dd_seek=$("$ours" dump --json "$tmp/run-ours.qcow2" --bitmap e | python3 -c '
import json, sys
offs = [e["data-offset"] for e in json.load(sys.stdin)["table"]["entries"] if "data-offset" in e]
assert len(offs) == 512 and all(b - a == 65536 for a, b in zip(offs, offs[1:])), "not one run"
print(offs[0] // 65536)') || die "merge-empty: e's data clusters are not one run of 512"
        rm -f "$tmp/run-ours.qcow2"
    fi
    for t in "${tools[@]}"; do
        one_run "$t" "$op" "$n" w "$base"
        eval "warm_rc_${t//-/_}=\$last_rc"
        if is_write "$op" && [ -f "$tmp/run-$t.qcow2" ]; then mv "$tmp/run-$t.qcow2" "$tmp/warm-$t.qcow2"; fi
    done
    if [ "$op" = merge-empty ] && [ "$warm_rc_ours" = 0 ] && [ "$warm_rc_qemu" = 0 ]; then
        qemu-img check "$tmp/warm-ours.qcow2" >"$tmp/check.out" 2>&1 \
            || { cat "$tmp/check.out" >&2; die "qemu-img check failed (exit $?) after: $(ours_cmd merge-empty IMG)"; }
        local e1 e2 s1
        e1=$("$ours" hash "$tmp/warm-ours.qcow2" e) || die "hash after our merge failed"
        e2=$("$ours" hash "$tmp/warm-qemu.qcow2" e) || die "hash after qemu merge failed"
        s1=$("$ours" hash "$tmp/warm-ours.qcow2" b0) || die "hash of b0 failed"
        [ "$e1" = "$e2" ] && [ "$e1" = "$s1" ] || die "merged e differs: ours $e1, qemu $e2, b0 $s1"
        log "merge-empty validated: qemu-img check exit 0, e equals b0 and QEMU's e ($e1)"
    fi
    if [ "$op" = merge ] && [ "$warm_rc_ours" = 0 ] && [ "$warm_rc_qemu" = 0 ]; then
        # Cheap correctness gate: our merged image passes qemu-img check, and b0 equals QEMU's.
        qemu-img check "$tmp/warm-ours.qcow2" >"$tmp/check.out" 2>&1 \
            || { cat "$tmp/check.out" >&2; die "qemu-img check failed (exit $?) after: $(ours_cmd merge IMG)"; }
        local h1 h2
        h1=$("$ours" hash "$tmp/warm-ours.qcow2" b0) || die "hash after our merge failed"
        h2=$("$ours" hash "$tmp/warm-qemu.qcow2" b0) || die "hash after qemu merge failed"
        [ "$h1" = "$h2" ] || die "merged b0 differs: ours $h1, qemu $h2"
        log "merge validated: qemu-img check exit 0, b0 hash equals QEMU's ($h1)"
    fi
    if [ "$op" = disable ] && [ "$warm_rc_qemu" = 0 ]; then
        # QEMU's own disable result is the (QEMU-written) starting state for "enable".
        mv "$tmp/warm-qemu.qcow2" "$tmp/base-disabled.qcow2"
    fi
    rm -f "$tmp"/warm-*.qcow2
    for ((i = 1; i <= runs; i++)); do
        # Alternate the order: forwards on odd runs, backwards on even ones.
        local order=("${tools[@]}") t msg=""
        if ! ((i % 2)); then order=(); for ((t = ${#tools[@]} - 1; t >= 0; t--)); do order+=("${tools[t]}"); done; fi
        for t in "${order[@]}"; do
            one_run "$t" "$op" "$n" "$i" "$base"
            spent=$(python3 -c "print($spent + $last_ms)")
            msg="$msg, $t ${last_ms} ms"
        done
        log "$op, $n bitmaps, run $i${msg}"
        if [ "$cap" != 0 ] && python3 -c "import sys; sys.exit(0 if $spent >= $cap * 1000 else 1)"; then
            [ "$i" -lt "$runs" ] && log "$op, $n bitmaps: cap of ${cap}s reached after $i runs"
            break
        fi
    done
    rm -f "$tmp"/run-*.qcow2
}

# ---- guest data (--guest) ----------------------------------------------------------------
# map --json against qemu-img map --output=json, default and with a 64 KiB L2 cache entry
# size, on a 16 TiB image (64 KiB clusters) with 100k data clusters (different bytes each) and
# 20k zero clusters at seeded random places, written by benches/guest-image.py and passed by
# qemu-img check; floor: cat of a copy of its L2 tables (every table read once). Guest reads
# through examples/guest_cat: a qcow2 image of contiguous data against cat of a raw file with
# the same bytes (the floor), and deflate- and zstd-compressed images (qemu-img convert -c of
# 512 MiB of pseudo-text) against qemu-img convert into QEMU's null-co driver (QEMU's
# /dev/null). Every output is compared with QEMU's once; page cache warm; median of $runs runs
# in rotating order; GNU time for peak RSS and CPU (%P, 200% = both cores).
gimg="$here/guest-image.py"

guest_timed() { # guest_timed CASE TOOL RUN BYTES CMD... (RUN w: warm-up, not recorded)
    local c=$1 tool=$2 run=$3 bytes=$4; shift 4
    local t0 t1 rc=0 ms rss cpu
    t0=$(now_ns)
    /usr/bin/time -f '%M %P' -o "$tmp/grss" "$@" >/dev/null 2>"$tmp/stderr" || rc=$?
    t1=$(now_ns)
    ms=$(( (t1 - t0) / 1000 ))
    last_ms=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
    if [ "$rc" != 0 ]; then
        printf '%s/%s (exit %s): %s\n    %s\n' "$c" "$tool" "$rc" "$*" \
            "$(head -c 2000 "$tmp/stderr")" >>"$errors"
        log "FAILED ($c $tool, exit $rc): $* -- $(head -c 300 "$tmp/stderr")"
        printf '%s\t%s\t%s\t0\t0\t0\t0\tFAIL\n' "$c" "$tool" "$run" >>"$gresults"
        return 1
    fi
    read -r rss cpu <"$tmp/grss"
    if [ "$run" != w ]; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\tok\n' "$c" "$tool" "$run" "$last_ms" "$rss" \
            "${cpu%\%}" "$bytes" >>"$gresults"
    fi
}

guest_cmd() { # guest_cmd CASE TOOL
    local t=$tmp
    case $1/$2 in
        map/ours) echo "$ours map --json $t/map.qcow2" ;;
        map/qemu) echo "qemu-img map --output=json $t/map.qcow2" ;;
        map/qemu-tuned) echo "qemu-img map --output=json --image-opts driver=qcow2,file.filename=$t/map.qcow2,l2-cache-entry-size=65536" ;;
        map/floor-cat-l2) echo "cat $t/map.l2" ;;
        read/ours) echo "$guest_cat $t/read.qcow2" ;;
        read/floor-cat) echo "cat $t/read.raw" ;;
        zlib/ours | zstd/ours) echo "$guest_cat $t/$1.qcow2" ;;
        zlib/qemu-convert | zstd/qemu-convert)
            echo "qemu-img convert -n --target-image-opts $t/$1.qcow2 driver=null-co,size=$((512 << 20))" ;;
    esac
}

guest_measure() { # guest_measure CASE BYTES TOOL... (BYTES: per tool, "TOOL=N" or N for all)
    local c=$1 bytes_spec=$2 i k n t cmd argv b line; shift 2
    local tools=("$@")
    n=${#tools[@]}
    log "guest $c: warm-up"
    for t in "${tools[@]}"; do
        cmd=$(guest_cmd "$c" "$t"); read -r -a argv <<<"$cmd"
        guest_timed "$c" "$t" w 0 "${argv[@]}" || true
    done
    for ((i = 1; i <= runs; i++)); do
        line=""
        for ((k = 0; k < n; k++)); do
            t=${tools[$(( (i - 1 + k) % n ))]}
            b=0
            case " $bytes_spec " in *" $t="*) b=${bytes_spec#*"$t="}; b=${b%% *} ;; esac
            cmd=$(guest_cmd "$c" "$t"); read -r -a argv <<<"$cmd"
            guest_timed "$c" "$t" "$i" "$b" "${argv[@]}" || true
            line="$line $t ${last_ms} ms,"
        done
        log "guest $c, run $i:${line%,}"
    done
}

guest_main() {
    gresults=$tmp/guest.tsv
    : >"$gresults"
    guest_cat=${GUEST_CAT:-}
    if [ -z "$guest_cat" ]; then
        local target=${CARGO_TARGET_DIR:-/tmp/target-vsq}
        log "cargo build --release --example guest_cat (CARGO_TARGET_DIR=$target)"
        (cd "$repo" && CARGO_TARGET_DIR=$target cargo build --release --quiet --example guest_cat) \
            || die "cargo build of guest_cat failed"
        guest_cat=$target/release/examples/guest_cat
    fi
    [ -x "$guest_cat" ] || die "$guest_cat missing"
    local load0 start0 l2bytes entries
    load0=$(cut -d' ' -f1-3 /proc/loadavg)
    start0=$(now_ns)

    # map: 16 TiB, 100k data + 20k zero clusters scattered (about 32k L2 tables, 8 GiB file).
    log "guest map: writing the 16 TiB image (python, ~30 s)"
    python3 "$gimg" scattered "$tmp/map.qcow2" $((16 << 40)) 100000 20000 42 "$tmp/map.l2" \
        || die "build: guest-image.py scattered failed"
    sync "$tmp/map.qcow2" "$tmp/map.l2"   # no writeback during the timed runs
    qemu-img check -q "$tmp/map.qcow2" || die "build: qemu-img check of the map image failed"
    # The validation runs below warm the L2 tables (the data clusters are never read by a map,
    # and leaving their 6 GiB out of the page cache leaves room for everything else).
    cat "$tmp/map.l2" >/dev/null
    "$ours" map --json "$tmp/map.qcow2" >"$tmp/map-ours.json" || die "our map failed"
    qemu-img map --output=json "$tmp/map.qcow2" >"$tmp/map-qemu.json" || die "qemu-img map failed"
    read -r -a argv <<<"$(guest_cmd map qemu-tuned)"
    "${argv[@]}" >"$tmp/map-tuned.json" || die "tuned qemu-img map failed: ${argv[*]}"
    cmp "$tmp/map-ours.json" "$tmp/map-qemu.json" || die "map --json differs from qemu-img map"
    cmp "$tmp/map-tuned.json" "$tmp/map-qemu.json" || die "tuned qemu-img map differs"
    entries=$(wc -l <"$tmp/map-qemu.json")
    l2bytes=$(stat -c %s "$tmp/map.l2")
    log "map validated: ours equals qemu-img map byte for byte ($entries entries, $(stat -c %s "$tmp/map-qemu.json") bytes)"
    rm -f "$tmp"/map-*.json
    guest_measure map "floor-cat-l2=$l2bytes" ours qemu qemu-tuned floor-cat-l2
    rm -f "$tmp/map.qcow2" "$tmp/map.l2"

    # read: contiguous data from the page cache against cat of the same bytes.
    local mib=$guest_read_mib
    log "guest read: $mib MiB of data, qemu-img convert to qcow2"
    python3 "$gimg" data "$tmp/read.raw" "$mib" 3 random || die "build: data failed"
    qemu-img convert -O qcow2 -o cluster_size=64k "$tmp/read.raw" "$tmp/read.qcow2" \
        || die "build: qemu-img convert failed"
    sync "$tmp/read.raw" "$tmp/read.qcow2"
    cat "$tmp/read.raw" "$tmp/read.qcow2" >/dev/null
    "$guest_cat" "$tmp/read.qcow2" | cmp - "$tmp/read.raw" || die "guest_cat differs from the raw data"
    guest_measure read "ours=$((mib << 20)) floor-cat=$((mib << 20))" ours floor-cat
    rm -f "$tmp/read.raw" "$tmp/read.qcow2"

    # compressed: 512 MiB of pseudo-text, deflate and zstd.
    log "guest compressed: 512 MiB of text, qemu-img convert -c (zlib, zstd)"
    python3 "$gimg" data "$tmp/text.raw" 512 5 text || die "build: text failed"
    qemu-img convert -c -O qcow2 -o cluster_size=64k "$tmp/text.raw" "$tmp/zlib.qcow2" \
        || die "build: convert -c failed"
    qemu-img convert -c -O qcow2 -o cluster_size=64k,compression_type=zstd "$tmp/text.raw" \
        "$tmp/zstd.qcow2" || die "build: convert -c zstd failed"
    for c in zlib zstd; do
        qemu-img check -q "$tmp/$c.qcow2" || die "build: qemu-img check $c.qcow2 failed"
        cat "$tmp/$c.qcow2" >/dev/null
        "$guest_cat" "$tmp/$c.qcow2" | cmp - "$tmp/text.raw" || die "guest_cat of $c.qcow2 differs"
        qemu-img convert -O raw "$tmp/$c.qcow2" "$tmp/back.raw" && cmp "$tmp/back.raw" "$tmp/text.raw" \
            || die "qemu-img convert of $c.qcow2 differs"
        rm -f "$tmp/back.raw"
        log "$c: guest_cat and qemu-img convert both give the original bytes ($(stat -c %s "$tmp/$c.qcow2") bytes compressed)"
        guest_measure "$c" "ours=$((512 << 20)) qemu-convert=$((512 << 20))" ours qemu-convert
    done

    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
        echo "load average at start: $load0; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "qemu-img: $(qemu-img --version | sed -n 1p)"
        echo "qcow2-bitmap: $($ours --version 2>/dev/null | sed -n 1p), git $commit"
        echo "map: 16 TiB, 64 KiB clusters, 100k data + 20k zero clusters scattered, $entries JSON entries; L2 tables $((l2bytes >> 20)) MiB"
        echo "read: $mib MiB contiguous data (qemu-img convert of a raw file); zlib/zstd: qemu-img convert -c of 512 MiB pseudo-text"
        echo "runs: median of $runs (rotating order, warm page cache, one untimed warm-up each); time / ours > 1: ours faster"
        echo "wall time of the guest run: $(( ($(now_ns) - start0) / 1000000000 ))s"
    } >"$tmp/guest-header.txt"
    echo
    python3 "$gimg" report "$gresults" "$tmp/guest-header.txt" ${out:+"$out"}
    if [ -s "$errors" ]; then
        echo
        echo "FAILURES of commands:"
        cat "$errors"
    fi
    [ -n "$out" ] && echo "(written to $out)" >&2
}
if [ "$guest" = 1 ]; then guest_main; exit 0; fi

# ---- backups (--backup) ------------------------------------------------------------------
# Incremental backup: a 16 TiB image (64 KiB clusters) with a base of 8192 scattered data
# clusters (benches/guest-image.py), a previous full backup of it (ours), then the bitmap b0
# (our add) and --backup-dirty-mib of dirty data written by qemu-io (half contiguous in 64 MiB
# writes, half 64 KiB writes at seeded random places over the whole disk), recorded by b0.
# Ours: backup --bitmap b0 --backing full.qcow2; QEMU: benches/backup-bench.py qemu-backup
# (qemu-storage-daemon start to exit, read-only source, blockdev-backup sync=bitmap
# bitmap-mode=never into a target made by qemu-img create -b full.qcow2, untimed); floor: dd of
# the same number of bytes (the dirty data) into a new file with conv=fsync. On the disk-backed
# temp dir, then on a tmpfs copy. Restore: the chain inc2 -> inc1 -> full (inc2: b1 after a
# second round of writes) flattened by our restore against qemu-img convert -O qcow2 followed by
# sync of the output (and without it), floor dd of the chain's data bytes. Scale: our backup of
# the same dirty set (all below 1 TiB) on a 1 TiB and a 16 TiB image, on tmpfs. Each output is
# checked once (qemu-img check, qemu-img compare against the source). Every timed command gets
# a fresh output and starts after sync -f of its file system (untimed); page cache warm; median
# of $runs in rotating order; GNU time for peak RSS (the script and qemu-storage-daemon, its
# child) and CPU.
bbench="$here/backup-bench.py"

backup_argv() { # backup_argv CASE TOOL: sets bargv
    local d=$bdir o="$bdir/out-$2.qcow2"
    case $1/$2 in
        backup-*/ours) bargv=("$ours" backup --bitmap b0 --backing full.qcow2 "$d/src.qcow2" "$o") ;;
        backup-*/qemu) bargv=(python3 "$bbench" qemu-backup "$d/src.qcow2" b0 "$o") ;;
        restore-*/ours) bargv=("$ours" restore "$d/inc2.qcow2" "$o") ;;
        restore-*/qemu-convert+sync)
            bargv=(sh -c 'qemu-img convert -O qcow2 "$1" "$2" && sync "$2"' sh "$d/inc2.qcow2" "$o") ;;
        restore-*/qemu-convert) bargv=(qemu-img convert -O qcow2 "$d/inc2.qcow2" "$o") ;;
        scale-*/ours-16T) bargv=("$ours" backup --bitmap b0 --backing full16.qcow2 "$d/s16.qcow2" "$o") ;;
        scale-*/ours-1T) bargv=("$ours" backup --bitmap b0 --backing full1.qcow2 "$d/s1.qcow2" "$o") ;;
        */floor) bargv=(dd "if=$floor_src" "of=$d/out-floor" bs=8M "count=$floor_bytes" iflag=count_bytes conv=fsync status=none) ;;
        *) die "backup_argv: $1/$2" ;;
    esac
}

backup_prep() { # backup_prep CASE TOOL: a fresh output, then sync of the file system
    rm -f "$bdir"/out-* "$bdir"/.out-*
    case $1/$2 in
        backup-*/qemu) qemu-img create -q -f qcow2 -b full.qcow2 -F qcow2 "$bdir/out-qemu.qcow2" ;;
    esac
    sync -f "$bdir"
}

backup_measure() { # backup_measure CASE TOOL...: one untimed warm-up each, outputs kept as warm-TOOL.*
    local c=$1 t; shift
    local tools=("$@")
    log "$c: warm-up"
    for t in "${tools[@]}"; do
        backup_prep "$c" "$t"; backup_argv "$c" "$t"
        guest_timed "$c" "$t" w 0 "${bargv[@]}" || die "$c: $t failed: $(head -c 300 "$tmp/stderr")"
        [ -f "$bdir/out-$t.qcow2" ] && mv "$bdir/out-$t.qcow2" "$bdir/warm-$t.qcow2"
        [ -f "$bdir/out-$t.qcow2.json" ] && mv "$bdir/out-$t.qcow2.json" "$bdir/warm-$t.qcow2.json"
    done
    return 0
}

backup_runs() { # backup_runs CASE FLOOR_BYTES TOOL... (after backup_measure's warm-up)
    local c=$1 bytes=$2 i k n t line; shift 2
    local tools=("$@")
    n=${#tools[@]}
    rm -f "$bdir"/warm-*
    for ((i = 1; i <= runs; i++)); do
        line=""
        for ((k = 0; k < n; k++)); do
            t=${tools[$(( (i - 1 + k) % n ))]}
            backup_prep "$c" "$t"; backup_argv "$c" "$t"
            guest_timed "$c" "$t" "$i" "$bytes" "${bargv[@]}" || true
            line="$line $t ${last_ms} ms,"
        done
        log "$c, run $i:${line%,}"
    done
    rm -f "$bdir"/out-* "$bdir"/.out-*
}

# qemu-img compare, logged; dies on a difference.
backup_compare() { # backup_compare A B WHAT
    local t0=$(now_ns)
    qemu-img compare -q "$1" "$2" || die "$3: qemu-img compare $1 $2 failed"
    log "$3: qemu-img compare: identical ($(( ($(now_ns) - t0) / 1000000 )) ms)"
}

# Sum of the data bytes of a guest view (our map --json, which equals qemu-img map's).
map_data_bytes() {
    "$ours" map --json "$1" | python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))'
}

backup_main() {
    gresults=$tmp/backup.tsv
    : >"$gresults"
    local load0 start0 half scatter dirty sz avail need fs_disk fs_shm="-"
    bshm=""
    load0=$(cut -d' ' -f1-3 /proc/loadavg)
    start0=$(now_ns)
    half=$((backup_dirty_mib / 2)); scatter=$((half * 16))
    bdir=$tmp
    fs_disk=$(stat -f -c %T "$tmp")
    log "backup: temp dir $tmp on $fs_disk; $half MiB contiguous + $scatter scattered 64 KiB writes"
    [ "$fs_disk" = tmpfs ] && log "WARNING: $tmp is on tmpfs: the 'disk' cases are not disk-backed (use --tmpdir)"

    # ---- the 16 TiB source, its full backup, the bitmap, the dirty writes
    log "backup: base image (16 TiB, 8192 scattered data clusters) and its full backup"
    python3 "$gimg" scattered "$tmp/src.qcow2" $((16 << 40)) 8192 0 7 || die "build: guest-image.py failed"
    "$ours" backup "$tmp/src.qcow2" "$tmp/full.qcow2" || die "build: full backup failed"
    "$ours" add "$tmp/src.qcow2" b0 || die "build: add b0 failed"
    log "backup: dirty writes with qemu-io (recorded by b0)"
    python3 "$bbench" writes 21 $((16 << 40)) $((8 << 40)) "$half" "$scatter" | qio "$tmp/src.qcow2"
    qemu-img check -q "$tmp/src.qcow2" || die "build: qemu-img check src.qcow2 failed"
    sync -f "$tmp"
    "$ours" info "$tmp/src.qcow2" | grep -E '^ *b0 ' >&2 || true
    cat "$tmp/src.qcow2" "$tmp/full.qcow2" >/dev/null

    # ---- incremental backup, disk
    floor_src=$tmp/src.qcow2
    floor_bytes=$((half << 20))   # placeholder for the warm-up; the dirty bytes once known
    backup_measure backup-disk ours qemu floor
    dirty=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["data-bytes"] + d["zero-bytes"])' "$tmp/warm-ours.qcow2.json")
    floor_bytes=$dirty
    qemu-img check -q "$tmp/warm-ours.qcow2" || die "our incremental fails qemu-img check"
    backup_compare "$tmp/src.qcow2" "$tmp/warm-ours.qcow2" "our incremental (over full.qcow2)"
    backup_compare "$tmp/warm-ours.qcow2" "$tmp/warm-qemu.qcow2" "ours against QEMU's incremental"
    local out_ours out_qemu
    out_ours="$(stat -c %s "$tmp/warm-ours.qcow2") ($(du -B1 "$tmp/warm-ours.qcow2" | cut -f1) allocated)"
    out_qemu="$(stat -c %s "$tmp/warm-qemu.qcow2") ($(du -B1 "$tmp/warm-qemu.qcow2" | cut -f1) allocated)"
    log "backup: $dirty dirty bytes; output file: ours $out_ours bytes, QEMU's $out_qemu bytes"
    backup_runs backup-disk "$dirty" ours qemu floor

    # ---- incremental backup, tmpfs (a copy of the same files)
    if [ -n "$backup_shm" ] && [ -d "$backup_shm" ]; then
        sz=$(( $(du -k "$tmp/src.qcow2" | cut -f1) + $(du -k "$tmp/full.qcow2" | cut -f1) ))
        need=$(( sz + 3 * (dirty >> 10) * 3 / 2 ))
        avail=$(df -k --output=avail "$backup_shm" | tail -1)
        local mem=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
        [ "$mem" -lt "$avail" ] && avail=$mem
        if [ "$need" -lt $((avail * 7 / 10)) ]; then
            bshm=$(mktemp -d "$backup_shm/vs-qemu-backup.XXXXXX")
            trap 'rc=$?; rm -rf "$bshm"; (exit $rc); cleanup' EXIT
            fs_shm=$(stat -f -c %T "$bshm")
            cp --sparse=always "$tmp/src.qcow2" "$tmp/full.qcow2" "$tmp/full.qcow2.json" "$bshm/"
            bdir=$bshm; floor_src=$bshm/src.qcow2
            backup_measure backup-tmpfs ours qemu floor
            backup_runs backup-tmpfs "$dirty" ours qemu floor
            rm -rf "$bshm"; bdir=$tmp; floor_src=$tmp/src.qcow2
        else
            log "backup-tmpfs: skipped ($backup_shm: need $((need >> 10)) MiB, $((avail >> 10)) MiB available; use --backup-dirty-mib)"
        fi
    fi

    # ---- restore of a 3-link chain: inc2 -> inc1 -> full
    log "restore: inc1 (b0), then b1 and a second round of writes, inc2 (b1)"
    "$ours" backup --bitmap b0 --backing full.qcow2 "$tmp/src.qcow2" "$tmp/inc1.qcow2" || die "build: inc1 failed"
    "$ours" disable "$tmp/src.qcow2" b0 && "$ours" add "$tmp/src.qcow2" b1 || die "build: b1 failed"
    python3 "$bbench" writes 22 $((16 << 40)) $((12 << 40)) $((half * 3 / 4)) $((scatter / 8)) | qio "$tmp/src.qcow2"
    "$ours" backup --bitmap b1 --backing inc1.qcow2 "$tmp/src.qcow2" "$tmp/inc2.qcow2" || die "build: inc2 failed"
    sync -f "$tmp"
    local rbytes
    rbytes=$(map_data_bytes "$tmp/inc2.qcow2")
    log "restore: the chain holds $rbytes bytes of data"
    cat "$tmp/inc2.qcow2" "$tmp/inc1.qcow2" "$tmp/full.qcow2" "$tmp/src.qcow2" >/dev/null
    floor_bytes=$rbytes
    backup_measure restore-disk ours qemu-convert+sync qemu-convert floor
    qemu-img check -q "$tmp/warm-ours.qcow2" || die "our restore fails qemu-img check"
    backup_compare "$tmp/inc2.qcow2" "$tmp/warm-ours.qcow2" "our restore"
    local rout_ours rout_qemu
    rout_ours="$(stat -c %s "$tmp/warm-ours.qcow2") ($(du -B1 "$tmp/warm-ours.qcow2" | cut -f1) allocated)"
    rout_qemu="$(stat -c %s "$tmp/warm-qemu-convert.qcow2") ($(du -B1 "$tmp/warm-qemu-convert.qcow2" | cut -f1) allocated)"
    backup_runs restore-disk "$rbytes" ours qemu-convert+sync qemu-convert floor
    rm -f "$tmp"/src.qcow2 "$tmp"/full.qcow2* "$tmp"/inc1.qcow2* "$tmp"/inc2.qcow2*

    # ---- 1 TiB against 16 TiB, the same dirty set (all below 1 TiB)
    local sdir=$tmp
    if [ -n "$backup_shm" ] && [ -d "$backup_shm" ]; then
        bshm=$(mktemp -d "$backup_shm/vs-qemu-backup.XXXXXX")
        trap 'rc=$?; rm -rf "$bshm"; (exit $rc); cleanup' EXIT
        sdir=$bshm
    fi
    local scase="scale-$(stat -f -c %T "$sdir" | sed 's/ext2\/ext3/disk/')"
    log "$scase: 1 TiB and 16 TiB images, the same $backup_dirty_mib MiB dirty set below 1 TiB"
    python3 "$bbench" writes 23 $((1 << 40)) $((512 << 30)) "$half" "$scatter" >"$tmp/scale-writes.txt"
    for s in 1 16; do
        qemu-img create -q -f qcow2 -o cluster_size=64k "$sdir/s$s.qcow2" "${s}T"
        "$ours" backup "$sdir/s$s.qcow2" "$sdir/full$s.qcow2" || die "build: full$s failed"
        "$ours" add "$sdir/s$s.qcow2" b0 || die "build: add b0 (s$s) failed"
        qio "$sdir/s$s.qcow2" <"$tmp/scale-writes.txt"
    done
    bdir=$sdir; floor_src=$sdir/s16.qcow2; floor_bytes=$(( (half << 20) + scatter * 65536 ))
    backup_measure "$scase" ours-16T ours-1T floor
    backup_compare "$sdir/s16.qcow2" "$bdir/warm-ours-16T.qcow2" "16 TiB incremental"
    backup_runs "$scase" "$floor_bytes" ours-16T ours-1T floor
    rm -f "$sdir"/s1.qcow2 "$sdir"/s16.qcow2 "$sdir"/full*.qcow2*
    [ -n "$bshm" ] && rm -rf "$bshm"

    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
        echo "load average at start: $load0; at end: $(cut -d' ' -f1-3 /proc/loadavg); nice: $(nice)"
        echo "qemu-img: $(qemu-img --version | sed -n 1p)"
        echo "qcow2-bitmap: $($ours --version 2>/dev/null | sed -n 1p), git $commit"
        echo "file systems: disk cases in $tmp ($fs_disk), tmpfs cases in ${backup_shm:--} ($fs_shm)"
        echo "backup: 16 TiB, 64 KiB clusters, base 8192 scattered clusters + full backup; dirty $dirty bytes ($half MiB contiguous + $scatter scattered 64 KiB writes over the whole disk)"
        echo "backup output files: ours $out_ours bytes, QEMU's $out_qemu bytes (L2 tables included)"
        echo "restore: chain inc2 -> inc1 -> full holding $rbytes data bytes; output files: ours $rout_ours, qemu-img convert $rout_qemu bytes"
        echo "scale: the same dirty set below 1 TiB on a 1 TiB and a 16 TiB image"
        echo "floor: dd bs=8M conv=fsync of the dirty (backup) or data (restore) bytes into a new file"
        echo "runs: median of $runs (rotating order, warm page cache, sync -f before each command, one untimed warm-up each); time / ours > 1: ours faster"
        echo "wall time of the backup run: $(( ($(now_ns) - start0) / 1000000000 ))s"
    } >"$tmp/backup-header.txt"
    echo
    python3 "$bbench" report "$gresults" "$tmp/backup-header.txt" ${out:+"$out"}
    if [ -s "$errors" ]; then
        echo
        echo "FAILURES of commands:"
        cat "$errors"
    fi
    [ -n "$out" ] && echo "(written to $out)" >&2
}
if [ "$backup" = 1 ]; then backup_main; exit 0; fi

# ---- main --------------------------------------------------------------------------------
start=$(now_ns)
for n in "${counts[@]}"; do
    img=$tmp/img$n.qcow2
    log "building 16 TiB image with $n dense bitmap(s)"
    build_image "$img" "$n"
    sz=$(stat -c %s "$img"); du=$(du -k "$img" | cut -f1)
    log "image: $((sz / 1048576)) MiB apparent, $((du / 1024)) MiB allocated"
    [ "$du" -lt $((4 * 1024 * 1024)) ] || die "image $img takes more than 4 GiB"
    "$ours" info "$img" | head -12 >&2 || true
    [ "$images_only" = 1 ] && continue
    for op in "${ops[@]}"; do
        b=$img
        if [ "$op" = enable ]; then
            if [ ! -f "$tmp/base-disabled.qcow2" ]; then
                cp --sparse=always "$img" "$tmp/base-disabled.qcow2"
                qbm "$tmp/base-disabled.qcow2" b0 --disable
            fi
            b=$tmp/base-disabled.qcow2
        fi
        if [ "$op" = merge-empty ]; then
            # e: a new empty bitmap, added by QEMU; b0.bin: b0's 32 MiB for the dd floor.
            b=$tmp/base-empty.qcow2
            cp --sparse=always "$img" "$b"
            qbm "$b" e --add -g 64K
            sync "$b"
            "$ours" dump --json "$b" --bitmap b0 | python3 -c '
import json, sys
d = json.load(sys.stdin)
with open(sys.argv[1], "rb") as img, open(sys.argv[2], "wb") as out:
    for e in d["table"]["entries"]:
        img.seek(e["data-offset"])
        out.write(img.read(65536))
' "$b" "$tmp/b0.bin"
            [ "$(stat -c %s "$tmp/b0.bin")" = $((32 << 20)) ] || die "b0 does not have 512 data clusters"
            cat "$tmp/b0.bin" >/dev/null
        fi
        measure_op "$op" "$n" "$b"
        rm -f "$tmp/base-empty.qcow2"
    done
    rm -f "$img" "$tmp/base-disabled.qcow2" "$tmp/b0.bin"
done
wall=$(( ($(now_ns) - start) / 1000000000 ))
if [ "$images_only" = 1 ]; then echo "$tmp"; exit 0; fi

# ---- report ------------------------------------------------------------------------------
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "qemu-img: $(qemu-img --version | sed -n 1p)"
    echo "qcow2-bitmap: $($ours --version 2>/dev/null | sed -n 1p), git $commit"
    echo "images: 16 TiB, 64 KiB clusters, 64 KiB-granularity bitmaps, all 512 data clusters allocated per bitmap"
    echo "runs: median of up to $runs (alternating order, warm page cache, one untimed warm-up each)$([ "$cap" != 0 ] && echo ", cap ${cap}s per pair")"
    echo "write commands run on a fresh synced copy each time (copy not timed)"
    echo "extents (qemu): nbdinfo + qemu-nbd; RSS is the larger of the two processes"
    echo "wall time of the whole run: ${wall}s"
} >"$tmp/header.txt"
echo
python3 "$helper" report "$results" "$tmp/header.txt" ${out:+"$out"}
if [ -s "$errors" ]; then
    echo
    echo "FAILURES of commands:"
    cat "$errors"
fi
[ -n "$out" ] && echo "(written to $out)" >&2
exit 0
