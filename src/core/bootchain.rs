//! The boot chain of a LUKS2 conversion in progress (initramfs-tools, and dracut with
//! systemd in the initramfs): what luksify puts in place *before the cut-over* so that a
//! reboot at any instant boots, and what it removes at the finish. Pure: the texts and the
//! decisions; `adapters::bootchain` writes them.
//!
//! initramfs-tools:
//! - etc/crypttab gets the line for the new LUKS UUID with `initramfs` (cryptsetup's
//!   initramfs hook includes it although the root is not on a crypt device yet), `nofail`
//!   (systemd does not wait for a UUID that does not exist yet after a crash before the
//!   cut-over) and luksify's keyscript, which asks the usual question and keeps the answer
//!   in /run (tmpfs, root only) for the resume unit.
//! - An initramfs-tools hook adds blkid and the dm-crypt modules a reencryption in progress
//!   needs (crypto_null maps the plaintext segments) to the initramfs.
//! - A local-top script, which runs before cryptroot (cryptroot runs last in local-top):
//!   when the partition is still the plain LVM PV (a crash before the cut-over), it drops
//!   the entry from the initramfs's crypttab, so the plain system boots at once.
//!
//! dracut (systemd in the initramfs; etc/crypttab stays as it is until the finish):
//! - a dracut module of luksify's own (`91luksify`) with a unit, `luksify-unlock.service`,
//!   ordered before cryptsetup.target as systemd-cryptsetup's units are: when the partition
//!   is LUKS (the cut-over happened) it asks the usual question through
//!   systemd-ask-password, keeps the answer in /run for the resume unit and opens the
//!   device under the conversion's mapping name; when it is still the plain LVM PV it does
//!   nothing, so the plain system boots at once.
//! - etc/dracut.conf.d/90-luksify.conf adds that module and, where crypttab has no other
//!   entry, leaves out dracut's crypt module, whose generic mode would unlock the same
//!   device a second time under another name.
//!
//! Both: luksify-resume.service runs `luksify resume DEVICE` once the system is up.

/// Where luksify keeps its copy of itself and the keyscript while a conversion may need the
/// boot chain (removed at the finish).
pub const STATE_DIR: &str = "/var/lib/luksify";
pub const BINARY: &str = "/var/lib/luksify/luksify";
pub const KEYSCRIPT: &str = "/var/lib/luksify/keyscript";
pub const HOOK: &str = "/etc/initramfs-tools/hooks/luksify";
pub const LOCAL_TOP: &str = "/etc/initramfs-tools/scripts/local-top/luksify";
pub const UNIT_NAME: &str = "luksify-resume.service";
pub const UNIT: &str = "/etc/systemd/system/luksify-resume.service";
pub const UNIT_WANTS: &str = "/etc/systemd/system/multi-user.target.wants/luksify-resume.service";
/// Where the keyscript leaves the passphrase typed at boot (the initramfs's /run is moved
/// into the booted system).
pub const RUN_DIR: &str = "/run/luksify";

/// luksify's dracut module (dracut reads modules from this directory only).
pub const DRACUT_MODULE_DIR: &str = "/usr/lib/dracut/modules.d/91luksify";
pub const DRACUT_MODULE_SETUP: &str = "/usr/lib/dracut/modules.d/91luksify/module-setup.sh";
pub const DRACUT_UNLOCK: &str = "/usr/lib/dracut/modules.d/91luksify/luksify-unlock.sh";
pub const DRACUT_UNLOCK_UNIT: &str = "/usr/lib/dracut/modules.d/91luksify/luksify-unlock.service";
pub const DRACUT_CONF: &str = "/etc/dracut.conf.d/90-luksify.conf";

/// Every file the boot chain installs, for either generator (the state dir and the dracut
/// module's directory aside).
pub const FILES: [&str; 9] =
    [HOOK, LOCAL_TOP, UNIT, UNIT_WANTS, KEYSCRIPT, DRACUT_MODULE_SETUP, DRACUT_UNLOCK, DRACUT_UNLOCK_UNIT, DRACUT_CONF];

/// What the boot chain is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The mapping name (`vda5_crypt`).
    pub name: String,
    /// The LUKS UUID luksify chose before formatting.
    pub uuid: String,
    pub discard: bool,
    /// The raw partition, canonical (`/dev/vda5`): the name of this boot only.
    pub device: String,
    /// The partition's PARTUUID, when its partition table gives one: a name that stays the
    /// same when the kernel names the disks in another order at the next boot (a USB stick
    /// plugged in makes sda sdb).
    pub partuuid: Option<String>,
}

impl Chain {
    /// How the initramfs finds the partition before the cut-over: by PARTUUID (udev's link,
    /// the same at every boot), else by the kernel name of today.
    pub fn boot_device(&self) -> String {
        match &self.partuuid {
            Some(p) => format!("/dev/disk/by-partuuid/{p}"),
            None => self.device.clone(),
        }
    }

    /// How the resume unit names the device: by its LUKS UUID (udev's link for the
    /// crypto_LUKS it is from the cut-over on; the unit runs only after the boot unlocked it).
    pub fn unit_device(&self) -> String {
        format!("/dev/disk/by-uuid/{}", self.uuid)
    }
}

/// The passphrase file the keyscript writes for `name`.
pub fn pass_file(name: &str) -> String {
    format!("{RUN_DIR}/{name}.pass")
}

/// The crypttab line while the conversion runs (see the module's notes).
pub fn crypttab_line_during(c: &Chain) -> String {
    format!(
        "{} UUID={} none luks,{}initramfs,nofail,keyscript={KEYSCRIPT}",
        c.name,
        c.uuid,
        if c.discard { "discard," } else { "" }
    )
}

/// The keyscript: the question cryptroot itself asks, the answer both to cryptsetup
/// (standard output) and to the pass file for the resume unit.
pub fn keyscript(c: &Chain) -> String {
    format!(
        r#"#!/bin/sh
# luksify: asks for the passphrase of {name} as cryptroot does and keeps it in
# {pass} (tmpfs, root only) for luksify-resume.service, which finishes the
# conversion in progress and removes this script.
umask 077
mkdir -p {run}
/lib/cryptsetup/askpass "Please unlock disk ${{CRYPTTAB_NAME:-{name}}}: " | tee {pass}
"#,
        name = c.name,
        run = RUN_DIR,
        pass = pass_file(&c.name)
    )
}

/// The kernel modules an initramfs needs to open a LUKS2 reencryption in progress with
/// `cipher` (crypto_null maps the plaintext segments).
pub fn crypt_modules(cipher: &str) -> Vec<&str> {
    let mut mods: Vec<&str> = vec!["dm_mod", "dm_crypt", "crypto_null", "algif_skcipher", "sha256_generic"];
    let parts: Vec<&str> = cipher.split('-').collect();
    if let Some(c) = parts.first() {
        match *c {
            "aes" => mods.extend(["aesni_intel", "aes_generic", "aes"]),
            other => mods.push(other),
        }
    }
    if let Some(m) = parts.get(1) {
        mods.push(m);
        if *m == "xts" {
            mods.push("ecb");
        }
    }
    // the IV generator, when it is a kernel template of its own (essiv:<hash>)
    if let Some((iv, hash)) = parts.get(2).and_then(|iv| iv.split_once(':')) {
        if iv == "essiv" {
            mods.extend(["essiv", hash]);
        }
    }
    mods.dedup();
    mods
}

/// The initramfs-tools hook: blkid (util-linux's: the local-top script needs `-p`) and the
/// kernel modules for a LUKS2 reencryption in progress with `cipher`.
pub fn hook_script(cipher: &str) -> String {
    format!(
        r#"#!/bin/sh
# luksify: while a conversion to LUKS2 may be in progress, the initramfs opens it.
PREREQ=""
prereqs() {{ echo "$PREREQ"; }}
case "$1" in prereqs) prereqs; exit 0;; esac
. /usr/share/initramfs-tools/hook-functions
copy_exec /sbin/blkid /sbin
manual_add_modules {mods}
"#,
        mods = crypt_modules(cipher).join(" ")
    )
}

/// dracut's configuration while the conversion may be in progress: luksify's module in,
/// and dracut's crypt module out when `omit_crypt` (crypttab has no other entry).
pub fn dracut_conf(omit_crypt: bool) -> String {
    format!(
        "# luksify: while a conversion to LUKS2 may be in progress (removed at its finish)\nadd_dracutmodules+=\" luksify \"\n{}",
        if omit_crypt { "omit_dracutmodules+=\" crypt \"\n" } else { "" }
    )
}

/// Every command the dracut unlock script runs (the module installs these; the rest is
/// the shell's own).
pub const DRACUT_UNLOCK_TOOLS: [&str; 6] = ["blkid", "cryptsetup", "systemd-ask-password", "mkdir", "rm", "sleep"];

/// luksify's dracut module: the unlock unit and script, the tools they run and the kernel
/// modules for `cipher`.
pub fn dracut_module_setup(cipher: &str) -> String {
    format!(
        r#"#!/bin/bash
# luksify: while a conversion to LUKS2 may be in progress, the initramfs opens it
# (luksify-unlock.service); removed at the conversion's finish.
check() {{
    require_binaries cryptsetup blkid systemd-ask-password || return 1
    return 0
}}
depends() {{
    echo dm systemd systemd-ask-password
}}
installkernel() {{
    hostonly='' instmods {mods}
}}
install() {{
    inst_multiple {tools}
    inst_script "$moddir/luksify-unlock.sh" /usr/sbin/luksify-unlock
    inst_simple "$moddir/luksify-unlock.service" "$systemdsystemunitdir/luksify-unlock.service"
    # sysinit.target pulls it in (cryptsetup.target is pulled in only by dracut's crypt module)
    mkdir -p "$initdir$systemdsystemunitdir/sysinit.target.wants"
    ln -sf ../luksify-unlock.service "$initdir$systemdsystemunitdir/sysinit.target.wants/luksify-unlock.service"
}}
"#,
        mods = crypt_modules(cipher).join(" "),
        tools = DRACUT_UNLOCK_TOOLS.join(" ")
    )
}

/// The unit of luksify's dracut module (see the module's notes).
pub fn dracut_unlock_unit(c: &Chain) -> String {
    format!(
        r#"# luksify: unlock {dev} when its conversion to LUKS2 is in progress
[Unit]
Description=luksify: unlock {name} (conversion to LUKS2 in progress)
DefaultDependencies=no
After=systemd-udev-trigger.service systemd-udevd.service cryptsetup-pre.target
Before=cryptsetup.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/luksify-unlock
StandardOutput=journal+console
"#,
        dev = c.device,
        name = c.name
    )
}

/// The script the unit runs: nothing while the partition is the plain LVM PV; else the
/// question, the answer kept for the resume unit, `cryptsetup open`.
pub fn dracut_unlock_script(c: &Chain) -> String {
    format!(
        r#"#!/bin/sh
# luksify: a conversion of {dev} to LUKS2 (UUID {uuid}) was set up. Before its cut-over
# the partition is still the plain LVM PV: then boot it as before. After it, ask for the
# passphrase, keep it in {pass} (tmpfs, root only) for luksify-resume.service, and open
# the conversion in progress as {name}.
DEV=${{LUKSIFY_DEV:-{boot_dev}}}
NAME={name}
PASS=${{LUKSIFY_PASS:-{pass}}}
n=${{LUKSIFY_WAIT:-300}}
while [ ! -b "$DEV" ] && [ "$n" -gt 0 ]; do sleep 0.1; n=$((n - 1)); done
type=$(blkid -p -s TYPE -o value "$DEV" 2>/dev/null)
if [ "$type" != crypto_LUKS ]; then
    echo "luksify: $DEV: ${{type:-nothing known}} (the conversion did not start): not unlocking $NAME"
    exit 0
fi
[ -b "/dev/mapper/$NAME" ] && exit 0
umask 077
mkdir -p "${{PASS%/*}}"
while :; do
    pw=$(systemd-ask-password --timeout=0 --id="luksify:$NAME" "Please unlock disk $NAME:") || exit 1
    printf '%s' "$pw" > "$PASS"
    pw=
    if cryptsetup open --type luks2 {discard}--key-file "$PASS" "$DEV" "$NAME"; then
        echo "luksify: $NAME: set up successfully"
        exit 0
    fi
    rm -f "$PASS"
    echo "luksify: cannot unlock $NAME with that passphrase: try again"
done
"#,
        dev = c.device,
        uuid = c.uuid,
        boot_dev = c.boot_device(),
        name = c.name,
        pass = pass_file(&c.name),
        discard = if c.discard { "--allow-discards " } else { "" }
    )
}

/// The local-top script: runs before cryptroot; drops the entry for `name` from the
/// initramfs's crypttab when `device` still is the plain LVM PV (the cut-over never
/// happened). Any other answer (LUKS, nothing readable, no device) keeps it.
pub fn local_top_script(c: &Chain) -> String {
    format!(
        r#"#!/bin/sh
# luksify: a conversion of {dev} to LUKS2 (UUID {uuid}) was set up. Before its cut-over
# the partition is still the plain LVM PV: then boot it as before, without waiting for a
# LUKS device that does not exist (cryptroot runs after every other local-top script).
PREREQ=""
prereqs() {{ echo "$PREREQ"; }}
case "$1" in prereqs) prereqs; exit 0;; esac
[ -f /scripts/functions ] && . /scripts/functions
TAB=${{LUKSIFY_TABFILE:-/cryptroot/crypttab}}
DEV={boot_dev}
NAME={name}
n=${{LUKSIFY_WAIT:-100}}
command -v wait_for_udev >/dev/null 2>&1 && wait_for_udev 10
while [ ! -b "$DEV" ] && [ "$n" -gt 0 ]; do sleep 0.1; n=$((n - 1)); done
type=$(blkid -p -s TYPE -o value "$DEV" 2>/dev/null)
if [ "$type" = LVM2_member ] && [ -f "$TAB" ]; then
    echo "luksify: $DEV is still the plain LVM PV (the conversion did not start): not unlocking $NAME"
    sed -i "/^$NAME[[:space:]]/d" "$TAB"
else
    echo "luksify: $DEV: ${{type:-nothing known}}: $NAME is unlocked as usual"
fi
exit 0
"#,
        dev = c.device,
        boot_dev = c.boot_device(),
        uuid = c.uuid,
        name = c.name
    )
}

/// The unit that finishes the conversion once the system is up.
pub fn unit_text(c: &Chain) -> String {
    format!(
        r#"# Installed by luksify for the conversion of {dev} to LUKS2; removed at its finish.
[Unit]
Description=luksify: finish the conversion of {dev} to LUKS
After=local-fs.target cryptsetup.target
ConditionPathExists={bin}
ConditionPathExists={pass}

[Service]
Type=simple
ExecStart={bin} resume --yes --progress-json --key-file {pass} {unit_dev}
ExecStopPost=-/bin/rm -f {pass}
# stopped at a safe point (a shutdown's SIGTERM): the next boot goes on, not a failure
SuccessExitStatus={paused}
TimeoutStopSec=10min
KillMode=process

[Install]
WantedBy=multi-user.target
"#,
        dev = c.device,
        unit_dev = c.unit_device(),
        bin = BINARY,
        pass = pass_file(&c.name),
        paused = crate::error::exit::PAUSED
    )
}

/// The names of the entries of crypttab text `t` other than `name`.
pub fn other_crypttab_entries(t: &str, name: &str) -> Vec<String> {
    t.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != name)
        .map(str::to_string)
        .collect()
}

/// The version in `cryptsetup --version` output ("cryptsetup 2.6.1 flags: ...").
pub fn parse_cryptsetup_version(out: &str) -> Option<(u32, u32, u32)> {
    let w = out.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut it = w.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse::<u32>());
    let maj = it.next()?.ok()?;
    let min = it.next()?.ok()?;
    let pat = it.next().and_then(|r| r.ok()).unwrap_or(0);
    Some((maj, min, pat))
}

/// Whether this cryptsetup opens a LUKS2 reencryption in progress (`online-reencrypt-v2`):
/// 2.3.7 and later 2.3 releases, 2.4.3 and later (2.4.0–2.4.2 do not).
pub fn opens_reencryption(v: (u32, u32, u32)) -> bool {
    match v {
        (2, 3, p) => p >= 7,
        (2, 4, p) => p >= 3,
        (2, m, _) => m >= 5,
        (maj, _, _) => maj > 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn chain() -> Chain {
        Chain {
            name: "vda5_crypt".into(),
            uuid: "0b2c6f3e-1111-2222-3333-444455556666".into(),
            discard: false,
            device: "/dev/vda5".into(),
            partuuid: None,
        }
    }

    #[test]
    fn the_initramfs_and_the_unit_name_the_partition_by_what_survives_a_reboot() {
        let c = Chain { partuuid: Some("5e1f2a3b-05".into()), ..chain() };
        assert!(local_top_script(&c).contains("\nDEV=/dev/disk/by-partuuid/5e1f2a3b-05\n"), "{}", local_top_script(&c));
        assert!(local_top_script(&chain()).contains("\nDEV=/dev/vda5\n"));
        let u = unit_text(&c);
        assert!(u.contains(" /dev/disk/by-uuid/0b2c6f3e-1111-2222-3333-444455556666\n"), "{u}");
        assert!(!u.contains("ExecStart=/var/lib/luksify/luksify resume --yes --progress-json --key-file /run/luksify/vda5_crypt.pass /dev/vda5"), "{u}");
    }

    #[test]
    fn crypttab_line_during_the_conversion() {
        let mut c = chain();
        assert_eq!(
            crypttab_line_during(&c),
            "vda5_crypt UUID=0b2c6f3e-1111-2222-3333-444455556666 none luks,initramfs,nofail,keyscript=/var/lib/luksify/keyscript"
        );
        c.discard = true;
        assert!(crypttab_line_during(&c).contains(" none luks,discard,initramfs,nofail,keyscript="));
        // the same name as the final line: the finish's crypttab edit replaces it
        let edited = crate::core::integrate::edit_crypttab(
            &format!("# x\n{}\n", crypttab_line_during(&c)),
            "vda5_crypt",
            &c.uuid,
            true,
        );
        assert_eq!(edited, format!("# x\nvda5_crypt UUID={} none luks,discard\n", c.uuid));
    }

    #[test]
    fn cryptsetup_versions() {
        assert_eq!(parse_cryptsetup_version("cryptsetup 2.6.1 flags: UDEV BLKID KEYRING"), Some((2, 6, 1)));
        assert_eq!(parse_cryptsetup_version("cryptsetup 2.3.7\n"), Some((2, 3, 7)));
        assert_eq!(parse_cryptsetup_version("cryptsetup 2.7.0-rc1 flags: x"), Some((2, 7, 0)));
        assert_eq!(parse_cryptsetup_version("no version here"), None);
        assert!(opens_reencryption((2, 3, 7)));
        assert!(!opens_reencryption((2, 3, 6)));
        assert!(!opens_reencryption((2, 4, 2)));
        assert!(opens_reencryption((2, 4, 3)));
        assert!(opens_reencryption((2, 6, 1)));
        assert!(!opens_reencryption((2, 2, 2)));
        assert!(!opens_reencryption((1, 7, 5)));
        assert!(opens_reencryption((3, 0, 0)));
    }

    #[test]
    fn unit_file_runs_resume_with_the_boot_passphrase_and_removes_it() {
        let u = unit_text(&chain());
        assert!(u.contains(
            "ExecStart=/var/lib/luksify/luksify resume --yes --progress-json --key-file /run/luksify/vda5_crypt.pass /dev/disk/by-uuid/0b2c6f3e-1111-2222-3333-444455556666\n"
        ));
        assert!(u.contains("ExecStopPost=-/bin/rm -f /run/luksify/vda5_crypt.pass\n"));
        assert!(u.contains("WantedBy=multi-user.target\n"));
        assert!(u.contains("Type=simple\n"), "must not hold up multi-user.target");
        // a pause at shutdown (luksify's exit 11) is no failure of the unit
        assert!(u.contains("SuccessExitStatus=11\n"), "{u}");
        // a plain boot (a crash before the cut-over: no prompt, no pass file) runs nothing
        assert!(u.contains("ConditionPathExists=/run/luksify/vda5_crypt.pass\n"));
    }

    #[test]
    fn hook_adds_the_modules_of_another_cipher() {
        let h = hook_script("serpent-cbc-essiv:sha256");
        let mods = h.lines().find(|l| l.starts_with("manual_add_modules ")).unwrap();
        for m in ["dm_crypt", "serpent", "cbc", "essiv", "sha256"] {
            assert!(mods.split_whitespace().any(|w| w == m), "{m} missing: {mods}");
        }
    }

    #[test]
    fn hook_adds_blkid_and_the_reencryption_modules() {
        let h = hook_script("aes-xts-plain64");
        assert!(h.contains("copy_exec /sbin/blkid /sbin\n"));
        let mods = h.lines().find(|l| l.starts_with("manual_add_modules ")).unwrap();
        for m in ["dm_crypt", "crypto_null", "xts", "ecb", "aesni_intel"] {
            assert!(mods.split_whitespace().any(|w| w == m), "{m} missing: {mods}");
        }
        let h = hook_script("serpent-cbc-essiv:sha256");
        assert!(h.contains(" serpent cbc"), "{h}");
    }

    /// Runs the local-top script with a fake blkid answering `blkid_type`; returns the
    /// initramfs crypttab afterwards and the script's output.
    fn run_local_top(blkid_type: Option<&str>) -> (String, String) {
        let d = crate::adapters::scratch_dir("bootchain", &format!("lt-{}", blkid_type.unwrap_or("none")));
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let fake = match blkid_type {
            Some(t) => format!("#!/bin/sh\necho {t}\n"),
            None => "#!/bin/sh\nexit 2\n".to_string(),
        };
        std::fs::write(bin.join("blkid"), fake).unwrap();
        let script = d.join("luksify");
        std::fs::write(&script, local_top_script(&chain())).unwrap();
        let tab = d.join("crypttab");
        let other = "swap_crypt UUID=aaaa none luks\n";
        std::fs::write(&tab, format!("{other}vda5_crypt UUID=0b2c none luks,initramfs,nofail\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("blkid"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new("sh")
            .arg(&script)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("LUKSIFY_TABFILE", &tab)
            .env("LUKSIFY_WAIT", "0")
            .output()
            .unwrap();
        assert!(out.status.success());
        let t = std::fs::read_to_string(&tab).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        (t, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    #[test]
    fn local_top_drops_the_entry_only_while_the_partition_is_the_plain_pv() {
        let (t, out) = run_local_top(Some("LVM2_member"));
        assert_eq!(t, "swap_crypt UUID=aaaa none luks\n", "{out}");
        assert!(out.contains("still the plain LVM PV"));
        for keep in [Some("crypto_LUKS"), None] {
            let (t, out) = run_local_top(keep);
            assert!(t.contains("vda5_crypt UUID=0b2c"), "{keep:?}: {t} {out}");
            assert!(t.contains("swap_crypt"));
        }
    }

    #[test]
    fn prereqs_answers_for_initramfs_tools() {
        let d = crate::adapters::scratch_dir("bootchain", "prereqs");
        for (n, s) in [("hook", hook_script("aes-xts-plain64")), ("lt", local_top_script(&chain()))] {
            let p = d.join(n);
            std::fs::write(&p, s).unwrap();
            let out = Command::new("sh").arg(&p).arg("prereqs").output().unwrap();
            assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).trim().is_empty());
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn keyscript_asks_as_cryptroot_and_keeps_the_answer_for_the_unit() {
        let k = keyscript(&chain());
        assert!(k.contains("/lib/cryptsetup/askpass \"Please unlock disk ${CRYPTTAB_NAME:-vda5_crypt}: \""));
        assert!(k.contains("| tee /run/luksify/vda5_crypt.pass"));
        assert!(k.contains("umask 077"));
    }

    /// Runs the dracut unlock script with fakes: blkid answers `blkid_type`,
    /// systemd-ask-password answers "wrong" then "right" (with the newline it prints), then
    /// fails as when the boot is given up,
    /// cryptsetup succeeds for the key file "right" only and logs its arguments. Returns
    /// the script's output, the fakes' log and the pass file left behind (if any).
    fn run_dracut_unlock(blkid_type: &str) -> (String, String, Option<String>) {
        use std::os::unix::fs::PermissionsExt;
        use std::path::Path;
        let d = crate::adapters::scratch_dir("bootchain", &format!("du-{blkid_type}"));
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let log = d.join("log");
        let fakes = [
            ("blkid", format!("#!/bin/sh\necho {blkid_type}\n")),
            (
                "systemd-ask-password",
                format!(
                    "#!/bin/sh\necho \"ask $*\" >> {log}\n[ -f {d}/asked2 ] && exit 1\nif [ -f {d}/asked ]; then /usr/bin/touch {d}/asked2; echo right; else /usr/bin/touch {d}/asked; echo wrong; fi\n",
                    log = log.display(),
                    d = d.display()
                ),
            ),
            (
                "cryptsetup",
                format!(
                    "#!/bin/sh\necho \"cryptsetup $*\" >> {log}\nfor a; do k=$prev; prev=$a; [ \"$k\" = --key-file ] && kf=$a; done\n[ \"$(/usr/bin/cat \"$kf\")\" = right ] && [ $(/usr/bin/wc -c < \"$kf\") = 5 ]\n",
                    log = log.display()
                ),
            ),
        ];
        for (n, t) in fakes {
            std::fs::write(bin.join(n), t).unwrap();
            std::fs::set_permissions(bin.join(n), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // PATH holds the fakes and the host's copies of the other tools the module installs,
        // nothing else: a command the initramfs lacks fails here as it did there (dirname)
        for t in DRACUT_UNLOCK_TOOLS {
            if !bin.join(t).exists() {
                let host = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
                    .iter()
                    .map(|p| Path::new(p).join(t))
                    .find(|p| p.exists());
                std::os::unix::fs::symlink(host.unwrap_or_else(|| panic!("{t} not on this host")), bin.join(t))
                    .unwrap();
            }
        }
        let script = d.join("unlock");
        std::fs::write(&script, dracut_unlock_script(&chain())).unwrap();
        let pass = d.join("run/vda5_crypt.pass");
        let out = Command::new("/bin/sh")
            .arg(&script)
            .env("PATH", &bin)
            .env("LUKSIFY_DEV", "/dev/null")
            .env("LUKSIFY_PASS", &pass)
            .env("LUKSIFY_WAIT", "0")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let r = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(&pass).ok(),
        );
        std::fs::remove_dir_all(&d).unwrap();
        r
    }

    #[test]
    fn dracut_unlock_does_nothing_on_the_plain_pv_and_asks_until_the_passphrase_opens_it() {
        // (/dev/null stands for the partition: the script only needs it to exist)
        let (out, log, pass) = run_dracut_unlock("LVM2_member");
        assert!(out.contains("LVM2_member (the conversion did not start): not unlocking vda5_crypt"), "{out}");
        assert_eq!(log, "", "asked or opened on the plain PV");
        assert_eq!(pass, None);
        let (out, log, pass) = run_dracut_unlock("crypto_LUKS");
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 4, "{log}");
        assert!(lines[0].starts_with("ask ") && lines[0].ends_with("Please unlock disk vda5_crypt:"), "{log}");
        assert!(lines[1].starts_with("cryptsetup open --type luks2 --key-file "), "{log}");
        assert!(lines[3].ends_with(" /dev/null vda5_crypt"), "{log}");
        assert!(out.contains("cannot unlock vda5_crypt with that passphrase: try again"), "{out}");
        assert!(out.contains("luksify: vda5_crypt: set up successfully"), "{out}");
        // kept for luksify-resume.service, without the newline systemd-ask-password prints
        assert_eq!(pass.as_deref(), Some("right"));
    }

    #[test]
    fn dracut_module_and_conf() {
        let m = dracut_module_setup("serpent-xts-plain64");
        let mods = m.lines().find(|l| l.trim_start().starts_with("hostonly='' instmods ")).unwrap();
        for want in ["dm_crypt", "crypto_null", "serpent", "xts"] {
            assert!(mods.split_whitespace().any(|w| w == want), "{want} missing: {mods}");
        }
        // pulled in by sysinit.target: with dracut's crypt module left out nothing else
        // wants cryptsetup.target (the first dracut boot never asked)
        assert!(m.contains("sysinit.target.wants/luksify-unlock.service"), "{m}");
        assert!(m.contains("echo dm systemd systemd-ask-password"));
        let out = Command::new("bash").arg("-n").arg("-c").arg(&m).output().unwrap();
        assert!(out.status.success(), "module-setup.sh: {out:?}");
        let out = Command::new("sh").arg("-n").arg("-c").arg(dracut_unlock_script(&chain())).output().unwrap();
        assert!(out.status.success(), "unlock script: {out:?}");
        let u = dracut_unlock_unit(&chain());
        for want in ["DefaultDependencies=no\n", "Before=cryptsetup.target\n", "ExecStart=/usr/sbin/luksify-unlock\n"] {
            assert!(u.contains(want), "{want:?} missing: {u}");
        }
        assert_eq!(dracut_conf(true), "# luksify: while a conversion to LUKS2 may be in progress (removed at its finish)\nadd_dracutmodules+=\" luksify \"\nomit_dracutmodules+=\" crypt \"\n");
        assert!(!dracut_conf(false).contains("omit"));
        assert_eq!(
            other_crypttab_entries(
                "# c\n\nvda5_crypt UUID=x none luks\nswap_crypt /dev/sdb2 /dev/urandom swap\n",
                "vda5_crypt"
            ),
            vec!["swap_crypt"]
        );
        let c = Chain { discard: true, ..chain() };
        assert!(dracut_unlock_script(&c).contains("cryptsetup open --type luks2 --allow-discards --key-file "));
    }
}
