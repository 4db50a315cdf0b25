# Sourced by every stage (run by files/luksify-ctl in the booted test system, with
# LUKSIFY, LKTEST and CTL=/ctl, the control disk). Results are lines "LKRESULT key=value"
# on the serial console, which the host test reads.
result() { echo "LKRESULT $1=$2"; }
# one digest of every file under /usr: the same before the conversion and after it
usr_digest() { find /usr -xdev -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64; }
RECORDS=/var/lib/lktest/records
