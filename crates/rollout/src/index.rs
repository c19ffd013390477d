//! Repository index (spec section 2): classes, methods, module functions, imports and
//! text of every `*.py` file, parsed with tree-sitter (error-tolerant), plus the rendered
//! directory tree for prompts.
//!
//! Choices, where the spec leaves room:
//! - **Nested classes** are indexed (every class, at any depth, including classes inside
//!   functions). A nested class is named by its dotted path of enclosing classes and
//!   functions (`Outer.Inner`); [`FileIndex::class`] looks a class up by that exact name
//!   first and then, first match wins, by its bare name (`Inner`), since that is how the
//!   release's index names them.
//! - **Methods** are the `def`/`async def` statements of the class body, including those
//!   under compound statements of the body (`if`/`try`/`with`/...), but not functions
//!   nested inside methods.
//! - **Module functions** are the `def`/`async def` statements at module level, including
//!   those under module-level compound statements (`if sys.version_info ...: def f()`).
//!   **Nested functions** (a `def` inside a function or method) are *not* listed: no tool
//!   can reach them by name; their code is shown as part of the enclosing function.
//! - **Line ranges** are 1-based and inclusive, from the `class`/`def` line (decorators
//!   excluded) to the last line of the last statement of the body (trailing comments of
//!   the body are not counted, as with Python's `ast` `end_lineno`).
//! - **Imports** are the source text of `import`/`from ... import` statements that are
//!   direct children of the module (or of a parse-error node at module level).
//! - **Walking** skips hidden directories and files (name starting with `.`) and never
//!   follows symlinks (neither to files nor to directories), so nothing outside the
//!   repository root is read. Non-UTF-8 bytes are decoded lossily.
//! - In the serialised form (`{"files": [{"path", "classes", "functions"}]}`) the imports
//!   and the text are skipped.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tree_sitter::{Node, Parser};

/// A function or method with its 1-based inclusive line range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionEntry {
    pub name: String,
    pub start_line: usize,
    pub end_line: usize,
}

/// A class with its 1-based inclusive line range and its direct methods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassEntry {
    /// Dotted path for nested classes (`Outer.Inner`), bare name otherwise.
    pub name: String,
    pub start_line: usize,
    pub end_line: usize,
    pub methods: Vec<FunctionEntry>,
}

/// Everything indexed about one Python file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIndex {
    /// Repository-relative path with `/` separators.
    pub path: String,
    pub classes: Vec<ClassEntry>,
    pub functions: Vec<FunctionEntry>,
    /// Source text of the top-level import statements, in file order.
    #[serde(skip)]
    pub imports: Vec<String>,
    /// The file's text (lossily decoded).
    #[serde(skip)]
    pub text: String,
}

/// The index of a whole repository; files sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoIndex {
    pub files: Vec<FileIndex>,
}

fn new_parser() -> Parser {
    let mut parser = Parser::new();
    parser
        .set_language(&tree_sitter_python::LANGUAGE.into())
        .expect("tree-sitter-python grammar is compatible with the tree-sitter runtime");
    parser
}

impl FileIndex {
    /// Index one file from its path and raw bytes (never fails: unparsable parts are
    /// skipped, non-UTF-8 bytes are replaced).
    pub fn parse(path: impl Into<String>, bytes: &[u8]) -> FileIndex {
        Self::parse_with(&mut new_parser(), path.into(), bytes)
    }

    fn parse_with(parser: &mut Parser, path: String, bytes: &[u8]) -> FileIndex {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let mut out = FileIndex {
            path,
            classes: Vec::new(),
            functions: Vec::new(),
            imports: Vec::new(),
            text,
        };
        let Some(tree) = parser.parse(out.text.as_bytes(), None) else {
            return out;
        };
        let src = out.text.as_bytes();
        let mut classes = Vec::new();
        let mut functions = Vec::new();
        let mut imports = Vec::new();
        visit_module(
            tree.root_node(),
            src,
            &mut classes,
            &mut functions,
            &mut imports,
        );
        classes.sort_by_key(|c: &ClassEntry| c.start_line);
        out.classes = classes;
        out.functions = functions;
        out.imports = imports;
        out
    }

    /// The class named `name`: exact (dotted) name first, then bare name; first match.
    pub fn class(&self, name: &str) -> Option<&ClassEntry> {
        self.classes.iter().find(|c| c.name == name).or_else(|| {
            self.classes
                .iter()
                .find(|c| c.name.rsplit('.').next() == Some(name))
        })
    }

    /// The module-level function named `name` (first match).
    pub fn function(&self, name: &str) -> Option<&FunctionEntry> {
        self.functions.iter().find(|f| f.name == name)
    }

    /// Lines `start..=end` (1-based) of the text, joined with `\n`.
    pub fn lines(&self, start: usize, end: usize) -> String {
        let start = start.max(1);
        self.text
            .split('\n')
            .skip(start - 1)
            .take(end.saturating_sub(start) + 1)
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn is_compound(kind: &str) -> bool {
    matches!(
        kind,
        "if_statement"
            | "elif_clause"
            | "else_clause"
            | "try_statement"
            | "except_clause"
            | "except_group_clause"
            | "finally_clause"
            | "with_statement"
            | "for_statement"
            | "while_statement"
            | "match_statement"
            | "case_clause"
            | "block"
            | "ERROR"
    )
}

/// Last line (0-based row) of a definition, ignoring trailing comments of its body.
fn effective_end_row(node: Node) -> usize {
    let kind = node.kind();
    if kind == "block"
        || kind == "function_definition"
        || kind == "class_definition"
        || is_compound(kind)
    {
        let mut cursor = node.walk();
        let last = node
            .named_children(&mut cursor)
            .filter(|c| c.kind() != "comment")
            .last();
        if let Some(last) = last {
            if kind == "ERROR" {
                return raw_end_row(node);
            }
            return effective_end_row(last).max(node.start_position().row);
        }
    }
    raw_end_row(node)
}

fn raw_end_row(node: Node) -> usize {
    let end = node.end_position();
    if end.column == 0 && end.row > node.start_position().row {
        end.row - 1
    } else {
        end.row
    }
}

fn name_of(node: Node, src: &[u8]) -> Option<String> {
    let name = node.child_by_field_name("name")?;
    let text = name.utf8_text(src).ok()?.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn entry(node: Node, name: String) -> FunctionEntry {
    FunctionEntry {
        name,
        start_line: node.start_position().row + 1,
        end_line: effective_end_row(node) + 1,
    }
}

/// Children that hold statements of the same scope as `node` (compound statements,
/// decorated definitions, parse errors, blocks).
fn scope_children(node: Node) -> Vec<Node> {
    let mut cursor = node.walk();
    node.named_children(&mut cursor).collect()
}

fn visit_module(
    node: Node,
    src: &[u8],
    classes: &mut Vec<ClassEntry>,
    functions: &mut Vec<FunctionEntry>,
    imports: &mut Vec<String>,
) {
    for child in scope_children(node) {
        match child.kind() {
            "import_statement" | "import_from_statement" | "future_import_statement" => {
                if let Ok(t) = child.utf8_text(src) {
                    imports.push(t.to_string());
                }
            }
            "ERROR" => visit_module(child, src, classes, functions, imports),
            _ => visit_scope(child, src, "", ScopeKind::Module, classes, functions),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum ScopeKind {
    Module,
    Class,
    Function,
}

/// Visit one statement in a scope. `prefix` is the dotted path of the enclosing
/// classes/functions (empty at module level). Functions found directly in a module scope
/// go to `out_funcs`; in a class scope they are that class's methods (`out_funcs` is then
/// the method list); in a function scope they are dropped (nested functions).
fn visit_scope(
    node: Node,
    src: &[u8],
    prefix: &str,
    scope: ScopeKind,
    classes: &mut Vec<ClassEntry>,
    out_funcs: &mut Vec<FunctionEntry>,
) {
    match node.kind() {
        "decorated_definition" => {
            if let Some(def) = node.child_by_field_name("definition") {
                visit_scope(def, src, prefix, scope, classes, out_funcs);
            }
        }
        "function_definition" => {
            let Some(name) = name_of(node, src) else {
                return;
            };
            if scope != ScopeKind::Function {
                out_funcs.push(entry(node, name.clone()));
            }
            // Classes defined inside functions are still classes.
            if let Some(body) = node.child_by_field_name("body") {
                let inner = join(prefix, &name);
                let mut dropped = Vec::new();
                for c in scope_children(body) {
                    visit_scope(c, src, &inner, ScopeKind::Function, classes, &mut dropped);
                }
            }
        }
        "class_definition" => {
            let Some(name) = name_of(node, src) else {
                return;
            };
            let full = join(prefix, &name);
            let pos = classes.len();
            let e = entry(node, full.clone());
            classes.push(ClassEntry {
                name: full.clone(),
                start_line: e.start_line,
                end_line: e.end_line,
                methods: Vec::new(),
            });
            let mut methods = Vec::new();
            if let Some(body) = node.child_by_field_name("body") {
                for c in scope_children(body) {
                    visit_scope(c, src, &full, ScopeKind::Class, classes, &mut methods);
                }
            }
            classes[pos].methods = methods;
        }
        k if is_compound(k) => {
            for c in scope_children(node) {
                visit_scope(c, src, prefix, scope, classes, out_funcs);
            }
        }
        _ => {}
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Collect repository-relative paths of `*.py` files under `root`, sorted; hidden entries
/// and symlinks are skipped. Unreadable directories are skipped silently.
pub fn python_files(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for ent in rd.flatten() {
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            // file_type() does not follow symlinks.
            let Ok(ft) = ent.file_type() else { continue };
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            if ft.is_dir() {
                stack.push((ent.path(), child_rel));
            } else if ft.is_file() && name.ends_with(".py") {
                out.push((child_rel, ent.path()));
            }
        }
    }
    out.sort();
    out
}

impl RepoIndex {
    /// Index every `*.py` file under `root` in parallel (rayon). Files that cannot be
    /// read are indexed as empty; nothing aborts the walk.
    pub fn build(root: &Path) -> RepoIndex {
        let paths = python_files(root);
        let files = paths
            .par_iter()
            .map_init(new_parser, |parser, (rel, abs)| {
                let bytes = std::fs::read(abs).unwrap_or_default();
                FileIndex::parse_with(parser, rel.clone(), &bytes)
            })
            .collect();
        RepoIndex { files }
    }

    /// Build from already-indexed files (sorted by path; first of equal paths kept).
    pub fn from_files(mut files: Vec<FileIndex>) -> RepoIndex {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files.dedup_by(|b, a| a.path == b.path);
        RepoIndex { files }
    }

    /// The file at exactly this repository-relative path.
    pub fn file(&self, path: &str) -> Option<&FileIndex> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Render the tree of directories and `.py` files, one entry per line, 4 spaces per
    /// level, directories with a trailing `/`, entries sorted by name. With
    /// `hide_tests`, files and directories whose name starts with `test` are left out
    /// (with everything below them).
    pub fn render_tree(&self, hide_tests: bool) -> String {
        render_tree(self.files.iter().map(|f| f.path.as_str()), hide_tests)
    }
}

/// Render a tree from repository-relative paths (see [`RepoIndex::render_tree`]).
pub fn render_tree<'a>(paths: impl IntoIterator<Item = &'a str>, hide_tests: bool) -> String {
    #[derive(Default)]
    struct Dir<'a> {
        dirs: std::collections::BTreeMap<&'a str, Dir<'a>>,
        files: std::collections::BTreeSet<&'a str>,
    }
    let mut root = Dir::default();
    'paths: for p in paths {
        let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
        let Some((file, dirs)) = parts.split_last() else {
            continue;
        };
        if hide_tests && parts.iter().any(|s| s.starts_with("test")) {
            continue 'paths;
        }
        let mut cur = &mut root;
        for d in dirs {
            cur = cur.dirs.entry(d).or_default();
        }
        cur.files.insert(file);
    }
    fn emit(dir: &Dir, depth: usize, out: &mut String) {
        let mut names: Vec<(&str, bool)> = dir
            .dirs
            .keys()
            .map(|k| (*k, true))
            .chain(dir.files.iter().map(|f| (*f, false)))
            .collect();
        names.sort();
        for (name, is_dir) in names {
            for _ in 0..depth {
                out.push_str("    ");
            }
            out.push_str(name);
            if is_dir {
                out.push_str("/\n");
                emit(&dir.dirs[name], depth + 1, out);
            } else {
                out.push('\n');
            }
        }
    }
    let mut out = String::new();
    emit(&root, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"import os
from a import (b,
    c)

@decorator
class A(Base):
    x = 1

    @property
    def m(self):
        def inner():
            pass
        return 1

    async def am(self):
        pass
        # trailing comment

    class Inner:
        def im(self):
            pass

def f():
    class Local:
        pass
    return 2

async def af():
    await g()

if True:
    def cond():
        pass
"#;

    #[test]
    fn extracts_structure() {
        let f = FileIndex::parse("pkg/m.py", SRC.as_bytes());
        let names: Vec<_> = f.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["A", "A.Inner", "f.Local"]);
        let a = &f.classes[0];
        assert_eq!((a.start_line, a.end_line), (6, 21));
        let ms: Vec<_> = a
            .methods
            .iter()
            .map(|m| (m.name.as_str(), m.start_line, m.end_line))
            .collect();
        assert_eq!(ms, [("m", 10, 13), ("am", 15, 16)]);
        assert_eq!(f.classes[1].methods[0].name, "im");
        let fs: Vec<_> = f
            .functions
            .iter()
            .map(|m| (m.name.as_str(), m.start_line, m.end_line))
            .collect();
        assert_eq!(fs, [("f", 23, 26), ("af", 28, 29), ("cond", 32, 33)]);
        assert_eq!(f.imports, ["import os", "from a import (b,\n    c)"]);
        assert_eq!(f.class("Inner").unwrap().name, "A.Inner");
        assert_eq!(f.lines(28, 29), "async def af():\n    await g()");
    }

    #[test]
    fn tree_rendering() {
        let paths = [
            "setup.py",
            "pkg/__init__.py",
            "pkg/sub/x.py",
            "pkg/tests/t.py",
            "pkg/test_a.py",
            "a.py",
        ];
        let t = render_tree(paths, false);
        assert_eq!(
            t,
            "a.py\npkg/\n    __init__.py\n    sub/\n        x.py\n    test_a.py\n    tests/\n        t.py\nsetup.py\n"
        );
        let t = render_tree(paths, true);
        assert_eq!(
            t,
            "a.py\npkg/\n    __init__.py\n    sub/\n        x.py\nsetup.py\n"
        );
    }

    #[test]
    fn serialises_in_the_documented_shape() {
        let f = FileIndex::parse("a.py", b"class A:\n    def m(self): pass\ndef g(): pass\n");
        let idx = RepoIndex::from_files(vec![f]);
        let v = serde_json::to_value(&idx).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"files": [{"path": "a.py",
              "classes": [{"name": "A", "start_line": 1, "end_line": 2,
                           "methods": [{"name": "m", "start_line": 2, "end_line": 2}]}],
              "functions": [{"name": "g", "start_line": 3, "end_line": 3}]}]})
        );
    }

    #[test]
    fn garbage_never_panics() {
        for src in [
            &b"\xff\xfe\x00def"[..],
            b"class",
            b"def f(:\n  pass\nclass B:\n  def g(self): pass\n",
            b"",
        ] {
            let _ = FileIndex::parse("x.py", src);
        }
    }
}
