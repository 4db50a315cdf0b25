# Stage "convert": the booted laptop converts its own PV online, with the live writer
# appending fsync'd records to a file on the root filesystem and acking each one on the
# second serial port (the host keeps the acks, also across a power cut).
. "$CTL/common.sh"
result root_source "$(findmnt -n -o SOURCE /)"
result usr_digest "$(usr_digest)"
stamp digest
mkdir -p "$(dirname "$RECORDS")"
stty -F /dev/ttyS1 raw -echo
"$LKTEST" writer --file "$RECORDS" --acked /dev/ttyS1 --interval-ms "${WRITER_MS:-50}" 2>/dev/null &
writer=$!
for i in $(seq 1 100); do [ -s "$RECORDS" ] && break; sleep 0.1; done
"$LUKSIFY" --dry-run --make-room /dev/vda5
stamp dry_run
rc=0
# (its output also in /run, where plainboot.sh's reboot watcher reads the progress)
"$LUKSIFY" --make-room --yes --key-file "$CTL/passphrase" --progress-json /dev/vda5 2>&1 \
    | tee /run/luksify-convert.out | timed || rc=$?
result luksify_rc $rc
stamp luksify
sleep 2
kill $writer; wait $writer || true
result records "$(( $(stat -c %s "$RECORDS") / 4096 ))"
cat /etc/crypttab
dmsetup table
result initramfs_cryptsetup "$(initramfs_unlockers)"
sync
exit $rc
