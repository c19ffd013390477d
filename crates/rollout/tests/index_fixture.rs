//! Index a small committed fixture tree (nested classes, async defs, decorators, a syntax
//! error, Python 2 statements, non-UTF-8 bytes, a hidden directory, test files).

use std::path::Path;
use tooltrain_rollout::tools::{execute, ToolLimits};
use tooltrain_rollout::{RepoIndex, ToolCall};

fn fixture() -> RepoIndex {
    RepoIndex::build(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo"))
}

fn ranges(v: &[tooltrain_rollout::FunctionEntry]) -> Vec<(&str, usize, usize)> {
    v.iter()
        .map(|f| (f.name.as_str(), f.start_line, f.end_line))
        .collect()
}

#[test]
fn indexes_the_fixture_tree() {
    let idx = fixture();
    let paths: Vec<&str> = idx.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "pkg/__init__.py",
            "pkg/broken.py",
            "pkg/nested.py",
            "pkg/py2.py",
            "pkg/sub/helpers.py",
            "setup.py",
            "test_top.py",
            "tests/test_nested.py",
        ],
        "hidden directories and non-.py files are skipped"
    );

    let nested = idx.file("pkg/nested.py").unwrap();
    let classes: Vec<_> = nested
        .classes
        .iter()
        .map(|c| (c.name.as_str(), c.start_line, c.end_line))
        .collect();
    // `@dataclass` on line 7 is excluded: the class starts at its `class` line.
    assert_eq!(classes, [("Outer", 8, 22), ("Outer.Inner", 11, 14)]);
    assert_eq!(
        ranges(&nested.classes[0].methods),
        [("prop", 17, 18), ("fetch", 20, 22)]
    );
    assert_eq!(
        ranges(&nested.classes[1].methods),
        [("inner_method", 13, 14)]
    );
    // `nested_helper` (a function inside a function) is not listed.
    assert_eq!(
        ranges(&nested.functions),
        [("decorated", 27, 30), ("top_async", 33, 34)]
    );
    assert_eq!(
        nested.imports,
        [
            "import os",
            "import sys as system",
            "from .sub import helpers"
        ]
    );

    let broken = idx.file("pkg/broken.py").unwrap();
    assert_eq!(
        ranges(&broken.functions),
        [("good_before", 4, 5), ("broken", 8, 9)]
    );
    assert_eq!(broken.classes[0].name, "AfterError");
    assert_eq!(ranges(&broken.classes[0].methods), [("method", 13, 14)]);

    let py2 = idx.file("pkg/py2.py").unwrap();
    assert_eq!(
        (
            py2.classes[0].name.as_str(),
            py2.classes[0].start_line,
            py2.classes[0].end_line
        ),
        ("Legacy", 4, 7)
    );
    assert_eq!(ranges(&py2.classes[0].methods), [("run", 5, 7)]);
    assert_eq!(ranges(&py2.functions), [("main", 10, 12)]);
    assert_eq!(py2.imports, ["import urllib2"]);

    let latin = idx.file("pkg/sub/helpers.py").unwrap();
    assert_eq!(ranges(&latin.functions), [("helper", 1, 2)]);
    assert_eq!(latin.classes[0].name, "Latin1");
    assert!(
        latin.text.contains('\u{FFFD}'),
        "non-UTF-8 bytes are replaced"
    );
}

#[test]
fn renders_the_tree() {
    let idx = fixture();
    assert_eq!(
        idx.render_tree(false),
        "pkg/\n    __init__.py\n    broken.py\n    nested.py\n    py2.py\n    sub/\n        helpers.py\nsetup.py\ntest_top.py\ntests/\n    test_nested.py\n"
    );
    assert_eq!(
        idx.render_tree(true),
        "pkg/\n    __init__.py\n    broken.py\n    nested.py\n    py2.py\n    sub/\n        helpers.py\nsetup.py\n"
    );
}

#[test]
fn tools_on_the_fixture() {
    let idx = fixture();
    let lim = ToolLimits::default();
    let o = execute(
        &idx,
        &ToolCall::GetCodeOfClassFunction {
            file_name: "pkg/nested.py".into(),
            class_name: "Inner".into(),
            func_name: "inner_method".into(),
        },
        lim,
    );
    assert!(o.found);
    assert!(o
        .observation
        .contains("<code>\n        def inner_method():\n            return 1\n</code>"));
    let o = execute(
        &idx,
        &ToolCall::GetCodeOfFileFunction {
            file_name: "pkg/sub/helpers.py".into(),
            func_name: "helper".into(),
        },
        lim,
    );
    assert!(o.found && o.observation.contains("return \"caf\u{FFFD}\""));
    // Tests are hidden from the rendered tree but the tools still see them.
    let o = execute(
        &idx,
        &ToolCall::GetCodeOfFileFunction {
            file_name: "tests/test_nested.py".into(),
            func_name: "test_it".into(),
        },
        lim,
    );
    assert!(o.found);
    let o = execute(
        &idx,
        &ToolCall::GetCodeOfFileFunction {
            file_name: ".hidden/secret.py".into(),
            func_name: "hidden".into(),
        },
        lim,
    );
    assert!(!o.found);
}

#[cfg(unix)]
#[test]
fn symlinks_are_not_followed() {
    let base =
        std::env::temp_dir().join(format!("tooltrain-rollout-symlink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let repo = base.join("repo");
    let outside = base.join("outside");
    std::fs::create_dir_all(repo.join("pkg")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.py"), "def secret():\n    pass\n").unwrap();
    std::fs::write(repo.join("pkg/a.py"), "def a():\n    pass\n").unwrap();
    std::os::unix::fs::symlink(&outside, repo.join("pkg/link_dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.py"), repo.join("pkg/link.py")).unwrap();
    let idx = RepoIndex::build(&repo);
    let paths: Vec<&str> = idx.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["pkg/a.py"]);
    std::fs::remove_dir_all(&base).unwrap();
}

/// Timing on a real tree: `TOOLTRAIN_INDEX_BENCH_DIR=/path/to/repo cargo test --release
/// -p tooltrain-rollout --test index_fixture -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_index() {
    let Ok(dir) = std::env::var("TOOLTRAIN_INDEX_BENCH_DIR") else {
        eprintln!("set TOOLTRAIN_INDEX_BENCH_DIR");
        return;
    };
    let t = std::time::Instant::now();
    let idx = RepoIndex::build(Path::new(&dir));
    let secs = t.elapsed().as_secs_f64();
    let funcs: usize = idx
        .files
        .iter()
        .map(|f| f.functions.len() + f.classes.iter().map(|c| c.methods.len()).sum::<usize>())
        .sum();
    eprintln!(
        "{} files, {} functions+methods, {:.3} s",
        idx.files.len(),
        funcs,
        secs
    );
}

#[test]
#[ignore]
fn bench_parse_only() {
    let Ok(dir) = std::env::var("TOOLTRAIN_INDEX_BENCH_DIR") else {
        return;
    };
    let files = tooltrain_rollout::index::python_files(Path::new(&dir));
    let texts: Vec<Vec<u8>> = files
        .iter()
        .map(|(_, p)| std::fs::read(p).unwrap())
        .collect();
    let mut parser = tree_sitter::Parser::new();
    parser
        .set_language(&tree_sitter_python::LANGUAGE.into())
        .unwrap();
    let t = std::time::Instant::now();
    let mut n = 0;
    let mut per_file = Vec::new();
    for (i, b) in texts.iter().enumerate() {
        let t1 = std::time::Instant::now();
        n += parser.parse(b, None).unwrap().root_node().child_count();
        per_file.push((t1.elapsed().as_secs_f64(), b.len(), &files[i].0));
    }
    per_file.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (s, len, p) in per_file.iter().take(5) {
        eprintln!("{s:.3} s {len} bytes {p}");
    }
    eprintln!(
        "parse only, 1 thread: {:.3} s ({n})",
        t.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    for (i, b) in texts.iter().enumerate() {
        let _ = tooltrain_rollout::FileIndex::parse(files[i].0.clone(), b);
    }
    eprintln!(
        "FileIndex::parse, 1 thread: {:.3} s",
        t.elapsed().as_secs_f64()
    );
}
