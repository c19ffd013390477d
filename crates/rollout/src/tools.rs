//! The RepoSearcher tools (`docs/reposearcher.md` §3): execution against a [`RepoIndex`], miss
//! observations, output formatting and limits, and the tools' JSON schemas.

use crate::index::{ClassEntry, FileIndex, RepoIndex};
use serde_json::{json, Value};

/// Tool names, exactly as the model sees them.
pub const GET_CODE_OF_CLASS: &str = "get_code_of_class";
pub const GET_CODE_OF_FILE_FUNCTION: &str = "get_code_of_file_function";
pub const GET_CODE_OF_CLASS_FUNCTION: &str = "get_code_of_class_function";
pub const EXIT: &str = "exit";

/// The reminder appended to every tool observation.
pub const REMINDER: &str =
    "Remember: your goal is to locate the culprit locations of the bug report. \
Call one tool at a time, and call exit() when you have found them.";

/// One parsed tool call (all arguments are strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCall {
    GetCodeOfClass {
        file_name: String,
        class_name: String,
    },
    GetCodeOfFileFunction {
        file_name: String,
        func_name: String,
    },
    GetCodeOfClassFunction {
        file_name: String,
        class_name: String,
        func_name: String,
    },
    Exit,
}

impl ToolCall {
    /// The tool's name.
    pub fn name(&self) -> &'static str {
        match self {
            ToolCall::GetCodeOfClass { .. } => GET_CODE_OF_CLASS,
            ToolCall::GetCodeOfFileFunction { .. } => GET_CODE_OF_FILE_FUNCTION,
            ToolCall::GetCodeOfClassFunction { .. } => GET_CODE_OF_CLASS_FUNCTION,
            ToolCall::Exit => EXIT,
        }
    }

    /// The arguments, by name.
    fn args(&self) -> Vec<(&'static str, &str)> {
        match self {
            ToolCall::GetCodeOfClass {
                file_name,
                class_name,
            } => {
                vec![("file_name", file_name), ("class_name", class_name)]
            }
            ToolCall::GetCodeOfFileFunction {
                file_name,
                func_name,
            } => {
                vec![("file_name", file_name), ("func_name", func_name)]
            }
            ToolCall::GetCodeOfClassFunction {
                file_name,
                class_name,
                func_name,
            } => vec![
                ("file_name", file_name),
                ("class_name", class_name),
                ("func_name", func_name),
            ],
            ToolCall::Exit => vec![],
        }
    }

    /// The call as one line, e.g. `get_code_of_class(file_name="a.py", class_name="A")`.
    /// An argument longer than [`MAX_ARG_CHARS`] is shown cut, with its length.
    pub fn display(&self) -> String {
        let q = |s: &str| match s.char_indices().nth(MAX_ARG_CHARS) {
            None => serde_json::to_string(s).unwrap_or_default(),
            Some((i, _)) => format!(
                "{}... ({} characters)",
                serde_json::to_string(&s[..i]).unwrap_or_default(),
                s.chars().count()
            ),
        };
        match self {
            ToolCall::GetCodeOfClass {
                file_name,
                class_name,
            } => format!(
                "{}(file_name={}, class_name={})",
                self.name(),
                q(file_name),
                q(class_name)
            ),
            ToolCall::GetCodeOfFileFunction {
                file_name,
                func_name,
            } => format!(
                "{}(file_name={}, func_name={})",
                self.name(),
                q(file_name),
                q(func_name)
            ),
            ToolCall::GetCodeOfClassFunction {
                file_name,
                class_name,
                func_name,
            } => format!(
                "{}(file_name={}, class_name={}, func_name={})",
                self.name(),
                q(file_name),
                q(class_name),
                q(func_name)
            ),
            ToolCall::Exit => "exit()".to_string(),
        }
    }
}

/// The longest argument a tool takes: no path or name in a repository is longer, and an
/// observation never echoes more of one.
pub const MAX_ARG_CHARS: usize = 256;

/// Limits for tool output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolLimits {
    /// Maximum characters of code shown; longer code is cut at a line boundary and a
    /// truncation marker line is appended.
    pub max_code_chars: usize,
}

impl Default for ToolLimits {
    fn default() -> Self {
        ToolLimits {
            max_code_chars: 20_000,
        }
    }
}

/// What a tool call produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    /// The observation text shown to the model as the tool message.
    pub observation: String,
    /// Whether the requested code was found.
    pub found: bool,
    /// Whether the call ends the search phase (`exit`).
    pub exit: bool,
}

/// Why a `file_name` argument was rejected before lookup.
fn check_path(file_name: &str) -> Result<String, String> {
    let p = file_name.trim().replace('\\', "/");
    let p = p.strip_prefix("./").unwrap_or(&p).to_string();
    let bytes = p.as_bytes();
    let absolute = p.starts_with('/')
        || p.starts_with('~')
        || (bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic());
    if absolute {
        return Err(format!(
            "Invalid file_name {file_name:?}: absolute paths are not allowed; use a path relative to the repository root (e.g. \"pkg/module.py\")."
        ));
    }
    if p.split('/').any(|c| c == "..") || p.contains('\0') {
        return Err(format!(
            "Invalid file_name {file_name:?}: the path may not leave the repository (no \"..\"); use a path relative to the repository root."
        ));
    }
    Ok(p)
}

fn cut(code: &str, limits: ToolLimits) -> String {
    if code.len() <= limits.max_code_chars {
        return code.to_string();
    }
    let total = code.lines().count();
    let mut out = String::new();
    let mut shown = 0;
    for line in code.lines() {
        if out.len() + line.len() + 1 > limits.max_code_chars {
            break;
        }
        out.push_str(line);
        out.push('\n');
        shown += 1;
    }
    if shown == 0 {
        // A single enormous line: cut it at a char boundary.
        let mut end = limits.max_code_chars.min(code.len());
        while !code.is_char_boundary(end) {
            end -= 1;
        }
        out.push_str(&code[..end]);
        out.push('\n');
    }
    out.push_str(&format!(
        "... [output truncated: showing {shown} of {total} lines]"
    ));
    out
}

fn found(call: &ToolCall, code: &str, limits: ToolLimits) -> ToolOutcome {
    ToolOutcome {
        observation: format!(
            "Result of {}:\n<code>\n{}\n</code>\n{REMINDER}",
            call.display(),
            cut(code, limits)
        ),
        found: true,
        exit: false,
    }
}

fn miss(call: &ToolCall, msg: String) -> ToolOutcome {
    ToolOutcome {
        observation: format!("Result of {}:\n{msg}\n{REMINDER}", call.display()),
        found: false,
        exit: false,
    }
}

fn list(names: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = names.collect();
    if v.is_empty() {
        return "none".to_string();
    }
    let n = v.len();
    let mut s = v.into_iter().take(30).collect::<Vec<_>>().join(", ");
    if n > 30 {
        s.push_str(&format!(", ... ({n} in all)"));
    }
    s
}

fn method_owner<'a>(file: &'a FileIndex, func: &str) -> Option<&'a str> {
    file.classes
        .iter()
        .find(|c| c.methods.iter().any(|m| m.name == func))
        .map(|c| c.name.as_str())
}

/// Execute a tool call against the index.
pub fn execute(index: &RepoIndex, call: &ToolCall, limits: ToolLimits) -> ToolOutcome {
    let file_name = match call {
        ToolCall::Exit => {
            return ToolOutcome {
                observation: "The search phase has ended.".to_string(),
                found: true,
                exit: true,
            }
        }
        ToolCall::GetCodeOfClass { file_name, .. }
        | ToolCall::GetCodeOfFileFunction { file_name, .. }
        | ToolCall::GetCodeOfClassFunction { file_name, .. } => file_name,
    };
    if let Some((name, v)) = call
        .args()
        .into_iter()
        .find(|(_, v)| v.chars().count() > MAX_ARG_CHARS)
    {
        return miss(
            call,
            format!(
                "Invalid {name}: it is {} characters long; paths and names are at most \
                 {MAX_ARG_CHARS} characters.",
                v.chars().count()
            ),
        );
    }
    let path = match check_path(file_name) {
        Ok(p) => p,
        Err(msg) => return miss(call, msg),
    };
    let Some(file) = index.file(&path) else {
        return miss(
            call,
            format!(
                "File {file_name:?} was not found in the repository. Use a repository-relative file path exactly as listed (e.g. \"pkg/module.py\")."
            ),
        );
    };
    let code = |start: usize, end: usize| found(call, &file.lines(start, end), limits);
    let res = match call {
        ToolCall::GetCodeOfClass { class_name, .. } => file
            .class(class_name)
            .map(|c| code(c.start_line, c.end_line))
            .ok_or_else(|| class_miss(file, &path, class_name, None)),
        ToolCall::GetCodeOfFileFunction { func_name, .. } => file
            .function(func_name)
            .map(|f| code(f.start_line, f.end_line))
            .ok_or_else(|| function_miss(file, &path, func_name)),
        ToolCall::GetCodeOfClassFunction {
            class_name,
            func_name,
            ..
        } => match file.class(class_name) {
            None => Err(class_miss(file, &path, class_name, Some(func_name))),
            Some(class) => class
                .methods
                .iter()
                .find(|m| &m.name == func_name)
                .map(|m| code(m.start_line, m.end_line))
                .ok_or_else(|| method_miss(file, &path, class, func_name)),
        },
        ToolCall::Exit => unreachable!("handled above"),
    };
    res.unwrap_or_else(|msg| miss(call, msg))
}

/// Why class `class_name` is not in `file`, with a hint when the name is something else
/// there; `method` is the method the call asked for (get_code_of_class_function).
fn class_miss(file: &FileIndex, path: &str, class_name: &str, method: Option<&str>) -> String {
    let mut msg = format!("Class {class_name:?} was not found in file {path:?}.");
    match method {
        None if file.function(class_name).is_some() => msg.push_str(&format!(
            " {class_name:?} is a module-level function of this file: use get_code_of_file_function(file_name, func_name)."
        )),
        None => {
            if let Some(owner) = method_owner(file, class_name) {
                msg.push_str(&format!(
                    " {class_name:?} is a method of class {owner:?}: use get_code_of_class_function(file_name, class_name, func_name)."
                ));
            }
        }
        Some(func_name) if file.function(func_name).is_some() => msg.push_str(&format!(
            " {func_name:?} is a module-level function of this file: use get_code_of_file_function(file_name, func_name)."
        )),
        Some(_) => {}
    }
    msg.push_str(&format!(
        " Classes in this file: {}.",
        list(file.classes.iter().map(|c| c.name.clone()))
    ));
    msg
}

/// Why module-level function `func_name` is not in `file`, with a hint when it is a
/// method (also written `Class.method`) or a class.
fn function_miss(file: &FileIndex, path: &str, func_name: &str) -> String {
    let mut msg = format!("Module-level function {func_name:?} was not found in file {path:?}.");
    let (cls, meth) = match func_name.rsplit_once('.') {
        Some((c, m)) => (Some(c), m),
        None => (None, func_name),
    };
    if let Some(owner) = cls
        .and_then(|c| file.class(c))
        .filter(|c| c.methods.iter().any(|m| m.name == meth))
        .map(|c| c.name.as_str())
        .or_else(|| method_owner(file, meth))
    {
        msg.push_str(&format!(
            " {meth:?} is a method of class {owner:?}: use get_code_of_class_function(file_name, class_name, func_name) for methods."
        ));
    } else if file.class(func_name).is_some() {
        msg.push_str(&format!(
            " {func_name:?} is a class: use get_code_of_class(file_name, class_name)."
        ));
    }
    msg.push_str(&format!(
        " Module-level functions in this file: {}.",
        list(file.functions.iter().map(|f| f.name.clone()))
    ));
    msg
}

/// Why method `func_name` is not in `class`, with a hint when it is elsewhere.
fn method_miss(file: &FileIndex, path: &str, class: &ClassEntry, func_name: &str) -> String {
    let mut msg = format!(
        "Method {func_name:?} was not found in class {:?} of file {path:?}.",
        class.name
    );
    if file.function(func_name).is_some() {
        msg.push_str(&format!(
            " {func_name:?} is a module-level function of this file: use get_code_of_file_function(file_name, func_name)."
        ));
    } else if let Some(owner) = method_owner(file, func_name) {
        msg.push_str(&format!(" It is a method of class {owner:?}."));
    }
    msg.push_str(&format!(
        " Methods of {:?}: {}.",
        class.name,
        list(class.methods.iter().map(|m| m.name.clone()))
    ));
    msg
}

fn string_prop(desc: &str) -> Value {
    json!({"type": "string", "description": desc})
}

/// The four tools in OpenAI function format
/// (`[{"type": "function", "function": {"name", "description", "parameters"}}]`),
/// for the chat template's `tools` variable.
pub fn tool_schemas() -> Value {
    let file = string_prop("Repository-relative path of the Python file, e.g. \"pkg/module.py\".");
    json!([
        {"type": "function", "function": {
            "name": GET_CODE_OF_CLASS,
            "description": "Get the source code of a class in a file.",
            "parameters": {"type": "object", "properties": {
                "file_name": file,
                "class_name": string_prop("Name of the class."),
            }, "required": ["file_name", "class_name"]}}},
        {"type": "function", "function": {
            "name": GET_CODE_OF_FILE_FUNCTION,
            "description": "Get the source code of a module-level function (not a method) in a file.",
            "parameters": {"type": "object", "properties": {
                "file_name": file,
                "func_name": string_prop("Name of the module-level function."),
            }, "required": ["file_name", "func_name"]}}},
        {"type": "function", "function": {
            "name": GET_CODE_OF_CLASS_FUNCTION,
            "description": "Get the source code of a method of a class in a file.",
            "parameters": {"type": "object", "properties": {
                "file_name": file,
                "class_name": string_prop("Name of the class."),
                "func_name": string_prop("Name of the method."),
            }, "required": ["file_name", "class_name", "func_name"]}}},
        {"type": "function", "function": {
            "name": EXIT,
            "description": "End the search when you have found the culprit locations.",
            "parameters": {"type": "object", "properties": {}, "required": []}}},
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_arguments_are_not_echoed() {
        let idx = RepoIndex::from_files(vec![FileIndex::parse("a.py", b"class A:\n    pass\n")]);
        let huge = "x".repeat(2_000_000);
        for call in [
            ToolCall::GetCodeOfClass {
                file_name: huge.clone(),
                class_name: "A".into(),
            },
            ToolCall::GetCodeOfClass {
                file_name: "a.py".into(),
                class_name: huge.clone(),
            },
            ToolCall::GetCodeOfClassFunction {
                file_name: "a.py".into(),
                class_name: "A".into(),
                func_name: huge.clone(),
            },
        ] {
            let out = execute(&idx, &call, ToolLimits::default());
            assert!(!out.found);
            assert!(
                out.observation.len() < 2_000,
                "{} bytes",
                out.observation.len()
            );
            assert!(
                out.observation.contains("2000000 characters"),
                "{}",
                out.observation
            );
        }
        // A normal call is shown whole.
        let ok = ToolCall::GetCodeOfClass {
            file_name: "a.py".into(),
            class_name: "A".into(),
        };
        assert_eq!(
            ok.display(),
            "get_code_of_class(file_name=\"a.py\", class_name=\"A\")"
        );
    }
    use crate::index::FileIndex;

    fn idx() -> RepoIndex {
        let src = "def helper():\n    return 1\n\nclass A:\n    def m(self):\n        return 2\n";
        RepoIndex::from_files(vec![FileIndex::parse("pkg/a.py", src.as_bytes())])
    }

    fn run(call: ToolCall) -> ToolOutcome {
        execute(&idx(), &call, ToolLimits::default())
    }

    #[test]
    fn finds_code() {
        let o = run(ToolCall::GetCodeOfClassFunction {
            file_name: "pkg/a.py".into(),
            class_name: "A".into(),
            func_name: "m".into(),
        });
        assert!(o.found);
        assert_eq!(
            o.observation,
            format!("Result of get_code_of_class_function(file_name=\"pkg/a.py\", class_name=\"A\", func_name=\"m\"):\n<code>\n    def m(self):\n        return 2\n</code>\n{REMINDER}")
        );
        let o = run(ToolCall::GetCodeOfFileFunction {
            file_name: "./pkg/a.py".into(),
            func_name: "helper".into(),
        });
        assert!(o
            .observation
            .contains("<code>\ndef helper():\n    return 1\n</code>"));
        let o = run(ToolCall::GetCodeOfClass {
            file_name: "pkg/a.py".into(),
            class_name: "A".into(),
        });
        assert!(o.found && o.observation.contains("class A:\n    def m(self)"));
    }

    #[test]
    fn misses_say_what_and_hint() {
        let o = run(ToolCall::GetCodeOfFileFunction {
            file_name: "pkg/a.py".into(),
            func_name: "m".into(),
        });
        assert!(!o.found);
        assert!(o
            .observation
            .contains("Module-level function \"m\" was not found"));
        assert!(o.observation.contains("get_code_of_class_function"));
        let o = run(ToolCall::GetCodeOfClassFunction {
            file_name: "pkg/a.py".into(),
            class_name: "A".into(),
            func_name: "helper".into(),
        });
        assert!(o
            .observation
            .contains("Method \"helper\" was not found in class \"A\""));
        assert!(o.observation.contains("use get_code_of_file_function"));
        let o = run(ToolCall::GetCodeOfClass {
            file_name: "pkg/b.py".into(),
            class_name: "A".into(),
        });
        assert!(o.observation.contains("File \"pkg/b.py\" was not found"));
        let o = run(ToolCall::GetCodeOfClass {
            file_name: "pkg/a.py".into(),
            class_name: "helper".into(),
        });
        assert!(o.observation.contains("Class \"helper\" was not found"));
        assert!(o.observation.contains("use get_code_of_file_function"));
    }

    #[test]
    fn rejects_escapes() {
        for p in [
            "../etc/passwd",
            "/etc/passwd",
            "pkg/../../x.py",
            "C:\\x.py",
            "~/x.py",
        ] {
            let o = run(ToolCall::GetCodeOfClass {
                file_name: p.into(),
                class_name: "A".into(),
            });
            assert!(
                !o.found && o.observation.contains("Invalid file_name"),
                "{p}"
            );
        }
    }

    #[test]
    fn truncates_visibly() {
        let body: String = (0..1000).map(|i| format!("    x{i} = {i}\n")).collect();
        let src = format!("class Big:\n{body}");
        let idx = RepoIndex::from_files(vec![FileIndex::parse("b.py", src.as_bytes())]);
        let call = ToolCall::GetCodeOfClass {
            file_name: "b.py".into(),
            class_name: "Big".into(),
        };
        let o = execute(
            &idx,
            &call,
            ToolLimits {
                max_code_chars: 200,
            },
        );
        assert!(o.observation.contains("... [output truncated: showing"));
        assert!(o.observation.contains("of 1001 lines]"));
        assert!(o.observation.len() < 600);
    }

    #[test]
    fn schemas_have_exact_names_and_required_args() {
        let s = tool_schemas();
        let names: Vec<_> = s
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                GET_CODE_OF_CLASS,
                GET_CODE_OF_FILE_FUNCTION,
                GET_CODE_OF_CLASS_FUNCTION,
                EXIT
            ]
        );
        assert_eq!(
            s[2]["function"]["parameters"]["required"],
            json!(["file_name", "class_name", "func_name"])
        );
    }
}
