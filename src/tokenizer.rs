//! Text → ids: trains a WordPiece or byte-level BPE tokenizer with the `tokenizers` crate, or loads a
//! `tokenizer.json`, and wraps it with the special tokens every stage needs.
//!
//! Special tokens are added by xrun, not by a post-processor, so WordPiece, BPE and loaded files all
//! produce `[CLS] a [SEP]` (or `[CLS] a [SEP] b [SEP]`) the same way, truncated to `max_len`.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

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
        texts: impl Iterator<Item = &'a str> + Send,
    ) -> Result<Self, TokenizerError> {
        let inner = match cfg.kind {
            TokenizerKind::Wordpiece => train_wordpiece(cfg, texts)?,
            TokenizerKind::Bpe => train_bpe(cfg, texts)?,
            TokenizerKind::File => {
                let path = base_dir.join(cfg.path.as_deref().unwrap_or("tokenizer.json"));
                Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
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

    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

fn special_tokens() -> Vec<AddedToken> {
    SPECIALS
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect()
}

fn train_wordpiece<'a>(
    cfg: &TokenizerSection,
    texts: impl Iterator<Item = &'a str> + Send,
) -> Result<Tokenizer, TokenizerError> {
    let mut tok = Tokenizer::new(WordPiece::default());
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, cfg.lowercase)))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_decoder(Some(WordPieceDecoder::default()));
    let trainer = WordPieceTrainerBuilder::new()
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency)
        .special_tokens(special_tokens())
        .limit_alphabet(cfg.limit_alphabet.unwrap_or(cfg.vocab_size))
        .show_progress(false)
        .build();
    let mut trainer = TrainerWrapper::from(trainer);
    tok.train(&mut trainer, texts)
        .map_err(|e| TokenizerError::Train(e.to_string()))?;
    Ok(tok)
}

fn train_bpe<'a>(
    cfg: &TokenizerSection,
    texts: impl Iterator<Item = &'a str> + Send,
) -> Result<Tokenizer, TokenizerError> {
    let mut tok = Tokenizer::new(BPE::default());
    if cfg.lowercase {
        tok.with_normalizer(Some(tokenizers::normalizers::utils::Lowercase));
    }
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevelDecoder::default()));
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency)
        .special_tokens(special_tokens())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let mut trainer = TrainerWrapper::from(trainer);
    tok.train(&mut trainer, texts)
        .map_err(|e| TokenizerError::Train(e.to_string()))?;
    Ok(tok)
}
