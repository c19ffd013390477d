//! Policies: whatever writes the assistant turns of an episode.
//!
//! The episode runner ([`crate::episode`]) drives many episodes in lock-step and, at each
//! step, hands the active episodes' next turns to [`Policy::respond`] as one batch, so a
//! local model generates them together and an HTTP policy sends them concurrently.
//!
//! Implementations:
//! - [`Oracle`]: knows the ground truth; reads each GT location with the right tool and
//!   answers with the GT (the upper bound, the test driver, and the scripted teacher of
//!   synthetic tasks).
//! - [`crate::bm25::Bm25`]: lexical retrieval from the issue text, no LLM.
//! - [`crate::openai::OpenAiPolicy`]: any OpenAI-compatible chat-completions endpoint.
//! - [`crate::local::LocalModel`]: a `tooltrain-model` checkpoint, batched generation.

use crate::dataset::Instance;
use crate::gt::Location;
use crate::index::RepoIndex;
use crate::tools::ToolCall;
use serde_json::Value;

/// The step of an episode a turn belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// File-level stage: answer a fenced list of the top-5 files.
    FileLevel,
    /// Function-level search turn `turn` (0-based): call a tool or exit.
    Search { turn: usize },
    /// Function-level summary: answer the top-5 locations in a fenced block.
    Summary,
}

/// What a policy may know about the task besides the conversation. LLM policies read
/// only the messages; the baselines and the oracle use the task.
#[derive(Debug, Clone, Copy)]
pub struct TaskView<'a> {
    pub instance: &'a Instance,
    pub index: &'a RepoIndex,
    /// The candidate files listed in the function-level prompt (empty in the file stage).
    pub candidate_files: &'a [String],
    /// Ground truth, when the run has it (only the oracle may use it).
    pub gt: Option<&'a [Location]>,
}

/// One turn to write.
#[derive(Debug, Clone, Copy)]
pub struct TurnRequest<'a> {
    pub task: TaskView<'a>,
    pub stage: Stage,
    /// The conversation so far (OpenAI-style message objects), ending with a user or
    /// tool message.
    pub messages: &'a [Value],
    /// Tool schemas (`{"type": "function", "function": {...}}`); empty in stages
    /// without tools.
    pub tools: &'a [Value],
    /// The conversation's exact tokens including the generation prompt, when the
    /// episode is rendered with a tokenizer. A local model must continue these.
    pub prompt_tokens: Option<&'a [u32]>,
    /// Token budget of this turn.
    pub max_new_tokens: usize,
    /// Per-episode, per-turn seed.
    pub seed: u64,
}

/// A written turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnReply {
    /// The assistant text (without the end-of-turn token).
    pub text: String,
    /// The sampled token ids, when the policy generated tokens itself (ending with the
    /// stop token when one was sampled); `None` for text policies.
    pub tokens: Option<Vec<u32>>,
    /// log p of each sampled token under the model (same length as `tokens`).
    pub logprobs: Option<Vec<f32>>,
    /// The turn hit its token budget.
    pub truncated: bool,
}

impl TurnReply {
    /// A text-only reply.
    pub fn text(text: impl Into<String>) -> TurnReply {
        TurnReply {
            text: text.into(),
            ..TurnReply::default()
        }
    }
}

/// A failed turn; it fails its episode (recorded in the output), never the run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// Writes assistant turns.
pub trait Policy: Send + Sync {
    /// A short name for logs and outputs (`oracle`, `bm25`, `model:<path>`, ...).
    fn name(&self) -> String;
    /// Writes one reply per request, in order.
    fn respond(&self, requests: &[TurnRequest<'_>]) -> Vec<Result<TurnReply, PolicyError>>;
    /// Counters of the work done so far (a local model: prompt reuse and generation phase
    /// times), for reports; `None` when the policy keeps none.
    fn stats(&self) -> Option<Value> {
        None
    }
}

/// The fenced answer block for `locations` (`file::name` or bare files), grouped by
/// file in first-appearance order, in the format of `docs/reposearcher.md` §5.4.
pub fn format_answer<S: AsRef<str>>(locations: &[S]) -> String {
    let mut files: Vec<(String, Vec<String>)> = Vec::new();
    for l in locations {
        let loc = Location::parse(l.as_ref());
        let pos = match files.iter().position(|(f, _)| *f == loc.file) {
            Some(p) => p,
            None => {
                files.push((loc.file.clone(), vec![]));
                files.len() - 1
            }
        };
        if let Some(n) = loc.name {
            files[pos].1.push(n);
        }
    }
    let mut out = String::from("```\n");
    for (i, (f, names)) in files.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(f);
        out.push('\n');
        for n in names {
            let kind = if n.contains('.') || !n.starts_with(|c: char| c.is_uppercase()) {
                "function"
            } else {
                "class"
            };
            out.push_str(&format!("{kind}: {n}\n"));
        }
    }
    out.push_str("```");
    out
}

/// The `<tool_call>` text of a call, as Qwen/Hermes templates write it.
pub fn format_tool_call(call: &ToolCall) -> String {
    let args = match call {
        ToolCall::GetCodeOfClass {
            file_name,
            class_name,
        } => serde_json::json!({"file_name": file_name, "class_name": class_name}),
        ToolCall::GetCodeOfFileFunction {
            file_name,
            func_name,
        } => serde_json::json!({"file_name": file_name, "func_name": func_name}),
        ToolCall::GetCodeOfClassFunction {
            file_name,
            class_name,
            func_name,
        } => {
            serde_json::json!({"file_name": file_name, "class_name": class_name, "func_name": func_name})
        }
        ToolCall::Exit => serde_json::json!({}),
    };
    let body = serde_json::json!({"name": call.name(), "arguments": args});
    format!("<tool_call>\n{body}\n</tool_call>")
}

/// The tool call that reads `loc` in `index`: the method tool for `Class.method` when
/// `Class` has that direct method, the class tool for a class, the module-function tool
/// otherwise. `None` for file-only locations.
pub fn call_for(loc: &Location, index: &RepoIndex) -> Option<ToolCall> {
    let name = loc.name.as_ref()?;
    let file_name = loc.file.clone();
    let file = index.file(&loc.file);
    if let Some((class, method)) = name.rsplit_once('.') {
        return Some(ToolCall::GetCodeOfClassFunction {
            file_name,
            class_name: class.to_string(),
            func_name: method.to_string(),
        });
    }
    if file.is_some_and(|f| f.class(name).is_some()) {
        return Some(ToolCall::GetCodeOfClass {
            file_name,
            class_name: name.clone(),
        });
    }
    Some(ToolCall::GetCodeOfFileFunction {
        file_name,
        func_name: name.clone(),
    })
}

/// The oracle: reads each named GT location with the matching tool (one call a turn),
/// exits, then answers with the GT locations; in the file stage it answers the GT files.
/// Scores 100 on every metric that a perfect top-5 list can reach.
///
/// `reasoning` adds a short sentence before each call, as a teacher would write.
#[derive(Debug, Clone, Default)]
pub struct Oracle {
    pub reasoning: bool,
}

impl Oracle {
    fn reply(&self, r: &TurnRequest<'_>) -> Result<TurnReply, PolicyError> {
        let gt = r
            .task
            .gt
            .ok_or_else(|| PolicyError("the oracle needs ground truth for this instance".into()))?;
        match r.stage {
            Stage::FileLevel => {
                let mut files: Vec<String> = Vec::new();
                for l in gt {
                    if !files.contains(&l.file) {
                        files.push(l.file.clone());
                    }
                }
                Ok(TurnReply::text(format_answer(&files)))
            }
            Stage::Search { turn } => {
                let calls: Vec<(ToolCall, &Location)> = gt
                    .iter()
                    .filter_map(|l| call_for(l, r.task.index).map(|c| (c, l)))
                    .collect();
                match calls.get(turn) {
                    Some((call, loc)) => {
                        let mut text = String::new();
                        if self.reasoning {
                            text.push_str(&format!(
                                "The bug report points at `{}` in {}; let me read it.\n",
                                loc.name.as_deref().unwrap_or_default(),
                                loc.file
                            ));
                        }
                        text.push_str(&format_tool_call(call));
                        Ok(TurnReply::text(text))
                    }
                    None => Ok(TurnReply::text(if self.reasoning {
                        "I have read all the culprit locations.\nexit()"
                    } else {
                        "exit()"
                    })),
                }
            }
            Stage::Summary => {
                let keys: Vec<String> = gt.iter().map(Location::key).collect();
                Ok(TurnReply::text(format_answer(&keys)))
            }
        }
    }
}

impl Policy for Oracle {
    fn name(&self) -> String {
        "oracle".into()
    }

    fn respond(&self, requests: &[TurnRequest<'_>]) -> Vec<Result<TurnReply, PolicyError>> {
        requests.iter().map(|r| self.reply(r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::parse_answer;
    use crate::toolcall::parse_turn;

    #[test]
    fn answer_format_round_trips_through_the_parser() {
        let locs = [
            "a/b.py::Foo.bar",
            "c.py::helper",
            "a/b.py::Baz",
            "d.py",
            "c.py::_private",
        ];
        let text = format_answer(&locs);
        assert_eq!(
            text,
            "```\na/b.py\nfunction: Foo.bar\nclass: Baz\n\nc.py\nfunction: helper\nfunction: _private\n\nd.py\n```"
        );
        let p = parse_answer(&text);
        assert_eq!(
            p.locations,
            [
                "a/b.py::Foo.bar",
                "a/b.py::Baz",
                "c.py::helper",
                "c.py::_private"
            ]
        );
        assert_eq!(p.files, ["a/b.py", "c.py", "d.py"]);
    }

    #[test]
    fn tool_call_text_round_trips_through_the_parser() {
        for call in [
            ToolCall::GetCodeOfClass {
                file_name: "a \"q\".py".into(),
                class_name: "A".into(),
            },
            ToolCall::GetCodeOfFileFunction {
                file_name: "a.py".into(),
                func_name: "f".into(),
            },
            ToolCall::GetCodeOfClassFunction {
                file_name: "a.py".into(),
                class_name: "A".into(),
                func_name: "m".into(),
            },
        ] {
            let t = parse_turn(&format_tool_call(&call));
            assert_eq!(t.calls, vec![Ok(call)]);
            assert!(!t.exit);
        }
    }
}
