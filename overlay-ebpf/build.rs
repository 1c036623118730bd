//! bpf-linker is invoked by rustc as the linker for the BPF target; make cargo
//! rebuild when a different bpf-linker is installed.
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
