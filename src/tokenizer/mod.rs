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

    /// BERT's WordPiece from a `vocab.txt` (one token per line, ids in line order).
    pub fn from_vocab(path: &Path, lowercase: bool) -> Result<Self, TokenizerError> {
        let load = |message: String| TokenizerError::Load {
            path: path.display().to_string(),
            message,
        };
        let model = WordPiece::from_file(&path.display().to_string())
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .build()
            .map_err(|e| load(e.to_string()))?;
        let mut tok = Tokenizer::new(model);
        tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_decoder(Some(WordPieceDecoder::default()));
        tok.add_special_tokens(&special_tokens());
        Self::from_tokenizer(tok, &path.display().to_string())
    }

    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_tokenizer(inner, &path.display().to_string())
    }

    fn from_tokenizer(mut inner: Tokenizer, name: &str) -> Result<Self, TokenizerError> {
        // xrun frames, truncates and pads itself; a loaded file may say otherwise
        // (sentence-transformers' files pad every text to 128).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Load {
                path: name.to_string(),
                message: e.to_string(),
            })?;
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
            // GPT-2's one special token stands in for all of them: it frames texts and pads
            // them; its models have no masked objective.
            pad: find("[PAD]", &["<pad>", "<|endoftext|>"])?,
            unk: find("[UNK]", &["<unk>", "<|endoftext|>"])?,
            cls: find("[CLS]", &["<s>", "<|endoftext|>"])?,
            sep: find("[SEP]", &["</s>", "<|endoftext|>"])?,
            mask: find("[MASK]", &["<mask>", "<|endoftext|>"])?,
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

    /// The token string of an id.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids of a text without special tokens.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// `[CLS] w1 w2 … [SEP]` for a tagged sentence, and the position of each word's first token
    /// (its tag is predicted there). The words are tokenized as the text they were read as (joined
    /// by spaces, the text the tokenizer learned from), and each token belongs to the word its
    /// offset starts in: no token spans two words, since every pre-tokenizer splits on spaces. A
    /// word the normalizer erases entirely becomes `[UNK]`, so every word keeps a position. Whole
    /// words are cut from the end to fit `max_len`; the positions cover the words kept.
    pub fn encode_words(
        &self,
        words: &[String],
        max_len: usize,
    ) -> Result<(Vec<u32>, Vec<u32>, bool), TokenizerError> {
        let text = words.join(" ");
        let enc = self
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut per_word: Vec<Vec<u32>> = vec![Vec::new(); words.len()];
        let mut ends = Vec::with_capacity(words.len());
        let mut end = 0;
        for w in words {
            end += w.len();
            ends.push(end);
            end += 1;
        }
        let mut word = 0;
        for (&id, &(start, _)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            while word + 1 < words.len() && start >= ends[word] {
                word += 1;
            }
            per_word[word].push(id);
        }
        let room = max_len.saturating_sub(1 + usize::from(self.closes()));
        let mut ids = Vec::with_capacity(max_len);
        let mut positions = Vec::with_capacity(words.len());
        ids.push(self.specials.cls);
        let mut truncated = false;
        for tokens in &mut per_word {
            if tokens.is_empty() {
                tokens.push(self.specials.unk);
            }
            if ids.len() - 1 + tokens.len() > room {
                truncated = true;
                if positions.is_empty() {
                    // A first word longer than the room keeps its first tokens: every sentence
                    // keeps at least one tagged position.
                    positions.push(1);
                    ids.extend_from_slice(&tokens[..room.max(1)]);
                }
                break;
            }
            positions.push(ids.len() as u32);
            ids.extend_from_slice(tokens);
        }
        if self.closes() {
            ids.push(self.specials.sep);
        }
        Ok((ids, positions, truncated))
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
        let close = self.closes();
        let framing = 1 + usize::from(close) + usize::from(b.is_some());
        let room = max_len.saturating_sub(framing);
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
        if let Some(b) = b {
            out.push(self.specials.sep);
            out.extend(b);
        }
        if close {
            out.push(self.specials.sep);
        }
        Ok((out, truncated))
    }

    /// Whether texts end with `[SEP]`. A tokenizer with one special token for everything
    /// (GPT-2's `<|endoftext|>`) opens texts with it but does not close them: a closing token
    /// equal to the padding would hide the text's last token from GPT-2's classifier, which
    /// reads the last token that is not padding.
    pub fn closes(&self) -> bool {
        self.specials.cls != self.specials.sep
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::TokenizerKind;

    fn trained(kind: TokenizerKind) -> TextTokenizer {
        let cfg = TokenizerSection {
            kind,
            vocab_size: 300,
            min_frequency: 1,
            lowercase: true,
            limit_alphabet: None,
            path: None,
        };
        let texts = [
            "高 勇 ： 男 ， 中 国 国 籍",
            "Peter Blackburn visited Brussels",
            "Brussels rejects Blackburn",
        ];
        TextTokenizer::build(&cfg, Path::new("."), texts.into_iter()).expect("trains")
    }

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    /// Each word's tag sits on its first token; sub-words never cross a word; a word the
    /// normalizer erases keeps a position as `[UNK]`; truncation drops whole words.
    #[test]
    fn words_keep_their_positions() {
        for kind in [TokenizerKind::Wordpiece, TokenizerKind::Bpe] {
            let tok = trained(kind);
            for sentence in ["高 勇 ： 男", "Blackburn Brussels rejects Peter"] {
                let w = words(sentence);
                let (ids, positions, cut) = tok.encode_words(&w, 64).unwrap();
                assert!(!cut);
                assert_eq!(positions.len(), w.len(), "{kind:?}");
                assert_eq!(positions[0], 1);
                assert_eq!(*ids.last().unwrap(), tok.specials.sep);
                // The tokens from one word's position to the next decode to that word.
                let mut bounds = positions.clone();
                bounds.push(ids.len() as u32 - 1);
                for (i, word) in w.iter().enumerate() {
                    let piece = &ids[bounds[i] as usize..bounds[i + 1] as usize];
                    let text = tok.inner.decode(piece, true).unwrap();
                    assert_eq!(text.trim(), word.to_lowercase(), "{kind:?}");
                }
            }
            let w = words("Blackburn Brussels rejects");
            let (_, short, cut) = tok.encode_words(&w, 4).unwrap();
            assert!(cut && short.len() < 3, "{kind:?}: {short:?}");
        }
        let tok = trained(TokenizerKind::Wordpiece);
        // Chinese characters are one token each; U+200B is erased by BERT's normalizer.
        let w = words("高 \u{200b} 勇");
        let (ids, positions, _) = tok.encode_words(&w, 64).unwrap();
        assert_eq!(positions, [1, 2, 3]);
        assert_eq!(ids[2], tok.specials.unk);
    }
}
