#![allow(dead_code)]
//! Shared helpers of the integration tests.

use std::path::PathBuf;
use tooltrain_model::{DType, Device, Tensor};

/// The repository root: `TOOLTRAIN_REPO_ROOT` when set (test executables built on one
/// machine and run on another from a different checkout: scripts/gpu-check.sh), else
/// the checkout they were built from.
pub fn root() -> PathBuf {
    match std::env::var_os("TOOLTRAIN_REPO_ROOT") {
        Some(r) => PathBuf::from(r),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("data/fixtures").join(name)
}

/// A real asset fetched by `scripts/fetch-assets.sh`. Missing assets fail under CI (the
/// script must have run) and skip with a note elsewhere.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = root().join("assets").join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{} is missing: run scripts/fetch-assets.sh", p.display());
    }
    eprintln!(
        "SKIP: {} missing (run scripts/fetch-assets.sh)",
        p.display()
    );
    None
}

pub fn reference(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

/// max |a - b| / (max |b| + tiny): relative error against the reference's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    d / (s + 1e-30)
}

/// The devices to run device-generic tests on: the CPU, plus CUDA when built with it
/// and one is present.
pub fn devices() -> Vec<Device> {
    let mut v = vec![Device::Cpu];
    if let Ok(d) = tooltrain_model::default_device(false) {
        if d.is_cuda() {
            v.push(d);
        } else if cfg!(feature = "cuda") {
            eprintln!("SKIP cuda: no CUDA device present");
        }
    }
    v
}
