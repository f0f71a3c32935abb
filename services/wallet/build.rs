//! Rebuilds the crate when a wallet migration changes (they are embedded).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations/wallet");
}
