//! Host-side tests of the LUKS adapter (src/adapters/luks.rs): headers formatted in a memfd,
//! laid out as luksify will write them ([0,H) header, [H,S) zeros, then data), checked with
//! the system's `cryptsetup` (luksDump, open --test-passphrase, --dump-volume-key).
//! No root-only kernel features: cryptsetup only reads image files here.

use std::path::Path;
use std::process::Output;
use std::time::Instant;

mod plain;
use plain::{run, stdout_ok, Scratch};

use luksify::adapters::luks::{self, HeaderParams, LuksError, LuksType, VolumeKey};
use luksify::core::geometry::HEADER_COPY_SECTORS;

const PASS: &[u8] = b"correct horse battery staple";
const WRONG: &[u8] = b"Correct horse battery staple";
const UUID2: &str = "2f6a3c1e-8d4b-4a57-9b0e-5c1d2e3f4a5b";
const UUID1: &str = "7e0c9a1b-3d2f-4e6a-8b5c-9d0e1f2a3b4c";

fn known_key() -> VolumeKey {
    let k: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
    VolumeKey::from_slice(&k)
}

/// Cheap pbkdf: pbkdf2, 1000 iterations, no benchmark.
fn cheap(luks_type: LuksType, uuid: &str) -> HeaderParams {
    let mut p = HeaderParams::defaults(luks_type);
    p.pbkdf = Some("pbkdf2".into());
    p.pbkdf_force_iterations = Some(1000);
    p.uuid = Some(uuid.into());
    p
}

/// Image as luksify lays it out: H header bytes, zeros up to S, then `data_sectors` of data.
fn write_image(path: &Path, header: &luks::Header, data_sectors: u64) {
    let s = header.data_offset_sectors * 512;
    let mut img = header.bytes.clone();
    img.resize(s as usize, 0);
    img.extend((0..data_sectors * 512).map(|i| (i % 251) as u8));
    std::fs::write(path, img).unwrap();
}

fn cryptsetup(args: &[&str]) -> Output {
    run("cryptsetup", args)
}

fn test_passphrase(img: &Path, keyfile: &Path) -> Output {
    cryptsetup(&[
        "open",
        "--test-passphrase",
        "--disable-locks",
        "--key-file",
        keyfile.to_str().unwrap(),
        img.to_str().unwrap(),
    ])
}

/// `cryptsetup luksDump --dump-volume-key`, parsed into bytes.
fn dumped_volume_key(img: &Path, keyfile: &Path) -> Vec<u8> {
    let o = cryptsetup(&[
        "luksDump",
        "--dump-volume-key",
        "-q",
        "--disable-locks",
        "--key-file",
        keyfile.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let out = stdout_ok(&o, "luksDump --dump-volume-key");
    let mut hex = String::new();
    let mut in_key = false;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("MK dump:") {
            in_key = true;
            hex.push_str(rest);
        } else if in_key && line.starts_with(char::is_whitespace) && !line.trim().is_empty() {
            hex.push_str(line);
        } else if in_key {
            in_key = false;
        }
    }
    let hex: String = hex.split_whitespace().collect();
    assert!(!hex.is_empty(), "no MK dump in:\n{out}");
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn check_common(header: &luks::Header, p: &HeaderParams, key: &VolumeKey) {
    let h = header.bytes.len() as u64;
    assert_eq!(h % 4096, 0, "H = {h}");
    assert!(h > 0 && h <= p.data_offset_sectors * 512, "H = {h}");
    assert_eq!(h, luks::header_size_estimate(p.luks_type, p.key_bytes), "estimate");
    assert_eq!(header.data_offset_sectors, p.data_offset_sectors);
    assert_eq!(header.luks_type, p.luks_type);
    assert_eq!(header.cipher_spec, "aes-xts-plain64");
    assert_eq!(header.key_bytes, 64);
    assert_eq!(&header.bytes[..6], b"LUKS\xba\xbe");
    // Key material must not appear in clear in the header.
    assert!(!header.bytes.windows(16).any(|w| w == &key.as_bytes()[..16]));

    let info = luks::inspect(&header.bytes).unwrap();
    assert_eq!(info.luks_type, p.luks_type);
    assert_eq!(info.data_offset_sectors, p.data_offset_sectors);
    assert_eq!(info.uuid, header.uuid);
    assert_eq!(info.cipher_spec, "aes-xts-plain64");
    assert_eq!(info.key_bytes, 64);
    assert_eq!(info.sector_size, 512);

    let got = luks::unlock(&header.bytes, PASS).unwrap();
    assert!(got == *key, "unlock returned another key");
    assert!(matches!(luks::unlock(&header.bytes, WRONG), Err(LuksError::WrongPassphrase)));
}

fn check_with_cryptsetup(header: &luks::Header, key: &VolumeKey, tag: &str) -> String {
    let dir = Scratch::new("luks", tag);
    let img = dir.path("disk.img");
    let good = dir.path("good.key");
    let bad = dir.path("bad.key");
    std::fs::write(&good, PASS).unwrap();
    std::fs::write(&bad, WRONG).unwrap();
    write_image(&img, header, 2048);

    let dump = stdout_ok(&cryptsetup(&["luksDump", "--disable-locks", img.to_str().unwrap()]), "luksDump");
    assert!(dump.contains(&header.uuid), "UUID not in dump:\n{dump}");

    let o = test_passphrase(&img, &good);
    stdout_ok(&o, "open --test-passphrase (right passphrase)");
    let o = test_passphrase(&img, &bad);
    assert!(!o.status.success(), "wrong passphrase accepted: {}", String::from_utf8_lossy(&o.stderr));

    let dumped = dumped_volume_key(&img, &good);
    assert!(dumped == key.as_bytes(), "cryptsetup dumps another volume key");

    // Our own functions on the same image (more bytes than H: the whole [0,S) and data).
    let whole = std::fs::read(&img).unwrap();
    assert!(luks::unlock(&whole, PASS).unwrap() == *key);
    dump
}

#[test]
fn luks2_header_is_valid_and_opens() {
    let key = known_key();
    let p = cheap(LuksType::Luks2, UUID2);
    let header = luks::format_header(&p, &key, PASS, None).unwrap();
    assert_eq!(header.uuid, UUID2);
    check_common(&header, &p, &key);
    let dump = check_with_cryptsetup(&header, &key, "l2");
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(dump.contains("offset: 16777216 [bytes]"), "offset not 32768 sectors:\n{dump}");
    assert!(dump.contains("sector: 512 [bytes]"), "{dump}");
    assert!(dump.contains("cipher: aes-xts-plain64"), "{dump}");
    assert!(dump.contains("Key:        512 bits"), "{dump}");
    assert!(dump.contains("PBKDF:      pbkdf2"), "{dump}");
}

#[test]
fn luks1_header_is_valid_and_opens() {
    let key = known_key();
    let p = cheap(LuksType::Luks1, UUID1);
    let header = luks::format_header(&p, &key, PASS, None).unwrap();
    assert_eq!(header.uuid, UUID1);
    check_common(&header, &p, &key);
    let dump = check_with_cryptsetup(&header, &key, "l1");
    assert!(dump.contains("Version:       \t1"), "{dump}");
    assert!(dump.contains("Payload offset:\t4096"), "{dump}");
    assert!(dump.contains("Cipher name:   \taes"), "{dump}");
    assert!(dump.contains("Cipher mode:   \txts-plain64"), "{dump}");
    assert!(dump.contains("MK bits:       \t512"), "{dump}");
}

#[test]
fn luks2_nondefault_offset_and_random_uuid() {
    // S = 8 MiB + 4 KiB: not a power of two, still a multiple of 8 sectors.
    let key = VolumeKey::generate(64).unwrap();
    let mut p = cheap(LuksType::Luks2, UUID2);
    p.uuid = None;
    p.label = Some("luksify-test".into());
    p.data_offset_sectors = 16392;
    let header = luks::format_header(&p, &key, PASS, None).unwrap();
    assert!(uuid::Uuid::parse_str(&header.uuid).is_ok());
    check_common(&header, &p, &key);
    let dump = check_with_cryptsetup(&header, &key, "l2off");
    assert!(dump.contains(&format!("offset: {} [bytes]", 16392 * 512)), "{dump}");
    assert!(dump.contains("Label:         \tluksify-test"), "{dump}");
}

/// luksify's raised offsets (up to 128 MiB) keep cryptsetup's default 16 MiB keyslots area:
/// libcryptsetup would otherwise size it to the offset and fill it with random bytes (3 s of
/// the startup in UML at 128 MiB). Small offsets get what fits.
#[test]
fn luks2_keyslots_area_stays_default_with_a_large_offset() {
    let key = VolumeKey::generate(64).unwrap();
    for (s, want) in [(262144u64, luks::LUKS2_DEFAULT_KEYSLOTS_BYTES), (16392, 16392 * 512 - 32768)] {
        let mut p = cheap(LuksType::Luks2, UUID2);
        p.data_offset_sectors = s;
        let header = luks::format_header(&p, &key, PASS, None).unwrap();
        check_common(&header, &p, &key);
        let dump = check_with_cryptsetup(&header, &key, "l2ks");
        assert!(dump.contains(&format!("Keyslots area: \t{want} [bytes]")), "S = {s}:\n{dump}");
        assert!(dump.contains(&format!("offset: {} [bytes]", s * 512)), "{dump}");
    }
}

#[test]
fn luks2_argon2id_low_cost() {
    let key = VolumeKey::generate(64).unwrap();
    let mut p = HeaderParams::defaults(LuksType::Luks2);
    p.pbkdf = Some("argon2id".into());
    p.iter_time_ms = Some(50);
    let t = Instant::now();
    let header = luks::format_header(&p, &key, PASS, None).unwrap();
    eprintln!("argon2id 50 ms format: {:?}", t.elapsed());
    check_common(&header, &p, &key);
    let dump = check_with_cryptsetup(&header, &key, "argon");
    assert!(dump.contains("PBKDF:      argon2id"), "{dump}");
}

#[test]
fn luks1_smaller_key_and_sha512() {
    let key = VolumeKey::generate(32).unwrap();
    let mut p = cheap(LuksType::Luks1, UUID1);
    p.key_bytes = 32;
    p.hash = "sha512".into();
    let header = luks::format_header(&p, &key, PASS, None).unwrap();
    assert_eq!(header.key_bytes, 32);
    assert_eq!(header.bytes.len() as u64, luks::header_size_estimate(LuksType::Luks1, 32));
    assert!(luks::unlock(&header.bytes, PASS).unwrap() == key);
    let dir = Scratch::new("luks", "l1k32");
    let img = dir.path("disk.img");
    write_image(&img, &header, 64);
    let dump = stdout_ok(&cryptsetup(&["luksDump", "--disable-locks", img.to_str().unwrap()]), "luksDump");
    assert!(dump.contains("MK bits:       \t256"), "{dump}");
    assert!(dump.contains("Hash spec:     \tsha512"), "{dump}");
}

#[test]
fn refusals() {
    let key = known_key();
    let mut p = cheap(LuksType::Luks2, UUID2);
    p.data_offset_sectors = 32767;
    assert!(matches!(luks::format_header(&p, &key, PASS, None), Err(LuksError::InvalidParams(_))));
    let mut p = cheap(LuksType::Luks1, UUID1);
    p.pbkdf = Some("argon2id".into());
    assert!(matches!(luks::format_header(&p, &key, PASS, None), Err(LuksError::InvalidParams(_))));
    let mut p = cheap(LuksType::Luks2, UUID2);
    p.uuid = Some("not-a-uuid".into());
    assert!(matches!(luks::format_header(&p, &key, PASS, None), Err(LuksError::InvalidParams(_))));
    let p = cheap(LuksType::Luks2, UUID2);
    assert!(matches!(
        luks::format_header(&p, &VolumeKey::from_slice(&[1; 32]), PASS, None),
        Err(LuksError::InvalidParams(_))
    ));
    // A cipher the kernel crypto API does not know fails in libcryptsetup, not with a panic.
    let mut p = cheap(LuksType::Luks2, UUID2);
    p.cipher = "nosuchcipher".into();
    let e = luks::format_header(&p, &key, PASS, None).unwrap_err();
    assert!(matches!(e, LuksError::Crypt { .. }), "{e:?}");
}

#[test]
fn garbage_is_not_a_header() {
    let zeros = vec![0u8; 1 << 20];
    assert!(matches!(luks::inspect(&zeros), Err(LuksError::BadHeader(_))));
    assert!(matches!(luks::unlock(&zeros, PASS), Err(LuksError::BadHeader(_))));
    assert!(matches!(luks::inspect(b"short"), Err(LuksError::BadHeader(_))));
    // A header whose JSON is corrupt, both copies.
    let header = luks::format_header(&cheap(LuksType::Luks2, UUID2), &known_key(), PASS, None).unwrap();
    let mut b = header.bytes.clone();
    b[4096 + 10] ^= 0xff;
    b[16384 + 4096 + 10] ^= 0xff;
    assert!(matches!(luks::inspect(&b), Err(LuksError::BadHeader(_))));
}

#[test]
fn volume_key_never_prints() {
    let key = known_key();
    let hex = key.hex();
    assert_eq!(hex.len(), 128);
    let dbg = format!("{key:?} {:?}", Some(&key));
    assert!(!dbg.contains(&hex[..16]), "{dbg}");
    assert!(!dbg.contains(&format!("{:?}", &key.as_bytes()[..4])), "{dbg}");
    assert!(dbg.contains("64 bytes"), "{dbg}");
    let g = VolumeKey::generate(64).unwrap();
    assert_eq!(g.len(), 64);
    assert!(g != key);
    assert!(!format!("{g:?}").contains(&g.hex()[..16]));
    // Header's Debug does not dump the (large) byte vector either.
    let header = luks::format_header(&cheap(LuksType::Luks2, UUID2), &key, PASS, None).unwrap();
    assert!(format!("{header:?}").len() < 400);
}

#[test]
fn calls_from_many_threads() {
    // libcryptsetup-rs (no `mutex` feature) panics off its first thread; the adapter's
    // worker thread must make concurrent callers safe.
    let header = luks::format_header(&cheap(LuksType::Luks1, UUID1), &known_key(), PASS, None).unwrap();
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let b = header.bytes.clone();
            std::thread::spawn(move || luks::inspect(&b).unwrap().uuid)
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), UUID1);
    }
}

/// Timing of a format with cryptsetup's default pbkdf (argon2id, 2 s): `cargo test --test
/// luks_header -- --ignored --nocapture`.
#[test]
#[ignore]
fn default_pbkdf_timing() {
    for t in [LuksType::Luks2, LuksType::Luks1] {
        let key = VolumeKey::generate(64).unwrap();
        let p = HeaderParams::defaults(t);
        let t0 = Instant::now();
        let header = luks::format_header(&p, &key, PASS, None).unwrap();
        let f = t0.elapsed();
        let t1 = Instant::now();
        assert!(luks::unlock(&header.bytes, PASS).unwrap() == key);
        eprintln!("{t}: format {f:?}, unlock {:?}, H = {}", t1.elapsed(), header.bytes.len());
    }
}

/// `--recovery-key`: keyslot 1 holds the recovery key, as systemd-cryptenroll would enroll
/// it (PBKDF2, 1000 iterations; LUKS2: sha512 and the `systemd-recovery` token naming the
/// keyslot). Stock cryptsetup opens keyslot 1 with the key and keyslot 0 with the
/// passphrase, and neither with the other's secret; both unlock the same volume key.
fn check_recovery(t: LuksType, uuid: &str, hash: &str, tag: &str) -> String {
    let key = known_key();
    let p = cheap(t, uuid);
    let rk = luks::RecoveryKey::generate().unwrap();
    let header = luks::format_header(&p, &key, PASS, Some(&rk.slot(hash))).unwrap();
    assert_eq!(header.recovery_keyslot, Some(1));
    // H covers both keyslots: cut at H, the image still opens with either secret.
    assert!(header.bytes.len() as u64 > luks::header_size_estimate(t, 64), "H = {}", header.bytes.len());
    // and still fits the room luksify reserves for the header's copy in the tail
    assert!(header.bytes.len() as u64 <= HEADER_COPY_SECTORS * 512, "H = {}", header.bytes.len());
    eprintln!("{t} with the recovery keyslot: H = {} bytes", header.bytes.len());
    assert!(luks::unlock(&header.bytes, rk.as_str().as_bytes()).unwrap() == key);
    assert!(luks::unlock(&header.bytes, PASS).unwrap() == key);
    // the key itself is nowhere in the header
    assert!(!header.bytes.windows(17).any(|w| w == &rk.as_str().as_bytes()[..17]));
    let dir = Scratch::new("luks", tag);
    let img = dir.path("disk.img");
    let rkf = dir.path("recovery.key");
    let pf = dir.path("pass.key");
    std::fs::write(&rkf, rk.as_str()).unwrap();
    std::fs::write(&pf, PASS).unwrap();
    write_image(&img, &header, 2048);
    let slot = |f: &Path, n: &str| {
        cryptsetup(&[
            "open",
            "--test-passphrase",
            "--disable-locks",
            "--key-slot",
            n,
            "--key-file",
            f.to_str().unwrap(),
            img.to_str().unwrap(),
        ])
    };
    stdout_ok(&slot(&rkf, "1"), "open --test-passphrase --key-slot 1 (recovery key)");
    stdout_ok(&slot(&pf, "0"), "open --test-passphrase --key-slot 0 (passphrase)");
    assert!(!slot(&rkf, "0").status.success(), "the recovery key opened keyslot 0");
    assert!(!slot(&pf, "1").status.success(), "the passphrase opened keyslot 1");
    assert!(dumped_volume_key(&img, &rkf) == key.as_bytes(), "the recovery key unlocks another volume key");
    stdout_ok(&cryptsetup(&["luksDump", "--disable-locks", img.to_str().unwrap()]), "luksDump")
}

#[test]
fn luks2_recovery_keyslot_is_systemds() {
    let dump = check_recovery(LuksType::Luks2, UUID2, "sha512", "rk2");
    let ks1 = dump.split("  1: luks2").nth(1).expect("keyslot 1 in luksDump");
    let ks1 = ks1.split("Tokens:").next().unwrap();
    assert!(ks1.contains("PBKDF:      pbkdf2"), "{ks1}");
    assert!(ks1.contains("Hash:       sha512"), "{ks1}");
    assert!(ks1.contains("Iterations: 1000"), "{ks1}");
    let tokens = dump.split("Tokens:").nth(1).unwrap().split("Digests:").next().unwrap();
    assert!(tokens.contains("systemd-recovery") && tokens.contains("Keyslot:    1"), "{tokens}");
}

#[test]
fn luks1_recovery_keyslot_uses_the_header_hash() {
    let dump = check_recovery(LuksType::Luks1, UUID1, "sha256", "rk1");
    let ks1 = dump.split("Key Slot 1: ENABLED").nth(1).expect("keyslot 1 enabled");
    assert!(ks1.contains("Iterations:         \t1000"), "{ks1}");
    assert!(dump.contains("Hash spec:     \tsha256"), "{dump}");
}

/// The LUKS2 reencryption header (the standard mid-way format) with a recovery key:
/// keyslot 1 (the `reencrypt` keyslot goes to 2), both secrets open it with stock
/// cryptsetup mid-way.
#[test]
fn luks2_reencrypt_header_with_recovery_key() {
    use luksify::adapters::luks::reencrypt::{format_reencrypt_header, LuksifyToken};
    let key = known_key();
    let p = cheap(LuksType::Luks2, UUID2);
    let rk = luks::RecoveryKey::generate().unwrap();
    let token = LuksifyToken { name: "t_crypt".into(), allow_discards: false, pv_uuid: "pv".into() };
    let l = 4 * p.data_offset_sectors;
    let header = format_reencrypt_header(&p, &key, PASS, l, &token, Some(&rk.slot("sha512"))).unwrap();
    assert_eq!(header.recovery_keyslot, Some(1));
    assert!(header.bytes.len() as u64 <= HEADER_COPY_SECTORS * 512, "H = {}", header.bytes.len());
    eprintln!("LUKS2 reencryption header with the recovery keyslot: H = {} bytes", header.bytes.len());
    let dir = Scratch::new("luks", "rkre");
    let img = dir.path("disk.img");
    let rkf = dir.path("recovery.key");
    std::fs::write(&rkf, rk.as_str()).unwrap();
    let mut bytes = header.bytes.clone();
    bytes.resize(((l + 2 * p.data_offset_sectors) * 512) as usize, 0);
    std::fs::write(&img, &bytes).unwrap();
    let dump = stdout_ok(&cryptsetup(&["luksDump", "--disable-locks", img.to_str().unwrap()]), "luksDump");
    assert!(dump.contains("online-reencrypt"), "{dump}");
    assert!(dump.contains("2: reencrypt"), "{dump}");
    assert!(dump.contains("systemd-recovery") && dump.contains("luksify"), "{dump}");
    let o = cryptsetup(&[
        "open",
        "--test-passphrase",
        "--disable-locks",
        "--key-slot",
        "1",
        "--key-file",
        rkf.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    stdout_ok(&o, "open --test-passphrase --key-slot 1 mid-way");
    assert!(luks::unlock(&header.bytes, rk.as_str().as_bytes()).unwrap() == key);
}
