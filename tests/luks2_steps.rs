//! exploration
mod plain;
use luksify::adapters::luks::reencrypt::{self, format_reencrypt_header, LuksifyToken};
use luksify::adapters::luks::{HeaderParams, LuksType, VolumeKey};
use plain::Scratch;
use std::sync::atomic::{AtomicUsize, Ordering};

const PASS: &[u8] = b"correct horse battery staple";
static CALLS: AtomicUsize = AtomicUsize::new(0);
fn one_step() -> bool {
    CALLS.fetch_add(1, Ordering::SeqCst) >= 1
}

fn json_of(img: &std::path::Path) -> (u64, serde_json::Value) {
    use std::io::Read;
    let mut f = std::fs::File::open(img).unwrap();
    let mut b = vec![0u8; 16384];
    f.read_exact(&mut b).unwrap();
    let seqid = u64::from_be_bytes(b[16..24].try_into().unwrap());
    let end = b[4096..].iter().position(|&c| c == 0).unwrap();
    (seqid, serde_json::from_slice(&b[4096..4096 + end]).unwrap())
}

#[test]
fn explore() {
    let key = VolumeKey::from_slice(&[7u8; 64]);
    let mut p = HeaderParams::defaults(LuksType::Luks2);
    p.pbkdf = Some("pbkdf2".into());
    p.pbkdf_force_iterations = Some(1000);
    p.data_offset_sectors = 4096;
    let s = p.data_offset_sectors;
    let l = 5 * s + 1000;
    let token = LuksifyToken { name: "t_crypt".into(), allow_discards: false, pv_uuid: "pv".into() };
    let h = format_reencrypt_header(&p, &key, PASS, l, &token, None).unwrap();
    let dir = Scratch::new("luks2", "steps");
    let img = dir.path("disk.img");
    let mut bytes = h.bytes.clone();
    bytes.resize(((l + 2 * s) * 512) as usize, 0);
    std::fs::write(&img, &bytes).unwrap();
    let (q, j) = json_of(&img);
    eprintln!("seqid {q}\n{}", serde_json::to_string_pretty(&j).unwrap());
    for i in 0..10 {
        CALLS.store(0, Ordering::SeqCst);
        let r = reencrypt::run_offline(&img, PASS, one_step, &mut |d, t| eprintln!("progress {d}/{t}")).unwrap();
        let (q, j) = json_of(&img);
        eprintln!(
            "step {i}: {r:?} seqid {q}\nsegments {}\ndigests {}\nkeyslots.reenc {}",
            j["segments"],
            j["digests"],
            j["keyslots"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(_, v)| v["type"] == "reencrypt")
                .map(|(_, v)| v.to_string())
                .collect::<String>()
        );
        if r == reencrypt::RunEnd::Finished {
            eprintln!("final: {}", serde_json::to_string(&j).unwrap());
            break;
        }
    }
}
