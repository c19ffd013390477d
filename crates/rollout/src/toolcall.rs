//! Parser of Qwen/Hermes tool calls (`docs/reposearcher.md` §4):
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
//!
//! Accepts whitespace around the JSON, several blocks in one turn, `parameters` as an
//! alias of `arguments`, `arguments` given as a JSON-encoded string, and a final block
//! left unclosed (generation stopped at `</tool_call>`). Extra, unknown arguments are
//! ignored. Every failure is a [`ToolCallError`] whose [`ToolCallError::observation`]
//! can be shown to the model; it includes an example of the expected format.

use crate::tools::{
    ToolCall, EXIT, GET_CODE_OF_CLASS, GET_CODE_OF_CLASS_FUNCTION, GET_CODE_OF_FILE_FUNCTION,
};
use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// An example of a well-formed call, included in every error observation.
pub const FORMAT_EXAMPLE: &str = "<tool_call>\n{\"name\": \"get_code_of_class\", \"arguments\": {\"file_name\": \"pkg/module.py\", \"class_name\": \"MyClass\"}}\n</tool_call>";

/// Why a tool call could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolCallError {
    #[error("no tool call found: call a tool inside <tool_call></tool_call> tags, or call exit() to end the search")]
    NoToolCall,
    #[error("the tool call is not valid JSON ({0})")]
    MalformedJson(String),
    #[error(
        "the tool call must be a JSON object with a \"name\" string and an \"arguments\" object"
    )]
    BadShape,
    #[error("unknown tool {0:?}; available tools: get_code_of_class, get_code_of_file_function, get_code_of_class_function, exit")]
    UnknownTool(String),
    #[error("tool {tool:?} is missing the required argument {arg:?}")]
    MissingArgument { tool: String, arg: String },
    #[error("argument {arg:?} of tool {tool:?} must be a string")]
    NotAString { tool: String, arg: String },
}

impl ToolCallError {
    /// The observation shown to the model: the error and an example of the format.
    pub fn observation(&self) -> String {
        format!(
            "Error: {self}.\nCall exactly one tool per turn, in this format:\n{FORMAT_EXAMPLE}\nThe other tools are get_code_of_file_function(file_name, func_name) for module-level functions and get_code_of_class_function(file_name, class_name, func_name) for methods; call exit() when you are done."
        )
    }
}

/// The parse of one assistant turn.
///
/// `exit` follows `docs/reposearcher.md` §4 with one refinement: see [`mentions_exit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTurn {
    /// One entry per `<tool_call>` block, in order.
    pub calls: Vec<Result<ToolCall, ToolCallError>>,
    /// The turn ends the search phase: its text contains `exit()` or it calls `exit`.
    pub exit: bool,
}

impl ParsedTurn {
    /// The successfully parsed calls.
    pub fn ok_calls(&self) -> impl Iterator<Item = &ToolCall> {
        self.calls.iter().filter_map(|c| c.as_ref().ok())
    }

    /// The error to show when the turn has no usable call and does not exit.
    pub fn error(&self) -> Option<ToolCallError> {
        if self.exit || self.ok_calls().next().is_some() {
            return None;
        }
        Some(
            self.calls
                .iter()
                .find_map(|c| c.clone().err())
                .unwrap_or(ToolCallError::NoToolCall),
        )
    }
}

/// Parse all tool-call blocks of an assistant turn.
pub fn parse_turn(text: &str) -> ParsedTurn {
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(OPEN) {
        let after = &rest[i + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(j) => (&after[..j], &after[j + CLOSE.len()..]),
            None => (after, ""),
        };
        calls.push(parse_call(body));
        rest = next;
    }
    let exit = mentions_exit(text) || calls.iter().any(|c| matches!(c, Ok(ToolCall::Exit)));
    ParsedTurn { calls, exit }
}

/// Whether `text` contains a standalone `exit()`: occurrences that are part of a longer
/// name or attribute (`sys.exit()`, `os._exit()`, `my_exit()`) do not count, so quoting
/// code does not end the search.
pub fn mentions_exit(text: &str) -> bool {
    text.match_indices("exit()").any(|(i, _)| {
        !text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
    })
}

/// Parse the JSON body of one `<tool_call>` block.
pub fn parse_call(body: &str) -> Result<ToolCall, ToolCallError> {
    let body = body.trim();
    let body = strip_code_fence(body);
    let value: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => {
            // Tolerate text around the object: take the outermost braces.
            match (body.find('{'), body.rfind('}')) {
                (Some(a), Some(b)) if a < b => serde_json::from_str(&body[a..=b])
                    .map_err(|_| ToolCallError::MalformedJson(e.to_string()))?,
                _ => return Err(ToolCallError::MalformedJson(e.to_string())),
            }
        }
    };
    let obj = value.as_object().ok_or(ToolCallError::BadShape)?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or(ToolCallError::BadShape)?
        .trim()
        .to_string();
    let empty = serde_json::Map::new();
    let args_owned;
    let args = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(Value::String(s)) if s.trim().is_empty() => &empty,
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => {
                args_owned = m;
                &args_owned
            }
            _ => return Err(ToolCallError::BadShape),
        },
        Some(_) => return Err(ToolCallError::BadShape),
    };
    let get = |arg: &str| -> Result<String, ToolCallError> {
        match args.get(arg) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) => Err(ToolCallError::MissingArgument {
                tool: name.clone(),
                arg: arg.to_string(),
            }),
            Some(_) => Err(ToolCallError::NotAString {
                tool: name.clone(),
                arg: arg.to_string(),
            }),
        }
    };
    match name.as_str() {
        GET_CODE_OF_CLASS => Ok(ToolCall::GetCodeOfClass {
            file_name: get("file_name")?,
            class_name: get("class_name")?,
        }),
        GET_CODE_OF_FILE_FUNCTION => Ok(ToolCall::GetCodeOfFileFunction {
            file_name: get("file_name")?,
            func_name: get("func_name")?,
        }),
        GET_CODE_OF_CLASS_FUNCTION => Ok(ToolCall::GetCodeOfClassFunction {
            file_name: get("file_name")?,
            class_name: get("class_name")?,
            func_name: get("func_name")?,
        }),
        EXIT => Ok(ToolCall::Exit),
        _ => Err(ToolCallError::UnknownTool(name)),
    }
}

fn strip_code_fence(s: &str) -> &str {
    let Some(inner) = s.strip_prefix("```") else {
        return s;
    };
    let inner = inner.strip_prefix("json").unwrap_or(inner);
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn class_call(f: &str, c: &str) -> ToolCall {
        ToolCall::GetCodeOfClass {
            file_name: f.into(),
            class_name: c.into(),
        }
    }

    #[test]
    fn parses_canonical_and_whitespace() {
        let t = parse_turn("I will look.\n<tool_call>\n{\"name\": \"get_code_of_class\", \"arguments\": {\"file_name\": \"a.py\", \"class_name\": \"A\"}}\n</tool_call>");
        assert_eq!(t.calls, vec![Ok(class_call("a.py", "A"))]);
        assert!(!t.exit && t.error().is_none());
        let t = parse_turn("<tool_call>   \n\n  {\"name\":\"get_code_of_class\",\"arguments\":{\"file_name\":\"a.py\",\"class_name\":\"A\"}}   \t</tool_call>");
        assert_eq!(t.calls, vec![Ok(class_call("a.py", "A"))]);
    }

    #[test]
    fn several_calls_alias_and_unclosed() {
        let t = parse_turn(concat!(
            "<tool_call>\n{\"name\": \"get_code_of_file_function\", \"parameters\": {\"file_name\": \"a.py\", \"func_name\": \"f\"}}\n</tool_call>\n",
            "<tool_call>\n{\"name\": \"get_code_of_class_function\", \"arguments\": \"{\\\"file_name\\\": \\\"a.py\\\", \\\"class_name\\\": \\\"A\\\", \\\"func_name\\\": \\\"m\\\"}\"}\n"
        ));
        assert_eq!(
            t.calls,
            vec![
                Ok(ToolCall::GetCodeOfFileFunction {
                    file_name: "a.py".into(),
                    func_name: "f".into()
                }),
                Ok(ToolCall::GetCodeOfClassFunction {
                    file_name: "a.py".into(),
                    class_name: "A".into(),
                    func_name: "m".into()
                }),
            ]
        );
    }

    #[test]
    fn errors_are_typed_and_explained() {
        let t = parse_turn("<tool_call>\n{\"name\": \"get_code_of_class\", \"arguments\": {\"file_name\": \"a.py\"\n</tool_call>");
        assert!(matches!(t.calls[0], Err(ToolCallError::MalformedJson(_))));
        let e = t.error().unwrap();
        assert!(e.observation().contains(FORMAT_EXAMPLE));
        let t = parse_turn("<tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call>");
        assert_eq!(
            t.calls,
            vec![Err(ToolCallError::UnknownTool("search".into()))]
        );
        let t = parse_turn("<tool_call>{\"name\": \"get_code_of_class\", \"arguments\": {\"file_name\": \"a.py\"}}</tool_call>");
        assert_eq!(
            t.calls,
            vec![Err(ToolCallError::MissingArgument {
                tool: "get_code_of_class".into(),
                arg: "class_name".into()
            })]
        );
        let t = parse_turn("<tool_call>{\"name\": \"get_code_of_class\", \"arguments\": {\"file_name\": \"a.py\", \"class_name\": 3}}</tool_call>");
        assert!(matches!(t.calls[0], Err(ToolCallError::NotAString { .. })));
        let t = parse_turn("Let me think about it.");
        assert!(t.calls.is_empty());
        assert_eq!(t.error(), Some(ToolCallError::NoToolCall));
    }

    #[test]
    fn exit_by_text_or_call() {
        assert!(parse_turn("I am confident now. exit()").exit);
        assert!(parse_turn("exit()").exit);
        assert!(!parse_turn("The code calls sys.exit() and os._exit() here.").exit);
        let t = parse_turn("<tool_call>\n{\"name\": \"exit\", \"arguments\": {}}\n</tool_call>");
        assert!(t.exit);
        assert_eq!(t.calls, vec![Ok(ToolCall::Exit)]);
        let t = parse_turn("<tool_call>\n{\"name\": \"exit\"}\n</tool_call>");
        assert!(t.exit && t.error().is_none());
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = parse_turn(&s);
        }

        #[test]
        fn never_panics_inside_tags(s in ".*", t in "[{}\\[\\]\":, a-z_]*") {
            let _ = parse_turn(&format!("<tool_call>{s}</tool_call><tool_call>{{{t}"));
            let _ = parse_turn(&format!("<tool_call>\n{{\"name\": \"get_code_of_class\", \"arguments\": {t}}}\n</tool_call>"));
        }
    }
}
