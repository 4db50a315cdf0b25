# Stage "rescue": booted from rescue media (its own root on another disk; udev and LVM's
# autoactivation running as on any Debian) after a power cut mid-conversion. First show
# that the fence held (nothing activated the half-converted PV), then follow the README's
# recovery steps: resume without integration, open the installed system, integrate it.
. "$CTL/common.sh"
result rescue_root "$(findmnt -n -o SOURCE /)"
udevadm settle || true
result fence_blkid "$(blkid -p -o export /dev/vda5 2>/dev/null | tr '\n' ' ')"
result fence_dm "$(dmsetup ls 2>/dev/null | grep -v 'No devices found' | cut -f1 | tr '\n' ' ')"
result fence_pvs "$(pvs --noheadings -o pv_name 2>/dev/null | tr -d ' ' | tr '\n' ',')"
"$LUKSIFY" status /dev/vda5
rc=0
"$LUKSIFY" resume --no-integrate --key-file "$CTL/passphrase" --progress-json /dev/vda5 2>&1 | timed || rc=$?
result resume_rc $rc
stamp resume
[ $rc = 0 ] || exit $rc
# The fence check above means something only if this rescue system does autoactivate
# what it sees: now that the PV shows (on the LUKS mapping), udev and LVM activate it.
for i in $(seq 1 50); do
    udevadm settle || true
    [ -e /dev/mapper/vg0-root ] && break
    sleep 0.2
done
result autoactivated "$(lvs --noheadings -o lv_name --select lv_active=active vg0 2>/dev/null | tr -d ' ' | tr '\n' ',')"
vgchange -ay vg0
mkdir -p /target
mount /dev/mapper/vg0-root /target
mount LABEL=boot /target/boot
for d in proc sys dev; do mount --bind /$d /target/$d; done
rc=0
"$LUKSIFY" resume --root /target /dev/vda5 || rc=$?
result integrate_rc $rc
stamp integrate
cat /target/etc/crypttab
result initramfs_cryptsetup "$(lsinitramfs /target/boot/initrd.img-$(uname -r) | grep -c 'sbin/cryptsetup$' || true)"
umount /target/dev /target/sys /target/proc /target/boot /target
# Tidy up before the power-off, without waiting on udev: on a starved TCG guest a udev
# worker can be killed mid-event, and LVM would then wait for its cookie forever (seen
# once in CI: the stage never returned). The power-off does not need the LVs down.
echo "rescue: deactivating vg0"
timeout 120 vgchange -an --noudevsync vg0 || echo "rescue: vgchange -an vg0 failed or timed out ($?); powering off anyway"
sync
exit $rc
