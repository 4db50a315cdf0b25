# Stage "resumeboot": the system was cut off mid-conversion, after the cut-over, and has
# just booted through the passphrase prompt of its own initramfs (the host typed it). The
# conversion goes on by itself in luksify-resume.service: show what the root sits on,
# `luksify status` mid-way, wait for the unit to end, show its journal and what it left.
. "$CTL/common.sh"
src=$(findmnt -n -o SOURCE /)
result root_source "$src"
result root_stack "$(lsblk -s -n -r -o NAME,TYPE "$src" | tr '\n' ' ')"
"$LUKSIFY" status /dev/vda5 || true
result unit_enabled "$(systemctl is-enabled luksify-resume.service 2>&1 || true)"
stamp status
# Wait until the unit has started (it is wanted by multi-user.target, as this one), then
# until it has ended.
for i in $(seq 1 600); do
    [ "$(systemctl show -p ExecMainStartTimestampMonotonic --value luksify-resume.service)" != 0 ] && break
    sleep 0.2
done
while :; do
    st=$(systemctl show -p ActiveState --value luksify-resume.service)
    case "$st" in active|activating|deactivating) sleep 1 ;; *) break ;; esac
done
stamp unit
result unit_state "$st"
result unit_result "$(systemctl show -p Result --value luksify-resume.service)"
result unit_exit "$(systemctl show -p ExecMainStatus --value luksify-resume.service)"
echo "----- journalctl -u luksify-resume.service -----"
journalctl -b -u luksify-resume.service --no-pager -o short-monotonic | grep -v '"event":"chunk"' || true
echo "----- end of journal -----"
result unit_left "$(ls /etc/systemd/system/luksify-resume.service /etc/systemd/system/multi-user.target.wants/luksify-resume.service /var/lib/luksify /etc/initramfs-tools/hooks/luksify /etc/initramfs-tools/scripts/local-top/luksify /usr/lib/dracut/modules.d/91luksify /etc/dracut.conf.d/90-luksify.conf /run/luksify 2>/dev/null | tr '\n' ' ')"
result crypttab "$(grep vda5_crypt /etc/crypttab)"
result initramfs_luksify "$(initramfs_ls "/boot/initrd.img-$(uname -r)" | grep -c luksify || true)"
result initramfs_cryptsetup "$(initramfs_unlockers)"
cryptsetup status vda5_crypt || true
sync
