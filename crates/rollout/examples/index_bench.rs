//! Time `RepoIndex::build` on a tree: `cargo run --release -p tooltrain-rollout
//! --example index_bench -- DIR [REPEATS]`. Prints files, classes, methods, module
//! functions and seconds per build (first run, then min / median over the repeats).
//! `CACHE_DIR=DIR` also times saving and loading the index cache there; `SPLIT=1` times
//! reading / tree-sitter alone / the full index on one thread, lists the slowest files
//! and checks that the skeleton parse equals the full parse on every file
//! (`SHOW_ERRORS=1` lists files with tree-sitter errors).

use std::time::Instant;
use tooltrain_rollout::RepoIndex;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: index_bench DIR [REPEATS]");
    let reps: usize = args.next().map_or(5, |r| r.parse().expect("REPEATS"));
    let root = std::path::Path::new(&dir);
    let t = Instant::now();
    let paths = tooltrain_rollout::index::python_files(root);
    let walk = t.elapsed().as_secs_f64();
    let mut times = Vec::new();
    let mut idx = RepoIndex::default();
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        idx = RepoIndex::build(root);
        times.push(t.elapsed().as_secs_f64());
    }
    let classes: usize = idx.files.iter().map(|f| f.classes.len()).sum();
    let methods: usize = idx
        .files
        .iter()
        .flat_map(|f| &f.classes)
        .map(|c| c.methods.len())
        .sum();
    let funcs: usize = idx.files.iter().map(|f| f.functions.len()).sum();
    let bytes: usize = idx.files.iter().map(|f| f.text.len()).sum();
    println!(
        "{} files ({:.1} MB), {classes} classes, {methods} methods, {funcs} module functions; walk {walk:.4} s (of {} paths); threads {}",
        idx.files.len(),
        bytes as f64 / 1e6,
        paths.len(),
        rayon::current_num_threads()
    );
    if let Some(dir) = std::env::var_os("CACHE_DIR") {
        let dir = std::path::Path::new(&dir);
        let key = format!("bench@{dir:?}");
        let path = tooltrain_rollout::cache::cache_path(dir, &key);
        let t = Instant::now();
        tooltrain_rollout::cache::save(&path, &key, &idx).expect("save cache");
        let save = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let back = tooltrain_rollout::cache::load(&path, &key).expect("load cache");
        let load = t.elapsed().as_secs_f64();
        assert!(back == idx);
        let mb = std::fs::metadata(&path).map_or(0, |m| m.len()) as f64 / 1e6;
        println!("cache: {mb:.1} MB, save {save:.3} s, load {load:.3} s");
    }
    if std::env::var_os("SPLIT").is_some() {
        split(root);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "build seconds: first {:.3}, min {:.3}, median {:.3} over {} runs",
        times[0],
        sorted[0],
        sorted[sorted.len() / 2],
        times.len()
    );
}

/// Single-threaded split: reading, tree-sitter parsing alone, and the full per-file index.
#[allow(dead_code)]
pub fn split(root: &std::path::Path) {
    let paths = tooltrain_rollout::index::python_files(root);
    let t = Instant::now();
    let texts: Vec<Vec<u8>> = paths
        .iter()
        .map(|(_, p)| std::fs::read(p).unwrap_or_default())
        .collect();
    let read = t.elapsed().as_secs_f64();
    let mut parser = tree_sitter::Parser::new();
    parser
        .set_language(&tree_sitter_python::LANGUAGE.into())
        .unwrap();
    let t = Instant::now();
    let mut per: Vec<(f64, usize, &str)> = Vec::new();
    for ((rel, _), b) in paths.iter().zip(&texts) {
        let t = Instant::now();
        let tree = parser.parse(b, None);
        let errs = tree.is_none_or(|t| t.root_node().has_error());
        per.push((t.elapsed().as_secs_f64(), b.len(), rel));
        if errs && std::env::var_os("SHOW_ERRORS").is_some() {
            println!("parse error in {rel}");
        }
    }
    let parse = t.elapsed().as_secs_f64();
    per.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (s, n, rel) in per.iter().take(8) {
        println!("  {s:.3} s  {:.2} MB/s  {rel}", *n as f64 / 1e6 / s);
    }
    let t = Instant::now();
    for ((rel, _), b) in paths.iter().zip(&texts) {
        let _ = tooltrain_rollout::FileIndex::parse(rel.clone(), b);
    }
    let full = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut diff = 0;
    for ((rel, _), b) in paths.iter().zip(&texts) {
        let a = tooltrain_rollout::FileIndex::parse(rel.clone(), b);
        let f = tooltrain_rollout::FileIndex::parse_full(rel.clone(), b);
        if a != f {
            diff += 1;
            if diff <= 5 {
                println!("skeleton differs from full parse: {rel}");
                for (x, y) in a.functions.iter().zip(&f.functions) {
                    if x != y {
                        println!("  function {x:?} vs full {y:?}");
                        break;
                    }
                }
                println!(
                    "  counts {} {} / {} {}",
                    a.functions.len(),
                    a.classes.len(),
                    f.functions.len(),
                    f.classes.len()
                );
            }
        }
    }
    println!(
        "skeleton vs full parse: {diff} of {} files differ ({:.3} s)",
        paths.len(),
        t.elapsed().as_secs_f64()
    );
    println!("1 thread: read {read:.3} s, tree-sitter parse {parse:.3} s, full index {full:.3} s");
}
