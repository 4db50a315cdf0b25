//! Records which libcryptsetup luksify was built against, for `luksify --version` (the one it
//! runs with is read at run time).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let v = std::process::Command::new("pkg-config")
        .args(["--modversion", "libcryptsetup"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=LUKSIFY_LIBCRYPTSETUP_BUILT={v}");
}
