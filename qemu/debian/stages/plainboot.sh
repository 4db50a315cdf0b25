# Stage "plainboot": the power was cut after luksify had set up the boot chain (crypttab
# line, initramfs) but before its cut-over. The system must have booted the plain PV at
# once (luksify's local-top script dropped the entry), and a new `luksify` run must work:
# the rest is the "convert" stage.
. "$CTL/common.sh"
result uptime_at_stage "$(cut -d' ' -f1 /proc/uptime)"
result plain_blkid "$(blkid -p -s TYPE -o value /dev/vda5 || true)"
result plain_stack "$(lsblk -s -n -r -o NAME,TYPE "$(findmnt -n -o SOURCE /)" | tr '\n' ' ')"
result unit_ran "$(systemctl show -p ExecMainStartTimestampMonotonic --value luksify-resume.service)"
systemd-analyze || true
# Issue 20 (b): with "reboot_at" (per mille of the PV) on the control disk, a watcher runs
# `systemctl reboot` once that much has moved, after showing logind's inhibitors. The
# reboot goes through logind, which tells luksify (PrepareForShutdown) and waits for its
# delay inhibitor: luksify stops at its next commit point and exits "paused".
if [ -f "$CTL/reboot_at" ]; then
    at=$(cat "$CTL/reboot_at")
    (
        set +e
        while :; do
            l=$(grep '"event":"chunk"' /run/luksify-convert.out 2>/dev/null | tail -n 1)
            m=$(echo "$l" | sed -n 's/.*"moved_sectors":\([0-9]*\).*/\1/p')
            t=$(echo "$l" | sed -n 's/.*"total_sectors":\([0-9]*\).*/\1/p')
            [ -n "$m" ] && [ -n "$t" ] && [ $((m * 1000)) -ge $((t * at)) ] && break
            sleep 0.5
        done
        inh=$(systemd-inhibit --list --no-pager 2>&1)
        echo "----- systemd-inhibit --list -----"
        echo "$inh"
        echo "----- end of list -----"
        result inhibitor_luksify "$(echo "$inh" | grep -c 'luksify')"
        result reboot_at_moved "$m/$t"
        stamp reboot
        systemctl reboot
    ) &
fi
# The writer of the first run left its records on the root LV: this one appends more
# slowly, so that the root filesystem keeps room for update-initramfs's work files under
# emulation that runs slow.
WRITER_MS=200
. "$CTL/convert.sh"
