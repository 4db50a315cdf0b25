//! Replay one fault case of a sweep: `F=p|k|e I=<op> SEED=<seed> [R=1] cargo test --lib
//! sim::replay -- --ignored` (the sweep failures print op and seed; R=1: reboot after).

#[test]
#[ignore]
fn replay() {
    let f: super::Fault = match std::env::var("F").unwrap().as_str() {
        "p" => super::Fault::PowerCut,
        "k" => super::Fault::Kill,
        _ => super::Fault::Error,
    };
    let i: u64 = std::env::var("I").unwrap().parse().unwrap();
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let reboot = std::env::var("R").is_ok();
    super::tests::debug_case(seed, i, f, reboot);
}
