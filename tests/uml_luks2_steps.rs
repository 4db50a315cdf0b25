//! luksify's model of a LUKS2 encryption in progress, step by step, against libcryptsetup's
//! own steps on a real kernel (User-Mode Linux). In the guest (this test binary, run there
//! again with LUKSIFY_LUKS2_STEPS_GUEST set), for S and L of several shapes: the header
//! luksify writes at the cut-over on an image laid out as the cut-over leaves it; then
//! libcryptsetup's offline reencryption (as `cryptsetup reencrypt --resume-only`) takes one
//! hotzone at a time, and `luks2meta::advanced_header`, from the metadata before the step,
//! must predict the JSON libcryptsetup wrote after it (the last step through
//! `finalized_header`); luksify's copies then replace libcryptsetup's, so every next step
//! starts from metadata luksify wrote. Before that, at every step but the last, luksify's
//! commit is cut short as a power cut would (old metadata; the primary copy written and the
//! secondary not; the primary torn either way): stock `cryptsetup open` maps each, in the state
//! the valid copy with the higher seqid says, every sector its plaintext. At the end stock
//! `cryptsetup open` maps the image and every sector reads back as its plaintext. luksify's own LUKS2 steps
//! (`src/engine/standard_steps.rs`) commit exactly these states: stock cryptsetup reads them
//! as its own.
//! These never skip: without UML they fail with the install command.
mod support;

use luksify::adapters::luks::reencrypt::{self, format_reencrypt_header, LuksifyToken, Reencryption};
use luksify::adapters::luks::{HeaderParams, LuksType, VolumeKey};
use luksify::core::luks2meta;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::*;

const GUEST: &str = "LUKSIFY_LUKS2_STEPS_GUEST";
const PASS: &[u8] = b"correct horse battery staple";
/// (S, L) in sectors: L a multiple of S, one sector past it, and S plus a bit.
const GEOMETRIES: &[(u64, u64)] =
    &[(4096, 4 * 4096), (4096, 3 * 4096 + 1), (8192, 8192 + 1000), (4096, 5 * 4096 + 4095)];
const HEAD: usize = 32 * 1024;

static CALLS: AtomicUsize = AtomicUsize::new(0);
/// libcryptsetup calls back once before its first step and once after every step.
fn after_one_step() -> bool {
    CALLS.fetch_add(1, Ordering::SeqCst) >= 1
}

fn head_of(img: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0u8; HEAD];
    std::fs::File::open(img).unwrap().read_exact(&mut b).unwrap();
    b
}

/// The JSON area of the primary copy, as cryptsetup reads it.
fn json(head: &[u8]) -> serde_json::Value {
    let end = head[4096..16384].iter().position(|&c| c == 0).unwrap();
    serde_json::from_slice(&head[4096..4096 + end]).unwrap()
}

/// Logical sector `i`'s plaintext (a pattern no two sectors share).
fn sector(i: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    for (k, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&((i * 64 + k as u64) ^ 0x5a5a_1234_9e37_79b9).to_le_bytes());
    }
    b
}

fn write_at(img: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, at).unwrap();
    f.sync_all().unwrap();
}

/// Stock `cryptsetup open` maps `img` (a state between steps or the finished one) and every
/// one of its L logical sectors reads as the plaintext.
fn opens_as_plaintext(img: &Path, s: u64, l: u64, what: &str) {
    std::fs::write("/tmp/steps.key", PASS).unwrap();
    let name = "lk-steps";
    let st = std::process::Command::new("cryptsetup")
        .args(["open", "--key-file", "/tmp/steps.key", img.to_str().unwrap(), name])
        .status()
        .unwrap();
    assert!(st.success(), "{what}: cryptsetup open");
    let plain = std::fs::read(format!("/dev/mapper/{name}"));
    let closed = std::process::Command::new("cryptsetup").args(["close", name]).status().unwrap();
    let plain = plain.unwrap();
    assert!(closed.success(), "{what}: cryptsetup close");
    // (a finished device's segment is dynamic: its mapping runs to the image's end, S past L)
    assert!(
        plain.len() as u64 >= l * 512 && plain.len() as u64 <= (l + s) * 512,
        "{what}: mapped {} bytes",
        plain.len()
    );
    for lsec in 0..l {
        assert!(plain[(lsec * 512) as usize..(lsec * 512 + 512) as usize] == sector(lsec), "{what}: sector {lsec}");
    }
}

/// In the guest, for every geometry: the image as luksify's cut-over leaves it (header,
/// plaintext [S, L) in place, the first S at L + S); then, step by step, libcryptsetup's
/// offline reencryption takes one hotzone and luksify's prediction of the metadata it writes
/// (made from the metadata before the step) must be the same JSON; luksify's copies then
/// replace libcryptsetup's, so that the next step starts from what luksify wrote. At the end
/// stock `cryptsetup open` maps the device and every sector reads back as the plaintext.
fn guest(out: &Path) {
    for (i, &(s, l)) in GEOMETRIES.iter().enumerate() {
        let key = VolumeKey::from_slice(&[7u8; 64]);
        let mut p = HeaderParams::defaults(LuksType::Luks2);
        p.pbkdf = Some("pbkdf2".into());
        p.pbkdf_force_iterations = Some(1000);
        p.data_offset_sectors = s;
        let token = LuksifyToken { name: "t_crypt".into(), allow_discards: false, pv_uuid: "pv".into() };
        let h = format_reencrypt_header(&p, &key, PASS, l, &token, None).unwrap();
        let img = Path::new("/tmp").join(format!("g{i}.img"));
        let mut bytes = vec![0u8; ((l + 2 * s) * 512) as usize];
        bytes[..h.bytes.len()].copy_from_slice(&h.bytes);
        for lsec in 0..l {
            let at = if lsec < s { l + s + lsec } else { lsec };
            bytes[(at * 512) as usize..(at * 512 + 512) as usize].copy_from_slice(&sector(lsec));
        }
        std::fs::write(&img, &bytes).unwrap();
        drop(bytes);
        let mut steps = 0;
        loop {
            let before = head_of(&img);
            let adv = luks2meta::advanced_header(&before).unwrap().expect("a step to take");
            CALLS.store(0, Ordering::SeqCst);
            reencrypt::run_offline(&img, PASS, after_one_step, &mut |_, _| {}).unwrap();
            steps += 1;
            let after = head_of(&img);
            let ours = if adv.last {
                luks2meta::finalized_header(&adv.metadata).unwrap().expect("the all-committed state").metadata
            } else {
                adv.metadata.clone()
            };
            let m = luks2meta::parse(&ours).unwrap().unwrap();
            assert_eq!(m.copies_valid, (true, true), "g{i} step {steps}");
            assert!(m.seqid > luks2meta::parse(&before).unwrap().unwrap().seqid);
            assert_eq!(
                json(&ours),
                json(&after),
                "g{i} (S {s}, L {l}) step {steps}: luksify's metadata is not libcryptsetup's\nluksify:      {}\nlibcryptsetup: {}",
                json(&ours),
                json(&after)
            );
            eprintln!(
                "g{i} step {steps}: from {} len {} last {}: same JSON as libcryptsetup",
                adv.from, adv.len, adv.last
            );
            if !adv.last {
                // luksify's commit cut short, as a power cut leaves it (the step's data is
                // on the disk, its source intact): the old metadata; the primary copy
                // written, the secondary not yet; the primary torn (its first 4 KiB or all
                // but them). Stock cryptsetup opens each, takes the state the valid copy with
                // the higher seqid says, and every sector is the plaintext.
                let hs = 16 * 1024;
                let mut primary_only = before.clone();
                primary_only[..hs].copy_from_slice(&ours[..hs]);
                let mut torn_head = before.clone();
                torn_head[..4096].copy_from_slice(&ours[..4096]);
                let mut torn_tail = before.clone();
                torn_tail[4096..hs].copy_from_slice(&ours[4096..hs]);
                for (what, meta, state) in [
                    ("old metadata", &before, &before),
                    ("primary written, secondary not", &primary_only, &ours),
                    ("primary torn (binary header new)", &torn_head, &before),
                    ("primary torn (JSON new)", &torn_tail, &before),
                ] {
                    write_at(&img, 0, meta);
                    let what = format!("g{i} step {steps}, {what}");
                    opens_as_plaintext(&img, s, l, &what);
                    // (what both copies say afterwards: cryptsetup repairs a bad copy)
                    let (now, want) =
                        (luks2meta::parse(&head_of(&img)).unwrap().unwrap(), luks2meta::parse(state).unwrap().unwrap());
                    assert_eq!(
                        (now.seqid, &now.segments),
                        (want.seqid, &want.segments),
                        "{what}: the state cryptsetup took"
                    );
                    eprintln!("{what}: cryptsetup opens it, every sector the plaintext");
                }
            }
            write_at(&img, 0, &ours);
            if adv.last {
                assert_eq!(reencrypt::status(&img).unwrap(), Reencryption::None);
                break;
            }
            assert!(steps < 100);
        }
        let want = (l - s).div_ceil(s) + 1;
        assert_eq!(steps, want, "g{i}: steps");
        // stock cryptsetup maps what luksify's metadata says; every sector is the plaintext
        opens_as_plaintext(&img, s, l, &format!("g{i} finished"));
        std::fs::remove_file(&img).unwrap();
        std::fs::write(out.join(format!("g{i}.ok")), format!("{steps}")).unwrap();
        eprintln!("STEPS-OK g{i} S={s} L={l}: {steps} steps");
    }
}

#[test]
fn luksify_predicts_every_step_of_libcryptsetups_reencryption() {
    if let Ok(out) = std::env::var(GUEST) {
        guest(Path::new(&out));
        return;
    }
    let dir = test_dir("luks2steps");
    let exe = std::env::current_exe().unwrap();
    let run = uml().out_dir(&dir).timeout(300).run_script(&format!(
        "{GUEST}=$OUT {} --exact luksify_predicts_every_step_of_libcryptsetups_reencryption --nocapture --test-threads=1 || die 'the guest side failed'\necho STEPS-DONE\n",
        exe.display()
    ));
    run.assert_ok().assert_log_contains("STEPS-DONE");
    for (i, &(s, l)) in GEOMETRIES.iter().enumerate() {
        let steps: u64 = run.file(&format!("g{i}.ok")).trim().parse().unwrap();
        assert_eq!(steps, (l - s).div_ceil(s) + 1, "g{i}");
        run.assert_log_contains(&format!("STEPS-OK g{i} "));
    }
}
