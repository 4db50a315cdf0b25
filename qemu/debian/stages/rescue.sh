# Stage "rescue": booted from rescue media (its own root on another disk; udev and LVM's
# autoactivation running as on any Debian) after a power cut mid-conversion. First show
# that the fence held (nothing activated the half-converted PV), then follow the README's
# recovery steps: resume without integration, open the installed system, integrate it.
. "$CTL/common.sh"
result rescue_root "$(findmnt -n -o SOURCE /)"
result fence_blkid "$(blkid -p -o value -s TYPE /dev/vda5 || echo none)"
result fence_active_lvs "$(dmsetup ls --target linear | wc -l)"
result fence_pvs "$(pvs --noheadings -o pv_name 2>/dev/null | tr -d ' ' | tr '\n' ',')"
"$LUKSIFY" status /dev/vda5
rc=0
"$LUKSIFY" resume --no-integrate --key-file "$CTL/passphrase" --progress-json /dev/vda5 || rc=$?
result resume_rc $rc
[ $rc = 0 ] || exit $rc
vgchange -ay vg0
mkdir -p /target
mount /dev/mapper/vg0-root /target
mount LABEL=boot /target/boot
for d in proc sys dev; do mount --bind /$d /target/$d; done
rc=0
"$LUKSIFY" resume --root /target /dev/vda5 || rc=$?
result integrate_rc $rc
cat /target/etc/crypttab
result initramfs_cryptsetup "$(lsinitramfs /target/boot/initrd.img-$(uname -r) | grep -c 'sbin/cryptsetup$' || true)"
umount /target/dev /target/sys /target/proc /target/boot /target
vgchange -an vg0
sync
exit $rc
