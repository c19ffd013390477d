//! `tooltrain-rollout`: the model-free pieces of the RepoSearcher environment
//! (behaviour: `../shared/spec/reposearcher.md`).
//!
//! Where each concept lives:
//! - [`index`]: tree-sitter Python index of a repository (classes, methods, module
//!   functions, line ranges, imports, text) and the rendered tree (spec section 2).
//!   Entry points: [`RepoIndex::build`], [`FileIndex::parse`], [`RepoIndex::render_tree`].
//! - [`cache`]: the index cached on disk per (repo, commit) key: [`cache::load_or_build`].
//! - [`tools`]: the four tools, their observations and JSON schemas (spec section 3).
//!   Entry points: [`ToolCall`], [`tools::execute`], [`tools::tool_schemas`].
//! - [`toolcall`]: parser of `<tool_call>` blocks in an assistant turn (spec section 4).
//!   Entry points: [`toolcall::parse_turn`], [`ToolCallError::observation`].
//! - [`answer`]: locations from the fenced blocks of the final answer (spec section 6).
//! - [`reward`]: nDCG@k (the paper's reward), recall@k and F1@k behind [`RewardFn`].
//! - [`metrics`]: the evaluation table (spec section 7), file and function level.
//! - [`patch`]: unified-diff parser (removed lines, insertion points) for gold patches.
//! - [`dataset`]: benchmark instances (SWE-bench JSONL), errors with line numbers.
//! - [`episode`]: episodes run in lock-step batches, token records with loss masks and
//!   drift, the [`episode::Renderer`] (chat template + tokenizer), [`episode::EpisodeConfig`].
//! - [`prompts`]: the RepoSearcher system/user/summary prompts.
//! - [`policy`]: the [`Policy`] trait (batched turns) and the [`policy::Oracle`].
//! - [`bm25`]: the BM25 lexical baseline policy (no LLM): [`bm25::Bm25`].
//! - [`openai`]: a policy over any OpenAI-compatible chat-completions endpoint: [`openai::OpenAiPolicy`].
//! - [`synth`]: seeded synthetic tasks (small Python packages, bug reports, gold patches, GT): [`synth::generate`].
//! - [`gt`]: ground-truth files (`file.py::name` and Loc-Bench's `file.py:name`).
//! - [`repos`]: instance source trees at their base commit (git, or the PyPI fallback) and the derived-GT agreement check.

pub mod answer;
pub mod bm25;
pub mod cache;
pub mod dataset;
pub mod episode;
pub mod eval;
pub mod gt;
pub mod index;
pub mod local;
pub mod metrics;
pub mod openai;
pub mod patch;
pub mod policy;
pub mod prompts;
pub mod repos;
pub mod reward;
pub mod synth;
pub mod toolcall;
pub mod tools;

pub use answer::{parse_answer, ParsedAnswer};
pub use dataset::{load_dataset, Instance};
pub use gt::{GroundTruth, Location};
pub use index::{ClassEntry, FileIndex, FunctionEntry, RepoIndex};
pub use policy::{Policy, PolicyError, Stage, TaskView, TurnReply, TurnRequest};
pub use reward::{Reward, RewardFn};
pub use toolcall::{ParsedTurn, ToolCallError};
pub use tools::{ToolCall, ToolLimits, ToolOutcome};

pub(crate) use tooltrain_model::error::write_atomic_io as write_atomic;
