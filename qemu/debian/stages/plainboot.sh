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
. "$CTL/convert.sh"
