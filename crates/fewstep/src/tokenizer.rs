//! The CLIP byte-level BPE tokenizer that Stable Diffusion's text encoders use, with the semantics of
//! transformers' `CLIPTokenizer(text, padding="max_length", truncation=True, max_length=77)`.
//!
//! A tokenizer folder holds either a `tokenizer.json` (the `tokenizers` library's own format) or the
//! `vocab.json` + `merges.txt` pair that diffusers model folders ship. For the pair, the pipeline that
//! transformers builds for its CLIP fast tokenizer is rebuilt here: NFC, whitespace runs → one space,
//! lowercase; CLIP's split regex; byte-level mapping; BPE with the `</w>` end-of-word suffix; BOS/EOS around
//! the tokens. `tokenizer_config.json` / `special_tokens_map.json`, where present, name the special tokens
//! (SD1.x pads with EOS `<|endoftext|>`, SD2.x and SDXL's second tokenizer pad with `!`, id 0) and the
//! maximum length.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::{Lowercase, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// CLIP's pre-tokenization regex (the special tokens, English contractions, letter runs, single digits,
/// runs of other non-space characters).
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// The length every Stable Diffusion text encoder was trained with.
pub const CLIP_MAX_LENGTH: usize = 77;

const BUNDLED_VOCAB: &str = include_str!("../assets/clip/vocab.json");
const BUNDLED_MERGES: &str = include_str!("../assets/clip/merges.txt");

/// The padding token of a bundled tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadToken {
    /// `<|endoftext|>` (49407), as SD1.x's tokenizer.
    Eos,
    /// `!` (id 0), as SD2.x's and SDXL's second tokenizer.
    Bang,
}

/// The CLIP tokenizer: text → exactly `max_length` token ids (BOS, tokens, EOS, padding).
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

/// The special-token names and the maximum length, as transformers merges them from
/// `tokenizer_config.json` and then `special_tokens_map.json` (the latter wins where both give a key).
struct SpecialTokens {
    bos: AddedToken,
    eos: AddedToken,
    pad: AddedToken,
    unk: AddedToken,
    max_length: usize,
}

/// A special token given as `"<|endoftext|>"` (matched verbatim) or as an `AddedToken` object
/// `{"content": "<|endoftext|>", "normalized": true, …}` (`normalized: true` matches it in the lowercased
/// text). transformers adds every special token to the vocabulary this way — even SD2's pad token `!`, so
/// that a `!` in an SD2 prompt becomes id 0, which is reproduced here.
fn special_token(v: &Value) -> Option<AddedToken> {
    let flag = |m: &serde_json::Map<String, Value>, k: &str| m.get(k).and_then(|b| b.as_bool());
    match v {
        Value::String(s) => Some(AddedToken::from(s.clone(), true).normalized(false)),
        Value::Object(m) => {
            let content = m.get("content")?.as_str()?;
            Some(
                AddedToken::from(content, true)
                    .normalized(flag(m, "normalized").unwrap_or(false))
                    .lstrip(flag(m, "lstrip").unwrap_or(false))
                    .rstrip(flag(m, "rstrip").unwrap_or(false))
                    .single_word(flag(m, "single_word").unwrap_or(false)),
            )
        }
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

impl SpecialTokens {
    fn read(dir: &Path) -> Result<Self> {
        let verbatim = |t: &str| AddedToken::from(t, true).normalized(false);
        let mut s = SpecialTokens {
            bos: verbatim(DEFAULT_BOS),
            eos: verbatim(DEFAULT_EOS),
            pad: verbatim(DEFAULT_EOS),
            unk: verbatim(DEFAULT_EOS),
            max_length: CLIP_MAX_LENGTH,
        };
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json = read_json(&path)?;
            for (key, slot) in [
                ("bos_token", &mut s.bos),
                ("eos_token", &mut s.eos),
                ("pad_token", &mut s.pad),
                ("unk_token", &mut s.unk),
            ] {
                if let Some(v) = json.get(key).and_then(special_token) {
                    *slot = v;
                }
            }
            if let Some(n) = json.get("model_max_length").and_then(|v| v.as_f64()) {
                // transformers writes a huge sentinel (1e30) when no length is known; CLIP's is 77.
                if (2.0..=1e6).contains(&n) {
                    s.max_length = n as usize;
                } else {
                    tracing::warn!(
                        "{}: model_max_length {n} is not a usable length; using {CLIP_MAX_LENGTH}",
                        path.display()
                    );
                }
            }
        }
        Ok(s)
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Reads `vocab.json` (token → id) and `merges.txt` (`#version` header, then one `a b` pair a line).
fn read_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<(Vocab, Merges)> {
    let vocab_text = std::fs::read_to_string(vocab_path).map_err(|e| Error::io(vocab_path, e))?;
    let merges_text =
        std::fs::read_to_string(merges_path).map_err(|e| Error::io(merges_path, e))?;
    parse_vocab_merges(&vocab_text, &merges_text, vocab_path, merges_path)
}

/// Parses the texts of `vocab.json` and `merges.txt` (paths for messages only).
fn parse_vocab_merges(
    vocab_text: &str,
    text: &str,
    vocab_path: &Path,
    merges_path: &Path,
) -> Result<(Vocab, Merges)> {
    let json: Value = serde_json::from_str(vocab_text).map_err(|e| Error::Config {
        path: vocab_path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })?;
    let vocab: Vocab = match json {
        Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| {
                let id = v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        tok_err(
                            vocab_path,
                            format!("token {k:?} has id {v}, expected an integer"),
                        )
                    })?;
                Ok((k, id))
            })
            .collect::<Result<_>>()?,
        _ => return Err(tok_err(vocab_path, "expected a JSON object of token → id")),
    };
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let (a, b) = line.split_once(' ').ok_or_else(|| {
            tok_err(
                merges_path,
                format!("line {}: expected two tokens separated by a space", i + 1),
            )
        })?;
        if b.contains(' ') {
            return Err(tok_err(
                merges_path,
                format!("line {}: expected two tokens separated by a space", i + 1),
            ));
        }
        merges.push((a.to_string(), b.to_string()));
    }
    Ok((vocab, merges))
}

/// Builds transformers' CLIP fast-tokenizer pipeline around a vocabulary and merge list.
fn build_clip_pipeline(
    vocab: Vocab,
    merges: Merges,
    unk: &str,
    source: &Path,
) -> Result<Tokenizer> {
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .unk_token(unk.to_string())
        .build()
        .map_err(|e| tok_err(source, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace =
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| tok_err(source, e))?;
    let normalizer = NormSequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()]);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| tok_err(source, e))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_REGEX.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tok_err(source, e))?;
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        byte_level.into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::new(true, true, true)));
    Ok(tokenizer)
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`; plus
    /// `tokenizer_config.json` / `special_tokens_map.json` if present (special tokens, `model_max_length`,
    /// default 77). A missing or malformed file is an error naming it.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                what: "tokenizer folder".into(),
            });
        }
        let special = SpecialTokens::read(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        let (tokenizer, source): (Tokenizer, PathBuf) = if tokenizer_json.is_file() {
            let t =
                Tokenizer::from_file(&tokenizer_json).map_err(|e| tok_err(&tokenizer_json, e))?;
            (t, tokenizer_json)
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            for p in [&vocab_path, &merges_path] {
                if !p.is_file() {
                    return Err(Error::Missing {
                        path: p.clone(),
                        what: "tokenizer file (a tokenizer folder needs tokenizer.json, or vocab.json and merges.txt)".into(),
                    });
                }
            }
            let (vocab, merges) = read_vocab_merges(&vocab_path, &merges_path)?;
            let t = build_clip_pipeline(vocab, merges, &special.unk.content, &vocab_path)?;
            (t, vocab_path)
        };
        Self::finish(tokenizer, special, &source)
    }

    /// The CLIP ViT-L/14 BPE vocabulary and merges (OpenAI's `bpe_simple_vocab_16e6`, as published with
    /// every Stable Diffusion 1.x/2.x model) embedded in the library, for single-file checkpoints that
    /// carry no tokenizer. `pad` is the padding token: [`PadToken::Eos`] for SD1.x, [`PadToken::Bang`]
    /// (`!`, id 0) for SD2.x.
    pub fn bundled(pad: PadToken) -> Result<Self> {
        let source = Path::new("<bundled clip tokenizer>/vocab.json");
        let merges_source = Path::new("<bundled clip tokenizer>/merges.txt");
        let verbatim = |t: &str| AddedToken::from(t, true).normalized(false);
        let special = SpecialTokens {
            bos: verbatim(DEFAULT_BOS),
            eos: verbatim(DEFAULT_EOS),
            pad: match pad {
                PadToken::Eos => verbatim(DEFAULT_EOS),
                PadToken::Bang => verbatim("!"),
            },
            unk: verbatim(DEFAULT_EOS),
            max_length: CLIP_MAX_LENGTH,
        };
        let (vocab, merges) =
            parse_vocab_merges(BUNDLED_VOCAB, BUNDLED_MERGES, source, merges_source)?;
        let tokenizer = build_clip_pipeline(vocab, merges, &special.unk.content, source)?;
        Self::finish(tokenizer, special, source)
    }

    fn finish(mut tokenizer: Tokenizer, special: SpecialTokens, source: &Path) -> Result<Self> {
        let id_of = |tokenizer: &Tokenizer, name: &str, role: &str| {
            tokenizer.token_to_id(name).ok_or_else(|| {
                tok_err(
                    source,
                    format!("{role} token {name:?} is not in the vocabulary"),
                )
            })
        };
        let bos_id = id_of(&tokenizer, &special.bos.content, "bos")?;
        let eos_id = id_of(&tokenizer, &special.eos.content, "eos")?;
        let pad_id = id_of(&tokenizer, &special.pad.content, "pad")?;
        id_of(&tokenizer, &special.unk.content, "unk")?;
        // As transformers does, the special tokens are matched in the text before BPE (verbatim, or in
        // the normalized text where the config says `normalized: true`), and the post-processor frames a
        // sequence as BOS … EOS.
        tokenizer
            .add_special_tokens([
                special.bos.clone(),
                special.eos.clone(),
                special.unk.clone(),
                special.pad.clone(),
            ])
            .map_err(|e| tok_err(source, e))?;
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new(
                (special.eos.content.clone(), eos_id),
                (special.bos.content.clone(), bos_id),
            )
            .trim_offsets(false)
            .add_prefix_space(false),
        ));
        tokenizer
            .with_truncation(None)
            .map_err(|e| tok_err(source, e))?;
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length: special.max_length,
        })
    }

    /// The number of ids [`encode`](Self::encode) returns (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The begin-of-text id (49406 for CLIP).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The end-of-text id (49407 for CLIP).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The padding id: EOS (49407) for SD1.x, `!` (0) for SD2.x and SDXL's second tokenizer.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The text's BPE ids without BOS/EOS and without truncation.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::invalid("prompt", format!("tokenization failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// How many tokens the text has, untruncated and without BOS/EOS; more than `max_length() - 2`
    /// means [`encode`](Self::encode) drops the rest.
    pub fn token_count(&self, text: &str) -> Result<usize> {
        Ok(self.tokenize(text)?.len())
    }

    /// Exactly `max_length()` ids: BOS, the text's tokens truncated to `max_length() - 2`, EOS, then the pad
    /// id — transformers' `tokenizer(text, padding="max_length", truncation=True, max_length=77)`. When
    /// tokens are dropped, the dropped text is logged with `tracing::warn!` (as diffusers does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut tokens = self.tokenize(text)?;
        let room = self.max_length - 2;
        if tokens.len() > room {
            let dropped = self.decode(&tokens[room..]).unwrap_or_default();
            tracing::warn!(
                "the prompt has {} tokens and CLIP reads at most {room}; this part was truncated: {dropped:?}",
                tokens.len()
            );
            tokens.truncate(room);
        }
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// `[B, max_length]` u32 ids of `texts` on `device`, each row as [`encode`](Self::encode) gives it —
    /// the text encoder's input.
    pub fn encode_batch(
        &self,
        texts: &[&str],
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        let mut ids = Vec::with_capacity(texts.len() * self.max_length);
        for t in texts {
            ids.extend(self.encode(t)?);
        }
        Ok(candle_core::Tensor::from_vec(
            ids,
            (texts.len(), self.max_length),
            device,
        )?)
    }

    /// Text of the given ids with special tokens skipped and the `</w>` word ends turned into spaces.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, true)
            .map_err(|e| Error::invalid("token ids", e.to_string()))?;
        Ok(text.replace("</w>", " ").trim().to_string())
    }
}
