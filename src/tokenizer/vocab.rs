//! Learning a subword vocabulary by merging frequent symbol pairs (Sennrich et al., 2016,
//! https://arxiv.org/abs/1508.07909) — the algorithm behind both HF trainers we replace.
//!
//! Why not `tokenizers`' own trainers: they number tied characters in hash-map order, which changes per
//! process, and break merge ties by those numbers, so the same corpus gave a different vocabulary in 4 of
//! 6 runs of `experiments/smoke.toml`. Here every tie is broken by the symbols' strings, so the
//! vocabulary is a function of the corpus and the settings alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub struct Options<'a> {
    pub vocab_size: usize,
    pub min_frequency: u64,
    /// Keep at most this many distinct characters (most frequent first); `initial` always stays.
    pub limit_alphabet: Option<usize>,
    /// Characters that are always in the alphabet (the 256 byte symbols for byte-level BPE).
    pub initial: Vec<char>,
    /// WordPiece marks non-initial pieces with `##`; byte-level BPE marks none.
    pub prefix: Option<&'a str>,
    pub specials: &'a [&'a str],
}

/// Tokens in id order (specials first) and the merges in the order they were learned.
pub struct Learned {
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

type Pair = (u32, u32);

struct Table {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Table {
    fn id(&mut self, token: String) -> u32 {
        if let Some(&id) = self.ids.get(&token) {
            return id;
        }
        let id = self.tokens.len() as u32;
        self.ids.insert(token.clone(), id);
        self.tokens.push(token);
        id
    }
}

fn alphabet(words: &BTreeMap<String, u64>, opts: &Options) -> BTreeSet<char> {
    let mut counts: BTreeMap<char, u64> = BTreeMap::new();
    for (w, &c) in words {
        for ch in w.chars() {
            *counts.entry(ch).or_default() += c;
        }
    }
    let mut ranked: Vec<(char, u64)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let limit = opts.limit_alphabet.unwrap_or(usize::MAX);
    let mut kept: BTreeSet<char> = opts.initial.iter().copied().collect();
    kept.extend(ranked.into_iter().take(limit).map(|(ch, _)| ch));
    kept
}

fn symbol(ch: char, first: bool, prefix: Option<&str>) -> String {
    match prefix {
        Some(p) if !first => format!("{p}{ch}"),
        _ => ch.to_string(),
    }
}

/// Learns a vocabulary from word counts (words as the pre-tokenizer split them).
pub fn learn(words: &BTreeMap<String, u64>, opts: &Options) -> Learned {
    let kept = alphabet(words, opts);
    let mut table = Table {
        tokens: Vec::new(),
        ids: HashMap::new(),
    };
    for s in opts.specials {
        table.id(s.to_string());
    }
    let mut initial: BTreeSet<String> = kept.iter().map(|c| c.to_string()).collect();
    let mut seqs: Vec<(Vec<String>, u64)> = Vec::new();
    for (w, &count) in words {
        let syms: Vec<String> = w
            .chars()
            .enumerate()
            .filter(|(_, ch)| kept.contains(ch))
            .map(|(i, ch)| symbol(ch, i == 0, opts.prefix))
            .collect();
        initial.extend(syms.iter().cloned());
        seqs.push((syms, count));
    }
    for s in initial {
        table.id(s);
    }
    let mut corpus: Vec<(Vec<u32>, u64)> = seqs
        .into_iter()
        .map(|(syms, c)| (syms.into_iter().map(|s| table.id(s)).collect(), c))
        .collect();
    let merges = merge_until_full(&mut corpus, &mut table, opts);
    Learned {
        tokens: table.tokens,
        merges,
    }
}

fn pairs_of(word: &[u32]) -> impl Iterator<Item = Pair> + '_ {
    word.windows(2).map(|w| (w[0], w[1]))
}

fn merge_until_full(
    corpus: &mut [(Vec<u32>, u64)],
    table: &mut Table,
    opts: &Options,
) -> Vec<(String, String)> {
    let mut counts: HashMap<Pair, i64> = HashMap::new();
    let mut where_: HashMap<Pair, BTreeSet<usize>> = HashMap::new();
    for (i, (word, c)) in corpus.iter().enumerate() {
        for p in pairs_of(word) {
            *counts.entry(p).or_default() += *c as i64;
            where_.entry(p).or_default().insert(i);
        }
    }
    let mut merges = Vec::new();
    while table.tokens.len() < opts.vocab_size {
        let best = counts
            .iter()
            .filter(|(_, &c)| c > 0 && c as u64 >= opts.min_frequency)
            .max_by(|a, b| {
                a.1.cmp(b.1).then_with(|| {
                    let key = |p: &Pair| (&table.tokens[p.0 as usize], &table.tokens[p.1 as usize]);
                    key(b.0).cmp(&key(a.0))
                })
            })
            .map(|(p, _)| *p);
        let Some(pair) = best else { break };
        let (left, right) = (
            table.tokens[pair.0 as usize].clone(),
            table.tokens[pair.1 as usize].clone(),
        );
        let joined = match opts.prefix {
            Some(p) => format!("{left}{}", right.strip_prefix(p).unwrap_or(&right)),
            None => format!("{left}{right}"),
        };
        let new_id = table.id(joined);
        merges.push((left, right));
        for i in where_.remove(&pair).unwrap_or_default() {
            let (word, c) = &mut corpus[i];
            let c = *c as i64;
            for p in pairs_of(word) {
                *counts.entry(p).or_default() -= c;
            }
            *word = merge_word(word, pair, new_id);
            for p in pairs_of(word) {
                *counts.entry(p).or_default() += c;
                where_.entry(p).or_default().insert(i);
            }
        }
        counts.remove(&pair);
    }
    merges
}

fn merge_word(word: &[u32], pair: Pair, new_id: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && (word[i], word[i + 1]) == pair {
            out.push(new_id);
            i += 2;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
        list.iter().map(|(w, c)| (w.to_string(), *c)).collect()
    }

    #[test]
    fn merges_the_most_frequent_pair_first_and_breaks_ties_by_string() {
        let w = words(&[("abab", 3), ("cd", 3), ("ab", 1)]);
        let opts = Options {
            vocab_size: 100,
            min_frequency: 2,
            limit_alphabet: None,
            initial: vec![],
            prefix: None,
            specials: &["[PAD]"],
        };
        let l = learn(&w, &opts);
        // (a, b) occurs 7 times; then "ab ab" (3) ties with "c d" (3): ("ab", "ab") < ("c", "d").
        assert_eq!(
            l.merges,
            vec![
                ("a".into(), "b".into()),
                ("ab".into(), "ab".into()),
                ("c".into(), "d".into())
            ]
        );
        assert_eq!(l.tokens[0], "[PAD]");
        assert!(l.tokens.contains(&"abab".to_string()));
    }

    #[test]
    fn wordpiece_prefixes_inner_pieces_and_respects_the_alphabet_limit() {
        let w = words(&[("hello", 5), ("help", 4), ("中", 9), ("x", 1)]);
        let opts = Options {
            vocab_size: 12,
            min_frequency: 1,
            limit_alphabet: Some(6),
            initial: vec![],
            prefix: Some("##"),
            specials: &[],
        };
        let l = learn(&w, &opts);
        assert!(l.tokens.contains(&"##e".to_string()));
        // (##e, ##l) and (h, ##e) both occur 9 times; "##e" sorts first, then "h" + "##el" follows.
        assert_eq!(l.merges[0], ("##e".to_string(), "##l".to_string()));
        assert!(l.tokens.contains(&"hel".to_string()), "{:?}", l.tokens);
        assert!(
            !l.tokens.contains(&"x".to_string()),
            "the rarest character is dropped"
        );
        assert_eq!(l.tokens.len(), 12);
    }
}
