//! Text → ids: learns a WordPiece or byte-level BPE vocabulary (`vocab`, deterministic), builds the
//! `tokenizers` model from it, or loads a `tokenizer.json`; wraps it with the special tokens every
//! stage needs.
//!
//! Special tokens are added by xrun, not by a post-processor, so WordPiece, BPE and loaded files all
//! produce `[CLS] a [SEP]` (or `[CLS] a [SEP] b [SEP]`) the same way, truncated to `max_len`.

mod vocab;

use std::collections::BTreeMap;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, Tokenizer,
};

use crate::config::model::{TokenizerKind, TokenizerSection};

/// Names xrun gives its special tokens, in id order for trained tokenizers.
pub const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("training the tokenizer failed: {0}")]
    Train(String),
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer {path} has no {token} token (xrun needs {SPECIALS:?} or their <pad>/<unk>/<s>/</s>/<mask> forms)")]
    MissingSpecial { path: String, token: &'static str },
    #[error("cannot save tokenizer.json: {0}")]
    Save(String),
    #[error("tokenizing failed: {0}")]
    Encode(String),
}

/// Ids of the special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Specials {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

impl Specials {
    pub fn contains(&self, id: u32) -> bool {
        [self.pad, self.cls, self.sep, self.mask].contains(&id)
    }
}

pub struct TextTokenizer {
    inner: Tokenizer,
    pub specials: Specials,
    pub vocab_size: usize,
}

impl TextTokenizer {
    /// Trains on `texts` (the corpus, or the training split when there is none) or loads a file.
    pub fn build<'a>(
        cfg: &TokenizerSection,
        base_dir: &Path,
        texts: impl Iterator<Item = &'a str>,
    ) -> Result<Self, TokenizerError> {
        let inner = match cfg.kind {
            TokenizerKind::Wordpiece => train_wordpiece(cfg, texts)?,
            TokenizerKind::Bpe => train_bpe(cfg, texts)?,
            TokenizerKind::File => {
                return Self::load(&base_dir.join(cfg.path.as_deref().unwrap_or("tokenizer.json")));
            }
        };
        Self::from_tokenizer(inner, "the trained tokenizer")
    }

    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_tokenizer(inner, &path.display().to_string())
    }

    fn from_tokenizer(inner: Tokenizer, name: &str) -> Result<Self, TokenizerError> {
        let find = |token: &'static str, alts: &[&str]| {
            std::iter::once(token)
                .chain(alts.iter().copied())
                .find_map(|t| inner.token_to_id(t))
                .ok_or(TokenizerError::MissingSpecial {
                    path: name.to_string(),
                    token,
                })
        };
        let specials = Specials {
            pad: find("[PAD]", &["<pad>"])?,
            unk: find("[UNK]", &["<unk>"])?,
            cls: find("[CLS]", &["<s>", "<|endoftext|>"])?,
            sep: find("[SEP]", &["</s>", "<|endoftext|>"])?,
            mask: find("[MASK]", &["<mask>"])?,
        };
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            specials,
            vocab_size,
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, true)
            .map_err(|e| TokenizerError::Save(e.to_string()))
    }

    /// Ids of a text without special tokens.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, cut to `max_len` (the longer text loses tokens
    /// first), and whether anything was cut.
    pub fn encode(
        &self,
        text: &str,
        pair: Option<&str>,
        max_len: usize,
    ) -> Result<(Vec<u32>, bool), TokenizerError> {
        let mut a = self.ids(text)?;
        let mut b = pair.map(|p| self.ids(p)).transpose()?;
        let room = max_len.saturating_sub(if b.is_some() { 3 } else { 2 });
        let truncated = a.len() + b.as_ref().map_or(0, Vec::len) > room;
        while a.len() + b.as_ref().map_or(0, Vec::len) > room {
            match &mut b {
                Some(b) if b.len() > a.len() => b.pop(),
                _ => a.pop(),
            };
        }
        let mut out = Vec::with_capacity(max_len);
        out.push(self.specials.cls);
        out.extend(a);
        out.push(self.specials.sep);
        if let Some(b) = b {
            out.extend(b);
            out.push(self.specials.sep);
        }
        Ok((out, truncated))
    }
}

fn special_tokens() -> Vec<AddedToken> {
    SPECIALS
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect()
}

/// Counts the words the normalizer and pre-tokenizer make of `texts`.
fn word_counts<'a>(
    normalizer: Option<&dyn Normalizer>,
    pre: &dyn PreTokenizer,
    texts: impl Iterator<Item = &'a str>,
) -> Result<BTreeMap<String, u64>, TokenizerError> {
    let err = |e: tokenizers::Error| TokenizerError::Train(e.to_string());
    let mut words = BTreeMap::new();
    for text in texts {
        let mut normalized = NormalizedString::from(text);
        if let Some(n) = normalizer {
            n.normalize(&mut normalized).map_err(err)?;
        }
        let mut pretokenized = PreTokenizedString::from(normalized);
        pre.pre_tokenize(&mut pretokenized).map_err(err)?;
        for (word, _, _) in pretokenized.get_splits(OffsetReferential::Original, OffsetType::Char) {
            *words.entry(word.to_string()).or_default() += 1;
        }
    }
    Ok(words)
}

fn train_wordpiece<'a>(
    cfg: &TokenizerSection,
    texts: impl Iterator<Item = &'a str>,
) -> Result<Tokenizer, TokenizerError> {
    let normalizer = BertNormalizer::new(true, true, None, cfg.lowercase);
    let words = word_counts(Some(&normalizer), &BertPreTokenizer, texts)?;
    let learned = vocab::learn(
        &words,
        &vocab::Options {
            vocab_size: cfg.vocab_size,
            min_frequency: cfg.min_frequency,
            limit_alphabet: Some(cfg.limit_alphabet.unwrap_or(cfg.vocab_size)),
            initial: Vec::new(),
            prefix: Some("##"),
            specials: &SPECIALS,
        },
    );
    let ids: tokenizers::models::bpe::Vocab = numbered(learned.tokens);
    let model = WordPiece::builder()
        .vocab(ids)
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(|e| TokenizerError::Train(e.to_string()))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(normalizer))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_decoder(Some(WordPieceDecoder::default()));
    tok.add_special_tokens(&special_tokens());
    Ok(tok)
}

fn train_bpe<'a>(
    cfg: &TokenizerSection,
    texts: impl Iterator<Item = &'a str>,
) -> Result<Tokenizer, TokenizerError> {
    let pre = ByteLevel::new(false, true, true);
    let lowercase = cfg.lowercase.then_some(Lowercase);
    let words = word_counts(
        lowercase.as_ref().map(|l| l as &dyn Normalizer),
        &pre,
        texts,
    )?;
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort();
    let learned = vocab::learn(
        &words,
        &vocab::Options {
            vocab_size: cfg.vocab_size,
            min_frequency: cfg.min_frequency,
            limit_alphabet: None,
            initial: bytes,
            prefix: None,
            specials: &SPECIALS,
        },
    );
    let model = BPE::builder()
        .vocab_and_merges(numbered(learned.tokens), learned.merges)
        .build()
        .map_err(|e| TokenizerError::Train(e.to_string()))?;
    let mut tok = Tokenizer::new(model);
    if let Some(l) = lowercase {
        tok.with_normalizer(Some(l));
    }
    tok.with_pre_tokenizer(Some(pre))
        .with_decoder(Some(ByteLevelDecoder::default()));
    tok.add_special_tokens(&special_tokens());
    Ok(tok)
}

fn numbered(tokens: Vec<String>) -> tokenizers::models::bpe::Vocab {
    tokens.into_iter().zip(0u32..).collect()
}
