//! The CLIP tokenizer against transformers 5.23's `CLIPTokenizer` (fixture `reference/tokens.json`).

use std::path::{Path, PathBuf};

use fewstep::tokenizer::ClipTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sd_tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixtures().join("tiny-sd/tokenizer")).unwrap()
}

#[test]
fn astronaut_prompt() {
    let tok = sd_tokenizer();
    let ids = tok
        .encode("a photo of an astronaut riding a horse on mars")
        .unwrap();
    let mut expected = vec![
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407,
    ];
    expected.resize(77, 49407);
    assert_eq!(ids, expected);
    assert_eq!(
        tok.token_count("a photo of an astronaut riding a horse on mars")
            .unwrap(),
        10
    );
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    assert_eq!(tok.max_length(), 77);
}

#[test]
fn every_fixture_prompt_matches_transformers() {
    let text = std::fs::read_to_string(fixtures().join("reference/tokens.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() >= 24);
    // Both fixture folders carry the same tokenizer files.
    for dir in ["tiny-sd/tokenizer", "tiny-lcm/tokenizer"] {
        let tok = ClipTokenizer::from_dir(&fixtures().join(dir)).unwrap();
        assert_eq!(
            tok.max_length(),
            json["max_length"].as_u64().unwrap() as usize
        );
        assert_eq!(tok.pad_id() as u64, json["pad_id"].as_u64().unwrap());
        let mut failures = Vec::new();
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            let expected: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let ids = tok.encode(prompt).unwrap();
            if ids != expected {
                failures.push(format!(
                    "{prompt:?}:\n  got      {ids:?}\n  expected {expected:?}"
                ));
            }
            let untruncated = case["untruncated_len"].as_u64().unwrap() as usize;
            assert_eq!(
                tok.token_count(prompt).unwrap() + 2,
                untruncated,
                "{prompt:?}"
            );
        }
        assert!(failures.is_empty(), "{dir}:\n{}", failures.join("\n"));
    }
}

/// A folder with the CLIP vocabulary and the given config files, under the target dir.
fn temp_tokenizer_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("tiny-sd/tokenizer");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    for (f, content) in files {
        std::fs::write(dir.join(f), content).unwrap();
    }
    dir
}

/// SD2.x / SDXL's second tokenizer: `pad_token` "!" (id 0), special tokens as AddedToken objects with
/// `normalized: true`. Expected ids from transformers 5.23 on the same files: a `!` in the prompt is the
/// special pad token there too (id 0), and the special tokens match case-insensitively.
#[test]
fn sd2_style_pad_token() {
    let added = |t: &str| {
        format!(
            r#"{{"__type": "AddedToken", "content": "{t}", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}}"#
        )
    };
    let config = format!(
        r#"{{"bos_token": {}, "eos_token": {}, "unk_token": {}, "pad_token": "!", "model_max_length": 77, "do_lower_case": true}}"#,
        added("<|startoftext|>"),
        added("<|endoftext|>"),
        added("<|endoftext|>")
    );
    let map = format!(
        r#"{{"bos_token": {}, "eos_token": {}, "unk_token": {}, "pad_token": "!"}}"#,
        added("<|startoftext|>"),
        added("<|endoftext|>"),
        added("<|endoftext|>")
    );
    let dir = temp_tokenizer_dir(
        "sd2-tokenizer",
        &[
            ("tokenizer_config.json", &config),
            ("special_tokens_map.json", &map),
        ],
    );
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.pad_id(), 0);
    let check = |prompt: &str, head: &[u32]| {
        let mut expected = head.to_vec();
        expected.resize(77, 0);
        assert_eq!(tok.encode(prompt).unwrap(), expected, "{prompt:?}");
    };
    check("hi", &[49406, 1883, 49407]);
    check("hello! world!!", &[49406, 3306, 0, 1002, 0, 0, 49407]);
    check("a <|ENDOFTEXT|> b", &[49406, 320, 49407, 321, 49407]);
}

#[test]
fn truncation_keeps_eos_last() {
    let tok = sd_tokenizer();
    let prompt = "a ".repeat(100);
    assert_eq!(tok.token_count(&prompt).unwrap(), 100);
    let ids = tok.encode(&prompt).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert!(ids[1..76].iter().all(|&t| t == 320));
    assert_eq!(ids[76], 49407);
}

#[test]
fn missing_files_are_named() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tokenizer-missing-merges");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixtures().join("tiny-sd/tokenizer/vocab.json"),
        dir.join("vocab.json"),
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("merges.txt"), "{err}");

    let err = ClipTokenizer::from_dir(&dir.join("nonexistent"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nonexistent"), "{err}");

    let bad = temp_tokenizer_dir(
        "tokenizer-bad-config",
        &[("tokenizer_config.json", "{not json")],
    );
    let err = ClipTokenizer::from_dir(&bad).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
}

#[test]
fn batch_tensor() {
    let tok = sd_tokenizer();
    let t = tok
        .encode_batch(&["a cat", "a dog"], &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[2, 77]);
    assert_eq!(t.dtype(), candle_core::DType::U32);
    let rows = t.to_vec2::<u32>().unwrap();
    assert_eq!(rows[1], tok.encode("a dog").unwrap());
}

#[test]
fn decode_round_trip() {
    let tok = sd_tokenizer();
    let ids = tok.encode("A Photo of an Astronaut").unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "a photo of an astronaut");
}
