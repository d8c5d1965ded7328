//! CUDA builds compile the fused kernels of `kernels/` to PTX with nvcc (`$CUDA_HOME/bin/nvcc`,
//! else `nvcc` on PATH) for `CUDA_COMPUTE_CAP` (default 90: H100 / H200). CPU builds need nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 1] = ["decode_attention"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")).filter(|p| p.exists()).unwrap_or_else(|| "nvcc".into());
    for k in KERNELS {
        let ptx = out_dir.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), &format!("kernels/{k}.cu"), "-o"])
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("running {} for kernels/{k}.cu: {e} (set CUDA_HOME or put nvcc on PATH; scripts/build-cuda.sh does both)", nvcc.display()));
        assert!(status.success(), "{} failed on kernels/{k}.cu ({status})", nvcc.display());
    }
}
