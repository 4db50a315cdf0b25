# Stage "verify": the system has booted through its encrypted root (the host typed the
# passphrase at the initramfs prompt). Show what the root sits on, check every acked
# record and the contents of /usr.
. "$CTL/common.sh"
src=$(findmnt -n -o SOURCE /)
result root_source "$src"
result root_stack "$(lsblk -s -n -r -o NAME,TYPE "$src" | tr '\n' ' ')"
cryptsetup status "$(cat "$CTL/name")"
swapon --show
result usr_digest "$(usr_digest)"
stamp digest
"$LKTEST" verify-records --file "$RECORDS" --acked "$CTL/acked" --min-acked "$(cat "$CTL/min_acked")"
result records_verified yes
stamp records
