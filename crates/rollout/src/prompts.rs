//! The RepoSearcher prompts (`docs/reposearcher.md` §5): the function-level system and user
//! messages with the candidate files' structure, the summary request, and the
//! file-level stage's messages with the rendered repository tree.

use crate::index::{FileIndex, RepoIndex};

/// System message of the function-level stage.
pub const FUNCTION_SYSTEM: &str = "You are a software engineer localising the cause of a bug. \
You will be provided with a bug report and tools to read the code of the system under test. \
The locations you report may be files, classes or functions (module-level functions or \
methods). Your task is to find the top-5 most likely culprit locations that need to be \
changed to fix the bug.";

/// The final request of the function-level stage (`docs/reposearcher.md` §5.4).
pub const SUMMARY_REQUEST: &str = "Based on the code you have read, give the top-5 most likely \
culprit locations, most likely first. Answer with one fenced block (```) in which each file \
path is on its own line, followed by one line per location in that file: \
`function: Class.method` for a method, `function: func` for a module-level function, or \
`class: Name` for a class. For example:\n\
```\n\
path/a.py\n\
function: Class1.method1\n\
\n\
path/b.py\n\
function: helper\n\
```";

/// System message of the file-level stage.
pub const FILE_SYSTEM: &str = "You are a software engineer localising the cause of a bug. \
You will be provided with a bug report and the structure of a repository. Your task is to \
find the files that most likely need to be changed to fix the bug.";

/// The structure block of one candidate file: its classes with their methods, then its
/// module functions.
pub fn file_block(file: &FileIndex) -> String {
    let mut out = format!("### {}\n", file.path);
    if file.classes.is_empty() && file.functions.is_empty() {
        out.push_str("(no classes or functions)\n");
    }
    for c in &file.classes {
        out.push_str(&format!("class {}\n", c.name));
        if !c.methods.is_empty() {
            let names: Vec<&str> = c.methods.iter().map(|m| m.name.as_str()).collect();
            out.push_str(&format!("    methods: {}\n", names.join(", ")));
        }
    }
    if !file.functions.is_empty() {
        let names: Vec<&str> = file.functions.iter().map(|f| f.name.as_str()).collect();
        out.push_str(&format!("module functions: {}\n", names.join(", ")));
    }
    out
}

/// User message of the function-level stage: the bug report, the candidate files'
/// structure and the instructions. Files missing from the index are listed as such.
pub fn function_user(problem: &str, index: &RepoIndex, candidates: &[String]) -> String {
    let mut out = format!("<bug_report>\n{}\n</bug_report>\n\n", problem.trim_end());
    out.push_str("Candidate files and their structure:\n\n");
    for path in candidates {
        match index.file(path) {
            Some(f) => out.push_str(&file_block(f)),
            None => out.push_str(&format!("### {path}\n(file not found in the repository)\n")),
        }
        out.push('\n');
    }
    out.push_str(
        "Reason step by step about where the bug is, and call one tool at a time to read \
the code of a class, a module function or a method. Take the argument values only from the \
structure listed above: use get_code_of_file_function for module functions and \
get_code_of_class_function for methods. When you are confident you have found the culprit \
locations, call exit().",
    );
    out
}

/// User message of the file-level stage: the bug report and the repository tree
/// (test entries hidden, `docs/reposearcher.md` §2).
pub fn file_user(problem: &str, index: &RepoIndex) -> String {
    format!(
        "<bug_report>\n{}\n</bug_report>\n\n<repository_structure>\n{}</repository_structure>\n\n\
Give the top-5 files (paths relative to the repository root, as in the structure above) that \
most likely need to be changed to fix the bug, most likely first, one per line inside one \
fenced block (```).",
        problem.trim_end(),
        index.render_tree(true)
    )
}

/// A `# Tools` block in the format of Qwen2.5's chat template, for templates that do
/// not render `tools` themselves (appended to the system message).
pub fn tools_block(tools: &[serde_json::Value]) -> String {
    let mut out = String::from(
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        out.push('\n');
        out.push_str(&serde_json::to_string(t).unwrap_or_default());
    }
    out.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \
\"arguments\": <args-json-object>}\n</tool_call>",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_block_lists_structure() {
        let src = b"class A:\n    def m(self):\n        pass\n    def n(self):\n        pass\n\ndef f():\n    pass\n";
        let idx = RepoIndex::from_files(vec![FileIndex::parse("pkg/a.py", src)]);
        let u = function_user("It breaks.\n", &idx, &["pkg/a.py".into(), "gone.py".into()]);
        assert!(
            u.starts_with("<bug_report>\nIt breaks.\n</bug_report>\n"),
            "{u}"
        );
        assert!(u.contains(
            "### pkg/a.py\nclass A\n    methods: m, n\nmodule functions: f\n\n### gone.py\n(file not found in the repository)\n"
        ), "{u}");
        assert!(u.ends_with("call exit()."));
        let f = file_user("x", &idx);
        assert!(f.contains("pkg/\n    a.py\n"), "{f}");
    }
}
