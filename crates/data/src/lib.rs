//! # tooltrain-data
//!
//! Everything that makes tasks for the RepoSearcher environment (`tooltrain-rollout`):
//! the source trees of benchmark instances, checks of the ground truth derived on them,
//! and synthetic tasks small enough to learn on a CPU.
//!
//! | concept | where |
//! |---|---|
//! | `tooltrain repos prepare`: a tree per instance at its base commit, resumable, locked, disk-aware | [`repos`]: [`repos::prepare`] |
//! | the git source: bare clones, fetch, `git archive` | [`repos::git`] |
//! | the PyPI fallback: releases, archives, the release that fits the gold patch | [`repos::pypi`], [`repos::fit`], [`repos::version`] (PEP 440 order), [`repos::archive`] |
//! | `tooltrain gt-check`: ground truth derived from gold patches vs a shipped file | [`gtcheck`] |
//! | `tooltrain synth`: seeded synthetic packages, bug reports, gold patches and GT | [`synth`] |
//!
//! The unified-diff parser and the derivation of ground truth from a gold patch live in
//! `tooltrain-rollout` (`patch`, `gt`), because evaluation derives ground truth too.

pub mod gtcheck;
pub mod repos;
pub mod synth;
