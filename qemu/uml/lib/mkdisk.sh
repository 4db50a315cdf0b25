#!/bin/bash
# Build the test disks INSIDE the UML guest (it needs device-mapper and LVM).
#
#   mkdisk.sh --disk1 /dev/ubda [--disk2 /dev/ubdb] [--tail-mib 30] [--pv-mib 256]
#             [--extent-mib 4] [--variant V] [--keep-active] [--key-file K] [--quick]
#
# Disk 1, msdos label (the laptop of the story):
#   p1  8 MiB ext4 "boot" (unrelated, must stay untouched)
#   p2  extended, holding
#   p5  the PV: PV_MIB of PV, then TAIL_MIB of unused room past the PV's end
# Disk 2: one partition, a second PV (needed for the `span` LV).
#
# VG vg0, 4 MiB extents, LVs placed on explicit PV extents of p5:
#   root   16 ext  ext4, a few MB of varied files       p5 extents 0-15
#   home   10 ext  xfs, some files                        p5 16-25
#   split   2+2 ext, two segments with a hole between    p5 26-27 and 34-35
#   raw     4 ext  unformatted, lktest fill --seed 1     p5 30-33
#   span    2 ext on p5 (36-37) + 2 ext on disk 2, fill --seed 3
#   free:   p5 28-29 (the hole) and 38..end
# Variants:
#   realistic  the above (default)
#   lastused   + LV `filler` taking every free extent of p5 up to its end
#   snapshot   + a snapshot LV `rootsnap` of root (on p5)
#   notail     the PV fills p5 entirely (no room for the header)
#   plainfs    no LVM: ext4 straight on p5 with files (manifest.plain)
#   luks       p5 is already LUKS2 (key file --key-file, default $OUT/key) with the VG inside
#   blank      p5 exists and holds nothing (first MiB zeroed)
# Records into $OUT (the state the verifier uses later):
#   disk.env        shell variables: PV_DEV, DISK1, DISK2, VARIANT, PV_MIB, TAIL_MIB, ...
#   manifest.root, manifest.home (manifest.plain for plainfs)
#   lvhash.txt      "LV sha256" for raw, split, span (whole LV)
# --quick puts far fewer files in the filesystems (for tests of the layout only).
# Unless --keep-active, everything is unmounted and vg0 deactivated at the end;
# with it, root is mounted at /mnt/root and home at /mnt/home.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

disk1="" disk2="" tail=30 pv=256 ext=4 variant=realistic keep=0 key="" quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --disk1) disk1=$2; shift 2 ;;
        --disk2) disk2=$2; shift 2 ;;
        --tail-mib) tail=$2; shift 2 ;;
        --pv-mib) pv=$2; shift 2 ;;
        --extent-mib) ext=$2; shift 2 ;;
        --variant) variant=$2; shift 2 ;;
        --keep-active) keep=1; shift ;;
        --key-file) key=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        *) die "mkdisk: unknown argument $1" ;;
    esac
done
[ -n "$disk1" ] || die "mkdisk: --disk1 is required"
case "$variant" in realistic|lastused|snapshot|notail|plainfs|luks|blank) ;; *) die "mkdisk: unknown variant $variant" ;; esac
[ "$variant" = notail ] && tail=0
: "${OUT:?OUT not set}"
key=${key:-$OUT/key}
PS4='+ ${EPOCHREALTIME} '
set -x

p5_mib=$((pv + tail))
need_mib=$((1 + 8 + 1 + p5_mib + 1))
size_mib=$(( $(blockdev --getsize64 "$disk1") / 1048576 ))
[ "$size_mib" -ge "$need_mib" ] || die "mkdisk: $disk1 has $size_mib MiB, needs $need_mib (pv $pv + tail $tail + 11)"

# --- disk 1: msdos label, p1 boot, p2 extended, p5 logical ------------------
sfdisk -q --wipe always "$disk1" <<SFDISK
label: dos
unit: sectors

$(part "$disk1" 1) : start=2048, size=16384, type=83
$(part "$disk1" 2) : start=18432, type=5
$(part "$disk1" 5) : start=20480, size=$((p5_mib * 2048)), type=8e
SFDISK
P1=$(part "$disk1" 1) P5=$(part "$disk1" 5)
wait_dev "$P1"; wait_dev "$P5"
# nothing of an older run may survive in p5
dd if=/dev/zero of="$P5" bs=1M count=2 conv=fsync status=none
dd if=/dev/zero of="$P5" bs=1M seek=$((p5_mib - 2)) count=2 conv=fsync status=none

mkfs.ext4 -q -F -L boot "$P1"
mkdir -p /mnt/boot
mount "$P1" /mnt/boot
echo "unrelated boot partition" > /mnt/boot/README
cp /usr/bin/linux.uml /mnt/boot/vmlinuz 2>/dev/null || head -c 3M /dev/urandom > /mnt/boot/vmlinuz
umount /mnt/boot
devhash "$P1" > "$OUT/boot.sha256"

P2B=""
if [ -n "$disk2" ]; then
    sfdisk -q --wipe always "$disk2" <<SFDISK
label: dos
unit: sectors

$(part "$disk2" 1) : start=2048, type=8e
SFDISK
    P2B=$(part "$disk2" 1)
    wait_dev "$P2B"
    dd if=/dev/zero of="$P2B" bs=1M count=2 conv=fsync status=none
fi

populate_root() { # DIR: a few MB of varied files
    local d=$1 i
    if [ "$quick" = 1 ]; then
        "$LKTEST" tree "$d/data" --seed 13 --files 20 --mib 1 >/dev/null
        return 0
    fi
    mkdir -p "$d/etc" "$d/usr/share/doc" "$d/var/log" "$d/srv/random" "$d/deep/a/b/c/d/e/f/g"
    # real text (a few docs from the host; hostfs is slow per file, keep it short)
    cp -a /usr/share/doc/bash /usr/share/doc/lvm2 "$d/usr/share/doc/" 2>/dev/null || true
    # a deterministic tree of ~300 files of varied sizes (one process: fast in UML)
    "$LKTEST" tree "$d/var/lib/data" --seed 11 --files 300 --mib 3 >/dev/null
    cp -a /etc/services /etc/protocols "$d/etc/" 2>/dev/null || true
    # random data of assorted sizes, some not block-aligned
    for i in 0 1 511 4096 4097 65536 1000000; do
        head -c "$i" /dev/urandom > "$d/srv/random/r$i"
    done
    # a sparse file, a hard link, a symlink, an empty file, a deep file, odd names
    truncate -s 5M "$d/srv/sparse"
    printf 'in the middle' | dd of="$d/srv/sparse" bs=1 seek=2097152 conv=notrunc status=none
    ln "$d/srv/random/r4096" "$d/srv/hardlink"
    ln -s random/r4097 "$d/srv/symlink"
    : > "$d/var/log/empty"
    echo deep > "$d/deep/a/b/c/d/e/f/g/file"
    echo "name with spaces" > "$d/srv/name with spaces"
}

make_manifest() { # NAME DIR
    "$LKTEST" manifest --root "$2" --out "$OUT/manifest.$1" --exclude lost+found
}

cat > "$OUT/disk.env" <<ENV
DISK1=$disk1
DISK2=$disk2
BOOT_DEV=$P1
PV_DEV=$P5
PV2_DEV=$P2B
VARIANT=$variant
PV_MIB=$pv
TAIL_MIB=$tail
P5_MIB=$p5_mib
EXTENT_MIB=$ext
VG=vg0
ENV

if [ "$variant" = blank ]; then
    set +x; note "mkdisk: $variant disk ready"; exit 0
fi

if [ "$variant" = plainfs ]; then
    mkfs.ext4 -q -F -L plain "$P5"
    mkdir -p /mnt/plain
    mount "$P5" /mnt/plain
    populate_root /mnt/plain
    sync
    make_manifest plain /mnt/plain
    [ "$keep" = 1 ] || umount /mnt/plain
    set +x; note "mkdisk: $variant disk ready"; exit 0
fi

pvdev=$P5
if [ "$variant" = luks ]; then
    [ -f "$key" ] || { printf 'test passphrase %s' "$RANDOM" > "$key"; }
    cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
        --key-file "$key" "$P5"
    cryptsetup open --key-file "$key" "$P5" p5_crypt
    pvdev=/dev/mapper/p5_crypt
    wait_dev "$pvdev"
    echo "LUKS_NAME=p5_crypt" >> "$OUT/disk.env"
fi

# --- LVM --------------------------------------------------------------------
if [ "$variant" = notail ]; then
    pvcreate -q -y "$pvdev"
else
    pvcreate -q -y --setphysicalvolumesize "${pv}m" "$pvdev"
fi
pvs=("$pvdev")
[ -n "$P2B" ] && { pvcreate -q -y "$P2B"; pvs+=("$P2B"); }
vgcreate -q -s "${ext}m" vg0 "${pvs[@]}"
pe_count=$(pvs --noheadings -o pv_pe_count "$pvdev" | tr -d ' ')
[ "$pe_count" -ge 40 ] || die "mkdisk: PV has only $pe_count extents of ${ext} MiB; use a bigger --pv-mib"

lvc() { lvcreate -q -y -Wy -Zy "$@"; }
lvc -n root  -l 16 vg0 "$pvdev:0-15"
lvc -n home  -l 10 vg0 "$pvdev:16-25"
lvc -n split -l 2  vg0 "$pvdev:26-27"
lvc -n gap   -l 2  vg0 "$pvdev:28-29"
lvc -n raw   -l 4  vg0 "$pvdev:30-33"
lvextend -q -l +2 vg0/split "$pvdev:34-35"
lvremove -q -y vg0/gap
if [ -n "$P2B" ]; then
    lvc -n span -l 2 vg0 "$pvdev:36-37"
    lvextend -q -l +2 vg0/span "$P2B"
fi
case "$variant" in
    lastused) lvc -n filler -l 100%PVS vg0 "$pvdev:38-$((pe_count - 1))" ;;
    snapshot) lvcreate -q -y -s -n rootsnap -l 2 vg0/root "$pvdev:38-39" ;;
esac
mknodes
for lv in root home split raw ${P2B:+span}; do wait_dev "/dev/vg0/$lv"; done

mkfs.ext4 -q -F -L root /dev/vg0/root
QA_CHECK_FS=1 TEST_DIR=1 TEST_DEV=1 mkfs.xfs -q -f -L home /dev/vg0/home  # under 300 MB needs the QA override
mkdir -p /mnt/root /mnt/home
mount /dev/vg0/root /mnt/root
mount /dev/vg0/home /mnt/home
populate_root /mnt/root
mkdir -p /mnt/home/user
"$LKTEST" tree /mnt/home/user --seed 12 --files $([ "$quick" = 1 ] && echo 10 || echo 60) --mib 2 >/dev/null
head -c 300007 /dev/urandom > /mnt/home/user/blob
sync
make_manifest root /mnt/root
make_manifest home /mnt/home

"$LKTEST" fill /dev/vg0/raw --seed 1 >/dev/null
"$LKTEST" fill /dev/vg0/split --seed 2 >/dev/null
[ -n "$P2B" ] && "$LKTEST" fill /dev/vg0/span --seed 3 >/dev/null
{
    echo "raw $(devhash /dev/vg0/raw) 1"
    echo "split $(devhash /dev/vg0/split) 2"
    [ -n "$P2B" ] && echo "span $(devhash /dev/vg0/span) 3"
} > "$OUT/lvhash.txt"
lvs -o lv_name,seg_start_pe,seg_size_pe,seg_pe_ranges --units m vg0 > "$OUT/lvs.txt" 2>&1 || true
pvs -o pv_name,pe_start,pv_size,pv_pe_count,dev_size --units s > "$OUT/pvs.txt" 2>&1 || true

if [ "$keep" = 0 ]; then
    umount /mnt/root /mnt/home
    vgchange -q -an vg0
    [ "$variant" = luks ] && cryptsetup close p5_crypt
fi
sync
set +x
cat "$OUT/lvs.txt" >&2
note "mkdisk: $variant disk ready (PV $pvdev, $pe_count extents, tail $tail MiB)"
