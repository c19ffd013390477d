//! # tooltrain-rollout
//!
//! The RepoSearcher environment and its policies: everything an episode needs, and the
//! runners that evaluation, rejection sampling and RL share. Behaviour:
//! `docs/reposearcher.md` (sections cited as §N).
//!
//! | concept | where |
//! |---|---|
//! | benchmark instances (SWE-bench JSONL), line-numbered errors, instance ids as paths | [`dataset`]: [`load_dataset`], [`Instance`] |
//! | ground truth: files (`file.py::name`, Loc-Bench's `file.py:name`) and derived from a gold patch | [`gt`]: [`GroundTruth`], [`gt::locations_from_patch`] |
//! | the one unified-diff parser (removed lines, insertion points) | [`patch`] |
//! | tree-sitter Python index (classes, methods, functions, imports), the rendered tree (§2) | [`index`]: [`RepoIndex::build`], [`RepoIndex::render_tree`] |
//! | which paths are tests (one rule for the index, candidates and BM25) | [`index::is_test_path`] |
//! | the index cached on disk per (repo, commit) | [`cache`]: [`cache::load_or_build`] |
//! | the four tools, their observations and JSON schemas (§3) | [`tools`]: [`ToolCall`], [`tools::execute`] |
//! | `<tool_call>` parser (§4) | [`toolcall`]: [`toolcall::parse_turn`] |
//! | answer parser (§6) | [`answer`]: [`parse_answer`] |
//! | prompts (§5) | [`prompts`] |
//! | episodes in lock-step batches, token records with loss masks and drift (§5) | [`episode`]: [`episode::run_episodes`], [`episode::Renderer`] |
//! | rewards: nDCG@k (the paper's), recall@k, F1@k (§6) | [`reward`]: [`RewardFn`] |
//! | the paper's metric table (§7) | [`metrics`] |
//! | the [`Policy`] trait (batched turns) and the oracle | [`policy`] |
//! | BM25 baseline (no LLM) | [`bm25`] |
//! | any OpenAI-compatible chat endpoint over HTTP | [`openai`] |
//! | a local `tooltrain-model` checkpoint, KV reuse across turns | [`local`] |
//! | evaluation runs (`tooltrain eval`): selection, policies from config, batches, outputs | [`eval`] |
//! | rejection sampling (`tooltrain sample`): K episodes per task, keep rule, the SFT record | [`sample`]: [`sample::run_sample`], [`sample::SftRecord`] |

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
pub mod reward;
pub mod sample;
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

pub(crate) use tooltrain_util::write_atomic;
