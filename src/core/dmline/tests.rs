//! Tests of the table-line reader: both ways for every target, and malformed input.

use super::*;
use crate::core::geometry::Geometry;
use crate::core::tables::{self, BridgePhase, CryptSpec, Devices};

const RAW: DevRef = DevRef { major: 98, minor: 5 };

fn tl(start: u64, length: u64, t: &str, p: &str) -> TableLineFacts {
    TableLineFacts { start, length, target_type: t.into(), params: p.into() }
}

fn d(major: u32, minor: u32) -> DevRef {
    DevRef { major, minor }
}

/// Parses, and renders back exactly; also through `dmsetup table`'s line form.
fn round_trip(t: &str, p: &str) -> ReadTarget {
    let r = ReadTarget::parse(t, p).unwrap_or_else(|e| panic!("{t} {p:?}: {e}"));
    assert_eq!(r.params(), p);
    assert_eq!(r.target_type(), t);
    let line = tl(8, 4096, t, p);
    let dl = DmLine::parse(&line).unwrap();
    assert_eq!(dl.to_facts(), line);
    let text = format!("8 4096 {t} {p}").trim_end().to_string();
    assert_eq!(text.parse::<DmLine>().unwrap(), dl);
    if !matches!(r, ReadTarget::Crypt { key: ReadKey::Hex(_), .. }) {
        assert_eq!(dl.to_string(), text);
    }
    r
}

#[test]
fn dev_refs_are_major_minor_as_the_kernel_prints_them() {
    assert_eq!("98:5".parse::<DevRef>().unwrap(), RAW);
    assert_eq!("0:0".parse::<DevRef>().unwrap(), d(0, 0));
    assert_eq!("4294967295:1".parse::<DevRef>().unwrap(), d(u32::MAX, 1));
    for bad in [
        "",
        "98",
        "98:",
        ":5",
        "98:5:1",
        "/dev/sda5",
        "+98:5",
        "98:-5",
        "098:5",
        "98:05",
        "4294967296:0",
        " 98:5",
        "a:b",
    ] {
        assert!(bad.parse::<DevRef>().is_err(), "{bad:?}");
    }
    assert_eq!(d(254, 12).to_string().parse::<DevRef>().unwrap(), d(254, 12));
}

#[test]
fn linear() {
    let r = round_trip("linear", "8:5 2048");
    assert_eq!(r, ReadTarget::Linear { dev: d(8, 5), offset: 2048 });
    round_trip("linear", "98:5 0");
    round_trip("linear", "254:2 0");
    for bad in ["", "8:5", "8:5 2048 1", "sda5 2048", "8:5 -1", "8:5 x", "8:5 02048", "8:5 18446744073709551616"] {
        assert!(ReadTarget::parse("linear", bad).is_err(), "{bad:?}");
    }
}

#[test]
fn striped() {
    let r = round_trip("striped", "2 128 98:5 2048 98:17 4096");
    assert_eq!(r, ReadTarget::Striped { chunk: 128, stripes: vec![(RAW, 2048), (d(98, 17), 4096)] });
    round_trip("striped", "1 8 8:5 0");
    round_trip("striped", "3 64 8:5 0 8:5 100 8:21 7");
    for bad in [
        "",
        "2",
        "2 128",
        "0 128",
        "2 128 98:5 2048",
        "2 128 98:5 2048 98:17",
        "2 128 98:5 2048 98:17 4096 1",
        "1 128 98:5 2048 98:17 4096",
        "x 128 98:5 2048",
        "1 x 98:5 2048",
        "1 128 sda 2048",
        "18446744073709551615 128 98:5 2048",
        "9223372036854775808 8 8:5 0",
    ] {
        assert!(ReadTarget::parse("striped", bad).is_err(), "{bad:?}");
    }
}

#[test]
fn crypt_as_read_back() {
    // The adapter's scrubbed form, the simulator's, and what the engine loads.
    let r = round_trip("crypt", "aes-xts-plain64 - 0 8:5 32768");
    assert_eq!(
        r,
        ReadTarget::Crypt {
            cipher: "aes-xts-plain64".into(),
            key: ReadKey::Dash,
            iv_offset: 0,
            dev: d(8, 5),
            offset: 32768,
            options: vec![],
        }
    );
    let r = round_trip("crypt", "aes-xts-plain64 - 1000 8:5 33768 1 allow_discards");
    assert!(matches!(r, ReadTarget::Crypt { iv_offset: 1000, ref options, .. } if options == &["allow_discards"]));
    // Keyring references are kept (not secret), description with colons and all.
    let kr = "aes-xts-plain64 :64:logon:cryptsetup:3f2a-d0 0 8:5 32768";
    let r = round_trip("crypt", kr);
    assert!(matches!(r, ReadTarget::Crypt { key: ReadKey::Keyring(ref k), .. } if k == ":64:logon:cryptsetup:3f2a-d0"));
    assert_eq!(DmLine::parse(&tl(0, 8, "crypt", kr)).unwrap().to_string(), format!("0 8 crypt {kr}"));
    round_trip("crypt", "capi:xts(aes)-plain64 - 0 8:5 4096 2 allow_discards sector_size:4096");
}

#[test]
fn a_hex_key_is_kept_but_never_shown() {
    let key = "0f".repeat(64);
    let p = format!("aes-xts-plain64 {key} 4096 8:5 36864 2 allow_discards sector_size:512");
    let r = round_trip("crypt", &p);
    let ReadTarget::Crypt { key: ReadKey::Hex(k), options, iv_offset, offset, dev, .. } = &r else { panic!("{r:?}") };
    assert_eq!((k.bytes(), k.expose()), (64, key.as_str()));
    assert_eq!((*iv_offset, *offset, *dev), (4096, 36864, d(8, 5)));
    assert_eq!(options, &["allow_discards", "sector_size:512"]);
    assert_eq!(r.params(), p, "params() renders the key, to load the line back");
    let line = DmLine::parse(&tl(0, 8, "crypt", &p)).unwrap();
    for shown in [format!("{r:?}"), r.to_string(), format!("{line:?}"), line.to_string()] {
        assert!(!shown.contains("0f0f"), "{shown}");
    }
    assert_eq!(line.to_string(), "0 8 crypt aes-xts-plain64 - 4096 8:5 36864 2 allow_discards sector_size:512");
    // Upper-case hex is a key too.
    assert!(matches!(
        ReadTarget::parse("crypt", "aes-xts-plain64 ABCDEF01 0 8:5 0").unwrap(),
        ReadTarget::Crypt { key: ReadKey::Hex(_), .. }
    ));
}

#[test]
fn malformed_crypt_lines_are_errors_that_never_carry_the_key() {
    let key = "0f".repeat(64);
    for bad in [
        String::new(),
        "aes-xts-plain64".into(),
        format!("aes-xts-plain64 {key} 0 8:5"),
        format!("aes-xts-plain64 {key} x 8:5 0"),
        format!("aes-xts-plain64 {key} 0 sda5 0"),
        format!("aes-xts-plain64 {key} 0 8:5 x"),
        format!("aes-xts-plain64 {key} 0 8:5 0 2 allow_discards"),
        format!("aes-xts-plain64 {key} 0 8:5 0 1 allow_discards x"),
        format!("aes-xts-plain64 {key} 0 8:5 0 x"),
        format!("aes-xts-plain64 {key}0 0 8:5 0"),
        "aes-xts-plain64 0fzz 0 8:5 0".into(),
        "aes-xts-plain64 :64 0 8:5 0".into(),
        "aes-xts-plain64 :x:logon:d 0 8:5 0".into(),
        "aes-xts-plain64 :64::d 0 8:5 0".into(),
        "aes-xts-plain64 - 0 8:5 32768 2 x".into(),
    ] {
        let e = ReadTarget::parse("crypt", &bad).expect_err(&bad.replace(&key, "<key>"));
        assert!(!e.to_string().contains("0f0f") && !format!("{e:?}").contains("0f0f"), "{e}");
        assert_eq!(e.target_type, "crypt");
    }
}

#[test]
fn mirror_as_luksify_and_the_simulator_load_it() {
    let r = round_trip("mirror", "core 2 1024 nosync 2 98:5 32768 254:1 32768");
    assert_eq!(
        r,
        ReadTarget::Mirror {
            log: MirrorLog::Core { region: 1024, sync: LogSync::NoSync },
            legs: vec![(RAW, 32768), (d(254, 1), 32768)],
            features: vec![],
        }
    );
    let r = round_trip("mirror", "core 1 8 2 98:5 100 98:5 200");
    let ReadTarget::Mirror { log, .. } = &r else { panic!() };
    assert_eq!((log.kind(), log.region(), log.args()), ("core", Some(8), vec!["8".to_string()]));
    round_trip("mirror", "core 2 8 sync 2 98:5 300 98:5 400");
    round_trip("mirror", "core 2 8 nosync 2 98:5 300 98:5 400 1 handle_errors");
    round_trip("mirror", "core 1 1024 3 8:5 0 8:21 0 8:37 0 2 handle_errors keep_log");
    let r = round_trip("mirror", "disk 3 254:3 1024 nosync 2 8:5 0 8:21 0");
    let ReadTarget::Mirror { log, .. } = &r else { panic!() };
    assert_eq!(*log, MirrorLog::Disk { dev: d(254, 3), region: 1024, sync: LogSync::NoSync });
    assert!(r.references(d(254, 3)) && r.references(d(8, 21)) && !r.references(d(8, 37)));
    round_trip("mirror", "disk 2 254:3 1024 2 8:5 0 8:21 0");
    let r = round_trip("mirror", "userspace 4 LVM-xyz clustered-disk 254:3 1024 2 8:5 0 8:21 0");
    let ReadTarget::Mirror { log, .. } = &r else { panic!() };
    assert_eq!((log.kind(), log.region()), ("userspace", None));
    // An explicit empty feature list reads as none (the kernel never prints one).
    let r = ReadTarget::parse("mirror", "core 1 8 2 98:5 100 98:5 200 0").unwrap();
    assert_eq!(r.params(), "core 1 8 2 98:5 100 98:5 200");
    for bad in [
        "",
        "core",
        "core 2 1024",
        "core 2 1024 nosync",
        "core 2 1024 nosync 2 98:5 32768",
        "core 2 1024 nosync 2 98:5 32768 254:1",
        "core 2 1024 nosync 2 98:5 32768 254:1 x",
        "core 2 1024 nosync 0",
        "core 2 1024 nosync x 98:5 0",
        "core 2 1024 nosync 2 98:5 0 254:1 0 1",
        "core 2 1024 nosync 2 98:5 0 254:1 0 2 handle_errors",
        "core 2 1024 nosync 2 98:5 0 254:1 0 x",
        "core 2 1024 maybe 2 98:5 0 254:1 0",
        "core 3 1024 nosync x 2 98:5 0 254:1 0",
        "core 0 2 98:5 0 254:1 0",
        "disk 2 sda 1024 2 98:5 0 254:1 0",
        "disk 1 254:3 2 98:5 0 254:1 0",
        "core 99 1",
        "core 18446744073709551615 1",
        "core 1 8 18446744073709551615 98:5 0",
        "core 1 8 9223372036854775808 98:5 0",
    ] {
        assert!(ReadTarget::parse("mirror", bad).is_err(), "{bad:?}");
    }
}

#[test]
fn other_targets_are_kept_verbatim() {
    for (t, p) in [
        ("snapshot", "98:5 98:6 P 8"),
        ("snapshot-origin", "98:5"),
        ("error", ""),
        ("zero", ""),
        ("thin-pool", "254:1 254:2 128 0 1 skip_block_zeroing"),
        ("raid", "raid1 3 0 region_size 1024 2 254:1 254:2 254:3 254:4"),
        ("integrity", "8:5 0 28 J 3 internal_hash:hmac(sha256):- journal_crypt:ctr(aes):- block_size:4096"),
    ] {
        let r = round_trip(t, p);
        assert_eq!(r, ReadTarget::Other { target_type: t.into(), params: p.into() });
        assert_eq!(r.kind(), TargetKind::Other);
    }
    assert_eq!(DmLine::parse(&tl(0, 8, "error", "")).unwrap().to_string(), "0 8 error");
    assert!(ReadTarget::parse("snapshot", "98:5 98:6 P 8").unwrap().references(d(98, 6)));
    assert!(ReadTarget::parse("", "8:5 0").is_err());
}

#[test]
fn dmsetup_lines() {
    let l: DmLine = "0 81920 linear 8:5 2048".parse().unwrap();
    assert_eq!(l, DmLine { start: 0, length: 81920, target: ReadTarget::Linear { dev: d(8, 5), offset: 2048 } });
    assert_eq!(l.to_string(), "0 81920 linear 8:5 2048");
    let l: DmLine = "  8  4088   mirror core 2 1024 nosync 2 98:5 8 254:1 8\n".parse().unwrap();
    assert_eq!(l.to_string(), "8 4088 mirror core 2 1024 nosync 2 98:5 8 254:1 8");
    assert_eq!("0 8 error".parse::<DmLine>().unwrap().target_type(), "error");
    for bad in ["", "0", "0 8", "x 8 linear 8:5 0", "0 -8 linear 8:5 0", "0 8 linear 8:5", "0 8 linear"] {
        assert!(bad.parse::<DmLine>().is_err(), "{bad:?}");
    }
    let e = format!("0 8 crypt aes-xts-plain64 {} 0 8:5", "ab".repeat(32)).parse::<DmLine>().unwrap_err();
    assert!(!e.to_string().contains("abab"), "{e}");
}

#[test]
fn what_luksify_loads_reads_back_the_same() {
    let g = Geometry::new(40_960 + 4096 + 10_000, 40_960, 4096, 4096, 1024).unwrap();
    let dv = Devices { raw: RAW, staging: d(254, 1), mirror: d(254, 2) };
    for discards in [false, true] {
        let spec = CryptSpec { cipher: "aes-xts-plain64".into(), allow_discards: discards };
        let key = "5a".repeat(64);
        let mut all = tables::staging_table(&g, &spec, RAW);
        all.extend(tables::bridge_table(&g, &spec, dv, BridgePhase::Mirroring { from: 0, to: 4096 }));
        all.extend(tables::bridge_table(&g, &spec, dv, BridgePhase::Steady { cursor: 8192 }));
        all.extend(tables::mirror_table(&g, dv, 0, 4096));
        all.extend(tables::mirror_idle_table(&g, dv));
        for line in &all {
            let p = line.params(&key);
            let r = round_trip(line.target_type(), &p);
            let dl = DmLine { start: line.start, length: line.length, target: r.clone() };
            assert_eq!(dl.to_string(), line.to_string().replace("<key>", "-"));
            match (&line.target, &r) {
                (tables::Target::Linear { dev, offset }, ReadTarget::Linear { dev: d2, offset: o2 }) => {
                    assert_eq!((dev, offset), (d2, o2))
                }
                (
                    tables::Target::Crypt { spec: s, iv_offset, dev, offset },
                    ReadTarget::Crypt { cipher, key: ReadKey::Hex(k), iv_offset: i2, dev: d2, offset: o2, options },
                ) => {
                    assert_eq!((&s.cipher, iv_offset, dev, offset, k.expose()), (cipher, i2, d2, o2, key.as_str()));
                    assert_eq!(options.contains(&"allow_discards".to_string()), s.allow_discards);
                }
                (
                    tables::Target::Mirror { region, legs },
                    ReadTarget::Mirror {
                        log: MirrorLog::Core { region: r2, sync: LogSync::NoSync },
                        legs: l2,
                        features,
                    },
                ) => {
                    assert_eq!((region, &legs[..], features.len()), (r2, &l2[..], 0));
                }
                (w, r) => panic!("{w:?} read back as {r:?}"),
            }
        }
    }
}

/// Every prefix and every one-word corruption of good lines: an error or a line that
/// renders back to what it parses from; never a panic.
#[test]
fn mangled_lines_never_panic() {
    let good = [
        ("linear", "8:5 2048"),
        ("striped", "2 128 98:5 2048 98:17 4096"),
        ("crypt", "aes-xts-plain64 0f0f 4096 8:5 36864 2 allow_discards sector_size:512"),
        ("crypt", "aes-xts-plain64 :64:logon:cryptsetup:3f2a-d0 0 8:5 32768"),
        ("mirror", "core 2 1024 nosync 2 98:5 32768 254:1 32768 1 handle_errors"),
        ("mirror", "disk 3 254:3 1024 sync 2 8:5 0 8:21 0"),
    ];
    let junk = ["", "0", "1", "2", "3", "-1", "x", "8:5", ":", "-", "18446744073709551615", "4294967296:0", "nosync"];
    for (t, p) in good {
        let w: Vec<&str> = p.split_whitespace().collect();
        let mut variants: Vec<String> = (0..=w.len()).map(|n| w[..n].join(" ")).collect();
        for i in 0..w.len() {
            for j in junk {
                let mut v = w.clone();
                v[i] = j;
                variants.push(v.join(" "));
                v.insert(i, j);
                variants.push(v.join(" "));
            }
        }
        for v in variants {
            for ty in [t, "linear", "striped", "crypt", "mirror"] {
                if let Ok(r) = ReadTarget::parse(ty, &v) {
                    assert_eq!(ReadTarget::parse(ty, &r.params()).unwrap(), r, "{ty} {v:?}");
                }
                let _ = format!("0 8 {ty} {v}").parse::<DmLine>();
            }
        }
    }
}

#[test]
fn kinds() {
    assert!(TargetKind::of("linear").reroutable() && TargetKind::of("striped").reroutable());
    for t in ["crypt", "mirror", "snapshot", "snapshot-origin", "thin", "raid", "error", "Linear", ""] {
        assert!(!TargetKind::of(t).reroutable(), "{t}");
    }
    assert_eq!(ReadTarget::parse("crypt", "c - 0 8:5 0").unwrap().kind(), TargetKind::Crypt);
    assert_eq!(ReadTarget::parse("mirror", "core 1 8 2 8:5 0 8:6 0").unwrap().kind(), TargetKind::Mirror);
}

#[test]
fn reroute_only_linear_and_striped() {
    let to = d(254, 9);
    let mut t = ReadTarget::parse("striped", "2 128 98:5 2048 98:5 4096").unwrap();
    assert!(t.reroute(RAW, to));
    assert_eq!(t.params(), "2 128 254:9 2048 254:9 4096");
    assert!(!t.reroute(RAW, to), "nothing left to reroute");
    let mut t = ReadTarget::parse("crypt", "aes-xts-plain64 - 0 98:5 32768").unwrap();
    assert!(!t.reroute(RAW, to));
    let mut t = ReadTarget::parse("mirror", "core 1 8 2 98:5 0 98:5 8").unwrap();
    assert!(!t.reroute(RAW, to));
    assert_eq!(t.params(), "core 1 8 2 98:5 0 98:5 8");
}

/// engine/mod.rs's `maps_within` as it was when [`maps_only_below`] was written from it.
fn maps_within_before(table: &[TableLineFacts], raw: DevRef, l: u64) -> bool {
    let r = raw.to_string();
    table.iter().all(|line| {
        let w: Vec<&str> = line.params.split_whitespace().collect();
        match line.target_type.as_str() {
            "linear" => {
                w.first() != Some(&r.as_str())
                    || w.get(1).and_then(|o| o.parse::<u64>().ok()).map(|o| o + line.length <= l).unwrap_or(false)
            }
            "striped" => {
                let n: u64 = w.first().and_then(|x| x.parse().ok()).unwrap_or(0);
                let per = line.length.checked_div(n).unwrap_or(0);
                (0..n as usize).all(|i| {
                    w.get(2 + 2 * i) != Some(&r.as_str())
                        || w.get(3 + 2 * i).and_then(|o| o.parse::<u64>().ok()).map(|o| o + per <= l).unwrap_or(false)
                })
            }
            _ => true,
        }
    })
}

#[test]
fn maps_only_below_is_what_the_engine_checked() {
    let l = 100_000;
    let lines = [
        // linear onto raw: inside, up to the end, one past it
        tl(0, 1000, "linear", "98:5 2048"),
        tl(0, 1000, "linear", "98:5 99000"),
        tl(0, 1000, "linear", "98:5 99001"),
        // onto another device: never checked
        tl(0, 1000, "linear", "98:6 999999"),
        tl(0, 1000, "linear", "98:50 999999"),
        // striped, 2 stripes of 500
        tl(0, 1000, "striped", "2 128 98:5 2048 98:17 4096"),
        tl(0, 1000, "striped", "2 128 98:17 2048 98:5 99500"),
        tl(0, 1000, "striped", "2 128 98:17 2048 98:5 99501"),
        tl(0, 1000, "striped", "2 128 98:17 999999 98:17 999999"),
        // other targets, even onto raw and past l: not checked here
        tl(0, 1000, "crypt", "aes-xts-plain64 - 0 98:5 999999"),
        tl(0, 1000, "mirror", "core 1 8 2 98:5 999999 98:5 0"),
        tl(0, 1000, "snapshot", "98:5 98:6 P 8"),
    ];
    for line in &lines {
        let one = std::slice::from_ref(line);
        assert_eq!(maps_only_below(one, RAW, l), maps_within_before(one, RAW, l), "{line:?}");
    }
    let want = [true, true, false, true, true, true, true, false, true, true, true, true];
    let got: Vec<bool> = lines.iter().map(|x| maps_only_below(std::slice::from_ref(x), RAW, l)).collect();
    assert_eq!(got, want);
    assert!(!maps_only_below(&lines, RAW, l), "one line out is enough");
    assert!(maps_only_below(&[lines[0].clone(), lines[5].clone()], RAW, l));
    assert!(maps_only_below(&[], RAW, l));
    // No overflow near u64::MAX.
    assert!(!maps_only_below(&[tl(0, 1000, "linear", "98:5 18446744073709551615")], RAW, u64::MAX));
    // Lines that do not parse: fine only if they do not name raw at all (the engine
    // checked the first word of a linear line, or the stripes it could find).
    for (line, before) in [
        (tl(0, 1000, "linear", "98:5"), false),
        (tl(0, 1000, "linear", "98:6"), true),
        (tl(0, 1000, "linear", "98:6 0 98:5"), true),
        (tl(0, 1000, "striped", "2 128 98:5 2048"), true),
        (tl(0, 1000, "striped", "x 128 98:5 2048"), true),
        (tl(0, 1000, "striped", "2 128 98:6 0 98:7"), true),
    ] {
        let one = std::slice::from_ref(&line);
        assert_eq!(maps_within_before(one, RAW, l), before, "{line:?}");
        assert_eq!(maps_only_below(one, RAW, l), !line.params.contains("98:5"), "{line:?}");
    }
}

#[test]
fn linear_onto_finds_where_the_bridge_maps_the_mirror_device() {
    let g = Geometry::new(40_960 + 4096 + 10_000, 40_960, 4096, 4096, 1024).unwrap();
    let dv = Devices { raw: RAW, staging: d(254, 1), mirror: d(254, 2) };
    let spec = CryptSpec { cipher: "aes-xts-plain64".into(), allow_discards: false };
    let bridge: Vec<TableLineFacts> =
        tables::bridge_table(&g, &spec, dv, BridgePhase::Mirroring { from: 32768, to: 36864 })
            .iter()
            .map(|l| tl(l.start, l.length, l.target_type(), &l.params("-")))
            .collect();
    let span = linear_onto(&bridge, dv.mirror).unwrap();
    assert_eq!((span.start, span.length), (32768, 4096));
    assert_eq!(linear_onto(&bridge, RAW).map(|s| s.start), Some(0), "the first linear line onto raw");
    assert_eq!(linear_onto(&bridge, d(254, 1)), None, "staging is not in the bridge");
    // Not a crypt or mirror line onto it, not a longer device number, not a malformed line.
    let t = [
        tl(0, 8, "crypt", "aes-xts-plain64 - 0 254:2 0"),
        tl(8, 8, "mirror", "core 1 8 2 254:2 0 254:1 0"),
        tl(16, 8, "linear", "254:20 0"),
        tl(24, 8, "linear", "254:2"),
        tl(32, 8, "linear", "254:2 7"),
    ];
    assert_eq!(linear_onto(&t, dv.mirror).map(|s| s.start), Some(32));
}

#[test]
fn references_reads_devices_where_it_can() {
    assert!(references(&tl(0, 8, "crypt", "aes-xts-plain64 - 0 98:5 0"), RAW));
    assert!(!references(&tl(0, 8, "crypt", "aes-xts-plain64 - 0 98:50 0"), RAW));
    assert!(references(&tl(0, 8, "snapshot", "98:6 98:5 P 8"), RAW));
    assert!(references(&tl(0, 8, "linear", "98:5 0 junk"), RAW), "a malformed line: by its words");
    assert!(!references(&tl(0, 8, "linear", "98:6 0"), RAW));
    assert!(references(&tl(0, 8, "striped", "2 8 98:6 0 98:5 0"), RAW));
}

#[test]
fn reroute_linear_and_striped() {
    let to = DevRef { major: 254, minor: 9 };
    assert_eq!(reroute_params("linear", "98:5 2048", RAW, to).as_deref(), Some("254:9 2048"));
    assert_eq!(reroute_params("linear", "98:17 2048", RAW, to), None);
    assert_eq!(
        reroute_params("striped", "2 128 98:5 2048 98:17 4096", RAW, to).as_deref(),
        Some("2 128 254:9 2048 98:17 4096")
    );
    assert_eq!(reroute_params("snapshot", "98:5 98:6 P 8", RAW, to), None);
    // A device number that merely contains the raw one is not rerouted.
    assert_eq!(reroute_params("linear", "98:50 0", RAW, to), None);
}

/// `reroute_params` as it was before it used [`ReadTarget`] (word by word).
fn reroute_params_before(target_type: &str, params: &str, from: DevRef, to: DevRef) -> Option<String> {
    let from_s = from.to_string();
    let to_s = to.to_string();
    let mut words: Vec<String> = params.split_whitespace().map(str::to_string).collect();
    let mut changed = false;
    match target_type {
        "linear" => {
            if words.first().map(|w| *w == from_s).unwrap_or(false) {
                words[0] = to_s;
                changed = true;
            }
        }
        "striped" => {
            let n: usize = words.first()?.parse().ok()?;
            for i in 0..n {
                let idx = 2 + 2 * i;
                if words.get(idx).map(|w| *w == from_s).unwrap_or(false) {
                    words[idx] = to_s.clone();
                    changed = true;
                }
            }
        }
        _ => return None,
    }
    changed.then(|| words.join(" "))
}

#[test]
fn reroute_is_unchanged_on_what_the_kernel_prints() {
    let to = DevRef { major: 254, minor: 9 };
    for (t, p) in [
        ("linear", "98:5 2048"),
        ("linear", "98:5 0"),
        ("linear", "98:17 2048"),
        ("linear", "98:50 0"),
        ("linear", "254:9 0"),
        ("striped", "1 8 98:5 0"),
        ("striped", "2 128 98:5 2048 98:17 4096"),
        ("striped", "2 128 98:17 2048 98:5 4096"),
        ("striped", "3 64 98:5 0 98:5 100 98:51 7"),
        ("striped", "2 128 98:17 2048 98:18 4096"),
        ("crypt", "aes-xts-plain64 - 0 98:5 32768"),
        ("mirror", "core 2 1024 nosync 2 98:5 32768 254:1 32768"),
        ("snapshot", "98:5 98:6 P 8"),
        ("snapshot-origin", "98:5"),
        ("error", ""),
    ] {
        assert_eq!(reroute_params(t, p, RAW, to), reroute_params_before(t, p, RAW, to), "{t} {p}");
    }
    // Malformed lines (the kernel prints none): no longer half-rewritten, left alone.
    assert_eq!(reroute_params_before("linear", "98:5 2048 junk", RAW, to).as_deref(), Some("254:9 2048 junk"));
    assert_eq!(reroute_params("linear", "98:5 2048 junk", RAW, to), None);
    assert_eq!(reroute_params("linear", "98:5", RAW, to), None);
    assert_eq!(reroute_params("striped", "2 128 98:5 2048", RAW, to), None);
}
