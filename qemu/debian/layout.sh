# UML scenario (qemu/uml/run): lay out the test system's disk on /dev/ubda from a
# debootstrap tree. Arguments: TREE BOOT_MIB PV_MIB ROOT_MIB SWAP_MIB
#   p1  /boot (ext4, label boot), BOOT_MIB
#   p2  extended, the rest of the disk
#   p5  the LVM PV (VG vg0, filling the partition): LV root (ext4, the tree without
#       /boot's contents), LV swap; the VG's free extents are at the PV's end, so that
#       `luksify --make-room` can shrink the PV over them.
. "$UML_LIB/common.sh"
tree=$1 boot=$2 pv=$3 root=$4 swap=$5
d=/dev/ubda
sfdisk -q "$d" <<SF
label: dos
start=2048, size=$((boot * 2048)), type=83
start=$(( (boot + 1) * 2048 )), type=5
start=$(( (boot + 2) * 2048 )), size=$((pv * 2048)), type=8e
SF
wait_dev "${d}1"; wait_dev "${d}5"
mkfs.ext4 -q -L boot -d "$tree/boot" "${d}1"
pvcreate -q "${d}5"
vgcreate -q vg0 "${d}5"
lvcreate -q -y -L "${root}M" -n root vg0
lvcreate -q -y -L "${swap}M" -n swap vg0
mknodes
mkswap -L swap /dev/mapper/vg0-swap >/dev/null
mkfs.ext4 -q -L root /dev/mapper/vg0-root
mkdir -p /mnt/root
mount /dev/mapper/vg0-root /mnt/root
tar -C "$tree" --exclude='./boot/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . | tar -C /mnt/root -xpf -
df -m /mnt/root
umount /mnt/root
vgchange -q -an vg0
pvs -o pv_name,pv_size,pv_free,pe_start
sfdisk -l "$d"
echo "layout done"
