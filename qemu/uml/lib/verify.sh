#!/bin/bash
# Fresh-boot verification of a disk built by mkdisk.sh (run INSIDE the guest).
#
#   verify.sh --luks DEV --key-file K [--name NAME]   converted disk: open LUKS first
#   verify.sh --plain                                 unconverted disk (test bed self-check)
#   common options:
#     --state DIR     where mkdisk.sh recorded disk.env, manifests, lvhash.txt (default $OUT)
#     --records F     verify-records of root's F (relative to root's mount) against $STATE/acked
#                     (default: records.dat if $STATE/acked exists)
#     --min-acked N   fail unless at least N records were acked
#     --no-replay     do not replay fs journals first (by default root and home are
#                     mounted rw and unmounted once, as a boot would, before fsck -n)
#     --keep-open     leave the VG active and LUKS open at the end
#
# Steps: [cryptsetup isLuks, luksDump, open] ; vgscan; vgchange -ay vg0; replay
# journals; e2fsck -fn root; xfs_repair -n home; mount ro; verify-manifest root
# and home; verify raw LV hashes; verify-records. Exit non-zero with a
# "VERIFY FAILED: <step>" line naming the first step that failed.
set -uo pipefail
PS4='+ ${EPOCHREALTIME} '
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

luks="" key="" name="" state=${OUT:-} records="" min_acked=0 replay=1 keep=0 mode=""
while [ $# -gt 0 ]; do
    case "$1" in
        --luks) luks=$2; mode=luks; shift 2 ;;
        --key-file) key=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --plain) mode=plain; shift ;;
        --state) state=$2; shift 2 ;;
        --records) records=$2; shift 2 ;;
        --min-acked) min_acked=$2; shift 2 ;;
        --no-replay) replay=0; shift ;;
        --keep-open) keep=1; shift ;;
        *) echo "verify: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$mode" ] || { echo "verify: say --luks DEV --key-file K, or --plain" >&2; exit 2; }

failed() { echo "VERIFY FAILED: $*" >&2; exit 1; }
t0=${EPOCHREALTIME/./}
step() { local us=$(( ${EPOCHREALTIME/./} - t0 )); printf '== verify [+%d.%02ds]: %s\n' $((us / 1000000)) $((us % 1000000 / 10000)) "$*" >&2; }
run() { # run a command; on failure name the step
    local what=$1; shift
    "$@" || failed "$what (command: $*)"
}
cleanup() { # leave nothing mounted or active, also after a failure
    [ "$keep" = 1 ] && return 0
    umount /mnt/vroot 2>/dev/null; umount /mnt/vhome 2>/dev/null
    vgchange -q -an "${vg:-vg0}" >/dev/null 2>&1
    [ "$mode" = luks ] && [ -n "$name" ] && cryptsetup close "$name" 2>/dev/null
    return 0
}
trap cleanup EXIT
[ -f "$state/disk.env" ] || failed "no $state/disk.env (was the disk made by mkdisk.sh?)"
. "$state/disk.env"
vg=${VG:-vg0}

if [ "$mode" = luks ]; then
    [ -f "$key" ] || failed "key file $key missing"
    name=${name:-$(basename "$luks")_crypt}
    step "cryptsetup isLuks $luks"
    run "isLuks: $luks is not LUKS" cryptsetup isLuks "$luks"
    step "cryptsetup luksDump $luks"
    cryptsetup luksDump "$luks" > "$state/luksDump.txt" 2>&1 || failed "luksDump $luks"
    cat "$state/luksDump.txt" >&2
    step "cryptsetup open $luks $name"
    run "cryptsetup open $luks with $key" cryptsetup open --key-file "$key" "$luks" "$name"
    wait_dev "/dev/mapper/$name"
fi

step "LVM: vgscan, vgchange -ay $vg"
run "vgscan" vgscan --mknodes
run "vgchange -ay $vg" vgchange -ay "$vg"
mknodes
lvs -o lv_name,lv_size,seg_pe_ranges "$vg" >&2
for lv in root home raw split; do
    [ -b "/dev/$vg/$lv" ] || failed "LV $vg/$lv missing after activation"
done
if [ "$mode" = luks ]; then
    pvlist=$(pvs --noheadings -o pv_name 2>&1)
    case "$pvlist" in *"/dev/mapper/$name"*) ;; *) failed "the PV is not on /dev/mapper/$name: $pvlist" ;; esac
fi

mkdir -p /mnt/vroot /mnt/vhome
if [ "$replay" = 1 ]; then
    step "replay journals (mount rw + umount, as a boot would)"
    run "mount root rw" mount /dev/$vg/root /mnt/vroot
    run "umount root" umount /mnt/vroot
    run "mount home rw" mount /dev/$vg/home /mnt/vhome
    run "umount home" umount /mnt/vhome
fi
step "e2fsck -fn root"
run "fsck of $vg/root" e2fsck -fn /dev/$vg/root
step "xfs_repair -n home"
run "xfs_repair -n of $vg/home" xfs_repair -n /dev/$vg/home

step "mount ro and verify files"
run "mount root ro" mount -o ro /dev/$vg/root /mnt/vroot
run "mount home ro" mount -o ro /dev/$vg/home /mnt/vhome
run "root files (manifest.root)" "$LKTEST" verify-manifest --root /mnt/vroot --manifest "$state/manifest.root"
run "home files (manifest.home)" "$LKTEST" verify-manifest --root /mnt/vhome --manifest "$state/manifest.home"

step "raw LV contents"
while read -r lv hash seed; do
    [ -b "/dev/$vg/$lv" ] || failed "LV $vg/$lv missing"
    got=$(devhash "/dev/$vg/$lv") || failed "reading $vg/$lv"
    [ "$got" = "$hash" ] || {
        "$LKTEST" check "/dev/$vg/$lv" --seed "$seed" >&2 || true
        failed "LV $vg/$lv content changed: sha256 $got, expected $hash"
    }
    echo "ok: $vg/$lv sha256 $got" >&2
done < "$state/lvhash.txt"

if [ -z "$records" ] && [ -f "$state/acked" ]; then records=records.dat; fi
if [ -n "$records" ]; then
    step "records (writer file $records against $state/acked)"
    run "acked records" "$LKTEST" verify-records --file "/mnt/vroot/$records" --acked "$state/acked" --min-acked "$min_acked"
fi

if [ -n "${BOOT_DEV:-}" ] && [ -f "$state/boot.sha256" ]; then
    step "unrelated partition $BOOT_DEV untouched"
    [ "$(devhash "$BOOT_DEV")" = "$(cat "$state/boot.sha256")" ] || failed "partition $BOOT_DEV changed"
fi

step "done"
echo "VERIFY OK ($mode)" >&2
