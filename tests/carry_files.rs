//! What an emitted checkpoint carries besides its weights: every file a loader needs to
//! tokenize, chat and generate (byte for byte), and the fields of the base model's
//! `config.json` that upmix does not model. SmolLM2 as transformers 5 saves it is checked
//! the same way in tests/smollm2.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::model_dir;
use upmix::frontend::TextTokenizer;

const TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// The files a transformers 5 tokenizer save writes beside tokenizer.json, with the chat
/// template in `chat_template.jinja` (not in tokenizer_config.json).
const EXTRA_FILES: &[(&str, &str)] = &[
    ("chat_template.jinja", TEMPLATE),
    (
        "tokenizer_config.json",
        r#"{"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 128}"#,
    ),
    ("special_tokens_map.json", r#"{"bos_token": "<s>"}"#),
    ("added_tokens.json", r#"{"<extra>": 256}"#),
    (
        "additional_chat_templates/tool_use.jinja",
        "{{ messages[0].content }}",
    ),
];

/// A copy of fixture `name` in `dir`, with the extra tokenizer files and `edit` applied
/// to its config.json.
fn checkpoint(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(to.join("additional_chat_templates")).unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    for (file, text) in EXTRA_FILES {
        std::fs::write(to.join(file), text).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(to.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(to.join("config.json"), config.to_string()).unwrap();
    to
}

fn run(dir: &Path, pipeline: &str) {
    let path = dir.join("p.ron");
    std::fs::write(&path, pipeline).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_upmix"))
        .args(["run", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn tokenizer_files_chat_template_and_config_fields_survive_a_cast() {
    let tmp = tempfile::tempdir().unwrap();
    let input = checkpoint(tmp.path(), "llama", |c| {
        c["pad_token_id"] = 0.into();
        c["unk_token_id"] = 3.into();
        c["eos_token_id"] = serde_json::json!([2, 5]);
        c["my_extra"] = serde_json::json!({ "kept": true });
        c["torch_dtype"] = "float32".into();
    });
    let out = tmp.path().join("out");
    run(
        tmp.path(),
        &format!(
            "Pipeline(models: {{ \"m\": Hf(\"{}\") }}, passes: [ Cast(model: \"m\", dtype: \"bf16\") ], emit: [ Hf(model: \"m\", dir: \"{}\") ])",
            input.display(),
            out.display()
        ),
    );
    for file in EXTRA_FILES
        .iter()
        .map(|(f, _)| *f)
        .chain(["tokenizer.json", "generation_config.json"])
    {
        assert_eq!(
            std::fs::read(out.join(file)).ok(),
            std::fs::read(input.join(file)).ok(),
            "{file} is not carried through byte for byte"
        );
    }
    let c = config(&out);
    assert_eq!(c["pad_token_id"], 0);
    assert_eq!(c["unk_token_id"], 3);
    assert_eq!(c["eos_token_id"], serde_json::json!([2, 5]));
    assert_eq!(c["my_extra"], serde_json::json!({ "kept": true }));
    assert_eq!(c["initializer_range"], 0.02);
    assert_eq!(
        (&c["dtype"], &c["torch_dtype"]),
        (&"bfloat16".into(), &"bfloat16".into())
    );

    // The chat template is read from chat_template.jinja, in the input and the output.
    for dir in [&input, &out] {
        let t = TextTokenizer::load(dir).unwrap();
        assert_eq!(
            t.apply_chat_template(&[("user", "hi")], true).unwrap(),
            "<|user|>hi\n<|assistant|>"
        );
    }
    let o = Command::new(env!("CARGO_BIN_EXE_upmix"))
        .args([
            "generate",
            out.to_str().unwrap(),
            "--chat",
            "--prompt",
            "hi",
            "-n",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn config_fields_of_another_family_are_dropped_and_the_rest_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let a = checkpoint(tmp.path(), "llama", |c| {
        c["pretraining_tp"] = 1.into();
        c["pad_token_id"] = 0.into();
        c["auto_map"] = serde_json::json!({ "AutoConfig": "remote.Config" });
    });
    let out = tmp.path().join("moe");
    run(
        tmp.path(),
        &format!(
            "Pipeline(models: {{ \"a\": Hf(\"{}\"), \"b\": Hf(\"{}\") }},
              passes: [ Upcycle(into: \"moe\", experts: [\"a\", \"b\"], top_k: 1, router: Random(seed: 1, std: 0.1), base: \"a\") ],
              emit: [ Hf(model: \"moe\", dir: \"{}\") ])",
            a.display(),
            model_dir("llama_b").display(),
            out.display()
        ),
    );
    let c = config(&out);
    assert_eq!(
        c["architectures"],
        serde_json::json!(["MixtralForCausalLM"])
    );
    assert_eq!(
        (&c["num_local_experts"], &c["num_experts_per_tok"]),
        (&2.into(), &1.into())
    );
    assert_eq!(c["pad_token_id"], 0);
    assert_eq!(c["attention_dropout"], 0.0);
    assert!(c.get("pretraining_tp").is_none(), "a Llama-only field");
    assert!(c.get("auto_map").is_none(), "remote code of the base");
    // The base's tokenizer files travel with the MoE.
    assert_eq!(
        std::fs::read(out.join("chat_template.jinja")).unwrap(),
        TEMPLATE.as_bytes()
    );
}
