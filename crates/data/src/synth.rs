//! Seeded synthetic localisation tasks (`tooltrain synth`): small Python packages with a
//! planted bug, a GitHub-style bug report, the gold patch that fixes it and the
//! ground-truth locations, in the format of the real benchmark data (SWE-bench JSONL,
//! RepoDeepSearch `gt_verified.json`, one source tree per instance id), small enough that
//! a tiny model can learn the task on a CPU.
//!
//! A task is a function of `(config, seed, index)` only ([`make_task`]): the same inputs
//! give byte-identical output on every machine with this crate's locked dependencies (the
//! RNG is `rand`'s `StdRng`, whose stream may change with a `rand` major version).
//!
//! What a task holds:
//! - a package `<pkg>/` of `files` modules (word lists of 8 domains: inventory, billing,
//!   parsing, geometry, scheduling, shipping, weather, library), each with
//!   `classes_per_file` classes (`__init__`, sometimes `__repr__`, and
//!   `methods_per_class` methods) and `functions_per_file` module functions, plus
//!   `<pkg>/__init__.py` (re-exports), `<pkg>/errors.py`, `setup.py` and up to two
//!   `tests/test_<module>.py` files. Bodies come from 12 small recipes (limit check,
//!   case-insensitive lookup, required fields, wrap-around index, sum, percentage,
//!   `key=value` parsing, pagination, clamping, top-n, counting, average), each with a
//!   docstring and error messages that name the domain's nouns;
//! - `gt_min..=gt_max` planted one-line bugs, each in a different method or function;
//!   the gold patch replaces each buggy line by the original (3 lines of context, git
//!   headers, real blob ids), so [`tooltrain_rollout::gt::locations_from_patch`] derives exactly the
//!   ground truth (checked by [`check_task`] for every generated task);
//! - `decoys` definitions per task that look like a ground-truth location: the same
//!   method name in another class, the same class name in another module, the same
//!   function name in another module, or a similar name (`parse_zone_options` vs
//!   `parse_zone_options_strict`), usually with the same recipe, so the same error
//!   message shape;
//! - with probability `indirect_prob` per ground-truth location, the report calls a
//!   public wrapper in another module that calls the buggy code, so the location is
//!   one hop away from what the report names;
//! - the bug report: title, description, a reproduction snippet calling the public API
//!   with concrete arguments, expected vs actual result (the exception message that is
//!   literally in the buggy body, or the wrong value), an environment section. Each
//!   explicit pointer to the location (a module import path instead of a package-level
//!   import, a traceback whose frames name the file and function, a remark naming the
//!   file) appears with probability `mention_prob`.
//!
//! [`generate`] writes `dataset.jsonl`, `gt.json`, `config.json` and `repos/<instance_id>/`
//! into a temporary sibling directory and renames it into place.

use tooltrain_rollout::dataset::Instance;
use tooltrain_rollout::gt::{locations_from_patch, Location};
use tooltrain_rollout::index::{FileIndex, RepoIndex};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Generation settings (difficulty knobs). Loadable from JSON; unknown fields are
/// rejected, missing ones take the [`Default`] values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    /// Number of tasks.
    pub n: usize,
    /// Master seed; task `i` uses a seed derived from `(seed, i)`.
    pub seed: u64,
    /// Modules in the package (besides `__init__.py` and `errors.py`), 1..=10.
    pub files: usize,
    /// Classes per module.
    pub classes_per_file: usize,
    /// Methods per class, besides `__init__` (and sometimes `__repr__`).
    pub methods_per_class: usize,
    /// Module-level functions per module.
    pub functions_per_file: usize,
    /// Look-alike definitions added per task (spread over the GT locations).
    pub decoys: usize,
    /// Fewest ground-truth locations (planted bugs) per task.
    pub gt_min: usize,
    /// Most ground-truth locations per task.
    pub gt_max: usize,
    /// Probability of each explicit pointer to a GT location in the report (module
    /// import path, traceback frames, a remark naming the file).
    pub mention_prob: f64,
    /// Probability that the report calls a public wrapper in another module instead of
    /// the buggy definition itself.
    pub indirect_prob: f64,
    /// Owner part of `repo` and prefix of `instance_id` (`<prefix>__<pkg>-00042`).
    pub prefix: String,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            n: 100,
            seed: 0,
            files: 4,
            classes_per_file: 2,
            methods_per_class: 3,
            functions_per_file: 2,
            decoys: 2,
            gt_min: 1,
            gt_max: 2,
            mention_prob: 0.5,
            indirect_prob: 0.3,
            prefix: "synth".into(),
        }
    }
}

/// Most modules a package may have (the smallest domain module list).
pub const MAX_FILES: usize = 10;

impl SynthConfig {
    /// Checks the knobs; the message names the offending field.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |m: String| Err(SynthError::Config(m));
        if self.files == 0 || self.files > MAX_FILES {
            return bad(format!(
                "files must be in 1..={MAX_FILES}, got {}",
                self.files
            ));
        }
        if self.classes_per_file > 8 || self.methods_per_class > 12 || self.functions_per_file > 12
        {
            return bad(format!(
                "at most 8 classes_per_file, 12 methods_per_class and 12 functions_per_file \
                 (got {}, {}, {})",
                self.classes_per_file, self.methods_per_class, self.functions_per_file
            ));
        }
        if self.classes_per_file > 0 && self.methods_per_class == 0 {
            return bad("methods_per_class must be at least 1 when classes_per_file > 0".into());
        }
        let defs =
            self.files * (self.classes_per_file * self.methods_per_class + self.functions_per_file);
        if defs == 0 {
            return bad(
                "classes_per_file and functions_per_file are both 0: no definitions".into(),
            );
        }
        if self.gt_min == 0 || self.gt_min > self.gt_max || self.gt_max > 5 {
            return bad(format!(
                "need 1 <= gt_min <= gt_max <= 5, got gt_min {} gt_max {}",
                self.gt_min, self.gt_max
            ));
        }
        if self.gt_max > defs {
            return bad(format!(
                "gt_max {} exceeds the {defs} methods and functions a task has",
                self.gt_max
            ));
        }
        if self.decoys > 20 {
            return bad(format!("decoys must be at most 20, got {}", self.decoys));
        }
        for (name, p) in [
            ("mention_prob", self.mention_prob),
            ("indirect_prob", self.indirect_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1], got {p}"));
            }
        }
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.';
        if self.prefix.is_empty() || self.prefix.starts_with('.') || !self.prefix.chars().all(ok) {
            return bad(format!(
                "prefix must be non-empty, not start with '.', and use only [A-Za-z0-9_.-], got {:?}",
                self.prefix
            ));
        }
        Ok(())
    }
}

/// Error of [`generate`].
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synth config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Output(String),
    /// A generated task failed its self-check (a generator bug).
    #[error("task {id} failed its consistency check: {msg}")]
    Check { id: String, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One file of a task's repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Repository-relative path with `/` separators.
    pub path: String,
    pub text: String,
}

/// One generated task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// The dataset row (`instance_id`, `repo`, `base_commit`, `problem_statement`, `patch`).
    pub instance: Instance,
    /// Ground-truth locations `path.py::Class.method` / `path.py::function`, in the order
    /// [`locations_from_patch`] derives them (files by path, then by line).
    pub gt: Vec<String>,
    /// The repository at the base commit, sorted by path.
    pub files: Vec<SourceFile>,
    /// Look-alike definitions (`path.py::name`), for analysis.
    pub decoys: Vec<String>,
    /// The public callable the report uses for each GT location (`Class.method`,
    /// `function`, or a wrapper's name), in GT order.
    pub entry_points: Vec<String>,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub out_dir: PathBuf,
    pub tasks: usize,
    pub python_files: usize,
    pub gt_locations: usize,
    pub decoys: usize,
    pub mean_problem_chars: f64,
    pub mean_python_lines: f64,
}

// ---------------------------------------------------------------------------------------
// Word lists.

struct Domain {
    /// What a user of the package does with it (for the report's intro).
    activity: &'static str,
    packages: &'static [&'static str],
    modules: &'static [&'static str],
    classes: &'static [&'static str],
    /// Lower-case nouns with a plain `s` plural.
    nouns: &'static [&'static str],
    /// Numeric quantities (parameter and field names).
    measures: &'static [&'static str],
    /// String identifiers (parameter names).
    labels: &'static [&'static str],
    /// Words used as lookup keys, counted tags, option keys.
    keys: &'static [&'static str],
    error: &'static str,
}

#[rustfmt::skip]
const DOMAINS: &[Domain] = &[
    Domain {
        activity: "track stock levels across our warehouses",
        packages: &["stockroom", "shelfmate", "inventra"],
        modules: &["inventory", "warehouse", "orders", "suppliers", "catalog", "reports", "storage", "barcodes", "pricing", "transfers"],
        classes: &["Warehouse", "StockItem", "Order", "Supplier", "Shelf", "Catalog", "Shipment", "Ledger", "Bin", "Manifest"],
        nouns: &["item", "order", "pallet", "shipment", "supplier", "product", "crate", "bin"],
        measures: &["quantity", "weight", "units", "volume"],
        labels: &["sku", "code", "label"],
        keys: &["standard", "fragile", "bulk", "frozen", "hazardous", "oversized"],
        error: "StockError",
    },
    Domain {
        activity: "generate invoices for our customers",
        packages: &["ledgerly", "invoicer", "paytab"],
        modules: &["invoices", "payments", "accounts", "taxes", "currency", "discounts", "statements", "customers", "subscriptions", "refunds"],
        classes: &["Invoice", "Payment", "Account", "TaxRule", "Discount", "Statement", "Customer", "Subscription", "LineItem", "Refund"],
        nouns: &["invoice", "payment", "charge", "discount", "credit", "refund", "account", "voucher"],
        measures: &["amount", "price", "total", "balance"],
        labels: &["currency", "code", "reference"],
        keys: &["monthly", "yearly", "weekly", "trial", "premium", "basic"],
        error: "BillingError",
    },
    Domain {
        activity: "parse configuration and log files",
        packages: &["tokenix", "parsekit", "lexicon"],
        modules: &["lexer", "tokens", "grammar", "reader", "scanner", "config", "dates", "formats", "fields", "headers"],
        classes: &["Lexer", "Token", "Scanner", "Reader", "Grammar", "Field", "Header", "DateParser", "Record", "Schema"],
        nouns: &["token", "field", "header", "line", "date", "record", "column", "section"],
        measures: &["width", "offset", "length", "depth"],
        labels: &["name", "kind", "tag"],
        keys: &["integer", "string", "boolean", "datetime", "float", "symbol"],
        error: "ParseError",
    },
    Domain {
        activity: "compute layouts of 2D shapes",
        packages: &["polyform", "geomkit", "shapecraft"],
        modules: &["shapes", "vectors", "polygons", "transforms", "bounds", "grids", "points", "curves", "meshes", "projections"],
        classes: &["Point", "Vector", "Polygon", "Circle", "Rectangle", "BoundingBox", "Grid", "Transform", "Segment", "Mesh"],
        nouns: &["point", "vertex", "polygon", "edge", "segment", "shape", "tile", "triangle"],
        measures: &["distance", "radius", "area", "angle"],
        labels: &["name", "kind", "layer"],
        keys: &["square", "circle", "hexagon", "triangle", "ellipse", "diamond"],
        error: "GeometryError",
    },
    Domain {
        activity: "book meeting rooms and plan shifts",
        packages: &["timeslot", "agendum", "cronly"],
        modules: &["calendar", "events", "slots", "recurrence", "reminders", "timezones", "bookings", "rooms", "availability", "planner"],
        classes: &["Calendar", "Event", "Slot", "Booking", "Reminder", "Room", "Planner", "Recurrence", "Attendee", "Agenda"],
        nouns: &["event", "slot", "booking", "meeting", "reminder", "room", "shift", "session"],
        measures: &["duration", "minutes", "hours", "capacity"],
        labels: &["timezone", "name", "code"],
        keys: &["daily", "weekly", "monthly", "weekday", "weekend", "holiday"],
        error: "SchedulingError",
    },
    Domain {
        activity: "compute shipping rates for parcels",
        packages: &["parcelpost", "freightly", "shipwise"],
        modules: &["parcels", "routes", "carriers", "labels", "tracking", "rates", "zones", "customs", "packaging", "depots"],
        classes: &["Parcel", "Route", "Carrier", "Label", "Tracker", "RateTable", "Zone", "Depot", "Package", "Consignment"],
        nouns: &["parcel", "route", "carrier", "package", "zone", "label", "stop", "delivery"],
        measures: &["weight", "distance", "length", "cost"],
        labels: &["code", "country", "service"],
        keys: &["express", "economy", "standard", "overnight", "freight", "priority"],
        error: "ShippingError",
    },
    Domain {
        activity: "aggregate readings from our weather stations",
        packages: &["skywatch", "meteora", "climakit"],
        modules: &["stations", "readings", "forecast", "alerts", "units", "sensors", "history", "radar", "wind", "rainfall"],
        classes: &["Station", "Reading", "Forecast", "Alert", "Sensor", "Series", "RadarFrame", "WindProfile", "Gauge", "Observation"],
        nouns: &["reading", "station", "sensor", "sample", "alert", "forecast", "gust", "observation"],
        measures: &["temperature", "pressure", "humidity", "rainfall"],
        labels: &["unit", "station_id", "name"],
        keys: &["sunny", "cloudy", "rainy", "windy", "stormy", "foggy"],
        error: "WeatherError",
    },
    Domain {
        activity: "run the loans desk of a small library",
        packages: &["bookworm", "libris", "shelfie"],
        modules: &["books", "loans", "members", "catalog", "holds", "fines", "search", "authors", "branches", "circulation"],
        classes: &["Book", "Loan", "Member", "Catalog", "Hold", "Fine", "Author", "Branch", "Shelf", "Circulation"],
        nouns: &["book", "loan", "member", "hold", "fine", "copy", "title", "author"],
        measures: &["pages", "copies", "days", "fee"],
        labels: &["isbn", "code", "name"],
        keys: &["fiction", "poetry", "history", "science", "travel", "children"],
        error: "LibraryError",
    },
];

const CLASS_SUFFIXES: &[&str] = &[
    "Manager", "Store", "Registry", "Service", "Index", "Cache", "Builder", "View",
];
const WRAPPER_VERBS: &[&str] = &[
    "process", "handle", "submit", "run", "sync", "prepare", "export", "dispatch", "plan",
    "refresh",
];
const DECOY_SUFFIXES: &[&str] = &[
    "all", "safe", "strict", "legacy", "batch", "raw", "cached", "fast", "v2", "many",
];

fn pick<'a, T>(rng: &mut StdRng, xs: &'a [T]) -> &'a T {
    xs.choose(rng).expect("non-empty word list")
}

fn upper(s: &str) -> String {
    s.to_ascii_uppercase()
}

fn snake(class: &str) -> String {
    let mut out = String::new();
    for (i, c) in class.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `a word` / `an word`.
fn article(word: &str) -> String {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {word}")
    } else {
        format!("a {word}")
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

/// Python's `repr` of a float that holds an integer value (`3.0`).
fn py_float(v: i64) -> String {
    format!("{v}.0")
}

// ---------------------------------------------------------------------------------------
// Recipes: bodies with one plantable bug and the symptom it causes.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recipe {
    Limit,
    Lookup,
    Require,
    Index,
    Total,
    Rate,
    KvParse,
    Page,
    Clamp,
    Sort,
    Count,
    Avg,
}

const RECIPES: [Recipe; 12] = [
    Recipe::Limit,
    Recipe::Lookup,
    Recipe::Require,
    Recipe::Index,
    Recipe::Total,
    Recipe::Rate,
    Recipe::KvParse,
    Recipe::Page,
    Recipe::Clamp,
    Recipe::Sort,
    Recipe::Count,
    Recipe::Avg,
];

/// How a buggy call fails.
#[derive(Debug, Clone)]
enum Outcome {
    /// Returns this Python repr instead of the expected one.
    Value(String),
    /// Raises: exception name, its module for the traceback's last line (None for
    /// builtins), the message as Python prints it, the body line (0-based) that raises.
    Raises {
        exc: String,
        module: Option<String>,
        msg: String,
        line: usize,
    },
}

#[derive(Debug, Clone)]
struct Symptom {
    /// Title templates; `%API%` stands for the called API.
    titles: Vec<String>,
    /// Why the expected value is right (from the documented behaviour).
    explain: String,
    /// Arguments of the reproducing call (Python source).
    args: String,
    /// Python repr of the correct result.
    expected: String,
    outcome: Outcome,
}

#[derive(Debug, Clone)]
struct Bug {
    /// Body line (0-based) the bug replaces.
    line: usize,
    buggy: String,
    symptom: Symptom,
}

/// Module-level constants of a module under construction.
#[derive(Debug, Clone, Default)]
struct Consts {
    items: Vec<(String, String)>,
    uses_error: bool,
}

impl Consts {
    /// Adds `name = value` under the first free name of `names` (or `names[0]_N`) and
    /// returns the name used; an existing constant with the same value is shared.
    fn add(&mut self, names: &[String], value: String) -> String {
        for n in names {
            match self.items.iter().find(|(k, _)| k == n) {
                Some((_, v)) if *v == value => return n.clone(),
                Some(_) => continue,
                None => {
                    self.items.push((n.clone(), value));
                    return n.clone();
                }
            }
        }
        let mut k = 2;
        loop {
            let n = format!("{}_{k}", names[0]);
            if !self.items.iter().any(|(x, _)| *x == n) {
                self.items.push((n.clone(), value));
                return n;
            }
            k += 1;
        }
    }
}

#[derive(Debug, Clone)]
struct Body {
    name: String,
    params: Vec<String>,
    doc: String,
    lines: Vec<String>,
    bug: Bug,
    noun: String,
    measure: String,
}

fn titles(ts: &[String]) -> Vec<String> {
    ts.to_vec()
}

/// A fresh body of `recipe`; `hint` fixes the noun and measure (decoys of a GT).
fn build_body(
    rng: &mut StdRng,
    dom: &Domain,
    pkg: &str,
    recipe: Recipe,
    consts: &mut Consts,
    hint: Option<(&str, &str)>,
) -> Body {
    let noun = hint.map_or_else(|| pick(rng, dom.nouns).to_string(), |h| h.0.to_string());
    let m = hint.map_or_else(|| pick(rng, dom.measures).to_string(), |h| h.1.to_string());
    let (noun, m) = (noun.as_str(), m.as_str());
    let nouns = format!("{noun}s");
    let err = dom.error;
    let err_module = Some(format!("{pkg}.errors"));
    let q = |s: &str| format!("\"{s}\"");
    let (name, params, doc, lines, bug) = match recipe {
        Recipe::Limit => {
            let limit = rng.random_range(2..=20i64) * 5;
            let k = rng.random_range(2..=6i64);
            let c = consts.add(
                &[
                    format!("MAX_{}", upper(m)),
                    format!("MAX_{}_{}", upper(noun), upper(m)),
                ],
                limit.to_string(),
            );
            consts.uses_error = true;
            let verb = pick(
                rng,
                &[
                    "reserve", "allocate", "scale", "convert", "charge", "book", "request",
                ],
            );
            let lines = vec![
                format!("if {m} < 0:"),
                format!("    raise ValueError(\"{m} must not be negative\")"),
                format!("if {m} > {c}:"),
                format!("    raise {err}(\"{m} %s exceeds the maximum of %s\" % ({m}, {c}))"),
                format!("return {m} * {k}"),
            ];
            let symptom = Symptom {
                titles: titles(&[
                    format!("%API% rejects {} equal to the maximum", article(m)),
                    format!("%API% raises {err} when {m} is exactly {limit}"),
                    format!("Off-by-one in the {m} limit of %API%"),
                ]),
                explain: format!(
                    "The docstring says that values up to and including `{c}` ({limit}) are \
                     accepted, so {} of {limit} should work.",
                    article(m)
                ),
                args: limit.to_string(),
                expected: (limit * k).to_string(),
                outcome: Outcome::Raises {
                    exc: err.into(),
                    module: err_module,
                    msg: format!("{m} {limit} exceeds the maximum of {limit}"),
                    line: 3,
                },
            };
            (
                format!("{verb}_{noun}"),
                vec![m.to_string()],
                format!("Return ``{m}`` in base units; values up to and including ``{c}`` are accepted."),
                lines,
                Bug { line: 2, buggy: format!("if {m} >= {c}:"), symptom },
            )
        }
        Recipe::Lookup => {
            let p = pick(rng, dom.labels).to_string();
            let keys: Vec<&str> = dom.keys.sample(rng, 3).copied().collect();
            let base = rng.random_range(1..=9i64) * 10;
            let table: Vec<String> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| format!("\"{k}\": {}", base + i as i64))
                .collect();
            let t = consts.add(
                &[
                    format!("{}_{}S", upper(noun), upper(&p)),
                    format!("KNOWN_{}_{}S", upper(noun), upper(&p)),
                ],
                format!("{{{}}}", table.join(", ")),
            );
            let j = rng.random_range(0..keys.len());
            let key = keys[j];
            let cap = capitalise(key);
            let verb = pick(rng, &["lookup", "resolve", "find", "get"]);
            let lines = vec![
                format!("key = {p}.strip().lower()"),
                format!("if key not in {t}:"),
                format!("    raise KeyError(\"unknown {noun} {p}: %r\" % {p})"),
                format!("return {t}[key]"),
            ];
            let symptom = Symptom {
                titles: titles(&[
                    "%API% is case sensitive".to_string(),
                    format!("KeyError for a capitalised {noun} {p} in %API%"),
                    format!("%API% fails on '{cap}' but accepts '{key}'"),
                ]),
                explain: format!(
                    "{} {p}s are documented as case-insensitive, so `'{cap}'` should give the same result as `'{key}'`.",
                    capitalise(noun)
                ),
                args: q(&cap),
                expected: (base + j as i64).to_string(),
                outcome: Outcome::Raises {
                    exc: "KeyError".into(),
                    module: None,
                    msg: format!("\"unknown {noun} {p}: '{cap}'\""),
                    line: 2,
                },
            };
            (
                format!("{verb}_{noun}"),
                vec![p.clone()],
                format!(
                    "Return the numeric id of {} {p} (case-insensitive).",
                    article(noun)
                ),
                lines,
                Bug {
                    line: 0,
                    buggy: format!("key = {p}.strip()"),
                    symptom,
                },
            )
        }
        Recipe::Require => {
            let rec = pick(rng, &["record", "data", "payload", "fields"]).to_string();
            let r = consts.add(
                &[
                    format!("REQUIRED_{}_FIELDS", upper(noun)),
                    format!("{}_REQUIRED_KEYS", upper(noun)),
                ],
                format!("(\"id\", \"name\", \"{m}\")"),
            );
            consts.uses_error = true;
            let word = pick(rng, dom.keys);
            let v = rng.random_range(1..=50i64);
            let verb = pick(rng, &["validate", "check", "clean", "prepare", "normalize"]);
            let lines = vec![
                format!("missing = [key for key in {r} if key not in {rec}]"),
                "if missing:".to_string(),
                format!("    raise {err}(\"{noun} is missing required fields: %s\" % \", \".join(missing))"),
                format!("return dict({rec})"),
            ];
            let symptom = Symptom {
                titles: titles(&[
                    format!("%API% rejects {} whose id is 0", article(noun)),
                    "%API% treats falsy values as missing fields".to_string(),
                    format!("{err}: {noun} is missing required fields: id, although the id is set"),
                ]),
                explain: "The `id` field is present (it is `0`), so the record should be accepted and returned as is.".to_string(),
                args: format!("{{\"id\": 0, \"name\": \"{word}\", \"{m}\": {v}}}"),
                expected: format!("{{'id': 0, 'name': '{word}', '{m}': {v}}}"),
                outcome: Outcome::Raises {
                    exc: err.into(),
                    module: err_module,
                    msg: format!("{noun} is missing required fields: id"),
                    line: 2,
                },
            };
            (
                format!("{verb}_{noun}"),
                vec![rec.clone()],
                format!(
                    "Check that {} has every field of ``{r}`` and return a copy.",
                    article(noun)
                ),
                lines,
                Bug {
                    line: 0,
                    buggy: format!("missing = [key for key in {r} if not {rec}.get(key)]"),
                    symptom,
                },
            )
        }
        Recipe::Index => {
            let idx = pick(rng, &["index", "offset", "turn", "step"]).to_string();
            let words: Vec<&str> = dom.keys.sample(rng, 3).copied().collect();
            let i = rng.random_range(3..=8usize);
            let verb = pick(rng, &["pick", "select", "rotate", "cycle", "choose"]);
            let lines = vec![
                format!("if not {nouns}:"),
                format!("    raise IndexError(\"no {nouns} to choose from\")"),
                format!("slot = {idx} % len({nouns})"),
                format!("return {nouns}[slot]"),
            ];
            let list: Vec<String> = words.iter().map(|w| q(w)).collect();
            let symptom = Symptom {
                titles: titles(&[
                    format!("IndexError in %API% when the {idx} is past the end"),
                    "%API% does not wrap around".to_string(),
                    "%API% raises IndexError: list index out of range".to_string(),
                ]),
                explain: format!(
                    "The docstring says the {idx} wraps around past the end, so `{i}` should select `'{}'`.",
                    words[i % 3]
                ),
                args: format!("[{}], {i}", list.join(", ")),
                expected: format!("'{}'", words[i % 3]),
                outcome: Outcome::Raises {
                    exc: "IndexError".into(),
                    module: None,
                    msg: "list index out of range".into(),
                    line: 3,
                },
            };
            (
                format!("{verb}_{noun}"),
                vec![nouns.clone(), idx.clone()],
                format!(
                    "Return the {noun} at ``{idx}``, wrapping around past the end of ``{nouns}``."
                ),
                lines,
                Bug {
                    line: 2,
                    buggy: format!("slot = {idx}"),
                    symptom,
                },
            )
        }
        Recipe::Total => {
            let var = pick(rng, &["entry", "row", "rec", "each"]);
            let vals: Vec<i64> = (0..3).map(|_| rng.random_range(1..=20i64)).collect();
            let sum: i64 = vals.iter().sum();
            let verb = pick(rng, &["total", "sum", "accumulate"]);
            let lines = vec![
                "total = 0".to_string(),
                format!("for {var} in {nouns}:"),
                format!("    total += {var}[\"{m}\"]"),
                "return total".to_string(),
            ];
            let args: Vec<String> = vals.iter().map(|v| format!("{{\"{m}\": {v}}}")).collect();
            let symptom = Symptom {
                titles: titles(&[
                    format!("%API% ignores the first {noun}"),
                    format!("Wrong {m} total from %API%"),
                    "%API% is off by the first entry".to_string(),
                ]),
                explain: format!(
                    "It should add up the `{m}` of every {noun}: {} + {} + {} = {sum}.",
                    vals[0], vals[1], vals[2]
                ),
                args: format!("[{}]", args.join(", ")),
                expected: sum.to_string(),
                outcome: Outcome::Value((sum - vals[0]).to_string()),
            };
            (
                format!("{verb}_{m}"),
                vec![nouns.clone()],
                format!("Return the sum of the ``{m}`` of every entry of ``{nouns}``."),
                lines,
                Bug {
                    line: 1,
                    buggy: format!("for {var} in {nouns}[1:]:"),
                    symptom,
                },
            )
        }
        Recipe::Rate => {
            let pct = pick(rng, &["percent", "rate", "markup", "pct"]).to_string();
            let amount = rng.random_range(1..=9i64) * 100;
            let p = rng.random_range(1..=8i64) * 5;
            let verb = pick(rng, &["adjust", "increase", "markup", "inflate", "uplift"]);
            let lines = vec![
                format!("if not 0 <= {pct} <= 100:"),
                format!("    raise ValueError(\"{pct} must be between 0 and 100\")"),
                format!("factor = 1 + {pct} / 100"),
                format!("return round({m} * factor, 2)"),
            ];
            let expected = amount * (100 + p) / 100;
            let symptom = Symptom {
                titles: titles(&[
                    format!("%API% lowers the {m} instead of raising it"),
                    "Wrong sign in %API%".to_string(),
                    format!(
                        "%API%({amount}, {p}) returns {}",
                        py_float(amount * (100 - p) / 100)
                    ),
                ]),
                explain: format!(
                    "Adding {p}% to {amount} should give {}.",
                    py_float(expected)
                ),
                args: format!("{amount}, {p}"),
                expected: py_float(expected),
                outcome: Outcome::Value(py_float(amount * (100 - p) / 100)),
            };
            (
                format!("{verb}_{m}"),
                vec![m.to_string(), pct.clone()],
                format!("Return ``{m}`` increased by ``{pct}`` percent, rounded to cents."),
                lines,
                Bug {
                    line: 2,
                    buggy: format!("factor = 1 - {pct} / 100"),
                    symptom,
                },
            )
        }
        Recipe::KvParse => {
            let text = pick(rng, &["text", "spec", "raw", "line"]).to_string();
            let sep = *pick(rng, &[";", ","]);
            let ks: Vec<&str> = dom.keys.sample(rng, 2).copied().collect();
            let (v1, v2) = (rng.random_range(1..=9i64), rng.random_range(1..=9i64));
            let verb = pick(rng, &["parse", "read", "decode", "load"]);
            let suffix = pick(rng, &["options", "settings", "attrs", "params", "tags"]);
            let lines = vec![
                "result = {}".to_string(),
                format!("for chunk in {text}.split(\"{sep}\"):"),
                "    if not chunk.strip():".to_string(),
                "        continue".to_string(),
                "    key, _, value = chunk.partition(\"=\")".to_string(),
                "    result[key.strip()] = value.strip()".to_string(),
                "return result".to_string(),
            ];
            let symptom = Symptom {
                titles: titles(&[
                    "%API% keeps the leading space of keys".to_string(),
                    "%API% does not strip whitespace around keys".to_string(),
                    format!("KeyError after parsing {noun} {suffix} with %API%"),
                ]),
                explain: "Whitespace around keys should be ignored, as it is for values."
                    .to_string(),
                args: format!("\"{}={v1}{sep} {}={v2}\"", ks[0], ks[1]),
                expected: format!("{{'{}': '{v1}', '{}': '{v2}'}}", ks[0], ks[1]),
                outcome: Outcome::Value(format!("{{'{}': '{v1}', ' {}': '{v2}'}}", ks[0], ks[1])),
            };
            (
                format!("{verb}_{noun}_{suffix}"),
                vec![text.clone()],
                format!("Parse ``key=value`` pairs separated by ``{sep}`` into a dict."),
                lines,
                Bug {
                    line: 5,
                    buggy: "    result[key] = value.strip()".to_string(),
                    symptom,
                },
            )
        }
        Recipe::Page => {
            let size = pick(rng, &["size", "per_page", "limit"]).to_string();
            let s = rng.random_range(2..=4i64);
            let n = 2 * s + rng.random_range(1..=s);
            let verb = pick(rng, &["paginate", "page", "batch", "chunk"]);
            let lines = vec![
                "if page < 1:".to_string(),
                "    raise ValueError(\"page numbers start at 1\")".to_string(),
                format!("start = (page - 1) * {size}"),
                format!("return list({nouns})[start:start + {size}]"),
            ];
            let list = |a: i64, b: i64| {
                let v: Vec<String> = (a..=b).map(|x| x.to_string()).collect();
                format!("[{}]", v.join(", "))
            };
            let symptom = Symptom {
                titles: titles(&[
                    "%API% skips the first page".to_string(),
                    "Page 1 of %API% returns the second page".to_string(),
                    "Off-by-one in %API%".to_string(),
                ]),
                explain: format!(
                    "Pages are numbered from 1, so page 1 should start with the first {noun}."
                ),
                args: format!("list(range(1, {})), 1, {s}", n + 1),
                expected: list(1, s),
                outcome: Outcome::Value(list(s + 1, 2 * s)),
            };
            (
                format!("{verb}_{nouns}"),
                vec![nouns.clone(), "page".into(), size.clone()],
                format!(
                    "Return page ``page`` (1-based) of ``{nouns}``, ``{size}`` entries per page."
                ),
                lines,
                Bug {
                    line: 2,
                    buggy: format!("start = page * {size}"),
                    symptom,
                },
            )
        }
        Recipe::Clamp => {
            let lo = rng.random_range(0..=5i64);
            let hi = lo + 10 * rng.random_range(2..=9i64);
            let x = hi + rng.random_range(1..=20i64);
            let cmin = consts.add(
                &[
                    format!("MIN_{}", upper(m)),
                    format!("MIN_{}_{}", upper(noun), upper(m)),
                ],
                lo.to_string(),
            );
            let cmax = consts.add(
                &[
                    format!("MAX_{}", upper(m)),
                    format!("MAX_{}_{}", upper(noun), upper(m)),
                ],
                hi.to_string(),
            );
            let verb = pick(rng, &["clamp", "bound", "cap", "limit"]);
            let lines = vec![
                format!("low, high = {cmin}, {cmax}"),
                format!("if {m} < low:"),
                "    return low".to_string(),
                format!("if {m} > high:"),
                "    return high".to_string(),
                format!("return {m}"),
            ];
            let symptom = Symptom {
                titles: titles(&[
                    "%API% returns the minimum for values above the maximum".to_string(),
                    format!("%API%({x}) returns {lo}"),
                    format!("Clamping in %API% is wrong for large {m} values"),
                ]),
                explain: format!("Values above `{cmax}` ({hi}) should be clamped to {hi}."),
                args: x.to_string(),
                expected: hi.to_string(),
                outcome: Outcome::Value(lo.to_string()),
            };
            (
                format!("{verb}_{m}"),
                vec![m.to_string()],
                format!("Clamp ``{m}`` to the range ``{cmin}``..``{cmax}``."),
                lines,
                Bug {
                    line: 4,
                    buggy: "    return low".to_string(),
                    symptom,
                },
            )
        }
        Recipe::Sort => {
            let np = pick(rng, &["n", "count", "limit"]).to_string();
            let mut vals: Vec<i64> = Vec::new();
            while vals.len() < 3 {
                let v = rng.random_range(1..=30i64);
                if !vals.contains(&v) {
                    vals.push(v);
                }
            }
            let mut sorted = vals.clone();
            sorted.sort();
            // Not already in descending order, so the buggy result differs.
            if vals[0] == sorted[2] {
                vals.swap(0, 2);
            }
            let verb = pick(rng, &["top", "rank", "best", "leading"]);
            let lines = vec![
                format!("ranked = sorted({nouns}, key=lambda entry: entry[\"{m}\"], reverse=True)"),
                format!("return ranked[:{np}]"),
            ];
            let rec = |v: i64, quote: char| format!("{{{quote}{m}{quote}: {v}}}");
            let args: Vec<String> = vals.iter().map(|v| rec(*v, '"')).collect();
            let symptom = Symptom {
                titles: titles(&[
                    format!("%API% returns the lowest {m} first"),
                    "%API% sorts in the wrong order".to_string(),
                    format!("%API% ignores the {nouns} with the highest {m}"),
                ]),
                explain: format!(
                    "It should return the 2 {nouns} with the highest `{m}`, highest first."
                ),
                args: format!("[{}], 2", args.join(", ")),
                expected: format!("[{}, {}]", rec(sorted[2], '\''), rec(sorted[1], '\'')),
                outcome: Outcome::Value(format!(
                    "[{}, {}]",
                    rec(sorted[0], '\''),
                    rec(sorted[1], '\'')
                )),
            };
            (
                format!("{verb}_{nouns}"),
                vec![nouns.clone(), np.clone()],
                format!("Return the ``{np}`` {nouns} with the highest ``{m}``, highest first."),
                lines,
                Bug {
                    line: 0,
                    buggy: format!("ranked = sorted({nouns}, key=lambda entry: entry[\"{m}\"])"),
                    symptom,
                },
            )
        }
        Recipe::Count => {
            let var = pick(rng, &["name", "key", "tag", "kind"]).to_string();
            let ws: Vec<&str> = dom.keys.sample(rng, 2).copied().collect();
            let verb = pick(rng, &["count", "tally", "histogram"]);
            let lines = vec![
                "counts = {}".to_string(),
                format!("for {var} in {nouns}:"),
                format!("    counts[{var}] = counts.get({var}, 0) + 1"),
                "return counts".to_string(),
            ];
            let symptom = Symptom {
                titles: titles(&[
                    format!("%API% counts every {noun} once"),
                    format!("%API% returns 1 for repeated {nouns}"),
                    "Wrong counts from %API%".to_string(),
                ]),
                explain: format!("`'{}'` appears twice, so its count should be 2.", ws[0]),
                args: format!("[{}, {}, {}]", q(ws[0]), q(ws[1]), q(ws[0])),
                expected: format!("{{'{}': 2, '{}': 1}}", ws[0], ws[1]),
                outcome: Outcome::Value(format!("{{'{}': 1, '{}': 1}}", ws[0], ws[1])),
            };
            (
                format!("{verb}_{nouns}"),
                vec![nouns.clone()],
                format!("Count how many times each {noun} appears in ``{nouns}``."),
                lines,
                Bug {
                    line: 2,
                    buggy: format!("    counts[{var}] = 1"),
                    symptom,
                },
            )
        }
        Recipe::Avg => {
            let items = pick(rng, &["values", "samples", "readings", "series"]).to_string();
            let k = rng.random_range(1..=5i64);
            let a = rng.random_range(1..6 * k);
            let b = 6 * k - a;
            let verb = pick(rng, &["average", "mean", "typical"]);
            let lines = vec![
                format!("known = [v for v in {items} if v is not None]"),
                "if not known:".to_string(),
                "    return 0.0".to_string(),
                "return sum(known) / len(known)".to_string(),
            ];
            let symptom = Symptom {
                titles: titles(&[
                    "%API% counts missing values".to_string(),
                    format!("%API% is too low when {} is None", article(m)),
                    "None entries drag down %API%".to_string(),
                ]),
                explain: format!(
                    "Missing (`None`) values should be skipped, so the average of {a} and {b} is {}.",
                    py_float(3 * k)
                ),
                args: format!("[{a}, None, {b}]"),
                expected: py_float(3 * k),
                outcome: Outcome::Value(py_float(2 * k)),
            };
            (
                format!("{verb}_{m}"),
                vec![items.clone()],
                format!(
                    "Return the mean ``{m}`` of ``{items}``, ignoring missing (``None``) values."
                ),
                lines,
                Bug {
                    line: 3,
                    buggy: format!("return sum(known) / len({items})"),
                    symptom,
                },
            )
        }
    };
    Body {
        name,
        params,
        doc,
        lines,
        bug,
        noun: noun.to_string(),
        measure: m.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Repository model.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Plain,
    Special,
    Gt,
    Decoy,
    Wrapper,
}

#[derive(Debug, Clone)]
struct Def {
    id: usize,
    name: String,
    /// Parameters without `self`.
    params: Vec<String>,
    doc: String,
    lines: Vec<String>,
    recipe: Option<Recipe>,
    bug: Option<Bug>,
    /// The base commit has the bug (GT locations).
    planted: bool,
    role: Role,
    noun: String,
    measure: String,
}

impl Def {
    fn from_body(id: usize, b: Body, recipe: Recipe, role: Role) -> Def {
        Def {
            id,
            name: b.name,
            params: b.params,
            doc: b.doc,
            lines: b.lines,
            recipe: Some(recipe),
            bug: Some(b.bug),
            planted: false,
            role,
            noun: b.noun,
            measure: b.measure,
        }
    }
}

#[derive(Debug, Clone)]
struct Class {
    name: String,
    doc: String,
    methods: Vec<Def>,
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a few per task, built once
enum Item {
    Class(Class),
    Func(Def),
}

#[derive(Debug, Clone)]
struct Module {
    name: String,
    doc: String,
    consts: Consts,
    items: Vec<Item>,
}

impl Module {
    fn path(&self, pkg: &str) -> String {
        format!("{pkg}/{}.py", self.name)
    }
    fn class(&self, name: &str) -> Option<&Class> {
        self.items.iter().find_map(|it| match it {
            Item::Class(c) if c.name == name => Some(c),
            _ => None,
        })
    }
    fn top_names(&self) -> BTreeSet<String> {
        self.items
            .iter()
            .map(|it| match it {
                Item::Class(c) => c.name.clone(),
                Item::Func(f) => f.name.clone(),
            })
            .collect()
    }
}

/// Where a definition lives.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Site {
    module: usize,
    class: Option<String>,
}

struct Builder<'a> {
    rng: StdRng,
    dom: &'a Domain,
    pkg: String,
    modules: Vec<Module>,
    next_id: usize,
    /// Every class and def name created so far (base names stay unique repo-wide).
    used: BTreeSet<String>,
}

impl Builder<'_> {
    fn id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id
    }

    fn find(&self, id: usize) -> Option<(Site, &Def)> {
        for (mi, m) in self.modules.iter().enumerate() {
            for it in &m.items {
                match it {
                    Item::Func(f) if f.id == id => {
                        return Some((
                            Site {
                                module: mi,
                                class: None,
                            },
                            f,
                        ))
                    }
                    Item::Class(c) => {
                        if let Some(d) = c.methods.iter().find(|d| d.id == id) {
                            return Some((
                                Site {
                                    module: mi,
                                    class: Some(c.name.clone()),
                                },
                                d,
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }

    fn all_defs(&self) -> Vec<(Site, &Def)> {
        let mut out = Vec::new();
        for (mi, m) in self.modules.iter().enumerate() {
            for it in &m.items {
                match it {
                    Item::Func(f) => out.push((
                        Site {
                            module: mi,
                            class: None,
                        },
                        f,
                    )),
                    Item::Class(c) => {
                        for d in &c.methods {
                            out.push((
                                Site {
                                    module: mi,
                                    class: Some(c.name.clone()),
                                },
                                d,
                            ));
                        }
                    }
                }
            }
        }
        out
    }

    /// A recipe body with a name not used yet (`unique`) in the repository.
    fn fresh_body(&mut self, mi: usize, recipe: Recipe) -> Body {
        for _ in 0..20 {
            let mut consts = self.modules[mi].consts.clone();
            let b = build_body(
                &mut self.rng,
                self.dom,
                &self.pkg,
                recipe,
                &mut consts,
                None,
            );
            if !self.used.contains(&b.name) {
                self.used.insert(b.name.clone());
                self.modules[mi].consts = consts;
                return b;
            }
        }
        let b = build_body(
            &mut self.rng,
            self.dom,
            &self.pkg,
            recipe,
            &mut self.modules[mi].consts,
            None,
        );
        let mut k = 2;
        let mut name = format!("{}_{k}", b.name);
        while self.used.contains(&name) {
            k += 1;
            name = format!("{}_{k}", b.name);
        }
        self.used.insert(name.clone());
        Body { name, ..b }
    }

    fn fresh_class_name(&mut self) -> String {
        let mut avail: Vec<&str> = self
            .dom
            .classes
            .iter()
            .copied()
            .filter(|c| !self.used.contains(*c))
            .collect();
        avail.shuffle(&mut self.rng);
        let name = match avail.first() {
            Some(c) => c.to_string(),
            None => loop {
                let c = format!(
                    "{}{}",
                    pick(&mut self.rng, self.dom.classes),
                    pick(&mut self.rng, CLASS_SUFFIXES)
                );
                if !self.used.contains(&c) {
                    break c;
                }
            },
        };
        self.used.insert(name.clone());
        name
    }

    fn special_methods(&mut self, class: &str) -> Vec<Def> {
        let mut init_lines = vec![
            "self.name = name".to_string(),
            "self.options = dict(options)".to_string(),
        ];
        if self.rng.random_bool(0.5) {
            init_lines.push(format!(
                "self._{} = {{}}",
                pick(&mut self.rng, &["cache", "index", "seen", "pending"])
            ));
        }
        let id = self.id();
        let mut out = vec![Def {
            id,
            name: "__init__".into(),
            params: vec![format!("name=\"{}\"", snake(class)), "**options".into()],
            doc: format!(
                "Create {} called ``name``.",
                article(&snake(class).replace('_', " "))
            ),
            lines: init_lines,
            recipe: None,
            bug: None,
            planted: false,
            role: Role::Special,
            noun: String::new(),
            measure: String::new(),
        }];
        if self.rng.random_bool(0.4) {
            let id = self.id();
            out.push(Def {
                id,
                name: "__repr__".into(),
                params: vec![],
                doc: String::new(),
                lines: vec!["return \"%s(%r)\" % (type(self).__name__, self.name)".into()],
                recipe: None,
                bug: None,
                planted: false,
                role: Role::Special,
                noun: String::new(),
                measure: String::new(),
            });
        }
        out
    }

    fn class_doc(&mut self, name: &str) -> String {
        let noun = pick(&mut self.rng, self.dom.nouns);
        let t = self.rng.random_range(0..4);
        let words = snake(name).replace('_', " ");
        match t {
            0 => format!("Keep track of {noun}s for {}.", article(&words)),
            1 => format!(
                "{} and the operations on its {noun}s.",
                capitalise(&article(&words))
            ),
            2 => format!("Helpers around a single {words}."),
            _ => format!("High-level access to {noun} data of {}.", article(&words)),
        }
    }

    fn build_modules(&mut self, cfg: &SynthConfig) {
        let mut names: Vec<&str> = self.dom.modules.to_vec();
        names.shuffle(&mut self.rng);
        for name in names.into_iter().take(cfg.files) {
            let doc = match self.rng.random_range(0..3) {
                0 => format!("{} handling for {}.", capitalise(name), self.pkg),
                1 => format!("Functions and classes that deal with {name}."),
                _ => format!("The ``{name}`` part of {}.", self.pkg),
            };
            self.modules.push(Module {
                name: name.to_string(),
                doc,
                consts: Consts::default(),
                items: Vec::new(),
            });
        }
        for mi in 0..self.modules.len() {
            let mut items = Vec::new();
            for _ in 0..cfg.classes_per_file {
                let cname = self.fresh_class_name();
                let mut methods = self.special_methods(&cname);
                for _ in 0..cfg.methods_per_class {
                    let r = *pick(&mut self.rng, &RECIPES);
                    let b = self.fresh_body(mi, r);
                    let id = self.id();
                    methods.push(Def::from_body(id, b, r, Role::Plain));
                }
                let doc = self.class_doc(&cname);
                items.push(Item::Class(Class {
                    name: cname,
                    doc,
                    methods,
                }));
            }
            for _ in 0..cfg.functions_per_file {
                let r = *pick(&mut self.rng, &RECIPES);
                let b = self.fresh_body(mi, r);
                let id = self.id();
                items.push(Item::Func(Def::from_body(id, b, r, Role::Plain)));
            }
            items.shuffle(&mut self.rng);
            self.modules[mi].items = items;
        }
    }

    fn def_mut(&mut self, id: usize) -> &mut Def {
        for m in &mut self.modules {
            for it in &mut m.items {
                match it {
                    Item::Func(f) if f.id == id => return f,
                    Item::Class(c) => {
                        if let Some(d) = c.methods.iter_mut().find(|d| d.id == id) {
                            return d;
                        }
                    }
                    _ => {}
                }
            }
        }
        panic!("definition {id} not found")
    }

    /// Inserts a function into module `mi` at a random position.
    fn insert_func(&mut self, mi: usize, d: Def) {
        let n = self.modules[mi].items.len();
        let at = self.rng.random_range(0..=n);
        self.modules[mi].items.insert(at, Item::Func(d));
    }

    /// Inserts a method into class `class` of module `mi` after the special methods.
    fn insert_method(&mut self, mi: usize, class: &str, d: Def) {
        let lo_hi = {
            let c = self.modules[mi].class(class).expect("class exists");
            let lo = c
                .methods
                .iter()
                .take_while(|m| m.role == Role::Special)
                .count();
            (lo, c.methods.len())
        };
        let at = self.rng.random_range(lo_hi.0..=lo_hi.1);
        for it in &mut self.modules[mi].items {
            if let Item::Class(c) = it {
                if c.name == class {
                    c.methods.insert(at, d);
                    return;
                }
            }
        }
    }

    /// A decoy def like `gt` (same recipe with probability 0.7, same noun and measure),
    /// named `name`, with constants registered in module `mi`.
    fn decoy_def(&mut self, mi: usize, gt: &Def, name: String) -> Def {
        let recipe = if self.rng.random_bool(0.7) {
            gt.recipe.expect("GT has a recipe")
        } else {
            *pick(&mut self.rng, &RECIPES)
        };
        let b = build_body(
            &mut self.rng,
            self.dom,
            &self.pkg,
            recipe,
            &mut self.modules[mi].consts,
            Some((&gt.noun, &gt.measure)),
        );
        let id = self.id();
        let mut d = Def::from_body(id, b, recipe, Role::Decoy);
        d.name = name;
        d
    }

    fn similar_name(&mut self, name: &str, taken: &BTreeSet<String>) -> String {
        for _ in 0..30 {
            let cand = match self.rng.random_range(0..3) {
                0 => format!("{name}_{}", pick(&mut self.rng, DECOY_SUFFIXES)),
                1 => format!("_{name}"),
                _ => {
                    // Swap one word for another noun of the domain.
                    let parts: Vec<&str> = name.split('_').collect();
                    let k = self.rng.random_range(0..parts.len());
                    let w = pick(&mut self.rng, self.dom.nouns);
                    let mut p: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
                    p[k] = if parts[k].ends_with('s') {
                        format!("{w}s")
                    } else {
                        w.to_string()
                    };
                    p.join("_")
                }
            };
            if cand != name && !taken.contains(&cand) && !self.used.contains(&cand) {
                self.used.insert(cand.clone());
                return cand;
            }
        }
        let mut k = 2;
        loop {
            let cand = format!("{name}_{k}");
            if !taken.contains(&cand) && !self.used.contains(&cand) {
                self.used.insert(cand.clone());
                return cand;
            }
            k += 1;
        }
    }

    /// Adds one decoy of GT definition `gt_id`; returns its location key.
    fn add_decoy(&mut self, gt_id: usize) -> String {
        let (site, gt) = self.find(gt_id).expect("GT exists");
        let gt = gt.clone();
        let nmod = self.modules.len();
        let other_mods: Vec<usize> = (0..nmod).filter(|&m| m != site.module).collect();
        // Classes (module, name) other than the GT's that lack a method of that name.
        let mut other_classes: Vec<(usize, String)> = Vec::new();
        for (mi, m) in self.modules.iter().enumerate() {
            for it in &m.items {
                if let Item::Class(c) = it {
                    let same = Some(&c.name) == site.class.as_ref() && mi == site.module;
                    if !same && !c.methods.iter().any(|d| d.name == gt.name) {
                        other_classes.push((mi, c.name.clone()));
                    }
                }
            }
        }
        #[derive(Clone, Copy)]
        enum Kind {
            SameNameOtherClass,
            Similar,
            SameClassOtherModule,
            SameFunctionOtherModule,
        }
        let mut kinds = vec![Kind::Similar];
        if !other_classes.is_empty() {
            kinds.push(Kind::SameNameOtherClass);
        }
        if let Some(cls) = &site.class {
            if other_mods.iter().any(|&m| {
                self.modules[m].class(cls).is_none() && !self.modules[m].top_names().contains(cls)
            }) {
                kinds.push(Kind::SameClassOtherModule);
            }
        } else if other_mods
            .iter()
            .any(|&m| !self.modules[m].top_names().contains(&gt.name))
        {
            kinds.push(Kind::SameFunctionOtherModule);
        }
        let kind = *pick(&mut self.rng, &kinds);
        let pkg = self.pkg.clone();
        match kind {
            Kind::SameNameOtherClass => {
                let (mi, cname) = pick(&mut self.rng, &other_classes).clone();
                let d = self.decoy_def(mi, &gt, gt.name.clone());
                self.insert_method(mi, &cname, d);
                format!("{}::{cname}.{}", self.modules[mi].path(&pkg), gt.name)
            }
            Kind::SameClassOtherModule => {
                let cls = site.class.clone().expect("method GT");
                let cands: Vec<usize> = other_mods
                    .iter()
                    .copied()
                    .filter(|&m| {
                        self.modules[m].class(&cls).is_none()
                            && !self.modules[m].top_names().contains(&cls)
                    })
                    .collect();
                let mi = *pick(&mut self.rng, &cands);
                let mut methods = self.special_methods(&cls);
                let d = self.decoy_def(mi, &gt, gt.name.clone());
                methods.push(d);
                let doc = self.class_doc(&cls);
                let n = self.modules[mi].items.len();
                let at = self.rng.random_range(0..=n);
                self.modules[mi].items.insert(
                    at,
                    Item::Class(Class {
                        name: cls.clone(),
                        doc,
                        methods,
                    }),
                );
                format!("{}::{cls}.{}", self.modules[mi].path(&pkg), gt.name)
            }
            Kind::SameFunctionOtherModule => {
                let cands: Vec<usize> = other_mods
                    .iter()
                    .copied()
                    .filter(|&m| !self.modules[m].top_names().contains(&gt.name))
                    .collect();
                let mi = *pick(&mut self.rng, &cands);
                let d = self.decoy_def(mi, &gt, gt.name.clone());
                self.insert_func(mi, d);
                format!("{}::{}", self.modules[mi].path(&pkg), gt.name)
            }
            Kind::Similar => {
                // In the GT's own scope (class or module), or a random module.
                let mi = if self.rng.random_bool(0.6) || other_mods.is_empty() {
                    site.module
                } else {
                    *pick(&mut self.rng, &other_mods)
                };
                match (&site.class, mi == site.module) {
                    (Some(cls), true) => {
                        let taken: BTreeSet<String> = self.modules[mi]
                            .class(cls)
                            .map(|c| c.methods.iter().map(|d| d.name.clone()).collect())
                            .unwrap_or_default();
                        let name = self.similar_name(&gt.name, &taken);
                        let d = self.decoy_def(mi, &gt, name.clone());
                        self.insert_method(mi, cls, d);
                        format!("{}::{cls}.{name}", self.modules[mi].path(&pkg))
                    }
                    _ => {
                        let taken = self.modules[mi].top_names();
                        let name = self.similar_name(&gt.name, &taken);
                        let d = self.decoy_def(mi, &gt, name.clone());
                        self.insert_func(mi, d);
                        format!("{}::{name}", self.modules[mi].path(&pkg))
                    }
                }
            }
        }
    }

    /// Adds a public wrapper that calls GT `gt_id`; returns (module, wrapper id, body line
    /// of the call).
    fn add_wrapper(&mut self, gt_id: usize) -> (usize, usize, usize) {
        let (site, gt) = self.find(gt_id).expect("GT exists");
        let gt = gt.clone();
        let others: Vec<usize> = (0..self.modules.len())
            .filter(|&m| m != site.module)
            .collect();
        let mi = if others.is_empty() {
            site.module
        } else {
            *pick(&mut self.rng, &others)
        };
        let taken = self.modules[mi].top_names();
        let name = loop {
            let n = format!("{}_{}", pick(&mut self.rng, WRAPPER_VERBS), gt.noun);
            if !taken.contains(&n) && !self.used.contains(&n) {
                break n;
            }
            let n = format!("{n}_{}", pick(&mut self.rng, DECOY_SUFFIXES));
            if !taken.contains(&n) && !self.used.contains(&n) {
                break n;
            }
        };
        self.used.insert(name.clone());
        let args = gt.params.join(", ");
        let mut lines = Vec::new();
        if self.rng.random_bool(0.4) {
            let p = &gt.params[0];
            lines.push(format!("if {p} is None:"));
            lines.push(format!("    raise ValueError(\"{p} is required\")"));
        }
        let target = site.class.clone().unwrap_or_else(|| gt.name.clone());
        if mi != site.module {
            lines.push(format!(
                "from .{} import {target}",
                self.modules[site.module].name
            ));
            lines.push(String::new());
        }
        let call = match &site.class {
            Some(cls) => {
                let var = snake(cls);
                lines.push(format!("{var} = {cls}()"));
                format!("return {var}.{}({args})", gt.name)
            }
            None => format!("return {}({args})", gt.name),
        };
        let call_line = lines.len();
        lines.push(call);
        let doc = match self.rng.random_range(0..3) {
            0 => format!("Public entry point for {} handling.", gt.noun),
            1 => "Convenience wrapper used by the command line interface.".to_string(),
            _ => format!(
                "{} {} with the default settings.",
                capitalise(name.split('_').next().unwrap_or("handle")),
                article(&gt.noun)
            ),
        };
        let id = self.id();
        let d = Def {
            id,
            name,
            params: gt.params.clone(),
            doc,
            lines,
            recipe: None,
            bug: None,
            planted: false,
            role: Role::Wrapper,
            noun: gt.noun.clone(),
            measure: gt.measure.clone(),
        };
        self.insert_func(mi, d);
        (mi, id, call_line)
    }
}

// ---------------------------------------------------------------------------------------
// Rendering.

/// Source of one module; `planted` chooses the base (buggy) or fixed text. `starts`
/// receives the 1-based line of each definition's first body line.
fn render_module(
    dom: &Domain,
    m: &Module,
    planted: bool,
    starts: &mut BTreeMap<usize, usize>,
) -> String {
    let mut out: Vec<String> = vec![format!("\"\"\"{}\"\"\"", m.doc), String::new()];
    if m.consts.uses_error {
        out.push(format!("from .errors import {}", dom.error));
        out.push(String::new());
    }
    for (k, v) in &m.consts.items {
        out.push(format!("{k} = {v}"));
    }
    let render_def = |out: &mut Vec<String>,
                      d: &Def,
                      ind: &str,
                      method: bool,
                      starts: &mut BTreeMap<usize, usize>| {
        let mut params: Vec<String> = Vec::new();
        if method {
            params.push("self".into());
        }
        params.extend(d.params.iter().cloned());
        out.push(format!("{ind}def {}({}):", d.name, params.join(", ")));
        if !d.doc.is_empty() {
            out.push(format!("{ind}    \"\"\"{}\"\"\"", d.doc));
        }
        starts.insert(d.id, out.len() + 1);
        for (i, l) in d.lines.iter().enumerate() {
            let l = match &d.bug {
                Some(b) if planted && d.planted && b.line == i => &b.buggy,
                _ => l,
            };
            out.push(if l.is_empty() {
                String::new()
            } else {
                format!("{ind}    {l}")
            });
        }
    };
    for it in &m.items {
        out.push(String::new());
        out.push(String::new());
        match it {
            Item::Func(d) => render_def(&mut out, d, "", false, starts),
            Item::Class(c) => {
                out.push(format!("class {}:", c.name));
                out.push(format!("    \"\"\"{}\"\"\"", c.doc));
                for d in &c.methods {
                    out.push(String::new());
                    render_def(&mut out, d, "    ", true, starts);
                }
            }
        }
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

// ---------------------------------------------------------------------------------------
// Hashes and diffs.

/// SHA-1 (FIPS 180-1) of `data`.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, wi) in w.iter_mut().take(16).enumerate() {
            *wi = u32::from_be_bytes([
                chunk[4 * i],
                chunk[4 * i + 1],
                chunk[4 * i + 2],
                chunk[4 * i + 3],
            ]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Git's blob id of `text`.
fn blob_id(text: &str) -> String {
    let mut data = format!("blob {}\0", text.len()).into_bytes();
    data.extend_from_slice(text.as_bytes());
    hex(&sha1(&data))
}

/// A git-style unified diff (3 lines of context) of `old` -> `new`, two texts with the
/// same number of lines that differ by line replacements only.
fn unified_diff(path: &str, old: &str, new: &str) -> String {
    let a: Vec<&str> = old.strip_suffix('\n').unwrap_or(old).split('\n').collect();
    let b: Vec<&str> = new.strip_suffix('\n').unwrap_or(new).split('\n').collect();
    assert_eq!(a.len(), b.len(), "line replacements only");
    let changed: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    let mut out = format!(
        "diff --git a/{path} b/{path}\nindex {}..{} 100644\n--- a/{path}\n+++ b/{path}\n",
        &blob_id(old)[..7],
        &blob_id(new)[..7]
    );
    // Hunks: ranges [s, e) around runs of changes, merged when their context touches.
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &c in &changed {
        let (s, e) = (c.saturating_sub(3), (c + 4).min(a.len()));
        match hunks.last_mut() {
            Some(h) if s <= h.1 => h.1 = e,
            _ => hunks.push((s, e)),
        }
    }
    for (s, e) in hunks {
        // Git's default hunk heading: the last line before the hunk that starts with a
        // letter, `_` or `$`.
        let heading = a[..s]
            .iter()
            .rev()
            .find(|l| l.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '$'))
            .map(|l| format!(" {}", l.trim_end()))
            .unwrap_or_default();
        out.push_str(&format!(
            "@@ -{},{} +{},{} @@{heading}\n",
            s + 1,
            e - s,
            s + 1,
            e - s
        ));
        let mut i = s;
        while i < e {
            if a[i] == b[i] {
                out.push_str(&format!(" {}\n", a[i]));
                i += 1;
            } else {
                let mut j = i;
                while j < e && a[j] != b[j] {
                    j += 1;
                }
                for l in &a[i..j] {
                    out.push_str(&format!("-{l}\n"));
                }
                for l in &b[i..j] {
                    out.push_str(&format!("+{l}\n"));
                }
                i = j;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The bug report.

struct GtView {
    path: String,
    module: String,
    class: Option<String>,
    name: String,
    symptom: Symptom,
    /// 1-based line (base file) of the raising statement, for exception outcomes.
    raise_line: Option<(usize, String)>,
    wrapper: Option<WrapperView>,
}

struct WrapperView {
    path: String,
    module: String,
    name: String,
    call_line: usize,
    call_text: String,
}

/// The called API for a GT: (import lines, setup lines, call expression, display name).
fn call_for_gt(
    rng: &mut StdRng,
    pkg: &str,
    g: &GtView,
    mention: bool,
) -> (Vec<String>, Vec<String>, String, String) {
    let (module, class, name) = match &g.wrapper {
        Some(w) => (w.module.as_str(), None, w.name.as_str()),
        None => (g.module.as_str(), g.class.as_deref(), g.name.as_str()),
    };
    let top = class.unwrap_or(name);
    let (import, qual) = if mention {
        (format!("from {pkg}.{module} import {top}"), top.to_string())
    } else if rng.random_bool(0.5) {
        (format!("from {pkg} import {top}"), top.to_string())
    } else {
        (format!("import {pkg}"), format!("{pkg}.{top}"))
    };
    let args = &g.symptom.args;
    match class {
        Some(cls) => {
            let var = snake(cls);
            (
                vec![import],
                vec![format!("{var} = {qual}()")],
                format!("{var}.{name}({args})"),
                format!("{cls}.{name}()"),
            )
        }
        None => (
            vec![import],
            vec![],
            format!("{qual}({args})"),
            format!("{name}()"),
        ),
    }
}

fn site_packages(rng: &mut StdRng, minor: u32) -> String {
    match rng.random_range(0..3) {
        0 => format!("/home/dev/.venv/lib/python3.{minor}/site-packages"),
        1 => format!("/usr/local/lib/python3.{minor}/site-packages"),
        _ => format!("/opt/conda/lib/python3.{minor}/site-packages"),
    }
}

fn exc_line(outcome: &Outcome, qualified: bool) -> String {
    match outcome {
        Outcome::Raises {
            exc, module, msg, ..
        } => match (module, qualified) {
            (Some(m), true) => format!("{m}.{exc}: {msg}"),
            _ => format!("{exc}: {msg}"),
        },
        Outcome::Value(v) => v.clone(),
    }
}

/// One symptom: (script or REPL block, expected prose, actual prose, display API).
fn describe(
    rng: &mut StdRng,
    pkg: &str,
    g: &GtView,
    mention_prob: f64,
    repl: bool,
    py_minor: u32,
) -> (String, String, String, String) {
    let mention = rng.random_bool(mention_prob);
    let (imports, setup, expr, api) = call_for_gt(rng, pkg, g, mention);
    let traceback =
        matches!(g.symptom.outcome, Outcome::Raises { .. }) && rng.random_bool(mention_prob);
    let sp = site_packages(rng, py_minor);
    let frames = |first: String| -> String {
        let mut t = format!("Traceback (most recent call last):\n{first}");
        if let Some(w) = &g.wrapper {
            t.push_str(&format!(
                "  File \"{sp}/{}\", line {}, in {}\n    {}\n",
                w.path, w.call_line, w.name, w.call_text
            ));
        }
        if let Some((line, text)) = &g.raise_line {
            t.push_str(&format!(
                "  File \"{sp}/{}\", line {line}, in {}\n    {text}\n",
                g.path, g.name
            ));
        }
        t.push_str(&exc_line(&g.symptom.outcome, true));
        t
    };
    let block;
    let actual;
    if repl {
        let mut b = String::from("```pycon\n");
        for l in imports.iter().chain(&setup) {
            b.push_str(&format!(">>> {l}\n"));
        }
        b.push_str(&format!(">>> {expr}\n"));
        match &g.symptom.outcome {
            Outcome::Value(v) => {
                b.push_str(v);
                actual = format!("It returns `{v}`.");
            }
            Outcome::Raises { .. } if traceback => {
                b.push_str(&frames(
                    "  File \"<stdin>\", line 1, in <module>\n".to_string(),
                ));
                actual = "It raises the exception above.".to_string();
            }
            Outcome::Raises { .. } => {
                b.push_str(&exc_line(&g.symptom.outcome, false));
                actual = format!("It raises `{}`.", exc_line(&g.symptom.outcome, false));
            }
        }
        b.push_str("\n```");
        block = b;
    } else {
        let mut lines: Vec<String> = imports.clone();
        lines.push(String::new());
        lines.extend(setup.iter().cloned());
        let call = format!("print({expr})");
        lines.push(call.clone());
        let call_no = lines.len();
        block = format!("```python\n{}\n```", lines.join("\n"));
        actual = match &g.symptom.outcome {
            Outcome::Value(v) => format!("It prints `{v}`."),
            Outcome::Raises { .. } if traceback => {
                let tb = frames(format!(
                    "  File \"repro.py\", line {call_no}, in <module>\n    {call}\n"
                ));
                format!("Running it fails with:\n\n```\n{tb}\n```")
            }
            Outcome::Raises { .. } => {
                format!("It fails with `{}`.", exc_line(&g.symptom.outcome, false))
            }
        };
    }
    let call_disp = if expr.len() <= 60 {
        format!("`{expr}`")
    } else {
        format!("`{api}`")
    };
    let mut expected = format!(
        "{call_disp} should return `{}`. {}",
        g.symptom.expected, g.symptom.explain
    );
    if matches!(g.symptom.outcome, Outcome::Value(_)) && rng.random_bool(mention_prob) {
        let def = match &g.class {
            Some(c) => format!("{c}.{}", g.name),
            None => g.name.clone(),
        };
        expected.push_str(&match rng.random_range(0..2) {
            0 => format!(" I think the problem is in `{def}` in `{}`.", g.path),
            _ => format!(
                " Looking at `{}`, `{def}` seems to be where it goes wrong.",
                g.path
            ),
        });
    }
    (block, expected, actual, api)
}

fn problem_statement(
    rng: &mut StdRng,
    dom: &Domain,
    pkg: &str,
    gts: &[GtView],
    cfg: &SynthConfig,
) -> String {
    let style = rng.random_range(0..3);
    let repl = style == 2 || rng.random_bool(0.25);
    let py_minor = rng.random_range(8..=12u32);
    let (block, expected, actual, api) =
        describe(rng, pkg, &gts[0], cfg.mention_prob, repl, py_minor);
    let api_disp = if rng.random_bool(0.6) {
        format!("`{api}`")
    } else {
        api.trim_end_matches("()").to_string()
    };
    let mut title = pick(rng, &gts[0].symptom.titles).replace("%API%", &api_disp);
    title = match rng.random_range(0..6) {
        0 => format!("[BUG] {title}"),
        1 => format!("Bug: {title}"),
        _ => title,
    };
    let intro = match rng.random_range(0..5) {
        0 => format!("I'm using {pkg} to {} and ran into the following.", dom.activity),
        1 => format!("Hi! We use {pkg} to {}. After upgrading, one of our jobs started giving wrong results.", dom.activity),
        2 => format!("While trying to {} with {pkg} I hit what looks like a bug in `{}`.", dom.activity, api.trim_end_matches("()")),
        3 => format!("Thanks for {pkg}! I found a problem with `{api}`."),
        _ => format!("`{api}` does not behave as documented."),
    };
    let env = format!(
        "- {pkg} {}.{}.{}\n- Python 3.{}.{}\n- {}",
        rng.random_range(0..3),
        rng.random_range(1..20),
        rng.random_range(0..10),
        py_minor,
        rng.random_range(0..15),
        pick(
            rng,
            &[
                "Ubuntu 22.04",
                "macOS 14.4",
                "Windows 11",
                "Debian 12",
                "Fedora 39"
            ]
        )
    );
    let mut extra = String::new();
    for g in &gts[1..] {
        let (b, e, a, api2) = describe(rng, pkg, g, cfg.mention_prob, true, py_minor);
        let lead = match rng.random_range(0..3) {
            0 => format!("While looking into this I also noticed that `{api2}` is wrong:"),
            1 => format!("Possibly related: `{api2}` has a similar problem."),
            _ => format!("There is a second issue with `{api2}`:"),
        };
        extra.push_str(&format!("{lead}\n\n{b}\n\n{a} {e}\n\n"));
    }
    let mut s = match style {
        0 => format!(
            "{title}\n\n{intro}\n\n### Steps to reproduce\n\n{block}\n\n### Expected behaviour\n\n{expected}\n\n### Actual behaviour\n\n{actual}\n\n{extra}### Environment\n\n{env}\n"
        ),
        1 => format!(
            "{title}\n\n**Describe the bug**\n{intro}\n\n**To Reproduce**\n{block}\n\n**Expected behavior**\n{expected}\n\n**Actual behavior**\n{actual}\n\n{extra}**Versions**\n{env}\n"
        ),
        _ => format!("{title}\n\n{intro}\n\n{block}\n\n{actual} {expected}\n\n{extra}{env}\n"),
    };
    while s.contains("\n\n\n") {
        s = s.replace("\n\n\n", "\n\n");
    }
    s
}

// ---------------------------------------------------------------------------------------
// Tasks.

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn task_rng(seed: u64, i: usize) -> StdRng {
    StdRng::seed_from_u64(splitmix64(splitmix64(seed) ^ (i as u64)))
}

fn test_file(b: &Builder, mi: usize) -> Option<String> {
    let m = &b.modules[mi];
    let mut imports: BTreeSet<String> = BTreeSet::new();
    let mut tests: Vec<String> = Vec::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    for it in &m.items {
        let (class, defs): (Option<&str>, Vec<&Def>) = match it {
            Item::Func(d) => (None, vec![d]),
            Item::Class(c) => (Some(c.name.as_str()), c.methods.iter().collect()),
        };
        for d in defs {
            let Some(bug) = &d.bug else { continue };
            if d.planted || tests.len() >= 3 || d.name.starts_with('_') {
                continue;
            }
            let s = &bug.symptom;
            let base = format!("test_{}", d.name);
            let mut tn = base.clone();
            let mut k = 2;
            while names.contains(&tn) {
                tn = format!("{base}_{k}");
                k += 1;
            }
            names.insert(tn.clone());
            let t = match class {
                Some(c) => {
                    imports.insert(c.to_string());
                    let var = snake(c);
                    format!(
                        "def {tn}():\n    {var} = {c}()\n    assert {var}.{}({}) == {}\n",
                        d.name, s.args, s.expected
                    )
                }
                None => {
                    imports.insert(d.name.clone());
                    format!(
                        "def {tn}():\n    assert {}({}) == {}\n",
                        d.name, s.args, s.expected
                    )
                }
            };
            tests.push(t);
        }
    }
    if tests.is_empty() {
        return None;
    }
    let imports: Vec<String> = imports.into_iter().collect();
    Some(format!(
        "\"\"\"Tests for {}.{}.\"\"\"\n\nfrom {}.{} import {}\n\n\n{}",
        b.pkg,
        m.name,
        b.pkg,
        m.name,
        imports.join(", "),
        tests.join("\n\n")
    ))
}

/// Task `i` of `cfg` (pure: depends on `cfg.seed`, `i` and the knobs, not on `cfg.n`).
/// `cfg` must be valid ([`SynthConfig::validate`]).
pub fn make_task(cfg: &SynthConfig, i: usize) -> Task {
    let mut rng = task_rng(cfg.seed, i);
    let dom = pick(&mut rng, DOMAINS);
    let pkg = pick(&mut rng, dom.packages).to_string();
    let mut b = Builder {
        rng,
        dom,
        pkg: pkg.clone(),
        modules: Vec::new(),
        next_id: 0,
        used: BTreeSet::new(),
    };
    b.used.insert(dom.error.to_string());
    b.build_modules(cfg);

    // Ground truth: distinct recipe definitions.
    let mut cands: Vec<usize> = b
        .all_defs()
        .iter()
        .filter(|(_, d)| d.recipe.is_some())
        .map(|(_, d)| d.id)
        .collect();
    cands.shuffle(&mut b.rng);
    let g = b.rng.random_range(cfg.gt_min..=cfg.gt_max).min(cands.len());
    let gt_ids: Vec<usize> = cands[..g].to_vec();
    for &id in &gt_ids {
        let d = b.def_mut(id);
        d.planted = true;
        d.role = Role::Gt;
    }
    let mut wrappers: BTreeMap<usize, (usize, usize, usize)> = BTreeMap::new();
    for &id in &gt_ids {
        if b.rng.random_bool(cfg.indirect_prob) {
            wrappers.insert(id, b.add_wrapper(id));
        }
    }
    let mut decoys = Vec::new();
    for k in 0..cfg.decoys {
        decoys.push(b.add_decoy(gt_ids[k % gt_ids.len()]));
    }

    // Render base and fixed trees.
    let mut files: Vec<SourceFile> = Vec::new();
    let mut patch = String::new();
    let mut starts: BTreeMap<usize, usize> = BTreeMap::new();
    let mut texts: BTreeMap<usize, String> = BTreeMap::new();
    let mut order: Vec<usize> = (0..b.modules.len()).collect();
    order.sort_by(|&x, &y| b.modules[x].name.cmp(&b.modules[y].name));
    for &mi in &order {
        let m = &b.modules[mi];
        let base = render_module(dom, m, true, &mut starts);
        let fixed = render_module(dom, m, false, &mut BTreeMap::new());
        if base != fixed {
            patch.push_str(&unified_diff(&m.path(&pkg), &base, &fixed));
        }
        texts.insert(mi, base.clone());
        files.push(SourceFile {
            path: m.path(&pkg),
            text: base,
        });
    }

    // GT keys in patch order: files by path, then by line.
    let mut gt_sorted: Vec<(String, usize, String)> = Vec::new();
    let mut views: BTreeMap<usize, GtView> = BTreeMap::new();
    for &id in &gt_ids {
        let (site, d) = b.find(id).expect("GT exists");
        let m = &b.modules[site.module];
        let path = m.path(&pkg);
        let bug = d.bug.as_ref().expect("GT has a bug");
        let start = starts[&id];
        let key = match &site.class {
            Some(c) => format!("{path}::{c}.{}", d.name),
            None => format!("{path}::{}", d.name),
        };
        gt_sorted.push((path.clone(), start + bug.line, key));
        let raise_line = match &bug.symptom.outcome {
            Outcome::Raises { line, .. } => {
                let text = texts[&site.module]
                    .split('\n')
                    .nth(start + line - 1)
                    .unwrap_or("")
                    .trim()
                    .to_string();
                Some((start + line, text))
            }
            Outcome::Value(_) => None,
        };
        let wrapper = wrappers.get(&id).map(|&(wmi, wid, call)| {
            let wm = &b.modules[wmi];
            let line = starts[&wid] + call;
            WrapperView {
                path: wm.path(&pkg),
                module: wm.name.clone(),
                name: b.find(wid).expect("wrapper exists").1.name.clone(),
                call_line: line,
                call_text: texts[&wmi]
                    .split('\n')
                    .nth(line - 1)
                    .unwrap_or("")
                    .trim()
                    .to_string(),
            }
        });
        views.insert(
            id,
            GtView {
                path,
                module: m.name.clone(),
                class: site.class.clone(),
                name: d.name.clone(),
                symptom: bug.symptom.clone(),
                raise_line,
                wrapper,
            },
        );
    }
    gt_sorted.sort();
    let gt: Vec<String> = gt_sorted.iter().map(|(_, _, k)| k.clone()).collect();

    // The report follows the random GT order (the first is the headline symptom).
    let gviews: Vec<GtView> = gt_ids
        .iter()
        .map(|id| views.remove(id).expect("view"))
        .collect();
    let problem = problem_statement(&mut b.rng, dom, &pkg, &gviews, cfg);
    let entry_by_key: BTreeMap<String, String> = gt_ids
        .iter()
        .zip(&gviews)
        .map(|(id, v)| {
            let (site, d) = b.find(*id).expect("GT");
            let key = match &site.class {
                Some(c) => format!("{}::{c}.{}", v.path, d.name),
                None => format!("{}::{}", v.path, d.name),
            };
            let entry = match (&v.wrapper, &v.class) {
                (Some(w), _) => w.name.clone(),
                (None, Some(c)) => format!("{c}.{}", v.name),
                (None, None) => v.name.clone(),
            };
            (key, entry)
        })
        .collect();
    let entry_points = gt.iter().map(|k| entry_by_key[k].clone()).collect();

    // Package files besides the modules.
    let mut exports: Vec<(String, String)> = Vec::new(); // (module, name)
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut priority: Vec<(usize, String)> = Vec::new();
    for v in &gviews {
        match &v.wrapper {
            Some(w) => priority.push((
                b.modules
                    .iter()
                    .position(|m| m.name == w.module)
                    .expect("module"),
                w.name.clone(),
            )),
            None => priority.push((
                b.modules
                    .iter()
                    .position(|m| m.name == v.module)
                    .expect("module"),
                v.class.clone().unwrap_or_else(|| v.name.clone()),
            )),
        }
    }
    for &mi in &order {
        for n in b.modules[mi].top_names() {
            priority.push((mi, n));
        }
    }
    for (mi, n) in priority {
        if !n.starts_with('_') && seen.insert(n.clone()) {
            exports.push((b.modules[mi].name.clone(), n));
        }
    }
    let mut init = format!("\"\"\"{pkg}: helpers to {}.\"\"\"\n\n", dom.activity);
    init.push_str(&format!("from .errors import {}\n", dom.error));
    for &mi in &order {
        let mname = &b.modules[mi].name;
        let mut ns: Vec<&str> = exports
            .iter()
            .filter(|(m, _)| m == mname)
            .map(|(_, n)| n.as_str())
            .collect();
        ns.sort();
        if !ns.is_empty() {
            init.push_str(&format!("from .{mname} import {}\n", ns.join(", ")));
        }
    }
    let version = format!(
        "0.{}.{}",
        b.rng.random_range(1..20),
        b.rng.random_range(0..10)
    );
    init.push_str(&format!("\n__version__ = \"{version}\"\n"));
    files.push(SourceFile {
        path: format!("{pkg}/__init__.py"),
        text: init,
    });
    files.push(SourceFile {
        path: format!("{pkg}/errors.py"),
        text: format!(
            "\"\"\"Exceptions raised by {pkg}.\"\"\"\n\n\nclass {err}(Exception):\n    \"\"\"Base class of the errors raised by {pkg}.\"\"\"\n",
            err = dom.error
        ),
    });
    files.push(SourceFile {
        path: "setup.py".into(),
        text: format!(
            "from setuptools import find_packages, setup\n\nsetup(\n    name=\"{pkg}\",\n    version=\"{version}\",\n    description=\"Helpers to {}\",\n    packages=find_packages(exclude=[\"tests\"]),\n    python_requires=\">=3.8\",\n)\n",
            dom.activity
        ),
    });
    let mut test_mods: Vec<usize> = (0..b.modules.len()).collect();
    test_mods.shuffle(&mut b.rng);
    for mi in test_mods.into_iter().take(2) {
        if let Some(t) = test_file(&b, mi) {
            files.push(SourceFile {
                path: format!("tests/test_{}.py", b.modules[mi].name),
                text: t,
            });
        }
    }
    files.sort_by(|x, y| x.path.cmp(&y.path));

    let instance_id = format!("{}__{pkg}-{i:05}", cfg.prefix);
    let mut listing = String::new();
    for f in &files {
        listing.push_str(&format!("{} {}\n", blob_id(&f.text), f.path));
    }
    listing.push_str(&instance_id);
    let base_commit = hex(&sha1(listing.as_bytes()));
    Task {
        instance: Instance {
            instance_id,
            repo: format!("{}/{pkg}", cfg.prefix),
            base_commit,
            problem_statement: problem,
            patch,
        },
        gt,
        files,
        decoys,
        entry_points,
    }
}

// ---------------------------------------------------------------------------------------
// Checks.

/// Applies a diff made of replacement hunks to `text`, checking that every context and
/// removed line matches the text exactly. Returns the new text.
fn apply_file_patch(text: &str, hunks: &[(usize, Vec<String>)]) -> Result<String, String> {
    let had_nl = text.ends_with('\n');
    let old: Vec<&str> = text
        .strip_suffix('\n')
        .unwrap_or(text)
        .split('\n')
        .collect();
    let mut out: Vec<String> = Vec::new();
    let mut pos = 0usize; // 0-based next old line to copy
    for (start, body) in hunks {
        let s = start.saturating_sub(1);
        if s < pos {
            return Err(format!("overlapping hunk at line {start}"));
        }
        out.extend(old[pos..s.min(old.len())].iter().map(|l| l.to_string()));
        pos = s;
        for l in body {
            let (tag, rest) = l.split_at(1.min(l.len()));
            match tag {
                " " | "-" => {
                    if old.get(pos) != Some(&rest) {
                        return Err(format!(
                            "line {}: patch expects {rest:?}, file has {:?}",
                            pos + 1,
                            old.get(pos)
                        ));
                    }
                    if tag == " " {
                        out.push(rest.to_string());
                    }
                    pos += 1;
                }
                "+" => out.push(rest.to_string()),
                _ => return Err(format!("bad hunk line {l:?}")),
            }
        }
    }
    out.extend(old[pos.min(old.len())..].iter().map(|l| l.to_string()));
    let mut s = out.join("\n");
    if had_nl {
        s.push('\n');
    }
    Ok(s)
}

/// The files of a task with its gold patch applied (every hunk's old side must match).
pub fn apply_patch(task: &Task) -> Result<Vec<SourceFile>, String> {
    let mut per_file: BTreeMap<String, Vec<(usize, Vec<String>)>> = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in task.instance.patch.lines() {
        if let Some(p) = line.strip_prefix("+++ b/") {
            cur = Some(p.to_string());
        } else if line.starts_with("diff --git ")
            || line.starts_with("index ")
            || line.starts_with("--- ")
        {
            continue;
        } else if let Some(h) = line.strip_prefix("@@ -") {
            let start: usize = h
                .split([',', ' '])
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad hunk header {line:?}"))?;
            let f = cur.clone().ok_or("hunk before a file header")?;
            per_file.entry(f).or_default().push((start, Vec::new()));
        } else {
            let f = cur.clone().ok_or("text before a file header")?;
            let h = per_file
                .get_mut(&f)
                .and_then(|v| v.last_mut())
                .ok_or("line outside a hunk")?;
            h.1.push(line.to_string());
        }
    }
    let mut out = task.files.clone();
    for (path, hunks) in per_file {
        let f = out
            .iter_mut()
            .find(|f| f.path == path)
            .ok_or_else(|| format!("patch names missing file {path}"))?;
        f.text = apply_file_patch(&f.text, &hunks).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(out)
}

fn parses_cleanly(text: &str) -> bool {
    let mut parser = tree_sitter::Parser::new();
    parser
        .set_language(&tree_sitter_python::LANGUAGE.into())
        .expect("tree-sitter-python grammar is compatible with the tree-sitter runtime");
    parser
        .parse(text, None)
        .is_some_and(|t| !t.root_node().has_error())
}

/// Checks a task's consistency: every file (before and after the patch) parses without
/// errors, the patch applies exactly, the index has every GT location, the locations
/// derived from the patch equal the GT, and every decoy exists.
pub fn check_task(task: &Task) -> Result<(), String> {
    for f in &task.files {
        if !parses_cleanly(&f.text) {
            return Err(format!("{} does not parse", f.path));
        }
    }
    let fixed = apply_patch(task)?;
    for f in &fixed {
        if !parses_cleanly(&f.text) {
            return Err(format!("{} does not parse after the patch", f.path));
        }
    }
    let index = RepoIndex::from_files(
        task.files
            .iter()
            .map(|f| FileIndex::parse(f.path.clone(), f.text.as_bytes()))
            .collect(),
    );
    let exists = |key: &str| -> bool {
        let loc = Location::parse(key);
        let Some(file) = index.file(&loc.file) else {
            return false;
        };
        match loc.name.as_deref().map(|n| n.split_once('.')) {
            None => true,
            Some(None) => file
                .function(loc.name.as_deref().unwrap_or_default())
                .is_some(),
            Some(Some((c, m))) => file
                .classes
                .iter()
                .any(|k| k.name == c && k.methods.iter().any(|x| x.name == m)),
        }
    };
    for k in task.gt.iter().chain(&task.decoys) {
        if !exists(k) {
            return Err(format!("{k} is not in the index"));
        }
    }
    let derived: Vec<String> = locations_from_patch(&task.instance.patch, &index)
        .map_err(|e| e.to_string())?
        .iter()
        .map(Location::key)
        .collect();
    if derived != task.gt {
        return Err(format!("patch gives {derived:?}, GT is {:?}", task.gt));
    }
    if task.gt.is_empty() {
        return Err("no GT locations".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Output.

/// Writes `cfg.n` tasks into `out_dir` (see the module documentation); fails if
/// `out_dir` exists and is not empty.
pub fn generate(cfg: &SynthConfig, out_dir: &Path) -> Result<Summary, SynthError> {
    generate_opts(cfg, out_dir, false)
}

/// [`generate`]; with `overwrite`, a previous synth output in `out_dir` (a directory
/// holding `dataset.jsonl`) is replaced.
pub fn generate_opts(
    cfg: &SynthConfig,
    out_dir: &Path,
    overwrite: bool,
) -> Result<Summary, SynthError> {
    cfg.validate()?;
    let mut replace = false;
    if out_dir.exists() {
        if !out_dir.is_dir() {
            return Err(SynthError::Output(format!(
                "{} exists and is not a directory",
                out_dir.display()
            )));
        }
        let non_empty = std::fs::read_dir(out_dir)
            .map_err(io_err(out_dir))?
            .next()
            .is_some();
        if non_empty {
            if !overwrite {
                return Err(SynthError::Output(format!(
                    "{} exists and is not empty (use --force to replace a previous synth output)",
                    out_dir.display()
                )));
            }
            if !out_dir.join("dataset.jsonl").is_file() {
                return Err(SynthError::Output(format!(
                    "refusing to replace {}: it is not a synth output (no dataset.jsonl)",
                    out_dir.display()
                )));
            }
        }
        replace = true;
    }
    let tasks: Vec<Task> = (0..cfg.n)
        .into_par_iter()
        .map(|i| make_task(cfg, i))
        .collect();
    tasks.par_iter().try_for_each(|t| {
        check_task(t).map_err(|msg| SynthError::Check {
            id: t.instance.instance_id.clone(),
            msg,
        })
    })?;

    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let name = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| SynthError::Output(format!("{} has no file name", out_dir.display())))?;
    let tmp = parent.join(format!(".{name}.synth-tmp.{}", std::process::id()));
    let res = write_tree(cfg, &tasks, &tmp).and_then(|()| {
        if replace {
            let old = parent.join(format!(".{name}.synth-old.{}", std::process::id()));
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
            }
            std::fs::rename(out_dir, &old).map_err(io_err(out_dir))?;
            if let Err(e) = std::fs::rename(&tmp, out_dir) {
                let _ = std::fs::rename(&old, out_dir);
                return Err(io_err(out_dir)(e));
            }
            std::fs::remove_dir_all(&old).map_err(io_err(&old))
        } else {
            std::fs::rename(&tmp, out_dir).map_err(io_err(out_dir))
        }
    });
    if res.is_err() && tmp.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res?;
    let n = tasks.len().max(1) as f64;
    Ok(Summary {
        out_dir: out_dir.to_path_buf(),
        tasks: tasks.len(),
        python_files: tasks
            .iter()
            .map(|t| t.files.iter().filter(|f| f.path.ends_with(".py")).count())
            .sum(),
        gt_locations: tasks.iter().map(|t| t.gt.len()).sum(),
        decoys: tasks.iter().map(|t| t.decoys.len()).sum(),
        mean_problem_chars: tasks
            .iter()
            .map(|t| t.instance.problem_statement.len() as f64)
            .sum::<f64>()
            / n,
        mean_python_lines: tasks
            .iter()
            .flat_map(|t| &t.files)
            .map(|f| f.text.lines().count() as f64)
            .sum::<f64>()
            / n,
    })
}

fn write_tree(cfg: &SynthConfig, tasks: &[Task], dir: &Path) -> Result<(), SynthError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let write = |p: &Path, bytes: &[u8]| -> Result<(), SynthError> {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        std::fs::write(p, bytes).map_err(io_err(p))
    };
    let mut jsonl = String::new();
    let mut gt: BTreeMap<&str, &[String]> = BTreeMap::new();
    for t in tasks {
        jsonl.push_str(&serde_json::to_string(&t.instance).expect("serialisable"));
        jsonl.push('\n');
        gt.insert(&t.instance.instance_id, &t.gt);
        let root = dir.join("repos").join(&t.instance.instance_id);
        for f in &t.files {
            write(&root.join(&f.path), f.text.as_bytes())?;
        }
    }
    write(&dir.join("dataset.jsonl"), jsonl.as_bytes())?;
    let mut g = serde_json::to_string_pretty(&gt).expect("serialisable");
    g.push('\n');
    write(&dir.join("gt.json"), g.as_bytes())?;
    let mut c = serde_json::to_string_pretty(cfg).expect("serialisable");
    c.push('\n');
    write(&dir.join("config.json"), c.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tooltrain_rollout::dataset::load_dataset;
    use tooltrain_rollout::gt::GroundTruth;

    fn cfg() -> SynthConfig {
        SynthConfig::default()
    }

    fn index_of(t: &Task) -> RepoIndex {
        RepoIndex::from_files(
            t.files
                .iter()
                .map(|f| FileIndex::parse(f.path.clone(), f.text.as_bytes()))
                .collect(),
        )
    }

    /// The package modules of a task (not `__init__`, `errors`, tests, `setup.py`).
    fn modules(t: &Task, idx: &RepoIndex) -> Vec<FileIndex> {
        let pkg = t.instance.repo.split('/').nth(1).unwrap().to_string();
        idx.files
            .iter()
            .filter(|f| {
                f.path.starts_with(&format!("{pkg}/"))
                    && !f.path.ends_with("/__init__.py")
                    && !f.path.ends_with("/errors.py")
            })
            .cloned()
            .collect()
    }

    /// Names of all module functions and non-dunder methods.
    fn def_names(files: &[FileIndex]) -> Vec<String> {
        let mut out = Vec::new();
        for f in files {
            out.extend(f.functions.iter().map(|x| x.name.clone()));
            for c in &f.classes {
                out.extend(
                    c.methods
                        .iter()
                        .filter(|m| !m.name.starts_with("__"))
                        .map(|m| m.name.clone()),
                );
            }
        }
        out
    }

    #[test]
    fn structure_knobs_set_the_counts() {
        let c = SynthConfig {
            files: 3,
            classes_per_file: 2,
            methods_per_class: 4,
            functions_per_file: 1,
            decoys: 0,
            indirect_prob: 0.0,
            ..cfg()
        };
        for i in 0..15 {
            let t = make_task(&c, i);
            let idx = index_of(&t);
            let ms = modules(&t, &idx);
            assert_eq!(ms.len(), 3);
            for f in &ms {
                assert_eq!(f.classes.len(), 2, "{}", f.path);
                for k in &f.classes {
                    assert_eq!(
                        k.methods
                            .iter()
                            .filter(|m| !m.name.starts_with("__"))
                            .count(),
                        4
                    );
                }
                assert_eq!(f.functions.len(), 1);
            }
            // Without decoys every definition name is unique in the package.
            let names = def_names(&ms);
            let set: BTreeSet<&String> = names.iter().collect();
            assert_eq!(set.len(), names.len(), "{names:?}");
            assert!(t.decoys.is_empty());
        }
        // Wrappers add one module function per GT location.
        let w = SynthConfig {
            indirect_prob: 1.0,
            ..c.clone()
        };
        for i in 0..10 {
            let t = make_task(&w, i);
            let idx = index_of(&t);
            let n: usize = modules(&t, &idx).iter().map(|f| f.functions.len()).sum();
            assert_eq!(n, 3 + t.gt.len());
        }
    }

    #[test]
    fn decoys_reuse_or_resemble_gt_names() {
        let c = SynthConfig { decoys: 4, ..cfg() };
        let (mut same_name, mut same_class) = (0, 0);
        for i in 0..30 {
            let t = make_task(&c, i);
            assert_eq!(t.decoys.len(), 4);
            let idx = index_of(&t);
            let ms = modules(&t, &idx);
            let names = def_names(&ms);
            for g in &t.gt {
                let name = Location::parse(g).name.unwrap();
                let bare = name.rsplit('.').next().unwrap();
                same_name += names.iter().filter(|n| *n == bare).count() - 1;
                if let Some((cls, _)) = name.split_once('.') {
                    let n = ms
                        .iter()
                        .filter(|f| f.classes.iter().any(|k| k.name == cls))
                        .count();
                    same_class += n - 1;
                }
            }
            for d in &t.decoys {
                assert!(!t.gt.contains(d), "decoy {d} is a GT location");
            }
        }
        assert!(same_name >= 20, "{same_name} same-name decoys");
        assert!(same_class >= 5, "{same_class} same-class decoys");
    }

    #[test]
    fn mention_and_indirect_knobs_change_the_report() {
        let never = SynthConfig {
            mention_prob: 0.0,
            indirect_prob: 0.0,
            ..cfg()
        };
        let always = SynthConfig {
            mention_prob: 1.0,
            indirect_prob: 0.0,
            ..cfg()
        };
        let hidden = SynthConfig {
            mention_prob: 0.0,
            indirect_prob: 1.0,
            ..cfg()
        };
        for i in 0..40 {
            let t = make_task(&never, i);
            let ps = &t.instance.problem_statement;
            for g in &t.gt {
                let loc = Location::parse(g);
                let dotted = loc.file.trim_end_matches(".py").replace('/', ".");
                assert!(!ps.contains(&loc.file), "{ps}");
                assert!(!ps.contains(&format!("{dotted} import")), "{ps}");
                assert!(!ps.contains("Traceback"));
            }
            let t = make_task(&always, i);
            let ps = &t.instance.problem_statement;
            for (g, e) in t.gt.iter().zip(&t.entry_points) {
                let loc = Location::parse(g);
                let dotted = loc.file.trim_end_matches(".py").replace('/', ".");
                assert!(ps.contains(&format!("from {dotted} import")), "{ps}");
                // Direct calls: the entry point is the GT definition itself.
                assert_eq!(Some(e), loc.name.as_ref());
            }
            let t = make_task(&hidden, i);
            let ps = &t.instance.problem_statement;
            for (g, e) in t.gt.iter().zip(&t.entry_points) {
                let name = Location::parse(g).name.unwrap();
                let bare = name.rsplit('.').next().unwrap();
                assert!(ps.contains(e.as_str()), "{e} not in {ps}");
                assert!(!ps.contains(bare), "{bare} in {ps}");
            }
        }
    }

    #[test]
    fn prompts_stay_small() {
        // The structure listing of the 5 largest files plus the report, as in the
        // function-level prompt, in characters (~3.5 characters a token).
        let c = cfg();
        let mut worst = 0;
        for i in 0..50 {
            let t = make_task(&c, i);
            let idx = index_of(&t);
            let mut blocks: Vec<usize> = idx
                .files
                .iter()
                .map(|f| {
                    let mut n = f.path.len() + 5;
                    for k in &f.classes {
                        n += k.name.len()
                            + 20
                            + k.methods.iter().map(|m| m.name.len() + 2).sum::<usize>();
                    }
                    n + 20 + f.functions.iter().map(|x| x.name.len() + 2).sum::<usize>()
                })
                .collect();
            blocks.sort_unstable_by(|a, b| b.cmp(a));
            let total = blocks.iter().take(5).sum::<usize>() + t.instance.problem_statement.len();
            worst = worst.max(total);
        }
        assert!(worst < 3500, "{worst} characters");
    }

    #[test]
    fn teacher_tool_calls_read_the_buggy_code() {
        // The oracle's call for each GT location returns the code with the buggy line
        // that the patch removes.
        use tooltrain_rollout::policy::call_for;
        use tooltrain_rollout::tools::{execute, ToolLimits};
        let c = SynthConfig { gt_max: 3, ..cfg() };
        for i in 0..20 {
            let t = make_task(&c, i);
            let idx = index_of(&t);
            let removed: Vec<&str> = t
                .instance
                .patch
                .lines()
                .filter(|l| l.starts_with('-') && !l.starts_with("---"))
                .map(|l| l[1..].trim())
                .collect();
            for g in &t.gt {
                let call = call_for(&Location::parse(g), &idx).unwrap();
                let out = execute(&idx, &call, ToolLimits::default());
                assert!(out.found, "{g}: {}", out.observation);
                assert!(removed.iter().any(|r| out.observation.contains(r)), "{g}");
            }
        }
    }

    #[test]
    fn random_knobs_stay_consistent() {
        let mut rng = StdRng::seed_from_u64(99);
        let mut tried = 0;
        while tried < 60 {
            let gt_min = rng.random_range(1..=3);
            let c = SynthConfig {
                seed: rng.random_range(0..1000),
                files: rng.random_range(1..=6),
                classes_per_file: rng.random_range(0..=3),
                methods_per_class: rng.random_range(1..=4),
                functions_per_file: rng.random_range(0..=3),
                decoys: rng.random_range(0..=8),
                gt_min,
                gt_max: rng.random_range(gt_min..=5),
                mention_prob: rng.random_range(0.0..=1.0),
                indirect_prob: rng.random_range(0.0..=1.0),
                ..cfg()
            };
            if c.validate().is_err() {
                continue;
            }
            tried += 1;
            for i in 0..3 {
                let t = make_task(&c, i);
                check_task(&t).unwrap_or_else(|e| panic!("{c:?} task {i}: {e}"));
                assert_eq!(t.decoys.len(), c.decoys);
                assert!(t.gt.len() >= c.gt_min && t.gt.len() <= c.gt_max);
            }
        }
    }

    #[test]
    fn sha1_matches_known_vectors() {
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        // `git hash-object` of "hello\n".
        assert_eq!(
            blob_id("hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn tasks_are_consistent() {
        let c = cfg();
        for i in 0..60 {
            let t = make_task(&c, i);
            check_task(&t).unwrap_or_else(|e| panic!("task {i}: {e}\n{}", t.instance.patch));
            assert!(!t.gt.is_empty() && t.gt.len() <= 2);
            assert_eq!(t.instance.base_commit.len(), 40);
            assert!(t.instance.instance_id.starts_with("synth__"));
            assert!(t.instance.repo.starts_with("synth/"));
        }
    }

    #[test]
    fn same_seed_same_task_different_seed_different_task() {
        let c = cfg();
        assert_eq!(make_task(&c, 7), make_task(&c, 7));
        assert_ne!(make_task(&c, 7), make_task(&c, 8));
        let other = SynthConfig { seed: 1, ..cfg() };
        assert_ne!(make_task(&c, 7), make_task(&other, 7));
        // A task does not depend on how many are generated.
        let big = SynthConfig { n: 1000, ..cfg() };
        assert_eq!(make_task(&c, 3), make_task(&big, 3));
    }

    #[test]
    fn hard_and_easy_knobs_stay_consistent() {
        let hard = SynthConfig {
            files: 6,
            classes_per_file: 3,
            methods_per_class: 4,
            functions_per_file: 3,
            decoys: 6,
            gt_min: 2,
            gt_max: 3,
            mention_prob: 0.0,
            indirect_prob: 1.0,
            ..cfg()
        };
        let easy = SynthConfig {
            files: 1,
            classes_per_file: 0,
            methods_per_class: 0,
            functions_per_file: 2,
            decoys: 0,
            gt_min: 1,
            gt_max: 1,
            mention_prob: 1.0,
            indirect_prob: 0.0,
            ..cfg()
        };
        for c in [&hard, &easy] {
            c.validate().unwrap();
            for i in 0..25 {
                let t = make_task(c, i);
                check_task(&t).unwrap_or_else(|e| panic!("task {i}: {e}"));
                assert!(t.gt.len() >= c.gt_min && t.gt.len() <= c.gt_max);
                assert_eq!(t.decoys.len(), c.decoys);
            }
        }
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for c in [
            SynthConfig { files: 0, ..cfg() },
            SynthConfig { files: 11, ..cfg() },
            SynthConfig {
                gt_min: 3,
                gt_max: 2,
                ..cfg()
            },
            SynthConfig { gt_min: 0, ..cfg() },
            SynthConfig {
                mention_prob: 1.5,
                ..cfg()
            },
            SynthConfig {
                classes_per_file: 0,
                functions_per_file: 0,
                ..cfg()
            },
            SynthConfig {
                prefix: "a/b".into(),
                ..cfg()
            },
            SynthConfig {
                files: 1,
                classes_per_file: 0,
                functions_per_file: 1,
                gt_min: 2,
                gt_max: 2,
                ..cfg()
            },
        ] {
            assert!(c.validate().is_err(), "{c:?}");
        }
        let e = serde_json::from_str::<SynthConfig>(r#"{"n": 3, "bogus": 1}"#).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let c: SynthConfig = serde_json::from_str(r#"{"n": 3}"#).unwrap();
        assert_eq!(c, SynthConfig { n: 3, ..cfg() });
    }

    #[test]
    fn generate_writes_loadable_files_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let c = SynthConfig { n: 6, ..cfg() };
        let s = generate(&c, &out).unwrap();
        assert_eq!(s.tasks, 6);
        let ds = load_dataset(&out.join("dataset.jsonl")).unwrap();
        let gt = GroundTruth::load(&out.join("gt.json")).unwrap();
        assert_eq!(ds.len(), 6);
        for inst in &ds {
            let locs = gt.get(&inst.instance_id).unwrap();
            let idx = RepoIndex::build(&out.join("repos").join(&inst.instance_id));
            let derived = locations_from_patch(&inst.patch, &idx).unwrap();
            assert_eq!(derived, locs);
        }
        // No temp directories are left beside the output.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["out"]);
        // A non-empty output is not replaced without `overwrite`, and is with it.
        assert!(generate(&c, &out).is_err());
        let c2 = SynthConfig { n: 2, ..c };
        generate_opts(&c2, &out, true).unwrap();
        assert_eq!(load_dataset(&out.join("dataset.jsonl")).unwrap().len(), 2);
        // Never replace a directory that is not a synth output.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("keep.txt"), "x").unwrap();
        assert!(generate_opts(&c2, &other, true).is_err());
        assert!(other.join("keep.txt").exists());
    }
}
