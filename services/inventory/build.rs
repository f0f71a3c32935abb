//! Rebuilds the crate when an inventory migration changes (they are embedded).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations/inventory");
}
