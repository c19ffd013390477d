//! A [`Policy`] over any OpenAI-compatible chat-completions endpoint (vLLM, SGLang,
//! llama.cpp, TGI, hosted APIs), over real HTTP with `ureq`.
//!
//! Each turn is one `POST {base_url}/chat/completions` with the conversation so far.
//! [`OpenAiPolicy::respond`] sends the requests of a batch concurrently (at most
//! [`OpenAiConfig::concurrency`] in flight) and returns the replies in request order; a
//! failed request fails its own episode only.
//!
//! **Request body**: `model`, `messages` (tool messages rewritten as user messages when
//! [`OpenAiConfig::observation_role`] is `user`), the token cap under
//! [`OpenAiConfig::max_tokens_field`] (the turn's `max_new_tokens`, or the configured
//! `max_tokens` when smaller), `temperature` / `top_p` when set, `stop` when not empty,
//! `seed` (the turn's seed, low 31 bits: safe for servers that take 32-bit seeds) unless
//! `send_seed` is false, the turn's `tools` schemas when `send_tools` and there are any;
//! then every key of `extra_body` is set at the top level (overriding the above), e.g.
//! `{"chat_template_kwargs": {"enable_thinking": false}}` for vLLM.
//!
//! **Reply**: the text is `choices[0].message.content` (`null` reads as empty); each
//! structured `tool_calls` entry is appended as
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (the `arguments` string
//! parsed as JSON, kept as a raw string when it is not JSON) so that
//! [`crate::toolcall::parse_turn`] sees it; `truncated` is `finish_reason == "length"`.
//!
//! **Errors and retries**: connection errors, timeouts, I/O errors, HTTP 429 and 5xx are
//! retried up to `max_retries` times, waiting the `Retry-After` header's seconds when the
//! server sends one (at most 600 s), else an exponential backoff with jitter
//! (`retry_base_secs * 2^attempt`, capped at `max_backoff_secs`, times a random factor in
//! `[0.5, 1]`). Other HTTP errors are not retried. Every failure is a [`PolicyError`]
//! naming the endpoint and the problem (with the server's error message for an HTTP
//! error), e.g. `POST http://host/v1/chat/completions: HTTP 400: model "x" not found`.
//!
//! **Authentication**: `Authorization: Bearer <key>` with the key read once, at
//! construction, from the environment variable named by `api_key_env`
//! (`OPENAI_API_KEY`), only when it is set and not empty. The key is never logged nor
//! shown by `Debug`.
//!
//! **Config** ([`OpenAiConfig`]; `model` is required):
//! - `base_url` (`http://localhost:8000/v1`), `model`, `api_key_env` (`OPENAI_API_KEY`;
//!   empty for no key);
//! - `temperature`, `top_p` (unset: the server's defaults), `max_tokens` (unset: no cap
//!   beyond the turn's budget), `max_tokens_field` (`max_tokens`; OpenAI's reasoning
//!   models want `max_completion_tokens`), `stop` (`[]`);
//! - `concurrency` (8), `timeout_secs` (600, a whole request), `max_retries` (5),
//!   `retry_base_secs` (1), `max_backoff_secs` (60);
//! - `send_tools` (true), `send_seed` (true), `observation_role` (`tool` | `user`;
//!   `tool`): hosted APIs reject `tool` messages that answer no structured tool call, so
//!   `user` sends each run of consecutive tool messages as one user message, each
//!   observation wrapped in `<tool_response>\n...\n</tool_response>` (as Qwen's template
//!   renders them);
//! - `extra_body` (`{}`): a JSON object merged into the request.

use crate::policy::{Policy, PolicyError, TurnReply, TurnRequest};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::Duration;
use tooltrain_util::retry::{retry, Attempt, Backoff};

/// Role under which tool observations are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObservationRole {
    /// `{"role": "tool", ...}`, as the episode writes them (local servers).
    #[default]
    Tool,
    /// `{"role": "user", "content": "<tool_response>\n...\n</tool_response>"}`.
    User,
}

/// Settings of an OpenAI-compatible endpoint (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    pub base_url: String,
    pub model: String,
    pub api_key_env: String,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<usize>,
    pub max_tokens_field: String,
    pub concurrency: usize,
    pub timeout_secs: f64,
    pub max_retries: u32,
    pub retry_base_secs: f64,
    pub max_backoff_secs: f64,
    pub send_tools: bool,
    pub send_seed: bool,
    pub observation_role: ObservationRole,
    pub extra_body: Map<String, Value>,
    pub stop: Vec<String>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "http://localhost:8000/v1".into(),
            model: String::new(),
            api_key_env: "OPENAI_API_KEY".into(),
            temperature: None,
            top_p: None,
            max_tokens: None,
            max_tokens_field: "max_tokens".into(),
            concurrency: 8,
            timeout_secs: 600.0,
            max_retries: 5,
            retry_base_secs: 1.0,
            max_backoff_secs: 60.0,
            send_tools: true,
            send_seed: true,
            observation_role: ObservationRole::Tool,
            extra_body: Map::new(),
            stop: Vec::new(),
        }
    }
}

impl OpenAiConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let url = self.base_url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || url.trim_end_matches('/').ends_with(':')
            || url.len() <= "https://".len()
        {
            return Err(format!(
                "openai.base_url must be an http:// or https:// URL such as http://localhost:8000/v1, got {:?}",
                self.base_url
            ));
        }
        if self.model.trim().is_empty() {
            return Err("openai.model is required (the model name the server serves)".into());
        }
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(format!("openai.temperature must be >= 0, got {t}"));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("openai.top_p must be in (0, 1], got {p}"));
            }
        }
        if self.max_tokens == Some(0) {
            return Err("openai.max_tokens must be at least 1 (or left out)".into());
        }
        if self.max_tokens_field.trim().is_empty() {
            return Err("openai.max_tokens_field must not be empty".into());
        }
        if self.concurrency == 0 {
            return Err("openai.concurrency must be at least 1".into());
        }
        for (name, v) in [
            ("timeout_secs", self.timeout_secs),
            ("retry_base_secs", self.retry_base_secs),
            ("max_backoff_secs", self.max_backoff_secs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!(
                    "openai.{name} must be a finite number >= 0, got {v}"
                ));
            }
        }
        if self.timeout_secs == 0.0 {
            return Err("openai.timeout_secs must be > 0".into());
        }
        Ok(())
    }
}

/// The policy (see the module documentation).
pub struct OpenAiPolicy {
    cfg: OpenAiConfig,
    /// `{base_url}/chat/completions`.
    url: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    /// `concurrency` threads that send a batch's requests.
    pool: rayon::ThreadPool,
}

impl std::fmt::Debug for OpenAiPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiPolicy")
            .field("cfg", &self.cfg)
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// How a request attempt failed.
enum Failure {
    Retry { msg: String, after: Option<f64> },
    Fatal(String),
}

/// The typed part of a chat-completions request body; the token cap (under a
/// configured field name) and `extra_body` are merged into its JSON afterwards.
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a [Value]>,
}

/// A chat-completions response (the parts the policy reads).
#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ReplyMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ReplyMessage {
    #[serde(default)]
    content: Value,
    #[serde(default)]
    tool_calls: Vec<ReplyToolCall>,
}

/// A structured tool call: `{"function": {"name", "arguments"}}`, or the two keys at
/// the top level.
#[derive(Deserialize)]
struct ReplyToolCall {
    #[serde(default)]
    function: Option<ReplyFunction>,
    #[serde(flatten)]
    direct: ReplyFunction,
}

#[derive(Deserialize)]
struct ReplyFunction {
    #[serde(default)]
    name: Option<Value>,
    /// A JSON string (OpenAI), or an object (some servers).
    #[serde(default)]
    arguments: Option<Value>,
}

/// The text form of a tool call that [`crate::toolcall::parse_turn`] reads.
#[derive(Serialize)]
struct ToolCallText {
    name: Value,
    arguments: Value,
}

impl OpenAiPolicy {
    /// A policy with validated settings; reads the API key from the environment.
    pub fn new(cfg: OpenAiConfig) -> Result<OpenAiPolicy, PolicyError> {
        cfg.validate().map_err(PolicyError)?;
        let url = format!(
            "{}/chat/completions",
            cfg.base_url.trim().trim_end_matches('/')
        );
        let api_key = if cfg.api_key_env.is_empty() {
            None
        } else {
            std::env::var(&cfg.api_key_env)
                .ok()
                .filter(|k| !k.trim().is_empty())
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_secs)))
            .max_idle_connections_per_host(cfg.concurrency.max(3))
            .max_idle_connections(cfg.concurrency.max(10))
            .build()
            .into();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.concurrency.max(1))
            .thread_name(|i| format!("openai-{i}"))
            .build()
            .map_err(|e| PolicyError(format!("starting the request threads: {e}")))?;
        Ok(OpenAiPolicy {
            cfg,
            url,
            api_key,
            agent,
            pool,
        })
    }

    /// The settings.
    pub fn config(&self) -> &OpenAiConfig {
        &self.cfg
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> &str {
        &self.url
    }

    /// Whether an API key was found.
    pub fn has_api_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// The JSON body of the request for one turn.
    pub fn request_body(&self, r: &TurnRequest<'_>) -> Value {
        let cfg = &self.cfg;
        let typed = ChatRequest {
            model: &cfg.model,
            messages: self.messages(r.messages),
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            stop: &cfg.stop,
            seed: cfg.send_seed.then_some(r.seed & 0x7fff_ffff),
            tools: (cfg.send_tools && !r.tools.is_empty()).then_some(r.tools),
        };
        let Ok(Value::Object(mut b)) = serde_json::to_value(&typed) else {
            unreachable!("a struct serialises to a JSON object")
        };
        let max = cfg
            .max_tokens
            .map_or(r.max_new_tokens, |m| m.min(r.max_new_tokens));
        b.insert(cfg.max_tokens_field.clone(), max.into());
        for (k, v) in &cfg.extra_body {
            b.insert(k.clone(), v.clone());
        }
        Value::Object(b)
    }

    fn messages(&self, msgs: &[Value]) -> Vec<Value> {
        if self.cfg.observation_role == ObservationRole::Tool {
            return msgs.to_vec();
        }
        let mut out: Vec<Value> = Vec::with_capacity(msgs.len());
        let mut prev_tool = false;
        for m in msgs {
            if m.get("role").and_then(Value::as_str) != Some("tool") {
                out.push(m.clone());
                prev_tool = false;
                continue;
            }
            let wrapped = format!(
                "<tool_response>\n{}\n</tool_response>",
                content_text(m.get("content").unwrap_or(&Value::Null))
            );
            match out.last_mut() {
                Some(Value::Object(last)) if prev_tool => {
                    let c = last
                        .get("content")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let joined = format!("{c}\n{wrapped}");
                    last.insert("content".into(), joined.into());
                }
                _ => out.push(serde_json::json!({"role": "user", "content": wrapped})),
            }
            prev_tool = true;
        }
        out
    }

    fn error(&self, msg: &str, retries: u32) -> PolicyError {
        let mut s = format!("POST {}: {msg}", self.url);
        if retries > 0 {
            s.push_str(&format!(" (after {retries} retries)"));
        }
        PolicyError(s)
    }

    /// One turn: the request with its retries.
    fn call(&self, r: &TurnRequest<'_>) -> Result<TurnReply, PolicyError> {
        let body = self.request_body(r);
        let backoff = Backoff {
            max_retries: self.cfg.max_retries,
            base_secs: self.cfg.retry_base_secs,
            max_secs: self.cfg.max_backoff_secs,
            jitter: true,
        };
        retry(&backoff, |_| match self.attempt(&body) {
            Ok(reply) => Attempt::Done(reply),
            Err(Failure::Fatal(msg)) => Attempt::Fatal(msg),
            Err(Failure::Retry { msg, after }) => Attempt::Retry { error: msg, after },
        })
        .map_err(|(msg, retries)| self.error(&msg, retries))
    }

    fn attempt(&self, body: &Value) -> Result<TurnReply, Failure> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let resp = req.send_json(body).map_err(transport_failure)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0);
        let text = resp
            .into_body()
            .read_to_string()
            .map_err(transport_failure)?;
        if !(200..300).contains(&status) {
            let msg = format!("HTTP {status}: {}", server_message(&text));
            return Err(if status == 429 || status >= 500 {
                Failure::Retry {
                    msg,
                    after: retry_after,
                }
            } else {
                Failure::Fatal(msg)
            });
        }
        parse_reply(&text).map_err(Failure::Fatal)
    }
}

fn transport_failure(e: ureq::Error) -> Failure {
    use ureq::Error as E;
    match e {
        E::Timeout(t) => Failure::Retry {
            msg: format!("request timed out ({t})"),
            after: None,
        },
        E::Io(ref io) if io.kind() == std::io::ErrorKind::TimedOut => Failure::Retry {
            msg: format!("request timed out ({io})"),
            after: None,
        },
        E::Io(_) | E::ConnectionFailed | E::HostNotFound | E::Protocol(_) | E::BodyStalled => {
            Failure::Retry {
                msg: format!("connection error: {e}"),
                after: None,
            }
        }
        e => Failure::Fatal(format!("request failed: {e}")),
    }
}

/// The text of a message `content`: a string, or the `text` of its parts.
fn content_text(c: &Value) -> String {
    match c {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        other => other.to_string(),
    }
}

/// The error message of an error body (`{"error": {"message": ...}}`, `{"error": "..."}`,
/// `{"message": ...}`, `{"detail": ...}`), else the body itself, cut to 500 characters.
fn server_message(body: &str) -> String {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let e = v.get("error");
        e.and_then(|e| e.get("message"))
            .or(e)
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .map(|m| match m {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
    });
    let msg = from_json.unwrap_or_else(|| body.trim().to_string());
    if msg.is_empty() {
        return "(empty body)".into();
    }
    cut(&msg, 500)
}

fn cut(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// The reply of a successful response body (see the module documentation).
fn parse_reply(body: &str) -> Result<TurnReply, String> {
    let v: ChatResponse = serde_json::from_str(body)
        .map_err(|e| format!("invalid JSON in the response ({e}): {}", cut(body, 200)))?;
    let Some(choice) = v.choices.into_iter().next() else {
        return Err(match v.error {
            Some(_) => format!("error in the response: {}", server_message(body)),
            None => format!("no choices in the response: {}", cut(body, 200)),
        });
    };
    let (content, calls) = choice
        .message
        .map_or((Value::Null, Vec::new()), |m| (m.content, m.tool_calls));
    let mut text = content_text(&content);
    for call in calls {
        let f = call.function.unwrap_or(call.direct);
        let args = match f.arguments {
            Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
            Some(other) => other,
            None => Value::Object(Map::new()),
        };
        let obj = ToolCallText {
            name: f.name.unwrap_or(Value::Null),
            arguments: args,
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        let json = serde_json::to_string(&obj).map_err(|e| e.to_string())?;
        text.push_str(&format!("<tool_call>\n{json}\n</tool_call>"));
    }
    Ok(TurnReply {
        text,
        tokens: None,
        logprobs: None,
        truncated: choice.finish_reason.as_deref() == Some("length"),
    })
}

impl Policy for OpenAiPolicy {
    fn name(&self) -> String {
        format!("openai:{}", self.cfg.model)
    }

    fn respond(&self, requests: &[TurnRequest<'_>]) -> Vec<Result<TurnReply, PolicyError>> {
        // At most `concurrency` requests in flight; replies in request order.
        self.pool.install(|| {
            requests
                .par_iter()
                .with_max_len(1)
                .map(|r| self.call(r))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Instance;
    use crate::index::RepoIndex;
    use crate::policy::{Stage, TaskView};
    use crate::toolcall::parse_turn;
    use crate::tools::ToolCall;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// What the test server answers to one request.
    struct Scripted {
        status: u16,
        body: String,
        headers: Vec<(&'static str, String)>,
        delay: Duration,
    }

    fn ok(body: Value) -> Scripted {
        Scripted {
            status: 200,
            body: body.to_string(),
            headers: vec![],
            delay: Duration::ZERO,
        }
    }

    fn status(code: u16, body: &str) -> Scripted {
        Scripted {
            status: code,
            body: body.into(),
            headers: vec![],
            delay: Duration::ZERO,
        }
    }

    fn completion(content: &str) -> Value {
        json!({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ]})
    }

    #[derive(Debug, Clone)]
    struct Seen {
        body: Value,
        auth: Option<String>,
    }

    /// A real HTTP server on 127.0.0.1 implementing `/v1/chat/completions` with a
    /// handler (request number, request JSON) -> scripted answer; each request is
    /// served on its own thread.
    struct TestServer {
        base_url: String,
        seen: Arc<Mutex<Vec<Seen>>>,
        max_in_flight: Arc<AtomicUsize>,
        server: Arc<tiny_http::Server>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.server.unblock();
        }
    }

    impl TestServer {
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    fn serve(handler: impl Fn(usize, &Value) -> Scripted + Send + Sync + 'static) -> TestServer {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let count = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let (srv, seen2, max2) = (server.clone(), seen.clone(), max_in_flight.clone());
        std::thread::spawn(move || {
            for mut req in srv.incoming_requests() {
                let (seen, max, in_flight, count, handler) = (
                    seen2.clone(),
                    max2.clone(),
                    in_flight.clone(),
                    count.clone(),
                    handler.clone(),
                );
                std::thread::spawn(move || {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    let mut text = String::new();
                    req.as_reader().read_to_string(&mut text).unwrap();
                    let auth = req
                        .headers()
                        .iter()
                        .find(|h| h.field.equiv("Authorization"))
                        .map(|h| h.value.to_string());
                    let answer = if req.url() != "/v1/chat/completions"
                        || *req.method() != tiny_http::Method::Post
                    {
                        status(404, r#"{"error": {"message": "no such route"}}"#)
                    } else {
                        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        seen.lock().unwrap().push(Seen {
                            body: body.clone(),
                            auth,
                        });
                        handler(count.fetch_add(1, Ordering::SeqCst), &body)
                    };
                    std::thread::sleep(answer.delay);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let mut resp = tiny_http::Response::from_string(answer.body)
                        .with_status_code(answer.status);
                    resp.add_header(
                        tiny_http::Header::from_bytes("Content-Type", "application/json").unwrap(),
                    );
                    for (k, v) in answer.headers {
                        resp.add_header(tiny_http::Header::from_bytes(k, v.as_bytes()).unwrap());
                    }
                    let _ = req.respond(resp);
                });
            }
        });
        TestServer {
            base_url: format!("http://127.0.0.1:{port}/v1"),
            seen,
            max_in_flight,
            server,
        }
    }

    fn config(server: &TestServer, key_env: &str) -> OpenAiConfig {
        OpenAiConfig {
            base_url: server.base_url.clone(),
            model: "test-model".into(),
            api_key_env: key_env.into(),
            retry_base_secs: 0.01,
            max_backoff_secs: 0.05,
            timeout_secs: 10.0,
            max_retries: 3,
            ..OpenAiConfig::default()
        }
    }

    struct Fixture {
        instance: Instance,
        index: RepoIndex,
        tools: Vec<Value>,
        messages: Vec<Vec<Value>>,
    }

    fn fixture(n: usize) -> Fixture {
        Fixture {
            instance: Instance {
                instance_id: "t-1".into(),
                repo: String::new(),
                base_commit: String::new(),
                problem_statement: "bug".into(),
                patch: String::new(),
            },
            index: RepoIndex::default(),
            tools: crate::tools::tool_schemas().as_array().unwrap().clone(),
            messages: (0..n)
                .map(|i| {
                    vec![
                        json!({"role": "system", "content": "sys"}),
                        json!({"role": "user", "content": format!("request {i}")}),
                    ]
                })
                .collect(),
        }
    }

    impl Fixture {
        fn requests(&self) -> Vec<TurnRequest<'_>> {
            self.messages
                .iter()
                .enumerate()
                .map(|(i, m)| TurnRequest {
                    task: TaskView {
                        instance: &self.instance,
                        index: &self.index,
                        candidate_files: &[],
                        gt: None,
                    },
                    stage: Stage::Search { turn: 0 },
                    messages: m,
                    tools: &self.tools,
                    prompt_tokens: None,
                    max_new_tokens: 100,
                    seed: 1000 + i as u64,
                })
                .collect()
        }
    }

    fn one(policy: &OpenAiPolicy, fx: &Fixture) -> Result<TurnReply, PolicyError> {
        policy.respond(&fx.requests()[..1]).remove(0)
    }

    #[test]
    fn request_json_auth_header_and_reply() {
        let server = serve(|_, _| ok(completion("Let me read it.")));
        let env = "TOOLTRAIN_TEST_OPENAI_KEY_REQUEST_JSON";
        std::env::set_var(env, "sk-test-123");
        let mut cfg = config(&server, env);
        cfg.temperature = Some(0.7);
        cfg.top_p = Some(0.9);
        cfg.max_tokens = Some(50);
        cfg.stop = vec!["</tool_call>".into()];
        cfg.extra_body = json!({"chat_template_kwargs": {"enable_thinking": false}, "top_k": 20})
            .as_object()
            .unwrap()
            .clone();
        let policy = OpenAiPolicy::new(cfg).unwrap();
        assert!(policy.has_api_key());
        assert!(!format!("{policy:?}").contains("sk-test-123"));
        assert_eq!(policy.name(), "openai:test-model");
        let fx = fixture(1);
        let reply = one(&policy, &fx).unwrap();
        assert_eq!(reply, TurnReply::text("Let me read it."));
        let seen = server.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].auth.as_deref(), Some("Bearer sk-test-123"));
        let b = &seen[0].body;
        assert_eq!(b["model"], "test-model");
        assert_eq!(b["messages"], json!(fx.messages[0]));
        assert_eq!(b["max_tokens"], 50);
        assert_eq!(b["temperature"], 0.7);
        assert_eq!(b["top_p"], 0.9);
        assert_eq!(b["stop"], json!(["</tool_call>"]));
        assert_eq!(b["seed"], 1000);
        assert_eq!(b["tools"], json!(fx.tools));
        assert_eq!(b["tools"].as_array().unwrap().len(), 4);
        assert_eq!(b["chat_template_kwargs"], json!({"enable_thinking": false}));
        assert_eq!(b["top_k"], 20);
    }

    #[test]
    fn no_tools_no_key_and_the_turn_budget_caps_max_tokens() {
        let server = serve(|_, _| ok(completion("ok")));
        let env = "TOOLTRAIN_TEST_OPENAI_KEY_NO_TOOLS";
        std::env::set_var(env, "  ");
        let mut cfg = config(&server, env);
        cfg.send_tools = false;
        cfg.send_seed = false;
        cfg.max_tokens = Some(4096);
        cfg.max_tokens_field = "max_completion_tokens".into();
        let policy = OpenAiPolicy::new(cfg).unwrap();
        assert!(!policy.has_api_key());
        one(&policy, &fixture(1)).unwrap();
        let seen = server.seen();
        assert_eq!(seen[0].auth, None);
        let b = seen[0].body.as_object().unwrap();
        assert!(!b.contains_key("tools"));
        assert!(!b.contains_key("seed"));
        assert!(!b.contains_key("temperature"));
        assert!(!b.contains_key("max_tokens"));
        assert_eq!(b["max_completion_tokens"], 100);
        // An unset variable: no header either.
        let cfg = config(&server, "TOOLTRAIN_TEST_OPENAI_KEY_NEVER_SET");
        let policy = OpenAiPolicy::new(cfg).unwrap();
        one(&policy, &fixture(1)).unwrap();
        assert_eq!(server.seen()[1].auth, None);
    }

    #[test]
    fn batch_is_sent_concurrently_and_answered_in_order() {
        // Echo the request's user message, slowly.
        let server = serve(|_, body| {
            let msg = body["messages"][1]["content"]
                .as_str()
                .unwrap_or("")
                .to_string();
            Scripted {
                delay: Duration::from_millis(300),
                ..ok(completion(&format!("answer to {msg}")))
            }
        });
        let mut cfg = config(&server, "");
        cfg.concurrency = 3;
        let policy = OpenAiPolicy::new(cfg).unwrap();
        let fx = fixture(7);
        let t = Instant::now();
        let out = policy.respond(&fx.requests());
        let elapsed = t.elapsed();
        for (i, r) in out.iter().enumerate() {
            assert_eq!(r.as_ref().unwrap().text, format!("answer to request {i}"));
        }
        assert_eq!(server.max_in_flight.load(Ordering::SeqCst), 3);
        // 7 requests, 3 at a time: 3 rounds of 300 ms, not 7.
        assert!(elapsed < Duration::from_millis(1800), "{elapsed:?}");
        let mut seeds: Vec<u64> = server
            .seen()
            .iter()
            .map(|s| s.body["seed"].as_u64().unwrap())
            .collect();
        seeds.sort();
        assert_eq!(seeds, (1000..1007).collect::<Vec<u64>>());
    }

    #[test]
    fn retries_after_503() {
        let server = serve(|n, _| {
            if n == 0 {
                status(503, "overloaded")
            } else {
                ok(completion("fine"))
            }
        });
        let policy = OpenAiPolicy::new(config(&server, "")).unwrap();
        assert_eq!(one(&policy, &fixture(1)).unwrap().text, "fine");
        assert_eq!(server.seen().len(), 2);
    }

    #[test]
    fn retries_after_429_honouring_retry_after() {
        let server = serve(|n, _| {
            if n == 0 {
                Scripted {
                    headers: vec![("Retry-After", "1".into())],
                    ..status(429, r#"{"error": {"message": "rate limited"}}"#)
                }
            } else {
                ok(completion("fine"))
            }
        });
        let policy = OpenAiPolicy::new(config(&server, "")).unwrap();
        let t = Instant::now();
        assert_eq!(one(&policy, &fixture(1)).unwrap().text, "fine");
        // The backoff alone would wait at most 50 ms.
        assert!(
            t.elapsed() >= Duration::from_millis(950),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(server.seen().len(), 2);
    }

    #[test]
    fn no_retry_on_400_and_the_error_names_endpoint_and_message() {
        let server = serve(|_, _| {
            status(
                400,
                r#"{"error": {"message": "The model `x` does not exist.", "type": "invalid_request_error"}}"#,
            )
        });
        let policy = OpenAiPolicy::new(config(&server, "")).unwrap();
        let e = one(&policy, &fixture(1)).unwrap_err().0;
        assert!(e.contains("The model `x` does not exist."), "{e}");
        assert!(e.contains("HTTP 400"), "{e}");
        assert!(
            e.contains(&format!("{}/chat/completions", server.base_url)),
            "{e}"
        );
        assert_eq!(server.seen().len(), 1);
    }

    #[test]
    fn gives_up_after_max_retries() {
        let server = serve(|_, _| status(500, "internal boom"));
        let mut cfg = config(&server, "");
        cfg.max_retries = 2;
        let policy = OpenAiPolicy::new(cfg).unwrap();
        let e = one(&policy, &fixture(1)).unwrap_err().0;
        assert!(e.contains("HTTP 500: internal boom"), "{e}");
        assert!(e.contains("after 2 retries"), "{e}");
        assert_eq!(server.seen().len(), 3);
    }

    #[test]
    fn timeout_fails_the_request() {
        let server = serve(|_, _| Scripted {
            delay: Duration::from_secs(3),
            ..ok(completion("too late"))
        });
        let mut cfg = config(&server, "");
        cfg.timeout_secs = 0.3;
        cfg.max_retries = 1;
        let policy = OpenAiPolicy::new(cfg).unwrap();
        let t = Instant::now();
        let e = one(&policy, &fixture(1)).unwrap_err().0;
        assert!(e.contains("timed out"), "{e}");
        assert!(e.contains("after 1 retries"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(2000),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(server.seen().len(), 2);
    }

    #[test]
    fn connection_refused_is_an_error_naming_the_endpoint() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let policy = OpenAiPolicy::new(OpenAiConfig {
            base_url: format!("http://127.0.0.1:{port}/v1/"),
            model: "m".into(),
            max_retries: 1,
            retry_base_secs: 0.01,
            ..OpenAiConfig::default()
        })
        .unwrap();
        assert_eq!(
            policy.endpoint(),
            format!("http://127.0.0.1:{port}/v1/chat/completions")
        );
        let e = one(&policy, &fixture(1)).unwrap_err().0;
        assert!(e.contains("connection error"), "{e}");
        assert!(
            e.contains(&format!("127.0.0.1:{port}/v1/chat/completions")),
            "{e}"
        );
    }

    #[test]
    fn structured_tool_calls_become_text_and_length_means_truncated() {
        let server = serve(|_, _| {
            ok(
                json!({"choices": [{"index": 0, "finish_reason": "length", "message": {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {
                        "name": "get_code_of_class",
                        "arguments": "{\"file_name\": \"a.py\", \"class_name\": \"A\"}"}},
                    {"id": "c2", "type": "function", "function": {
                        "name": "get_code_of_file_function", "arguments": "not json"}}
                ]}}]}),
            )
        });
        let policy = OpenAiPolicy::new(config(&server, "")).unwrap();
        let reply = one(&policy, &fixture(1)).unwrap();
        assert!(reply.truncated);
        assert_eq!(
            reply.text,
            "Let me look.\n<tool_call>\n{\"name\":\"get_code_of_class\",\"arguments\":{\"file_name\":\"a.py\",\"class_name\":\"A\"}}\n</tool_call>\n\
             <tool_call>\n{\"name\":\"get_code_of_file_function\",\"arguments\":\"not json\"}\n</tool_call>"
        );
        let turn = parse_turn(&reply.text);
        assert_eq!(
            turn.calls[0],
            Ok(ToolCall::GetCodeOfClass {
                file_name: "a.py".into(),
                class_name: "A".into()
            })
        );
        assert!(turn.calls[1].is_err());
        // content null with a call
        let server = serve(|_, _| {
            ok(
                json!({"choices": [{"finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"type": "function", "function": {"name": "exit", "arguments": "{}"}}]}}]}),
            )
        });
        let policy = OpenAiPolicy::new(config(&server, "")).unwrap();
        let reply = one(&policy, &fixture(1)).unwrap();
        assert_eq!(
            reply.text,
            "<tool_call>\n{\"name\":\"exit\",\"arguments\":{}}\n</tool_call>"
        );
        assert!(!reply.truncated);
        assert!(parse_turn(&reply.text).exit);
    }

    #[test]
    fn observation_role_user_rewrites_tool_messages() {
        let server = serve(|_, _| ok(completion("ok")));
        let mut cfg = config(&server, "");
        cfg.observation_role = ObservationRole::User;
        let policy = OpenAiPolicy::new(cfg).unwrap();
        let mut fx = fixture(1);
        fx.messages[0].extend([
            json!({"role": "assistant", "content": "<tool_call>\n{}\n</tool_call>"}),
            json!({"role": "tool", "content": "obs 1"}),
            json!({"role": "tool", "content": [{"type": "text", "text": "obs 2"}]}),
            json!({"role": "assistant", "content": "exit()"}),
            json!({"role": "tool", "content": "obs 3"}),
            json!({"role": "user", "content": "summarise"}),
        ]);
        one(&policy, &fx).unwrap();
        let sent = server.seen()[0].body["messages"].clone();
        assert_eq!(
            sent,
            json!([
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "request 0"},
                {"role": "assistant", "content": "<tool_call>\n{}\n</tool_call>"},
                {"role": "user", "content": "<tool_response>\nobs 1\n</tool_response>\n<tool_response>\nobs 2\n</tool_response>"},
                {"role": "assistant", "content": "exit()"},
                {"role": "user", "content": "<tool_response>\nobs 3\n</tool_response>"},
                {"role": "user", "content": "summarise"},
            ])
        );
        // The default keeps tool messages.
        let policy = OpenAiPolicy::new(config(&server, "")).unwrap();
        one(&policy, &fx).unwrap();
        assert_eq!(server.seen()[1].body["messages"], json!(fx.messages[0]));
    }

    #[test]
    fn bad_json_no_choices_and_error_bodies_are_errors() {
        let server = serve(|n, _| match n {
            0 => status(200, "<html>not json</html>"),
            1 => ok(json!({"choices": []})),
            _ => ok(json!({"error": {"message": "context length exceeded"}})),
        });
        let mut cfg = config(&server, "");
        cfg.concurrency = 1;
        let policy = OpenAiPolicy::new(cfg).unwrap();
        let fx = fixture(3);
        let out = policy.respond(&fx.requests());
        let errs: Vec<String> = out.into_iter().map(|r| r.unwrap_err().0).collect();
        assert!(
            errs[0].contains("invalid JSON") && errs[0].contains("<html>"),
            "{}",
            errs[0]
        );
        assert!(errs[1].contains("no choices"), "{}", errs[1]);
        assert!(errs[2].contains("context length exceeded"), "{}", errs[2]);
        for e in &errs {
            assert!(e.starts_with(&format!("POST {}/chat/completions: ", server.base_url)));
        }
        // Not retried.
        assert_eq!(server.seen().len(), 3);
    }

    #[test]
    fn config_parsing_and_validation() {
        let c: OpenAiConfig = serde_json::from_value(json!({
            "base_url": "https://api.example.com/v1", "model": "gpt", "observation_role": "user",
            "extra_body": {"a": 1}
        }))
        .unwrap();
        assert_eq!(c.observation_role, ObservationRole::User);
        assert_eq!(c.concurrency, 8);
        assert!(c.send_tools);
        assert_eq!(c.api_key_env, "OPENAI_API_KEY");
        let e = serde_json::from_value::<OpenAiConfig>(json!({"model": "m", "temprature": 1}))
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `temprature`"), "{e}");
        let e = serde_json::from_value::<OpenAiConfig>(json!({"observation_role": "assistant"}))
            .unwrap_err();
        assert!(e.to_string().contains("assistant"), "{e}");
        let e = serde_json::from_value::<OpenAiConfig>(json!({"extra_body": [1]})).unwrap_err();
        assert!(e.to_string().contains("map"), "{e}");
        let bad = |f: fn(&mut OpenAiConfig), field: &str| {
            let mut c = OpenAiConfig {
                model: "m".into(),
                ..OpenAiConfig::default()
            };
            f(&mut c);
            let e = OpenAiPolicy::new(c).unwrap_err().0;
            assert!(e.contains(field), "{e} should name {field}");
        };
        bad(|c| c.model = String::new(), "openai.model");
        bad(|c| c.base_url = "localhost:8000".into(), "openai.base_url");
        bad(|c| c.concurrency = 0, "openai.concurrency");
        bad(|c| c.timeout_secs = 0.0, "openai.timeout_secs");
        bad(|c| c.top_p = Some(1.5), "openai.top_p");
        bad(|c| c.temperature = Some(-1.0), "openai.temperature");
        bad(|c| c.max_tokens = Some(0), "openai.max_tokens");
    }
}
