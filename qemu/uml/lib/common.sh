# Shared helpers for UML guest scenarios: `. "$UML_LIB/common.sh"`.
# The guest init exports OUT, LUKSIFY, LKTEST, REPO, QEMU_DIR, UML_LIB,
# LVM_SYSTEM_DIR (LVM config without udev) and DM_DISABLE_UDEV=1.

die() { echo "FAIL: $*" >&2; exit 1; }
note() { echo "== $*" >&2; }

# partition N of disk D: /dev/ubda + 5 -> /dev/ubda5; /dev/nvme0n1 -> /dev/nvme0n1p5
part() { case "$1" in *[0-9]) echo "$1p$2" ;; *) echo "$1$2" ;; esac; }

# wait until a block device node exists (devtmpfs creates them asynchronously)
wait_dev() {
    local d=$1 i
    for i in $(seq 1 100); do [ -b "$d" ] && return 0; sleep 0.05; done
    die "device $d did not appear"
}

# make /dev/mapper/* and /dev/VG/LV nodes for whatever dm devices exist
mknodes() { dmsetup mknodes >/dev/null 2>&1; vgscan --mknodes >/dev/null 2>&1 || true; }

# sha256 of a whole device
devhash() { dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1; }  # O_DIRECT: a whole disk's page cache misses writes made through partitions and dm

# the writer: start_writer FILE [ACKED] -> pid in $OUT/writer.pid
start_writer() {
    local file=$1 acked=${2:-$OUT/acked}
    "$LKTEST" writer --file "$file" --acked "$acked" ${WRITER_ARGS:-} 2>>"$OUT/writer.log" &
    echo $! > "$OUT/writer.pid"
    WRITER_PID=$!
}
stop_writer() {
    local pid
    pid=$(cat "$OUT/writer.pid" 2>/dev/null) || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$OUT/writer.pid"
}
# wait until at least N records are acked (default 1), timeout T seconds (default 30)
wait_acked() {
    local n=${1:-1} t=${2:-30} i
    for i in $(seq 1 $((t * 10))); do
        [ "$(wc -l < "$OUT/acked" 2>/dev/null || echo 0)" -ge "$n" ] && return 0
        sleep 0.1
    done
    die "fewer than $n records acked after ${t}s"
}

# The PV on a device-mapper pass-through instead of the partition: `pass_through MODULE
# TARGET [ARG...]` loads the dm module MODULE ("" for none), makes /dev/mapper/fake as
# `0 <sectors of ubda5> TARGET <ubda5's major:minor> 0 ARG...`, and points LVM at
# /dev/mapper only (LVM then sees the PV on fake, not on ubda5). Sets N (ubda5's sectors)
# and MAJMIN for later tables.
pass_through() {
    local module=$1 target=$2
    shift 2
    N=$(blockdev --getsz /dev/ubda5)
    MAJMIN=$(printf '%d:%d' $(stat -c '0x%t 0x%T' /dev/ubda5))
    [ -z "$module" ] || modprobe -d /run/modroot "$module"
    dmsetup create fake --table "0 $N $target $MAJMIN 0${*:+ $*}"
    cat >> "$LVM_SYSTEM_DIR/lvm.conf" <<'CONF'
devices { global_filter = [ "a|^/dev/mapper/|", "a|^/dev/dm-|", "a|^/dev/ubdb|", "r|.*|" ] }
CONF
}
