//! `luksify status` and `core::luks2meta` against headers the real cryptsetup wrote (not only
//! against the unit tests' own writer): `cryptsetup reencrypt --encrypt --init-only` on a
//! sparse 100 MiB image file (D = 100 MiB, S = 16 MiB: the notes' example), then finished
//! offline with `--resume-only`. No root-only kernel features: cryptsetup works on the file
//! in userspace (`--force-offline-reencrypt`).

use std::path::{Path, PathBuf};
use std::process::Output;

mod plain;
use plain::{run, stdout_ok, Scratch};

use luksify::core::luks2meta::{self, Segment, SegmentKind, Size};

const MIB: u64 = 1 << 20;

fn luksify(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_luksify"), args)
}

/// A 100 MiB sparse image with cryptsetup's header after `reencrypt --encrypt --init-only`.
fn init_image(dir: &Scratch) -> (PathBuf, PathBuf) {
    let img = dir.path("disk.img");
    let key = dir.path("pass.key");
    std::fs::write(&key, b"correct horse battery staple").unwrap();
    std::fs::File::create(&img).unwrap().set_len(100 * MIB).unwrap();
    stdout_ok(
        &run(
            "cryptsetup",
            &[
                "reencrypt",
                "--encrypt",
                "--reduce-device-size",
                "32M",
                "--init-only",
                "--force-offline-reencrypt",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "-q",
                "--disable-locks",
                "--key-file",
                key.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        ),
        "cryptsetup reencrypt --init-only",
    );
    (img, key)
}

/// `luksDump`'s UUID and Epoch, and its JSON metadata.
fn dump(img: &Path) -> (String, u64, serde_json::Value) {
    let text = stdout_ok(&run("cryptsetup", &["luksDump", "--disable-locks", img.to_str().unwrap()]), "luksDump");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let json = stdout_ok(
        &run("cryptsetup", &["luksDump", "--disable-locks", "--dump-json-metadata", img.to_str().unwrap()]),
        "luksDump --dump-json-metadata",
    );
    (field("UUID:"), field("Epoch:").parse().unwrap(), serde_json::from_str(&json).unwrap())
}

fn head(img: &Path) -> Vec<u8> {
    let mut b = std::fs::read(img).unwrap();
    b.truncate(luks2meta::MAX_HEAD_BYTES);
    b
}

/// Every segment luks2meta read equals luksDump's, field by field.
fn same_segments(got: &[Segment], dumped: &serde_json::Value) {
    let want = dumped["segments"].as_object().unwrap();
    assert_eq!(got.len(), want.len(), "{want:?}");
    for s in got {
        let w = &want[&s.index.to_string()];
        let num = |f: &str| w[f].as_str().unwrap().parse::<u64>().unwrap();
        assert_eq!(s.offset, num("offset"), "segment {}: {w}", s.index);
        match s.size {
            Size::Dynamic => assert_eq!(w["size"], "dynamic", "segment {}", s.index),
            Size::Bytes(b) => assert_eq!(b, num("size"), "segment {}", s.index),
        }
        let flags: Vec<String> = w
            .get("flags")
            .map(|f| f.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        assert_eq!(s.flags, flags, "segment {}", s.index);
        match &s.kind {
            SegmentKind::Linear => assert_eq!(w["type"], "linear"),
            SegmentKind::Crypt { encryption, sector_size, iv_tweak } => {
                assert_eq!(w["type"], "crypt");
                assert_eq!(w["encryption"], encryption.as_str());
                assert_eq!(w["sector_size"], *sector_size);
                assert_eq!(*iv_tweak, num("iv_tweak"));
            }
        }
    }
}

fn status_json(img: &Path) -> serde_json::Value {
    serde_json::from_str(&stdout_ok(&luksify(&["status", "--json", img.to_str().unwrap()]), "luksify status --json"))
        .unwrap()
}

#[test]
fn cryptsetups_init_header_is_a_luks2_reencryption_at_zero_percent() {
    let dir = Scratch::new("status", "init");
    let (img, _) = init_image(&dir);
    let (uuid, epoch, dumped) = dump(&img);

    let m = luks2meta::parse(&head(&img)).unwrap().expect("a LUKS2 header");
    assert_eq!((m.uuid.as_str(), m.seqid), (uuid.as_str(), epoch));
    assert_eq!(m.copies_valid, (true, true));
    assert_eq!(m.requirements, vec!["online-reencrypt-v2".to_string()]);
    assert_eq!(m.token, None);
    same_segments(&m.segments, &dumped);
    let r = m.reencrypt.expect("a reencryption in progress");
    assert!(!r.crashed);
    assert_eq!((r.total_bytes, r.data_offset, r.moved_offset), (71303168, 16 * MIB, Some(88080384)));
    assert_eq!((r.encrypted_bytes, r.progress()), (0, 0.0));
    assert_eq!(r.cipher, "aes-xts-plain64");

    let v = status_json(&img);
    assert_eq!(v["in_progress"], true, "{v}");
    assert_eq!(v["format"], "luks2-reencrypt", "{v}");
    assert_eq!(v["state"], "reencrypting", "{v}");
    assert_eq!(v["progress"], 0.0, "{v}");
    assert_eq!(v["move_sectors"], 71303168 / 512, "{v}");
    assert_eq!(v["luks_version"], 2, "{v}");
    assert_eq!(v["luks_uuid"], uuid.as_str(), "{v}");
    assert_eq!(v["seq"], epoch, "{v}");
    assert!(v["cursor"].is_null() && v["name"].is_null(), "{v}");

    let text = stdout_ok(&luksify(&["status", img.to_str().unwrap()]), "luksify status");
    assert!(text.contains("luksify conversion in progress"), "{text}");
    assert!(text.contains("progress: 0.0%"), "{text}");
    assert!(text.contains("/dev/mapper/<unknown>"), "{text}");
    assert!(text.contains("standard LUKS2 reencryption (online-reencrypt-v2)"), "{text}");
    assert!(text.contains("cryptsetup reencrypt --resume-only --active-name NAME"), "{text}");
}

#[test]
fn a_torn_primary_falls_back_and_two_bad_copies_are_exit_13() {
    let dir = Scratch::new("status", "torn");
    let (img, _) = init_image(&dir);
    let (_, epoch, _) = dump(&img);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[4096 + 10] ^= 0x20; // the primary's JSON
    std::fs::write(&img, &bytes).unwrap();
    let m = luks2meta::parse(&head(&img)).unwrap().unwrap();
    assert_eq!((m.copies_valid, m.seqid), ((false, true), epoch));
    let v = status_json(&img);
    assert_eq!((v["in_progress"].clone(), v["format"].clone()), (true.into(), "luks2-reencrypt".into()), "{v}");

    bytes[16384 + 4096 + 10] ^= 0x20; // the secondary's too
    std::fs::write(&img, &bytes).unwrap();
    let o = luksify(&["status", "--json", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(13), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "damaged", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("no copy of the LUKS2 header verifies"), "{msg}");
    assert!(msg.contains("nothing was changed"), "{msg}");
}

#[test]
fn a_finished_cryptsetup_reencryption_is_no_conversion() {
    let dir = Scratch::new("status", "done");
    let (img, key) = init_image(&dir);
    stdout_ok(
        &run(
            "cryptsetup",
            &[
                "reencrypt",
                "--resume-only",
                "--force-offline-reencrypt",
                "-q",
                "--disable-locks",
                "--key-file",
                key.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        ),
        "cryptsetup reencrypt --resume-only",
    );
    let (uuid, epoch, dumped) = dump(&img);
    let m = luks2meta::parse(&head(&img)).unwrap().unwrap();
    assert_eq!((m.uuid.as_str(), m.seqid), (uuid.as_str(), epoch));
    assert!(m.requirements.is_empty());
    assert_eq!(m.reencrypt, None);
    same_segments(&m.segments, &dumped);
    assert_eq!(m.segments.len(), 1);

    let v = status_json(&img);
    assert_eq!(v["in_progress"], false, "{v}");
    assert!(v["format"].is_null(), "{v}");
}
