//! RepoSearcher episodes (`docs/reposearcher.md` §5), run in lock-step batches and recorded token
//! by token.
//!
//! An episode is the function-level stage: system + user prompt (bug report and the
//! candidate files' structure), up to `max_turns` search turns (the policy calls one
//! tool, the observation comes back as a `tool` message), then a summary turn whose
//! fenced answer is parsed and rewarded. Optionally a file-level stage runs first and
//! chooses the candidate files (the paper's inference pipeline).
//!
//! **Tokens.** With a [`Renderer`] (a tokenizer with its chat template), every episode
//! keeps the exact token sequence the model sees: the conversation is rendered after
//! each message and only the new suffix is tokenised and appended, so history is never
//! re-tokenised. Tokens the policy generated carry loss mask 1 and their log-probs; all
//! others (prompt, chat headers, tool observations, template glue) carry 0. A text
//! policy's turn counts as generated: its content and the end-of-turn marker. At the
//! end the whole conversation is rendered as history (followed by one more user
//! message, so that templates which render the last assistant turn specially, like
//! Qwen3's, render every turn as the model will see it later) and tokenised once more;
//! the number of positions where that differs from the recorded tokens is the
//! episode's `drift` (0 for text policies and for a model that emits canonical
//! tokenisations). Templates that re-render earlier turns differently are followed by
//! resuming after the last assistant turn's recorded text.
//!
//! **Budgets.** A search turn gets `max_new_tokens` (less when the context is nearly
//! full); when the context cannot hold another turn plus the summary, the search ends
//! early (`context_exhausted`). A turn without a valid call gets the format
//! observation and still counts as a turn.

use crate::answer::parse_answer;
use crate::dataset::Instance;
use crate::gt::Location;
use crate::index::{is_test_path, RepoIndex};
use crate::policy::{Policy, Stage, TaskView, TurnReply, TurnRequest};
use crate::prompts;
use crate::reward::{Reward, RewardFn};
use crate::toolcall::parse_turn;
use crate::tools::{self, ToolLimits};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tooltrain_model::Tokenizer;
use tooltrain_util::derive_seed;

/// How the function-level stage chooses its candidate files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Candidates {
    /// Run the file-level stage and take its top files (the paper at inference).
    #[default]
    FileStage,
    /// All GT files, then random other files (seeded) up to `num_candidates`, shuffled
    /// (the paper's training prompts).
    GtPlusRandom,
}

/// Episode settings (the `[episode]` table of eval/sample/RL configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EpisodeConfig {
    /// Search turns before the summary (paper: 10).
    pub max_turns: usize,
    /// New tokens of one search turn.
    pub max_new_tokens: usize,
    /// New tokens of the summary turn and of the file-level answer.
    pub max_answer_tokens: usize,
    /// Tokens of the whole conversation (paper: 32,768). Only enforced with a tokenizer.
    pub max_context_tokens: usize,
    pub candidates: Candidates,
    /// Number of candidate files listed in the function-level prompt.
    pub num_candidates: usize,
    /// Characters of code a tool shows before cutting.
    pub max_code_chars: usize,
    /// The reward of the final answer (needs GT).
    pub reward: Reward,
}

impl Default for EpisodeConfig {
    fn default() -> Self {
        EpisodeConfig {
            max_turns: 10,
            max_new_tokens: 4096,
            max_answer_tokens: 1024,
            max_context_tokens: 32_768,
            candidates: Candidates::FileStage,
            num_candidates: 5,
            max_code_chars: ToolLimits::default().max_code_chars,
            reward: Reward::default(),
        }
    }
}

impl EpisodeConfig {
    /// Checks values that would make every episode meaningless.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_candidates == 0 {
            return Err("episode.num_candidates must be at least 1".into());
        }
        if self.max_new_tokens == 0 || self.max_answer_tokens == 0 {
            return Err(
                "episode.max_new_tokens and episode.max_answer_tokens must be at least 1".into(),
            );
        }
        if self.max_context_tokens <= self.max_answer_tokens {
            return Err(format!(
                "episode.max_context_tokens ({}) must exceed episode.max_answer_tokens ({})",
                self.max_context_tokens, self.max_answer_tokens
            ));
        }
        Ok(())
    }
}

/// Renders conversations with a checkpoint's chat template and tokenises them.
#[derive(Clone)]
pub struct Renderer {
    tokenizer: Arc<Tokenizer>,
    /// Whether the template renders the `tools` variable; if not, the schemas are put in
    /// the system message ([`prompts::tools_block`]).
    template_renders_tools: bool,
    /// The end-of-turn marker that follows an assistant message (e.g. `<|im_end|>`).
    end_of_turn: Option<String>,
}

impl Renderer {
    /// A renderer for `tokenizer`, which must have a chat template.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Renderer, String> {
        let probe = [json!({"role": "user", "content": "hi"})];
        let tools = tools::tool_schemas();
        let tools = tools.as_array().cloned().unwrap_or_default();
        let with = tokenizer
            .apply_chat_template(&probe, Some(&tools), true, &Map::new())
            .map_err(|e| format!("chat template: {e}"))?;
        let without = tokenizer
            .apply_chat_template(&probe, None, true, &Map::new())
            .map_err(|e| format!("chat template: {e}"))?;
        // The marker closing an assistant turn: what the template writes right after the
        // content of an assistant message.
        const MARK: &str = "\u{1}CONTENT\u{1}";
        let conv = [
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": MARK}),
        ];
        let full = tokenizer
            .apply_chat_template(&conv, None, false, &Map::new())
            .map_err(|e| format!("chat template: {e}"))?;
        let end_of_turn = full.split_once(MARK).and_then(|(_, rest)| {
            let rest = rest.trim_end_matches(['\n', ' ']);
            let ids = tokenizer.encode(rest).ok()?;
            // Only a single special token counts as the marker a model samples.
            (ids.len() == 1 && !rest.is_empty()).then(|| rest.to_string())
        });
        Ok(Renderer {
            tokenizer,
            template_renders_tools: with != without,
            end_of_turn,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The end-of-turn marker (a single special token), when the template has one.
    pub fn end_of_turn(&self) -> Option<&str> {
        self.end_of_turn.as_deref()
    }

    fn render(&self, messages: &[Value], tools: &[Value], gen: bool) -> Result<String, String> {
        let tools = (self.template_renders_tools && !tools.is_empty()).then_some(tools);
        self.tokenizer
            .apply_chat_template(messages, tools, gen, &Map::new())
            .map_err(|e| format!("chat template: {e}"))
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text)
            .map_err(|e| format!("tokenizer: {e}"))
    }
}

/// One episode to run.
#[derive(Debug, Clone)]
pub struct EpisodeJob {
    pub instance: Arc<Instance>,
    pub index: Arc<RepoIndex>,
    /// GT locations when known (the oracle, the reward and `GtPlusRandom` need them).
    pub gt: Option<Vec<Location>>,
    /// Sample number of this instance (0..K).
    pub sample: usize,
    /// Seed of this episode's sampling: turn `t` of the episode samples with
    /// `derive_seed([seed, t])` (the file stage with `t = 0`).
    pub seed: u64,
    /// Seed of the prompt (the random candidate files of `GtPlusRandom`). The samples of
    /// one task share it, so a group compares answers to the same prompt.
    pub prompt_seed: u64,
}

/// The token-level record of a conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub tokens: Vec<u32>,
    /// 1 where the policy generated the token.
    pub loss_mask: Vec<u8>,
    /// log p of generated tokens under the sampling model (0 elsewhere, and for text
    /// policies: see `has_logprobs`).
    pub logprobs: Vec<f32>,
    /// Whether every generated token's log-prob is real (the policy returned them). A
    /// text policy's tokens carry 0, which is not their log-prob.
    #[serde(default)]
    pub has_logprobs: bool,
    /// Positions where re-rendering the final conversation gives other tokens.
    pub drift: usize,
}

/// A finished episode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    pub instance_id: String,
    pub sample: usize,
    pub seed: u64,
    pub policy: String,
    /// The file-level stage's conversation and answer, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_stage: Option<FileStage>,
    /// Files listed in the function-level prompt.
    pub candidate_files: Vec<String>,
    /// Function-level conversation (OpenAI-style messages).
    pub messages: Vec<Value>,
    /// Tokens of the function-level conversation (with a renderer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenRecord>,
    /// Search turns taken (the summary not included).
    pub turns: usize,
    /// Tool calls executed, and how many of them found code.
    pub tool_calls: usize,
    pub tool_hits: usize,
    /// Turns without a usable call (format observation shown).
    pub invalid_turns: usize,
    /// Turns (search or summary) whose reply hit its token budget.
    #[serde(default)]
    pub truncated_turns: usize,
    /// The policy ended the search itself (`exit`).
    pub exited: bool,
    /// The context budget ended the search.
    pub context_exhausted: bool,
    /// Parsed answer: `file::name` locations and files.
    pub locations: Vec<String>,
    pub files: Vec<String>,
    /// Reward of the answer (when GT is known).
    pub reward: Option<f64>,
    /// GT locations among the answer's top 5 (when GT is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt_hits: Option<usize>,
    /// Why the episode failed (policy or template error); the answer is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The file-level stage of an episode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileStage {
    pub messages: Vec<Value>,
    pub files: Vec<String>,
}

/// Live state of one function-level conversation.
struct Live {
    traj: Trajectory,
    tokens: Option<TokenState>,
    done_search: bool,
    finished: bool,
}

struct TokenState {
    rec: TokenRecord,
    /// The rendered text the recorded tokens stand for.
    text: String,
    /// The text of the last assistant turn as recorded (content and end-of-turn
    /// marker): where a re-rendering resumes when the template renders earlier turns
    /// differently once they are no longer last (Qwen3 drops their think blocks).
    anchor: Option<String>,
}

/// Tokens kept free after the answer's prompt for what the chat template writes after
/// the answer (its end-of-turn marker and a newline), so that a finished record stays
/// within `max_context_tokens`.
const TAIL_TOKENS: usize = 8;

impl TokenState {
    /// Appends the part of `rendered` beyond what is recorded, as non-generated tokens.
    fn extend_to(&mut self, r: &Renderer, rendered: &str) -> Result<(), String> {
        let (new, ids) = self.pending(r, rendered)?;
        self.commit(&new, &ids);
        Ok(())
    }

    /// The text and tokens that [`TokenState::extend_to`] would append, not yet recorded.
    fn pending(&self, r: &Renderer, rendered: &str) -> Result<(String, Vec<u32>), String> {
        let new = self.delta(rendered)?.to_string();
        let ids = r.encode(&new)?;
        Ok((new, ids))
    }

    /// Records what [`TokenState::pending`] returned, as non-generated tokens.
    fn commit(&mut self, text: &str, ids: &[u32]) {
        self.push(ids, 0, None);
        self.text.push_str(text);
    }

    /// The part of a fresh rendering that follows what is recorded: the suffix after the
    /// recorded text, or, for templates that re-render earlier turns differently, the
    /// text after the last assistant turn's anchor.
    fn delta<'a>(&self, rendered: &'a str) -> Result<&'a str, String> {
        if let Some(new) = rendered.strip_prefix(self.text.as_str()) {
            return Ok(new);
        }
        if let Some(a) = self.anchor.as_deref().filter(|a| !a.is_empty()) {
            if let Some(i) = rendered.rfind(a) {
                return Ok(&rendered[i + a.len()..]);
            }
        }
        Err("the chat template re-renders the conversation so that the recorded turns cannot be found in it".into())
    }

    fn push(&mut self, ids: &[u32], mask: u8, logprobs: Option<&[f32]>) {
        if mask == 1 && logprobs.is_none() && !ids.is_empty() {
            self.rec.has_logprobs = false;
        }
        self.rec.tokens.extend_from_slice(ids);
        self.rec
            .loss_mask
            .extend(std::iter::repeat_n(mask, ids.len()));
        match logprobs {
            Some(lp) => self.rec.logprobs.extend_from_slice(lp),
            None => self
                .rec
                .logprobs
                .extend(std::iter::repeat_n(0.0, ids.len())),
        }
    }

    /// Records an assistant reply. Model tokens are kept as sampled; a text reply is
    /// tokenised as its content plus the end-of-turn marker the template writes.
    /// A text reply longer than `budget` tokens (the turn's cap) fails: recording it
    /// would overrun the context budget.
    fn push_reply(
        &mut self,
        r: &Renderer,
        messages_with_reply: &[Value],
        tools: &[Value],
        reply: &TurnReply,
        budget: usize,
    ) -> Result<(), String> {
        if let Some(ids) = &reply.tokens {
            let lp = reply.logprobs.as_deref().filter(|l| l.len() == ids.len());
            self.push(ids, 1, lp);
            let text = r
                .tokenizer
                .decode(ids, false)
                .map_err(|e| format!("tokenizer: {e}"))?;
            self.text.push_str(&text);
            self.anchor = Some(text);
            return Ok(());
        }
        // A text reply is what a model would have generated after the generation
        // prompt: the content, then the end-of-turn marker (when the template writes
        // one after assistant content).
        let content = reply.text.as_str();
        let rendered = r.render(messages_with_reply, tools, false)?;
        let closes = r
            .end_of_turn
            .as_deref()
            .filter(|e| rendered.contains(&format!("{content}{e}")));
        if !rendered.contains(content) {
            return Err(
                "the chat template changes assistant content (e.g. trims it); cannot align the reply's tokens"
                    .into(),
            );
        }
        let generated = format!("{content}{}", closes.unwrap_or(""));
        let ids = r.encode(&generated)?;
        if ids.len() > budget {
            return Err(format!(
                "the policy's reply is {} tokens, more than the {budget} this turn allows \
                 (max_new_tokens, or what the context budget leaves)",
                ids.len()
            ));
        }
        self.push(&ids, 1, None);
        self.text.push_str(&generated);
        self.anchor = Some(generated);
        Ok(())
    }
}

fn sys_message(text: String, renderer: Option<&Renderer>, tools: &[Value]) -> Value {
    let text = match renderer {
        Some(r) if !r.template_renders_tools && !tools.is_empty() => {
            format!("{text}{}", prompts::tools_block(tools))
        }
        _ => text,
    };
    json!({"role": "system", "content": text})
}

/// GT files plus seeded random other non-test files up to `n`, shuffled.
pub fn gt_plus_random(index: &RepoIndex, gt: &[Location], n: usize, seed: u64) -> Vec<String> {
    let mut files: Vec<String> = Vec::new();
    for l in gt {
        if !files.contains(&l.file) {
            files.push(l.file.clone());
        }
    }
    let mut rng = tooltrain_util::Rng::new(seed ^ 0x5EED_CA4D);
    let mut others: Vec<&str> = index
        .files
        .iter()
        .map(|f| f.path.as_str())
        .filter(|p| !files.iter().any(|f| f == p) && !is_test_path(p))
        .collect();
    rng.shuffle(&mut others);
    for p in others {
        if files.len() >= n {
            break;
        }
        files.push(p.to_string());
    }
    rng.shuffle(&mut files);
    files
}

/// The error of episodes abandoned because `stop` was set.
pub const STOPPED: &str = "stopped: the run was asked to stop";

/// Runs `jobs` with `policy`: the file-level stage (when configured) for all, then the
/// function-level stage in lock-step, one batched [`Policy::respond`] per turn.
/// `on_done` is called once per finished episode (for progress). A failure of one
/// episode is recorded in its [`Trajectory::error`]; it never stops the others. When
/// `stop` is set (checked before every turn), the unfinished episodes end with the
/// error [`STOPPED`].
pub fn run_episodes(
    jobs: &[EpisodeJob],
    policy: &dyn Policy,
    renderer: Option<&Renderer>,
    cfg: &EpisodeConfig,
    stop: Option<&AtomicBool>,
    on_done: &(dyn Fn(&Trajectory) + Sync),
) -> Vec<Trajectory> {
    let schemas = tools::tool_schemas()
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut lives: Vec<Live> = jobs
        .iter()
        .map(|j| Live {
            traj: Trajectory {
                instance_id: j.instance.instance_id.clone(),
                sample: j.sample,
                seed: j.seed,
                policy: policy.name(),
                ..Trajectory::default()
            },
            tokens: renderer.map(|_| TokenState {
                rec: TokenRecord {
                    has_logprobs: true,
                    ..TokenRecord::default()
                },
                text: String::new(),
                anchor: None,
            }),
            done_search: false,
            finished: false,
        })
        .collect();
    match cfg.candidates {
        Candidates::GtPlusRandom => gt_plus_random_candidates(&mut lives, jobs, cfg),
        Candidates::FileStage => file_stage(&mut lives, jobs, policy, renderer, cfg),
    }
    // The function-level prompt.
    for (live, job) in lives.iter_mut().zip(jobs) {
        if live.finished {
            continue;
        }
        live.traj.messages = vec![
            sys_message(prompts::FUNCTION_SYSTEM.to_string(), renderer, &schemas),
            json!({"role": "user", "content": prompts::function_user(
                &job.instance.problem_statement, &job.index, &live.traj.candidate_files)}),
        ];
    }
    // Lock-step turns: search turns, then the summary.
    loop {
        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            for live in lives.iter_mut().filter(|l| !l.finished) {
                live.traj.error = Some(STOPPED.into());
                live.finished = true;
            }
            break;
        }
        let pending = prepare_turns(&mut lives, renderer, &schemas, cfg);
        if pending.is_empty() {
            break;
        }
        let reqs: Vec<TurnRequest> = pending
            .iter()
            .map(|(i, tokens, budget)| {
                turn_request(&lives[*i], &jobs[*i], &schemas, tokens, *budget)
            })
            .collect();
        let replies = policy.respond(&reqs);
        drop(reqs);
        for ((i, _, budget), reply) in pending.iter().zip(replies) {
            let live = &mut lives[*i];
            match reply {
                Ok(r) => apply_reply(live, &jobs[*i], renderer, &schemas, cfg, r, *budget),
                Err(e) => {
                    live.traj.error = Some(format!("policy: {e}"));
                    live.finished = true;
                }
            }
        }
    }
    for live in &lives {
        on_done(&live.traj);
    }
    lives.into_iter().map(|l| l.traj).collect()
}

/// Candidate files from the ground truth plus seeded random ones (the paper's training
/// prompts); an episode without ground truth fails.
fn gt_plus_random_candidates(lives: &mut [Live], jobs: &[EpisodeJob], cfg: &EpisodeConfig) {
    for (live, job) in lives.iter_mut().zip(jobs) {
        match &job.gt {
            Some(gt) => {
                live.traj.candidate_files =
                    gt_plus_random(&job.index, gt, cfg.num_candidates, job.prompt_seed)
            }
            None => {
                live.traj.error = Some("candidates = gt_plus_random needs ground truth".into());
                live.finished = true;
            }
        }
    }
}

/// The file-level stage (§5.5): one batched turn that names the candidate files.
fn file_stage(
    lives: &mut [Live],
    jobs: &[EpisodeJob],
    policy: &dyn Policy,
    renderer: Option<&Renderer>,
    cfg: &EpisodeConfig,
) {
    let file_msgs: Vec<Vec<Value>> = jobs
        .iter()
        .map(|j| {
            vec![
                json!({"role": "system", "content": prompts::FILE_SYSTEM}),
                json!({"role": "user", "content": prompts::file_user(&j.instance.problem_statement, &j.index)}),
            ]
        })
        .collect();
    let prompt_tokens: Vec<Option<Vec<u32>>> = file_msgs
        .iter()
        .map(|m| renderer.and_then(|r| r.render(m, &[], true).ok().and_then(|t| r.encode(&t).ok())))
        .collect();
    let reqs: Vec<TurnRequest> = jobs
        .iter()
        .zip(&file_msgs)
        .zip(&prompt_tokens)
        .map(|((j, m), t)| TurnRequest {
            task: TaskView {
                instance: &j.instance,
                index: &j.index,
                candidate_files: &[],
                gt: j.gt.as_deref(),
            },
            stage: Stage::FileLevel,
            messages: m,
            tools: &[],
            prompt_tokens: t.as_deref(),
            max_new_tokens: cfg.max_answer_tokens,
            seed: derive_seed(&[j.seed, 0]),
        })
        .collect();
    let replies = policy.respond(&reqs);
    drop(reqs);
    for (((live, job), mut msgs), reply) in lives.iter_mut().zip(jobs).zip(file_msgs).zip(replies) {
        match reply {
            Ok(r) => {
                let files: Vec<String> = parse_answer(&r.text)
                    .files
                    .into_iter()
                    .filter(|f| job.index.file(f).is_some())
                    .take(cfg.num_candidates)
                    .collect();
                msgs.push(json!({"role": "assistant", "content": r.text}));
                live.traj.candidate_files = files.clone();
                live.traj.file_stage = Some(FileStage {
                    messages: msgs,
                    files,
                });
            }
            Err(e) => {
                live.traj.error = Some(format!("file-level stage: {e}"));
                live.finished = true;
            }
        }
    }
}

/// The episodes that take a turn now, with their prompt tokens and token budgets; an
/// episode whose turn cannot be prepared fails.
fn prepare_turns(
    lives: &mut [Live],
    renderer: Option<&Renderer>,
    schemas: &[Value],
    cfg: &EpisodeConfig,
) -> Vec<(usize, Option<Vec<u32>>, usize)> {
    let mut pending = Vec::new();
    for (i, live) in lives.iter_mut().enumerate() {
        if live.finished {
            continue;
        }
        if !live.done_search && live.traj.turns >= cfg.max_turns {
            live.done_search = true;
        }
        match prepare_turn(live, renderer, schemas, cfg) {
            Ok((tokens, budget)) => pending.push((i, tokens, budget)),
            Err(e) => {
                live.traj.error = Some(e);
                live.finished = true;
            }
        }
    }
    pending
}

/// The policy request of an episode's next turn.
fn turn_request<'a>(
    live: &'a Live,
    job: &'a EpisodeJob,
    schemas: &'a [Value],
    tokens: &'a Option<Vec<u32>>,
    budget: usize,
) -> TurnRequest<'a> {
    TurnRequest {
        task: TaskView {
            instance: &job.instance,
            index: &job.index,
            candidate_files: &live.traj.candidate_files,
            gt: job.gt.as_deref(),
        },
        stage: if live.done_search {
            Stage::Summary
        } else {
            Stage::Search {
                turn: live.traj.turns,
            }
        },
        messages: &live.traj.messages,
        tools: if live.done_search { &[] } else { schemas },
        prompt_tokens: tokens.as_deref(),
        max_new_tokens: budget,
        seed: derive_seed(&[job.seed, live.traj.turns as u64 + 1]),
    }
}

/// Records a reply: the summary finishes the episode; a search turn runs its first
/// valid tool call (one tool a turn) and adds the observation, or an error observation.
fn apply_reply(
    live: &mut Live,
    job: &EpisodeJob,
    renderer: Option<&Renderer>,
    schemas: &[Value],
    cfg: &EpisodeConfig,
    reply: TurnReply,
    budget: usize,
) {
    live.traj
        .messages
        .push(json!({"role": "assistant", "content": reply.text}));
    live.traj.truncated_turns += reply.truncated as usize;
    if let (Some(r), Some(ts)) = (renderer, live.tokens.as_mut()) {
        if let Err(e) = ts.push_reply(r, &live.traj.messages, schemas, &reply, budget) {
            live.traj.error = Some(e);
            live.finished = true;
            return;
        }
    }
    if live.done_search {
        finish(live, job, renderer, schemas, cfg, &reply.text);
        return;
    }
    live.traj.turns += 1;
    let turn = parse_turn(&reply.text);
    let mut obs: Vec<String> = Vec::new();
    let limits = ToolLimits {
        max_code_chars: cfg.max_code_chars,
    };
    if let Some(call) = turn
        .ok_calls()
        .find(|c| !matches!(c, tools::ToolCall::Exit))
    {
        let out = tools::execute(&job.index, call, limits);
        live.traj.tool_calls += 1;
        live.traj.tool_hits += out.found as usize;
        obs.push(out.observation);
    }
    if turn.exit {
        live.traj.exited = true;
        live.done_search = true;
    }
    if obs.is_empty() && !turn.exit {
        live.traj.invalid_turns += 1;
        if let Some(e) = turn.error() {
            obs.push(e.observation());
        }
    }
    for o in obs {
        live.traj
            .messages
            .push(json!({"role": "tool", "content": o}));
    }
}

/// Adds the summary request when the search is over, renders the conversation up to the
/// generation prompt and returns its tokens and the turn's token budget. A search that
/// cannot fit another turn plus the summary ends here (`context_exhausted`).
fn prepare_turn(
    live: &mut Live,
    renderer: Option<&Renderer>,
    schemas: &[Value],
    cfg: &EpisodeConfig,
) -> Result<(Option<Vec<u32>>, usize), String> {
    let summary_asked = |live: &Live| {
        live.traj
            .messages
            .last()
            .and_then(|m| m["content"].as_str())
            == Some(prompts::SUMMARY_REQUEST)
    };
    loop {
        if live.done_search && !summary_asked(live) {
            live.traj
                .messages
                .push(json!({"role": "user", "content": prompts::SUMMARY_REQUEST}));
        }
        let budget = if live.done_search {
            cfg.max_answer_tokens
        } else {
            cfg.max_new_tokens
        };
        let (Some(r), Some(ts)) = (renderer, live.tokens.as_mut()) else {
            return Ok((None, budget));
        };
        // The next prompt is recorded only once it is known to fit the context budget:
        // a prompt recorded and then abandoned would leave a dangling generation header.
        let text = r.render(&live.traj.messages, schemas, true)?;
        let (delta, ids) = ts.pending(r, &text)?;
        let used = ts.rec.tokens.len() + ids.len();
        let left = if live.done_search {
            // Room for what the template writes after the answer (end-of-turn marker).
            cfg.max_context_tokens.saturating_sub(used + TAIL_TOKENS)
        } else {
            // Keep room for the summary request and its answer.
            let reserve = cfg.max_answer_tokens + 256;
            cfg.max_context_tokens.saturating_sub(used + reserve)
        };
        if live.done_search && left == 0 {
            return Err(format!(
                "the conversation does not fit the context budget: the prompt for the answer \
                 needs {used} tokens (after {} search turns), and max_context_tokens = {} \
                 leaves no room to answer",
                live.traj.turns, cfg.max_context_tokens
            ));
        }
        if live.done_search || left >= 16 {
            ts.commit(&delta, &ids);
            return Ok((Some(ts.rec.tokens.clone()), budget.min(left)));
        }
        live.traj.context_exhausted = true;
        live.done_search = true;
    }
}

/// Parses and rewards the summary, closes the token record and checks drift.
fn finish(
    live: &mut Live,
    job: &EpisodeJob,
    renderer: Option<&Renderer>,
    schemas: &[Value],
    cfg: &EpisodeConfig,
    answer: &str,
) {
    live.finished = true;
    let parsed = parse_answer(answer);
    live.traj.locations = parsed.locations;
    live.traj.files = parsed.files;
    if let Some(gt) = &job.gt {
        live.traj.reward = Some(reward_of(
            &cfg.reward,
            &live.traj.locations,
            &live.traj.files,
            gt,
        ));
        let named: Vec<String> = gt
            .iter()
            .filter(|l| l.name.is_some())
            .map(Location::key)
            .collect();
        live.traj.gt_hits = Some(crate::reward::hits_at_k(&live.traj.locations, &named, 5));
    }
    if let (Some(r), Some(ts)) = (renderer, live.tokens.as_mut()) {
        let res = r
            .render(&live.traj.messages, schemas, false)
            .and_then(|text| {
                ts.extend_to(r, &text)?;
                // Re-render as history (one more user message after it, so no turn is
                // rendered as the last one) and compare with what was recorded.
                let mut probe = live.traj.messages.clone();
                probe.push(json!({"role": "user", "content": "."}));
                let fresh = r.encode(&r.render(&probe, schemas, false)?)?;
                let n = ts.rec.tokens.len().min(fresh.len());
                Ok(count_drift(&fresh[..n], &ts.rec.tokens))
            });
        match res {
            Ok(d) => ts.rec.drift = d,
            Err(e) => live.traj.error = Some(e),
        }
        live.traj.tokens = Some(std::mem::take(&mut ts.rec));
    }
}

/// The reward of an answer: over `file::name` locations against the named GT
/// locations; when the GT names no location (file-only GT), over the answer's files
/// against the GT files.
pub fn reward_of(reward: &Reward, locations: &[String], files: &[String], gt: &[Location]) -> f64 {
    let named: Vec<String> = gt
        .iter()
        .filter(|l| l.name.is_some())
        .map(Location::key)
        .collect();
    if !named.is_empty() {
        return reward.score(locations, &named);
    }
    let mut gt_files: Vec<String> = Vec::new();
    for l in gt {
        if !gt_files.contains(&l.file) {
            gt_files.push(l.file.clone());
        }
    }
    reward.score(files, &gt_files)
}

/// Positions where two token sequences differ (a length difference counts fully).
pub fn count_drift(a: &[u32], b: &[u32]) -> usize {
    let common = a.iter().zip(b).filter(|(x, y)| x != y).count();
    common + a.len().abs_diff(b.len())
}
