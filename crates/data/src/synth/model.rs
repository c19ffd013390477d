//! The repository model of a task under construction: modules of classes and
//! functions, each definition with its body lines and, for recipe bodies, the bug it
//! can carry. [`super::builder::Builder`] fills it; [`super::render`] turns it into
//! source text.

use super::recipes::{Body, Bug, Consts, Recipe};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// What a definition is in the task.
pub(super) enum Role {
    /// A recipe body without a planted bug.
    Plain,
    /// `__init__` or `__repr__`.
    Special,
    /// A ground-truth location: its bug is planted in the base commit.
    Gt,
    /// A look-alike of a GT location (same or similar name, usually the same recipe).
    Decoy,
    /// A public function in another module that calls a GT definition.
    Wrapper,
}

/// A method or module function.
#[derive(Debug, Clone)]
pub(super) struct Def {
    /// Unique within a task; [`super::builder::Builder`] hands them out.
    pub(super) id: usize,
    pub(super) name: String,
    /// Parameters without `self`.
    pub(super) params: Vec<String>,
    pub(super) doc: String,
    pub(super) lines: Vec<String>,
    pub(super) recipe: Option<Recipe>,
    pub(super) bug: Option<Bug>,
    /// The base commit has the bug (GT locations).
    pub(super) planted: bool,
    pub(super) role: Role,
    pub(super) noun: String,
    pub(super) measure: String,
}

impl Def {
    /// A recipe definition (not planted yet).
    pub(super) fn from_body(id: usize, b: Body, recipe: Recipe, role: Role) -> Def {
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

    /// A definition without a recipe (`__init__`, `__repr__`).
    pub(super) fn special(
        id: usize,
        name: &str,
        params: Vec<String>,
        doc: String,
        lines: Vec<String>,
    ) -> Def {
        Def {
            id,
            name: name.into(),
            params,
            doc,
            lines,
            recipe: None,
            bug: None,
            planted: false,
            role: Role::Special,
            noun: String::new(),
            measure: String::new(),
        }
    }
}

/// A class: its docstring and methods (special methods first).
#[derive(Debug, Clone)]
pub(super) struct Class {
    pub(super) name: String,
    pub(super) doc: String,
    pub(super) methods: Vec<Def>,
}

/// A top-level item of a module.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a few per task, built once
pub(super) enum Item {
    Class(Class),
    Func(Def),
}

/// A module of the package (`<pkg>/<name>.py`): docstring, constants, classes and
/// functions in file order.
#[derive(Debug, Clone)]
pub(super) struct Module {
    pub(super) name: String,
    pub(super) doc: String,
    pub(super) consts: Consts,
    pub(super) items: Vec<Item>,
}

impl Module {
    /// Repository-relative path of the module's file.
    pub(super) fn path(&self, pkg: &str) -> String {
        format!("{pkg}/{}.py", self.name)
    }
    /// The module's class called `name`.
    pub(super) fn class(&self, name: &str) -> Option<&Class> {
        self.items.iter().find_map(|it| match it {
            Item::Class(c) if c.name == name => Some(c),
            _ => None,
        })
    }
    /// Names of the module's classes and functions.
    pub(super) fn top_names(&self) -> BTreeSet<String> {
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
pub(super) struct Site {
    /// Index into the builder's modules.
    pub(super) module: usize,
    /// The class, for a method.
    pub(super) class: Option<String>,
}
