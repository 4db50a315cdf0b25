#!/bin/bash
# Guest side of qemu/bench (run inside User-Mode Linux by qemu/uml/run; not by hand).
#
#   bench-guest.sh SIZE_MIB BASELINE_SECS WRITER_INTERVAL_MS [LUKS_TYPE [CIPHER KEY_BITS]]
#
# /dev/ubda holds one partition, /dev/ubda1, of exactly SIZE_MIB: the device every
# measurement uses. Results go to $OUT/results.env as key=value lines (the host turns them
# into JSON and a table); logs, luksify's --progress-json lines and the writer's latencies
# stay in $OUT. Before each measurement: sync (the guest, then the host: see host_sync),
# drop caches and, for the conversions, the same plain layout rebuilt (see make_layout).
set -uo pipefail
. "$UML_LIB/common.sh"
PS4='+ ${EPOCHREALTIME} '

SIZE_MIB=$1 BASE_SECS=$2 WRITER_INTERVAL=$3 LUKS_TYPE=${4:-luks2}
CIPHER=${5:-aes-xts-plain64} KEY_BITS=${6:-512} OFFSET=${7:-}
# cryptsetup benchmark's name of it: cipher-chainmode (its IV mode costs nothing to speak of)
CS_BENCH=$(echo "$CIPHER" | cut -d- -f1-2)
DISK=/dev/ubda DEV=/dev/ubda1 NAME=ubda1_crypt VG=bench
BS=4M                       # dd block size of every dd measurement
# Room past the PV, the same for cryptsetup (--reduce-device-size) and luksify: luksify's
# planner raises its data offset while the tail has room (fewer, larger steps), to 128 MiB
# with 144 MiB of tail (devices of 1 GiB and more), 32 MiB with 48 MiB.
TAIL_MIB=$([ "$SIZE_MIB" -ge 1024 ] && echo 144 || echo 48)
KEY=/tmp/bench.key
# The step breakdown below (copy, read-back, suspended window per step) is that of luksify's
# own protocol, which LUKS1 conversions use; a LUKS2 conversion's data phase is
# libcryptsetup's online reencryption (LUKS_TYPE luks2 measures its times, the cut-over's
# stall and the writer's latencies; its steps report no per-step stall).
FAST=(--pbkdf pbkdf2 --pbkdf-force-iterations 1000 --type "$LUKS_TYPE")
# luksify's own: the same, and --offset if the bench was given one (cryptsetup has none)
LUKSIFY_ARGS=("${FAST[@]}" ${OFFSET:+--offset "$OFFSET"})
RES=$OUT/results.env
: > "$RES"
printf 'bench passphrase' > "$KEY"

result() { echo "$1=$2" >> "$RES"; echo "   $1=$2" >&2; }
failed() { # NAME MESSAGE: a measurement that failed is recorded, the others still run
    result "$1_error" "\"$(echo "$2" | tr '"\n' "' " | cut -c1-400)\""
    echo "BENCH FAILED: $1: $2" >&2
}
note() { echo "== [$(cut -d' ' -f1 /proc/uptime)s] $*" >&2; }
# A ubd disk is a file on the host: what the guest wrote may still be dirty in the host's
# page cache, and the host's writeback of it would slow down whichever measurement runs
# when it starts (the later ones, luksify's). qemu/bench syncs the host on request
# ($OUT/host-sync.req -> $OUT/host-sync.done): every measurement starts with it clean.
host_sync() {
    rm -f "$OUT/host-sync.done"; : > "$OUT/host-sync.req"
    local i
    for i in $(seq 1 1200); do [ -e "$OUT/host-sync.done" ] && return 0; sleep 0.1; done
    note "the host did not sync within 120 s"
}
fresh_caches() { sync; host_sync; echo 3 > /proc/sys/vm/drop_caches; }
secs_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }
mib_s() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / 1048576 / s }'; }

# --- the device: one partition of exactly SIZE_MIB ------------------------------
sfdisk -q --wipe always "$DISK" <<EOF || die "sfdisk $DISK"
label: dos
unit: sectors

$DEV : start=2048, size=$((SIZE_MIB * 2048)), type=8e
EOF
wait_dev "$DEV"
SIZE=$(blockdev --getsize64 "$DEV")
[ "$SIZE" -eq $((SIZE_MIB << 20)) ] || die "$DEV has $SIZE bytes, expected $((SIZE_MIB << 20))"
result size_mib "$SIZE_MIB"
result luks_type "\"$LUKS_TYPE\""
result device_bytes "$SIZE"
result device "\"$DEV\""
result cipher "\"$CIPHER\""
result key_bits "$KEY_BITS"
result kernel "\"$(uname -r)\""
result cryptsetup_version "\"$(cryptsetup --version | awk '{print $2}')\""
result luksify_version "\"$("$LUKSIFY" --version 2>/dev/null | awk '{print $2}')\""
mkdir -p /mnt/bench
# cryptsetup benchmark needs the kernel crypto API from userspace (AF_ALG); a normal system
# autoloads it, the guest cannot: load it for the whole run, as a normal system would have it
modprobe -d /run/modroot -a af_alg algif_skcipher 2>/dev/null || note "could not load algif_skcipher"

teardown() { # whatever a measurement left open goes away
    umount /mnt/bench 2>/dev/null
    vgchange -an "$VG" >/dev/null 2>&1
    dmsetup remove "$NAME" 2>/dev/null
    dmsetup remove bench_crypt 2>/dev/null
    if [ -n "$(dmsetup ls 2>/dev/null | grep -v 'No devices found')" ]; then
        dmsetup remove_all --force >/dev/null 2>&1
    fi
    return 0
}

# The plain layout every conversion starts from: a PV of SIZE_MIB - 32 MiB (4 MiB extents)
# whose one LV `data` is ext4 with 2 MiB of files; 32 MiB of room past the PV. The start
# and the end of the partition are zeroed first (old LUKS headers, luksify journals); what
# lies between is whatever an earlier measurement left (the content does not change the
# speed of a copy).
make_layout() {
    note "building the plain layout"
    teardown
    dd if=/dev/zero of="$DEV" bs=1M count=34 oflag=direct conv=fsync status=none || return 1
    dd if=/dev/zero of="$DEV" bs=1M seek=$((SIZE_MIB - 34)) count=34 oflag=direct conv=fsync status=none || return 1
    pvcreate -q -y -ff --setphysicalvolumesize $((SIZE_MIB - TAIL_MIB))m "$DEV" >/dev/null || return 1
    vgcreate -q -s 4m "$VG" "$DEV" >/dev/null || return 1
    lvcreate -q -y -Wy -l 100%FREE -n data "$VG" >/dev/null || return 1   # makes /dev/$VG/data itself
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "/dev/$VG/data" || return 1
    mount "/dev/$VG/data" /mnt/bench || return 1
    "$LKTEST" tree /mnt/bench/files --seed 7 --files 20 --mib 2 >/dev/null || return 1
    umount /mnt/bench
    vgchange -an "$VG" >/dev/null || return 1
}

# --- the plan: how many bytes luksify moves (L), the same for every copy below --------
make_layout || die "building the plain layout failed"
"$LUKSIFY" --dry-run --json "${LUKSIFY_ARGS[@]}" --cipher "$CIPHER" --key-size "$KEY_BITS" "$DEV" > "$OUT/plan.json" 2> "$OUT/plan.err" || {
    cat "$OUT/plan.err" "$OUT/plan.json" >&2; die "luksify --dry-run refused $DEV"; }
plan() { sed -n "s/.*\"$1\": *\([0-9][0-9]*\).*/\1/p" "$OUT/plan.json" | head -1; }
L=$(plan move_bytes) SHIFT=$(plan shift_sectors)
[ -n "$L" ] && [ -n "$SHIFT" ] || die "no move_bytes/shift_sectors in the dry-run JSON"
result move_bytes "$L"
result shift_sectors "$SHIFT"
result tail_mib "$TAIL_MIB"
result plan_steps "$(plan steps)"
result plan_chunk_sectors "$(plan chunk_sectors)"
teardown

# --- raw: sequential write, read, same-device copy (O_DIRECT) ------------------------
note "raw write"
fresh_caches; t0=$EPOCHREALTIME
if dd if=/dev/zero of="$DEV" bs=$BS iflag=count_bytes count="$SIZE" oflag=direct conv=fsync status=none; then
    s=$(secs_since "$t0"); result raw_write_s "$s"; result raw_write_mib_s "$(mib_s "$SIZE" "$s")"
else failed raw_write "dd failed"; fi

note "raw read"
fresh_caches; t0=$EPOCHREALTIME
if dd if="$DEV" of=/dev/null bs=$BS iflag=direct status=none; then
    s=$(secs_since "$t0"); result raw_read_s "$s"; result raw_read_mib_s "$(mib_s "$SIZE" "$s")"
else failed raw_read "dd failed"; fi

# the copy luksify makes, without the encryption: L bytes moved S sectors up the device
note "raw copy on the same device"
fresh_caches; t0=$EPOCHREALTIME
if dd if="$DEV" of="$DEV" bs=$BS iflag=direct,count_bytes oflag=direct,seek_bytes count="$L" \
        seek=$((SHIFT * 512)) conv=notrunc,fsync status=none; then
    s=$(secs_since "$t0"); result raw_copy_s "$s"; result raw_copy_mib_s "$(mib_s "$L" "$s")"
else failed raw_copy "dd failed"; fi

# --- dm-crypt: cryptsetup benchmark, and dd through a plain crypt mapping -------------
note "cryptsetup benchmark -c $CS_BENCH -s $KEY_BITS"
result cs_bench_name "\"$CS_BENCH ${KEY_BITS}b\""
if cryptsetup benchmark -c "$CS_BENCH" -s "$KEY_BITS" > "$OUT/cryptsetup-benchmark.txt" 2>&1; then
    cat "$OUT/cryptsetup-benchmark.txt" >&2
    # "aes-xts 512b 1234.5 MiB/s 1250.0 MiB/s" (GiB/s on fast machines)
    # (no process substitution: the guest has no /dev/fd)
    ed=$(awk -v c="$CS_BENCH" -v b="${KEY_BITS}b" '$1 == c && $2 == b {
        e = $3; if ($4 ~ /^GiB/) e *= 1024; d = $5; if ($6 ~ /^GiB/) d *= 1024; print e, d }' \
        "$OUT/cryptsetup-benchmark.txt")
    enc=${ed% *} dec=${ed#* }
    if [ -n "${enc:-}" ]; then result cs_bench_enc_mib_s "$enc"; result cs_bench_dec_mib_s "$dec"
    else failed cs_bench "no $CS_BENCH ${KEY_BITS}b line: $(cat "$OUT/cryptsetup-benchmark.txt")"; fi
else failed cs_bench "$(tail -3 "$OUT/cryptsetup-benchmark.txt")"; fi

# THE LIMIT: the same L bytes read from the device and written through dm-crypt to the same
# device S sectors further up, as luksify's copy does (a plain crypt target, no LUKS).
note "dd through dm-crypt"
hexkey=$(od -An -tx1 -N$((KEY_BITS / 8)) /dev/urandom | tr -d ' \n')
if dmsetup create bench_crypt --table "0 $((L / 512)) crypt $CIPHER $hexkey 0 $DEV $SHIFT"; then
    dmsetup mknodes bench_crypt
    fresh_caches; t0=$EPOCHREALTIME
    if dd if="$DEV" of=/dev/mapper/bench_crypt bs=$BS iflag=direct,count_bytes oflag=direct \
            count="$L" conv=notrunc,fsync status=none; then
        s=$(secs_since "$t0"); result dd_crypt_s "$s"; result dd_crypt_mib_s "$(mib_s "$L" "$s")"
    else failed dd_crypt "dd failed"; fi
    dmsetup remove bench_crypt
else failed dd_crypt "dmsetup create failed"; fi
unset hexkey

# --- cryptsetup reencrypt --encrypt, offline -----------------------------------------
note "cryptsetup reencrypt --encrypt --type luks2 --reduce-device-size 32M (offline)"
if make_layout; then
    fresh_caches; t0=$EPOCHREALTIME
    if cryptsetup reencrypt --encrypt --type luks2 -c "$CIPHER" -s "$KEY_BITS" \
            --reduce-device-size ${TAIL_MIB}M --key-file "$KEY" "${FAST[@]}" -q "$DEV" \
            > "$OUT/reencrypt.log" 2>&1; then
        s=$(secs_since "$t0"); result reencrypt_s "$s"; result reencrypt_mib_s "$(mib_s "$L" "$s")"
    else failed reencrypt "$(tail -3 "$OUT/reencrypt.log")"; fi
else failed reencrypt "building the plain layout failed"; fi

# median_of FILE: the middle line of a sorted file of numbers
median_of() { awk '{v[NR]=$1} END {if (NR) print v[int((NR+1)/2)]}' "$1"; }

# --- luksify --------------------------------------------------------------------------
# luksify_run MODE: time one conversion, its --progress-json lines in $OUT/progress.MODE.jsonl
luksify_run() {
    local mode=$1 t0 s rc done_line
    t0=$EPOCHREALTIME
    "$LUKSIFY" --yes --no-integrate --key-file "$KEY" "${LUKSIFY_ARGS[@]}" --cipher "$CIPHER" --key-size "$KEY_BITS" \
        --progress-json "$DEV" \
        2> "$OUT/progress.$mode.jsonl" > "$OUT/luksify.$mode.out"
    rc=$?
    s=$(secs_since "$t0")
    # the writer's records acked by the time luksify ended: the latencies "during" it stop
    # there (what this function runs next is the bench's own work, processes that compete
    # with the writer for the guest's CPU)
    ACKED_AT_END=$(acked)
    if [ "$rc" != 0 ]; then
        failed "luksify_$mode" "exit status $rc after ${s}s: $(grep -v '^{' "$OUT/progress.$mode.jsonl" | tail -3)"
        return 1
    fi
    result "luksify_${mode}_s" "$s"
    result "luksify_${mode}_mib_s" "$(mib_s "$L" "$s")"
    done_line=$(grep '"event":"done"' "$OUT/progress.$mode.jsonl" | tail -1)
    result "luksify_${mode}_steps" "$(echo "$done_line" | sed -n 's/.*"steps":\([0-9]*\).*/\1/p')"
    result "luksify_${mode}_max_stall_ms" "$(echo "$done_line" | sed -n 's/.*"max_stall_ms":\([0-9.]*\).*/\1/p')"
    result "luksify_${mode}_cut_windows" "$(echo "$done_line" | sed -n 's/.*"cut_windows":\([0-9]*\).*/\1/p')"
    if [ "$LUKS_TYPE" = luks2 ]; then
        result "luksify_${mode}_cutover_ms" "$(grep '"event":"cut_over"' "$OUT/progress.$mode.jsonl" | tail -1 |
            sed -n 's/.*"stall_ms":\([0-9.]*\).*/\1/p')"
    fi
    result "luksify_${mode}_chunk_lines" "$(grep -c '"event":"chunk"' "$OUT/progress.$mode.jsonl")"
    # LUKS2's own steps whose last comparison was skipped (the hotzone's dm-stats region
    # counted no write)
    result "luksify_${mode}_compare_skipped" "$(grep -c '"compare_skipped":true' "$OUT/progress.$mode.jsonl" || true)"
    # the stall of every step, for a look at its distribution
    sed -n 's/.*"stall_ms":\([0-9.]*\).*/\1/p' "$OUT/progress.$mode.jsonl" | sort -n > "$OUT/stalls.$mode.txt"
    result "luksify_${mode}_median_stall_ms" "$(median_of "$OUT/stalls.$mode.txt")"
    # a step's time: from the end of the one before (or the last line before the first step:
    # the cut-over, a commit, a phase) to its own chunk line; for LUKS2 libcryptsetup's whole
    # step, through which its hotzone device stays suspended
    awk '{ t = $0; if (!sub(/.*"t_ms":/, "", t)) next; t += 0
           if ($0 ~ /"event":"chunk"/ && have) print t - prev
           prev = t; have = 1 }' "$OUT/progress.$mode.jsonl" | sort -n > "$OUT/steps.$mode.txt"
    result "luksify_${mode}_step_median_ms" "$(median_of "$OUT/steps.$mode.txt")"
    result "luksify_${mode}_step_max_ms" "$(tail -1 "$OUT/steps.$mode.txt")"
    if [ "$LUKS_TYPE" != luks2 ] || { [ "$CIPHER" = aes-xts-plain64 ] && [ "$KEY_BITS" = 512 ]; }; then
        # luksify's own steps (LUKS1; LUKS2 with the cipher luksify has in userspace): where
        # a step's time goes, as medians (stall_split_ms is [suspend, compare, commit,
        # resume] of the suspended window)
        local part field
        for part in copy:copy_ms readback:verify_ms readahead:read_ahead_ms tickwait:tick_wait_ms suspend:1 compare:2 commit:3 resume:4; do
            field=${part#*:}
            case "$field" in
                [1-4]) sed -n 's/.*"stall_split_ms":\[\([^]]*\)\].*/\1/p' "$OUT/progress.$mode.jsonl" | cut -d, -f"$field" ;;
                *) sed -n "s/.*\"$field\":\([0-9.]*\).*/\1/p" "$OUT/progress.$mode.jsonl" ;;
            esac | sort -n > "$OUT/split.$mode.txt"
            result "luksify_${mode}_split_${part%%:*}_median_ms" "$(median_of "$OUT/split.$mode.txt")"
        done
        rm -f "$OUT/split.$mode.txt"
    fi
    cryptsetup isLuks "$DEV" || { failed "luksify_$mode" "$DEV is not LUKS afterwards"; return 1; }
}

note "luksify offline (VG inactive, nothing mounted)"
if make_layout; then
    fresh_caches
    luksify_run offline
else failed luksify_offline "building the plain layout failed"; fi

# lat_stats PREFIX FROM TO: the writer's latencies of records [FROM, TO)
lat_stats() {
    awk -v f="$2" -v t="$3" '$1 >= f && $1 < t { print $2 }' "$OUT/latency.us" | sort -n |
        awk -v p="$1" '{ v[NR] = $1; if ($1 > 100000) o++ }
        END {
            i = int(NR * 0.99); if (i < NR * 0.99) i++; if (i < 1) i = 1
            printf "%s_count=%d\n", p, NR
            if (NR == 0) exit
            printf "%s_median_ms=%.3f\n%s_p99_ms=%.3f\n%s_max_ms=%.3f\n%s_over_100ms=%d\n",
                p, v[int((NR + 1) / 2)] / 1000, p, v[i] / 1000, p, v[NR] / 1000, p, o + 0
        }' | tee -a "$RES" >&2
}
acked() { wc -l < "$OUT/acked" 2>/dev/null || echo 0; }

note "luksify online: LV mounted, a writer fsync'ing a 4 KiB record every ${WRITER_INTERVAL} ms"
if make_layout; then
    vgchange -ay "$VG" >/dev/null
    mount "/dev/$VG/data" /mnt/bench
    rm -f "$OUT/acked" "$OUT/latency.us"
    fresh_caches
    WRITER_ARGS="--latency-out $OUT/latency.us --interval-ms $WRITER_INTERVAL" start_writer /mnt/bench/records.dat "$OUT/acked"
    wait_acked 1
    sleep "$BASE_SECS"                 # the baseline: the same writer, before the conversion
    n0=$(acked)
    t_base=$BASE_SECS
    ACKED_AT_END=""
    luksify_run online; ok=$?
    n1=${ACKED_AT_END:-$(acked)}
    stop_writer
    result writer_interval_ms "$WRITER_INTERVAL"
    result baseline_secs "$t_base"
    lat_stats lat_baseline 0 "$n0"
    lat_stats lat_during "$n0" "$n1"
    if [ "$ok" = 0 ]; then
        "$LKTEST" verify-records --file /mnt/bench/records.dat --acked "$OUT/acked" >&2 ||
            failed luksify_online "acknowledged records lost"
    fi
    teardown
else failed luksify_online "building the plain layout failed"; fi

teardown
echo "BENCH DONE" >&2
