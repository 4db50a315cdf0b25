# Sourced by every stage (run by files/luksify-ctl in the booted test system, with
# LUKSIFY, LKTEST and CTL=/ctl, the control disk). Results are lines "LKRESULT key=value"
# on the serial console, which the host test reads.
result() { echo "LKRESULT $1=$2"; }
# luksify comes as the Debian package of this build, installed the way a user installs it
# (dpkg checks its declared dependencies against this system); the stages run the installed
# /usr/sbin/luksify. The control disk has no loose binary, so this cannot be bypassed.
if [ "$(dpkg-deb -f "$CTL/luksify.deb" Version)" != "$(dpkg-query -W -f '${Version}' luksify 2>/dev/null)" ] \
        || ! cmp -s <(dpkg-deb --fsys-tarfile "$CTL/luksify.deb" | tar -xO ./usr/sbin/luksify) /usr/sbin/luksify; then
    dpkg -i "$CTL/luksify.deb" >/dev/null || { result dpkg_rc $?; echo "dpkg -i luksify.deb failed"; exit 1; }
fi
LUKSIFY=/usr/sbin/luksify
result luksify_installed "$(dpkg-query -W -f '${Package} ${Version} ${Status}' luksify)"
# one digest of every file under /usr: the same before the conversion and after it
# (md5: a check for damage, not for an adversary, and about twice as fast under emulation)
usr_digest() { find /usr -xdev -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum | md5sum | cut -c1-32; }
RECORDS=/var/lib/lktest/records
# Seconds since the stage started (bash's clock: no fork, so it also runs while luksify
# holds the root device suspended): `stamp NAME` reports one as a result, `timed` prefixes
# each line it copies with one.
T0US=${EPOCHREALTIME/./}
stamp() { local d=$(( (${EPOCHREALTIME/./} - T0US) / 100000 )); result "t_$1" "$((d / 10)).$((d % 10))"; }
timed() {
    local l d
    while IFS= read -r l; do
        d=$(( (${EPOCHREALTIME/./} - T0US) / 100000 ))
        printf '[+%d.%d] %s\n' $((d / 10)) $((d % 10)) "$l"
    done
}
# The files of an initramfs, whichever generator made it (initramfs-tools or dracut).
initramfs_ls() { if command -v lsinitramfs >/dev/null; then lsinitramfs "$1"; else lsinitrd "$1"; fi; }
# How many programs in the initramfs of this kernel can unlock LUKS (cryptsetup, or
# systemd-cryptsetup where dracut puts systemd in it).
initramfs_unlockers() { initramfs_ls "/boot/initrd.img-$(uname -r)" | grep -cE 'sbin/cryptsetup$|/systemd-cryptsetup$' || true; }
