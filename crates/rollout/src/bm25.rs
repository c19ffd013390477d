//! BM25: the lexical retrieval baseline (no LLM), as a [`Policy`].
//!
//! Okapi BM25 over two corpora of the repository, queried with the issue text
//! (`problem_statement`):
//! - **files**: one document per `*.py` file: the tokens of its path and of its text;
//! - **definitions**: one document per module function (`file::func`), class
//!   (`file::Class`, nested `file::Outer.Inner`) and direct method
//!   (`file::Class.method`): the tokens of its qualified name repeated
//!   [`Bm25Config::name_weight`] times, of its file path, and of its source lines (a class
//!   covers its methods' lines too). Classes defined inside a function are not documents
//!   (no ground truth names them; their lines belong to the function).
//!
//! Score of document `d` for query `q` (query tokens counted with multiplicity, as
//! `rank_bm25` does):
//! `sum_t qtf(t) * idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))`
//! with the non-negative (Lucene) `idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))`;
//! `N`, `df` and `avgdl` are per corpus, over the whole repository (also when the answer is
//! restricted to the candidate files).
//!
//! **Mentions** (optional, [`Bm25Config::mention_boost`]): a document whose score is
//! positive is multiplied by `1 + mention_boost` when the issue names it literally: for a
//! file its path, a path suffix of two or more components, its bare file name
//! (`basic.py`) or its dotted module path or a suffix of it of two or more components
//! (`sympy.core.basic`, `core.basic`); for a definition its qualified name
//! (`Class.method`) or its bare name as an identifier (dunder names and names shorter
//! than 3 characters excepted).
//!
//! **Tokeniser** ([`tokenize`]): identifiers are the maximal runs of ASCII letters,
//! digits and `_` (everything else separates). Each identifier is split at `_` into
//! segments and each segment at camelCase boundaries (`fooBar`, `HTTPServer` ->
//! `HTTP` `Server`) and letter/digit boundaries (`utf8` -> `utf` `8`). Emitted, all
//! lowercased: every part, every segment that has several parts, and the whole identifier
//! (leading/trailing `_` trimmed) when it has several segments; tokens shorter than
//! [`Bm25Config::min_token_len`], all-digit tokens and a small English + Python stop-word
//! list ([`is_stop_word`]) are dropped.
//!
//! **Behaviour by stage** (the policy):
//! - [`Stage::FileLevel`]: the fenced list of the top-k files of the whole repository
//!   (test files left out when [`Bm25Config::skip_tests`]);
//! - [`Stage::Search`]: `exit()` (no tool use);
//! - [`Stage::Summary`]: the fenced top-k definitions, restricted to the task's candidate
//!   files when there are any (else the whole repository, test files left out when
//!   `skip_tests`).
//!
//! Only documents with a positive score are answered, best first (ties: repository order),
//! duplicates of the same location dropped; a query with no match answers an empty block.
//!
//! **Cache**: the index of a repository is built once (in parallel with rayon) on the
//! first turn of an instance and kept, keyed by `instance_id` (and checked against the
//! number of files of the task's index), for the next turns; the least recently used of
//! more than [`Bm25Config::cache_instances`] indexes is dropped.
//!
//! **Config** ([`Bm25Config`], every field optional): `k1` (1.2), `b` (0.75), `top_k`
//! (5), `name_weight` (3), `min_token_len` (2), `skip_tests` (false), `mention_boost`
//! (0.5), `cache_instances` (32).

use crate::index::{is_test_path, FileIndex, RepoIndex};
use crate::policy::{format_answer, Policy, PolicyError, Stage, TurnReply, TurnRequest};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

/// Settings of the BM25 baseline (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bm25Config {
    /// Term-frequency saturation.
    pub k1: f64,
    /// Length normalisation, in `[0, 1]`.
    pub b: f64,
    /// Number of files / locations answered.
    pub top_k: usize,
    /// How many times the qualified name's tokens count in a definition document.
    pub name_weight: u32,
    /// Tokens shorter than this are dropped.
    pub min_token_len: usize,
    /// Leave test files out of the whole-repository rankings.
    pub skip_tests: bool,
    /// Multiply the score of documents the issue names literally by `1 + mention_boost`
    /// (0 disables).
    pub mention_boost: f64,
    /// How many repository indexes the policy keeps.
    pub cache_instances: usize,
}

impl Default for Bm25Config {
    fn default() -> Self {
        Bm25Config {
            k1: 1.2,
            b: 0.75,
            top_k: 5,
            name_weight: 3,
            min_token_len: 2,
            skip_tests: false,
            mention_boost: 0.5,
            cache_instances: 32,
        }
    }
}

impl Bm25Config {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.k1.is_finite() && self.k1 >= 0.0) {
            return Err(format!(
                "bm25.k1 must be a finite number >= 0, got {}",
                self.k1
            ));
        }
        if !(0.0..=1.0).contains(&self.b) {
            return Err(format!("bm25.b must be in [0, 1], got {}", self.b));
        }
        if self.top_k == 0 {
            return Err("bm25.top_k must be at least 1".into());
        }
        if self.name_weight == 0 {
            return Err("bm25.name_weight must be at least 1".into());
        }
        if !(self.mention_boost.is_finite() && self.mention_boost >= 0.0) {
            return Err(format!(
                "bm25.mention_boost must be a finite number >= 0, got {}",
                self.mention_boost
            ));
        }
        if self.cache_instances == 0 {
            return Err("bm25.cache_instances must be at least 1".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Tokeniser

/// English function words.
const ENGLISH_STOP_WORDS: &[&str] = &[
    "a", "about", "above", "after", "again", "all", "also", "am", "an", "and", "any", "are", "as",
    "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by",
    "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for",
    "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his", "how",
    "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me", "more", "most", "my", "no",
    "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "our", "ours", "out",
    "over", "own", "same", "she", "should", "so", "some", "such", "than", "that", "the", "their",
    "theirs", "them", "then", "there", "these", "they", "this", "those", "through", "to", "too",
    "under", "until", "up", "us", "very", "was", "we", "were", "what", "when", "where", "which",
    "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours",
];

/// Python keywords and ubiquitous names.
const PYTHON_STOP_WORDS: &[&str] = &[
    "and", "as", "assert", "async", "await", "break", "class", "cls", "continue", "def", "del",
    "elif", "else", "except", "false", "finally", "for", "from", "global", "if", "import", "in",
    "is", "lambda", "none", "nonlocal", "not", "or", "pass", "py", "raise", "return", "self",
    "true", "try", "while", "with", "yield", "args", "kwargs",
];

static STOP_WORDS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    ENGLISH_STOP_WORDS
        .iter()
        .chain(PYTHON_STOP_WORDS)
        .copied()
        .collect()
});

/// The stop-word list (lowercase English function words and Python keywords, `self`,
/// `cls`, `args`, `kwargs`, `py`).
pub fn is_stop_word(token: &str) -> bool {
    STOP_WORDS.contains(token)
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Calls `f` with each token of `text` (see the module documentation).
pub fn for_each_token(text: &str, min_len: usize, mut f: impl FnMut(&str)) {
    let bytes = text.as_bytes();
    let mut buf = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if !is_ident_byte(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_ident_byte(bytes[i]) {
            i += 1;
        }
        // Identifier bytes are ASCII, so these are char boundaries.
        identifier_tokens(&text[start..i], min_len, &mut buf, &mut f);
    }
}

/// The tokens of `text` (see the module documentation).
pub fn tokenize(text: &str, min_len: usize) -> Vec<String> {
    let mut out = Vec::new();
    for_each_token(text, min_len, |t| out.push(t.to_string()));
    out
}

fn emit(s: &str, min_len: usize, buf: &mut String, f: &mut impl FnMut(&str)) {
    if s.len() < min_len || s.bytes().all(|b| b.is_ascii_digit()) {
        return;
    }
    buf.clear();
    buf.extend(s.chars().map(|c| c.to_ascii_lowercase()));
    if !is_stop_word(buf) {
        f(buf);
    }
}

fn identifier_tokens(ident: &str, min_len: usize, buf: &mut String, f: &mut impl FnMut(&str)) {
    let whole = ident.trim_matches('_');
    if whole.is_empty() {
        return;
    }
    let mut segments = 0;
    for seg in whole.split('_').filter(|s| !s.is_empty()) {
        segments += 1;
        let b = seg.as_bytes();
        let mut parts = 0;
        let mut start = 0;
        for j in 1..=b.len() {
            let boundary = j == b.len() || {
                let (p, c) = (b[j - 1], b[j]);
                (p.is_ascii_lowercase() && c.is_ascii_uppercase())
                    || (p.is_ascii_digit() != c.is_ascii_digit())
                    || (p.is_ascii_uppercase()
                        && c.is_ascii_uppercase()
                        && b.get(j + 1).is_some_and(|n| n.is_ascii_lowercase()))
            };
            if boundary {
                emit(&seg[start..j], min_len, buf, f);
                parts += 1;
                start = j;
            }
        }
        if parts > 1 {
            emit(seg, min_len, buf, f);
        }
    }
    if segments > 1 {
        emit(whole, min_len, buf, f);
    }
}

// ---------------------------------------------------------------------------------------
// Index

/// The documents of one file: the whole file, and each definition (module function,
/// class, method) with its name tokens weighted by `name_weight`; token ids local to the
/// file (`vocab`).
fn file_docs(f: &FileIndex, cfg: &Bm25Config) -> FileDocs {
    let min = cfg.min_token_len;
    let mut interner = Interner::default();
    let mut path_ids = Vec::new();
    for_each_token(&f.path, min, |t| path_ids.push(interner.id(t)));
    // Tokens of every line, flat, with the offset of each line's first token.
    let mut toks: Vec<u32> = Vec::new();
    let mut line_start: Vec<usize> = vec![0];
    for line in f.text.split('\n') {
        for_each_token(line, min, |t| toks.push(interner.id(t)));
        line_start.push(toks.len());
    }
    let lines = line_start.len() - 1;
    // Tokens of lines `s..=e` (1-based, clamped to the file).
    let span = |s: usize, e: usize| -> std::ops::Range<usize> {
        let s0 = s.clamp(1, lines) - 1;
        line_start[s0]..line_start[e.clamp(s0 + 1, lines)]
    };
    let mut defs: Vec<(String, usize, usize)> = Vec::new();
    for func in &f.functions {
        defs.push((func.name.clone(), func.start_line, func.end_line));
    }
    for c in &f.classes {
        // A class inside a function (`func.Inner`) is not a definition.
        if let Some((outer, _)) = c.name.rsplit_once('.') {
            if !f.classes.iter().any(|o| o.name == outer) {
                continue;
            }
        }
        defs.push((c.name.clone(), c.start_line, c.end_line));
        for m in &c.methods {
            defs.push((format!("{}.{}", c.name, m.name), m.start_line, m.end_line));
        }
    }
    let name_ids: Vec<Vec<u32>> = defs
        .iter()
        .map(|(name, _, _)| {
            let mut ids = Vec::new();
            for_each_token(name, min, |t| ids.push(interner.id(t)));
            ids
        })
        .collect();
    let mut counter = Counter::new(interner.vocab.len());
    counter.add(&path_ids, 1);
    counter.add(&toks, 1);
    let file = counter.take();
    let defs = defs
        .into_iter()
        .zip(name_ids)
        .map(|((name, s, e), ids)| {
            counter.add(&ids, cfg.name_weight);
            counter.add(&path_ids, 1);
            counter.add(&toks[span(s, e)], 1);
            (name, counter.take())
        })
        .collect();
    FileDocs {
        vocab: interner.vocab,
        file,
        defs,
    }
}

/// One corpus (files or definitions) of a repository.
#[derive(Debug, Default)]
struct Corpus {
    /// Per document: its file (index into [`Bm25Index::paths`]) and name (`None` for a
    /// file document).
    docs: Vec<(u32, Option<String>)>,
    lens: Vec<f32>,
    avgdl: f64,
    /// Per term id: `(doc, tf)` in increasing doc order.
    postings: Vec<Vec<(u32, u32)>>,
}

impl Corpus {
    fn push(&mut self, file: u32, name: Option<String>, tf: &[(u32, u32)], len: u32) {
        let d = self.docs.len() as u32;
        self.docs.push((file, name));
        self.lens.push(len as f32);
        for &(t, n) in tf {
            let t = t as usize;
            if self.postings.len() <= t {
                self.postings.resize_with(t + 1, Vec::new);
            }
            self.postings[t].push((d, n));
        }
    }

    fn finish(&mut self) {
        let n = self.lens.len().max(1) as f64;
        self.avgdl = self.lens.iter().map(|&l| l as f64).sum::<f64>() / n;
    }

    fn scores(&self, query: &[(u32, u32)], k1: f64, b: f64) -> Vec<f64> {
        let mut scores = vec![0.0f64; self.docs.len()];
        let n = self.docs.len() as f64;
        let avgdl = if self.avgdl > 0.0 { self.avgdl } else { 1.0 };
        for &(t, qtf) in query {
            let Some(post) = self.postings.get(t as usize) else {
                continue;
            };
            if post.is_empty() {
                continue;
            }
            let df = post.len() as f64;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            let w = qtf as f64 * idf;
            for &(d, tf) in post {
                let tf = tf as f64;
                let norm = k1 * (1.0 - b + b * self.lens[d as usize] as f64 / avgdl);
                scores[d as usize] += w * tf * (k1 + 1.0) / (tf + norm);
            }
        }
        scores
    }
}

/// Term frequencies `(term id, tf)` sorted by term id, and the document length.
type TermCounts = (Vec<(u32, u32)>, u32);

/// The documents of one file, with file-local term ids.
struct FileDocs {
    vocab: Vec<String>,
    file: TermCounts,
    /// Per definition: its name and counts.
    defs: Vec<(String, TermCounts)>,
}

#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
    vocab: Vec<String>,
}

impl Interner {
    fn id(&mut self, t: &str) -> u32 {
        if let Some(&i) = self.ids.get(t) {
            return i;
        }
        let i = self.vocab.len() as u32;
        self.ids.insert(t.to_string(), i);
        self.vocab.push(t.to_string());
        i
    }
}

/// Term-frequency counting over small local ids, reset after each document.
struct Counter {
    counts: Vec<u32>,
    touched: Vec<u32>,
    len: u32,
}

impl Counter {
    fn new(n: usize) -> Counter {
        Counter {
            counts: vec![0; n],
            touched: Vec::new(),
            len: 0,
        }
    }

    fn add(&mut self, ids: &[u32], times: u32) {
        for &t in ids {
            let c = &mut self.counts[t as usize];
            if *c == 0 {
                self.touched.push(t);
            }
            *c += times;
            self.len += times;
        }
    }

    fn take(&mut self) -> TermCounts {
        self.touched.sort_unstable();
        let tf = self
            .touched
            .iter()
            .map(|&t| (t, std::mem::take(&mut self.counts[t as usize])))
            .collect();
        self.touched.clear();
        (tf, std::mem::take(&mut self.len))
    }
}

/// The BM25 index of one repository: a file corpus and a definition corpus sharing one
/// vocabulary. Holds no reference to the [`RepoIndex`] it was built from.
#[derive(Debug)]
pub struct Bm25Index {
    k1: f64,
    b: f64,
    min_token_len: usize,
    vocab: HashMap<String, u32>,
    paths: Vec<String>,
    files: Corpus,
    defs: Corpus,
}

/// A ranked document: `path` or `path::name`, and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub location: String,
    pub score: f64,
}

impl Bm25Index {
    /// Tokenises every file and definition of `index` (in parallel) and builds both
    /// corpora.
    pub fn build(index: &RepoIndex, cfg: &Bm25Config) -> Bm25Index {
        let min = cfg.min_token_len;
        let per_file: Vec<FileDocs> = index.files.par_iter().map(|f| file_docs(f, cfg)).collect();

        let mut vocab: HashMap<String, u32> = HashMap::new();
        let mut files = Corpus::default();
        let mut defs = Corpus::default();
        let mut paths = Vec::with_capacity(index.files.len());
        let mut remapped: Vec<(u32, u32)> = Vec::new();
        for (fi, (f, docs)) in index.files.iter().zip(per_file).enumerate() {
            paths.push(f.path.clone());
            let global: Vec<u32> = docs
                .vocab
                .into_iter()
                .map(|t| {
                    let n = vocab.len() as u32;
                    *vocab.entry(t).or_insert(n)
                })
                .collect();
            let mut remap = |tf: &[(u32, u32)]| {
                remapped.clear();
                remapped.extend(tf.iter().map(|&(t, n)| (global[t as usize], n)));
                std::mem::take(&mut remapped)
            };
            let tf = remap(&docs.file.0);
            files.push(fi as u32, None, &tf, docs.file.1);
            for (name, (tf, len)) in docs.defs {
                let tf = remap(&tf);
                defs.push(fi as u32, Some(name), &tf, len);
            }
        }
        files.finish();
        defs.finish();
        Bm25Index {
            k1: cfg.k1,
            b: cfg.b,
            min_token_len: min,
            vocab,
            paths,
            files,
            defs,
        }
    }

    /// Number of file and definition documents.
    pub fn sizes(&self) -> (usize, usize) {
        (self.files.docs.len(), self.defs.docs.len())
    }

    fn query_terms(&self, query: &str) -> Vec<(u32, u32)> {
        let mut q: HashMap<u32, u32> = HashMap::new();
        for_each_token(query, self.min_token_len, |t| {
            if let Some(&id) = self.vocab.get(t) {
                *q.entry(id).or_default() += 1;
            }
        });
        let mut q: Vec<(u32, u32)> = q.into_iter().collect();
        q.sort_unstable();
        q
    }

    fn rank(
        &self,
        corpus: &Corpus,
        query: &str,
        mention_boost: f64,
        keep: impl Fn(&str) -> bool,
        k: usize,
    ) -> Vec<Scored> {
        let mut scores = corpus.scores(&self.query_terms(query), self.k1, self.b);
        if mention_boost > 0.0 {
            let mentions = Mentions::new(query);
            let mut file_hit: HashMap<u32, bool> = HashMap::new();
            for (d, s) in scores.iter_mut().enumerate() {
                if *s <= 0.0 {
                    continue;
                }
                let (fi, name) = &corpus.docs[d];
                let hit = match name {
                    Some(n) => mentions.names(n),
                    None => *file_hit
                        .entry(*fi)
                        .or_insert_with(|| mentions.path(&self.paths[*fi as usize])),
                };
                if hit {
                    *s *= 1.0 + mention_boost;
                }
            }
        }
        let mut order: Vec<usize> = (0..scores.len())
            .filter(|&d| scores[d] > 0.0 && keep(&self.paths[corpus.docs[d].0 as usize]))
            .collect();
        order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
        let mut out: Vec<Scored> = Vec::new();
        for d in order {
            let (fi, name) = &corpus.docs[d];
            let path = &self.paths[*fi as usize];
            let location = match name {
                Some(n) => format!("{path}::{n}"),
                None => path.clone(),
            };
            if out.iter().any(|s| s.location == location) {
                continue;
            }
            out.push(Scored {
                location,
                score: scores[d],
            });
            if out.len() == k {
                break;
            }
        }
        out
    }

    /// The top-`k` files for `query` among those `keep` accepts (by path), best first.
    pub fn rank_files(
        &self,
        query: &str,
        mention_boost: f64,
        keep: impl Fn(&str) -> bool,
        k: usize,
    ) -> Vec<Scored> {
        self.rank(&self.files, query, mention_boost, keep, k)
    }

    /// The top-`k` definitions (`file::name`) for `query` in the files `keep` accepts
    /// (by path), best first.
    pub fn rank_definitions(
        &self,
        query: &str,
        mention_boost: f64,
        keep: impl Fn(&str) -> bool,
        k: usize,
    ) -> Vec<Scored> {
        self.rank(&self.defs, query, mention_boost, keep, k)
    }
}

/// What the issue text names literally (see the module documentation).
struct Mentions<'a> {
    text: &'a str,
    /// Identifiers, case-sensitive.
    idents: HashSet<&'a str>,
    /// Dotted chains of identifiers (`a.b.c`) and all their contiguous sub-chains of two
    /// or more identifiers.
    chains: HashSet<String>,
}

impl<'a> Mentions<'a> {
    fn new(text: &'a str) -> Mentions<'a> {
        let mut idents = HashSet::new();
        let mut chains = HashSet::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if !is_ident_byte(bytes[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && (is_ident_byte(bytes[i]) || bytes[i] == b'.') {
                i += 1;
            }
            let chain: Vec<&str> = text[start..i]
                .split('.')
                .filter(|s| !s.is_empty())
                .collect();
            idents.extend(chain.iter().copied());
            for s in 0..chain.len() {
                for e in s + 2..=chain.len() {
                    chains.insert(chain[s..e].join("."));
                }
            }
        }
        Mentions {
            text,
            idents,
            chains,
        }
    }

    fn names(&self, qualified: &str) -> bool {
        if qualified.contains('.') && self.chains.contains(qualified) {
            return true;
        }
        let bare = qualified.rsplit('.').next().unwrap_or(qualified);
        let dunder = bare.starts_with("__") && bare.ends_with("__");
        bare.len() >= 3 && !dunder && self.idents.contains(bare)
    }

    /// `needle` occurs in the text not preceded by an identifier character and not
    /// followed by one.
    fn occurs(&self, needle: &str) -> bool {
        let bytes = self.text.as_bytes();
        let mut from = 0;
        while let Some(i) = self.text[from..].find(needle) {
            let s = from + i;
            let e = s + needle.len();
            let before = s == 0 || !is_ident_byte(bytes[s - 1]);
            let after = e == bytes.len() || !is_ident_byte(bytes[e]);
            if before && after {
                return true;
            }
            from = s + 1;
            while !self.text.is_char_boundary(from) {
                from += 1;
            }
        }
        false
    }

    fn path(&self, path: &str) -> bool {
        let comps: Vec<&str> = path.split('/').collect();
        let file = comps.last().copied().unwrap_or(path);
        for s in 0..comps.len().saturating_sub(1) {
            if self.occurs(&comps[s..].join("/")) {
                return true;
            }
        }
        if file != "__init__.py" && self.occurs(file) {
            return true;
        }
        let mut module: Vec<&str> = comps.clone();
        if let Some(last) = module.last_mut() {
            *last = last.strip_suffix(".py").unwrap_or(last);
        }
        if module.last() == Some(&"__init__") {
            module.pop();
        }
        (0..module.len().saturating_sub(1)).any(|s| self.chains.contains(&module[s..].join(".")))
    }
}

// ---------------------------------------------------------------------------------------
// Policy

/// The BM25 baseline policy (see the module documentation).
#[derive(Debug)]
pub struct Bm25 {
    cfg: Bm25Config,
    /// instance id -> (number of files of its index, the index, last use).
    cache: Mutex<HashMap<String, CacheEntry>>,
    clock: std::sync::atomic::AtomicU64,
}

type Slot = Arc<OnceLock<Arc<Bm25Index>>>;

#[derive(Debug)]
struct CacheEntry {
    n_files: usize,
    slot: Slot,
    used: u64,
}

impl Bm25 {
    /// A policy with validated settings.
    pub fn new(cfg: Bm25Config) -> Result<Bm25, PolicyError> {
        cfg.validate().map_err(PolicyError)?;
        Ok(Bm25 {
            cfg,
            cache: Mutex::new(HashMap::new()),
            clock: Default::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &Bm25Config {
        &self.cfg
    }

    /// The index of the request's repository, from the cache or built now (once, also
    /// when several requests of the same instance arrive together).
    pub fn index_for(&self, instance_id: &str, index: &RepoIndex) -> Arc<Bm25Index> {
        let slot = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let now = self
                .clock
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let fresh = || CacheEntry {
                n_files: index.files.len(),
                slot: Arc::new(OnceLock::new()),
                used: now,
            };
            let entry = cache.entry(instance_id.to_string()).or_insert_with(fresh);
            if entry.n_files != index.files.len() {
                *entry = fresh();
            }
            entry.used = now;
            let slot = entry.slot.clone();
            while cache.len() > self.cfg.cache_instances {
                let oldest = cache
                    .iter()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => cache.remove(&k),
                    None => break,
                };
            }
            slot
        };
        slot.get_or_init(|| Arc::new(Bm25Index::build(index, &self.cfg)))
            .clone()
    }

    /// Number of indexes in the cache.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn reply(&self, r: &TurnRequest<'_>) -> TurnReply {
        let cfg = &self.cfg;
        let query = &r.task.instance.problem_statement;
        let skip_tests = cfg.skip_tests;
        match r.stage {
            Stage::Search { .. } => TurnReply::text("exit()"),
            Stage::FileLevel => {
                let idx = self.index_for(&r.task.instance.instance_id, r.task.index);
                let top = idx.rank_files(
                    query,
                    cfg.mention_boost,
                    |p| !(skip_tests && is_test_path(p)),
                    cfg.top_k,
                );
                let files: Vec<String> = top.into_iter().map(|s| s.location).collect();
                TurnReply::text(format_answer(&files))
            }
            Stage::Summary => {
                let idx = self.index_for(&r.task.instance.instance_id, r.task.index);
                let cands = r.task.candidate_files;
                let top = idx.rank_definitions(
                    query,
                    cfg.mention_boost,
                    |p| {
                        if cands.is_empty() {
                            !(skip_tests && is_test_path(p))
                        } else {
                            cands.iter().any(|c| c == p)
                        }
                    },
                    cfg.top_k,
                );
                let locs: Vec<String> = top.into_iter().map(|s| s.location).collect();
                TurnReply::text(format_answer(&locs))
            }
        }
    }
}

impl Policy for Bm25 {
    fn name(&self) -> String {
        "bm25".into()
    }

    fn respond(&self, requests: &[TurnRequest<'_>]) -> Vec<Result<TurnReply, PolicyError>> {
        requests.par_iter().map(|r| Ok(self.reply(r))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::parse_answer;
    use crate::dataset::Instance;
    use crate::index::FileIndex;
    use crate::policy::TaskView;
    use crate::toolcall::parse_turn;

    fn toks(s: &str) -> Vec<String> {
        tokenize(s, 2)
    }

    #[test]
    fn tokeniser_splits_camel_snake_and_digits() {
        assert_eq!(
            toks("getHTTPResponseCode"),
            ["get", "http", "response", "code", "gethttpresponsecode"]
        );
        assert_eq!(
            toks("parse_config_file"),
            ["parse", "config", "file", "parse_config_file"]
        );
        assert_eq!(toks("__init__"), ["init"]);
        assert_eq!(
            toks("_private_helper"),
            ["private", "helper", "private_helper"]
        );
        // letter/digit boundaries; all-digit parts dropped, the segment kept
        assert_eq!(
            toks("utf8_decode"),
            ["utf", "utf8", "decode", "utf8_decode"]
        );
        assert_eq!(toks("x86_64"), ["x86", "x86_64"]);
        assert_eq!(toks("Vector3D"), ["vector", "vector3d"]);
        assert_eq!(toks("2024 42"), Vec::<String>::new());
        // separators, stop words and short tokens
        assert_eq!(
            toks("The self.value of a Matrix-like (x) is None!"),
            ["value", "matrix", "like"]
        );
        assert_eq!(toks("sympy/core/basic.py"), ["sympy", "core", "basic"]);
        // non-ASCII text separates tokens and never panics
        assert_eq!(toks("naïve résumé_ok"), ["na", "ve", "sum", "ok"]);
        assert_eq!(tokenize("ab abc", 3), ["abc"]);
    }

    fn small_repo() -> RepoIndex {
        RepoIndex::from_files(vec![
            // tokens: load config load_config parse config -> len 5
            FileIndex::parse("a.py", b"def load_config():\n    return parse(config)\n"),
            // tokens: render template -> len 2
            FileIndex::parse("b.py", b"def render():\n    return template\n"),
            // tokens: parser parse text text -> len 4
            FileIndex::parse(
                "c.py",
                b"class Parser:\n    def parse(self, text):\n        return text\n",
            ),
        ])
    }

    fn no_boost() -> Bm25Config {
        Bm25Config {
            mention_boost: 0.0,
            ..Bm25Config::default()
        }
    }

    /// BM25 of one term as a plain formula, independent of the implementation.
    fn term(tf: f64, df: f64, n: f64, len: f64, avgdl: f64) -> f64 {
        let (k1, b) = (1.2, 0.75);
        let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
        idf * tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * len / avgdl))
    }

    #[test]
    fn file_scores_match_the_formula_by_hand() {
        let idx = Bm25Index::build(&small_repo(), &no_boost());
        assert_eq!(idx.sizes(), (3, 4)); // load_config, render, Parser, Parser.parse
        let top = idx.rank_files("How to parse the config?", 0.0, |_| true, 5);
        // N = 3 files, lengths 5, 2, 4; avgdl = 11/3. Query terms: parse, config
        // ("how", "to", "the" are stop words). parse: df 2 (a.py, c.py); config: df 1.
        let avgdl = 11.0 / 3.0;
        let a = term(1.0, 2.0, 3.0, 5.0, avgdl) + term(2.0, 1.0, 3.0, 5.0, avgdl);
        let c = term(1.0, 2.0, 3.0, 4.0, avgdl);
        // Written out once: idf(config) = ln(1 + 2.5/1.5) = ln(8/3).
        let config_part =
            (8.0f64 / 3.0).ln() * 2.0 * 2.2 / (2.0 + 1.2 * (0.25 + 0.75 * 5.0 / avgdl));
        assert!((term(2.0, 1.0, 3.0, 5.0, avgdl) - config_part).abs() < 1e-12);
        assert_eq!(top.len(), 2, "b.py matches nothing: {top:?}");
        assert_eq!(top[0].location, "a.py");
        assert!((top[0].score - a).abs() < 1e-9, "{} vs {a}", top[0].score);
        assert_eq!(top[1].location, "c.py");
        assert!((top[1].score - c).abs() < 1e-9, "{} vs {c}", top[1].score);
    }

    #[test]
    fn definition_scores_match_the_formula_by_hand() {
        let idx = Bm25Index::build(&small_repo(), &no_boost());
        // Definition documents (name x3 + path + lines):
        //   a.py::load_config: (load config load_config) x3 + load config load_config
        //       parse config -> len 14; parse 1, config 5
        //   b.py::render: render x3 + render template -> len 5
        //   c.py::Parser: parser x3 + parser parse text text -> len 7; parse 1
        //   c.py::Parser.parse: (parser parse) x3 + parse text text -> len 9; parse 4
        // N = 4, avgdl = 35/4. parse: df 3; config: df 1.
        let top = idx.rank_definitions("parse", 0.0, |_| true, 5);
        let names: Vec<&str> = top.iter().map(|s| s.location.as_str()).collect();
        assert_eq!(
            names,
            ["c.py::Parser.parse", "c.py::Parser", "a.py::load_config"]
        );
        let avgdl = 35.0 / 4.0;
        let expect = [
            term(4.0, 3.0, 4.0, 9.0, avgdl),
            term(1.0, 3.0, 4.0, 7.0, avgdl),
            term(1.0, 3.0, 4.0, 14.0, avgdl),
        ];
        for (s, e) in top.iter().zip(expect) {
            assert!((s.score - e).abs() < 1e-9, "{s:?} vs {e}");
        }
        // Restricting the files keeps the whole-repository statistics.
        let only_a = idx.rank_definitions("parse", 0.0, |p| p == "a.py", 5);
        assert_eq!(only_a.len(), 1);
        assert!((only_a[0].score - expect[2]).abs() < 1e-9);
    }

    #[test]
    fn mentions_boost_named_documents() {
        let idx = Bm25Index::build(&small_repo(), &no_boost());
        let q = "parse fails in Parser.parse";
        let plain = idx.rank_definitions(q, 0.0, |_| true, 5);
        let boosted = idx.rank_definitions(q, 1.0, |_| true, 5);
        for (p, b) in plain.iter().zip(&boosted) {
            assert_eq!(p.location, b.location);
            // Parser.parse (qualified), Parser (identifier) named; load_config is not.
            let f = if p.location == "a.py::load_config" {
                1.0
            } else {
                2.0
            };
            assert!((b.score - f * p.score).abs() < 1e-9, "{p:?} {b:?}");
        }
        // A file path mentioned in the issue lifts it over a better lexical match.
        let q = "config parse parse, see c.py";
        assert_eq!(idx.rank_files(q, 0.0, |_| true, 1)[0].location, "a.py");
        assert_eq!(idx.rank_files(q, 10.0, |_| true, 1)[0].location, "c.py");
        let m = Mentions::new("see sympy/core/basic.py and sympy.polys.rings.PolyRing");
        assert!(m.path("sympy/core/basic.py"));
        assert!(m.path("core/basic.py"));
        assert!(m.path("lib/sympy/polys/rings.py"));
        assert!(m.path("polys/rings/__init__.py"));
        assert!(!m.path("sympy/core/basics.py"));
        assert!(!m.path("sympy/__init__.py"));
        assert!(m.names("rings.PolyRing"));
        assert!(m.names("Other.PolyRing"));
        assert!(!m.names("Other.__init__"));
        let m = Mentions::new("it calls Foo.__init__ twice");
        assert!(m.names("Foo.__init__"));
        assert!(!m.names("Bar.__init__"));
    }

    fn instance(problem: &str) -> Instance {
        Instance {
            instance_id: "test__repo-1".into(),
            repo: "test/repo".into(),
            base_commit: String::new(),
            problem_statement: problem.into(),
            patch: String::new(),
        }
    }

    fn request<'a>(
        inst: &'a Instance,
        index: &'a RepoIndex,
        cands: &'a [String],
        stage: Stage,
    ) -> TurnRequest<'a> {
        TurnRequest {
            task: TaskView {
                instance: inst,
                index,
                candidate_files: cands,
                gt: None,
            },
            stage,
            messages: &[],
            tools: &[],
            prompt_tokens: None,
            max_new_tokens: 100,
            seed: 0,
        }
    }

    #[test]
    fn stages_answer_files_exit_and_locations() {
        let mut files: Vec<FileIndex> = small_repo().files;
        files.push(FileIndex::parse(
            "tests/test_parse.py",
            b"def test_parse():\n    parse(config)\n    parse(config)\n    parse(config)\n",
        ));
        let repo = RepoIndex::from_files(files);
        let inst = instance("parse() breaks on config files");
        let policy = Bm25::new(Bm25Config::default()).unwrap();
        assert_eq!(policy.name(), "bm25");
        let none: Vec<String> = vec![];
        let cands = vec!["c.py".to_string(), "b.py".to_string()];
        let reqs = [
            request(&inst, &repo, &none, Stage::FileLevel),
            request(&inst, &repo, &none, Stage::Search { turn: 0 }),
            request(&inst, &repo, &cands, Stage::Summary),
            request(&inst, &repo, &none, Stage::Summary),
        ];
        let out: Vec<String> = policy
            .respond(&reqs)
            .into_iter()
            .map(|r| r.unwrap().text)
            .collect();
        let mut files = parse_answer(&out[0]).files;
        files.sort();
        assert_eq!(files, ["a.py", "c.py", "tests/test_parse.py"]);
        assert!(parse_turn(&out[1]).exit);
        assert_eq!(
            parse_answer(&out[2]).locations,
            ["c.py::Parser.parse", "c.py::Parser"]
        );
        let all = parse_answer(&out[3]).locations;
        assert!(
            all.contains(&"tests/test_parse.py::test_parse".to_string()),
            "{all:?}"
        );
        assert!(all.contains(&"a.py::load_config".to_string()), "{all:?}");
        // One index for the instance, reused by all four requests.
        assert_eq!(policy.cached(), 1);

        let skip = Bm25::new(Bm25Config {
            skip_tests: true,
            ..Bm25Config::default()
        })
        .unwrap();
        let out = skip.respond(&reqs[..1]).remove(0).unwrap().text;
        assert_eq!(parse_answer(&out).files, ["a.py", "c.py"]);
        let out = skip.respond(&reqs[3..]).remove(0).unwrap().text;
        assert!(!out.contains("tests/"), "{out}");

        // No match at all: an empty block.
        let inst = instance("zzz qqq");
        let out = policy.respond(&[request(&inst, &repo, &none, Stage::FileLevel)]);
        assert_eq!(out[0].as_ref().unwrap().text, "```\n```");
    }

    #[test]
    fn cache_reuses_and_evicts() {
        let repo = small_repo();
        let policy = Bm25::new(Bm25Config {
            cache_instances: 2,
            ..Bm25Config::default()
        })
        .unwrap();
        let a1 = policy.index_for("a", &repo);
        let a2 = policy.index_for("a", &repo);
        assert!(Arc::ptr_eq(&a1, &a2));
        policy.index_for("b", &repo);
        policy.index_for("a", &repo); // a is now the most recent
        policy.index_for("c", &repo); // evicts b
        assert_eq!(policy.cached(), 2);
        assert!(Arc::ptr_eq(&a1, &policy.index_for("a", &repo)));
        // A different index under the same id (file count changed) is rebuilt.
        let bigger = RepoIndex::from_files(vec![FileIndex::parse("z.py", b"x = 1\n")]);
        let z = policy.index_for("a", &bigger);
        assert_eq!(z.sizes(), (1, 0));
    }

    #[test]
    fn config_defaults_unknown_fields_and_validation() {
        let c: Bm25Config = serde_json::from_str(r#"{"k1": 1.5, "skip_tests": true}"#).unwrap();
        assert_eq!(c.k1, 1.5);
        assert_eq!(c.b, 0.75);
        assert!(c.skip_tests);
        let e = serde_json::from_str::<Bm25Config>(r#"{"k": 1.5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Bm25::new(Bm25Config {
            b: 1.5,
            ..Bm25Config::default()
        })
        .unwrap_err();
        assert!(e.0.contains("bm25.b"), "{e}");
        let e = Bm25::new(Bm25Config {
            top_k: 0,
            ..Bm25Config::default()
        })
        .unwrap_err();
        assert!(e.0.contains("bm25.top_k"), "{e}");
    }

    /// Timing on a real repository: `TOOLTRAIN_BM25_REPO=/path/to/root cargo test
    /// --release -p tooltrain-rollout bm25::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_on_a_real_repository() {
        let Ok(root) = std::env::var("TOOLTRAIN_BM25_REPO") else {
            eprintln!("set TOOLTRAIN_BM25_REPO to a repository root");
            return;
        };
        let t = std::time::Instant::now();
        let repo = RepoIndex::build(std::path::Path::new(&root));
        let t_parse = t.elapsed();
        let t = std::time::Instant::now();
        let idx = Bm25Index::build(&repo, &Bm25Config::default());
        let t_build = t.elapsed();
        let query = "Matrix determinant raises ZeroDivisionError for symbolic entries: \
            `Matrix([[a, b], [c, d]]).det(method='bareiss')` fails in _eval_det_bareiss, \
            see sympy/matrices/determinant.py";
        let t = std::time::Instant::now();
        let files = idx.rank_files(query, 0.5, |_| true, 5);
        let defs = idx.rank_definitions(query, 0.5, |_| true, 5);
        let t_query = t.elapsed();
        let (nf, nd) = idx.sizes();
        eprintln!(
            "{nf} files, {nd} definitions, {} terms: parse {t_parse:?}, bm25 build {t_build:?}, \
             two queries {t_query:?}\nfiles: {files:?}\ndefs: {defs:?}",
            idx.vocab.len()
        );
    }
}
