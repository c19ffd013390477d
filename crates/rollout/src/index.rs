//! Repository index (`docs/reposearcher.md` §2): classes, methods, module functions, imports and
//! text of every `*.py` file, parsed with tree-sitter (error-tolerant), plus the rendered
//! directory tree for prompts.
//!
//! Choices, where the paper leaves room:
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
//!   repository root is read. **Hard links are not followed either**: a file with more
//!   than one link may be another name of a file outside the repository, so it is
//!   skipped and counted in [`RepoIndex::skipped`] (trees made by `repos prepare` have
//!   none: archive link entries are not extracted).
//! - **Encodings**: a file that is not UTF-8 is decoded by its PEP 263 coding
//!   declaration (`# -*- coding: latin-1 -*-` in the first two lines). Without one (or
//!   with an unknown encoding, or bytes the encoding cannot decode) the bytes that are
//!   not UTF-8 are replaced; when one of them stands on a `class`/`def` line the file is
//!   skipped and counted in [`RepoIndex::skipped`], so no name is ever indexed mangled
//!   (bad bytes in strings and comments elsewhere do not matter).
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
    /// `*.py` files left out when the index was built, with the reason (undecodable,
    /// hard-linked). Not kept in the index cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<(String, String)>,
}

/// The text of a Python source file: UTF-8, or decoded by its PEP 263 coding
/// declaration; `Err` says why it cannot be decoded without mangling.
pub fn decode_source(bytes: &[u8]) -> Result<std::borrow::Cow<'_, str>, String> {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Ok(std::borrow::Cow::Borrowed(s));
    }
    let Some(label) = coding_declaration(bytes) else {
        return Err("not UTF-8 and no PEP 263 coding declaration".into());
    };
    let norm = label.to_ascii_lowercase().replace('_', "-");
    let norm = match norm.as_str() {
        "latin-1" | "iso-latin-1" | "l1" => "iso-8859-1".to_string(),
        "utf8" => "utf-8".to_string(),
        _ => norm,
    };
    let Some(enc) = encoding_rs::Encoding::for_label(norm.as_bytes()) else {
        return Err(format!("unknown coding {label:?}"));
    };
    enc.decode_without_bom_handling_and_without_replacement(bytes)
        .map(|s| std::borrow::Cow::Owned(s.into_owned()))
        .ok_or_else(|| format!("bytes that are not valid {label}"))
}

/// The text of a source file by [`decode_source`], else with the bytes it cannot decode
/// replaced (U+FFFD) and the reason.
fn decode_lossy(bytes: &[u8]) -> (String, Option<String>) {
    match decode_source(bytes) {
        Ok(t) => (t.into_owned(), None),
        Err(why) => (String::from_utf8_lossy(bytes).into_owned(), Some(why)),
    }
}

/// The encoding named by a PEP 263 declaration in the first two lines: a comment line
/// matching `coding[:=]\s*([-\w.]+)`.
fn coding_declaration(bytes: &[u8]) -> Option<String> {
    for line in bytes.split(|&b| b == b'\n').take(2) {
        let line = String::from_utf8_lossy(line);
        let t = line.trim_start_matches([' ', '\t', '\x0c']);
        if !t.starts_with('#') {
            continue;
        }
        let Some(i) = t.find("coding") else { continue };
        let rest = &t[i + "coding".len()..];
        let Some(rest) = rest.strip_prefix([':', '=']) else {
            continue;
        };
        let name: String = rest
            .trim_start_matches([' ', '\t'])
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .collect();
        if !name.is_empty() {
            return Some(name);
        }
    }
    None
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
        Self::parse_with(&mut new_parser(), path.into(), decode_lossy(bytes).0, false)
    }

    /// Whether a replaced byte (U+FFFD) stands on the line of a class or function
    /// definition, where it would mangle a name.
    fn definition_lines_replaced(&self) -> bool {
        let lines: Vec<&str> = self.text.lines().collect();
        let bad = |l: usize| {
            lines
                .get(l.wrapping_sub(1))
                .is_some_and(|s| s.contains('\u{fffd}'))
        };
        self.classes
            .iter()
            .any(|c| bad(c.start_line) || c.methods.iter().any(|m| bad(m.start_line)))
            || self.functions.iter().any(|f| bad(f.start_line))
    }

    /// Like [`FileIndex::parse`] but always parsing the whole text with tree-sitter
    /// (no skeleton): the reference the skeleton path is tested against.
    pub fn parse_full(path: impl Into<String>, bytes: &[u8]) -> FileIndex {
        Self::parse_with(&mut new_parser(), path.into(), decode_lossy(bytes).0, true)
    }

    fn parse_with(parser: &mut Parser, path: String, text: String, full: bool) -> FileIndex {
        let mut out = FileIndex {
            path,
            classes: Vec::new(),
            functions: Vec::new(),
            imports: Vec::new(),
            text,
        };
        // Parse the skeleton (function bodies blanked) when there is one and it parses
        // cleanly; otherwise the whole text.
        let skel = if full { None } else { skeleton(&out.text) };
        let mut tree = None;
        let mut src = out.text.as_bytes();
        if let Some(sk) = &skel {
            if let Some(t) = parser.parse(sk.as_bytes(), None) {
                if !t.root_node().has_error() {
                    tree = Some(t);
                    src = sk.as_bytes();
                }
            }
        }
        if tree.is_none() {
            tree = parser.parse(out.text.as_bytes(), None);
        }
        let Some(tree) = tree else {
            return out;
        };
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

/// One logical line of Python source (physical lines joined by brackets, strings and
/// backslashes), as found by [`logical_lines`].
struct Logical<'a> {
    /// First and last physical row (0-based).
    start: usize,
    end: usize,
    /// Indentation width of the first row (tabs to multiples of 8).
    indent: usize,
    /// Leading whitespace of the first row.
    ws: &'a str,
    /// First row without its leading whitespace.
    head: &'a str,
}

/// Split source rows into logical lines, skipping blank and comment-only rows. `None`
/// when the text ends inside a string or a bracket, a bracket closes that never opened,
/// or a one-quote string runs off its row: the caller then parses the whole file.
fn logical_lines<'a>(rows: &[&'a str]) -> Option<Vec<Logical<'a>>> {
    let mut out = Vec::new();
    // (quote byte, triple) while inside a string.
    let mut string: Option<(u8, bool)> = None;
    let mut depth = 0usize;
    let mut cur: Option<Logical> = None;
    // Last row of the current logical line with code on it (a row after a backslash
    // may hold only a comment, which does not extend the statement).
    let mut last_code_row = 0;
    for (row, raw) in rows.iter().enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if cur.is_none() {
            let head = line.trim_start_matches([' ', '\t', '\x0c']);
            if head.is_empty() || head.starts_with('#') {
                continue;
            }
            let ws = &line[..line.len() - head.len()];
            let mut indent = 0;
            for c in ws.bytes() {
                indent = match c {
                    b'\t' => (indent / 8 + 1) * 8,
                    b'\x0c' => 0,
                    _ => indent + 1,
                };
            }
            cur = Some(Logical {
                start: row,
                end: row,
                indent,
                ws,
                head,
            });
        }
        let b = line.as_bytes();
        let mut i = 0;
        let mut continued = false;
        while i < b.len() {
            let c = b[i];
            if string.is_some() || !matches!(c, b' ' | b'\t' | b'\x0c' | b'#') {
                last_code_row = row;
            }
            if let Some((q, triple)) = string {
                if c == b'\\' {
                    if i + 1 >= b.len() {
                        continued = true;
                    }
                    i += 2;
                    continue;
                }
                if c == q {
                    if !triple {
                        string = None;
                    } else if b[i..].starts_with(&[q, q, q]) {
                        string = None;
                        i += 3;
                        continue;
                    }
                }
                i += 1;
                continue;
            }
            match c {
                b'#' => break,
                b'\'' | b'"' => {
                    if b[i..].starts_with(&[c, c, c]) {
                        string = Some((c, true));
                        i += 3;
                        continue;
                    }
                    string = Some((c, false));
                }
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth = depth.checked_sub(1)?,
                b'\\' if i + 1 == b.len() => continued = true,
                _ => {}
            }
            i += 1;
        }
        if let Some((_, false)) = string {
            if !continued {
                return None;
            }
        }
        if string.is_none() && depth == 0 && !continued {
            let mut l = cur.take().expect("set above");
            l.end = last_code_row.max(l.start);
            out.push(l);
        }
    }
    if cur.is_some() || string.is_some() || depth != 0 {
        return None;
    }
    Some(out)
}

fn starts_with_keyword(head: &str, kw: &str) -> bool {
    head.strip_prefix(kw)
        .is_some_and(|r| r.starts_with([' ', '\t', '\\', '(']))
}

fn is_def(head: &str) -> bool {
    starts_with_keyword(head, "def")
        || head.strip_prefix("async").is_some_and(|r| {
            r.starts_with([' ', '\t']) && starts_with_keyword(r.trim_start(), "def")
        })
}

/// The text with the bodies of functions blanked out where that cannot change the
/// index: a body on its own rows that contains no `class` statement is replaced by
/// empty rows and a `pass` on its last row, at its indentation, so rows, names and line
/// ranges stay the same while tree-sitter parses far fewer bytes (bodies are most of a
/// Python file). `None` when nothing can be blanked or the text does not split into
/// logical lines cleanly. The caller falls back to the whole text when the skeleton has
/// a parse error.
fn skeleton(text: &str) -> Option<String> {
    let rows: Vec<&str> = text.split('\n').collect();
    let ll = logical_lines(&rows)?;
    // Per row: None = keep; Some(ws) = blank, or `ws` + `pass` when ws is Some("..").
    let mut blank: Vec<Option<Option<&str>>> = vec![None; rows.len()];
    let mut any = false;
    let mut i = 0;
    while i < ll.len() {
        let l = &ll[i];
        if is_def(l.head) {
            let mut j = i + 1;
            while j < ll.len() && ll[j].indent > l.indent {
                j += 1;
            }
            if j > i + 1 && ll[i + 1].start > l.end {
                let body = &ll[i + 1..j];
                if !body.iter().any(|b| starts_with_keyword(b.head, "class")) {
                    let first = body[0].start;
                    let last = body[body.len() - 1].end;
                    for r in blank.iter_mut().take(last + 1).skip(first) {
                        *r = Some(None);
                    }
                    blank[last] = Some(Some(body[0].ws));
                    any = true;
                    i = j;
                    continue;
                }
            }
        }
        i += 1;
    }
    if !any {
        return None;
    }
    let mut out = String::with_capacity(text.len() / 2);
    for (r, row) in rows.iter().enumerate() {
        if r > 0 {
            out.push('\n');
        }
        match blank[r] {
            None => out.push_str(row),
            Some(None) => {}
            Some(Some(ws)) => {
                out.push_str(ws);
                out.push_str("pass");
            }
        }
    }
    Some(out)
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

/// Whether a regular file has more than one hard link.
fn hard_linked(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(p).is_ok_and(|m| m.nlink() > 1)
    }
    #[cfg(not(unix))]
    {
        let _ = p;
        false
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
        let results: Vec<Result<FileIndex, (String, String)>> = paths
            .par_iter()
            .map_init(new_parser, |parser, (rel, abs)| {
                if hard_linked(abs) {
                    return Err((
                        rel.clone(),
                        "hard-linked (another name may be outside the repository)".into(),
                    ));
                }
                let bytes = std::fs::read(abs).unwrap_or_default();
                let (text, replaced) = decode_lossy(&bytes);
                let f = FileIndex::parse_with(parser, rel.clone(), text, false);
                match replaced {
                    Some(why) if f.definition_lines_replaced() => {
                        Err((rel.clone(), format!("{why}, on a class or def line")))
                    }
                    _ => Ok(f),
                }
            })
            .collect();
        let mut index = RepoIndex::default();
        for r in results {
            match r {
                Ok(f) => index.files.push(f),
                Err(s) => index.skipped.push(s),
            }
        }
        if !index.skipped.is_empty() {
            tracing::warn!(
                "{}: {} Python file(s) skipped (first: {} - {})",
                root.display(),
                index.skipped.len(),
                index.skipped[0].0,
                index.skipped[0].1
            );
        }
        index
    }

    /// Build from already-indexed files (sorted by path; first of equal paths kept).
    pub fn from_files(mut files: Vec<FileIndex>) -> RepoIndex {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files.dedup_by(|b, a| a.path == b.path);
        RepoIndex {
            files,
            skipped: Vec::new(),
        }
    }

    /// The file at exactly this repository-relative path.
    pub fn file(&self, path: &str) -> Option<&FileIndex> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Render the tree of directories and `.py` files, one entry per line, 4 spaces per
    /// level, directories with a trailing `/`, entries sorted by name. With
    /// `hide_tests`, test files ([`is_test_path`]) are left out.
    pub fn render_tree(&self, hide_tests: bool) -> String {
        render_tree(self.files.iter().map(|f| f.path.as_str()), hide_tests)
    }
}

/// Whether a repository-relative path is test code. The one rule of the project: the
/// prompts' tree hides these paths, candidate files never include them, and BM25 can
/// skip them. A path is a test when a component starts with `test` (`tests/`,
/// `testing/`, `test_x.py`), or its file name is `conftest.py` or ends in `_test.py` /
/// `_tests.py`.
pub fn is_test_path(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    path.split('/').any(|c| c.starts_with("test"))
        || name == "conftest.py"
        || name.ends_with("_test.py")
        || name.ends_with("_tests.py")
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
        if hide_tests && is_test_path(p) {
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

    #[test]
    fn pep263_sources_decode_and_undecodable_ones_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let w = |name: &str, bytes: &[u8]| std::fs::write(d.path().join(name), bytes).unwrap();
        w(
            "latin.py",
            b"# -*- coding: latin-1 -*-\nclass Caf\xe9:\n    def cr\xe8me(self):\n        pass\n",
        );
        w(
            "cp.py",
            b"#!/usr/bin/env python\n# vim: set fileencoding=cp1252 :\ndef na\xefve():\n    pass\n",
        );
        w("plain.py", "class Caf\u{e9}Ok:\n    pass\n".as_bytes());
        w("nodecl.py", b"class Caf\xe9:\n    pass\n");
        w(
            "unknown.py",
            b"# coding: klingon\nclass Caf\xe9:\n    pass\n",
        );
        w("badutf8.py", b"# coding: utf-8\nclass Caf\xe9:\n    pass\n");
        // Bad bytes only in a string: indexed (names intact).
        w("strings.py", b"def helper():\n    return \"caf\xe9\"\n");
        let idx = RepoIndex::build(d.path());
        let names = |p: &str| {
            let f = idx.file(p).unwrap();
            let mut v: Vec<String> = f.classes.iter().map(|c| c.name.clone()).collect();
            v.extend(f.functions.iter().map(|f| f.name.clone()));
            v.extend(
                f.classes
                    .iter()
                    .flat_map(|c| c.methods.iter().map(|m| m.name.clone())),
            );
            v
        };
        assert_eq!(names("latin.py"), vec!["Caf\u{e9}", "cr\u{e8}me"]);
        assert_eq!(names("cp.py"), vec!["na\u{ef}ve"]);
        assert_eq!(names("plain.py"), vec!["Caf\u{e9}Ok"]);
        assert_eq!(names("strings.py"), vec!["helper"]);
        let mut skipped: Vec<&str> = idx.skipped.iter().map(|(p, _)| p.as_str()).collect();
        skipped.sort();
        assert_eq!(skipped, vec!["badutf8.py", "nodecl.py", "unknown.py"]);
        for f in &idx.files {
            for c in &f.classes {
                assert!(
                    !c.name.contains('\u{fffd}') && c.name != "Caf",
                    "{}",
                    c.name
                );
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn hard_links_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("secret.py");
        std::fs::write(&outside, "def secret():\n    pass\n").unwrap();
        let repo = d.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::fs::write(repo.join("a.py"), "def a():\n    pass\n").unwrap();
        std::fs::hard_link(&outside, repo.join("link.py")).unwrap();
        let idx = RepoIndex::build(&repo);
        assert!(idx.file("a.py").is_some());
        assert!(idx.file("link.py").is_none());
        assert_eq!(idx.skipped.len(), 1);
        assert!(idx.skipped[0].1.contains("hard-linked"));
    }

    #[test]
    fn one_test_path_rule() {
        for p in [
            "pkg/tests/x.py",
            "testing/x.py",
            "pkg/test_a.py",
            "tests.py",
            "conftest.py",
            "pkg/conftest.py",
            "pkg/a_test.py",
            "pkg/a_tests.py",
        ] {
            assert!(is_test_path(p), "{p}");
        }
        for p in [
            "pkg/contest.py",
            "pkg/latest/a.py",
            "pkg/attest.py",
            "pkg/a_test_utils.py",
            "a.py",
        ] {
            assert!(!is_test_path(p), "{p}");
        }
        // The tree hides exactly these paths.
        let tree = render_tree(
            ["a.py", "pkg/conftest.py", "pkg/b_test.py", "pkg/c.py"],
            true,
        );
        assert_eq!(tree, "a.py\npkg/\n    c.py\n");
    }

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

    #[test]
    fn skeleton_equals_full_parse() {
        let tricky = [
            SRC,
            // Backslash continuation onto a comment-only row (sympy's test_solvers.py).
            "def f():\n    assert g(1) \\\n        #== comment\n\n\ndef h():\n    pass\n",
            // Dedented text inside strings, `def`/`class` inside strings and brackets.
            "def f():\n    s = '''\nclass Fake:\ndef fake():\n'''\n    t = (1,\n2)\n    return s\n\nclass K:\n    def m(self):\n        x = \"\"\"\n  def no():\n\"\"\"\n        return x  # tail\n    # trailing comment\n\n    def n(self): return 1\n",
            // Tabs, async, a class inside a function (not blanked), decorators.
            "class A:\n\tasync def m(self):\n\t\tif x:\n\t\t\treturn 1\n\t\treturn 2\n\ndef f():\n    class L:\n        def lm(self):\n            pass\n    def g():\n        pass\n    return L\n",
            // Syntax errors and Python 2 (fallback to the full text).
            "def f(:\n    pass\nclass B:\n    def g(self):\n        print 'x'\n",
            "def f():\n    s = 'unterminated\n    return 1\n",
            "def f():\n    return (1,\n",
            "print 'py2'\ndef f():\n    exec 'x = 1'\n    print >>sys.stderr, 'y'\n",
            "def f():\r\n    return 1\r\n\r\nclass C:\r\n    def m(self):\r\n        pass\r\n",
        ];
        for (i, src) in tricky.iter().enumerate() {
            let a = FileIndex::parse("x.py", src.as_bytes());
            let b = FileIndex::parse_full("x.py", src.as_bytes());
            assert_eq!(a, b, "source {i}");
        }
        assert!(skeleton(tricky[1]).is_some());
        assert_eq!(
            skeleton("def f():\n    x = 1\n    return x\n").unwrap(),
            "def f():\n\n    pass\n"
        );
        // A class inside the body keeps that function whole.
        assert!(skeleton("def f():\n    class L:\n        pass\n").is_none());
        assert!(skeleton("def f():\n    return (1,\n").is_none());
    }

    #[test]
    fn fixture_skeleton_equals_full_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo");
        for (rel, abs) in python_files(&root) {
            let bytes = std::fs::read(abs).unwrap();
            assert_eq!(
                FileIndex::parse(rel.clone(), &bytes),
                FileIndex::parse_full(rel.clone(), &bytes),
                "{rel}"
            );
        }
    }

    proptest::proptest! {
        /// Any mix of Python fragments (quotes, brackets, backslashes, tabs, CR) indexes
        /// without panicking on either path.
        #[test]
        fn skeleton_never_panics(parts in proptest::collection::vec(
            proptest::sample::select(vec![
                "def f():\n", "    ", "\t", "class C:\n", "'''", "\"", "'", "(", ")", "]",
                "\\\n", "# c\n", "\n", "\r\n", "return 1\n", "async def g(x):\n", "é",
                "    def m(self):\n", "pass", "x = [\n", "@dec\n",
            ]), 0..40)) {
            let src: String = parts.concat();
            let _ = skeleton(&src);
            let _ = FileIndex::parse("p.py", src.as_bytes());
        }
    }
}
